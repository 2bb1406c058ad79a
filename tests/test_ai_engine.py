"""AI engine: candles in, decisions out in the pipeline's contract; warm-up; redelivery is harmless."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal

from quantum_trader.ai_engine import AiEngine, size
from quantum_trader.bus.connection import Redis
from quantum_trader.marketdata import Candle, publish
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from quantum_trader.strategies import EmaCross
from tests.pipeline import drain, rejections

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

    # The same candles delivered again (a crash before the ack) yield the same decisions: the router drops them.
    await r.xgroup_setid(CANDLES, settings.ai_group, id="0")
    again = AiEngine(r, settings, [EmaCross(fast=3, slow=8)])
    await drain(again)
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
    assert list(engine.history["ETHUSDT"]) == [c.close for c in after]  # nothing from before the hole
    assert await r.xlen(DECISIONS) == 0  # 5 candles since the gap: below the warm-up of 10
