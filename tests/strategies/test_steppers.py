"""A strategy fed one close at a time says exactly what its rule says over the whole series.

The reference is the rule written over arrays (``ema``, ``rsi_series``: numpy, recomputed from
the first close), compared bit for bit on every close after the warm-up.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from quantum_trader.strategies import EmaCross, RsiReversion
from quantum_trader.strategies.base import Closes, Signal, ema, rsi_series


def ema_rule(rule: EmaCross, closes: Closes) -> Signal | None:
    fast, slow = ema(closes, rule.fast), ema(closes, rule.slow)
    before, now = fast[-2] - slow[-2], fast[-1] - slow[-1]
    confidence = min(1.0, 0.5 + abs(now) / closes[-1] * 100)
    if before <= 0 < now:
        return Signal("BUY", float(confidence))
    if before >= 0 > now:
        return Signal("SELL", float(confidence))
    return None


def rsi_rule(rule: RsiReversion, closes: Closes) -> Signal | None:
    before, value = (float(v) for v in rsi_series(closes, rule.period)[-2:])
    if value < rule.oversold <= before:
        return Signal("BUY", min(1.0, 0.5 + (rule.oversold - value) / 60))
    if value > rule.overbought >= before:
        return Signal("SELL", min(1.0, 0.5 + (value - rule.overbought) / 60))
    return None


# Runs of one price (flat stretches: the averages' gap exactly zero, then a crossing from it) and odd values.
runs = st.lists(
    st.tuples(
        st.one_of(
            st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False),
            st.sampled_from([100.0, 100.5, 101.0]),
        ),
        st.integers(1, 30),
    ),
    min_size=1,
    max_size=25,
)
prices = runs.map(lambda pairs: [price for price, times in pairs for _ in range(times)]).filter(lambda p: len(p) >= 3)


@settings(max_examples=300, deadline=None)
@given(closes=prices, fast=st.integers(1, 10), extra=st.integers(1, 20))
def test_ema_cross_stepped_equals_the_rule_over_the_series(closes: list[float], fast: int, extra: int) -> None:
    rule = EmaCross(fast=fast, slow=fast + extra)
    series = np.array(closes)
    stepper = rule.stepper()
    for n, close in enumerate(closes, start=1):
        got = stepper.step(close)
        assert got == (ema_rule(rule, series[:n]) if n >= rule.warmup else None)
    if len(closes) >= rule.warmup:
        assert rule.decide(series) == ema_rule(rule, series)


@settings(max_examples=300, deadline=None)
@given(closes=prices, period=st.integers(2, 20), oversold=st.floats(5, 45), overbought=st.floats(55, 95))
def test_rsi_stepped_equals_the_rule_over_the_series(
    closes: list[float], period: int, oversold: float, overbought: float
) -> None:
    rule = RsiReversion(period=period, oversold=oversold, overbought=overbought)
    series = np.array(closes)
    stepper = rule.stepper()
    with np.errstate(divide="ignore", invalid="ignore"):
        for n, close in enumerate(closes, start=1):
            got = stepper.step(close)
            assert got == (rsi_rule(rule, series[:n]) if n >= rule.warmup else None)
