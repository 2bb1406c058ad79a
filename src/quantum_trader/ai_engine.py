"""The AI engine: candles in, trade decisions out, in the pipeline's contract.

It consumes the candle stream in its own group, keeps each symbol's recent closes,
runs the configured strategies once their warm-up is met, turns each signal into a
decision against the strategy's position, and publishes the decisions, the positions
and the candles' acknowledgement in one MULTI/EXEC. A decision's trace id is derived
from the candle entry and the strategy, so a redelivered candle produces the same
decision again, which the router then skips as a duplicate.

Positions are long-only spot, one per strategy and symbol (``keys.AI_POSITIONS``): a
BUY enters when the strategy holds nothing (sized by the configured rule: a fixed quote
notional or a fraction of the paper quote balance), a SELL exits ``QT_AI_EXIT_FRACTION``
of what it holds; a BUY while holding and a SELL while flat are no decisions. The record
follows the outcomes: before deciding, the engine reads the results of its own decisions
that came in since last time, and takes back what did not fill (a rejected entry is not
held; an exit that did not fill is still held, unless the exchange said the coins are not
there). A protective exit that filled (``protect``) closed the symbol for every strategy.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal

import numpy as np

from quantum_trader import keys, protect
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, GroupConsumer
from quantum_trader.errors import ConfigError, DecodeError
from quantum_trader.events import (
    DECISION,
    EXECUTION_RESULT,
    MARKET_CANDLE,
    Candle,
    ExecutionResult,
    Fields,
    Reason,
    decode_event,
    envelope,
    now_iso,
)
from quantum_trader.exchanges.base import split_symbol
from quantum_trader.logs import get_logger
from quantum_trader.marketdata import GapRule, clean, gap_rule
from quantum_trader.settings import Settings
from quantum_trader.strategies import BUILT_IN, Signal, Strategy
from quantum_trader.strategies.base import Stepper, stepper_of

log = get_logger("ai_engine")
_QTY_STEP = Decimal("0.000001")
_ZERO = Decimal(0)
CURSOR_FIELD = "#results"  # in keys.AI_POSITIONS: the newest result already applied to the positions
_RESULTS_PAGE = 1000


def build_strategies(settings: Settings) -> list[Strategy]:
    """The strategies the settings name (``learned`` needs QT_AI_MODEL_PATH)."""
    out: list[Strategy] = []
    for name in settings.ai_strategies:
        if name == "learned":
            from quantum_trader.strategies.learned import LearnedModel, load  # scikit-learn: only when used

            if settings.ai_model_path is None:
                raise ConfigError("QT_AI_STRATEGIES includes 'learned' but QT_AI_MODEL_PATH is not set")
            out.append(LearnedModel(load(settings.ai_model_path), threshold=settings.ai_model_threshold))
        elif name in BUILT_IN:
            out.append(BUILT_IN[name]())
        else:
            raise ConfigError(
                f"QT_AI_STRATEGIES: unknown strategy {name!r}; choose from {', '.join([*BUILT_IN, 'learned'])}"
            )
    return out


def size(close: float, quote_balance: Decimal | None, settings: Settings) -> Decimal:
    """Quantity for one decision: fixed quote notional, or a fraction of the quote balance."""
    notional = settings.ai_notional
    if settings.ai_sizing == "fraction" and quote_balance is not None:
        notional = quote_balance * settings.ai_fraction
    return (notional / Decimal(repr(close))).quantize(_QTY_STEP, rounding=ROUND_DOWN)


def exit_qty(held: Decimal, fraction: Decimal) -> Decimal:
    """What an exit sells of a position: ``fraction`` of it, rounded down; all of it rather than leave dust (pure)."""
    if fraction >= 1:
        return held
    qty = (held * fraction).quantize(_QTY_STEP, rounding=ROUND_DOWN)
    return held if qty <= 0 or held - qty < _QTY_STEP else qty


def order_qty(side: str, held: Decimal, entry: Decimal, exit_fraction: Decimal) -> tuple[Decimal, str]:
    """The quantity a signal decides given the strategy's position, or zero and why not (pure).

    Long-only spot: a BUY enters only when nothing is held (``entry``, sized by the configured
    rule); a SELL exits ``exit_fraction`` of what is held; a SELL with nothing held would be a
    short, which spot trading cannot do.
    """
    if side == "BUY":
        if held > 0:
            return _ZERO, "already holding a position"
        return (entry, "") if entry > 0 else (_ZERO, "entry size rounds to zero")
    if held <= 0:
        return _ZERO, "no position to sell (long-only spot: no shorts)"
    return exit_qty(held, exit_fraction), ""


def after_outcome(held: Decimal, result: ExecutionResult, base: str) -> Decimal:
    """The position once a decision's outcome is known; the decision itself was already counted (pure).

    An entry that did not fill (in full) is taken back, and a fee charged in the base asset is
    not held; an exit that did not fill is held again, unless the exchange said the coins were
    not there (insufficient balance): then there is nothing to hold.
    """
    missing = result.qty - result.filled_qty if result.status == "FILLED" else result.qty
    if result.side == "BUY":
        fee = result.fee if result.status == "FILLED" and result.fee_asset == base else _ZERO
        return max(_ZERO, held - missing - fee)
    if result.status != "FILLED" and result.reason == Reason.INSUFFICIENT_BALANCE:
        return held
    return held + max(_ZERO, missing)


def position_key(strategy: str, symbol: str) -> str:
    """The field of ``keys.AI_POSITIONS`` holding one strategy's position in one symbol."""
    return f"{strategy}:{symbol}"


