"""Partitions of a stream (QT_PARTITIONS > 1), each read by one consumer process at a time, under a lease.

The router writes each intent to the partition its symbol hashes to (``keys.partition_of``), so the
intents of one symbol sit in one stream, in publish order. An execution process reads a partition only
while it holds the partition's lease (``keys.partition_lease``: "<consumer> <token>", with a time to live of
QT_PARTITION_LEASE_S, renewed every third of it):

- the read is a script that checks the lease first (``partition.lua``): a process that lost its lease (died,
  paused past the time to live, cut off from the server) reads nothing new;
- the gate checks it again before approving anything (``Fence``): a batch read before the lease changed
  hands is GONE there, neither approved nor refused, and left to the new holder;
- a process that takes a partition over first claims every entry still pending on the group's other
  consumers (read before the lease changed hands) and handles those, oldest first, before anything new; an
  order the old holder had already sent is found by its client order id, never placed twice. So a symbol's
  intents execute in publish order across crashes, pauses and take-overs;
- processes announce themselves (``keys.PARTITION_MEMBERS``, scored by the server's time at each renewal)
  and each holds at most its fair share (partitions / live processes, rounded up): a process that joins gets
  partitions as the others give back their surplus between batches, and the leases of one that died expire.

The layout is recorded (``keys.PARTITION_LAYOUT``): a router or execution started with another QT_PARTITIONS
while the recorded layout's streams still hold unfinished entries refuses to start (``check_layout``). Its
streams would be read by no one, or a symbol's old intents would run beside its new ones, out of order.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import TRANSIENT_ERRORS, Entry, GroupConsumer, sleep_or_stop, until_reachable
from quantum_trader.errors import ConfigError
from quantum_trader.logs import get_logger
from quantum_trader.scripts import register
from quantum_trader.settings import Settings

log = get_logger("partitions")
IDLE_S = 0.02  # between two rounds of reads that found nothing (the fenced read cannot block)
LOST = -1


@dataclass(frozen=True, slots=True)
class Fence:
    """A partition's lease as this process holds it: nothing is approved once ``key`` holds anything else."""

    key: str
    value: str
    lost: str = "the partition's lease changed hands"  # what it means once ``key`` holds anything else


PartitionHandler = Callable[[list[Entry], GroupConsumer, Fence], Awaitable[None]]


async def _in_lane(handler: PartitionHandler, lane: GroupConsumer, fence: Fence, batch: list[Entry]) -> None:
    await handler(batch, lane, fence)


def fair_share(partitions: int, live: int) -> int:
    """How many partitions one of ``live`` processes may hold (pure)."""
    return math.ceil(partitions / max(1, live))


def preference(name: str, partitions: int) -> list[int]:
    """The order a process tries partitions in: from a place its name hashes to, so processes start apart (pure)."""
    start = keys.partition_of(name, partitions)
    return [(start + step) % partitions for step in range(partitions)]


