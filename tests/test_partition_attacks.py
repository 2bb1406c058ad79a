"""Attacks on partition mode (QT_PARTITIONS > 1) from outside: frozen lease holders, server pauses, the kill switch.

Two guarantees, attacked where the partitions' machinery (leases, fenced reads, the gate's fence, take-over
by XAUTOCLAIM) could let them slip:

(a) every intent gets exactly one result, no client order id is placed twice at the paper exchange, nothing
    is left pending and each symbol fills in publish order, however long a process or the server is frozen
    (longer than every timeout: the lease, the claim idle time, the order records' retention, the intent's
    age limit) and however the processes race once they all resume;
(b) no order leaves once ``quantum-trader kill on`` (or ``state halted``) has returned, not even one of a
    batch the holder of a partition had already read, or already approved, when it landed.

The execution "processes" are either in this process (each with its own client, lease token and paper
exchange client, stopped at an exact point of a batch: after its gate, after its orders, before its commit;
stopped there, the loop renews nothing, as under SIGSTOP) or real ones (``python -m quantum_trader`` and
this file run as a stage with ``ATTACK_FREEZE_AT``, which SIGSTOPs itself at that point), frozen with
SIGSTOP and woken together with SIGCONT, the server frozen the same way.

What broke, before the fix: a holder frozen between its gate and its orders woke up after its partition
had been taken over and its batch finished by the new holder, and placed the batch's orders anyway (the
gate's fence had passed; nothing checked the lease again before the orders left). When the new holder
had filled them and the records had expired (``QT_TRIM_KEEP_S``), each went to the exchange a second
time, without a result; when it had found the intents too old (``QT_MAX_INTENT_AGE_S``) and written
EXPIRED, an expired intent traded. And a batch approved just before ``state halted`` landed still sent
its orders: only the kill switch was read again right before each order left. The same freeze on the one
intent stream (no lease) is covered too: a claim moves the former owner's fence (``keys.consumer_fence``).

Run as a script (``python tests/test_partition_attacks.py execution``) this file is an execution process
that stops itself once where ``ATTACK_FREEZE_AT`` says (``gate``: right after its first approval; ``place``:
right after its first orders), as a process frozen there by the machine would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pytest

import quantum_trader
from quantum_trader import keys
from quantum_trader.bus import connection
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.embedded import EmbeddedValkey
from quantum_trader.bus.partitions import Fence
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.events import Fields
from quantum_trader.exchanges.base import Guards, OrderOutcome, OrderRequest
from quantum_trader.exchanges.ccxt import CcxtExchange
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.governor import GONE, GateResult, send_guards
from quantum_trader.router import Router
from quantum_trader.runner import halt_trading
from quantum_trader.settings import Settings
from tests.chaos import read_ledger
from tests.exchanges.conftest import FAST, write_secrets
from tests.exchanges.fake_binance import FakeBinance
from tests.pipeline import decision, drain

ROOT = Path(__file__).parents[1]
DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"
RESULTS = "quantum:stream:execution.result"
GROUP = "quantum:group:execution:trade.intent"
QUOTE = "USDT"
START = {QUOTE: Decimal(10_000_000)}  # and no base asset at all: a SELL that overtakes its BUY is refused
PRICES = {
    "ETHUSDT": "3000", "BTCUSDT": "60000", "SOLUSDT": "150", "BNBUSDT": "600", "XRPUSDT": "0.5",
    "AVAXUSDT": "30", "LTCUSDT": "80", "DOGEUSDT": "0.1", "ADAUSDT": "0.4", "LINKUSDT": "15",
}  # fmt: skip
QTY = "0.001"
END_MARK = "quantum:test:event-log-end"
_CHILDREN: set[int] = set()  # live stage processes of this module, SIGKILLed at teardown whatever happened


# ---- what the server did, in the order it did it ---------------------------------------------------


class EventLog:
    """The writes the attacks judge, in the server's own order: its keyspace events.

    The paper exchange writes each new order's record once (MSET, inside the transaction that moves the
    balances), so a client order id stored twice is an order placed twice; the kill switch is a SET and
    the trading state an HSET, so an order stored after one of those was placed after it.
    """

    def __init__(self, r: Redis) -> None:
        self.r = r
        self.events: list[tuple[str, str]] = []  # (event, key)
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._end = asyncio.Event()

    async def start(self) -> None:
        await self.r.config_set("notify-keyspace-events", "E$h")
        self._pubsub = self.r.pubsub()
        await self._pubsub.psubscribe("__keyevent@*__:set", "__keyevent@*__:hset")
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None or message["type"] != "pmessage":
                continue
            event = message["channel"].rsplit(":", 1)[-1]
            if message["data"] == END_MARK:
                self._end.set()
            else:
                self.events.append((event, message["data"]))

    async def finish(self) -> list[tuple[str, str]]:
        """Every event so far (a mark written now comes after all of them)."""
        await self.r.set(END_MARK, "1")
        await asyncio.wait_for(self._end.wait(), 30)
        return self.events

    def orders(self) -> list[str]:
        """The client order ids stored at the paper exchange, in the order they were stored."""
        prefix = keys.paper_order("")
        return [key.removeprefix(prefix) for event, key in self.events if event == "set" and key.startswith(prefix)]

    def orders_after(self, event: str, key: str) -> list[str]:
        """The orders stored after the first ``event`` on ``key`` (which must have come)."""
        at = next((n for n, seen in enumerate(self.events) if seen == (event, key)), None)
        assert at is not None, f"no {event} of {key} was seen: the operator's change never reached the server"
        prefix = keys.paper_order("")
        return [k.removeprefix(prefix) for e, k in self.events[at:] if e == "set" and k.startswith(prefix)]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pubsub is not None:
            await self._pubsub.aclose()


# ---- the checks of guarantee (a) ---------------------------------------------------------------------


async def stream_entries(r: Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = []
    start = "-"
    while chunk := await r.xrange(stream, min=start, max="+", count=10_000):
        out += chunk
        start = "(" + chunk[-1][0]
    return out


async def problems_of(r: Redis, partitions: int, stored: Sequence[str], *, filled_only: bool = True) -> list[str]:
    """Every way the run broke guarantee (a); empty when it held.

    ``stored``: the client order ids the paper exchange stored, in its order (``EventLog.orders``).
    ``filled_only``: every result must be FILLED (the scenario trades BUY, SELL, BUY... of each symbol
    from no base balance, so a SELL placed before its BUY is REJECTED INSUFFICIENT_BALANCE).
    """
    problems: list[str] = []
    ledger = await read_ledger(r, keys.daily_trades(datetime.now(UTC).date()))
    streams = [keys.partition_stream(INTENTS, k, partitions) for k in range(partitions)]
    intents = {(s, i): json.loads(f["payload"]) for s in streams for i, f in await stream_entries(r, s)}
    decision_ids = [d for d, _ in ledger.decisions]
    symbol_of = {d: json.loads(f["payload"])["symbol"] for d, f in ledger.decisions}
    per_decision = Counter(res["decision_id"] for res in ledger.results)
    problems += [f"result for unknown decision {d}" for d in per_decision if d not in symbol_of]
    problems += [f"decision {d} has {per_decision[d]} results" for d in decision_ids if per_decision[d] != 1]
    problems += [f"{len(ledger.rejections)} decisions rejected by the router"] if ledger.rejections else []
    if len(intents) != len(decision_ids):
        problems.append(f"{len(intents)} intents on the partitions for {len(decision_ids)} decisions")
    for stream in streams:
        if pending := (await r.xpending(stream, GROUP))["pending"]:
            problems.append(f"{pending} intents still pending on {stream}")
    if dead := await r.xlen("quantum:stream:dead_letter"):
        problems.append(f"{dead} entries dead-lettered")
    if filled_only:
        kinds = Counter(f"{res['status']} {res['reason']}" for res in ledger.results if res["status"] != "FILLED")
        problems += [f"{count} results {kind}" for kind, count in kinds.items()]

    # One order per client order id, each with its FILLED result; the daily counter counts them.
    reported = {res["client_order_id"]: res for res in ledger.results if res["exchange"] == "paper"}
    for coid, times in Counter(stored).items():
        if times > 1:
            problems.append(f"client order id {coid} placed {times} times at the paper exchange")
        if coid not in reported:
            problems.append(f"order {coid} at the paper exchange has no result saying so")
    if ledger.counter != len(reported):
        problems.append(f"daily counter {ledger.counter} != orders reported {len(reported)}")

    # Per symbol: the results, and the exchange's own sequence of orders, in publish order.
    decision_of = {res["client_order_id"]: res["decision_id"] for res in ledger.results}
    published: dict[str, list[str]] = defaultdict(list)
    for d in decision_ids:
        published[symbol_of[d]].append(d)
    by_results: dict[str, list[str]] = defaultdict(list)
    for res in ledger.results:
        if res["status"] == "FILLED":
            by_results[res["symbol"]].append(res["decision_id"])
    by_orders: dict[str, list[str]] = defaultdict(list)
    for coid in dict.fromkeys(stored):
        if decision_of.get(coid) in symbol_of:
            by_orders[symbol_of[decision_of[coid]]].append(decision_of[coid])
    for symbol, want in published.items():
        for what, got in (("FILLED results", by_results[symbol]), ("paper orders", by_orders[symbol])):
            if got != [d for d in want if d in set(got)]:
                problems.append(f"{symbol}: the {what} leave the publish order")

    # The balances are the start plus the fills the results report, not one order more.
    expected = dict(START)
    for res in ledger.results:
        if res["status"] == "FILLED":
            base = res["symbol"].removesuffix(QUOTE)
            qty, price, fee = Decimal(res["filled_qty"]), Decimal(res["avg_price"]), Decimal(res["fee"])
            sign = 1 if res["side"] == "BUY" else -1
            expected[base] = expected.get(base, Decimal(0)) + sign * qty
            expected[QUOTE] = expected[QUOTE] - sign * qty * price - fee
    for asset in sorted(set(expected) | set(ledger.balances)):
        if expected.get(asset, Decimal(0)) != ledger.balances.get(asset, Decimal(0)):
            problems.append(f"balance {asset} {ledger.balances.get(asset)} != start plus fills {expected.get(asset)}")
    return problems


# ---- decisions ----------------------------------------------------------------------------------------


def symbols_on_partitions(partitions: int, count: int) -> list[str]:
    """``count`` symbols on different partitions (as many as there are)."""
    chosen: dict[int, str] = {}
    for symbol in PRICES:
        chosen.setdefault(keys.partition_of(symbol, partitions), symbol)
    return list(chosen.values())[:count]


def alternating(symbols: Sequence[str], per_symbol: int, first: int = 0) -> list[Fields]:
    """Per symbol BUY, SELL, BUY, SELL... of one quantity, the symbols interleaved; numbered from ``first``."""
    out = []
    for n in range(first, first + per_symbol):
        for symbol in symbols:
            side = "BUY" if n % 2 == 0 else "SELL"
            out.append(decision(symbol, side, QTY, PRICES[symbol], trace=f"t-{symbol}-{n}", corr=f"c-{symbol}-{n}"))
    return out


async def until(check: Callable[[], Awaitable[bool]], what: str, limit_s: float = 20.0) -> None:
    """Wait until ``check()`` holds (a bound on a wait, never a measurement)."""
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {limit_s:g}s for {what}")
        await asyncio.sleep(0.02)


# ---- execution "processes" in this one ----------------------------------------------------------------


class Freeze:
    """Stops one execution process once, at one point of a batch, until ``thaw``: as SIGSTOP would there.

    The process's loop is the one that renews its leases and announces it, so while it stands here its
    leases run out and the others see it gone, exactly as when the machine freezes it.
    """

    def __init__(self) -> None:
        self.reached = asyncio.Event()  # it stands at the point
        self.thaw = asyncio.Event()
        self.finished = asyncio.Event()  # the batch it stood in has ended (whatever it did)
        self.used = False

    async def here(self) -> None:
        if self.used:
            return
        self.used = True
        self.reached.set()
        await self.thaw.wait()


@dataclasses.dataclass
class Station:
    """One execution process: its own client, consumer name, lease token and paper exchange client."""

    name: str
    client: Redis
    execution: Execution
    paper: PaperExchange
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None


class Desk:
    """Execution processes of this one on one server, started and stopped by name."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self.stations: dict[str, Station] = {}

    def make(self, name: str) -> Station:
        client = connection.client(self.url)
        settings = self.settings.model_copy(update={"consumer": name})
        paper = PaperExchange(client, quote_assets=settings.quote_assets, starting_balances=START)
        station = Station(name, client, Execution(client, settings, paper), paper, asyncio.Event())
        self.stations[name] = station
        return station

    def run(self, station: Station) -> Station:
        partitioned = station.execution.partitioned
        assert partitioned is not None
        station.task = asyncio.create_task(partitioned.run(station.execution.handle, station.stop))
        return station

    def start(self, name: str) -> Station:
        return self.run(self.make(name))

    async def close(self) -> None:
        for station in self.stations.values():
            station.stop.set()
        tasks = [s.task for s in self.stations.values() if s.task is not None]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for station in self.stations.values():
            await station.client.aclose()
        failures = [repr(d) for d in done if isinstance(d, BaseException)]
        assert not failures, f"an execution process failed: {failures}"


