"""Trend following: buy when the fast EMA crosses above the slow one, sell when it crosses below."""

from __future__ import annotations

from dataclasses import dataclass

from quantum_trader.strategies.base import Closes, Signal, ema


@dataclass
class EmaCross:
    """EMA crossover; confidence grows with the gap between the averages."""

    fast: int = 12
    slow: int = 26
    name: str = "ema-cross"
    version: str = "1"

    @property
    def warmup(self) -> int:
        """Candles needed before the slow average means anything."""
        return self.slow + 2

    def decide(self, closes: Closes) -> Signal | None:
        """A signal only on the candle where the averages cross."""
        fast, slow = ema(closes, self.fast), ema(closes, self.slow)
        before, now = fast[-2] - slow[-2], fast[-1] - slow[-1]
        confidence = min(1.0, 0.5 + abs(now) / closes[-1] * 100)
        if before <= 0 < now:
            return Signal("BUY", confidence)
        if before >= 0 > now:
            return Signal("SELL", confidence)
        return None
