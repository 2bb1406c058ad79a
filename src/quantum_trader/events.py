"""Typed, immutable events and the stream envelope they travel in.

Every stream entry carries the seed's envelope fields: ``event_type``, ``payload``
(JSON), ``trace_id``, ``correlation_id``, ``timestamp`` (ISO-8601 UTC) and ``source``.
Payloads are msgspec structs: frozen, fast to (de)serialise on the hot path, and
decimal quantities stay decimals (encoded as JSON strings).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar

import msgspec

from quantum_trader.errors import DecodeError

ENVELOPE_FIELDS = ("event_type", "payload", "trace_id", "correlation_id", "timestamp", "source")

DECISION = "ai.decision"
TRADE_INTENT = "trade.intent"
EXECUTION_RESULT = "execution.result"
DECISION_REJECTED = "decision.rejected"
DEAD_LETTER = "dead_letter"

Side = Literal["BUY", "SELL"]
OrderType = Literal["MARKET", "LIMIT"]
Status = Literal["FILLED", "REJECTED", "EXPIRED", "FAILED"]

Fields = dict[str, str]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What the AI engine wants traded (payload of ``ai.decision``), already validated."""

    symbol: str
    side: Side
    qty: Decimal
    order_type: OrderType = "MARKET"
    price: Decimal | None = None
    confidence: float | None = None
    strategy: str | None = None
    model_version: str | None = None


class TradeIntent(Decision, frozen=True, kw_only=True):
    """A valid, first-seen decision handed to execution (payload of ``trade.intent``)."""

    decision_id: str = ""
    decision_ts: str = ""


class ExecutionResult(msgspec.Struct, frozen=True, kw_only=True):
    """The one terminal outcome of an intent (payload of ``execution.result``)."""

    status: Status
    symbol: str
    side: str
    qty: Decimal
    intent_id: str
    client_order_id: str
    reason: str = ""
    detail: str = ""
    filled_qty: Decimal = Decimal(0)
    avg_price: Decimal | None = None
    fee: Decimal = Decimal(0)
    fee_asset: str = ""
    exchange_order_id: str = ""
    decision_id: str = ""
    exchange: str = ""


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """Why the router did not turn a decision into an intent (payload of ``decision.rejected``)."""

    reason: Literal["INVALID", "DUPLICATE_SKIP"]
    detail: str
    field: str = ""
    original_id: str = ""
    original: dict[str, str] = msgspec.field(default_factory=dict)


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """The seed's stream entry fields, payload still raw JSON."""

    event_type: str
    payload: str
    trace_id: str
    correlation_id: str
    timestamp: str
    source: str

    def fields(self) -> Fields:
        """The entry as stream fields for XADD."""
        return {
            "event_type": self.event_type,
            "payload": self.payload,
            "trace_id": self.trace_id,
            "correlation_id": self.correlation_id,
            "timestamp": self.timestamp,
            "source": self.source,
        }


P = TypeVar("P", bound=msgspec.Struct)

_encoder = msgspec.json.Encoder(decimal_format="string")


def now_iso(now: datetime | None = None) -> str:
    """ISO-8601 UTC timestamp with a ``Z`` suffix, microsecond precision."""
    moment = now or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    """Parse an ISO-8601 timestamp; naive means UTC. Raises ValueError when malformed."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def encode_payload(payload: msgspec.Struct | dict[str, Any]) -> str:
    """Payload struct -> JSON text for the envelope."""
    return _encoder.encode(payload).decode()


def envelope(
    event_type: str,
    payload: msgspec.Struct | dict[str, Any],
    *,
    trace_id: str,
    correlation_id: str,
    source: str,
    timestamp: str | None = None,
) -> Fields:
    """Build the stream fields of one event."""
    return {
        "event_type": event_type,
        "payload": encode_payload(payload),
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "timestamp": timestamp or now_iso(),
        "source": source,
    }


def decode_envelope(raw: Fields, expected_type: str | None = None) -> Envelope:
    """Check a raw entry has every envelope field (and the expected event type)."""
    missing = [name for name in ENVELOPE_FIELDS if name not in raw]
    if missing:
        raise DecodeError(f"missing envelope field(s): {', '.join(missing)}", field=missing[0], raw=raw)
    if expected_type is not None and raw["event_type"] != expected_type:
        raise DecodeError(
            f"event_type is {raw['event_type']!r}, expected {expected_type!r}",
            field="event_type",
            raw=raw,
        )
    return Envelope(**{name: raw[name] for name in ENVELOPE_FIELDS})


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_payload(raw: Fields, kind: type[P]) -> P:
    """Decode the ``payload`` JSON of an entry into ``kind``; DecodeError names the field."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw.get("payload", ""))  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = message.rsplit("`$.", 1)[-1].rstrip("`").split("[")[0] if "`$." in message else "payload"
        raise DecodeError(f"payload: {message}", field=field, raw=raw) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"payload is not valid JSON: {exc}", field="payload", raw=raw) from None


def decode_event(raw: Fields, kind: type[P], expected_type: str) -> tuple[Envelope, P]:
    """Envelope and typed payload of one entry, or DecodeError carrying the raw fields."""
    env = decode_envelope(raw, expected_type)
    return env, decode_payload(raw, kind)
