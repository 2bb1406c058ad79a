"""``backtest --grid/--optimize/--walk-forward`` from the command line: tables, JSON, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from quantum_trader import cli
from quantum_trader.marketdata import synthetic


def backtest(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it: a process of its own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    return subprocess.run([sys.executable, "-m", "quantum_trader", "backtest", *args], capture_output=True, text=True,
                          timeout=120, env=base)  # fmt: skip


@pytest.fixture
def here(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> Callable[..., tuple[object, str, str]]:
    """The entry point in this process (no interpreter to start): exit code, stdout, stderr."""
    for name in [name for name in os.environ if name.startswith("QT_")]:
        monkeypatch.delenv(name)

    def main(*args: str) -> tuple[object, str, str]:
        capfd.readouterr()
        monkeypatch.setattr(sys, "argv", ["quantum-trader", "backtest", *args])
        code: object = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code
        out = capfd.readouterr()
        return code, out.out, out.err

    return main


def write_csv(path: Path, count: int, seed: int = 11, start: int = 0) -> Path:
    """Synthetic one-minute candles (seeded geometric Brownian motion with regimes) as a CSV file."""
    candles = synthetic({"BTCUSDT": 30_000.0}, count, seed=seed)[start:]
    rows = [f"{c.open_time},{c.open},{c.high},{c.low},{c.close},{c.volume}" for c in candles]
    path.write_text("time,open,high,low,close,volume\n" + "\n".join(rows) + "\n")
    return path


GRID = ["--strategy", "ema-cross", "--notional", "2000", "--jobs", "2",
        "--grid", "ema-cross.fast=3,6,20", "--grid", "ema-cross.slow=10,20"]  # fmt: skip


def test_a_grid_prints_ranked_rows_as_json_and_as_a_table(
    tmp_path: Path, here: Callable[..., tuple[object, str, str]]
) -> None:
    data = write_csv(tmp_path / "btcusdt.csv", 160)
    code, out, err = here("--data", str(data), *GRID, "--json")
    assert code == 0, err
    rows = json.loads(out)
    # fast 20 is not faster than slow 10 or 20: two of six combinations are skipped, and said so.
    assert "skipped 2 of 6 combinations with inconsistent parameters: ema-cross: fast >= slow (2)" in err
    assert [row["rank"] for row in rows] == [1, 2, 3, 4]
    assert sorted((r["params"]["ema-cross.fast"], r["params"]["ema-cross.slow"]) for r in rows) == [
        (3, 10), (3, 20), (6, 10), (6, 20)
    ]  # fmt: skip
    sharpes = [row["sharpe"] for row in rows if row["sharpe"] is not None]
    assert sharpes == sorted(sharpes, reverse=True)
    assert all(row["error"] is None and row["candles"] == 160 for row in rows)

    code, out, err = here("--data", str(data), *GRID, "--rank-by", "return")
    assert code == 0, err
    header = next(line for line in out.splitlines() if "┃ rank" in line)
    for name in ("ema-cross.fast", "ema-cross.slow", "return %", "max drawdown %", "Sharpe", "trades", "win rate %"):
        assert name in header
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    body = [row for row in cells if row and row[0].isdigit()]
    returns = {(r["params"]["ema-cross.fast"], r["params"]["ema-cross.slow"]): r["return_pct"] for r in rows}
    assert [row[0] for row in body] == ["1", "2", "3", "4"]
    ranked = [returns[int(row[1]), int(row[2])] for row in body]
    assert ranked == sorted(ranked, reverse=True)  # the table ranks by return when asked
    assert [f"{value:,.2f}" for value in ranked] == [row[3] for row in body]  # and shows the same figures


def test_settings_or_data_no_combination_can_run_with_stop_the_sweep_in_one_line(
    tmp_path: Path, here: Callable[..., tuple[object, str, str]]
) -> None:
    data = write_csv(tmp_path / "prices.csv", 60)  # the symbol defaults to the file's stem: PRICES has no quote asset
    code, out, err = here("--data", str(data), "--strategy", "ema-cross", "--jobs", "2", "--grid", "ema-cross.fast=3,5")
    assert code == 2
    assert err.startswith("error: symbol 'PRICES' is not BASEQUOTE")
    assert err.count("\n") == 1
    assert out == ""


WALK = ["--strategy", "ema-cross", "--notional", "2000", "--jobs", "2", "--grid", "ema-cross.fast=3,6",
        "--grid", "ema-cross.slow=10", "--walk-forward", "2", "--json"]  # fmt: skip


@pytest.mark.parametrize(
    ("grid", "said"),
    [
        ("ema-cross.fast=8,x", "error: --grid 'ema-cross.fast=8,x': 'x' is not a number"),
        ("ema-cross.speed=8", "error: --grid 'ema-cross.speed=8': ema-cross has no parameter 'speed'; its parameters"),
        ("rsi.period=8", "error: --grid 'rsi.period=8': rsi is not among --strategy (ema-cross)"),
        ("ema-cross.fast=30,40", "error: skipped 2 of 2 combinations with inconsistent parameters"),
    ],
)
def test_a_bad_grid_is_one_line_and_exit_2(
    tmp_path: Path, here: Callable[..., tuple[object, str, str]], grid: str, said: str
) -> None:
    data = write_csv(tmp_path / "btcusdt.csv", 60)
    code, out, err = here("--data", str(data), "--strategy", "ema-cross", "--grid", grid)
    assert code == 2
    assert err.startswith(said)
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert out == ""


def test_walk_forward_reports_each_folds_out_of_sample_figures(
    tmp_path: Path, here: Callable[..., tuple[object, str, str]]
) -> None:
    data = write_csv(tmp_path / "btcusdt.csv", 240)
    done = backtest("--data", str(data), *WALK)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    folds = result["folds"]
    assert [fold["fold"] for fold in folds] == [1, 2]
    for fold in folds:
        assert fold["error"] is None
        assert fold["train"][1] < fold["test"][0]  # ISO-8601 UTC: ordered as text
        assert fold["params"]["ema-cross.slow"] == 10
        assert fold["out_of_sample"]["candles"] == 80  # the test window alone: 240 candles in 3 windows
    assert folds[0]["test"] == folds[1]["train"]  # rolling: the next fold trains on this fold's test window
    combined = result["out_of_sample"]
    assert combined["trades"] == sum(fold["out_of_sample"]["trades"] for fold in folds)
    assert combined["candles"] == 160

    code, out, err = here("--data", str(data), *WALK[:-1])
    assert code == 0, err
    assert "walk-forward: out-of-sample figures only" in out
    assert "chained" in out


def test_optimize_searches_the_grid_with_a_seed(tmp_path: Path, here: Callable[..., tuple[object, str, str]]) -> None:
    data = write_csv(tmp_path / "btcusdt.csv", 120)
    args = ["--data", str(data), "--strategy", "ema-cross", "--notional", "2000", "--jobs", "2", "--json",
            "--grid", "ema-cross.fast=2..12", "--grid", "ema-cross.slow=10..30:10", "--optimize", "6"]  # fmt: skip
    first = backtest(*args, "--seed", "5")
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)
    assert 1 <= len(rows) <= 6
    assert all(2 <= r["params"]["ema-cross.fast"] < r["params"]["ema-cross.slow"] <= 30 for r in rows)
    code, out, err = here(*args, "--seed", "5")
    assert code == 0, err
    assert json.loads(out) == rows  # the same seed, the same trials and figures


def test_several_data_files_are_merged_in_time_order(
    tmp_path: Path, here: Callable[..., tuple[object, str, str]]
) -> None:
    whole = write_csv(tmp_path / "btcusdt.csv", 150)
    (tmp_path / "late").mkdir()
    (tmp_path / "early").mkdir()
    lines = whole.read_text().splitlines()
    (tmp_path / "late" / "btcusdt.csv").write_text("\n".join([lines[0], *lines[81:]]) + "\n")
    (tmp_path / "early" / "btcusdt.csv").write_text("\n".join(lines[:81]) + "\n")
    common = ["--strategy", "ema-cross", "--notional", "2000", "--json"]
    code, one, err = here("--data", str(whole), *common)
    assert code == 0, err
    code, two, err = here("--data", str(tmp_path / "late" / "btcusdt.csv"), "--data",
                          str(tmp_path / "early" / "btcusdt.csv"), *common)  # fmt: skip
    assert code == 0, err
    assert json.loads(two) == json.loads(one)
    assert json.loads(one)["candles"] == 150
    code, _out, err = here("--data", str(whole), "--data", str(whole), "--symbol", "BTCUSDT")
    assert code == 2
    assert err.startswith("error: --symbol names the candles of one file, not 2")
