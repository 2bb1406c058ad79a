"""Trend following: buy when the fast EMA crosses above the slow one, sell when it crosses below."""

from __future__ import annotations

from dataclasses import dataclass

from quantum_trader.strategies.base import Closes, Ewm, Signal, last_step


@dataclass
class EmaCross:
    """EMA crossover; confidence grows with the gap between the averages.

    The averages run over every close since the symbol's warm-up began (a gap in the candles
    or a restart begins it again), seeded with the first close, as pandas' ``ewm(adjust=False)``.
    """

    fast: int = 12
    slow: int = 26
    name: str = "ema-cross"
    version: str = "2"

    @property
    def warmup(self) -> int:
        """Candles needed before the slow average means anything."""
        return self.slow + 2

    def stepper(self) -> EmaCrossStep:
        """The rule fed one close at a time."""
        return EmaCrossStep(self)

    def decide(self, closes: Closes) -> Signal | None:
        """A signal only on the candle where the averages cross."""
        return last_step(self.stepper(), closes)


class EmaCrossStep:
    """One symbol's running averages and the last gap between them."""

    __slots__ = ("fast", "gap", "seen", "slow", "warmup")

    def __init__(self, rule: EmaCross) -> None:
        self.fast = Ewm(2 / (rule.fast + 1))
        self.slow = Ewm(2 / (rule.slow + 1))
        self.gap = 0.0
        self.seen = 0
        self.warmup = rule.warmup

    def step(self, close: float) -> Signal | None:
        """BUY on the close where the fast average rises above the slow one, SELL where it falls below."""
        now = self.fast.add(close) - self.slow.add(close)
        before, self.gap = self.gap, now
        self.seen += 1
        if self.seen < self.warmup:
            return None
        if before <= 0 < now:
            return Signal("BUY", min(1.0, 0.5 + abs(now) / close * 100))
        if before >= 0 > now:
            return Signal("SELL", min(1.0, 0.5 + abs(now) / close * 100))
        return None
