"""``quantum-trader web`` as an operator runs it: refuses an open bind without a token in one line,
serves on the pipeline's server, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from quantum_trader.bus.embedded import free_port
from tests.cli.test_commands import cli
from tests.web.conftest import AUTH, TOKEN


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--host", "0.0.0.0"], {}), ([], {"QT_WEB_HOST": "0.0.0.0"}), (["--host", "192.168.1.10"], {})],
    ids=["option", "setting", "lan-address"],
)
def test_a_non_loopback_bind_without_a_token_is_refused_in_one_line(
    clean_url: str, args: list[str], env: dict[str, str]
) -> None:
    done = cli(clean_url, "web", *args, **env)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("error: refusing to serve the web API on ")
    assert "QT_WEB_TOKEN" in line
    assert "QT_SECRETS_FILE" in line


def test_web_serves_the_api_and_stops_on_sigterm(clean_url: str, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"QT_WEB_TOKEN={TOKEN}\n")
    secrets.chmod(0o600)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env |= {"QT_REDIS_URL": clean_url, "QT_LOG_FORMAT": "json", "QT_SECRETS_FILE": str(secrets)}
    env |= {"QT_DATA_DIR": str(tmp_path / "data")}
    process = subprocess.Popen(
        [sys.executable, "-m", "quantum_trader", "web", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{url}/api/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "the web server did not answer within 30 s"
                time.sleep(0.1)
        assert health.json() == {"ok": True}
        assert httpx.get(f"{url}/api/trades", timeout=10).json() == []
        assert httpx.post(f"{url}/api/kill-switch", json={"on": True}, headers=AUTH, timeout=5).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert '"web_serving"' in err
    assert '"web_stopped"' in err