def freeze_after_gate(station: Station, freeze: Freeze) -> None:
    """``freeze`` right after the station's gate approved something: orders approved, none sent yet."""
    governor = station.execution.governor
    gate = governor.gate

    async def gated(*args: Any, **kwargs: Any) -> GateResult:
        answer = await gate(*args, **kwargs)
        if any(a.verdict == "APPROVED" for a in answer.answers):
            await freeze.here()
        return answer

    governor.gate = gated  # type: ignore[method-assign]


def freeze_before_gate(station: Station, freeze: Freeze) -> None:
    """``freeze`` with a batch read and reviewed, right before its gate."""
    governor = station.execution.governor
    gate = governor.gate

    async def gated(*args: Any, **kwargs: Any) -> GateResult:
        if args[0]:
            await freeze.here()
        return await gate(*args, **kwargs)

    governor.gate = gated  # type: ignore[method-assign]


def freeze_after_orders(station: Station, freeze: Freeze) -> None:
    """``freeze`` right after the station's orders reached the exchange, before their results are written."""
    paper = station.paper
    place = paper.place_orders

    async def placed(orders: list[OrderRequest], guard: Guards | None = None) -> list[OrderOutcome]:
        outcomes = await place(orders, guard)
        if any(o.sent for o in outcomes):
            await freeze.here()
        return outcomes

    paper.place_orders = placed  # type: ignore[method-assign]


