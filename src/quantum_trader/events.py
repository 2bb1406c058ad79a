"""The contract: typed, immutable events, the reason codes, and the stream envelope they travel in.

Every stream entry carries the seed's envelope fields: ``event_type``, ``payload``
(JSON), ``trace_id``, ``correlation_id``, ``timestamp`` (ISO-8601 UTC) and ``source``.
Payloads are msgspec structs: frozen, fast to (de)serialise on the hot path, and
decimal quantities stay decimals (encoded as JSON strings). A refusal carries a code
(``Reason``) and a detail in words, each in its own field.

One piece: this module is the wire contract every stage and every outside publisher
shares; split, a reader would have to assemble the format of one entry from several files.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal, TypeVar

import msgspec

from quantum_trader.errors import DecodeError

ENVELOPE_FIELDS = ("event_type", "payload", "trace_id", "correlation_id", "timestamp", "source")

DECISION = "ai.decision"
TRADE_INTENT = "trade.intent"
EXECUTION_RESULT = "execution.result"
DECISION_REJECTED = "decision.rejected"
DEAD_LETTER = "dead_letter"
MARKET_CANDLE = "market.candle"
RISK_STATE = "risk.state"

Side = Literal["BUY", "SELL"]
OrderType = Literal["MARKET", "LIMIT"]
Status = Literal["FILLED", "REJECTED", "EXPIRED", "FAILED"]

Fields = dict[str, str]


class Reason(StrEnum):
    """Every code an outcome or a rejection carries on the streams (the value is the wire text)."""

    # The governor (execution writes them)
    KILL_SWITCH = "KILL_SWITCH"  # the switch is not exactly "0", checked at the gate or right before sending
    DAILY_LIMIT = "DAILY_LIMIT"
    MAX_NOTIONAL = "MAX_NOTIONAL"
    SYMBOL_NOT_ALLOWED = "SYMBOL_NOT_ALLOWED"
    NO_PRICE = "NO_PRICE"  # also the exchanges': no price to value or fill the order
    EXPIRED = "EXPIRED"
    # The risk rules (governor): the trading state, the position and exposure limits, the cooldown
    HALTED = "HALTED"  # the trading state is HALTED: nothing passes
    REDUCING = "REDUCING"  # the trading state is REDUCING: only orders that reduce a position pass
    MAX_POSITION = "MAX_POSITION"
    MAX_EXPOSURE = "MAX_EXPOSURE"
    COOLDOWN = "COOLDOWN"  # too many losing exits on the symbol lately: no new entries for a while
    # Why the trading state changed (``risk.state`` events)
    OPERATOR = "OPERATOR"
    DAILY_LOSS = "DAILY_LOSS"
    DRAWDOWN = "DRAWDOWN"
    DAY_RESET = "DAY_RESET"  # a daily-loss halt ends at the next UTC midnight
    # The router
    INVALID = "INVALID"  # also the exchanges': a LIMIT order without price
    DUPLICATE_SKIP = "DUPLICATE_SKIP"
    # The exchanges
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    LIMIT_NOT_MARKETABLE = "LIMIT_NOT_MARKETABLE"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    LOT_SIZE = "LOT_SIZE"  # the market's rules, checked before sending
    PRICE_FILTER = "PRICE_FILTER"
    MIN_NOTIONAL = "MIN_NOTIONAL"
    PARTIAL_FILL = "PARTIAL_FILL"  # FILLED, but less than asked
    ORDER_OPEN = "ORDER_OPEN"  # nothing filled; ORDER_<the order's status at the exchange>
    ORDER_CLOSED = "ORDER_CLOSED"
    ORDER_CANCELED = "ORDER_CANCELED"
    ORDER_EXPIRED = "ORDER_EXPIRED"
    ORDER_REJECTED = "ORDER_REJECTED"
    ORDER_UNKNOWN = "ORDER_UNKNOWN"
    EXCHANGE_REJECTED = "EXCHANGE_REJECTED"
    EXCHANGE_ERROR = "EXCHANGE_ERROR"
    EXCHANGE_UNAVAILABLE = "EXCHANGE_UNAVAILABLE"
    AUTH_FAILED = "AUTH_FAILED"


# What one stream entry may hold (README, "Limits of an entry"). An entry beyond them is
# refused naming the field, before anything parses it: a 1 MiB field or a payload nested
# thousands of levels deep costs the stage nothing but a rejection.
MAX_FIELDS = 32
MAX_NAME_CHARS = 64
MAX_FIELD_CHARS = 256  # every field but the payload: ids, timestamp, source, extras
MAX_PAYLOAD_CHARS = 16_384
# An oversize field is recorded (rejection, dead letter) up to this many characters, with
# its full size and SHA-256, so the record stays small while the entry stays identifiable.
RECORD_KEEP_CHARS = 4_096


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What the AI engine wants traded (payload of ``ai.decision``), already validated.

    ``stop_loss`` and ``take_profit``: prices at which the position an entry (BUY) builds is
    closed by the protect service (see ``protect``); absent, the defaults of the settings apply.
    """

    symbol: str
    side: Side
    qty: Decimal
    order_type: OrderType = "MARKET"
    price: Decimal | None = None
    confidence: float | None = None
    strategy: str | None = None
    model_version: str | None = None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None


