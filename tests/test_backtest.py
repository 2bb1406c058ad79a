"""Backtests: the same trades twice, and a report that matches hand-computed PnL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import backtesting
import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest
from backtesting import Strategy as Reference

from quantum_trader.backtest import Report, Trade, html, run
from quantum_trader.events import Candle
from quantum_trader.marketdata import read_file
from quantum_trader.settings import Settings
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
    settings = Settings(paper_fee_rate=Decimal("0.001"), paper_slippage_bps=Decimal(0))
    report = await run(candles(closes), [BuyThenSell()], settings, start_quote=Decimal(1000), notional=Decimal(500))
    # The entry buys 500/100 = 5 at the 3rd close; the exit sells those 5 at the 6th: the position is closed.
    qty = 5.0
    buy_fee, sell_fee = qty * 100 * 0.001, qty * 110 * 0.001
    assert [(t.side, float(t.qty), float(t.price), t.strategy) for t in report.trades] == [
        ("BUY", qty, 100.0, "buy-then-sell"),
        ("SELL", qty, 110.0, "buy-then-sell"),
    ]
    end_equity = 1000 - qty * 100 - buy_fee + qty * 110 - sell_fee  # all quote again: the 7th close changes nothing
    assert abs(report.end_equity - end_equity) < 1e-9
    assert abs(report.pnl - (end_equity - 1000)) < 1e-9
    assert abs(report.return_pct - (end_equity / 1000 - 1) * 100) < 1e-9
    assert abs(report.fees - (buy_fee + sell_fee)) < 1e-9
    assert report.win_rate == 1.0  # sold at 110 against a cost of 100.1 per unit
    assert abs(report.exposure_pct - 3 / 7 * 100) < 1e-9  # holding after the 3rd, 4th and 5th candles
    assert abs(report.max_drawdown_pct - buy_fee / 1000 * 100) < 1e-9  # the one dip: the entry's fee
    assert report.rejected == 0


async def test_same_data_same_strategies_same_trades() -> None:
    data = read_file(SAMPLES / "EURUSD.csv")[:600]
    first = await run(data, [EmaCross(), RsiReversion()], notional=Decimal(1000))
    second = await run(data, [EmaCross(), RsiReversion()], notional=Decimal(1000))
    assert len(first.trades) > 5
    assert first.trades == second.trades
    assert first.summary() == second.summary()


def backtest_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    return subprocess.run([sys.executable, "-m", "quantum_trader", "backtest", *args], capture_output=True, text=True,
                          timeout=120, env=base | (env or {}))  # fmt: skip


def wave_csv(path: Path, count: int = 120) -> Path:
    """Hourly closes on a sine wave: the EMA crossing trades a few times."""
    closes = 100 + np.cumsum(np.sin(np.arange(count) / 6))
    rows = "\n".join(f"{1_700_000_000 + 3600 * i},{c},{c + 1},{c - 1},{c},10" for i, c in enumerate(closes))
    path.write_text("time,open,high,low,close,volume\n" + rows + "\n")
    return path


def test_cli_backtest_json_is_the_report_alone_with_trades_and_rejections(tmp_path: Path) -> None:
    data = wave_csv(tmp_path / "ethusdt.csv")
    # QT_MAX_NOTIONAL (a setting of `run`) applies here too: entries of 1000 USDT are rejected, those of 400 are not.
    done = backtest_cli("--data", str(data), "--strategy", "ema-cross", "--json", "--html", str(tmp_path / "r.html"),
                        env={"QT_MAX_NOTIONAL": "500", "QT_AI_NOTIONAL": "1000"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("{")  # JSON only: no blank line, no progress bar
    report = json.loads(done.stdout)
    assert report["symbol"] == "ETHUSDT"
    assert report["trades"] == len(report["trade_list"]) == 0
    assert report["rejected"] == report["rejections"]["MAX_NOTIONAL"] >= 2
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page
    assert "<h2>Trades</h2>" in page

    done = backtest_cli("--data", str(data), "--strategy", "ema-cross", "--json", "--notional", "400",
                        env={"QT_MAX_NOTIONAL": "500"})  # fmt: skip
    report = json.loads(done.stdout)
    assert report["rejected"] == 0
    assert report["trades"] == len(report["trade_list"]) >= 4
    first = report["trade_list"][0]
    assert (first["side"], first["strategy"]) == ("BUY", "ema-cross")
    assert first["time"].endswith("Z")
    assert abs(Decimal(first["qty"]) * Decimal(first["price"]) - 400) < Decimal("0.001")


def test_cli_backtest_reads_the_settings_of_run_from_the_env_file(tmp_path: Path) -> None:
    data = wave_csv(tmp_path / "ethtry.csv")  # TRY: a quote asset only the env file names
    env_file = tmp_path / "qt.env"
    env_file.write_text("QT_PAPER_FEE_RATE=0.002\nQT_PAPER_SLIPPAGE_BPS=50\nQT_QUOTE_ASSETS=TRY,USDT\n"
                        "QT_PAPER_BALANCES=TRY=20000\nQT_AI_NOTIONAL=300\n")  # fmt: skip
    done = backtest_cli("--data", str(data), "--strategy", "ema-cross", "--json", env={"QT_ENV_FILE": str(env_file)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["start_equity"] == 20_000
    assert report["settings"]["fee_rate"] == "0.002"
    closes = {int(row.split(",")[0]) * 1000: Decimal(row.split(",")[4]) for row in data.read_text().splitlines()[1:]}
    for trade in report["trade_list"]:
        close = closes[int(pd.Timestamp(trade["time"]).timestamp() * 1000)]
        slip = Decimal("1.005") if trade["side"] == "BUY" else Decimal("0.995")  # 50 bps against the trader
        assert Decimal(trade["price"]) == close * slip
        assert Decimal(trade["fee"]) == Decimal(trade["qty"]) * Decimal(trade["price"]) * Decimal("0.002")
    entry = report["trade_list"][0]
    assert abs(Decimal(entry["qty"]) * Decimal(entry["price"]) / Decimal("1.005") - 300) < Decimal("0.001")

    # --balance and --notional override the settings (and --env-file names the file as well as QT_ENV_FILE does).
    done = subprocess.run([sys.executable, "-m", "quantum_trader", "--env-file", str(env_file), "backtest", "--data",
                           str(data), "--strategy", "ema-cross", "--json", "--balance", "5000", "--notional", "50"],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("QT_")})  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["start_equity"] == 5000
    entry = report["trade_list"][0]
    assert abs(Decimal(entry["qty"]) * Decimal(entry["price"]) / Decimal("1.005") - 50) < Decimal("0.001")
    assert report["settings"]["slippage_bps"] == "50"


def test_cli_backtest_on_unusable_data_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "ethusdt.csv").write_text("time,open,high,low,close,volume\n1700000000,0,0,0,0,1\n")
    done = backtest_cli("--data", str(tmp_path / "ethusdt.csv"))
    assert done.returncode == 2
    assert "no usable candles" in done.stderr
    assert "Traceback" not in done.stderr


def reference_ema(values: Any, span: int) -> Any:
    """The indicators of the reference strategies are pandas', not ours."""
    return pd.Series(values).ewm(span=span, adjust=False).mean().to_numpy()


