"""Reconciliation: the pure comparison on hand-made books, then the shell on the paper exchange."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from quantum_trader import keys, portfolio
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.base import ExchangeOrder, OrderRequest
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.reconcile import (
    Kind,
    Report,
    Snapshot,
    accept,
    compare,
    confirmed,
    decode_report,
    encode_report,
    keep_reconciling,
    reconcile,
)
from quantum_trader.reconcile.core import baseline_from, order_differences, order_key
from quantum_trader.router import Router
from quantum_trader.runner import serve
from quantum_trader.settings import Settings
from tests.conftest import LogTrap
from tests.pipeline import decision, drain, results

D = Decimal
TOL = D("0.00000001")
OURS = "qt-" + "a" * 32


def bought(qty: str = "0.5", price: str = "3000", fee: str = "1.5") -> dict[str, portfolio.Position]:
    """A book that bought ``qty`` ETH for USDT, the fee in USDT (the paper exchange's way)."""
    fill = portfolio.Fill(
        symbol="ETHUSDT", base="ETH", quote="USDT", side="BUY", qty=D(qty), price=D(price), fee=D(fee), fee_asset="USDT"
    )
    return portfolio.replay([fill])


def snapshot(
    balances: dict[str, Decimal],
    *,
    book: dict[str, portfolio.Position] | None = None,
    baseline: dict[str, Decimal] | None = None,
    orders: list[ExchangeOrder] | None = None,
    recorded: dict[str, Decimal] | None = None,
    now_ms: int = 1_000_000,
) -> Snapshot:
    return Snapshot(
        balances=balances,
        orders=orders,
        book=book if book is not None else bought(),
        baseline=baseline,
        recorded=recorded or {},
        now_ms=now_ms,
    )


def order(
    coid: str, *, filled: str = "0.1", amount: str = "0.1", is_open: bool = False, time_ms: int = 0
) -> ExchangeOrder:
    return ExchangeOrder(
        symbol="ETHUSDT",
        client_order_id=coid,
        exchange_order_id="1001",
        side="SELL",
        amount=D(amount),
        filled=D(filled),
        avg_price=D("3000"),
        is_open=is_open,
        time_ms=time_ms,
    )


# ---- the pure core ---------------------------------------------------------------------------


def test_the_exchange_holding_baseline_plus_flows_is_clean() -> None:
    held = {"USDT": D("8498.5"), "ETH": D("0.5")}
    assert compare(snapshot(held, baseline={"USDT": D(10_000)}), tolerance=TOL, open_grace_ms=0) == []


def test_a_balance_off_is_reported_with_its_size_and_its_fix() -> None:
    held = {"USDT": D("8498.5"), "ETH": D("0.45"), "BNB": D("2")}
    found = compare(snapshot(held, baseline={"USDT": D(10_000)}), tolerance=TOL, open_grace_ms=0)
    assert [(d.kind, d.subject, d.size, d.expected, d.held) for d in found] == [
        (Kind.BALANCE, "BNB", D(2), D(0), D(2)),  # an asset the book never had
        (Kind.BALANCE, "ETH", D("-0.05"), D("0.5"), D("0.45")),
    ]
    eth = found[1]
    assert eth.detail == "ETH: the exchange holds 0.45, the book expects 0.5 (baseline 0, fills +0.5): 0.05 less"
    assert "quantum-trader reconcile --accept" in eth.fix


def test_a_difference_within_the_tolerance_is_not_one() -> None:
    held = {"USDT": D("8498.500000001"), "ETH": D("0.5")}
    view = snapshot(held, baseline={"USDT": D(10_000)})
    assert compare(view, tolerance=TOL, open_grace_ms=0) == []
    [off] = compare(view, tolerance=D(0), open_grace_ms=0)
    assert (off.subject, off.size) == ("USDT", D("0.000000001"))


def test_without_a_baseline_balances_are_not_compared_and_the_baseline_makes_them_agree() -> None:
    held = {"USDT": D("20000"), "ETH": D("3"), "DOGE": D(0)}
    assert compare(snapshot(held), tolerance=TOL, open_grace_ms=0) == []
    baseline = baseline_from(held, bought())
    assert baseline == {"USDT": D("21501.5"), "ETH": D("2.5")}  # zero balances are left out
    assert compare(snapshot(held, baseline=baseline), tolerance=TOL, open_grace_ms=0) == []


def test_orders_manual_fills_unrecorded_fills_and_stale_open_orders() -> None:
    recorded = {order_key(OURS, "1001"): D("0.04")}
    orders = [
        order("web_123"),  # a manual trade
        order("web_456", filled="0", is_open=True),  # someone's open order: not the book's business
        order(OURS),  # ours: 0.1 filled, results record 0.04
        order("qt-" + "b" * 32, filled="0.02", amount="0.1", is_open=True, time_ms=1),  # ours, unrecorded and open
        order("qt-" + "c" * 32, filled="0", is_open=True, time_ms=999_000),  # ours, open, young: in flight
    ]
    found = order_differences(orders, recorded, tolerance=TOL, open_before_ms=990_000)
    assert [(d.kind, d.client_order_id[:4], d.size) for d in found] == [
        (Kind.FOREIGN_FILL, "web_", D("0.1")),
        (Kind.UNRECORDED_FILL, "qt-a", D("0.06")),
        (Kind.UNRECORDED_FILL, "qt-b", D("0.02")),
        (Kind.UNKNOWN_OPEN_ORDER, "qt-b", D("0.08")),
    ]
    assert (
        found[0].detail
        == "ETHUSDT: order 1001 (web_123) SELL 0.1 at 3000 filled, not placed by the pipeline (a manual trade)"
    )


def test_a_fill_the_results_record_is_clean() -> None:
    view = snapshot({}, orders=[order(OURS)], recorded={order_key(OURS, "1001"): D("0.1")})
    assert compare(view, tolerance=TOL, open_grace_ms=0) == []


def test_only_what_both_looks_found_is_confirmed() -> None:
    base = {"USDT": D(10_000)}
    first = compare(snapshot({"USDT": D(8000), "ETH": D("0.5")}, baseline=base), tolerance=TOL, open_grace_ms=0)
    same = compare(snapshot({"USDT": D(8000), "ETH": D("0.5")}, baseline=base), tolerance=TOL, open_grace_ms=0)
    moved = compare(snapshot({"USDT": D(7000), "ETH": D("0.5")}, baseline=base), tolerance=TOL, open_grace_ms=0)
    assert [d.size for d in confirmed(first, same, TOL)] == [D("-498.5")]
    assert confirmed(first, moved, TOL) == []  # an order in flight moves it: not a standing difference
    manual = compare(snapshot({}, orders=[order("web_1")]), tolerance=TOL, open_grace_ms=0)
    assert confirmed([], manual, TOL) == []
    assert confirmed(manual, manual, TOL) == manual


def test_a_report_round_trips_and_says_whether_it_is_clean() -> None:
    [diff] = compare(
        snapshot({"USDT": D(1), "ETH": D("0.5")}, baseline={"USDT": D(10_000)}), tolerance=TOL, open_grace_ms=0
    )
    report = Report(at="2024-01-01T00:00:00.000Z", exchange="paper", differences=[diff], assets=2, orders=0, since="x")
    text = encode_report(report)
    assert json.loads(text)["clean"] is False
    assert json.loads(text)["differences"][0]["size"] == "-8497.5"
    assert decode_report(text) == report


# ---- the shell, on the paper exchange ----------------------------------------------------------


@pytest.fixture
def paper_settings(settings_for: Callable[..., Settings], clean_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"block_ms": 10, "paper_balances": {"USDT": D(10_000)}}
        return settings_for(clean_url, **(base | overrides))

    return make


async def trade(
    r: Redis, settings: Settings, paper: PaperExchange, *decisions: dict[str, str], allow: bool = True
) -> list[dict[str, Any]]:
    if allow:
        await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    await publish(r, settings.decision_stream, list(decisions))
    await drain(Router(r, settings))
    await drain(Execution(r, settings, paper))
    return await results(r, settings.result_stream)


async def funded(r: Redis, settings: Settings) -> PaperExchange:
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    return paper


async def no_wait(_seconds: float) -> None:
    return None


async def test_paper_is_clean_after_trades_and_the_first_run_records_the_baseline(
    r: Redis, paper_settings: Callable[..., Settings], log_trap: LogTrap
) -> None:
    settings = paper_settings()
    paper = await funded(r, settings)
    out = await trade(r, settings, paper, decision(qty="0.5"), decision(side="SELL", qty="0.2"), decision(qty="9"))
    assert [o["status"] for o in out] == ["FILLED", "FILLED", "REJECTED"]  # the last: insufficient balance

    report = await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)
    assert report.clean
    assert report.baseline_recorded
    assert await r.hgetall(keys.BOOK_BASELINE) == {"USDT": "10000"}  # the paper balances it was funded with
    assert log_trap.lines("reconcile_baseline_recorded")
    again = await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)
    assert again.clean
    assert not again.baseline_recorded
    assert decode_report(await r.get(keys.BOOK_RECONCILED) or "") == again


