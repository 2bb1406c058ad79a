"""The web application: the JSON API (``api``), the live page and its event stream (``live``), the static files.

``create_app`` builds it around one Redis client; the caller (``quantum-trader web``, or ``run``
with QT_RUN_WEB) owns the client and the server. Reading is open (the server binds to loopback
by default); every state-changing endpoint needs the bearer token from the secrets file.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from pydantic import SecretStr

from quantum_trader import __version__
from quantum_trader.bus.connection import Redis
from quantum_trader.metrics import Metrics
from quantum_trader.metrics import asgi_app as metrics_app
from quantum_trader.settings import Settings

STATIC = Path(str(files("quantum_trader.web").joinpath("static")))


def create_app(redis: Redis, settings: Settings, token: SecretStr | None, metrics: Metrics | None = None) -> FastAPI:
    """The application: API under ``/api``, the page at ``/``, static files under ``/static``, Prometheus
    metrics under ``/metrics`` (the server's state at each scrape, and ``metrics``' counters when given:
    those of the process the web server runs in)."""
    from quantum_trader.web import api, live  # the routes, each in its own module

    # No interactive docs page: it loads its scripts from a CDN, and the machine may be offline.
    app = FastAPI(
        title="Quantum Trader", version=__version__, docs_url=None, redoc_url=None, openapi_url="/api/openapi.json"
    )
    app.state.redis = redis
    app.state.settings = settings
    app.state.token = token
    app.include_router(api.router, prefix="/api")
    app.include_router(live.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/metrics", metrics_app(settings, metrics))
    return app
