"""Execution: turn each trade intent into exactly one order (or none) and exactly one result.

Per batch, in order:
1. decode; an intent that does not decode goes to the dead-letter stream with its raw fields;
2. for intents delivered before (a crash, a dead consumer), look the order up at the
   exchange by its deterministic client order id: if it exists, report it, never place again;
3. the governor's pure review of the batch in one call: EXPIRED for intents older than the
   max age (never executed), REJECTED for those breaking the allow-list or the notional;
4. the governor's gate script for the rest (kill switch, daily limit) in one call, right
   before the orders leave;
5. place the approved orders (idempotent per client order id); the exchange reads the kill
   switch and the trading state again right before each order leaves, and an order they stop
   is REJECTED KILL_SWITCH (or HALTED); with partitions it reads the batch's lease too, and
   an order it stops is left, with no result, to the partition's new holder;
6. one ``commit.lua`` call acknowledges every intent and writes its result (and the legacy
   copy), atomically; an intent someone else already finished gets no second result, and an
   intent the gate counted that ends without an order gives its count back.

An intent whose order may exist is never set aside as poison, however often the process dies
while handling it (``GroupConsumer.must_finish``): only this stage can look its order up and
write its result.

One piece: decoding, the look-up of orders already sent, the gate, placing and the commit share
each batch's jobs and its per-symbol turn; a reader follows an intent to its one order and one
result in this file alone.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from quantum_trader import governor as gov
from quantum_trader import keys, protect, risk
from quantum_trader.bus.cluster import require_replicated
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.dead_letters import Refusal
from quantum_trader.bus.partitions import Fence, Partitioned
from quantum_trader.bus.streams import Entry, GroupConsumer
from quantum_trader.commit import Committer, Job
from quantum_trader.errors import DecodeError
from quantum_trader.events import (
    TRADE_INTENT,
    ExecutionResult,
    Reason,
    Status,
    TradeIntent,
    check_amount,
    check_amount_texts,
    decode_event,
    printable,
)
from quantum_trader.exchanges.base import Exchange, OrderOutcome, OrderRequest, client_order_id
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.logs import get_logger
from quantum_trader.settings import Settings

if TYPE_CHECKING:
    from quantum_trader.metrics import Metrics

log = get_logger("execution")


def check_amounts(intent: TradeIntent) -> None:
    """The intent's quantity and price are within the router's bounds (the intent stream is writable by others)."""
    try:
        check_amount(intent.qty, "qty")
        for name in ("price", "stop_loss", "take_profit"):
            value = getattr(intent, name)
            if value is not None:
                check_amount(value, name)
    except DecodeError as exc:
        raise DecodeError(f"payload: {exc.reason}", field=exc.field) from None


def decode(entries: Sequence[Entry]) -> tuple[list[Job], list[tuple[Entry, DecodeError]]]:
    """The intents of a batch as jobs, and each entry that does not decode with the reason (pure).

    Whatever an entry holds, it ends in one of the two lists: an error nobody foresaw is that
    entry's DecodeError, never the batch's failure.
    """
    jobs, bad = [], []
    for entry in entries:
        try:
            env, intent = decode_event(entry.fields, TradeIntent, TRADE_INTENT)
            check_amount_texts(env.payload)
            check_amounts(intent)
        except DecodeError as exc:
            bad.append((entry, exc))
            continue
        except Exception as exc:  # whatever the entry holds, it is set aside alone
            bad.append((entry, DecodeError(f"{type(exc).__name__}: {printable(str(exc), 200)}", raw=entry.fields)))
            continue
        jobs.append(Job(entry, env, intent, client_order_id(entry.id, env.trace_id, env.correlation_id)))
    return jobs, bad


def result_for(
    job: Job,
    status: Status,
    reason: str = "",
    detail: str = "",
    outcome: OrderOutcome | None = None,
    exchange: str = "",
) -> ExecutionResult:
    """The result payload of one intent: ``reason`` a ``Reason`` code, ``detail`` in words."""
    return ExecutionResult(
        status=status,
        reason=reason,
        detail=detail,
        symbol=job.intent.symbol,
        side=job.intent.side,
        qty=job.intent.qty,
        intent_id=job.entry.id,
        decision_id=job.intent.decision_id,
        client_order_id=job.coid,
        filled_qty=outcome.filled_qty if outcome else Decimal(0),
        avg_price=outcome.avg_price if outcome else None,
        fee=outcome.fee if outcome else Decimal(0),
        fee_asset=outcome.fee_asset if outcome else "",
        exchange_order_id=outcome.exchange_order_id if outcome else "",
        exchange=exchange,
        strategy=job.intent.strategy or "",
        confidence=job.intent.confidence,
    )


def result_from_outcome(job: Job, outcome: OrderOutcome, exchange: str) -> ExecutionResult:
    """The result an exchange outcome makes."""
    return result_for(job, outcome.status, outcome.reason, outcome.detail, outcome, exchange)


def result_not_sent(job: Job, outcome: OrderOutcome) -> ExecutionResult:
    """The result of an order that never left (``outcome.sent`` False): no fill, no exchange."""
    return result_for(job, outcome.status, outcome.reason, outcome.detail)


def candidate(job: Job, prices: Mapping[str, Decimal], partition: str | None = None) -> risk.Candidate:
    """The intent as the rules see it: at its limit price, else the market's, else its own (``keys.intent_record``)."""
    intent, record = job.intent, keys.intent_record(job.entry.id, partition)
    limit = intent.order_type == "LIMIT" and intent.price is not None
    price = (
        intent.price if limit and intent.price is not None else prices.get(intent.symbol, intent.price or Decimal(0))
    )
    return risk.Candidate(record, intent.symbol, intent.side, intent.qty, price, job.entry.id if partition else "")


