"""Market data: candles from a synthetic generator, a file or an exchange, cleaned, then published.

A source is an async iterator of ``Candle`` batches: ``replay`` (a list, as fast as
possible, at a fixed rate, or paced by the candles' own times at a speed factor) and
``live`` (polling an exchange's public OHLCV endpoint). ``run_feed`` drives any
source: ``clean`` drops what a strategy must never see (non-finite or non-positive
prices, high below low, out-of-order or duplicate open times) and says why;
``publish`` XADDs a batch of candles to the candle stream in one pipeline and
records each symbol's latest close where the paper exchange reads prices. Gaps
(missing candles) are not filled with invented prices: the AI engine restarts the
symbol's warm-up after one (``gap``).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np
import pandas as pd

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError, QuantumTraderError
from quantum_trader.events import Fields, envelope
from quantum_trader.logs import get_logger

log = get_logger("marketdata")
MARKET_CANDLE = "market.candle"
TIME_COLUMNS = ("timestamp", "time", "date", "datetime")
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")
_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
GAP_INTERVALS = 3  # more than this many intervals without a candle is a gap


def interval_ms(interval: str) -> int | None:
    """``"1m"`` -> 60000, ``"3600s"`` -> 3600000; None when the text is not a known interval."""
    match = re.fullmatch(r"(\d+)([smhdw])", interval.strip())
    if match is None or int(match.group(1)) == 0:
        return None
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


def gap(previous_ms: int, candle: Candle) -> bool:
    """True when more than ``GAP_INTERVALS`` intervals passed since the previous candle (pure)."""
    step = interval_ms(candle.interval)
    return step is not None and candle.open_time - previous_ms > GAP_INTERVALS * step


class Candle(msgspec.Struct, frozen=True, kw_only=True):
    """One OHLCV bar; ``open_time`` in epoch milliseconds (UTC)."""

    symbol: str
    interval: str
    open_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float


@dataclass(frozen=True, slots=True)
class Skipped:
    """A candle left out, and why."""

    candle: Candle
    reason: str


def clean(candles: Iterable[Candle], last: dict[str, int] | None = None) -> tuple[list[Candle], list[Skipped]]:
    """Keep the candles a strategy may see; the others come back with their reason.

    ``last`` (symbol -> newest open time seen) carries the order check across batches; it is updated.
    """
    kept: list[Candle] = []
    skipped: list[Skipped] = []
    last = {} if last is None else last
    for candle in candles:
        prices = (candle.open, candle.high, candle.low, candle.close)
        if not all(math.isfinite(p) for p in (*prices, candle.volume)):
            skipped.append(Skipped(candle, "non-finite price or volume"))
        elif min(prices) <= 0:
            skipped.append(Skipped(candle, "zero or negative price"))
        elif candle.volume < 0:
            skipped.append(Skipped(candle, "negative volume"))
        elif candle.high < max(candle.open, candle.close, candle.low) or candle.low > min(candle.open, candle.close):
            skipped.append(Skipped(candle, "high/low do not contain open and close"))
        elif candle.symbol in last and candle.open_time == last[candle.symbol]:
            skipped.append(Skipped(candle, "duplicate open time"))
        elif candle.symbol in last and candle.open_time < last[candle.symbol]:
            skipped.append(Skipped(candle, "out of order"))
        else:
            kept.append(candle)
            last[candle.symbol] = candle.open_time
    for item in skipped:
        log.warning("candle_skipped", symbol=item.candle.symbol, open_time=item.candle.open_time, reason=item.reason)
    return kept, skipped


def synthetic(
    symbols: dict[str, float], count: int, *, seed: int = 7, interval_s: int = 60, start: datetime | None = None
) -> list[Candle]:
    """Seeded geometric Brownian motion with regime changes (trend up, trend down, choppy), per symbol."""
    begin = start or datetime(2026, 1, 1, tzinfo=UTC)
    regimes = np.array([[0.0004, 0.002], [-0.0004, 0.002], [0.0, 0.006]])  # drift, volatility per bar
    out: list[Candle] = []
    for index, (symbol, first_price) in enumerate(sorted(symbols.items())):
        sub = np.random.default_rng([seed, index])
        regime = sub.integers(0, len(regimes), size=max(1, count // 200 + 1)).repeat(200)[:count]
        drift, vol = regimes[regime, 0], regimes[regime, 1]
        returns = drift - vol**2 / 2 + vol * sub.standard_normal(count)
        close = first_price * np.exp(np.cumsum(returns))
        open_ = np.concatenate([[first_price], close[:-1]])
        spread = np.abs(sub.standard_normal(count)) * vol * close
        high = np.maximum(open_, close) + spread
        low = np.maximum(np.minimum(open_, close) - spread, 1e-9)
        volume = sub.gamma(2.0, 50.0, count)
        for i in range(count):
            out.append(
                Candle(
                    symbol=symbol,
                    interval=f"{interval_s}s",
                    open_time=int((begin + timedelta(seconds=i * interval_s)).timestamp() * 1000),
                    open=float(open_[i]),
                    high=float(high[i]),
                    low=float(low[i]),
                    close=float(close[i]),
                    volume=float(volume[i]),
                )
            )
    out.sort(key=lambda c: (c.open_time, c.symbol))
    return out


def _epoch_ms(column: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(column):
        values = column.astype("float64")
        # epoch seconds or milliseconds: anything past year 2286 in seconds is milliseconds
        return (values.where(values > 1e10, values * 1000)).astype("int64")
    parsed = pd.to_datetime(column, utc=True, format="mixed")
    return parsed.dt.as_unit("ms").astype("int64")


def read_file(path: Path, symbol: str | None = None, interval: str = "") -> list[Candle]:
    """Candles from a CSV or Parquet file (column rules in the README); clear errors naming what is wrong."""
    if not path.exists():
        raise ConfigError(f"data file {path} does not exist")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ConfigError(f"data file {path} cannot be read as CSV or Parquet: {exc}") from None
    columns = {str(name).strip().lower(): name for name in frame.columns}
    time_name = next((columns[name] for name in TIME_COLUMNS if name in columns), None)
    if time_name is None and frame.columns.size and str(frame.columns[0]).startswith("Unnamed"):
        time_name = frame.columns[0]  # a pandas-exported index column (no header) holds the times
    if time_name is None:
        raise ConfigError(
            f"data file {path} has no time column: name one of {', '.join(TIME_COLUMNS)} (any case); "
            f"columns found: {', '.join(map(str, frame.columns))}"
        )
    missing = [name for name in PRICE_COLUMNS if name not in columns]
    if missing:
        raise ConfigError(f"data file {path} lacks column(s) {', '.join(missing)} (any case)")
    try:
        times = _epoch_ms(frame[time_name])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data file {path}: column {time_name!r} is not ISO-8601 or epoch time: {exc}") from None
    name = (symbol or path.stem).upper()
    if not interval and len(times) > 1:
        # The file's own spacing (median, so that gaps do not skew it) gives the interval.
        spacing = int(times.diff().iloc[1:].median() // 1000)
        interval = f"{spacing}s" if spacing > 0 else ""
    values = {
        col: pd.to_numeric(frame[columns[col]], errors="coerce").astype("float64").to_numpy() for col in PRICE_COLUMNS
    }
    return [
        Candle(
            symbol=name,
            interval=interval,
            open_time=int(times.iloc[i]),
            open=float(values["open"][i]),
            high=float(values["high"][i]),
            low=float(values["low"][i]),
            close=float(values["close"][i]),
            volume=float(values["volume"][i]),
        )
        for i in range(len(frame))
    ]


def candle_fields(candle: Candle) -> Fields:
    """A candle as a stream entry (the pipeline's envelope)."""
    stamp = datetime.fromtimestamp(candle.open_time / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return envelope(
        MARKET_CANDLE, candle, trace_id="", correlation_id=candle.symbol, source="marketdata", timestamp=stamp
    )


async def publish(redis: Redis, stream: str, candles: list[Candle]) -> None:
    """XADD a batch of candles and record each symbol's latest close, in one pipeline."""
    if not candles:
        return
    latest = {candle.symbol: repr(candle.close) for candle in candles}
    async with redis.pipeline(transaction=False) as pipe:
        for candle in candles:
            pipe.xadd(stream, candle_fields(candle))
        pipe.hset(keys.PRICE_HASH, mapping=latest)
        await pipe.execute()


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
) -> AsyncIterator[list[Candle]]:
    """Poll an exchange's public OHLCV endpoint; yield each closed candle once, oldest first.

    The candle still forming (its close time in the future) is left for a later poll. A
    failed poll is logged and retried at the next one: a live feed does not stop for a
    passing network error.
    """
    step = interval_ms(timeframe)
    if step is None:
        raise ConfigError(f"timeframe {timeframe!r}: use a number and one of s, m, h, d, w (e.g. 1m, 1h)")
    newest: dict[str, int] = {}
    done = 0
    while (polls is None or done < polls) and not (stop is not None and stop.is_set()):
        out: list[Candle] = []
        for symbol in symbols:
            try:
                rows = await source.candles(symbol, timeframe, limit)
            except (QuantumTraderError, OSError, ValueError) as exc:
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
class FeedTotals:
    """What a feed did so far."""

    published: int = 0
    skipped: int = 0
    last: dict[str, int] = field(default_factory=dict)


async def run_feed(
    redis: Redis,
    stream: str,
    source: AsyncIterator[list[Candle]],
    stop: asyncio.Event | None = None,
    totals: FeedTotals | None = None,
) -> FeedTotals:
    """Clean and publish every batch of ``source`` until it ends or ``stop`` is set."""
    totals = totals or FeedTotals()
    async for batch in source:
        if stop is not None and stop.is_set():
            break
        kept, skipped = clean(batch, totals.last)
        await publish(redis, stream, kept)
        totals.published += len(kept)
        totals.skipped += len(skipped)
    return totals
