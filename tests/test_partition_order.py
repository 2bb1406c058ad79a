"""Per-symbol order across crashes: execution processes SIGKILLed and restarted while intents flow.

A router and four execution processes run as real processes (``python -m quantum_trader
router|execution``). 2,400 decisions alternate BUY and SELL of one small quantity on each of
four symbols (spread over the partitions), starting from a zero base balance, and are
published in bursts while a chaos loop SIGKILLs an execution process every fraction of a
second (most often one holding unfinished intents) and starts it again. With
``QT_PARTITIONS=4`` the router writes each symbol's intents to one partition stream, read by
one execution process at a time under a lease, the next holder finishing the last one's
pending intents first. At the end:

- every decision has exactly one result, and effectively-once holds (``tests.chaos.violations``);
- every result is FILLED: a SELL that overtook its BUY would be REJECTED INSUFFICIENT_BALANCE;
- per symbol, the results in stream order, and the paper orders in the order the server stored
  them (the keyspace events of their records), follow the publish order: BUY, SELL, BUY, SELL...;
- every base balance ends at exactly zero.

With one partition every execution process reads the one intent stream in one consumer group:
one process's batch races the next process's batch, and a killed process's pending intents wait
for its restart (or another's reclaim) while the others execute newer ones. The slow-marked
variant runs the same scenario so and requires the checks to catch the reordering: they can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pytest
from redis.exceptions import RedisError

import quantum_trader
from quantum_trader import keys
from quantum_trader.bus.connection import Redis, client, watching_client
from quantum_trader.bus.embedded import EmbeddedValkey
from quantum_trader.bus.streams import publish
from quantum_trader.events import Fields, Reason
from quantum_trader.publisher import publish_decisions
from quantum_trader.settings import Settings
from tests.chaos import Ledger, named, read_ledger, violations
from tests.cluster import ValkeyCluster
from tests.pipeline import decision
from tests.test_effectively_once import published

# The candidate symbols, each with its market price; a run trades four of them (``spread_symbols``).
PRICES = {
    "ETHUSDT": "3000", "BTCUSDT": "60000", "SOLUSDT": "150", "BNBUSDT": "600", "XRPUSDT": "0.5",
    "AVAXUSDT": "30", "LTCUSDT": "80", "DOGEUSDT": "0.1", "ADAUSDT": "0.4", "LINKUSDT": "15",
}  # fmt: skip
SYMBOL_COUNT = 4
QTY = "0.001"
QUOTE = "USDT"
START = {QUOTE: Decimal(10_000_000)}  # and no base asset at all
DECISION_COUNT = 2_400
BURST = 60  # decisions per round of the chaos loop: 40 rounds, one kill each
EXECUTIONS = [f"exec-{n}" for n in range(4)]
ROUTER = "router-0"
ROUTERS = ["router-0", "router-1"]  # the variant with decisions published to the decision partitions
LEASE_S = 2
# The seed's names; on a cluster each is used with its hash tag (``named``).
DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"
RESULTS = "quantum:stream:execution.result"
REJECTED = "quantum:stream:decision.rejected"
FILL_LOG_END = "quantum:test:fill-log-end"
# Live child processes of every run, killed at teardown whatever happened (a timeout included).
_CHILDREN: set[int] = set()


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """SIGKILL any stage process a run left behind (a failure or a timeout inside the run)."""
    yield
    for pid in list(_CHILDREN):
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            # waitpid answers only for our own children: a pid reused by another process is never killed.
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        _CHILDREN.discard(pid)


def spread_symbols(partitions: int) -> list[str]:
    """``SYMBOL_COUNT`` symbols on as many partitions as the router's hash spreads them (the first ones without it)."""
    partition_of = getattr(keys, "partition_of", None)
    chosen: list[str] = []
    if partition_of is not None and partitions > 1:
        taken: set[int] = set()
        for symbol in PRICES:
            if partition_of(symbol, partitions) not in taken:
                taken.add(partition_of(symbol, partitions))
                chosen.append(symbol)
    chosen += [symbol for symbol in PRICES if symbol not in chosen]
    return chosen[:SYMBOL_COUNT]


