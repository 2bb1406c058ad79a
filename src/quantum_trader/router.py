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

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, GroupConsumer
from quantum_trader.errors import DecodeError
from quantum_trader.events import (
    DECISION,
    DECISION_REJECTED,
    Decision,
    Envelope,
    Fields,
    Rejection,
    TradeIntent,
    decode_envelope,
    encode_payload,
    envelope,
    now_iso,
    parse_iso,
)
from quantum_trader.logs import emit_outcomes
from quantum_trader.scripts import pack, register
from quantum_trader.settings import Settings

_json = msgspec.json.Decoder(float_hook=Decimal)
_ALLOWED_SYMBOL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/:-_.")


def _decimal(payload: dict[str, Any], name: str, *, required: bool) -> Decimal | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise DecodeError(f"{name} is missing", field=name)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise DecodeError(f"{name} must be a number or decimal string, got {type(value).__name__}", field=name)
    try:
        number = Decimal(value) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise DecodeError(f"{name} {value!r} is not a decimal number", field=name) from None
    if not number.is_finite():
        raise DecodeError(f"{name} must be finite, got {value}", field=name)
    if number <= 0:
        raise DecodeError(f"{name} must be positive, got {value}", field=name)
    return number


def validate(raw: Fields, now: datetime, clock_skew: timedelta) -> tuple[Envelope, Decision]:
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
        if not isinstance(payload, dict):
            raise DecodeError("payload must be a JSON object", field="payload")
        symbol = payload.get("symbol")
        if not isinstance(symbol, str) or not symbol.strip():
            raise DecodeError("symbol is missing or empty", field="symbol")
        symbol = symbol.strip().upper()
        if not set(symbol) <= _ALLOWED_SYMBOL_CHARS:
            raise DecodeError(f"symbol {symbol!r} has characters other than letters and digits", field="symbol")
        side = payload.get("side")
        if not isinstance(side, str) or side.strip().upper() not in ("BUY", "SELL"):
            raise DecodeError(f"side must be BUY or SELL, got {side!r}", field="side")
        qty = _decimal(payload, "qty", required=True)
        order_type = payload.get("order_type", "MARKET")
        if not isinstance(order_type, str) or order_type.upper() not in ("MARKET", "LIMIT"):
            raise DecodeError(f"order_type must be MARKET or LIMIT, got {order_type!r}", field="order_type")
        order_type = order_type.upper()
        price = _decimal(payload, "price", required=order_type == "LIMIT")
        confidence = payload.get("confidence")
        if confidence is not None:
            if isinstance(confidence, bool) or not isinstance(confidence, (int, Decimal)):
                raise DecodeError(f"confidence must be a number in [0, 1], got {confidence!r}", field="confidence")
            if not (0 <= confidence <= 1) or not math.isfinite(float(confidence)):
                raise DecodeError(f"confidence must be in [0, 1], got {confidence}", field="confidence")
        strategy = payload.get("strategy")
        model_version = payload.get("model_version")
        decision = Decision(
            symbol=symbol,
            side=side.strip().upper(),  # type: ignore[arg-type]
            qty=qty,  # type: ignore[arg-type]
            order_type=order_type,  # type: ignore[arg-type]
            price=price,
            confidence=None if confidence is None else float(confidence),
            strategy=str(strategy) if strategy is not None else None,
            model_version=str(model_version) if model_version is not None else None,
        )
        return env, decision
    except DecodeError as exc:
        raise DecodeError(exc.reason, field=exc.field, raw=raw) from None


def dedup_identity(env: Envelope, entry_id: str, fields: list[str]) -> str:
    """The decision's identity for dedup.

    The configured envelope fields joined with ``||``; when the decision carries none
    of its identity fields (``msg_id`` aside), a fingerprint of its content instead, so
    that unrelated anonymous decisions never collide on an empty key.
    """
    values = {"correlation_id": env.correlation_id, "trace_id": env.trace_id, "msg_id": entry_id}
    if not any(values[name] for name in fields if name != "msg_id"):
        content = "\x1f".join((env.event_type, env.payload, env.timestamp, env.source))
        return "fp:" + hashlib.sha256(content.encode()).hexdigest()
    return "||".join(values[name] for name in fields)


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
        decision_id=entry_id,
        decision_ts=env.timestamp,
    )
    return encode_payload(intent)


