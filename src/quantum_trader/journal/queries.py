"""What operator commands read from the journal (no UI here: the CLI draws what these return).

Every function takes an open ``Database`` (``database.open_database(settings.journal_url())``)
and returns plain frozen structs, decimals exact.

- ``trades(db, symbol=, since=, until=, status=, strategy=, limit=50)``: results, newest first.
- ``positions(db)``: the stored positions by symbol (``portfolio.Position``).
- ``state_changes(db, limit=50)``: changes of the trading state, newest first.
- ``pnl(db, by="day" | "symbol" | "strategy", since=, until=, prices=)``: realised PnL, fees,
  fills and volume per group and quote asset, replayed from every fill in stream order (the
  cost basis needs the whole history even when only a window is reported). By strategy, each
  strategy is a book of its own: its sells are matched against its own buys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import sqlalchemy as sa

from quantum_trader import portfolio
from quantum_trader.errors import ConfigError
from quantum_trader.journal.database import Database, guarded
from quantum_trader.journal.ledger import fill_from, fill_rows, stored_positions
from quantum_trader.journal.schema import results, trading_states
from quantum_trader.portfolio import Position

ZERO = Decimal(0)
DEFAULT_LIMIT = 50
GROUPINGS = ("day", "symbol", "strategy")
Grouping = Literal["day", "symbol", "strategy"]


@dataclass(frozen=True, slots=True)
class Trade:
    """One execution result as the journal recorded it (any status; ``filled_qty`` 0 when nothing filled)."""

    entry_id: str
    timestamp: datetime | None
    status: str
    reason: str
    detail: str
    symbol: str
    side: str
    qty: Decimal
    filled_qty: Decimal
    avg_price: Decimal | None
    fee: Decimal
    fee_asset: str
    strategy: str
    confidence: float | None
    client_order_id: str
    exchange_order_id: str
    intent_id: str
    decision_id: str
    exchange: str
    trace_id: str
    correlation_id: str
    source: str


@dataclass(frozen=True, slots=True)
class StateChangeRecord:
    """One change of the trading state as the journal recorded it (``events.StateChange`` and its entry).

    ``state``, ``previous`` and ``reason`` are the wire codes as text; ``until`` is None when the
    state lasts until someone changes it.
    """

    entry_id: str
    at: datetime
    state: str
    previous: str
    reason: str
    detail: str
    by: str
    until: datetime | None
    source: str
    trace_id: str
    correlation_id: str


@dataclass(frozen=True, slots=True)
class PnL:
    """Realised PnL of one group (a UTC day, a symbol or a strategy) in one quote asset.

    ``realised`` is the PnL of the group's sells at average cost (a quote fee on a buy is in the
    cost, on a sell out of the proceeds); ``fees`` holds every fee by asset;
    ``unrealised`` values what the group still holds at ``prices`` (or the last fill's price),
    and is zero when grouping by day.
    """

    key: str
    quote: str
    realised: Decimal = ZERO
    unrealised: Decimal = ZERO
    fees: dict[str, Decimal] = field(default_factory=dict)
    fills: int = 0
    volume: Decimal = ZERO  # quote value traded


def _aware(moment: datetime | None) -> datetime | None:
    """Times come back naive from SQLite: they were stored in UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def trades(
    db: Database,
    *,
    symbol: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    status: str | None = None,
    strategy: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[Trade]:
    """Results newest first (stream order), at most ``limit``.

    ``symbol`` (``ETHUSDT``), ``status`` (``FILLED``...) and ``strategy`` match exactly;
    ``since`` is inclusive and ``until`` exclusive, on the result's timestamp (naive = UTC).
    """
    if limit <= 0:
        raise ConfigError(f"limit {limit}: give a number of trades above 0")
    query = sa.select(*(results.c[name] for name in Trade.__slots__))
    if symbol is not None:
        query = query.where(results.c.symbol == symbol)
    if status is not None:
        query = query.where(results.c.status == status)
    if strategy is not None:
        query = query.where(results.c.strategy == strategy)
    if since is not None:
        query = query.where(results.c.timestamp >= _utc(since))
    if until is not None:
        query = query.where(results.c.timestamp < _utc(until))
    query = query.order_by(results.c.entry_ms.desc(), results.c.entry_seq.desc()).limit(limit)
    with guarded(db.shown), db.engine.connect() as connection:
        rows = connection.execute(query).all()
    out = []
    for row in rows:
        values = dict(row._mapping)
        values["timestamp"] = _aware(values["timestamp"])
        out.append(Trade(**values))
    return out


def state_changes(db: Database, *, limit: int = DEFAULT_LIMIT) -> list[StateChangeRecord]:
    """Changes of the trading state newest first (stream order: the order the server made them), at most ``limit``."""
    if limit <= 0:
        raise ConfigError(f"limit {limit}: give a number of state changes above 0")
    query = (
        sa.select(*(trading_states.c[name] for name in StateChangeRecord.__slots__))
        .order_by(trading_states.c.entry_ms.desc(), trading_states.c.entry_seq.desc())
        .limit(limit)
    )
    with guarded(db.shown), db.engine.connect() as connection:
        rows = connection.execute(query).all()
    out = []
    for row in rows:
        values = dict(row._mapping)
        values["at"] = _aware(values["at"])
        values["until"] = _aware(values["until"])
        out.append(StateChangeRecord(**values))
    return out


def positions(db: Database) -> dict[str, Position]:
    """The book's positions by symbol, as the journal keeps them (replayed from its fills)."""
    with guarded(db.shown), db.engine.connect() as connection:
        return stored_positions(connection)


def _fills(db: Database) -> Iterator[Any]:
    with guarded(db.shown), db.engine.connect() as connection:
        yield from fill_rows(connection)


def pnl(
    db: Database,
    *,
    by: Grouping = "day",
    since: datetime | None = None,
    until: datetime | None = None,
    prices: Mapping[str, Decimal] | None = None,
) -> list[PnL]:
    """PnL per ``by`` group and quote asset, sorted by key then quote.

    Every fill is replayed (the cost basis needs the whole history); only fills with a
    timestamp in [``since``, ``until``) count towards realised, fees, fills and volume.
    ``prices`` (symbol -> price) values what is still held (default: each symbol's last
    fill price); by day nothing is valued.
    """
    if by not in GROUPINGS:
        raise ConfigError(f"pnl by {by!r}: choose one of {', '.join(GROUPINGS)}")
    start, end = (_utc(since) if since else None), (_utc(until) if until else None)
    books: dict[str, dict[str, Position]] = {}  # one book per strategy, or one for all
    sums: dict[tuple[str, str], dict[str, Any]] = {}
    for row in _fills(db):
        fill = fill_from(row._mapping)
        book_key = row.strategy if by == "strategy" else ""
        book = books.setdefault(book_key, {})
        before = book.get(fill.symbol) or portfolio.empty(fill.symbol, fill.base, fill.quote)
        after = portfolio.apply(before, fill, strict=False)
        book[fill.symbol] = after
        moment = _aware(row.timestamp)
        if (start and (moment is None or moment < start)) or (end and (moment is None or moment >= end)):
            continue
        key = {"day": f"{moment:%Y-%m-%d}" if moment else "", "symbol": fill.symbol, "strategy": row.strategy}[by]
        group = sums.setdefault((key, fill.quote), {"realised": ZERO, "fees": {}, "fills": 0, "volume": ZERO})
        group["realised"] += after.realised - before.realised
        group["fills"] += 1
        group["volume"] += fill.qty * fill.price
        if fill.fee and fill.fee_asset:
            group["fees"][fill.fee_asset] = group["fees"].get(fill.fee_asset, ZERO) + fill.fee
    marks = prices or {}
    out = []
    for (key, quote), group in sorted(sums.items()):
        held: list[Position] = []
        if by == "symbol":
            held = [pos for book in books.values() if (pos := book.get(key)) and pos.quote == quote]
        elif by == "strategy":
            held = [pos for pos in books.get(key, {}).values() if pos.quote == quote]
        unrealised = sum((pos.unrealised(marks.get(pos.symbol)) for pos in held), ZERO)
        out.append(PnL(key, quote, group["realised"], unrealised, group["fees"], group["fills"], group["volume"]))
    return out
