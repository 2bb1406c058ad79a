"""Protective exits: a stop-loss and a take-profit on every position, kept in Redis, fired through the pipeline.

Where the levels come from: each filled entry (BUY) may carry ``stop_loss`` and ``take_profit``
prices in its decision; without them, QT_STOP_LOSS_PCT and QT_TAKE_PROFIT_PCT below and above
the position's average price apply. Execution's commit stores the levels of each symbol's
position (``quantum:protect:stops``) in the same script call that moves the position, and
removes them when the position closes, so the levels never disagree with what is held and
survive a restart of every process.

The protect stage reads the candle stream in its own group. A candle whose low reaches the
stop (or whose high reaches the take-profit; the stop first when one candle crosses both)
fires the exit: one SELL decision of the whole position, published to the decision stream with
an identity derived from the entry that armed it, and the levels marked fired, in one script
call that runs only while the position and the levels are still those it read. A candle
delivered again finds the levels fired: the exit is published once; and should it be published
twice anyway, the router drops the copy as a duplicate, and execution places an intent once.
The exit goes through the governor like any order: it reduces a position, so it passes in
REDUCING; HALTED and the kill switch stop it. An exit that ends without selling all it was to
sell (refused, expired, partly filled) can sell nothing more: execution's commit arms the levels
again, so the next candle that crosses them fires a new exit (its own identity, attempt n + 1).

The same stage looks at the loss breakers after each batch of candles (``Governor.watch``), so
the trading state moves when prices cross a drawdown limit, not only at the next order.

Why a service, not resting orders at the exchange: it works the same on every venue ccxt
reaches, in paper mode and in backtests (a stop fires on the candle that crosses it), keeps
the whole balance free for the strategy, and leaves one path for every order (governor, throttle,
effectively-once). What it cannot do is fire while the protect stage is down: the stop then
fires on the first candle after it restarts (the candles wait in its group).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import msgspec

from quantum_trader import governor, keys, portfolio
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, GroupConsumer
from quantum_trader.errors import DecodeError, TransientError
from quantum_trader.events import (
    DECISION,
    MARKET_CANDLE,
    Candle,
    Decision,
    candle_problem,
    decode_event,
    envelope,
    now_iso,
)
from quantum_trader.logs import get_logger
from quantum_trader.portfolio import PortfolioError, Position
from quantum_trader.scripts import register
from quantum_trader.settings import Settings

log = get_logger("protect")

Levels = tuple[Decimal | None, Decimal | None]  # an entry's (stop_loss, take_profit)
HUNDRED = Decimal(100)
STRATEGY = "protect"
IDENTITY_PREFIX = "protect:"  # an exit's trace and correlation ids: protect:<symbol>:<armed at>:<kind>:<attempt>


@dataclass(frozen=True, slots=True)
class Defaults:
    """Percent below and above the average entry price, for entries that name no level."""

    stop_loss_pct: Decimal | None = None
    take_profit_pct: Decimal | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Defaults:
        """QT_STOP_LOSS_PCT and QT_TAKE_PROFIT_PCT."""
        return cls(settings.stop_loss_pct, settings.take_profit_pct)


NO_DEFAULTS = Defaults()


class Stop(msgspec.Struct, frozen=True, kw_only=True):
    """One position's protective levels, and whether its exit was fired (``fired``: the exit's decision id)."""

    symbol: str
    stop: Decimal | None = None
    take: Decimal | None = None
    entry: str = ""  # the intent whose fill armed these levels
    at: str = ""
    fired: str = ""
    fired_at: str = ""
    kind: str = ""  # STOP_LOSS or TAKE_PROFIT, once fired
    attempts: int = 0  # exits fired for these levels (an exit that did not fill re-arms them)


_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder = msgspec.json.Decoder(Stop)


def encode(stop: Stop) -> str:
    """As stored in ``quantum:protect:stops``."""
    return _encoder.encode(stop).decode()


def decode(text: str) -> Stop:
    """A stored stop; DecodeError when unreadable."""
    try:
        return _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"stored stop is unreadable: {exc}") from None


def stop_after(position: Position, entries: Sequence[Levels], defaults: Defaults, now: datetime) -> str:
    """What commit stores for a symbol after a batch: a stop's JSON, "" to remove it, "-" to leave it.

    A closed position has no stop. New entries set the levels: the last entry's own prices if
    it names any, else the defaults around the position's new average price; no entry, no levels
    named and no defaults leave the stored levels as they are.
    """
    if position.qty <= 0:
        return ""
    if not entries:
        return "-"
    stop, take = entries[-1]
    avg = position.avg_price
    if stop is None and take is None and avg is not None:
        if defaults.stop_loss_pct is not None:
            stop = avg * (1 - defaults.stop_loss_pct / HUNDRED)
        if defaults.take_profit_pct is not None:
            take = avg * (1 + defaults.take_profit_pct / HUNDRED)
    if stop is None and take is None:
        return "-"
    return encode(Stop(symbol=position.symbol, stop=stop, take=take, at=now_iso(now)))


def crossed(stop: Stop, candle: Candle) -> str | None:
    """STOP_LOSS or TAKE_PROFIT when the candle reaches a level of an armed stop (the stop first)."""
    if stop.fired:
        return None
    if stop.stop is not None and Decimal(repr(candle.low)) <= stop.stop:
        return "STOP_LOSS"
    if stop.take is not None and Decimal(repr(candle.high)) >= stop.take:
        return "TAKE_PROFIT"
    return None


def exit_decision(stop: Stop, position: Position, kind: str, candle: Candle, stamp: str) -> dict[str, str]:
    """The exit's decision entry: a SELL of the whole position, its identity derived from the armed levels."""
    identity = f"{IDENTITY_PREFIX}{stop.symbol}:{stop.at}:{kind}:{stop.attempts + 1}"
    level = stop.stop if kind == "STOP_LOSS" else stop.take
    decision = Decision(symbol=stop.symbol, side="SELL", qty=position.qty, strategy=STRATEGY, confidence=1.0)
    log.warning(
        "protective_exit",
        symbol=stop.symbol,
        kind=kind,
        level=str(level),
        candle_open_time=candle.open_time,
        qty=str(position.qty),
    )
    return envelope(DECISION, decision, trace_id=identity, correlation_id=identity, source=STRATEGY, timestamp=stamp)


