"""Partitions: one reader per partition under a lease, take-over in order, fair shares, the gate's fence."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from quantum_trader import keys, risk
from quantum_trader.bus import connection
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.partitions import (
    LOST,
    Fence,
    Partitioned,
    fair_share,
    layout_problem,
    layout_streams,
    preference,
)
from quantum_trader.bus.streams import GroupConsumer, publish
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.governor import Governor
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.pipeline import decision, results

STREAM = "quantum:stream:trade.intent"
GROUP = "quantum:group:execution:trade.intent"


def test_shares_and_preferences_spread_the_partitions() -> None:
    assert [fair_share(8, live) for live in (0, 1, 2, 3, 8, 9)] == [8, 8, 4, 3, 1, 1]
    order = preference("execution-a", 8)
    assert sorted(order) == list(range(8))
    assert preference("execution-a", 8) == order  # the same in every process
    assert len({preference(f"execution-{n}", 8)[0] for n in range(20)}) > 2  # processes start apart


def test_a_symbol_always_goes_to_one_partition_and_one_partition_keeps_the_seed_names() -> None:
    assert {keys.partition_of("ETHUSDT", 4) for _ in range(3)} == {keys.partition_of("ETHUSDT", 4)}
    assert keys.partition_stream(STREAM, 0, 1) == STREAM
    assert keys.partition_stream(STREAM, 3, 4) == STREAM + ":{p3}"


def partitioned(settings: Settings, r: Redis, name: str) -> Partitioned:
    return Partitioned(r, settings.model_copy(update={"consumer": name}), keys.EXECUTION, STREAM, GROUP)


async def test_two_processes_share_the_partitions_and_one_takes_all_when_the_other_leaves(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, partitions=4, partition_lease_s=0.5)
    a, b = partitioned(settings, r, "exec-a"), partitioned(settings, r, "exec-b")
    await a.tick(force=True)
    assert len(a.owned) == 4  # alone: every partition
    await b.tick(force=True)
    assert b.owned == {}  # a holds them all until it renews and sees b
    await a.tick(force=True)
    assert len(a.owned) == 2  # a gave back its surplus
    await b.tick(force=True)
    assert len(b.owned) == 2
    assert set(a.owned).isdisjoint(b.owned)
    await a.release_all()  # a clean stop gives them back at once, and says it left
    await b.tick(force=True)
    assert sorted(b.owned) == [0, 1, 2, 3]


async def test_a_process_that_lost_its_lease_reads_nothing_and_the_new_holder_handles_its_entries_first(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, partitions=2, partition_lease_s=0.4, batch_size=3)
    a = partitioned(settings, r, "exec-a")
    for lane in a.lanes:
        await lane.setup()
    await a.tick(force=True)
    stream = a.streams[0]
    await publish(r, stream, [{"n": str(n)} for n in range(6)])
    first = await a._next(0)
    assert [e.fields["n"] for e in first] == ["0", "1", "2"]  # read, then a is paused: nothing acknowledged

    await asyncio.sleep(0.5)  # a's lease runs out while it is paused
    b = partitioned(settings, r, "exec-b")
    await b.tick(force=True)
    assert 0 in b.owned
    assert await a._call("read", 0, count=3, consumer="exec-a") == LOST  # a wakes up: it cannot read any more
    assert await a._next(0) == []  # its lease was not renewed in time: it reads nothing
    await a.tick(force=True)  # and at its next renewal it learns it lost the partition
    assert 0 not in a.owned

    taken = await b._next(0)
    assert [e.fields["n"] for e in taken] == ["0", "1", "2"]  # what a had read comes first
    assert all(e.redelivered for e in taken)  # so execution looks each order up before placing anything
    await r.xack(stream, GROUP, *[e.id for e in taken])
    assert [e.fields["n"] for e in await b._next(0)] == ["3", "4", "5"]


async def test_the_gate_approves_nothing_under_a_lease_someone_else_holds(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, partitions=2)
    await r.set(keys.KILL_SWITCH, "0")
    stream = keys.partition_stream(STREAM, 1, 2)
    lane = GroupConsumer(r, stream, GROUP, "exec-a", settings.dead_letter_stream)
    await lane.setup()
    await publish(r, stream, [{"n": "1"}])
    (entry,) = await lane.read_new(wait=False)
    candidate = [risk.Candidate(entry.id, "ETHUSDT", "BUY", Decimal(1), Decimal(3000))]
    governor = Governor(r, settings)
    now = datetime.now(UTC)
    await r.set(keys.partition_lease(1), "exec-b token-b")
    fence = Fence(keys.partition_lease(1), "exec-a token-a")
    gone = await governor.gate(candidate, now, "exec-a", stream=stream, fence=fence)
    assert [a.verdict for a in gone.answers] == ["GONE"]
    assert await r.get(keys.daily_trades(now.date())) is None  # nothing counted
    await r.set(keys.partition_lease(1), "exec-a token-a")
    held = await governor.gate(candidate, now, "exec-a", stream=stream, fence=fence)
    assert [a.verdict for a in held.answers] == ["APPROVED"]


async def test_three_executions_on_four_partitions_keep_each_symbol_in_order_while_one_dies(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    """Alternating BUY/SELL per symbol from no base balance: a SELL that overtook its BUY would be refused."""
    symbols = {"ETHUSDT": "3000", "BTCUSDT": "60000", "SOLUSDT": "150", "XRPUSDT": "2"}
    settings = settings_for(clean_url, partitions=4, partition_lease_s=0.6, block_ms=10, batch_size=5,
                            paper_balances={"USDT": Decimal(10_000_000)})  # fmt: skip
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, mapping=symbols)
    published: dict[str, list[str]] = defaultdict(list)
    made = []
    for n in range(800):
        symbol = list(symbols)[(n // 2) % len(symbols)]
        side = "BUY" if n % 2 == 0 else "SELL"
        made.append(decision(symbol=symbol, side=side, qty="0.01", price=symbols[symbol], strategy=f"step-{n // 2}"))
        published[symbol].append(side)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    router = Router(r, settings)
    stop, doomed_stop = asyncio.Event(), asyncio.Event()
    doomed = connection.client(clean_url)  # its own client: it dies with the process it stands for
    executions = [
        Execution(doomed if n == 0 else r, settings.model_copy(update={"consumer": f"exec-{n}"}), paper)
        for n in range(3)
    ]
    tasks = [asyncio.create_task(router.consumer.run(router.handle, stop))]
    for n, execution in enumerate(executions):
        assert execution.partitioned is not None
        tasks.append(asyncio.create_task(execution.partitioned.run(execution.handle, doomed_stop if n == 0 else stop)))
    for first in range(0, len(made), 100):
        await publish(r, settings.decision_stream, made[first : first + 100])
        await asyncio.sleep(0.05)
        if first == 300:
            tasks[1].cancel()  # execution 0 dies mid-flow
            await asyncio.gather(tasks[1], return_exceptions=True)
            await doomed.aclose()
    for _ in range(1_200):
        if await r.xlen(settings.result_stream) >= len(made):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)

    out: list[dict[str, Any]] = await results(r, settings.result_stream)
    assert len(out) == len(made)
    assert [(o["side"], o["reason"]) for o in out if o["status"] != "FILLED"] == []  # no INSUFFICIENT_BALANCE
    filled: dict[str, list[str]] = defaultdict(list)
    for o in out:
        filled[o["symbol"]].append(o["side"])
    assert filled == published  # per symbol, in publish order
    balances = await paper.balances()
    assert [balances.get(symbol.removesuffix("USDT"), Decimal(0)) for symbol in symbols] == [0, 0, 0, 0]
    assert len({await r.get(keys.partition_lease(k)) for k in range(4)} - {None}) <= 2  # the living two held them


def test_status_and_alerts_look_at_every_partition_of_the_intent_stream() -> None:
    names = Settings(partitions=3).pipeline_streams()
    at = names.index(STREAM)
    assert names[at + 1 : at + 4] == [STREAM + ":{p0}", STREAM + ":{p1}", STREAM + ":{p2}"]
    assert Settings().pipeline_streams() == Settings().streams.pipeline()  # one partition: as it always was


# ---- changing QT_PARTITIONS while the old layout still holds work ----------------------------------------


def test_a_new_layout_is_refused_only_while_the_old_one_holds_unfinished_entries() -> None:
    held = {"quantum:stream:trade.intent": 3}
    problem = layout_problem(4, 1, held)
    assert problem is not None
    assert "QT_PARTITIONS=1" in problem
    assert "quantum:stream:trade.intent (3)" in problem
    assert layout_problem(4, 1, {"quantum:stream:trade.intent": 0}) is None
    assert layout_problem(4, 4, held) is None
    streams = [s for s, _g in layout_streams(Settings(partitions=1), 3)]
    assert streams[:3] == [f"{STREAM}:{{p{k}}}" for k in range(3)]
    assert streams[3:] == [f"quantum:stream:ai.decision:{{p{k}}}" for k in range(3)]


def execution_cli(url: str, partitions: int, duration: str = "0.5") -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", "execution"],
        env=base
        | {
            "QT_REDIS_URL": url,
            "QT_PARTITIONS": str(partitions),
            "QT_DURATION": duration,
            "QT_CONSUMER": "exec-a",
            "QT_BLOCK_MS": "20",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_execution_refuses_another_partition_count_until_the_old_intents_are_done(
    r: Redis, clean_url: str, settings_for: Callable[..., Settings]
) -> None:
    """The router has written intents for one execution process (QT_PARTITIONS=1), which is stopped; the
    operator restarts execution with QT_PARTITIONS=4. Those intents would sit on a stream no one reads:
    execution refuses, in one line naming the stream and the fix, and trades nothing. Back on 1 partition it
    executes them; then 4 starts and is recorded."""
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    settings = settings_for(clean_url, block_ms=10)
    await publish(r, settings.decision_stream, [decision(qty="0.01", corr=f"c{n}") for n in range(3)])
    router = Router(r, settings)
    await router.consumer.setup()
    await router.handle(await router.consumer.read_new(wait=False))
    assert await r.xlen(STREAM) == 3

    refused = execution_cli(clean_url, 4)
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    assert "QT_PARTITIONS=4, but the pipeline last ran with QT_PARTITIONS=1" in refused.stderr
    assert f"{STREAM} (3)" in refused.stderr
    assert await results(r) == []
    assert await r.get(keys.PARTITION_LAYOUT) is None

    done = execution_cli(clean_url, 1, duration="3")
    assert done.returncode == 0, done.stderr
    assert [res["status"] for res in await results(r)] == ["FILLED"] * 3
    assert await r.get(keys.PARTITION_LAYOUT) == "1"

    moved = execution_cli(clean_url, 4)
    assert moved.returncode == 0, moved.stderr
    assert await r.get(keys.PARTITION_LAYOUT) == "4"