class Partitioned:
    """The partitions of one stream this process holds, read in turn (see the module docstring)."""

    def __init__(self, redis: Redis, settings: Settings, service: str, stream: str, group: str) -> None:
        self.redis = redis
        self.partitions = settings.partitions
        self.ttl_ms = int(settings.partition_lease_s * 1000)
        self.name = settings.consumer_name(service)
        self.service = service
        self.members = keys.partition_members(service)
        # A new token each start: a restarted process is a new holder, never mistaken for its former self.
        self.holds = f"{self.name} {secrets.token_hex(8)}"
        self.group = group
        self.lanes = [
            GroupConsumer.for_stage(redis, settings, service, keys.partition_stream(stream, k, self.partitions), group)
            for k in range(self.partitions)
        ]
        for lane in self.lanes:
            lane.claim_idle_ms = 2**31 - 1  # no idle claims: a take-over claims what the old holder left, at once
        self.streams = [lane.stream for lane in self.lanes]
        self.owned: dict[int, float] = {}  # partition -> until when (monotonic) our lease surely holds
        self._fresh: set[int] = set()  # taken over, the old holder's pending entries not yet claimed
        self._script = register(redis, "partition")
        self._next_tick = 0.0

    async def run(self, handler: PartitionHandler, stop: asyncio.Event) -> None:
        """Hold a fair share of the partitions and handle their entries until ``stop``; give them back at the end."""
        for lane in self.lanes:
            await until_reachable(lane.setup, stop, f"consumer group of {lane.stream}")
        backoff = 0.1
        try:
            task = asyncio.current_task()
            while not stop.is_set():
                if task is not None and task.cancelling():
                    # A cancellation some library call swallowed (it happens on Python 3.11) ends the loop here.
                    raise asyncio.CancelledError
                try:
                    await self.tick()
                    busy = False
                    for partition in sorted(self.owned):
                        if stop.is_set():
                            break
                        batch = await self._next(partition)
                        if batch:
                            lane = self.lanes[partition]
                            fence = Fence(keys.partition_lease(partition, self.service), self.holds)
                            await lane.process(functools.partial(_in_lane, handler, lane, fence), batch)
                            busy = True
                    if not busy:
                        await sleep_or_stop(stop, IDLE_S)
                    backoff = 0.1
                except TRANSIENT_ERRORS as exc:
                    for lane in self.lanes:
                        lane.recheck_own()  # a failed batch stays pending: ours, handled first when we retry
                    log.error("batch_retry", stream=self.streams[0], error=str(exc), retry_in_s=backoff)
                    await sleep_or_stop(stop, backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await self.release_all()

    async def tick(self, *, force: bool = False) -> None:
        """Every third of the lease: announce this process, renew its leases, give back or take its fair share."""
        began = time.monotonic()
        if not force and began < self._next_tick:
            return
        self._next_tick = began + self.ttl_ms / 3000
        seconds, micros = await self.redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self.members, {self.name: now_ms})
            pipe.zremrangebyscore(self.members, "-inf", f"({now_ms - self.ttl_ms}")
            pipe.zcard(self.members)
            *_ignored, live = await pipe.execute()
        until = began + self.ttl_ms / 1000 * 0.9  # what the server counts from is a little later than ``began``
        for partition in list(self.owned):
            if int(await self._call("renew", partition)) == LOST:
                self._lose(partition, "renew")
            else:
                self.owned[partition] = until
        share = fair_share(self.partitions, int(live))
        for partition in sorted(self.owned, reverse=True)[: max(0, len(self.owned) - share)]:
            await self._call("drop", partition)  # between batches: nothing of it is in hand
            del self.owned[partition]
            log.info("partition_released", partition=partition, consumer=self.name, share=share, live=int(live))
        for partition in preference(self.name, self.partitions):
            if len(self.owned) >= share:
                break
            if partition in self.owned or int(await self._call("take", partition)) != 1:
                continue
            self.owned[partition] = until
            self._fresh.add(partition)
            log.info("partition_taken", partition=partition, consumer=self.name, share=share, live=int(live))

    async def release_all(self) -> None:
        """Give every lease back (a clean stop): the others take the partitions over at their next renewal."""
        for partition in list(self.owned):
            try:
                await self._call("drop", partition)
            except TRANSIENT_ERRORS as exc:
                log.warning("partition_release_failed", partition=partition, error=str(exc))
        self.owned.clear()
        try:
            await self.redis.zrem(self.members, self.name)  # the others' shares grow at their next renewal
        except TRANSIENT_ERRORS as exc:
            log.warning("partition_leave_failed", error=str(exc))

    async def _next(self, partition: int) -> list[Entry]:
        """The partition's next batch: what the old holder left (after a take-over), our own pending, then new."""
        if time.monotonic() >= self.owned[partition]:
            return []  # not renewed in time (a pause): read nothing until the lease is renewed or lost
        lane = self.lanes[partition]
        if partition in self._fresh:
            claimed = await self._claim_all(lane)
            self._fresh.discard(partition)
            lane.recheck_own()
            if claimed:
                log.info("partition_pending_claimed", partition=partition, count=claimed, consumer=self.name)
        own = await lane.own_first()
        if own:
            return own
        reply = await self._call("read", partition, count=lane.count, consumer=lane.consumer)
        if reply == LOST:
            self._lose(partition, "read")
            return []
        if not reply:
            return []
        return [Entry(entry_id, dict(zip(flat[::2], flat[1::2], strict=True))) for entry_id, flat in reply[0][1]]

    async def _claim_all(self, lane: GroupConsumer) -> int:
        """Every entry pending on the group's other consumers becomes ours (they were read before the lease
        changed hands); returns how many."""
        start, claimed = "0-0", 0
        while True:
            reply = await self.redis.xautoclaim(
                lane.stream, self.group, lane.consumer, min_idle_time=0, start_id=start, count=lane.count
            )
            start, entries = str(reply[0]), reply[1]
            claimed += len(entries)
            if start == "0-0":
                return claimed

    async def _call(self, op: str, partition: int, *, count: int = 0, consumer: str = "") -> Any:
        size = count if op == "read" else self.ttl_ms
        return await self._script(
            keys=[keys.partition_lease(partition, self.service), self.streams[partition]],
            args=[op, self.holds, size, self.group, consumer],
        )

    def _lose(self, partition: int, when: str) -> None:
        self.owned.pop(partition, None)
        self._fresh.discard(partition)
        log.warning("partition_lost", partition=partition, consumer=self.name, at=when,
                    effect="another process holds its lease: nothing more is read or approved here")  # fmt: skip


