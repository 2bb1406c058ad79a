"""Reconciliation's I/O: read the exchange and the book, look twice, record the baseline, report."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from redis.exceptions import RedisError

from quantum_trader import keys, portfolio
from quantum_trader.bus.connection import Redis, watching_client
from quantum_trader.bus.streams import parse_id, sleep_or_stop
from quantum_trader.errors import QuantumTraderError
from quantum_trader.events import now_iso
from quantum_trader.exchanges.base import Exchange, is_ours
from quantum_trader.governor import set_kill
from quantum_trader.logs import get_logger
from quantum_trader.portfolio import Position
from quantum_trader.reconcile.core import (
    ZERO,
    Report,
    Snapshot,
    baseline_from,
    compare,
    confirmed,
    decode_report,
    encode_report,
    expected_balances,
    order_key,
    summary,
)
from quantum_trader.redaction import redact_text
from quantum_trader.settings import Settings

log = get_logger("reconcile")
WINDOW_S = 3600.0  # orders compared with results over the last hour (less when results are kept less)
SETTLE_S = 5.0  # between the two looks of a reconciliation that found differences
FIX = "quantum-trader reconcile"


def window_s(settings: Settings) -> float:
    """How far back orders are compared with results: an hour, at most half the results' retention."""
    return min(WINDOW_S, settings.result_keep_s / 2) if settings.result_keep_s > 0 else WINDOW_S


async def _trimmed_until_ms(redis: Redis, stream: str) -> int:
    """The time of the newest entry trimmed or deleted from ``stream`` (0 when none, or no stream)."""
    try:
        info = await redis.xinfo_stream(stream)
    except RedisError:
        return 0  # no such stream yet
    deleted = str(info.get("max-deleted-entry-id") or "0-0")
    return parse_id(deleted)[0]


def _decimal(text: object) -> Decimal:
    try:
        return Decimal(str(text))
    except (InvalidOperation, ValueError):
        return ZERO


async def recorded_fills(redis: Redis, stream: str, since_ms: int, wanted: set[str]) -> dict[str, Decimal]:
    """Per ``order_key`` in ``wanted``, the quantity the results written since ``since_ms`` say filled."""
    out: dict[str, Decimal] = {}
    start = f"{since_ms}-0"
    while wanted:
        page = await redis.xrange(stream, min=start, max="+", count=1000)
        for _entry_id, fields in page:
            try:
                payload = json.loads(fields.get("payload", ""))
                key = order_key(str(payload["client_order_id"]), str(payload.get("exchange_order_id") or ""))
            except (ValueError, KeyError, TypeError):
                continue  # not a result (the stream is writable by others): it records nothing
            if key in wanted:
                out[key] = out.get(key, ZERO) + _decimal(payload.get("filled_qty"))
        if len(page) < 1000:
            break
        ms, seq = parse_id(page[-1][0])
        start = f"{ms}-{seq + 1}"
    return out


