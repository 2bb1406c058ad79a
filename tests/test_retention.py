"""Outcome streams stay bounded under traffic; a consumer group that lags keeps every entry it needs.

Issue 12, point 5: the result and rejection streams grew forever (about 1 KB of server memory per
decision). A running pipeline now bounds each outcome stream it writes to its retention, and never
deletes an entry some group has not delivered and acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.runner import serve
from quantum_trader.settings import Settings
from tests.pipeline import decision

LEGACY = "quantum:stream:execution.result.legacy"
JOURNAL = "quantum:group:journal:execution.result"


async def added(r: Redis, stream: str) -> int:
    """Entries ever written to ``stream`` (trimming does not lower it)."""
    return int((await r.xinfo_stream(stream))["entries-added"]) if await r.exists(stream) else 0


async def eventually(check: Callable[[], Awaitable[bool]], what: Callable[[], Awaitable[object]]) -> None:
    """Wait for ``check`` (a generous deadline: this is about what happens, not how fast)."""
    for _ in range(600):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached within 30 s: {await what()}")


async def test_outcome_streams_stay_bounded_while_a_lagging_journal_keeps_its_entries(
    r: Redis, clean_url: str, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(
        clean_url,
        result_maxlen=50,
        dead_letter_maxlen=5,
        trim_interval_s=0.1,
        result_stream_legacy=LEGACY,
    )
    result, rejected, dead = settings.result_stream, settings.rejected_stream, settings.dead_letter_stream
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    await ensure_group(r, LEGACY, JOURNAL)  # a journal subscribed to the legacy copy before any result
    traffic = [decision(qty="0.001") for _ in range(400)] + [decision(side="HOLD") for _ in range(100)]
    await publish(r, settings.decision_stream, traffic)
    await publish(r, settings.intent_stream, [{"junk": str(n)} for n in range(20)])  # no envelope: dead letters

    async def lengths() -> dict[str, int]:
        return {stream: await r.xlen(stream) for stream in (result, rejected, dead, LEGACY)}

    async def all_written() -> bool:
        return (await added(r, result), await added(r, rejected), await added(r, dead)) == (400, 100, 20)

    stop = asyncio.Event()
    running = asyncio.create_task(serve(r, settings, ["router", "execution"], stop))
    try:
        await eventually(all_written, lengths)
        # The journal has read 150 results and acknowledged 60 of them, then stalls.
        legacy_ids = [entry_id for entry_id, _ in await r.xrange(LEGACY)]
        assert len(legacy_ids) == 400  # nothing the journal had not read was ever deleted
        read = await r.xreadgroup(JOURNAL, "journal-1", {LEGACY: ">"}, count=150)
        await r.xack(LEGACY, JOURNAL, *[entry_id for entry_id, _ in read[0][1][:60]])

        async def bounded() -> bool:
            return await lengths() == {result: 50, rejected: 50, dead: 5, LEGACY: 340}

        await eventually(bounded, lengths)
    finally:
        stop.set()
        await running

    # Each outcome stream holds its newest entries; the legacy copy everything the journal still needs.
    for stream in (result, rejected, dead):
        last = (await r.xinfo_stream(stream))["last-generated-id"]
        assert (await r.xrevrange(stream, count=1))[0][0] == last
    assert [entry_id for entry_id, _ in await r.xrange(LEGACY)] == legacy_ids[60:]
    [journal] = await r.xinfo_groups(LEGACY)
    assert (journal["pending"], journal["lag"]) == (90, 250)
