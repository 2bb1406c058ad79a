"""Memory never grows forever: after the same wave of traffic, the server and the stages hold what they held
after an earlier one.

Each wave sends the same decisions through the real router and execution (in process, under the real
``Runner``: its trimming passes, heartbeats and reconciliation), fills on the paper exchange, and adds a
duplicate, invalid decisions and undecodable intents. Once a wave is finished and the trimming and expiries
have run, the server's keys, the length of every hash, set, sorted set and stream, the consumer groups and the
server's used memory are the same after wave 2 and after the last wave: a bound, not a rate. So are the
stages' own collections. The stages' clock moves a few minutes per wave, past every time window the rules
keep (throttle, losing exits), and stays inside one UTC day.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from quantum_trader import keys
from quantum_trader.bus import trim
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, GroupConsumer, publish
from quantum_trader.events import Fields
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.publisher import publish_decisions
from quantum_trader.router import Router
from quantum_trader.runner import Runner, input_streams
from quantum_trader.settings import Settings
from tests.pipeline import decision

WAVES = 6
PRICES = {"ETHUSDT": "3000", "SOLUSDT": "150", "BTCUSDT": "60000"}
ROUND_TRIPS = 4  # per symbol and wave: BUY then SELL, so every wave ends flat
# What the server may allocate beyond the same data between two looks (allocator pages, a client's buffers);
# one wave leaks far more than this when a bound is missing (~40 paper order records alone are ~15 KB).
MEMORY_SLACK = 16 * 1024
# Tasks that come and go between batches (a loop's sleep, a lease renewal); a task left per batch is dozens a wave.
TASKS_SLACK = 4


class Clock:
    """The stages' clock: one moment per wave."""

    def __init__(self) -> None:
        today = datetime.now(UTC).replace(hour=1, minute=0, second=0, microsecond=0)
        self.now = today

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Look:
    """What the server and the stages hold once a wave is finished."""

    keys: dict[str, tuple[str, int]]  # name -> (type, length)
    groups: dict[str, tuple[int, int, int]]  # stream -> (groups, consumers, pending)
    used_memory: int  # without the clients' buffers (a function of the connections open at that moment)
    dataset: int
    in_process: dict[str, int]


def wave_decisions(clock: Clock, one_stream: bool) -> tuple[list[Fields], list[Fields]]:
    """(decisions for the decision partitions or the one stream, decisions only the one stream gets)."""
    main: list[Fields] = []
    for symbol in ("ETHUSDT", "SOLUSDT"):
        for n in range(ROUND_TRIPS):
            extra = {"stop_loss": "100", "take_profit": "1000"} if symbol == "SOLUSDT" and n == 0 else {}
            main.append(decision(symbol, "BUY", "0.01", PRICES[symbol], timestamp=clock.now, **extra))
            main.append(decision(symbol, "SELL", "0.01", PRICES[symbol], timestamp=clock.now))
    first = main[0]
    duplicate = decision(
        "ETHUSDT", "BUY", "0.01", PRICES["ETHUSDT"], trace=first["trace_id"], corr=first["correlation_id"],
        timestamp=clock.now,
    )  # fmt: skip
    # A duplicate of a BUY, routed only if its dedup key expired first: never a SELL the book cannot cover.
    main.insert(2, duplicate)
    main += [decision("ETHUSDT", "HOLD", "0.01", PRICES["ETHUSDT"], timestamp=clock.now) for _ in range(2)]  # INVALID
    plain = []
    for _n in range(ROUND_TRIPS):
        plain.append(decision("BTCUSDT", "BUY", "0.001", PRICES["BTCUSDT"], timestamp=clock.now))
        plain.append(decision("BTCUSDT", "SELL", "0.001", PRICES["BTCUSDT"], timestamp=clock.now))
    if one_stream:
        return main + plain, []
    return main, plain


async def added(r: Redis, stream: str) -> int:
    return int((await r.xinfo_stream(stream))["entries-added"]) if await r.exists(stream) else 0


async def until(check: Callable[[], Awaitable[bool]], what: Callable[[], Awaitable[object]]) -> None:
    """Wait for a state (a generous deadline: this is about what is held, not how fast)."""
    for _ in range(1200):
        if await check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"not reached within 30 s: {await what()}")


async def key_lengths(r: Redis) -> dict[str, tuple[str, int]]:
    out = {}
    async for name in r.scan_iter(count=1000):
        kind = await r.type(name)
        size = {
            "stream": r.xlen,
            "hash": r.hlen,
            "set": r.scard,
            "zset": r.zcard,
            "list": r.llen,
            "string": r.strlen,
        }.get(kind)
        if size is None:
            continue  # gone meanwhile
        out[name] = (kind, int(await size(name)))
    return out


