"""The journal's database: the engine, its migrations, and its errors in words an operator can act on.

SQLite (a file in the data directory, the default) runs in WAL mode with ``synchronous=FULL``:
a row is on disk when its transaction returns, before its entries are acknowledged, so a
power cut cannot lose what the stream was told is recorded. PostgreSQL is any
``postgresql+psycopg://`` URL (psycopg 3).

The schema is migrated with Alembic at start, from the revisions shipped in ``migrations/``.
A database at a revision this version does not know (written by a newer version) is refused:
rows it would write could miss columns the newer one relies on.

Errors: a database that cannot be reached, is locked or full is a ``TransientError`` (the
batch stays pending and is retried whole); nothing here ever shows the URL's password.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from quantum_trader.errors import ConfigError, TransientError
from quantum_trader.redaction import redact_url, redact_urls

MIGRATIONS = Path(__file__).with_name("migrations")
# Serialises migrations of journals starting together on one PostgreSQL database ("qtjrnl").
_MIGRATION_LOCK = 0x71746A726E6C
# Whole batches at a time: a journal that waits this long for the SQLite write lock retries later.
_SQLITE_BUSY_MS = 10_000


@dataclass(frozen=True, slots=True, repr=False)
class Database:
    """An open journal database: the engine, and its URL as it may be shown."""

    engine: Engine
    shown: str  # the URL with its password replaced by ***

    def __repr__(self) -> str:
        return f"Database({self.shown})"

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cursor.execute("PRAGMA synchronous=FULL")  # committed = on disk, before any XACK
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def engine_for(url: str) -> Engine:
    """An engine for ``url`` (not connected yet); a SQLite file's directory is created (0700) if missing."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, the driver we ship
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    raise ConfigError(
        f"QT_DATABASE_URL {redact_url(url)}: the journal runs on sqlite:///PATH or postgresql+psycopg://..."
    )


def unavailable(error: BaseException, shown: str) -> TransientError:
    """The error that says the database cannot take the batch now (unreachable, locked, full)."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return TransientError(
        f"the journal database {shown} is unavailable ({redact_urls(first)}); "
        "nothing is acknowledged, the entries stay pending and are retried"
    )


def is_unavailable(error: BaseException) -> bool:
    """True when ``error`` is the database's state (unreachable, locked, full), not the data's."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


@contextlib.contextmanager
def guarded(shown: str) -> Iterator[None]:
    """Turn the database being unavailable into a ``TransientError`` naming the (redacted) URL."""
    try:
        yield
    except DBAPIError as exc:
        if is_unavailable(exc):
            raise unavailable(exc, shown) from None
        raise


def _alembic_config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema revision this version ships."""
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None  # the package ships at least one revision
    return head


def known_revisions() -> list[str]:
    """Every revision this version ships, oldest first."""
    return [script.revision for script in reversed(list(ScriptDirectory(str(MIGRATIONS)).walk_revisions()))]


def current_revision(connection: sa.Connection) -> str | None:
    """The revision the database is at (None: no journal schema yet)."""
    return MigrationContext.configure(connection).get_current_revision()


def check_known(revision: str | None, shown: str) -> None:
    """ConfigError when the database is at a revision this version does not ship (a newer version's)."""
    if revision is None:
        return
    known = known_revisions()
    if revision not in known:
        raise ConfigError(
            f"the journal database {shown} is at schema revision {revision!r}, which this version does not "
            f"know (newest known: {known[-1]!r}): it was written by a newer quantum-trader. Upgrade this "
            "installation, or point QT_DATABASE_URL at another database"
        )


def migrate(database: Database, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (default: the newest), refusing a database from a newer version."""
    with guarded(database.shown), database.engine.begin() as connection:
        if database.dialect == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
        check_known(current_revision(connection), database.shown)
        command.upgrade(_alembic_config(connection), revision)


def open_database(url: str, *, upgrade: bool = True) -> Database:
    """Connect to the journal database at ``url`` and bring its schema up to date.

    Raises ``TransientError`` when it cannot be reached (one line, URL redacted) and
    ``ConfigError`` when its schema is newer than this version knows. ``upgrade=False`` only
    checks the revision (for readers that must not change the database).
    """
    database = Database(engine_for(url), redact_url(url))
    try:
        if upgrade:
            migrate(database)
        else:
            with guarded(database.shown), database.engine.connect() as connection:
                check_known(current_revision(connection), database.shown)
    except BaseException:
        database.close()
        raise
    return database
