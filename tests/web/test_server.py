"""``serve_web`` over a real socket: serves until its stop event, refuses an open bind without a token,
and a port in use is one line naming the setting."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.embedded import free_port
from quantum_trader.errors import ConfigError
from quantum_trader.settings import Settings
from quantum_trader.web.server import check_bind, is_loopback, serve_web, url_of
from tests.conftest import LogTrap
from tests.web.conftest import AUTH, TOKEN


def with_token(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.env"
    path.write_text(f"QT_WEB_TOKEN={TOKEN}\n")
    path.chmod(0o600)
    return path


async def until_up(url: str) -> httpx.Response:
    """The first answer of the health endpoint (within 10 s)."""
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                return await client.get(f"{url}/api/health")
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise AssertionError(f"nothing answered at {url}")


async def test_serve_web_serves_until_stop_is_set(
    r: Redis, web_settings: Callable[..., Settings], tmp_path: Path, log_trap: LogTrap
) -> None:
    port = free_port()
    settings = web_settings(web_port=port, secrets_file=with_token(tmp_path))
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_web(r, settings, stop))
    url = f"http://127.0.0.1:{port}"
    try:
        assert (await until_up(url)).json() == {"ok": True}
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/api/status")).status_code == 200
            engaged = await client.post("/api/kill-switch", json={"on": True}, headers=AUTH)
            assert engaged.status_code == 200
            assert (await client.get("/")).status_code == 200  # the page is served alongside
        assert await r.get(keys.KILL_SWITCH) == "1"
        [line] = [json.loads(text) for text in log_trap.lines('"web_auth"')]
        assert (line["outcome"], line["source"]) == ("accepted", "127.0.0.1")  # the real peer over TCP
        [started] = [json.loads(text) for text in log_trap.lines('"web_serving"')]
        assert (started["url"], started["controls"]) == (url, "on")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


async def test_serve_web_refuses_a_non_loopback_bind_without_a_token(
    r: Redis, web_settings: Callable[..., Settings]
) -> None:
    port = free_port()
    with pytest.raises(ConfigError, match=r"0\.0\.0\.0, which is not loopback, without QT_WEB_TOKEN"):
        await asyncio.wait_for(serve_web(r, web_settings(web_host="0.0.0.0", web_port=port), asyncio.Event()), 10)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


async def test_a_port_in_use_is_one_line_naming_the_setting(r: Redis, web_settings: Callable[..., Settings]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on http://127.0.0.1:{port}: .*QT_WEB_PORT"):
            await asyncio.wait_for(serve_web(r, web_settings(web_port=port), asyncio.Event()), 10)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_loopback_is_told_from_everything_else(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        check_bind(host, None)
    else:
        check_bind(host, SecretStr(TOKEN))
        with pytest.raises(ConfigError):
            check_bind(host, None)


def test_urls_bracket_ipv6() -> None:
    assert url_of("::1", 8080) == "http://[::1]:8080"
    assert url_of("127.0.0.1", 80) == "http://127.0.0.1:80"
