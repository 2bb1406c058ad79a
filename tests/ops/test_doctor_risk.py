"""doctor on the risk settings and the trading state: real money with no loss breaker or no throttle,
a throttle above the exchange's documented rate, and trading that is not ACTIVE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal

from quantum_trader import keys, trading
from quantum_trader.bus.connection import Redis
from quantum_trader.events import TradingState
from quantum_trader.ops.doctor import (
    check_loss_limits,
    check_order_rate,
    check_trading_state,
    exchange_rate_limit,
    failed,
    run_checks,
)
from quantum_trader.risk import StateRecord
from quantum_trader.settings import LIVE_CONFIRMATION, Settings


def test_no_loss_limit_fails_live_warns_testnet_and_passes_paper() -> None:
    live = check_loss_limits("live", None, None)
    assert live.verdict == "FAIL"
    assert "neither QT_DAILY_LOSS_LIMIT nor QT_MAX_DRAWDOWN_PCT is set" in live.detail
    assert live.fix.startswith("set QT_DAILY_LOSS_LIMIT")
    assert check_loss_limits("testnet", None, None).verdict == "WARN"
    assert check_loss_limits("paper", None, None).verdict == "PASS"
    assert check_loss_limits("live", Decimal("500"), None).verdict == "PASS"
    drawdown = check_loss_limits("live", None, Decimal("10"))
    assert (drawdown.verdict, drawdown.detail) == ("PASS", "QT_MAX_DRAWDOWN_PCT=10")


def test_the_exchanges_rate_comes_from_its_ccxt_class_without_a_request() -> None:
    assert exchange_rate_limit("binance") == 20  # rateLimit 50 ms between requests
    assert exchange_rate_limit("kraken") == 1  # rateLimit 1000 ms
    assert exchange_rate_limit("paper") is None
    assert exchange_rate_limit("no-such-exchange") is None


def test_a_throttle_above_the_exchanges_rate_warns_and_names_the_rate() -> None:
    over = check_order_rate("live", "binance", 100, 20.0)
    assert over.verdict == "WARN"
    assert over.detail.startswith("QT_MAX_ORDERS_PER_S=100 is above binance's documented 20 requests/s")
    assert over.fix == "set QT_MAX_ORDERS_PER_S=20 or lower"
    assert check_order_rate("testnet", "binance", 20, 20.0).verdict == "PASS"
    assert check_order_rate("paper", "paper", 100_000, None).verdict == "PASS"  # the paper exchange has no limit


def test_no_throttle_at_all_fails_live_warns_testnet_and_passes_paper() -> None:
    off = check_order_rate("live", "binance", None, 20.0)
    assert off.verdict == "FAIL"
    assert off.detail.startswith("off in mode live (QT_MAX_ORDERS_PER_S=0)")
    assert off.fix == "set QT_MAX_ORDERS_PER_S (at most 20 on binance)"
    assert check_order_rate("testnet", "binance", None, 20.0).verdict == "WARN"
    assert check_order_rate("paper", "paper", None, None).verdict == "PASS"


def test_a_state_other_than_active_says_which_why_and_how_to_resume() -> None:
    assert check_trading_state(StateRecord()).verdict == "PASS"
    halted = check_trading_state(
        StateRecord(
            state=TradingState.HALTED,
            reason="OPERATOR",
            detail="exchange maintenance",
            by="alice",
            at="2026-01-01T10:00:00Z",
        )
    )
    assert halted.verdict == "WARN"
    assert halted.detail == (
        "HALTED (no order passes): OPERATOR: exchange maintenance; set by alice at 2026-01-01T10:00:00Z"
    )
    assert halted.fix == "quantum-trader state active --reason '<why trading may resume>'"
    tripped = check_trading_state(
        StateRecord(
            state=TradingState.REDUCING,
            reason="DAILY_LOSS",
            detail="DAILY_LOSS: realised -60 USDT",
            by="execution-1",
            at="2026-01-01T10:00:00Z",
            until="2026-01-02T00:00:00Z",
        )
    )
    assert tripped.verdict == "WARN"
    assert tripped.detail.startswith("REDUCING (only orders that reduce a position pass): DAILY_LOSS")
    assert tripped.detail.endswith("; ends by itself at 2026-01-02T00:00:00Z")


async def test_doctor_reads_the_trading_state_from_the_server(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url)
    rows = {check.name: check for check in await run_checks(r, settings)}
    assert rows["trading state"].verdict == "PASS"

    await trading.set_state(r, settings, TradingState.HALTED, "exchange maintenance", "alice")
    rows = {check.name: check for check in await run_checks(r, settings)}
    assert rows["trading state"].verdict == "WARN"
    assert rows["trading state"].detail.startswith(
        "HALTED (no order passes): OPERATOR: exchange maintenance; set by alice at "
    )
    assert rows["trading state"].fix.startswith("quantum-trader state active --reason")

    await r.delete(keys.TRADING_STATE)
    await r.set(keys.TRADING_STATE, "ACTIVE")  # another type: the gate treats it as HALTED, and so does doctor
    rows = {check.name: check for check in await run_checks(r, settings)}
    assert rows["trading state"].verdict == "WARN"
    assert "is a string, not a hash" in rows["trading state"].detail


async def test_live_settings_without_loss_limit_or_throttle_fail_the_doctor(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(
        clean_url, mode="live", live_confirm=LIVE_CONFIRMATION, exchange="binance", max_orders_per_s=0
    )
    checks = await run_checks(r, settings)
    rows = {check.name: check for check in checks}
    assert (rows["loss limits"].verdict, rows["order throttle"].verdict) == ("FAIL", "FAIL")
    assert failed(checks)
    guarded = settings.with_changes(daily_loss_limit=Decimal("500"), max_orders_per_s=None)  # the live default: 10/s
    rows = {check.name: check for check in await run_checks(r, guarded)}
    assert (rows["loss limits"].verdict, rows["order throttle"].verdict) == ("PASS", "PASS")
    assert rows["order throttle"].detail == "QT_MAX_ORDERS_PER_S=10 (within binance's 20 requests/s)"


def test_the_command_flags_live_binance_settings_from_the_environment(clean_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_REDIS_URL": clean_url,
        "QT_MODE": "live",
        "QT_LIVE_CONFIRM": LIVE_CONFIRMATION,
        "QT_EXCHANGE": "binance",
        "QT_MAX_ORDERS_PER_S": "100",
    }
    done = subprocess.run([sys.executable, "-m", "quantum_trader", "doctor", "--json"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["loss limits"]["verdict"] == "FAIL"
    assert rows["order throttle"]["verdict"] == "WARN"  # 100/s against binance's 20/s
    assert "binance's documented 20 requests/s" in rows["order throttle"]["detail"]
