"""Consumer groups done once, for every stage.

A ``GroupConsumer`` reads batches (XREADGROUP COUNT n BLOCK t), hands them to the
stage's handler, which acknowledges atomically with its own writes, and between
reads reclaims entries that a dead consumer held (XPENDING IDLE + XCLAIM, so the
delivery count is known). It stops after the batch in hand when asked to.

One entry never stops the others: a batch whose handler fails for a reason that is not
the server's (any exception but a server, network or transient exchange error) is
handled again entry by entry, and the entry that still fails alone goes to the
dead-letter stream with its raw fields and the error, on that same delivery. A batch
that fails because the server or the exchange is unreachable is retried whole and never
set aside. Entries delivered more than ``max_deliveries`` times (their consumers kept
dying, or outages kept interrupting them) are tried together once more, then each alone;
one the stage dies on alone twice is set aside.

One piece: reading, reclaiming, isolating a bad entry and setting it aside are one state
machine over the same pending list; split across files, each half would have to trust the
other's invariants without seeing them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import TransientError
from quantum_trader.events import DEAD_LETTER, MAX_FIELD_CHARS, Fields, envelope, printable, record_fields
from quantum_trader.logs import get_logger
from quantum_trader.scripts import pack, register
from quantum_trader.settings import Settings

T = TypeVar("T")
# The server (or the slot's primary) cannot answer now: what a restart or a cluster's failover looks like
# (a slot moved under a pipeline whose map of the cluster is stale answers MOVED or ASK: its next try has
# the new map).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ClusterError, TryAgainError, SlotNotCoveredError, MovedError,
               AskError)  # fmt: skip
log = get_logger("bus")

# Failures that are not the entry's: the batch stays pending and is retried whole.
TRANSIENT_ERRORS = (RedisError, OSError, TransientError)
# Times a stage may die while handling one suspect entry alone before it is set aside.
SUSPECT_TRIES = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read by a consumer; ``deliveries`` is 1 on first delivery.

    ``retried`` marks an entry handled again after its batch failed in this process.
    """

    id: str
    fields: Fields
    deliveries: int = 1
    retried: bool = False

    @property
    def redelivered(self) -> bool:
        """Handled before (by a consumer that died, or a failed batch): its effects may exist."""
        return self.deliveries > 1 or self.retried


Handler = Callable[[list["Entry"]], Awaitable[None]]


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"ms-seq"`` -> (ms, seq) for ordering."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    """The smallest id greater than ``entry_id``."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}"


async def ensure_group(redis: Redis, stream: str, group: str, start: str = "0") -> bool:
    """Create the group (and the stream) when missing. True when it was created."""
    try:
        await redis.xgroup_create(stream, group, id=start, mkstream=True)
        return True
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise


def dead_letter_fields(
    *, stream: str, group: str, entry: Entry, reason: str, field_name: str = "", source: str = "bus"
) -> Fields:
    """A dead-letter entry: the envelope plus the reason and the raw entry, nothing lost.

    ``raw`` is the entry as printable text (an oversize field cut, with its size and digest);
    ``raw_base64`` holds the exact bytes of every field that was not UTF-8.
    """
    raw, exact = record_fields(entry.fields)
    payload = {
        "stream": stream,
        "group": group,
        "entry_id": entry.id,
        "deliveries": entry.deliveries,
        "reason": printable(reason),
        "field": printable(field_name, MAX_FIELD_CHARS),
        "raw": raw,
        "raw_base64": exact,
    }
    fields = envelope(
        DEAD_LETTER,
        payload,
        trace_id=printable(entry.fields.get("trace_id", ""), MAX_FIELD_CHARS),
        correlation_id=printable(entry.fields.get("correlation_id", ""), MAX_FIELD_CHARS),
        source=source,
    )
    fields["reason"] = printable(reason, MAX_FIELD_CHARS)
    fields["origin_stream"] = stream
    fields["origin_id"] = entry.id
    return fields