async def group_sizes(r: Redis, streams: list[str]) -> dict[str, tuple[int, int, int]]:
    out = {}
    for stream in streams:
        groups = await r.xinfo_groups(stream)
        consumers = sum(int(g["consumers"]) for g in groups)
        out[stream] = (len(groups), consumers, sum(int(g["pending"]) for g in groups))
    return out


def in_process(router: Router, execution: Execution) -> dict[str, int]:
    """The sizes of every collection the stages keep between batches."""
    lanes: list[GroupConsumer] = [router.consumer, execution.consumer]
    sizes = {
        "execution._last_for_symbol": len(execution._last_for_symbol),
        "router._last_batch": int(router._last_batch is not None),
        "trim._held_warned": len(trim._held_warned),
        "tasks": len(asyncio.all_tasks()),
    }
    for stage in (router, execution):
        if stage.partitioned is not None:
            lanes += stage.partitioned.lanes
            sizes[f"{type(stage).__name__}.owned"] = len(stage.partitioned.owned)
            sizes[f"{type(stage).__name__}._fresh"] = len(stage.partitioned._fresh)
    sizes["lanes._retrying"] = sum(len(lane._retrying) for lane in lanes)
    return sizes


async def look(r: Redis, router: Router, execution: Execution) -> Look:
    held = await key_lengths(r)
    memory = await r.info("memory")
    return Look(
        held,
        await group_sizes(r, [name for name, (kind, _n) in held.items() if kind == "stream"]),
        int(memory["used_memory"]) - int(memory["mem_clients_normal"]),
        int(memory["used_memory_dataset"]),
        in_process(router, execution),
    )


async def run_waves(r: Redis, settings: Settings, waves: int = WAVES) -> dict[int, Look]:
    """Send ``waves`` waves through router and execution under a Runner; what is held after waves 2 and last."""
    clock = Clock()
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, mapping=PRICES)
    paper = PaperExchange(
        r, fee_rate=settings.paper_fee_rate, quote_assets=settings.quote_assets,
        starting_balances=settings.paper_balances,
    )  # fmt: skip
    await paper.fund()
    # The book's starting point, as ``paper reset`` records it: the first reconciliation then needs no second look.
    await r.hset(keys.BOOK_BASELINE, mapping={asset: str(amount) for asset, amount in settings.paper_balances.items()})
    router = Router(r, settings, clock=clock)
    execution = Execution(r, settings, paper, clock=clock)
    runner = Runner(r, settings, {keys.ROUTER: router, keys.EXECUTION: execution})
    running = asyncio.create_task(runner.run())
    partitioned = settings.partitions > 1
    bad_streams = execution.partitioned.streams if execution.partitioned is not None else [settings.intent_stream]
    inputs = list(dict.fromkeys(input_streams(router) + input_streams(execution)))
    outcome_streams = (settings.result_stream, settings.rejected_stream, settings.dead_letter_stream)
    sent = {"decisions": 0, "bad": 0}
    looks: dict[int, Look] = {}
    # What the runner writes once at start (the first reconciliation, heartbeats, the leases) is there first.
    started = [
        keys.BOOK_RECONCILED,
        *(keys.heartbeat(name, stage.consumer.consumer) for name, stage in runner.stages.items()),
    ]
    started += (
        [
            keys.partition_lease(k, service)
            for k in range(settings.partitions)
            for service in (keys.ROUTER, keys.EXECUTION)
        ]
        if partitioned
        else []
    )

    async def missing() -> list[str]:
        return [name for name in started if not await r.exists(name)]

    async def all_there() -> bool:
        return not await missing()

    try:
        await until(all_there, missing)
        for wave in range(1, waves + 1):
            clock.now += timedelta(minutes=5)
            main, plain = wave_decisions(clock, one_stream=not partitioned)
            if partitioned:
                await publish_decisions(r, settings, main)
            else:
                await publish(r, settings.decision_stream, main)
            await publish(r, settings.decision_stream, plain)
            for stream in bad_streams:
                await r.xadd(stream, {"junk": str(wave)})  # no envelope: a dead letter
            sent["decisions"] += len(main) + len(plain)
            sent["bad"] += len(bad_streams)

            async def outcomes() -> list[int]:
                return [await added(r, stream) for stream in outcome_streams]

            async def finished() -> bool:
                results, rejected, dead = await outcomes()
                return results + rejected == sent["decisions"] and dead == sent["bad"]

            await until(finished, outcomes)
            if wave not in (2, waves):
                continue

            async def lengths() -> dict[str, int]:
                return {stream: await r.xlen(stream) for stream in inputs + list(outcome_streams)}

            async def trimmed() -> bool:
                held = await lengths()
                return all(held[s] == 0 for s in inputs) and [held[s] for s in outcome_streams] == [
                    settings.result_maxlen, settings.result_maxlen, settings.dead_letter_maxlen
                ]  # fmt: skip

            async def dedup_keys() -> list[str]:
                return [name async for name in r.scan_iter(match=keys.dedup("*"), count=1000)]

            async def expired() -> bool:
                return not await dedup_keys()  # SCAN drops what has expired

            await until(trimmed, lengths)
            await until(expired, dedup_keys)
            looks[wave] = await look(r, router, execution)
    finally:
        runner.stop.set()
        await running
    return looks