async def read_book(redis: Redis) -> tuple[dict[str, Position], dict[str, Decimal] | None]:
    """The book's positions and its baseline (None when not recorded yet)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.BOOK_POSITIONS)
        pipe.hgetall(keys.BOOK_BASELINE)
        raw_positions, raw_baseline = await pipe.execute()
    book = {}
    for symbol, text in raw_positions.items():
        try:
            book[symbol] = portfolio.decode_stored(symbol, text)
        except portfolio.PortfolioError as exc:
            raise QuantumTraderError(str(exc)) from None
    baseline = {asset: _decimal(value) for asset, value in raw_baseline.items()} if raw_baseline else None
    return book, baseline


async def look(redis: Redis, exchange: Exchange, settings: Settings, *, since_ms: int, now_ms: int) -> Snapshot:
    """One look: the exchange first, then the book (so results written meanwhile are seen)."""
    book, _ = await read_book(redis)  # the markets to ask about
    symbols = sorted({*book, *settings.symbol_allowlist})
    balances = await exchange.balances()
    orders = await exchange.fetch_activity(symbols, since_ms)
    book, baseline = await read_book(redis)
    wanted = {
        order_key(o.client_order_id, o.exchange_order_id)
        for o in orders or []
        if is_ours(o.client_order_id) and o.filled
    }
    # An exchange that lists only orders without a result (paper) needs no read of the results,
    # which costs up to QT_RESULT_MAXLEN entries a look.
    recorded = (
        {}
        if exchange.activity_unrecorded_only
        else await recorded_fills(redis, settings.result_stream, since_ms, wanted)
    )
    return Snapshot(balances=balances, orders=orders, book=book, baseline=baseline, recorded=recorded, now_ms=now_ms)


async def _previous(redis: Redis) -> Report | None:
    raw = await redis.get(keys.BOOK_RECONCILED)
    if raw is None:
        return None
    try:
        return decode_report(raw)
    except QuantumTraderError:
        return None  # overwritten below with a sound one


async def record_baseline(redis: Redis, baseline: Mapping[str, Decimal], *, replace: bool) -> bool:
    """Write the baseline; unless ``replace``, only while none is recorded (False when one was)."""
    client = await watching_client(redis, keys.BOOK_BASELINE)
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(keys.BOOK_BASELINE)
        if not replace and await pipe.exists(keys.BOOK_BASELINE):
            await pipe.reset()
            return False
        pipe.multi()
        pipe.delete(keys.BOOK_BASELINE)
        if baseline:
            pipe.hset(
                keys.BOOK_BASELINE, mapping={asset: f"{amount.normalize():f}" for asset, amount in baseline.items()}
            )
        await pipe.execute()  # a WatchError means someone else recorded one first: theirs stands
    return True


async def reconcile(
    redis: Redis,
    exchange: Exchange,
    settings: Settings,
    *,
    halt: bool = False,
    settle_s: float = SETTLE_S,
    now: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    accepted_ms: int | None = None,
) -> Report:
    """Compare the exchange with the book, record the baseline when there is none, write the report.

    With ``halt``, differences turn the kill switch on (the reason in the report and the log).
    Exchange or server errors propagate: nothing is written then, and nothing halted.
    """
    previous = await _previous(redis)
    if accepted_ms is None:
        accepted_ms = previous.accepted_ms if previous is not None else 0
    at_ms = int(now() * 1000)
    trimmed_ms = await _trimmed_until_ms(redis, settings.result_stream)
    since_ms = max(at_ms - int(window_s(settings) * 1000), trimmed_ms + 1, accepted_ms + 1)
    tolerance = settings.reconcile_tolerance
    grace_ms = int((settings.exchange_order_wait_s + settle_s + 10) * 1000)
    first = await look(redis, exchange, settings, since_ms=since_ms, now_ms=at_ms)
    differences = compare(first, tolerance=tolerance, open_grace_ms=grace_ms)
    final = first
    if differences or first.baseline is None:
        await sleep(settle_s)
        final = await look(redis, exchange, settings, since_ms=since_ms, now_ms=int(now() * 1000))
        differences = confirmed(differences, compare(final, tolerance=tolerance, open_grace_ms=grace_ms), tolerance)
    recorded = pending = False
    if final.baseline is None:
        candidate = baseline_from(final.balances, final.book)
        if candidate == baseline_from(first.balances, first.book):
            recorded = await record_baseline(redis, candidate, replace=False)
            if recorded:
                log.info(
                    "reconcile_baseline_recorded",
                    exchange=exchange.name,
                    baseline={asset: str(amount) for asset, amount in candidate.items()},
                    effect="the exchange's holdings minus the book's fills are the book's starting point",
                )
        else:
            pending = True
            log.info("reconcile_baseline_pending", exchange=exchange.name, effect="the book kept moving; next time")
    reason = ""
    if differences and halt:
        reason = f"reconciliation found {len(differences)} difference(s) with {exchange.name}"
        await set_kill(redis, on=True)
    report = Report(
        at=now_iso(datetime.fromtimestamp(at_ms / 1000, UTC)),
        exchange=exchange.name,
        differences=differences,
        assets=len({*final.balances, *expected_balances(final.book, final.baseline or {})}),
        orders=-1 if final.orders is None else len(final.orders),
        since=now_iso(datetime.fromtimestamp(since_ms / 1000, UTC)),
        baseline_recorded=recorded,
        baseline_pending=pending,
        halted=bool(reason),
        halt_reason=reason,
        accepted_ms=accepted_ms,
    )
    await redis.set(keys.BOOK_RECONCILED, encode_report(report))
    if differences:
        (log.error if reason else log.warning)(
            "reconcile_differences",
            exchange=exchange.name,
            count=len(differences),
            differences=summary(differences),
            kill_switch="on" if reason else "unchanged (QT_RECONCILE_HALT=false)",
            fix=f"{FIX} (every difference with its fix); after dealing with them: quantum-trader kill off",
        )
    else:
        log.info("reconciled", exchange=exchange.name, assets=report.assets, orders=report.orders)
    return report


async def accept(redis: Redis, exchange: Exchange, settings: Settings, *, settle_s: float = SETTLE_S) -> Report:
    """Make the exchange's holdings now the book's starting point, and leave earlier orders out.

    For differences an operator has checked and means to keep (a deposit, a manual trade). The
    baseline is recorded again only when two looks ``settle_s`` apart agree (nothing in flight).
    """
    first = await look(redis, exchange, settings, since_ms=int(time.time() * 1000), now_ms=0)
    await asyncio.sleep(settle_s)
    accepted_ms = int(time.time() * 1000)
    second = await look(redis, exchange, settings, since_ms=accepted_ms, now_ms=0)
    baseline = baseline_from(second.balances, second.book)
    if baseline != baseline_from(first.balances, first.book):
        raise QuantumTraderError(
            "not accepted: the balances or the book moved while they were read (orders in flight); "
            "turn the kill switch on (quantum-trader kill on), wait for execution to finish, and run it again"
        )
    await record_baseline(redis, baseline, replace=True)
    log.warning(
        "reconcile_accepted",
        exchange=exchange.name,
        baseline={asset: str(amount) for asset, amount in baseline.items()},
        effect="the exchange's holdings are the book's starting point; orders placed until now are not compared",
    )
    return await reconcile(redis, exchange, settings, settle_s=settle_s, accepted_ms=accepted_ms)


async def keep_reconciling(redis: Redis, exchange: Exchange, settings: Settings, stop: asyncio.Event) -> None:
    """Execution's reconciliation: at start, then every QT_RECONCILE_S (0: at start only), until ``stop``.

    A reconciliation that cannot reach the exchange or the server is a warning and is tried
    again next period: it halts nothing (the send path fails closed on its own).
    """
    while not stop.is_set():
        # Raced against ``stop``: a shutdown does not wait out the exchange's retries or the settle pause.
        job = asyncio.create_task(reconcile(redis, exchange, settings, halt=settings.effective_reconcile_halt))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({job, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            return
        try:
            job.result()
        except (QuantumTraderError, RedisError, OSError) as exc:
            log.warning(
                "reconcile_unavailable",
                exchange=exchange.name,
                error=redact_text(str(exc) or type(exc).__name__),
                effect="not compared this time; nothing halted",
                retry_in_s=settings.reconcile_s or None,
            )
        except Exception as exc:  # a bug here must not stop execution; it is logged as one
            log.error(
                "reconcile_failed", exchange=exchange.name, error=f"{type(exc).__name__}: {redact_text(str(exc))}"
            )
        if settings.reconcile_s <= 0:
            return
        await sleep_or_stop(stop, settings.reconcile_s)
