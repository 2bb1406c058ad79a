"""The journal records every change of the trading state: a breaker's and the operator's, once per
stream entry with every field, redeliveries absorbed, a malformed change set aside and recorded
(never dropped, never stopping the journal), and the newest changes read back first."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantum_trader import keys, trading
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.streams import Entry, publish
from quantum_trader.errors import ConfigError
from quantum_trader.events import RISK_STATE, Reason, StateChange, TradingState, now_iso
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.journal import ledger, queries
from quantum_trader.journal.database import Database, open_database
from quantum_trader.journal.rows import trading_state_row
from quantum_trader.journal.schema import trading_states
from quantum_trader.journal.stage import Journal
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.journal.helpers import (
    JOURNAL_GROUP,
    dead_letter_rows,
    drain_journal,
    pending,
    same_state_change,
    trading_state_rows,
)
from tests.journal.test_fuzz import hostile_entry
from tests.pipeline import decision, drain

STATES = "quantum:stream:risk.state"
DEAD = "quantum:stream:dead_letter"
DECISIONS = "quantum:stream:ai.decision"
AT = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)


def state_change(
    n: int, state: TradingState, previous: TradingState, reason: Reason = Reason.OPERATOR, until: str = ""
) -> dict[str, str]:
    """The entry of one change, built as the operator's command and the gate build it."""
    change = StateChange(
        state=state,
        previous=previous,
        reason=reason,
        detail=f"change {n}",
        by="alice" if reason is Reason.OPERATOR else "execution-0",
        at=now_iso(AT + timedelta(seconds=n)),
        until=until,
    )
    return trading.state_event(change)


@pytest.fixture
def journal_settings(settings_for: Callable[..., Settings], clean_url: str, database_url: str) -> Settings:
    return settings_for(
        clean_url,
        database_url=database_url,
        block_ms=10,
        batch_size=3,  # several batches, bad entries sharing them with good ones
        paper_balances={"USDT": Decimal(10_000)},
        paper_fee_rate=Decimal(0),
        max_drawdown_pct=Decimal(5),
    )


async def test_every_change_by_a_breaker_or_the_operator_is_recorded_once_with_every_field(
    r: Redis, journal_settings: Settings
) -> None:
    settings = journal_settings
    await r.set(keys.KILL_SWITCH, "0")
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    router, execution = Router(r, settings), Execution(r, settings, paper)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "2000")
    await publish(r, DECISIONS, [decision(qty="2", price=None, corr="c0", trace="t0")])
    await drain(router)
    await drain(execution)
    # 2 ETH bought at 2000 from 10,000 USDT; at 1740 the equity is 9,480, 5.2 % down: the gate moves to REDUCING.
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "1740")
    await publish(r, DECISIONS, [decision(qty="0.01", price=None, corr="c1", trace="t1")])
    await drain(router)
    await drain(execution)
    await trading.set_state(r, settings, TradingState.HALTED, "exchange maintenance", "alice")
    await trading.set_state(r, settings, TradingState.ACTIVE, "reviewed the loss", "ops")
    midnight = now_iso(AT.replace(hour=0) + timedelta(days=1))
    await publish(r, STATES, [state_change(9, TradingState.HALTED, TradingState.ACTIVE, Reason.DAILY_LOSS, midnight)])

    journal = await Journal.open(r, settings)
    try:
        await drain_journal(journal)
        stream = await r.xrange(STATES)
        rows = trading_state_rows(journal.database)
    finally:
        journal.close()
    assert [json.loads(fields["payload"])["reason"] for _id, fields in stream] == [
        "DRAWDOWN", "OPERATOR", "OPERATOR", "DAILY_LOSS",
    ]  # fmt: skip
    assert [row["entry_id"] for row in rows] == [entry_id for entry_id, _fields in stream]
    problems = [
        p
        for row, (entry_id, fields) in zip(rows, stream, strict=True)
        for p in same_state_change(row, entry_id, fields)
    ]
    assert problems == []
    assert [(row["state"], row["previous"]) for row in rows] == [
        ("REDUCING", "ACTIVE"), ("HALTED", "REDUCING"), ("ACTIVE", "HALTED"), ("HALTED", "ACTIVE"),
    ]  # fmt: skip
    assert [row["until"] is None for row in rows] == [True, True, True, False]
    assert (rows[1]["by"], rows[1]["detail"], rows[1]["source"]) == ("alice", "exchange maintenance", "alice")
    assert await pending(r, STATES) == 0
    assert journal.totals["trading_states"] == 4


async def test_a_redelivered_state_change_adds_no_row(r: Redis, journal_settings: Settings) -> None:
    changes = [
        state_change(n, TradingState.HALTED if n % 2 else TradingState.ACTIVE,
                     TradingState.ACTIVE if n % 2 else TradingState.HALTED)
        for n in range(8)
    ]  # fmt: skip
    await publish(r, STATES, changes)
    journal = await Journal.open(r, journal_settings)
    try:
        await drain_journal(journal)
        before = trading_state_rows(journal.database)
        assert len(before) == 8
        # A crash between commit and XACK: the whole stream delivered again, as a new consumer would see it.
        await r.xgroup_setid(STATES, JOURNAL_GROUP, "0")
        assert await drain_journal(journal) == 8
        entries = [Entry(entry_id, fields, deliveries=2) for entry_id, fields in await r.xrange(STATES)]
        await journal.handle_trading_states(entries)  # and once more, directly
        assert trading_state_rows(journal.database) == before
        assert await pending(r, STATES) == 0
        assert await r.xlen(DEAD) == 0  # nothing set aside either
    finally:
        journal.close()