def reference_rsi(values: Any, period: int = 14) -> Any:
    deltas = pd.Series(values).diff()
    gain = deltas.clip(lower=0).iloc[1:].ewm(alpha=1 / period, adjust=False).mean()
    loss = (-deltas.clip(upper=0)).iloc[1:].ewm(alpha=1 / period, adjust=False).mean()
    return np.concatenate([[np.nan], (100 - 100 / (1 + gain / loss)).to_numpy()])


class ReferenceEmaCross(Reference):  # type: ignore[misc]
    """EMA(12)/EMA(26) crossing, long-only, in backtesting.py: buy when flat, close the position on the way down."""

    def init(self) -> None:
        self.fast = self.I(reference_ema, self.data.Close, 12)
        self.slow = self.I(reference_ema, self.data.Close, 26)

    def next(self) -> None:
        if len(self.data) < EmaCross().warmup:
            return
        before, now = self.fast[-2] - self.slow[-2], self.fast[-1] - self.slow[-1]
        if before <= 0 < now and not self.position:
            self.buy(size=0.1)
        elif before >= 0 > now and self.position:
            self.position.close()


class ReferenceRsi(Reference):  # type: ignore[misc]
    """RSI(14) crossing below 30 buys when flat, crossing above 70 closes the position, in backtesting.py."""

    def init(self) -> None:
        self.value = self.I(reference_rsi, self.data.Close)

    def next(self) -> None:
        if len(self.data) < RsiReversion().warmup:
            return
        before, now = self.value[-2], self.value[-1]
        if now < 30 <= before and not self.position:
            self.buy(size=0.1)
        elif now > 70 >= before and self.position:
            self.position.close()


def round_trips(trades: list[Trade]) -> list[tuple[str, str, float, float]]:
    """(entry time, exit time, entry price, exit price) of each closed position, in order."""
    pairs = []
    for entry, exit_ in zip(trades[::2], trades[1::2], strict=False):
        assert (entry.side, exit_.side) == ("BUY", "SELL")
        assert exit_.qty == entry.qty  # the exit closes the whole position it holds, never more, never less
        pairs.append((str(pd.Timestamp(entry.time, unit="ms")), str(pd.Timestamp(exit_.time, unit="ms")),
                      float(entry.price), float(exit_.price)))  # fmt: skip
    return pairs


