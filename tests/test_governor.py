"""Governor: pure rules, and the gate's kill switch and daily limit against a real server."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.events import TRADE_INTENT, Reason, TradeIntent, envelope, now_iso
from quantum_trader.governor import (
    TO_GATE,
    Governor,
    Limits,
    Verdict,
    check_intent,
    counter_ttl,
    governor_state,
    is_expired,
    kill_state,
    review,
    symbols_to_price,
)
from quantum_trader.risk import Candidate
from quantum_trader.settings import Settings
from tests.pipeline import results

NOW = datetime(2026, 1, 17, 22, 25, 34, tzinfo=UTC)
LIMITS = Limits(
    daily_limit=10, max_notional=Decimal(1000), symbol_allowlist=frozenset({"ETHUSDT"}), max_age=timedelta(seconds=60)
)
INTENTS = "quantum:stream:trade.intent"
GROUP = "quantum:group:execution:trade.intent"


def intent(
    qty: str = "0.1", symbol: str = "ETHUSDT", decision_ts: str = "", price: str | None = None, limit: bool = False
) -> TradeIntent:
    return TradeIntent(
        symbol=symbol,
        side="BUY",
        qty=Decimal(qty),
        decision_ts=decision_ts,
        price=None if price is None else Decimal(price),
        order_type="LIMIT" if limit else "MARKET",
    )


def test_counter_expires_at_next_utc_midnight_plus_one_hour() -> None:
    assert counter_ttl(datetime(2026, 1, 17, 23, 0, tzinfo=UTC)) == 2 * 3600
    assert counter_ttl(datetime(2026, 1, 17, 0, 0, tzinfo=UTC)) == 25 * 3600


def test_notional_allowlist_and_price_rules() -> None:
    assert check_intent(intent("0.1"), Decimal(3000), LIMITS) is None
    assert check_intent(intent("1"), Decimal(3000), LIMITS) == (
        Reason.MAX_NOTIONAL,
        "notional 3000 exceeds QT_MAX_NOTIONAL=1000",
    )
    assert check_intent(intent(symbol="BTCUSDT"), Decimal(1), LIMITS) == (
        Reason.SYMBOL_NOT_ALLOWED,
        "BTCUSDT is not in QT_SYMBOL_ALLOWLIST",
    )
    assert check_intent(intent(), None, LIMITS) == (
        Reason.NO_PRICE,
        "no market or reference price for ETHUSDT; notional cannot be checked",
    )


def test_age_counts_from_the_decision_timestamp() -> None:
    fresh = intent(decision_ts=now_iso(NOW - timedelta(seconds=59)))
    stale = intent(decision_ts=now_iso(NOW - timedelta(seconds=61)))
    assert not is_expired(fresh, now_iso(NOW), NOW, LIMITS.max_age)
    assert is_expired(stale, now_iso(NOW), NOW, LIMITS.max_age)
    assert is_expired(intent(decision_ts="garbage"), now_iso(NOW), NOW, LIMITS.max_age)  # unknown age: stale


def ago(seconds: float) -> str:
    return now_iso(NOW - timedelta(seconds=seconds))


def test_review_judges_a_batch_in_order_age_first_then_allow_list_then_notional() -> None:
    batch = [
        (intent("0.1", decision_ts=ago(1)), ""),  # fresh, 300 at the market price: on to the gate
        (intent("0.1", decision_ts=ago(61)), ""),  # too old: expired, whatever else it breaks
        (intent("1", symbol="BTCUSDT", decision_ts=ago(61)), ""),
        (intent("1", decision_ts=ago(1)), ""),  # 3000 > 1000
        (intent("0.1", symbol="BTCUSDT", decision_ts=ago(1)), ""),
        (intent("0.1", decision_ts=""), ago(5)),  # no decision time: the entry's timestamp counts
        (intent("0.1", decision_ts=""), ago(120)),
        (intent("0.1", decision_ts="garbage"), ago(1)),  # unknown age: expired
    ]

    verdicts = review(batch, {"ETHUSDT": Decimal(3000)}, NOW, LIMITS)

    expired = Verdict("EXPIRED", Reason.EXPIRED, "decision older than 60s")
    assert verdicts == [
        TO_GATE,
        expired,
        expired,
        Verdict("REJECTED", Reason.MAX_NOTIONAL, "notional 3000 exceeds QT_MAX_NOTIONAL=1000"),
        Verdict("REJECTED", Reason.SYMBOL_NOT_ALLOWED, "BTCUSDT is not in QT_SYMBOL_ALLOWLIST"),
        TO_GATE,
        expired,
        expired,
    ]


def test_review_values_an_intent_at_the_market_else_its_own_price_and_a_limit_at_its_limit() -> None:
    no_market: dict[str, Decimal] = {}
    market = {"ETHUSDT": Decimal(20_000)}  # 0.1 ETH = 2000 at the market: over the limit
    fresh = ago(1)
    market_with_hint = (intent("0.1", decision_ts=fresh, price="3000"), "")
    limit_order = (intent("0.1", decision_ts=fresh, price="3000", limit=True), "")
    no_price = (intent("0.1", decision_ts=fresh), "")

    assert review([market_with_hint, limit_order, no_price], no_market, NOW, LIMITS) == [
        TO_GATE,
        TO_GATE,
        Verdict("REJECTED", Reason.NO_PRICE, "no market or reference price for ETHUSDT; notional cannot be checked"),
    ]
    over = Verdict("REJECTED", Reason.MAX_NOTIONAL, "notional 2000.0 exceeds QT_MAX_NOTIONAL=1000")
    assert review([market_with_hint, limit_order, no_price], market, NOW, LIMITS) == [over, TO_GATE, over]


def test_review_of_nothing_is_nothing_and_an_open_allow_list_allows_any_symbol() -> None:
    assert review([], {}, NOW, LIMITS) == []
    anything = Limits(daily_limit=1, max_notional=Decimal(10), symbol_allowlist=frozenset(), max_age=timedelta(1))
    batch = [(intent("1", symbol="SOLUSDT", decision_ts=ago(1)), "")]
    assert review(batch, {"SOLUSDT": Decimal(5)}, NOW, anything) == [TO_GATE]


def test_only_intents_that_are_not_expired_need_a_price() -> None:
    batch = [
        (intent(symbol="SOLUSDT", decision_ts=ago(61)), ""),
        (intent(symbol="ETHUSDT", decision_ts=ago(1)), ""),
        (intent(symbol="BTCUSDT", decision_ts=""), ago(2)),
        (intent(symbol="ETHUSDT", decision_ts=ago(3)), ""),
    ]
    assert symbols_to_price(batch, NOW, LIMITS) == ["ETHUSDT", "BTCUSDT", "ETHUSDT"]
    assert symbols_to_price(batch[:1], NOW, LIMITS) == []  # a batch of stale intents asks the exchange nothing


async def verdicts_of(governor: Governor, ids: list[str], now: datetime, consumer: str) -> list[str]:
    """The gate's verdicts for intents of 0.01 ETHUSDT at 3000."""
    batch = [Candidate(i, "ETHUSDT", "BUY", Decimal("0.01"), Decimal(3000)) for i in ids]
    return [answer.verdict for answer in (await governor.gate(batch, now, consumer)).answers]


