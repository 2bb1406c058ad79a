"""The risk rules: trading states, position and exposure limits, loss breakers, cooldown, throttle (pure).

``decide`` judges a batch of intents against a ``Snapshot`` of everything the rules read (the
book's positions, the orders approved but not yet committed, today's realised PnL, the equity
peak, recent losing exits, the throttle's window, the trading state, the daily count) and
returns a ``Plan``: one verdict per intent, and what the gate must write if it approves. The
gate (``governor.Governor.gate``) reads the snapshot and applies the plan in one script call
that first checks the snapshot is still current (``quantum:risk:epoch``): under racing
processes a plan is applied only on the state it was computed from, so no limit is ever
exceeded, and the arithmetic is exact decimals, never floats in Lua.

Order of the rules, per batch: the daily-loss state ends at the next UTC midnight; the loss
breakers (daily realised loss, drawdown from the equity peak) move the state up to
QT_BREAKER_STATE; then per intent, in stream order:

1. HALTED: nothing passes (``REJECTED HALTED``);
2. an order that reduces a position (a SELL of at most what the book holds, less the sells
   already approved) is an exit; anything else is an entry. REDUCING rejects entries;
3. entries only: the symbol's cooldown, its maximum position (base quantity and quote
   notional), the gross exposure across symbols, each counting the orders approved but not yet
   committed, so that racing batches cannot together pass a limit;
4. the daily trade limit (as before, counted once per intent);
5. the throttle: at most QT_MAX_ORDERS_PER_S orders in any second and QT_MAX_ORDERS_PER_S_SYMBOL
   per symbol. An intent over the rate is not rejected: it waits (``THROTTLED``, still pending)
   and is judged again when a slot frees, and so does every later intent of its symbol, so
   per-symbol order holds; it expires only if its decision grows too old meanwhile.

One piece: the rules share their running totals (what the batch has approved so far, per
symbol and overall), so they are one pass over one snapshot, kept in one file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum

import msgspec

from quantum_trader.events import Reason, StateChange, TradingState, now_iso, parse_iso
from quantum_trader.portfolio import Position
from quantum_trader.settings import Settings

ZERO = Decimal(0)
HUNDRED = Decimal(100)
THROTTLE_WINDOW_MS = 1000


class Verdict(StrEnum):
    """The rules' answer for one intent (the codes of ``Reason`` where it is refused)."""

    APPROVED = "APPROVED"
    THROTTLED = "THROTTLED"  # over the order rate: waits, still pending
    HALTED = Reason.HALTED.value
    REDUCING = Reason.REDUCING.value
    COOLDOWN = Reason.COOLDOWN.value
    MAX_POSITION = Reason.MAX_POSITION.value
    MAX_EXPOSURE = Reason.MAX_EXPOSURE.value
    DAILY_LIMIT = Reason.DAILY_LIMIT.value


@dataclass(frozen=True, slots=True)
class RiskLimits:
    """The risk settings in force (None: the rule is off)."""

    daily_limit: int
    max_position_qty: Mapping[str, Decimal] = field(default_factory=dict)
    max_position_notional: Decimal | None = None
    max_gross_exposure: Decimal | None = None
    daily_loss_limit: Decimal | None = None
    max_drawdown_pct: Decimal | None = None
    breaker_state: TradingState = TradingState.REDUCING
    capital: Mapping[str, Decimal] = field(default_factory=dict)
    loss_streak: int = 0
    loss_streak_window: timedelta = timedelta(hours=1)
    cooldown: timedelta = timedelta(hours=1)
    max_orders_per_s: int | None = None
    max_orders_per_s_symbol: int | None = None

    @property
    def needs_book(self) -> bool:
        """A rule reads the book (positions, orders in flight, PnL, losing exits); without one, the gate
        reads only the state and the counts, and racing batches cannot together pass what it checks."""
        return bool(
            self.max_position_qty
            or self.max_position_notional is not None
            or self.max_gross_exposure is not None
            or self.daily_loss_limit is not None
            or self.max_drawdown_pct is not None
            or self.loss_streak > 0
        )

    @property
    def throttled(self) -> bool:
        """An order rate is in force (otherwise the gate keeps no window of approvals)."""
        return self.max_orders_per_s is not None or self.max_orders_per_s_symbol is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> RiskLimits:
        """The limits the settings describe."""
        return cls(
            daily_limit=settings.effective_daily_limit,
            max_position_qty=dict(settings.max_position_qty),
            max_position_notional=settings.max_position_notional,
            max_gross_exposure=settings.max_gross_exposure,
            daily_loss_limit=settings.daily_loss_limit,
            max_drawdown_pct=settings.max_drawdown_pct,
            breaker_state=TradingState(settings.breaker_state.upper()),
            capital=settings.effective_risk_capital,
            loss_streak=settings.loss_streak,
            loss_streak_window=timedelta(seconds=settings.loss_streak_window_s),
            cooldown=timedelta(seconds=settings.cooldown_s),
            max_orders_per_s=settings.effective_max_orders_per_s,
            max_orders_per_s_symbol=settings.max_orders_per_s_symbol,
        )


class StateRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The trading state as stored (``quantum:trading_state``), with why and since when."""

    state: TradingState = TradingState.ACTIVE
    reason: str = ""
    detail: str = ""
    by: str = ""
    at: str = ""
    until: str = ""  # ISO time the state ends by itself ("" never)
    loss_ack_day: str = ""  # YYYYMMDD: the operator re-activated after the day's loss; no re-trip that day

    def fields(self) -> dict[str, str]:
        """The hash fields to store."""
        return {name: str(getattr(self, name)) for name in self.__struct_fields__}


def read_state(kind: str, fields: Mapping[str, str]) -> StateRecord:
    """The stored trading state; absent is ACTIVE, anything unreadable HALTED (fail closed)."""
    if kind == "none":
        return StateRecord()
    if kind != "hash":
        return StateRecord(state=TradingState.HALTED, detail=f"{'quantum:trading_state'} is a {kind}, not a hash")
    try:
        state = TradingState(fields.get("state", ""))
    except ValueError:
        return StateRecord(
            state=TradingState.HALTED,
            detail=f"unknown trading state {fields.get('state', '')[:40]!r}; set one with quantum-trader state",
        )
    known = {name: str(fields.get(name, "")) for name in StateRecord.__struct_fields__ if name != "state"}
    return StateRecord(state=state, **known)


@dataclass(frozen=True, slots=True)
class InFlight:
    """An order the gate approved whose result is not committed yet."""

    symbol: str
    side: str
    qty: Decimal

    def text(self) -> str:
        """As stored in ``quantum:risk:inflight``."""
        return f"{self.symbol} {self.side} {self.qty}"

    @classmethod
    def parse(cls, text: str) -> InFlight:
        """From its stored text; unreadable counts as nothing (the commit removes it)."""
        symbol, side, qty = text.split(" ")
        return cls(symbol, side, Decimal(qty))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the rules read, as one consistent view (``epoch`` names it)."""

    epoch: int
    state: StateRecord
    positions: Mapping[str, Position]
    inflight: Mapping[str, InFlight]
    recent_orders: Sequence[tuple[int, str]]  # (approved at, ms; symbol) within the throttle window
    realised_today: Mapping[str, Decimal]  # quote asset -> realised today
    peaks: Mapping[str, Decimal]  # quote asset -> equity peak
    losses: Mapping[str, Sequence[int]]  # symbol -> times of its recent losing exits (ms)
    daily_count: int
    counted: frozenset[str]  # intent ids of the batch already counted (delivered before)
    marks: Mapping[str, Decimal]  # symbol -> the price a position is valued at
    state_seen: str = ""  # the stored state as read (gate.lua checks it still stands when no epoch is checked)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One intent as the rules see it: ``price`` values it (the market's, else its own)."""

    intent_id: str  # what the intent is counted and held in flight by (``keys.intent_record``)
    symbol: str
    side: str
    qty: Decimal
    price: Decimal
    entry_id: str = ""  # its entry id on its stream, when that differs from ``intent_id`` (partitions)


@dataclass(frozen=True, slots=True)
class Judged:
    """One intent's verdict and its detail (the limit and the value)."""

    verdict: Verdict
    detail: str = ""


