"""The backtest's in-process transport: the stages' rules, called in order, on the server's state held in memory.

Each candle goes through the same code as live, in the same order as ``--through-server``:
the AI engine's signals and decisions (``ai_engine.Signals``, ``ai_engine.decisions``), the
protect stage's crossing and exit (``protect.crossed``, ``protect.exit_decision``), the loss
breakers (``risk.decide``), the router's validation and dedup identity (``router.plan_batch``),
the governor's review and risk rules (``governor.review``, ``risk.decide`` on a snapshot built by
``trading.assemble``), the paper fill rule (``paper.fill``) and the book's update
(``commit.book_updates``). What runs as a Lua script on the server has a twin here, a few lines
each, that writes the same values to ``Memory``: ``route`` (route.lua), ``gate`` (gate.lua),
``place`` (the paper exchange's transaction), ``commit`` (commit.lua) and the protect stage's
fire (protect.lua). One process owns the state, so the scripts' guards against other processes
(the epoch, XPENDING, WATCH) always pass and are left out. The property test
(``tests/backtest/test_equivalence.py``) runs both transports on generated series, decisions,
duplicates, malformed entries, limits and kill-switch flips, and requires identical outcomes.

One piece: the twins share one ``Memory`` and one simulated clock, and each is the counterpart of
a script or a stage's handler, in the order a candle meets them; split, each file would hold a
fragment of one candle's path.

Two differences, on purpose: dedup keys expire on the simulated clock (on a server they expire
on the server's clock, which a backtest does not move), and the throttle's window of approvals is
kept only when a throttle is configured (nothing else reads it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import numpy as np

from quantum_trader import governor as gov
from quantum_trader import keys, portfolio, protect, risk, trading
from quantum_trader.ai_engine import Found, Signals, after_outcome, closed_by_protect, decisions
from quantum_trader.backtest.streams import Streams, decided
from quantum_trader.bus.streams import Entry
from quantum_trader.commit import Job, book_updates
from quantum_trader.events import (
    DECISION_REJECTED,
    EXECUTION_RESULT,
    TRADE_INTENT,
    Candle,
    ExecutionResult,
    Fields,
    Reason,
    TradingState,
    encode_payload,
    now_iso,
)
from quantum_trader.exchanges.base import OrderOutcome, OrderRequest, split_symbol
from quantum_trader.exchanges.paper import fill
from quantum_trader.execution import candidate, decode, order_request, result_for, result_from_outcome, throttle_expiry
from quantum_trader.marketdata import GapRule
from quantum_trader.router import plan_batch
from quantum_trader.settings import Settings
from quantum_trader.strategies import Strategy

_GUARD = gov.send_guard()  # a backtest runs in memory: the seed names


def hincrbyfloat(old: str | None, increment: str) -> str:
    """HINCRBYFLOAT's arithmetic and text: long double sum, printed ``%.17Lf`` without trailing zeros."""
    total = np.longdouble(old or "0") + np.longdouble(increment)
    text = np.format_float_positional(total, precision=17, unique=False, fractional=True, trim="-")
    return "0" if text == "-0" else text


@dataclass(frozen=True, slots=True)
class Inject:
    """What else happens at a candle, before the stages look at it: the kill switch set, decisions published."""

    kill: str | None = None  # the value the switch is set to (None: left as it is)
    decisions: tuple[Fields, ...] = ()


