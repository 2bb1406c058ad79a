"""Hostile intents written straight onto the partitions' streams while execution runs partitioned.

With ``QT_PARTITIONS`` > 1 the router writes each intent to ``quantum:stream:trade.intent:{p<k>}``,
``k`` the stable hash of its symbol (``keys.partition_of``), with an id from one counter for every
partition. Anyone who can write to the server can write to those streams directly, bypassing the
router: bytes that are not UTF-8, JSON nested thousands of levels deep, odd numbers, look-alike
letters, fields of a mebibyte (the strategies of ``tests/fuzz_strategies.py``), valid intents on
another symbol's partition, and ids from each stream's own ``XADD *`` (two partitions written in one
millisecond number their entries alike). One or two execution "processes" (in this one, each with its
own consumer name, lease token and paper exchange client) consume them by the real loop
(``runner.Runner``; ``consumers_of`` runs ``Partitioned.run`` with ``Execution.handle``: fenced reads
under leases, each partition read by its holder only). Whatever comes in:

- no process dies, and each entry is read once, by the holder of its partition's lease;
- every entry ends with exactly one outcome, a result or a dead letter carrying its raw fields, and
  is acknowledged on the partition stream it was written to; nothing is left pending;
- a valid intent written to another partition than its symbol's is traded where it lies, like any
  valid intent (FILLED, once): execution neither moves it nor copies it to its symbol's partition,
  nor drops it (the order per symbol is the router's to keep; a writer who bypasses it owns the order);
- garbage never fills; the paper balances are the starting ones plus the fills; the gate's records
  of each intent are gone once it is committed.

Two partitions holding one id at once, in two processes, count two orders: the gate counts an intent, and
holds its order in flight, by its id and its partition's stream (``keys.intent_record``), not its id alone.

The router and ``dlq replay`` write to the partitions too, with ids from the counter: an entry written
there directly past the counter must not make them fail (and lose the decision or the dead letter).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader import keys
from quantum_trader.bus import connection
from quantum_trader.bus.dead_letters import replay
from quantum_trader.bus.partitions import Fence, Partitioned
from quantum_trader.bus.streams import Entry, GroupConsumer, dead_letter_fields
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.router import Router
from quantum_trader.runner import Runner, consumers_of
from quantum_trader.settings import Settings
from tests import fuzz_strategies as fz
from tests.pipeline import decision
from tests.test_fuzz_entries import (
    PRICES,
    Outcome,
    assert_paper_books_add_up,
    drained,
    fresh_server,
    fuzz,
    judge_intent,
    read,
    stage_settings,
    text,
)

Key = tuple[str, str]  # (the partition stream an entry was written to, its id there)


@dataclass(frozen=True)
class Placed:
    """One case and the partition it is written to; ``stray``: a valid intent away from its symbol's partition."""

    case: fz.Case
    partition: int
    stray: bool = False

    def __repr__(self) -> str:
        return f"p{self.partition}{' (stray)' if self.stray else ''} {self.case!r}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass(frozen=True)
class Layout:
    partitions: int
    placed: list[Placed]


@st.composite
def layouts(draw: st.DrawFn, bad: st.SearchStrategy[fz.Case]) -> Layout:
    """Hostile intents on any partition among valid ones, at least one valid one away from its symbol's partition."""
    partitions = draw(st.sampled_from([2, 3]))
    cases = draw(fz.batches(bad, fz.valid(fz.INTENT)))
    stray_at = draw(st.integers(0, len(cases)))
    cases.insert(stray_at, draw(fz.valid(fz.INTENT)))
    placed = []
    for index, case in enumerate(cases):
        if case.expect != fz.VALID or case.want is None:
            placed.append(Placed(case, draw(st.integers(0, partitions - 1))))
            continue
        home = keys.partition_of(case.want[0], partitions)
        if index == stray_at or draw(st.booleans()):
            placed.append(Placed(case, (home + draw(st.integers(1, partitions - 1))) % partitions, stray=True))
        else:
            placed.append(Placed(case, home))
    return Layout(partitions, placed)


