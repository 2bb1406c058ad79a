"""Trimming that never deletes an entry some group still needs (MISSION point 4), and retention.

The seed capped its intent stream at ~10,000 entries while its group lagged
750,000 behind, silently deleting intents nobody had processed. Here the trim
point is computed from the consumer groups: below every group's oldest pending
entry and at or below every group's last-delivered id. An input stream with no group
is never trimmed (nobody has said they read it). Entries younger than ``keep_s``
seconds stay for inspection even once consumed; the boundary comes from the clock
(stream ids are milliseconds), so finding it reads nothing from the stream.

Outcome streams (results, rejections, dead letters) are written for people and for
consumers that may not exist yet (the journal), so they are bounded by a
:class:`Retention` instead: a time window and a maximum length. The group rule still
wins: an entry some group has not delivered and acknowledged is never deleted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import next_id, parse_id
from quantum_trader.logs import get_logger

log = get_logger("trim")

# Deletes the oldest ARGV[1] entries that lie below ARGV[2] (the lowest id a group still needs).
# The ids are read inside the server: nothing but a count crosses the network.
_TRIM_BELOW = """
local entries = redis.call('XRANGE', KEYS[1], '-', '(' .. ARGV[2], 'COUNT', tonumber(ARGV[1]))
if #entries == 0 then return 0 end
local last = entries[#entries][1]
return redis.call('XTRIM', KEYS[1], 'MINID', last) + redis.call('XDEL', KEYS[1], last)
"""
# Entries one script call deletes at most: each call blocks the server while it reads them.
_TRIM_CHUNK = 1000
# A stream held over its maximum length by a lagging group is reported at most this often.
_HELD_WARNING_EVERY_S = 60.0
_held_warned: dict[str, float] = {}


@dataclass(frozen=True, slots=True)
class GroupPosition:
    """How far one group has got: last delivered id and its oldest pending id (if any)."""

    last_delivered_id: str
    oldest_pending_id: str | None


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of an outcome stream stays: entries younger than ``keep_s`` seconds and at most
    the newest ``maxlen``; 0 switches that limit off (both 0 = keep everything)."""

    keep_s: float = 0
    maxlen: int = 0


def needed_from(groups: list[GroupPosition]) -> str | None:
    """The lowest id some group has not delivered and acknowledged; None when there is no group."""
    if not groups:
        return None
    return min((g.oldest_pending_id or next_id(g.last_delivered_id) for g in groups), key=parse_id)


def safe_min_id(groups: list[GroupPosition], keep_from_id: str | None) -> str | None:
    """The MINID below which every entry is delivered and acknowledged by every group.

    ``keep_from_id`` is the oldest of the entries to keep for inspection. None = trim nothing.
    """
    floor = needed_from(groups)
    if floor is None:
        return None
    bound = floor if keep_from_id is None else min(floor, keep_from_id, key=parse_id)
    return None if bound in ("0-0", "0-1") else bound


async def group_positions(redis: Redis, stream: str) -> list[GroupPosition]:
    """Each group's position on ``stream``, read with XINFO GROUPS and XPENDING."""
    positions = []
    for info in await redis.xinfo_groups(stream):
        oldest = None
        if int(info["pending"]):
            summary = await redis.xpending(stream, info["name"])
            oldest = summary["min"]
        positions.append(GroupPosition(str(info["last-delivered-id"]), oldest))
    return positions


def _keep_from(keep_s: float, now_ms: int | None) -> str:
    clock_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    return f"{max(0, clock_ms - int(keep_s * 1000))}-0"


async def trim_consumed(
    redis: Redis, stream: str, keep_s: float = 0, *, now_ms: int | None = None, native_acked: bool = False
) -> int:
    """Delete entries every group has delivered and acknowledged; returns how many.

    ``native_acked`` uses the server's own ``XTRIM … ACKED`` (Redis 8.2+), which applies the
    same rule inside the server; older servers get the computed MINID.
    """
    if not await redis.exists(stream):
        return 0
    keep_from = _keep_from(keep_s, now_ms) if keep_s > 0 else None
    if native_acked:
        if not await redis.xinfo_groups(stream):
            return 0
        args: list[object] = ["XTRIM", stream, "MINID", "=", keep_from or "+", "ACKED"]
        return int(await redis.execute_command(*args))
    bound = safe_min_id(await group_positions(redis, stream), keep_from)
    if bound is None:
        return 0
    return int(await redis.xtrim(stream, minid=bound, approximate=False))


async def trim_retained(redis: Redis, stream: str, retention: Retention, *, now_ms: int | None = None) -> int:
    """Bound an outcome stream to ``retention``; returns how many entries were deleted.

    Entries older than ``keep_s`` and those beyond the newest ``maxlen`` go, except any entry a
    consumer group has not delivered and acknowledged: a lagging group (a stopped journal) keeps
    all of its entries, and the stream is reported as held over its length once a minute.
    """
    if (retention.keep_s <= 0 and retention.maxlen <= 0) or not await redis.exists(stream):
        return 0
    floor = needed_from(await group_positions(redis, stream))
    removed = 0
    if retention.keep_s > 0:
        bound = _keep_from(retention.keep_s, now_ms)
        if floor is not None:
            bound = min(bound, floor, key=parse_id)
        if bound not in ("0-0", "0-1"):
            removed += int(await redis.xtrim(stream, minid=bound, approximate=False))
    if retention.maxlen > 0:
        if floor is None:
            removed += int(await redis.xtrim(stream, maxlen=retention.maxlen, approximate=False))
        else:
            removed += await _trim_length_below(redis, stream, retention.maxlen, floor)
    return removed


async def _trim_length_below(redis: Redis, stream: str, maxlen: int, floor: str) -> int:
    """Delete the oldest entries beyond ``maxlen``, stopping at ``floor`` (a group still needs it)."""
    script = redis.register_script(_TRIM_BELOW)
    excess = int(await redis.xlen(stream)) - maxlen
    removed = 0
    while excess > 0:
        step = min(excess, _TRIM_CHUNK)
        deleted = int(await script(keys=[stream], args=[step, floor]))
        removed += deleted
        excess -= deleted
        if deleted < step:
            break
    if excess > 0:
        now = time.monotonic()
        if now - _held_warned.get(stream, -_HELD_WARNING_EVERY_S) >= _HELD_WARNING_EVERY_S:
            _held_warned[stream] = now
            log.warning(
                "retention_held_by_group",
                stream=stream,
                over_maxlen=excess,
                maxlen=maxlen,
                effect="entries a consumer group has not acknowledged are kept; server memory grows",
                fix=f"start that group's consumer, or remove an abandoned group: XGROUP DESTROY {stream} <group>",
            )
    return removed


def has_native_acked_trim(server: str, version: tuple[int, ...]) -> bool:
    """Redis 8.2 added ``XTRIM``/``XADD`` with ``ACKED``; Valkey has no equivalent yet."""
    return server == "redis" and version >= (8, 2)
