"""The live page (``/``) and the event stream it listens to (``/api/events``).

``snapshot`` is everything the page draws, read in two round trips: one pipeline for the
streams, their groups, the kill switch and the latest outcomes, and the risk rules' own
snapshot (one transaction: the trading state in force, today's count, the positions and
their marks). ``Feed`` takes one snapshot per tick for every open page together, only while
at least one page listens, so ten pages cost the server what one does. Rates (entries per
second) are measured between two consecutive snapshots.

Each event stream ends by itself after ``STREAM_S``; the browser's EventSource reconnects
within ``RETRY_MS`` and the page does not notice. That bounds what one page holds on the web
server, and lets a server that stops gracefully finish its responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from redis.exceptions import RedisError, ResponseError

from quantum_trader import keys, risk, trading
from quantum_trader.book import Marked
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError, TransientError
from quantum_trader.events import now_iso
from quantum_trader.governor import kill_value
from quantum_trader.logs import get_logger
from quantum_trader.redaction import redact_text
from quantum_trader.settings import Settings
from quantum_trader.web.app import STATIC

log = get_logger("web")

router = APIRouter()

TICK_S = 1.0  # one snapshot per second while a page listens
STREAM_S = 30.0  # one event stream's life; the page reconnects by itself
RETRY_MS = 1000  # how soon EventSource reconnects after a stream ends
LATEST = 10  # results and rejections shown
RATE_GAP_S = 10.0  # a previous snapshot older than this gives no rate (the feed was idle)
LAG_SCAN = 10_000  # entries counted by hand when the server cannot say a group's lag
READ_TIMEOUT_S = 5.0  # a snapshot the server has not answered by then is an error event
TEXT_CHARS = 240  # a detail longer than this is cut on the page
STATE_FIELDS = ("state", "reason", "detail", "by", "at", "until")  # of the trading state in force

# StreamNames field -> the short name the page and its element ids use (``#stream-decision-length``).
STREAM_KEYS = ("candle", "decision", "intent", "result", "rejected", "dead_letter", "risk_state", "result_legacy")


def stream_keys(settings: Settings) -> dict[str, str]:
    """Stream name -> its short name, for every stream of the pipeline (the first field that names it)."""
    names = settings.streams
    out: dict[str, str] = {}
    for key in STREAM_KEYS:
        out.setdefault(getattr(names, key), key)
    return {name: out.get(name, name) for name in names.pipeline()}


def group_stages(settings: Settings) -> dict[str, str]:
    """Consumer group -> the stage that reads through it."""
    names = settings.streams
    return {
        names.ai_group: keys.AI_ENGINE,
        names.protect_group: keys.PROTECT,
        names.router_group: keys.ROUTER,
        names.execution_group: keys.EXECUTION,
        names.journal_group: keys.JOURNAL,
    }


def _cut(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


def _payload(fields: Mapping[str, str]) -> dict[str, Any]:
    """An entry's JSON payload; ``{}`` for one that does not decode (anyone can write anything)."""
    try:
        payload = json.loads(fields.get("payload", "{}"))
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def result_row(entry_id: str, fields: Mapping[str, str]) -> dict[str, str]:
    """One result as the page shows it."""
    p = _payload(fields)
    row = {"id": entry_id, "at": _cut(fields.get("timestamp"))}
    for name in ("status", "reason", "detail", "symbol", "side", "qty", "filled_qty", "avg_price", "fee", "fee_asset"):
        row[name] = _cut(p.get(name))
    return row


def rejection_row(entry_id: str, fields: Mapping[str, str]) -> dict[str, str]:
    """One rejection as the page shows it, with the decision's symbol, side and qty when they decode."""
    p = _payload(fields)
    original = p.get("original") if isinstance(p.get("original"), dict) else {}
    decision = _payload(original) if isinstance(original, dict) else {}
    row = {"id": entry_id, "at": _cut(fields.get("timestamp"))}
    for name in ("reason", "field", "detail"):
        row[name] = _cut(p.get(name) or (fields.get(name) if name == "reason" else ""))
    for name in ("symbol", "side", "qty"):
        row[name] = _cut(decision.get(name))
    return row


def _rate(key: str, added: int, at: float, previous: Mapping[str, Any] | None) -> float | None:
    """Entries per second since the previous snapshot (None without a recent one)."""
    if not previous or not 0 < at - float(previous.get("t", 0)) <= RATE_GAP_S:
        return None
    before = next((s for s in previous.get("streams", []) if s.get("key") == key), None)
    if before is None:
        return None
    # A stream deleted and created again counts from zero: never a negative rate.
    return round(max(0, added - int(before.get("entries_added", 0))) / (at - float(previous["t"])), 2)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


