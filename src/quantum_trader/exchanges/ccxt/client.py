"""The ccxt adapter: a real exchange (Binance spot testnet first), never placing an order twice.

Placing one order::

    rules of the market (loaded once, refreshed every QT_EXCHANGE_MARKETS_REFRESH_S)
      └─ round amount/price to the market's steps, check LOT_SIZE / PRICE_FILTER /
         MIN_NOTIONAL locally ─► REJECTED naming the rule, nothing sent
    sent before (a write-ahead record in Redis)? ─► look it up by client order id first
    write-ahead record, then send with the deterministic client order id
      ├─ guards (read right before the request goes on the wire, after ccxt's rate limiter):
      │     kill switch not "0", trading state HALTED, partition lease lost ─► nothing sent
      ├─ answered ─► track until final (bounded), fees from the response or the trades
      ├─ timeout / network / 5xx ─► look the order up; only an order the exchange
      │     provably does not have (not found twice, a grace period apart) is sent again
      ├─ 429 / 418 ─► not accepted: back off with jitter, send again
      └─ authentication / permission ─► FAILED, the rest of the batch not sent,
            ``on_auth_failure`` (the kill switch), one log line with the fix

When the exchange cannot tell us whether an order exists (lookups keep failing),
``OrderStateUnknown`` is raised instead of guessing: the batch stays pending and is
looked up again when it is redelivered.

At most QT_EXCHANGE_CONCURRENCY orders of one adapter (one execution process) are in flight
at once, so after the kill switch is turned on at most that many requests, each checked
just before, can still reach the exchange.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import ccxt  # type: ignore[import-untyped]
from pydantic import SecretStr
from redis.exceptions import RedisError

from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError, ExchangeError, FatalExchangeError, TransientExchangeError
from quantum_trader.events import Reason
from quantum_trader.exchanges.base import ExchangeOrder, Guards, OrderOutcome, OrderRequest, SendGuard, stopping
from quantum_trader.exchanges.ccxt.account import fetch_activity
from quantum_trader.exchanges.ccxt.config import CcxtConfig, check_config
from quantum_trader.exchanges.ccxt.connection import CcxtConnection
from quantum_trader.exchanges.ccxt.credentials import Credentials, credential_names, load_credentials
from quantum_trader.exchanges.ccxt.errors import ErrorKind, OrderStateUnknown, classify
from quantum_trader.exchanges.ccxt.markets import Refused, prepare, to_decimal
from quantum_trader.exchanges.ccxt.orders import fees_of, outcome_from_order
from quantum_trader.exchanges.ccxt.sent import SentRecords
from quantum_trader.logs import get_logger
from quantum_trader.settings import Settings, redacted

log = get_logger("exchange")

# What the adapter calls when the exchange refuses the credentials, with the error (secrets
# scrubbed): halt trading. The composition root passes one that turns the kill switch on; a
# RedisError from it means the switch could not be set (the gate treats that server as halted).
OnAuthFailure = Callable[[str], Awaitable[None]]


async def _nothing_to_halt(_error: str) -> None:
    """The market-data client places no orders, so it has no trading to halt."""


class _NotSent(Exception):
    """The send guard stopped an order right before its request left."""

    def __init__(self, guard: SendGuard) -> None:
        super().__init__(guard.key)
        self.guard = guard


class CcxtExchange:
    """An exchange reached through ccxt's async client."""

    activity_unrecorded_only = False  # the exchange lists every order: the results say which were recorded

    def __init__(
        self,
        redis: Redis,
        config: CcxtConfig,
        credentials: Credentials,
        *,
        on_auth_failure: OnAuthFailure,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        public_only: bool = False,
    ) -> None:
        self.conn = CcxtConnection(config, credentials, rand=rand, sleep=sleep, public_only=public_only)
        self.name = self.conn.name
        self.client: Any = self.conn.client
        self.redis = redis
        self.sent = SentRecords(redis, self.name)
        self.config = config
        self._on_auth_failure = on_auth_failure
        # Orders in flight per adapter, across the batches one process works on at once.
        self._sending = asyncio.Semaphore(config.concurrency)

    def __repr__(self) -> str:
        return f"CcxtExchange({self.name}, mode={self.config.mode}, api_key={redacted(self.conn.secrets[0])})"

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings, *, on_auth_failure: OnAuthFailure) -> CcxtExchange:
        """The adapter the settings describe, credentials from ``QT_SECRETS_FILE``."""
        config = CcxtConfig.from_settings(settings)
        check_config(config)
        credentials = load_credentials(config.secrets_file, config.exchange, config.mode)
        return cls(redis, config, credentials, on_auth_failure=on_auth_failure)

    @classmethod
    def public(cls, redis: Redis, settings: Settings, exchange: str) -> CcxtExchange:
        """Market data only: no credentials, so it can read public endpoints and place nothing.

        ``QT_MODE=testnet`` reads the exchange's sandbox; otherwise its production data.
        """
        blank = Credentials(api_key=SecretStr(""), secret=SecretStr(""))
        return cls(
            redis,
            dataclasses.replace(CcxtConfig.from_settings(settings), exchange=exchange),
            blank,
            on_auth_failure=_nothing_to_halt,
            public_only=True,
        )

    async def start(self) -> None:
        """Load the markets (fails start-up with a clear error when the exchange cannot be reached)."""
        await self.conn.ensure_markets()
        log.info(
            "exchange_ready",
            exchange=self.name,
            mode=self.config.mode,
            sandbox=self.config.mode == "testnet",
            markets=len(self.conn.rules),
            api_key=redacted(self.conn.secrets[0]),
        )

    async def close(self) -> None:
        """Close ccxt's HTTP session."""
        await self.conn.close()

    # ---- the Exchange interface -----------------------------------------------------------

    async def last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        """Latest traded price per symbol, keyed as asked; empty when the exchange cannot answer."""
        try:
            await self.conn.ensure_markets()
        except TransientExchangeError as exc:
            log.warning("prices_unavailable", exchange=self.name, error=str(exc))
            return {}
        wanted = {s: u for s in set(symbols) if (u := self.conn.unified(s)) is not None}
        if not wanted:
            return {}
        unified = sorted(set(wanted.values()))
        try:
            if self.client.has.get("fetchLastPrices"):
                raw = await self.conn.call("fetch_last_prices", lambda: self.client.fetch_last_prices(unified))
                found = {sym: to_decimal(entry.get("price")) for sym, entry in raw.items()}
            else:
                raw = await self.conn.call("fetch_tickers", lambda: self.client.fetch_tickers(unified))
                found = {sym: to_decimal(entry.get("last")) for sym, entry in raw.items()}
        except (TransientExchangeError, FatalExchangeError, ccxt.BaseError) as exc:
            log.warning("prices_unavailable", exchange=self.name, error=self.conn.clean(exc))
            return {}
        return {asked: price for asked, u in wanted.items() if (price := found.get(u)) is not None}

    async def candles(self, symbol: str, timeframe: str = "1m", limit: int = 100) -> list[list[Decimal]]:
        """OHLCV candles ``[open_ms, open, high, low, close, volume]`` from the public endpoints."""
        rules = await self.conn.market(symbol)
        if rules is None:
            raise ValueError(f"{symbol} is not a market on {self.name}")
        try:
            rows = await self.conn.call(
                "fetch_ohlcv", lambda: self.client.fetch_ohlcv(rules.symbol, timeframe, None, limit)
            )
        except ccxt.BaseError as exc:  # e.g. a timeframe the exchange does not offer: one clear error
            raise ExchangeError(f"{self.name} candles for {symbol} ({timeframe}): {self.conn.clean(exc)}") from None
        return [[to_decimal(v) or Decimal(0) for v in row] for row in rows]

    async def balances(self) -> dict[str, Decimal]:
        """Total balance per asset (non-zero only); authenticates, so it checks the credentials."""
        try:
            raw = await self.conn.call("fetch_balance", lambda: self.client.fetch_balance())
        except ccxt.BaseError as exc:  # refused, not transient: one error without the signed request
            raise ExchangeError(f"{self.name} balances: {self.conn.clean(exc)}") from None
        totals = raw.get("total") or {}
        return {asset: amount for asset, value in totals.items() if (amount := to_decimal(value))}

    async def fetch_activity(self, symbols: list[str], since_ms: int) -> list[ExchangeOrder] | None:
        """Orders of ``symbols`` open or placed since ``since_ms`` (see ``account.fetch_activity``)."""
        return await fetch_activity(self.conn, symbols, since_ms)

    async def fetch_orders(self, client_order_ids: list[str]) -> dict[str, OrderOutcome]:
        """Orders the exchange has for ids this adapter sent before (looked up by client order id).

        Ids never sent (no write-ahead record) are absent without asking the exchange. An
        order still open is tracked like a fresh one. Raises OrderStateUnknown when the
        exchange cannot answer, so nothing is placed while the state is unknown.
        """
        remembered = await self.sent.symbols(client_order_ids)
        found: dict[str, OrderOutcome] = {}
        for coid, symbol in remembered.items():
            try:
                order = await self.conn.find_order(coid, symbol, grace=False)
                if order is not None:
                    requested = to_decimal(order.get("amount")) or Decimal(0)
                    found[coid] = await self._finish(coid, symbol, order, requested)
            except FatalExchangeError as exc:
                # The order may exist and we cannot ask: halt trading, report nothing as done.
                await self._auth_failed(coid, str(exc))
                raise OrderStateUnknown(f"cannot look order {coid} up on {self.name}: {exc}") from None
        return found

    async def place_orders(self, orders: list[OrderRequest], guard: Guards | None = None) -> list[OrderOutcome]:
        """Place each order once (see the module docstring); outcomes in the same order.

        With ``guard`` (one or several), each order request is sent only if every switch allows it
        when the request is about to go on the wire (after ccxt's rate limiter); otherwise
        ``stopped`` of the first that does not.
        """
        if not orders:
            return []
        if self.conn.public_only:
            raise ConfigError(f"the {self.name} market-data client has no credentials and places no orders")
        halted = asyncio.Event()

        async def one(order: OrderRequest) -> OrderOutcome:
            async with self._sending:
                if halted.is_set():
                    return OrderOutcome(
                        order.client_order_id,
                        "REJECTED",
                        reason=Reason.KILL_SWITCH,
                        detail="not sent; the exchange refused the credentials earlier in this batch",
                        sent=False,
                    )
                try:
                    return await self._place_one(order, guard)
                except FatalExchangeError as exc:
                    first = not halted.is_set()
                    halted.set()
                    return await self._auth_failed(order.client_order_id, str(exc), announce=first)

        # Every order runs to its end before an error is raised, so none is left in flight.
        done = await asyncio.gather(*(one(order) for order in orders), return_exceptions=True)
        for item in done:
            if isinstance(item, BaseException):
                raise item
        return [item for item in done if isinstance(item, OrderOutcome)]

    # ---- placing one order ----------------------------------------------------------------

    async def _send_order(self, guard: Guards | None, send: Callable[[], Awaitable[Any]], side: str = "") -> Any:
        """``send()``, stopped with _NotSent if a guard halts an order of ``side`` right before it leaves."""
        if guard is None:
            return await send()

        async def check() -> None:
            if (stop := await stopping(self.redis, guard, side)) is not None:
                raise _NotSent(stop)

        return await self.conn.checked(check, send)

    async def _place_one(self, order: OrderRequest, guard: Guards | None = None) -> OrderOutcome:
        coid = order.client_order_id
        rules = await self.conn.market(order.symbol)
        if rules is None:
            detail = f"{order.symbol} is not a market on {self.name}"
            return OrderOutcome(coid, "REJECTED", reason=Reason.UNKNOWN_SYMBOL, detail=detail, sent=False)
        hint = order.reference_price
        if hint is None and order.order_type == "MARKET":
            hint = (await self.last_prices([rules.symbol])).get(rules.symbol)
        prepared = prepare(order, rules, hint)
        if isinstance(prepared, Refused):
            log.info(
                "order_rejected_before_sending",
                exchange=self.name,
                client_order_id=coid,
                reason=prepared.code,
                detail=prepared.detail,
            )
            return OrderOutcome(coid, "REJECTED", reason=prepared.code, detail=prepared.detail, sent=False)
        # Sent before (crash, redelivery)? Ask the exchange before anything else.
        if coid in await self.sent.symbols([coid]):
            existing = await self.conn.find_order(coid, rules.symbol, grace=True)
            if existing is not None:
                log.info("order_found_not_resent", exchange=self.name, client_order_id=coid)
                return await self._finish(coid, rules.symbol, existing, prepared.amount)
        await self.sent.remember(coid, rules.symbol)
        attempt = 0
        while True:
            try:
                placed = await self._send_order(
                    guard,
                    lambda: self.client.create_order(
                        rules.symbol,
                        order.order_type.lower(),
                        order.side.lower(),
                        f"{prepared.amount:f}",
                        None if prepared.price is None else f"{prepared.price:f}",
                        {self.conn.place_coid_param: coid},
                    ),
                    order.side,
                )
                return await self._finish(coid, rules.symbol, placed, prepared.amount)
            except _NotSent as stop:
                # Stopped before it left (a retry included: an earlier attempt that may have
                # arrived was looked up and not found, so the exchange does not have it).
                log.info(
                    "order_stopped_before_sending", exchange=self.name, client_order_id=coid, switch=stop.guard.key
                )
                return stop.guard.stopped(coid)
            except (FatalExchangeError, OrderStateUnknown):
                raise
            except Exception as exc:
                kind = classify(exc)
                if kind is ErrorKind.AUTH:
                    raise FatalExchangeError(self.conn.clean(exc)) from None
                if kind in (ErrorKind.UNKNOWN, ErrorKind.DUPLICATE):
                    # The request may have reached the exchange: find out before sending again.
                    existing = await self.conn.find_order(coid, rules.symbol, grace=True)
                    if existing is not None:
                        log.info(
                            "order_found_after_error",
                            exchange=self.name,
                            client_order_id=coid,
                            error=self.conn.clean(exc),
                        )
                        return await self._finish(coid, rules.symbol, existing, prepared.amount)
                elif kind is ErrorKind.REJECTED:
                    return OrderOutcome(coid, "REJECTED", reason=Reason.EXCHANGE_REJECTED, detail=self.conn.clean(exc))
                elif kind is not ErrorKind.NOT_SENT:
                    return OrderOutcome(coid, "FAILED", reason=Reason.EXCHANGE_ERROR, detail=self.conn.clean(exc))
                attempt += 1
                if attempt > self.config.retries:
                    return OrderOutcome(
                        coid,
                        "FAILED",
                        reason=Reason.EXCHANGE_UNAVAILABLE,
                        detail=f"not placed after {attempt} attempts: {self.conn.clean(exc)}",
                    )
                await self.conn.backoff("create_order", attempt, exc)

    async def _finish(self, coid: str, symbol: str, order: Any, requested: Decimal) -> OrderOutcome:
        """Track an open order until final (bounded), read its fees, and make the outcome."""
        order = await self.conn.settle(symbol, order)
        fee = fees_of(order)
        filled = to_decimal(order.get("filled")) or Decimal(0)
        if fee is None and filled > 0 and self.client.has.get("fetchOrderTrades"):
            try:
                trades = await self.conn.call(
                    "fetch_order_trades", lambda: self.client.fetch_order_trades(order["id"], symbol)
                )
                fee = fees_of(order, trades)
            except (TransientExchangeError, ccxt.BaseError) as exc:
                log.warning("fee_unknown", exchange=self.name, client_order_id=coid, error=self.conn.clean(exc))
        outcome = outcome_from_order(coid, order, requested, fee)
        log.info(
            "order_done",
            exchange=self.name,
            client_order_id=coid,
            status=outcome.status,
            reason=outcome.reason,
            detail=outcome.detail,
            filled_qty=str(outcome.filled_qty),
            avg_price=str(outcome.avg_price),
            exchange_order_id=outcome.exchange_order_id,
        )
        return outcome

    async def _auth_failed(self, coid: str, error: str, *, announce: bool = True) -> OrderOutcome:
        """FAILED, trading halted through ``on_auth_failure`` (fail-closed), one log line saying how to fix it."""
        error = self.conn.clean(error)
        try:
            await self._on_auth_failure(error)
            switched = True
        except RedisError:
            switched = False  # the gate treats an unreachable server as halted anyway
        if announce:
            key_name, secret_name, _ = credential_names(self.name)
            site = "https://testnet.binance.vision" if self.config.mode == "testnet" else "the exchange's API page"
            log.error(
                "exchange_auth_failed",
                exchange=self.name,
                mode=self.config.mode,
                error=error,
                kill_switch="on" if switched else "unknown (server unreachable)",
                fix=(
                    f"check {key_name} and {secret_name} in {self.config.secrets_file} "
                    f"({self.config.mode} keys from {site}, trading permission enabled, this IP allowed), "
                    "restart the service, then run: quantum-trader kill off"
                ),
            )
        return OrderOutcome(coid, "FAILED", reason=Reason.AUTH_FAILED, detail=error)
