"""SIGKILL a real journal process mid-batch, again and again: every result and every trading-state change
ends in SQL exactly once, nothing stays pending, and the positions replayed from SQL equal the live book."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from quantum_trader import keys, trading
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.events import Reason, StateChange, TradingState, now_iso
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.journal import queries
from quantum_trader.journal.database import open_database
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.journal.helpers import (
    JOURNAL_GROUP,
    pending,
    redis_book,
    replayed_from_rows,
    result_rows,
    same_state_change,
    trading_state_rows,
)
from tests.pipeline import decision, drain

RESULTS = "quantum:stream:execution.result"
STATES = "quantum:stream:risk.state"
DEAD = "quantum:stream:dead_letter"
CONSUMER = "journal-0"


class JournalProcess:
    """``quantum-trader journal`` as a child process, killed and started again by the test."""

    def __init__(self, r: Redis, env: dict[str, str], watched: str = RESULTS) -> None:
        self.r = r
        self.env = env
        self.watched = watched  # the stream whose unacknowledged entries a kill is counted holding
        self.proc: asyncio.subprocess.Process | None = None
        self.kills = 0
        self.kills_holding_work = 0

    async def start(self) -> None:
        await self.r.delete(keys.heartbeat(keys.JOURNAL, CONSUMER))
        # Its log, kept across restarts: what a failure here needs explained (the child keeps its own copy).
        log = os.open(self.env.get("QT_TEST_JOURNAL_LOG", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "quantum_trader", "journal", env=self.env, stdout=log, stderr=log
            )
        finally:
            os.close(log)
        for _ in range(300):  # consuming once it has beaten
            if await self.r.exists(keys.heartbeat(keys.JOURNAL, CONSUMER)):
                return
            await asyncio.sleep(0.02)

    async def kill(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        await self.proc.wait()
        held = await self.r.xpending_range(
            self.watched, JOURNAL_GROUP, min="-", max="+", count=1, consumername=CONSUMER
        )
        self.kills_holding_work += bool(held)

    async def kill_once_holding(self, within_s: float) -> None:
        """SIGKILL the journal the moment it holds entries read and not acknowledged (mid-batch), or after
        ``within_s`` seconds: run beside the writers, so kills land mid-batch whatever the machine's speed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while loop.time() < deadline:
            if await self.r.xpending_range(
                self.watched, JOURNAL_GROUP, min="-", max="+", count=1, consumername=CONSUMER
            ):
                break
            await asyncio.sleep(0.001)
        await self.kill()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()

    async def caught_up(self, stream: str) -> None:
        """Wait until the journal's group has nothing left to read or acknowledge on ``stream`` (or 30 s)."""
        for _ in range(300):
            group = next(g for g in await self.r.xinfo_groups(stream) if g["name"] == JOURNAL_GROUP)
            if group["lag"] == 0 and group["pending"] == 0:
                return
            await asyncio.sleep(0.1)

    async def caught_up_on_set_aside(self) -> None:
        """Also wait for the dead letters: an entry kills kept landing on is set aside, then recorded from there."""
        if await self.r.exists(DEAD):
            await self.caught_up(DEAD)


def journal_env(clean_url: str, database_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of ``quantum-trader journal``: small batches, a fast heartbeat."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_REDIS_URL": clean_url,
        "QT_DATABASE_URL": database_url,
        "QT_DATA_DIR": str(tmp_path / "data"),
        "QT_CONSUMER": CONSUMER,
        "QT_BATCH_SIZE": "15",
        "QT_BLOCK_MS": "20",
        "QT_HEARTBEAT_S": "0.1",
        "QT_LOG_LEVEL": "info",
        "QT_TEST_JOURNAL_LOG": str(tmp_path / "journal.log"),
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }


async def test_journal_killed_mid_batch_records_every_result_once_and_the_book_agrees(
    r: Redis, clean_url: str, database_url: str, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    rng = random.Random(20260120)
    settings = settings_for(clean_url, block_ms=10, paper_balances={"USDT": Decimal(10_000_000), "ETH": Decimal(50)})
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, mapping={"ETHUSDT": "3000", "BTCUSDT": "60000"})
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    router, execution = Router(r, settings), Execution(r, settings, paper)
    journal = JournalProcess(r, journal_env(clean_url, database_url, tmp_path))
    rounds = 8
    try:
        for round_no in range(rounds):
            await journal.start()
            burst = []
            for n in range(round_no * 80, round_no * 80 + 80):
                symbol, side = rng.choice(["ETHUSDT", "BTCUSDT"]), rng.choice(["BUY", "BUY", "SELL"])
                qty = rng.choice(["0.01", "0.02", "0.5"])
                burst.append(decision(symbol, side, qty, None, corr=f"c{n}", trace=f"t{n}", strategy=f"s{n % 3}"))
            killing = asyncio.create_task(journal.kill_once_holding(rng.uniform(0.5, 2.0)))
            await publish(r, settings.decision_stream, burst)
            await drain(router)
            await drain(execution)  # the journal is reading these results meanwhile
            await killing
        await journal.start()
        total = await r.xlen(RESULTS)
        await journal.caught_up(RESULTS)
        await journal.caught_up_on_set_aside()
        await journal.stop()
    finally:
        await journal.stop()

    assert journal.kills == rounds
    print(f"kills {journal.kills}, holding unacknowledged results {journal.kills_holding_work}")
    assert journal.kills_holding_work >= 2, "some kills must land while the journal holds unacknowledged results"
    assert await pending(r, RESULTS) == 0
    db = open_database(database_url)
    try:
        rows = result_rows(db)
        stream_ids = [entry_id for entry_id, _fields in await r.xrange(RESULTS)]
        assert len(stream_ids) == total == rounds * 80
        assert [row["entry_id"] for row in rows] == stream_ids  # each once, in stream order
        book = await redis_book(r)
        assert book, "the run must have filled something"
        assert replayed_from_rows(rows) == book
        assert queries.positions(db) == book
    finally:
        db.close()


def state_changes(first: int, count: int) -> list[dict[str, str]]:
    """``count`` changes of the trading state as the gate and the operator write them, numbered from ``first``."""
    states = list(TradingState)
    reasons = [Reason.OPERATOR, Reason.DAILY_LOSS, Reason.DRAWDOWN, Reason.DAY_RESET]
    start = datetime(2026, 12, 7, tzinfo=UTC)
    out = []
    for n in range(first, first + count):
        at = start + timedelta(milliseconds=n)
        change = StateChange(
            state=states[n % 3], previous=states[(n + 1) % 3], reason=reasons[n % 4], detail=f"change {n}",
            by=f"execution-{n % 2}", at=now_iso(at), until=now_iso(at + timedelta(hours=1)) if n % 4 == 1 else "",
        )  # fmt: skip
        out.append(trading.state_event(change))
    return out


async def test_journal_killed_mid_batch_records_every_state_change_once(
    r: Redis, clean_url: str, database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(20261207)
    journal = JournalProcess(r, journal_env(clean_url, database_url, tmp_path), watched=STATES)
    rounds, per_round = 8, 600
    try:
        for round_no in range(rounds):
            await journal.start()
            killing = asyncio.create_task(journal.kill_once_holding(rng.uniform(0.5, 2.0)))
            await publish(r, STATES, state_changes(round_no * per_round, per_round))  # read meanwhile
            await killing
        await journal.start()
        await journal.caught_up(STATES)
        await journal.caught_up_on_set_aside()
        await journal.stop()
    finally:
        await journal.stop()

    assert journal.kills == rounds
    print(f"kills {journal.kills}, holding unacknowledged changes {journal.kills_holding_work}")
    assert await pending(r, STATES) == 0
    stream = await r.xrange(STATES)
    assert len(stream) == rounds * per_round
    db = open_database(database_url)
    try:
        rows = trading_state_rows(db)
    finally:
        db.close()
    assert [row["entry_id"] for row in rows] == [entry_id for entry_id, _fields in stream]  # each once, in order
    problems = [
        p
        for row, (entry_id, fields) in zip(rows, stream, strict=True)
        for p in same_state_change(row, entry_id, fields)
    ]
    assert problems == []
    assert journal.kills_holding_work >= 2, "some kills must land while the journal holds unacknowledged changes"
