"""The JSON API: everything the CLI shows (read, open), and the operator's controls (token required).

Each endpoint calls the function its command calls and answers a model of ``web.models``.
What the stream server or the journal cannot give now (unreachable, damaged, misconfigured) is
a 503 whose ``detail`` says what and how to fix it, never a 500 (``web.sources``). The controls
touch Redis only: the kill switch works with the journal's database and the exchange down.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from quantum_trader import book, governor, portfolio, trading
from quantum_trader import execution as execution_stage
from quantum_trader.bus import dead_letters
from quantum_trader.bus.inspect import pipeline_status
from quantum_trader.events import (
    DEAD_LETTER,
    DECISION_REJECTED,
    EXECUTION_RESULT,
    DeadLetter,
    ExecutionResult,
    Rejection,
    TradingState,
)
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.logs import get_logger
from quantum_trader.settings import Settings
from quantum_trader.web import models
from quantum_trader.web.auth import operator
from quantum_trader.web.sources import GuardedRoute, Problem, journal, lifespan, model_of, moment, recent

log = get_logger("web")
ZERO = Decimal(0)


# Operation ids are the function names (read_trades, set_kill_switch): what a generated client calls.
router = APIRouter(route_class=GuardedRoute, lifespan=lifespan, generate_unique_id_function=lambda route: route.name)

UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"model": Problem, "description": "server or journal down"}}
CONTROL: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or wrong bearer token (nothing changed)"},
    403: {"model": Problem, "description": "no QT_WEB_TOKEN configured: controls are off"},
    **UNAVAILABLE,
}
Operator = Annotated[str, Depends(operator)]
Since = Annotated[datetime | None, Query(description="from this UTC date or time (inclusive); naive = UTC")]
Until = Annotated[datetime | None, Query(description="up to this UTC date or time (exclusive); naive = UTC")]
Symbol = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._:/-]{1,64}$", description="ETHUSDT: this symbol only")]


def _limit(default: int, most: int, what: str) -> Any:
    return Query(default, ge=1, le=most, description=f"at most this many {what}, newest first")


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# --- reading: the streams and the live state (Redis) ---


@router.get("/health", responses=UNAVAILABLE)
async def read_health(request: Request) -> dict[str, Any]:
    """The stream server answers."""
    await request.app.state.redis.ping()
    return {"ok": True}


@router.get("/status", responses=UNAVAILABLE)
async def read_status(
    request: Request,
    consumers: Annotated[bool, Query(description="include each consumer's pending and idle time")] = False,
) -> list[models.StreamStatus]:
    """Every stream of the pipeline: length, entries added, last id; per group: consumers, pending, lag."""
    streams = _settings(request).streams.pipeline()
    stats = await pipeline_status(request.app.state.redis, streams, with_consumers=consumers)
    return [models.StreamStatus.model_validate(stat) for stat in stats]


@router.get("/governor", responses=UNAVAILABLE)
async def read_governor(request: Request) -> models.GovernorStatus:
    """Mode, kill switch, today's count and limit, the trading state, every risk rule and its headroom, stops."""
    redis, settings = request.app.state.redis, _settings(request)
    counters = await governor.governor_state(redis, settings)
    risk = await trading.risk_status(redis, settings)
    return models.GovernorStatus(
        day=counters.day,
        count=counters.count,
        limit=counters.limit,
        mode=counters.mode,
        kill_value=counters.kill_value,
        trading_allowed=counters.trading_allowed,
        max_notional=counters.max_notional,
        symbol_allowlist=counters.symbol_allowlist,
        max_intent_age_s=counters.max_intent_age_s,
        trading_state=models.TradingStateRecord.model_validate(risk.state.fields()),
        rules=[models.RiskRule.model_validate(rule) for rule in risk.rules],
        stops={
            symbol: models.ProtectiveLevels(
                stop=s.stop, take=s.take, armed_at=s.at, fired=s.fired, fired_at=s.fired_at, kind=s.kind
            )
            for symbol, s in sorted(risk.stops.items())
        },
    )


@router.get("/positions", responses=UNAVAILABLE)
async def read_positions(request: Request) -> models.Positions:
    """What the live book holds per symbol, marked at the last price, and the totals per quote asset."""
    marked = await book.marked_positions(request.app.state.redis)
    figures = portfolio.totals({m.position.symbol: m.position for m in marked}, book.marks(marked))
    return models.Positions(
        positions=[models.Position.model_validate(m.as_dict()) for m in marked],
        totals=models.Totals.model_validate(figures),
    )


