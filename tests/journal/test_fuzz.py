"""Hostile entries on every stream the journal reads: it never stops, and every entry ends as a row.

Anyone who can write to the result, rejection or dead-letter stream can write anything: bytes
that are not UTF-8, NUL characters (PostgreSQL text refuses them), a payload of 20,000
characters, JSON nested a thousand deep, amounts such as ``1e999999999``. Each such entry must
end as exactly one row (a result or rejection that does not decode: a dead letter, which becomes
a ``dead_letters`` row), its valid neighbours must be recorded exactly, and nothing may stay pending.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.streams import Entry, dead_letter_fields
from quantum_trader.events import EXECUTION_RESULT, ExecutionResult, envelope, is_utf8, printable
from quantum_trader.journal import ledger
from quantum_trader.journal.rows import set_aside_entry
from quantum_trader.journal.stage import Journal
from quantum_trader.settings import Settings
from tests.fuzz_strategies import INVALID_UTF8
from tests.journal.helpers import JOURNAL_GROUP, dead_letter_rows, drain_journal, rejection_rows, result_rows
from tests.journal.test_stage import DEAD, REJECTED, RESULTS

NASTY_TEXT = ["\x00", "a\x00b", "\u202e", "ſ", "é", "😀", "\ud800", " ", "", "x" * 20_000]
NASTY_AMOUNTS: list[Any] = ["1e999999999", "NaN", "-1", "1_000", "١٢", 1e308, -0.0, "0.1", 10**30, [], {}, None, True]


def texts(value: Any) -> list[str]:
    """Every string inside a row (keys too), however deep."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in [*texts(key), *texts(item)]]
    if isinstance(value, list):
        return [text for item in value for text in texts(item)]
    return []


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


scalars = st.one_of(st.sampled_from(NASTY_TEXT), st.sampled_from(NASTY_AMOUNTS), st.text(max_size=30), st.integers())
payloads = st.one_of(
    st.dictionaries(
        st.sampled_from(["status", "symbol", "side", "qty", "filled_qty", "avg_price", "fee", "reason", "raw", "x"]),
        scalars,
        max_size=8,
    ).map(json.dumps),
    st.sampled_from([deep(1_000), "{", "null", "[]", '"text"', "1e999999999"]),
    st.binary(max_size=64).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)
raw_values = st.one_of(
    st.sampled_from(INVALID_UTF8),
    st.binary(max_size=40),
    st.sampled_from(NASTY_TEXT).map(lambda text: text.encode("utf-8", "surrogatepass")),
)


@st.composite
def hostile_entry(draw: st.DrawFn, event_type: str) -> dict[bytes, bytes]:
    """An entry with the envelope's names, some of them missing or replaced by garbage."""
    fields: dict[bytes, bytes] = {
        b"event_type": event_type.encode(),
        b"payload": draw(payloads).encode("utf-8", "surrogateescape"),
        b"trace_id": b"t",
        b"correlation_id": b"c",
        b"timestamp": draw(st.sampled_from([b"2026-12-07T06:00:00Z", b"yesterday", b"\xff", b""])),
        b"source": b"fuzz",
    }
    for name in draw(st.lists(st.sampled_from(list(fields)), max_size=2)):
        if draw(st.booleans()):
            fields.pop(name, None)
        else:
            fields[name] = draw(raw_values)
    for _ in range(draw(st.integers(0, 2))):
        fields[draw(st.one_of(st.sampled_from(INVALID_UTF8), st.binary(min_size=1, max_size=8)))] = draw(raw_values)
    return fields or {b"x": b"y"}


def valid_result(n: int) -> dict[str, str]:
    result = ExecutionResult(
        status="FILLED", symbol="ETHUSDT", side="BUY", qty=Decimal("0.01"), intent_id=f"{n}-1",
        client_order_id=f"qt-{n}", filled_qty=Decimal("0.01"), avg_price=Decimal(3000), fee=Decimal("0.03"),
        fee_asset="USDT", exchange="paper",
    )  # fmt: skip
    return envelope(EXECUTION_RESULT, result, trace_id=f"t{n}", correlation_id=f"c{n}", source="execution")


streams_of = {RESULTS: "execution.result", REJECTED: "decision.rejected", DEAD: "dead_letter"}
batches = st.lists(
    st.tuples(st.sampled_from(list(streams_of)), st.booleans()), min_size=1, max_size=12
)  # (stream, hostile?)


