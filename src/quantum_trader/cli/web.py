"""``quantum-trader web``: the dashboard and its JSON API, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio

import typer

from quantum_trader import runner
from quantum_trader.bus.connection import Redis
from quantum_trader.cli.common import configured, with_redis


def web(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default: QT_WEB_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port to listen on (default: QT_WEB_PORT, 8080)."
    ),
) -> None:
    """Serve the dashboard (/) and the JSON API (/api, schema at /api/openapi.json) on the pipeline's server.

    Reading is open; the controls (kill switch, trading state, dead-letter replay) need
    QT_WEB_TOKEN from the secrets file. Beyond loopback it does not start without one.
    """
    # The web package (FastAPI, uvicorn) loads only for this command, not for every other one.
    from quantum_trader.web.auth import load_token
    from quantum_trader.web.server import check_bind, serve_web

    changes = {name: value for name, value in (("web_host", host), ("web_port", port)) if value is not None}
    settings = configured().with_changes(**changes) if changes else configured()
    # Refused before the server (or the embedded one) is touched.
    check_bind(settings.web_host, load_token(settings.secrets_file, settings.mode))

    async def serve(redis: Redis) -> None:
        stop = asyncio.Event()
        runner.install_signal_handlers(stop)
        await serve_web(redis, settings, stop)

    with_redis(settings, serve)


def register(app: typer.Typer) -> None:
    """Add ``web`` to the main CLI."""
    app.command("web")(web)
