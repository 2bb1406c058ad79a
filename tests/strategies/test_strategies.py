"""Built-in strategies on series where the right answer is known; the learned model's round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import backtesting
import numpy as np
import pytest

from quantum_trader.errors import ConfigError
from quantum_trader.marketdata import read_file
from quantum_trader.strategies import EmaCross, RsiReversion
from quantum_trader.strategies.learned import LearnedModel, features, load, no_edge, save, train

SAMPLES = Path(backtesting.__file__).parent / "test"


def test_ema_cross_buys_on_the_upward_cross_only() -> None:
    strategy = EmaCross(fast=3, slow=8)
    falling = np.linspace(100, 80, 30)
    assert strategy.decide(falling) is None
    series = np.concatenate([falling, np.linspace(80, 100, 20)])
    calls = [strategy.decide(series[: n + 1]) for n in range(strategy.warmup, len(series))]
    buys = [i for i, s in enumerate(calls) if s is not None and s.side == "BUY"]
    assert len(buys) == 1  # exactly the candle where the fast average crosses above
    assert all(s is None or s.side == "BUY" for s in calls)
    turn = np.concatenate([np.linspace(80, 100, 30), np.linspace(100, 90, 10)])
    calls = [strategy.decide(turn[: n + 1]) for n in range(strategy.warmup, len(turn))]
    assert [s.side for s in calls if s is not None] == ["SELL"]


def test_rsi_signals_on_the_crossing_not_on_every_candle_beyond_it() -> None:
    strategy = RsiReversion()
    flat = 100 + np.tile([1.0, -1.0], 15)
    down = 100 - np.arange(1, 41) + np.tile([0.0, 0.3], 20)  # RSI falls below 30 and stays there
    up = 60 + np.arange(1, 41) - np.tile([0.0, 0.3], 20)  # then rises above 70 and stays there
    series = np.concatenate([flat, down, up])
    calls = [strategy.decide(series[:n]) for n in range(strategy.warmup, len(series) + 1)]
    signals = [(n, s.side) for n, s in enumerate(calls) if s is not None]
    # One BUY where RSI crosses below 30, one SELL where it crosses above 70; nothing while it stays beyond.
    assert [side for _n, side in signals] == ["BUY", "SELL"]
    assert strategy.decide(flat) is None


def test_learned_model_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    candles = read_file(SAMPLES / "EURUSD.csv")
    closes = np.array([c.close for c in candles])
    trained = train(closes, [c.open_time for c in candles])
    metrics = trained.metadata["metrics"]
    assert metrics["train_rows"] > metrics["validation_rows"] > 100
    assert 0.0 <= metrics["validation_accuracy"] <= 1.0
    assert trained.metadata["training_range"] == [candles[0].open_time, candles[-1].open_time]

    meta = save(trained, tmp_path / "model.joblib")
    again = load(tmp_path / "model.joblib")
    rows = features(closes).dropna()
    assert np.array_equal(trained.model.predict_proba(rows), again.model.predict_proba(rows))
    assert LearnedModel(again).version == meta["sha256"][:12]

    (tmp_path / "model.joblib").write_bytes((tmp_path / "model.joblib").read_bytes() + b"tampered")
    with pytest.raises(ConfigError, match="does not match the hash"):
        load(tmp_path / "model.joblib")


def test_learned_model_speaks_only_above_its_threshold() -> None:
    candles = read_file(SAMPLES / "EURUSD.csv")
    closes = np.array([c.close for c in candles])
    trained = train(closes)
    always = LearnedModel(trained, threshold=0.5)
    never = LearnedModel(trained, threshold=1.0)
    window = closes[:200]
    assert always.decide(window) is not None
    assert never.decide(window) is None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    return subprocess.run([sys.executable, "-m", "quantum_trader", *args], capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip


def test_train_warns_when_the_model_is_no_better_than_the_majority_class(tmp_path: Path) -> None:
    model = tmp_path / "model.joblib"
    done = cli("train", "--data", str(SAMPLES / "EURUSD.csv"), "--out", str(model))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "model.joblib.json").read_text())["metrics"]
    # On EURUSD's last fifth, 51.6 % of candles close lower: always saying "down" scores that; the model scores less.
    assert metrics["validation_accuracy"] <= metrics["validation_majority_rate"] == 0.5161
    assert "warning: validation accuracy 0.5020 is no better than always predicting the majority class" in done.stderr
    assert no_edge({"validation_accuracy": 0.53, "validation_majority_rate": 0.51}) is None

    # Backtesting on candles the model was trained on says so (the README's example trains --until, tests --from).
    done = cli("backtest", "--data", str(SAMPLES / "EURUSD.csv"), "--strategy", "learned", "--model", str(model),
               "--from", "2018-02-05", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning: the backtest covers the model's training range" in done.stderr
    assert json.loads(done.stdout)["candles"] < 100
