"""Venue settings of the ccxt client: pure, no server."""

from __future__ import annotations

from quantum_trader.exchanges.ccxt.config import override_origin


def test_override_origin_replaces_only_scheme_and_host() -> None:
    urls = {"public": "https://testnet.binance.vision/api/v3", "nested": {"v1": "https://x.y/api/v1"}, "n": None}
    out = override_origin(urls, "http://127.0.0.1:9/")
    assert out == {"public": "http://127.0.0.1:9/api/v3", "nested": {"v1": "http://127.0.0.1:9/api/v1"}, "n": None}
