"""A learned strategy: a scikit-learn classifier of the next candle's direction.

``train`` computes features from closes, splits train/validation in time order
(never shuffled: the model must not see the future), fits, and reports validation
metrics. ``save`` writes the model with joblib and a JSON file of metadata
(features, training range, metrics, SHA-256 of the model file); ``load`` checks
the hash before trusting the file. The strategy speaks only above its confidence
threshold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from quantum_trader.errors import ConfigError
from quantum_trader.strategies.base import Closes, Signal

FEATURES = ("ret_1", "ret_3", "ret_5", "ema_gap", "rsi_14", "vol_10")
WARMUP = 30


def features(closes: Closes) -> pd.DataFrame:
    """One row of features per close (NaN until enough history)."""
    price = pd.Series(closes, dtype="float64")
    returns = price.pct_change()
    delta = price.diff()
    gain = delta.clip(lower=0).ewm(alpha=1 / 14, adjust=False).mean()
    loss = (-delta.clip(upper=0)).ewm(alpha=1 / 14, adjust=False).mean()
    return pd.DataFrame(
        {
            "ret_1": returns,
            "ret_3": price.pct_change(3),
            "ret_5": price.pct_change(5),
            "ema_gap": price.ewm(span=12, adjust=False).mean() / price.ewm(span=26, adjust=False).mean() - 1,
            "rsi_14": 100 - 100 / (1 + gain / loss.replace(0, np.nan)),
            "vol_10": returns.rolling(10).std(),
        }
    )


@dataclass
class TrainedModel:
    """A fitted model and what is known about it."""

    model: Pipeline
    metadata: dict[str, Any] = field(default_factory=dict)


def train(closes: Closes, open_times: list[int] | None = None, validation: float = 0.2) -> TrainedModel:
    """Fit on the first part of the series, measure on the rest (time order kept)."""
    frame = features(closes)
    frame["label"] = (pd.Series(closes).shift(-1) > pd.Series(closes)).astype(int)
    frame = frame.iloc[WARMUP:-1].dropna()
    if len(frame) < 50:
        raise ConfigError(f"training needs at least {50 + WARMUP} candles, got {len(closes)}")
    cut = int(len(frame) * (1 - validation))
    fit, check = frame.iloc[:cut], frame.iloc[cut:]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(fit[list(FEATURES)], fit["label"])
    proba = model.predict_proba(check[list(FEATURES)])[:, 1]
    metrics = {
        "train_rows": len(fit),
        "validation_rows": len(check),
        "validation_accuracy": round(float(accuracy_score(check["label"], proba > 0.5)), 4),
        "validation_auc": round(float(roc_auc_score(check["label"], proba)), 4)
        if check["label"].nunique() > 1
        else None,
        "validation_base_rate": round(float(check["label"].mean()), 4),
    }
    # Always answering the more frequent class scores this much: a model must beat it to know anything.
    up = float(check["label"].mean())
    metrics["validation_majority_rate"] = round(max(up, 1 - up), 4)
    times = open_times or []
    metadata = {
        "features": list(FEATURES),
        "training_range": [times[0], times[-1]] if times else None,
        "metrics": metrics,
        "model": "StandardScaler + LogisticRegression",
    }
    return TrainedModel(model, metadata)


def no_edge(metrics: dict[str, Any]) -> str | None:
    """A warning when validation accuracy is no better than always predicting the majority class (pure)."""
    accuracy, majority = metrics.get("validation_accuracy"), metrics.get("validation_majority_rate")
    if accuracy is None or majority is None or accuracy > majority:
        return None
    return (
        f"validation accuracy {accuracy:.4f} is no better than always predicting the majority class "
        f"({majority:.4f}): the model shows no edge on this data; do not trade it"
    )


def save(trained: TrainedModel, path: Path) -> dict[str, Any]:
    """Write ``path`` (joblib) and ``path.json`` (metadata with the file's SHA-256)."""
    joblib.dump(trained.model, path)
    metadata = dict(trained.metadata)
    metadata["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def load(path: Path) -> TrainedModel:
    """Read a saved model; refuse it when its hash does not match its metadata."""
    meta_path = path.with_suffix(path.suffix + ".json")
    if not path.exists() or not meta_path.exists():
        raise ConfigError(f"model {path} or its metadata {meta_path} is missing; train one with: quantum-trader train")
    metadata: dict[str, Any] = json.loads(meta_path.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != metadata.get("sha256"):
        raise ConfigError(f"model {path} does not match the hash in {meta_path}: retrain or restore the file")
    model: Pipeline = joblib.load(path)
    return TrainedModel(model, metadata)


@dataclass
class LearnedModel:
    """The classifier as a strategy: BUY/SELL only when its probability clears the threshold."""

    trained: TrainedModel
    threshold: float = 0.6
    name: str = "learned"

    @property
    def version(self) -> str:
        """The model file's hash prefix: results say which model decided."""
        return str(self.trained.metadata.get("sha256", "unsaved"))[:12]

    @property
    def warmup(self) -> int:
        """Enough closes for every feature."""
        return WARMUP + 1

    def decide(self, closes: Closes) -> Signal | None:
        """The model's call on the last close."""
        row = features(closes).iloc[[-1]]
        if row.isna().any(axis=None):
            return None
        up = float(self.trained.model.predict_proba(row[list(FEATURES)])[0, 1])
        if up >= self.threshold:
            return Signal("BUY", up)
        if up <= 1 - self.threshold:
            return Signal("SELL", 1 - up)
        return None
