"""The consumer-group machinery against a real server."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio

from quantum_trader import keys
from quantum_trader.bus import connection
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, GroupConsumer, publish
from quantum_trader.events import TRADE_INTENT, envelope

STREAM = "test:stream"
GROUP = "test:group"
DLQ = "test:dead"


def consumer(r: Redis, name: str, **kw: object) -> GroupConsumer:
    return GroupConsumer(r, STREAM, GROUP, name, DLQ, **kw)  # type: ignore[arg-type]


def fields(i: int) -> dict[str, str]:
    return envelope(TRADE_INTENT, {"n": i}, trace_id=f"t{i}", correlation_id=f"c{i}", source="test")


async def test_batches_are_read_in_order_and_acked(r: Redis) -> None:
    c = consumer(r, "a", batch_size=40, block_ms=50)
    await c.setup()
    ids = await publish(r, STREAM, [fields(i) for i in range(100)])

    seen: list[str] = []
    while len(seen) < 100:
        batch = await c.read_new()
        assert 0 < len(batch) <= 40
        seen += [e.id for e in batch]
        await r.xack(STREAM, GROUP, *[e.id for e in batch])

    assert seen == ids
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0
    assert await c.read_new() == []


async def test_entries_of_a_dead_consumer_are_reclaimed_by_another(r: Redis) -> None:
    dead = consumer(r, "dead", batch_size=10, block_ms=50)
    alive = consumer(r, "alive", batch_size=10, block_ms=50, claim_idle_ms=50)
    await dead.setup()
    ids = await publish(r, STREAM, [fields(i) for i in range(5)])
    assert len(await dead.read_new()) == 5  # read, then the process "dies" without acking

    assert await alive.claim(60_000) == []  # not idle long enough yet: left alone
    await asyncio.sleep(0.1)
    claimed = await alive.claim(50)

    assert [e.id for e in claimed] == ids
    assert all(e.deliveries == 2 for e in claimed)
    info = {c["name"]: c["pending"] for c in await r.xinfo_consumers(STREAM, GROUP)}
    assert info == {"dead": 0, "alive": 5}


async def test_a_restarted_consumer_finishes_its_own_pending_entries_first(r: Redis) -> None:
    first = consumer(r, "exec-1", batch_size=10, block_ms=50)
    await first.setup()
    ids = await publish(r, STREAM, [fields(i) for i in range(3)])
    await first.read_new()

    restarted = consumer(r, "exec-1", batch_size=10, block_ms=50)
    batch = await restarted.next_batch()
    assert [e.id for e in batch] == ids
    assert [e.deliveries for e in batch] == [2, 2, 2]


class Died(BaseException):
    """Stands for the process dying inside the handler (nothing after it runs)."""


async def test_an_entry_the_stage_keeps_dying_on_is_set_aside_after_two_lone_tries(r: Redis) -> None:
    c = consumer(r, "a", batch_size=10, block_ms=50, max_deliveries=3)
    await c.setup()
    [poison_id, good_id] = await publish(r, STREAM, [fields(1), fields(2)])
    await c.read_new()  # delivery 1: the process dies
    for expected in (2, 3):
        entries = await c.own_pending()
        assert [e.deliveries for e in entries] == [expected, expected]
    handled: list[list[str]] = []

    async def dies_on_poison(batch: list[Entry]) -> None:
        handled.append([e.id for e in batch])
        if any(e.id == poison_id for e in batch):
            raise Died
        await r.xack(STREAM, GROUP, *[e.id for e in batch])

    # Deliveries 4, 5 and 6: suspects. Tried together once, then each alone; the process dies each time.
    for _ in range(3):
        batch = await c.own_pending()
        with pytest.raises(Died):
            await c.process(dies_on_poison, batch)
    assert handled == [[poison_id, good_id], [poison_id], [poison_id]]  # alone after the first death
    batch = await c.own_pending()
    await c.process(dies_on_poison, batch)  # set aside without handling it again; its neighbour flows

    assert handled[3:] == [[good_id]]
    [(_dlq_id, dead)] = await r.xrange(DLQ)
    payload = json.loads(dead["payload"])
    assert dead["origin_id"] == poison_id
    assert "stopped 2 times while handling it alone" in dead["reason"]
    assert payload["raw"] == fields(1) | {"timestamp": payload["raw"]["timestamp"]}
    assert payload["deliveries"] == 7
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0


async def test_an_entry_that_breaks_the_handler_is_set_aside_alone_on_its_first_delivery(r: Redis) -> None:
    c = consumer(r, "a", batch_size=10, block_ms=50)
    await c.setup()
    ids = await publish(r, STREAM, [fields(i) for i in range(5)])
    handled: list[str] = []

    async def breaks_on_two(batch: list[Entry]) -> None:
        if any(e.fields["trace_id"] == "t2" for e in batch):
            raise RecursionError("maximum recursion depth exceeded")
        handled.extend(e.id for e in batch)
        await r.xack(STREAM, GROUP, *[e.id for e in batch])

    await c.process(breaks_on_two, await c.read_new())

    assert handled == [ids[0], ids[1], ids[3], ids[4]]
    [(_dlq_id, dead)] = await r.xrange(DLQ)
    assert dead["origin_id"] == ids[2]
    assert "RecursionError" in dead["reason"]
    assert json.loads(dead["payload"])["deliveries"] == 1
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0


async def test_a_batch_failing_on_the_server_is_retried_whole_never_set_aside(r: Redis) -> None:
    c = consumer(r, "a", batch_size=10, block_ms=20, max_deliveries=2, claim_every_s=0.0)
    ids = await publish(r, STREAM, [fields(i) for i in range(3)])
    stop = asyncio.Event()
    attempts: list[list[str]] = []

    async def server_down_eight_times(batch: list[Entry]) -> None:
        attempts.append([e.id for e in batch])
        if len(attempts) <= 8:
            raise ConnectionError("server unreachable")
        await r.xack(STREAM, GROUP, *[e.id for e in batch])
        stop.set()

    async def fast_sleep(_stop: asyncio.Event, _seconds: float) -> None:
        await asyncio.sleep(0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("quantum_trader.bus.streams.sleep_or_stop", fast_sleep)
        await asyncio.wait_for(c.run(server_down_eight_times, stop), 30)

    assert await r.xlen(DLQ) == 0
    assert sorted({i for attempt in attempts for i in attempt}) == ids
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0


async def test_run_stops_after_the_batch_in_hand(r: Redis) -> None:
    c = consumer(r, "a", batch_size=10, block_ms=20)
    await publish(r, STREAM, [fields(i) for i in range(25)])
    stop = asyncio.Event()
    handled: list[int] = []

    async def handler(batch: list[Entry]) -> None:
        handled.append(len(batch))
        stop.set()  # asked to stop mid-run: this batch still completes
        await r.xack(STREAM, GROUP, *[e.id for e in batch])

    await asyncio.wait_for(c.run(handler, stop), timeout=5)
    assert handled == [10]
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0


async def test_transient_exchange_error_leaves_the_batch_pending_and_retries(r: Redis) -> None:
    from quantum_trader.errors import TransientExchangeError

    c = consumer(r, "a", batch_size=10, block_ms=20)
    [entry_id] = await publish(r, STREAM, [fields(1)])
    stop = asyncio.Event()
    attempts: list[int] = []

    async def handler(batch: list[Entry]) -> None:
        attempts.append(batch[0].deliveries)
        if len(attempts) == 1:
            raise TransientExchangeError("exchange timed out; order state unknown")
        await r.xack(STREAM, GROUP, entry_id)
        stop.set()

    await asyncio.wait_for(c.run(handler, stop), timeout=5)
    assert attempts == [1, 2]  # the same entry again, from our own pending list
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0


async def test_two_batches_in_flight_each_entry_handled_once_even_after_a_failure(r: Redis) -> None:
    c = consumer(r, "a", batch_size=10, block_ms=20, depth=2)
    ids = await publish(r, STREAM, [fields(i) for i in range(60)])
    stop = asyncio.Event()
    handled: list[str] = []
    running, most = 0, 0
    failed = False

    async def handler(batch: list[Entry]) -> None:
        nonlocal running, most, failed
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.05)  # the server's share of a batch: the next one starts meanwhile
            if not failed and batch[0].deliveries == 1 and len(handled) >= 20:
                failed = True
                raise ConnectionError("server went away mid-batch")
            handled.extend(e.id for e in batch)
            await r.xack(STREAM, GROUP, *[e.id for e in batch])
            if len(handled) == len(ids):
                stop.set()
        finally:
            running -= 1

    await asyncio.wait_for(c.run(handler, stop), timeout=10)
    assert most == 2  # batches overlapped
    assert sorted(handled) == sorted(ids)  # the failed batch was retried from pending, nothing twice
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0


async def test_entries_too_big_to_read_in_time_come_in_smaller_batches(r: Redis, clean_url: str) -> None:
    # A client whose socket gives up quickly stands for megabyte entries on a slow link.
    impatient = redis.asyncio.Redis.from_url(clean_url, decode_responses=True, socket_timeout=0.2)
    c = GroupConsumer(impatient, STREAM, GROUP, "a", DLQ, batch_size=500, block_ms=20, claim_every_s=0.0)
    big = fields(0) | {"blob": "x" * (2 << 20)}
    for _ in range(100):
        await r.xadd(STREAM, big)
    stop = asyncio.Event()
    sizes: list[int] = []

    async def handler(batch: list[Entry]) -> None:
        sizes.append(len(batch))
        await impatient.xack(STREAM, GROUP, *[e.id for e in batch])
        if sum(sizes) >= 100:
            stop.set()

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("quantum_trader.bus.streams.sleep_or_stop", _no_sleep)
            await asyncio.wait_for(c.run(handler, stop), 60)
    finally:
        await impatient.aclose()

    assert sum(sizes) == 100
    assert max(sizes) < 100  # the whole stream never arrives in time: asked for in halves
    assert await r.xlen(DLQ) == 0
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0


async def _no_sleep(_stop: asyncio.Event, _seconds: float) -> None:
    await asyncio.sleep(0)


async def test_retaking_own_entries_never_takes_back_one_another_consumer_just_claimed(
    r: Redis, clean_url: str
) -> None:
    slow_client = connection.client(clean_url)
    slow = GroupConsumer(slow_client, STREAM, GROUP, "slow", DLQ, batch_size=10, block_ms=20)
    other = consumer(r, "other", batch_size=10, block_ms=20)
    await slow.setup()
    ids = await publish(r, STREAM, [fields(i) for i in range(4)])
    await slow.read_new()
    await asyncio.sleep(0.05)
    listed = slow_client.xpending_range
    taken: list[Entry] = []

    async def then_other_claims(*args: object, **kwargs: object) -> object:
        found = await listed(*args, **kwargs)  # slow has just listed its own entries ...
        taken.extend(await other.claim(10))  # ... when "other" decides slow is dead and takes them
        return found

    slow_client.xpending_range = then_other_claims
    try:
        retaken = await slow.own_pending()
    finally:
        await slow_client.aclose()

    assert [e.id for e in taken] == ids
    assert retaken == []  # not taken back: "other" is handling them
    info = {c["name"]: c["pending"] for c in await r.xinfo_consumers(STREAM, GROUP)}
    assert info == {"slow": 0, "other": 4}


async def test_an_entry_another_consumer_finished_gets_no_dead_letter(r: Redis) -> None:
    first = consumer(r, "first", batch_size=10, block_ms=20)
    await first.setup()
    [done_id, bad_id] = await publish(r, STREAM, [fields(1), fields(2)])
    batch = await first.read_new()
    await r.xack(STREAM, GROUP, done_id)  # another consumer finished it, with its outcome

    await first.dead_letter(batch, "undecodable")

    [(_id, dead)] = await r.xrange(DLQ)
    assert dead["origin_id"] == bad_id
    assert (await r.xpending(STREAM, GROUP))["pending"] == 0


async def test_own_entries_deleted_while_held_are_dropped_from_pending(r: Redis) -> None:
    c = consumer(r, "a", batch_size=10, block_ms=20)
    await c.setup()
    ids = await publish(r, STREAM, [fields(i) for i in range(3)])
    await c.read_new()
    await r.xdel(STREAM, ids[1])

    assert [e.id for e in await c.own_pending()] == [ids[0], ids[2]]
    assert {p["message_id"] for p in await r.xpending_range(STREAM, GROUP, "-", "+", 10)} == {ids[0], ids[2]}


async def test_entries_whose_counts_outages_inflated_are_still_handled_together(r: Redis) -> None:
    c = consumer(r, "a", batch_size=50, block_ms=20, max_deliveries=2)
    await c.setup()
    ids = await publish(r, STREAM, [fields(i) for i in range(30)])
    await c.read_new()
    for _ in range(4):  # four outages: each retry of the batch counted as a delivery
        await c.own_pending()
    sizes: list[int] = []

    async def handler(batch: list[Entry]) -> None:
        sizes.append(len(batch))
        await r.xack(STREAM, GROUP, *[e.id for e in batch])

    batch = await c.own_pending()
    assert all(e.deliveries > 2 for e in batch)
    await c.process(handler, batch)

    assert sizes == [30]  # one batch, not thirty lone tries
    assert await r.xlen(DLQ) == 0
    assert await r.hlen(keys.suspects(STREAM, GROUP)) == 0
    assert len(ids) == 30


async def test_a_start_step_is_tried_again_while_the_server_cannot_answer_and_only_then() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError as RedisResponseError

    from quantum_trader.bus.streams import until_reachable

    stop = asyncio.Event()
    tries: list[int] = []

    async def down_twice() -> str:
        tries.append(1)
        if len(tries) <= 2:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        return "up"

    assert await until_reachable(down_twice, stop, "test") == "up"
    assert len(tries) == 3

    async def wrong_type() -> str:  # an answer, not an outage: the start stops as before
        raise RedisResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(RedisResponseError):
        await until_reachable(wrong_type, stop, "test")

    async def always_down() -> str:
        stop.set()  # the process is told to stop while the server is still away
        raise RedisConnectionError("down")

    with pytest.raises(RedisConnectionError):
        await until_reachable(always_down, stop, "test")
