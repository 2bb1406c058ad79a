"""Market-data and AI commands: ``ai-engine``, ``feed``, ``train``."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import typer

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import sleep_or_stop
from quantum_trader.cli_support import console, settings, with_redis
from quantum_trader.errors import ConfigError
from quantum_trader.logs import configure

SYMBOLS = {"BTCUSDT": 60_000.0, "ETHUSDT": 3_000.0, "SOLUSDT": 150.0}


def ai_engine(
    duration: float | None = typer.Option(None, envvar="QT_DURATION", help="Stop after this many seconds."),
) -> None:
    """Run the AI engine alone (one systemd unit): candles in, decisions out."""
    from quantum_trader.cli import run_stages

    run_stages(["ai-engine"], duration)


def feed(
    source: str = typer.Option("synthetic", help="synthetic, file or live"),
    data: Path | None = typer.Option(None, "--data", help="CSV or Parquet file (source file)."),
    symbol: str | None = typer.Option(None, help="Symbol of the file's candles (default: the file's stem)."),
    symbols: str = typer.Option(",".join(SYMBOLS), help="Symbols to poll (source live)."),
    interval: str = typer.Option("1m", help="Candle interval to poll (source live), e.g. 1m, 1h."),
    poll_s: float = typer.Option(10.0, "--poll-s", min=0.1, help="Seconds between polls (source live)."),
    count: int = typer.Option(1000, min=1, help="Synthetic candles per symbol."),
    rate: float = typer.Option(0, min=0, help="Candles per second; 0 = as fast as possible."),
    speed: float = typer.Option(0, min=0, help="Pace by the candles' own times: 1 = real time, 60 = 60x; 0 = off."),
    duration: float | None = typer.Option(None, envvar="QT_DURATION", help="Stop after this many seconds."),
    seed: int = typer.Option(7),
) -> None:
    """Publish candles to the candle stream (and latest prices for the paper exchange)."""
    from quantum_trader import marketdata

    cfg = settings()
    if source not in ("synthetic", "file", "live"):
        raise ConfigError(f"--source {source!r}: choose synthetic, file or live")
    if source == "file" and data is None:
        raise ConfigError("--source file needs --data FILE")
    if source == "live" and marketdata.interval_ms(interval) is None:
        raise ConfigError(f"--interval {interval!r}: use a number and one of s, m, h, d, w (e.g. 1m, 1h)")

    async def go(redis: Redis) -> marketdata.FeedTotals:
        totals, stop = marketdata.FeedTotals(), asyncio.Event()

        def start_clock() -> None:
            if duration is not None:
                asyncio.get_running_loop().call_later(duration, stop.set)

        sleep = functools.partial(sleep_or_stop, stop)

        if source == "live":
            from quantum_trader.exchanges.ccxt_exchange import CcxtExchange

            exchange = CcxtExchange.public(redis, cfg, cfg.feed_exchange)
            wanted = [s.strip().upper() for s in symbols.split(",") if s.strip()]
            try:
                batches = marketdata.live(exchange, wanted, timeframe=interval, poll_s=poll_s, sleep=sleep, stop=stop)
                start_clock()
                return await marketdata.run_feed(redis, cfg.candle_stream, batches, stop, totals)
            finally:
                await exchange.close()
        if source == "synthetic":
            candles = marketdata.synthetic(SYMBOLS, count, seed=seed)
        else:
            assert data is not None  # checked above
            candles = marketdata.read_file(data, symbol)
        batches = marketdata.replay(candles, rate=rate, speed=speed, sleep=sleep)
        start_clock()
        return await marketdata.run_feed(redis, cfg.candle_stream, batches, stop, totals)

    totals = with_redis(cfg, go)
    console.print(
        f"published {totals.published:,} candles to {cfg.candle_stream} ({totals.skipped:,} skipped as bad data)"
    )


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


def backtest(
    data: Path = typer.Option(..., "--data", help="CSV or Parquet candles of one symbol."),
    symbol: str | None = typer.Option(None, help="Symbol (default: the file's stem), e.g. ETHUSDT."),
    strategy: str = typer.Option("ema-cross,rsi", help="Comma-separated: ema-cross, rsi, learned."),
    model: Path | None = typer.Option(None, "--model", help="Model for the learned strategy."),
    notional: float = typer.Option(1000.0, min=0.0001, help="Quote amount per decision."),
    balance: float = typer.Option(10_000.0, min=1, help="Starting quote balance."),
    html_out: Path | None = typer.Option(None, "--html", help="Write an HTML report with the equity curve."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Replay a file through engine, router, governor and paper exchange on a private server."""
    from decimal import Decimal

    from rich.progress import Progress

    from quantum_trader import backtest as bt
    from quantum_trader import marketdata
    from quantum_trader.ai_engine import build_strategies

    cfg = settings().model_copy(
        update={"ai_strategies": [s.strip() for s in strategy.split(",") if s.strip()], "ai_model_path": model}
    )
    if cfg.log_level == "info":
        # One outcome line per simulated trade would bury the progress bar and the report.
        configure("warning", cfg.log_format)
    try:
        strategies = build_strategies(cfg)
    except ConfigError as exc:
        raise ConfigError(f"--strategy/--model: {exc}") from None
    candles = marketdata.read_file(data, symbol)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"backtest {candles[0].symbol if candles else ''}", total=len(candles))
        report = asyncio.run(
            bt.run(
                candles,
                strategies,
                start_quote=Decimal(str(balance)),
                notional=Decimal(str(notional)),
                progress=lambda n: bar.update(task, completed=n),
            )
        )
    if html_out is not None:
        html_out.write_text(bt.html(report))
    if as_json:
        print(json.dumps(report.summary()))
        return
    for name, value in report.summary().items():
        console.print(f"{name:<18}{value}")
    if html_out is not None:
        console.print(f"report: {html_out}")


def register(app: typer.Typer) -> None:
    """Add the AI commands to the main CLI."""
    app.command("ai-engine")(ai_engine)
    app.command("feed")(feed)
    app.command("train")(train)
    app.command("backtest")(backtest)
