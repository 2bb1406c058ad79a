"""What the ccxt adapter is told: which exchange, in which mode, and each venue's quirks."""

from __future__ import annotations

import re
from typing import Any

import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]

from quantum_trader.errors import ConfigError
from quantum_trader.settings import Settings


def check_settings(settings: Settings) -> None:
    """ConfigError unless the settings name a ccxt exchange and a mode that trades on it."""
    if settings.exchange not in ccxt_async.exchanges:
        raise ConfigError(
            f"QT_EXCHANGE={settings.exchange!r} is not a ccxt exchange id (e.g. binance, kraken, okx) nor 'paper'"
        )
    if settings.mode == "paper":
        raise ConfigError(
            f"QT_EXCHANGE={settings.exchange} sends real orders; use QT_MODE=testnet (or QT_EXCHANGE=paper)"
        )


def ccxt_options(exchange: str) -> dict[str, Any]:
    """ccxt options that keep Binance to the spot endpoints we serve and test against."""
    if exchange == "binance":
        return {
            "defaultType": "spot",
            "fetchCurrencies": False,  # private sapi call, not on the spot testnet
            "fetchMargins": False,
            "fetchMarkets": {"types": ["spot"]},
        }
    return {"defaultType": "spot"}


def client_order_id_params(exchange: str) -> tuple[str, str]:
    """The request parameters that carry our client order id: (to look an order up, to place one)."""
    if exchange.startswith("binance"):
        return "origClientOrderId", "newClientOrderId"
    return "clientOrderId", "clientOrderId"


def override_origin(urls: Any, base: str) -> Any:
    """``urls`` (ccxt's ``urls['api']``: a str or nested dict) with scheme://host:port replaced by ``base``."""
    if isinstance(urls, str):
        match = re.match(r"^[a-z]+://[^/]+", urls)
        return base.rstrip("/") + urls[match.end() :] if match else urls
    if isinstance(urls, dict):
        return {key: override_origin(value, base) for key, value in urls.items()}
    return urls
