"""Web fixtures: the app around the test's server and a journal of its own, and an HTTP client on it.

Requests go through httpx's ASGI transport (no socket), with the app's lifespan run around them
so the journal it opens is closed again. The token is a known test secret: the log trap fails
any test whose logs or output show it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from quantum_trader.bus.connection import Redis
from quantum_trader.settings import Settings
from quantum_trader.web.app import create_app
from tests.conftest import TEST_SECRETS

TOKEN = "web-test-token-5f0c2a9e81d4b7"
WRONG = "web-test-token-000000000000000"
TEST_SECRETS.update({TOKEN, WRONG})
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# A PostgreSQL nobody listens on (port 1), with a password that must never be shown.
DOWN_DATABASE = "postgresql+psycopg://qt:web-db-password-7c1e@127.0.0.1:1/journal"
TEST_SECRETS.add("web-db-password-7c1e")

Client = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def web_settings(settings_for: Callable[..., Settings], clean_url: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings of a paper pipeline on the test's server, its journal a SQLite file of its own."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "block_ms": 10,
            "database_url": f"sqlite:///{tmp_path / 'journal.sqlite3'}",
            "paper_balances": {"USDT": Decimal(10_000)},
        }
        return settings_for(clean_url, **(base | overrides))

    return make


@pytest.fixture
def client_for(r: Redis, web_settings: Callable[..., Settings]) -> Client:
    """``async with client_for(token=..., **settings) as api``: a client of an app with those settings."""

    @asynccontextmanager
    async def make(
        token: str | None = TOKEN, redis: Redis = None, **overrides: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(redis or r, web_settings(**overrides), SecretStr(token) if token else None)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        ):
            yield client

    return make


@pytest.fixture
async def api(client_for: Client) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app with the default test settings and token."""
    async with client_for() as client:
        yield client