class Fleet:
    """Execution processes (in this one), each run by its real loop (``runner.Runner``): every delivery
    recorded per partition stream, and which process handled it."""

    def __init__(self, redis_client: connection.Redis, settings: Settings, executions: list[Execution]) -> None:
        self.deliveries: dict[Key, int] = {}
        self.handled_by: dict[Key, set[str]] = defaultdict(set)
        self.stop = asyncio.Event()
        self.runners = []
        for execution in executions:
            name = execution.settings.consumer_name(keys.EXECUTION)
            execution.handle = self._spy(execution.handle, name)  # type: ignore[method-assign, assignment]
            self.runners.append(Runner(redis_client, execution.settings, {keys.EXECUTION: execution}, self.stop))

    def _spy(self, handle: Callable[..., Awaitable[None]], name: str) -> Callable[..., Awaitable[None]]:
        async def spy(entries: list[Entry], lane: GroupConsumer | None = None, fence: Fence | None = None) -> None:
            stream = lane.stream if lane is not None else "<no lane>"
            for entry in entries:
                key = (stream, entry.id)
                self.deliveries[key] = max(self.deliveries.get(key, 0), entry.deliveries)
                self.handled_by[key].add(name)
            await handle(entries, lane, fence)

        return spy

    async def run_until(
        self, finished: Callable[[], Awaitable[bool]], entries: set[Key], limit_s: float, grace_s: float = 3.0
    ) -> str:
        """Run until ``finished`` (or an entry is delivered twice, or a process dies, or ``grace_s`` after
        every one of ``entries`` was delivered); '' or how a process died."""
        tasks = [asyncio.create_task(runner.run()) for runner in self.runners]
        loop = asyncio.get_running_loop()
        deadline, waiting = loop.time() + limit_s, True
        while not any(task.done() for task in tasks) and loop.time() < deadline:
            if await finished() or any(n > 1 for n in self.deliveries.values()):
                break
            if waiting and entries <= self.deliveries.keys():
                deadline = min(deadline, loop.time() + grace_s)  # every entry handed over: it ends soon or never
                waiting = False
            await asyncio.sleep(0.005)
        died_early = [task.done() for task in tasks]
        self.stop.set()
        for n, task in enumerate(tasks):
            try:
                await asyncio.wait_for(task, 20)
            except Exception as exc:
                how = "died" if died_early[n] else "failed at stop"
                return f"process {n} {how}: {type(exc).__name__}: {str(exc)[:300]}"
            if died_early[n]:
                return f"process {n} stopped by itself"
        return ""

    def redelivered(self) -> dict[Key, int]:
        return {key: n for key, n in self.deliveries.items() if n > 1}


async def write_placed(
    raw: aioredis.Redis, streams: list[str], placed: list[Placed]
) -> tuple[list[Key], dict[Key, dict[bytes, bytes]]]:
    """XADD each case, in order, to its partition's stream with ``*`` (each stream numbers its own ids)."""
    stamp = fz.now_stamp()
    written = []
    for index, item in enumerate(placed):
        stream = streams[item.partition]
        flat = [part for pair in item.case.pairs_for(index, stamp) for part in pair]
        written.append((stream, (await raw.execute_command("XADD", stream, "*", *flat)).decode()))
    stored = {}
    for stream in streams:
        for entry_id, fields in await raw.xrange(stream):
            stored[(stream, entry_id.decode())] = fields
    return written, stored