def _in_flight_record(partition: str | None, entry_id: str) -> tuple[str, str]:
    """Where the gate holds an intent's order in flight: the hash and the intent's record (``keys.intent_record``)."""
    return keys.RISK_INFLIGHT, keys.intent_record(entry_id, partition)


def order_request(job: Job) -> OrderRequest:
    """The order an approved intent places (its client order id makes placing it idempotent)."""
    intent = job.intent
    return OrderRequest(
        client_order_id=job.coid,
        symbol=intent.symbol,
        side=intent.side,
        qty=intent.qty,
        order_type=intent.order_type,
        price=intent.price if intent.order_type == "LIMIT" else None,
        reference_price=intent.price,
    )


def throttle_expiry(limits: gov.Limits) -> str:
    """The detail of an intent that expired while it waited for the order rate."""
    return f"{gov.expiry_detail(limits.max_age)} while waiting for the order rate (QT_MAX_ORDERS_PER_S)"


@dataclass(frozen=True, slots=True, eq=False)
class _Turn:
    """A batch's place in its symbols' queue: its orders placed, then its results written."""

    placed: asyncio.Future[None]
    committed: asyncio.Future[None]


class Execution:
    """The execution service: governor review and gate, exchange adapter, atomic results."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        exchange: Exchange,
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.sleep = sleep  # a backtest's sleep moves its simulated clock instead
        self.settings = settings
        # With metrics, the exchange's calls are timed (the adapter itself is wrapped, not changed).
        self.exchange: Exchange = metrics.instrument(exchange) if metrics is not None else exchange
        self.metrics = metrics
        self.clock = clock or (lambda: datetime.now(UTC))
        self.streams = settings.streams
        self.governor = gov.Governor(redis, settings)
        self.limits = self.governor.limits
        self.committer = Committer(
            redis,
            self.streams,
            keep_s=settings.trim_keep_s,
            paper_records=isinstance(exchange, PaperExchange),
            quote_assets=settings.quote_assets,
            losses_kept_s=settings.loss_streak_window_s + settings.cooldown_s,
            defaults=protect.Defaults.from_settings(settings),
        )
        self.consumer = GroupConsumer.for_stage(
            redis, settings, keys.EXECUTION, self.streams.intent, self.streams.execution_group
        )
        # QT_PARTITIONS > 1: the partitions of the intent stream this process holds the leases of, read in turn.
        self.partitioned = (
            Partitioned(redis, settings, keys.EXECUTION, self.streams.intent, self.streams.execution_group)
            if settings.partitions > 1
            else None
        )
        for lane in [self.consumer, *(self.partitioned.lanes if self.partitioned else [])]:
            lane.must_finish = self._orders_may_exist
            # An intent set aside takes the gate's record of its order in flight with it (nothing else would).
            lane.record_of = functools.partial(_in_flight_record, None if lane is self.consumer else lane.stream)
        self.totals: dict[str, int] = {"FILLED": 0, "REJECTED": 0, "EXPIRED": 0, "FAILED": 0}
        # Per symbol, the batch in flight that holds it last (see ``handle``).
        self._last_for_symbol: dict[str, _Turn] = {}

    async def _consumer_fence(self, lane: GroupConsumer) -> Fence:
        """This consumer's fence as the batch begins (``keys.consumer_fence``; INCRBY 0 creates it at 0)."""
        key = keys.consumer_fence(lane.stream, lane.group, lane.consumer)
        return Fence(key, str(await self.redis.incrby(key, 0)), lost="another consumer claimed this batch's intents")

    async def _orders_may_exist(self, entries: list[Entry]) -> set[str]:
        """The ids of ``entries`` whose order may exist: only this stage can finish those (it looks the order up)."""
        fields = [(e.id, e.fields.get("trace_id", ""), e.fields.get("correlation_id", "")) for e in entries]
        found = await orders_may_exist(self.redis, self.exchange.name, [client_order_id(*f) for f in fields])
        return {entry.id for entry, may in zip(entries, found, strict=True) if may}

    async def handle(self, entries: list[Entry], lane: GroupConsumer | None = None, fence: Fence | None = None) -> None:
        """Execute one batch (see the module docstring for the steps).

        Decisions for one symbol execute in the order they were published: a batch places its
        orders once every earlier batch in flight holding one of its symbols has placed its own,
        and writes its results once those have written theirs (other symbols overlap freely;
        one batch's placing overlaps the other's commit). Batches start in read order, so the
        queue is set up before the first await. ``lane``: the consumer of the batch's partition
        (QT_PARTITIONS > 1; default: the one intent stream), ``fence``: that partition's lease.
        """
        jobs, bad = decode(entries)
        symbols = {job.intent.symbol for job in jobs}
        earlier = {self._last_for_symbol[symbol] for symbol in symbols if symbol in self._last_for_symbol}
        loop = asyncio.get_running_loop()
        turn = _Turn(loop.create_future(), loop.create_future())
        for symbol in symbols:
            self._last_for_symbol[symbol] = turn
        try:
            if fence is None and jobs:
                fence = await self._consumer_fence(lane or self.consumer)
            await self._execute(jobs, bad, earlier, turn, lane or self.consumer, fence)
        finally:
            for step in (turn.placed, turn.committed):
                if not step.done():
                    step.set_result(None)
            for symbol in symbols:
                if self._last_for_symbol.get(symbol) is turn:
                    del self._last_for_symbol[symbol]

    async def _execute(
        self,
        jobs: list[Job],
        bad: list[tuple[Entry, DecodeError]],
        earlier: set[_Turn],
        turn: _Turn,
        lane: GroupConsumer,
        fence: Fence | None,
    ) -> None:
        for entry, exc in bad:
            await lane.dead_letter([entry], f"undecodable trade intent: {exc.reason}", exc.field)
        results: dict[str, ExecutionResult] = {}

        redelivered = [job for job in jobs if job.entry.redelivered]
        if redelivered:
            existing = await self.exchange.fetch_orders([job.coid for job in redelivered])
            for job in redelivered:
                if job.coid in existing:
                    results[job.entry.id] = result_from_outcome(job, existing[job.coid], self.exchange.name)

        now = self.clock()
        todo = [job for job in jobs if job.entry.id not in results]
        batch = [(job.intent, job.env.timestamp) for job in todo]
        symbols = gov.symbols_to_price(batch, now, self.limits)
        prices = await self.exchange.last_prices(symbols) if symbols else {}
        gated: list[Job] = []
        for job, verdict in zip(todo, gov.review(batch, prices, now, self.limits), strict=True):
            if verdict.status is None:
                gated.append(job)
            else:
                results[job.entry.id] = result_for(job, verdict.status, verdict.reason or "", verdict.detail)

        # Orders found at the exchange by the look-up above reached it; so did those placed below
        # unless the exchange says they never left (the kill switch, read again right before each
        # order: turned on since the gate, it stops the rest of an approved batch).
        sent = {job.entry.id for job in redelivered if job.coid in existing} if redelivered else set()
        # Rules of the book and the throttle judge a symbol's intents in publish order: after every
        # earlier batch holding it placed. The other rules do not depend on order: the gate overlaps
        # the earlier batches' placing, and only this batch's own placing waits for them.
        placed_before = [before.placed for before in earlier]
        if placed_before and self.governor.ordered:
            await asyncio.wait(placed_before)
            placed_before = []
        while gated:
            gated = await self._gate_and_place(gated, prices, results, sent, placed_before, lane, fence)
            placed_before = []
        turn.placed.set_result(None)

        if earlier:
            await asyncio.wait([before.committed for before in earlier])
        done = [(job, results[job.entry.id]) for job in jobs if job.entry.id in results]
        if lane is self.consumer:
            await self.commit(done, sent)  # the one intent stream: the call as it always was
        else:
            await self.commit(done, sent, stream=lane.stream)

    async def _gate_and_place(
        self,
        gated: list[Job],
        prices: Mapping[str, Decimal],
        results: dict[str, ExecutionResult],
        sent: set[str],
        placed_before: list[asyncio.Future[None]],
        lane: GroupConsumer,
        fence: Fence | None,
    ) -> list[Job]:
        """Gate the jobs, place the approved orders, note every outcome; the jobs left waiting for the rate.

        Waiting jobs are gated again after the wait the throttle names, unless their decision grows
        too old meanwhile (EXPIRED). Approved orders leave at once, so the rate holds at the exchange.
        """
        now = self.clock()
        candidates = [candidate(job, prices, None if lane is self.consumer else lane.stream) for job in gated]
        gate = await self.governor.gate(candidates, now, lane.consumer, stream=lane.stream, fence=fence)
        approved, waiting = [], []
        for job, answer in zip(gated, gate.answers, strict=True):
            if answer.verdict == "APPROVED":
                approved.append(job)
            elif answer.verdict == risk.Verdict.THROTTLED:
                waiting.append(job)
            elif answer.verdict != gov.GONE:
                results[job.entry.id] = result_for(job, "REJECTED", Reason(answer.verdict), answer.detail)
        requests = [order_request(job) for job in approved]
        if requests:  # on a cluster the approvals must survive a failover before the orders leave (README)
            await require_replicated(
                self.redis, lane.stream, self.settings.cluster_replicas, self.settings.cluster_replica_wait_ms, "orders"
            )
        if placed_before:
            await asyncio.wait(placed_before)
        outcomes = await self.exchange.place_orders(requests, guard=gov.send_guards(fence)) if requests else []
        gone = 0
        for job, outcome in zip(approved, outcomes, strict=True):
            if outcome.sent:
                sent.add(job.entry.id)
                results[job.entry.id] = result_from_outcome(job, outcome, self.exchange.name)
            elif outcome.reason == gov.GONE:
                # The batch changed hands since the gate (this process was frozen, cut off): the partition's
                # new holder, or the consumer that claimed the intent, gives it its one order and result; a
                # result from us could contradict what it did (filled, refused, expired), so none is written.
                gone += 1
            else:
                results[job.entry.id] = result_not_sent(job, outcome)
        if gone:
            lost = fence.lost if fence else "taken over"
            log.warning("partition_lost_before_orders", stream=lane.stream, intents=gone,
                        effect=f"not sent ({lost}); their new owner handles them")  # fmt: skip
        if gone or any(answer.verdict == gov.GONE for answer in gate.answers):
            lane.recheck_own()  # those still ours (a fence moved for others' sake) are handled again at once
        if not waiting:
            return []
        log.info("throttled", intents=len(waiting), wait_s=gate.wait.total_seconds())
        await self.sleep(gate.wait.total_seconds())
        later = self.clock()
        still = []
        for job in waiting:
            if gov.is_expired(job.intent, job.env.timestamp, later, self.limits.max_age):
                results[job.entry.id] = result_for(job, "EXPIRED", Reason.EXPIRED, throttle_expiry(self.limits))
            else:
                still.append(job)
        return still

    async def commit(
        self, done: list[tuple[Job, ExecutionResult]], sent: Collection[str] = (), *, stream: str | None = None
    ) -> None:
        """Commit a batch's results (``Committer.commit``, at this stage's clock) and count them."""
        if not done:
            return
        await self.committer.commit(done, sent, self.clock(), stream=stream)
        for _job, result in done:
            self.totals[result.status] += 1
        if self.metrics is not None:
            self.metrics.results(
                keys.EXECUTION,
                [(result.status, result.reason, job.intent.decision_ts or job.env.timestamp) for job, result in done],
                self.clock().timestamp(),
            )


