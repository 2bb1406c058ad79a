"""Strategies: each one file, each a ``Strategy`` (see ``base``). ``BUILT_IN`` names them for settings."""

from __future__ import annotations

from collections.abc import Callable

from quantum_trader.strategies.base import Signal, Strategy
from quantum_trader.strategies.mean_reversion import RsiReversion
from quantum_trader.strategies.trend import EmaCross

BUILT_IN: dict[str, Callable[[], Strategy]] = {"ema-cross": EmaCross, "rsi": RsiReversion}

__all__ = ["BUILT_IN", "EmaCross", "RsiReversion", "Signal", "Strategy"]
