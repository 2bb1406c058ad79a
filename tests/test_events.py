"""Envelope and payload encoding: round trips, and bad entries named precisely."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from quantum_trader.bus.streams import Entry, dead_letter_fields
from quantum_trader.errors import DecodeError
from quantum_trader.events import (
    DEAD_LETTER,
    DECISION,
    EXECUTION_RESULT,
    TRADE_INTENT,
    DeadLetter,
    Decision,
    ExecutionResult,
    Reason,
    TradeIntent,
    decode_event,
    encode_payload,
    envelope,
    parse_iso,
)


def test_intent_round_trip_keeps_decimal_quantities_exact() -> None:
    intent = TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.1000000000000000055"), price=Decimal("3000.5"))
    fields = envelope(TRADE_INTENT, intent, trace_id="t1", correlation_id="c1", source="router")

    env, decoded = decode_event(fields, TradeIntent, TRADE_INTENT)

    assert decoded == intent
    assert decoded.qty == Decimal("0.1000000000000000055")
    assert (env.trace_id, env.correlation_id, env.source) == ("t1", "c1", "router")
    assert parse_iso(env.timestamp).tzinfo is not None


def test_missing_envelope_field_is_named_and_raw_kept() -> None:
    raw = {"event_type": DECISION, "payload": "{}", "trace_id": "t"}
    with pytest.raises(DecodeError) as caught:
        decode_event(raw, Decision, DECISION)
    assert caught.value.field == "correlation_id"
    assert caught.value.raw == raw


def test_wrong_event_type_is_refused() -> None:
    fields = envelope(TRADE_INTENT, {"x": 1}, trace_id="t", correlation_id="c", source="s")
    with pytest.raises(DecodeError, match=r"expected 'ai\.decision'"):
        decode_event(fields, Decision, DECISION)


def test_payload_type_error_names_the_field() -> None:
    fields = envelope(
        DECISION,
        {"symbol": "ETHUSDT", "side": "BUY", "qty": "lots"},
        trace_id="t",
        correlation_id="c",
        source="s",
    )
    with pytest.raises(DecodeError) as caught:
        decode_event(fields, Decision, DECISION)
    assert caught.value.field == "qty"


def test_payload_that_is_not_json_is_refused() -> None:
    fields = envelope(DECISION, {}, trace_id="t", correlation_id="c", source="s")
    fields["payload"] = "{not json"
    with pytest.raises(DecodeError, match="not valid JSON") as caught:
        decode_event(fields, Decision, DECISION)
    assert caught.value.field == "payload"


def test_a_reason_code_travels_as_its_own_name_and_its_detail_apart() -> None:
    assert all(code.value == code.name for code in Reason)
    result = ExecutionResult(
        status="REJECTED",
        reason=Reason.INSUFFICIENT_BALANCE,
        detail="need 5 USDT, have 0",
        symbol="ETHUSDT",
        side="BUY",
        qty=Decimal(1),
        intent_id="1-0",
        client_order_id="qt-x",
    )
    payload = json.loads(encode_payload(result))
    assert (payload["reason"], payload["detail"]) == ("INSUFFICIENT_BALANCE", "need 5 USDT, have 0")
    fields = envelope(EXECUTION_RESULT, result, trace_id="t", correlation_id="c", source="execution")
    assert decode_event(fields, ExecutionResult, EXECUTION_RESULT)[1].reason == Reason.INSUFFICIENT_BALANCE


def test_a_dead_letter_payload_is_the_dead_letter_struct() -> None:
    entry = Entry("5-0", {"trace_id": "t", "payload": "\udcff{"}, deliveries=3)
    fields = dead_letter_fields(stream="s", group="g", entry=entry, reason="undecodable", field_name="payload")

    _env, letter = decode_event(fields, DeadLetter, DEAD_LETTER)

    assert letter == DeadLetter(
        stream="s",
        group="g",
        entry_id="5-0",
        deliveries=3,
        reason="undecodable",
        field="payload",
        raw={"trace_id": "t", "payload": "\\xff{"},
        raw_base64={"payload": "/3s="},
    )
    assert json.loads(encode_payload(letter)) == json.loads(fields["payload"])  # same wire, field for field
