"""Operator actions behind the CLI that are more than one call: the demo, the dead-letter stream."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.demo import DecisionGenerator
from quantum_trader.governor import set_kill
from quantum_trader.services import Runner, serve
from quantum_trader.settings import Settings
from quantum_trader.status import pipeline_status
from quantum_trader.views import status_table


async def outcome_counts(redis: Redis, settings: Settings, since: dict[str, str]) -> Counter[str]:
    """Terminal outcomes written after the ids in ``since`` (results by status, rejections by reason)."""
    counts: Counter[str] = Counter()
    streams = settings.streams
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
                    counts[json.loads(fields["payload"])["status"]] += 1
            start = chunk[-1][0]
    return counts


async def last_ids(redis: Redis, streams: list[str]) -> dict[str, str]:
    """The newest entry id of each stream (``0-0`` when empty)."""
    out = {}
    for stream in streams:
        last = await redis.xrevrange(stream, count=1)
        out[stream] = last[0][0] if last else "0-0"
    return out


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo did."""

    published: int
    distinct: int
    outcomes: dict[str, int]
    balances: dict[str, str]
    complete: bool


async def run_demo(
    redis: Redis,
    settings: Settings,
    *,
    decisions: int,
    rate: float,
    limit_s: float,
    seed: int,
    console: Console,
) -> DemoReport:
    """Run router + execution on the paper exchange with generated decisions, showing live status."""
    streams = settings.streams
    since = await last_ids(redis, [streams.result, streams.rejected])
    await set_kill(redis, on=False)
    generator = DecisionGenerator(redis, streams.decision, seed=seed)
    stop = asyncio.Event()
    feeder_stop = asyncio.Event()
    watcher: list[asyncio.Task[None]] = []

    async def watch(runner: Runner) -> None:
        async def loop() -> None:
            feeder = asyncio.create_task(generator.run(decisions, rate, feeder_stop))
            deadline = asyncio.get_running_loop().time() + limit_s
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while True:
                    counts = await outcome_counts(redis, settings, since)
                    done = sum(counts.values())
                    stats = await pipeline_status(redis, streams.pipeline())
                    line = Text(
                        f"published {generator.published:,} (distinct {generator.distinct:,})  "
                        f"outcomes {done:,}  " + "  ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
                    )
                    live.update(Group(status_table(stats, "Demo: paper exchange, embedded Valkey"), line))
                    finished = feeder.done() and done >= generator.published
                    if finished or asyncio.get_running_loop().time() > deadline or stop.is_set():
                        break
                    await asyncio.sleep(0.25)
            feeder_stop.set()
            await feeder
            stop.set()

        watcher.append(asyncio.create_task(loop()))

    await serve(redis, settings, ["router", "execution"], stop, on_start=watch)
    await asyncio.gather(*watcher)
    counts = await outcome_counts(redis, settings, since)
    balances = await redis.hgetall(keys.paper_balances())
    return DemoReport(
        published=generator.published,
        distinct=generator.distinct,
        outcomes=dict(counts),
        balances=dict(sorted(balances.items())),
        complete=sum(counts.values()) >= generator.published,
    )


async def dead_letters(redis: Redis, stream: str, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` dead-letter entries, decoded."""
    out = []
    for entry_id, fields in await redis.xrevrange(stream, count=count):
        payload = json.loads(fields.get("payload", "{}"))
        out.append({"id": entry_id, **payload})
    return out


async def replay_dead_letters(redis: Redis, stream: str, ids: list[str]) -> list[tuple[str, str, str]]:
    """Put dead-letter entries back on their origin stream (and remove them from the dead letters).

    Returns (dead-letter id, origin stream, new entry id) for each replayed entry.
    """
    replayed = []
    for dead_id in ids:
        found = await redis.xrange(stream, min=dead_id, max=dead_id)
        if not found:
            raise LookupError(f"no dead-letter entry {dead_id} on {stream}; list them with: quantum-trader dlq list")
        payload = json.loads(found[0][1]["payload"])
        origin, raw = payload["stream"], payload["raw"]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(origin, raw)
            pipe.xdel(stream, dead_id)
            new_id, _ = await pipe.execute()
        replayed.append((dead_id, origin, str(new_id)))
    return replayed