@dataclass
class Memory:
    """The private server's keys the stages and scripts read and write, as the values they would hold."""

    kill: str | None = "0"
    epoch: int = 0
    state: dict[str, str] | None = None  # the trading state hash (None: absent, ACTIVE)
    states: list[Fields] = field(default_factory=list)  # the trading-state stream
    peaks: dict[str, str] = field(default_factory=dict)
    daily: dict[date, int] = field(default_factory=dict)
    counted: dict[date, set[str]] = field(default_factory=dict)
    inflight: dict[str, str] = field(default_factory=dict)
    orders: dict[str, int] = field(default_factory=dict)  # the throttle's window: member -> approved at (ms)
    realised: dict[date, dict[str, str]] = field(default_factory=dict)
    losses: dict[str, int] = field(default_factory=dict)  # losing exits: member -> at (ms)
    book: dict[str, str] = field(default_factory=dict)  # the book's positions, as stored
    stops: dict[str, str] = field(default_factory=dict)  # protective levels, as stored
    prices: dict[str, float] = field(default_factory=dict)  # each symbol's latest close (the price hash)
    balances: dict[str, Decimal] = field(default_factory=dict)  # the paper account
    dedup: dict[str, int] = field(default_factory=dict)  # dedup key -> expires at (ms, simulated)
    intents: list[tuple[str, Fields]] = field(default_factory=list)  # routed, not yet executed
    decided: dict[str, tuple[int, str]] = field(default_factory=dict)  # every intent: decided at, by
    results: list[tuple[str, Fields]] = field(default_factory=list)
    rejected: list[tuple[str, Fields]] = field(default_factory=list)
    dead: int = 0
    sequence: int = 0

    def next_id(self) -> str:
        """A stream entry id: unique and increasing, as the server's."""
        self.sequence += 1
        return f"1-{self.sequence}"

    def price_texts(self) -> dict[str, str]:
        """The price hash as the feed writes it (``repr`` of each close)."""
        return {symbol: repr(close) for symbol, close in self.prices.items()}


def _day(now: datetime) -> date:
    return now.astimezone(UTC).date()


def _ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


