"""The log trap of ``tests/conftest.py``: every test runs inside it, at debug level.

It must recognise each kind of secret a log line could carry, and only those, or it
would either let a leak through or fail tests that redact correctly.
"""

from __future__ import annotations

import logging

import pytest
import redis

from quantum_trader.logs import get_logger
from tests.conftest import EXTERNAL_URL, TEST_SECRETS, LogTrap, leaks
from tests.exchanges.fake_binance import API_KEY, API_SECRET

SIGNATURE = "9f" * 32


@pytest.mark.parametrize(
    "line",
    [
        f"exchange_ready api_key={API_KEY}",
        f"error=binance {{'msg': 'bad secret {API_SECRET}'}}",
        "cannot reach Redis at redis://:hunter2@127.0.0.1:6379/0",
        "QT_REDIS_URL='http://user:hunter2@host/0'",
        f"RequestBody: timestamp=1700000000000&symbol=ETHUSDT&signature={SIGNATURE}",
        f'{{"signature": "{SIGNATURE}"}}',
    ],
)
def test_the_trap_recognises_every_kind_of_secret(line: str) -> None:
    assert leaks(f"first line\n{line}\nlast line") != []
    assert leaks(line)[0].startswith("line 1: ")
    assert "hunter2" not in " ".join(leaks(line))  # the report never repeats the secret


@pytest.mark.parametrize(
    "line",
    [
        "cannot reach Redis at redis://:***@127.0.0.1:6379/0",
        "unix:///tmp/qt-0-0123456789abcdef/valkey.sock",
        "RequestBody: <signed request>",
        "Signature for this request is not valid. signature=***",
        "exchange_ready api_key=***",
        "dedup key sha256 " + "ab" * 32,  # a fingerprint is not a signature
    ],
)
def test_the_trap_lets_redacted_lines_through(line: str) -> None:
    assert leaks(line) == []


def test_the_session_servers_password_is_a_known_secret(server_url: str) -> None:
    if EXTERNAL_URL:
        pytest.skip("an external server's password is the operator's")
    password = redis.connection.parse_url(server_url)["password"]
    assert password  # TCP is never open without one
    assert password in TEST_SECRETS
    assert leaks(f"connected with {password}") != []


def test_debug_lines_of_the_product_and_of_libraries_are_captured(log_trap: LogTrap) -> None:
    get_logger("probe").debug("probe_structured", value=1)
    logging.getLogger("some.library").debug("probe_stdlib")
    assert log_trap.lines("probe_structured")
    assert log_trap.lines("probe_stdlib")


def test_the_products_own_logs_redact_a_url_password_that_slipped_into_a_value(log_trap: LogTrap) -> None:
    get_logger("probe").warning("reconnecting", error="Error connecting to redis://:pw-slipped@h:1/0")
    [line] = log_trap.lines("reconnecting")
    assert "pw-slipped" not in line
    assert "redis://:***@h:1/0" in line
