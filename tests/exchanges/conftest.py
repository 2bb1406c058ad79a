"""Fixtures for the exchange tests: the fake Binance server and a secrets file.

The log trap (``tests/conftest.py``) runs over every test of the suite, these included:
it fails a test whose logs or output show the API key, the secret or a signature.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from quantum_trader.bus.connection import Redis
from quantum_trader.exchanges.ccxt import CcxtConfig, CcxtExchange, Credentials
from quantum_trader.runner import halt_trading
from quantum_trader.settings import Settings
from tests.conftest import LogTrap as LogTrap  # the exchange tests read their logs through it
from tests.exchanges.fake_binance import API_KEY, API_SECRET, FakeBinance

# Short timeouts and back-offs keep the retry paths fast.
FAST: dict[str, Any] = {
    "exchange": "binance",
    "mode": "testnet",
    "exchange_timeout_s": 0.5,
    "exchange_retries": 3,
    "exchange_backoff_s": 0.01,
    "exchange_backoff_max_s": 0.05,
    "exchange_lookup_grace_s": 0.05,
    "exchange_order_wait_s": 0.3,
    "exchange_poll_s": 0.05,
    "block_ms": 10,
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    """A fake Binance spot API on 127.0.0.1 and a free port."""
    server = FakeBinance()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def write_secrets(path: Path, key: str = API_KEY, secret: str = API_SECRET, mode: int = 0o640) -> Path:
    """A secrets file the way the docs tell operators to write it."""
    path.write_text(f"# Binance spot testnet\nBINANCE_API_KEY={key}\nBINANCE_API_SECRET={secret}\n", encoding="utf-8")
    os.chmod(path, mode)
    return path


@pytest.fixture
def secrets_file(tmp_path: Path) -> Path:
    """A valid secrets file (mode 0640)."""
    return write_secrets(tmp_path / "testnet.env")


@pytest.fixture
def exchange_settings(
    fake: FakeBinance, secrets_file: Path, settings_for: Callable[..., Settings], clean_url: str
) -> Callable[..., Settings]:
    """Settings for the ccxt adapter pointed at the fake server."""

    def make(**overrides: Any) -> Settings:
        values = FAST | {"secrets_file": secrets_file, "exchange_api_url": fake.url} | overrides
        return settings_for(clean_url, **values)

    return make


@pytest.fixture
async def make_exchange(r: Redis, exchange_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """Build started adapters (closed at the end); ``credentials=`` overrides the secrets file.

    Wired as the runner wires execution's: an authentication failure turns the kill switch on.
    """
    built: list[CcxtExchange] = []

    async def make(credentials: Credentials | None = None, **overrides: Any) -> CcxtExchange:
        settings = exchange_settings(**overrides)
        exchange = (
            CcxtExchange(r, CcxtConfig.from_settings(settings), credentials, on_auth_failure=halt_trading(r))
            if credentials is not None
            else CcxtExchange.from_settings(r, settings, on_auth_failure=halt_trading(r))
        )
        built.append(exchange)
        await exchange.start()
        return exchange

    yield make
    for exchange in built:
        await exchange.close()
