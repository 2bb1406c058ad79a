"""Scenario helpers for journal tests: drain a journal, read the ledger back from SQL."""

from __future__ import annotations

import json
from datetime import UTC
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from quantum_trader import book, portfolio
from quantum_trader.bus.connection import Redis
from quantum_trader.events import parse_iso
from quantum_trader.journal import ledger
from quantum_trader.journal.database import Database
from quantum_trader.journal.schema import dead_letters, rejections, results, trading_states
from quantum_trader.portfolio import Position

JOURNAL_GROUP = "quantum:group:journal"


async def drain_journal(journal: Any) -> int:
    """Run each of the journal's consumers until nothing is left to read; the entries handled."""
    handled = 0
    for consumer, handler in journal.consumers:
        await consumer.setup()
        while True:
            batch = await consumer.next_batch() or await consumer.read_new(wait=False)
            if not batch:
                break
            await consumer.process(handler, batch)
            handled += len(batch)
    return handled


def table_rows(db: Database, table: sa.Table) -> list[dict[str, Any]]:
    """Every row of ``table`` in stream order."""
    with db.engine.connect() as connection:
        query = sa.select(table).order_by(table.c.entry_ms, table.c.entry_seq)
        return [dict(row._mapping) for row in connection.execute(query)]


def result_rows(db: Database) -> list[dict[str, Any]]:
    return table_rows(db, results)


def rejection_rows(db: Database) -> list[dict[str, Any]]:
    return table_rows(db, rejections)


def dead_letter_rows(db: Database) -> list[dict[str, Any]]:
    return table_rows(db, dead_letters)


def trading_state_rows(db: Database) -> list[dict[str, Any]]:
    return table_rows(db, trading_states)


def replayed_from_rows(rows: list[dict[str, Any]]) -> dict[str, Position]:
    """The book recomputed from the database's fills in result order (the check's side of the equation)."""
    return portfolio.replay([ledger.fill_from(row) for row in rows if row["is_fill"]], strict=False)


async def redis_book(r: Redis) -> dict[str, Position]:
    """The live book execution keeps in Redis (quantum:book:positions)."""
    return await book.read_positions(r)


async def pending(r: Redis, stream: str, group: str = JOURNAL_GROUP) -> int:
    """Entries the group was given and has not acknowledged."""
    return int((await r.xpending(stream, group))["pending"])


def same_result(row: dict[str, Any], entry_id: str, fields: dict[str, str]) -> list[str]:
    """How a results row differs from the stream entry it records (empty when it holds every field)."""
    payload = json.loads(fields["payload"])
    problems = []
    if row["entry_id"] != entry_id:
        problems.append(f"entry id {row['entry_id']} != {entry_id}")
    for name in ("qty", "filled_qty", "fee"):
        if row[name] != Decimal(payload.get(name, "0")):
            problems.append(f"{entry_id} {name}: {row[name]} != {payload.get(name)}")
    price = payload.get("avg_price")
    if row["avg_price"] != (Decimal(price) if price is not None else None):
        problems.append(f"{entry_id} avg_price: {row['avg_price']} != {price}")
    for name in ("status", "reason", "detail", "symbol", "side", "fee_asset", "client_order_id",
                 "exchange_order_id", "intent_id", "decision_id", "exchange", "strategy"):  # fmt: skip
        if row[name] != payload.get(name, ""):
            problems.append(f"{entry_id} {name}: {row[name]!r} != {payload.get(name)!r}")
    if row["confidence"] != payload.get("confidence"):
        problems.append(f"{entry_id} confidence: {row['confidence']} != {payload.get('confidence')}")
    return problems + envelope_problems(row, entry_id, fields)


def envelope_problems(row: dict[str, Any], entry_id: str, fields: dict[str, str]) -> list[str]:
    """How a row's envelope columns differ from the entry's fields."""
    problems = [
        f"{entry_id} {name}: {row[name]!r} != {fields[name]!r}"
        for name in ("trace_id", "correlation_id", "source")
        if row[name] != fields[name]
    ]
    stamp = row["timestamp"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if stamp != fields["timestamp"]:
        problems.append(f"{entry_id} timestamp: {stamp} != {fields['timestamp']}")
    return problems


def same_state_change(row: dict[str, Any], entry_id: str, fields: dict[str, str]) -> list[str]:
    """How a trading_states row differs from the ``risk.state`` entry it records (empty when it holds every field)."""
    payload = json.loads(fields["payload"])
    problems = []
    if row["entry_id"] != entry_id:
        problems.append(f"entry id {row['entry_id']} != {entry_id}")
    for name in ("state", "previous", "reason", "detail", "by"):
        if row[name] != payload[name]:
            problems.append(f"{entry_id} {name}: {row[name]!r} != {payload[name]!r}")
    for name in ("at", "until"):
        wanted = parse_iso(payload[name]) if payload.get(name) else None
        stored = row[name] if row[name] is None or row[name].tzinfo else row[name].replace(tzinfo=UTC)
        if stored != wanted:
            problems.append(f"{entry_id} {name}: {stored} != {payload.get(name)!r}")
    return problems + envelope_problems(row, entry_id, fields)
