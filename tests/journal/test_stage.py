"""The journal stage on the real pipeline: every outcome once in SQL with every field, redeliveries
absorbed, dead letters recorded (never looped back), and a database outage acknowledging nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantum_trader import keys
from quantum_trader.bus import dead_letters
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.embedded import free_port
from quantum_trader.bus.streams import Entry, publish
from quantum_trader.errors import TransientError
from quantum_trader.events import EXECUTION_RESULT, envelope
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.journal import ledger
from quantum_trader.journal.database import Database, engine_for
from quantum_trader.journal.rows import replay_refusal, result_row
from quantum_trader.journal.stage import DeadLetterConsumer, Journal
from quantum_trader.redaction import redact_url
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.conftest import TEST_SECRETS, LogTrap
from tests.journal.helpers import (
    dead_letter_rows,
    drain_journal,
    pending,
    redis_book,
    rejection_rows,
    replayed_from_rows,
    result_rows,
    same_result,
)
from tests.pipeline import decision, drain

RESULTS = "quantum:stream:execution.result"
REJECTED = "quantum:stream:decision.rejected"
DEAD = "quantum:stream:dead_letter"
DECISIONS = "quantum:stream:ai.decision"
PASSWORD = "journal-secret-5f2"
TEST_SECRETS.add(PASSWORD)


@pytest.fixture
def settings(settings_for: Callable[..., Settings], clean_url: str, database_url: str) -> Settings:
    return settings_for(
        clean_url,
        database_url=database_url,
        block_ms=10,
        batch_size=7,  # several batches per stream
        paper_balances={"USDT": Decimal(100_000), "ETH": Decimal(1)},
    )


async def run_pipeline(r: Redis, settings: Settings, decisions: list[dict[str, str]]) -> None:
    """Route and execute ``decisions`` with the real stages on the paper exchange."""
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, mapping={"ETHUSDT": "3000", "BTCUSDT": "60000"})
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    await publish(r, DECISIONS, decisions)
    await drain(Router(r, settings))
    await drain(Execution(r, settings, paper))


def mixed_decisions() -> list[dict[str, str]]:
    """Fills of two symbols by two strategies, sells beyond the balance, invalid ones and a retry."""
    out = []
    for n in range(24):
        symbol = "ETHUSDT" if n % 3 else "BTCUSDT"
        side = "SELL" if n % 4 == 3 else "BUY"
        qty = "3" if n == 11 else "0.01"  # n == 11: a sell of more ETH than the account holds
        strategy = "trend" if n % 2 else "mean_reversion"
        out.append(decision(symbol, side, qty, None, corr=f"c{n}", trace=f"t{n}", strategy=strategy, confidence=0.7))
    out.append(decision(side="HOLD", corr="bad", trace="bad"))
    out.append(dict(out[0]))  # the same decision again: DUPLICATE_SKIP
    return out


async def test_every_result_and_rejection_is_recorded_once_with_every_field(
    r: Redis, settings: Settings, database_url: str
) -> None:
    await run_pipeline(r, settings, mixed_decisions())
    journal = await Journal.open(r, settings)
    try:
        await drain_journal(journal)
        stream = await r.xrange(RESULTS)
        rows = result_rows(journal.database)
        assert [row["entry_id"] for row in rows] == [entry_id for entry_id, _ in stream]
        problems = [
            p for row, (entry_id, fields) in zip(rows, stream, strict=True) for p in same_result(row, entry_id, fields)
        ]
        assert problems == []
        statuses = {row["status"] for row in rows}
        assert statuses == {"FILLED", "REJECTED"}
        assert {row["strategy"] for row in rows} == {"trend", "mean_reversion"}
        assert all(row["confidence"] == 0.7 for row in rows)

        rejected = await r.xrange(REJECTED)
        recorded = rejection_rows(journal.database)
        assert [row["entry_id"] for row in recorded] == [entry_id for entry_id, _ in rejected]
        assert sorted(row["reason"] for row in recorded) == ["DUPLICATE_SKIP", "INVALID"]
        invalid = next(row for row in recorded if row["reason"] == "INVALID")
        assert invalid["field"] == "side"
        assert "HOLD" in invalid["original"]["payload"]
        assert (invalid["trace_id"], invalid["correlation_id"], invalid["source"]) == ("bad", "bad", "router")

        assert await pending(r, RESULTS) == await pending(r, REJECTED) == 0
        # The positions table, the live book in Redis, and a replay of the database's fills agree.
        from quantum_trader.journal import queries

        book = await redis_book(r)
        assert set(book) == {"ETHUSDT", "BTCUSDT"}
        assert queries.positions(journal.database) == book == replayed_from_rows(rows)
        assert journal.totals["results"] == len(stream)
    finally:
        journal.close()


async def test_a_redelivered_batch_adds_no_row_and_moves_no_position(r: Redis, settings: Settings) -> None:
    await run_pipeline(r, settings, mixed_decisions())
    journal = await Journal.open(r, settings)
    try:
        await drain_journal(journal)
        before_rows, before_book = result_rows(journal.database), await redis_book(r)
        from quantum_trader.journal import queries

        # A crash between commit and XACK: the whole stream delivered again, as a new consumer would see it.
        for stream in (RESULTS, REJECTED, DEAD):
            await r.xgroup_setid(stream, "quantum:group:journal", "0")
        assert await drain_journal(journal) > 0
        entries = [Entry(entry_id, fields, deliveries=2) for entry_id, fields in await r.xrange(RESULTS)]
        await journal.handle_results(entries)  # and once more, directly

        assert result_rows(journal.database) == before_rows
        assert len(rejection_rows(journal.database)) == 2
        assert queries.positions(journal.database) == before_book
        assert await pending(r, RESULTS) == 0
    finally:
        journal.close()


async def test_bad_entries_are_dead_lettered_once_and_recorded_with_their_raw_fields(
    r: Redis, settings: Settings
) -> None:
    garbage_result = {"event_type": EXECUTION_RESULT, "payload": '{"status": "WEIRD"}', "trace_id": "t9"}
    not_utf8 = {"payload": "\udcff\udcfe", "nul": "a\x00b"}  # bytes that are not UTF-8, a NUL character
    [bad_id] = await publish(r, RESULTS, [garbage_result])
    [raw_dead_id] = await publish(r, DEAD, [not_utf8])
    journal = await Journal.open(r, settings)
    try:
        await drain_journal(journal)
        rows = {row["entry_id"]: row for row in dead_letter_rows(journal.database)}
        # The bad result went to the dead-letter stream (like every stage's), and from there into SQL.
        assert await r.xlen(DEAD) == 2
        [(dead_id, dead_fields)] = [entry for entry in await r.xrange(DEAD) if entry[0] != raw_dead_id]
        assert dead_fields["origin_stream"] == RESULTS
        assert dead_fields["origin_id"] == bad_id
        row = rows[dead_id]
        assert (row["origin_stream"], row["origin_id"], row["problem"]) == (RESULTS, bad_id, "")
        assert "undecodable execution result" in row["reason"]
        assert row["payload"]["raw"]["payload"] == '{"status": "WEIRD"}'
        assert row["trace_id"] == "t9"
        # A dead letter that does not decode is a row of its raw fields, never sent back to the stream.
        raw = rows[raw_dead_id]
        assert "does not decode" in raw["problem"]
        assert raw["payload"]["raw"] == {"payload": "\\xff\\xfe", "nul": "a\\x00b"}
        assert set(raw["payload"]["raw_base64"]) == {"payload"}
        assert result_rows(journal.database) == []
        assert await pending(r, RESULTS) == await pending(r, DEAD) == 0
    finally:
        journal.close()


async def test_a_dead_letter_the_journal_fails_on_is_recorded_not_sent_back(r: Redis, settings: Settings) -> None:
    [dead_id] = await publish(r, DEAD, [{"reason": "x", "payload": "{}"}])
    journal = await Journal.open(r, settings)
    try:
        consumer = next(c for c, _handler in journal.consumers if isinstance(c, DeadLetterConsumer))
        await consumer.setup()
        [entry] = await consumer.read_new(wait=False)
        # What the bus does with an entry the stage failed on alone, or died on twice.
        await consumer.dead_letter([entry], "the stage stopped 2 times while handling it alone")
        [row] = dead_letter_rows(journal.database)
        assert row["entry_id"] == dead_id
        assert "the journal could not record it: the stage stopped" in row["problem"]
        assert row["payload"]["raw"] == {"reason": "x", "payload": "{}"}
        assert await r.xlen(DEAD) == 1  # nothing new on the stream it reads
        assert await pending(r, DEAD) == 0
    finally:
        journal.close()


async def test_a_result_set_aside_after_outside_kills_is_still_recorded_once_and_moves_the_book(
    r: Redis, settings: Settings, log_trap: LogTrap
) -> None:
    """SIGKILLed again and again while it handles one result alone (an OOM killer, a watchdog, an
    operator), the journal sets that result aside as if it were poison. It must still land in
    ``results`` exactly once, under its own entry id, and move the book; and a replay, which would
    record it a second time, is refused."""
    await run_pipeline(r, settings, mixed_decisions())
    stream = await r.xrange(RESULTS)
    fills = [entry_id for entry_id, fields in stream if '"FILLED"' in fields["payload"]]
    unrecorded, committed = fills[0], fills[1]
    journal = await Journal.open(r, settings)
    try:
        consumer = journal._consumer_of(RESULTS)
        await consumer.setup()
        while await consumer.read_new(wait=False):
            pass
        for _restart in range(settings.max_deliveries):  # every restart reads its pending entries again
            await r.xreadgroup(consumer.group, consumer.consumer, {RESULTS: "0"})
        # The stage died twice on each of these alone; one of them had committed its row before the kill.
        await r.hset(keys.suspects(RESULTS, consumer.group), mapping={unrecorded: 3, committed: 3})
        [(_id, fields)] = await r.xrange(RESULTS, min=committed, max=committed)
        row = result_row(Entry(committed, fields), settings.quote_assets)
        await journal.write(lambda conn: ledger.record_results(conn, [row], journal.clock()))

        await drain_journal(journal)

        dead = await r.xrange(DEAD)
        assert sorted(fields["origin_id"] for _id, fields in dead) == sorted([unrecorded, committed])
        assert all("stopped 2 times while handling it alone" in fields["reason"] for _id, fields in dead)
        rows = result_rows(journal.database)
        assert [row["entry_id"] for row in rows] == [entry_id for entry_id, _ in stream]  # each once, in order
        from quantum_trader.journal import queries

        assert queries.positions(journal.database) == await redis_book(r) == replayed_from_rows(rows)
        assert sorted(row["origin_id"] for row in dead_letter_rows(journal.database)) == sorted([unrecorded, committed])
        assert await pending(r, RESULTS) == await pending(r, DEAD) == 0
        assert len(log_trap.lines("set_aside_entry_recorded")) == 2

        refusal = dead_letters.refusing(replay_refusal(settings.streams))
        with pytest.raises(LookupError, match="replaying it would record it twice"):
            await dead_letters.replay(r, DEAD, [dead[0][0]], refusal)
        assert await r.xlen(DEAD) == 2
        assert await r.xlen(RESULTS) == len(stream)
    finally:
        journal.close()


def unreachable_url() -> str:
    return f"postgresql+psycopg://qt:{PASSWORD}@127.0.0.1:{free_port()}/journal"


async def test_an_unreachable_database_acknowledges_nothing_and_says_so_once(
    r: Redis, settings: Settings, log_trap: LogTrap
) -> None:
    await run_pipeline(r, settings, mixed_decisions()[:5])
    url = unreachable_url()
    down = Journal(r, settings, Database(engine_for(url), redact_url(url)))
    consumer, handler = down.consumers[0]
    await consumer.setup()
    batch = await consumer.read_new(wait=False)
    for _ in range(3):  # the bus retries the batch whole, again and again
        with pytest.raises(TransientError, match=r"qt:\*\*\*@127\.0\.0\.1"):
            await consumer.process(handler, batch)
    assert await pending(r, RESULTS) == len(batch) == await r.xlen(RESULTS)
    assert await r.xlen(DEAD) == 0  # never dead-lettered
    [line] = log_trap.lines("journal_database_unavailable")
    assert "qt:***@127.0.0.1" in line
    assert PASSWORD not in line
    down.close()
    # Once a database answers, the same pending entries are recorded, all of them.
    journal = await Journal.open(r, settings)
    try:
        await drain_journal(journal)
        assert len(result_rows(journal.database)) == await r.xlen(RESULTS)
        assert await pending(r, RESULTS) == 0
    finally:
        journal.close()


def run_cli(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | env
    environment |= {"QT_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args], env=environment, capture_output=True, text=True, timeout=60
    )


def test_the_journal_command_refuses_an_unreachable_database_in_one_line(clean_url: str, tmp_path: Path) -> None:
    done = run_cli(
        ["journal", "--duration", "5"], {"QT_REDIS_URL": clean_url, "QT_DATABASE_URL": unreachable_url()}, tmp_path
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "journal database postgresql+psycopg://qt:***@127.0.0.1" in lines[0]
    assert PASSWORD not in done.stderr
    assert "Traceback" not in done.stderr


def test_the_journal_command_records_until_stopped(clean_url: str, database_url: str, tmp_path: Path) -> None:
    import redis as sync_redis

    client: Any = sync_redis.Redis.from_url(clean_url, decode_responses=True)
    try:
        client.xadd(RESULTS, envelope(EXECUTION_RESULT, {"status": "EXPIRED", "symbol": "ETHUSDT", "side": "BUY",
                    "qty": "1", "intent_id": "1-0", "client_order_id": "qt-x"}, trace_id="t", correlation_id="c",
                    source="execution"))  # fmt: skip
        done = run_cli(
            ["journal", "--duration", "2"], {"QT_REDIS_URL": clean_url, "QT_DATABASE_URL": database_url}, tmp_path
        )
        assert done.returncode == 0, done.stderr
        assert client.xpending(RESULTS, "quantum:group:journal")["pending"] == 0
    finally:
        client.close()