async def outcomes_by_entry(
    raw: aioredis.Redis, settings: Settings, stored: dict[Key, dict[bytes, bytes]]
) -> tuple[dict[Key, list[Outcome]], list[str]]:
    """Each entry's outcomes, and those that answer no entry (or cannot say which).

    A dead letter names its stream and id. A result names the intent's id only, which two partitions
    may share when written with ``XADD *``: its trace id (unique per written entry) tells them apart.
    """
    by_key: dict[Key, list[Outcome]] = defaultdict(list)
    stray: list[str] = []
    owners: dict[tuple[str, bytes], list[Key]] = defaultdict(list)
    for key, fields in stored.items():
        owners[(key[1], fields.get(b"trace_id", b""))].append(key)
    for result_id, fields, payload in await read(raw, settings.result_stream):
        found = owners.get((str(payload.get("intent_id")), fields.get(b"trace_id", b"")), [])
        if len(found) == 1:
            by_key[found[0]].append(("result", payload, fields))
        else:
            stray.append(f"result {result_id} answers {len(found)} entries: {str(payload)[:200]}")
    for dead_id, fields, payload in await read(raw, settings.dead_letter_stream):
        key = (text(fields, "origin_stream"), text(fields, "origin_id"))
        if key in stored:
            by_key[key].append(("dead", payload, fields))
        else:
            stray.append(f"dead letter {dead_id} answers no entry written: {key}")
    return by_key, stray


def show(placed: list[Placed], written: list[Key], problems: dict[Key, str]) -> str:
    return "\n".join(
        f"  {stream} {entry_id} {item!r}: {problems.get((stream, entry_id), '')}"
        for item, (stream, entry_id) in zip(placed, written, strict=True)
        if not problems or (stream, entry_id) in problems
    )


async def execute_on_partitions(
    url: str, settings: Settings, layout: Layout, processes: int = 1, limit_s: float = 8.0
) -> None:
    """Write the layout, run ``processes`` partitioned executions until every partition is drained, and check
    what each entry became (see the module docstring)."""
    plain, raw = connection.client(url), aioredis.Redis.from_url(url)
    try:
        paper = await fresh_server(plain, settings)
        executions = []
        for n in range(processes):
            own = settings.model_copy(update={"consumer": f"exec-{n}"})
            exchange = PaperExchange(plain, quote_assets=own.quote_assets, starting_balances=own.paper_balances)
            executions.append(Execution(plain, own, exchange))
        streams = settings.partition_streams()
        for execution in executions:
            partitioned = execution.partitioned
            assert isinstance(partitioned, Partitioned), "QT_PARTITIONS > 1 runs execution partitioned"
            [loop] = consumers_of(execution)
            assert getattr(loop, "func", None) == partitioned.run, "the stage's loop is the partitioned one"
            assert partitioned.streams == streams
            for lane in partitioned.lanes:
                await lane.setup()
        # Fair shares before the run: each process announces itself, the first gives back its surplus,
        # the others take it (the next renewal is a third of QT_PARTITION_LEASE_S away, past the run).
        parts = [execution.partitioned for execution in executions if execution.partitioned is not None]
        for part in parts + parts:
            await part.tick(force=True)
        held = [sorted(part.owned) for part in parts]
        assert sorted(k for owned in held for k in owned) == list(range(layout.partitions)), held
        assert all(held), f"a process holds no partition: {held}"
        holder = {streams[k]: part.name for part in parts for k in part.owned}

        written, stored = await write_placed(raw, streams, layout.placed)
        assert len(stored) == len(written), "every XADD made one entry"
        last = {stream: entry_id for stream, entry_id in written}  # each stream's newest entry

        async def finished() -> bool:  # results and dead letters are written with the acknowledgements
            for stream, entry_id in last.items():
                if not await drained(plain, stream, settings.execution_group, entry_id):
                    return False
            return True

        fleet = Fleet(plain, settings, executions)
        death = await fleet.run_until(finished, set(written), limit_s)
        everything = show(layout.placed, written, {})
        assert not death, f"partitioned execution: {death}\nentries:\n{everything}"
        assert not fleet.redelivered(), f"delivered again: {fleet.redelivered()}\nentries:\n{everything}"
        assert set(fleet.deliveries) == set(written), f"read: {sorted(fleet.deliveries)}\nentries:\n{everything}"
        wrong = {key: names for key, names in fleet.handled_by.items() if names != {holder[key[0]]}}
        assert not wrong, f"handled by another process than the partition's holder ({holder}): {wrong}"

        found, unanswered = await outcomes_by_entry(raw, settings, stored)
        assert not unanswered, "outcomes of no entry:\n" + "\n".join(unanswered) + f"\nentries:\n{everything}"
        problems = {
            key: problem
            for item, key in zip(layout.placed, written, strict=True)
            if (problem := judge_intent(item.case, stored[key], found.get(key, [])))
        }
        assert not problems, "entries without their one outcome:\n" + show(layout.placed, written, problems)

        for stream in streams:
            pending = await plain.xpending(stream, settings.execution_group)
            assert pending["pending"] == 0, f"{stream}: {pending}"
            now_there = {(stream, entry_id.decode()) for entry_id, _fields in await raw.xrange(stream)}
            assert now_there <= set(written), f"{stream} holds entries nobody wrote: {now_there - set(written)}"
        assert await raw.xlen(settings.intent_stream) == 0, "nothing went to the unpartitioned intent stream"

        results = [payload for _id, _fields, payload in await read(raw, settings.result_stream)]
        await assert_paper_books_add_up(paper, results)
        # The gate forgot each intent once it was committed; it counted each order that left once, unless two
        # partitions held one id at once (test_two_partitions_holding_one_intent_id_count_one_order_each).
        day = datetime.now(UTC).date()
        assert await plain.hlen(keys.counted(day)) == 0
        assert await plain.hlen(keys.RISK_INFLIGHT) == 0
        if processes == 1 or len({entry_id for _stream, entry_id in written}) == len(written):
            sent = sum(1 for res in results if res.get("exchange"))
            counted = int(await plain.get(keys.daily_trades(day)) or 0)
            assert counted == sent, f"the daily counter says {counted} orders, {sent} were sent"
    finally:
        await plain.aclose()
        await raw.aclose()


