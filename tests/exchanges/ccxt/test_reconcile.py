"""Reconciliation through the real ccxt adapter against the fake Binance: clean, manual trade, lost response."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.reconcile import Kind, decode_report, keep_reconciling, reconcile
from tests.exchanges.ccxt.conftest import Pipeline
from tests.exchanges.conftest import LogTrap
from tests.exchanges.fake_binance import FakeBinance
from tests.pipeline import decision

D = Decimal
STARTED = {"USDT": D(10_000), "ETH": D(1), "BTC": D("0.1")}  # the fake account's balances


async def no_wait(_seconds: float) -> None:
    return None


async def reconciled(pipeline: Pipeline, **options: Any) -> Any:
    """A reconciliation of the pipeline's exchange, both looks at once."""
    return await reconcile(
        pipeline.r, pipeline.execution.exchange, pipeline.settings, settle_s=0, sleep=no_wait, **options
    )


async def test_clean_after_the_pipeline_trades(r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    pipeline = await make_pipeline()
    fake.market_fill_split = 2  # two trades per order, at two prices
    out = await pipeline.run(
        decision(qty="0.1"), decision(side="SELL", qty="0.05"), decision("BTCUSDT", qty="0.001", price="60000")
    )
    assert [o["status"] for o in out] == ["FILLED"] * 3

    report = await reconciled(pipeline, halt=True)
    assert report.differences == []
    assert report.baseline_recorded
    assert report.orders == 3  # every order of the book's markets was looked at
    baseline = await r.hgetall(keys.BOOK_BASELINE)
    assert {asset: D(value) for asset, value in baseline.items()} == STARTED
    assert (await reconciled(pipeline, halt=True)).clean
    assert await r.get(keys.KILL_SWITCH) == "0"


async def test_a_manual_trade_is_reported_with_its_size(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    pipeline = await make_pipeline()
    await pipeline.run(decision(qty="0.1"))
    assert (await reconciled(pipeline)).clean
    manual = fake.manual_trade("ETHUSDT", "SELL", "0.2")  # on the exchange's site: 600 USDT, less a 0.6 fee

    report = await reconciled(pipeline)
    found = {(d.kind, d.subject): d for d in report.differences}
    assert set(found) == {(Kind.FOREIGN_FILL, "ETHUSDT"), (Kind.BALANCE, "ETH"), (Kind.BALANCE, "USDT")}
    trade = found[Kind.FOREIGN_FILL, "ETHUSDT"]
    assert (trade.side, trade.size, trade.price) == ("SELL", D("0.2"), D(3000))
    assert (trade.exchange_order_id, trade.client_order_id) == (str(manual.order_id), "web_manual1")
    assert found[Kind.BALANCE, "ETH"].size == D("-0.2")
    assert found[Kind.BALANCE, "USDT"].size == D("599.4")


async def test_a_fill_whose_response_was_lost_is_reported_and_halts_trading(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance, log_trap: LogTrap
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    pipeline = await make_pipeline()
    assert pipeline.settings.effective_reconcile_halt  # testnet: on unless QT_RECONCILE_HALT=false
    await pipeline.run(decision(qty="0.1"))
    assert (await reconciled(pipeline)).clean
    # The order fills, its response is lost, and the exchange says "no such order" to both lookups:
    # the adapter sends it again and the pipeline records only the second order.
    fake.script("order", "500_after_accept")
    fake.script("query", "missing", "missing")
    [_, res] = await pipeline.run(decision(qty="0.1"))
    lost, kept = fake.placed(res["client_order_id"])
    assert (res["status"], res["exchange_order_id"]) == ("FILLED", str(kept.order_id))

    report = await reconciled(pipeline, halt=pipeline.settings.effective_reconcile_halt)
    found = {(d.kind, d.subject): d for d in report.differences}
    assert set(found) == {(Kind.UNRECORDED_FILL, "ETHUSDT"), (Kind.BALANCE, "ETH"), (Kind.BALANCE, "USDT")}
    missed = found[Kind.UNRECORDED_FILL, "ETHUSDT"]
    assert (missed.exchange_order_id, missed.client_order_id) == (str(lost.order_id), res["client_order_id"])
    assert (missed.side, missed.size) == ("BUY", D("0.1"))
    assert found[Kind.BALANCE, "ETH"].size == D("0.0999")  # 0.1 bought, 0.0001 fee in ETH
    assert found[Kind.BALANCE, "USDT"].size == D(-300)
    assert report.halted
    assert await r.get(keys.KILL_SWITCH) == "1"
    assert decode_report(await r.get(keys.BOOK_RECONCILED) or "").halt_reason.startswith("reconciliation found 3")
    assert "no result records it" in log_trap.lines("reconcile_differences")[0]

    *_, after = await pipeline.run(decision(qty="0.1"))
    assert (after["status"], after["reason"]) == ("REJECTED", "KILL_SWITCH")
    assert len(fake.placed()) == 3  # nothing sent after the halt


async def test_an_order_of_ours_left_open_is_reported(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance
) -> None:
    pipeline = await make_pipeline(symbol_allowlist=["ETHUSDT"])  # the market is asked about though the book is empty
    resting = fake.rest_order("ETHUSDT", "BUY", "0.1", "2000", "qt-" + "d" * 32)
    report = await reconciled(pipeline)
    [left] = report.differences
    assert (left.kind, left.exchange_order_id, left.size) == (Kind.UNKNOWN_OPEN_ORDER, str(resting.order_id), D("0.1"))


async def test_an_unreachable_exchange_warns_and_halts_nothing(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance, log_trap: LogTrap
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    pipeline = await make_pipeline(reconcile_s=0)
    await fake.stop()
    await keep_reconciling(r, pipeline.execution.exchange, pipeline.settings, asyncio.Event())
    [line] = log_trap.lines("reconcile_unavailable")
    assert "nothing halted" in line
    assert await r.get(keys.KILL_SWITCH) == "0"
    assert await r.get(keys.BOOK_RECONCILED) is None
