"""The strategy interface: small enough that a new strategy fits in one file.

A strategy sees the closes of one symbol, oldest first, and says BUY, SELL or
nothing with a confidence in [0, 1]. It declares its warm-up: the engine calls it
only once that many candles are known.

A strategy may also offer a ``Stepper`` (``stepper()``): the same rule fed one close at a
time, keeping its indicators as running values. The engine then uses it on every candle
instead of recomputing over the whole window (constant time per candle, which is what makes a
year of one-minute candles a matter of seconds). Its figures are those of ``decide`` over every
close since the symbol's warm-up began (the built-in strategies define ``decide`` that way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

Closes = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Signal:
    """What a strategy wants on the latest candle."""

    side: Literal["BUY", "SELL"]
    confidence: float


class Stepper(Protocol):
    """One symbol's running state of a strategy: fed each close in order, says what ``decide`` would."""

    def step(self, close: float) -> Signal | None:
        """The signal on this close (None during the warm-up)."""
        ...


class Strategy(Protocol):
    """A rule over one symbol's closes."""

    name: str

    @property
    def version(self) -> str:
        """Reported with each decision (a model's hash, a rule's revision)."""
        ...

    @property
    def warmup(self) -> int:
        """Candles needed before ``decide`` is called."""
        ...

    def decide(self, closes: Closes) -> Signal | None:
        """The signal on the last close, or None."""
        ...


class Ewm:
    """A running exponentially weighted mean, the same arithmetic as ``ewm`` one value at a time."""

    __slots__ = ("alpha", "keep", "mean")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.keep = 1.0 - alpha
        self.mean: float | None = None

    def add(self, value: float) -> float:
        """The mean with ``value`` added (the first value seeds it, as in ``ewm``)."""
        mean = value if self.mean is None else self.mean
        self.mean = mean = self.keep * mean + self.alpha * value
        return mean


def stepper_of(strategy: object) -> Stepper | None:
    """A fresh ``Stepper`` when the strategy offers one, else None (the engine then calls ``decide``)."""
    make = getattr(strategy, "stepper", None)
    return make() if callable(make) else None


def last_step(stepper: Stepper, closes: Closes) -> Signal | None:
    """What the stepper says on the last of ``closes``, fed from the first (``decide`` of a stepped strategy)."""
    signal = None
    for close in closes.tolist():
        signal = stepper.step(close)
    return signal


def ewm(values: Closes, alpha: float) -> Closes:
    """Exponentially weighted mean, ``adjust=False`` (pandas' recursion: y0 = x0, y = (1 - alpha) y + alpha x).

    A plain loop: a strategy runs on every candle, and pandas' per-call overhead was most of a backtest's time.
    """
    out = np.empty(len(values), dtype=np.float64)
    if not len(values):
        return out
    keep, mean = 1.0 - alpha, float(values[0])
    for index, value in enumerate(values.tolist()):
        mean = keep * mean + alpha * value
        out[index] = mean
    return out


def ema(values: Closes, span: int) -> Closes:
    """Exponential moving average over ``span`` values (alpha = 2 / (span + 1))."""
    return ewm(values, 2 / (span + 1))


def rsi_series(values: Closes, period: int) -> Closes:
    """Wilder's relative strength index of each value after the first, 0 to 100 (alpha = 1/period)."""
    deltas = np.diff(values)
    gain = ewm(np.clip(deltas, 0, None), 1 / period)
    loss = ewm(np.clip(-deltas, 0, None), 1 / period)
    flat = np.where(gain > 0, 100.0, 50.0)  # no loss at all: 100 after gains, 50 when nothing moved
    with np.errstate(divide="ignore", invalid="ignore"):
        out: Closes = np.where(loss == 0, flat, 100 - 100 / (1 + gain / loss))
    return out


def rsi(values: Closes, period: int) -> float:
    """Wilder's relative strength index of the last value, 0 to 100."""
    return float(rsi_series(values, period)[-1])