def assert_bounded(first: Look, last: Look) -> None:
    new = sorted(set(last.keys) - set(first.keys))
    assert not new, f"keys that were not there after wave 2: {new[:10]}"
    grown = {
        name: (first.keys[name][1], size)
        for name, (_kind, size) in last.keys.items()
        if first.keys[name][0] != "string" and size > first.keys[name][1]
    }
    assert not grown, f"grew since wave 2 (length then, now): {grown}"
    assert last.groups == first.groups, "consumer groups, consumers or pending entries changed"
    assert all(pending == 0 for _g, _c, pending in last.groups.values())
    slack = {"tasks": TASKS_SLACK}
    grown_here = {
        name: (first.in_process[name], size)
        for name, size in last.in_process.items()
        if size > first.in_process[name] + slack.get(name, 0)
    }
    assert not grown_here, f"the stages' collections grew since wave 2 (then, now): {grown_here}"
    assert last.in_process["lanes._retrying"] == 0
    assert last.dataset - first.dataset <= MEMORY_SLACK, (first.dataset, last.dataset)
    assert last.used_memory - first.used_memory <= MEMORY_SLACK, (first.used_memory, last.used_memory)


@pytest.mark.parametrize("partitions", [1, 3])
async def test_waves_of_traffic_leave_the_server_and_the_stages_holding_what_they_held(
    r: Redis, clean_url: str, settings_for: Callable[..., Settings], partitions: int
) -> None:
    settings = settings_for(
        clean_url,
        partitions=partitions,
        partition_lease_s=2,
        trim_interval_s=0.05,
        trim_keep_s=0,  # consumed entries, and paper order records once their intent is finished, go at once
        result_maxlen=4,
        dead_letter_maxlen=2,
        max_intent_age_s=1,
        clock_skew_s=0,
        dedup_window_s=2,  # the duplicate meets its original's key however slow the machine; then it expires
        loss_streak_window_s=60,
        cooldown_s=60,
        block_ms=20,
        batch_size=7,
        paper_balances={"USDT": Decimal(1_000_000)},
        reconcile_s=0,  # once, at start
    )
    looks = await run_waves(r, settings)
    first, last = looks[2], looks[WAVES]
    # The wave did reach every kind of record the bound is about.
    assert {keys.BOOK_POSITIONS, keys.RISK_ORDERS, keys.RISK_LOSSES, keys.paper_balances()} <= set(first.keys)
    assert_bounded(first, last)


async def _drain_router(router: Router) -> None:
    """Route every decision waiting on the one decision stream."""
    await router.consumer.setup()
    while batch := await router.consumer.read_new(wait=False):
        await router.consumer.process(router.handle, batch)


class Died(BaseException):
    """Stands for the process dying (nothing after it runs)."""


