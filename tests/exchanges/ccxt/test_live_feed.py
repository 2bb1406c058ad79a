"""The live market-data source: an exchange's public candles, polled without keys, into the candle stream."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from decimal import Decimal

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.embedded import free_port
from quantum_trader.errors import ConfigError, TransientExchangeError
from quantum_trader.events import MARKET_CANDLE, Candle, decode_event
from quantum_trader.exchanges.base import OrderRequest
from quantum_trader.exchanges.ccxt import CcxtExchange
from quantum_trader.feed import PollStats, live, run_feed
from quantum_trader.settings import Settings
from tests.exchanges.conftest import LogTrap
from tests.exchanges.fake_binance import FakeBinance

MINUTE = 60_000


async def no_sleep(_seconds: float) -> None:
    return None


class Rows:
    """An in-memory OHLCV source (logic test of the polling rule, not of ccxt)."""

    def __init__(self, pages: list[list[int]]) -> None:
        self.pages = pages

    async def candles(self, symbol: str, timeframe: str = "1m", limit: int = 100) -> list[list[Decimal]]:
        opens = self.pages.pop(0)
        return [[Decimal(t), Decimal(10), Decimal(11), Decimal(9), Decimal(10), Decimal(1)] for t in opens]


async def test_each_closed_candle_once_and_never_the_one_still_forming() -> None:
    now = 10 * MINUTE + 30_000  # the candle opened at minute 10 is still forming
    source = Rows([[7 * MINUTE, 8 * MINUTE, 9 * MINUTE, 10 * MINUTE], [9 * MINUTE, 10 * MINUTE, 11 * MINUTE]])
    batches = [b async for b in live(source, ["ETHUSDT"], poll_s=0, now_ms=lambda: now, sleep=no_sleep, polls=2)]
    assert [[c.open_time // MINUTE for c in b] for b in batches] == [[7, 8, 9]]
    with pytest.raises(ConfigError, match="timeframe"):
        [b async for b in live(source, ["ETHUSDT"], timeframe="often", polls=1)]


@pytest.fixture
def public_settings(fake: FakeBinance, settings_for: Callable[..., Settings], clean_url: str) -> Settings:
    """Paper trading (no keys anywhere) reading the fake exchange's public data."""
    return settings_for(clean_url, exchange_api_url=fake.url, exchange_timeout_s=2, exchange_retries=1)


async def test_public_candles_reach_the_candle_stream_and_the_price_hash(
    r: Redis, fake: FakeBinance, public_settings: Settings
) -> None:
    exchange = CcxtExchange.public(r, public_settings, "binance")
    try:
        source = live(exchange, ["ETHUSDT"], poll_s=0, limit=5, sleep=no_sleep, polls=2)
        totals = await run_feed(r, public_settings.candle_stream, source)
    finally:
        await exchange.close()
    entries = await r.xrange(public_settings.candle_stream)
    assert 5 <= totals.published == len(entries) <= 6  # a second poll adds at most the minute that just closed
    opens = [decode_event(fields, Candle, MARKET_CANDLE)[1].open_time for _id, fields in entries]
    assert opens == sorted(set(opens))  # no candle twice
    assert Decimal(await r.hget(keys.PRICE_HASH, "ETHUSDT") or "0") >= Decimal(3004)
    assert fake.calls("GET", "/api/v3/account") == 0  # public endpoints only


async def test_the_keyless_client_refuses_to_place_orders(r: Redis, public_settings: Settings) -> None:
    exchange = CcxtExchange.public(r, public_settings, "binance")
    try:
        order = OrderRequest(client_order_id="qt-x", symbol="ETHUSDT", side="BUY", qty=Decimal(1))
        with pytest.raises(ConfigError, match="places no orders"):
            await exchange.place_orders([order])
    finally:
        await exchange.close()
    with pytest.raises(ConfigError, match="not a ccxt exchange"):
        CcxtExchange.public(r, public_settings, "no-such-exchange")


async def test_feed_command_polls_the_exchange(fake: FakeBinance, clean_url: str, r: Redis) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env |= {"QT_REDIS_URL": clean_url, "QT_EXCHANGE_API_URL": fake.url, "QT_LOG_FORMAT": "json"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quantum_trader", "feed", "--source", "live", "--symbols", "ETHUSDT,BTCUSDT",
        "--poll-s", "0.2", "--duration", "3", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    assert "published" in out.decode()
    symbols = {fields["correlation_id"] for _id, fields in await r.xrange("quantum:stream:market.candle")}
    assert symbols == {"ETHUSDT", "BTCUSDT"}
    assert await r.hget(keys.PRICE_HASH, "BTCUSDT") is not None


async def test_a_symbol_the_exchange_lacks_is_logged_and_the_others_still_flow(
    r: Redis, public_settings: Settings, log_trap: LogTrap
) -> None:
    exchange = CcxtExchange.public(r, public_settings, "binance")
    try:
        source = live(exchange, ["NOPEUSDT", "ETHUSDT"], poll_s=0, limit=3, sleep=no_sleep, polls=1)
        totals = await run_feed(r, public_settings.candle_stream, source)
    finally:
        await exchange.close()
    assert totals.published == 3
    [line] = log_trap.lines("live_poll_failed")
    assert "NOPEUSDT" in line


class Unreachable:
    """A source whose every request fails as the network does (after the adapter's retries)."""

    async def candles(self, symbol: str, timeframe: str = "1m", limit: int = 100) -> list[list[Decimal]]:
        raise TransientExchangeError("fetch_ohlcv: Cannot connect to host api.binance.com:443")


async def test_a_source_that_never_answers_is_told_apart_from_one_that_sometimes_fails() -> None:
    stats = PollStats()
    assert [b async for b in live(Unreachable(), ["ETHUSDT", "BTCUSDT"], sleep=no_sleep, polls=3, stats=stats)] == []
    assert (stats.requests, stats.failed) == (6, 6)
    problem = stats.problem("binance")
    assert problem is not None
    assert problem.startswith("the exchange binance could not be reached: 6 of 6 requests failed")
    assert "Cannot connect" in problem

    some = PollStats()
    source = Rows([[7 * MINUTE]])
    [b async for b in live(source, ["ETHUSDT"], now_ms=lambda: 10 * MINUTE, sleep=no_sleep, polls=1, stats=some)]
    assert some.problem("binance") is None


async def test_feed_command_says_the_exchange_cannot_be_reached_and_fails(clean_url: str, r: Redis) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env |= {"QT_REDIS_URL": clean_url, "QT_EXCHANGE_API_URL": nobody, "QT_EXCHANGE_RETRIES": "0",
            "QT_EXCHANGE_TIMEOUT_S": "1", "QT_LOG_FORMAT": "json"}  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quantum_trader", "feed", "--source", "live", "--symbols", "ETHUSDT",
        "--poll-s", "0.2", "--duration", "1", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1, out.decode() + err.decode()
    assert "published 0 candles" in out.decode()
    assert "error: the exchange binance could not be reached" in err.decode()
    assert "Traceback" not in err.decode()
    assert await r.xlen("quantum:stream:market.candle") == 0
