"""The operator queries: trades filtered and newest first, positions, and PnL by day, symbol and strategy."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from quantum_trader.errors import ConfigError
from quantum_trader.journal import ledger, queries
from quantum_trader.journal.database import Database, open_database
from tests.journal.test_database import result_row

DAY1 = datetime(2026, 1, 20, 10, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A journal with a small history: two strategies trading ETH over two days, one rejected order."""
    database = open_database(database_url)
    rows = [
        result_row("1-0", strategy="trend", timestamp=DAY1, avg_price=Decimal("3000")),  # buy 0.1, fee 0.3 USDT
        result_row("2-0", strategy="mean", timestamp=DAY1, avg_price=Decimal("2900")),  # buy 0.1
        result_row("3-0", strategy="trend", side="SELL", timestamp=DAY2, avg_price=Decimal("3300")),  # sell 0.1
        result_row(
            "4-0",
            strategy="mean",
            status="REJECTED",
            reason="MAX_NOTIONAL",
            filled_qty=Decimal(0),
            avg_price=None,
            fee=Decimal(0),
            is_fill=False,
            timestamp=DAY2,
        ),
        result_row("5-0", symbol="BTCUSDT", strategy="trend", timestamp=DAY2, avg_price=Decimal("60000")),
    ]
    with database.engine.begin() as connection:
        ledger.record_results(connection, rows, DAY2)
    yield database
    database.close()


def test_trades_are_newest_first_and_filtered(db: Database) -> None:
    assert [t.entry_id for t in queries.trades(db)] == ["5-0", "4-0", "3-0", "2-0", "1-0"]
    assert [t.entry_id for t in queries.trades(db, limit=2)] == ["5-0", "4-0"]
    assert [t.entry_id for t in queries.trades(db, symbol="BTCUSDT")] == ["5-0"]
    assert [t.entry_id for t in queries.trades(db, status="REJECTED")] == ["4-0"]
    assert [t.entry_id for t in queries.trades(db, strategy="mean")] == ["4-0", "2-0"]
    assert [t.entry_id for t in queries.trades(db, since=DAY2)] == ["5-0", "4-0", "3-0"]
    assert [t.entry_id for t in queries.trades(db, until=DAY2)] == ["2-0", "1-0"]
    [trade] = queries.trades(db, status="REJECTED")
    assert (trade.reason, trade.filled_qty, trade.avg_price, trade.timestamp) == (
        "MAX_NOTIONAL", Decimal(0), None, DAY2,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="above 0"):
        queries.trades(db, limit=0)


def test_positions_are_the_fills_replayed(db: Database) -> None:
    book = queries.positions(db)
    assert set(book) == {"ETHUSDT", "BTCUSDT"}
    assert book["ETHUSDT"].qty == Decimal("0.1")
    assert book["ETHUSDT"].fills == 3
    assert book["BTCUSDT"].qty == Decimal("0.1")


def test_pnl_by_day_symbol_and_strategy(db: Database) -> None:
    # One book: the sell of 0.1 at 3300 matches half of the average cost (300.3 + 290.3) / 0.2.
    cost = (Decimal("300.3") + Decimal("290.3")) / 2
    realised = Decimal("330") - Decimal("0.3") - cost
    by_day = {(p.key, p.quote): p for p in queries.pnl(db, by="day")}
    assert set(by_day) == {("2026-01-20", "USDT"), ("2026-01-21", "USDT")}
    assert by_day["2026-01-20", "USDT"].realised == 0
    assert by_day["2026-01-21", "USDT"].realised == realised
    assert by_day["2026-01-21", "USDT"].fills == 2
    assert by_day["2026-01-21", "USDT"].fees == {"USDT": Decimal("0.6")}

    by_symbol = {p.key: p for p in queries.pnl(db, by="symbol", prices={"BTCUSDT": Decimal("61000")})}
    assert by_symbol["ETHUSDT"].realised == realised
    assert by_symbol["BTCUSDT"].unrealised == Decimal("6100") - Decimal("6000.3")
    assert by_symbol["ETHUSDT"].volume == Decimal("300") + Decimal("290") + Decimal("330")

    # A book per strategy: trend's sell matches trend's own buy at 3000.
    by_strategy = {p.key: p for p in queries.pnl(db, by="strategy")}
    assert by_strategy["trend"].realised == Decimal("330") - Decimal("0.3") - Decimal("300.3")
    assert by_strategy["mean"].realised == 0
    assert by_strategy["mean"].unrealised == Decimal("0.1") * Decimal("2900") - Decimal("290.3")

    assert [p.key for p in queries.pnl(db, by="day", since=DAY2)] == ["2026-01-21"]
    with pytest.raises(ConfigError, match="choose one of"):
        queries.pnl(db, by="week")  # type: ignore[arg-type]
