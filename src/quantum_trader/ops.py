"""Operator actions behind the CLI that are more than one call: the demo, the dead-letter stream."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import sleep_or_stop
from quantum_trader.demo import START_PRICES as DEMO_SYMBOLS
from quantum_trader.demo import DecisionGenerator
from quantum_trader.exchanges.base import client_order_id
from quantum_trader.governor import set_kill
from quantum_trader.services import Runner, install_signal_handlers, serve
from quantum_trader.settings import Settings
from quantum_trader.status import StreamStat, pipeline_status, stream_stat
from quantum_trader.views import status_table


async def outcome_counts(redis: Redis, settings: Settings, since: dict[str, str]) -> Counter[str]:
    """Terminal outcomes written after the ids in ``since``: results by status and reason, rejections by reason."""
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
                    result = json.loads(fields["payload"])
                    counts[" ".join(filter(None, (result["status"], result.get("reason"))))] += 1
            start = chunk[-1][0]
    return counts


async def last_ids(redis: Redis, streams: list[str]) -> dict[str, str]:
    """The newest entry id of each stream (``0-0`` when empty)."""
    out = {}
    for stream in streams:
        last = await redis.xrevrange(stream, count=1)
        out[stream] = last[0][0] if last else "0-0"
    return out


async def wait_for_outcome(
    redis: Redis, settings: Settings, decision_id: str, since: dict[str, str], timeout_s: float
) -> dict[str, Any] | None:
    """The terminal outcome of one decision: its rejection, or its intent's result; None after ``timeout_s``.

    ``since`` holds the result and rejection streams' last ids from before the decision was published.
    """
    streams = settings.streams
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


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo did."""

    source: str
    candles: int
    published: int
    distinct: int
    outcomes: dict[str, int]
    balances: dict[str, str]
    complete: bool
    interrupted: bool


def _group_done(stat: StreamStat, group: str) -> bool:
    """True once ``group`` has read and acknowledged everything on the stream."""
    return any(g.name == group and g.pending == 0 and g.lag == 0 for g in stat.groups)


async def run_demo(
    redis: Redis,
    settings: Settings,
    *,
    source: str,
    count: int,
    rate: float,
    duration: float | None,
    limit_s: float,
    seed: int,
    console: Console,
) -> DemoReport:
    """The pipeline on the paper exchange with a live status table, until done, ``duration``, or Ctrl-C.

    ``source="candles"``: synthetic market data (``count`` candles per symbol at ``rate`` a
    second) through the AI engine's strategies, the router, the governor and execution.
    ``source="decisions"``: ``count`` generated decisions with retries and malformed ones
    mixed in, so that every outcome path shows up.
    """
    # numpy and pandas: imported only when market data is used, not by every command.
    from quantum_trader.marketdata import FeedTotals, replay, run_feed, synthetic

    streams = settings.streams
    since = await last_ids(redis, [streams.result, streams.rejected])
    decisions_before = (await stream_stat(redis, streams.decision)).entries_added
    await set_kill(redis, on=False)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    interrupted = asyncio.Event()
    feed_totals = FeedTotals()
    generator = DecisionGenerator(redis, streams.decision, seed=seed)
    stages = ["router", "execution"]
    if source == "candles":
        stages.insert(0, "ai-engine")
        start = datetime.now(UTC) - timedelta(minutes=count)
        candles = synthetic(DEMO_SYMBOLS, count, seed=seed, start=start)
        source_batches = replay(candles, rate=rate, sleep=functools.partial(sleep_or_stop, stop))
        feeder: Coroutine[Any, Any, object] = run_feed(redis, streams.candle, source_batches, stop, feed_totals)
    else:
        feeder = generator.run(count, rate, stop)
    watcher: list[asyncio.Task[None]] = []

    async def watch(runner: Runner) -> None:
        async def loop() -> None:
            feeding = asyncio.create_task(feeder)
            began = asyncio.get_running_loop().time()
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while True:
                    counts = await outcome_counts(redis, settings, since)
                    done = sum(counts.values())
                    stats = {stat.name: stat for stat in await pipeline_status(redis, streams.pipeline())}
                    decided = stats[streams.decision].entries_added - decisions_before
                    elapsed = asyncio.get_running_loop().time() - began
                    head = (
                        f"candles {feed_totals.published:,}/{count * len(DEMO_SYMBOLS):,}  decisions {decided:,}"
                        if source == "candles"
                        else f"decisions {generator.published:,} (distinct {generator.distinct:,}/{count:,})"
                    )
                    line = Text(
                        f"{elapsed:5.1f}s  {head}  outcomes {done:,}  "
                        + "  ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
                    )
                    live.update(Group(status_table(list(stats.values()), f"Demo ({source}): paper exchange"), line))
                    caught_up = done >= decided and (
                        source != "candles" or _group_done(stats[streams.candle], settings.ai_group)
                    )
                    if stop.is_set():
                        interrupted.set()
                        break
                    if feeding.done() and caught_up:
                        break
                    if elapsed > (duration if duration is not None else limit_s):
                        interrupted.set()
                        break
                    await asyncio.sleep(0.25)
            # The feed stops by itself between batches once ``stop`` is set; it is not cancelled
            # (a cancellation landing inside a client call could leave it waiting for good).
            stop.set()
            await asyncio.gather(feeding, return_exceptions=True)

        watcher.append(asyncio.create_task(loop()))

    await serve(redis, settings, stages, stop, on_start=watch)
    await asyncio.gather(*watcher)
    counts = await outcome_counts(redis, settings, since)
    decided = (await stream_stat(redis, streams.decision)).entries_added - decisions_before
    balances = await redis.hgetall(keys.paper_balances())
    return DemoReport(
        source=source,
        candles=feed_totals.published,
        published=decided,
        distinct=generator.distinct,
        outcomes=dict(counts),
        balances=dict(sorted(balances.items())),
        complete=sum(counts.values()) >= decided,
        interrupted=interrupted.is_set(),
    )


