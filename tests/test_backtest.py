"""Backtests: the same trades twice, and a report that matches hand-computed PnL."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import backtesting
import numpy as np

from quantum_trader.backtest import run
from quantum_trader.marketdata import Candle, read_file
from quantum_trader.strategies import EmaCross, RsiReversion
from quantum_trader.strategies.base import Closes, Signal

SAMPLES = Path(backtesting.__file__).parent / "test"


@dataclass
class BuyThenSell:
    """Buys on the 3rd candle, sells on the 6th: a trade whose PnL can be computed by hand."""

    name: str = "buy-then-sell"
    version: str = "1"
    warmup: int = 1

    def decide(self, closes: Closes) -> Signal | None:
        return Signal("BUY", 1.0) if len(closes) == 3 else Signal("SELL", 1.0) if len(closes) == 6 else None


def candles(closes: list[float]) -> list[Candle]:
    return [Candle(symbol="ETHUSDT", interval="1h", open_time=3_600_000 * (i + 1), open=c, high=c + 1, low=c - 1,
                   close=c, volume=1.0) for i, c in enumerate(closes)]  # fmt: skip


async def test_report_matches_hand_computed_pnl() -> None:
    closes = [100.0, 101.0, 100.0, 104.0, 108.0, 110.0, 109.0]
    report = await run(candles(closes), [BuyThenSell()], start_quote=Decimal(1000), notional=Decimal(500),
                       fee_rate=Decimal("0.001"))  # fmt: skip
    # Fixed notional per decision: BUY 500/100 = 5 at the 3rd close, SELL 500/110 (6 decimals, down) at the 6th.
    bought, sold = 5.0, 4.545454
    buy_fee, sell_fee = bought * 100 * 0.001, sold * 110 * 0.001
    assert [(t.side, float(t.qty), float(t.price)) for t in report.trades] == [
        ("BUY", bought, 100.0),
        ("SELL", sold, 110.0),
    ]
    quote = 1000 - bought * 100 - buy_fee + sold * 110 - sell_fee
    held = bought - sold
    end_equity = quote + held * 109  # the last close values what is still held
    assert abs(report.end_equity - end_equity) < 1e-9
    assert abs(report.pnl - (end_equity - 1000)) < 1e-9
    assert abs(report.return_pct - (end_equity / 1000 - 1) * 100) < 1e-9
    assert abs(report.fees - (buy_fee + sell_fee)) < 1e-9
    assert report.win_rate == 1.0  # the sold part earned 110 against a cost of 100.1 per unit
    assert abs(report.exposure_pct - 5 / 7 * 100) < 1e-9  # holding from the 3rd candle to the end
    # Two dips: the buy's fee below the starting 1000, and the 7th close (109) against the peak at the 6th.
    peak = quote + held * 110
    fee_dip, last_dip = buy_fee / 1000, (peak - end_equity) / peak
    assert abs(report.max_drawdown_pct - max(fee_dip, last_dip) * 100) < 1e-9


async def test_same_data_same_strategies_same_trades() -> None:
    data = read_file(SAMPLES / "EURUSD.csv")[:600]
    first = await run(data, [EmaCross(), RsiReversion()], notional=Decimal(1000))
    second = await run(data, [EmaCross(), RsiReversion()], notional=Decimal(1000))
    assert len(first.trades) > 5
    assert first.trades == second.trades
    assert first.summary() == second.summary()


def test_cli_backtest_writes_html(tmp_path: Path) -> None:
    closes = 100 + np.cumsum(np.sin(np.arange(120) / 6))
    rows = "\n".join(f"{1_700_000_000 + 3600 * i},{c},{c + 1},{c - 1},{c},10" for i, c in enumerate(closes))
    (tmp_path / "ethusdt.csv").write_text("time,open,high,low,close,volume\n" + rows + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "quantum_trader", "backtest", "--data", str(tmp_path / "ethusdt.csv"), "--json",
         "--html", str(tmp_path / "report.html")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"symbol": "ETHUSDT"' in done.stdout
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "<h2>Trades</h2>" in page


def test_cli_backtest_on_unusable_data_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "ethusdt.csv").write_text("time,open,high,low,close,volume\n1700000000,0,0,0,0,1\n")
    done = subprocess.run(
        [sys.executable, "-m", "quantum_trader", "backtest", "--data", str(tmp_path / "ethusdt.csv")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no usable candles" in done.stderr
    assert "Traceback" not in done.stderr
