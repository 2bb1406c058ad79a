"""The journal's database: migrations from nothing and from each earlier revision, a newer schema
refused, exact decimals on both backends, and the shipped schema equal to the tables the code writes."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from quantum_trader.errors import ConfigError, TransientError
from quantum_trader.journal import ledger
from quantum_trader.journal.database import current_revision, head_revision, known_revisions, migrate, open_database
from quantum_trader.journal.schema import metadata, results, trading_states

NOW = datetime(2026, 1, 20, 12, 0, tzinfo=UTC)


def result_row(entry_id: str, symbol: str = "ETHUSDT", side: str = "BUY", **changes: object) -> dict[str, object]:
    """A results row as rows.result_row makes it (a fill of 0.1 at 3000, fee 0.3 USDT)."""
    ms, _, seq = entry_id.partition("-")
    row: dict[str, object] = {
        "entry_id": entry_id, "entry_ms": int(ms), "entry_seq": int(seq),
        "status": "FILLED", "reason": "", "detail": "", "symbol": symbol, "side": side,
        "qty": Decimal("0.1"), "filled_qty": Decimal("0.1"), "avg_price": Decimal("3000"),
        "fee": Decimal("0.3"), "fee_asset": "USDT", "client_order_id": f"qt-{entry_id}",
        "exchange_order_id": "x", "intent_id": entry_id, "decision_id": entry_id, "exchange": "paper",
        "strategy": "trend", "confidence": 0.5, "is_fill": True, "base": symbol.removesuffix("USDT"),
        "quote": "USDT", "trace_id": "t", "correlation_id": "c", "timestamp": NOW, "source": "execution",
    }  # fmt: skip
    return row | changes


def test_an_empty_database_is_migrated_to_the_newest_revision(database_url: str) -> None:
    db = open_database(database_url)
    try:
        with db.engine.connect() as connection:
            assert current_revision(connection) == head_revision()
            assert set(sa.inspect(connection).get_table_names()) >= {
                "results",
                "rejections",
                "dead_letters",
                "positions",
                "trading_states",
            }
        open_database(database_url).close()  # a second start changes nothing
    finally:
        db.close()


def test_the_shipped_migrations_build_exactly_the_tables_the_code_writes(database_url: str) -> None:
    db = open_database(database_url)
    try:
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": False})
            assert compare_metadata(context, metadata) == []
    finally:
        db.close()


def test_a_database_before_the_positions_revision_is_upgraded_and_its_positions_rebuilt(database_url: str) -> None:
    previous = "0001"
    assert known_revisions().index("0002") == known_revisions().index(previous) + 1
    db = open_database(database_url, upgrade=False)
    try:
        migrate(db, previous)
        with db.engine.begin() as connection:
            assert current_revision(connection) == previous
            assert "positions" not in sa.inspect(connection).get_table_names()
            connection.execute(
                results.insert(),
                [
                    result_row("1-0"),
                    result_row("2-0", side="SELL", filled_qty=Decimal("0.04"), avg_price=Decimal("3100")),
                ],
            )
        migrate(db)
        with db.engine.begin() as connection:
            assert current_revision(connection) == head_revision()
            assert ledger.rebuild_missing_positions(connection, NOW) == ["ETHUSDT"]
            position = ledger.stored_positions(connection)["ETHUSDT"]
        assert position.qty == Decimal("0.06")
        assert position.fills == 2
        # bought 0.1 for 300.3 (fee in cost); sold 0.04 for 124 - 0.3 fee against 120.12 of cost
        assert position.realised == Decimal("124") - Decimal("0.3") - Decimal("300.3") * Decimal("0.04") / Decimal(
            "0.1"
        )
    finally:
        db.close()


def test_a_database_at_0002_gains_the_trading_states_its_rows_kept_and_the_schema_agrees(database_url: str) -> None:
    assert known_revisions()[:3] == ["0001", "0002", "0003"]
    db = open_database(database_url, upgrade=False)
    try:
        migrate(db, "0002")
        with db.engine.begin() as connection:
            assert current_revision(connection) == "0002"
            assert "trading_states" not in sa.inspect(connection).get_table_names()
            ledger.record_results(connection, [result_row("1-0")], NOW)
        migrate(db)
        with db.engine.begin() as connection:
            assert current_revision(connection) == head_revision()
            context = MigrationContext.configure(connection, opts={"compare_type": False})
            assert compare_metadata(context, metadata) == []
            assert connection.execute(sa.select(results.c.entry_id)).scalars().all() == ["1-0"]
            assert ledger.stored_positions(connection)["ETHUSDT"].qty == Decimal("0.1")
            change = {
                "entry_id": "5-1", "entry_ms": 5, "entry_seq": 1, "state": "HALTED", "previous": "ACTIVE",
                "reason": "DAILY_LOSS", "detail": "lost 510 USDT today", "by": "execution-0", "at": NOW,
                "until": NOW.replace(day=21, hour=0), "trace_id": "t", "correlation_id": "c", "timestamp": NOW,
                "source": "execution-0",
            }  # fmt: skip
            assert ledger.record_trading_states(connection, [change]) == {"5-1"}
            assert ledger.record_trading_states(connection, [change]) == set()
            [row] = connection.execute(sa.select(trading_states)).all()
        assert (row.state, row.previous, row.reason, row.by) == ("HALTED", "ACTIVE", "DAILY_LOSS", "execution-0")
        until = row.until if row.until.tzinfo else row.until.replace(tzinfo=UTC)  # SQLite: naive, in UTC
        assert until == datetime(2026, 1, 21, tzinfo=UTC)
    finally:
        db.close()


def test_a_database_from_a_newer_version_is_refused_in_one_line(database_url: str) -> None:
    db = open_database(database_url)
    try:
        with db.engine.begin() as connection:
            connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        db.close()
    with pytest.raises(ConfigError) as refused:
        open_database(database_url)
    message = str(refused.value)
    assert "'9999'" in message
    assert "newer quantum-trader" in message
    assert "\n" not in message
    with pytest.raises(ConfigError):
        open_database(database_url, upgrade=False)


def test_amounts_round_trip_exactly(database_url: str) -> None:
    amounts = [Decimal("0.000000000000000001"), Decimal("9999999999999999.99999999"), Decimal("0.1"), Decimal("3e-8")]
    db = open_database(database_url)
    try:
        with db.engine.begin() as connection:
            rows = [result_row(f"{n + 1}-0", qty=amount, fee=amount) for n, amount in enumerate(amounts)]
            assert ledger.insert_new(connection, results, rows) == {"1-0", "2-0", "3-0", "4-0"}
            back = connection.execute(sa.select(results.c.qty, results.c.fee).order_by(results.c.entry_ms)).all()
        assert [row.qty for row in back] == amounts
        assert [row.fee for row in back] == amounts
        assert all(isinstance(row.qty, Decimal) for row in back)
    finally:
        db.close()


def test_an_unreachable_database_is_one_line_with_the_password_hidden() -> None:
    from quantum_trader.bus.embedded import free_port
    from tests.conftest import TEST_SECRETS

    TEST_SECRETS.add("journal-pw-7d1")
    url = f"postgresql+psycopg://qt:journal-pw-7d1@127.0.0.1:{free_port()}/journal"
    with pytest.raises(TransientError) as failed:
        open_database(url)
    message = str(failed.value)
    assert "journal-pw-7d1" not in message
    assert "qt:***@127.0.0.1" in message
    assert "\n" not in message
