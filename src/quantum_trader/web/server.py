"""Serving the web app inside an asyncio program: ``quantum-trader web``, and ``run`` with QT_RUN_WEB.

``serve_web`` runs uvicorn on the caller's loop and Redis client until the caller's ``stop``
event is set; the caller owns the signals (uvicorn's own handlers are left out, so SIGTERM
stops the stages and the server together). The socket is bound before uvicorn starts, so a
port in use is one line naming the setting, not uvicorn's exit.

Binding beyond loopback without ``QT_WEB_TOKEN`` is refused: reading is open to whoever
reaches the port, and the controls would be off anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Generator
from typing import TYPE_CHECKING

import uvicorn
from pydantic import SecretStr

from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError, QuantumTraderError

if TYPE_CHECKING:
    from quantum_trader.metrics import Metrics
from quantum_trader.logs import get_logger
from quantum_trader.settings import Settings
from quantum_trader.web.app import create_app
from quantum_trader.web.auth import TOKEN_NAME, load_token

log = get_logger("web")

GRACE_S = 3  # an open event stream must not hold a shutdown longer than this


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ::1); a name that is not resolved is not."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: SecretStr | None) -> None:
    """Refuse (``ConfigError``, one line) to listen beyond loopback with no token configured."""
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the web API on {host or 'every address'}, which is not loopback, without "
            f"{TOKEN_NAME}: add {TOKEN_NAME}=... to the secrets file (QT_SECRETS_FILE), or listen on 127.0.0.1 "
            "(--host / QT_WEB_HOST)"
        )


def url_of(host: str, port: int) -> str:
    """``http://host:port`` (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"


async def serve_web(redis: Redis, settings: Settings, stop: asyncio.Event, metrics: Metrics | None = None) -> None:
    """Serve the dashboard and API on QT_WEB_HOST:QT_WEB_PORT until ``stop`` is set.

    The token is read from the secrets file here. Raises ``ConfigError`` (one line) for a refused
    bind, a bad secrets file or an address that cannot be listened on; requests in flight when
    ``stop`` is set get ``GRACE_S`` seconds to finish.
    """
    token = load_token(settings.secrets_file, settings.mode)
    check_bind(settings.web_host, token)
    listener = _listen(settings.web_host, settings.web_port)
    url = url_of(settings.web_host, settings.web_port)
    config = uvicorn.Config(
        create_app(redis, settings, token, metrics),
        log_config=None,  # the product's logging stays as configured
        access_log=False,
        proxy_headers=False,  # the audit log names the real peer, never a forwarded header anyone can send
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACE_S,
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    stopping = asyncio.create_task(stop.wait())
    log.info(
        "web_serving", url=url, api=f"{url}/api/openapi.json", controls="on" if token else f"off (no {TOKEN_NAME})"
    )
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        try:
            await serving
        except SystemExit:  # uvicorn's answer to a failed start-up
            raise QuantumTraderError(f"the web server on {url} failed to start; see the log lines before") from None
        finally:
            listener.close()
    if not stop.is_set():
        raise QuantumTraderError(f"the web server on {url} stopped by itself; see the log lines before")
    log.info("web_stopped", url=url)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the caller's ``stop`` event ends it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host``:``port`` (uvicorn listens on it); ConfigError naming the settings."""
    fix = "choose another --port / QT_WEB_PORT, or --host / QT_WEB_HOST"
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: {exc.strerror}; {fix}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {url_of(host, port)}: {exc.strerror or exc}; {fix}") from None
    return sock
