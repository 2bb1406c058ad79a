"""The risk governor: every rule an intent must pass right before its order leaves.

The pure rules need no server: ``review`` judges a whole batch in one call (max age, then
symbol allow-list and max notional), each intent EXPIRED, REJECTED with a code and a detail,
or passed on to the gate. The stateful rules run in one Lua script per batch (``gate.lua``):
the kill switch (trading only while ``quantum:kill`` is exactly ``0``; absent,
any other value, a key of another type or an unreachable server never approves)
and the daily trade limit, checked and incremented in the same atomic step and
counted once per intent even when it is delivered again.

The gate checks the switch once per batch; the exchange adapters read it again right
before each order leaves (``send_guard``), so turning it on also stops the orders of a
batch already approved: they end REJECTED KILL_SWITCH, not sent, their count given back.
They read the trading state (HALTED: REJECTED HALTED) and, with partitions, the batch's
lease with it (``send_guards``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Literal

from quantum_trader import keys, risk, trading
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.partitions import Fence
from quantum_trader.bus.streams import parse_id
from quantum_trader.errors import TransientError
from quantum_trader.events import Reason, TradeIntent, TradingState, parse_iso
from quantum_trader.exchanges.base import SendGuard
from quantum_trader.logs import get_logger
from quantum_trader.scripts import pack, register
from quantum_trader.settings import Settings

log = get_logger("governor")


# What the exchange adapters check right before each order leaves: the kill switch again.
def send_guard() -> SendGuard:
    """The kill switch as a ``SendGuard``: read right before each order leaves (under the key name in force)."""
    return SendGuard(keys.KILL_SWITCH, allowed="0", reason=Reason.KILL_SWITCH)


# The trading states that let an approved order leave: the key absent (ACTIVE), ACTIVE, REDUCING (a sell; a buy
# is stopped by the guard below). HALTED, an unknown word or a key of another type stops it (``risk.read_state``).
_SENDING_STATES: frozenset[str | None] = frozenset({None, TradingState.ACTIVE.value, TradingState.REDUCING.value})
_ENTRY_STATES: frozenset[str | None] = frozenset({None, TradingState.ACTIVE.value})  # where a BUY may still leave


def send_guards(fence: Fence | None = None) -> list[SendGuard]:
    """Everything read right before an approved order leaves, in the order it is judged.

    The gate approved the batch, but the batch may wait before its orders leave (a process frozen, a slow
    exchange): the partition's lease first (``fence``: held by anyone else, the intents are the new holder's
    and answered GONE, no result from us; otherwise a holder frozen past its lease would send, after waking,
    orders the new holder had already sent, or refused, or found too old), then the kill switch, then the
    trading state (``quantum-trader state halted`` stops approved orders as the switch does; REDUCING stops
    approved buys).
    """
    lease = (
        [SendGuard(fence.key, allowed=fence.value, reason=GONE, detail=f"not sent; {fence.lost}")]
        if fence is not None
        else []
    )
    state = SendGuard(
        keys.TRADING_STATE,
        allowed=_SENDING_STATES,
        reason=Reason.HALTED,
        field="state",
        detail="not sent; the trading state is HALTED (or unreadable)",
    )
    # REDUCING lets only orders that reduce a position pass (spot, long only: sells), so an entry approved
    # a moment before the state became REDUCING (an operator, the drawdown breaker) does not leave either.
    reducing = SendGuard(
        keys.TRADING_STATE,
        allowed=_ENTRY_STATES,
        reason=Reason.REDUCING,
        field="state",
        detail="not sent; the trading state is REDUCING: no new entries",
        side="BUY",
    )
    return [*lease, send_guard(), state, reducing]


@dataclass(frozen=True, slots=True)
class Limits:
    """The rules in force (from settings)."""

    daily_limit: int
    max_notional: Decimal
    symbol_allowlist: frozenset[str]
    max_age: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits the settings describe."""
        return cls(
            daily_limit=settings.effective_daily_limit,
            max_notional=settings.max_notional,
            symbol_allowlist=frozenset(settings.symbol_allowlist),
            max_age=timedelta(seconds=settings.max_intent_age_s),
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """The pure rules' answer for one intent: ``status`` None passes it on to the gate."""

    status: Literal["EXPIRED", "REJECTED"] | None = None
    reason: Reason | None = None
    detail: str = ""


TO_GATE = Verdict()


def is_expired(intent: TradeIntent, intent_timestamp: str, now: datetime, max_age: timedelta) -> bool:
    """An intent is stale once its decision is older than ``max_age`` (unknown age = stale)."""
    try:
        born = parse_iso(intent.decision_ts or intent_timestamp)
    except ValueError:
        return True
    return now - born > max_age


def expiry_detail(max_age: timedelta) -> str:
    """The detail of an EXPIRED result."""
    return f"decision older than {max_age.total_seconds():g}s"


def check_intent(intent: TradeIntent, price: Decimal | None, limits: Limits) -> tuple[Reason, str] | None:
    """The first rule of allow-list and notional the intent breaks, (code, detail); None when it passes."""
    if limits.symbol_allowlist and intent.symbol not in limits.symbol_allowlist:
        return Reason.SYMBOL_NOT_ALLOWED, f"{intent.symbol} is not in QT_SYMBOL_ALLOWLIST"
    if intent.order_type == "LIMIT" and intent.price is not None:
        price = intent.price
    if price is None:
        return Reason.NO_PRICE, f"no market or reference price for {intent.symbol}; notional cannot be checked"
    notional = intent.qty * price
    if notional > limits.max_notional:
        return Reason.MAX_NOTIONAL, f"notional {notional:f} exceeds QT_MAX_NOTIONAL={limits.max_notional}"
    return None


def symbols_to_price(batch: Sequence[tuple[TradeIntent, str]], now: datetime, limits: Limits) -> list[str]:
    """The symbols whose market price ``review`` needs: those of the intents not expired.

    An expired intent needs no price, so a batch of stale intents is finished without asking
    the exchange (a stale backlog drains even while the exchange is slow or unreachable).
    """
    return [intent.symbol for intent, stamp in batch if not is_expired(intent, stamp, now, limits.max_age)]


def review(
    batch: Sequence[tuple[TradeIntent, str]], prices: Mapping[str, Decimal], now: datetime, limits: Limits
) -> list[Verdict]:
    """One verdict per (intent, its entry's timestamp), in order: EXPIRED, REJECTED, or on to the gate.

    Age first (an expired intent is never judged on anything else), then the allow-list and the
    notional, valued at ``prices`` (the market's, by symbol), else the intent's own price.
    """
    verdicts = []
    for intent, stamp in batch:
        if is_expired(intent, stamp, now, limits.max_age):
            verdicts.append(Verdict("EXPIRED", Reason.EXPIRED, expiry_detail(limits.max_age)))
        elif (broken := check_intent(intent, prices.get(intent.symbol, intent.price), limits)) is not None:
            verdicts.append(Verdict("REJECTED", *broken))
        else:
            verdicts.append(TO_GATE)
    return verdicts


def counter_ttl(now: datetime) -> int:
    """Seconds until the next UTC midnight + 1 h (the seed's expiry for the daily counter)."""
    midnight = datetime.combine(now.astimezone(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)
    return max(1, int((midnight + timedelta(hours=1) - now).total_seconds()))


GONE = "GONE"  # the gate's answer for an intent no longer pending on the consumer: no result from us
RETRIES = 50  # gate attempts while other processes keep changing what the rules read


@dataclass(frozen=True, slots=True)
class Answer:
    """The gate's verdict for one intent: APPROVED, GONE, THROTTLED, or a refusal's ``Reason`` code and detail."""

    verdict: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class GateResult:
    """Answers in batch order, and how long a THROTTLED intent should wait before it is gated again."""

    answers: list[Answer]
    wait: timedelta = timedelta(0)


class Governor:
    """The stateful half of the rules, on the stream server: the snapshot the risk rules read, and the gate."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.limits = Limits.from_settings(settings)
        self.risk = risk.RiskLimits.from_settings(settings)
        self.intent_stream = settings.intent_stream
        self.group = settings.execution_group
        self.state_stream = settings.streams.risk_state
        self.quote_assets = list(settings.quote_assets)
        self._gate = register(redis, "gate")

    @property
    def ordered(self) -> bool:
        """The configured rules depend on the order intents are judged in (the book's, the throttle)."""
        return self.risk.needs_book or self.risk.throttled

    async def watch(self, now: datetime, by: str) -> None:
        """Look at the loss breakers without an order (the protect stage, on every batch of candles):
        the state moves, and the equity peak rises, as prices move, not only when an order comes."""
        await self.gate([], now, by)

    async def gate(
        self,
        batch: Sequence[risk.Candidate],
        now: datetime,
        consumer: str,
        *,
        stream: str | None = None,
        fence: Fence | None = None,
    ) -> GateResult:
        """One answer per intent, from the risk rules (``risk.decide``) applied atomically by one script call.

        The rules run on a snapshot; the script applies their plan only while no write they read
        happened since (else the snapshot is read again). GONE: the intent is no longer pending on
        ``consumer`` (finished or taken over). Raises RedisError when the server cannot answer, and
        TransientError when the book is unreadable or the state keeps moving: the caller leaves the
        batch pending and retries, so nothing is approved while the state is unknown.
        """
        ids = [c.intent_id for c in batch]  # what the snapshot and the records name them by
        entry_ids = [c.entry_id or c.intent_id for c in batch]  # what the stream's pending entries name them by
        day = now.astimezone(UTC).date()
        script_keys = [
            keys.KILL_SWITCH,
            keys.daily_trades(day),
            keys.counted(day),
            self.intent_stream,
            keys.RISK_EPOCH,
            keys.RISK_INFLIGHT,
            keys.RISK_ORDERS,
            keys.TRADING_STATE,
            keys.RISK_PEAK,
            self.state_stream,
        ]
        if stream is not None:
            script_keys[3] = stream  # the batch's partition of the intent stream
        if fence is not None:
            script_keys.append(fence.key)
        for _attempt in range(RETRIES):
            snap = await trading.read_snapshot(self.redis, self.risk, ids, now)
            plan = risk.decide(batch, snap, self.risk, now, by=consumer)
            if not batch and plan.change is None and not plan.peaks:
                return GateResult([])  # a look at the breakers that found nothing to write
            # Verdicts resting on the book, the throttle's window or a breaker hold only while nothing
            # moved since the snapshot (the epoch); without such a rule they rest on the state and the
            # daily count alone, which the script checks and enforces itself: racing gates never retry.
            strict = self.risk.needs_book or self.risk.throttled or snap.state.state is TradingState.REDUCING
            items = [
                [
                    c.entry_id or c.intent_id,
                    j.verdict.value,
                    risk.InFlight(c.symbol, c.side, c.qty).text(),
                    f"{c.intent_id}|{c.symbol}",
                    *([c.intent_id] if c.entry_id else []),
                ]
                for c, j in zip(batch, plan.judged, strict=True)
            ]
            reply = await self._gate(
                keys=script_keys,
                args=[
                    self.group,
                    consumer,
                    counter_ttl(now),
                    min(entry_ids, key=parse_id) if entry_ids else "0-0",
                    max(entry_ids, key=parse_id) if entry_ids else "0-0",
                    str(snap.epoch) if strict else "",
                    pack(items),
                    int(now.timestamp() * 1000),
                    risk.THROTTLE_WINDOW_MS,
                    pack(_flat(plan.state.fields()) if plan.change else []),
                    pack(_flat(trading.state_event(plan.change)) if plan.change else []),
                    pack(_flat({quote: str(peak) for quote, peak in plan.peaks.items()})),
                    trading.STATE_STREAM_MAXLEN,
                    snap.state_seen,
                    self.risk.daily_limit,
                    fence.value if fence is not None else "",
                ],
            )
            if reply == "RETRY":
                continue
            if plan.change is not None:
                trading.log_state_change(plan.change)
            answers = [
                Answer(str(v), j.detail if str(v) == j.verdict.value else "")
                for v, j in zip(reply, plan.judged, strict=True)
            ]
            return GateResult(answers, plan.wait)
        raise TransientError(f"the risk state kept changing under the gate ({RETRIES} attempts); the batch is retried")


def _flat(mapping: Mapping[str, str]) -> list[str]:
    return [item for pair in mapping.items() for item in pair]


def throttle_member(candidate: risk.Candidate) -> str:
    """The throttle window's member for an approved intent: its id and its symbol."""
    return f"{candidate.intent_id}|{candidate.symbol}"


@dataclass(frozen=True, slots=True)
class GovernorState:
    """What ``governor status`` shows."""

    day: date
    count: int
    limit: int
    mode: str
    kill_value: str | None
    trading_allowed: bool
    max_notional: Decimal
    symbol_allowlist: list[str]
    max_intent_age_s: float


async def governor_state(redis: Redis, settings: Settings, now: datetime | None = None) -> GovernorState:
    """Today's count, limit, mode and kill switch."""
    moment = now or datetime.now(UTC)
    day = moment.date()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.type(keys.KILL_SWITCH)
        # MGET: nil, never WRONGTYPE, for other types (by its command: a cluster pipeline refuses the method).
        pipe.execute_command("MGET", keys.KILL_SWITCH, keys.daily_trades(day))
        kind, (kill, count) = await pipe.execute()
    value = kill_value(kind, kill)
    return GovernorState(
        day=day,
        count=int(count or 0),
        limit=settings.effective_daily_limit,
        mode=settings.mode,
        kill_value=value,
        trading_allowed=value == "0",
        max_notional=settings.max_notional,
        symbol_allowlist=settings.symbol_allowlist,
        max_intent_age_s=settings.max_intent_age_s,
    )


async def set_kill(redis: Redis, on: bool) -> None:
    """Halt (``1``) or allow (``0``) trading."""
    await redis.set(keys.KILL_SWITCH, "1" if on else "0")


def kill_value(kind: str, value: str | None) -> str | None:
    """The switch as shown to an operator: its value, None when absent, ``<a list, not a string>`` for another type."""
    if kind in ("string", "none"):
        return value
    return f"<a {kind}, not a string>"


async def kill_state(redis: Redis) -> tuple[str | None, bool]:
    """(value as ``kill_value`` shows it, trading allowed). Unreachable server raises; callers treat that as halted.

    A key of another type (a list, say) is halted like any value but ``0``, never an error.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.type(keys.KILL_SWITCH)
        pipe.execute_command("MGET", keys.KILL_SWITCH)
        kind, (raw,) = await pipe.execute()
    value = kill_value(kind, raw)
    return value, value == "0"
