"""Candles as columns: a year of one-minute candles in tens of megabytes, not hundreds.

``Bars`` holds open times and prices in numpy arrays and each row's symbol as an index into
``symbols``; it is a ``Sequence[Candle]`` that makes a ``Candle`` only when one is asked for, so
everything written for a list of candles reads it as it is. ``ordered_clean`` is
``marketdata.clean`` of the candles sorted by (open time, symbol), over whole columns at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import numpy.typing as npt

from quantum_trader.events import Candle

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
_CHUNK = 8192  # rows turned into Python values at a time while iterating


@dataclass(frozen=True, eq=False)
class Bars(Sequence[Candle]):
    """Candles of one or more symbols as columns (row ``i``: ``symbols[symbol[i]]`` at ``open_time[i]``)."""

    symbols: tuple[str, ...]
    intervals: tuple[str, ...]  # per symbol
    symbol: npt.NDArray[np.int32]
    open_time: Ints
    open: Floats
    high: Floats
    low: Floats
    close: Floats
    volume: Floats

    @classmethod
    def of(cls, candles: Sequence[Candle]) -> Bars:
        """The columns of a list of candles (a ``Bars`` is returned as it is)."""
        if isinstance(candles, Bars):
            return candles
        names: dict[str, int] = {}
        intervals: list[str] = []
        for candle in candles:
            if candle.symbol not in names:
                names[candle.symbol] = len(names)
                intervals.append(candle.interval)
        return cls(
            symbols=tuple(names),
            intervals=tuple(intervals),
            symbol=np.fromiter((names[c.symbol] for c in candles), dtype=np.int32, count=len(candles)),
            open_time=np.fromiter((c.open_time for c in candles), dtype=np.int64, count=len(candles)),
            open=np.fromiter((c.open for c in candles), dtype=np.float64, count=len(candles)),
            high=np.fromiter((c.high for c in candles), dtype=np.float64, count=len(candles)),
            low=np.fromiter((c.low for c in candles), dtype=np.float64, count=len(candles)),
            close=np.fromiter((c.close for c in candles), dtype=np.float64, count=len(candles)),
            volume=np.fromiter((c.volume for c in candles), dtype=np.float64, count=len(candles)),
        )

    def __len__(self) -> int:
        return len(self.open_time)

    @overload
    def __getitem__(self, index: int) -> Candle: ...

    @overload
    def __getitem__(self, index: slice) -> Bars: ...

    def __getitem__(self, index: int | slice) -> Candle | Bars:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        row = range(len(self))[index]
        at = int(self.symbol[row])
        return Candle(
            symbol=self.symbols[at],
            interval=self.intervals[at],
            open_time=int(self.open_time[row]),
            open=float(self.open[row]),
            high=float(self.high[row]),
            low=float(self.low[row]),
            close=float(self.close[row]),
            volume=float(self.volume[row]),
        )

    def __iter__(self) -> Iterator[Candle]:
        names, intervals = self.symbols, self.intervals
        for first in range(0, len(self), _CHUNK):
            part = slice(first, first + _CHUNK)
            rows = zip(
                self.symbol[part].tolist(),
                self.open_time[part].tolist(),
                self.open[part].tolist(),
                self.high[part].tolist(),
                self.low[part].tolist(),
                self.close[part].tolist(),
                self.volume[part].tolist(),
                strict=True,
            )
            for at, time, open_, high, low, close, volume in rows:
                yield Candle(
                    symbol=names[at],
                    interval=intervals[at],
                    open_time=time,
                    open=open_,
                    high=high,
                    low=low,
                    close=close,
                    volume=volume,
                )

    def take(self, rows: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> Bars:
        """The rows named (indices or a mask), in that order."""
        return Bars(
            self.symbols,
            self.intervals,
            self.symbol[rows],
            self.open_time[rows],
            self.open[rows],
            self.high[rows],
            self.low[rows],
            self.close[rows],
            self.volume[rows],
        )

    def symbol_rank(self) -> npt.NDArray[np.int32]:
        """Each row's symbol as its rank among the names (sorting by it sorts by name)."""
        ranks = np.empty(len(self.symbols), dtype=np.int32)
        ranks[np.argsort(np.array(self.symbols, dtype=object), kind="stable")] = np.arange(len(self.symbols))
        return ranks[self.symbol] if len(self.symbols) else self.symbol

    def within(self, start_ms: int | None, end_ms: int | None) -> npt.NDArray[np.bool_]:
        """The rows opened at or after ``start_ms`` and before ``end_ms`` (None: no bound), as a mask."""
        mask = np.ones(len(self), dtype=np.bool_)
        if start_ms is not None:
            mask &= self.open_time >= start_ms
        if end_ms is not None:
            mask &= self.open_time < end_ms
        return mask

    def saturdays(self) -> int:
        """Rows opened on a Saturday (UTC): 1970-01-01 was a Thursday."""
        return int(np.count_nonzero((self.open_time // 86_400_000 + 3) % 7 == 5))


def concat(parts: Sequence[Bars]) -> Bars:
    """Several files' columns as one (symbols merged by name; the first interval seen for a name is kept)."""
    if len(parts) == 1:
        return parts[0]  # no copy of a single file's columns
    names: dict[str, int] = {}
    intervals: list[str] = []
    for part in parts:
        for name, interval in zip(part.symbols, part.intervals, strict=True):
            if name not in names:
                names[name] = len(names)
                intervals.append(interval)
    remap = [np.array([names[n] for n in part.symbols] or [0], dtype=np.int32) for part in parts]
    return Bars(
        tuple(names),
        tuple(intervals),
        np.concatenate([mapping[part.symbol] for mapping, part in zip(remap, parts, strict=True)]),
        np.concatenate([part.open_time for part in parts]),
        np.concatenate([part.open for part in parts]),
        np.concatenate([part.high for part in parts]),
        np.concatenate([part.low for part in parts]),
        np.concatenate([part.close for part in parts]),
        np.concatenate([part.volume for part in parts]),
    )


def ordered_clean(bars: Bars) -> tuple[Bars, list[tuple[int, str]]]:
    """The rows sorted by (open time, symbol), file order kept among equals, then ``marketdata.clean``:
    the rows kept, and each row left out (its index in ``bars``) with the reason."""
    times = bars.open_time
    if len(bars.symbols) <= 1 and bool(np.all(times[1:] > times[:-1])):
        order, sorted_bars = np.arange(len(bars)), bars  # one symbol, already in order: no copy
    else:
        order = np.lexsort((bars.symbol_rank(), times))
        sorted_bars = bars.take(order)
    o, h, lo, c, v = sorted_bars.open, sorted_bars.high, sorted_bars.low, sorted_bars.close, sorted_bars.volume
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c) & np.isfinite(v)
        positive = np.minimum(np.minimum(o, h), np.minimum(lo, c)) > 0
        contained = (h >= np.maximum(np.maximum(o, c), lo)) & (lo <= np.minimum(o, c))
        valid = finite & positive & (v >= 0) & contained
    # Sorted: a valid row is left out only as a repeat of its symbol's open time already kept.
    kept = valid.copy()
    times = sorted_bars.open_time
    for at in range(len(bars.symbols)):
        rows = np.flatnonzero(valid & (sorted_bars.symbol == at))
        if len(rows) > 1:
            kept[rows[1:][times[rows[1:]] == times[rows[:-1]]]] = False
    skipped = []
    for row in np.flatnonzero(~kept).tolist():
        if not finite[row]:
            reason = "non-finite price or volume"
        elif not positive[row]:
            reason = "zero or negative price"
        elif v[row] < 0:
            reason = "negative volume"
        elif not contained[row]:
            reason = "high/low do not contain open and close"
        else:
            reason = "duplicate open time"
        skipped.append((int(order[row]), reason))
    return (sorted_bars if not skipped else sorted_bars.take(kept)), skipped
