"""The dead-letter stream: what was set aside, and putting it back once the cause is fixed.

Entries are written by ``GroupConsumer.dead_letter`` (``scripts/dead_letter.lua``); this
module reads them for ``dlq list`` and replays them for ``dlq replay``. A replay that could
trade twice is refused by the ``refuse`` check its caller passes (execution's: an intent
whose order may already exist).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from quantum_trader.bus.connection import Redis

# Why a dead letter must not go back (a message naming the fix), or None when it may.
Refusal = Callable[[str, dict[str, Any]], Awaitable[str | None]]


def refusing(*checks: Refusal) -> Refusal:
    """One refusal that asks each of ``checks`` in turn; the first message wins."""

    async def refuse(dead_id: str, payload: dict[str, Any]) -> str | None:
        for check in checks:
            if (reason := await check(dead_id, payload)) is not None:
                return reason
        return None

    return refuse


_ENTRY_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?\Z")


async def newest(redis: Redis, stream: str, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` dead-letter entries, decoded."""
    out = []
    for entry_id, fields in await redis.xrevrange(stream, count=count):
        payload = json.loads(fields.get("payload", "{}"))
        out.append({"id": entry_id, **payload})
    return out


def _is_entry_id(text: str) -> bool:
    """``<ms>-<seq>``, each part below 2**64 (the server refuses larger ones)."""
    if not _ENTRY_ID.match(text):
        return False
    return all(int(part) < 2**64 for part in text.split("-"))


async def replay(
    redis: Redis,
    stream: str,
    ids: list[str],
    refuse: Refusal | None = None,
    numbered: Collection[str] = (),
    counter: str = "",
) -> list[tuple[str, str, str]]:
    """Put dead-letter entries back on their origin stream (and remove them from the dead letters).

    ``refuse(dead_id, payload)`` is asked first for each entry; a message stops the replay.
    An entry whose origin is one of ``numbered`` (the partitions' intent streams) gets its new id
    from ``counter``, as the router gives those intents theirs: an id unique across the
    partitions, where ``*`` could repeat one another partition's stream holds.
    Returns (dead-letter id, origin stream, new entry id) for each replayed entry. Raises
    LookupError, naming the id and what to do, for an id that is malformed, missing or refused.
    """
    replayed = []
    malformed = [dead_id for dead_id in ids if not _is_entry_id(dead_id)]
    if malformed:
        raise LookupError(
            f"{malformed[0]!r} is not a stream entry id (like 1700000000000-0); see: quantum-trader dlq list"
        )
    for dead_id in ids:
        found = await redis.xrange(stream, min=dead_id, max=dead_id)
        if not found:
            raise LookupError(f"no dead-letter entry {dead_id} on {stream}; list them with: quantum-trader dlq list")
        try:
            payload = json.loads(found[0][1]["payload"])
            origin, raw = str(payload["stream"]), {str(k): str(v) for k, v in dict(payload["raw"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise LookupError(
                f"dead-letter entry {dead_id} cannot be replayed: its payload does not hold the origin stream and"
                f" fields ({type(exc).__name__}: {str(exc)[:80]}); inspect it with: quantum-trader dlq list"
            ) from None
        if refuse is not None and (reason := await refuse(dead_id, payload)) is not None:
            raise LookupError(reason)
        # Fields that were not UTF-8 go back as the exact bytes they held.
        try:
            for name, data in dict(payload.get("raw_base64") or {}).items():
                raw[str(name)] = base64.b64decode(str(data), validate=True).decode("utf-8", "surrogateescape")
        except (TypeError, ValueError):
            raise LookupError(
                f"dead-letter entry {dead_id} cannot be replayed: its raw_base64 is not base64; "
                "inspect it with: quantum-trader dlq list"
            ) from None
        by_counter = [counter] if counter and origin in numbered else []
        new_id = await redis.register_script(_REPLAY)(
            keys=[stream, origin, *by_counter], args=[dead_id, *[item for pair in raw.items() for item in pair]]
        )
        if new_id is None:
            raise LookupError(
                f"dead-letter entry {dead_id} was replayed or removed meanwhile; see: quantum-trader dlq list"
            )
        replayed.append((dead_id, origin, str(new_id)))
    return replayed


# The dead letter goes back only if this call is the one that removes it, in one step: two
# replays of one id (two operators, a command retried) put it back once. A replayed intent
# gets a new id, hence a new client order id: back twice, it would place two orders.
# KEYS[1] dead-letter stream, KEYS[2] origin stream, KEYS[3] (a partition's intent stream) the intent
# id counter, allocated as route.lua does (and past the origin's newest id: someone may have written
# there directly, and an XADD below it would fail after the XDEL); ARGV dead-letter id, then field, value, ...
_REPLAY = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
local id = '*'
if KEYS[3] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ms, seq = string.match(redis.call('GET', KEYS[3]) or '0-0', '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms or '0'), tonumber(seq or '0')
  if redis.call('EXISTS', KEYS[2]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[2])
    for at = 1, #info, 2 do
      if info[at] == 'last-generated-id' then
        local top_ms, top_seq = string.match(info[at + 1], '^(%d+)-(%d+)$')
        top_ms, top_seq = tonumber(top_ms), tonumber(top_seq)
        if top_ms > ms or (top_ms == ms and top_seq > seq) then ms, seq = top_ms, top_seq end
      end
    end
  end
  if now > ms then ms, seq = now, 0 else seq = seq + 1 end
  id = string.format('%.0f-%.0f', ms, seq)
  redis.call('SET', KEYS[3], id)
end
return redis.call('XADD', KEYS[2], id, unpack(ARGV, 2))
"""
