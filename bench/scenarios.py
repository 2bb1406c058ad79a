"""The scenarios of the benchmark, each on a fresh private server."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections import Counter
from typing import Any

import redis
import redis.asyncio as aioredis

from bench import baseline
from bench.harness import (
    DECISIONS,
    INTENT_GROUP,
    INTENTS,
    MEMORY_ENV,
    RESULTS,
    Stage,
    decision_fields,
    entries_added,
    intent_fields,
    paper_orders_mb,
    preload,
    prepare,
    server,
    sleep_until,
    span_rate,
    stages,
    used_memory_mb,
    wait_for,
)
from quantum_trader.events import now_iso


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


REJECTED = "quantum:stream:decision.rejected"
# In flight, the peak of used_memory over this many seconds before a sample point: the streams fill
# between two trim passes and empty at each, so one instant would read anywhere on that saw-tooth.
MEMORY_WINDOW_S = 3.0


def _outcomes(client: redis.Redis) -> int:
    return entries_added(client, RESULTS) + entries_added(client, REJECTED)


def _check_alive(procs: list[Stage]) -> None:
    for stage in procs:
        stage.sample()
        if stage.proc is not None and stage.proc.poll() is not None:
            raise RuntimeError(f"{stage.args} exited with {stage.proc.returncode}; see {stage.log}")


async def _settle(
    client: aioredis.Redis, sync_client: redis.Redis, sent: int, procs: list[Stage], wait_s: float
) -> int:
    """Wait until every decision has its outcome, then ``wait_s`` more; returns used_memory."""
    deadline = time.perf_counter() + 300
    while _outcomes(sync_client) < sent:
        _check_alive(procs)
        if time.perf_counter() > deadline:
            raise RuntimeError(f"outcomes stopped short of {sent:,} decisions; see {procs[0].log}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(wait_s)
    return int((await client.info("memory"))["used_memory"])


async def _steady(url: str, rate: int, points: list[int], procs: list[Stage], settle_s: float) -> dict[str, Any]:
    """Publish fresh decisions at ``rate``/s up to the last point, sampling used_memory every 100 ms.

    Traffic is held back while more than a second of it waits for its outcome: on a loaded machine
    the figures then show the windows, not a backlog growing for want of CPU (the achieved rate is
    reported). At each point: the in-flight figures, then a pause until every outcome is written
    and every window has passed (the settled figure: what stays for good), then traffic resumes.
    """
    client = aioredis.Redis.from_url(url, decode_responses=True)
    sync_client = redis.Redis.from_url(url, decode_responses=True)
    samples: list[tuple[float, int]] = []
    marks: dict[int, dict[str, Any]] = {}
    sent, backlog, credit, paused, held_s = 0, 0, 0.0, 0.0, 0.0
    todo = list(points)
    start = last = next_sample = time.perf_counter()
    while todo:
        now = time.perf_counter()
        credit = min(credit + rate * (now - last), rate * 0.1)  # never more than 100 ms at once
        if backlog > rate:
            credit = 0.0
            held_s += now - last
        last = now
        count = min(int(credit), todo[0] - sent)
        if count > 0:
            stamp = now_iso()
            async with client.pipeline(transaction=False) as pipe:
                for i in range(count):
                    pipe.xadd(DECISIONS, decision_fields(sent + i, stamp))
                await pipe.execute()
            sent += count
            credit -= count
        if now >= next_sample or sent >= todo[0]:
            samples.append((now, int((await client.info("memory"))["used_memory"])))
            backlog = sent - _outcomes(sync_client)
            _check_alive(procs)
            next_sample = now + 0.1
        if sent >= todo[0]:
            point = todo.pop(0)
            window = [used for at, used in samples if now - MEMORY_WINDOW_S <= at]
            marks[point] = {
                "in_flight_mb": round(max(window) / 2**20, 1),
                "backlog": backlog,
                "keys_in_flight": await client.dbsize(),
            }
            marks[point]["settled_mb"] = round(await _settle(client, sync_client, sent, procs, settle_s) / 2**20, 1)
            marks[point]["keys_settled"] = await client.dbsize()
            # Once traffic has stopped: scanning for order keys would disturb the figures in flight.
            marks[point]["paper_orders_mb"] = round(paper_orders_mb(sync_client), 1)
            paused += time.perf_counter() - now
            samples.clear()
            last = time.perf_counter()
        await asyncio.sleep(0.01)
    await client.aclose()
    sync_client.close()
    return {"marks": marks, "traffic_s": time.perf_counter() - start - paused, "held_back_s": held_s}


def memory(points: list[int], rate: int) -> dict[str, Any]:
    """Scenario 5: steady traffic through router + execution processes (paper exchange); the server's
    used_memory at each decision count in ``points``. Flat = bounded by the windows, not the traffic."""
    # Settled = every window has passed: dedup keys expired, two trim passes since the last outcome.
    settle_s = float(MEMORY_ENV["QT_DEDUP_WINDOW_S"]) + 2 * float(MEMORY_ENV["QT_TRIM_INTERVAL_S"]) + 1
    with server() as valkey, tempfile.TemporaryDirectory(prefix="qt-bench-memory-") as tmp:
        client = prepare(valkey.url)
        # The journal too: its group holds every outcome until it has recorded it, so the row also
        # shows that the journal keeps up and its acknowledgements keep the outcome streams bounded.
        specs = [("router", "bench-router"), ("execution", "bench-exec"), ("journal", "bench-journal")]
        procs = stages(valkey.url, specs, MEMORY_ENV | {"QT_DATABASE_URL": f"sqlite:///{tmp}/journal.sqlite3"})
        for stage in procs:
            stage.start()
        try:
            time.sleep(2.0)  # the processes are up and blocked on their groups
            run = asyncio.run(_steady(valkey.url, rate, points, procs, settle_s))
        finally:
            for stage in procs:
                stage.stop()
        first, last = run["marks"][points[0]], run["marks"][points[-1]]
        span = points[-1] - points[0]
        growth = {key: round(last[key] - first[key], 1) for key in ("in_flight_mb", "settled_mb", "paper_orders_mb")}
        return {
            "rate": rate,
            "achieved_per_s": round(points[-1] / run["traffic_s"]),
            "held_back_s": round(run["held_back_s"], 1),
            "points": points,
            "settings": MEMORY_ENV,
            "at": {str(point): mark for point, mark in run["marks"].items()},
            "growth_mb": growth,
            "bytes_per_decision": {key: round(mb * 2**20 / span, 1) for key, mb in growth.items()},
            "results_kept": client.xlen(RESULTS),
            "results_written": entries_added(client, RESULTS),
            "kept_by_status": dict(Counter(json.loads(f["payload"])["status"] for _i, f in client.xrange(RESULTS))),
            "peak_rss_mb": {s.args[0]: round(s.peak_rss_mb, 1) for s in procs},
        }