@fuzz(25)
@given(
    layout=layouts(fz.hostile(fz.INTENT)), processes=st.sampled_from([1, 2]), batch_size=st.sampled_from([1, 3, 1000])
)
def test_partitioned_execution_gives_every_hostile_intent_written_to_a_partition_one_outcome(
    clean_url: str, settings_for: Callable[..., Settings], layout: Layout, processes: int, batch_size: int
) -> None:
    settings = stage_settings(settings_for, clean_url, partitions=layout.partitions, batch_size=batch_size)
    asyncio.run(execute_on_partitions(clean_url, settings, layout, processes))


@fuzz(3)
@given(layout=layouts(fz.huge(fz.INTENT)), processes=st.sampled_from([1, 2]))
def test_partitioned_execution_handles_intents_with_fields_of_a_mebibyte_written_to_a_partition(
    clean_url: str, settings_for: Callable[..., Settings], layout: Layout, processes: int
) -> None:
    settings = stage_settings(settings_for, clean_url, partitions=layout.partitions)
    asyncio.run(execute_on_partitions(clean_url, settings, layout, processes, limit_s=15.0))


async def test_a_valid_intent_on_another_symbols_partition_is_traded_where_it_lies_once(
    clean_url: str, settings_for: Callable[..., Settings]
) -> None:
    """The plain case, without hypothesis: each valid symbol written to every partition but its own."""
    partitions = 3
    placed = []
    for symbol, price in [("ETHUSDT", "3000"), ("BTCUSDT", "60000"), ("SOLUSDT", "100")]:
        home = keys.partition_of(symbol, partitions)
        payload = fz._with(fz.INTENT, symbol=symbol, price=price)
        case = fz.Case("valid", fz.pairs_of(fz.INTENT, payload), fz.VALID, want=(symbol, "BUY", "0.01"))
        placed += [Placed(case, home)] + [Placed(case, (home + k) % partitions, stray=True) for k in (1, 2)]
    settings = stage_settings(settings_for, clean_url, partitions=partitions, batch_size=3)
    await execute_on_partitions(clean_url, settings, Layout(partitions, placed))