@pytest.mark.parametrize(("ours", "reference"), [(EmaCross, ReferenceEmaCross), (RsiReversion, ReferenceRsi)])
async def test_round_trips_match_an_independent_backtester(ours: type, reference: type) -> None:
    """Long-only spot, entries on the crossing, exits closing the position: trade for trade what backtesting.py does
    (EURUSD hourly, over weekends: their gaps are market closures, not holes that restart the warm-up)."""
    count = 1000
    frame = pd.read_csv(SAMPLES / "EURUSD.csv", index_col=0, parse_dates=True).iloc[:count]
    with warnings.catch_warnings():  # backtesting.py's own deprecation warnings and "trades remain open"
        warnings.simplefilter("ignore")
        expected = Backtest(frame, reference, cash=10_000, commission=0, trade_on_close=True).run()._trades
    report = await run(read_file(SAMPLES / "EURUSD.csv")[:count], [ours()], start_quote=Decimal(10_000),
                       notional=Decimal(1000))  # fmt: skip
    pairs = round_trips(report.trades)
    assert len(pairs) >= 4
    assert pairs == [
        (str(a), str(b), round(float(p), 6), round(float(q), 6))
        for a, b, p, q in zip(
            expected.EntryTime, expected.ExitTime, expected.EntryPrice, expected.ExitPrice, strict=True
        )
    ]


async def test_both_strategies_together_hold_one_position_each_and_nothing_is_rejected() -> None:
    data = read_file(SAMPLES / "EURUSD.csv")[:1000]
    report = await run(data, [EmaCross(), RsiReversion()], start_quote=Decimal(10_000), notional=Decimal(1000))
    assert report.rejected == 0
    for name in ("ema-cross", "rsi"):
        own = [t for t in report.trades if t.strategy == name]
        assert len(round_trips(own)) >= 4
    held = sum(t.qty if t.side == "BUY" else -t.qty for t in report.trades)
    assert held <= 2 * max(t.qty for t in report.trades)  # at most one open entry per strategy: nothing piles up


async def test_a_market_with_closures_keeps_its_warm_up_over_weekends_and_holidays() -> None:
    """GOOG daily: 3-day weekends and 4- to 5-day holiday closures; the warm-up happens once, at the start."""
    consulted: list[int] = []

    @dataclass
    class Count:
        name: str = "count"
        version: str = "1"
        warmup: int = EmaCross().warmup

        def decide(self, closes: Closes) -> Signal | None:
            consulted.append(len(closes))
            return None

    data = read_file(SAMPLES / "GOOG.csv", symbol="GOOGUSD")[:600]
    await run(data, [Count()], start_quote=Decimal(10_000), notional=Decimal(1000))
    assert len(consulted) == len(data) - Count.warmup + 1


def test_html_rounds_figures_for_display() -> None:
    trade = Trade(1_700_000_000_000, "BUY", Decimal("0.5"), Decimal("1999.99999999791228"), Decimal("0.99999999895614"))
    report = Report("ETHUSDT", 2, [trade], 1000, 1000, 0, 0, 0, None, None, 50, 0.99999999895614, [1000, 1000],
                    [1_700_000_000_000, 1_700_003_600_000])  # fmt: skip
    page = html(report)
    assert "0.99999999895614" not in page
    assert "<td>1</td>" in page  # the fee
    assert "<td>2000</td>" in page  # the price


@dataclass
class EnterThenExit:
    """Buys on every odd candle and sells on every even one: a round trip per two candles."""

    name: str = "enter-then-exit"
    version: str = "1"
    warmup: int = 1

    def decide(self, closes: Closes) -> Signal | None:
        return Signal("BUY" if len(closes) % 2 else "SELL", 1.0)


async def test_a_falling_market_trips_the_drawdown_limit_and_trading_stops_at_the_crossing() -> None:
    closes = [100.0, 80.0, 50.0, 40.0, 25.0, 20.0, 12.5, 10.0, 8.0, 6.4]
    settings = Settings(paper_fee_rate=Decimal(0), max_drawdown_pct=Decimal(5))
    report = await run(candles(closes), [EnterThenExit()], settings, start_quote=Decimal(1000), notional=Decimal(100))
    # Each round trip buys 100 USDT's worth and sells it 20 % lower: 1 @ 100 -> 80, 2 @ 50 -> 40, 4 @ 25 -> 20.
    # Before the third exit the equity is 1000 - 20 - 20 + 4 x (20 - 25) = 940: 6 % below the peak of 1000,
    # the first look at 5 % or more (960 before it). The state moves to REDUCING there; the exit still passes,
    # and every entry after it is refused: no trade after the sixth candle.
    assert [(t.side, float(t.qty), float(t.price)) for t in report.trades] == [
        ("BUY", 1.0, 100.0), ("SELL", 1.0, 80.0), ("BUY", 2.0, 50.0), ("SELL", 2.0, 40.0),
        ("BUY", 4.0, 25.0), ("SELL", 4.0, 20.0),
    ]  # fmt: skip
    assert report.trades[-1].time == 3_600_000 * 6
    assert [(s["state"], s["previous"], s["reason"]) for s in report.states] == [("REDUCING", "ACTIVE", "DRAWDOWN")]
    assert "equity 940.00 USDT is 6.00% below its peak 1000.00" in report.states[0]["detail"]
    assert report.rejections == {"REDUCING": 2}  # the entries of the 7th and 9th candles
    assert abs(report.end_equity - 940) < 1e-9
