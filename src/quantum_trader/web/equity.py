"""The realised-PnL curve from the journal: one point per fill, for the dashboard's chart.

The same replay as ``journal.queries.pnl`` (average cost, every fill in stream order, since the
cost basis needs the whole history), kept per fill instead of summed per group. Only what was
realised: a curve of unrealised PnL would need the price history, which nothing keeps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from quantum_trader import portfolio
from quantum_trader.journal.database import Database, guarded
from quantum_trader.journal.ledger import fill_from, fill_rows
from quantum_trader.portfolio import Position

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Point:
    """Realised PnL in ``quote`` accumulated from the window's start up to and including one fill."""

    time: datetime
    quote: str
    realised: Decimal
    fills: int


def equity_series(
    db: Database, *, since: datetime | None = None, until: datetime | None = None, limit: int = 1000
) -> list[Point]:
    """The newest ``limit`` points, oldest first; only fills timed in [``since``, ``until``) count (naive = UTC)."""
    start, end = _aware(since), _aware(until)
    book: dict[str, Position] = {}
    sums: dict[str, tuple[Decimal, int]] = {}
    points: deque[Point] = deque(maxlen=limit)
    with guarded(db.shown), db.engine.connect() as connection:
        for row in fill_rows(connection):
            fill = fill_from(row._mapping)
            before = book.get(fill.symbol) or portfolio.empty(fill.symbol, fill.base, fill.quote)
            after = portfolio.apply(before, fill, strict=False)
            book[fill.symbol] = after
            moment = _aware(row.timestamp)
            if moment is None or (start and moment < start) or (end and moment >= end):
                continue
            realised, count = sums.get(fill.quote, (ZERO, 0))
            sums[fill.quote] = realised, count = realised + after.realised - before.realised, count + 1
            points.append(Point(moment, fill.quote, realised, count))
    return list(points)


def _aware(moment: datetime | None) -> datetime | None:
    """Times come back naive from SQLite: they were stored in UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