class TradeIntent(Decision, frozen=True, kw_only=True):
    """A valid, first-seen decision handed to execution (payload of ``trade.intent``)."""

    decision_id: str = ""
    decision_ts: str = ""


class ExecutionResult(msgspec.Struct, frozen=True, kw_only=True):
    """The one terminal outcome of an intent (payload of ``execution.result``).

    ``reason`` is a ``Reason`` code ("" for a fill), typed ``str`` so that a reader of the
    stream never fails on a code it does not know yet.
    """

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
    # The decision's, carried through so the journal can book PnL per strategy.
    strategy: str = ""
    confidence: float | None = None


class TradingState(StrEnum):
    """What the governor lets through: everything, only orders that reduce a position, or nothing."""

    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"

    @property
    def severity(self) -> int:
        """0 ACTIVE, 1 REDUCING, 2 HALTED: a breaker only ever moves the state up."""
        return (TradingState.ACTIVE, TradingState.REDUCING, TradingState.HALTED).index(self)


class StateChange(msgspec.Struct, frozen=True, kw_only=True):
    """One change of the trading state (payload of ``risk.state``): to what, from what, who, why, when.

    ``reason``: OPERATOR, DAILY_LOSS, DRAWDOWN or DAY_RESET; ``by``: the operator's name or the
    process that tripped the breaker; ``until``: when the state ends by itself ("" never).
    """

    state: TradingState
    previous: TradingState
    reason: str
    detail: str
    by: str
    at: str
    until: str = ""


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """Why the router did not turn a decision into an intent (payload of ``decision.rejected``).

    ``original`` holds the entry as printable text (see ``record_fields``); ``original_base64``
    the exact bytes of any field that was not valid UTF-8.
    """

    reason: Reason  # INVALID or DUPLICATE_SKIP
    detail: str
    field: str = ""
    original_id: str = ""
    original: dict[str, str] = msgspec.field(default_factory=dict)
    original_base64: dict[str, str] = msgspec.field(default_factory=dict)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An entry set aside (payload of ``dead_letter``): where it came from, why, and its raw fields.

    ``raw`` holds the entry as printable text (see ``record_fields``); ``raw_base64`` the exact
    bytes of any field that was not valid UTF-8, so a replay puts back what was there.
    """

    stream: str
    group: str
    entry_id: str
    deliveries: int
    reason: str
    field: str = ""
    raw: dict[str, str] = msgspec.field(default_factory=dict)
    raw_base64: dict[str, str] = msgspec.field(default_factory=dict)


class Candle(msgspec.Struct, frozen=True, kw_only=True):
    """One OHLCV bar (payload of ``market.candle``); ``open_time`` in epoch milliseconds (UTC)."""

    symbol: str
    interval: str
    open_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float


def candle_problem(candle: Candle) -> str | None:
    """Why a decoded candle cannot be believed (no strategy sees it, no stop fires on it), or None."""
    prices = (candle.open, candle.high, candle.low, candle.close)
    if not all(math.isfinite(p) for p in (*prices, candle.volume)):
        return "non-finite price or volume"
    if min(prices) <= 0:
        return "zero or negative price"
    if candle.volume < 0:
        return "negative volume"
    if candle.high < max(candle.open, candle.close, candle.low) or candle.low > min(candle.open, candle.close):
        return "high/low do not contain open and close"
    return None


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


# Amounts between 1e-18 and 1e16: prices and quantities of any real market, and products that
# decimal arithmetic computes exactly enough (no overflow, no underflow to zero).
MIN_EXPONENT, MAX_EXPONENT = -18, 15


# ASCII decimal notation only: no other scripts' digits, no underscores, no hex, no spaces.
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?\Z")
MAX_NUMBER_CHARS = 40


def is_decimal_text(text: str) -> bool:
    """``0.1``, ``1e-3``, ``12``: yes. ``1_000``, ``0x10``, `` 12 ``, other scripts' digits: no."""
    return len(text) <= MAX_NUMBER_CHARS and _DECIMAL_TEXT.match(text) is not None


