"""Protective exits: where a candle crosses the levels, and one exit per armed stop through real processes.

The pure half: ``crossed`` fires on the candle whose low reaches the stop (``<=``) or whose high
reaches the take-profit, the stop first when one candle reaches both, and never again once fired;
``stop_after`` arms the default levels around a position's average price and removes them when
it closes.

The processes: a router and the protect stage in one ``quantum-trader run`` process, and an
execution process SIGKILLed and started again around the candle that crosses the stop: before the
exit reaches it, while it holds the exit (waiting for the order rate behind another order, so the
kill lands there however loaded the machine), between its order and its result when the timing
allows, and after. Candles keep crossing the level meanwhile. The exit is one SELL decision of the
whole position, one intent, one order and one FILLED result; then the book is flat and the levels gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from quantum_trader import feed, keys, portfolio, protect
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.events import Candle
from quantum_trader.exchanges.base import client_order_id
from quantum_trader.portfolio import Position
from tests.pipeline import decision, payloads, results

NOW = datetime(2026, 1, 17, 22, 25, 34, tzinfo=UTC)
DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"
CANDLES = "quantum:stream:market.candle"
EXEC_GROUP = "quantum:group:execution:trade.intent"
PROTECT_GROUP = "quantum:group:protect:market.candle"
ROUTER_GROUP = "quantum:group:router:ai.decision"
RESTARTS = 6  # execution started and killed around the exit, at most


def candle(low: float, high: float | None = None, close: float | None = None, minute: int = 0) -> Candle:
    high = high if high is not None else low + 20
    close = close if close is not None else (low + high) / 2
    return Candle(
        symbol="ETHUSDT",
        interval="1m",
        open_time=1_768_688_700_000 + minute * 60_000,
        open=close,
        high=high,
        low=low,
        close=close,
        volume=1.0,
    )


def armed(stop: str | None = "2850", take: str | None = None, fired: str = "") -> protect.Stop:
    return protect.Stop(
        symbol="ETHUSDT",
        stop=None if stop is None else Decimal(stop),
        take=None if take is None else Decimal(take),
        at="2026-01-17T22:25:34.000000Z",
        fired=fired,
    )


def held(qty: str, cost: str) -> Position:
    return Position(symbol="ETHUSDT", base="ETH", quote="USDT", qty=Decimal(qty), cost=Decimal(cost))


# ---- pure: crossing and arming -------------------------------------------------------------


def test_the_stop_fires_on_the_candle_whose_low_touches_it() -> None:
    stop = armed("2850")
    assert protect.crossed(stop, candle(low=2850.01)) is None
    assert protect.crossed(stop, candle(low=2850.0)) == "STOP_LOSS"  # touching is enough
    assert protect.crossed(stop, candle(low=2700.0)) == "STOP_LOSS"


def test_the_stop_comes_first_when_one_candle_crosses_both_levels() -> None:
    stop = armed("2850", take="3150")
    assert protect.crossed(stop, candle(low=2840.0, high=3160.0)) == "STOP_LOSS"


def test_the_take_profit_fires_on_the_candle_whose_high_reaches_it() -> None:
    stop = armed(None, take="3150")
    assert protect.crossed(stop, candle(low=3000.0, high=3149.99)) is None
    assert protect.crossed(stop, candle(low=3000.0, high=3150.0)) == "TAKE_PROFIT"
    both = armed("2850", take="3150")
    assert protect.crossed(both, candle(low=3100.0, high=3200.0)) == "TAKE_PROFIT"


def test_fired_levels_never_fire_again() -> None:
    fired = armed("2850", take="3150", fired="protect:ETHUSDT:2026-01-17T22:25:34.000000Z:STOP_LOSS")
    assert protect.crossed(fired, candle(low=2000.0, high=4000.0)) is None


def test_the_default_levels_sit_around_the_average_price_and_go_when_the_position_closes() -> None:
    defaults = protect.Defaults(stop_loss_pct=Decimal(5), take_profit_pct=Decimal(10))
    stored = protect.stop_after(held("0.5", "1500"), [(None, None)], defaults, NOW)  # average 3000
    level = protect.decode(stored)
    assert (level.stop, level.take, level.fired) == (Decimal(2850), Decimal(3300), "")
    assert protect.stop_after(held("0.5", "1500"), [], defaults, NOW) == "-"  # no entry: levels unchanged
    own = protect.decode(protect.stop_after(held("0.5", "1500"), [(Decimal(2900), None)], defaults, NOW))
    assert (own.stop, own.take) == (Decimal(2900), None)  # the entry's own level wins over the defaults
    assert protect.stop_after(held("0", "0"), [(None, None)], defaults, NOW) == ""  # closed: removed


# ---- processes: one exit with execution killed around the crossing ------------------------------


class Processes:
    """A router + protect process and an execution process that the test SIGKILLs and starts again."""

    def __init__(self, r: Redis, url: str) -> None:
        self.r = r
        self.env = os.environ | {
            "QT_REDIS_URL": url,
            "QT_BATCH_SIZE": "10",
            "QT_BLOCK_MS": "50",
            "QT_CLAIM_IDLE_MS": "300",
            "QT_HEARTBEAT_S": "0.2",
            "QT_LOG_LEVEL": "warning",
            "QT_PAPER_BALANCES": "USDT=100000",
            "QT_STOP_LOSS_PCT": "5",
            "QT_MAX_ORDERS_PER_S": "1",  # an exit right after another order waits a second for the rate
        }
        self.pipeline: asyncio.subprocess.Process | None = None
        self.execution: asyncio.subprocess.Process | None = None
        self.kills: list[str] = []  # what each kill of execution interrupted

    async def start_pipeline(self) -> None:
        self.pipeline = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quantum_trader", "run", "--stages", "router,protect",
            env=self.env | {"QT_CONSUMER": "pipe-0"},
        )  # fmt: skip

    async def start_execution(self) -> None:
        await self.r.delete(keys.heartbeat(keys.EXECUTION, "exec-0"))
        self.execution = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quantum_trader", "execution", env=self.env | {"QT_CONSUMER": "exec-0"}
        )

    async def execution_ready(self) -> bool:
        """Wait until the execution process started last is consuming (it has beaten once)."""
        return bool(await eventually(lambda: self.r.exists(keys.heartbeat(keys.EXECUTION, "exec-0"))))

    async def kill_execution(self, why: str) -> None:
        assert self.execution is not None
        self.execution.send_signal(signal.SIGKILL)
        await self.execution.wait()
        self.kills.append(why)

    async def kill_holding(self, exit_id: str, coid: str, *, placed: bool, timeout_s: float = 20.0) -> str:
        """SIGKILL execution the moment it holds the exit (``placed``: once its order exists), or once the exit
        has its result; what the kill interrupted.

        Polled without pause: an intent spends only milliseconds between its read and its commit.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if placed:
                holding = bool(await self.r.exists(keys.paper_order(coid)))
            else:
                holding = bool(
                    await self.r.xpending_range(
                        INTENTS, EXEC_GROUP, min=exit_id, max=exit_id, count=1, consumername="exec-0"
                    )
                )
            if holding or await result_of(self.r, exit_id):
                break
        await self.kill_execution("")
        if await result_of(self.r, exit_id):
            self.kills[-1] = "after the result"
        elif await self.r.exists(keys.paper_order(coid)):
            self.kills[-1] = "after the order, before the result"
        else:
            self.kills[-1] = "before the order"
        return self.kills[-1]

    async def stop(self) -> list[int]:
        procs = [p for p in (self.pipeline, self.execution) if p is not None]
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        return [await proc.wait() for proc in procs]


