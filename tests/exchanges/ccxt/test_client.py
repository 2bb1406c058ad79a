"""The ccxt adapter against a local fake of the Binance spot API: ccxt's real client code runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.base import OrderRequest
from quantum_trader.exchanges.ccxt import CcxtConfig, CcxtExchange, Credentials, OrderStateUnknown
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.runner import halt_trading
from quantum_trader.settings import Settings
from tests.exchanges.conftest import LogTrap
from tests.exchanges.fake_binance import API_KEY, API_SECRET, FakeBinance

MakeExchange = Callable[..., Any]
NEW_ORDER = ("POST", "/api/v3/order")
QUERY_ORDER = ("GET", "/api/v3/order")


def buy(coid: str = "qt-00000000000000000000000000000001", qty: str = "0.1", **kw: Any) -> OrderRequest:
    values: dict[str, Any] = {"symbol": "ETHUSDT", "side": "BUY", "reference_price": Decimal(3000)} | kw
    return OrderRequest(client_order_id=coid, qty=Decimal(qty), **values)


async def test_market_order_fills_with_the_servers_price_and_fee(
    make_exchange: MakeExchange, fake: FakeBinance
) -> None:
    fake.market_fill_split = 2  # two fills at 3000.00 and 3000.01
    exchange = await make_exchange()
    [out] = await exchange.place_orders([buy()])
    [order] = fake.placed()
    assert order.client_order_id == "qt-00000000000000000000000000000001"  # our id reached the exchange
    assert out.status == "FILLED"
    assert out.filled_qty == Decimal("0.1")
    assert out.avg_price == Decimal("3000.005")
    assert (out.fee, out.fee_asset) == (Decimal("0.0001"), "ETH")
    assert out.exchange_order_id == str(order.order_id)


async def test_timeout_after_accept_places_exactly_one_order(
    make_exchange: MakeExchange, fake: FakeBinance, log_trap: LogTrap
) -> None:
    fake.script("order", "hang_after_accept")  # accepted and filled, but the answer never arrives
    exchange = await make_exchange()
    [out] = await exchange.place_orders([buy()])
    assert fake.calls(*NEW_ORDER) == 1  # looked up, not resent
    assert len(fake.placed()) == 1
    assert out.status == "FILLED"
    assert out.filled_qty == Decimal("0.1")
    assert out.avg_price == Decimal("3000")
    assert (out.fee, out.fee_asset) == (Decimal("0.0001"), "ETH")  # from the order's trades
    assert log_trap.lines("order_found_after_error")


async def test_a_blind_resend_would_have_duplicated_the_order(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    """Guard for the test above: like Binance, the fake accepts a filled order's client id again."""
    exchange = await make_exchange()
    for _ in range(2):
        await exchange.client.create_order("ETH/USDT", "market", "buy", "0.1", None, {"newClientOrderId": "qt-x"})
    assert len(fake.placed("qt-x")) == 2


@pytest.mark.parametrize("status", ["429", "418"])
async def test_rate_limited_order_is_retried_and_succeeds(
    make_exchange: MakeExchange, fake: FakeBinance, log_trap: LogTrap, status: str
) -> None:
    fake.script("order", status, status)
    exchange = await make_exchange()
    [out] = await exchange.place_orders([buy()])
    assert out.status == "FILLED"
    assert fake.calls(*NEW_ORDER) == 3
    assert len(fake.placed()) == 1
    assert fake.calls(*QUERY_ORDER) == 0  # a 429 is refused before processing: nothing to look up
    assert len(log_trap.lines("exchange_retry")) == 2


