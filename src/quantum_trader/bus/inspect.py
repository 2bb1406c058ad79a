"""Reading the streams without consuming them: the state of every stream and group (the seed's
BEFORE/AFTER table, live), and the outcomes written since a moment."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from quantum_trader.bus.connection import Redis
from quantum_trader.keys import StreamNames


@dataclass(frozen=True, slots=True)
class ConsumerStat:
    """One consumer of a group."""

    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True, slots=True)
class GroupStat:
    """One consumer group: how far behind, how much in flight."""

    name: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str
    entries_read: int | None
    consumer_list: list[ConsumerStat] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StreamStat:
    """One stream: XINFO STREAM figures and its groups."""

    name: str
    exists: bool
    length: int = 0
    entries_added: int = 0
    last_generated_id: str = ""
    first_entry_id: str = ""
    last_entry_id: str = ""
    groups: list[GroupStat] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return asdict(self)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


async def _lag(redis: Redis, stream: str, info: dict[str, Any], length: int) -> int | None:
    """The server's lag; when it cannot say (deleted entries in range), count what is after the group."""
    lag = _int_or_none(info.get("lag"))
    if lag is not None:
        return lag
    last = str(info.get("last-delivered-id", "0-0"))
    if last == "0-0":
        return length
    after = await redis.xrange(stream, min=f"({last}", max="+", count=1_000_000)
    return len(after)


async def stream_stat(redis: Redis, stream: str, *, with_consumers: bool = False) -> StreamStat:
    """Figures for one stream; ``exists=False`` when it does not exist yet."""
    try:
        info = await redis.xinfo_stream(stream)
    except ResponseError:
        return StreamStat(name=stream, exists=False)
    length = int(info["length"])
    groups = []
    for group in await redis.xinfo_groups(stream):
        consumers: list[ConsumerStat] = []
        if with_consumers and int(group["consumers"]):
            for consumer in await redis.xinfo_consumers(stream, group["name"]):
                consumers.append(ConsumerStat(str(consumer["name"]), int(consumer["pending"]), int(consumer["idle"])))
        groups.append(
            GroupStat(
                name=str(group["name"]),
                consumers=int(group["consumers"]),
                pending=int(group["pending"]),
                lag=await _lag(redis, stream, group, length),
                last_delivered_id=str(group["last-delivered-id"]),
                entries_read=_int_or_none(group.get("entries-read")),
                consumer_list=consumers,
            )
        )
    first = info.get("first-entry")
    last = info.get("last-entry")
    return StreamStat(
        name=stream,
        exists=True,
        length=length,
        entries_added=int(info.get("entries-added", length)),
        last_generated_id=str(info.get("last-generated-id", "")),
        first_entry_id=str(first[0]) if first else "",
        last_entry_id=str(last[0]) if last else "",
        groups=groups,
    )


async def pipeline_status(redis: Redis, streams: list[str], *, with_consumers: bool = False) -> list[StreamStat]:
    """Figures for every stream of the pipeline, in order."""
    return [await stream_stat(redis, name, with_consumers=with_consumers) for name in streams]


async def last_ids(redis: Redis, streams: list[str]) -> dict[str, str]:
    """The newest entry id of each stream (``0-0`` when empty)."""
    out = {}
    for stream in streams:
        last = await redis.xrevrange(stream, count=1)
        out[stream] = last[0][0] if last else "0-0"
    return out


async def outcome_counts(redis: Redis, streams: StreamNames, since: dict[str, str]) -> Counter[str]:
    """Terminal outcomes written after the ids in ``since``: results by status and reason, rejections by reason."""
    counts: Counter[str] = Counter()
    for stream in (streams.result, streams.rejected):
        start = since.get(stream, "0-0")
        while True:
            chunk = await redis.xrange(stream, min=f"({start}", max="+", count=5000)
            if not chunk:
                break
            for _entry_id, fields in chunk:
                if stream == streams.rejected:
                    counts[fields.get("reason", "?")] += 1
                else:
                    result = json.loads(fields["payload"])
                    counts[" ".join(filter(None, (result["status"], result.get("reason"))))] += 1
            start = chunk[-1][0]
    return counts


async def wait_for_outcome(
    redis: Redis, streams: StreamNames, decision_id: str, since: dict[str, str], timeout_s: float
) -> dict[str, Any] | None:
    """The terminal outcome of one decision: its rejection, or its intent's result; None after ``timeout_s``.

    ``since`` holds the result and rejection streams' last ids from before the decision was published.
    """
    positions = {streams.result: since.get(streams.result, "0-0"), streams.rejected: since.get(streams.rejected, "0-0")}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        reply = await redis.xread(positions, count=1000, block=max(1, int(min(left, 1.0) * 1000)))
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                positions[stream] = entry_id
                try:
                    payload = json.loads(fields.get("payload", "{}"))
                except ValueError:
                    continue
                if decision_id in (payload.get("decision_id"), payload.get("original_id")):
                    return {"stream": stream, "id": entry_id, **payload}
    return None
