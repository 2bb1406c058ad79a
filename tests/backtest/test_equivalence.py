"""The in-process backtest decides exactly what the stages decide on a server.

Hypothesis generates candle series (one or two symbols, bad rows, repeated open times, gaps),
strategies, risk limits and protective levels, and a script of kill-switch flips and decisions
from another publisher (valid ones, duplicates of earlier ones, malformed ones, stale and
future ones); both transports run it, and every outcome must be identical: the report's figures
and trades, rejections by reason, trading-state changes, each result (ids aside: stream ids are
the server's), the book, the paper balances, the protective levels and the dead letters.

``QT_TEST_EQUIVALENCE_EXAMPLES`` sets the number of examples (40 by default, ``make equivalence`` runs 400);
``pytest -m slow`` adds a run of 1,000.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantum_trader.backtest import Inject, Report, run
from quantum_trader.events import DECISION, Candle, Fields, envelope
from quantum_trader.settings import Settings
from quantum_trader.strategies import EmaCross, RsiReversion, Strategy

EXAMPLES = int(os.environ.get("QT_TEST_EQUIVALENCE_EXAMPLES", "40"))
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
IDS = ("intent_id", "decision_id", "client_order_id", "exchange_order_id", "original_id")


@dataclass(frozen=True)
class Scenario:
    candles: list[Candle]
    strategies: list[Strategy]
    settings: Settings
    script: dict[int, Inject]


def iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@st.composite
def series(draw: st.DrawFn) -> list[Candle]:
    """One or two symbols' minutes: a random walk, sometimes a hole, a repeated minute or a bad row."""
    symbols = draw(st.sampled_from([["BTCUSDT"], ["BTCUSDT", "ETHUSDT"]]))
    count = draw(st.integers(20, 90))
    moves = draw(st.lists(st.floats(-0.04, 0.04, allow_nan=False), min_size=count, max_size=count))
    out: list[Candle] = []
    for index, symbol in enumerate(symbols):
        price = 100.0 * (index + 1)
        minute = 0
        for step, move in enumerate(moves):
            minute += 1 + (5 if draw(st.integers(0, 40)) == 0 else 0)  # a hole now and then: warm-up again
            price = round(price * math.exp(move if index == 0 else -move / 2), draw(st.sampled_from([2, 6, 12])))
            spread = abs(move) * price + 0.01
            candle = Candle(symbol=symbol, interval="1m", open_time=START_MS + minute * MINUTE, open=price,
                            high=price + spread, low=max(price - spread, 0.01), close=price, volume=1.0)  # fmt: skip
            odd = draw(st.integers(0, 60)) if step > 3 else 99
            if odd == 0:
                candle = Candle(symbol=symbol, interval="1m", open_time=candle.open_time, open=price,
                                high=float("nan"), low=price, close=price, volume=1.0)  # fmt: skip
            elif odd == 1:
                out.append(candle)  # the same minute twice: the second is left out
            out.append(candle)
    return out


def strategy_set(draw: st.DrawFn) -> list[Strategy]:
    chosen: list[Strategy] = []
    if draw(st.booleans()):
        fast = draw(st.integers(2, 4))
        chosen.append(EmaCross(fast=fast, slow=fast + draw(st.integers(1, 6))))
    if draw(st.booleans()) or not chosen:
        chosen.append(RsiReversion(period=draw(st.integers(2, 6))))
    return chosen


