"""Publishing decisions with QT_PARTITIONS > 1: each to its symbol's partition of the decision stream.

Each partition of the decision stream is read by one router process at a time (``bus/partitions.py``), so a
symbol's decisions are routed in the order they were published however many routers run. Publishers that
know nothing of partitions keep writing to the one decision stream; its routers share one consumer group,
and several of them may route one symbol's decisions out of order.
"""

from __future__ import annotations

import json

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import DecodeError
from quantum_trader.events import Fields
from quantum_trader.router import normalise_symbol
from quantum_trader.scripts import pack, register
from quantum_trader.settings import Settings


def decision_stream_for(fields: Fields, settings: Settings) -> str:
    """The stream a publisher writes a decision to: its symbol's partition of the decision stream with
    QT_PARTITIONS > 1 (the partition its intents go to), else, or when no symbol can be read from it, the one
    decision stream (the router judges it there)."""
    if settings.partitions <= 1:
        return settings.streams.decision
    try:
        payload = json.loads(fields.get("payload", ""))
        symbol = normalise_symbol(payload.get("symbol") if isinstance(payload, dict) else None, settings.quote_assets)
    except (ValueError, DecodeError, RecursionError):
        return settings.streams.decision
    partition = keys.partition_of(symbol, settings.partitions)
    return keys.partition_stream(settings.streams.decision, partition, settings.partitions)


async def publish_decisions(redis: Redis, settings: Settings, decisions: list[Fields]) -> list[tuple[str, str]]:
    """Publish decisions each to its stream (``decision_stream_for``) in one step; (stream, id) of each.

    A symbol's decisions keep their order: they all go to one stream, in the order given. With partitions
    the ids come from one counter (``publish.lua``), so no two decision streams hold the same id.
    """
    if not decisions:
        return []
    streams = [decision_stream_for(fields, settings) for fields in decisions]
    if settings.partitions <= 1:
        async with redis.pipeline(transaction=False) as pipe:
            for fields in decisions:
                pipe.xadd(settings.streams.decision, fields)
            ids = await pipe.execute()
    else:
        flat = [[part for pair in fields.items() for part in pair] for fields in decisions]
        ids = await register(redis, "publish")(
            keys=[settings.streams.decision, keys.DECISION_IDS, *streams], args=[pack(flat)]
        )
    return [(stream, str(entry_id)) for stream, entry_id in zip(streams, ids, strict=True)]