@router.get("/balances", responses=UNAVAILABLE)
async def read_balances(request: Request) -> models.Balances:
    """The paper account's balances next to what the book's fills moved (balance null off the paper exchange)."""
    redis, settings = request.app.state.redis, _settings(request)
    # Only the paper account lives in Redis; a real exchange's is ``reconcile``'s to read, not the web's.
    paper = settings.exchange == "paper"
    held = await PaperExchange(redis).balances() if paper else {}
    flows = portfolio.asset_flows(await book.read_positions(redis))
    return models.Balances(
        exchange=settings.exchange,
        assets=[
            models.AssetBalance(
                asset=asset, balance=held.get(asset, ZERO) if paper else None, book_flow=flows.get(asset, ZERO)
            )
            for asset in sorted(set(held) | set(flows))
        ],
    )


@router.get("/results", responses=UNAVAILABLE)
async def read_results(request: Request, limit: int = _limit(50, 1000, "results")) -> list[models.ResultEntry]:
    """The newest execution results on the result stream."""
    entries = await recent(request, _settings(request).result_stream, limit, ExecutionResult, EXECUTION_RESULT)
    return [models.ResultEntry(**meta, result=model_of(models.Result, payload)) for meta, payload in entries]


@router.get("/rejections", responses=UNAVAILABLE)
async def read_rejections(request: Request, limit: int = _limit(50, 1000, "rejections")) -> list[models.RejectionEntry]:
    """The newest decisions the router refused (INVALID, DUPLICATE_SKIP), with the decision as it was."""
    entries = await recent(request, _settings(request).rejected_stream, limit, Rejection, DECISION_REJECTED)
    return [models.RejectionEntry(**meta, rejection=model_of(models.Rejection, payload)) for meta, payload in entries]


@router.get("/dead-letters", responses=UNAVAILABLE)
async def read_dead_letters(request: Request, limit: int = _limit(20, 1000, "entries")) -> list[models.DeadLetterEntry]:
    """The newest dead letters with their reasons; replay them by id once the cause is fixed."""
    entries = await recent(request, _settings(request).dead_letter_stream, limit, DeadLetter, DEAD_LETTER)
    return [
        models.DeadLetterEntry(**meta, dead_letter=model_of(models.DeadLetter, payload)) for meta, payload in entries
    ]


# --- reading: the journal (SQL) ---


