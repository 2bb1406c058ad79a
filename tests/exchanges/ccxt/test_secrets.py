"""Secrets stay secret on the way to a real exchange.

A secrets file other users can open stops testnet and live start-up with the fix; what
the exchange echoes back (the signed request, the key header) reaches neither a result's
detail nor a log line; ccxt's own debug lines of a signed order show no body or key.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.base import OrderRequest
from quantum_trader.exchanges.ccxt import CcxtExchange
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.execution import Execution
from quantum_trader.router import Router
from quantum_trader.runner import halt_trading
from quantum_trader.settings import LIVE_CONFIRMATION, Settings
from tests.exchanges.conftest import LogTrap, write_secrets
from tests.exchanges.fake_binance import API_KEY, API_SECRET, FakeBinance
from tests.pipeline import decision, drain, results

MakeExchange = Callable[..., Any]
HEX64 = re.compile(r"[0-9a-f]{64}")


def buy(coid: str = "qt-00000000000000000000000000000001") -> OrderRequest:
    return OrderRequest(
        client_order_id=coid, symbol="ETHUSDT", side="BUY", qty=Decimal("0.1"), reference_price=Decimal(3000)
    )


@pytest.mark.parametrize("bits", [0o644, 0o604, 0o660, 0o666])
@pytest.mark.parametrize("mode", ["testnet", "live"])
def test_a_secrets_file_others_can_open_stops_a_real_exchange_with_the_fix(
    r: Redis, exchange_settings: Callable[..., Settings], tmp_path: Path, bits: int, mode: str
) -> None:
    path = write_secrets(tmp_path / "testnet.env", mode=bits)
    confirm = {"live_confirm": LIVE_CONFIRMATION} if mode == "live" else {}
    settings = exchange_settings(secrets_file=path, mode=mode, **confirm)
    with pytest.raises(ConfigError) as caught:
        # What execution's start-up builds (runner.build_stage, through build_exchange).
        CcxtExchange.from_settings(r, settings, on_auth_failure=halt_trading(r))
    message = str(caught.value)
    assert f"chmod 0640 {path}" in message
    assert "chown root:" in message
    assert f"{bits:04o}" in message
    assert "\n" not in message
    assert API_KEY not in message


async def test_execution_refuses_to_start_on_a_world_readable_secrets_file(
    fake: FakeBinance, clean_url: str, tmp_path: Path
) -> None:
    path = write_secrets(tmp_path / "testnet.env", mode=0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_REDIS_URL": clean_url,
        "QT_EXCHANGE": "binance",
        "QT_MODE": "testnet",
        "QT_SECRETS_FILE": str(path),
        "QT_EXCHANGE_API_URL": fake.url,
        "QT_DURATION": "3",  # a start that should not have happened ends by itself
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quantum_trader", "execution", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 2, text[-2000:]
    [line] = text.splitlines()
    assert line.startswith(f"error: secrets file {path} is mode 0644")
    assert f"chmod 0640 {path}" in line
    assert fake.calls("GET", "/api/v3/exchangeInfo") == 0  # stopped before talking to the exchange


async def test_a_signed_request_the_exchange_echoes_reaches_neither_the_result_nor_the_log(
    r: Redis, exchange_settings: Callable[..., Settings], fake: FakeBinance, log_trap: LogTrap
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    settings = exchange_settings()
    exchange = await build_exchange(r, settings, on_auth_failure=halt_trading(r))
    try:
        fake.script("order", "echo_request")
        await r.xadd(settings.decision_stream, decision(qty="0.1"))
        await drain(Router(r, settings))
        await drain(Execution(r, settings, exchange))
    finally:
        await exchange.close()
    [res] = await results(r, settings.result_stream)
    detail = json.dumps(res)
    assert res["status"] == "REJECTED"
    assert "Illegal parameter in request" in detail  # the exchange's reason is kept...
    assert "<signed request>" in detail  # ...with the signed request taken out
    for secret in ("signature=", "timestamp=", API_KEY, API_SECRET):
        assert secret not in detail
    assert not HEX64.search(detail)
    logged = log_trap.text()
    assert "Illegal parameter in request" in logged  # ccxt logged the answer at debug level
    assert not HEX64.search(logged)
    assert "signature=" not in logged


async def test_ccxt_debug_lines_of_a_signed_order_show_neither_body_nor_key(
    make_exchange: MakeExchange, log_trap: LogTrap
) -> None:
    exchange = await make_exchange()
    [out] = await exchange.place_orders([buy()])
    assert out.status == "FILLED"
    posts = [line for line in log_trap.stdlib.getvalue().splitlines() if line.startswith("ccxt") and "POST" in line]
    assert any("Request" in line for line in posts)  # ccxt did log the signed request...
    assert any("<signed request>" in line for line in posts)  # ...its body scrubbed
    assert any("X-MBX-APIKEY" in line for line in posts)
    for line in posts:
        assert "signature=" not in line
        assert not HEX64.search(line)
        assert API_KEY not in line
