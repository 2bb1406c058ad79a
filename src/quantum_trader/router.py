"""The router: validate each AI decision, drop duplicates, hand the rest to execution.

Pure core: ``validate`` turns raw stream fields into a ``Decision`` or a
``DecodeError`` naming the field and the problem; ``dedup_identity`` gives the
decision's identity (by default correlation_id + trace_id; the seed's
corr||trace||msg_id is the option ``QT_DEDUP_FIELDS=correlation_id,trace_id,msg_id``),
falling back to a fingerprint of the content when the decision carries no identity.

Service: one ``route.lua`` call per batch does dedup (SET NX with the window),
writes intents and rejections, and acknowledges the decisions, atomically, so a
crash or a redelivery can neither lose a decision nor route it twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.partitions import Fence, Partitioned
from quantum_trader.bus.streams import Entry, GroupConsumer
from quantum_trader.errors import DecodeError
from quantum_trader.events import (
    DECISION,
    DECISION_REJECTED,
    MAX_EXPONENT,
    MAX_FIELD_CHARS,
    MIN_EXPONENT,
    Decision,
    Envelope,
    Fields,
    Reason,
    Rejection,
    TradeIntent,
    check_amount,
    decode_envelope,
    encode_payload,
    envelope,
    is_decimal_text,
    now_iso,
    parse_iso,
    printable,
    record_fields,
)
from quantum_trader.exchanges.base import split_symbol
from quantum_trader.logs import emit_outcomes
from quantum_trader.scripts import pack, register
from quantum_trader.settings import DEFAULT_QUOTE_ASSETS, Settings

if TYPE_CHECKING:
    from quantum_trader.metrics import Metrics

_json = msgspec.json.Decoder(float_hook=Decimal)
MAX_LABEL_CHARS = 128  # strategy, model_version


def _decimal(payload: dict[str, Any], name: str, *, required: bool) -> Decimal | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise DecodeError(f"{name} is missing", field=name)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise DecodeError(f"{name} must be a number or decimal string, got {type(value).__name__}", field=name)
    if isinstance(value, str):
        if not is_decimal_text(value):
            raise DecodeError(
                f"{name} {printable(value, 40)!r} is not a decimal number in ASCII notation "
                "(digits 0-9, one '.', optional exponent)",
                field=name,
            )
        return check_amount(Decimal(value), name)
    if isinstance(value, int) and abs(value) >= 10 ** (MAX_EXPONENT + 1):
        raise DecodeError(f"{name} is outside 1e{MIN_EXPONENT} .. 1e{MAX_EXPONENT + 1}", field=name)
    return check_amount(Decimal(value), name)


def _word(payload: dict[str, Any], name: str, choices: tuple[str, ...], default: str | None = None) -> str:
    """An ASCII keyword, case-insensitive (never Unicode case folding, which makes a long s an S)."""
    value = payload.get(name, default)
    if not isinstance(value, str) or not value.isascii() or value.strip().upper() not in choices:
        shown = printable(value, 40) if isinstance(value, str) else value
        raise DecodeError(f"{name} must be {' or '.join(choices)}, got {shown!r}", field=name)
    return value.strip().upper()


def _label(payload: dict[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS:
        raise DecodeError(f"{name} must be text of at most {MAX_LABEL_CHARS} characters", field=name)
    return value


def normalise_symbol(symbol: object, quote_assets: list[str]) -> str:
    """``eth/usdt`` -> ``ETHUSDT``: ASCII only, upper-cased, a distinct base and quote asset."""
    if not isinstance(symbol, str) or not symbol.strip():
        raise DecodeError("symbol is missing or empty", field="symbol")
    if not symbol.isascii():
        raise DecodeError(f"symbol {printable(symbol, 40)!r} has characters that are not ASCII", field="symbol")
    try:
        base, quote = split_symbol(symbol.strip().upper(), quote_assets)
    except ValueError as exc:
        raise DecodeError(str(exc), field="symbol") from None
    return base + quote


def validate(
    raw: Fields, now: datetime, clock_skew: timedelta, quote_assets: list[str] | None = None
) -> tuple[Envelope, Decision]:
    """Check one decision entry; DecodeError names the first bad field and why."""
    try:
        env = decode_envelope(raw, DECISION)
        try:
            stamp = parse_iso(env.timestamp)
        except ValueError:
            raise DecodeError(f"timestamp {env.timestamp!r} is not ISO-8601", field="timestamp") from None
        if stamp - now > clock_skew:
            raise DecodeError(
                f"timestamp {env.timestamp} is in the future (more than {clock_skew.total_seconds():g}s ahead)",
                field="timestamp",
            )
        try:
            payload = _json.decode(env.payload)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"payload is not valid JSON: {exc}", field="payload") from None
        except RecursionError:
            raise DecodeError("payload is nested too deeply", field="payload") from None
        if not isinstance(payload, dict):
            raise DecodeError("payload must be a JSON object", field="payload")
        symbol = normalise_symbol(payload.get("symbol"), quote_assets or list(DEFAULT_QUOTE_ASSETS))
        side = _word(payload, "side", ("BUY", "SELL"))
        qty = _decimal(payload, "qty", required=True)
        order_type = _word(payload, "order_type", ("MARKET", "LIMIT"), "MARKET")
        price = _decimal(payload, "price", required=order_type == "LIMIT")
        stop_loss = _decimal(payload, "stop_loss", required=False)
        take_profit = _decimal(payload, "take_profit", required=False)
        if stop_loss is not None and take_profit is not None and stop_loss >= take_profit:
            raise DecodeError(f"stop_loss {stop_loss} must be below take_profit {take_profit}", field="stop_loss")
        confidence = payload.get("confidence")
        if confidence is not None:
            if isinstance(confidence, bool) or not isinstance(confidence, (int, Decimal)):
                raise DecodeError(f"confidence must be a number in [0, 1], got {confidence!r}", field="confidence")
            if not Decimal(confidence).is_finite() or not (0 <= confidence <= 1):
                raise DecodeError(f"confidence must be in [0, 1], got {confidence}", field="confidence")
        decision = Decision(
            symbol=symbol,
            side=side,  # type: ignore[arg-type]
            qty=qty,  # type: ignore[arg-type]
            order_type=order_type,  # type: ignore[arg-type]
            price=price,
            confidence=None if confidence is None else float(confidence),
            strategy=_label(payload, "strategy"),
            model_version=_label(payload, "model_version"),
            stop_loss=stop_loss,
            take_profit=take_profit,
        )
        return env, decision
    except DecodeError as exc:
        raise DecodeError(exc.reason, field=exc.field, raw=raw) from None


def dedup_identity(env: Envelope, entry_id: str, fields: list[str]) -> str:
    """The decision's identity for dedup.

    The configured envelope fields, each prefixed by its length (``1:x|2:|y``), so no two
    different tuples give the same identity; when the decision carries none of its identity
    fields (``msg_id`` aside), a fingerprint of its content instead, so that unrelated
    anonymous decisions never collide on an empty key.
    """
    values = {"correlation_id": env.correlation_id, "trace_id": env.trace_id, "msg_id": entry_id}
    if not any(values[name] for name in fields if name != "msg_id"):
        content = "\x1f".join((env.event_type, env.payload, env.timestamp, env.source))
        return "fp:" + hashlib.sha256(content.encode()).hexdigest()
    return "|".join(f"{len(values[name])}:{values[name]}" for name in fields)


def intent_payload(env: Envelope, decision: Decision, entry_id: str) -> str:
    """The trade intent's payload for a routed decision (the router script adds the envelope)."""
    intent = TradeIntent(
        symbol=decision.symbol,
        side=decision.side,
        qty=decision.qty,
        order_type=decision.order_type,
        price=decision.price,
        confidence=decision.confidence,
        strategy=decision.strategy,
        model_version=decision.model_version,
        stop_loss=decision.stop_loss,
        take_profit=decision.take_profit,
        decision_id=entry_id,
        decision_ts=env.timestamp,
    )
    return encode_payload(intent)