async def orders_may_exist(redis: Redis, exchange: str, client_order_ids: list[str]) -> list[bool]:
    """Per client order id: whether its order may exist (the paper exchange holds it, or a send to
    ``exchange`` was recorded). Such an intent is finished only by execution, which looks it up first."""
    if not client_order_ids:
        return []
    # Both kinds of record are strings (a record of the intent's order exists until it has a result).
    found = await redis.mget(
        [keys.paper_order(coid) for coid in client_order_ids]
        + [keys.exchange_sent(exchange, coid) for coid in client_order_ids]
    )
    count = len(client_order_ids)
    return [paper is not None or sent is not None for paper, sent in zip(found[:count], found[count:], strict=True)]


def replay_refusal(redis: Redis, exchange: str) -> Refusal:
    """The check ``dlq replay`` runs: an intent whose order may exist must not go back.

    Back on the stream it would get a new id, hence a new client order id, and a second order.
    """

    async def refuse(dead_id: str, payload: dict[str, object]) -> str | None:
        raw = payload.get("raw")
        raw = raw if isinstance(raw, dict) else {}
        coid = client_order_id(str(payload.get("entry_id", "")), raw.get("trace_id", ""), raw.get("correlation_id", ""))
        if (await orders_may_exist(redis, exchange, [coid]))[0]:
            return (
                f"dead-letter entry {dead_id} is an intent whose order {coid} may exist at the exchange; "
                "replaying it would place a second order. Check the order, then remove the entry with XDEL"
            )
        return None

    return refuse