async def pending_intents(r: Redis, n: int) -> list[str]:
    await ensure_group(r, INTENTS, GROUP)
    fields = envelope(TRADE_INTENT, intent(), trace_id="t", correlation_id="c", source="test")
    ids = await publish(r, INTENTS, [fields] * n)
    await r.xreadgroup(GROUP, "g", {INTENTS: ">"}, count=n)
    return ids


@pytest.fixture
def governor(r: Redis, settings_for: Callable[..., Settings], clean_url: str) -> Governor:
    return Governor(r, settings_for(clean_url, daily_limit=3))


@pytest.mark.parametrize("kill", [None, "1", "garbage", "0 ", "false"])
async def test_anything_but_exactly_zero_halts(r: Redis, governor: Governor, kill: str | None) -> None:
    ids = await pending_intents(r, 2)
    if kill is not None:
        await r.set(keys.KILL_SWITCH, kill)
    assert await verdicts_of(governor, ids, NOW, "g") == ["KILL_SWITCH", "KILL_SWITCH"]
    assert await r.get(keys.daily_trades(NOW.date())) is None


async def test_a_switch_of_another_type_halts_and_is_reported_not_raised(
    r: Redis, governor: Governor, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    ids = await pending_intents(r, 2)
    await r.rpush(keys.KILL_SWITCH, "0")  # a list holding "0" is still not the string "0"
    assert await verdicts_of(governor, ids, NOW, "g") == ["KILL_SWITCH", "KILL_SWITCH"]
    assert await kill_state(r) == ("<a list, not a string>", False)
    state = await governor_state(r, settings_for(clean_url), NOW)
    assert (state.kill_value, state.trading_allowed) == ("<a list, not a string>", False)


async def test_daily_limit_counts_each_intent_once_even_when_redelivered(r: Redis, governor: Governor) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    ids = await pending_intents(r, 5)
    assert await verdicts_of(governor, ids[:2], NOW, "g") == ["APPROVED"] * 2
    assert await verdicts_of(governor, ids[:2], NOW, "g") == ["APPROVED"] * 2  # redelivered: not counted again
    verdicts = await verdicts_of(governor, ids, NOW, "g")
    assert verdicts == ["APPROVED", "APPROVED", "APPROVED", "DAILY_LIMIT", "DAILY_LIMIT"]
    key = keys.daily_trades(NOW.date())
    assert await r.get(key) == "3"
    assert key == "quantum:governor:daily_trades:20260117"
    assert 0 < await r.ttl(key) <= counter_ttl(NOW)


async def test_finished_intent_is_gone_not_counted(r: Redis, governor: Governor) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    ids = await pending_intents(r, 1)
    await r.xack(INTENTS, GROUP, ids[0])  # another consumer finished it meanwhile
    assert await verdicts_of(governor, ids, NOW, "g") == ["GONE"]
    assert await r.get(keys.daily_trades(NOW.date())) is None


async def test_unreachable_server_never_approves(
    valkey_factory: Callable[..., object], settings_for: Callable[..., Settings]
) -> None:
    from quantum_trader.bus.connection import client
    from quantum_trader.bus.embedded import EmbeddedValkey

    server = valkey_factory()
    assert isinstance(server, EmbeddedValkey)
    redis = client(server.url)
    try:
        await redis.set(keys.KILL_SWITCH, "0")
        ids = await pending_intents(redis, 1)
        gov = Governor(redis, settings_for(server.url))
        server.kill()
        with pytest.raises(Exception, match=r"(?i)connect|closed|refused"):
            await verdicts_of(gov, ids, NOW, "g")
    finally:
        await redis.aclose()


RACE_PROCESSES = 4


async def test_daily_limit_holds_with_four_execution_processes_racing(
    r: Redis, clean_url: str, tmp_path: object
) -> None:
    limit, extra = 120, 80
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    await ensure_group(r, INTENTS, GROUP)
    stamp = now_iso()
    entries = [
        envelope(
            TRADE_INTENT,
            TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.01"), decision_ts=stamp),
            trace_id=f"t{i}",
            correlation_id=f"c{i}",
            source="test",
        )
        for i in range(limit + extra)
    ]
    env = os.environ | {
        "QT_REDIS_URL": clean_url,
        "QT_DAILY_LIMIT": str(limit),
        "QT_BATCH_SIZE": "5",
        "QT_BLOCK_MS": "50",
        "QT_LOG_LEVEL": "warning",
        "QT_PAPER_BALANCES": "USDT=1000000",
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "quantum_trader",
            "execution",
            env=env | {"QT_CONSUMER": f"exec-{n}"},
        )
        for n in range(RACE_PROCESSES)
    ]
    try:
        for _ in range(600):  # all four blocked on the group before the intents arrive
            if len(await r.xinfo_consumers(INTENTS, GROUP)) == RACE_PROCESSES:
                break
            await asyncio.sleep(0.05)
        await publish(r, INTENTS, entries)
        for _ in range(600):
            if await r.xlen("quantum:stream:execution.result") >= limit + extra:
                break
            await asyncio.sleep(0.05)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert await proc.wait() == 0  # SIGTERM: finish the batch, exit cleanly

    outcomes = await results(r)
    assert len(outcomes) == limit + extra
    assert sum(o["status"] == "FILLED" for o in outcomes) == limit
    assert sum(o["reason"] == "DAILY_LIMIT" for o in outcomes) == extra
    assert await r.get(keys.daily_trades(datetime.now(UTC).date())) == str(limit)


async def test_the_gate_finds_its_intents_however_many_others_the_consumer_holds(r: Redis) -> None:
    stream, group = "quantum:stream:trade.intent", "quantum:group:execution:trade.intent"
    await ensure_group(r, stream, group)
    async with r.pipeline(transaction=False) as pipe:
        for i in range(3_000):
            pipe.xadd(stream, {"n": str(i)})
        ids = await pipe.execute()
    await r.xreadgroup(group, "exec-1", {stream: ">"}, count=3_000)  # an outage left it holding all of them
    await r.set("quantum:kill", "0")
    governor = Governor(r, Settings(redis_url="redis://unused"))

    verdicts = await verdicts_of(governor, [ids[0], ids[-1]], datetime.now(UTC), "exec-1")

    assert verdicts == ["APPROVED", "APPROVED"]
