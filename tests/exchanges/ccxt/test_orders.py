"""A ccxt order as an outcome: pure, no server."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantum_trader.exchanges.ccxt.orders import fees_of, outcome_from_order


def test_outcome_from_a_full_binance_response_uses_exact_strings() -> None:
    order_: dict[str, Any] = {
        "id": "1001",
        "status": "closed",
        "amount": 0.1,
        "filled": 0.1,
        "average": 3000.0049999999997,  # ccxt's float; the info strings are exact
        "info": {"executedQty": "0.10000000", "cummulativeQuoteQty": "300.00050000"},
        "fees": [{"currency": "ETH", "cost": 5e-05}, {"currency": "ETH", "cost": 5e-05}],
    }
    out = outcome_from_order("qt-1", order_, Decimal("0.1"), fees_of(order_))
    assert out.status == "FILLED"
    assert out.reason == ""
    assert out.filled_qty == Decimal("0.1")
    assert out.avg_price == Decimal("3000.005")
    assert (out.fee, out.fee_asset) == (Decimal("0.0001"), "ETH")
    assert out.exchange_order_id == "1001"


def test_outcome_says_partial_and_unfilled() -> None:
    partial: dict[str, Any] = {"id": "7", "status": "canceled", "amount": 0.1, "filled": 0.05, "average": 2999.5}
    out = outcome_from_order("qt-1", partial, Decimal("0.1"), None)
    assert out.status == "FILLED"
    assert out.reason == "PARTIAL_FILL"
    assert out.detail.startswith("filled 0.05 of 0.1; the rest is canceled")
    nothing: dict[str, Any] = {"id": "8", "status": "canceled", "amount": 0.1, "filled": 0.0}
    out = outcome_from_order("qt-1", nothing, Decimal("0.1"), None)
    assert out.status == "REJECTED"
    assert out.reason == "ORDER_CANCELED"
    assert out.detail.startswith("nothing filled")


def test_fees_come_from_trades_when_the_order_has_none() -> None:
    order_: dict[str, Any] = {"fees": [], "fee": None}
    trades = [{"fee": {"currency": "ETH", "cost": 5e-05}}, {"fee": {"currency": "ETH", "cost": 5e-05}}]
    assert fees_of(order_) is None
    assert fees_of(order_, trades) == (Decimal("0.0001"), "ETH")