def trace_id(candle_entry: str, strategy: str, symbol: str) -> str:
    """Deterministic per (candle, strategy): a replayed candle yields the same decision."""
    return hashlib.blake2b(f"{candle_entry}|{strategy}|{symbol}".encode(), digest_size=16).hexdigest()


def closed_by_protect(positions: dict[str, Decimal], fields: dict[str, str]) -> None:
    """A protective exit that filled sold the whole position: no strategy holds the symbol any more."""
    try:
        _env, result = decode_event(fields, ExecutionResult, EXECUTION_RESULT)
    except DecodeError:
        return
    if result.status == "FILLED" and result.side == "SELL" and result.filled_qty > 0:
        for key in positions:
            if key.endswith(f":{result.symbol}"):
                positions[key] = _ZERO


Found = tuple[str, Candle, Strategy, Signal]  # (candle entry id, candle, strategy, its signal)


class Signals:
    """Each symbol's history and strategy state: candles in, signals out (pure, shared with the backtest).

    A strategy with a ``Stepper`` is fed each close once and keeps running indicators; any other
    gets the window of the last ``history`` closes. A gap (``GapRule``) starts the symbol's
    warm-up again: indicators across a hole would mix two markets.
    """

    def __init__(self, strategies: list[Strategy], gap: GapRule, history: int, min_confidence: float) -> None:
        self.strategies = strategies
        self.gap = gap
        self.size = history
        self.min_confidence = min_confidence
        self.windowed = any(stepper_of(strategy) is None for strategy in strategies)
        self.history: dict[str, deque[float]] = {}
        self.steppers: dict[str, list[Stepper | None]] = {}
        self.previous: dict[str, int] = {}
        self.since: dict[str, int] = {}  # per symbol: candles fed since its warm-up began

    def feed(self, entry_id: str, candle: Candle, out: list[Found]) -> None:
        """Take one candle (in order); append each strategy's signal on it to ``out``."""
        symbol = candle.symbol
        previous = self.previous.get(symbol)
        steppers = self.steppers.get(symbol)
        if steppers is None or (previous is not None and self.gap(previous, candle)):
            if steppers is not None:
                log.warning("candle_gap", symbol=symbol, after_open_time=previous, open_time=candle.open_time,
                            rule=str(self.gap), action="history reset, warm-up again")  # fmt: skip
            steppers = self.steppers[symbol] = [stepper_of(strategy) for strategy in self.strategies]
            if self.windowed:  # only a strategy without a stepper reads the window
                self.history[symbol] = deque(maxlen=self.size)
            self.since[symbol] = 0
        self.previous[symbol] = candle.open_time
        self.since[symbol] += 1
        close = candle.close
        array = None
        if self.windowed:
            closes = self.history[symbol]
            closes.append(close)
            array = np.fromiter(closes, dtype=np.float64, count=len(closes))
        for strategy, stepper in zip(self.strategies, steppers, strict=True):
            if stepper is not None:
                signal = stepper.step(close)
            elif array is not None and len(array) >= strategy.warmup:
                signal = strategy.decide(array)
            else:
                continue
            if signal is not None and signal.confidence >= self.min_confidence:
                out.append((entry_id, candle, strategy, signal))


