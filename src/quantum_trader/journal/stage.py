"""The journal stage: results, rejections, dead letters and trading-state changes into SQL, then acknowledged.

It reads four streams in its own group (``QT_JOURNAL_GROUP`` on ``StreamNames.journaled()``),
one consumer each. Per batch: decode (pure), write every row in one transaction, and only
then XACK the batch. Nothing acknowledged is missing from the database; a crash between the
commit and the XACK redelivers the batch and the entry-id keys absorb it.

- A result, rejection or trading-state change that does not decode goes to the dead-letter
  stream with its raw fields (the bus's atomic dead-letter script, as in every stage), and
  comes back to the journal from there as a ``dead_letters`` row.
- A dead letter always becomes a row. The dead-letter consumer never writes to the stream it
  reads: an entry that fails even alone is recorded by its raw fields instead, so a bad dead
  letter cannot feed itself back forever.
- A database that is unreachable, locked or full fails the batch with a ``TransientError``:
  nothing is acknowledged, the bus retries the batch whole, and one line names the database
  (password redacted) when the outage starts, another when it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import sqlalchemy as sa

from quantum_trader import keys
from quantum_trader.bus.cluster import require_replicated
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, GroupConsumer, Handler
from quantum_trader.errors import DecodeError, TransientError
from quantum_trader.journal import ledger
from quantum_trader.journal.database import Database, guarded, open_database
from quantum_trader.journal.rows import (
    Row,
    dead_letter_row,
    rejection_row,
    result_row,
    set_aside_entry,
    trading_state_row,
    unreadable_dead_letter_row,
)
from quantum_trader.logs import get_logger
from quantum_trader.settings import Settings

log = get_logger("journal")
T = TypeVar("T")


@dataclass
class DeadLetterConsumer(GroupConsumer):
    """The journal's consumer of the dead-letter stream: what it sets aside is recorded, never re-sent.

    ``GroupConsumer.dead_letter`` would append the entry to the very stream this consumer reads;
    here an entry the journal cannot handle is recorded by ``record`` (as a row of raw fields).
    """

    record: Callable[[list[Entry], str], Awaitable[None]] | None = None

    async def dead_letter(self, entries: list[Entry], reason: str, field_name: str = "") -> None:
        """Record ``entries`` by their raw fields and acknowledge them (see the class docstring)."""
        if self.record is None:
            raise RuntimeError("DeadLetterConsumer.record is not set")
        await self.record(entries, reason)


class Journal:
    """The journal service: one consumer per stream it records, one database for all."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        database: Database,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.database = database
        self.clock = clock or (lambda: datetime.now(UTC))
        self.streams = settings.streams
        self.group = settings.journal_group
        self.totals: dict[str, int] = {"results": 0, "rejections": 0, "dead_letters": 0, "trading_states": 0}
        self._lock = asyncio.Lock()  # one batch writes at a time (SQLite has one writer; positions move in order)
        self._down = False
        handlers: dict[str, Handler] = {
            self.streams.result: self.handle_results,
            self.streams.rejected: self.handle_rejections,
            self.streams.dead_letter: self.handle_dead_letters,
            self.streams.risk_state: self.handle_trading_states,
        }
        self.consumers: list[tuple[GroupConsumer, Handler]] = []
        for stream in self.streams.journaled():
            kind = DeadLetterConsumer if stream == self.streams.dead_letter else GroupConsumer
            consumer = kind.for_stage(redis, settings, keys.JOURNAL, stream, self.group)
            # Two batches in flight: the next one decodes while the database writes this one. The
            # write lock is taken in read order, so positions extend instead of replaying.
            consumer.depth = 2
            if isinstance(consumer, DeadLetterConsumer):
                consumer.record = self.record_unreadable
            self.consumers.append((consumer, handlers[stream]))
        self.consumer = self._consumer_of(self.streams.result)  # the one the heartbeat names

    @classmethod
    async def open(cls, redis: Redis, settings: Settings) -> Journal:
        """Connect to the database (``settings.journal_url()``), migrate it, and rebuild missing positions.

        Raises ``TransientError`` when the database cannot be reached and ``ConfigError`` when its
        schema is newer than this version knows, each in one line with the URL redacted.
        """
        database = await asyncio.to_thread(open_database, settings.journal_url())
        journal = cls(redis, settings, database)
        rebuilt = await journal.write(lambda conn: ledger.rebuild_missing_positions(conn, journal.clock()))
        if rebuilt:
            log.info("positions_rebuilt", symbols=rebuilt, database=database.shown)
        return journal

    def _consumer_of(self, stream: str) -> GroupConsumer:
        return next(consumer for consumer, _handler in self.consumers if consumer.stream == stream)

    def close(self) -> None:
        """Close the database connections."""
        self.database.close()

    async def write(self, work: Callable[[sa.Connection], T]) -> T:
        """Run ``work`` in one transaction, in a thread, one batch at a time.

        The database being unavailable is a ``TransientError``; its start and end are logged once each.
        """
        async with self._lock:
            # On a cluster: record only what a failover cannot take back (every key shares one primary).
            await require_replicated(
                self.redis,
                self.streams.result,
                self.settings.cluster_replicas,
                self.settings.cluster_replica_wait_ms,
                "journal waiting",
            )
            try:
                done = await asyncio.to_thread(self._transaction, work)
            except TransientError as exc:
                if not self._down:
                    self._down = True
                    log.error(
                        "journal_database_unavailable",
                        database=self.database.shown,
                        error=str(exc),
                        effect="nothing is acknowledged: entries stay pending and are retried until it answers",
                    )
                raise
        if self._down:
            self._down = False
            log.info("journal_database_back", database=self.database.shown)
        return done

    def _transaction(self, work: Callable[[sa.Connection], T]) -> T:
        with guarded(self.database.shown), self.database.engine.begin() as connection:
            return work(connection)

    async def _acknowledge(self, stream: str, rows: list[Row]) -> None:
        if rows:
            await self.redis.xack(stream, self.group, *[row["entry_id"] for row in rows])

    async def _set_aside(self, stream: str, bad: list[tuple[Entry, DecodeError]]) -> None:
        consumer = self._consumer_of(stream)
        for entry, exc in bad:
            await consumer.dead_letter([entry], exc.reason, exc.field)

    async def handle_results(self, entries: list[Entry]) -> None:
        """Record a batch of results (and move the positions they fill), then acknowledge it."""
        rows, bad = _decode(entries, lambda entry: result_row(entry, self.settings.quote_assets))
        if rows:
            now = self.clock()
            await self.write(lambda conn: ledger.record_results(conn, rows, now))
            await self._acknowledge(self.streams.result, rows)
            self.totals["results"] += len(rows)
        await self._set_aside(self.streams.result, bad)

    async def handle_rejections(self, entries: list[Entry]) -> None:
        """Record a batch of rejections, then acknowledge it."""
        rows, bad = _decode(entries, rejection_row)
        if rows:
            await self.write(lambda conn: ledger.record_rejections(conn, rows))
            await self._acknowledge(self.streams.rejected, rows)
            self.totals["rejections"] += len(rows)
        await self._set_aside(self.streams.rejected, bad)

    async def handle_trading_states(self, entries: list[Entry]) -> None:
        """Record a batch of trading-state changes, then acknowledge it."""
        rows, bad = _decode(entries, trading_state_row)
        if rows:
            await self.write(lambda conn: ledger.record_trading_states(conn, rows))
            await self._acknowledge(self.streams.risk_state, rows)
            self.totals["trading_states"] += len(rows)
        await self._set_aside(self.streams.risk_state, bad)

    async def handle_dead_letters(self, entries: list[Entry]) -> None:
        """Record a batch of dead letters (each one, decoded or by its raw fields), then acknowledge it.

        An entry the journal itself set aside is also recorded as what it was (see ``set_aside_rows``),
        in the same transaction.
        """
        rows = [dead_letter_row(entry) for entry in entries]
        results, rejections, states = self.set_aside_rows(entries)
        now = self.clock()

        def work(conn: sa.Connection) -> None:
            ledger.record_dead_letters(conn, rows)
            if results:
                ledger.record_results(conn, results, now)
            ledger.record_rejections(conn, rejections)
            ledger.record_trading_states(conn, states)

        await self.write(work)
        await self._acknowledge(self.streams.dead_letter, rows)
        self.totals["dead_letters"] += len(rows)

    def set_aside_rows(self, entries: list[Entry]) -> tuple[list[Row], list[Row], list[Row]]:
        """The result, rejection and trading-state rows of the entries this journal's group set aside whole.

        The journal sets an entry aside when it kept dying while handling it alone, which an outside
        kill (an OOM killer, a watchdog) can look like. Recorded from its dead letter under its own
        entry id, it still lands in its table exactly once (ids already there are skipped) and a
        result still moves the book. One that does not decode stays a dead letter only.
        """
        decoders: dict[str, Callable[[Entry], Row]] = {
            self.streams.result: lambda entry: result_row(entry, self.settings.quote_assets),
            self.streams.rejected: rejection_row,
            self.streams.risk_state: trading_state_row,
        }
        found: dict[str, list[Row]] = {stream: [] for stream in decoders}
        for entry in entries:
            held = set_aside_entry(entry, self.group, list(decoders))
            if held is None:
                continue
            stream, original = held
            try:
                found[stream].append(decoders[stream](original))
            except DecodeError:
                continue
            log.warning(
                "set_aside_entry_recorded",
                stream=stream,
                entry_id=original.id,
                dead_letter_id=entry.id,
                effect="recorded from its dead letter; dlq replay refuses it (it would be recorded twice)",
            )
        return found[self.streams.result], found[self.streams.rejected], found[self.streams.risk_state]

    async def record_unreadable(self, entries: list[Entry], reason: str) -> None:
        """Record dead letters the journal failed on by their raw fields alone, and acknowledge them.

        Such a row holds only cleaned text, so it stores wherever the database is up; if it still
        fails for a reason that is not the database's state, the entry is acknowledged and logged
        (it stays on the dead-letter stream for ``dlq list``) rather than retried forever.
        """
        rows = [unreadable_dead_letter_row(entry, f"the journal could not record it: {reason}") for entry in entries]
        try:
            await self.write(lambda conn: ledger.record_dead_letters(conn, rows))
        except TransientError:
            raise
        except Exception as exc:
            log.error(
                "dead_letter_not_journaled",
                stream=self.streams.dead_letter,
                ids=[entry.id for entry in entries],
                error=f"{type(exc).__name__}: {str(exc)[:300]}",
                effect="acknowledged without a row; the entry stays on the dead-letter stream (dlq list)",
            )
        await self._acknowledge(self.streams.dead_letter, rows)
        self.totals["dead_letters"] += len(rows)


def _decode(entries: list[Entry], decode: Callable[[Entry], Row]) -> tuple[list[Row], list[tuple[Entry, DecodeError]]]:
    """Rows of the entries that decode, and each entry that does not with its error (pure)."""
    rows, bad = [], []
    for entry in entries:
        try:
            rows.append(decode(entry))
        except DecodeError as exc:
            bad.append((entry, exc))
    return rows, bad