async def test_5xx_is_looked_up_then_resent_and_succeeds(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    fake.script("order", "503")  # refused without placing
    exchange = await make_exchange()
    [out] = await exchange.place_orders([buy()])
    assert out.status == "FILLED"
    assert fake.calls(*NEW_ORDER) == 2
    assert fake.calls(*QUERY_ORDER) == 2  # not found, and still not found after the grace period
    assert len(fake.placed()) == 1


async def test_5xx_after_accept_is_found_not_resent(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    fake.script("order", "500_after_accept")
    exchange = await make_exchange()
    [out] = await exchange.place_orders([buy()])
    assert out.status == "FILLED"
    assert fake.calls(*NEW_ORDER) == 1
    assert len(fake.placed()) == 1


async def test_retries_run_out_into_failed_without_an_order(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    fake.script("order", "429", "429", "429", "429")
    exchange = await make_exchange(exchange_retries=3)
    [out] = await exchange.place_orders([buy()])
    assert out.status == "FAILED"
    assert out.reason == "EXCHANGE_UNAVAILABLE"
    assert out.detail.startswith("not placed after 4 attempts")
    assert fake.placed() == []


async def test_unknown_state_is_raised_never_guessed(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    fake.script("order", "hang_after_accept")
    fake.script("query", "503", "503", "503")
    exchange = await make_exchange(exchange_retries=2)
    with pytest.raises(OrderStateUnknown, match="cannot tell whether order"):
        await exchange.place_orders([buy()])
    assert len(fake.placed()) == 1
    # Redelivered later: the lookup now answers and the order is reported, not placed again.
    found = await exchange.fetch_orders([buy().client_order_id])
    assert found[buy().client_order_id].status == "FILLED"
    assert fake.calls(*NEW_ORDER) == 1


@pytest.mark.parametrize(
    ("key", "secret", "code"),
    [("not-the-key-0000000000000000", API_SECRET, "-2015"), (API_KEY, "not-the-secret-0000000000000", "-1022")],
)
async def test_bad_credentials_fail_trip_the_kill_switch_and_say_how_to_fix(
    r: Redis,
    make_exchange: MakeExchange,
    fake: FakeBinance,
    log_trap: LogTrap,
    key: str,
    secret: str,
    code: str,
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    creds = Credentials(api_key=SecretStr(key), secret=SecretStr(secret))
    exchange = await make_exchange(credentials=creds, exchange_concurrency=1)
    first, second = await exchange.place_orders([buy(), buy("qt-00000000000000000000000000000002")])
    assert first.status == "FAILED"
    assert first.reason == "AUTH_FAILED"
    assert code in first.detail
    assert second.status == "REJECTED"  # not even sent once the credentials were refused
    assert second.reason == "KILL_SWITCH"
    assert second.detail == "not sent; the exchange refused the credentials earlier in this batch"
    assert await r.get(keys.KILL_SWITCH) == "1"
    assert fake.placed() == []
    assert fake.calls(*NEW_ORDER) == 1
    [line] = log_trap.lines("exchange_auth_failed")
    assert "BINANCE_API_KEY" in line
    assert "quantum-trader kill off" in line
    assert key not in log_trap.text()
    assert secret not in log_trap.text()


@pytest.mark.parametrize(
    ("request_", "rule"),
    [
        (buy(qty="0.00009"), "LOT_SIZE"),
        (buy(qty="0.001"), "MIN_NOTIONAL"),  # 3 USDT, the market needs 5
        (buy(order_type="LIMIT", price=Decimal("0.001")), "PRICE_FILTER"),
        (buy(symbol="DOGEUSDT"), "UNKNOWN_SYMBOL"),
    ],
)
async def test_rule_violations_are_rejected_before_sending(
    make_exchange: MakeExchange, fake: FakeBinance, request_: OrderRequest, rule: str
) -> None:
    exchange = await make_exchange()
    [out] = await exchange.place_orders([request_])
    assert out.status == "REJECTED"
    assert out.reason == rule
    assert out.detail
    assert fake.calls(*NEW_ORDER) == 0


async def test_amount_and_price_are_rounded_to_the_market_before_sending(
    make_exchange: MakeExchange, fake: FakeBinance
) -> None:
    exchange = await make_exchange()
    [out] = await exchange.place_orders([buy(qty="0.12345", order_type="LIMIT", price=Decimal("2999.999"))])
    [order] = fake.placed()
    assert (order.orig_qty, order.price) == (Decimal("0.1234"), Decimal("2999.99"))
    assert out.status == "FILLED"
    assert out.avg_price == Decimal("2999.99")


async def test_partial_limit_order_is_tracked_until_filled(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    fake.limit_fill = Decimal("0.5")
    fake.fill_rest_after_queries = 2
    exchange = await make_exchange(exchange_order_wait_s=5)
    [out] = await exchange.place_orders([buy(order_type="LIMIT", price=Decimal("2999.5"))])
    assert out.status == "FILLED"
    assert out.reason == ""
    assert out.filled_qty == Decimal("0.1")
    assert out.fee == Decimal("0.0001")
    assert fake.placed()[0].status == "FILLED"


async def test_partial_limit_order_is_cancelled_after_the_wait_and_says_so(
    make_exchange: MakeExchange, fake: FakeBinance
) -> None:
    fake.limit_fill = Decimal("0.5")
    exchange = await make_exchange(exchange_order_wait_s=0.2)
    [out] = await exchange.place_orders([buy(order_type="LIMIT", price=Decimal("2999.5"))])
    assert out.status == "FILLED"
    assert out.reason == "PARTIAL_FILL"
    assert out.detail.startswith("filled 0.05 of 0.1; the rest is canceled")
    assert out.filled_qty == Decimal("0.05")
    assert out.fee == Decimal("0.00005")
    assert fake.placed()[0].status == "CANCELED"


async def test_unfilled_limit_order_is_cancelled_and_rejected(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    fake.limit_fill = Decimal(0)
    exchange = await make_exchange(exchange_order_wait_s=0.1)
    [out] = await exchange.place_orders([buy(order_type="LIMIT", price=Decimal("2900"))])
    assert out.status == "REJECTED"
    assert out.reason == "ORDER_CANCELED"
    assert out.detail.startswith("nothing filled")
    assert fake.placed()[0].status == "CANCELED"


async def test_restart_finds_the_order_by_client_id_and_never_resends(
    r: Redis, make_exchange: MakeExchange, fake: FakeBinance
) -> None:
    first = await make_exchange()
    [placed] = await first.place_orders([buy()])
    restarted = await make_exchange()  # a new process: nothing in memory
    never_sent = "qt-ffffffffffffffffffffffffffffffff"
    found = await restarted.fetch_orders([buy().client_order_id, never_sent])
    assert list(found) == [buy().client_order_id]
    assert found[buy().client_order_id] == placed
    [again] = await restarted.place_orders([buy()])
    assert again == placed
    assert fake.calls(*NEW_ORDER) == 1


async def test_crash_between_record_and_send_sends_once(
    r: Redis, make_exchange: MakeExchange, fake: FakeBinance
) -> None:
    # The write-ahead record exists but the process died before the request left.
    await r.set(keys.exchange_sent("binance", buy().client_order_id), '{"symbol": "ETH/USDT", "at": 0}')
    exchange = await make_exchange()
    assert await exchange.fetch_orders([buy().client_order_id]) == {}
    [out] = await exchange.place_orders([buy()])
    assert out.status == "FILLED"
    assert fake.calls(*NEW_ORDER) == 1


async def test_public_and_account_endpoints(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    exchange = await make_exchange()
    assert await exchange.last_prices(["ETHUSDT", "BTC/USDT", "NOPEUSDT"]) == {
        "ETHUSDT": Decimal("3000"),
        "BTC/USDT": Decimal("60000"),
    }
    candles = await exchange.candles("ETHUSDT", "1m", limit=3)
    assert [row[4] for row in candles] == [Decimal(3000), Decimal(3001), Decimal(3002)]
    assert (await exchange.balances())["USDT"] == Decimal(10000)


async def test_markets_load_once_and_refresh_periodically(make_exchange: MakeExchange, fake: FakeBinance) -> None:
    cached = await make_exchange()
    await cached.place_orders([buy()])
    await cached.last_prices(["ETHUSDT"])
    assert fake.calls("GET", "/api/v3/exchangeInfo") == 1

    refreshing = await make_exchange(exchange_markets_refresh_s=0.001)
    fake.markets["ETHUSDT"].min_notional = Decimal(1000)  # the exchange tightens a rule
    [out] = await refreshing.place_orders([buy("qt-00000000000000000000000000000009")])
    assert out.reason == "MIN_NOTIONAL"  # the new rule applies after the refresh
    assert fake.calls("GET", "/api/v3/exchangeInfo") == 3


async def test_build_exchange_selects_ccxt_in_sandbox_mode(
    r: Redis, exchange_settings: Callable[..., Settings], fake: FakeBinance
) -> None:
    exchange = await build_exchange(r, exchange_settings(), on_auth_failure=halt_trading(r))
    try:
        assert isinstance(exchange, CcxtExchange)
        assert exchange.client.isSandboxModeEnabled
        assert exchange.client.urls["api"]["private"] == f"{fake.url}/api/v3"
        assert API_KEY not in repr(exchange)
    finally:
        await exchange.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secrets_file": None}, "set QT_SECRETS_FILE"),
        ({"mode": "paper"}, "use QT_MODE=testnet"),
        ({"exchange": "not-an-exchange"}, "not a ccxt exchange id"),
    ],
)
async def test_misconfiguration_stops_start_up_with_the_fix(
    r: Redis, exchange_settings: Callable[..., Settings], overrides: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        await build_exchange(r, exchange_settings(**overrides), on_auth_failure=halt_trading(r))


async def test_ccxt_debug_logging_never_shows_the_key(make_exchange: MakeExchange, log_trap: LogTrap) -> None:
    exchange = await make_exchange()
    await exchange.balances()  # a signed request: ccxt logs its headers at debug level
    ccxt_lines = [line for line in log_trap.stdlib.getvalue().splitlines() if line.startswith("ccxt")]
    assert any("/api/v3/account" in line for line in ccxt_lines)  # the request was logged...
    assert any("X-MBX-APIKEY" in line for line in ccxt_lines)  # ...with its headers...
    assert API_KEY not in log_trap.text()  # ...but not the key
    assert "signature=" not in log_trap.text()


async def test_a_real_exchange_is_never_built_without_a_way_to_halt_trading(
    r: Redis, exchange_settings: Callable[..., Settings], fake: FakeBinance
) -> None:
    with pytest.raises(TypeError, match="needs on_auth_failure"):
        await build_exchange(r, exchange_settings())
    assert fake.calls("GET", "/api/v3/exchangeInfo") == 0


async def test_an_auth_failure_calls_the_injected_hook_with_the_scrubbed_error(
    r: Redis, exchange_settings: Callable[..., Settings], log_trap: LogTrap
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    seen: list[str] = []

    async def hook(error: str) -> None:
        seen.append(error)

    creds = Credentials(api_key=SecretStr("not-the-key-0000000000000000"), secret=SecretStr(API_SECRET))
    exchange = CcxtExchange(r, CcxtConfig.from_settings(exchange_settings()), creds, on_auth_failure=hook)
    try:
        await exchange.start()
        [out] = await exchange.place_orders([buy()])
    finally:
        await exchange.close()
    assert out.status == "FAILED"
    [error] = seen
    assert "-2015" in error
    assert "not-the-key-0000000000000000" not in error
    assert await r.get(keys.KILL_SWITCH) == "0"  # the adapter itself never touches the switch
    [line] = log_trap.lines("exchange_auth_failed")
    assert json.loads(line)["kill_switch"] == "on"  # the hook returned: trading is halted