def decisions(
    found: list[Found],
    positions: dict[str, Decimal],
    balance: dict[str, Decimal] | None,
    settings: Settings,
    stamp: str,
    run_id: str,
    totals: dict[str, int],
) -> list[Fields]:
    """The decision entries for the signals, in order, each against the position the ones before it left (pure).

    ``positions`` moves with each decision; ``balance`` (the paper balances) sizes entries under
    ``QT_AI_SIZING=fraction``; ``totals["signals_ignored"]`` counts signals that decide nothing.
    """
    out: list[Fields] = []
    for entry_id, candle, strategy, signal in found:
        key = position_key(strategy.name, candle.symbol)
        held = positions.get(key, _ZERO)
        entry = _ZERO
        if signal.side == "BUY" and held <= 0:
            quote = split_symbol(candle.symbol, settings.quote_assets)[1] if balance is not None else ""
            entry = size(candle.close, balance.get(quote) if balance is not None else None, settings)
        qty, why = order_qty(signal.side, held, entry, settings.ai_exit_fraction)
        if qty <= 0:
            totals["signals_ignored"] += 1
            log.debug("signal_ignored", strategy=strategy.name, symbol=candle.symbol, side=signal.side, reason=why)
            continue
        positions[key] = held + qty if signal.side == "BUY" else held - qty
        payload = {
            "symbol": candle.symbol,
            "side": signal.side,
            "qty": str(qty),
            "price": repr(candle.close),
            "confidence": round(float(signal.confidence), 4),
            "strategy": strategy.name,
            "model_version": strategy.version,
        }
        out.append(
            envelope(
                DECISION,
                payload,
                trace_id=trace_id(entry_id, strategy.name, candle.symbol),
                correlation_id=f"{strategy.name}:{candle.symbol}:{run_id}",
                source=keys.AI_ENGINE,
                timestamp=stamp,
            )
        )
    return out


