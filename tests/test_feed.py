"""The feed: publishing, replaying and running a source into the candle stream, and the feed command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator

import msgspec

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.events import MARKET_CANDLE, Candle, decode_event
from quantum_trader.feed import ALREADY_PUBLISHED, publish, replay, run_feed
from quantum_trader.marketdata import synthetic


def bar(t: int, close: float = 10.0, **change: float) -> Candle:
    values = {"open": close, "high": close + 1, "low": close - 1, "close": close, "volume": 5.0} | change
    return Candle(symbol="X", interval="1m", open_time=t, **values)


async def test_publish_writes_candles_and_latest_prices(r: Redis) -> None:
    candles = [bar(1, close=10.0), bar(2, close=11.0)]
    await publish(r, "quantum:stream:market.candle", candles)
    entries = await r.xrange("quantum:stream:market.candle")
    assert [decode_event(fields, Candle, MARKET_CANDLE)[1] for _, fields in entries] == candles
    assert await r.hget(keys.PRICE_HASH, "X") == "11.0"


async def test_replay_paces_by_candle_times_at_a_speed_factor() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    candles = [bar(0), bar(60_000), msgspec.structs.replace(bar(60_000), symbol="Y"), bar(180_000)]
    batches = [b async for b in replay(candles, speed=60, sleep=sleep)]
    assert [[c.open_time for c in b] for b in batches] == [[0], [60_000, 60_000], [180_000]]
    assert slept == [1.0, 2.0]  # one minute of market time a second

    slept.clear()
    assert [len(b) async for b in replay([bar(i) for i in range(25)], rate=100, sleep=sleep)] == [10, 10, 5]
    assert slept == [0.1, 0.1, 0.05]


async def test_run_feed_cleans_then_publishes(r: Redis) -> None:
    async def source() -> AsyncIterator[list[Candle]]:
        yield [bar(1), bar(2, close=-5.0)]
        yield [bar(1), bar(3)]  # bar(1) again: a duplicate across batches

    totals = await run_feed(r, "quantum:stream:market.candle", source())
    assert (totals.published, totals.skipped) == (2, 2)
    entries = await r.xrange("quantum:stream:market.candle")
    assert [decode_event(f, Candle, MARKET_CANDLE)[1].open_time for _, f in entries] == [1, 3]


async def test_a_feed_run_again_skips_what_the_stream_already_holds_and_says_why(r: Redis) -> None:
    candles = synthetic({"ETHUSDT": 3000.0}, 30)

    async def source(items: list[Candle]) -> AsyncIterator[list[Candle]]:
        yield items

    first = await run_feed(r, "quantum:stream:market.candle", source(candles))
    assert (first.published, first.skipped) == (30, 0)
    again = await run_feed(r, "quantum:stream:market.candle", source([*candles, bar(candles[-1].open_time + 60_000)]))
    assert (again.published, again.skipped) == (1, 30)
    assert again.reasons == {ALREADY_PUBLISHED: 30}
    assert "skipped 30: 30 already published" in again.summary("S")
    assert await r.xlen("quantum:stream:market.candle") == 31


def test_feed_command_twice_reports_the_skipped_candles_in_its_summary(clean_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": clean_url}
    command = [sys.executable, "-m", "quantum_trader", "feed", "--count", "20"]
    runs = [subprocess.run(command, capture_output=True, text=True, timeout=120, env=env) for _ in range(2)]
    assert [done.returncode for done in runs] == [0, 0], runs[1].stderr
    assert "published 60 candles to quantum:stream:market.candle; none skipped" in runs[0].stdout
    assert "published 0 candles to quantum:stream:market.candle; skipped 60: 60 already published" in runs[1].stdout
