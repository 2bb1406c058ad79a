"""Effectively once: SIGKILL stage processes (and the server) at random moments, then check the ledger.

Thousands of decisions (with retries and malformed ones mixed in) flow through a
router process and two execution processes while a chaos loop kills one of them
with SIGKILL every fraction of a second and starts it again. In one variant the
Valkey server itself is killed and restarted from its AOF. At the end every
decision must have exactly one terminal outcome, no order may exist twice or
without a result, balances must equal the sum of fills and the daily counter the
approvals. A deliberately broken execution (ack before the order) must fail it. In one variant
a journal process is killed with the rest: every result and rejection must then be in SQL
exactly once, in stream order, and its positions must equal the live book.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from redis.asyncio.cluster import RedisCluster

from quantum_trader import keys, portfolio
from quantum_trader.bus.cluster import wait_replicated
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.embedded import EmbeddedValkey
from quantum_trader.bus.streams import publish
from tests.chaos import named, read_ledger, violations
from tests.pipeline import decision

WORKER = str(Path(__file__).with_name("chaos_worker.py"))
START = {"USDT": Decimal(1_000_000), "ETH": Decimal(1_000)}


class Fleet:
    """The stage processes of one run, restartable by name."""

    def __init__(self, r: Redis, url: str, execution: str, database_url: str | None = None) -> None:
        self.r = r
        self.env = os.environ | {
            "QT_REDIS_URL": url,
            "QT_BATCH_SIZE": "20",
            "QT_BLOCK_MS": "50",
            "QT_CLAIM_IDLE_MS": "300",
            "QT_MAX_INTENT_AGE_S": "3600",
            "QT_LOG_LEVEL": "warning",
            "QT_HEARTBEAT_S": "0.2",
            "QT_PAPER_BALANCES": "USDT=1000000,ETH=1000",
            "PYTHONPATH": str(Path(__file__).parents[1]),
        }
        self.stages = {"router-0": "router", "exec-0": execution, "exec-1": execution}
        if database_url is not None:  # the journal too, killed like the rest
            self.stages["journal-0"] = "journal"
            self.env["QT_DATABASE_URL"] = database_url
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.kills = 0
        self.kills_holding_work = 0

    def _service(self, name: str) -> str:
        return self.stages[name] if self.stages[name] in ("router", "journal") else "execution"

    async def start(self, name: str) -> None:
        await self.r.delete(keys.heartbeat(self._service(name), name))
        self.procs[name] = await asyncio.create_subprocess_exec(
            sys.executable, WORKER, self.stages[name], env=self.env | {"QT_CONSUMER": name},
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    async def ready(self) -> None:
        """Wait until every live process has beaten once (it is consuming)."""
        for _ in range(200):
            beats = [await self.r.exists(keys.heartbeat(self._service(n), n)) for n, p in self.procs.items()
                     if p.returncode is None]  # fmt: skip
            if all(beats):
                return
            await asyncio.sleep(0.05)

    async def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.returncode is None:
            stream, group = {
                "router": (named("quantum:stream:ai.decision"), "quantum:group:router:ai.decision"),
                "journal": (named("quantum:stream:execution.result"), "quantum:group:journal"),
            }.get(self._service(name), (named("quantum:stream:trade.intent"), "quantum:group:execution:trade.intent"))
            proc.send_signal(signal.SIGKILL)
            self.kills += 1
            await proc.wait()
            try:
                held = await self.r.xpending_range(stream, group, min="-", max="+", count=1, consumername=name)
                self.kills_holding_work += bool(held)
            except Exception:  # the server may be down in the server-kill variant
                pass
        await proc.wait()

    async def revive_dead(self) -> None:
        for name, proc in self.procs.items():
            if proc.returncode is not None:
                await self.start(name)

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs.values():
            await proc.wait()


async def outcome_count(r: Redis) -> tuple[int, int]:
    """(decisions published, decisions with an outcome so far)."""
    routed = await r.xlen(named("quantum:stream:decision.rejected"))
    done = await r.xlen(named("quantum:stream:execution.result"))
    return await r.xlen(named("quantum:stream:ai.decision")), routed + done


def journaled() -> tuple[str, str]:
    """The streams the journal records, under the key names in force."""
    return named("quantum:stream:execution.result"), named("quantum:stream:decision.rejected")


async def journal_caught_up(r: Redis, deadline: float) -> None:
    """Wait until the journal has read and acknowledged every result and rejection."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        behind = 0
        for stream in journaled():
            for group in await r.xinfo_groups(stream):
                if group["name"] == "quantum:group:journal":
                    behind += int(group["pending"]) + int(group.get("lag") or 0)
        if behind == 0:
            return
        await asyncio.sleep(0.2)


async def journal_violations(r: Redis, database_url: str) -> list[str]:
    """Every way the journal disagrees with the streams and the live book."""
    from quantum_trader.journal import queries
    from quantum_trader.journal.database import open_database
    from tests.journal.helpers import rejection_rows, replayed_from_rows, result_rows

    problems = []
    db = open_database(database_url)
    try:
        results, rejections = result_rows(db), rejection_rows(db)
        stored = queries.positions(db)
    finally:
        db.close()
    streams = {stream: [entry_id for entry_id, _ in await r.xrange(stream)] for stream in journaled()}
    for stream, rows in zip(journaled(), (results, rejections), strict=True):
        if [row["entry_id"] for row in rows] != streams[stream]:
            problems.append(
                f"journal: {stream} rows {len(rows)} != entries {len(streams[stream])} (each once, in order)"
            )
    book = {symbol: portfolio.decode(raw) for symbol, raw in (await r.hgetall(keys.BOOK_POSITIONS)).items()}
    if stored != book or replayed_from_rows(results) != book:
        problems.append(f"journal: positions {stored} != the live book {book}")
    return problems


