"""A local stand-in for the Binance spot REST API, for tests that run ccxt's real client code.

It answers the endpoints ccxt's ``binance`` class calls for what the adapter uses
(``exchangeInfo``, ``time``, ``ticker/price``, ``ticker/24hr``, ``klines``, ``account``,
``order`` POST/GET/DELETE, ``openOrders``, ``allOrders``, ``myTrades``), checks the ``X-MBX-APIKEY``
header and the HMAC-SHA256 signature like Binance does, and behaves like Binance where
it matters for idempotency: a client order id is only unique among *open* orders, so a
blind resend of a filled order really does create a second order here.

Scenario switches: ``script("order", ...)`` queues one behaviour per incoming
``POST /api/v3/order`` (``ok``, ``hang_after_accept``, ``429``, ``418``, ``503``,
``500_after_accept``); ``script("query", "503", ...)`` does the same for
``GET /api/v3/order`` (``503``, or ``missing``: "Order does not exist." for an order it has,
as when an order is not yet visible); ``limit_fill`` and ``fill_rest_after_queries`` make LIMIT orders
fill partially and (optionally) complete later. ``order_delay_s`` makes each new order take
that long (like a real exchange's round trip); ``arrivals`` logs when each request arrived.

``klines`` with a ``startTime`` serves a deterministic history (``kline`` says what any candle
is), at most ``kline_cap`` rows an answer, up to the candle still open at ``now_ms`` (real time
when None); ``script("klines", "503", ...)`` fails such requests.

Fills move ``balances`` (fees included) as they would on the account. ``manual_trade`` and
``rest_order`` act on the account directly, as someone using the exchange's own site would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from quantum_trader.bus.embedded import free_port

_INTERVAL_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}

API_KEY = "fake-testnet-key-7f3a9c1e5b2d4f6a8c0e"
API_SECRET = "fake-testnet-secret-0d9b8a7c6e5f4a3b2c1d"


def _s(value: Decimal) -> str:
    """Binance prints decimals with 8 places."""
    return f"{value.quantize(Decimal('0.00000001')):f}"


@dataclass
class FakeOrder:
    """One order as the fake exchange keeps it."""

    order_id: int
    symbol: str
    client_order_id: str
    side: str
    type: str
    orig_qty: Decimal
    price: Decimal
    status: str
    fills: list[dict[str, Any]] = field(default_factory=list)
    created_ms: int = 0
    queries: int = 0

    @property
    def executed(self) -> Decimal:
        """Quantity filled so far."""
        return sum((Decimal(f["qty"]) for f in self.fills), Decimal(0))

    @property
    def quote(self) -> Decimal:
        """Quote amount filled so far."""
        return sum((Decimal(f["qty"]) * Decimal(f["price"]) for f in self.fills), Decimal(0))

    def view(self) -> dict[str, Any]:
        """The order as ``GET /api/v3/order`` shows it (no fills)."""
        return {
            "symbol": self.symbol,
            "orderId": self.order_id,
            "orderListId": -1,
            "clientOrderId": self.client_order_id,
            "price": _s(self.price),
            "origQty": _s(self.orig_qty),
            "executedQty": _s(self.executed),
            "cummulativeQuoteQty": _s(self.quote),
            "status": self.status,
            "timeInForce": "GTC",
            "type": self.type,
            "side": self.side,
            "stopPrice": "0.00000000",
            "icebergQty": "0.00000000",
            "time": self.created_ms,
            "updateTime": self.created_ms,
            "isWorking": True,
            "workingTime": self.created_ms,
            "origQuoteOrderQty": "0.00000000",
            "selfTradePreventionMode": "EXPIRE_MAKER",
        }


@dataclass
class Market:
    """One spot symbol and its filters."""

    base: str
    quote: str
    price: Decimal
    tick: Decimal = Decimal("0.01")
    step: Decimal = Decimal("0.0001")
    min_qty: Decimal = Decimal("0.0001")
    max_qty: Decimal = Decimal("9000")
    min_notional: Decimal = Decimal("5")


class FakeBinance:
    """The fake exchange's state and its aiohttp application."""

    def __init__(self) -> None:
        self.markets: dict[str, Market] = {
            "ETHUSDT": Market("ETH", "USDT", Decimal("3000.00")),
            "BTCUSDT": Market("BTC", "USDT", Decimal("60000.00"), step=Decimal("0.00001"), min_qty=Decimal("0.00001")),
        }
        self.keys = {API_KEY: API_SECRET}
        self.fee_rate = Decimal("0.001")
        self.orders: list[FakeOrder] = []
        self.requests: list[tuple[str, str]] = []
        self.arrivals: list[tuple[float, str, str]] = []  # (time.monotonic(), method, path), in arrival order
        self.order_delay_s = 0.0
        self.order_script: deque[str] = deque()
        self.query_script: deque[str] = deque()
        self.klines_script: deque[str] = deque()
        self.kline_cap = 1000  # Binance spot answers at most 1000 klines a request
        self.now_ms: int | None = None  # the history's clock; None = real time
        self.hang_s = 10.0
        self.limit_fill = Decimal(1)
        self.fill_rest_after_queries: int | None = None
        self.market_fill_split = 1
        self.balances = {"USDT": Decimal("10000"), "ETH": Decimal("1"), "BTC": Decimal("0.1")}
        self._ids = itertools.count(1001)
        self._trade_ids = itertools.count(5001)
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- scenario switches -------------------------------------------------------

    def script(self, endpoint: str, *behaviours: str) -> None:
        """Queue behaviours for the next calls to ``order`` (POST), ``query`` (GET order) or ``klines`` (history)."""
        queue = {"order": self.order_script, "query": self.query_script, "klines": self.klines_script}[endpoint]
        queue.extend(behaviours)

    def manual_trade(self, symbol: str, side: str, qty: str, client_order_id: str = "web_manual1") -> FakeOrder:
        """A MARKET order filled at the market price, placed outside the API (the exchange's own site)."""
        market = self.markets[symbol]
        order = FakeOrder(
            order_id=next(self._ids),
            symbol=symbol,
            client_order_id=client_order_id,
            side=side,
            type="MARKET",
            orig_qty=Decimal(qty),
            price=Decimal(0),
            status="FILLED",
            created_ms=int(time.time() * 1000),
        )
        self._fill(order, Decimal(qty), market.price, market)
        self.orders.append(order)
        return order

    def rest_order(self, symbol: str, side: str, qty: str, price: str, client_order_id: str) -> FakeOrder:
        """A LIMIT order resting unfilled on the book, placed outside the API, ``created_ms`` a minute ago."""
        order = FakeOrder(
            order_id=next(self._ids),
            symbol=symbol,
            client_order_id=client_order_id,
            side=side,
            type="LIMIT",
            orig_qty=Decimal(qty),
            price=Decimal(price),
            status="NEW",
            created_ms=int(time.time() * 1000) - 60_000,
        )
        self.orders.append(order)
        return order

    def placed(self, client_order_id: str | None = None) -> list[FakeOrder]:
        """Orders the exchange accepted (all, or those with one client order id)."""
        return [o for o in self.orders if client_order_id is None or o.client_order_id == client_order_id]

    def calls(self, method: str, path: str) -> int:
        """How many requests hit ``method path`` (e.g. ``POST /api/v3/order``)."""
        return Counter(self.requests)[(method, path)]

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> str:
        """Serve on 127.0.0.1 and a free port; returns the base URL."""
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/v3/ping", self._ping)
        app.router.add_get("/api/v3/time", self._time)
        app.router.add_get("/api/v3/exchangeInfo", self._exchange_info)
        app.router.add_get("/api/v3/ticker/price", self._ticker_price)
        app.router.add_get("/api/v3/ticker/24hr", self._ticker_24hr)
        app.router.add_get("/api/v3/klines", self._klines)
        app.router.add_get("/api/v3/account", self._account)
        app.router.add_post("/api/v3/order", self._new_order)
        app.router.add_get("/api/v3/order", self._query_order)
        app.router.add_delete("/api/v3/order", self._cancel_order)
        app.router.add_get("/api/v3/openOrders", self._open_orders)
        app.router.add_get("/api/v3/allOrders", self._all_orders)
        app.router.add_get("/api/v3/myTrades", self._my_trades)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        """Release hanging handlers and stop serving."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- plumbing --------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.arrivals.append((time.monotonic(), request.method, request.path))
        self.requests.append((request.method, request.path))
        response: web.StreamResponse = await handler(request)
        return response

    @staticmethod
    def _error(status: int, code: int, msg: str) -> web.Response:
        return web.json_response({"code": code, "msg": msg}, status=status)

    async def _signed(self, request: web.Request) -> dict[str, str] | web.Response:
        """The request's parameters if key and signature are valid, else Binance's error."""
        key = request.headers.get("X-MBX-APIKEY", "")
        if key not in self.keys:
            return self._error(401, -2015, "Invalid API-key, IP, or permissions for action.")
        raw = request.query_string if request.method in ("GET", "DELETE") else await request.text()
        payload, sep, signature = raw.rpartition("&signature=")
        expected = hmac.new(self.keys[key].encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not sep or not hmac.compare_digest(signature, expected):
            return self._error(400, -1022, "Signature for this request is not valid.")
        params = dict(parse_qsl(payload, keep_blank_values=True))
        now = int(time.time() * 1000)
        window = int(params.get("recvWindow", "5000"))
        if abs(now - int(params.get("timestamp", "0"))) > window:
            return self._error(400, -1021, "Timestamp for this request is outside of the recvWindow.")
        return params

    def _find(self, params: dict[str, str]) -> FakeOrder | None:
        coid = params.get("origClientOrderId")
        oid = params.get("orderId")
        # The newest order with that client id (ids are only unique among open orders).
        for order in reversed(self.orders):
            if order.symbol != params.get("symbol"):
                continue
            if (coid is not None and order.client_order_id == coid) or (oid is not None and str(order.order_id) == oid):
                return order
        return None

    # ---- public endpoints -------------------------------------------------------------

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _time(self, request: web.Request) -> web.Response:
        return web.json_response({"serverTime": int(time.time() * 1000)})

    async def _exchange_info(self, request: web.Request) -> web.Response:
        symbols = []
        for name, m in self.markets.items():
            symbols.append(
                {
                    "symbol": name,
                    "status": "TRADING",
                    "baseAsset": m.base,
                    "baseAssetPrecision": 8,
                    "quoteAsset": m.quote,
                    "quotePrecision": 8,
                    "quoteAssetPrecision": 8,
                    "baseCommissionPrecision": 8,
                    "quoteCommissionPrecision": 8,
                    "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
                    "icebergAllowed": True,
                    "ocoAllowed": True,
                    "quoteOrderQtyMarketAllowed": True,
                    "allowTrailingStop": True,
                    "cancelReplaceAllowed": True,
                    "isSpotTradingAllowed": True,
                    "isMarginTradingAllowed": False,
                    "filters": [
                        {
                            "filterType": "PRICE_FILTER",
                            "minPrice": _s(m.tick),
                            "maxPrice": "1000000.00000000",
                            "tickSize": _s(m.tick),
                        },
                        {
                            "filterType": "LOT_SIZE",
                            "minQty": _s(m.min_qty),
                            "maxQty": _s(m.max_qty),
                            "stepSize": _s(m.step),
                        },
                        {
                            "filterType": "NOTIONAL",
                            "minNotional": _s(m.min_notional),
                            "applyMinToMarket": True,
                            "maxNotional": "9000000.00000000",
                            "applyMaxToMarket": False,
                            "avgPriceMins": 5,
                        },
                    ],
                    "permissions": [],
                    "permissionSets": [["SPOT"]],
                    "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
                    "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
                }
            )
        return web.json_response(
            {
                "timezone": "UTC",
                "serverTime": int(time.time() * 1000),
                "rateLimits": [],
                "exchangeFilters": [],
                "symbols": symbols,
            }
        )

    async def _ticker_price(self, request: web.Request) -> web.Response:
        symbol = request.query.get("symbol")
        if symbol is not None:
            if symbol not in self.markets:
                return self._error(400, -1121, "Invalid symbol.")
            return web.json_response({"symbol": symbol, "price": _s(self.markets[symbol].price)})
        return web.json_response([{"symbol": name, "price": _s(m.price)} for name, m in self.markets.items()])

    async def _ticker_24hr(self, request: web.Request) -> web.Response:
        symbol = request.query.get("symbol", "")
        if symbol not in self.markets:
            return self._error(400, -1121, "Invalid symbol.")
        price = _s(self.markets[symbol].price)
        now = int(time.time() * 1000)
        return web.json_response(
            {
                "symbol": symbol,
                "lastPrice": price,
                "openPrice": price,
                "highPrice": price,
                "lowPrice": price,
                "bidPrice": price,
                "askPrice": price,
                "volume": "100.00000000",
                "quoteVolume": "300000.00000000",
                "openTime": now - 86_400_000,
                "closeTime": now,
                "count": 10,
            }
        )

    def kline(self, symbol: str, open_ms: int, interval: str = "1m") -> list[Any]:
        """The history's candle of ``symbol`` opened at ``open_ms``, as Binance's klines row (prices as text)."""
        step = _INTERVAL_MS[interval[-1]] * int(interval[:-1])
        n = open_ms // step
        open_ = self.markets[symbol].price + Decimal(n % 1000) / 4
        close = open_ + Decimal(n % 5 - 2) / 2
        high, low = max(open_, close) + 1, min(open_, close) - 1
        volume = Decimal(n % 7 + 1) / 8
        return [open_ms, _s(open_), _s(high), _s(low), _s(close), _s(volume), open_ms + step - 1, "0", 1, "0", "0", "0"]

    def _history(self, symbol: str, query: Any) -> web.Response:
        """Klines from ``startTime`` (to ``endTime``), oldest first, up to the one open now."""
        interval = query.get("interval", "1m")
        if interval[-1:] not in _INTERVAL_MS or not interval[:-1].isdecimal():
            return self._error(400, -1120, "Invalid interval.")
        step = _INTERVAL_MS[interval[-1]] * int(interval[:-1])
        now = self.now_ms if self.now_ms is not None else int(time.time() * 1000)
        last = min(now, int(query.get("endTime", now)))
        first = -(-int(query["startTime"]) // step) * step
        count = min(int(query.get("limit", "500")), self.kline_cap)
        rows = [self.kline(symbol, t, interval) for t in range(first, last + 1, step)[:count]]
        return web.json_response(rows)

    async def _klines(self, request: web.Request) -> web.Response:
        symbol = request.query.get("symbol", "")
        if symbol not in self.markets:
            return self._error(400, -1121, "Invalid symbol.")
        if "startTime" in request.query:
            behaviour = self.klines_script.popleft() if self.klines_script else "ok"
            if behaviour == "503":
                return web.Response(status=503, text="Service Unavailable")
            return self._history(symbol, request.query)
        limit = int(request.query.get("limit", "5"))
        price = self.markets[symbol].price
        start = int(time.time() // 60 * 60_000) - limit * 60_000
        rows = []
        for i in range(limit):
            p = _s(price + i)
            rows.append([start + i * 60_000, p, p, p, p, "1.0", start + (i + 1) * 60_000 - 1, p, 1, "0.5", p, "0"])
        return web.json_response(rows)

    # ---- private endpoints -------------------------------------------------------------

    async def _account(self, request: web.Request) -> web.Response:
        params = await self._signed(request)
        if isinstance(params, web.Response):
            return params
        return web.json_response(
            {
                "makerCommission": 10,
                "takerCommission": 10,
                "canTrade": True,
                "canWithdraw": False,
                "canDeposit": False,
                "updateTime": int(time.time() * 1000),
                "accountType": "SPOT",
                "balances": [{"asset": a, "free": _s(v), "locked": "0.00000000"} for a, v in self.balances.items()],
                "permissions": ["SPOT"],
            }
        )

    async def _new_order(self, request: web.Request) -> web.Response:
        params = await self._signed(request)
        if isinstance(params, web.Response):
            return params
        if self.order_delay_s:
            await asyncio.sleep(self.order_delay_s)
        behaviour = self.order_script.popleft() if self.order_script else "ok"
        if behaviour in ("429", "418"):
            return self._error(int(behaviour), -1003, "Too many requests; current limit is 1200 per minute.")
        if behaviour == "503":
            return web.Response(status=503, text="Service Unavailable")
        if behaviour == "echo_request":
            # script("order", "echo_request"): a gateway that quotes the request it refuses, key and signed body.
            key, body = request.headers.get("X-MBX-APIKEY", ""), await request.text()
            return self._error(400, -1102, f"Illegal parameter in request (X-MBX-APIKEY: {key}): {body}")
        symbol = params.get("symbol", "")
        market = self.markets.get(symbol)
        if market is None:
            return self._error(400, -1121, "Invalid symbol.")
        coid = params["newClientOrderId"]
        if any(o.client_order_id == coid and o.status in ("NEW", "PARTIALLY_FILLED") for o in self.orders):
            return self._error(400, -2010, "Duplicate order sent.")
        qty = Decimal(params["quantity"])
        if qty < market.min_qty or qty % market.step != 0:
            return self._error(400, -1013, "Filter failure: LOT_SIZE")
        kind = params["type"]
        price = Decimal(params.get("price", "0")) if kind == "LIMIT" else market.price
        if kind == "LIMIT" and price % market.tick != 0:
            return self._error(400, -1013, "Filter failure: PRICE_FILTER")
        if qty * price < market.min_notional:
            return self._error(400, -1013, "Filter failure: NOTIONAL")
        order = FakeOrder(
            order_id=next(self._ids),
            symbol=symbol,
            client_order_id=coid,
            side=params["side"],
            type=kind,
            orig_qty=qty,
            price=price if kind == "LIMIT" else Decimal(0),
            status="NEW",
            created_ms=int(time.time() * 1000),
        )
        if kind == "MARKET":
            parts = self.market_fill_split
            for i in range(parts):
                part = (
                    (qty / parts).quantize(market.step, rounding=ROUND_DOWN) if i < parts - 1 else qty - order.executed
                )
                self._fill(order, part, market.price + market.tick * i, market)
            order.status = "FILLED"
        else:
            first = (qty * self.limit_fill).quantize(market.step, rounding=ROUND_DOWN)
            if first > 0:
                self._fill(order, first, price, market)
            order.status = "FILLED" if order.executed == qty else ("PARTIALLY_FILLED" if first > 0 else "NEW")
        self.orders.append(order)
        if behaviour == "hang_after_accept":
            # Accepted and filled, but the answer never arrives in time: the duplicate-order trap.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.hang_s)
        if behaviour == "500_after_accept":
            return self._error(500, -1001, "Internal error; unable to process your request. Please try again.")
        body = order.view() | {"transactTime": order.created_ms, "fills": order.fills}
        for name in ("time", "updateTime", "isWorking", "stopPrice", "icebergQty", "origQuoteOrderQty"):
            body.pop(name, None)
        return web.json_response(body)

    def _fill(self, order: FakeOrder, qty: Decimal, price: Decimal, market: Market) -> None:
        # Commission in the asset received, like Binance without BNB discounts.
        if order.side == "BUY":
            commission, asset = qty * self.fee_rate, market.base
            self._move(market.base, qty - commission)
            self._move(market.quote, -qty * price)
        else:
            commission, asset = qty * price * self.fee_rate, market.quote
            self._move(market.base, -qty)
            self._move(market.quote, qty * price - commission)
        order.fills.append(
            {
                "price": _s(price),
                "qty": _s(qty),
                "commission": _s(commission),
                "commissionAsset": asset,
                "tradeId": next(self._trade_ids),
            }
        )

    def _move(self, asset: str, amount: Decimal) -> None:
        self.balances[asset] = self.balances.get(asset, Decimal(0)) + amount

    async def _query_order(self, request: web.Request) -> web.Response:
        params = await self._signed(request)
        if isinstance(params, web.Response):
            return params
        behaviour = self.query_script.popleft() if self.query_script else "ok"
        if behaviour == "503":
            return web.Response(status=503, text="Service Unavailable")
        order = self._find(params)
        if order is None or behaviour == "missing":
            return self._error(400, -2013, "Order does not exist.")
        order.queries += 1
        if (
            order.status == "PARTIALLY_FILLED"
            and self.fill_rest_after_queries is not None
            and order.queries >= self.fill_rest_after_queries
        ):
            self._fill(order, order.orig_qty - order.executed, order.price, self.markets[order.symbol])
            order.status = "FILLED"
        return web.json_response(order.view())

    async def _cancel_order(self, request: web.Request) -> web.Response:
        params = await self._signed(request)
        if isinstance(params, web.Response):
            return params
        order = self._find(params)
        if order is None or order.status not in ("NEW", "PARTIALLY_FILLED"):
            return self._error(400, -2011, "Unknown order sent.")
        order.status = "CANCELED"
        return web.json_response(order.view() | {"origClientOrderId": order.client_order_id})

    async def _open_orders(self, request: web.Request) -> web.Response:
        params = await self._signed(request)
        if isinstance(params, web.Response):
            return params
        symbol = params.get("symbol")
        return web.json_response(
            [
                o.view()
                for o in self.orders
                if o.status in ("NEW", "PARTIALLY_FILLED") and (symbol is None or o.symbol == symbol)
            ]
        )

    async def _all_orders(self, request: web.Request) -> web.Response:
        params = await self._signed(request)
        if isinstance(params, web.Response):
            return params
        start = int(params.get("startTime", "0"))
        limit = int(params.get("limit", "500"))
        found = [o.view() for o in self.orders if o.symbol == params.get("symbol") and o.created_ms >= start]
        return web.json_response(found[:limit])

    async def _my_trades(self, request: web.Request) -> web.Response:
        params = await self._signed(request)
        if isinstance(params, web.Response):
            return params
        trades = []
        for order in self.orders:
            if order.symbol != params.get("symbol"):
                continue
            if "orderId" in params and str(order.order_id) != params["orderId"]:
                continue
            for fill in order.fills:
                qty, price = Decimal(fill["qty"]), Decimal(fill["price"])
                trades.append(
                    {
                        "symbol": order.symbol,
                        "id": fill["tradeId"],
                        "orderId": order.order_id,
                        "orderListId": -1,
                        "price": fill["price"],
                        "qty": fill["qty"],
                        "quoteQty": _s(qty * price),
                        "commission": fill["commission"],
                        "commissionAsset": fill["commissionAsset"],
                        "time": order.created_ms,
                        "isBuyer": order.side == "BUY",
                        "isMaker": False,
                        "isBestMatch": True,
                    }
                )
        return web.json_response(trades)
