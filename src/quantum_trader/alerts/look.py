"""One look at the server for alerts: levels, the events since the cursors, the day's summary.

Cheap by design (it runs every ``QT_ALERT_CHECK_S`` inside ``run``): one pipelined round trip
for the kill switch, the reconciliation and the streams' last ids, one for the groups' lag, a
SCAN of the heartbeats, and a range read of the three event streams from where the previous
look stopped (at most ``READ_LIMIT`` entries each; the rest on the next look). The journal is
asked only once a day, in a thread of its own and within a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

from quantum_trader import keys
from quantum_trader.alerts.core import (
    LEVELS_FIELD,
    DailySummary,
    DeadLettered,
    FailedOrder,
    Observation,
    Reconciled,
    clip,
    decode_stored,
    encode_levels,
)
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import parse_id
from quantum_trader.errors import DecodeError, QuantumTraderError
from quantum_trader.events import StateChange, decode_payload
from quantum_trader.governor import kill_value
from quantum_trader.logs import get_logger
from quantum_trader.reconcile.core import Difference, decode_report
from quantum_trader.settings import Settings

log = get_logger("alerts")
READ_LIMIT = 10_000  # entries read per event stream and look
TEXT_CHARS = 300
T = TypeVar("T")


async def load_previous(redis: Redis) -> Observation | None:
    """The look the last watcher stored (None before the first, or when it does not decode)."""
    fields = await redis.hgetall(keys.ALERT_CURSORS)
    previous = decode_stored(fields)
    if fields and previous is None:
        log.warning("alerts_state_unreadable", key=keys.ALERT_CURSORS, effect="starting from the streams' ends")
    return previous


async def store(redis: Redis, observation: Observation) -> None:
    """Record the look: its cursors and levels, in one write."""
    await redis.hset(keys.ALERT_CURSORS, mapping={**observation.cursors, LEVELS_FIELD: encode_levels(observation)})


async def observe(
    redis: Redis, settings: Settings, previous: Observation | None, *, now: datetime | None = None
) -> Observation:
    """One look: the levels now, and the events written after ``previous``'s cursors.

    With no previous look, every cursor starts at its stream's end: the history is not alerted.
    """
    moment = now or datetime.now(UTC)
    streams = settings.streams
    watched = list(dict.fromkeys([streams.risk_state, streams.result, streams.dead_letter]))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.type(keys.KILL_SWITCH)
        pipe.execute_command("MGET", keys.KILL_SWITCH)
        pipe.get(keys.BOOK_RECONCILED)
        for stream in watched:
            pipe.xrevrange(stream, count=1)
        kind, kill, report, *lasts = await pipe.execute(raise_on_error=False)
    if isinstance(kind, Exception) or isinstance(kill, Exception):
        raise QuantumTraderError(f"{keys.KILL_SWITCH} cannot be read: {kind if isinstance(kind, Exception) else kill}")
    switch = kill_value(str(kind), kill[0])
    cursors: dict[str, str] = {}
    events: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for stream, last in zip(watched, lasts, strict=True):
        newest = last[0][0] if isinstance(last, list) and last else "0-0"
        cursor = previous.cursors.get(stream) if previous is not None else None
        if cursor is None:
            cursors[stream], events[stream] = newest, []
            continue
        if _before(newest, cursor):
            cursor = "0-0"  # the stream was deleted and written again: everything on it is new
        entries = await redis.xrange(stream, min=f"({cursor}", max="+", count=READ_LIMIT) if newest != cursor else []
        cursors[stream] = entries[-1][0] if entries else cursor
        events[stream] = entries
    return Observation(
        at=moment.timestamp(),
        day=moment.astimezone(UTC).date().isoformat(),
        cursors=cursors,
        trading_allowed=switch == "0",
        kill_value=switch,
        heartbeats=await _heartbeats(redis, settings, previous),
        lagging=await _lagging(redis, settings.pipeline_streams(), settings.alert_lag),
        lag_limit=settings.alert_lag,
        reconciled=_reconciled(report),
        state_changes=tuple(_state_changes(events.get(streams.risk_state, []))),
        failed=tuple(_failed(events.get(streams.result, []))),
        dead_letters=tuple(_dead_letters(events.get(streams.dead_letter, []))),
        summary=await _summary_due(redis, settings, previous, moment),
    )


def _before(newest: str, cursor: str) -> bool:
    try:
        return parse_id(newest) < parse_id(cursor)
    except ValueError:
        return False


def _stage_groups(settings: Settings) -> list[tuple[str, str, str]]:
    """(service, stream, group) of every stage: a stage's consumer names its heartbeat."""
    streams = settings.streams
    return [
        (keys.AI_ENGINE, streams.candle, streams.ai_group),
        (keys.ROUTER, streams.decision, streams.router_group),
        (keys.EXECUTION, streams.intent, streams.execution_group),
        (keys.JOURNAL, streams.result, streams.journal_group),
        (keys.PROTECT, streams.candle, streams.protect_group),
    ]


