"""Secrets and signed requests out of messages: pure, no server."""

from __future__ import annotations

from quantum_trader.exchanges.ccxt.scrub import scrub


def test_scrub_hides_secrets_and_signed_query_strings() -> None:
    text = "binance GET http://h/api/v3/order?symbol=ETHUSDT&timestamp=1&signature=abc 401 key=SEKRETKEY"
    clean = scrub(text, ["SEKRETKEY", ""])
    assert "SEKRETKEY" not in clean
    assert "signature" not in clean
    assert "http://h/api/v3/order?…" in clean
