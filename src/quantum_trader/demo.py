"""``quantum-trader demo``: the whole pipeline on the paper exchange, live, on a private server.

Two sources: synthetic candles through the AI engine's strategies, or a seeded random walk
of prices and decisions on it (``DecisionGenerator``), with a few retries (the same decision
published twice) and a few malformed decisions mixed in, so every outcome path shows up.
Nothing here draws: the command line renders each ``DemoProgress``.
"""

from __future__ import annotations

import asyncio
import functools
import random
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from quantum_trader import keys, trading
from quantum_trader.book import Marked, marked_positions
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.inspect import StreamStat, last_ids, outcome_counts, pipeline_status, stream_stat
from quantum_trader.bus.streams import publish, sleep_or_stop
from quantum_trader.events import DECISION, Fields, envelope
from quantum_trader.governor import set_kill
from quantum_trader.runner import Runner, install_signal_handlers, serve
from quantum_trader.settings import Settings

START_PRICES = {"BTCUSDT": 60_000.0, "ETHUSDT": 3_000.0, "SOLUSDT": 150.0}


@dataclass
class DecisionGenerator:
    """Seeded, so two demos with the same seed publish the same decisions."""

    redis: Redis
    stream: str
    seed: int = 7
    notional: float = 200.0
    duplicate_every: int = 25
    invalid_every: int = 40
    published: int = 0
    distinct: int = 0
    prices: dict[str, float] = field(default_factory=lambda: dict(START_PRICES))

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _step_prices(self) -> None:
        for symbol, price in self.prices.items():
            self.prices[symbol] = max(price * (1 + self.rng.gauss(0, 0.002)), 0.01)

    def _decision(self, n: int) -> Fields:
        symbol = self.rng.choice(sorted(self.prices))
        price = Decimal(f"{self.prices[symbol]:.2f}")
        qty = (Decimal(str(self.notional)) / price).quantize(Decimal("0.00001"))
        payload: dict[str, object] = {
            "symbol": symbol,
            "side": self.rng.choice(["BUY", "SELL"]),
            "qty": str(qty),
            "price": str(price),
            "confidence": round(self.rng.uniform(0.5, 1.0), 3),
            "strategy": "demo-random-walk",
        }
        if self.invalid_every and n % self.invalid_every == self.invalid_every - 1:
            payload["qty"] = "-1"  # malformed on purpose: the router rejects it as INVALID
        return envelope(
            DECISION,
            payload,
            trace_id=uuid.uuid4().hex,
            correlation_id=f"demo-{self.seed}-{n}",
            source="demo",
        )

    async def publish_batch(self, count: int) -> None:
        """Move prices one step and publish ``count`` decisions (plus retries of some)."""
        self._step_prices()
        await self.redis.hset(keys.PRICE_HASH, mapping={s: f"{p:.2f}" for s, p in self.prices.items()})
        batch: list[Fields] = []
        for _ in range(count):
            fields = self._decision(self.distinct)
            self.distinct += 1
            batch.append(fields)
            if self.duplicate_every and self.distinct % self.duplicate_every == 0:
                batch.append(dict(fields))  # a retry: same decision, new stream id
        await publish(self.redis, self.stream, batch)
        self.published += len(batch)

    async def run(self, total: int, rate: float, stop: asyncio.Event) -> None:
        """Publish ``total`` distinct decisions at about ``rate`` per second."""
        tick = 0.1
        per_tick = max(1, int(rate * tick))
        while self.distinct < total and not stop.is_set():
            await self.publish_batch(min(per_tick, total - self.distinct))
            await asyncio.sleep(tick)


@dataclass(frozen=True, slots=True)
class DemoProgress:
    """The demo so far, four times a second."""

    source: str
    elapsed: float
    head: str  # what was fed: candles and decisions, or decisions and distinct ones
    outcomes: dict[str, int]
    streams: list[StreamStat]


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
    positions: list[Marked] = field(default_factory=list)  # the book's, marked at the last prices
    journaled: dict[str, int] = field(default_factory=dict)  # rows the journal wrote, per table
    protective_exits: int = 0  # stop-loss or take-profit exits the protect stage fired
    trading_state: str = "ACTIVE"


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
    on_progress: Callable[[DemoProgress], None] | None = None,
) -> DemoReport:
    """The pipeline on the paper exchange, until done, ``duration``, or Ctrl-C.

    ``on_progress`` gets the state of the streams and the outcomes so far four times a second
    (the command line draws it as a live table).

    ``source="candles"``: synthetic market data (``count`` candles per symbol at ``rate`` a
    second) through the AI engine's strategies, the router, the governor and execution.
    ``source="decisions"``: ``count`` generated decisions with retries and malformed ones
    mixed in, so that every outcome path shows up.
    """
    # numpy and pandas: imported only when market data is used, not by every command.
    from quantum_trader.feed import FeedTotals, replay, run_feed
    from quantum_trader.marketdata import synthetic

    streams = settings.streams
    since = await last_ids(redis, [streams.result, streams.rejected])
    decisions_before = (await stream_stat(redis, streams.decision)).entries_added
    await set_kill(redis, on=False)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    interrupted = asyncio.Event()
    feed_totals = FeedTotals()
    generator = DecisionGenerator(redis, streams.decision, seed=seed)
    stages = [keys.ROUTER, keys.EXECUTION, keys.JOURNAL]
    if source == "candles":
        stages[:0] = [keys.AI_ENGINE, keys.PROTECT]
        start = datetime.now(UTC) - timedelta(minutes=count)
        candles = synthetic(START_PRICES, count, seed=seed, start=start)
        source_batches = replay(candles, rate=rate, sleep=functools.partial(sleep_or_stop, stop))
        feeder: Coroutine[Any, Any, object] = run_feed(redis, streams.candle, source_batches, stop, feed_totals)
    else:
        feeder = generator.run(count, rate, stop)
    watcher: list[asyncio.Task[None]] = []

    async def watch(runner: Runner) -> None:
        async def loop() -> None:
            feeding = asyncio.create_task(feeder)
            began = asyncio.get_running_loop().time()
            while True:
                counts = await outcome_counts(redis, streams, since)
                done = sum(counts.values())
                stats = {stat.name: stat for stat in await pipeline_status(redis, streams.pipeline())}
                decided = stats[streams.decision].entries_added - decisions_before
                elapsed = asyncio.get_running_loop().time() - began
                head = (
                    f"candles {feed_totals.published:,}/{count * len(START_PRICES):,}  decisions {decided:,}"
                    if source == "candles"
                    else f"decisions {generator.published:,} (distinct {generator.distinct:,}/{count:,})"
                )
                if on_progress is not None:
                    on_progress(DemoProgress(source, elapsed, head, dict(counts), list(stats.values())))
                caught_up = (
                    done >= decided
                    and (source != "candles" or _group_done(stats[streams.candle], settings.ai_group))
                    and all(
                        _group_done(stats[stream], settings.journal_group)
                        for stream in (streams.result, streams.rejected)
                        if stats[stream].exists
                    )
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

    # The dashboard with QT_RUN_WEB (on the demo's server); no alerts from a private demo server.
    runner = await serve(redis, settings, stages, stop, on_start=watch, web=settings.run_web, alerting=False)
    await asyncio.gather(*watcher)
    counts = await outcome_counts(redis, streams, since)
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
        positions=await marked_positions(redis),
        journaled=dict(runner.stages[keys.JOURNAL].totals),
        protective_exits=runner.stages[keys.PROTECT].totals["exits"] if keys.PROTECT in runner.stages else 0,
        trading_state=(await trading.risk_status(redis, settings)).state.state.value,
    )