def freeze_before_commit(station: Station, freeze: Freeze) -> None:
    """``freeze`` right before the station writes a batch's results."""
    committer = station.execution.committer
    commit = committer.commit

    async def committing(*args: Any, **kwargs: Any) -> int:
        await freeze.here()
        return await commit(*args, **kwargs)

    committer.commit = committing  # type: ignore[method-assign]


def mark_batch_end(station: Station, freeze: Freeze) -> None:
    """Set ``freeze.finished`` when the batch the station froze in has ended."""
    execution = station.execution
    handle = execution.handle

    async def handled(*args: Any, **kwargs: Any) -> None:
        was = freeze.used
        try:
            await handle(*args, **kwargs)
        finally:
            if freeze.used and not was:
                freeze.finished.set()

    execution.handle = handled  # type: ignore[method-assign]


@pytest.fixture
async def trading_server(valkey_factory: Callable[..., EmbeddedValkey]) -> Any:
    """A private server (its keyspace events are switched on), trading allowed, prices set, the event log on."""
    server = valkey_factory()
    r = connection.client(server.url)
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, mapping=PRICES)
    await PaperExchange(r, starting_balances=START).fund()
    log = EventLog(connection.client(server.url))
    await log.start()
    try:
        yield server, r, log
    finally:
        await log.close()
        await log.r.aclose()
        await r.aclose()


