"""Mean reversion: buy when RSI turns oversold, sell when it turns overbought."""

from __future__ import annotations

from dataclasses import dataclass

from quantum_trader.strategies.base import Closes, Signal, rsi_series


@dataclass
class RsiReversion:
    """RSI thresholds, on the crossing only; confidence grows with the distance past the threshold.

    A signal comes on the candle where RSI crosses the threshold, not on every candle it stays
    beyond it (which would repeat the same entry for as long as a trend lasts).
    """

    period: int = 14
    oversold: float = 30.0
    overbought: float = 70.0
    name: str = "rsi"
    version: str = "2"

    @property
    def warmup(self) -> int:
        """Candles needed for two RSI values (the crossing compares them)."""
        return self.period + 2

    def decide(self, closes: Closes) -> Signal | None:
        """BUY when RSI falls below ``oversold``, SELL when it rises above ``overbought``."""
        before, value = (float(v) for v in rsi_series(closes, self.period)[-2:])
        if value < self.oversold <= before:
            return Signal("BUY", min(1.0, 0.5 + (self.oversold - value) / 60))
        if value > self.overbought >= before:
            return Signal("SELL", min(1.0, 0.5 + (value - self.overbought) / 60))
        return None
