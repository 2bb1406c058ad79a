"""Mean reversion: buy when RSI says oversold, sell when overbought."""

from __future__ import annotations

from dataclasses import dataclass

from quantum_trader.strategies.base import Closes, Signal, rsi


@dataclass
class RsiReversion:
    """RSI thresholds; confidence grows with the distance past the threshold."""

    period: int = 14
    oversold: float = 30.0
    overbought: float = 70.0
    name: str = "rsi"
    version: str = "1"

    @property
    def warmup(self) -> int:
        """Candles needed for the first RSI value."""
        return self.period + 1

    def decide(self, closes: Closes) -> Signal | None:
        """BUY below ``oversold``, SELL above ``overbought``."""
        value = rsi(closes, self.period)
        if value < self.oversold:
            return Signal("BUY", min(1.0, 0.5 + (self.oversold - value) / 60))
        if value > self.overbought:
            return Signal("SELL", min(1.0, 0.5 + (value - self.overbought) / 60))
        return None