class Pipeline:
    """Engine, protect, router, governor, paper exchange and commit over one ``Memory``, on a simulated clock."""

    def __init__(
        self, settings: Settings, strategies: list[Strategy], gap: GapRule, *, start: Mapping[str, Decimal]
    ) -> None:
        self.settings = settings
        self.memory = Memory(balances=dict(start))
        self.minds = Signals(strategies, gap, settings.ai_history, settings.ai_min_confidence)
        self.limits = gov.Limits.from_settings(settings)
        self.risk = risk.RiskLimits.from_settings(settings)
        self.defaults = protect.Defaults.from_settings(settings)
        self.quote_assets = list(settings.quote_assets)
        self.by = settings.consumer_name(keys.EXECUTION)
        self.run_id = settings.consumer_name(keys.AI_ENGINE)
        self.watch_by = settings.consumer_name(keys.PROTECT)
        self.now = datetime.fromtimestamp(0, UTC)
        self.positions: dict[str, Decimal] = {}  # the engine's record of its strategies' positions
        self.cursor: int | None = None  # results already applied to it (None: the record does not exist yet)
        self.totals: dict[str, int] = {"decisions": 0, "signals_ignored": 0, "exits": 0}
        self.breakers = self.risk.daily_loss_limit is not None or self.risk.max_drawdown_pct is not None
        self._stops: dict[str, tuple[str, protect.Stop]] = {}  # per symbol: the stored levels, decoded

    # ---- one candle ---------------------------------------------------------------------

    def candle(self, candle: Candle, inject: Inject | None = None) -> None:
        """Publish one candle and let every stage handle what it brings, in the server path's order."""
        memory = self.memory
        self.now = datetime.fromtimestamp(candle.open_time / 1000, UTC)
        memory.prices[candle.symbol] = candle.close
        entry_id = memory.next_id()
        out: list[Fields] = []
        if inject is not None:
            if inject.kill is not None:
                memory.kill = inject.kill
            out.extend(inject.decisions)
        found: list[Found] = []
        self.minds.feed(entry_id, candle, found)
        if found:
            out.extend(self._decide(found))
        if candle.symbol in memory.stops:
            exit_fields = self._protect(candle)
            if exit_fields is not None:
                out.append(exit_fields)
        self._watch()
        if out:
            self._route_and_execute(out)

    def _decide(self, found: list[Found]) -> list[Fields]:
        """The engine: its record brought up to date with the outcomes since, then the decisions."""
        results = self.memory.results
        if self.cursor is not None:
            suffix = f":{self.run_id}"
            for _id, fields in results[self.cursor :]:
                correlation = fields["correlation_id"]
                if correlation.startswith(protect.IDENTITY_PREFIX):
                    closed_by_protect(self.positions, fields)
                elif correlation.endswith(suffix):
                    strategy, _, symbol = correlation.removesuffix(suffix).partition(":")
                    result = msgspec.json.decode(fields["payload"], type=ExecutionResult)
                    base = split_symbol(symbol, self.quote_assets)[0]
                    key = f"{strategy}:{symbol}"
                    self.positions[key] = after_outcome(self.positions.get(key, Decimal(0)), result, base)
        self.cursor = len(results)  # the first time: outcomes of decisions before the record are not its own
        balance = dict(self.memory.balances) if self.settings.ai_sizing == "fraction" else None
        made = decisions(found, self.positions, balance, self.settings, now_iso(self.now), self.run_id, self.totals)
        self.totals["decisions"] += len(made)
        return made

    def _protect(self, candle: Candle) -> Fields | None:
        """The protect stage and protect.lua: the exit of a position whose levels the candle crosses."""
        memory = self.memory
        raw = memory.stops[candle.symbol]
        cached = self._stops.get(candle.symbol)
        if cached is None or cached[0] != raw:
            cached = self._stops[candle.symbol] = (raw, protect.decode(raw))
        stop = cached[1]
        kind = protect.crossed(stop, candle)
        stored = memory.book.get(candle.symbol)
        if kind is None or stored is None:
            return None
        position = portfolio.decode_stored(candle.symbol, stored)
        if position.qty <= 0:
            return None
        stamp = now_iso(self.now)
        decision = protect.exit_decision(stop, position, kind, candle, stamp)
        fired = msgspec.structs.replace(
            stop, fired=decision["correlation_id"], fired_at=stamp, kind=kind, attempts=stop.attempts + 1
        )
        memory.stops[candle.symbol] = protect.encode(fired)
        self.totals["exits"] += 1
        return decision

    def _watch(self) -> None:
        """The loss breakers after the candle (``Governor.watch``).

        Without a breaker configured and with no state that ends by itself, ``risk.decide`` on no
        intents writes nothing: skipped, so the common case costs nothing per candle.
        """
        state = self.memory.state
        ends = state is not None and state.get("until") and state.get("state") != TradingState.ACTIVE.value
        if self.breakers or ends:
            self.gate([], self.watch_by)

    # ---- router -------------------------------------------------------------------------

    def _route_and_execute(self, published: list[Fields]) -> None:
        entries = [Entry(self.memory.next_id(), fields) for fields in published]
        size = self.settings.batch_size
        before = len(self.memory.intents)
        for first in range(0, len(entries), size):
            self.route(entries[first : first + size])
        routed = self.memory.intents[before:]
        self.memory.decided.update(decided((i, f["payload"]) for i, f in routed))
        del self.memory.intents[before:]  # executed below: only what the report needs of them is kept
        intents = [Entry(i, f) for i, f in routed]
        for first in range(0, len(intents), size):
            self.execute(intents[first : first + size])

    def route(self, entries: list[Entry]) -> None:
        """The router's batch: validation (``plan_batch``) and route.lua (dedup, intents, rejections)."""
        memory = self.memory
        now_ms = _ms(self.now)
        stamp = now_iso(self.now)
        plan = plan_batch(entries, self.settings, self.now)
        window = self.settings.dedup_window_s
        for routed in plan.valid:
            expires = memory.dedup.get(routed.dedup_key)
            if expires is None or expires <= now_ms:
                memory.dedup[routed.dedup_key] = now_ms + window * 1000
                memory.intents.append(
                    (
                        memory.next_id(),
                        {
                            "event_type": TRADE_INTENT,
                            "payload": routed.payload,
                            "trace_id": routed.trace_id,
                            "correlation_id": routed.correlation_id,
                            "timestamp": stamp,
                            "source": keys.ROUTER,
                        },
                    )
                )
                continue
            detail = f"decision already routed within {window}s (dedup key {routed.dedup_key})"
            payload = {
                "reason": Reason.DUPLICATE_SKIP.value,
                "detail": detail,
                "field": "",
                "original_id": routed.entry_id,
                "original": json.loads(routed.original),
            }
            rejection = {
                "event_type": DECISION_REJECTED,
                "payload": json.dumps(payload),
                "trace_id": routed.trace_id,
                "correlation_id": routed.correlation_id,
                "timestamp": stamp,
                "source": keys.ROUTER,
                "reason": Reason.DUPLICATE_SKIP.value,
                "original_id": routed.entry_id,
            }
            memory.rejected.append((memory.next_id(), rejection))
        for _entry_id, rejection, _detail in plan.invalid:
            memory.rejected.append((memory.next_id(), rejection))

    # ---- execution ----------------------------------------------------------------------

    def execute(self, entries: list[Entry]) -> None:
        """Execution's batch: decode, review, gate and place (waiting out the throttle), commit."""
        jobs, bad = decode(entries)
        self.memory.dead += len(bad)
        results: dict[str, ExecutionResult] = {}
        batch = [(job.intent, job.env.timestamp) for job in jobs]
        symbols = gov.symbols_to_price(batch, self.now, self.limits)
        texts = self.memory.price_texts()
        prices = {symbol: Decimal(texts[symbol]) for symbol in sorted(set(symbols)) if symbol in texts}
        gated: list[Job] = []
        for job, verdict in zip(jobs, gov.review(batch, prices, self.now, self.limits), strict=True):
            if verdict.status is None:
                gated.append(job)
            else:
                results[job.entry.id] = result_for(job, verdict.status, verdict.reason or "", verdict.detail)
        sent: set[str] = set()
        while gated:
            gated = self._gate_and_place(gated, prices, results, sent)
        self.commit([(job, results[job.entry.id]) for job in jobs if job.entry.id in results], sent)

    def _gate_and_place(
        self, gated: list[Job], prices: Mapping[str, Decimal], results: dict[str, ExecutionResult], sent: set[str]
    ) -> list[Job]:
        answers, wait = self.gate([candidate(job, prices) for job in gated], self.by)
        approved, waiting = [], []
        for job, answer in zip(gated, answers, strict=True):
            if answer.verdict == "APPROVED":
                approved.append(job)
            elif answer.verdict == risk.Verdict.THROTTLED:
                waiting.append(job)
            else:
                results[job.entry.id] = result_for(job, "REJECTED", Reason(answer.verdict), answer.detail)
        outcomes = self.place([order_request(job) for job in approved])
        for job, outcome in zip(approved, outcomes, strict=True):
            if outcome.sent:
                sent.add(job.entry.id)
                results[job.entry.id] = result_from_outcome(job, outcome, "paper")
            else:
                results[job.entry.id] = result_for(job, outcome.status, outcome.reason, outcome.detail)
        if not waiting:
            return []
        self.now += wait  # the throttle's wait passes on the simulated clock
        still = []
        for job in waiting:
            if gov.is_expired(job.intent, job.env.timestamp, self.now, self.limits.max_age):
                results[job.entry.id] = result_for(job, "EXPIRED", Reason.EXPIRED, throttle_expiry(self.limits))
            else:
                still.append(job)
        return still

    def snapshot(self, ids: Sequence[str], full: bool) -> risk.Snapshot:
        """``trading.read_snapshot``: the replies its transaction would get, assembled by the same code."""
        memory, limits, now = self.memory, self.risk, self.now
        day, now_ms = _day(now), _ms(now)
        orders: Any = 0
        if limits.throttled:
            inside = sorted(
                ((member, at) for member, at in memory.orders.items() if at > now_ms - risk.THROTTLE_WINDOW_MS),
                key=lambda item: (item[1], item[0]),
                reverse=True,
            )
            cap = limits.max_orders_per_s
            orders = [(member, float(at)) for member, at in (inside[:cap] if cap else inside)]
        streak_from = now_ms - int((limits.loss_streak_window + limits.cooldown).total_seconds() * 1000)
        counted = memory.counted.get(day, set())
        replies: list[Any] = [
            str(memory.epoch),
            "hash" if memory.state is not None else "none",
            dict(memory.state or {}),
            dict(memory.book) if full else 0,
            dict(memory.inflight) if full else 0,
            orders,
            dict(memory.realised.get(day, {})) if full else 0,
            dict(memory.peaks) if full else 0,
            str(memory.daily[day]) if day in memory.daily else None,
            ["1" if i in counted else None for i in ids] or [None],
            memory.price_texts() if full else 0,
            sorted(((m, float(at)) for m, at in memory.losses.items() if at >= streak_from), key=lambda x: (x[1], x[0]))
            if full
            else 0,
        ]
        snap = trading.assemble(replies, limits, ids, full)
        return snap if snap is not None else self.snapshot(ids, True)

    def gate(self, batch: Sequence[risk.Candidate], by: str) -> tuple[list[gov.Answer], timedelta]:
        """``Governor.gate`` and gate.lua: the risk rules' plan, then the kill switch and the daily count."""
        memory, now = self.memory, self.now
        ids = [c.intent_id for c in batch]
        plan = risk.decide(batch, self.snapshot(ids, self.risk.needs_book), self.risk, now, by=by)
        if not batch and plan.change is None and not plan.peaks:
            return [], timedelta(0)
        changed = False
        if plan.change is not None:
            memory.state = plan.state.fields()
            memory.states.append(trading.state_event(plan.change))
            trading.log_state_change(plan.change)
            changed = True
        if plan.peaks:
            memory.peaks.update({quote: str(peak) for quote, peak in plan.peaks.items()})
            changed = True
        day, now_ms = _day(now), _ms(now)
        counted = memory.counted.setdefault(day, set())
        count = memory.daily.get(day, 0)
        out: list[str] = []
        newly = 0
        for c, judged in zip(batch, plan.judged, strict=True):
            seen = c.intent_id in counted
            if memory.kill != "0":
                out.append(Reason.KILL_SWITCH.value)
            elif judged.verdict != risk.Verdict.APPROVED:
                out.append(judged.verdict.value)
            elif not seen and count >= self.risk.daily_limit:
                out.append(Reason.DAILY_LIMIT.value)
            else:
                if not seen:
                    count += 1
                    newly += 1
                    counted.add(c.intent_id)
                    memory.inflight[c.intent_id] = risk.InFlight(c.symbol, c.side, c.qty).text()
                    if self.risk.throttled:
                        memory.orders[gov.throttle_member(c)] = now_ms
                out.append("APPROVED")
        if newly:
            memory.daily[day] = count
            changed = True
        if memory.orders:
            oldest = now_ms - 10 * risk.THROTTLE_WINDOW_MS
            memory.orders = {member: at for member, at in memory.orders.items() if at >= oldest}
        if changed:
            memory.epoch += 1
        answers = [
            gov.Answer(verdict, j.detail if verdict == j.verdict.value else "")
            for verdict, j in zip(out, plan.judged, strict=True)
        ]
        return answers, plan.wait

    def place(self, requests: list[OrderRequest]) -> list[OrderOutcome]:
        """The paper exchange's batch: the kill switch read again, then the fill rule on the balances."""
        memory = self.memory
        outcomes = []
        texts = memory.price_texts()
        for order in requests:
            if _GUARD.stops(memory.kill):
                outcomes.append(_GUARD.stopped(order.client_order_id))
                continue
            text = texts.get(order.symbol)
            outcome, changes = fill(
                order,
                Decimal(text) if text is not None else None,
                memory.balances,
                fee_rate=self.settings.paper_fee_rate,
                slippage_bps=self.settings.paper_slippage_bps,
                quote_assets=self.quote_assets,
            )
            for asset, delta in changes.items():
                memory.balances[asset] = memory.balances.get(asset, Decimal(0)) + delta
            outcomes.append(outcome)
        return outcomes

    def commit(self, done: list[tuple[Job, ExecutionResult]], sent: set[str]) -> None:
        """commit.lua: the book, today's PnL, losing exits and levels; then each result, counts and in-flight."""
        if not done:
            return
        memory, now = self.memory, self.now
        day, now_ms = _day(now), _ms(now)
        fills = [(job.entry.id, f) for job, result in done if (f := portfolio.fill_of(result, self.quote_assets))]
        levels = {job.entry.id: (job.intent.stop_loss, job.intent.take_profit) for job, _result in done}
        updates = book_updates(
            fills, {f.symbol: memory.book.get(f.symbol) for _i, f in fills}, levels, self.defaults, now
        )
        for symbol, _before, new, _ids, realised, quote, losing, stop in updates:
            memory.book[str(symbol)] = str(new)
            if realised != "0" and quote != "":
                today = memory.realised.setdefault(day, {})
                today[str(quote)] = hincrbyfloat(today.get(str(quote)), str(realised))
            for member in losing:  # type: ignore[attr-defined]
                memory.losses[member] = now_ms
            if stop == "":
                memory.stops.pop(str(symbol), None)
            elif stop != "-":
                memory.stops[str(symbol)] = str(stop)
        if updates:
            kept_from = now_ms - int((self.settings.loss_streak_window_s + self.settings.cooldown_s) * 1000)
            memory.losses = {member: at for member, at in memory.losses.items() if at >= kept_from}
        stamp = now_iso(now)
        counted = memory.counted.get(day, set())
        for job, result in done:
            memory.results.append(
                (
                    memory.next_id(),
                    {
                        "event_type": EXECUTION_RESULT,
                        "payload": encode_payload(result),
                        "trace_id": job.env.trace_id,
                        "correlation_id": job.env.correlation_id,
                        "timestamp": stamp,
                        "source": keys.EXECUTION,
                    },
                )
            )
            if job.entry.id in counted:
                counted.discard(job.entry.id)
                if job.entry.id not in sent and memory.daily.get(day, 0) > 0:
                    memory.daily[day] -= 1
            memory.inflight.pop(job.entry.id, None)
        for job, result in done:
            identity = job.env.correlation_id
            if not identity.startswith(protect.IDENTITY_PREFIX) or result.filled_qty >= job.intent.qty:
                continue
            raw = memory.stops.get(job.intent.symbol)
            if raw is None:
                continue
            stop = protect.decode(raw)
            if stop.fired == identity:
                memory.stops[job.intent.symbol] = protect.encode(
                    msgspec.structs.replace(stop, fired="", fired_at="", kind="")
                )
        memory.epoch += 1


def simulate(
    candles: Sequence[Candle],
    strategies: list[Strategy],
    settings: Settings,
    gap: GapRule,
    *,
    start: Mapping[str, Decimal],
    script: Mapping[int, Inject] | None = None,
    progress: Any = None,
) -> Pipeline:
    """Run every candle through the pipeline in process; the pipeline, its memory holding what the server would."""
    pipeline = Pipeline(settings, strategies, gap, start=start)
    step = max(1, len(candles) // 200)
    for index, candle in enumerate(candles):
        pipeline.candle(candle, script.get(index) if script else None)
        if progress is not None and (index + 1) % step == 0:
            progress(index + 1)
    if progress is not None:
        progress(len(candles))
    return pipeline


def streams_of(pipeline: Pipeline) -> Streams:
    """What the in-process run left, as the server path reads it from its streams and keys."""
    memory = pipeline.memory
    return Streams(
        decided=memory.decided,
        results=memory.results,
        rejected=memory.rejected,
        states=memory.states,
        book=dict(memory.book),
        balances=dict(memory.balances),
        stops={symbol: json.dumps(json.loads(raw), sort_keys=True) for symbol, raw in memory.stops.items()},
        dead=memory.dead,
    )