def limits(draw: st.DrawFn) -> dict[str, Any]:
    """Risk settings, each on or off."""
    maybe = lambda value: draw(st.one_of(st.none(), value))  # noqa: E731
    out: dict[str, Any] = {
        "paper_fee_rate": draw(st.sampled_from([Decimal(0), Decimal("0.001"), Decimal("0.0075")])),
        "paper_slippage_bps": draw(st.sampled_from([Decimal(0), Decimal(5)])),
        "ai_sizing": draw(st.sampled_from(["fixed", "fraction"])),
        "ai_notional": draw(st.sampled_from([Decimal(50), Decimal(400), Decimal(3000)])),
        "ai_fraction": draw(st.sampled_from([Decimal("0.1"), Decimal("0.5")])),
        "ai_exit_fraction": draw(st.sampled_from([Decimal(1), Decimal("0.5")])),
        "stop_loss_pct": maybe(st.sampled_from([Decimal("0.5"), Decimal(2)])),
        "take_profit_pct": maybe(st.sampled_from([Decimal(1), Decimal(3)])),
        "daily_limit": maybe(st.integers(0, 12)),
        "max_position_notional": maybe(st.sampled_from([Decimal(100), Decimal(1000)])),
        "max_gross_exposure": maybe(st.sampled_from([Decimal(300), Decimal(5000)])),
        "max_drawdown_pct": maybe(st.sampled_from([Decimal("0.5"), Decimal(3)])),
        "daily_loss_limit": maybe(st.sampled_from([Decimal(1), Decimal(20)])),
        "breaker_state": draw(st.sampled_from(["reducing", "halted"])),
        "loss_streak": draw(st.sampled_from([0, 0, 2])),
        "cooldown_s": 600,
        "max_orders_per_s": maybe(st.integers(1, 3)),
        "max_orders_per_s_symbol": maybe(st.integers(1, 2)),
        "max_intent_age_s": draw(st.sampled_from([2.0, 60.0])),
        "max_notional": draw(st.sampled_from([Decimal(1000), Decimal(100_000)])),
        "dedup_window_s": 86_400,  # on the server the window runs on its own clock: keep it longer than the run
    }
    if draw(st.booleans()):
        out["max_position_qty"] = {"BTCUSDT": Decimal("2.5"), "ETHUSDT": Decimal(1)}
    return {name: value for name, value in out.items() if value is not None}


odd_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def outside_decision(draw: st.DrawFn, at_ms: int, earlier: list[Fields]) -> Fields:
    """A decision from another publisher: valid, a duplicate of an earlier one, or malformed."""
    kind = draw(st.sampled_from(["valid", "valid", "duplicate", "malformed", "stale", "future"]))
    if kind == "duplicate" and earlier:
        return dict(draw(st.sampled_from(earlier)))
    payload: dict[str, Any] = {
        "symbol": draw(st.sampled_from(["BTCUSDT", "ETHUSDT", "btc/usdt"])),
        "side": draw(st.sampled_from(["BUY", "SELL", "sell"])),
        "qty": draw(st.sampled_from(["0.5", "1", "2", "0.000001", "3e-1"])),
        "confidence": 0.9,
        "strategy": "outside",
    }
    if draw(st.booleans()):
        payload["order_type"] = "LIMIT"
        payload["price"] = draw(st.sampled_from(["50", "100", "250", "1000"]))
    if draw(st.booleans()):
        payload["stop_loss"], payload["take_profit"] = "1", "100000"
    stamp = at_ms
    if kind == "stale":
        stamp -= 3_600_000
    elif kind == "future":
        stamp += 3_600_000
    elif kind == "malformed":
        field, value = draw(
            st.sampled_from(
                [
                    ("qty", "-1"),
                    ("qty", "1e999"),
                    ("qty", "NaN"),
                    ("side", "HOLD"),
                    ("symbol", "ÉTHUSDT"),
                    ("symbol", ""),
                    ("price", "abc"),
                    ("confidence", 7),
                    ("stop_loss", "200000"),
                ]
            )
        )
        payload[field] = value
        if draw(st.booleans()):
            payload = {"nested": [[[payload]]], "text": draw(odd_text)}
    trace = f"outside-{draw(st.integers(0, 10**9))}"
    fields = envelope(DECISION, payload, trace_id=trace, correlation_id="outside", source="elsewhere",
                      timestamp=iso(stamp))  # fmt: skip
    if kind == "malformed" and draw(st.booleans()):
        fields["payload"] = draw(st.sampled_from(["{", "[]", "null", '{"symbol": 1e999999}', draw(odd_text)]))
    return fields


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    candles = draw(series())
    strategies = strategy_set(draw)
    config = Settings(**limits(draw))
    script: dict[int, Inject] = {}
    earlier: list[Fields] = []
    times = sorted({c.open_time for c in candles})
    for _ in range(draw(st.integers(0, 6))):
        index = draw(st.integers(0, max(0, len(times) - 1)))
        kill = draw(st.sampled_from([None, None, "0", "1", ""]))
        made = [
            draw(outside_decision(times[min(index, len(times) - 1)], earlier)) for _ in range(draw(st.integers(0, 3)))
        ]
        earlier.extend(made)
        before = script.get(index, Inject())
        script[index] = Inject(kill if kill is not None else before.kill, before.decisions + tuple(made))
    return Scenario(candles, strategies, config, script)