async def _heartbeats(redis: Redis, settings: Settings, previous: Observation | None) -> frozenset[str]:
    """``service:consumer`` of every live heartbeat among the stages' consumers and those live before.

    The consumers come from the groups, not from a SCAN: the keyspace holds a key per paper order
    and per dedup window entry, far too many to walk every few seconds.
    """
    stages = _stage_groups(settings)
    async with redis.pipeline(transaction=False) as pipe:
        for _service, stream, group in stages:
            pipe.xinfo_consumers(stream, group)
        replies = await pipe.execute(raise_on_error=False)
    names = set(previous.heartbeats) if previous is not None else set()
    for (service, _stream, _group), consumers in zip(stages, replies, strict=True):
        if not isinstance(consumers, Exception):
            names |= {f"{service}:{consumer['name']}" for consumer in consumers}
    ordered = sorted(names)
    async with redis.pipeline(transaction=False) as pipe:
        for name in ordered:
            service, _, consumer = name.partition(":")
            pipe.exists(keys.heartbeat(service, consumer))
        alive = await pipe.execute()
    return frozenset(name for name, live in zip(ordered, alive, strict=True) if live)


async def _lagging(redis: Redis, streams: list[str], limit: int) -> dict[tuple[str, str], int]:
    """Groups whose lag is above ``limit`` (a lag the server cannot tell is not judged)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)
    out = {}
    for stream, groups in zip(streams, replies, strict=True):
        if isinstance(groups, Exception):
            continue  # no such stream yet
        for group in groups:
            lag = group.get("lag")
            if lag is not None and int(lag) > limit:
                out[(stream, str(group["name"]))] = int(lag)
    return out


def _reconciled(raw: object) -> Reconciled | None:
    if not isinstance(raw, str | bytes):
        return None
    try:
        report = decode_report(raw)
    except QuantumTraderError:
        return None
    return Reconciled(
        at=report.at,
        exchange=report.exchange,
        differences=tuple(sorted(_difference_key(d) for d in report.differences)),
        summary=clip("; ".join(d.detail for d in report.differences), TEXT_CHARS * 3),
        halt_reason=clip(report.halt_reason, TEXT_CHARS),
    )


def _difference_key(difference: Difference) -> str:
    parts = (difference.kind, difference.subject, difference.client_order_id, difference.exchange_order_id)
    return " ".join(part for part in parts if part)


def _state_changes(entries: list[tuple[str, dict[str, str]]]) -> list[StateChange]:
    out = []
    for _entry_id, fields in entries:
        try:
            out.append(decode_payload(fields, StateChange))
        except DecodeError:
            continue  # not a state change (the stream is writable by others): the journal sets it aside
    return out


def _failed(entries: list[tuple[str, dict[str, str]]]) -> list[FailedOrder]:
    out = []
    for entry_id, fields in entries:
        text = fields.get("payload", "")
        if "FAILED" not in text:
            continue  # most results: no need to parse them
        try:
            payload = json.loads(text)
        except ValueError:
            continue
        if not isinstance(payload, dict) or payload.get("status") != "FAILED":
            continue
        out.append(
            FailedOrder(
                entry_id=entry_id,
                **{name: clip(str(payload.get(name, "")), 64) for name in ("symbol", "side", "qty", "reason")},
                detail=clip(str(payload.get("detail", "")), TEXT_CHARS),
                intent_id=clip(str(payload.get("intent_id", "")), 64),
            )
        )
    return out


def _dead_letters(entries: list[tuple[str, dict[str, str]]]) -> list[DeadLettered]:
    return [
        DeadLettered(
            entry_id=entry_id,
            origin=clip(fields.get("origin_stream", "") or "an unknown stream", 128),
            reason=clip(fields.get("reason", "") or "no reason given", 120),
        )
        for entry_id, fields in entries
    ]


async def _summary_due(
    redis: Redis, settings: Settings, previous: Observation | None, moment: datetime
) -> DailySummary | None:
    """The previous day's summary, when this look is the first of a new UTC day."""
    if previous is None or previous.day == moment.astimezone(UTC).date().isoformat():
        return None
    try:
        day = date.fromisoformat(previous.day)
    except ValueError:
        return None
    return await daily_summary(redis, settings, day)