def to_rejection(raw: Fields, entry_id: str, reason: str, detail: str, field: str, now: datetime) -> Fields:
    """A rejection entry: the reason, the detail, and the original fields untouched."""
    payload = Rejection(reason=reason, detail=detail, field=field, original_id=entry_id, original=dict(raw))  # type: ignore[arg-type]
    fields = envelope(
        DECISION_REJECTED,
        payload,
        trace_id=raw.get("trace_id", ""),
        correlation_id=raw.get("correlation_id", ""),
        source="router",
        timestamp=now_iso(now),
    )
    fields["reason"] = reason
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


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What one batch will do, decided without the server."""

    valid: list[Routed]
    invalid: list[tuple[str, Fields, str]]  # entry id, rejection, detail


def plan_batch(entries: list[Entry], settings: Settings, now: datetime) -> RoutePlan:
    """Validate a batch and prepare everything the script may write."""
    skew = timedelta(seconds=settings.clock_skew_s)
    valid = []
    invalid = []
    for entry in entries:
        try:
            env, decision = validate(entry.fields, now, skew)
        except DecodeError as exc:
            detail = f"{exc.field}: {exc.reason}" if exc.field else exc.reason
            invalid.append((entry.id, to_rejection(entry.fields, entry.id, "INVALID", detail, exc.field, now), detail))
            continue
        identity = dedup_identity(env, entry.id, settings.dedup_fields)
        valid.append(
            Routed(
                entry.id,
                keys.dedup(identity),
                intent_payload(env, decision, entry.id),
                env.trace_id,
                env.correlation_id,
                encode_payload(entry.fields),
            )
        )
    return RoutePlan(valid, invalid)


def _flat(fields: Fields) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += (name, value)
    return out


class Router:
    """The router service: consumes decisions, produces intents and rejections."""

    def __init__(self, redis: Redis, settings: Settings, clock: Callable[[], datetime] | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock or (lambda: datetime.now(UTC))
        self.streams = settings.streams
        self._route = register(redis, "route")
        self.consumer = GroupConsumer.for_stage(
            redis, settings, "router", self.streams.decision, self.streams.router_group
        )
        self.totals = {"intents": 0, "duplicates": 0, "invalid": 0, "skipped": 0}

    async def handle(self, entries: list[Entry]) -> None:
        """Route one batch in one script call."""
        now = self.clock()
        plan = plan_batch(entries, self.settings, now)
        valid: list[str] = []
        for routed in plan.valid:
            valid += (routed.entry_id, routed.payload, routed.trace_id, routed.correlation_id, routed.original)
        invalid = [[entry_id, _flat(rejection)] for entry_id, rejection, _detail in plan.invalid]
        args: list[str | int | bytes] = [
            self.streams.router_group,
            self.settings.dedup_window_s,
            now_iso(now),
            pack(valid),
            pack(invalid),
        ]
        script_keys = [self.streams.decision, self.streams.intent, self.streams.rejected]
        script_keys += [routed.dedup_key for routed in plan.valid]
        reply = await self._route(keys=script_keys, args=args)
        for name, count in zip(self.totals, reply[:4], strict=True):
            self.totals[name] += int(count)
        records = []
        for entry_id, rej, detail in plan.invalid:
            records.append(
                {
                    "event": "decision_rejected",
                    "outcome": "INVALID",
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
                        "outcome": "DUPLICATE_SKIP",
                        "entry_id": str(entry_id),
                        "trace_id": raw.get("trace_id", ""),
                        "correlation_id": raw.get("correlation_id", ""),
                    }
                )
        emit_outcomes("router", records)
