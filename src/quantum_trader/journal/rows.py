"""Stream entries as journal rows (pure): results, rejections, dead letters and trading-state changes.

A result, rejection or trading-state change that does not decode is not a row: the stage sets
it aside on the dead-letter stream with its raw fields, like every stage does (``dlq list``
shows it, and the journal then records that dead letter as a row). A dead letter always
becomes a row, decoded or not, so nothing the journal reads from the dead-letter stream ever
goes back to it.

Text is stored as the entry held it, made safe for any database: bytes that were not UTF-8
as ``\\xNN`` and NUL characters (which PostgreSQL text refuses) as ``\\x00``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from quantum_trader.bus.dead_letters import Refusal
from quantum_trader.bus.streams import Entry, parse_id
from quantum_trader.errors import DecodeError
from quantum_trader.events import (
    DEAD_LETTER,
    DECISION_REJECTED,
    ENVELOPE_FIELDS,
    EXECUTION_RESULT,
    RISK_STATE,
    DeadLetter,
    Envelope,
    ExecutionResult,
    Fields,
    Rejection,
    StateChange,
    decode_payload,
    parse_iso,
    printable,
    record_fields,
)
from quantum_trader.keys import StreamNames
from quantum_trader.portfolio import fill_of

Row = dict[str, Any]
# Text kept whole up to this many characters (an oversize value keeps its size and SHA-256).
KEEP_CHARS = 4_096


def clean(text: str, keep: int = KEEP_CHARS) -> str:
    """``text`` any database stores: printable (see events.printable), and without NUL characters."""
    if len(text) <= keep and text.isascii() and "\x00" not in text:
        return text  # the common case, on the hot path: nothing to change
    safe = printable(text, keep)
    return safe.replace("\x00", "\\x00") if "\x00" in safe else safe


def _clean_all(value: Any) -> Any:
    """Every string inside a JSON-like value cleaned (keys too)."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(key), 256): _clean_all(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean_all(item) for item in value]
    return value


def entry_key(entry_id: str) -> Row:
    """The row's key: the stream entry id and its two numbers (for ordering)."""
    ms, seq = parse_id(entry_id)
    return {"entry_id": entry_id, "entry_ms": ms, "entry_seq": seq}


def _envelope(raw: Fields, expected: str) -> Envelope:
    missing = [name for name in ENVELOPE_FIELDS if name not in raw]
    if missing:
        raise DecodeError(f"missing envelope field(s): {', '.join(missing)}", field=missing[0], raw=raw)
    if raw["event_type"] != expected:
        raise DecodeError(f"event_type is {clean(raw['event_type'], 64)!r}, expected {expected!r}", field="event_type")
    return Envelope(**{name: raw[name] for name in ENVELOPE_FIELDS})


def _timestamp(text: str, name: str = "timestamp") -> datetime:
    try:
        return parse_iso(text).astimezone(UTC)  # SQLite keeps no offset: every time is stored in UTC
    except ValueError:
        raise DecodeError(f"{name} {clean(text, 64)!r} is not an ISO-8601 time", field=name) from None


def _envelope_columns(env: Envelope, moment: datetime | None) -> Row:
    return {
        "trace_id": clean(env.trace_id),
        "correlation_id": clean(env.correlation_id),
        "timestamp": moment,
        "source": clean(env.source),
    }


def _decoding(entry: Entry, what: str, build: Any) -> Row:
    """``build()``, with any failure as this entry's DecodeError (never the batch's)."""
    try:
        row: Row = build()
    except DecodeError as exc:
        raise DecodeError(f"undecodable {what}: {exc.reason}", field=exc.field, raw=entry.fields) from None
    except Exception as exc:
        raise DecodeError(
            f"undecodable {what}: {type(exc).__name__}: {printable(str(exc), 200)}", raw=entry.fields
        ) from None
    return row


def result_row(entry: Entry, quote_assets: Sequence[str]) -> Row:
    """One ``execution.result`` entry as a ``results`` row; DecodeError when it is not one."""

    def build() -> Row:
        env = _envelope(entry.fields, EXECUTION_RESULT)
        moment = _timestamp(env.timestamp)
        result = decode_payload(entry.fields, ExecutionResult)
        fill = fill_of(result, quote_assets)
        return {
            **entry_key(entry.id),
            "status": result.status,
            "reason": clean(result.reason),
            "detail": clean(result.detail),
            "symbol": clean(result.symbol),
            "side": clean(result.side),
            "qty": result.qty,
            "filled_qty": result.filled_qty,
            "avg_price": result.avg_price,
            "fee": result.fee,
            "fee_asset": clean(result.fee_asset),
            "client_order_id": clean(result.client_order_id),
            "exchange_order_id": clean(result.exchange_order_id),
            "intent_id": clean(result.intent_id),
            "decision_id": clean(result.decision_id),
            "exchange": clean(result.exchange),
            "strategy": clean(result.strategy),
            "confidence": result.confidence,
            "is_fill": fill is not None,
            "base": clean(fill.base) if fill else "",
            "quote": clean(fill.quote) if fill else "",
            **_envelope_columns(env, moment),
        }

    return _decoding(entry, "execution result", build)