def burst(rng: random.Random, first: int, size: int) -> list[dict[str, str]]:
    """``size`` decisions numbered from ``first``: some malformed, some published twice."""
    out = []
    for n in range(first, first + size):
        if n % 37 == 0:
            out.append(decision(side="HOLD", corr=f"c{n}", trace=f"t{n}"))
        else:
            symbol, side = rng.choice(["ETHUSDT", "BTCUSDT"]), rng.choice(["BUY", "SELL"])
            out.append(decision(symbol, side, "0.001", None, corr=f"c{n}", trace=f"t{n}"))
        if n % 11 == 0:
            out.append(dict(out[-1]))  # a retry of the same decision
    return out


class Server(Protocol):
    """Where the fleet runs: one server or a cluster (its URL; ``kill_server`` needs ``kill`` and ``restart``)."""

    @property
    def url(self) -> str: ...


# Called each round after a stage was killed (the round's number): the cluster's failover.
Disruption = Callable[[int], Awaitable[None]]


async def published(r: Redis, stream: str, entries: list[dict[str, str]]) -> None:
    """Publish as a publisher that loses nothing must on a cluster: until a replica holds the entries.

    A primary acknowledges before its replica has the write; if it dies then, the entries are
    gone. Publishing again is safe: the router takes the copies for retries of one decision."""
    while True:
        await publish(r, stream, entries)
        if not isinstance(r, RedisCluster) or await wait_replicated(r, stream, timeout_ms=2000) >= 1:
            return


async def chaos_run(
    server: Server,
    *,
    execution: str = "execution",
    kill_server: bool = False,
    rounds: int = 20,
    database_url: str | None = None,
    disrupt: Disruption | None = None,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Run the fleet under fire and return the ledger's violations (and the journal's, with ``database_url``)."""
    rng = random.Random(20260117)
    r = client(server.url)
    fleet = Fleet(r, server.url, execution, database_url)
    fleet.env |= env or {}
    try:
        await r.set(keys.KILL_SWITCH, "0")
        await r.hset(keys.PRICE_HASH, mapping={"ETHUSDT": "3000", "BTCUSDT": "60000"})
        for name in fleet.stages:
            await fleet.start(name)
        for round_no in range(rounds):
            await fleet.ready()
            await published(r, named("quantum:stream:ai.decision"), burst(rng, round_no * 100, 100))
            await asyncio.sleep(rng.uniform(0.0, 0.03))  # mid-burst: the stages are busy
            await fleet.kill(rng.choice(sorted(fleet.stages)))
            if disrupt is not None:
                await disrupt(round_no)
            if kill_server and round_no % 5 == 2:
                assert isinstance(server, EmbeddedValkey)
                server.kill()
                await asyncio.sleep(0.2)
                server.restart()
                await r.connection_pool.disconnect()  # our own connections died with the server
            if rng.random() < 0.75:
                await fleet.revive_dead()  # otherwise it stays dead a round: the others reclaim its entries
        await fleet.revive_dead()
        loop = asyncio.get_running_loop()
        deadline, last, stalled_since = loop.time() + 60, -1, loop.time()
        while loop.time() < deadline:
            total, done = await outcome_count(r)
            if done >= total:
                break
            if done != last:
                last, stalled_since = done, loop.time()
            elif loop.time() - stalled_since > 5:
                break  # no progress for 5 s: whatever is missing is lost
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # anything still in flight lands (or shows up as a duplicate)
        if database_url is not None:
            await journal_caught_up(r, deadline=loop.time() + 60)
        await fleet.stop()
        assert fleet.kills >= rounds // 2, "the chaos loop must really have killed processes"
        if execution == "execution":
            assert fleet.kills_holding_work >= 3, "some kills must land while a process holds unfinished entries"
        day_key = keys.daily_trades(datetime.now(UTC).date())
        problems = violations(await read_ledger(r, day_key), START)
        if database_url is not None:
            problems += await journal_violations(r, database_url)
        return problems
    finally:
        await fleet.stop()
        await r.aclose()


async def test_processes_killed_at_random_moments_lose_and_duplicate_nothing(
    valkey_factory: Callable[..., EmbeddedValkey],
) -> None:
    problems = await chaos_run(valkey_factory())
    assert problems == []


async def test_server_killed_and_restarted_from_its_aof_loses_and_duplicates_nothing(
    valkey_factory: Callable[..., EmbeddedValkey],
) -> None:
    # appendfsync always: every acknowledged write is on disk before the reply, so a
    # SIGKILL of the server loses nothing the pipeline was told had been written.
    problems = await chaos_run(valkey_factory(appendfsync="always"), kill_server=True)
    assert problems == []


async def test_the_journal_killed_with_the_rest_records_every_outcome_once_and_agrees_with_the_book(
    valkey_factory: Callable[..., EmbeddedValkey], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'journal.sqlite3'}"
    problems = await chaos_run(valkey_factory(), database_url=url)
    assert problems == []


async def test_the_check_catches_an_execution_that_acks_before_the_order(
    valkey_factory: Callable[..., EmbeddedValkey],
) -> None:
    problems = await chaos_run(valkey_factory(), execution="execution-ack-first", rounds=12)
    assert problems, "a broken execution passed the effectively-once check: the check proves nothing"
    assert any("has 0 outcomes" in p or "has 0 results" in p or "has no result" in p for p in problems)