async def test_a_balance_moved_behind_the_books_back_halts_trading_with_the_reason(
    r: Redis, paper_settings: Callable[..., Settings], log_trap: LogTrap
) -> None:
    settings = paper_settings()
    paper = await funded(r, settings)
    await trade(r, settings, paper, decision(qty="0.5"))
    assert (await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)).clean
    await r.hset(keys.paper_balances(), "ETH", "0.4")  # 0.1 ETH gone: a withdrawal, say

    report = await reconcile(r, paper, settings, halt=True, settle_s=0, sleep=no_wait)
    [diff] = report.differences
    assert (diff.kind, diff.subject, diff.size) == (Kind.BALANCE, "ETH", D("-0.1"))
    assert await r.get(keys.KILL_SWITCH) == "1"
    stored = decode_report(await r.get(keys.BOOK_RECONCILED) or "")
    assert stored.halted
    assert stored.halt_reason == "reconciliation found 1 difference(s) with paper"
    [line] = log_trap.lines("reconcile_differences")
    logged = json.loads(line)
    assert logged["level"] == "error"
    assert logged["kill_switch"] == "on"
    assert "ETH: the exchange holds 0.4, the book expects 0.5" in logged["differences"]
    *_, after = await trade(r, settings, paper, decision(qty="0.1"), allow=False)
    assert (after["status"], after["reason"]) == ("REJECTED", "KILL_SWITCH")


