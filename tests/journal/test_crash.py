"""SIGKILL a real journal process mid-batch, again and again: every result ends in SQL exactly once,
nothing stays pending, and the positions replayed from SQL equal the live book in Redis."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.journal import queries
from quantum_trader.journal.database import open_database
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.journal.helpers import JOURNAL_GROUP, pending, redis_book, replayed_from_rows, result_rows
from tests.pipeline import decision, drain

RESULTS = "quantum:stream:execution.result"
CONSUMER = "journal-0"


class JournalProcess:
    """``quantum-trader journal`` as a child process, killed and started again by the test."""

    def __init__(self, r: Redis, env: dict[str, str]) -> None:
        self.r = r
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.kills = 0
        self.kills_holding_work = 0

    async def start(self) -> None:
        await self.r.delete(keys.heartbeat(keys.JOURNAL, CONSUMER))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quantum_trader", "journal", env=self.env, stderr=asyncio.subprocess.DEVNULL
        )
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
        held = await self.r.xpending_range(RESULTS, JOURNAL_GROUP, min="-", max="+", count=1, consumername=CONSUMER)
        self.kills_holding_work += bool(held)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_REDIS_URL": clean_url,
        "QT_DATABASE_URL": database_url,
        "QT_DATA_DIR": str(tmp_path / "data"),
        "QT_CONSUMER": CONSUMER,
        "QT_BATCH_SIZE": "15",
        "QT_BLOCK_MS": "20",
        "QT_HEARTBEAT_S": "0.1",
        "QT_LOG_LEVEL": "warning",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    journal = JournalProcess(r, env)
    rounds = 8
    try:
        for round_no in range(rounds):
            await journal.start()
            burst = []
            for n in range(round_no * 80, round_no * 80 + 80):
                symbol, side = rng.choice(["ETHUSDT", "BTCUSDT"]), rng.choice(["BUY", "BUY", "SELL"])
                qty = rng.choice(["0.01", "0.02", "0.5"])
                burst.append(decision(symbol, side, qty, None, corr=f"c{n}", trace=f"t{n}", strategy=f"s{n % 3}"))
            await publish(r, settings.decision_stream, burst)
            await drain(router)
            await drain(execution)  # the journal is reading these results meanwhile
            await asyncio.sleep(rng.uniform(0.0, 0.15))
            await journal.kill()
        await journal.start()
        total = await r.xlen(RESULTS)
        for _ in range(300):  # until the restarted journal has caught up (or 30 s)
            group = next(g for g in await r.xinfo_groups(RESULTS) if g["name"] == JOURNAL_GROUP)
            if group["lag"] == 0 and group["pending"] == 0:
                break
            await asyncio.sleep(0.1)
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