def malformed_changes() -> list[tuple[str, dict[str, str]]]:
    """Entries on the trading-state stream the journal cannot record as a change, each with the field named."""
    good = state_change(0, TradingState.HALTED, TradingState.ACTIVE)
    payload = json.loads(good["payload"])
    return [
        ("payload", good | {"payload": "{"}),
        ("state", good | {"payload": json.dumps(payload | {"state": "PAUSED"})}),
        ("at", good | {"payload": json.dumps(payload | {"at": "yesterday"})}),
        ("until", good | {"payload": json.dumps(payload | {"until": "tomorrow"})}),
        ("payload", good | {"payload": json.dumps({name: v for name, v in payload.items() if name != "by"})}),
        ("event_type", {"payload": good["payload"]}),  # no envelope
        ("timestamp", good | {"timestamp": "\x00"}),
    ]


async def test_a_malformed_state_change_is_dead_lettered_and_recorded_never_dropped(
    r: Redis, journal_settings: Settings
) -> None:
    written: list[tuple[str, str, dict[str, str]]] = []  # (field named or "", entry id, fields) in stream order
    for n, (field, fields) in enumerate(malformed_changes()):
        good = state_change(n + 1, TradingState.REDUCING, TradingState.ACTIVE)
        [good_id, bad_id] = await publish(r, STATES, [good, fields])
        written += [("", good_id, good), (field, bad_id, fields)]
    journal = await Journal.open(r, journal_settings)
    try:
        for _ in range(2):  # the dead letters the first pass writes are read by the second
            await drain_journal(journal)
        recorded = [row["entry_id"] for row in trading_state_rows(journal.database)]
        dead = {row["origin_id"]: row for row in dead_letter_rows(journal.database) if row["origin_stream"] == STATES}
    finally:
        journal.close()
    assert recorded == [entry_id for field, entry_id, _fields in written if not field]
    assert set(dead) == {entry_id for field, entry_id, _fields in written if field}
    for field, entry_id, fields in written:
        if field:
            row = dead[entry_id]
            assert "undecodable trading-state change" in row["reason"], row
            assert row["field"] == field, row["reason"]
            assert row["payload"]["raw"]["payload"] == fields["payload"]
            assert row["problem"] == ""
    assert await r.xlen(STATES) == len(written)  # set aside, not deleted: the stream keeps every entry
    assert await pending(r, STATES) == await pending(r, DEAD) == 0


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.booleans(), min_size=1, max_size=10), data=st.data())
def test_every_hostile_state_entry_ends_as_one_row_and_the_journal_never_stops(
    clean_url: str, settings_for: Callable[..., Settings], database_url: str, plan: list[bool], data: Any
) -> None:
    """Hostile or valid, each entry on the trading-state stream is one row: a change or a dead letter."""

    async def scenario() -> None:
        r = client(clean_url)
        try:
            await r.flushdb()
            written: dict[str, bool] = {}
            for n, hostile in enumerate(plan):
                fields: Any = (
                    data.draw(hostile_entry(RISK_STATE))
                    if hostile
                    else state_change(n, TradingState.REDUCING, TradingState.ACTIVE)
                )
                written[str(await r.xadd(STATES, fields))] = hostile
            journal = await Journal.open(
                r, settings_for(clean_url, database_url=database_url, block_ms=10, batch_size=4)
            )
            try:
                with journal.database.engine.begin() as connection:
                    connection.execute(trading_states.delete())
                    ledger.wipe(connection)
                for _ in range(2):
                    await drain_journal(journal)
                recorded = {row["entry_id"] for row in trading_state_rows(journal.database)}
                set_aside = [row["origin_id"] for row in dead_letter_rows(journal.database)]
            finally:
                journal.close()
            assert {entry_id for entry_id, hostile in written.items() if not hostile} <= recorded
            assert sorted([*recorded, *set_aside]) == sorted(written)  # each entry exactly one row
            assert await pending(r, STATES) == 0
        finally:
            await r.aclose()

    asyncio.run(scenario())


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = open_database(database_url)
    changes = [
        state_change(1, TradingState.REDUCING, TradingState.ACTIVE, Reason.DRAWDOWN),
        state_change(
            2, TradingState.HALTED, TradingState.REDUCING, Reason.DAILY_LOSS, now_iso(AT + timedelta(hours=18))
        ),
        state_change(3, TradingState.ACTIVE, TradingState.HALTED),
    ]
    # "10-0" sorts before "9-0" as text: newest first must follow the ids' numbers.
    entries = [Entry(entry_id, fields) for entry_id, fields in zip(["8-0", "9-0", "10-0"], changes, strict=True)]
    with database.engine.begin() as connection:
        ledger.record_trading_states(connection, [trading_state_row(entry) for entry in entries])
    yield database
    database.close()


def test_state_changes_are_read_newest_first_with_a_limit(db: Database) -> None:
    changes = queries.state_changes(db)
    assert [change.entry_id for change in changes] == ["10-0", "9-0", "8-0"]
    assert [change.entry_id for change in queries.state_changes(db, limit=2)] == ["10-0", "9-0"]
    newest, halted = changes[0], changes[1]
    assert (newest.state, newest.previous, newest.reason, newest.by) == ("ACTIVE", "HALTED", "OPERATOR", "alice")
    assert (newest.at, newest.until) == (AT + timedelta(seconds=3), None)
    assert (halted.reason, halted.by, halted.source) == ("DAILY_LOSS", "execution-0", "execution-0")
    assert halted.until == AT + timedelta(hours=18)
    assert halted.at.tzinfo is not None
    with pytest.raises(ConfigError, match="above 0"):
        queries.state_changes(db, limit=0)