@pytest.fixture
def journal_settings(settings_for: Callable[..., Settings], clean_url: str) -> Callable[[str], Settings]:
    return lambda url: settings_for(clean_url, database_url=url, block_ms=10, batch_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=batches, data=st.data())
def test_every_hostile_entry_ends_as_one_row_and_the_journal_never_stops(
    clean_url: str, journal_settings: Callable[[str], Settings], database_url: str, plan: Any, data: Any
) -> None:
    """On SQLite and on PostgreSQL (whose text refuses NUL characters)."""
    url = database_url
    written: dict[str, list[str]] = {stream: [] for stream in streams_of}
    valid_ids: list[str] = []

    async def scenario() -> None:
        r = client(clean_url)
        try:
            await check(r)
        finally:
            await r.aclose()

    async def check(r: Redis) -> None:
        await r.flushdb()
        for n, (stream, hostile) in enumerate(plan):
            if hostile:
                fields: Any = data.draw(hostile_entry(streams_of[stream]))
            elif stream == RESULTS:
                fields = valid_result(n)
            else:
                fields = {"event_type": streams_of[stream], "payload": "{}", "trace_id": "t", "correlation_id": "c",
                          "timestamp": "2026-12-07T06:00:00Z", "source": "fuzz"}  # fmt: skip
            entry_id = str(await r.xadd(stream, fields))
            written[stream].append(entry_id)
            if stream == RESULTS and not hostile:
                valid_ids.append(entry_id)
        journal = await Journal.open(r, journal_settings(url))
        with journal.database.engine.begin() as connection:
            ledger.wipe(connection)  # one database per test: each example starts empty
        try:
            # The dead letters of the first pass are read by the second.
            for _ in range(3):
                await drain_journal(journal)
            results, rejections = result_rows(journal.database), rejection_rows(journal.database)
            dead = dead_letter_rows(journal.database)
        finally:
            journal.close()
        # Two streams may hand out the same id in one millisecond: an entry is its stream and its id.
        recorded = {(RESULTS, row["entry_id"]) for row in results} | {(REJECTED, row["entry_id"]) for row in rejections}
        set_aside = {
            (row["origin_stream"], row["origin_id"]) for row in dead if row["origin_stream"] in (RESULTS, REJECTED)
        }
        for stream in (RESULTS, REJECTED):
            for entry_id in written[stream]:
                entry = (stream, entry_id)
                assert (entry in recorded) != (entry in set_aside), f"{stream} {entry_id}: one row"
        dead_ids = {row["entry_id"] for row in dead}
        assert set(written[DEAD]) <= dead_ids  # every dead letter written by hand is a row
        assert len(dead_ids) == len(written[DEAD]) + len(set_aside)
        by_id = {row["entry_id"]: row for row in results}
        for entry_id in valid_ids:
            row = by_id[entry_id]
            assert (row["status"], row["filled_qty"], row["avg_price"], row["fee"]) == (
                "FILLED", Decimal("0.01"), Decimal(3000), Decimal("0.03"),
            )  # fmt: skip
        for row in [*results, *rejections, *dead]:
            assert not any("\x00" in text for text in texts(row)), row
        for stream in streams_of:
            if await r.exists(stream):
                assert (await r.xpending(stream, JOURNAL_GROUP))["pending"] == 0, stream

    asyncio.run(scenario())


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.text(max_size=5000) | st.sampled_from(INVALID_UTF8).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
        max_size=6,
    ),
    st.sampled_from([JOURNAL_GROUP, "quantum:group:alerts"]),
    st.sampled_from([RESULTS, REJECTED, DEAD]),
)
def test_only_the_journals_own_whole_entries_come_back_from_their_dead_letters(
    original: dict[str, str], group: str, stream: str
) -> None:
    """A dead letter gives back the entry it holds only when it is exactly the entry (nothing cut, every
    byte UTF-8) and the journal's own group set it aside from a stream the journal records."""
    dead = Entry("9-0", dead_letter_fields(stream=stream, group=group, entry=Entry("5-1", original), reason="died"))
    found = set_aside_entry(dead, JOURNAL_GROUP, [RESULTS, REJECTED])
    exact = all(is_utf8(value) and printable(value) == value for value in original.values())
    if group == JOURNAL_GROUP and stream != DEAD and exact:
        assert found is not None
        assert found[0] == stream
        assert (found[1].id, found[1].fields) == ("5-1", original)
    else:
        assert found is None
