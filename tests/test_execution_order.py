"""Decisions for one symbol execute in the order they were published, with batches in flight."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.pipeline import decision, results

SYMBOLS = ["ETHUSDT", "BTCUSDT", "SOLUSDT"]
PRICES = {"ETHUSDT": "3000", "BTCUSDT": "60000", "SOLUSDT": "150"}


async def test_alternating_buys_and_sells_fill_in_publish_order_with_two_batches_in_flight(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    # No base asset at the start: a SELL that overtook the BUY before it would be rejected.
    settings = settings_for(
        clean_url, block_ms=10, batch_size=7, pipeline_depth=2, paper_balances={"USDT": Decimal(10_000_000)}
    )
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, mapping=PRICES)
    published: dict[str, list[str]] = defaultdict(list)  # symbol -> sides, in publish order
    made = []
    for n in range(1_200):
        symbol = SYMBOLS[(n // 2) % 3]
        side = "BUY" if n % 2 == 0 else "SELL"
        # Each BUY and its SELL carry the same step number, so the test can pair them up.
        made.append(decision(symbol=symbol, side=side, qty="0.001", price=PRICES[symbol], strategy=f"step-{n // 2}"))
        published[symbol].append(side)
    await publish(r, settings.decision_stream, made)

    router = Router(r, settings)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    execution = Execution(r, settings, paper)
    stop = asyncio.Event()

    async def until_done() -> None:
        for _ in range(2_000):  # the stage's counters, polled
            if sum(execution.totals.values()) >= len(made):
                break
            await asyncio.sleep(0.05)
        stop.set()

    await asyncio.wait_for(
        asyncio.gather(router.consumer.run(router.handle, stop), execution.consumer.run(execution.handle, stop),
                       until_done()),
        timeout=100,
    )  # fmt: skip

    out: list[dict[str, Any]] = await results(r, settings.result_stream)
    assert [(o["status"], o["reason"], o["detail"]) for o in out if o["status"] != "FILLED"][:3] == []  # none rejected
    filled: dict[str, list[str]] = defaultdict(list)
    orders = await paper.fetch_orders([o["client_order_id"] for o in out])
    assert len(orders) == len(made)
    for o in out:
        filled[o["symbol"]].append(o["side"])
    assert filled == published  # results, in stream order, follow the publish order per symbol
    balances = await paper.balances()
    assert [balances.get(symbol.removesuffix("USDT"), Decimal(0)) for symbol in SYMBOLS] == [0, 0, 0]
