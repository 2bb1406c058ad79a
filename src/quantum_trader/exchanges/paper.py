"""The paper exchange: fills in Redis, balances persisted, each order stored by client order id.

MARKET orders fill at the latest market price for the symbol (written by the
market-data feed) or, failing that, the decision's reference price, moved against
the trader by the configured slippage. LIMIT orders fill at their limit price when
marketable and are rejected otherwise (the paper exchange keeps no order book).
A batch is applied with WATCH/MULTI so balances stay exact decimals under concurrent
execution processes, and an order id already stored is returned, never placed again.

Each order is one key (``quantum:paper:order:<client order id>``) with no expiry while its
intent may be delivered again; execution's commit gives it one when the intent's result is
written, so the records of finished intents do not accumulate. The guards (``SendGuard``: the
kill switch, the trading state, the lease of the batch's partition) are read inside the same
transaction, their keys WATCHed: no order is placed after the switch was turned off "0" or the
state set to HALTED, not even one of a batch the governor had approved, nor by a process whose
partition changed hands since its gate.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import msgspec
from redis.exceptions import WatchError

from quantum_trader import keys
from quantum_trader.bus.connection import Redis, watching_client
from quantum_trader.events import Reason
from quantum_trader.exchanges.base import (
    ExchangeOrder,
    Guards,
    OrderOutcome,
    OrderRequest,
    SendGuard,
    first_stop,
    guard_list,
    hash_field_value,
    split_symbol,
)

_BPS = Decimal(10_000)


_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder = msgspec.json.Decoder(OrderOutcome)


def _outcome_from_json(text: str) -> OrderOutcome:
    return _decoder.decode(text)


def _outcome_to_json(outcome: OrderOutcome) -> str:
    return _encoder.encode(outcome).decode()


def fill(
    order: OrderRequest,
    market_price: Decimal | None,
    balances: dict[str, Decimal],
    *,
    fee_rate: Decimal,
    slippage_bps: Decimal,
    quote_assets: list[str],
) -> tuple[OrderOutcome, dict[str, Decimal]]:
    """Pure fill rule: the outcome of one order and the balance changes it makes."""
    try:
        base, quote = split_symbol(order.symbol, quote_assets)
    except ValueError as exc:
        return OrderOutcome(order.client_order_id, "REJECTED", reason=Reason.UNKNOWN_SYMBOL, detail=str(exc)), {}
    if order.order_type == "LIMIT":
        if order.price is None:
            return OrderOutcome(
                order.client_order_id, "REJECTED", reason=Reason.INVALID, detail="LIMIT order without price"
            ), {}
        if market_price is not None:
            marketable = market_price <= order.price if order.side == "BUY" else market_price >= order.price
            if not marketable:
                return OrderOutcome(
                    order.client_order_id,
                    "REJECTED",
                    reason=Reason.LIMIT_NOT_MARKETABLE,
                    detail=f"market {market_price}, limit {order.price}",
                ), {}
        price = order.price
    else:
        reference = market_price if market_price is not None else order.reference_price
        if reference is None:
            return OrderOutcome(
                order.client_order_id,
                "REJECTED",
                reason=Reason.NO_PRICE,
                detail=f"no price known for {order.symbol}",
            ), {}
        slip = reference * slippage_bps / _BPS
        price = reference + slip if order.side == "BUY" else reference - slip
    notional = order.qty * price
    fee = notional * fee_rate
    if order.side == "BUY":
        need, have = notional + fee, balances.get(quote, Decimal(0))
        if have < need:
            return OrderOutcome(
                order.client_order_id,
                "REJECTED",
                reason=Reason.INSUFFICIENT_BALANCE,
                detail=f"need {need} {quote}, have {have}",
            ), {}
        changes = {quote: -need, base: order.qty}
    else:
        have = balances.get(base, Decimal(0))
        if have < order.qty:
            return OrderOutcome(
                order.client_order_id,
                "REJECTED",
                reason=Reason.INSUFFICIENT_BALANCE,
                detail=f"need {order.qty} {base}, have {have}",
            ), {}
        changes = {base: -order.qty, quote: notional - fee}
    outcome = OrderOutcome(
        order.client_order_id,
        "FILLED",
        filled_qty=order.qty,
        avg_price=price,
        fee=fee,
        fee_asset=quote,
        exchange_order_id=f"paper-{order.client_order_id.removeprefix('qt-')}",
    )
    return outcome, changes


class PaperExchange:
    """Paper trading on the stream server itself."""

    name = "paper"
    activity_unrecorded_only = True  # the unfinished set: orders whose result is not written

    def __init__(
        self,
        redis: Redis,
        *,
        fee_rate: Decimal = Decimal("0.001"),
        slippage_bps: Decimal = Decimal(0),
        quote_assets: list[str] | None = None,
        starting_balances: dict[str, Decimal] | None = None,
    ) -> None:
        self.redis = redis
        self.fee_rate = fee_rate
        self.slippage_bps = slippage_bps
        self.quote_assets = quote_assets or ["USDT"]
        self.starting_balances = starting_balances or {}
        # Batches of one process take turns here (WATCH still guards against other processes):
        # two of ours racing would only make one of them compute its fills twice.
        self._placing = asyncio.Lock()

    async def fund(self) -> None:
        """Set the starting balances once; an existing account is left as it is."""
        if self.starting_balances:
            async with self.redis.pipeline(transaction=True) as pipe:
                for asset, amount in self.starting_balances.items():
                    pipe.hsetnx(keys.paper_balances(), asset, str(amount))
                await pipe.execute()

    async def balances(self) -> dict[str, Decimal]:
        """Every asset's balance."""
        raw = await self.redis.hgetall(keys.paper_balances())
        return {asset: Decimal(value) for asset, value in raw.items()}

    async def last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        """Latest market prices written by the market-data feed."""
        unique = sorted(set(symbols))
        if not unique:
            return {}
        values = await self.redis.hmget(keys.PRICE_HASH, unique)
        return {symbol: Decimal(value) for symbol, value in zip(unique, values, strict=True) if value is not None}

    async def fetch_orders(self, client_order_ids: list[str]) -> dict[str, OrderOutcome]:
        """Stored orders by client order id (one MGET)."""
        if not client_order_ids:
            return {}
        values = await self.redis.mget([keys.paper_order(coid) for coid in client_order_ids])
        return {
            coid: _outcome_from_json(value)
            for coid, value in zip(client_order_ids, values, strict=True)
            if value is not None
        }

    async def orders(self) -> dict[str, OrderOutcome]:
        """Every order still on record, by client order id (a SCAN: for inspection and tests, not trading)."""
        names = [name async for name in self.redis.scan_iter(match=keys.paper_order_pattern(), count=1000)]
        values = await self.redis.mget(names) if names else []
        prefix = len(keys.paper_order(""))
        return {name[prefix:]: _outcome_from_json(value) for name, value in zip(names, values, strict=True) if value}

    async def fetch_activity(self, symbols: list[str], since_ms: int) -> list[ExchangeOrder]:
        """Fills whose intent has no result yet: the records in ``keys.paper_unfinished()``.

        Placement adds a record there and commit takes it out in the same step that writes the
        intent's result, so what is left is an order in flight, or one whose intent was
        dead-lettered (a fill the book never saw); the cost follows those, not every record kept.
        Paper orders have no open state, no manual trades, and keep neither symbol nor side;
        ``symbols`` and ``since_ms`` do not narrow anything here.
        """
        del symbols, since_ms
        unfinished = sorted(await self.redis.smembers(keys.paper_unfinished()))
        values = await self.redis.mget(unfinished) if unfinished else []
        out = []
        for value in values:
            if value is None:
                continue  # committed (and expired) since the SCAN
            outcome = _outcome_from_json(value)
            if outcome.filled_qty > 0:
                out.append(
                    ExchangeOrder(
                        symbol="",
                        client_order_id=outcome.client_order_id,
                        exchange_order_id=outcome.exchange_order_id,
                        side="",
                        amount=outcome.filled_qty,
                        filled=outcome.filled_qty,
                        avg_price=outcome.avg_price,
                        is_open=False,
                    )
                )
        return out

    async def place_orders(self, orders: list[OrderRequest], guard: Guards | None = None) -> list[OrderOutcome]:
        """Fill a batch atomically (optimistic WATCH on balances, orders and ``guard``); idempotent per id.

        An order the batch would place while a guard stops it is not placed (``stopped`` of the first
        guard that does); an order already stored is returned whatever the guards say.
        """
        if not orders:
            return []
        async with self._placing:
            return await self._place(orders, guard_list(guard))

    async def _place(self, orders: list[OrderRequest], guards: list[SendGuard]) -> list[OrderOutcome]:
        record_keys = [keys.paper_order(order.client_order_id) for order in orders]
        # String switches are read in the same MGET as the orders (nil for a key of another type).
        strings = [g for g in guards if not g.field]
        # Every placement that writes an order also bumps one version key: watching it (not the
        # orders themselves) sees another process's placement, and one WATCH of a thousand keys
        # costs the server ~18 ms (it scans the keys already watched for each new one).
        watched = list(dict.fromkeys([keys.paper_balances(), keys.paper_version(), *(g.key for g in guards)]))
        while True:
            client = await watching_client(self.redis, keys.paper_version())
            async with client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*watched)
                    pipe_any: Any = pipe
                    raw = await pipe_any.mget([*(g.key for g in strings), *record_keys])
                    read, values = iter(raw), []
                    for g in guards:
                        if not g.field:
                            values.append(next(read))
                            continue
                        kind = await pipe_any.type(g.key)  # before HGET, which fails on a key of another type
                        field = await pipe_any.hget(g.key, g.field) if kind == "hash" else None
                        values.append(hash_field_value(kind, field))
                    stops = {side: first_stop(guards, values, side) for side in ("BUY", "SELL")}
                    existing_raw = raw[len(strings) :]
                    balance_raw = await pipe_any.hgetall(keys.paper_balances())
                    prices = await self.last_prices([order.symbol for order in orders])
                    balances = {a: Decimal(v) for a, v in balance_raw.items()}
                    outcomes: list[OrderOutcome] = []
                    new: dict[str, str] = {}
                    changed = False
                    for order, stored in zip(orders, existing_raw, strict=True):
                        if stored is not None:
                            outcomes.append(_outcome_from_json(stored))
                            continue
                        if order.client_order_id in new:
                            outcomes.append(_outcome_from_json(new[order.client_order_id]))
                            continue
                        if (stop := stops.get(order.side)) is not None:
                            outcomes.append(stop.stopped(order.client_order_id))
                            continue
                        outcome, changes = fill(
                            order,
                            prices.get(order.symbol),
                            balances,
                            fee_rate=self.fee_rate,
                            slippage_bps=self.slippage_bps,
                            quote_assets=self.quote_assets,
                        )
                        for asset, delta in changes.items():
                            balances[asset] = balances.get(asset, Decimal(0)) + delta
                            changed = True
                        new[order.client_order_id] = _outcome_to_json(outcome)
                        outcomes.append(outcome)
                    if not new:
                        # Nothing to write: every order was stored already or stopped by a guard.
                        return outcomes
                    pipe.multi()
                    # No expiry yet: the intent may be delivered again until its result is written.
                    pipe.mset({keys.paper_order(coid): value for coid, value in new.items()})
                    pipe.sadd(keys.paper_unfinished(), *[keys.paper_order(coid) for coid in new])
                    pipe.incr(keys.paper_version())
                    if changed:
                        pipe.hset(keys.paper_balances(), mapping={a: str(v) for a, v in balances.items()})
                    # EXEC fails if the balances, a guard or any order (the version) changed since WATCH.
                    await pipe.execute()
                    return outcomes
                except WatchError:
                    continue

    async def close(self) -> None:
        """Nothing to release: the client belongs to the caller."""
