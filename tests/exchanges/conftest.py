"""Fixtures for the exchange tests: the fake Binance server, a secrets file, and a log trap.

Every test in this folder captures what it logs (structlog, stdlib logging, and the
process's own stdout/stderr) and fails if the API key or secret shows up in any of it.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from quantum_trader import logs
from quantum_trader.bus.connection import Redis
from quantum_trader.exchanges.ccxt_exchange import CcxtExchange, Credentials
from quantum_trader.settings import Settings
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
    """Build started adapters (closed at the end); ``credentials=`` overrides the secrets file."""
    built: list[CcxtExchange] = []

    async def make(credentials: Credentials | None = None, **overrides: Any) -> CcxtExchange:
        settings = exchange_settings(**overrides)
        exchange = (
            CcxtExchange(r, settings, credentials)
            if credentials is not None
            else CcxtExchange.from_settings(r, settings)
        )
        built.append(exchange)
        await exchange.start()
        return exchange

    yield make
    for exchange in built:
        await exchange.close()


class LogTrap:
    """Everything logged during one test."""

    def __init__(self) -> None:
        self.structured = io.StringIO()
        self.stdlib = io.StringIO()

    def text(self) -> str:
        """All captured log text so far (structlog and stdlib logging, every test phase)."""
        return self.structured.getvalue() + self.stdlib.getvalue()

    def lines(self, event: str) -> list[str]:
        """Captured lines that mention ``event``."""
        return [line for line in self.text().splitlines() if event in line]


@pytest.fixture(autouse=True)
def log_trap(capfd: pytest.CaptureFixture[str]) -> Iterator[LogTrap]:
    """Capture every log line of the test, at debug level; afterwards, assert no credential appears in any."""
    trap = LogTrap()
    saved = (logs._Outcomes.out, logs._Outcomes.json, logs._Outcomes.enabled)
    logs.configure("debug", "json", trap.structured)
    root = logging.getLogger()
    handler = logging.StreamHandler(trap.stdlib)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # ccxt logs request headers at debug: the level where a key would leak
    try:
        yield trap
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        structlog.reset_defaults()
        logs._Outcomes.out, logs._Outcomes.json, logs._Outcomes.enabled = saved
    out, err = capfd.readouterr()
    everything = trap.text() + out + err
    for secret in (API_KEY, API_SECRET):
        assert secret not in everything, "a credential leaked into the logs"