async def test_two_partitions_holding_one_intent_id_count_one_order_each(
    clean_url: str, settings_for: Callable[..., Settings]
) -> None:
    """Two processes, each on its partition, each executing an intent with the same id (written with
    ``XADD`` and an id of the writer's choosing, or ``*`` in the same millisecond): the second gate
    runs while the first order is in flight. Each order that leaves must count against the daily limit."""
    settings = stage_settings(settings_for, clean_url, partitions=2, batch_size=10)
    plain, raw = connection.client(clean_url), aioredis.Redis.from_url(clean_url)
    try:
        paper = await fresh_server(plain, settings)
        executions = []
        for name in ("exec-a", "exec-b"):
            own = settings.model_copy(update={"consumer": name})
            exchange = PaperExchange(plain, quote_assets=own.quote_assets, starting_balances=own.paper_balances)
            executions.append(Execution(plain, own, exchange))
        parts = [execution.partitioned for execution in executions]
        for part in parts + parts:
            assert part is not None
            for lane in part.lanes:
                await lane.setup()
            await part.tick(force=True)
        held = [next(iter(part.owned)) for part in parts if part is not None and len(part.owned) == 1]
        assert len(set(held)) == 2, "each process holds one partition"
        streams = settings.partition_streams()
        seconds, _micros = await plain.time()
        same_id = f"{int(seconds) * 1000}-0"
        stamp = fz.now_stamp()
        for index, (symbol, price) in enumerate([("ETHUSDT", "3000"), ("XRPUSDT", "1")]):
            case = fz.Case("valid", fz.pairs_of(fz.INTENT, fz._with(fz.INTENT, symbol=symbol, price=price)))
            flat = [part for pair in case.pairs_for(index, stamp) for part in pair]
            await raw.execute_command("XADD", streams[keys.partition_of(symbol, 2)], same_id, *flat)

        batches = []
        for execution, partition in zip(executions, held, strict=True):
            assert execution.partitioned is not None
            batch = await execution.partitioned._next(partition)
            assert [entry.id for entry in batch] == [same_id]
            lane = execution.partitioned.lanes[partition]
            batches.append((batch, lane, Fence(keys.partition_lease(partition), execution.partitioned.holds)))
        first, second = executions
        place = first.exchange.place_orders

        async def place_after_the_other(orders: list[Any], guard: Any = None) -> Any:
            await second.handle(*batches[1])  # the other partition's intent, gated and committed meanwhile
            return await place(orders, guard=guard)

        first.exchange.place_orders = place_after_the_other  # type: ignore[method-assign]
        await first.handle(*batches[0])

        results = [payload for _id, _fields, payload in await read(raw, settings.result_stream)]
        assert [(res["status"], res["intent_id"]) for res in results] == [("FILLED", same_id)] * 2
        await assert_paper_books_add_up(paper, results)
        counted = int(await plain.get(keys.daily_trades(datetime.now(UTC).date())) or 0)
        assert counted == 2, f"two orders sent, the daily counter says {counted}"
    finally:
        await plain.aclose()
        await raw.aclose()


# --- the writers of the partitions' streams after a direct write: the router and dlq replay --------------