class AiEngine:
    """The AI engine stage."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        strategies: list[Strategy] | None = None,
        clock: Callable[[], datetime] | None = None,
        gap: GapRule | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.strategies = strategies if strategies is not None else build_strategies(settings)
        # The engine sees a stream, not a file: ``auto`` means a 24/7 market here (the backtest,
        # which has the whole file, passes the rule for its market).
        self.gap = gap if gap is not None else gap_rule(settings.ai_gap)
        self.clock = clock or (lambda: datetime.now(UTC))
        # Stable across restarts (the consumer name), so a replayed candle repeats the same identity.
        self.run_id = settings.consumer_name(keys.AI_ENGINE)
        self.minds = Signals(self.strategies, self.gap, settings.ai_history, settings.ai_min_confidence)
        self.last_time: dict[str, int] = {}
        self.consumer = GroupConsumer.for_stage(
            redis, settings, keys.AI_ENGINE, settings.candle_stream, settings.ai_group
        )
        self.consumer.depth = 1  # candles feed each symbol's history in order: one batch at a time
        self.totals: dict[str, int] = {"candles": 0, "decisions": 0, "skipped": 0, "signals_ignored": 0}

    def signals(self, candles: list[tuple[str, Candle]]) -> list[Found]:
        """Feed candles into the per-symbol history and collect every strategy's signal (pure)."""
        out: list[Found] = []
        for entry_id, candle in candles:
            self.minds.feed(entry_id, candle, out)
        return out

    async def handle(self, entries: list[Entry]) -> None:
        """Decide on a batch of candles; publish decisions and ack candles atomically."""
        decoded: list[tuple[str, Candle]] = []
        for entry in entries:
            try:
                _env, candle = decode_event(entry.fields, Candle, MARKET_CANDLE)
            except DecodeError as exc:
                await self.consumer.dead_letter([entry], f"undecodable candle: {exc.reason}", exc.field)
                continue
            decoded.append((entry.id, candle))
        kept, skipped = clean([c for _id, c in decoded], self.last_time)
        kept_ids = {id(c) for c in kept}
        fresh = [(entry_id, c) for entry_id, c in decoded if id(c) in kept_ids]
        found = self.signals(fresh)
        decisions: list[Fields] = []
        positions: dict[str, Decimal] = {}
        loaded: dict[str, Decimal] = {}
        cursor = ""
        if found:
            loaded, positions, cursor = await self.positions()
            decisions = await self._decide(found, positions)
        async with self.redis.pipeline(transaction=True) as pipe:
            for fields in decisions:
                pipe.xadd(self.settings.decision_stream, fields)
            if found:
                # The positions move with the decisions that change them, in the same transaction.
                gone = [key for key in loaded if positions.get(key, _ZERO) <= 0]
                if gone:
                    pipe.hdel(keys.AI_POSITIONS, *gone)
                held = {key: str(qty) for key, qty in positions.items() if qty > 0 and loaded.get(key) != qty}
                pipe.hset(keys.AI_POSITIONS, mapping={**held, CURSOR_FIELD: cursor})
            pipe.xack(self.settings.candle_stream, self.settings.ai_group, *[entry.id for entry in entries])
            await pipe.execute()
        self.totals["candles"] += len(fresh)
        self.totals["decisions"] += len(decisions)
        self.totals["skipped"] += len(skipped)

    async def _decide(self, found: list[Found], positions: dict[str, Decimal]) -> list[Fields]:
        """Decisions for the signals, in order, each against the position the ones before it left."""
        balance = None
        if self.settings.ai_sizing == "fraction":
            raw = await self.redis.hgetall(keys.paper_balances())
            balance = {asset: Decimal(value) for asset, value in raw.items()}
        return decisions(found, positions, balance, self.settings, now_iso(self.clock()), self.run_id, self.totals)

    async def positions(self) -> tuple[dict[str, Decimal], dict[str, Decimal], str]:
        """The positions on record, the same brought up to date with the outcomes since, and the results cursor.

        Only results of this engine's own decisions count (correlation id
        ``<strategy>:<symbol>:<consumer>``). The first time, the cursor starts at the newest
        result: outcomes of decisions made before the record existed are not this record's.
        """
        raw = await self.redis.hgetall(keys.AI_POSITIONS)
        cursor = raw.pop(CURSOR_FIELD, "")
        loaded: dict[str, Decimal] = {}
        for key, value in raw.items():
            try:
                loaded[key] = Decimal(value)
            except ArithmeticError:
                log.error("position_unreadable", key=key, value=value[:40], action="treated as no position")
        positions = dict(loaded)
        stream = self.settings.result_stream
        if not cursor:
            newest = await self.redis.xrevrange(stream, count=1)
            return loaded, positions, newest[0][0] if newest else "0-0"
        suffix = f":{self.run_id}"
        while True:
            page = await self.redis.xrange(stream, min=f"({cursor}", max="+", count=_RESULTS_PAGE)
            for entry_id, fields in page:
                cursor = entry_id
                correlation = fields.get("correlation_id", "")
                if correlation.startswith(protect.IDENTITY_PREFIX):
                    closed_by_protect(positions, fields)
                    continue
                if not correlation.endswith(suffix):
                    continue
                strategy, _, symbol = correlation.removesuffix(suffix).partition(":")
                try:
                    _env, result = decode_event(fields, ExecutionResult, EXECUTION_RESULT)
                    base = split_symbol(symbol, self.settings.quote_assets)[0]
                except (DecodeError, ValueError):
                    continue
                key = position_key(strategy, symbol)
                positions[key] = after_outcome(positions.get(key, _ZERO), result, base)
            if len(page) < _RESULTS_PAGE:
                return loaded, positions, cursor
