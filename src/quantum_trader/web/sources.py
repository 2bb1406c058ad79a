"""Where the API's answers come from, and what it says when they cannot be had.

- ``GuardedRoute``: a route whose stream server or journal trouble (``QuantumTraderError``, the
  server unreachable or refusing) is a 503 whose ``detail`` says what and how to fix it, logged
  in one line, never a 500 with a traceback.
- ``journal``: the journal's database, opened (and migrated, as the commands do) on first use,
  kept for the app's life and closed by ``lifespan``; reads run in a worker thread.
- ``recent``: the newest entries of a stream, decoded; one that does not decode is shown with
  its problem instead of failing the whole answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quantum_trader.errors import DecodeError, QuantumTraderError, TransientError
from quantum_trader.events import MAX_FIELD_CHARS, decode_event, printable
from quantum_trader.logs import get_logger
from quantum_trader.redaction import redact_url, redact_urls
from quantum_trader.settings import Settings

if TYPE_CHECKING:
    from quantum_trader.journal.database import Database

log = get_logger("web")


class Problem(BaseModel):
    """Why the request was not served, and what to do."""

    detail: str


class GuardedRoute(APIRoute):
    """A route whose stream server or journal trouble is a 503 with the reason, not a 500 with a traceback."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, with the pipeline's errors answered as 503s."""
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except QuantumTraderError as exc:
                return unavailable(request, str(exc))
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                return unavailable(
                    request, f"the stream server did not answer ({exc}); check it with: quantum-trader status"
                )
            except RedisError as exc:
                return unavailable(request, f"the stream server refused a command ({exc}); see its log")

        return guarded


def unavailable(request: Request, detail: str) -> JSONResponse:
    """A 503 with ``detail`` (URL passwords hidden), and one log line saying which request it answered."""
    shown = redact_urls(detail)
    log.warning("web_unavailable", method=request.method, path=request.url.path, detail=shown)
    return JSONResponse({"detail": shown}, status_code=HTTPStatus.SERVICE_UNAVAILABLE)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's life: the journal opened during it is closed at its end."""
    try:
        yield
    finally:
        database = getattr(app.state, "journal", None)
        app.state.journal = None
        if database is not None:
            await run_in_threadpool(database.close)


async def recent(
    request: Request, stream: str, limit: int, kind: type[msgspec.Struct], event_type: str
) -> list[tuple[dict[str, Any], msgspec.Struct | None]]:
    """The newest entries of ``stream``: their envelope, and their payload or why it does not decode."""
    out: list[tuple[dict[str, Any], msgspec.Struct | None]] = []
    for entry_id, fields in await request.app.state.redis.xrevrange(stream, count=limit):
        # Anyone who can reach the server can XADD anything: one bad entry is shown as such, not a failure.
        meta: dict[str, Any] = {
            name: printable(str(fields.get(name, "")), MAX_FIELD_CHARS)
            for name in ("timestamp", "trace_id", "correlation_id", "source")
        }
        meta["id"] = str(entry_id)
        try:
            _envelope, payload = decode_event(fields, kind, event_type)
        except DecodeError as exc:
            out.append((meta | {"problem": printable(exc.reason, MAX_FIELD_CHARS)}, None))
            continue
        out.append((meta, payload))
    return out


def model_of(model: type[BaseModel], payload: msgspec.Struct | None) -> Any:
    """``payload`` as ``model`` (None stays None: an entry that did not decode)."""
    return None if payload is None else model.model_validate(payload)


def moment(value: datetime | None, name: str) -> datetime | None:
    """A query's time in UTC (naive = UTC); a 422 for one UTC cannot hold (year 1 at +14:00)."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", name), "msg": "out of range once in UTC", "input": str(value)}]
        ) from None


async def journal(request: Request) -> Database:
    """The journal's database, opened (and migrated, as the commands do) on first use; 503 while it cannot be."""
    state = request.app.state
    database: Database | None = getattr(state, "journal", None)
    if database is not None:
        return database
    lock = getattr(state, "journal_lock", None)
    if lock is None:
        lock = state.journal_lock = asyncio.Lock()
    async with lock:
        database = getattr(state, "journal", None)
        if database is None:
            database = state.journal = await run_in_threadpool(_open_journal, request.app.state.settings)
    return database


def _open_journal(settings: Settings) -> Database:
    from sqlalchemy.exc import SQLAlchemyError

    from quantum_trader.journal.database import open_database

    url = settings.journal_url()
    try:
        return open_database(url)
    except (SQLAlchemyError, OSError) as exc:
        # A URL SQLAlchemy cannot parse, a SQLite directory that cannot be made: the operator's to fix.
        raise TransientError(
            f"the journal database {redact_url(url)} cannot be opened ({redact_urls(str(exc).splitlines()[0])}); "
            "check QT_DATABASE_URL"
        ) from None
