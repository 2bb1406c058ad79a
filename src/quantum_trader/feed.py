"""The feed: candles from a list or an exchange, cleaned (``marketdata.clean``), then published.

A source is an async iterator of ``Candle`` batches: ``replay`` (a list, as fast as
possible, at a fixed rate, or paced by the candles' own times at a speed factor) and
``live`` (polling an exchange's public OHLCV endpoint). ``run_feed`` drives any
source: ``clean`` drops what a strategy must never see and says why;
``publish`` XADDs a batch of candles to the candle stream in one pipeline and
records each symbol's latest close where the paper exchange reads prices, and its
newest open time: a feed run again skips what is already on the stream and says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError, QuantumTraderError, TransientExchangeError
from quantum_trader.events import MARKET_CANDLE, Candle, Fields, envelope
from quantum_trader.logs import get_logger
from quantum_trader.marketdata import clean, interval_ms

log = get_logger("marketdata")  # the same component in the logs as the candles' side
ALREADY_PUBLISHED = "already published (not after the newest candle of the symbol on the stream)"


def candle_fields(candle: Candle) -> Fields:
    """A candle as a stream entry (the pipeline's envelope)."""
    stamp = datetime.fromtimestamp(candle.open_time / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return envelope(
        MARKET_CANDLE, candle, trace_id="", correlation_id=candle.symbol, source="marketdata", timestamp=stamp
    )


async def publish(redis: Redis, stream: str, candles: list[Candle]) -> None:
    """XADD a batch of candles and record each symbol's latest close and open time, in one pipeline."""
    if not candles:
        return
    latest = {candle.symbol: repr(candle.close) for candle in candles}
    newest = {candle.symbol: str(candle.open_time) for candle in candles}
    async with redis.pipeline(transaction=False) as pipe:
        for candle in candles:
            pipe.xadd(stream, candle_fields(candle))
        pipe.hset(keys.PRICE_HASH, mapping=latest)
        pipe.hset(keys.LAST_OPEN_HASH, mapping=newest)
        await pipe.execute()


async def published_until(redis: Redis) -> dict[str, int]:
    """Each symbol's newest open time already published to the candle stream (epoch ms)."""
    raw = await redis.hgetall(keys.LAST_OPEN_HASH)
    return {symbol: int(value) for symbol, value in raw.items() if value.isascii() and value.isdecimal()}


# ---- sources and the feed --------------------------------------------------------------

Sleep = Callable[[float], Awaitable[None]]


async def replay(
    candles: list[Candle], *, rate: float = 0, speed: float = 0, sleep: Sleep = asyncio.sleep, batch: int = 500
) -> AsyncIterator[list[Candle]]:
    """A list as a source: as fast as possible, ``rate`` candles a second, or paced by the
    candles' own open times divided by ``speed`` (1 = real time, 60 = a minute a second)."""
    if speed > 0:
        index = 0
        while index < len(candles):
            stamp = candles[index].open_time
            end = index
            while end < len(candles) and candles[end].open_time == stamp:
                end += 1
            yield candles[index:end]
            if end < len(candles):
                await sleep(max(0.0, (candles[end].open_time - stamp) / 1000 / speed))
            index = end
        return
    step = batch if rate <= 0 else max(1, int(rate / 10))
    for first in range(0, len(candles), step):
        chunk = candles[first : first + step]
        yield chunk
        if rate > 0:
            await sleep(len(chunk) / rate)


class OhlcvSource(Protocol):
    """What ``live`` needs of an exchange: its public candles (``CcxtExchange`` has them)."""

    async def candles(self, symbol: str, timeframe: str = "1m", limit: int = 100) -> list[list[Decimal]]:
        """``[open_ms, open, high, low, close, volume]`` rows, oldest first."""
        ...


async def live(
    source: OhlcvSource,
    symbols: list[str],
    *,
    timeframe: str = "1m",
    poll_s: float = 10.0,
    limit: int = 100,
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    sleep: Sleep = asyncio.sleep,
    polls: int | None = None,
    stop: asyncio.Event | None = None,
    stats: PollStats | None = None,
) -> AsyncIterator[list[Candle]]:
    """Poll an exchange's public OHLCV endpoint; yield each closed candle once, oldest first.

    The candle still forming (its close time in the future) is left for a later poll. A
    failed poll is logged and retried at the next one: a live feed does not stop for a
    passing network error. ``stats`` counts the requests and failures, so the caller can
    say when the exchange could not be reached at all.
    """
    step = interval_ms(timeframe)
    if step is None:
        raise ConfigError(f"timeframe {timeframe!r}: use a number and one of s, m, h, d, w (e.g. 1m, 1h)")
    newest: dict[str, int] = {}
    stats = stats if stats is not None else PollStats()
    done = 0
    while (polls is None or done < polls) and not (stop is not None and stop.is_set()):
        out: list[Candle] = []
        for symbol in symbols:
            stats.requests += 1
            try:
                rows = await source.candles(symbol, timeframe, limit)
            except (QuantumTraderError, OSError, ValueError) as exc:
                stats.failed += 1
                stats.unreachable += isinstance(exc, TransientExchangeError | OSError)
                stats.last_error = str(exc)
                log.warning("live_poll_failed", symbol=symbol, error=str(exc), retry_in_s=poll_s)
                continue
            closed_before = now_ms() - step
            for row in rows:
                open_ms = int(row[0])
                if open_ms > closed_before or open_ms <= newest.get(symbol, -1):
                    continue
                out.append(Candle(symbol=symbol, interval=timeframe, open_time=open_ms, open=float(row[1]),
                                  high=float(row[2]), low=float(row[3]), close=float(row[4]),
                                  volume=float(row[5])))  # fmt: skip
                newest[symbol] = open_ms
        done += 1
        if out:
            yield sorted(out, key=lambda c: (c.open_time, c.symbol))
        if polls is None or done < polls:
            await sleep(poll_s)


@dataclass
class PollStats:
    """What a live source asked the exchange and how often that failed."""

    requests: int = 0
    failed: int = 0
    unreachable: int = 0  # failures of the network or the exchange's service (after the adapter's retries)
    last_error: str = ""

    def problem(self, exchange: str) -> str | None:
        """One line when nothing could be fetched at all (None when something was)."""
        if not self.requests or self.failed < self.requests:
            return None
        what = "could not be reached" if self.unreachable else "answered no request"
        failed = f"{self.failed} of {self.requests} requests failed"
        return f"the exchange {exchange} {what}: {failed}; last error: {self.last_error}"


@dataclass
class FeedTotals:
    """What a feed did so far; ``reasons`` counts the skipped candles by why."""

    published: int = 0
    skipped: int = 0
    last: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    on_stream: dict[str, int] | None = None  # newest open time per symbol before this feed began

    def summary(self, stream: str) -> str:
        """The feed's one-line report: what it published, what it skipped and why."""
        line = f"published {self.published:,} candles to {stream}"
        if not self.skipped:
            return line + "; none skipped"
        why = ", ".join(f"{count:,} {reason}" for reason, count in sorted(self.reasons.items(), key=lambda i: -i[1]))
        return f"{line}; skipped {self.skipped:,}: {why}"


async def run_feed(
    redis: Redis,
    stream: str,
    source: AsyncIterator[list[Candle]],
    stop: asyncio.Event | None = None,
    totals: FeedTotals | None = None,
) -> FeedTotals:
    """Clean and publish every batch of ``source`` until it ends or ``stop`` is set.

    A candle not after the newest one of its symbol already on the stream (a feed run twice,
    a file replayed) is skipped as already published: the AI engine would skip it as out of
    order anyway. Each symbol's candles on the stream stay in time order.
    """
    totals = totals or FeedTotals()
    if totals.on_stream is None:
        totals.on_stream = await published_until(redis)
        for symbol, newest in totals.on_stream.items():
            totals.last[symbol] = max(newest, totals.last.get(symbol, newest))
    on_stream = totals.on_stream
    async for batch in source:
        if stop is not None and stop.is_set():
            break
        fresh = [c for c in batch if c.open_time > on_stream.get(c.symbol, -1)]
        if len(fresh) < len(batch):
            if ALREADY_PUBLISHED not in totals.reasons:  # once per feed, not once per candle
                times = {s: datetime.fromtimestamp(t / 1000, UTC).isoformat() for s, t in on_stream.items()}
                log.warning("candles_already_published", action="skipped", newest_on_stream=times)
            old = len(batch) - len(fresh)
            totals.reasons[ALREADY_PUBLISHED] = totals.reasons.get(ALREADY_PUBLISHED, 0) + old
            totals.skipped += old
        kept, skipped = clean(fresh, totals.last)
        await publish(redis, stream, kept)
        totals.published += len(kept)
        totals.skipped += len(skipped)
        for item in skipped:
            totals.reasons[item.reason] = totals.reasons.get(item.reason, 0) + 1
    return totals
