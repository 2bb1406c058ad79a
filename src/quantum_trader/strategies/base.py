"""The strategy interface: small enough that a new strategy fits in one file.

A strategy sees the closes of one symbol, oldest first, and says BUY, SELL or
nothing with a confidence in [0, 1]. It declares its warm-up: the engine calls it
only once that many candles are known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

Closes = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Signal:
    """What a strategy wants on the latest candle."""

    side: Literal["BUY", "SELL"]
    confidence: float


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


def ema(values: Closes, span: int) -> Closes:
    """Exponential moving average (pandas, ``adjust=False``)."""
    return pd.Series(values).ewm(span=span, adjust=False).mean().to_numpy()


def rsi(values: Closes, period: int) -> float:
    """Wilder's relative strength index of the last value, 0 to 100 (pandas smoothing, alpha = 1/period)."""
    deltas = pd.Series(values).diff().iloc[1:]
    gain = deltas.clip(lower=0).ewm(alpha=1 / period, adjust=False).mean().iloc[-1]
    loss = (-deltas.clip(upper=0)).ewm(alpha=1 / period, adjust=False).mean().iloc[-1]
    if loss == 0:
        return 100.0 if gain > 0 else 50.0
    return float(100 - 100 / (1 + gain / loss))