@router.get("/trades", responses=UNAVAILABLE)
async def read_trades(
    request: Request,
    symbol: Symbol = None,
    status: Annotated[Literal["FILLED", "REJECTED", "EXPIRED", "FAILED"] | None, Query()] = None,
    strategy: Annotated[str | None, Query(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")] = None,
    since: Since = None,
    until: Until = None,
    limit: int = _limit(50, 10_000, "trades"),
) -> list[models.Trade]:
    """Results the journal recorded, newest first."""
    from quantum_trader.journal import queries

    found = await run_in_threadpool(
        queries.trades,
        await journal(request),
        symbol=symbol.upper() if symbol else None,
        status=status,
        strategy=strategy,
        since=moment(since, "since"),
        until=moment(until, "until"),
        limit=limit,
    )
    return [models.Trade.model_validate(trade) for trade in found]


@router.get("/pnl", responses=UNAVAILABLE)
async def read_pnl(
    request: Request,
    by: Annotated[Literal["day", "symbol", "strategy"], Query(description="how the fills are grouped")] = "day",
    since: Since = None,
    until: Until = None,
) -> list[models.PnL]:
    """Realised PnL (average cost), fees and volume per group and quote asset; unrealised by symbol or strategy."""
    from quantum_trader.journal import queries

    marks = book.marks(await book.marked_positions(request.app.state.redis))
    groups = await run_in_threadpool(
        queries.pnl,
        await journal(request),
        by=by,
        since=moment(since, "since"),
        until=moment(until, "until"),
        prices=marks,
    )
    return [models.PnL.model_validate(group) for group in groups]


@router.get("/state-changes", responses=UNAVAILABLE)
async def read_state_changes(
    request: Request, limit: int = _limit(50, 10_000, "changes")
) -> list[models.StateChangeRecord]:
    """Changes of the trading state (operator and breakers), newest first."""
    from quantum_trader.journal import queries

    found = await run_in_threadpool(queries.state_changes, await journal(request), limit=limit)
    return [models.StateChangeRecord.model_validate(change) for change in found]


@router.get("/equity", responses=UNAVAILABLE)
async def read_equity(
    request: Request, since: Since = None, until: Until = None, limit: int = _limit(1000, 10_000, "points")
) -> list[models.EquityPoint]:
    """Cumulative realised PnL after each fill, per quote asset, oldest first (the newest ``limit`` points)."""
    from quantum_trader.web.equity import equity_series

    points = await run_in_threadpool(
        equity_series,
        await journal(request),
        since=moment(since, "since"),
        until=moment(until, "until"),
        limit=limit,
    )
    return [models.EquityPoint.model_validate(point) for point in points]


# --- the operator's controls (bearer token) ---


@router.post("/kill-switch", responses=CONTROL)
async def set_kill_switch(
    request: Request, change: Annotated[models.KillSwitchChange, Body()], by: Operator
) -> models.KillSwitch:
    """Halt trading now (``on: true``: every intent REJECTED KILL_SWITCH) or allow it (``on: false``)."""
    redis = request.app.state.redis
    # Redis alone: this must work while the journal's database or the exchange is down.
    await governor.set_kill(redis, on=change.on)
    value, allowed = await governor.kill_state(redis)
    log.warning("kill_switch_set", on=change.on, by=by)
    return models.KillSwitch(on=not allowed, value=value, trading_allowed=allowed)


@router.post("/trading-state", responses=CONTROL)
async def set_trading_state(
    request: Request, change: Annotated[models.TradingStateChange, Body()], by: Operator
) -> models.StateChange:
    """Set the trading state: ACTIVE trades, REDUCING only reduces positions, HALTED sends nothing.

    Back to ACTIVE also accepts the day's losses so far (the loss breakers measure from now).
    """
    redis = request.app.state.redis
    done = await trading.set_state(redis, _settings(request), TradingState(change.state), change.reason, by)
    _value, allowed = await governor.kill_state(redis)
    return models.StateChange(
        state=done.state.value,
        previous=done.previous.value,
        reason=done.reason,
        detail=done.detail,
        by=done.by,
        at=done.at,
        until=done.until,
        kill_switch_halts=not allowed,
    )


@router.post(
    "/dead-letters/replay",
    responses={
        409: {"model": Problem, "description": "an id is missing or refused (earlier ones went back)"},
        **CONTROL,
    },
)
async def replay_dead_letters(
    request: Request, ask: Annotated[models.ReplayRequest, Body()], by: Operator
) -> models.Replay:
    """Put dead-letter entries back on their origin stream, in the order given, once the cause is fixed.

    An intent whose order may exist at the exchange is refused (it would place a second order),
    as by ``quantum-trader dlq replay``. The first missing or refused id stops the replay: 409,
    naming the ids that went back before it.
    """
    redis, settings = request.app.state.redis, _settings(request)
    refuse = execution_stage.replay_refusal(redis, settings.exchange)
    done: list[models.Replayed] = []
    for dead_id in ask.ids:
        try:
            [(_id, origin, new_id)] = await dead_letters.replay(redis, settings.dead_letter_stream, [dead_id], refuse)
        except LookupError as exc:  # missing, refused, or not a dead letter the pipeline wrote
            raise _stopped(by, dead_id, str(exc), done) from None
        done.append(models.Replayed(id=dead_id, origin=origin, new_id=new_id))
        log.warning("dead_letter_replayed", by=by, id=dead_id, origin=origin, new_id=new_id)
    return models.Replay(replayed=done)


def _stopped(by: str, dead_id: str, problem: str, done: list[models.Replayed]) -> HTTPException:
    """The 409 that ends a replay at ``dead_id``, naming what went back before it."""
    before = f"; replayed before it: {', '.join(item.id for item in done)}" if done else ""
    log.warning("dead_letter_replay_refused", by=by, id=dead_id, detail=problem, replayed=len(done))
    return HTTPException(HTTPStatus.CONFLICT, detail=f"{problem}{before}")