def settings_on(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": url,
        "data_dir": tmp_path / "data",
        "partitions": 2,
        "partition_lease_s": 0.5,
        "batch_size": 3,
        "block_ms": 10,
        "max_intent_age_s": 3600,
        "paper_balances": START,
    }
    return Settings(**(base | overrides))


async def route(r: Redis, settings: Settings, decisions: list[Fields]) -> None:
    await publish(r, DECISIONS, decisions)
    await drain(Router(r, settings))


async def results_count_is(r: Redis, count: int) -> bool:
    return int(await r.xlen(RESULTS)) >= count


async def no_paper_records(r: Redis) -> bool:
    return not [key async for key in r.scan_iter(match=keys.paper_order_pattern(), count=1000)]


def is_set(event: asyncio.Event) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return event.is_set()

    return check


# ---- (a) in-process: a holder frozen at an exact point of a batch -------------------------------------


async def test_a_holder_frozen_after_its_gate_places_nothing_once_its_batch_was_filled_by_the_next_holder(
    trading_server: Any, tmp_path: Path
) -> None:
    """exec-a alone holds both partitions, reads three intents of a symbol (BUY, SELL, BUY), its gate
    approves them, and it freezes before any order leaves. Its lease runs out; exec-b takes the partition
    over, claims the three, looks them up (not at the exchange), gates them again (already counted), fills
    them, and fills the rest of the symbol. Their results written, the three order records expire
    (QT_TRIM_KEEP_S=1). Then exec-a wakes up in the middle of its batch and carries on.

    It must send nothing: the three orders went once, by exec-b, and each intent has its one result."""
    server, r, log = trading_server
    settings = settings_on(server.url, tmp_path, trim_keep_s=1)
    [symbol] = symbols_on_partitions(2, 1)
    await route(r, settings, alternating([symbol], 8))
    desk = Desk(server.url, settings)
    a, freeze = desk.make("exec-a"), Freeze()
    freeze_after_gate(a, freeze)
    mark_batch_end(a, freeze)
    try:
        desk.run(a)
        await until(is_set(freeze.reached), "exec-a to approve its first batch")
        desk.start("exec-b")
        await until(lambda: results_count_is(r, 8), "exec-b to finish every intent")
        await until(lambda: no_paper_records(r), "the order records to expire")
        freeze.thaw.set()
        await until(is_set(freeze.finished), "exec-a to end the batch it froze in")
    finally:
        freeze.thaw.set()
        await desk.close()
    await log.finish()
    stored = log.orders()
    problems = await problems_of(r, 2, stored)
    assert problems == [], "\n".join(problems)
    assert len(stored) == 8


async def test_a_holder_frozen_after_its_gate_trades_nothing_the_next_holder_found_too_old(
    trading_server: Any, tmp_path: Path
) -> None:
    """exec-a approves three intents and freezes before any order leaves, for longer than the intents'
    age limit (QT_MAX_INTENT_AGE_S=1) and its lease. exec-b takes the partition over and finds every
    intent too old: EXPIRED, never executed, the gate's counts given back. Then exec-a wakes up.

    Nothing may trade: an EXPIRED intent whose order still left would be a fill without its result."""
    server, r, log = trading_server
    settings = settings_on(server.url, tmp_path, max_intent_age_s=1)
    [symbol] = symbols_on_partitions(2, 1)
    published = time.time()
    await route(r, settings, alternating([symbol], 8))
    desk = Desk(server.url, settings)
    a, freeze = desk.make("exec-a"), Freeze()
    freeze_after_gate(a, freeze)
    mark_batch_end(a, freeze)
    try:
        desk.run(a)
        await until(is_set(freeze.reached), "exec-a to approve its first batch")

        async def too_old() -> bool:
            return time.time() > published + settings.max_intent_age_s + 0.2

        await until(too_old, "the intents to pass their age limit")
        desk.start("exec-b")
        await until(lambda: results_count_is(r, 8), "exec-b to finish every intent")
        freeze.thaw.set()
        await until(is_set(freeze.finished), "exec-a to end the batch it froze in")
    finally:
        freeze.thaw.set()
        await desk.close()
    await log.finish()
    problems = await problems_of(r, 2, log.orders(), filled_only=False)
    assert problems == [], "\n".join(problems)
    out = [json.loads(f["payload"]) for _, f in await r.xrange(RESULTS)]
    assert {(o["status"], o["reason"]) for o in out} == {("EXPIRED", "EXPIRED")}
    assert log.orders() == []


