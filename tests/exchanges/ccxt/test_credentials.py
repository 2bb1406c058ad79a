"""The secrets file: names, values hidden, the fix for each problem; no server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.ccxt.credentials import Credentials, credential_names, load_credentials
from tests.exchanges.conftest import LogTrap, write_secrets


def test_credential_names_follow_the_exchange_id() -> None:
    assert credential_names("binance") == ("BINANCE_API_KEY", "BINANCE_API_SECRET", "BINANCE_API_PASSWORD")
    assert credential_names("binanceusdm")[0] == "BINANCEUSDM_API_KEY"


def test_load_credentials_reads_the_file_and_hides_values(tmp_path: Path) -> None:
    creds = load_credentials(write_secrets(tmp_path / "s.env", "K" * 20, "S" * 20), "binance")
    assert creds.api_key.get_secret_value() == "K" * 20
    assert "K" * 20 not in repr(creds)
    assert "S" * 20 not in repr(creds)
    assert isinstance(creds, Credentials)


def test_load_credentials_only_warns_in_paper_mode_when_others_can_read_the_file(
    tmp_path: Path, log_trap: LogTrap
) -> None:
    path = write_secrets(tmp_path / "s.env", mode=0o644)
    load_credentials(path, "binance", "paper")  # testnet and live refuse it: test_ccxt_secrets.py
    [line] = log_trap.lines("secrets_file_world_readable")
    assert f"chmod 0640 {path}" in line


def test_load_credentials_errors_say_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINANCE_API_KEY", "from-the-environment")
    with pytest.raises(ConfigError, match=r"not read from the environment.*QT_SECRETS_FILE"):
        load_credentials(None, "binance")
    with pytest.raises(ConfigError, match="does not exist"):
        load_credentials(tmp_path / "missing.env", "binance")
    empty = tmp_path / "empty.env"
    empty.write_text("OTHER=1\n", encoding="utf-8")
    empty.chmod(0o640)
    with pytest.raises(ConfigError, match="has no BINANCE_API_KEY or BINANCE_API_SECRET"):
        load_credentials(empty, "binance")
    if os.getuid() != 0:  # root reads any file
        unreadable = write_secrets(tmp_path / "locked.env", mode=0o000)
        with pytest.raises(ConfigError, match="chmod 0640"):
            load_credentials(unreadable, "binance")


def test_a_secrets_file_the_reader_refuses_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "s.env"
    path.write_bytes(b"BINANCE_API_KEY=k\nBINANCE_API_SECRET=caf\xe9\n")
    path.chmod(0o640)
    with pytest.raises(ConfigError, match=rf"^secrets file {path}, line 2: byte 0xe9 at column 23 is not UTF-8"):
        load_credentials(path, "binance")
    path.write_text("; Binance spot testnet\nBINANCE_API_KEY=k\nBINANCE_API_SECRET=s\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^secrets file {path}, line 1: start comments with '#'"):
        load_credentials(path, "binance")