@dataclass
class Plan:
    """What ``decide`` found: a verdict per intent and what the gate writes."""

    judged: list[Judged]
    state: StateRecord
    change: StateChange | None = None
    peaks: dict[str, Decimal] = field(default_factory=dict)  # new peaks to store
    wait: timedelta = timedelta(0)  # until a throttled intent may pass


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def next_midnight(now: datetime) -> datetime:
    """The next UTC midnight."""
    return datetime.combine(now.astimezone(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)


def equity(
    positions: Mapping[str, Position], marks: Mapping[str, Decimal], capital: Mapping[str, Decimal]
) -> dict[str, Decimal]:
    """Per quote asset with a starting capital: capital + realised + unrealised at ``marks``."""
    out = dict(capital)
    for symbol, position in positions.items():
        if position.quote in out:
            out[position.quote] += position.realised + position.unrealised(marks.get(symbol))
    return out


@dataclass(frozen=True, slots=True)
class Breakers:
    """Where the loss breakers stand: today's realised PnL, equity, peak and drawdown per quote asset."""

    realised_today: dict[str, Decimal]
    equity: dict[str, Decimal]
    peaks: dict[str, Decimal]
    drawdown_pct: dict[str, Decimal]


def breakers(snapshot: Snapshot, limits: RiskLimits) -> Breakers:
    """The figures the loss breakers compare with their limits."""
    now_equity = equity(snapshot.positions, snapshot.marks, limits.capital)
    peaks = {
        quote: max(value, snapshot.peaks.get(quote, limits.capital.get(quote, value)))
        for quote, value in now_equity.items()
    }
    drawdown = {
        quote: (peaks[quote] - value) / peaks[quote] * HUNDRED if peaks[quote] > 0 else ZERO
        for quote, value in now_equity.items()
    }
    return Breakers(dict(snapshot.realised_today), now_equity, peaks, drawdown)


def _tripped(snapshot: Snapshot, limits: RiskLimits, figures: Breakers, now: datetime) -> tuple[str, str] | None:
    """The breaker crossed, (reason code, detail), or None."""
    today = f"{now.astimezone(UTC):%Y%m%d}"
    if limits.daily_loss_limit is not None and snapshot.state.loss_ack_day != today:
        for quote, realised in sorted(figures.realised_today.items()):
            if realised <= -limits.daily_loss_limit:
                return Reason.DAILY_LOSS, (
                    f"DAILY_LOSS: realised {realised:f} {quote} today <= -{limits.daily_loss_limit}"
                    " (QT_DAILY_LOSS_LIMIT)"
                )
    if limits.max_drawdown_pct is not None:
        for quote, pct in sorted(figures.drawdown_pct.items()):
            if pct >= limits.max_drawdown_pct:
                return Reason.DRAWDOWN, (
                    f"DRAWDOWN: equity {figures.equity[quote]:.2f} {quote} is {pct:.2f}% below its peak "
                    f"{figures.peaks[quote]:.2f} >= {limits.max_drawdown_pct}% (QT_MAX_DRAWDOWN_PCT)"
                )
    return None


def state_in_force(
    snapshot: Snapshot, limits: RiskLimits, now: datetime, by: str, figures: Breakers | None = None
) -> tuple[StateRecord, StateChange | None]:
    """The trading state after the day reset and the breakers, and the change to record (if any).

    ``figures``: the breakers' figures when the caller has them already (``breakers(snapshot, limits)``).
    """
    record = snapshot.state
    change: StateChange | None = None
    stamp = now_iso(now)
    if record.until and record.state is not TradingState.ACTIVE:
        try:
            ended = parse_iso(record.until) <= now
        except ValueError:
            ended = False
        if ended:
            change = StateChange(
                state=TradingState.ACTIVE,
                previous=record.state,
                reason=Reason.DAY_RESET,
                detail=f"the daily-loss state ended at {record.until}",
                by=by,
                at=stamp,
            )
            record = StateRecord(
                state=TradingState.ACTIVE, reason=Reason.DAY_RESET, detail=change.detail, by=by, at=stamp
            )
    tripped = _tripped(snapshot, limits, figures or breakers(snapshot, limits), now)
    if tripped is not None and limits.breaker_state.severity > record.state.severity:
        reason, detail = tripped
        until = now_iso(next_midnight(now)) if reason == Reason.DAILY_LOSS else ""
        change = StateChange(
            state=limits.breaker_state,
            previous=snapshot.state.state,
            reason=reason,
            detail=detail,
            by=by,
            at=stamp,
            until=until,
        )
        record = StateRecord(
            state=limits.breaker_state,
            reason=reason,
            detail=detail,
            by=by,
            at=stamp,
            until=until,
            loss_ack_day=record.loss_ack_day,
        )
    return record, change


def cooldown_until(losses: Sequence[int], limits: RiskLimits) -> int | None:
    """When the symbol's cooldown ends (ms), if its latest losing exit completed a streak."""
    if limits.loss_streak <= 0 or len(losses) < limits.loss_streak:
        return None
    ordered = sorted(losses)
    last = ordered[-1]
    window = int(limits.loss_streak_window.total_seconds() * 1000)
    if sum(1 for at in ordered if at >= last - window) < limits.loss_streak:
        return None
    return last + int(limits.cooldown.total_seconds() * 1000)


def _fmt(value: Decimal) -> str:
    return f"{value.normalize():f}" if value == value.to_integral_value() else f"{value:f}"


def decide(
    batch: Sequence[Candidate], snapshot: Snapshot, limits: RiskLimits, now: datetime, *, by: str = "governor"
) -> Plan:
    """One verdict per candidate, in order, and what to write (see the module docstring for the rules)."""
    figures = breakers(snapshot, limits)
    record, change = state_in_force(snapshot, limits, now, by, figures)
    peaks = {q: p for q, p in figures.peaks.items() if snapshot.peaks.get(q) != p} if limits.max_drawdown_pct else {}
    now_ms = _ms(now)

    # What is already on its way per symbol: the book, plus orders approved and not committed
    # (an intent of this batch delivered before is one of those: it is not counted twice).
    mine = {c.intent_id for c in batch}
    buys: dict[str, Decimal] = {}
    sells: dict[str, Decimal] = {}
    for intent_id, order in snapshot.inflight.items():
        if intent_id in mine:
            continue
        book = buys if order.side == "BUY" else sells
        book[order.symbol] = book.get(order.symbol, ZERO) + order.qty
    held = {symbol: p.qty for symbol, p in snapshot.positions.items()}
    exposure = {
        symbol: (held.get(symbol, ZERO) + buys.get(symbol, ZERO)) * snapshot.marks.get(symbol, ZERO)
        for symbol in set(held) | set(buys)
    }

    window_start = now_ms - THROTTLE_WINDOW_MS
    recent = sorted(at for at, _s in snapshot.recent_orders if at > window_start)
    recent_by_symbol: dict[str, list[int]] = {}
    for at, symbol in snapshot.recent_orders:
        if at > window_start:
            recent_by_symbol.setdefault(symbol, []).append(at)
    waiting_symbols: set[str] = set()
    all_wait = False
    wait_ms = 0
    count = snapshot.daily_count
    judged: list[Judged] = []

    for c in batch:
        if record.state is TradingState.HALTED:
            why = f" ({record.reason}: {record.detail})" if record.reason or record.detail else ""
            judged.append(Judged(Verdict.HALTED, f"trading state HALTED since {record.at or 'unknown'}{why}"))
            continue
        if all_wait or c.symbol in waiting_symbols:
            judged.append(Judged(Verdict.THROTTLED))
            continue
        exit_room = held.get(c.symbol, ZERO) - sells.get(c.symbol, ZERO)
        reduces = c.side == "SELL" and c.qty <= exit_room
        if not reduces:
            if record.state is TradingState.REDUCING:
                judged.append(
                    Judged(
                        Verdict.REDUCING,
                        f"trading state REDUCING ({record.reason}): {c.side} {_fmt(c.qty)} {c.symbol} does not reduce "
                        f"the position ({_fmt(exit_room)} left to sell)",
                    )
                )
                continue
            refused = _entry_refusal(c, limits, snapshot, held, buys, exposure, now_ms)
            if refused is not None:
                judged.append(refused)
                continue
        already = c.intent_id in snapshot.counted
        if not already and count >= limits.daily_limit:
            judged.append(Judged(Verdict.DAILY_LIMIT, f"{count} trades today >= QT_DAILY_LIMIT={limits.daily_limit}"))
            continue
        if not already:
            over = _over_rate(recent, recent_by_symbol.get(c.symbol, []), limits, now_ms)
            if over is not None:
                until, overall = over
                wait_ms = until - now_ms if wait_ms == 0 else min(wait_ms, until - now_ms)
                waiting_symbols.add(c.symbol)
                all_wait = all_wait or overall
                judged.append(Judged(Verdict.THROTTLED))
                continue
            count += 1
            recent.append(now_ms)
            recent_by_symbol.setdefault(c.symbol, []).append(now_ms)
        judged.append(Judged(Verdict.APPROVED))
        if c.side == "BUY":
            buys[c.symbol] = buys.get(c.symbol, ZERO) + c.qty
            exposure[c.symbol] = exposure.get(c.symbol, ZERO) + c.qty * c.price
        else:
            sells[c.symbol] = sells.get(c.symbol, ZERO) + c.qty
    return Plan(judged, record, change, peaks, timedelta(milliseconds=max(wait_ms, 1)) if wait_ms else timedelta(0))


def _over_rate(recent: list[int], recent_symbol: list[int], limits: RiskLimits, now_ms: int) -> tuple[int, bool] | None:
    """When a slot frees (ms) and whether the overall rate is the one that is full; None when a slot is free."""
    window_start = now_ms - THROTTLE_WINDOW_MS
    if limits.max_orders_per_s is not None:
        inside = sorted(at for at in recent if at > window_start)
        if len(inside) >= limits.max_orders_per_s:
            return inside[len(inside) - limits.max_orders_per_s] + THROTTLE_WINDOW_MS, True
    if limits.max_orders_per_s_symbol is not None:
        inside = sorted(at for at in recent_symbol if at > window_start)
        if len(inside) >= limits.max_orders_per_s_symbol:
            return inside[len(inside) - limits.max_orders_per_s_symbol] + THROTTLE_WINDOW_MS, False
    return None


def _entry_refusal(
    c: Candidate,
    limits: RiskLimits,
    snapshot: Snapshot,
    held: Mapping[str, Decimal],
    buys: Mapping[str, Decimal],
    exposure: Mapping[str, Decimal],
    now_ms: int,
) -> Judged | None:
    """The first entry rule the candidate breaks (cooldown, position, exposure), or None."""
    ends = cooldown_until(snapshot.losses.get(c.symbol, ()), limits)
    if ends is not None and now_ms < ends:
        return Judged(
            Verdict.COOLDOWN,
            f"COOLDOWN: {c.symbol} had {limits.loss_streak} losing exits within "
            f"{limits.loss_streak_window.total_seconds():g}s; no entries until "
            f"{now_iso(datetime.fromtimestamp(ends / 1000, UTC))}",
        )
    if c.side != "BUY":
        return None  # a spot sell beyond what is held adds no position; the exchange refuses it
    position = held.get(c.symbol, ZERO) + buys.get(c.symbol, ZERO)
    cap = limits.max_position_qty.get(c.symbol)
    if cap is not None and position + c.qty > cap:
        return Judged(
            Verdict.MAX_POSITION,
            f"MAX_POSITION: {c.symbol} position {_fmt(position)} + {_fmt(c.qty)} > {_fmt(cap)} (QT_MAX_POSITION_QTY)",
        )
    if limits.max_position_notional is not None:
        value = (position + c.qty) * c.price
        if value > limits.max_position_notional:
            return Judged(
                Verdict.MAX_POSITION,
                f"MAX_POSITION: {c.symbol} position value {_fmt(position * c.price)} + {_fmt(c.qty * c.price)} > "
                f"{_fmt(limits.max_position_notional)} (QT_MAX_POSITION_NOTIONAL)",
            )
    if limits.max_gross_exposure is not None:
        gross = sum(exposure.values(), ZERO)
        if gross + c.qty * c.price > limits.max_gross_exposure:
            return Judged(
                Verdict.MAX_EXPOSURE,
                f"MAX_EXPOSURE: gross exposure {_fmt(gross)} + {_fmt(c.qty * c.price)} > "
                f"{_fmt(limits.max_gross_exposure)} (QT_MAX_GROSS_EXPOSURE)",
            )
    return None