async def dead_letters(redis: Redis, stream: str, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` dead-letter entries, decoded."""
    out = []
    for entry_id, fields in await redis.xrevrange(stream, count=count):
        payload = json.loads(fields.get("payload", "{}"))
        out.append({"id": entry_id, **payload})
    return out


_ENTRY_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?\Z")


async def replay_dead_letters(
    redis: Redis, stream: str, ids: list[str], exchange: str = "paper"
) -> list[tuple[str, str, str]]:
    """Put dead-letter entries back on their origin stream (and remove them from the dead letters).

    An intent whose first delivery may have placed an order (the paper exchange or the send
    record of ``exchange`` knows its client order id) is refused: back on the stream it would get
    a new id, hence a new client order id, and a second order.

    Returns (dead-letter id, origin stream, new entry id) for each replayed entry.
    """
    replayed = []
    malformed = [dead_id for dead_id in ids if not _ENTRY_ID.match(dead_id)]
    if malformed:
        raise LookupError(
            f"{malformed[0]!r} is not a stream entry id (like 1700000000000-0); see: quantum-trader dlq list"
        )
    for dead_id in ids:
        found = await redis.xrange(stream, min=dead_id, max=dead_id)
        if not found:
            raise LookupError(f"no dead-letter entry {dead_id} on {stream}; list them with: quantum-trader dlq list")
        payload = json.loads(found[0][1]["payload"])
        origin, raw = payload["stream"], dict(payload["raw"])
        coid = client_order_id(str(payload.get("entry_id", "")), raw.get("trace_id", ""), raw.get("correlation_id", ""))
        if await redis.exists(keys.paper_order(coid), keys.exchange_sent(exchange, coid)):
            raise LookupError(
                f"dead-letter entry {dead_id} is an intent whose order {coid} may exist at the exchange; "
                "replaying it would place a second order. Check the order, then remove the entry with XDEL"
            )
        # Fields that were not UTF-8 go back as the exact bytes they held.
        for name, data in payload.get("raw_base64", {}).items():
            raw[name] = base64.b64decode(data).decode("utf-8", "surrogateescape")
        new_id = await redis.register_script(_REPLAY)(
            keys=[stream, origin], args=[dead_id, *[item for pair in raw.items() for item in pair]]
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
# KEYS[1] dead-letter stream, KEYS[2] origin stream; ARGV dead-letter id, then field, value, ...
_REPLAY = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
"""
