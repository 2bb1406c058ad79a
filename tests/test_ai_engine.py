"""AI engine: candles in, decisions out in the pipeline's contract; warm-up; redelivery is harmless."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import msgspec

from quantum_trader import keys
from quantum_trader.ai_engine import AiEngine, exit_qty, order_qty, size
from quantum_trader.bus.connection import Redis
from quantum_trader.events import Candle
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.execution import Execution
from quantum_trader.feed import publish
from quantum_trader.governor import set_kill
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from quantum_trader.strategies import EmaCross, Signal
from quantum_trader.strategies.base import Closes
from tests.pipeline import drain, rejections, results

CANDLES = "quantum:stream:market.candle"
DECISIONS = "quantum:stream:ai.decision"


def series(closes: list[float]) -> list[Candle]:
    return [Candle(symbol="ETHUSDT", interval="1m", open_time=60_000 * i, open=c, high=c + 1, low=c - 1, close=c,
                   volume=1.0) for i, c in enumerate(closes)]  # fmt: skip


def test_sizing_fixed_and_fraction(settings_for: Callable[..., Settings]) -> None:
    fixed = settings_for("redis://x", ai_notional=Decimal(100))
    assert size(2000.0, None, fixed) == Decimal("0.05")
    fraction = settings_for("redis://x", ai_sizing="fraction", ai_fraction=Decimal("0.1"))
    assert size(2000.0, Decimal(10_000), fraction) == Decimal("0.5")


async def test_candles_become_decisions_after_warmup_and_route(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, block_ms=10, ai_notional=Decimal(90))
    strategy = EmaCross(fast=3, slow=8)
    engine = AiEngine(r, settings, [strategy])
    falling = [100 - i for i in range(20)]
    await publish(r, CANDLES, series(falling[: strategy.warmup - 1]))
    await drain(engine)
    assert await r.xlen(DECISIONS) == 0  # warm-up: nothing before enough candles

    await publish(r, CANDLES, series(falling + [80 + 2 * i for i in range(15)])[strategy.warmup - 1 :])
    await drain(engine)
    entries = await r.xrange(DECISIONS)
    assert len(entries) == 1
    fields = entries[0][1]
    payload = json.loads(fields["payload"])
    assert (payload["symbol"], payload["side"], payload["strategy"]) == ("ETHUSDT", "BUY", "ema-cross")
    assert Decimal(payload["qty"]) == (Decimal(90) / Decimal(payload["price"])).quantize(
        Decimal("0.000001"), "ROUND_DOWN"
    )
    assert 0.5 <= payload["confidence"] <= 1
    assert fields["source"] == "ai-engine"
    assert fields["correlation_id"].startswith("ema-cross:ETHUSDT:")
    assert len(fields["trace_id"]) == 32
    assert (await r.xpending(CANDLES, settings.ai_group))["pending"] == 0

    # The same candles read again: the strategy already holds the position it bought, so no second entry.
    await r.xgroup_setid(CANDLES, settings.ai_group, id="0")
    await drain(AiEngine(r, settings, [EmaCross(fast=3, slow=8)]))
    assert await r.xlen(DECISIONS) == 1
    # Without that record (a crash before the transaction), the replay yields the same decision: the router drops it.
    await r.delete(keys.AI_POSITIONS)
    await r.xgroup_setid(CANDLES, settings.ai_group, id="0")
    await drain(AiEngine(r, settings, [EmaCross(fast=3, slow=8)]))
    assert await r.xlen(DECISIONS) == 2
    await drain(Router(r, settings))
    assert await r.xlen("quantum:stream:trade.intent") == 1
    assert [rej["reason"] for rej in await rejections(r)] == ["DUPLICATE_SKIP"]


async def test_a_gap_in_the_candles_restarts_the_warm_up(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, block_ms=10)
    strategy = EmaCross(fast=3, slow=8)
    engine = AiEngine(r, settings, [strategy])
    before = series([100.0 - i for i in range(20)])
    after = [Candle(symbol="ETHUSDT", interval="1m", open_time=60_000 * (100 + i), open=c, high=c + 1, low=c - 1,
                    close=c, volume=1.0) for i, c in enumerate([80.0 + 3 * i for i in range(5)])]  # fmt: skip
    await publish(r, CANDLES, before + after)  # 80 minutes missing between the two runs
    await drain(engine)
    assert engine.minds.since["ETHUSDT"] == len(after)  # nothing from before the hole
    assert await r.xlen(DECISIONS) == 0  # 5 candles since the gap: below the warm-up of 10


async def test_how_long_a_hole_may_be_is_a_setting(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    before = series([100.0 - i for i in range(20)])
    after = [msgspec.structs.replace(c, open_time=c.open_time + 100 * 60_000) for c in series([80.0, 83.0, 86.0])]
    await publish(r, CANDLES, before + after)  # 80 minutes without a candle
    tolerant = AiEngine(r, settings_for(clean_url, block_ms=10, ai_gap="2h"), [EmaCross(fast=3, slow=8)])
    await drain(tolerant)
    assert tolerant.minds.since["ETHUSDT"] == 23  # a hole shorter than QT_AI_GAP=2h keeps the history
    assert str(AiEngine(r, settings_for(clean_url, ai_gap="off"), []).gap) == "off"
    assert str(AiEngine(r, settings_for(clean_url), []).gap) == "more than 3 intervals"  # auto on a stream: 24/7


@dataclass
class Script:
    """Says what it is told on the n-th candle (1-based): a strategy whose signals a scenario chooses."""

    signals: dict[int, str] = field(default_factory=dict)
    name: str = "script"
    version: str = "1"
    warmup: int = 1

    def decide(self, closes: Closes) -> Signal | None:
        side = self.signals.get(len(closes))
        return Signal(side, 1.0) if side in ("BUY", "SELL") else None  # type: ignore[arg-type]


async def trade_through(r: Redis, settings: Settings, strategy: Script, closes: list[float]) -> list[dict[str, object]]:
    """Each candle through engine, router and execution on the paper exchange; the decisions' payloads."""
    engine, router = AiEngine(r, settings, [strategy]), Router(r, settings)
    execution = Execution(r, settings, await build_exchange(r, settings))
    for candle in series(closes):
        await publish(r, CANDLES, [candle])
        for stage in (engine, router, execution):
            await drain(stage)
    return [json.loads(fields["payload"]) for _id, fields in await r.xrange(DECISIONS)]


