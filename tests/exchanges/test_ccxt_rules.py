"""The ccxt adapter's pure helpers: no server, no network."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import pytest

from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.base import OrderRequest
from quantum_trader.exchanges.ccxt_exchange import (
    Credentials,
    ErrorKind,
    MarketRules,
    Prepared,
    backoff_delay,
    classify,
    credential_names,
    fees_of,
    load_credentials,
    outcome_from_order,
    override_origin,
    prepare,
    read_env_file,
    scrub,
    unified_symbol,
)
from tests.exchanges.conftest import LogTrap, write_secrets

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
    ("exc", "kind"),
    [
        (ccxt.AuthenticationError('binance {"code":-1022,"msg":"Signature for this request is not valid."}'), "AUTH"),
        (ccxt.PermissionDenied("no trading permission"), "AUTH"),
        # ccxt reports -2015 as DDoSProtection once a key has worked; a revoked key must still halt.
        (ccxt.DDoSProtection('binance {"code": -2015, "msg": "Invalid API-key, IP, or permissions"}'), "AUTH"),
        (ccxt.OrderNotFound("Order does not exist."), "NOT_FOUND"),
        (ccxt.InvalidOrder('binance {"code":-2010,"msg":"Duplicate order sent."}'), "DUPLICATE"),
        (ccxt.RateLimitExceeded("429"), "NOT_SENT"),
        (ccxt.DDoSProtection("418 banned"), "NOT_SENT"),
        (ccxt.InvalidNonce("-1021 outside recvWindow"), "NOT_SENT"),
        (ccxt.RequestTimeout("timed out"), "UNKNOWN"),
        (ccxt.ExchangeNotAvailable("503"), "UNKNOWN"),
        (ccxt.NetworkError("connection reset"), "UNKNOWN"),
        (ccxt.OperationFailed('{"code":-1001,"msg":"Internal error"}'), "UNKNOWN"),
        (TimeoutError(), "UNKNOWN"),
        (ConnectionResetError(), "UNKNOWN"),
        (ccxt.InsufficientFunds("balance"), "REJECTED"),
        (ccxt.InvalidOrder("Filter failure: LOT_SIZE"), "REJECTED"),
        (ccxt.BadSymbol("Invalid symbol."), "REJECTED"),
        (ccxt.NotSupported("nope"), "FAILED"),
        (ccxt.ExchangeError("something"), "FAILED"),
        (ValueError("bug"), "FAILED"),
    ],
)
def test_classify_maps_each_error_to_what_it_means_for_the_order(exc: BaseException, kind: str) -> None:
    assert classify(exc) is ErrorKind[kind]


def test_backoff_grows_is_capped_and_jittered() -> None:
    low = [backoff_delay(n, 0.5, 4.0, lambda: 0.0) for n in range(1, 7)]
    high = [backoff_delay(n, 0.5, 4.0, lambda: 1.0) for n in range(1, 7)]
    assert low == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]  # half the ceiling is fixed...
    assert high == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # ...the other half is jitter; capped at 4
    assert 0.25 < backoff_delay(1, 0.5, 4.0, lambda: 0.3) < 0.5


def test_scrub_hides_secrets_and_signed_query_strings() -> None:
    text = "binance GET http://h/api/v3/order?symbol=ETHUSDT&timestamp=1&signature=abc 401 key=SEKRETKEY"
    clean = scrub(text, ["SEKRETKEY", ""])
    assert "SEKRETKEY" not in clean
    assert "signature" not in clean
    assert "http://h/api/v3/order?…" in clean


def test_override_origin_replaces_only_scheme_and_host() -> None:
    urls = {"public": "https://testnet.binance.vision/api/v3", "nested": {"v1": "https://x.y/api/v1"}, "n": None}
    out = override_origin(urls, "http://127.0.0.1:9/")
    assert out == {"public": "http://127.0.0.1:9/api/v3", "nested": {"v1": "http://127.0.0.1:9/api/v1"}, "n": None}


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
    reason = prepare(request_, ETH, hint)
    assert isinstance(reason, str)
    assert reason.startswith(f"{rule}: ")


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
    assert out.reason.startswith("PARTIAL_FILL: filled 0.05 of 0.1; the rest is canceled")
    nothing: dict[str, Any] = {"id": "8", "status": "canceled", "amount": 0.1, "filled": 0.0}
    out = outcome_from_order("qt-1", nothing, Decimal("0.1"), None)
    assert out.status == "REJECTED"
    assert out.reason.startswith("ORDER_CANCELED: nothing filled")


def test_fees_come_from_trades_when_the_order_has_none() -> None:
    order_: dict[str, Any] = {"fees": [], "fee": None}
    trades = [{"fee": {"currency": "ETH", "cost": 5e-05}}, {"fee": {"currency": "ETH", "cost": 5e-05}}]
    assert fees_of(order_) is None
    assert fees_of(order_, trades) == (Decimal("0.0001"), "ETH")


def test_credential_names_follow_the_exchange_id() -> None:
    assert credential_names("binance") == ("BINANCE_API_KEY", "BINANCE_API_SECRET", "BINANCE_API_PASSWORD")
    assert credential_names("binanceusdm")[0] == "BINANCEUSDM_API_KEY"


def test_read_env_file_strips_quotes_comments_and_export(tmp_path: Path) -> None:
    path = tmp_path / "s.env"
    path.write_text("# c\nexport A='x y'\nB=\"z\"\n\nC=plain=with=equals\n", encoding="utf-8")
    assert read_env_file(path) == {"A": "x y", "B": "z", "C": "plain=with=equals"}


def test_load_credentials_reads_the_file_and_hides_values(tmp_path: Path) -> None:
    creds = load_credentials(write_secrets(tmp_path / "s.env", "K" * 20, "S" * 20), "binance")
    assert creds.api_key.get_secret_value() == "K" * 20
    assert "K" * 20 not in repr(creds)
    assert "S" * 20 not in repr(creds)
    assert isinstance(creds, Credentials)


def test_load_credentials_only_warns_in_paper_mode_when_others_can_read_the_file(
    tmp_path: Path, log_trap: LogTrap
) -> None:
    path = write_secrets(tmp_path / "s.env", mode=0o644)
    load_credentials(path, "binance", "paper")  # testnet and live refuse it: test_ccxt_secrets.py
    [line] = log_trap.lines("secrets_file_world_readable")
    assert f"chmod 0640 {path}" in line


def test_load_credentials_errors_say_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINANCE_API_KEY", "from-the-environment")
    with pytest.raises(ConfigError, match=r"not read from the environment.*QT_SECRETS_FILE"):
        load_credentials(None, "binance")
    with pytest.raises(ConfigError, match="does not exist"):
        load_credentials(tmp_path / "missing.env", "binance")
    empty = tmp_path / "empty.env"
    empty.write_text("OTHER=1\n", encoding="utf-8")
    empty.chmod(0o640)
    with pytest.raises(ConfigError, match="has no BINANCE_API_KEY or BINANCE_API_SECRET"):
        load_credentials(empty, "binance")
    if os.getuid() != 0:  # root reads any file
        unreadable = write_secrets(tmp_path / "locked.env", mode=0o000)
        with pytest.raises(ConfigError, match="chmod 0640"):
            load_credentials(unreadable, "binance")
