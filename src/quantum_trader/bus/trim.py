"""Trimming that never deletes an entry some group still needs (MISSION point 4).

The seed capped its intent stream at ~10,000 entries while its group lagged
750,000 behind, silently deleting intents nobody had processed. Here the trim
point is computed from the consumer groups: below every group's oldest pending
entry and at or below every group's last-delivered id. A stream with no group is
never trimmed (nobody has said they read it). Entries younger than ``keep_s``
seconds stay for inspection even once consumed; the boundary comes from the clock
(stream ids are milliseconds), so finding it reads nothing from the stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import next_id, parse_id


@dataclass(frozen=True, slots=True)
class GroupPosition:
    """How far one group has got: last delivered id and its oldest pending id (if any)."""

    last_delivered_id: str
    oldest_pending_id: str | None


def safe_min_id(groups: list[GroupPosition], keep_from_id: str | None) -> str | None:
    """The MINID below which every entry is delivered and acknowledged by every group.

    ``keep_from_id`` is the oldest of the entries to keep for inspection. None = trim nothing.
    """
    if not groups:
        return None
    bounds = []
    for group in groups:
        bounds.append(group.oldest_pending_id or next_id(group.last_delivered_id))
    if keep_from_id is not None:
        bounds.append(keep_from_id)
    bound = min(bounds, key=parse_id)
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


async def trim_consumed(
    redis: Redis, stream: str, keep_s: float = 0, *, now_ms: int | None = None, native_acked: bool = False
) -> int:
    """Delete entries every group has delivered and acknowledged; returns how many.

    ``native_acked`` uses the server's own ``XTRIM … ACKED`` (Redis 8.2+), which applies the
    same rule inside the server; older servers get the computed MINID.
    """
    if not await redis.exists(stream):
        return 0
    keep_from = None
    if keep_s > 0:
        clock_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        keep_from = f"{max(0, clock_ms - int(keep_s * 1000))}-0"
    if native_acked:
        if not await redis.xinfo_groups(stream):
            return 0
        args: list[object] = ["XTRIM", stream, "MINID", "=", keep_from or "+", "ACKED"]
        return int(await redis.execute_command(*args))
    bound = safe_min_id(await group_positions(redis, stream), keep_from)
    if bound is None:
        return 0
    return int(await redis.xtrim(stream, minid=bound, approximate=False))


def has_native_acked_trim(server: str, version: tuple[int, ...]) -> bool:
    """Redis 8.2 added ``XTRIM``/``XADD`` with ``ACKED``; Valkey has no equivalent yet."""
    return server == "redis" and version >= (8, 2)