async def test_without_halt_the_switch_is_left_alone(r: Redis, paper_settings: Callable[..., Settings]) -> None:
    settings = paper_settings()
    paper = await funded(r, settings)
    await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.paper_balances(), "USDT", "9999")
    report = await reconcile(r, paper, settings, halt=False, settle_s=0, sleep=no_wait)
    assert [d.size for d in report.differences] == [D(-1)]
    assert not report.halted
    assert await r.get(keys.KILL_SWITCH) == "0"


async def test_a_paper_fill_no_result_records_is_reported(r: Redis, paper_settings: Callable[..., Settings]) -> None:
    settings = paper_settings()
    paper = await funded(r, settings)
    assert (await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)).clean
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    # Placed and never committed: its intent was dead-lettered, say.
    await paper.place_orders([OrderRequest(OURS, "ETHUSDT", "BUY", D("0.1"))])

    report = await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)
    kinds = {(d.kind, d.subject, d.size) for d in report.differences}
    assert kinds == {
        (Kind.UNRECORDED_FILL, "", D("0.1")),
        (Kind.BALANCE, "ETH", D("0.1")),
        (Kind.BALANCE, "USDT", D("-300.3")),
    }


async def test_a_difference_gone_by_the_second_look_is_not_reported(
    r: Redis, paper_settings: Callable[..., Settings]
) -> None:
    settings = paper_settings()
    paper = await funded(r, settings)
    assert (await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)).clean
    await r.hset(keys.paper_balances(), "USDT", "9000")  # an order in flight, as the first look sees it

    async def its_result_lands(_seconds: float) -> None:
        await r.hset(keys.paper_balances(), "USDT", "10000")

    assert (await reconcile(r, paper, settings, halt=True, settle_s=0, sleep=its_result_lands)).clean
    assert await r.get(keys.KILL_SWITCH) is None


async def test_accept_makes_the_holdings_the_starting_point(r: Redis, paper_settings: Callable[..., Settings]) -> None:
    settings = paper_settings()
    paper = await funded(r, settings)
    await trade(r, settings, paper, decision(qty="0.5"))
    await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)
    await r.hset(keys.paper_balances(), "USDT", "20000")  # a deposit
    assert not (await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)).clean

    report = await accept(r, paper, settings, settle_s=0)
    assert report.clean
    assert report.accepted_ms > 0
    assert await r.hgetall(keys.BOOK_BASELINE) == {"USDT": "21501.5"}
    assert (await reconcile(r, paper, settings, settle_s=0, sleep=no_wait)).accepted_ms == report.accepted_ms


async def test_execution_reconciles_at_start(r: Redis, paper_settings: Callable[..., Settings]) -> None:
    settings = paper_settings(reconcile_s=0)
    await r.hset(keys.BOOK_BASELINE, "USDT", "10000")  # recorded before: the first look is clean, no second one
    await serve(r, settings, [keys.EXECUTION], asyncio.Event(), duration=0.5)
    report = decode_report(await r.get(keys.BOOK_RECONCILED) or "")
    assert report.clean
    assert report.exchange == "paper"


async def test_a_reconciliation_that_cannot_read_the_book_warns_and_halts_nothing(
    r: Redis, paper_settings: Callable[..., Settings], log_trap: LogTrap
) -> None:
    settings = paper_settings(reconcile_s=0, mode="paper", reconcile_halt=True)
    paper = await funded(r, settings)
    await r.hset(keys.BOOK_POSITIONS, "ETHUSDT", "not json")
    await keep_reconciling(r, paper, settings, asyncio.Event())
    [line] = log_trap.lines("reconcile_unavailable")
    assert "HDEL quantum:book:positions ETHUSDT" in line
    assert await r.get(keys.KILL_SWITCH) is None
    assert await r.get(keys.BOOK_RECONCILED) is None


async def test_a_shutdown_does_not_wait_for_a_reconciliation_in_progress(
    r: Redis, paper_settings: Callable[..., Settings]
) -> None:
    settings = paper_settings()
    paper = await funded(r, settings)  # no baseline yet: the reconciliation pauses between its two looks
    stop = asyncio.Event()
    task = asyncio.create_task(keep_reconciling(r, paper, settings, stop))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, timeout=1)  # not the 5 s pause
    assert await r.exists(keys.BOOK_BASELINE, keys.BOOK_RECONCILED) == 0
