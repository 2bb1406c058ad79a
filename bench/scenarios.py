"""The five scenarios of the benchmark, each on a fresh private server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis

from bench import baseline
from bench.harness import (
    DECISIONS,
    INTENT_GROUP,
    INTENTS,
    RESULTS,
    decision_fields,
    intent_fields,
    preload,
    prepare,
    server,
    sleep_until,
    span_rate,
    stages,
    used_memory_mb,
    wait_for,
)


def drain(intents: int, processes: int) -> dict[str, Any]:
    """Scenario 1: a preloaded backlog drained by N execution processes."""
    with server() as valkey:
        client = prepare(valkey.url)
        client.xgroup_create(INTENTS, INTENT_GROUP, id="0", mkstream=True)
        preload_s = preload(client, INTENTS, intents, intent_fields)
        procs = stages(valkey.url, [("execution", f"bench-exec-{n}") for n in range(processes)])
        for stage in procs:
            stage.start()
        try:
            wall = wait_for(client, RESULTS, intents, procs, limit_s=900)
        finally:
            for stage in procs:
                stage.stop()
        return {
            "intents": intents,
            "processes": processes,
            "preload_s": round(preload_s, 2),
            "wall_s_including_start": round(wall, 2),
            "intents_per_s": round(span_rate(client, RESULTS, intents)),
            "peak_rss_mb": {f"execution-{n}": round(s.peak_rss_mb, 1) for n, s in enumerate(procs)},
            "server_used_memory_mb": round(used_memory_mb(client), 1),
        }


def seed_baseline(intents: int) -> float:
    """Scenario 2: the seed's one-entry-per-round-trip consumer on a smaller backlog."""
    with server() as valkey:
        client = prepare(valkey.url)
        client.xgroup_create(INTENTS, INTENT_GROUP, id="0", mkstream=True)
        preload(client, INTENTS, intents, intent_fields)
        return baseline.drain_one_by_one(valkey.url, intents)


def end_to_end(decisions: int, separate: bool) -> dict[str, Any]:
    """Scenario 3: decisions through router, governor, execution to results (AI engine excluded)."""
    with server() as valkey:
        client = prepare(valkey.url)
        preload(client, DECISIONS, decisions, decision_fields)
        specs = [("router", "bench-router"), ("execution", "bench-exec")] if separate else [("run", "bench-run")]
        procs = stages(valkey.url, specs)
        for stage in procs:
            stage.start()
        try:
            wall = wait_for(client, RESULTS, decisions, procs, limit_s=900)
        finally:
            for stage in procs:
                stage.stop()
        return {
            "decisions": decisions,
            "mode": "router + execution processes" if separate else "quantum-trader run",
            "wall_s_including_start": round(wall, 2),
            "decisions_per_s": round(span_rate(client, RESULTS, decisions)),
            "peak_rss_mb": {s.args[0]: round(s.peak_rss_mb, 1) for s in procs},
            "server_used_memory_mb": round(used_memory_mb(client), 1),
        }


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _offer(url: str, rate: int, seconds: float, first: int) -> int:
    """Publish decisions at ``rate``/s for ``seconds`` in 10 ms ticks; returns how many."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    tick = 0.01
    per_tick = rate * tick
    owed = 0.0
    sent = 0
    start = time.perf_counter()
    ticks = int(seconds / tick)
    for n in range(ticks):
        owed += per_tick
        count = int(owed)
        owed -= count
        if count:
            async with client.pipeline(transaction=False) as pipe:
                for i in range(count):
                    pipe.xadd(DECISIONS, decision_fields(first + sent + i))
                await pipe.execute()
            sent += count
        await sleep_until(start + (n + 1) * tick)
    await client.aclose()
    return sent


def latency(rates: list[int], seconds: float) -> dict[str, Any]:
    """Scenario 4: decision published → result written, at fixed offered rates (one clock: the server's)."""
    out: dict[str, Any] = {}
    with server() as valkey:
        client = prepare(valkey.url)
        procs = stages(valkey.url, [("run", "bench-latency")])
        procs[0].start()
        try:
            time.sleep(2.0)  # the process is up and blocked on its groups
            procs[0].sample()
            first = 0
            for rate in rates:
                before = client.xlen(RESULTS)
                sent = asyncio.run(_offer(valkey.url, rate, seconds, first))
                first += sent
                wait_for(client, RESULTS, before + sent, procs, limit_s=120)
                decided = {}
                for entry_id, _fields in client.xrevrange(DECISIONS, count=sent):
                    decided[entry_id] = int(entry_id.split("-")[0])
                lat = []
                for result_id, fields in client.xrevrange(RESULTS, count=sent):
                    payload = json.loads(fields["payload"])
                    born = decided.get(payload["decision_id"])
                    if born is not None:
                        lat.append(int(result_id.split("-")[0]) - born)
                lat.sort()
                out[str(rate)] = {
                    "offered": sent,
                    "p50": _percentile(lat, 0.50),
                    "p99": _percentile(lat, 0.99),
                    "p999": _percentile(lat, 0.999),
                    "max": lat[-1] if lat else None,
                }
        finally:
            procs[0].stop()
        out["peak_rss_mb"] = round(procs[0].peak_rss_mb, 1)
        out["server_used_memory_mb"] = round(used_memory_mb(client), 1)
    return out
