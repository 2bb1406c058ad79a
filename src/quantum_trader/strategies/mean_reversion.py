"""Mean reversion: buy when RSI turns oversold, sell when it turns overbought."""

from __future__ import annotations

from dataclasses import dataclass

from quantum_trader.strategies.base import Closes, Ewm, Signal, last_step


@dataclass
class RsiReversion:
    """RSI thresholds, on the crossing only; confidence grows with the distance past the threshold.

    A signal comes on the candle where RSI crosses the threshold, not on every candle it stays
    beyond it (which would repeat the same entry for as long as a trend lasts). Wilder's RSI runs
    over every close since the symbol's warm-up began (``rsi_series`` of those closes).
    """

    period: int = 14
    oversold: float = 30.0
    overbought: float = 70.0
    name: str = "rsi"
    version: str = "3"

    @property
    def warmup(self) -> int:
        """Candles needed for two RSI values (the crossing compares them)."""
        return self.period + 2

    def stepper(self) -> RsiStep:
        """The rule fed one close at a time."""
        return RsiStep(self)

    def decide(self, closes: Closes) -> Signal | None:
        """BUY when RSI falls below ``oversold``, SELL when it rises above ``overbought``."""
        return last_step(self.stepper(), closes)


class RsiStep:
    """One symbol's running gains and losses (Wilder: alpha = 1/period) and the last RSI."""

    __slots__ = ("gain", "last_close", "loss", "rule", "seen", "value")

    def __init__(self, rule: RsiReversion) -> None:
        self.gain = Ewm(1 / rule.period)
        self.loss = Ewm(1 / rule.period)
        self.last_close: float | None = None
        self.value = 50.0
        self.seen = 0
        self.rule = rule

    def step(self, close: float) -> Signal | None:
        """The signal on this close: the RSI crossing a threshold since the close before."""
        last, self.last_close = self.last_close, close
        self.seen += 1
        if last is None:
            return None
        delta = close - last
        gain = self.gain.add(delta if delta > 0 else 0.0)
        loss = self.loss.add(-delta if delta < 0 else 0.0)
        # No loss at all: 100 after gains, 50 when nothing moved (as rsi_series).
        value = (100.0 if gain > 0 else 50.0) if loss == 0 else 100 - 100 / (1 + gain / loss)
        before, self.value = self.value, value
        rule = self.rule
        if self.seen < rule.warmup:
            return None
        if value < rule.oversold <= before:
            return Signal("BUY", min(1.0, 0.5 + (rule.oversold - value) / 60))
        if value > rule.overbought >= before:
            return Signal("SELL", min(1.0, 0.5 + (value - rule.overbought) / 60))
        return None