@dataclass
class GroupConsumer:
    """Batch consumer of one stream in one group, shared by every stage."""

    redis: Redis
    stream: str
    group: str
    consumer: str
    dead_letter_stream: str
    batch_size: int = 1000
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    claim_every_s: float = 5.0
    depth: int = 1
    # Ids among the given entries that may have acted outside (an order sent): never set aside for the
    # stage's deaths alone, since only the stage can finish them (execution's order look-up).
    must_finish: Callable[[list[Entry]], Awaitable[set[str]]] | None = None
    # Entry id -> (hash, field): what the stage keeps of an entry until its outcome (execution: the gate's order in
    # flight), deleted with the entry's dead letter, the outcome that writes no result: nothing else would.
    record_of: Callable[[str], tuple[str, str]] | None = None
    _recheck_own: bool = field(default=True, init=False)
    _last_claim: float = field(default=0.0, init=False)
    # Suspects whose last lone try failed for a transient reason: their next try is not counted.
    _retrying: set[str] = field(default_factory=set, init=False)
    # Entries per read after a timeout (0 = batch_size): huge entries come in smaller batches.
    _limit: int = field(default=0, init=False)
    _dead_letter: AsyncScript | None = field(default=None, init=False)

    @property
    def count(self) -> int:
        """Entries the next read or claim asks for."""
        return self._limit or self.batch_size

    @classmethod
    def for_stage(cls, redis: Redis, settings: Settings, service: str, stream: str, group: str) -> GroupConsumer:
        """The consumer of one stage, tuned by the settings (batch, block, claim, poison limit)."""
        return cls(
            redis,
            stream,
            group,
            settings.consumer_name(service),
            settings.dead_letter_stream,
            batch_size=settings.batch_size,
            block_ms=settings.block_ms,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
            depth=settings.pipeline_depth,
        )

    async def setup(self) -> None:
        """Create the group if needed."""
        await ensure_group(self.redis, self.stream, self.group)

    async def read_new(self, block_ms: int | None = None, *, wait: bool = True) -> list[Entry]:
        """Up to ``batch_size`` entries never delivered to the group, blocking up to ``block_ms``.

        ``wait=False`` returns at once when nothing is there (a server times blocked reads
        out on its cron tick, ~100 ms, however short the block asked for).
        """
        reply = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=self.count,
            block=(self.block_ms if block_ms is None else block_ms) if wait else None,
        )
        if not reply:
            return []
        return [Entry(entry_id, fields) for entry_id, fields in reply[0][1]]

    async def claim(self, min_idle_ms: int) -> list[Entry]:
        """Take over anyone's pending entries idle at least ``min_idle_ms`` (their consumer seems dead)."""
        pending = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=self.count, idle=min_idle_ms
        )
        if not pending:
            return []
        counts = {item["message_id"]: int(item["times_delivered"]) + 1 for item in pending}
        owners = sorted({str(item["consumer"]) for item in pending} - {self.consumer})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xclaim(self.stream, self.group, self.consumer, min_idle_ms, list(counts))
            for owner in owners:
                # With the claim, in one step: an owner only frozen (not dead) sends none of the orders it
                # approved for these entries once it wakes (execution reads its fence right before they leave).
                pipe.incr(keys.consumer_fence(self.stream, self.group, owner))
            claimed = (await pipe.execute())[0]
        # An id XCLAIM does not return is not ours to touch: another consumer took it first (its
        # idle time was reset), or it was deleted (the server then drops it from the pending list
        # itself, Redis >= 7). Acknowledging it would lose an intent another consumer is executing.
        entries = [Entry(entry_id, fields, counts[entry_id]) for entry_id, fields in claimed if fields is not None]
        if len(entries) < len(counts):
            log.debug("claim_skipped", stream=self.stream, count=len(counts) - len(entries))
        return entries

    async def process(self, handler: Handler, batch: list[Entry]) -> None:
        """Handle one batch so that no entry can stop the others (see the module docstring)."""
        suspects = [entry for entry in batch if entry.deliveries > self.max_deliveries]
        normal = [entry for entry in batch if entry.deliveries <= self.max_deliveries] if suspects else batch
        if normal:
            await self._isolating(handler, normal)
        if suspects:
            await self._suspects(handler, suspects)

    async def _isolating(self, handler: Handler, batch: list[Entry]) -> None:
        try:
            await handler(batch)
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {printable(str(exc), 500)}"
            if len(batch) == 1:
                await self.dead_letter(batch, f"the {self.stream} entry could not be handled ({error})")
                return
            log.error("batch_failed_handling_entries_alone", stream=self.stream, count=len(batch), error=error)
            for entry in batch:
                # As a redelivery: the stage first looks up what the failed attempt may have done.
                await self._isolating(handler, [Entry(entry.id, entry.fields, entry.deliveries, retried=True)])

    async def _suspects(self, handler: Handler, entries: list[Entry]) -> None:
        """Entries delivered too often: each try is counted in the server before it starts.

        Never tried yet: handled together (outages inflate delivery counts without any entry
        being at fault). Tried before (a stage died meanwhile): each alone. An entry the stage
        died on alone ``SUSPECT_TRIES`` times is set aside. A transient failure is not counted.
        """
        key = keys.suspects(self.stream, self.group)
        await self._forget_finished_suspects(key)
        started = [int(n or 0) for n in await self.redis.hmget(key, [entry.id for entry in entries])]
        together = [entry for entry, n in zip(entries, started, strict=True) if n == 0]
        alone = [(entry, n) for entry, n in zip(entries, started, strict=True) if n > 0]
        try:
            if together:
                await self._try_suspects(handler, key, together)
            kept = await self._kept([entry for entry, n in alone if n > SUSPECT_TRIES])
            for entry, n in alone:
                if n > SUSPECT_TRIES and entry.id not in kept:
                    reason = (
                        f"delivered {entry.deliveries} times; the stage stopped {n - 1} times while handling it alone"
                    )
                    await self.dead_letter([entry], reason)
                    await self.redis.hdel(key, entry.id)
                else:
                    await self._try_suspects(handler, key, [entry])
        except TRANSIENT_ERRORS:
            self._retrying.update(entry.id for entry in entries)
            raise

    async def _kept(self, entries: list[Entry]) -> set[str]:
        """The ids of ``entries`` due to be set aside that must be handled again instead (``must_finish``)."""
        if not entries or self.must_finish is None:
            return set()
        kept = await self.must_finish(entries)
        for entry in entries:
            if entry.id in kept:
                log.error(
                    "suspect_kept",
                    stream=self.stream,
                    entry_id=entry.id,
                    deliveries=entry.deliveries,
                    effect="the stage keeps dying while it handles this entry alone, but it may have acted outside "
                    "(an order sent): it is handled again, never set aside",
                    fix="find why the process dies (its log, the OOM killer, a watchdog); the entry stays pending",
                )
        return kept

    async def _forget_finished_suspects(self, key: str) -> None:
        """Drop the tries counted for entries older than the group's oldest pending one: acknowledged, they never
        come back. A try whose commit landed just before its process died, or whose reply was lost, never
        deletes its own count, and every new suspect moves the key's expiry: such counts would pile up forever."""
        summary = await self.redis.xpending(self.stream, self.group)
        if not int(summary["pending"]):
            return
        oldest = str(summary["min"])
        finished = [entry_id for entry_id in await self.redis.hkeys(key) if _older(entry_id, oldest)]
        if finished:
            await self.redis.hdel(key, *finished)

    async def _try_suspects(self, handler: Handler, key: str, entries: list[Entry]) -> None:
        counted = [entry.id for entry in entries if entry.id not in self._retrying]
        self._retrying.difference_update(entry.id for entry in entries)
        if counted:
            async with self.redis.pipeline(transaction=True) as pipe:
                for entry_id in counted:
                    pipe.hincrby(key, entry_id, 1)
                pipe.expire(key, 7 * 86_400)
                await pipe.execute()
        await self._isolating(handler, entries)
        await self.redis.hdel(key, *[entry.id for entry in entries])

    async def dead_letter(self, entries: list[Entry], reason: str, field_name: str = "") -> None:
        """Set entries aside on the dead-letter stream and acknowledge them, atomically.

        An entry another consumer has finished meanwhile is left alone: it has its outcome.
        """
        if not entries:
            return
        items = []
        for entry in entries:
            fields = dead_letter_fields(
                stream=self.stream, group=self.group, entry=entry, reason=reason, field_name=field_name
            )
            items.append([entry.id, [part for pair in fields.items() for part in pair]])
        script_keys = [self.stream, self.dead_letter_stream]
        if self.record_of is not None:
            records = [self.record_of(entry.id) for entry in entries]
            script_keys.append(records[0][0])
            for item, (_hash, record) in zip(items, records, strict=True):
                item.append(record)
        if self._dead_letter is None:
            self._dead_letter = register(self.redis, "dead_letter")
        done = {str(entry_id) for entry_id in await self._dead_letter(
            keys=script_keys, args=[self.group, pack(items)]
        )}  # fmt: skip
        for entry in entries:
            if entry.id not in done:
                continue
            log.error(
                "dead_lettered",
                stream=self.stream,
                entry_id=entry.id,
                reason=printable(reason, MAX_FIELD_CHARS),
                trace_id=printable(entry.fields.get("trace_id", ""), MAX_FIELD_CHARS),
                correlation_id=printable(entry.fields.get("correlation_id", ""), MAX_FIELD_CHARS),
            )

    async def own_pending(self) -> list[Entry]:
        """Our own unfinished entries (after a restart or a failed batch), oldest first.

        Read back from this consumer's pending list (XREADGROUP from id 0), which never takes
        an entry another consumer has just claimed, as XCLAIM with no idle time would.
        """
        pending = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=self.count, consumername=self.consumer
        )
        counts = {item["message_id"]: int(item["times_delivered"]) + 1 for item in pending}
        if self._retrying:
            # A suspect no longer pending on us (its lost reply was a success, another consumer took it) never
            # comes back to clear itself: forget it, or the set grows with every outage. Our pending list is
            # in id order: past the end of a full page, an id may still be ours.
            last = str(pending[-1]["message_id"]) if len(pending) >= self.count else None
            self._retrying = {i for i in self._retrying if i in counts or (last is not None and _older(last, i))}
        if not pending:
            return []
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=self.count)
        entries, deleted = [], []
        for entry_id, fields in reply[0][1] if reply else []:
            if fields:
                entries.append(Entry(entry_id, fields, counts.get(entry_id, 2)))
            else:
                deleted.append(entry_id)  # deleted while we held it: nothing left to handle
        if deleted:
            await self.redis.xack(self.stream, self.group, *deleted)
            log.warning("pending_entries_deleted", stream=self.stream, ids=deleted)
        return entries

    async def own_first(self) -> list[Entry]:
        """Our own unfinished entries while some may be left (a restart, a failed batch, a take-over), else none."""
        if not self._recheck_own:
            return []
        self._recheck_own = False
        own = await self.own_pending()
        if own:
            self._recheck_own = True
        return own

    def recheck_own(self) -> None:
        """Look at our own pending entries again before anything new (a batch failed, entries were claimed)."""
        self._recheck_own = True

    async def next_batch(self, *, in_flight: bool = False) -> list[Entry]:
        """Our own unfinished entries first, then stale ones from dead consumers, then new ones.

        With batches ``in_flight``, our own pending entries are those batches: not taken again.
        """
        if not in_flight:
            own = await self.own_first()
            if own:
                return own
        now = time.monotonic()
        if now - self._last_claim >= self.claim_every_s:
            self._last_claim = now
            stale = await self.claim(self.claim_idle_ms)
            if stale:
                log.info("reclaimed", stream=self.stream, group=self.group, count=len(stale))
                return stale
        return await self.read_new()

    async def run(
        self,
        handler: Handler,
        stop: asyncio.Event,
        on_idle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Consume until ``stop`` is set; the batch in hand is always finished first.

        A server error or a transient exchange error leaves the batch pending; it is
        retried (and counted towards the poison limit) after a back-off.
        """
        await until_reachable(self.setup, stop, f"consumer group of {self.stream}")
        flying: set[asyncio.Future[None]] = set()
        try:
            await self._loop(handler, stop, on_idle, flying)
        finally:
            # Stopping (or failing) finishes the batches in hand; a failed one stays pending.
            await self._settle(flying, "batch_failed_at_stop")

    async def _settle(self, flying: set[asyncio.Future[None]], event: str) -> None:
        """Wait for every batch in flight; a failed one is logged and stays pending."""
        if not flying:
            return
        await asyncio.wait(flying)
        for task in flying:
            if not task.cancelled() and task.exception() is not None:
                log.error(event, stream=self.stream, error=str(task.exception()))
        flying.clear()

    async def _loop(
        self,
        handler: Handler,
        stop: asyncio.Event,
        on_idle: Callable[[], Awaitable[None]] | None,
        flying: set[asyncio.Future[None]],
    ) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                # Up to ``depth`` batches at once: while the server runs one batch's script, this
                # process decodes and prices the next (each batch is atomic on its own).
                if len(flying) >= self.depth:
                    done, _ = await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
                    flying -= done
                    _raise_first(done)
                batch = await self.next_batch(in_flight=bool(flying))
                if batch:
                    if self.depth == 1:
                        await self.process(handler, batch)
                    else:
                        flying.add(asyncio.ensure_future(self.process(handler, batch)))
                else:
                    if flying:
                        done, _ = await asyncio.wait(flying)
                        flying.clear()
                        _raise_first(done)
                    if on_idle is not None:
                        await on_idle()
                backoff = 0.1
                if self._limit:
                    self._limit = min(self.batch_size, self._limit * 2)
            except TRANSIENT_ERRORS as exc:
                if isinstance(exc, (RedisTimeoutError, TimeoutError)):
                    # A reply too big to arrive in time (entries of megabytes) is asked for in halves,
                    # down to one entry, instead of failing the same way forever.
                    self._limit = max(1, self.count // 2)
                # Let the other batches finish (or fail) before retrying from our pending entries.
                await self._settle(flying, "batch_retry")
                # The batch stays pending: the next attempt (ours, or another consumer's after
                # the idle threshold) looks orders up before sending anything.
                self._recheck_own = True
                log.error("batch_retry", stream=self.stream, error=str(exc), retry_in_s=backoff)
                await sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 5.0)
                await _reconnect_group(self)


def _older(entry_id: str, than: str) -> bool:
    """Whether a stream id comes before another; a name that is no stream id (written by hand) never does."""
    try:
        return parse_id(entry_id) < parse_id(than)
    except ValueError:
        return False


def _raise_first(done: set[asyncio.Future[None]]) -> None:
    """Re-raise the first failure among finished batches (the run loop handles it)."""
    for task in done:
        error = task.exception()
        if error is not None:
            raise error


async def _reconnect_group(consumer: GroupConsumer) -> None:
    try:
        await consumer.setup()
    except (RedisError, OSError):
        return


async def until_reachable(step: Callable[[], Awaitable[T]], stop: asyncio.Event, what: str) -> T:
    """``step()``, again after a pause while the stream server cannot answer (restarting, a cluster failing
    over): for the steps a process takes before it handles anything (nothing done yet, so trying again is
    safe). Other errors (a database that cannot be reached, a bad setting) stop the start as before. Gives
    up, raising the last error, once ``stop`` is set."""
    backoff = 0.1
    while True:
        try:
            return await step()
        except UNREACHABLE as exc:
            if stop.is_set():
                raise
            log.error("start_retry", step=what, error=str(exc), retry_in_s=backoff)
            await sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, 5.0)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set: waits that end promptly on shutdown.

    ``asyncio.wait``, not ``wait_for``: on Python 3.11 a cancellation that arrives as ``wait_for`` times
    out is swallowed, and a loop of short sleeps would then never stop.
    """
    if stop.is_set():
        return
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter}, timeout=seconds)
    finally:
        waiter.cancel()


async def publish(redis: Redis, stream: str, entries: list[Fields]) -> list[str]:
    """XADD a batch of entries in one pipelined round trip; returns their ids."""
    async with redis.pipeline(transaction=False) as pipe:
        for fields in entries:
            pipe.xadd(stream, fields)
        return [str(entry_id) for entry_id in await pipe.execute()]


def raw_json(fields: Fields) -> str:
    """Entry fields as JSON, for logs and CLI output."""
    return json.dumps(fields, sort_keys=True)