async def _streams(
    redis: Redis, settings: Settings, replies: list[Any], at: float, previous: Mapping[str, Any] | None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Each stream's figures and each stage's (lag and pending summed over its groups)."""
    stages = group_stages(settings)
    streams = []
    per_stage: dict[str, dict[str, int]] = {}
    for (name, key), (info, groups) in zip(
        stream_keys(settings).items(), zip(replies[0::2], replies[1::2], strict=True), strict=True
    ):
        if isinstance(info, ResponseError):  # no such stream yet (or a key of another type)
            info, groups = {}, []
        elif isinstance(info, Exception):
            raise info
        if isinstance(groups, Exception):
            groups = []
        length = int(info.get("length", 0))
        added = int(info.get("entries-added", length))
        rows: list[dict[str, Any]] = []
        for group in groups:
            lag, exact = _int(group.get("lag")), True
            if lag is None:  # entries deleted after the group's position: count them, up to a cap
                last = str(group.get("last-delivered-id", "0-0"))
                if last == "0-0":
                    lag = length
                else:
                    lag = len(await redis.xrange(name, min=f"({last}", max="+", count=LAG_SCAN))
                    exact = lag < LAG_SCAN
            stage = stages.get(str(group["name"]), "")
            rows.append(
                {
                    "name": str(group["name"]),
                    "stage": stage,
                    "consumers": int(group["consumers"]),
                    "pending": int(group["pending"]),
                    "lag": lag,
                    "lag_exact": exact,
                }
            )
            if stage:
                figures = per_stage.setdefault(stage, {"lag": 0, "pending": 0, "consumers": 0})
                figures["lag"] += lag
                figures["pending"] += int(group["pending"])
                figures["consumers"] = max(figures["consumers"], int(group["consumers"]))
        streams.append(
            {
                "key": key,
                "name": name,
                "exists": bool(info),
                "length": length,
                "entries_added": added,
                "rate": _rate(key, added, at, previous),
                "lag": max((row["lag"] for row in rows), default=None),  # the slowest reader
                "pending": sum(row["pending"] for row in rows),
                "groups": rows,
            }
        )
    return streams, per_stage


def _pnl(marked: list[Marked]) -> dict[str, dict[str, str]]:
    """Realised and unrealised PnL summed per quote asset."""
    out: dict[str, dict[str, Decimal]] = {}
    for m in marked:
        sums = out.setdefault(m.position.quote, {"realised": Decimal(0), "unrealised": Decimal(0)})
        sums["realised"] += m.position.realised
        sums["unrealised"] += m.position.unrealised(m.mark)
    return {quote: {name: f"{value:f}" for name, value in sums.items()} for quote, sums in sorted(out.items())}


async def snapshot(
    redis: Redis, settings: Settings, previous: Mapping[str, Any] | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """Everything the page shows, as plain JSON data (exact decimals as strings).

    ``previous`` (the snapshot before this one) gives each stream's rate; without it rates are None.
    """
    moment = now or datetime.now(UTC)
    at = moment.timestamp()
    names = settings.streams
    async with redis.pipeline(transaction=False) as pipe:
        for name in names.pipeline():
            pipe.xinfo_stream(name)
            pipe.xinfo_groups(name)
        pipe.type(keys.KILL_SWITCH)
        pipe.execute_command("MGET", keys.KILL_SWITCH)  # MGET: nil, never WRONGTYPE, for a switch of another type
        pipe.xrevrange(names.result, count=LATEST)
        pipe.xrevrange(names.rejected, count=LATEST)
        replies = await pipe.execute(raise_on_error=False)
    *stream_replies, kind, kill, results, rejections = replies
    for reply in (kind, kill, results, rejections):
        if isinstance(reply, Exception):
            raise reply
    streams, stages = await _streams(redis, settings, stream_replies, at, previous)

    limits = risk.RiskLimits.from_settings(settings)
    snap = await trading.read_snapshot(redis, limits, [], moment, full=True)
    state, _change = risk.state_in_force(snap, limits, moment, "web")
    marked = [Marked(position, snap.marks.get(symbol)) for symbol, position in sorted(snap.positions.items())]
    value = kill_value(kind, kill[0])
    return {
        "at": now_iso(moment),
        "t": at,
        "mode": settings.mode,
        "exchange": settings.exchange,
        "streams": streams,
        "stages": stages,
        "kill": {"value": value, "on": value != "0", "trading_allowed": value == "0"},
        "trading_state": {name: str(getattr(state, name)) for name in STATE_FIELDS},
        "trades": {"day": f"{moment.astimezone(UTC):%Y-%m-%d}", "today": snap.daily_count, "limit": limits.daily_limit},
        "results": [result_row(entry_id, fields) for entry_id, fields in results],
        "rejections": [rejection_row(entry_id, fields) for entry_id, fields in rejections],
        "positions": [m.as_dict() for m in marked],
        "pnl": _pnl(marked),
    }


@dataclass(slots=True)
class _Tick:
    version: int
    data: dict[str, Any]


class Feed:
    """One snapshot per tick, shared by every listening page; no reads while nobody listens."""

    def __init__(self, redis: Redis, settings: Settings, interval: float = TICK_S) -> None:
        self.redis = redis
        self.settings = settings
        self.interval = interval
        self.reads = 0  # snapshots taken (tests count them)
        self._latest: _Tick | None = None
        self._previous: dict[str, Any] | None = None  # the last good snapshot: rates are measured from it
        self._listeners = 0
        self._task: asyncio.Task[None] | None = None
        self._sleeping = False
        self._ticked = asyncio.Event()

    @property
    def listeners(self) -> int:
        """Pages listening now."""
        return self._listeners

    @property
    def running(self) -> bool:
        """Whether the ticker is reading."""
        return self._task is not None and not self._task.done()

    @contextlib.contextmanager
    def listening(self) -> Iterator[int]:
        """One listener for as long as the block runs; yields the version to wait past."""
        self._listeners += 1
        fresh = not self.running
        if fresh:
            self._task = asyncio.create_task(self._run(), name="web-live-feed")
        try:
            # A running ticker's latest snapshot is at most one tick old: the page gets it at once.
            yield self._latest.version - 1 if self._latest and not fresh else self._version()
        finally:
            self._listeners -= 1
            if not self._listeners and self._task is not None and self._sleeping:
                self._task.cancel()  # between two reads: stop now rather than after the sleep
                self._task = None

    def _version(self) -> int:
        return self._latest.version if self._latest else 0

    async def next(self, seen: int) -> _Tick:
        """The first snapshot newer than version ``seen``."""
        while self._latest is None or self._latest.version <= seen:
            ticked = self._ticked
            await ticked.wait()
        return self._latest

    async def _read(self) -> dict[str, Any]:
        self.reads += 1
        try:
            data = await asyncio.wait_for(snapshot(self.redis, self.settings, self._previous), READ_TIMEOUT_S)
        except TimeoutError:
            return {"at": now_iso(), "t": time.time(), "error": f"no answer within {READ_TIMEOUT_S:g} s"}
        except (RedisError, OSError, TransientError, ConfigError) as exc:
            return {"at": now_iso(), "t": time.time(), "error": redact_text(f"{type(exc).__name__}: {exc}")}
        except Exception as exc:  # a bug must not leave every page waiting: show it and log it
            log.exception("web_snapshot_failed", error=type(exc).__name__)
            return {"at": now_iso(), "t": time.time(), "error": f"snapshot failed: {type(exc).__name__}"}
        self._previous = data
        return data

    async def _run(self) -> None:
        while self._listeners:
            data = await self._read()
            self._latest = _Tick(self._version() + 1, data)
            self._ticked.set()
            self._ticked = asyncio.Event()
            if not self._listeners:
                break
            self._sleeping = True
            try:
                await asyncio.sleep(self.interval)
            finally:
                self._sleeping = False


def feed_of(app: FastAPI) -> Feed:
    """The application's feed, made on first use (the app owns one Redis client)."""
    feed = getattr(app.state, "live_feed", None)
    if feed is None:
        feed = Feed(app.state.redis, app.state.settings)
        app.state.live_feed = feed
    return feed


def encode(data: Mapping[str, Any]) -> str:
    """One server-sent event (the page's ``onmessage``)."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def events_of(feed: Feed, life_s: float) -> AsyncIterator[str]:
    """The event stream of one page: a snapshot per tick for ``life_s`` seconds, then the end
    (also when no snapshot comes: the page's EventSource connects again)."""
    loop = asyncio.get_running_loop()
    ends = loop.time() + life_s
    with feed.listening() as seen:
        yield f"retry: {RETRY_MS}\n\n"
        while (left := ends - loop.time()) > 0:
            try:
                tick = await asyncio.wait_for(feed.next(seen), left + READ_TIMEOUT_S)
            except TimeoutError:
                return
            seen = tick.version
            yield encode(tick.data)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The dashboard page (static HTML; its script fetches the API and listens to the events)."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


# Not in the OpenAPI schema: a stream that never ends by a request's standards (and fuzzers read the schema).
@router.get("/api/events", include_in_schema=False)
async def events(request: Request) -> StreamingResponse:
    """Server-sent events: one JSON snapshot (``snapshot``) per second; the stream ends after ``STREAM_S``."""
    return StreamingResponse(
        events_of(feed_of(request.app), STREAM_S),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
