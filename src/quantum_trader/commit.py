"""The atomic end of an execution batch: acknowledgements, results, counts and the book, in one script call.

``Committer`` is what execution commits every batch with and what ``recover`` expires stale
intents with (it needs no exchange). One ``commit.lua`` call per batch acknowledges each intent,
writes its one result (and the legacy copy), gives back the daily count of an intent that
ended without an order, and moves the book's position of every symbol the batch filled; an
intent another consumer already finished gets nothing, and a position another process moved
meanwhile is read again and recomputed, so positions never disagree with results.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from quantum_trader import keys, portfolio, protect
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, parse_id
from quantum_trader.errors import TransientError
from quantum_trader.events import EXECUTION_RESULT, Envelope, ExecutionResult, TradeIntent, encode_payload, now_iso
from quantum_trader.keys import StreamNames
from quantum_trader.logs import emit_outcomes, get_logger, outcomes_enabled
from quantum_trader.portfolio import Fill, PortfolioError, Position
from quantum_trader.protect import Levels
from quantum_trader.scripts import pack, register
from quantum_trader.settings import DEFAULT_QUOTE_ASSETS

log = get_logger("execution")
REALISED_KEPT_S = 3 * 86_400  # today's realised PnL (the daily loss limit) outlives its day a little


@dataclass(frozen=True, slots=True)
class Job:
    """One decoded intent on its way through the batch."""

    entry: Entry
    env: Envelope
    intent: TradeIntent
    coid: str


class Committer:
    """Acknowledges intents and writes their results, one atomic ``commit.lua`` call per batch.

    It needs no exchange: execution commits every batch with it, ``recover`` the intents it expires.
    ``paper_records``: the paper exchange keeps a record of each order, given an expiry of ``keep_s``
    seconds (QT_TRIM_KEEP_S) when its intent is committed. The same call updates the book's
    position of every symbol the batch filled (``portfolio``), so positions never disagree with results.
    """

    # Commit attempts a batch makes while other processes keep moving the same symbols' positions.
    MAX_ATTEMPTS = 50

    def __init__(
        self,
        redis: Redis,
        streams: StreamNames,
        *,
        keep_s: float,
        paper_records: bool,
        quote_assets: Sequence[str] = DEFAULT_QUOTE_ASSETS,
        losses_kept_s: float = 2 * 86_400,
        defaults: protect.Defaults = protect.NO_DEFAULTS,
    ) -> None:
        self.losses_kept_s = losses_kept_s  # the cooldown's window and length: losing exits older are dropped
        self.defaults = defaults
        self.redis = redis
        self.streams = streams
        self.keep_s = keep_s
        self.paper_records = paper_records
        self.quote_assets = list(quote_assets)
        self._script = register(redis, "commit")

    async def commit(
        self,
        done: Sequence[tuple[Job, ExecutionResult]],
        sent: Collection[str],
        now: datetime,
        *,
        stream: str | None = None,
    ) -> int:
        """Acknowledge the intents and write their results in one atomic script call; the number written.

        An intent someone else already finished gets no second result. ``sent``: the intents whose
        order reached the exchange; every other intent the gate counted is uncounted in the same
        call, so the daily counter always equals the orders sent. The paper exchange's record of
        each order gets its expiry here: the intent is finished, no delivery can ask for it again.
        The book's positions move with the fills in the same call; when another process moved one
        first (or finished one of these intents), the positions are read again and recomputed.
        """
        if not done:
            return 0
        items: list[str] = []
        for job, result in done:
            placed = "1" if job.entry.id in sent else "0"
            record = keys.paper_order(job.coid) if self.paper_records else ""
            items += (job.entry.id, job.env.trace_id, job.env.correlation_id, encode_payload(result), placed, record)
        day = now.astimezone(UTC).date()
        script_keys = [
            stream or self.streams.intent,  # the batch's partition of the intent stream, if partitioned
            self.streams.result,
            keys.counted(day),
            keys.daily_trades(day),
            keys.BOOK_POSITIONS,
            keys.paper_unfinished(),
            keys.RISK_INFLIGHT,
            keys.RISK_EPOCH,
            keys.risk_realised(day),
            keys.RISK_LOSSES,
            keys.PROTECT_STOPS,
        ]
        if self.streams.result_legacy:
            script_keys.append(self.streams.result_legacy)
        fills = [(job.entry.id, fill) for job, result in done if (fill := portfolio.fill_of(result, self.quote_assets))]
        levels = {job.entry.id: (job.intent.stop_loss, job.intent.take_profit) for job, _result in done}
        packed_items = pack(items)
        # On a partition's stream the gate counted each intent by its id and that stream (``keys.intent_record``).
        partition = stream if stream is not None and stream != self.streams.intent else None
        packed_records = [pack([keys.intent_record(job.entry.id, partition) for job, _r in done])] if partition else []
        # A protective exit that did not fill all it was to sell (refused, expired, partly filled) can
        # no longer sell more: its position's levels are armed again, so the next crossing fires anew.
        packed_rearm = pack(
            [
                [job.intent.symbol, job.env.correlation_id]
                for job, result in done
                if job.env.correlation_id.startswith(protect.IDENTITY_PREFIX) and result.filled_qty < job.intent.qty
            ]
        )
        now_ms = int(now.timestamp() * 1000)
        gone: set[str] = set()
        for _attempt in range(self.MAX_ATTEMPTS):
            updates = await self._book_updates(
                [(entry_id, f) for entry_id, f in fills if entry_id not in gone], levels, now, partition
            )
            args: list[str | bytes] = [
                self.streams.execution_group,
                EXECUTION_RESULT,
                now_iso(now),
                keys.EXECUTION,
                packed_items,
                str(math.ceil(self.keep_s)),
                pack(updates),
                *_id_range([entry_id for entry_id, _fill in fills]),
                str(now_ms),
                str(now_ms - int(self.losses_kept_s * 1000)),
                str(REALISED_KEPT_S),
                packed_rearm,
                *packed_records,
            ]
            reply = await self._script(keys=script_keys, args=args)
            if isinstance(reply, list):
                gone.update(str(entry_id) for entry_id in reply)
                continue
            written = int(reply)
            if outcomes_enabled():
                emit_outcomes(keys.EXECUTION, [_outcome_record(job, result) for job, result in done])
            return written
        raise TransientError(
            f"the book's positions of {len(fills)} fills kept moving under this commit ({self.MAX_ATTEMPTS} attempts);"
            " the batch is retried"
        )

    async def _book_updates(
        self, fills: Sequence[tuple[str, Fill]], levels: Mapping[str, Levels], now: datetime, partition: str | None
    ) -> list[list[object]]:
        """The positions of the symbols filled, read now, and ``book_updates`` over them."""
        if not fills:
            return []
        symbols = list(dict.fromkeys(fill.symbol for _id, fill in fills))
        stored = await self.redis.hmget(keys.BOOK_POSITIONS, symbols)
        return book_updates(fills, dict(zip(symbols, stored, strict=True)), levels, self.defaults, now, partition)


def book_updates(
    fills: Sequence[tuple[str, Fill]],
    stored: Mapping[str, str | None],
    levels: Mapping[str, Levels],
    defaults: protect.Defaults,
    now: datetime,
    partition: str | None = None,
) -> list[list[object]]:
    """Per symbol filled: [symbol, its stored position (``stored``, "" when absent), the position after the
    fills, their intent ids, the PnL they realised, the quote asset, the losing exits' members, the new stop]
    (pure: ``commit.lua`` applies it; the backtest's twin of the script too).

    A losing exit's member names its intent as the gate counted it (``keys.intent_record``: on a partition's
    stream, id and stream), so two intents sharing an id on two partitions are two losing exits.
    An unreadable stored position is a TransientError: results wait until the book is sound (fail closed).
    """
    if not fills:
        return []
    symbols = list(dict.fromkeys(fill.symbol for _id, fill in fills))
    book: dict[str, Position] = {}
    for symbol in symbols:
        raw = stored.get(symbol)
        if raw is None:
            continue
        try:
            book[symbol] = portfolio.decode_stored(symbol, raw)
        except PortfolioError as exc:
            raise TransientError(str(exc)) from None
    before = {symbol: stored.get(symbol) or "" for symbol in symbols}
    runs: dict[str, list[Fill]] = {symbol: [] for symbol in symbols}
    ids: dict[str, list[str]] = {symbol: [] for symbol in symbols}
    for entry_id, fill in fills:
        runs[fill.symbol].append(fill)
        ids[fill.symbol].append(entry_id)
    extra: dict[str, list[object]] = {}
    for symbol, run in runs.items():
        was = book.get(symbol) or portfolio.empty(symbol, run[0].base, run[0].quote)
        exits: list[Decimal] = []
        book[symbol] = portfolio.apply_all(was, run, strict=False, exits=exits)
        sells = [entry_id for entry_id, fill in zip(ids[symbol], run, strict=True) if fill.side == "SELL"]
        losing = [
            f"{keys.intent_record(entry_id, partition)}|{symbol}"
            for entry_id, gain in zip(sells, exits, strict=True)
            if gain < 0
        ]
        buys = [entry_id for entry_id, fill in zip(ids[symbol], run, strict=True) if fill.side == "BUY"]
        stop = protect.stop_after(book[symbol], [levels.get(i, (None, None)) for i in buys], defaults, now)
        extra[symbol] = [f"{book[symbol].realised - was.realised:f}", book[symbol].quote, losing, stop]
        if book[symbol].unbooked != was.unbooked:
            log.warning(
                "sold_beyond_book",
                symbol=symbol,
                intents=len(ids[symbol]),
                first_intent_id=ids[symbol][0],
                unbooked=str(book[symbol].unbooked),
                effect="the exchange sold holdings the book did not know; the position stops at zero",
                fix="run: quantum-trader reconcile",
            )
    return [[symbol, before[symbol], portfolio.encode(book[symbol]), ids[symbol], *extra[symbol]] for symbol in symbols]


def _id_range(ids: Sequence[str]) -> tuple[str, str]:
    """The lowest and highest of stream ids (``"0-0"`` twice for none)."""
    if not ids:
        return "0-0", "0-0"
    return min(ids, key=parse_id), max(ids, key=parse_id)


def _outcome_record(job: Job, result: ExecutionResult) -> dict[str, object]:
    return {
        "event": "intent_done",
        "outcome": result.status,
        "reason": result.reason,
        "detail": result.detail,
        "symbol": result.symbol,
        "side": result.side,
        "qty": result.qty,
        "intent_id": job.entry.id,
        "client_order_id": job.coid,
        "trace_id": job.env.trace_id,
        "correlation_id": job.env.correlation_id,
    }
