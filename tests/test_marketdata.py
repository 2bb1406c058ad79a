"""Market data: each source, and bad data never reaching a strategy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import backtesting
import msgspec
import pandas as pd
import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError
from quantum_trader.events import decode_event
from quantum_trader.marketdata import (
    MARKET_CANDLE,
    Candle,
    clean,
    gap,
    interval_ms,
    publish,
    read_file,
    replay,
    run_feed,
    synthetic,
)

SAMPLES = Path(backtesting.__file__).parent / "test"


def bar(t: int, close: float = 10.0, **change: float) -> Candle:
    values = {"open": close, "high": close + 1, "low": close - 1, "close": close, "volume": 5.0} | change
    return Candle(symbol="X", interval="1m", open_time=t, **values)


def test_synthetic_is_deterministic_per_seed_and_realistic() -> None:
    a = synthetic({"BTCUSDT": 60_000.0, "ETHUSDT": 3_000.0}, 600, seed=1)
    assert a == synthetic({"BTCUSDT": 60_000.0, "ETHUSDT": 3_000.0}, 600, seed=1)
    assert a != synthetic({"BTCUSDT": 60_000.0, "ETHUSDT": 3_000.0}, 600, seed=2)
    kept, skipped = clean(a)
    assert (len(kept), skipped) == (1200, [])  # nothing the cleaner would reject
    eth = [c.close for c in a if c.symbol == "ETHUSDT"]
    assert min(eth) > 1_000
    assert max(eth) < 9_000


def test_bad_data_is_skipped_with_its_reason() -> None:
    candles = [
        bar(1), bar(2, close=float("nan")), bar(3, close=-1.0), bar(4, high=5.0), bar(4), bar(4), bar(3), bar(5),
    ]  # fmt: skip
    kept, skipped = clean(candles)
    assert [c.open_time for c in kept] == [1, 4, 5]
    assert [s.reason for s in skipped] == [
        "non-finite price or volume", "zero or negative price", "high/low do not contain open and close",
        "duplicate open time", "out of order",
    ]  # fmt: skip


def test_the_packaged_btcusd_sample_reads_with_its_index_column_as_time() -> None:
    candles = read_file(SAMPLES / "BTCUSD.csv")
    assert candles[0].symbol == "BTCUSD"
    assert candles[0].open_time == int(pd.Timestamp("2012-01-31", tz="UTC").timestamp() * 1000)
    assert (candles[0].open, candles[0].close) == (4.58, 5.55)
    assert clean(candles)[1] == []


@pytest.mark.parametrize("unit", ["s", "ms"])
def test_csv_and_parquet_with_epoch_times_and_any_case(tmp_path: Path, unit: str) -> None:
    scale = 1 if unit == "s" else 1000
    frame = pd.DataFrame({"Timestamp": [1_700_000_000 * scale, 1_700_000_060 * scale], "OPEN": [1.0, 2.0],
                          "High": [2.0, 3.0], "low": [0.5, 1.5], "Close": [1.5, 2.5], "Volume": [10, 20]})  # fmt: skip
    frame.to_csv(tmp_path / "ethusdt.csv", index=False)
    frame.to_parquet(tmp_path / "ethusdt.parquet")
    for path in (tmp_path / "ethusdt.csv", tmp_path / "ethusdt.parquet"):
        candles = read_file(path)
        assert [c.open_time for c in candles] == [1_700_000_000_000, 1_700_000_060_000]
        assert candles[1].symbol == "ETHUSDT"
        assert candles[1].close == 2.5


def test_a_file_without_the_needed_columns_names_them(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("when,open,high,low,close,volume\n2024-01-01,1,1,1,1,1\n")
    with pytest.raises(ConfigError, match="no time column: name one of timestamp, time, date, datetime"):
        read_file(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("time,open,high,close\n2024-01-01,1,1,1\n")
    with pytest.raises(ConfigError, match="lacks column"):
        read_file(tmp_path / "y.csv")


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


def test_a_gap_is_more_than_three_intervals() -> None:
    assert interval_ms("1m") == 60_000
    assert interval_ms("3600s") == 3_600_000
    assert interval_ms("soon") is None
    assert not gap(0, bar(180_000))  # three minutes on: still the same market
    assert gap(0, bar(240_000))
    assert not gap(0, msgspec.structs.replace(bar(10**9), interval=""))  # unknown interval: no gap rule


def test_read_file_infers_the_interval_from_the_spacing(tmp_path: Path) -> None:
    rows = [f"{1_700_000_000 + 3600 * i},1,2,0.5,1.5,10" for i in (0, 1, 2, 10, 11)]  # one gap does not skew it
    (tmp_path / "ethusdt.csv").write_text("time,open,high,low,close,volume\n" + "\n".join(rows) + "\n")
    assert {c.interval for c in read_file(tmp_path / "ethusdt.csv")} == {"3600s"}


async def test_run_feed_cleans_then_publishes(r: Redis) -> None:
    async def source() -> AsyncIterator[list[Candle]]:
        yield [bar(1), bar(2, close=-5.0)]
        yield [bar(1), bar(3)]  # bar(1) again: a duplicate across batches

    totals = await run_feed(r, "quantum:stream:market.candle", source())
    assert (totals.published, totals.skipped) == (2, 2)
    entries = await r.xrange("quantum:stream:market.candle")
    assert [decode_event(f, Candle, MARKET_CANDLE)[1].open_time for _, f in entries] == [1, 3]