def layout_streams(settings: Settings, partitions: int) -> list[tuple[str, str]]:
    """(stream, group) of every stream the router and execution read only under ``partitions`` (pure): the one
    intent stream with one partition; else the intent partitions and the decision partitions."""
    if partitions <= 1:
        return [(settings.intent_stream, settings.execution_group)]
    return [
        *((keys.partition_stream(settings.intent_stream, k, partitions), settings.execution_group)
          for k in range(partitions)),
        *((keys.partition_stream(settings.decision_stream, k, partitions), settings.router_group)
          for k in range(partitions)),
    ]  # fmt: skip


def layout_problem(partitions: int, recorded: int, unfinished: dict[str, int]) -> str | None:
    """Why a process with QT_PARTITIONS=``partitions`` must not start, or None (pure). ``unfinished``: entries
    not yet acknowledged (or not yet read) by their group, per stream of the ``recorded`` layout."""
    held = {stream: count for stream, count in unfinished.items() if count}
    if partitions == recorded or not held:
        return None
    shown = ", ".join(f"{stream} ({count})" for stream, count in sorted(held.items())[:4])
    more = f" and {len(held) - 4} more" if len(held) > 4 else ""
    return (
        f"QT_PARTITIONS={partitions}, but the pipeline last ran with QT_PARTITIONS={recorded} and its streams still "
        f"hold unfinished entries: {shown}{more}. Under {partitions} partitions no one would read them, or a "
        f"symbol's old intents would run beside its new ones. Start with QT_PARTITIONS={recorded} until "
        "`quantum-trader status` shows those streams with nothing pending or lagging, then change it"
    )


async def check_layout(redis: Redis, settings: Settings) -> None:
    """Refuse to start (ConfigError) under another QT_PARTITIONS while the recorded layout has unfinished
    entries; otherwise record this one. Run by the router and execution before they read anything."""
    raw = await redis.get(keys.PARTITION_LAYOUT)
    recorded = int(raw) if raw and str(raw).isdigit() else 1  # none yet: the seed's one intent stream
    if recorded != settings.partitions:
        unfinished = {stream: await _unfinished(redis, stream, group) for stream, group in
                      layout_streams(settings, recorded)}  # fmt: skip
        problem = layout_problem(settings.partitions, recorded, unfinished)
        if problem is not None:
            raise ConfigError(problem)
        log.info("partition_layout_changed", was=recorded, now=settings.partitions)
    await redis.set(keys.PARTITION_LAYOUT, str(settings.partitions))


async def _unfinished(redis: Redis, stream: str, group: str) -> int:
    """Entries of ``stream`` its ``group`` has pending, plus whether any is still unread (0 when neither)."""
    if not await redis.exists(stream):
        return 0
    found = next((g for g in await redis.xinfo_groups(stream) if g["name"] == group), None)
    if found is None:
        return int(await redis.xlen(stream))  # never read by the group: everything is unread
    unread = await redis.xrange(stream, min=f"({found['last-delivered-id']}", max="+", count=1)
    return int(found["pending"]) + len(unread)