class Protect:
    """The protect stage: watches candles, fires each position's exit once."""

    def __init__(self, redis: Redis, settings: Settings, clock: Callable[[], datetime] | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock or (lambda: datetime.now(UTC))
        self.streams = settings.streams
        self.consumer = GroupConsumer.for_stage(
            redis, settings, keys.PROTECT, self.streams.candle, self.streams.protect_group
        )
        self.consumer.depth = 1  # candles in order: a stop fires on the first candle that crosses it
        self._fire = register(redis, "protect")
        self.governor = governor.Governor(redis, settings)
        self.totals: dict[str, int] = {"candles": 0, "exits": 0}

    async def handle(self, entries: list[Entry]) -> None:
        """Check a batch of candles against the stops; fire what they cross; acknowledge the batch."""
        candles: list[Candle] = []
        for entry in entries:
            try:
                candle = decode_event(entry.fields, Candle, MARKET_CANDLE)[1]
            except DecodeError:
                continue  # the AI engine, reading the same stream, records the bad candle in the dead letters
            if problem := candle_problem(candle):
                # A low of 0 would sell the whole position: a candle no strategy may see fires no stop either.
                log.warning("candle_skipped", entry_id=entry.id, symbol=candle.symbol, reason=problem)
                continue
            candles.append(candle)
        if candles:
            await self._check(candles)
            await self.governor.watch(self.clock(), self.consumer.consumer)
        await self.redis.xack(self.streams.candle, self.streams.protect_group, *[e.id for e in entries])
        self.totals["candles"] += len(candles)

    async def _check(self, candles: list[Candle]) -> None:
        symbols = sorted({c.symbol for c in candles})
        stored = await self.redis.hmget(keys.PROTECT_STOPS, symbols)
        stops = {}
        for symbol, raw in zip(symbols, stored, strict=True):
            if raw is None:
                continue
            try:
                stops[symbol] = decode(raw)
            except DecodeError as exc:
                log.error("stop_unreadable", symbol=symbol, error=exc.reason, fix=f"HDEL {keys.PROTECT_STOPS} {symbol}")
        for candle in candles:
            stop = stops.get(candle.symbol)
            if stop is None:
                continue
            kind = crossed(stop, candle)
            if kind is None:
                continue
            fired = await self._fire_exit(stop, kind, candle)
            if fired is not None:
                stops[candle.symbol] = fired
                self.totals["exits"] += 1

    async def _fire_exit(self, stop: Stop, kind: str, candle: Candle) -> Stop | None:
        """Publish the exit and mark the levels fired, atomically, while the position is still the one read."""
        for _attempt in range(10):
            raw_position, raw_stop = await self._read(stop.symbol)
            if raw_stop is None or raw_position is None:
                return None  # the position closed meanwhile: nothing to protect
            current = decode(raw_stop)
            if current.fired or crossed(current, candle) is None:
                return None
            try:
                position = portfolio.decode_stored(stop.symbol, raw_position)
            except PortfolioError as exc:
                raise TransientError(str(exc)) from None
            if position.qty <= 0:
                return None
            stamp = now_iso(self.clock())
            decision = exit_decision(current, position, kind, candle, stamp)
            fired = msgspec.structs.replace(
                current, fired=decision["correlation_id"], fired_at=stamp, kind=kind, attempts=current.attempts + 1
            )
            fields = [item for pair in decision.items() for item in pair]
            done = await self._fire(
                keys=[keys.PROTECT_STOPS, keys.BOOK_POSITIONS, self.streams.decision],
                args=[stop.symbol, raw_stop, raw_position, encode(fired), *fields],
            )
            if int(done) == 1:
                return fired
        raise TransientError(f"{stop.symbol}: the position kept moving while its protective exit fired; retried")

    async def _read(self, symbol: str) -> tuple[str | None, str | None]:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.BOOK_POSITIONS, symbol)
            pipe.hget(keys.PROTECT_STOPS, symbol)
            position, stop = await pipe.execute()
        return position, stop


async def read_stops(redis: Redis) -> dict[str, Stop]:
    """Every position's protective levels, by symbol (an unreadable one is left out and logged)."""
    out = {}
    for symbol, raw in (await redis.hgetall(keys.PROTECT_STOPS)).items():
        try:
            out[symbol] = decode(raw)
        except DecodeError as exc:
            log.error("stop_unreadable", symbol=symbol, error=exc.reason, fix=f"HDEL {keys.PROTECT_STOPS} {symbol}")
    return out
