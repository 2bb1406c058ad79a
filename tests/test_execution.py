"""Execution: every outcome path, dual write, atomic commit, and no second order after a crash."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.base import OrderOutcome, OrderRequest
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.pipeline import decision, drain, rejections, results

DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"
GROUP = "quantum:group:execution:trade.intent"


class Pipeline:
    """Router and execution on one server, driven batch by batch."""

    def __init__(self, r: Redis, settings: Settings, exchange: Any = None) -> None:
        self.r = r
        self.settings = settings
        self.router = Router(r, settings)
        self.paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
        self.execution = Execution(r, settings, exchange or self.paper)

    async def run(self, *decisions: dict[str, str]) -> list[dict[str, Any]]:
        await self.paper.fund()
        await publish(self.r, DECISIONS, list(decisions))
        await drain(self.router)
        await drain(self.execution)
        return await results(self.r, self.settings.result_stream)


@pytest.fixture
def make_pipeline(r: Redis, settings_for: Callable[..., Settings], clean_url: str) -> Callable[..., Pipeline]:
    def make(exchange: Any = None, **overrides: Any) -> Pipeline:
        base: dict[str, Any] = {"block_ms": 10, "paper_balances": {"USDT": Decimal(10_000)}}
        return Pipeline(r, settings_for(clean_url, **(base | overrides)), exchange)

    return make


async def allow(r: Redis) -> None:
    await r.set(keys.KILL_SWITCH, "0")


async def test_filled_result_carries_the_contract(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await allow(r)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    [res] = await make_pipeline(paper_fee_rate=Decimal("0.001")).run(decision(qty="0.5", trace="t1", corr="c1"))

    assert res["status"] == "FILLED"
    assert (res["symbol"], res["side"], Decimal(res["qty"]), Decimal(res["filled_qty"])) == (
        "ETHUSDT", "BUY", Decimal("0.5"), Decimal("0.5"),
    )  # fmt: skip
    assert Decimal(res["avg_price"]) == 3000
    assert Decimal(res["fee"]) == Decimal("1.5")
    assert res["client_order_id"].startswith("qt-")
    assert res["exchange_order_id"]
    assert res["intent_id"]
    env = res["_env"]
    assert (env["event_type"], env["source"], env["trace_id"], env["correlation_id"]) == (
        "execution.result", "execution", "t1", "c1",
    )  # fmt: skip
    assert env["timestamp"].endswith("Z")
    balances = await PaperExchange(r).balances()
    assert balances == {"USDT": Decimal("10000") - Decimal("1501.5"), "ETH": Decimal("0.5")}
    assert (await r.xpending(INTENTS, GROUP))["pending"] == 0


@pytest.mark.parametrize("kill", [None, "1", "yes"])
async def test_kill_switch_not_zero_rejects(r: Redis, make_pipeline: Callable[..., Pipeline], kill: str | None) -> None:
    if kill is not None:
        await r.set(keys.KILL_SWITCH, kill)
    [res] = await make_pipeline().run(decision())
    assert (res["status"], res["reason"]) == ("REJECTED", "KILL_SWITCH")
    assert len(await PaperExchange(r).orders()) == 0


async def test_daily_limit_rejects_past_the_limit(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await allow(r)
    out = await make_pipeline(daily_limit=2).run(*[decision(qty="0.01") for _ in range(4)])
    assert sorted((o["status"], o["reason"]) for o in out) == [
        ("FILLED", ""), ("FILLED", ""), ("REJECTED", "DAILY_LIMIT"), ("REJECTED", "DAILY_LIMIT"),
    ]  # fmt: skip


async def test_notional_and_symbol_rules_reject_before_the_exchange(
    r: Redis, make_pipeline: Callable[..., Pipeline]
) -> None:
    await allow(r)
    pipeline = make_pipeline(max_notional=Decimal(500), symbol_allowlist=["ETHUSDT"])
    out = await pipeline.run(decision(qty="1", price="3000"), decision(symbol="DOGEUSDT", qty="1", price="0.1"))
    assert [(o["status"], o["reason"]) for o in out] == [
        ("REJECTED", "MAX_NOTIONAL"), ("REJECTED", "SYMBOL_NOT_ALLOWED"),
    ]  # fmt: skip
    assert "QT_MAX_NOTIONAL" in out[0]["detail"]
    assert len(await PaperExchange(r).orders()) == 0
    assert await r.get(keys.daily_trades(datetime.now(UTC).date())) is None


async def test_stale_intent_expires_and_never_trades(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await allow(r)
    old = decision(timestamp=datetime.now(UTC) - timedelta(seconds=120))
    [res] = await make_pipeline(max_intent_age_s=60).run(old)
    assert (res["status"], res["reason"]) == ("EXPIRED", "EXPIRED")
    assert len(await PaperExchange(r).orders()) == 0


async def test_paper_exchange_rejections(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await allow(r)
    out = await make_pipeline().run(
        decision(qty="100", price="50"),  # 5,000 USDT of 10,000: fills
        decision(qty="100", price="80"),  # 8,000 more: short of USDT
        decision(symbol="SOLUSDT", side="SELL", qty="1", price="100"),  # no SOL to sell
    )
    assert [(o["status"], o["reason"]) for o in out] == [
        ("FILLED", ""), ("REJECTED", "INSUFFICIENT_BALANCE"), ("REJECTED", "INSUFFICIENT_BALANCE"),
    ]  # fmt: skip


async def test_no_price_anywhere_is_rejected(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await allow(r)
    [res] = await make_pipeline().run(decision(price=None))
    assert (res["status"], res["reason"]) == ("REJECTED", "NO_PRICE")


class BrokenExchange:
    """An exchange that answers every order with a failure (in-memory, for the FAILED path)."""

    name = "broken"

    async def last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        return {}

    async def fetch_orders(self, client_order_ids: list[str]) -> dict[str, OrderOutcome]:
        return {}

    async def place_orders(self, orders: list[OrderRequest], guard: object = None) -> list[OrderOutcome]:
        return [
            OrderOutcome(o.client_order_id, "FAILED", reason="EXCHANGE_ERROR", detail="venue closed") for o in orders
        ]

    async def close(self) -> None:
        return None


async def test_exchange_failure_is_failed_with_its_reason(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await allow(r)
    [res] = await make_pipeline(exchange=BrokenExchange()).run(decision())
    assert (res["status"], res["reason"], res["detail"]) == ("FAILED", "EXCHANGE_ERROR", "venue closed")


@pytest.mark.parametrize("legacy", ["", "quantum:stream:legacy.result"])
async def test_legacy_dual_write(r: Redis, make_pipeline: Callable[..., Pipeline], legacy: str) -> None:
    await allow(r)
    pipeline = make_pipeline(result_stream="qt:results", result_stream_legacy=legacy)
    out = await pipeline.run(decision(), decision())
    assert len(out) == 2
    primary = [fields for _, fields in await r.xrange("qt:results")]
    if legacy:
        assert [fields for _, fields in await r.xrange(legacy)] == primary
    else:
        assert await r.exists("quantum:stream:legacy.result") == 0
    assert await r.exists("quantum:stream:execution.result") == 0  # the configured stream was used


async def test_every_decision_has_exactly_one_outcome(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    await allow(r)
    retry = decision(trace="t", corr="c")
    mix = [retry, dict(retry), decision(side="HOLD"), decision(), decision(qty="1000000")]
    out = await make_pipeline().run(*mix)
    rej = await rejections(r)
    assert sorted(x["reason"] for x in rej) == ["DUPLICATE_SKIP", "INVALID"]
    assert sorted(o["status"] for o in out) == ["FILLED", "FILLED", "REJECTED"]


@pytest.mark.parametrize("after_crash", ["kill switch turned on", "intent now older than the max age"])
async def test_crash_between_order_and_result_places_no_second_order(
    r: Redis, make_pipeline: Callable[..., Pipeline], after_crash: str
) -> None:
    await allow(r)
    first = make_pipeline(max_intent_age_s=60)

    async def crash(_done: object, _sent: object = ()) -> None:
        raise SystemExit("process died after placing the order, before writing the result")

    first.execution.commit = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        await first.run(decision(qty="0.1"))
    assert len(await PaperExchange(r).orders()) == 1
    assert await r.xlen("quantum:stream:execution.result") == 0
    assert (await r.xpending(INTENTS, GROUP))["pending"] == 1

    # Whatever the governor would say now, the order exists: the result must report it, not a
    # rejection (the paper exchange's own dedup by client order id would hide a missing look-up).
    later = datetime.now(UTC)
    if after_crash == "kill switch turned on":
        await r.set(keys.KILL_SWITCH, "1")
    else:
        later += timedelta(seconds=120)
    restarted = Execution(
        r, first.settings, PaperExchange(r, quote_assets=first.settings.quote_assets), clock=lambda: later
    )
    await drain(restarted)  # same consumer name: it finds its own pending intent first

    [res] = await results(r)
    assert (res["status"], res["reason"]) == ("FILLED", "")
    assert len(await PaperExchange(r).orders()) == 1
    assert await r.get(keys.daily_trades(datetime.now(UTC).date())) == "1"
    balances = await PaperExchange(r).balances()
    assert balances["ETH"] == Decimal("0.1")
    assert (await r.xpending(INTENTS, GROUP))["pending"] == 0


@pytest.mark.parametrize(
    ("after_crash", "outcome"),
    [
        ("kill switch turned on", ("REJECTED", "KILL_SWITCH")),
        ("intent now older than the max age", ("EXPIRED", "EXPIRED")),
    ],
)
async def test_intent_counted_then_ended_without_an_order_gives_its_count_back(
    r: Redis, make_pipeline: Callable[..., Pipeline], after_crash: str, outcome: tuple[str, str]
) -> None:
    await allow(r)
    first = make_pipeline(max_intent_age_s=60)

    async def crash(_orders: object, guard: object = None) -> None:
        raise SystemExit("process died after the gate counted the intent, before the order left")

    first.paper.place_orders = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        await first.run(decision(qty="0.1"))
    today = datetime.now(UTC).date()
    assert await r.get(keys.daily_trades(today)) == "1"
    assert await r.hlen(keys.counted(today)) == 1

    later = datetime.now(UTC)
    if after_crash == "kill switch turned on":
        await r.set(keys.KILL_SWITCH, "1")
    else:
        later += timedelta(seconds=120)
    restarted = Execution(
        r, first.settings, PaperExchange(r, quote_assets=first.settings.quote_assets), clock=lambda: later
    )
    await drain(restarted)

    [res] = await results(r)
    assert (res["status"], res["reason"]) == outcome
    assert len(await PaperExchange(r).orders()) == 0
    assert await r.get(keys.daily_trades(today)) == "0"  # the counter equals the orders sent
    assert await r.hlen(keys.counted(today)) == 0
    assert await r.ttl(keys.daily_trades(today)) > 0  # DECR kept the expiry


async def test_rejection_of_an_uncounted_intent_leaves_the_counter_alone(
    r: Redis, make_pipeline: Callable[..., Pipeline]
) -> None:
    await allow(r)
    out = await make_pipeline(daily_limit=1).run(decision(qty="0.01"), decision(qty="0.01"))
    assert sorted((o["status"], o["reason"]) for o in out) == [("FILLED", ""), ("REJECTED", "DAILY_LIMIT")]
    assert await r.get(keys.daily_trades(datetime.now(UTC).date())) == "1"


async def test_undecodable_intent_goes_to_dead_letter(r: Redis, make_pipeline: Callable[..., Pipeline]) -> None:
    pipeline = make_pipeline()
    await pipeline.execution.consumer.setup()
    await r.xadd(INTENTS, {"event_type": "trade.intent", "payload": "{}"})
    await drain(pipeline.execution)
    [(_id, dead)] = await r.xrange("quantum:stream:dead_letter")
    assert "undecodable trade intent" in dead["reason"]
    assert (await r.xpending(INTENTS, GROUP))["pending"] == 0
    assert await r.xlen("quantum:stream:execution.result") == 0


class Killed(BaseException):
    """The process gone (SIGKILL, an OOM killer): nothing in it runs on, no ``except Exception`` sees it."""


async def test_an_intent_whose_order_left_is_never_set_aside_however_often_the_stage_dies_on_it(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    """Execution places an order and is killed before its result is written; every restart is killed again
    while it looks that order up, until the intent counts as poison (delivered more than QT_MAX_DELIVERIES
    times, the stage dead twice while handling it alone). Set aside, the order would stay at the exchange
    with no result and the book would miss it. Once the killing stops, the intent gets its FILLED result,
    once, from the order that left; no second order, no dead letter."""
    await allow(r)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    settings = settings_for(clean_url, block_ms=10, paper_balances={"USDT": Decimal(10_000)})
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    await paper.fund()
    await publish(r, DECISIONS, [decision(qty="0.5")])
    await drain(Router(r, settings))
    kills = {"left": 8}

    class KilledMidway(PaperExchange):
        async def place_orders(self, orders: list[Any], guard: Any = None) -> Any:
            await super().place_orders(orders, guard=guard)
            kills["left"] -= 1
            raise Killed  # after the order left

        async def fetch_orders(self, client_order_ids: list[str]) -> Any:
            if kills["left"] > 0:
                kills["left"] -= 1
                raise Killed  # while looking the order up
            return await super().fetch_orders(client_order_ids)

    exchange = KilledMidway(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    for _life in range(12):
        execution = Execution(r, settings, exchange)  # a restart: a new process, the same consumer name
        consumer = execution.consumer
        await consumer.setup()
        batch = await consumer.next_batch() or await consumer.read_new(wait=False)
        if not batch:
            break
        try:
            await consumer.process(execution.handle, batch)
        except Killed:
            continue
    assert kills["left"] == 0, "the killer landed every time"

    [res] = await results(r, settings.result_stream)
    assert (res["status"], Decimal(res["filled_qty"])) == ("FILLED", Decimal("0.5"))
    assert await r.xlen(settings.dead_letter_stream) == 0
    assert (await r.xpending(settings.intent_stream, settings.execution_group))["pending"] == 0
    balances = await r.hgetall(keys.paper_balances())
    assert Decimal(balances["ETH"]) == Decimal("0.5")  # one order
