"""Candles: from a synthetic generator or a file, cleaned, and the rule for gaps between them.

``read_file`` reads a CSV or Parquet file, ``synthetic`` generates seeded candles, and
``parse_time`` and ``between`` cut a time window. ``clean`` drops what a strategy must never
see (non-finite or non-positive prices, high below low, out-of-order or duplicate open times)
and says why. Gaps (missing candles) are not filled with invented prices: the AI engine
restarts the symbol's warm-up after one (``GapRule``; how long a hole may be depends on the
market). Publishing candles, replaying them and polling an exchange: ``feed``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from quantum_trader.bars import Bars
from quantum_trader.errors import ConfigError

# Re-exported while cli/market.py still imports Candle from here (its home is events).
from quantum_trader.events import Candle as Candle
from quantum_trader.events import candle_problem
from quantum_trader.logs import get_logger

log = get_logger("marketdata")
TIME_COLUMNS = ("timestamp", "time", "date", "datetime")
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")
_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
GAP_INTERVALS = 3  # 24/7 markets: more than this many intervals without a candle is a gap
CSV_CHUNK_ROWS = 100_000
CLOSURE_GAP_MS = 5 * 86_400_000  # markets with closures: a weekend plus two closed weekdays is not a gap


@functools.lru_cache(maxsize=64)  # asked on every candle by the gap rule, of a handful of distinct texts
def interval_ms(interval: str) -> int | None:
    """``"1m"`` -> 60000, ``"3600s"`` -> 3600000; None when the text is not a known interval."""
    match = re.fullmatch(r"(\d+)([smhdw])", interval.strip())
    if match is None or int(match.group(1)) == 0:
        return None
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


@dataclass(frozen=True, slots=True)
class GapRule:
    """When a hole in a symbol's candles restarts its warm-up: when it is longer than every limit set.

    ``intervals``: more than that many of the candle's intervals; ``span_ms``: longer than that.
    Neither set: never (``QT_AI_GAP=off``).
    """

    intervals: int | None = GAP_INTERVALS
    span_ms: int | None = None

    def __call__(self, previous_ms: int, candle: Candle) -> bool:
        """True when the hole between the previous candle and ``candle`` is a gap (pure)."""
        if self.intervals is None and self.span_ms is None:
            return False
        hole = candle.open_time - previous_ms
        if self.intervals is not None:
            step = interval_ms(candle.interval)
            if step is None or hole <= self.intervals * step:
                return False  # an unknown interval has no interval rule
        return self.span_ms is None or hole > self.span_ms

    def __str__(self) -> str:
        limits = [f"{self.intervals} intervals"] if self.intervals is not None else []
        limits += [f"{self.span_ms / 86_400_000:g} days"] if self.span_ms is not None else []
        return "more than " + " and ".join(limits) if limits else "off"


def has_closures(candles: Sequence[Candle]) -> bool:
    """True for a market that closes on weekends (FX, equities): under half of a 24/7 market's Saturdays (pure).

    A 24/7 market has a seventh of its candles on Saturdays (UTC); FX has none (it reopens on
    Sunday evening), equities none. Less than a week of data, or candles of a week or longer,
    say nothing either way: those count as 24/7.
    """
    step = interval_ms(candles[0].interval) if candles else None
    if step is None or step >= _UNITS_MS["w"] or candles[-1].open_time - candles[0].open_time < _UNITS_MS["w"]:
        return False
    if isinstance(candles, Bars):
        return candles.saturdays() < len(candles) / 14
    saturdays = sum(1 for c in candles if datetime.fromtimestamp(c.open_time / 1000, UTC).weekday() == 5)
    return saturdays < len(candles) / 14


def gap_rule(setting: str, candles: Sequence[Candle] | None = None) -> GapRule:
    """The rule ``QT_AI_GAP`` names (pure): N intervals, a duration, ``off``, or ``auto``.

    ``auto``: 3 intervals for 24/7 markets (the live and synthetic feeds, or ``candles`` with
    weekend candles); for ``candles`` of a market with closures, a hole must also be longer than
    5 days, so weekends, holidays and a long weekend keep the warm-up.
    """
    text = setting.strip().lower()
    if text == "off":
        return GapRule(None, None)
    if text == "auto":
        closures = candles is not None and has_closures(candles)
        return GapRule(GAP_INTERVALS, CLOSURE_GAP_MS if closures else None)
    if text.isdecimal():
        return GapRule(int(text), None)
    span = interval_ms(text)
    if span is None:
        raise ConfigError(
            f"QT_AI_GAP={setting!r}: use a number of intervals (3), a duration (90m, 72h, 5d), off or auto"
        )
    return GapRule(None, span)


def gap(previous_ms: int, candle: Candle, rule: GapRule = GapRule()) -> bool:
    """True when the hole since the previous candle restarts warm-up under ``rule`` (pure)."""
    return rule(previous_ms, candle)


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
        if problem := candle_problem(candle):
            skipped.append(Skipped(candle, problem))
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
    return list(read_bars(path, symbol, interval))


def symbol_of(path: Path) -> str:
    """The market a file is named after: its stem, less an interval suffix (``BTCUSDT-1m.parquet`` -> ``BTCUSDT``,
    as ``data download`` names its files)."""
    match = re.fullmatch(r"(.+)-\d+[smhdwM]", path.stem)
    return match.group(1) if match else path.stem


def read_bars(path: Path, symbol: str | None = None, interval: str = "") -> Bars:
    """``read_file`` as columns (``Bars``): no Python object per candle, for files of millions of rows.

    A ``symbol`` column names each row's market (files of several symbols); otherwise ``symbol``,
    else the file's stem, names them all.
    """
    if not path.exists():
        raise ConfigError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            # In pieces: the parser's buffers for a year of minutes at once would double the peak memory.
            frame = pd.concat(list(pd.read_csv(path, chunksize=CSV_CHUNK_ROWS)), ignore_index=True)
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
    if "symbol" in columns:
        names = frame[columns["symbol"]].astype(str).str.strip().str.upper()
        if (names == "").any() or frame[columns["symbol"]].isna().any():
            raise ConfigError(f"data file {path}: column 'symbol' has empty values; name every row's market")
        if symbol:
            # A market named in a file of several: its rows alone.
            wanted = (names == symbol.strip().upper()).to_numpy()
            if not wanted.any():
                found = ", ".join(sorted(set(names))[:10])
                raise ConfigError(f"data file {path} has no rows of {symbol.upper()}; its symbol column names {found}")
            frame, names, times = frame[wanted], names[wanted], times[wanted]
        codes, uniques = pd.factorize(names)
        symbols = tuple(str(u) for u in uniques)
    else:
        codes = np.zeros(len(frame), dtype=np.int32)
        symbols = ((symbol or symbol_of(path)).upper(),)
    intervals = []
    for at in range(len(symbols)):
        found = interval
        own = times[codes == at]
        if not found and len(own) > 1:
            # The file's own spacing (median, so that gaps do not skew it) gives the interval.
            spacing = int(own.diff().iloc[1:].median() // 1000)
            found = f"{spacing}s" if spacing > 0 else ""
        intervals.append(found)
    values: dict[str, npt.NDArray[np.float64]] = {
        col: np.asarray(pd.to_numeric(frame[columns[col]], errors="coerce"), dtype=np.float64) for col in PRICE_COLUMNS
    }
    return Bars(
        symbols=symbols,
        intervals=tuple(intervals),
        symbol=np.asarray(codes, dtype=np.int32),
        open_time=times.to_numpy(dtype=np.int64),
        open=values["open"],
        high=values["high"],
        low=values["low"],
        close=values["close"],
        volume=values["volume"],
    )


def parse_time(text: str, option: str) -> int:
    """``2017-12-01`` or ``2017-12-01T09:00`` (naive = UTC) -> epoch ms; a ConfigError naming ``option`` otherwise."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: give a date or time in ISO-8601, e.g. 2017-12-01 or 2017-12-01T09:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def between(candles: list[Candle], start_ms: int | None = None, end_ms: int | None = None) -> list[Candle]:
    """The candles opened at or after ``start_ms`` and before ``end_ms`` (pure; None = no bound)."""
    return [
        c for c in candles if (start_ms is None or c.open_time >= start_ms) and (end_ms is None or c.open_time < end_ms)
    ]
