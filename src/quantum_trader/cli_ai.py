"""Market-data and AI commands: ``ai-engine``, ``feed``, ``train``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from quantum_trader.bus.connection import Redis
from quantum_trader.cli_support import console, settings, with_redis
from quantum_trader.errors import ConfigError

SYMBOLS = {"BTCUSDT": 60_000.0, "ETHUSDT": 3_000.0, "SOLUSDT": 150.0}


def ai_engine(
    duration: float | None = typer.Option(None, envvar="QT_DURATION", help="Stop after this many seconds."),
) -> None:
    """Run the AI engine alone (one systemd unit): candles in, decisions out."""
    from quantum_trader.cli import run_stages

    run_stages(["ai-engine"], duration)


def feed(
    source: str = typer.Option("synthetic", help="synthetic or file"),
    data: Path | None = typer.Option(None, "--data", help="CSV or Parquet file (source file)."),
    symbol: str | None = typer.Option(None, help="Symbol of the file's candles (default: the file's stem)."),
    count: int = typer.Option(1000, min=1, help="Synthetic candles per symbol."),
    rate: float = typer.Option(0, min=0, help="Candles per second; 0 = as fast as possible."),
    seed: int = typer.Option(7),
) -> None:
    """Publish candles to the candle stream (and latest prices for the paper exchange)."""
    from quantum_trader import marketdata

    cfg = settings()
    if source == "synthetic":
        candles = marketdata.synthetic(SYMBOLS, count, seed=seed)
    elif source == "file":
        if data is None:
            raise ConfigError("--source file needs --data FILE")
        candles = marketdata.read_file(data, symbol)
    else:
        raise ConfigError(f"--source {source!r}: choose synthetic or file")
    kept, skipped = marketdata.clean(candles)

    async def publish(redis: Redis) -> None:
        step = 500 if rate == 0 else max(1, int(rate / 10))
        for first in range(0, len(kept), step):
            await marketdata.publish(redis, cfg.candle_stream, kept[first : first + step])
            if rate:
                await asyncio.sleep(step / rate)

    with_redis(cfg, publish)
    console.print(f"published {len(kept):,} candles to {cfg.candle_stream} ({len(skipped):,} skipped as bad data)")


def train(
    data: Path = typer.Option(..., "--data", help="CSV or Parquet candles."),
    out: Path = typer.Option(Path("model.joblib"), "--out", help="Where to save the model (+ .json metadata)."),
    symbol: str | None = typer.Option(None),
) -> None:
    """Fit the learned strategy on a file (time-ordered validation) and save it with its metadata."""
    import numpy as np

    from quantum_trader import marketdata
    from quantum_trader.strategies import learned

    candles, skipped = marketdata.clean(marketdata.read_file(data, symbol))
    closes = np.array([c.close for c in candles], dtype=np.float64)
    trained = learned.train(closes, [c.open_time for c in candles])
    metadata = learned.save(trained, out)
    console.print(json.dumps(metadata["metrics"], indent=2))
    console.print(f"saved {out} (sha256 {metadata['sha256'][:12]}…); {len(skipped)} bad candles skipped")


def register(app: typer.Typer) -> None:
    """Add the AI commands to the main CLI."""
    app.command("ai-engine")(ai_engine)
    app.command("feed")(feed)
    app.command("train")(train)