@pytest.mark.parametrize("then", ["kept", "deleted"])
async def test_an_entry_written_onto_a_partition_past_the_counter_never_makes_the_router_lose_a_decision(
    clean_url: str, settings_for: Callable[..., Settings], then: str
) -> None:
    """An id ahead of the intent id counter (a clock ahead, or an id chosen by the writer), even since deleted:
    the router's next intent for that partition must go past it, not fail after acknowledging its decision."""
    settings = stage_settings(settings_for, clean_url, partitions=2)
    plain, raw = connection.client(clean_url), aioredis.Redis.from_url(clean_url)
    try:
        await fresh_server(plain, settings)
        router = Router(plain, settings)
        await router.consumer.setup()
        seconds, _micros = await plain.time()
        ahead = f"{int(seconds) * 1000 + 60_000}-5"
        streams = settings.partition_streams()
        stamp = fz.now_stamp()
        valid = fz.Case("valid", fz.pairs_of(fz.INTENT, fz.BASE_PAYLOAD[fz.INTENT]))
        flat = [part for pair in valid.pairs_for(999, stamp) for part in pair]
        await raw.execute_command("XADD", streams[keys.partition_of("ETHUSDT", 2)], ahead, *flat)
        if then == "deleted":
            await raw.xdel(streams[keys.partition_of("ETHUSDT", 2)], ahead)
        symbols = ["ETHUSDT", "XRPUSDT", "ETHUSDT", "BTCUSDT", "XRPUSDT"]
        ids = [await plain.xadd(settings.decision_stream, decision(symbol=s, price=PRICES[s])) for s in symbols]

        stop = asyncio.Event()
        task = asyncio.create_task(router.consumer.run(router.handle, stop))
        for _ in range(400):
            if task.done() or await drained(plain, settings.decision_stream, settings.router_group, ids[-1]):
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 20)

        intents = {stream: await read(raw, stream) for stream in streams}
        routed = [payload.get("decision_id") for entries in intents.values() for _id, _f, payload in entries]
        assert sorted(str(d) for d in routed if d != "0-1") == sorted(ids), "each decision routed once"
        assert await plain.xlen(settings.rejected_stream) == 0
        assert await plain.xlen(settings.dead_letter_stream) == 0
        assert (await plain.xpending(settings.decision_stream, settings.router_group))["pending"] == 0
        new = [entry_id for entries in intents.values() for entry_id, _f, payload in entries if entry_id != ahead]
        assert len(set(new)) == len(new), f"intent ids repeat across partitions: {intents}"
        newest = max(new, key=lambda entry_id: tuple(map(int, entry_id.split("-"))))
        assert await plain.get(keys.PARTITION_IDS) == newest, "the counter moved past the entry written directly"
    finally:
        await plain.aclose()
        await raw.aclose()


async def test_a_dead_letter_replayed_onto_a_partition_past_the_counter_is_put_back_never_lost(
    clean_url: str, settings_for: Callable[..., Settings]
) -> None:
    settings = stage_settings(settings_for, clean_url, partitions=2)
    plain = connection.client(clean_url)
    try:
        streams = settings.partition_streams()
        seconds, _micros = await plain.time()
        ahead = f"{int(seconds) * 1000 + 60_000}-5"
        await plain.xadd(streams[1], {"x": "written directly"}, id=ahead)
        await plain.set(keys.PARTITION_IDS, f"{int(seconds) * 1000}-0")
        raw = dict(fz.pairs_of(fz.INTENT, fz.BASE_PAYLOAD[fz.INTENT]))
        fields = dead_letter_fields(
            stream=streams[1],
            group=settings.execution_group,
            entry=Entry("5-5", {k.decode(): v.decode() for k, v in raw.items()}, 1),
            reason="test",
        )
        dead_id = str(await plain.xadd(settings.dead_letter_stream, fields))

        [(_dead, origin, new_id)] = await replay(
            plain, settings.dead_letter_stream, [dead_id], numbered=streams, counter=keys.PARTITION_IDS
        )

        assert origin == streams[1]
        assert [entry_id for entry_id, _f in await plain.xrange(streams[1])] == [ahead, new_id]
        assert await plain.get(keys.PARTITION_IDS) == new_id
        assert await plain.xlen(settings.dead_letter_stream) == 0
    finally:
        await plain.aclose()
