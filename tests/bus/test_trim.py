"""Trimming never deletes what a group has not delivered and acknowledged."""

from __future__ import annotations

import pytest

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.bus.trim import GroupPosition, Retention, safe_min_id, trim_consumed, trim_retained

STREAM = "test:stream"


def test_bound_is_the_slowest_groups_oldest_unfinished_entry() -> None:
    groups = [GroupPosition("5-0", None), GroupPosition("9-0", "3-2")]
    assert safe_min_id(groups, None) == "3-2"
    assert safe_min_id([GroupPosition("5-0", None)], None) == "5-1"
    assert safe_min_id([GroupPosition("5-0", None)], "4-0") == "4-0"


def test_no_group_or_nothing_delivered_means_no_trim() -> None:
    assert safe_min_id([], None) is None
    assert safe_min_id([GroupPosition("0-0", None)], None) is None


async def test_lagging_group_keeps_every_undelivered_entry(r: Redis) -> None:
    await ensure_group(r, STREAM, "fast")
    await ensure_group(r, STREAM, "slow")
    ids = await publish(r, STREAM, [{"n": str(i)} for i in range(1000)])
    fast = await r.xreadgroup("fast", "f", {STREAM: ">"}, count=1000)
    await r.xack(STREAM, "fast", *[i for i, _ in fast[0][1]])
    slow = await r.xreadgroup("slow", "s", {STREAM: ">"}, count=100)  # 100 delivered, 30 acked
    await r.xack(STREAM, "slow", *[i for i, _ in slow[0][1][:30]])

    removed = await trim_consumed(r, STREAM)

    assert removed == 30
    remaining = [i for i, _ in await r.xrange(STREAM)]
    assert remaining == ids[30:]  # pending and undelivered entries all still there
    assert (await r.xinfo_groups(STREAM))[1]["lag"] == 900


async def test_stream_without_groups_is_left_alone(r: Redis) -> None:
    await publish(r, STREAM, [{"n": str(i)} for i in range(10)])
    assert await trim_consumed(r, STREAM) == 0
    assert await r.xlen(STREAM) == 10


async def test_recent_consumed_entries_are_kept_for_inspection(r: Redis) -> None:
    await ensure_group(r, STREAM, "g")
    old = [await r.xadd(STREAM, {"n": str(i)}, id=f"{1_000 + i}-0") for i in range(40)]
    recent = [await r.xadd(STREAM, {"n": str(i)}, id=f"{9_000 + i}-0") for i in range(10)]
    read = await r.xreadgroup("g", "c", {STREAM: ">"}, count=50)
    await r.xack(STREAM, "g", *[i for i, _ in read[0][1]])

    # keep the last 5 s of a clock at 10 s: everything from 5000 ms on stays
    assert await trim_consumed(r, STREAM, keep_s=5, now_ms=10_000) == 40
    assert [i for i, _ in await r.xrange(STREAM)] == recent
    assert len(old) == 40


# --- retention of outcome streams (results, rejections, dead letters) ---


async def test_outcome_stream_without_group_keeps_its_newest_entries(r: Redis) -> None:
    ids = await publish(r, STREAM, [{"n": str(i)} for i in range(500)])

    assert await trim_retained(r, STREAM, Retention(maxlen=100)) == 400
    assert [i for i, _ in await r.xrange(STREAM)] == ids[400:]


async def test_outcome_stream_keeps_its_time_window(r: Redis) -> None:
    old = [await r.xadd(STREAM, {"n": str(i)}, id=f"{1_000 + i}-0") for i in range(30)]
    recent = [await r.xadd(STREAM, {"n": str(i)}, id=f"{9_000 + i}-0") for i in range(10)]

    # keep 5 s at a clock of 10 s: entries from 5000 ms on stay, whatever the length limit
    assert await trim_retained(r, STREAM, Retention(keep_s=5, maxlen=1000), now_ms=10_000) == len(old)
    assert [i for i, _ in await r.xrange(STREAM)] == recent


async def test_no_limit_keeps_everything(r: Redis) -> None:
    await publish(r, STREAM, [{"n": str(i)} for i in range(50)])
    assert await trim_retained(r, STREAM, Retention(keep_s=0, maxlen=0)) == 0
    assert await r.xlen(STREAM) == 50


@pytest.mark.parametrize(
    "retention", [Retention(keep_s=1, maxlen=100), Retention(maxlen=100), Retention(keep_s=1)], ids=str
)
async def test_retention_never_deletes_what_a_lagging_group_still_needs(r: Redis, retention: Retention) -> None:
    # A journal that read 2,500 results and acknowledged 1,200: a retention of 100 entries or 1 s
    # deletes only the acknowledged ones; the pending and the never-delivered all stay.
    await ensure_group(r, STREAM, "journal")
    ids = await publish(r, STREAM, [{"n": str(i)} for i in range(3000)])
    read = await r.xreadgroup("journal", "j", {STREAM: ">"}, count=2500)
    await r.xack(STREAM, "journal", *[i for i, _ in read[0][1][:1200]])
    later_ms = int(ids[-1].split("-")[0]) + 60_000

    removed = await trim_retained(r, STREAM, retention, now_ms=later_ms)

    assert removed == 1200
    assert [i for i, _ in await r.xrange(STREAM)] == ids[1200:]
    [group] = await r.xinfo_groups(STREAM)
    assert (group["pending"], group["lag"]) == (1300, 500)


async def test_retention_applies_in_full_once_every_group_has_finished(r: Redis) -> None:
    await ensure_group(r, STREAM, "journal")
    ids = await publish(r, STREAM, [{"n": str(i)} for i in range(2500)])
    read = await r.xreadgroup("journal", "j", {STREAM: ">"}, count=2500)
    await r.xack(STREAM, "journal", *[i for i, _ in read[0][1]])

    assert await trim_retained(r, STREAM, Retention(maxlen=100)) == 2400
    assert [i for i, _ in await r.xrange(STREAM)] == ids[2400:]
