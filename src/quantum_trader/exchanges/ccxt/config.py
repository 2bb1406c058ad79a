"""What the ccxt adapter is told: which exchange, in which mode, and each venue's quirks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]

from quantum_trader.errors import ConfigError
from quantum_trader.settings import Mode, Settings


@dataclass(frozen=True, slots=True, kw_only=True)
class CcxtConfig:
    """The settings the ccxt adapter reads, and nothing else (``from_settings`` says which)."""

    exchange: str  # ccxt id (QT_EXCHANGE)
    mode: Mode  # testnet: ccxt's sandbox URLs
    secrets_file: Path | None  # where the API key and secret are (named in the fix of an auth failure)
    api_url: str  # replaces scheme://host:port of every REST URL; "" keeps ccxt's
    timeout_s: float  # one HTTP request
    retries: int  # of a transient error
    backoff_s: float  # first retry delay (doubles, with jitter)
    backoff_max_s: float
    lookup_grace_s: float  # "not found" is believed only when still true after this
    order_wait_s: float  # an open order is tracked this long, then what is left is cancelled
    poll_s: float  # between two looks at an open order
    markets_refresh_s: float  # the markets' rules are reloaded when older
    concurrency: int  # orders of one adapter in flight at once

    @classmethod
    def from_settings(cls, settings: Settings) -> CcxtConfig:
        """The adapter's view of ``settings``."""
        return cls(
            exchange=settings.exchange,
            mode=settings.mode,
            secrets_file=settings.secrets_file,
            api_url=settings.exchange_api_url,
            timeout_s=settings.exchange_timeout_s,
            retries=settings.exchange_retries,
            backoff_s=settings.exchange_backoff_s,
            backoff_max_s=settings.exchange_backoff_max_s,
            lookup_grace_s=settings.exchange_lookup_grace_s,
            order_wait_s=settings.exchange_order_wait_s,
            poll_s=settings.exchange_poll_s,
            markets_refresh_s=settings.exchange_markets_refresh_s,
            concurrency=settings.exchange_concurrency,
        )


def check_config(config: CcxtConfig) -> None:
    """ConfigError unless the config names a ccxt exchange and a mode that trades on it."""
    if config.exchange not in ccxt_async.exchanges:
        raise ConfigError(
            f"QT_EXCHANGE={config.exchange!r} is not a ccxt exchange id (e.g. binance, kraken, okx) nor 'paper'"
        )
    if config.mode == "paper":
        raise ConfigError(
            f"QT_EXCHANGE={config.exchange} sends real orders; use QT_MODE=testnet (or QT_EXCHANGE=paper)"
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
