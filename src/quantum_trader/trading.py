"""The trading state on the server, and everything the risk rules read there.

``read_snapshot`` reads what ``risk.decide`` needs in one transaction; ``set_state`` is the
operator's change of the trading state (``quantum-trader state``); ``rules_status`` is what
``governor status`` shows: every rule with its limit, current value and headroom. Every change
of the state, by the operator or a breaker, is one entry on the trading-state stream (which the
journal records) and one log line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from quantum_trader import keys, portfolio, protect, risk
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import TransientError
from quantum_trader.events import RISK_STATE, Reason, StateChange, TradingState, envelope, now_iso
from quantum_trader.logs import get_logger
from quantum_trader.portfolio import PortfolioError, Position
from quantum_trader.settings import Settings

log = get_logger("governor")

STATE_STREAM_MAXLEN = 10_000  # trading-state changes kept on their stream (the journal keeps them all)


def state_event(change: StateChange) -> dict[str, str]:
    """The stream fields of one trading-state change."""
    return envelope(
        RISK_STATE,
        change,
        trace_id=f"state:{change.at}",
        correlation_id=f"state:{change.state}:{change.at}",
        source=change.by,
        timestamp=change.at,
    )


def log_state_change(change: StateChange) -> None:
    """One clear log line per change of the trading state."""
    log.warning(
        "trading_state_changed",
        state=change.state.value,
        previous=change.previous.value,
        reason=change.reason,
        detail=change.detail,
        by=change.by,
        until=change.until or None,
    )


async def read_snapshot(
    redis: Redis, limits: risk.RiskLimits, intent_ids: Sequence[str], now: datetime, *, full: bool | None = None
) -> risk.Snapshot:
    """Everything the risk rules read, in one transaction (a consistent view, named by its epoch).

    ``full`` (default: whether a rule of the book is configured, ``RiskLimits.needs_book``) reads the
    book, the orders in flight, PnL, peaks, prices and losing exits too; without it, only the state
    and the counts, unless the state is REDUCING (its rule needs the positions: read again, in full).
    An unreadable position is a TransientError naming its repair: no order passes on a book nobody can read.
    """
    full = limits.needs_book if full is None else full
    day = now.astimezone(UTC).date()
    now_ms = int(now.timestamp() * 1000)
    streak_from = now_ms - int((limits.loss_streak_window + limits.cooldown).total_seconds() * 1000)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(keys.RISK_EPOCH)
        pipe.type(keys.TRADING_STATE)
        pipe.hgetall(keys.TRADING_STATE)
        _read(pipe, full, keys.BOOK_POSITIONS, lambda: pipe.hgetall(keys.BOOK_POSITIONS))
        _read(pipe, full, keys.RISK_INFLIGHT, lambda: pipe.hgetall(keys.RISK_INFLIGHT))
        if limits.throttled:
            # The newest N approvals of the window are all the overall rate needs (at N the window is
            # full, whatever else it holds); fewer than N are the whole window, exact per symbol too.
            cap = limits.max_orders_per_s
            window = (f"({now_ms - risk.THROTTLE_WINDOW_MS}",)
            pipe.zrevrangebyscore(keys.RISK_ORDERS, "+inf", *window, start=0 if cap else None, num=cap, withscores=True)
        else:
            pipe.exists(keys.RISK_ORDERS)  # no throttle, no window kept: nothing to read
        _read(pipe, full, keys.RISK_PEAK, lambda: pipe.hgetall(keys.risk_realised(day)))
        _read(pipe, full, keys.RISK_PEAK, lambda: pipe.hgetall(keys.RISK_PEAK))
        pipe.get(keys.daily_trades(day))
        pipe.hmget(keys.counted(day), list(intent_ids) or ["-"])
        _read(pipe, full, keys.PRICE_HASH, lambda: pipe.hgetall(keys.PRICE_HASH))
        _read(
            pipe,
            full,
            keys.RISK_LOSSES,
            lambda: pipe.zrangebyscore(keys.RISK_LOSSES, streak_from, "+inf", withscores=True),
        )
        replies = await pipe.execute(raise_on_error=False)
    snap = assemble(replies, limits, intent_ids, full)
    return snap if snap is not None else await read_snapshot(redis, limits, intent_ids, now, full=True)


SNAPSHOT_KEYS = (
    keys.RISK_EPOCH,
    keys.TRADING_STATE,
    keys.TRADING_STATE,
    keys.BOOK_POSITIONS,
    keys.RISK_INFLIGHT,
    keys.RISK_ORDERS,
    f"{keys.RISK_REALISED_PREFIX}<day>",
    keys.RISK_PEAK,
    f"{keys.DAILY_TRADES_PREFIX}<day>",
    f"{keys.COUNTED_PREFIX}<day>",
    keys.PRICE_HASH,
    keys.RISK_LOSSES,
)


def assemble(
    replies: Sequence[Any], limits: risk.RiskLimits, intent_ids: Sequence[str], full: bool
) -> risk.Snapshot | None:
    """The snapshot from the replies of ``read_snapshot``'s transaction, in its order (pure; the backtest
    builds the same replies from its own state). None: the state is REDUCING and the read was not full,
    so its rule needs the positions: read again, in full."""
    for index, (name, reply) in enumerate(zip(SNAPSHOT_KEYS, replies, strict=True)):
        # The trading state of another type is HALTED (read_state); any other unreadable key: fail closed.
        if isinstance(reply, Exception) and index != 2:
            raise TransientError(
                f"{name} cannot be read ({reply}); the risk rules need it. Inspect it with TYPE {name}"
            )
    epoch, kind, state_fields, stored, inflight, orders, realised, peaks, count, counted, prices, losses = (
        reply if full or index in _ALWAYS else {} for index, reply in enumerate(replies)
    )
    if isinstance(state_fields, Exception):
        state_fields = {}
    state = risk.read_state(kind, state_fields)
    seen = str(state_fields.get("state", "")) if kind == "hash" else f"<{kind}>"
    if not full and state.state is TradingState.REDUCING:
        return None
    positions: dict[str, Position] = {}
    for symbol, raw in stored.items():
        try:
            positions[symbol] = portfolio.decode_stored(symbol, raw)
        except PortfolioError as exc:
            raise TransientError(str(exc)) from None
    marks: dict[str, Decimal] = {}
    for symbol, position in positions.items():
        if position.last_price is not None:
            marks[symbol] = position.last_price
    for symbol, text in prices.items():
        try:
            price = Decimal(text)
        except ArithmeticError:
            continue
        if price.is_finite() and price > 0:
            marks[symbol] = price
    flights: dict[str, risk.InFlight] = {}
    for intent_id, text in inflight.items():
        try:
            flights[intent_id] = risk.InFlight.parse(text)
        except (ValueError, ArithmeticError):
            continue
    return risk.Snapshot(
        epoch=int(epoch or 0),
        state=state,
        state_seen=seen,
        positions=positions,
        inflight=flights,
        recent_orders=[(int(score), member.rpartition("|")[2]) for member, score in orders] if limits.throttled else [],
        realised_today=_decimals(realised),
        peaks=_decimals(peaks),
        losses=_by_symbol(losses or []),
        daily_count=int(count or 0),
        counted=frozenset(i for i, seen in zip(intent_ids, counted, strict=False) if seen is not None),
        marks=marks,
    )


_ALWAYS = frozenset({0, 1, 2, 5, 8, 9})  # epoch, state, throttle window, daily count, counted: read every time


def _read(pipe: Any, full: bool, key: str, command: Callable[[], object]) -> None:
    """Queue ``command`` when the snapshot is full; otherwise a cheap placeholder keeps the replies aligned."""
    if full:
        command()
    else:
        pipe.exists(key)


def _by_symbol(rows: Sequence[tuple[str, float]]) -> dict[str, list[int]]:
    """Sorted-set rows of ``<id>|<symbol>`` members: their times (ms) by symbol."""
    out: dict[str, list[int]] = {}
    for member, score in rows:
        out.setdefault(member.rpartition("|")[2], []).append(int(score))
    return out


def _decimals(mapping: Mapping[str, str]) -> dict[str, Decimal]:
    out = {}
    for name, text in mapping.items():
        try:
            value = Decimal(text)
        except ArithmeticError:
            continue
        if value.is_finite():
            out[name] = value
    return out


async def set_state(redis: Redis, settings: Settings, state: TradingState, reason: str, by: str) -> StateChange:
    """The operator's change of the trading state: stored, on the stream and logged, in one transaction.

    Back to ACTIVE also accepts the losses so far: the daily-loss breaker stays quiet for the rest
    of the UTC day, and the drawdown is measured from today's equity (the peak is reset to it).
    """
    now = datetime.now(UTC)
    limits = risk.RiskLimits.from_settings(settings)
    snap = await read_snapshot(redis, limits, [], now, full=True)
    record = risk.StateRecord(
        state=state,
        reason=Reason.OPERATOR,
        detail=reason,
        by=by,
        at=now_iso(now),
        loss_ack_day=f"{now:%Y%m%d}" if state is TradingState.ACTIVE else snap.state.loss_ack_day,
    )
    change = StateChange(
        state=state,
        previous=snap.state.state,
        reason=Reason.OPERATOR,
        detail=reason,
        by=by,
        at=record.at,
    )
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.TRADING_STATE)
        pipe.hset(keys.TRADING_STATE, mapping=record.fields())
        if state is TradingState.ACTIVE:
            equity = risk.equity(snap.positions, snap.marks, limits.capital)
            pipe.delete(keys.RISK_PEAK)
            if equity:
                pipe.hset(keys.RISK_PEAK, mapping={quote: str(value) for quote, value in equity.items()})
        pipe.xadd(settings.streams.risk_state, state_event(change), maxlen=STATE_STREAM_MAXLEN, approximate=True)
        pipe.incr(keys.RISK_EPOCH)
        await pipe.execute()
    log_state_change(change)
    return change


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule as ``governor status`` shows it: its setting, limit, current value and headroom."""

    name: str
    setting: str
    limit: str  # "off" when the rule is off
    current: str
    headroom: str

    def as_dict(self) -> dict[str, str]:
        """For ``--json``."""
        return {
            "name": self.name,
            "setting": self.setting,
            "limit": self.limit,
            "current": self.current,
            "headroom": self.headroom,
        }