async def test_without_partitions_a_consumer_frozen_after_its_gate_trades_nothing_the_reclaimer_expired(
    trading_server: Any, tmp_path: Path
) -> None:
    """The test above on the one intent stream: exec-a approves three intents and freezes; exec-b reclaims
    them after QT_CLAIM_IDLE_MS (moving exec-a's fence in the same step), finds them too old and writes
    EXPIRED; exec-a wakes: its fence moved, so not one order leaves."""
    server, r, log = trading_server
    settings = settings_on(server.url, tmp_path, partitions=1, max_intent_age_s=1, claim_idle_ms=300, pipeline_depth=1)
    published = time.time()
    [symbol] = symbols_on_partitions(2, 1)
    await route(r, settings, alternating([symbol], 8))
    desk = Desk(server.url, settings)
    a, b, freeze = desk.make("exec-a"), desk.make("exec-b"), Freeze()
    freeze_after_gate(a, freeze)
    mark_batch_end(a, freeze)
    b.execution.consumer.claim_every_s = 0  # b looks for idle entries at every turn
    runs = []
    try:
        runs.append(asyncio.create_task(a.execution.consumer.run(a.execution.handle, a.stop)))
        await until(is_set(freeze.reached), "exec-a to approve its first batch")

        async def too_old() -> bool:
            return time.time() > published + settings.max_intent_age_s + 0.2

        await until(too_old, "the intents to pass their age limit")
        runs.append(asyncio.create_task(b.execution.consumer.run(b.execution.handle, b.stop)))
        await until(lambda: results_count_is(r, 8), "exec-b to finish every intent")
        freeze.thaw.set()
        await until(is_set(freeze.finished), "exec-a to end the batch it froze in")
    finally:
        freeze.thaw.set()
        for station in (a, b):
            station.stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        for station in (a, b):
            await station.client.aclose()
    await log.finish()
    assert log.orders() == []


@pytest.mark.parametrize(
    ("a_stops", "b_stops"),
    [(freeze_after_gate, freeze_after_gate), (freeze_after_orders, freeze_before_commit)],
    ids=["both-approved-none-sent", "a-sent-b-found-both-committing"],
)
async def test_two_holders_of_one_batch_woken_together_give_it_one_order_and_one_result_each(
    trading_server: Any,
    tmp_path: Path,
    a_stops: Callable[[Station, Freeze], None],
    b_stops: Callable[[Station, Freeze], None],
) -> None:
    """exec-a freezes in the middle of a batch; exec-b takes the partition over, claims the batch and
    freezes at a point of its own in the same batch. Both are woken at the same instant and race:

    - both approved, nothing sent yet: both go for the same three orders;
    - exec-a sent them, exec-b found them at the exchange: both go for the same three results.

    Each intent must end with one order and one result, the symbol filled in publish order."""
    server, r, log = trading_server
    settings = settings_on(server.url, tmp_path)
    [symbol] = symbols_on_partitions(2, 1)
    await route(r, settings, alternating([symbol], 8))
    desk = Desk(server.url, settings)
    a, b = desk.make("exec-a"), desk.make("exec-b")
    a_freeze, b_freeze = Freeze(), Freeze()
    a_stops(a, a_freeze)
    b_stops(b, b_freeze)
    mark_batch_end(a, a_freeze)
    mark_batch_end(b, b_freeze)
    try:
        desk.run(a)
        await until(is_set(a_freeze.reached), "exec-a to stop in its first batch")
        desk.run(b)
        await until(is_set(b_freeze.reached), "exec-b to stop in the batch it took over")
        a_freeze.thaw.set()
        b_freeze.thaw.set()
        await until(lambda: results_count_is(r, 8), "every intent to have its result")
        await until(is_set(a_freeze.finished), "exec-a to end the batch it froze in")
    finally:
        a_freeze.thaw.set()
        b_freeze.thaw.set()
        await desk.close()
    await log.finish()
    problems = await problems_of(r, 2, log.orders())
    assert problems == [], "\n".join(problems)
    assert len(log.orders()) == 8


# ---- (b) in-process: the operator halts while every holder has a batch in hand -----------------------


async def run_operator(url: str, *args: str) -> None:
    """Run ``quantum-trader ARGS`` against ``url`` as an operator would, and wait until it has returned (exit 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quantum_trader", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (out + err).decode(errors="replace")


# How the operator halts: the command (none: ``SET quantum:kill 1`` by hand), the write it makes, the code.
HALTS: dict[str, tuple[tuple[str, ...], tuple[str, str], str]] = {
    "kill-on": (("kill", "on"), ("set", keys.KILL_SWITCH), "KILL_SWITCH"),
    "set-kill": ((), ("set", keys.KILL_SWITCH), "KILL_SWITCH"),
    "state-halted": (("state", "halted", "--reason", "attack"), ("hset", keys.TRADING_STATE), "HALTED"),
}


async def halt_now(r: Redis, url: str, command: tuple[str, ...]) -> None:
    """The operator's halt, returned: ``quantum-trader COMMAND``, or the switch set by hand."""
    if command:
        await run_operator(url, *command)
    else:
        await r.set(keys.KILL_SWITCH, "1")


