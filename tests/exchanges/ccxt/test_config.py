"""Venue settings of the ccxt client: pure, no server."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.ccxt.config import CcxtConfig, check_config, override_origin
from quantum_trader.settings import Settings


def test_override_origin_replaces_only_scheme_and_host() -> None:
    urls = {"public": "https://testnet.binance.vision/api/v3", "nested": {"v1": "https://x.y/api/v1"}, "n": None}
    out = override_origin(urls, "http://127.0.0.1:9/")
    assert out == {"public": "http://127.0.0.1:9/api/v3", "nested": {"v1": "http://127.0.0.1:9/api/v1"}, "n": None}


def test_the_adapter_reads_only_its_own_settings_and_cannot_change_them(tmp_path: Path) -> None:
    settings = Settings(
        exchange="binance",
        mode="testnet",
        secrets_file=tmp_path / "testnet.env",
        exchange_api_url="http://127.0.0.1:9",
        exchange_retries=7,
        exchange_concurrency=3,
    )
    config = CcxtConfig.from_settings(settings)
    assert (config.exchange, config.mode, config.secrets_file) == ("binance", "testnet", tmp_path / "testnet.env")
    assert (config.api_url, config.retries, config.concurrency) == ("http://127.0.0.1:9", 7, 3)
    assert config.timeout_s == settings.exchange_timeout_s
    assert config.markets_refresh_s == settings.exchange_markets_refresh_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.retries = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"exchange": "not-an-exchange"}, "not a ccxt exchange id"), ({"mode": "paper"}, "use QT_MODE=testnet")],
)
def test_a_config_that_cannot_trade_is_refused_with_the_fix(changes: dict[str, Any], message: str) -> None:
    config = CcxtConfig.from_settings(Settings(exchange="binance", mode="testnet"))
    check_config(config)
    with pytest.raises(ConfigError, match=message):
        check_config(dataclasses.replace(config, **changes))
