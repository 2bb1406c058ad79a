"""What the one decision stream costs the server: publishing a decision, and reading, acknowledging and
deleting it (the router's share of the stream, without its routing script).

Decisions are published in pipelines of 1,000 and read by one consumer group in batches of 1,000, on a
private server; the server's CPU (``INFO cpu``) is read before and after each half. The figure says
whether the single decision stream could be what limits a deployment (it would saturate a core at
1e6 / (publish + read µs) decisions/s), against the end-to-end server cost per intent of the partitions
rows; it is also checked against the same work on a decision partition (``publisher.publish_decisions``,
ids from one counter by a script).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from bench.harness import server
from bench.partitions import decision, server_cpu_s
from quantum_trader import keys
from quantum_trader.settings import Settings

BATCH = 1000
STREAM = keys.StreamNames().decision


def _read_all(client: redis.Redis, stream: str, count: int) -> None:
    """Read, acknowledge and delete ``count`` entries of ``stream`` in batches of ``BATCH``."""
    got = 0
    while got < count:
        reply = client.xreadgroup("bench", "reader", {stream: ">"}, count=BATCH)
        ids = [entry_id for entry_id, _fields in reply[0][1]]
        client.xack(stream, "bench", *ids)
        client.xdel(stream, *ids)
        got += len(ids)


def one_stream(count: int) -> dict[str, Any]:
    """µs of server CPU per decision to publish it on the one stream, and to read, acknowledge and delete it."""
    import asyncio

    from quantum_trader.bus.connection import client as async_client
    from quantum_trader.publisher import publish_decisions

    made = [decision(n, stamp="2026-01-01T00:00:00Z") for n in range(count)]
    with server() as valkey:
        client = redis.Redis.from_url(valkey.url, decode_responses=True)
        try:
            out: dict[str, Any] = {"decisions": count}
            client.xgroup_create(STREAM, "bench", id="0", mkstream=True)
            cpu, began = server_cpu_s(client), time.perf_counter()
            for first in range(0, count, BATCH):
                pipe = client.pipeline(transaction=False)
                for fields in made[first : first + BATCH]:
                    pipe.xadd(STREAM, fields)
                pipe.execute()
            out["publish_us"] = round((server_cpu_s(client) - cpu) * 1e6 / count, 2)
            out["publish_per_s"] = round(count / (time.perf_counter() - began))
            cpu, began = server_cpu_s(client), time.perf_counter()
            _read_all(client, STREAM, count)
            out["read_ack_delete_us"] = round((server_cpu_s(client) - cpu) * 1e6 / count, 2)
            out["read_per_s"] = round(count / (time.perf_counter() - began))

            # The same decisions onto 4 decision partitions, each with an id from the counter (publish.lua).
            settings = Settings(redis_url=valkey.url, partitions=4)

            async def to_partitions() -> None:
                writer = async_client(valkey.url)
                try:
                    for first in range(0, count, BATCH):
                        await publish_decisions(writer, settings, made[first : first + BATCH])
                finally:
                    await writer.aclose()

            cpu = server_cpu_s(client)
            asyncio.run(to_partitions())
            out["publish_to_partitions_us"] = round((server_cpu_s(client) - cpu) * 1e6 / count, 2)
            total = out["publish_us"] + out["read_ack_delete_us"]
            out["one_core_ceiling_per_s"] = round(1e6 / total)
            return out
        finally:
            client.close()


def decisions(quick: bool) -> dict[str, Any]:
    """The decision stream rows (100,000 decisions; quick: 20,000)."""
    return {"decision_stream": one_stream(20_000 if quick else 100_000)}


def render(res: dict[str, Any]) -> list[str]:
    """Markdown rows."""
    row = res["decision_stream"]
    return [
        f"| publish one decision on the one stream (server CPU) | {row['publish_us']} µs | |",
        f"| read + acknowledge + delete it (server CPU) | {row['read_ack_delete_us']} µs | |",
        f"| publish it to a decision partition (publish.lua, server CPU) | {row['publish_to_partitions_us']} µs | |",
        f"| one core's ceiling for the one stream | {row['one_core_ceiling_per_s']:,} decisions/s | |",
    ]
