"""Market data: each source, and bad data never reaching a strategy."""

from __future__ import annotations

import itertools
from pathlib import Path

import backtesting
import msgspec
import pandas as pd
import pytest

from quantum_trader.errors import ConfigError
from quantum_trader.events import Candle
from quantum_trader.marketdata import (
    GapRule,
    between,
    clean,
    gap,
    gap_rule,
    interval_ms,
    parse_time,
    read_file,
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


def test_the_gap_rule_is_a_setting_with_a_default_per_market() -> None:
    goog = read_file(SAMPLES / "GOOG.csv")  # equities, daily: weekends and holidays closed
    eurusd = read_file(SAMPLES / "EURUSD.csv")  # FX, hourly: closed from Friday evening to Sunday evening
    crypto = synthetic({"BTCUSDT": 60_000.0}, 3000)  # 24/7
    assert gap_rule("auto", goog) == gap_rule("auto", eurusd) == GapRule(3, 5 * 86_400_000)
    assert gap_rule("auto", crypto) == gap_rule("auto") == GapRule(3, None)  # the engine on a stream: 24/7

    def restarts(candles: list[Candle], rule: GapRule) -> int:
        return sum(rule(a.open_time, b) for a, b in itertools.pairwise(candles))

    assert restarts(goog, GapRule()) > 50  # the old rule: every long weekend restarted the warm-up
    assert restarts(goog, gap_rule("auto", goog)) == 0
    assert restarts(eurusd, gap_rule("auto", eurusd)) == 0
    assert restarts(goog, gap_rule("off")) == 0
    assert restarts(goog, gap_rule("1")) == restarts(goog, gap_rule("1d")) == len(goog) - 1 - 1684  # beyond a day
    week = msgspec.structs.replace(goog[1], open_time=goog[0].open_time + 8 * 86_400_000)
    assert gap_rule("auto", goog)(goog[0].open_time, week)  # a closed week is a hole even for equities
    with pytest.raises(ConfigError, match="QT_AI_GAP"):
        gap_rule("soon")


def test_time_windows_for_train_and_backtest() -> None:
    candles = [bar(parse_time(f"2024-01-0{d}", "--from")) for d in range(1, 6)]
    assert parse_time("2024-01-02T00:00:00+00:00", "--from") == candles[1].open_time
    assert between(candles, candles[1].open_time, candles[3].open_time) == candles[1:3]
    assert between(candles, None, candles[1].open_time) == candles[:1]
    with pytest.raises(ConfigError, match="--until 'last week'"):
        parse_time("last week", "--until")