@pytest.mark.parametrize("halt", sorted(HALTS))
@pytest.mark.parametrize("hold", [freeze_before_gate, freeze_after_gate], ids=["read", "approved"])
async def test_no_order_leaves_once_the_operator_halted_while_every_partition_holder_had_a_batch_in_hand(
    trading_server: Any, tmp_path: Path, halt: str, hold: Callable[[Station, Freeze], None]
) -> None:
    """Four execution processes hold one of four partitions each and have read one batch of their
    symbol (``read``), or have read it and had it approved by their gate (``approved``), when the
    operator runs ``quantum-trader kill on`` (or sets ``quantum:kill`` by hand, or runs ``quantum-trader
    state halted``). Once it has returned, all four carry on at the same instant.

    Not one order may leave: every intent ends REJECTED with the switch's (or the state's) code, and the
    gate's counts are given back."""
    server, r, log = trading_server
    settings = settings_on(server.url, tmp_path, partitions=4, partition_lease_s=30)
    symbols = symbols_on_partitions(4, 4)
    assert len(symbols) == 4
    names = [f"exec-{n}" for n in range(4)]
    seconds, micros = await r.time()
    await r.zadd(keys.partition_members(), {name: seconds * 1000 + micros // 1000 for name in names})
    desk = Desk(server.url, settings)
    freezes = {name: Freeze() for name in names}
    for name in names:
        station = desk.make(name)
        hold(station, freezes[name])
    args, flip, code = HALTS[halt]
    try:
        for name in names:
            desk.run(desk.stations[name])

        async def one_partition_each() -> bool:
            return all(len(s.execution.partitioned.owned) == 1 for s in desk.stations.values())  # type: ignore[union-attr]

        await until(one_partition_each, "each process to hold one partition")
        await route(r, settings, alternating(symbols, 6))
        for name in names:
            await until(is_set(freezes[name].reached), f"{name} to hold a batch")
        await halt_now(r, server.url, args)
        for freeze in freezes.values():
            freeze.thaw.set()
        await until(lambda: results_count_is(r, 24), "every intent to have its result")
    finally:
        for freeze in freezes.values():
            freeze.thaw.set()
        await desk.close()
    await log.finish()
    assert log.orders_after(*flip) == []
    assert log.orders() == []
    problems = await problems_of(r, 4, log.orders(), filled_only=False)
    assert problems == [], "\n".join(problems)
    out = [json.loads(f["payload"]) for _, f in await r.xrange(RESULTS)]
    assert {(o["status"], o["reason"], o["exchange"]) for o in out} == {("REJECTED", code, "")}


async def test_a_real_exchange_adapter_reads_the_same_guards_right_before_each_request(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str, tmp_path: Path
) -> None:
    """The ccxt adapter (against the fake Binance) gets the same guards as the paper exchange: the order of
    a holder whose partition changed hands since its gate is not sent (GONE, left to the new holder), nor
    one approved before the state went HALTED (REJECTED HALTED), nor a buy under REDUCING; back in hand and
    ACTIVE, it is sent once.
    (It reads them right before the request goes on the wire, not atomically with it: see the README.)"""
    fake = FakeBinance()
    await fake.start()
    secrets = write_secrets(tmp_path / "testnet.env")
    settings = settings_for(clean_url, **(FAST | {"secrets_file": secrets, "exchange_api_url": fake.url}))
    exchange = CcxtExchange.from_settings(r, settings, on_auth_failure=halt_trading(r))
    try:
        await exchange.start()
        await r.set(keys.KILL_SWITCH, "0")
        fence = Fence(keys.partition_lease(1), "exec-a token-a")
        order = OrderRequest("qt-00000000000000000000000000000009", "ETHUSDT", "BUY", Decimal("0.1"))
        await r.set(fence.key, "exec-b token-b")  # taken over while exec-a was frozen
        [gone] = await exchange.place_orders([order], guard=send_guards(fence))
        await r.set(fence.key, fence.value)
        await r.hset(keys.TRADING_STATE, mapping={"state": "HALTED"})  # `quantum-trader state halted`
        [halted] = await exchange.place_orders([order], guard=send_guards(fence))
        await r.hset(keys.TRADING_STATE, mapping={"state": "REDUCING"})  # no new entries: this buy stays
        [reducing] = await exchange.place_orders([order], guard=send_guards(fence))
        await r.hset(keys.TRADING_STATE, mapping={"state": "ACTIVE"})
        [filled] = await exchange.place_orders([order], guard=send_guards(fence))
    finally:
        await exchange.close()
        await fake.stop()
    assert (gone.status, gone.reason, gone.sent) == ("REJECTED", GONE, False)
    assert (halted.status, halted.reason, halted.sent) == ("REJECTED", "HALTED", False)
    assert (reducing.status, reducing.reason, reducing.sent) == ("REJECTED", "REDUCING", False)
    assert filled.status == "FILLED"
    assert fake.calls("POST", "/api/v3/order") == 1


# ---- real processes: frozen by SIGSTOP, woken together by SIGCONT ---------------------------------------


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """SIGKILL any stage process a test left behind (a failure or a timeout), after waking it."""
    yield
    for pid in list(_CHILDREN):
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            # waitpid answers only for our own children: a pid reused by another process is never touched.
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        _CHILDREN.discard(pid)


def frozen(pid: int) -> bool:
    """The process is stopped (SIGSTOP), by us or by itself."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


@dataclasses.dataclass
class Fleet:
    """A router and execution processes on one server, each logging to its own file."""

    url: str
    logs: Path
    env: dict[str, str]
    procs: dict[str, asyncio.subprocess.Process] = dataclasses.field(default_factory=dict)

    async def start(self, name: str, *, freeze_at: str = "") -> asyncio.subprocess.Process:
        stage = "router" if name.startswith("router") else "execution"
        # A process that stops itself at one point runs as this file; the others as the operator runs them.
        command = [WORKER, stage] if freeze_at else ["-m", "quantum_trader", stage]
        env = self.env | {"QT_CONSUMER": name, "ATTACK_FREEZE_AT": freeze_at}
        with self._log(name) as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        _CHILDREN.add(proc.pid)
        self.procs[name] = proc
        return proc

    def _log(self, name: str) -> IO[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        return open(self.logs / f"{name}.log", "ab")  # closed once the process holds it

    def check(self) -> None:
        """Fail with its last words when a process ended by itself (a refused setting, a crash)."""
        for name, proc in self.procs.items():
            if proc.returncode is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}: {self.tail(name)}")

    def tail(self, name: str) -> str:
        return " | ".join((self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:])

    def lines(self, event: str) -> Counter[str]:
        """How many log lines of ``event`` each process wrote."""
        out: Counter[str] = Counter()
        for path in sorted(self.logs.glob("*.log")):
            out[path.stem] += sum(f'"{event}"' in line for line in path.read_text(errors="replace").splitlines())
        return out

    async def ready(self, r: Redis) -> None:
        async def beating() -> bool:
            self.check()
            stages = ["router" if n.startswith("router") else "execution" for n in self.procs]
            return all([await r.exists(keys.heartbeat(s, n)) for s, n in zip(stages, self.procs, strict=True)])

        await until(beating, "every process to start", 60)

    def send(self, names: Sequence[str], sig: signal.Signals) -> None:
        for name in names:
            self.procs[name].send_signal(sig)

    async def stop(self) -> None:
        """SIGCONT then SIGTERM (each finishes its batch); SIGKILL for one that does not stop within 15 s."""
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            _CHILDREN.discard(proc.pid)


async def keep_streams_whole(r: Redis, partitions: int) -> None:
    """A group of the test's on the decision stream and the partitions that never reads: the processes'
    trim passes (one at each stop, with QT_TRIM_KEEP_S=0) never delete what the checks read back."""
    for stream in [DECISIONS, *(keys.partition_stream(INTENTS, k, partitions) for k in range(partitions))]:
        await ensure_group(r, stream, "quantum:group:test-audit")


WORKER = str(Path(__file__).resolve())
LEASE_S = 1.0
OUTAGE_S = 1.6  # longer than the lease and the claim idle time: every holder's work is taken over


def fleet_env(url: str, partitions: int, **extra: str) -> dict[str, str]:
    return (
        {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
        | {
            "QT_REDIS_URL": url,
            "QT_PARTITIONS": str(partitions),
            "QT_PARTITION_LEASE_S": str(LEASE_S),
            "QT_CLAIM_IDLE_MS": "300",
            "QT_BATCH_SIZE": "5",
            "QT_BLOCK_MS": "50",
            "QT_MAX_INTENT_AGE_S": "3600",
            "QT_HEARTBEAT_S": "0.2",
            "QT_TRIM_INTERVAL_S": "3600",  # the streams stay whole for the checks
            "QT_LOG_LEVEL": "warning",
            "QT_PAPER_BALANCES": f"{QUOTE}={START[QUOTE]}",
            "PYTHONPATH": os.pathsep.join([str(Path(quantum_trader.__file__).parents[1]), str(ROOT)]),
        }
        | extra
    )


@pytest.mark.timeout(120)
async def test_frozen_execution_processes_woken_together_after_take_overs_and_server_freezes_lose_and_double_nothing(
    trading_server: Any, tmp_path: Path
) -> None:
    """Three execution processes and a router, 4 partitions, 4 symbols trading BUY, SELL, BUY... from no
    base balance. exec-0 stops itself right after its first gate approved a batch (no order sent), exec-1
    right after its first orders left (no result written). exec-2 starts, takes every partition over
    and finishes everything; the order records go at once (QT_TRIM_KEEP_S=0). Then exec-0 and exec-1 are
    woken at the same instant, with a new burst of decisions, and race exec-2 for the partitions. Six
    more bursts follow, each hit by an outage longer than the lease (1 s) and the claim idle time: the
    server frozen, two execution processes frozen, all three frozen, each time woken at once.

    At the end every decision has exactly one result, every one FILLED, no client order id was placed
    twice, nothing is pending, each symbol filled in publish order (results and the exchange's own
    sequence), the balances are the start plus the fills."""
    server, r, log = trading_server
    pid = server.process.pid if server.process else 0
    symbols = symbols_on_partitions(4, 4)
    fleet = Fleet(server.url, tmp_path / "logs", fleet_env(server.url, 4, QT_TRIM_KEEP_S="0"))
    executions = ["exec-0", "exec-1", "exec-2"]
    await keep_streams_whole(r, 4)
    made = 0
    try:
        await fleet.start("router-0")
        await fleet.start("exec-0", freeze_at="gate")
        await fleet.start("exec-1", freeze_at="place")
        await fleet.ready(r)
        await publish(r, DECISIONS, alternating(symbols, 6))
        made += 24

        async def both_frozen() -> bool:
            fleet.check()
            return frozen(fleet.procs["exec-0"].pid) and frozen(fleet.procs["exec-1"].pid)

        await until(both_frozen, "exec-0 and exec-1 to stop themselves in a batch", 30)
        await fleet.start("exec-2")
        await until(lambda: results_count_is(r, made), "exec-2 to finish the first burst", 30)
        assert await no_paper_records(r)

        await publish(r, DECISIONS, alternating(symbols, 6, first=6))
        made += 24
        fleet.send(["exec-0", "exec-1"], signal.SIGCONT)  # both wake at once, in the middle of their batch
        outages = ["server", "two", "all", "server", "two", "all"]
        for n, outage in enumerate(outages):
            await publish(r, DECISIONS, alternating(symbols, 6, first=12 + 6 * n))
            made += 24
            await asyncio.sleep(0.05)  # in the middle of the burst: batches in hand everywhere
            if outage == "server":
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(OUTAGE_S)
                os.kill(pid, signal.SIGCONT)
            else:
                names = executions if outage == "all" else [executions[n % 3], executions[(n + 1) % 3]]
                fleet.send(names, signal.SIGSTOP)
                await asyncio.sleep(OUTAGE_S)
                fleet.send(names, signal.SIGCONT)
            fleet.check()
        await until(lambda: results_count_is(r, made), "every decision to have its result", 60)
        await asyncio.sleep(0.5)  # a late second order or result would land now
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)  # never leave a frozen server behind
        await fleet.stop()
    await log.finish()
    problems = await problems_of(r, 4, log.orders())
    assert problems == [], "\n".join(problems[:20])
    assert len(log.orders()) == made
    # The scenario happened: exec-0 woke after its partition changed hands, and leases were lost in the races.
    assert fleet.lines("partition_lost_before_orders")["exec-0"] >= 1, fleet.tail("exec-0")
    assert sum(fleet.lines("partition_lost").values()) >= 3, dict(fleet.lines("partition_lost"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("halt", sorted(HALTS))
async def test_no_order_leaves_after_the_operator_halts_four_partitioned_executions_mid_flow(
    trading_server: Any, tmp_path: Path, halt: str
) -> None:
    """A router and four execution processes on 4 partitions trade decisions published without a pause
    (4 symbols, 40 decisions every 50 ms); once hundreds are done, the operator runs ``quantum-trader kill
    on`` (or sets ``quantum:kill`` to 1 directly, or runs ``quantum-trader state halted``) while every
    process has batches in hand, read, approved or being placed; the decisions keep coming a little longer.

    In the server's own order of events, not one paper order is stored after the switch's SET (or the
    state's HSET); every decision still gets exactly one result (FILLED before, REJECTED with the code
    after), nothing is left pending, and the balances are the start plus the fills."""
    server, r, log = trading_server
    symbols = symbols_on_partitions(4, 4)
    fleet = Fleet(server.url, tmp_path / "logs", fleet_env(server.url, 4, QT_BATCH_SIZE="50"))
    await keep_streams_whole(r, 4)
    args, flip, code = HALTS[halt]
    feeding, published = asyncio.Event(), 0

    async def feed() -> None:
        nonlocal published
        while not feeding.is_set():
            await publish(r, DECISIONS, alternating(symbols, 10, first=published // 4))
            published += 40
            await asyncio.sleep(0.05)

    feeder = asyncio.create_task(feed())
    try:
        for name in ["router-0", "exec-0", "exec-1", "exec-2", "exec-3"]:
            await fleet.start(name)
        await fleet.ready(r)
        await until(lambda: results_count_is(r, 400), "hundreds of decisions to be done", 60)
        await halt_now(r, server.url, args)
        halted_at = int(await r.xlen(RESULTS))
        await until(lambda: results_count_is(r, halted_at + 200), "the flow to go on past the halt", 60)
        feeding.set()
        await feeder
        await until(lambda: results_count_is(r, published), "every decision to have its result", 60)
        fleet.check()
    finally:
        feeding.set()
        await asyncio.gather(feeder, return_exceptions=True)
        await fleet.stop()
    await log.finish()
    assert log.orders_after(*flip) == []
    problems = await problems_of(r, 4, log.orders(), filled_only=False)
    assert problems == [], "\n".join(problems[:20])
    out = Counter((o["status"], o["reason"]) for o in await results_payloads(r))
    assert set(out) == {("FILLED", ""), ("REJECTED", code)}, out
    assert len(log.orders()) == out[("FILLED", "")]


async def results_payloads(r: Redis) -> list[dict[str, Any]]:
    return [json.loads(fields["payload"]) for _, fields in await stream_entries(r, RESULTS)]


# ---- run as an execution process that stops itself at one point ----------------------------------------


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)  # as the machine would freeze it there; SIGCONT carries on


async def _stage(stage_name: str) -> None:
    from quantum_trader import runner
    from quantum_trader.logs import configure
    from quantum_trader.settings import load_settings

    settings = load_settings()
    configure(settings.log_level, "json")
    assert settings.redis_url
    async with connection.connected(settings.redis_url) as redis:
        stop = asyncio.Event()
        runner.install_signal_handlers(stop)
        stage = await runner.build_stage(stage_name, redis, settings)
        at = os.environ.get("ATTACK_FREEZE_AT", "")
        if isinstance(stage, Execution) and at:
            done = False
            gate, place = stage.governor.gate, stage.exchange.place_orders

            async def gated(*args: Any, **kwargs: Any) -> GateResult:
                nonlocal done
                answer = await gate(*args, **kwargs)
                if at == "gate" and not done and any(a.verdict == "APPROVED" for a in answer.answers):
                    done = True
                    _stop_self()
                return answer

            async def placed(orders: list[OrderRequest], guard: Any = None) -> list[OrderOutcome]:
                nonlocal done
                outcomes = await place(orders, guard)
                if at == "place" and not done and any(o.sent for o in outcomes):
                    done = True
                    _stop_self()
                return outcomes

            stage.governor.gate = gated  # type: ignore[method-assign]
            stage.exchange.place_orders = placed  # type: ignore[method-assign]
        await runner.Runner(redis, settings, {stage_name: stage}, stop).run()


if __name__ == "__main__":
    asyncio.run(_stage(sys.argv[1]))