def rejection_row(entry: Entry) -> Row:
    """One ``decision.rejected`` entry as a ``rejections`` row; DecodeError when it is not one."""

    def build() -> Row:
        env = _envelope(entry.fields, DECISION_REJECTED)
        moment = _timestamp(env.timestamp)
        rejection = decode_payload(entry.fields, Rejection)
        return {
            **entry_key(entry.id),
            "reason": str(rejection.reason),
            "field": clean(rejection.field),
            "detail": clean(rejection.detail),
            "original_id": clean(rejection.original_id),
            "original": _clean_all(rejection.original),
            "original_base64": _clean_all(rejection.original_base64),
            **_envelope_columns(env, moment),
        }

    return _decoding(entry, "rejection", build)


def trading_state_row(entry: Entry) -> Row:
    """One ``risk.state`` entry as a ``trading_states`` row; DecodeError when it is not one.

    ``state`` and ``previous`` must be states this version knows and ``at`` a time: a change the
    journal cannot place is set aside whole rather than recorded half. ``reason`` is kept as
    written (a newer breaker's code is still a change).
    """

    def build() -> Row:
        env = _envelope(entry.fields, RISK_STATE)
        moment = _timestamp(env.timestamp)
        change = decode_payload(entry.fields, StateChange)
        return {
            **entry_key(entry.id),
            "state": change.state.value,
            "previous": change.previous.value,
            "reason": clean(change.reason),
            "detail": clean(change.detail),
            "by": clean(change.by),
            "at": _timestamp(change.at, "at"),
            "until": _timestamp(change.until, "until") if change.until else None,
            **_envelope_columns(env, moment),
        }

    return _decoding(entry, "trading-state change", build)


def dead_letter_row(entry: Entry) -> Row:
    """One dead-letter entry as a ``dead_letters`` row, always: one that does not decode keeps its raw fields."""
    try:
        env = _envelope(entry.fields, DEAD_LETTER)
        moment = _timestamp(env.timestamp)
        letter = decode_payload(entry.fields, DeadLetter)
    except Exception as exc:
        reason = exc.reason if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
        return unreadable_dead_letter_row(entry, f"the dead letter does not decode: {reason}")
    return {
        **entry_key(entry.id),
        "reason": clean(entry.fields.get("reason") or letter.reason),
        "origin_stream": clean(entry.fields.get("origin_stream") or letter.stream),
        "origin_id": clean(entry.fields.get("origin_id") or letter.entry_id),
        "origin_group": clean(letter.group),
        "field": clean(letter.field),
        "deliveries": letter.deliveries,
        "payload": _clean_all(msgspec.to_builtins(letter)),
        "problem": "",
        **_envelope_columns(env, moment),
    }


def unreadable_dead_letter_row(entry: Entry, problem: str) -> Row:
    """A ``dead_letters`` row for an entry known only by its raw fields (nothing in it can fail to store)."""
    raw, exact = record_fields(entry.fields)
    fields = entry.fields
    return {
        **entry_key(entry.id),
        "reason": clean(fields.get("reason", "")),
        "origin_stream": clean(fields.get("origin_stream", "")),
        "origin_id": clean(fields.get("origin_id", "")),
        "origin_group": "",
        "field": "",
        "deliveries": None,
        "payload": _clean_all({"raw": raw, "raw_base64": exact}),
        "problem": clean(problem),
        "trace_id": clean(fields.get("trace_id", "")),
        "correlation_id": clean(fields.get("correlation_id", "")),
        "timestamp": None,
        "source": clean(fields.get("source", "")),
    }


def set_aside_entry(entry: Entry, group: str, streams: Sequence[str]) -> tuple[str, Entry] | None:
    """The entry a dead letter holds, as it was, when ``group`` set it aside from one of ``streams``.

    A stage that keeps dying while it handles one entry alone sets that entry aside, though the
    deaths may have come from outside (an OOM killer, a watchdog, an operator's SIGKILL). The
    journal then records the entry from its dead letter all the same, under its own entry id, so
    a result set aside this way still moves the book. None when the dead letter came from
    elsewhere or does not hold the entry whole (a field that was not UTF-8 or was cut).
    """
    try:
        letter = decode_payload(entry.fields, DeadLetter)
    except Exception:
        return None
    if letter.group != group or letter.stream not in streams or letter.raw_base64:
        return None
    fields = dict(letter.raw)
    if any(printable(value) != value for value in fields.values()):
        return None  # recorded as printable text, not as it was
    return letter.stream, Entry(letter.entry_id, fields)


def replay_refusal(streams: StreamNames) -> Refusal:
    """The check ``dlq replay`` runs for the journal: an entry it set aside was recorded from its dead letter.

    Put back, it would come in again under a new entry id and be recorded twice (a fill counted twice).
    """
    journaled = {streams.result, streams.rejected, streams.risk_state}

    async def refuse(dead_id: str, payload: dict[str, object]) -> str | None:
        if payload.get("group") == streams.journal_group and payload.get("stream") in journaled:
            return (
                f"dead-letter entry {dead_id} was set aside by the journal, which records it from the dead letter "
                f"(see the journal's dead_letters and {payload.get('stream')} rows); replaying it would record it "
                "twice. Remove the entry with XDEL once it is checked"
            )
        return None

    return refuse
