"""Router: validation names the bad field, dedup keys on identity, every decision has one outcome."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.errors import DecodeError
from quantum_trader.events import TradeIntent, decode_envelope, decode_payload
from quantum_trader.router import Router, dedup_identity, validate
from quantum_trader.settings import Settings
from tests.pipeline import decision, drain, rejections

NOW = datetime(2026, 1, 17, 22, 25, 34, tzinfo=UTC)
SKEW = timedelta(seconds=5)
DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"


# One bad field per row; "timestamp_ahead" moves the decision's timestamp past the allowed skew.
INVALID_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"symbol": None}, "symbol"),
    ({"symbol": "  "}, "symbol"),
    ({"symbol": "ETH USDT"}, "symbol"),
    ({"side": "HOLD"}, "side"),
    ({"side": None}, "side"),
    ({"qty": None}, "qty"),
    ({"qty": "-1"}, "qty"),
    ({"qty": 0}, "qty"),
    ({"qty": "NaN"}, "qty"),
    ({"qty": "Infinity"}, "qty"),
    ({"qty": "ten"}, "qty"),
    ({"qty": True}, "qty"),
    ({"order_type": "STOP"}, "order_type"),
    ({"order_type": "LIMIT", "price": None}, "price"),
    ({"price": "-5"}, "price"),
    ({"confidence": 1.5}, "confidence"),
    ({"confidence": "high"}, "confidence"),
    ({"timestamp_ahead": timedelta(minutes=5)}, "timestamp"),
    # Garbage that must never reach an exchange: a market is a distinct, non-empty ASCII base and
    # a configured quote; numbers are ASCII decimal notation within bounds; no Unicode case folding.
    ({"symbol": "USDTUSDT"}, "symbol"),
    ({"symbol": "USDT/USDT"}, "symbol"),
    ({"symbol": "BTC/BTC"}, "symbol"),
    ({"symbol": "/USDT"}, "symbol"),
    ({"symbol": "ETH:USDT"}, "symbol"),
    ({"symbol": "eth-usdt"}, "symbol"),
    ({"symbol": "\u017folusdt"}, "symbol"),  # long s: upper-cases to S
    ({"symbol": "ETH-"}, "symbol"),
    ({"symbol": "ETH:"}, "symbol"),
    ({"symbol": "ETHXYZ"}, "symbol"),
    ({"qty": "\u0661\u0662"}, "qty"),  # Arabic-Indic 12
    ({"qty": "\uff11\uff12"}, "qty"),  # full-width 12
    ({"qty": "1_000"}, "qty"),
    ({"qty": " 12 "}, "qty"),
    ({"qty": "0x10"}, "qty"),
    ({"qty": "1e999999999"}, "qty"),
    ({"qty": "1e-999999999"}, "qty"),
    ({"price": "1e30"}, "price"),
    ({"side": "\u017fell"}, "side"),  # long s
    ({"order_type": "l\u0131m\u0131t", "price": "1"}, "order_type"),  # dotless i: upper-cases to I
    ({"strategy": "x" * 129}, "strategy"),
    ({"strategy": [[["deep"]]]}, "strategy"),
]


def invalid_decision(change: dict[str, Any], now: datetime) -> dict[str, str]:
    """A decision stamped ``now`` (or ahead of it) with one field changed."""
    payload = {key: value for key, value in change.items() if key != "timestamp_ahead"}
    return decision(timestamp=now + change.get("timestamp_ahead", timedelta(0)), **payload)


@pytest.mark.parametrize(("change", "field"), INVALID_FIELDS)
def test_each_invalid_field_is_named(change: dict[str, Any], field: str) -> None:
    fields = invalid_decision(change, NOW)
    with pytest.raises(DecodeError) as caught:
        validate(fields, NOW, SKEW)
    assert caught.value.field == field
    assert caught.value.raw == fields


def test_envelope_problems_are_invalid() -> None:
    missing = decision(timestamp=NOW)
    del missing["trace_id"]
    with pytest.raises(DecodeError, match="trace_id"):
        validate(missing, NOW, SKEW)
    bad_json = decision(timestamp=NOW) | {"payload": "{oops"}
    with pytest.raises(DecodeError) as caught:
        validate(bad_json, NOW, SKEW)
    assert caught.value.field == "payload"
    bad_stamp = decision(timestamp=NOW) | {"timestamp": "yesterday"}
    with pytest.raises(DecodeError) as caught:
        validate(bad_stamp, NOW, SKEW)
    assert caught.value.field == "timestamp"


def test_future_timestamp_beyond_skew_is_invalid_but_within_skew_passes() -> None:
    validate(decision(timestamp=NOW + timedelta(seconds=4)), NOW, SKEW)
    with pytest.raises(DecodeError, match="future") as caught:
        validate(decision(timestamp=NOW + timedelta(seconds=6)), NOW, SKEW)
    assert caught.value.field == "timestamp"


def test_side_and_types_are_normalised_and_quantities_stay_decimal() -> None:
    fields = decision(side="sell", symbol="ethusdt", qty=0.1, order_type="limit", price="2999.99", timestamp=NOW)
    _, d = validate(fields, NOW, SKEW)
    assert (d.side, d.symbol, d.order_type) == ("SELL", "ETHUSDT", "LIMIT")
    assert d.qty == Decimal("0.1")  # the JSON number 0.1, not the float 0.1000000000000000055...
    assert d.price == Decimal("2999.99")


def test_dedup_identity_defaults_to_correlation_and_trace_not_stream_id() -> None:
    env = decode_envelope(decision(trace="t1", corr="c1"))
    assert dedup_identity(env, "1-0", ["correlation_id", "trace_id"]) == dedup_identity(
        env, "2-0", ["correlation_id", "trace_id"]
    )
    assert dedup_identity(env, "1-0", ["correlation_id", "trace_id", "msg_id"]) != dedup_identity(
        env, "2-0", ["correlation_id", "trace_id", "msg_id"]
    )


@given(st.text(max_size=8), st.text(max_size=8))
def test_anonymous_decisions_get_content_fingerprints_that_do_not_collide(qty_a: str, qty_b: str) -> None:
    a = decode_envelope(decision(trace="", corr="", qty=qty_a, timestamp=NOW))
    b = decode_envelope(decision(trace="", corr="", qty=qty_b, timestamp=NOW))
    key_a = dedup_identity(a, "1-0", ["correlation_id", "trace_id"])
    key_b = dedup_identity(b, "2-0", ["correlation_id", "trace_id"])
    assert key_a.startswith("fp:")
    assert (key_a == key_b) == (qty_a == qty_b)


@pytest.fixture
def router(r: Redis, settings_for: Callable[..., Settings], clean_url: str) -> Router:
    return Router(r, settings_for(clean_url, block_ms=10, batch_size=100))


async def test_same_decision_published_twice_becomes_one_intent(r: Redis, router: Router) -> None:
    retry = decision(trace="t-42", corr="c-42")
    first, second = await publish(r, DECISIONS, [retry, dict(retry)])  # two stream ids, one decision

    await drain(router)

    intents = await r.xrange(INTENTS)
    assert len(intents) == 1
    env = decode_envelope(intents[0][1])
    intent = decode_payload(intents[0][1], TradeIntent)
    assert (env.trace_id, env.correlation_id, intent.decision_id) == ("t-42", "c-42", first)
    [dup] = await rejections(r)
    assert (dup["reason"], dup["original_id"]) == ("DUPLICATE_SKIP", second)
    assert dup["_env"]["reason"] == "DUPLICATE_SKIP"
    assert dup["original"] == retry


async def test_seed_composite_key_lets_retries_through(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    seed_router = Router(r, settings_for(clean_url, block_ms=10, dedup_fields=["correlation_id", "trace_id", "msg_id"]))
    retry = decision(trace="t", corr="c")
    await publish(r, DECISIONS, [retry, dict(retry)])
    await drain(seed_router)
    assert await r.xlen(INTENTS) == 2  # the seed's bug, kept as a documented option


async def test_invalid_decision_is_rejected_with_field_and_original(r: Redis, router: Router) -> None:
    bad = decision(side="HOLD")
    [bad_id] = await publish(r, DECISIONS, [bad])
    await drain(router)
    [rej] = await rejections(r)
    assert rej["reason"] == "INVALID"
    assert rej["field"] == "side"
    assert "BUY or SELL" in rej["detail"]
    assert rej["original_id"] == bad_id
    assert rej["original"] == bad
    assert await r.xlen(INTENTS) == 0
    assert (await r.xpending(DECISIONS, router.streams.router_group))["pending"] == 0


@pytest.mark.parametrize(("change", "field"), INVALID_FIELDS)
async def test_each_invalid_field_is_rejected_on_the_server_naming_the_field(
    r: Redis, router: Router, change: dict[str, Any], field: str
) -> None:
    bad = invalid_decision(change, datetime.now(UTC))
    [bad_id] = await publish(r, DECISIONS, [bad])
    await drain(router)
    [rej] = await rejections(r)
    assert (rej["reason"], rej["field"], rej["original_id"]) == ("INVALID", field, bad_id)
    assert rej["original"] == bad
    assert await r.xlen(INTENTS) == 0
    assert (await r.xpending(DECISIONS, router.streams.router_group))["pending"] == 0


async def test_dedup_window_expires(r: Redis, settings_for: Callable[..., Settings], clean_url: str) -> None:
    short = Router(r, settings_for(clean_url, block_ms=10, dedup_window_s=1, max_intent_age_s=0.5, clock_skew_s=0.5))
    retry = decision(trace="t", corr="c")
    await publish(r, DECISIONS, [retry])
    await drain(short)
    assert 0 < await r.ttl("quantum:dedup:decision:1:c|1:t") <= 1
    await r.delete("quantum:dedup:decision:1:c|1:t")  # what the expiry does after the window
    await publish(r, DECISIONS, [dict(retry)])
    await drain(short)
    assert await r.xlen(INTENTS) == 2


async def test_redelivered_batch_is_routed_once(r: Redis, router: Router) -> None:
    ids = await publish(r, DECISIONS, [decision() for _ in range(5)])
    await router.consumer.setup()
    batch = await router.consumer.read_new()
    await router.handle(batch)
    await router.handle(batch)  # a second router that claimed the same entries
    assert await r.xlen(INTENTS) == 5
    assert await r.xlen("quantum:stream:decision.rejected") == 0
    assert router.totals["skipped"] == 5
    assert len(ids) == 5


def test_identities_that_only_differ_in_where_a_separator_sits_do_not_collide() -> None:
    fields = ["correlation_id", "trace_id"]
    a = decode_envelope(decision(corr="x", trace="|y"))
    b = decode_envelope(decision(corr="x|", trace="y"))
    c = decode_envelope(decision(corr="x||", trace="y"))
    d = decode_envelope(decision(corr="x", trace="||y"))
    keys = {dedup_identity(env, "1-0", fields) for env in (a, b, c, d)}
    assert len(keys) == 4


async def test_two_decisions_whose_joined_ids_match_both_trade(r: Redis, router: Router) -> None:
    await publish(r, DECISIONS, [decision(corr="x", trace="|y"), decision(corr="x|", trace="y")])
    await drain(router)
    assert await r.xlen(INTENTS) == 2
    assert await r.xlen("quantum:stream:decision.rejected") == 0


async def test_bad_bytes_huge_fields_and_deep_nesting_are_rejected_alone_and_the_rest_flows(
    r: Redis, router: Router, clean_url: str
) -> None:
    raw_client = redis.asyncio.Redis.from_url(clean_url)  # writes bytes as they are
    deep = '{"symbol":"ETHUSDT","side":"BUY","qty":"1","x":' + "[" * 2000 + "]" * 2000 + "}"
    bad: list[tuple[dict[bytes, bytes], str]] = [
        ({b"trace_id": b"t\xff\xfe"}, "trace_id"),  # not UTF-8
        ({b"payload": b'{"symbol":"ETH\xc3USDT"}'}, "payload"),
        ({b"source": b"x" * (1 << 20)}, "source"),  # 1 MiB
        ({b"payload": deep.encode()}, "payload"),  # within the size limit, 2,000 levels deep
        ({b"payload": b'{"symbol":"ETHUSDT","side":"BUY","qty":1e999999999}'}, "qty"),
        ({b"\xff\xfename": b"v"}, "\\xff\\xfename"),
    ]
    try:
        for change, _field in bad:
            entry = {k.encode(): v.encode() for k, v in decision().items()} | change
            await raw_client.xadd(DECISIONS, entry)
            await publish(r, DECISIONS, [decision(strategy="s" * 100) for _ in range(50)])
    finally:
        await raw_client.aclose()

    await drain(router)

    assert await r.xlen(INTENTS) == 50 * len(bad)
    rejected = await rejections(r)
    assert [(rej["reason"], rej["field"]) for rej in rejected] == [("INVALID", field) for _change, field in bad]
    # The exact bytes of a field that was not UTF-8 are kept; an oversize field is cut with its size.
    assert base64.b64decode(rejected[0]["original_base64"]["trace_id"]) == b"t\xff\xfe"
    assert "truncated: 1048576 characters" in rejected[2]["original"]["source"]
    assert (await r.xpending(DECISIONS, router.streams.router_group))["pending"] == 0
    assert await r.xlen("quantum:stream:dead_letter") == 0


async def test_decisions_published_to_partitions_get_ids_no_other_decision_stream_holds(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    from quantum_trader import keys
    from quantum_trader.publisher import publish_decisions

    settings = settings_for(clean_url, partitions=3)
    one = settings.decision_stream
    # A publisher that knows nothing of partitions writes to the one stream at the same moments.
    far = 9_999_999_999_999
    await r.xadd(one, decision(corr="outside-0"), id=f"{far}-0")
    symbols = ["ETHUSDT", "BTCUSDT", "SOLUSDT"] * 3
    batch = [decision(symbol, "BUY", corr=f"c{n}") for n, symbol in enumerate(symbols)]
    batch.append({"payload": "{not json", "trace_id": "t-bad"})  # no symbol to read: the one stream judges it

    published = await publish_decisions(r, settings, batch)

    for symbol, (stream, _id) in zip(symbols, published, strict=False):  # each symbol: its intents' partition
        assert stream == keys.partition_stream(one, keys.partition_of(symbol, 3), 3)
    assert published[-1][0] == one
    ids = [entry_id for _, entry_id in published]
    assert ids == [f"{far}-{n}" for n in range(1, 11)]  # past the one stream's newest id, never the same twice
    later = await r.xadd(one, decision(corr="outside-1"))
    assert later == f"{far}-11"  # the one stream's next "*" id is past every id given out