class _Amounts(msgspec.Struct):
    qty: Any = None
    price: Any = None
    stop_loss: Any = None
    take_profit: Any = None


_amounts = msgspec.json.Decoder(_Amounts)


def check_amount_texts(payload: str) -> None:
    """DecodeError when an amount (``qty``, ``price``, the levels) is a string that is not ASCII decimal notation.

    (msgspec reads ``"1_000"`` or Arabic-Indic digits into a Decimal without a word.)
    """
    amounts = _amounts.decode(payload)
    for name in amounts.__struct_fields__:
        value = getattr(amounts, name)
        if isinstance(value, str) and not is_decimal_text(value):
            raise DecodeError(f"{name} {printable(value, 40)!r} is not a decimal number in ASCII notation", field=name)


def check_amount(number: Decimal, name: str) -> Decimal:
    """A positive, finite amount within the bounds, or DecodeError naming ``name``."""
    if not number.is_finite():
        raise DecodeError(f"{name} must be finite, got {number}", field=name)
    if number <= 0:
        raise DecodeError(f"{name} must be positive, got {number}", field=name)
    if not MIN_EXPONENT <= number.adjusted() <= MAX_EXPONENT:
        raise DecodeError(f"{name} {number:.6e} is outside 1e{MIN_EXPONENT} .. 1e{MAX_EXPONENT + 1}", field=name)
    return number


def is_utf8(text: str) -> bool:
    """False when ``text`` holds bytes that were not UTF-8 (read as surrogate escapes)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def raw_bytes(text: str) -> bytes:
    """The exact bytes a field held on the server (the client reads with surrogate escapes)."""
    return text.encode("utf-8", "surrogateescape")


def printable(text: str, keep: int = RECORD_KEEP_CHARS) -> str:
    """``text`` safe to encode anywhere: bad bytes as ``\\xNN``, cut to ``keep`` characters with its size and digest."""
    clean = text if is_utf8(text) else raw_bytes(text).decode("utf-8", "backslashreplace")
    if len(clean) <= keep:
        return clean
    digest = hashlib.sha256(raw_bytes(text)).hexdigest()
    return f"{clean[:keep]}...[truncated: {len(text)} characters, sha256 {digest}]"


def record_fields(raw: Fields) -> tuple[dict[str, str], dict[str, str]]:
    """An entry as it can be recorded: printable text, and base64 of every field that was not UTF-8."""
    text: dict[str, str] = {}
    exact: dict[str, str] = {}
    for count, (name, value) in enumerate(raw.items()):
        if count >= 4 * MAX_FIELDS:
            text["..."] = f"{len(raw) - count} more fields not recorded"
            break
        key = printable(name, MAX_NAME_CHARS * 4)
        text[key] = printable(value)
        if not (is_utf8(name) and is_utf8(value)) and len(value) <= RECORD_KEEP_CHARS:
            exact[key] = base64.b64encode(raw_bytes(value)).decode()
    return text, exact


def check_fields(raw: Fields) -> None:
    """Refuse an entry beyond the limits or with bytes that are not UTF-8, naming the field."""
    if len(raw) > MAX_FIELDS:
        raise DecodeError(f"entry has {len(raw)} fields; at most {MAX_FIELDS} are allowed", raw=raw)
    for name, value in raw.items():
        if len(name) > MAX_NAME_CHARS or not is_utf8(name):
            shown = printable(name, 40)
            raise DecodeError(
                f"field name {shown!r} is not valid UTF-8 or longer than {MAX_NAME_CHARS} characters",
                field=shown,
                raw=raw,
            )
        limit = MAX_PAYLOAD_CHARS if name == "payload" else MAX_FIELD_CHARS
        if len(value) > limit:
            raise DecodeError(f"{name} is {len(value)} characters; at most {limit} are allowed", field=name, raw=raw)
        if not is_utf8(value):
            raise DecodeError(f"{name} is not valid UTF-8", field=name, raw=raw)


def decode_envelope(raw: Fields, expected_type: str | None = None) -> Envelope:
    """Check a raw entry is within the limits, has every envelope field and the expected event type."""
    check_fields(raw)
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
