"""The in-process transport's own parts: the HINCRBYFLOAT twin, columns of candles, several symbols."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from quantum_trader.backtest import run
from quantum_trader.backtest.inprocess import hincrbyfloat
from quantum_trader.bars import Bars, ordered_clean
from quantum_trader.errors import ConfigError
from quantum_trader.events import Candle
from quantum_trader.marketdata import clean, read_bars, synthetic
from quantum_trader.settings import Settings
from quantum_trader.strategies import EmaCross

amounts = st.decimals(min_value=Decimal("-1e9"), max_value=Decimal("1e9"), allow_nan=False, places=None).filter(
    lambda d: d.is_finite() and len(str(d)) < 40 and "E" not in str(d)
)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(amounts, min_size=1, max_size=8))
def test_the_realised_pnl_twin_writes_what_the_server_writes(server_url: str, steps: list[Decimal]) -> None:
    """Today's realised PnL goes through HINCRBYFLOAT (long double, 17 places): the twin must print the same text."""
    server = redis.Redis.from_url(server_url, decode_responses=True)
    try:
        server.delete("qt:test:twin")
        ours: str | None = None
        for step in steps:
            text = f"{step:f}"
            theirs = server.hincrbyfloat("qt:test:twin", "USDT", text)
            ours = hincrbyfloat(ours, text)
            assert ours == server.hget("qt:test:twin", "USDT"), (steps, theirs)
    finally:
        server.close()


candle_rows = st.lists(
    st.tuples(
        st.sampled_from(["AAAUSDT", "BBBUSDT"]),
        st.integers(0, 30),
        st.floats(allow_nan=True, allow_infinity=True, width=64),
        st.floats(-5, 200),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(rows=candle_rows)
def test_columns_clean_exactly_as_the_candle_list_is_cleaned(rows: list[tuple[str, int, float, float]]) -> None:
    candles = [
        Candle(symbol=s, interval="1m", open_time=60_000 * t, open=abs(p) if p == p else p, high=h,
               low=min(abs(p) if p == p else 1.0, h), close=abs(p) if p == p else p, volume=1.0)
        for s, t, p, h in rows
    ]  # fmt: skip
    expected, skipped = clean(sorted(candles, key=lambda c: (c.open_time, c.symbol)))
    kept, left_out = ordered_clean(Bars.of(candles))
    assert list(kept) == expected
    assert sorted(reason for _row, reason in left_out) == sorted(item.reason for item in skipped)


async def test_two_symbols_trade_in_one_run_with_one_balance() -> None:
    candles = synthetic({"BTCUSDT": 30_000.0, "ETHUSDT": 2_000.0}, 400)
    both = await run(candles, [EmaCross(fast=5, slow=20)], Settings(), start_quote=Decimal(10_000))
    alone = await run([c for c in candles if c.symbol == "BTCUSDT"], [EmaCross(fast=5, slow=20)], Settings(),
                      start_quote=Decimal(10_000))  # fmt: skip
    assert both.symbol == "BTCUSDT,ETHUSDT"
    assert len(both.times) == 400
    assert {t.symbol for t in both.trades} == {"BTCUSDT", "ETHUSDT"}
    # Fixed sizing and enough quote for both: BTC's trades are the same with ETH beside it.
    assert [t for t in both.trades if t.symbol == "BTCUSDT"] == alone.trades
    assert both.streams is not None
    assert alone.streams is not None
    assert both.streams.balances["USDT"] != alone.streams.balances["USDT"]


async def test_a_file_naming_each_rows_symbol_backtests_every_market(tmp_path: Path) -> None:
    candles = synthetic({"BTCUSDT": 30_000.0, "ETHUSDT": 2_000.0}, 300)
    rows = [f"{c.open_time},{c.symbol},{c.open!r},{c.high!r},{c.low!r},{c.close!r},{c.volume!r}" for c in candles]
    path = tmp_path / "two-markets.csv"
    path.write_text("timestamp,symbol,open,high,low,close,volume\n" + "\n".join(rows) + "\n")
    bars = read_bars(path)
    assert sorted(bars.symbols) == ["BTCUSDT", "ETHUSDT"]
    assert list(bars) == [msgspec.structs.replace(c, interval="60s") for c in candles]
    from_file = await run(bars, [EmaCross(fast=5, slow=20)], Settings())
    from_list = await run(candles, [EmaCross(fast=5, slow=20)], Settings())
    assert from_file.trades == from_list.trades
    assert {t.symbol for t in from_file.trades} == {"BTCUSDT", "ETHUSDT"}
    only = read_bars(path, "ethusdt")  # one market of the file: its rows alone
    assert only.symbols == ("ETHUSDT",)
    assert list(only) == [msgspec.structs.replace(c, interval="60s") for c in candles if c.symbol == "ETHUSDT"]
    with pytest.raises(ConfigError, match="no rows of SOLUSDT; its symbol column names BTCUSDT, ETHUSDT"):
        read_bars(path, "SOLUSDT")


def test_a_downloaded_files_name_gives_its_symbol(tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-1m.csv"
    path.write_text("timestamp,open,high,low,close,volume\n1767225600000,1,1,1,1,1\n")
    assert read_bars(path).symbols == ("BTCUSDT",)