@dataclass(frozen=True, slots=True)
class RiskStatus:
    """The trading state, every risk rule, and the protective levels of every position."""

    state: risk.StateRecord
    rules: list[Rule]
    stops: dict[str, protect.Stop] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """For ``--json`` (exact decimals as strings)."""
        return {
            "trading_state": {name: value for name, value in self.state.fields().items()},
            "rules": [rule.as_dict() for rule in self.rules],
            "stops": {
                symbol: {
                    "stop": None if s.stop is None else str(s.stop),
                    "take": None if s.take is None else str(s.take),
                    "armed_at": s.at,
                    "fired": s.fired,
                    "fired_at": s.fired_at,
                    "kind": s.kind,
                }
                for symbol, s in sorted(self.stops.items())
            },
        }


def _text(value: Decimal) -> str:
    return f"{value.normalize():f}" if value == value.to_integral_value() else f"{value:f}"


def _row(name: str, setting: str, limit: Decimal | int | None, current: Decimal | int) -> Rule:
    if limit is None:
        return Rule(name, setting, "off", _text(Decimal(current)), "-")
    return Rule(name, setting, _text(Decimal(limit)), _text(Decimal(current)), _text(Decimal(limit) - Decimal(current)))


def rules_status(snap: risk.Snapshot, limits: risk.RiskLimits, now: datetime) -> list[Rule]:
    """Every rule with its limit, current value and headroom (pure)."""
    figures = risk.breakers(snap, limits)
    rows = [_row("daily trades", "QT_DAILY_LIMIT", limits.daily_limit, snap.daily_count)]
    held = {symbol: p.qty for symbol, p in snap.positions.items()}
    for symbol, cap in sorted(limits.max_position_qty.items()):
        rows.append(_row(f"position {symbol} (base)", "QT_MAX_POSITION_QTY", cap, held.get(symbol, Decimal(0))))
    largest = max(
        ((qty * snap.marks.get(symbol, Decimal(0)), symbol) for symbol, qty in held.items()),
        default=(Decimal(0), ""),
    )
    rows.append(
        _row(
            f"largest position value {largest[1]}".rstrip(),
            "QT_MAX_POSITION_NOTIONAL",
            limits.max_position_notional,
            largest[0],
        )
    )
    gross = sum((qty * snap.marks.get(symbol, Decimal(0)) for symbol, qty in held.items()), Decimal(0))
    rows.append(_row("gross exposure", "QT_MAX_GROSS_EXPOSURE", limits.max_gross_exposure, gross))
    quotes = sorted(set(figures.realised_today) | set(limits.capital)) or ["-"]
    for quote in quotes:
        loss = -figures.realised_today.get(quote, Decimal(0))
        rows.append(_row(f"realised loss today ({quote})", "QT_DAILY_LOSS_LIMIT", limits.daily_loss_limit, loss))
    for quote, pct in sorted(figures.drawdown_pct.items()):
        rows.append(_row(f"drawdown from peak ({quote}, %)", "QT_MAX_DRAWDOWN_PCT", limits.max_drawdown_pct,
                         pct.quantize(Decimal("0.01"))))  # fmt: skip
    now_ms = int(now.timestamp() * 1000)
    recent = [at for at, _s in snap.recent_orders if at > now_ms - risk.THROTTLE_WINDOW_MS]
    rows.append(_row("orders in the last second", "QT_MAX_ORDERS_PER_S", limits.max_orders_per_s, len(recent)))
    if limits.max_orders_per_s_symbol is not None:
        busiest: dict[str, int] = {}
        for at, symbol in snap.recent_orders:
            if at > now_ms - risk.THROTTLE_WINDOW_MS:
                busiest[symbol] = busiest.get(symbol, 0) + 1
        top = max(busiest.values(), default=0)
        rows.append(_row("orders in the last second, one symbol", "QT_MAX_ORDERS_PER_S_SYMBOL",
                         limits.max_orders_per_s_symbol, top))  # fmt: skip
    cooling = sorted(
        symbol
        for symbol, times in snap.losses.items()
        if (ends := risk.cooldown_until(times, limits)) is not None and now_ms < ends
    )
    rows.append(
        Rule(
            "symbols in cooldown",
            "QT_LOSS_STREAK",
            "off" if limits.loss_streak <= 0 else f"{limits.loss_streak} losing exits",
            ", ".join(cooling) or "none",
            "-",
        )
    )
    return rows


async def risk_status(redis: Redis, settings: Settings, now: datetime | None = None) -> RiskStatus:
    """The trading state, the rules and the protective levels, as ``governor status`` shows them."""
    moment = now or datetime.now(UTC)
    limits = risk.RiskLimits.from_settings(settings)
    snap = await read_snapshot(redis, limits, [], moment, full=True)
    state, _change = risk.state_in_force(snap, limits, moment, "status")
    return RiskStatus(state, rules_status(snap, limits, moment), await protect.read_stops(redis))