def test_long_only_rules() -> None:
    entry = Decimal("0.5")
    assert order_qty("BUY", Decimal(0), entry, Decimal(1)) == (entry, "")
    assert order_qty("BUY", Decimal("0.5"), entry, Decimal(1))[0] == 0  # no second entry while holding
    assert order_qty("SELL", Decimal("0.7"), entry, Decimal(1)) == (Decimal("0.7"), "")  # the whole position
    assert order_qty("SELL", Decimal(0), entry, Decimal(1)) == (
        Decimal(0),
        "no position to sell (long-only spot: no shorts)",
    )
    assert exit_qty(Decimal("0.7"), Decimal("0.5")) == Decimal("0.35")
    assert exit_qty(Decimal("0.000001"), Decimal("0.5")) == Decimal("0.000001")  # half of a step: all of it


async def test_an_exit_sells_the_position_it_holds_and_no_more(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, block_ms=10, ai_notional=Decimal(90), paper_balances={"USDT": Decimal(1000)})
    await set_kill(r, on=False)
    # SELL while flat, an entry, a second BUY while holding, the exit at a higher price, another SELL while flat.
    script = Script({1: "SELL", 2: "BUY", 3: "BUY", 4: "SELL", 5: "SELL"})
    decided = await trade_through(r, settings, script, [100.0, 100.0, 95.0, 120.0, 110.0])
    assert [(d["side"], Decimal(str(d["qty"]))) for d in decided] == [("BUY", Decimal("0.9")), ("SELL", Decimal("0.9"))]
    assert [(x["status"], x["side"], Decimal(x["filled_qty"])) for x in await results(r)] == [
        ("FILLED", "BUY", Decimal("0.9")),
        ("FILLED", "SELL", Decimal("0.9")),
    ]
    assert Decimal(await r.hget(keys.paper_balances(), "ETH") or "0") == 0  # nothing left behind
    assert await r.hget(keys.AI_POSITIONS, "script:ETHUSDT") is None


async def test_an_exit_fraction_reduces_the_position_by_that_share(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, block_ms=10, ai_notional=Decimal(100), ai_exit_fraction=Decimal("0.5"),
                            paper_balances={"USDT": Decimal(1000)})  # fmt: skip
    await set_kill(r, on=False)
    decided = await trade_through(r, settings, Script({1: "BUY", 2: "SELL", 3: "SELL"}), [100.0, 100.0, 100.0])
    assert [(d["side"], Decimal(str(d["qty"]))) for d in decided] == [
        ("BUY", 1),
        ("SELL", Decimal("0.5")),
        ("SELL", Decimal("0.25")),
    ]
    assert Decimal(await r.hget(keys.AI_POSITIONS, "script:ETHUSDT") or "0") == Decimal("0.25")


async def test_an_entry_that_did_not_fill_is_not_held_across_a_restart(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, block_ms=10, ai_notional=Decimal(100), paper_balances={"USDT": Decimal(1000)})
    await set_kill(r, on=True)  # halted: the entry is REJECTED KILL_SWITCH
    await trade_through(r, settings, Script({1: "BUY"}), [100.0])
    assert [(x["status"], x["reason"]) for x in await results(r)] == [("REJECTED", "KILL_SWITCH")]
    await set_kill(r, on=False)
    # A new engine process: it reads the record and the outcome since, so it knows nothing is held.
    decided = await trade_through(r, settings, Script({1: "SELL", 2: "BUY"}), [100.0, 101.0])
    assert [(d["side"], Decimal(str(d["qty"]))) for d in decided] == [("BUY", 1), ("BUY", Decimal("0.990099"))]
    assert [x["status"] for x in await results(r)] == ["REJECTED", "FILLED"]