async def result_of(r: Redis, intent_id: str) -> list[dict[str, Any]]:
    """The results written for one intent."""
    return [o for o in await results(r) if o["intent_id"] == intent_id]


async def eventually(check: Any, timeout_s: float = 20.0) -> Any:
    """Poll ``check()`` (a coroutine function) until it returns something truthy; that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await check()
        if value or loop.time() > deadline:
            return value
        await asyncio.sleep(0.02)


async def settled(r: Redis) -> bool:
    """Every candle and decision read and acknowledged, and no intent unfinished."""
    for stream, group in ((CANDLES, PROTECT_GROUP), (DECISIONS, ROUTER_GROUP), (INTENTS, EXEC_GROUP)):
        for info in await r.xinfo_groups(stream):
            if info["name"] == group and (int(info["pending"]) or int(info.get("lag") or 0)):
                return False
    return True


async def test_a_stop_crossed_fires_one_exit_even_with_execution_killed_around_it(r: Redis, clean_url: str) -> None:
    qty = Decimal("0.5")
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "BTCUSDT", "60000")
    await ensure_group(r, INTENTS, EXEC_GROUP)
    fleet = Processes(r, clean_url)
    try:
        await fleet.start_pipeline()
        await fleet.start_execution()
        for name in (keys.heartbeat(keys.ROUTER, "pipe-0"), keys.heartbeat(keys.PROTECT, "pipe-0")):
            assert await eventually(lambda name=name: r.exists(name)), f"{name}: the stage did not start"
        await feed.publish(r, CANDLES, [candle(low=2990.0, close=3000.0)])  # the market price, no stop yet

        # An entry fills, and its commit arms the default stop 5 % below the average price.
        await publish(r, DECISIONS, [decision("ETHUSDT", "BUY", str(qty), "3000")])
        assert await eventually(lambda: r.hget(keys.PROTECT_STOPS, "ETHUSDT")), "the entry armed no stop"
        level = protect.decode(await r.hget(keys.PROTECT_STOPS, "ETHUSDT") or "")
        assert level.stop == Decimal(3000) * Decimal("1.001") * Decimal("0.95")  # the buy's fee is part of the cost
        stop = float(level.stop)
        await feed.publish(r, CANDLES, [candle(low=stop + 1, close=stop + 50, minute=1)])  # near, not crossed

        # While execution is dead, another order comes, then the crossing candle: the exit waits as an
        # intent behind it, and once execution reads both, the exit waits for the order rate (held, pending).
        await fleet.kill_execution("before the crossing")
        await publish(r, DECISIONS, [decision("BTCUSDT", "BUY", "0.01", "60000")])

        async def routed() -> bool:
            return bool(await r.xlen(INTENTS) == 2)

        assert await eventually(routed), "the other order was not routed"
        await feed.publish(r, CANDLES, [candle(low=stop - 30, close=stop - 10, minute=2)])

        async def exit_intent() -> tuple[str, str] | None:
            for entry_id, fields in await r.xrange(INTENTS):
                if json.loads(fields["payload"]).get("strategy") == protect.STRATEGY:
                    return entry_id, client_order_id(entry_id, fields["trace_id"], fields["correlation_id"])
            return None

        found = await eventually(exit_intent)
        assert found is not None, "the crossing candle fired no exit"
        exit_id, coid = found

        # Started again and killed while it holds the exit: first while the exit waits for the rate, then
        # (polled) until a kill lands between its order and its result, or after it; candles keep crossing.
        for minute in range(3, 3 + RESTARTS):
            await fleet.start_execution()
            done = await fleet.kill_holding(exit_id, coid, placed=minute > 3)
            await feed.publish(r, CANDLES, [candle(low=stop - 60, close=stop - 40, minute=minute)])
            if done != "before the order":
                break
        await fleet.start_execution()
        assert await eventually(lambda: result_of(r, exit_id)), "the exit has no result"
        # Once more after the exit's result: the levels are gone, the candles still cross where they were.
        await fleet.kill_execution("after the result")
        await feed.publish(r, CANDLES, [candle(low=stop - 90, close=stop - 70, minute=3 + RESTARTS)])
        await fleet.start_execution()
        assert await eventually(lambda: settled(r)), "the stages did not finish their streams"
        assert await fleet.execution_ready()  # started up: SIGTERM now finishes cleanly
    finally:
        print(f"kills of execution: {fleet.kills}")
        codes = await fleet.stop()
    assert codes == [0, 0]
    assert fleet.kills[:2] == ["before the crossing", "before the order"]
    assert fleet.kills[-1] == "after the result"

    exits = [p for p in await payloads(r, DECISIONS) if p.get("strategy") == protect.STRATEGY]
    assert len(exits) == 1  # fired once, however often the candles crossed and execution restarted
    assert (exits[0]["side"], Decimal(exits[0]["qty"])) == ("SELL", qty)
    intents = [p for p in await payloads(r, INTENTS) if p.get("strategy") == protect.STRATEGY]
    assert len(intents) == 1
    outcomes = await results(r)
    assert sorted((o["symbol"], o["side"], o["status"], o["strategy"]) for o in outcomes) == [
        ("BTCUSDT", "BUY", "FILLED", ""),
        ("ETHUSDT", "BUY", "FILLED", ""),
        ("ETHUSDT", "SELL", "FILLED", protect.STRATEGY),
    ]
    sell = next(o for o in outcomes if o["side"] == "SELL")
    assert (sell["intent_id"], sell["client_order_id"], Decimal(sell["filled_qty"])) == (exit_id, coid, qty)
    position = portfolio.decode(await r.hget(keys.BOOK_POSITIONS, "ETHUSDT") or "")
    assert position.qty == 0
    assert await r.hget(keys.PROTECT_STOPS, "ETHUSDT") is None  # the close removed the levels
    balances = await r.hgetall(keys.paper_balances())
    assert Decimal(balances.get("ETH", "0")) == 0  # one sale of what one purchase bought


# ---- candles no one may believe fire no stop ---------------------------------------------------------------


async def test_a_candle_with_an_impossible_price_fires_no_stop_and_a_real_crossing_still_does(
    r: Redis, clean_url: str, settings_for: Any, log_trap: Any
) -> None:
    """Anyone who can write to the candle stream can publish a candle whose low is 0 (or negative, or below
    its own close while its high sits under its open): such a candle must not sell the position. The stage
    skips it, says why in one line, acknowledges it, and the next real candle that crosses the stop fires
    the exit, once."""
    settings = settings_for(clean_url, block_ms=10)
    await r.hset(keys.BOOK_POSITIONS, "ETHUSDT", portfolio.encode(held("0.5", "1500")))
    await r.hset(keys.PROTECT_STOPS, "ETHUSDT", protect.encode(armed("2850")))
    stage = protect.Protect(r, settings)
    await stage.consumer.setup()
    impossible = [
        candle(0.0, high=3000.0, close=2990.0),
        candle(-5.0, high=3000.0, close=2990.0, minute=1),
        Candle(
            symbol="ETHUSDT",
            interval="1m",
            open_time=1_768_688_820_000,
            open=2990.0,
            high=2900.0,
            low=2800.0,
            close=2995.0,
            volume=1.0,
        ),
        Candle(
            symbol="ETHUSDT",
            interval="1m",
            open_time=1_768_688_880_000,
            open=2990.0,
            high=3000.0,
            low=2800.0,
            close=2995.0,
            volume=-1.0,
        ),
    ]
    await publish(r, CANDLES, [feed.candle_fields(c) for c in impossible])
    await stage.handle(await stage.consumer.read_new(wait=False))

    assert await r.xlen(DECISIONS) == 0, "an impossible candle fired the stop"
    assert len(log_trap.lines("candle_skipped")) == len(impossible)
    assert (await r.xpending(CANDLES, PROTECT_GROUP))["pending"] == 0
    assert not protect.decode(await r.hget(keys.PROTECT_STOPS, "ETHUSDT") or "").fired

    await publish(
        r, CANDLES, [feed.candle_fields(candle(2840.0, minute=5)), feed.candle_fields(candle(2830.0, minute=6))]
    )
    await stage.handle(await stage.consumer.read_new(wait=False))
    [exit_] = await payloads(r, DECISIONS)
    assert (exit_["symbol"], exit_["side"], exit_["qty"]) == ("ETHUSDT", "SELL", "0.5")
