"""The reference side of the backtest-speed row: backtesting.py trades the EMA(12)/EMA(26) cross on a CSV.

``python bench/backtesting_reference.py FILE.csv [--fast 12 --slow 26 --warmup 28]`` prints one JSON line:
``{"candles": ..., "trades": ..., "run_s": ...}`` (``run_s``: ``Backtest.run()`` alone).

The whole command is timed, so this script imports backtesting.py, pandas and numpy only, never the
project. The rule and its settings are those of ``ReferenceEmaCross`` in tests/test_backtest.py:
long-only, buy 10 % of the equity when flat on the upward cross, close the position on the
downward one, fills at the close, no commission, 10,000 of cash. ``FractionalBacktest`` trades
fractions of a unit: backtesting.py buys whole units, and 10 % of 10,000 buys no whole BTC.
The position still open at the end is closed on the last candle (``finalize_trades``), so the
trade count is the number of entries.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from backtesting import Strategy
from backtesting.lib import FractionalBacktest


def ema(values: Any, span: int) -> Any:
    """pandas' EMA, as in the test (the reference's indicators are not the project's)."""
    return pd.Series(values).ewm(span=span, adjust=False).mean().to_numpy()


class EmaCross(Strategy):  # type: ignore[misc]
    """EMA(fast)/EMA(slow) crossing, long-only: buy when flat, close the position on the way down."""

    fast = 12
    slow = 26
    warmup = 28  # the project's EmaCross().warmup (slow + 2); the bench passes it in

    def init(self) -> None:
        self.fast_ema = self.I(ema, self.data.Close, self.fast)
        self.slow_ema = self.I(ema, self.data.Close, self.slow)

    def next(self) -> None:
        if len(self.data) < self.warmup:
            return
        before, now = self.fast_ema[-2] - self.slow_ema[-2], self.fast_ema[-1] - self.slow_ema[-1]
        if before <= 0 < now and not self.position:
            self.buy(size=0.1)
        elif before >= 0 > now and self.position:
            self.position.close()


def read(path: Path) -> pd.DataFrame:
    """The bench's CSV (epoch-millisecond ``timestamp``, lower-case OHLCV) in backtesting.py's shape."""
    frame = pd.read_csv(path)
    frame.index = pd.to_datetime(frame.pop("timestamp"), unit="ms")
    return frame.rename(columns=str.capitalize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--fast", type=int, default=EmaCross.fast)
    parser.add_argument("--slow", type=int, default=EmaCross.slow)
    parser.add_argument("--warmup", type=int, default=EmaCross.warmup)
    args = parser.parse_args()
    frame = read(args.data)
    with warnings.catch_warnings():  # backtesting.py's own notices (fractional trading, open trades)
        warnings.simplefilter("ignore")
        backtest = FractionalBacktest(
            frame, EmaCross, cash=10_000, commission=0, trade_on_close=True, finalize_trades=True
        )
        started = time.perf_counter()
        stats = backtest.run(fast=args.fast, slow=args.slow, warmup=args.warmup)
        run_s = time.perf_counter() - started
    print(json.dumps({"candles": len(frame), "trades": int(stats["# Trades"]), "run_s": round(run_s, 4)}))


if __name__ == "__main__":
    main()
