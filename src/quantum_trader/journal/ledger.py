"""Writing the journal: one transaction per batch, idempotent on the stream entry id.

Rows go in with INSERT ... ON CONFLICT DO NOTHING, after reading which of the batch's entry
ids are there already: an entry recorded before (a redelivery after a crash between commit
and acknowledgement) adds nothing, and only the rows this batch added move the book.

Positions are the fills replayed with ``portfolio.replay(..., strict=False)`` in stream order,
the order execution's commit moved the live book in. A batch whose fills of a symbol all
come after the newest fill in that symbol's position extends it; any other (a batch handled
out of order, a position missing) replays the symbol's fills from the first. On PostgreSQL
a transaction-scoped advisory lock serialises position updates across journal processes;
SQLite has one writer at a time anyway.

These functions are synchronous and take an open connection: the stage calls them in a
thread, the tests and the benchmark directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from quantum_trader import portfolio
from quantum_trader.journal.rows import Row
from quantum_trader.journal.schema import dead_letters, positions, rejections, results, trading_states
from quantum_trader.portfolio import Fill, Position

# Serialises position updates of journals sharing one PostgreSQL database ("qtbook").
_BOOK_LOCK = 0x7174626F6F6B


def _insert(connection: sa.Connection, table: sa.Table) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def insert_new(connection: sa.Connection, table: sa.Table, rows: Sequence[Row]) -> set[str]:
    """Insert the rows not recorded yet (by entry id); the entry ids this call added.

    The ids already there are read first, then the rest go in with one executemany (ON CONFLICT
    DO NOTHING all the same). INSERT ... RETURNING would say the same in one statement, but it
    renders one statement per thousand rows that psycopg spends a third of a second parsing.
    Another writer cannot slip a row in between: PostgreSQL callers that depend on it hold the
    book lock, and SQLite refuses a write from a transaction whose reads another commit made stale.
    """
    if not rows:
        return set()
    ids = [row["entry_id"] for row in rows]
    there = set(connection.execute(sa.select(table.c.entry_id).where(table.c.entry_id.in_(ids))).scalars())
    new = [row for row in rows if row["entry_id"] not in there]
    if new and connection.dialect.name == "postgresql":
        _copy_new(connection, table, new)
    elif new:
        sql, order, processors = _plan(connection, table)
        params: list[Any] = []
        for row in new:
            values = [convert(row.get(name)) if convert else row.get(name) for name, convert in processors]
            params.append(tuple(values[i] for i in order) if order else dict(zip(table.c.keys(), values, strict=True)))
        connection.exec_driver_sql(sql, params)
    return {row["entry_id"] for row in new}


_PLANS: dict[tuple[str, str], tuple[str, list[int], list[tuple[str, Any]]]] = {}


def _copy_new(connection: sa.Connection, table: sa.Table, rows: Sequence[Row]) -> None:
    """PostgreSQL: COPY the rows into a per-transaction staging table, then INSERT ... SELECT ... ON
    CONFLICT DO NOTHING. COPY streams the batch (~12 us a row) where executemany runs a statement
    per row (~100 us a row on this table)."""
    _sql, _order, processors = _plan(connection, table)
    names = ", ".join(f'"{name}"' for name, _convert in processors)
    staging = f"journal_staging_{table.name}"
    driver = connection.connection.driver_connection
    assert driver is not None  # an open SQLAlchemy connection always has one
    with driver.cursor() as cursor:
        cursor.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE "{table.name}" INCLUDING DEFAULTS) ON COMMIT DELETE ROWS'
        )
        with cursor.copy(f"COPY {staging} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([convert(row.get(name)) if convert else row.get(name) for name, convert in processors])
        cursor.execute(
            f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM {staging} ON CONFLICT (entry_id) DO NOTHING'
        )


def _plan(connection: sa.Connection, table: sa.Table) -> tuple[str, list[int], list[tuple[str, Any]]]:
    """The table's INSERT ... ON CONFLICT DO NOTHING as the driver's SQL, and each column's conversion.

    Compiled once per dialect and table, then handed to the driver's executemany with values
    converted by the columns' own bind processors: SQLAlchemy's per-row statement handling cost
    ~60 us a row on SQLite and ~150 us on PostgreSQL, most of the journal's time.
    """
    key = (connection.dialect.name, table.name)
    if key not in _PLANS:
        columns = list(table.c)
        stmt = _insert(connection, table).values({c.name: sa.bindparam(c.name) for c in columns})
        compiled = stmt.on_conflict_do_nothing(index_elements=["entry_id"]).compile(dialect=connection.dialect)
        names = [c.name for c in columns]
        # Positional drivers (sqlite3) take a tuple in the statement's order; named ones (psycopg) a dict.
        order = [names.index(name) for name in compiled.positiontup] if compiled.positiontup else []
        dialect = connection.dialect
        processors = [(c.name, c.type.dialect_impl(dialect).bind_processor(dialect)) for c in columns]
        _PLANS[key] = (compiled.string, order, processors)
    return _PLANS[key]


def record_results(connection: sa.Connection, rows: Sequence[Row], now: datetime) -> set[str]:
    """Record result rows and move the positions of the symbols they filled; the entry ids added."""
    if connection.dialect.name == "postgresql":
        # Before reading which rows exist: a second journal process waits for this one's commit.
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_BOOK_LOCK)))
    added = insert_new(connection, results, rows)
    fills = [row for row in rows if row["is_fill"] and row["entry_id"] in added]
    if fills:
        update_positions(connection, fills, now)
    return added


def record_rejections(connection: sa.Connection, rows: Sequence[Row]) -> set[str]:
    """Record rejection rows; the entry ids added."""
    return insert_new(connection, rejections, rows)


def record_dead_letters(connection: sa.Connection, rows: Sequence[Row]) -> set[str]:
    """Record dead-letter rows; the entry ids added."""
    return insert_new(connection, dead_letters, rows)


def record_trading_states(connection: sa.Connection, rows: Sequence[Row]) -> set[str]:
    """Record trading-state change rows; the entry ids added."""
    return insert_new(connection, trading_states, rows)


def fill_from(row: Mapping[str, Any]) -> Fill:
    """The fill a ``results`` row with ``is_fill`` holds (the same one execution booked)."""
    return Fill(
        symbol=row["symbol"],
        base=row["base"],
        quote=row["quote"],
        side=row["side"],
        qty=row["filled_qty"],
        price=row["avg_price"],
        fee=row["fee"],
        fee_asset=row["fee_asset"],
    )


_FILL_COLUMNS = (
    results.c.entry_ms,
    results.c.entry_seq,
    results.c.symbol,
    results.c.base,
    results.c.quote,
    results.c.side,
    results.c.filled_qty,
    results.c.avg_price,
    results.c.fee,
    results.c.fee_asset,
    results.c.strategy,
    results.c.timestamp,
)


def fill_rows(connection: sa.Connection, *, symbols: Iterable[str] | None = None) -> Iterator[Any]:
    """Every result row with a fill (of ``symbols``, default all), in stream order."""
    query = sa.select(*_FILL_COLUMNS).where(results.c.is_fill.is_(True))
    if symbols is not None:
        query = query.where(results.c.symbol.in_(list(symbols)))
    query = query.order_by(results.c.entry_ms, results.c.entry_seq).execution_options(yield_per=5000)
    yield from connection.execute(query)


def update_positions(connection: sa.Connection, fills: Sequence[Row], now: datetime) -> None:
    """Move the stored position of each symbol in ``fills`` (rows just added) past them.

    On PostgreSQL the caller holds the book lock (``record_results``).
    """
    by_symbol: dict[str, list[Row]] = {}
    for row in sorted(fills, key=lambda row: (row["entry_ms"], row["entry_seq"])):
        by_symbol.setdefault(row["symbol"], []).append(row)
    stored = {
        row.symbol: row
        for row in connection.execute(
            sa.select(positions.c.symbol, positions.c.data, positions.c.last_ms, positions.c.last_seq).where(
                positions.c.symbol.in_(list(by_symbol))
            )
        )
    }
    rebuild = []
    for symbol, new in by_symbol.items():
        was = stored.get(symbol)
        if was is not None and (new[0]["entry_ms"], new[0]["entry_seq"]) > (was.last_ms, was.last_seq):
            start = {symbol: portfolio.decode(was.data)}
            book = portfolio.replay((fill_from(row) for row in new), strict=False, start=start)
            last = new[-1]
            write_position(connection, book[symbol], (last["entry_ms"], last["entry_seq"]), now)
        else:
            rebuild.append(symbol)
    if rebuild:
        replay_positions(connection, rebuild, now)


def replay_positions(connection: sa.Connection, symbols: Sequence[str], now: datetime) -> None:
    """Recompute the positions of ``symbols`` from every fill they have, and store them."""
    last: dict[str, tuple[int, int]] = {}

    def fills() -> Iterator[Fill]:
        for row in fill_rows(connection, symbols=symbols):
            last[row.symbol] = (row.entry_ms, row.entry_seq)
            yield fill_from(row._mapping)

    book = portfolio.replay(fills(), strict=False)
    for symbol, position in book.items():
        write_position(connection, position, last[symbol], now)


def write_position(connection: sa.Connection, position: Position, last: tuple[int, int], now: datetime) -> None:
    """Insert or replace one symbol's position row."""
    values = {
        "symbol": position.symbol,
        "base": position.base,
        "quote": position.quote,
        "qty": position.qty,
        "cost": position.cost,
        "realised": position.realised,
        "unbooked": position.unbooked,
        "fills": position.fills,
        "last_price": position.last_price,
        "data": portfolio.encode(position),
        "last_ms": last[0],
        "last_seq": last[1],
        "updated_at": now,
    }
    statement = _insert(connection, positions).values(values)
    update = {name: statement.excluded[name] for name in values if name != "symbol"}
    connection.execute(statement.on_conflict_do_update(index_elements=["symbol"], set_=update))


def rebuild_missing_positions(connection: sa.Connection, now: datetime) -> list[str]:
    """Replay the position of every symbol that has fills but no position row (after the positions
    revision, or an operator's DELETE); the symbols rebuilt."""
    filled = sa.select(results.c.symbol).where(results.c.is_fill.is_(True)).distinct()
    have = sa.select(positions.c.symbol)
    missing = sorted(connection.execute(filled.except_(have)).scalars())
    if missing:
        replay_positions(connection, missing, now)
    return missing


def stored_positions(connection: sa.Connection) -> dict[str, Position]:
    """Every stored position by symbol."""
    return {
        row.symbol: portfolio.decode(row.data)
        for row in connection.execute(sa.select(positions.c.symbol, positions.c.data).order_by(positions.c.symbol))
    }


def wipe(connection: sa.Connection) -> dict[str, int]:
    """Delete the account's rows (``paper reset``: the account starts over); rows deleted per table.

    The trading-state changes stay: a reset leaves the trading state as it is, and its history
    is what explains it.
    """
    deleted = {}
    for table in (results, rejections, dead_letters, positions):
        deleted[table.name] = connection.execute(sa.delete(table)).rowcount
    return deleted