def to_rejection(raw: Fields, entry_id: str, reason: Reason, detail: str, field: str, now: datetime) -> Fields:
    """A rejection entry: the reason, the detail, and the original fields as they were read."""
    original, exact = record_fields(raw)
    payload = Rejection(
        reason=reason,
        detail=printable(detail),
        field=printable(field, MAX_FIELD_CHARS),
        original_id=entry_id,
        original=original,
        original_base64=exact,
    )
    fields = envelope(
        DECISION_REJECTED,
        payload,
        trace_id=printable(raw.get("trace_id", ""), MAX_FIELD_CHARS),
        correlation_id=printable(raw.get("correlation_id", ""), MAX_FIELD_CHARS),
        source=keys.ROUTER,
        timestamp=now_iso(now),
    )
    fields["reason"] = reason.value
    fields["original_id"] = entry_id
    return fields


@dataclass(frozen=True, slots=True)
class Routed:
    """A valid decision, ready for the router script."""

    entry_id: str
    dedup_key: str
    payload: str
    trace_id: str
    correlation_id: str
    original: str
    partition: int = 0  # the intent partition of its symbol (QT_PARTITIONS)


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What one batch will do, decided without the server."""

    valid: list[Routed]
    invalid: list[tuple[str, Fields, str]]  # entry id, rejection, detail


def plan_batch(entries: list[Entry], settings: Settings, now: datetime) -> RoutePlan:
    """Validate a batch and prepare everything the script may write.

    Whatever an entry holds, it ends here as valid or INVALID: an error nobody foresaw
    while checking one entry makes that entry INVALID with the error, never the batch fail.
    """
    skew = timedelta(seconds=settings.clock_skew_s)
    valid = []
    invalid = []
    for entry in entries:
        try:
            env, decision = validate(entry.fields, now, skew, settings.quote_assets)
            identity = dedup_identity(env, entry.id, settings.dedup_fields)
            routed = Routed(
                entry.id,
                keys.dedup(identity),
                intent_payload(env, decision, entry.id),
                env.trace_id,
                env.correlation_id,
                encode_payload(entry.fields),
                keys.partition_of(decision.symbol, settings.partitions),
            )
        except DecodeError as exc:
            detail = f"{exc.field}: {exc.reason}" if exc.field else exc.reason
            invalid.append(
                (entry.id, to_rejection(entry.fields, entry.id, Reason.INVALID, detail, exc.field, now), detail)
            )
            continue
        except Exception as exc:  # one entry must never stop the batch
            detail = f"the decision could not be checked ({type(exc).__name__}: {printable(str(exc), 200)})"
            invalid.append((entry.id, to_rejection(entry.fields, entry.id, Reason.INVALID, detail, "", now), detail))
            continue
        valid.append(routed)
    return RoutePlan(valid, invalid)


def _flat(fields: Fields) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += (name, value)
    return out


class Router:
    """The router service: consumes decisions, produces intents and rejections."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        clock: Callable[[], datetime] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.settings = settings
        self.clock = clock or (lambda: datetime.now(UTC))
        self.streams = settings.streams
        self._route = register(redis, "route")
        # One intent stream, or one per partition (QT_PARTITIONS): a symbol's intents always go to the same one.
        self.intent_streams = [
            keys.partition_stream(settings.streams.intent, k, settings.partitions) for k in range(settings.partitions)
        ]
        self.consumer = GroupConsumer.for_stage(
            redis, settings, keys.ROUTER, self.streams.decision, self.streams.router_group
        )
        # With QT_PARTITIONS > 1, also the decision stream's partitions (``publisher``): one router at a time each.
        self.partitioned = (
            Partitioned(redis, settings, keys.ROUTER, self.streams.decision, self.streams.router_group)
            if settings.partitions > 1
            else None
        )
        self.totals = {"intents": 0, "duplicates": 0, "invalid": 0, "skipped": 0}
        self._last_batch: asyncio.Future[None] | None = None

    async def handle(self, entries: list[Entry], lane: GroupConsumer | None = None, fence: Fence | None = None) -> None:
        """Route one batch in one script call.

        With batches in flight, each batch's script runs after the one read before it has
        finished, so intents keep the decisions' order (the planning still overlaps). ``lane``: the
        decision partition read from (default: the one decision stream). No ``fence`` is needed: the
        new holder routes the old one's decisions first, and route.lua skips what is acknowledged.
        """
        earlier = self._last_batch
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_batch = finished
        try:
            await self._route_batch(entries, earlier, (lane or self.consumer).stream)
        finally:
            finished.set_result(None)
            if self._last_batch is finished:
                self._last_batch = None

    async def _route_batch(self, entries: list[Entry], earlier: asyncio.Future[None] | None, stream: str) -> None:
        now = self.clock()
        plan = plan_batch(entries, self.settings, now)
        valid: list[str] = []
        for routed in plan.valid:
            valid += (routed.entry_id, routed.payload, routed.trace_id, routed.correlation_id, routed.original)
            valid.append(str(routed.partition))
        invalid = [[entry_id, _flat(rejection)] for entry_id, rejection, _detail in plan.invalid]
        args: list[str | int | bytes] = [
            self.streams.router_group,
            self.settings.dedup_window_s,
            now_iso(now),
            pack(valid),
            pack(invalid),
            "1" if self.settings.partitions > 1 else "0",
        ]
        script_keys = [stream, self.intent_streams[0], self.streams.rejected]
        script_keys += [routed.dedup_key for routed in plan.valid]
        script_keys += self.intent_streams[1:]
        if self.settings.partitions > 1:
            script_keys.append(keys.PARTITION_IDS)
        if earlier is not None:
            await asyncio.wait([earlier])
        reply = await self._route(keys=script_keys, args=args)
        for name, count in zip(self.totals, reply[:4], strict=True):
            self.totals[name] += int(count)
        if self.metrics is not None:  # what the script wrote: an entry another router finished is not ours
            self.metrics.count(keys.ROUTER, "ROUTED", "", int(reply[0]))
            self.metrics.count(keys.ROUTER, "REJECTED", Reason.DUPLICATE_SKIP.value, int(reply[1]))
            self.metrics.count(keys.ROUTER, "REJECTED", Reason.INVALID.value, int(reply[2]))
        records = []
        for entry_id, rej, detail in plan.invalid:
            records.append(
                {
                    "event": "decision_rejected",
                    "outcome": Reason.INVALID.value,
                    "entry_id": entry_id,
                    "detail": detail,
                    "trace_id": rej["trace_id"],
                    "correlation_id": rej["correlation_id"],
                }
            )
        if len(reply) > 4:
            by_id = {entry.id: entry.fields for entry in entries}
            for entry_id in reply[4:]:
                raw = by_id[str(entry_id)]
                records.append(
                    {
                        "event": "decision_rejected",
                        "outcome": Reason.DUPLICATE_SKIP.value,
                        "entry_id": str(entry_id),
                        "trace_id": raw.get("trace_id", ""),
                        "correlation_id": raw.get("correlation_id", ""),
                    }
                )
        emit_outcomes(keys.ROUTER, records)