async def daily_summary(
    redis: Redis, settings: Settings, day: date, *, journal_timeout_s: float | None = None
) -> DailySummary:
    """Orders sent, fills and PnL per quote asset of one UTC day.

    From the journal when it answers within ``journal_timeout_s`` (default QT_ALERT_TIMEOUT_S);
    otherwise from the server: the governor's count of orders sent and the book's realised PnL of
    the day (what the daily-loss breaker reads), which execution's commit keeps for three days.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.daily_trades(day))
        pipe.hgetall(keys.risk_realised(day))
        count, realised = await pipe.execute(raise_on_error=False)
    orders = int(count) if isinstance(count, str) and count.isdigit() else None
    limit = settings.alert_timeout_s if journal_timeout_s is None else journal_timeout_s
    try:
        figures = await asyncio.wait_for(_in_thread(lambda: journal_figures(settings, day)), limit)
    except TimeoutError:
        note = f"the journal did not answer within {limit:g} s"
    except Exception as exc:  # whatever the database says, the summary still goes out
        note = f"the journal could not be read: {clip(str(exc).split('; ')[0], TEXT_CHARS)}"
    else:
        if figures is not None:
            fills, pnl, fees, volume = figures
            return DailySummary(day.isoformat(), "journal", orders, fills, pnl, fees, volume)
        note = "no journal database"
    log.info("alerts_summary_from_server", day=day.isoformat(), reason=note)
    return DailySummary(
        day.isoformat(),
        "server",
        orders,
        realised=_decimals(realised) if isinstance(realised, dict) else {},
        note=note,
    )


def _decimals(raw: Mapping[str, str]) -> dict[str, Decimal]:
    out = {}
    for name, text in raw.items():
        try:
            value = Decimal(text)
        except InvalidOperation:
            continue
        if value.is_finite():
            out[name] = value
    return out


Figures = tuple[int, dict[str, Decimal], dict[str, Decimal], dict[str, Decimal]]


def journal_figures(settings: Settings, day: date) -> Figures | None:
    """(fills, realised PnL, fees, volume) of one UTC day from the journal; None when there is none yet.

    Blocking (SQL): run it in a thread. The journal's SQLite file is never created here.
    """
    url = settings.journal_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    from quantum_trader.journal import database, queries  # SQLAlchemy: only once a day, only here

    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    db = database.open_database(url, upgrade=False)
    try:
        rows = queries.pnl(db, by="day", since=start, until=start + timedelta(days=1))
    finally:
        db.close()
    realised: dict[str, Decimal] = {}
    fees: dict[str, Decimal] = {}
    volume: dict[str, Decimal] = {}
    for row in rows:
        realised[row.quote] = realised.get(row.quote, Decimal(0)) + row.realised
        volume[row.quote] = volume.get(row.quote, Decimal(0)) + row.volume
        for asset, fee in row.fees.items():
            fees[asset] = fees.get(asset, Decimal(0)) + fee
    return sum(row.fills for row in rows), realised, fees, volume


def _in_thread(work: Callable[[], T]) -> asyncio.Future[T]:
    """Run blocking ``work`` in a daemon thread of its own (never the loop's executor, which the
    journal stage uses): a database that hangs holds only this thread, and only until it answers."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting side, whatever it is
            error = exc
            _call_soon(loop, lambda: settle(lambda: future.set_exception(error)))
        else:
            _call_soon(loop, lambda: settle(lambda: future.set_result(result)))

    threading.Thread(target=run, name="alerts-journal", daemon=True).start()
    return future


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile: nobody waits for the answer
        loop.call_soon_threadsafe(callback)
