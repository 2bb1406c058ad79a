"""A market's rules and an order made to fit them: pure, no server."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantum_trader.exchanges.base import OrderRequest
from quantum_trader.exchanges.ccxt.markets import MarketRules, Prepared, Refused, prepare, unified_symbol

ETH = MarketRules(
    symbol="ETH/USDT",
    market_id="ETHUSDT",
    base="ETH",
    quote="USDT",
    amount_step=Decimal("0.0001"),
    price_step=Decimal("0.01"),
    min_amount=Decimal("0.0001"),
    max_amount=Decimal("9000"),
    min_price=Decimal("0.01"),
    max_price=Decimal("1000000"),
    min_cost=Decimal("5"),
)


def order(qty: str = "0.1", side: str = "BUY", kind: str = "MARKET", price: str | None = None) -> OrderRequest:
    return OrderRequest(
        client_order_id="qt-1",
        symbol="ETHUSDT",
        side=side,  # type: ignore[arg-type]
        qty=Decimal(qty),
        order_type=kind,  # type: ignore[arg-type]
        price=None if price is None else Decimal(price),
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [("ETHUSDT", "ETH/USDT"), ("ethusdt", "ETH/USDT"), ("ETH/USDT", "ETH/USDT"), ("ETH-USDT", "ETH/USDT"), ("X", None)],
)
def test_unified_symbol_accepts_exchange_and_unified_forms(given: str, expected: str | None) -> None:
    assert unified_symbol(given, {"ETHUSDT": "ETH/USDT", "BTCUSDT": "BTC/USDT"}) == expected


def test_market_rules_from_ccxt_tick_size_and_decimal_places() -> None:
    market: dict[str, Any] = {
        "id": "ETHUSDT",
        "symbol": "ETH/USDT",
        "base": "ETH",
        "quote": "USDT",
        "precision": {"amount": 0.0001, "price": 0.01},
        "limits": {"amount": {"min": 0.0001, "max": 9000.0}, "price": {"min": 0.01}, "cost": {"min": 5.0}},
    }
    rules = MarketRules.from_ccxt(market)
    assert rules.amount_step == Decimal("0.0001")
    assert rules.price_step == Decimal("0.01")
    assert rules.min_cost == Decimal("5.0")
    assert rules.max_price is None
    places = MarketRules.from_ccxt(market | {"precision": {"amount": 4, "price": 2}}, precision_mode=2)
    assert places.amount_step == Decimal("0.0001")
    assert places.price_step == Decimal("0.01")


def test_prepare_rounds_amount_down_and_limit_price_in_the_traders_favour() -> None:
    assert prepare(order("0.12345"), ETH, Decimal(3000)) == Prepared(Decimal("0.1234"), None)
    assert prepare(order("0.1", "BUY", "LIMIT", "2999.999"), ETH, None) == Prepared(Decimal("0.1"), Decimal("2999.99"))
    assert prepare(order("0.1", "SELL", "LIMIT", "2999.991"), ETH, None) == Prepared(
        Decimal("0.1"), Decimal("2999.99") + Decimal("0.01")
    )


@pytest.mark.parametrize(
    ("request_", "hint", "rule"),
    [
        (order("0.00009"), Decimal(3000), "LOT_SIZE"),  # rounds to 0
        (order("10000"), Decimal(3000), "LOT_SIZE"),  # above max
        (order("0.001"), Decimal(3000), "MIN_NOTIONAL"),  # 3 USDT < 5
        (order("0.1", "BUY", "LIMIT", "0.001"), None, "PRICE_FILTER"),  # rounds to 0
        (order("0.1", "BUY", "LIMIT", "2000000"), None, "PRICE_FILTER"),
        (order("0.1"), None, "NO_PRICE"),  # market order, notional cannot be checked
    ],
)
def test_prepare_names_the_violated_rule(request_: OrderRequest, hint: Decimal | None, rule: str) -> None:
    refused = prepare(request_, ETH, hint)
    assert isinstance(refused, Refused)
    assert refused.code == rule
    assert refused.detail
    assert ETH.symbol in refused.detail