def outcome(report: Report) -> dict[str, Any]:
    """Everything a run decided, without the stream ids a server assigns."""
    streams = report.streams
    assert streams is not None

    def bare(fields: Fields) -> dict[str, Any]:
        payload = json.loads(fields["payload"])
        return {name: value for name, value in payload.items() if name not in IDS}

    return {
        "summary": report.summary(),
        "trades": report.trades,
        "rejections": report.rejections,
        "states": report.states,
        "results": [bare(fields) for _id, fields in streams.results],
        "rejected": [bare(fields) for _id, fields in streams.rejected],
        "book": streams.book,
        "balances": streams.balances,
        "stops": streams.stops,
        "dead": streams.dead,
    }


async def agree(scenario: Scenario) -> None:
    inside = await run(scenario.candles, scenario.strategies, scenario.settings, script=scenario.script)
    server = await run(
        scenario.candles, scenario.strategies, scenario.settings, script=scenario.script, through_server=True
    )
    assert outcome(inside) == outcome(server)


SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]


@pytest.mark.timeout(1800)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SLOW)
@given(scenario=scenarios())
async def test_in_process_and_through_server_decide_the_same(scenario: Scenario) -> None:
    await agree(scenario)


@pytest.mark.slow
@pytest.mark.timeout(7200)
@settings(max_examples=1000, deadline=None, suppress_health_check=SLOW)
@given(scenario=scenarios())
async def test_in_process_and_through_server_decide_the_same_at_length(scenario: Scenario) -> None:
    """The same property on 1,000 scenarios (pytest -m slow; about a quarter of an hour)."""
    await agree(scenario)


async def test_a_scenario_with_every_kind_of_event_agrees_and_trades() -> None:
    """One fixed, busy scenario: fills, refusals, a protective exit, a breaker, duplicates and a kill switch."""
    prices = [100 + 3 * math.sin(i / 4) + i * 0.05 for i in range(120)]
    candles = [Candle(symbol="BTCUSDT", interval="1m", open_time=START_MS + i * MINUTE, open=p, high=p + 0.8,
                      low=p - 0.8, close=p, volume=1.0) for i, p in enumerate(prices)]  # fmt: skip
    config = Settings(
        stop_loss_pct=Decimal("0.5"), take_profit_pct=Decimal(1), max_drawdown_pct=Decimal("0.05"),
        max_orders_per_s=1, ai_notional=Decimal(500), dedup_window_s=86_400,
    )  # fmt: skip
    outside = envelope(DECISION, {"symbol": "BTCUSDT", "side": "BUY", "qty": "1"}, trace_id="t1",
                       correlation_id="outside", source="elsewhere", timestamp=iso(START_MS + 30 * MINUTE))  # fmt: skip
    script = {
        30: Inject(decisions=(outside, outside, {"payload": "{"})),
        60: Inject(kill="1"),
        80: Inject(kill="0"),
    }
    inside = await run(candles, [EmaCross(fast=3, slow=8), RsiReversion(period=4)], config, script=script)
    server = await run(candles, [EmaCross(fast=3, slow=8), RsiReversion(period=4)], config, script=script,
                       through_server=True)  # fmt: skip
    assert outcome(inside) == outcome(server)
    assert len(inside.trades) > 4
    assert inside.rejections.get("DUPLICATE_SKIP") == 1
    assert inside.rejections.get("INVALID") == 1
    assert any(trade.strategy == "protect" for trade in inside.trades)