def decisions(symbols: Sequence[str]) -> list[Fields]:
    """The symbols interleaved; per symbol BUY, SELL, BUY, SELL... of the same quantity."""
    out = []
    for n in range(DECISION_COUNT):
        symbol = symbols[n % len(symbols)]
        side = "BUY" if (n // len(symbols)) % 2 == 0 else "SELL"
        out.append(decision(symbol, side, QTY, PRICES[symbol], strategy=f"pair-{n // (2 * len(symbols))}"))
    return out


@dataclasses.dataclass
class Fleet:
    """The router and the execution processes of one run, each restartable by name."""

    url: str
    partitions: int
    logs: Path
    procs: dict[str, asyncio.subprocess.Process] = dataclasses.field(default_factory=dict)
    killed: set[int] = dataclasses.field(default_factory=set)  # pids this fleet SIGKILLed
    kills: int = 0
    kills_holding_work: int = 0
    router_kills: int = 0

    @property
    def env(self) -> dict[str, str]:
        return os.environ | {
            "QT_REDIS_URL": self.url,
            "QT_PARTITIONS": str(self.partitions),
            "QT_PARTITION_LEASE_S": str(LEASE_S),
            "QT_BATCH_SIZE": "10",
            "QT_BLOCK_MS": "50",
            "QT_CLAIM_IDLE_MS": "300",
            "QT_MAX_INTENT_AGE_S": "3600",
            "QT_LOG_LEVEL": "warning",
            "QT_HEARTBEAT_S": "0.2",
            "QT_PAPER_BALANCES": ",".join(f"{asset}={amount}" for asset, amount in START.items()),
            # The processes import the same quantum_trader as this test (a worktree's, when given).
            "PYTHONPATH": str(Path(quantum_trader.__file__).parents[1]),
        }

    def __post_init__(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)

    def _log(self, name: str) -> IO[bytes]:
        return open(self.logs / f"{name}.log", "ab")  # closed once the process holds it

    async def start(self, name: str) -> None:
        stage = "router" if name.startswith("router") else "execution"
        with self._log(name) as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "quantum_trader", stage, env=self.env | {"QT_CONSUMER": name},
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        _CHILDREN.add(proc.pid)
        self.procs[name] = proc

    def alive(self, names: Sequence[str]) -> list[str]:
        return [name for name in names if name in self.procs and self.procs[name].returncode is None]

    def check(self) -> None:
        """Fail with its last words when a process ended that nobody killed (a refused setting, a crash)."""
        for name, proc in self.procs.items():
            if proc.returncode is not None and proc.pid not in self.killed:
                lines = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
                raise AssertionError(f"{name} exited by itself with code {proc.returncode}: {' | '.join(lines[-3:])}")

    async def ready(self, r: Redis, timeout_s: float = 30) -> None:
        """Wait until every process has beaten once (it is consuming)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check()
            beats = [
                await r.exists(keys.heartbeat("router" if n.startswith("router") else "execution", n))
                for n in self.procs
            ]
            if all(beats):
                return
            await asyncio.sleep(0.05)

    async def kill(self, r: Redis, name: str) -> None:
        proc = self.procs[name]
        if proc.returncode is not None:
            return
        self.killed.add(proc.pid)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        _CHILDREN.discard(proc.pid)
        self.kills += 1
        self.router_kills += name.startswith("router")
        self.kills_holding_work += name in await holders(r)

    async def revive_dead(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.returncode is not None:
                await self.start(name)

    async def stop(self) -> None:
        """SIGTERM (each finishes its batch), SIGKILL for one that does not stop within 15 s."""
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            _CHILDREN.discard(proc.pid)


async def intent_streams(r: Redis) -> list[str]:
    """The intent stream and its partitions' streams, whichever exist."""
    return sorted({name async for name in r.scan_iter(match=f"{named(INTENTS)}*", _type="stream", count=1000)})


async def holders(r: Redis) -> set[str]:
    """Consumers holding unfinished intents, on any intent stream."""
    out: set[str] = set()
    for stream in await intent_streams(r):
        for group in await r.xinfo_groups(stream):
            summary = await r.xpending(stream, group["name"])
            out |= {consumer["name"] for consumer in summary.get("consumers") or [] if int(consumer["pending"])}
    return out & set(EXECUTIONS)


async def all_entries(r: Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = []
    start = "-"
    while chunk := await r.xrange(stream, min=start, max="+", count=10_000):
        out += chunk
        start = "(" + chunk[-1][0]
    return out


class FillLog:
    """The paper orders in the order the server stored them: the keyspace events of their records.

    The paper exchange writes each new order's record once (MSET, in the batch's order, inside the
    transaction that moves the balances), so the events give the exchange's own sequence of fills.
    """

    def __init__(self, r: Redis) -> None:
        self.r = r
        self.node = r
        self.pubsub: Any = None
        self.coids: list[str] = []
        self.available = False
        self._end = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # On a cluster the events come from the node that stores the records: one client on it.
        self.node = await watching_client(self.r, keys.paper_version())
        self.pubsub = self.node.pubsub()
        try:
            await self.node.config_set("notify-keyspace-events", "E$")
        except RedisError:
            return  # a server that does not allow it: the fill order is not checked
        await self.pubsub.psubscribe("__keyevent@*__:set")
        self._task = asyncio.create_task(self._read())
        self.available = True

    async def _read(self) -> None:
        prefix = keys.paper_order("")
        while True:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None or message["type"] != "pmessage":
                continue
            if message["data"].startswith(prefix):
                self.coids.append(message["data"].removeprefix(prefix))
            elif message["data"] == named(FILL_LOG_END):
                self._end.set()

    async def finish(self) -> list[str] | None:
        """Every order stored so far, in order (None when the server gives no events)."""
        if not self.available:
            return None
        await self.node.set(named(FILL_LOG_END), "1")  # its event comes after every earlier one
        await asyncio.wait_for(self._end.wait(), 30)
        return self.coids

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.pubsub is not None:
            await self.pubsub.aclose()


@dataclasses.dataclass
class Report:
    """What one run broke (``problems``), and how it was run."""

    partitions: int
    problems: list[str]
    reordered: list[str]  # symbols whose results or fills left the publish order
    insufficient: int  # results REJECTED INSUFFICIENT_BALANCE
    kills: int = 0
    kills_holding_work: int = 0
    seconds: float = 0.0
    fills_checked: bool = False  # the server gave the paper orders' keyspace events
    router_kills: int = 0

    @property
    def out_of_order(self) -> bool:
        """A symbol was executed out of its publish order (by the results, the fills or a rejected SELL)."""
        return bool(self.reordered or self.insufficient)

    def summary(self) -> str:
        return (
            f"QT_PARTITIONS={self.partitions}: {self.seconds:.0f}s, {self.kills} kills "
            f"({self.kills_holding_work} holding intents), reordered {self.reordered or 'none'}, "
            f"{self.insufficient} INSUFFICIENT_BALANCE, {len(self.problems)} problems"
        )


def _order_problem(what: str, symbol: str, want: list[str], got: list[str], side_of: dict[str, str]) -> str | None:
    """How ``got`` (decision ids) leaves the publish order ``want``, or None when it follows it.

    Shown around the first difference as side and publish position: ``B4 S7 S5`` is the BUY
    published 5th, then the SELL published 8th, then the one published 6th.
    """
    if got == want:
        return None
    position = {decision_id: n for n, decision_id in enumerate(want)}
    at = next((n for n, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))

    def shown(ids: list[str]) -> str:
        return " ".join(f"{side_of.get(i, '?')[0]}{position.get(i, '?')}" for i in ids[max(0, at - 2) : at + 5])

    return (
        f"{symbol}: {what} leave the publish order at #{at} of {len(want)} ({len(got)} of them): "
        f"{shown(got)} where {shown(want)} was published"
    )


def order_report(
    ledger: Ledger, intents: list[tuple[str, str, dict[str, Any]]], fills: list[str] | None, partitions: int
) -> Report:
    """Every way a run broke per-symbol order or effectively-once."""
    problems: list[str] = []
    published: dict[str, list[str]] = defaultdict(list)  # symbol -> decision ids, in publish order
    side_of: dict[str, str] = {}
    symbol_of: dict[str, str] = {}
    for decision_id, fields in ledger.decisions:
        payload = json.loads(fields["payload"])
        published[payload["symbol"]].append(decision_id)
        side_of[decision_id] = payload["side"]
        symbol_of[decision_id] = payload["symbol"]
    for symbol, ids in published.items():  # the scenario itself: BUY, SELL, BUY, SELL...
        assert [side_of[i] for i in ids] == ["BUY", "SELL"] * (len(ids) // 2), symbol

    if ledger.rejections:
        problems.append(f"{len(ledger.rejections)} decisions rejected by the router, first {ledger.rejections[0]}")
    per_decision = Counter(res["decision_id"] for res in ledger.results)
    missing = [i for i in side_of if per_decision[i] != 1]
    if missing:
        problems.append(
            f"{len(missing)} decisions without exactly one result, first {missing[0]}: {per_decision[missing[0]]}"
        )
    not_filled = [res for res in ledger.results if res["status"] != "FILLED"]
    kinds = Counter(f"{res['status']} {res['reason']}" for res in not_filled)
    for kind, count in kinds.items():
        first = next(res for res in not_filled if f"{res['status']} {res['reason']}" == kind)
        problems.append(
            f"{count} results {kind}, first {first['symbol']} {first['side']} of decision {first['decision_id']}:"
            f" {first['detail']}"
        )
    insufficient = sum(1 for res in not_filled if res["reason"] == Reason.INSUFFICIENT_BALANCE.value)

    reordered: set[str] = set()
    filled: dict[str, list[str]] = defaultdict(list)
    for res in ledger.results:
        if res["status"] == "FILLED":
            filled[res["symbol"]].append(res["decision_id"])
    for symbol, want in published.items():
        if problem := _order_problem("the FILLED results in stream order", symbol, want, filled[symbol], side_of):
            problems.append(problem)
            reordered.add(symbol)

    if fills is not None:
        decision_of = {res["client_order_id"]: res["decision_id"] for res in ledger.results}
        placed: dict[str, list[str]] = defaultdict(list)
        for coid, count in Counter(fills).items():
            if count > 1:
                problems.append(f"paper order {coid} stored {count} times")
        for coid in dict.fromkeys(fills):
            if coid not in decision_of:
                problems.append(f"paper order {coid} has no result")
                continue
            placed[symbol_of[decision_of[coid]]].append(decision_of[coid])
        for symbol, want in published.items():
            if problem := _order_problem("the paper orders in fill order", symbol, want, placed[symbol], side_of):
                problems.append(problem)
                reordered.add(symbol)

    for symbol in published:
        base = symbol.removesuffix(QUOTE)
        if ledger.balances.get(base, Decimal(0)) != 0:
            problems.append(f"base balance {base} ended at {ledger.balances[base]}, not 0")

    streams_of: dict[str, set[str]] = defaultdict(set)  # symbol -> intent streams holding its intents
    id_counts = Counter(intent_id for _stream, intent_id, _payload in intents)
    for stream, _intent_id, payload in intents:
        streams_of[payload["symbol"]].add(stream)
    shared = [intent_id for intent_id, count in id_counts.items() if count > 1]
    if shared:
        problems.append(
            f"{len(shared)} intent ids are on more than one intent stream (first {shared[0]}): a result names its"
            " intent by id alone, and so do the gate's counted and in-flight hashes"
        )
    if partitions > 1:
        names = {partition_stream(k, partitions) for k in range(partitions)}
        for symbol, streams in sorted(streams_of.items()):
            if len(streams) != 1 or not streams <= names:
                problems.append(f"{symbol}: intents on {sorted(streams)}, not on one of {sorted(names)}")

    # Effectively-once, with each intent named by its stream and id (an id alone is unique per stream only).
    stream_of = {payload["decision_id"]: stream for stream, _intent_id, payload in intents}
    named = dataclasses.replace(
        ledger,
        intents=[(f"{stream}/{intent_id}", payload) for stream, intent_id, payload in intents],
        results=[
            res | {"intent_id": f"{stream_of.get(res['decision_id'])}/{res['intent_id']}"} for res in ledger.results
        ],
    )
    problems += violations(named, START)
    return Report(partitions, problems, sorted(reordered), insufficient)


def partition_stream(partition: int, partitions: int) -> str:
    """The name of a partition's intent stream: ``<intent stream>:{p<k>}``."""
    return named(INTENTS) if partitions <= 1 else f"{named(INTENTS)}:{{p{partition}}}"


async def drain(r: Redis, fleet: Fleet, total: int, *, stall_s: float = 20, deadline_s: float = 75) -> None:
    """Wait until every decision has an outcome, or nothing moved for ``stall_s`` (the checks say what is missing)."""
    loop = asyncio.get_running_loop()
    deadline, last, since = loop.time() + deadline_s, -1, loop.time()
    while loop.time() < deadline:
        fleet.check()
        done = await r.xlen(named(RESULTS)) + await r.xlen(named(REJECTED))
        if done >= total:
            return
        if done != last:
            last, since = done, loop.time()
        elif loop.time() - since > stall_s:
            return
        await asyncio.sleep(0.2)


async def ordering_run(
    url: str,
    partitions: int,
    logs: Path,
    seed: int = 20260301,
    routers: Sequence[str] = (ROUTER,),
    to_partitions: bool = True,
    failover: Callable[[int], Awaitable[None]] | None = None,
) -> Report:
    """The scenario under fire with ``QT_PARTITIONS=partitions``; the report of what it broke.

    With several ``routers`` the decisions are published to the decision stream's partitions
    (``publish_decisions``; with ``to_partitions`` False to the one decision stream, which they then share),
    and a router is SIGKILLed every third round as well. ``failover(round)`` runs after each round's kill (a
    cluster's primary SIGKILLed): decisions are then published as a publisher that loses nothing must (until a
    replica holds them), and the paper fills' order is not read (the node that told it may die)."""
    began = time.monotonic()
    rng = random.Random(seed)
    r = client(url)
    fills = FillLog(r)
    fleet = Fleet(url, partitions, logs)
    try:
        await r.set(keys.KILL_SWITCH, "0")
        await r.hset(keys.PRICE_HASH, mapping=PRICES)
        if failover is None:
            await fills.start()
        for name in [*routers, *EXECUTIONS]:
            await fleet.start(name)
        await fleet.ready(r)
        made = decisions(spread_symbols(partitions))
        for first in range(0, len(made), BURST):
            if len(routers) > 1:
                cut = Settings(redis_url=url, partitions=partitions if to_partitions else 1)
                await publish_decisions(r, cut, made[first : first + BURST])
                if first // BURST % 3 == 1 and (alive_routers := fleet.alive(routers)):
                    await fleet.kill(r, rng.choice(alive_routers))
            elif failover is not None:
                await published(r, named(DECISIONS), made[first : first + BURST])
            else:
                await publish(r, named(DECISIONS), made[first : first + BURST])
            await asyncio.sleep(rng.uniform(0.0, 0.05))  # mid-burst: the processes are busy
            fleet.check()
            alive = fleet.alive(EXECUTIONS)
            busy = sorted(await holders(r) & set(alive))
            if busy and rng.random() < 0.8:
                await fleet.kill(r, rng.choice(busy))  # one holding unfinished intents: they must wait for it
            elif alive:
                await fleet.kill(r, rng.choice(alive))
            if failover is not None:
                await failover(first // BURST)
            if rng.random() < 0.75:
                await fleet.revive_dead()  # otherwise it stays dead a round: the others take over its work
            await asyncio.sleep(rng.uniform(0.05, 0.3))
        await fleet.revive_dead()
        await drain(r, fleet, len(made))
        await asyncio.sleep(0.5)  # anything still in flight lands (or shows up as a duplicate)
        await fleet.stop()
        ledger = await read_ledger(r, keys.daily_trades(datetime.now(UTC).date()))
        intents = [
            (stream, intent_id, json.loads(fields["payload"]))
            for stream in await intent_streams(r)
            for intent_id, fields in await all_entries(r, stream)
        ]
        fill_order = await fills.finish()
        report = order_report(ledger, intents, fill_order, partitions)
        report.fills_checked = fill_order is not None
        report.kills, report.kills_holding_work = fleet.kills, fleet.kills_holding_work
        report.router_kills = fleet.router_kills
        report.seconds = time.monotonic() - began
        print(report.summary())
        return report
    finally:
        await fleet.stop()
        await fills.close()
        await r.aclose()


def assert_chaos_happened(report: Report) -> None:
    assert report.kills >= 30, f"the chaos loop must really have killed processes ({report.summary()})"
    assert report.kills_holding_work >= 3, f"some kills must land while a process holds intents ({report.summary()})"


@pytest.mark.timeout(180)
async def test_partitions_keep_each_symbol_in_publish_order_across_kills(
    valkey_factory: Callable[..., EmbeddedValkey], tmp_path: Path
) -> None:
    server = valkey_factory()
    report = await asyncio.wait_for(ordering_run(server.url, 4, tmp_path / "logs"), timeout=165)
    assert report.problems == [], "\n".join([report.summary(), *report.problems[:20]])
    assert_chaos_happened(report)


@pytest.mark.timeout(180)
async def test_two_routers_on_the_decision_partitions_keep_each_symbol_in_publish_order_across_kills(
    valkey_factory: Callable[..., EmbeddedValkey], tmp_path: Path
) -> None:
    server = valkey_factory()
    report = await asyncio.wait_for(ordering_run(server.url, 4, tmp_path / "logs", routers=ROUTERS), timeout=165)
    assert report.problems == [], "\n".join([report.summary(), *report.problems[:20]])
    assert_chaos_happened(report)
    assert report.router_kills >= 10, report.summary()


@pytest.mark.timeout(180)
async def test_partitions_on_a_cluster_keep_each_symbol_in_publish_order_across_kills(
    cluster: ValkeyCluster, tmp_path: Path
) -> None:
    report = await asyncio.wait_for(ordering_run(cluster.url, 4, tmp_path / "logs"), timeout=165)
    assert report.problems == [], "\n".join([report.summary(), *report.problems[:20]])
    assert report.fills_checked, "the paper fills' order must have been read from the cluster's node"
    assert_chaos_happened(report)


@pytest.mark.timeout(180)
async def test_partitions_keep_each_symbol_in_publish_order_across_failovers_of_the_pipelines_primary(
    cluster: ValkeyCluster, tmp_path: Path
) -> None:
    """A failover takes the pipeline's state back to what the replica held; the stages redo it in order."""
    pipeline_key = keys.cluster_name(keys.KILL_SWITCH)
    failed_over: list[tuple[int, int]] = []

    async def failover(round_no: int) -> None:
        if round_no not in (10, 26):
            return
        old = cluster.primary_for(pipeline_key)
        cluster.kill(old)
        new = await asyncio.to_thread(cluster.wait_for_failover, pipeline_key)
        await asyncio.to_thread(cluster.restart, old)  # back as the new primary's replica
        failed_over.append((old, new))

    run = ordering_run(cluster.url, 4, tmp_path / "logs", failover=failover)
    report = await asyncio.wait_for(run, timeout=170)
    assert [old != new for old, new in failed_over] == [True, True]
    assert report.problems == [], "\n".join([report.summary(), *report.problems[:20]])
    assert_chaos_happened(report)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_without_partitions_the_same_kills_can_reorder_a_symbol(
    valkey_factory: Callable[..., EmbeddedValkey], tmp_path: Path
) -> None:
    """The checks are not vacuous: one consumer group shared by every execution process reorders a symbol."""
    reports = []
    for attempt in range(3):
        server = valkey_factory()
        logs = tmp_path / f"logs{attempt}"
        reports.append(await asyncio.wait_for(ordering_run(server.url, 1, logs, seed=attempt), timeout=165))
        assert_chaos_happened(reports[-1])
        if reports[-1].out_of_order:
            break
    assert any(report.out_of_order for report in reports), "; ".join(report.summary() for report in reports)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_two_routers_sharing_the_one_decision_stream_can_reorder_a_symbol(
    valkey_factory: Callable[..., EmbeddedValkey], tmp_path: Path
) -> None:
    """The two-router checks are not vacuous: routers sharing one consumer group reorder a symbol's intents."""
    reports = []
    for attempt in range(3):
        logs = tmp_path / f"logs{attempt}"
        run = ordering_run(valkey_factory().url, 4, logs, seed=attempt, routers=ROUTERS, to_partitions=False)
        reports.append(await asyncio.wait_for(run, timeout=165))
        if reports[-1].out_of_order:
            break
    assert any(report.out_of_order for report in reports), "; ".join(report.summary() for report in reports)