@pytest.mark.parametrize("partitions", [1, 2])
@pytest.mark.parametrize("how", ["died", "reply lost"])
async def test_suspects_finished_before_their_bookkeeping_leave_nothing_behind(
    r: Redis, clean_url: str, settings_for: Callable[..., Settings], partitions: int, how: str
) -> None:
    """Intents delivered too often are suspects: each try is counted in the server, and a try that failed on the
    server is remembered in process. When the try's commit lands but the process dies right after it, or the
    commit's reply is lost, the entry is finished and never comes back: what was kept for it must not stay."""
    settings = settings_for(clean_url, partitions=partitions, max_deliveries=1, batch_size=50)
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, mapping=PRICES)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    router = Router(r, settings)

    def stage() -> tuple[Execution, GroupConsumer]:
        execution = Execution(r, settings, paper)
        lanes = execution.partitioned.lanes if execution.partitioned is not None else [execution.consumer]
        return execution, lanes[keys.partition_of("ETHUSDT", partitions)]

    execution, lane = stage()
    await lane.setup()
    suspects = keys.suspects(lane.stream, lane.group)
    held: dict[int, tuple[int, int]] = {}
    for wave in range(1, WAVES + 1):
        await publish(r, settings.decision_stream, [decision("ETHUSDT", "BUY", "0.01", "3000") for _ in range(5)])
        await _drain_router(router)
        assert len(await lane.read_new(wait=False)) == 5  # delivery 1: the process dies before handling them
        batch = await lane.own_pending()
        assert [entry.deliveries for entry in batch] == [2] * 5  # past QT_MAX_DELIVERIES: suspects

        async def commit_then_fail(
            entries: list[Entry], execution: Execution = execution, lane: GroupConsumer = lane
        ) -> None:
            await execution.handle(entries, lane if lane is not execution.consumer else None)
            if how == "died":
                raise Died
            raise RedisConnectionError("the connection dropped before the commit's reply came back")

        with pytest.raises(Died if how == "died" else RedisConnectionError):
            await lane.process(commit_then_fail, batch)
        assert await r.xlen(settings.result_stream) == 5 * wave  # committed: each intent has its one result
        if how == "died":
            execution, lane = stage()  # the process starts again
        lane.recheck_own()
        assert await lane.own_first() == []  # nothing of them is pending any more
        held[wave] = (await r.hlen(suspects), len(lane._retrying))
    assert held[WAVES] == held[2], held


async def test_a_retried_suspect_is_forgotten_only_once_it_is_no_longer_ours(r: Redis) -> None:
    """Our pending list is read a page at a time: an id past a full page may still be ours and is kept."""
    lane = GroupConsumer(r, "quantum:stream:test", "g", "a", "quantum:stream:test.dead", batch_size=2)
    await lane.setup()
    ids = await publish(r, lane.stream, [{"n": str(n)} for n in range(4)])
    await lane.read_new(wait=False)
    await lane.read_new(wait=False)
    await r.xack(lane.stream, lane.group, ids[0])  # finished (a lost reply that was a success)
    lane._retrying = set(ids)
    await lane.own_pending()  # a full page: ids[1], ids[2]
    assert lane._retrying == set(ids[1:])
    await r.xack(lane.stream, lane.group, ids[1], ids[3])
    await lane.own_pending()  # the whole list: ids[2]
    assert lane._retrying == {ids[2]}


@pytest.mark.parametrize("partitions", [1, 2])
async def test_an_intent_set_aside_after_its_approval_leaves_no_order_in_flight(
    r: Redis, clean_url: str, settings_for: Callable[..., Settings], partitions: int
) -> None:
    """The gate records each order it approves as in flight until its intent's result is committed. An intent the
    process keeps dying on between its approval and its order is set aside (a dead letter, no result): its record
    must go with it, or every such intent stays in flight forever (and counts against the exposure rules)."""
    settings = settings_for(clean_url, partitions=partitions, max_deliveries=1)
    await r.set(keys.KILL_SWITCH, "0")
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    router = Router(r, settings)

    async def dies(*_args: object, **_kwargs: object) -> list[object]:
        raise Died

    paper.place_orders = dies  # type: ignore[method-assign]  # the process dies as each order would leave
    execution = Execution(r, settings, paper)
    lanes = execution.partitioned.lanes if execution.partitioned is not None else [execution.consumer]
    lane = lanes[keys.partition_of("ETHUSDT", partitions)]
    await lane.setup()
    in_flight: dict[int, int] = {}
    for wave in range(1, WAVES + 1):
        await publish(r, settings.decision_stream, [decision("ETHUSDT", "BUY", "0.01", "3000")])
        await _drain_router(router)
        await lane.read_new(wait=False)  # delivery 1: the process dies before handling it
        for _restart in range(4):  # together, then alone until it is set aside
            with contextlib.suppress(Died):
                await lane.process(functools.partial(execution.handle, lane=lane if partitions > 1 else None),
                                   await lane.own_pending())  # fmt: skip
        assert await r.xlen(settings.dead_letter_stream) == wave
        assert (await r.xpending(lane.stream, lane.group))["pending"] == 0
        in_flight[wave] = await r.hlen(keys.RISK_INFLIGHT)
    assert in_flight[WAVES] == in_flight[2], in_flight
