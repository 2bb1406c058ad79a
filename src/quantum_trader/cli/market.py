"""Market-data and research commands: ``feed``, ``train``, ``backtest``."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import sleep_or_stop
from quantum_trader.cli.common import configured, console, err, with_redis
from quantum_trader.errors import ConfigError, ExchangeError
from quantum_trader.logs import configure

if TYPE_CHECKING:
    from collections.abc import Sequence
    from decimal import Decimal

    from quantum_trader.marketdata import Candle
    from quantum_trader.settings import Settings
    from quantum_trader.strategies import Strategy

SYMBOLS = {"BTCUSDT": 60_000.0, "ETHUSDT": 3_000.0, "SOLUSDT": 150.0}


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
    from quantum_trader.feed import FeedTotals, PollStats, live, replay, run_feed

    cfg = configured()
    if source not in ("synthetic", "file", "live"):
        raise ConfigError(f"--source {source!r}: choose synthetic, file or live")
    if source == "file" and data is None:
        raise ConfigError("--source file needs --data FILE")
    if source == "live" and marketdata.interval_ms(interval) is None:
        raise ConfigError(f"--interval {interval!r}: use a number and one of s, m, h, d, w (e.g. 1m, 1h)")

    polled = PollStats()

    async def go(redis: Redis) -> FeedTotals:
        totals, stop = FeedTotals(), asyncio.Event()

        def start_clock() -> None:
            if duration is not None:
                asyncio.get_running_loop().call_later(duration, stop.set)

        sleep = functools.partial(sleep_or_stop, stop)

        if source == "live":
            from quantum_trader.exchanges.ccxt import CcxtExchange

            exchange = CcxtExchange.public(redis, cfg, cfg.feed_exchange)
            wanted = [s.strip().upper() for s in symbols.split(",") if s.strip()]
            try:
                batches = live(
                    exchange, wanted, timeframe=interval, poll_s=poll_s, sleep=sleep, stop=stop, stats=polled
                )
                start_clock()
                return await run_feed(redis, cfg.candle_stream, batches, stop, totals)
            finally:
                await exchange.close()
        if source == "synthetic":
            candles = marketdata.synthetic(SYMBOLS, count, seed=seed)
        else:
            assert data is not None  # checked above
            candles = marketdata.read_file(data, symbol)
        batches = replay(candles, rate=rate, speed=speed, sleep=sleep)
        start_clock()
        return await run_feed(redis, cfg.candle_stream, batches, stop, totals)

    totals = with_redis(cfg, go)
    console.print(totals.summary(cfg.candle_stream), highlight=False, markup=False, soft_wrap=True)
    if source == "live":
        problem = polled.problem(cfg.feed_exchange)
        if problem is not None:
            raise ExchangeError(f"{problem} (check the network, QT_FEED_EXCHANGE and --symbols)")
        if polled.failed:
            err.print(
                f"{polled.failed:,} of {polled.requests:,} requests to {cfg.feed_exchange} failed; "
                f"last error: {polled.last_error}",
                highlight=False,
                markup=False,
            )


FROM_OPT = typer.Option(None, "--from", help="Only candles opened at or after this time (ISO-8601, UTC).")
UNTIL_OPT = typer.Option(None, "--until", help="Only candles opened before this time (ISO-8601, UTC).")


def _writable_dir(path: Path, option: str) -> None:
    """Fail before the work, not after it, when the output's directory is missing."""
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: directory {path.parent} does not exist; create it or choose another")


def _window(candles: list[Candle], start: str | None, end: str | None) -> list[Candle]:
    from quantum_trader import marketdata

    start_ms = marketdata.parse_time(start, "--from") if start else None
    end_ms = marketdata.parse_time(end, "--until") if end else None
    return marketdata.between(candles, start_ms, end_ms)


def train(
    data: Path = typer.Option(..., "--data", help="CSV or Parquet candles."),
    out: Path = typer.Option(Path("model.joblib"), "--out", help="Where to save the model (+ .json metadata)."),
    symbol: str | None = typer.Option(None),
    start: str | None = FROM_OPT,
    end: str | None = UNTIL_OPT,
) -> None:
    """Fit the learned strategy on a file (time-ordered validation) and save it with its metadata.

    Backtest it on candles after the training range (--until here, --from there): a model
    scores well on the data it has seen.
    """
    import numpy as np

    from quantum_trader import marketdata
    from quantum_trader.strategies import learned

    _writable_dir(out, "--out")
    candles, skipped = marketdata.clean(_window(marketdata.read_file(data, symbol), start, end))
    closes = np.array([c.close for c in candles], dtype=np.float64)
    trained = learned.train(closes, [c.open_time for c in candles])
    metadata = learned.save(trained, out)
    console.print(json.dumps(metadata["metrics"], indent=2))
    console.print(f"saved {out} (sha256 {metadata['sha256'][:12]}…); {len(skipped)} bad candles skipped")
    warning = learned.no_edge(metadata["metrics"])
    if warning is not None:
        err.print(f"warning: {warning}", highlight=False, markup=False)


def backtest(
    data: list[Path] = typer.Option(
        ..., "--data", help="CSV or Parquet candles; repeat for several files (merged in time order)."
    ),
    symbol: str | None = typer.Option(None, help="Symbol (default: the file's stem), e.g. ETHUSDT."),
    strategy: str = typer.Option("ema-cross,rsi", help="Comma-separated: ema-cross, rsi, learned."),
    model: Path | None = typer.Option(None, "--model", help="Model for the learned strategy."),
    notional: float | None = typer.Option(
        None, min=0.0001, help="Quote amount per entry; overrides QT_AI_NOTIONAL (and QT_AI_SIZING=fraction)."
    ),
    balance: float | None = typer.Option(
        None, min=1, help="Starting quote balance; overrides QT_PAPER_BALANCES (default there, else 10,000)."
    ),
    start: str | None = FROM_OPT,
    end: str | None = UNTIL_OPT,
    html_out: Path | None = typer.Option(None, "--html", help="Write an HTML report with the equity curve."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the report as JSON only (with every trade); a sweep's rows or folds."
    ),
    grid: list[str] | None = typer.Option(
        None,
        "--grid",
        help="Vary a strategy parameter: STRATEGY.PARAM=V1,V2,... or LOW..HIGH[:STEP], e.g. 'ema-cross.fast=8,12,16'; "
        "repeat for more. Runs every combination and ranks them.",
    ),
    optimize: int | None = typer.Option(
        None,
        "--optimize",
        min=1,
        help="Search the --grid space with N Optuna (TPE) trials instead of every combination.",
    ),
    walk_forward: int | None = typer.Option(
        None,
        "--walk-forward",
        min=1,
        help="Cut the candles into N+1 windows; choose parameters on each, test them on the next; "
        "report out-of-sample figures only.",
    ),
    jobs: int | None = typer.Option(None, "--jobs", min=1, help="Worker processes of a sweep (default: one per CPU)."),
    rank_by: str = typer.Option(
        "sharpe", "--rank-by", help="Rank a sweep by sharpe, return, drawdown (lower is better) or calmar."
    ),
    seed: int = typer.Option(7, "--seed", help="Seed of the --optimize search: the same seed, the same trials."),
    top: int = typer.Option(20, "--top", min=0, help="Rows in a sweep's table (0: all; --json prints all)."),
    through_server: bool = typer.Option(
        False,
        "--through-server",
        help="Run every candle through a private server, as the stages do live (slow; for proving agreement)",
    ),
) -> None:
    """Replay candles through engine, router, governor and paper exchange (--through-server: on a private server).

    Uses the same settings as `run` (environment and --env-file): fees, slippage, quote
    assets, sizing, exit fraction, limits, gap rule. With --grid, a parameter sweep: every
    combination in parallel processes, ranked (--optimize N: an Optuna search instead;
    --walk-forward N: parameters chosen on one window, figures from the next one only).
    """
    from decimal import Decimal

    from rich.progress import Progress

    from quantum_trader import backtest as bt
    from quantum_trader import marketdata
    from quantum_trader.ai_engine import build_strategies
    from quantum_trader.bars import concat

    sweeping = bool(grid) or optimize is not None or walk_forward is not None
    if html_out is not None and sweeping:
        raise ConfigError("--html draws one backtest; leave it out of a sweep (--grid, --optimize, --walk-forward)")
    if html_out is not None:
        _writable_dir(html_out, "--html")
    if symbol is not None and len(data) > 1:
        raise ConfigError(f"--symbol names the candles of one file, not {len(data)}; name each file after its symbol")
    update: dict[str, object] = {
        "ai_strategies": [s.strip() for s in strategy.split(",") if s.strip()],
        "ai_model_path": model,
    }
    if notional is not None:
        update["ai_sizing"] = "fixed"  # a quote amount per entry is fixed sizing
    cfg = configured().with_changes(**update)
    if cfg.log_level == "info":
        # One outcome line per simulated trade would bury the progress bar and the report.
        configure("warning", cfg.log_format)
    try:
        strategies = build_strategies(cfg)
    except ConfigError as exc:
        raise ConfigError(f"--strategy/--model: {exc}") from None
    # Columns, not a Python object per candle: a year of minutes fits in a few tens of megabytes.
    bars = concat([marketdata.read_bars(path, symbol) for path in data])
    if start or end:
        start_ms = marketdata.parse_time(start, "--from") if start else None
        end_ms = marketdata.parse_time(end, "--until") if end else None
        bars = bars.take(bars.within(start_ms, end_ms))
    _warn_if_trained_on(strategies, bars)
    start_quote = Decimal(str(balance)) if balance is not None else None
    per_entry = Decimal(str(notional)) if notional is not None else None
    if sweeping:
        candles = sorted(bars, key=lambda c: (c.open_time, c.symbol))  # one file's own order is left to run() to judge
        _sweep(
            candles, strategies, cfg, grid or [], optimize=optimize, walk_forward=walk_forward, jobs=jobs,
            rank_by=rank_by, seed=seed, top=top, as_json=as_json, start_quote=start_quote, notional=per_entry,
            through_server=through_server,
        )  # fmt: skip
        return
    # The progress bar goes to stderr: stdout holds the report alone (JSON with --json).
    with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task(f"backtest {','.join(bars.symbols)}", total=len(bars))
        report = bt.replay(
            bars,
            strategies,
            cfg,
            start_quote=start_quote,
            notional=per_entry,
            progress=lambda n: bar.update(task, completed=n),
            through_server=through_server,
        )
    if html_out is not None:
        html_out.write_text(bt.html(report))
    if as_json:
        import msgspec

        # Encoded straight to bytes: json.dumps of a year's trade list held several copies of it at once.
        sys.stdout.buffer.write(msgspec.json.encode(report.as_json()) + b"\n")
        sys.stdout.flush()
        return
    for name, value in report.summary().items():
        console.print(f"{name:<18}{value}", highlight=False)
    for code, count in sorted(report.rejections.items()):
        console.print(f"  {code:<16}{count}", highlight=False)
    console.print("settings          " + ", ".join(f"{k} {v}" for k, v in report.settings.items()), highlight=False)
    if html_out is not None:
        console.print(f"report: {html_out}")


def _sweep(
    candles: list[Candle],
    strategies: list[Strategy],
    cfg: Settings,
    grid: list[str],
    *,
    optimize: int | None,
    walk_forward: int | None,
    jobs: int | None,
    rank_by: str,
    seed: int,
    top: int,
    as_json: bool,
    start_quote: Decimal | None,
    notional: Decimal | None,
    through_server: bool,
) -> None:
    """``backtest --grid/--optimize/--walk-forward``: the ranked table, or the folds' out-of-sample figures."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from quantum_trader.backtest import sweep

    ranking = sweep.parse_rank_by(rank_by)
    if not grid:
        used = "--optimize" if optimize is not None else "--walk-forward"
        raise ConfigError(f"{used} needs --grid to say which parameters to vary, e.g. --grid 'ema-cross.fast=8..16:2'")
    space = sweep.parse_grid(grid, [s.name for s in strategies])
    runs = optimize or 0  # backtests per window: the trials, or the grid's admissible combinations
    if optimize is None:
        # A space with nothing to run fails here, before any worker starts.
        every = sweep.combinations(space)
        kept, skipped = sweep.admissible(strategies, every)
        if not kept:
            fixed = sweep.left_out(strategies, space)
            raise ConfigError(f"{sweep.skipped_note(skipped, len(every))}; change the --grid values{fixed}")
        runs = len(kept)
    level = "warning" if cfg.log_level == "info" else cfg.log_level
    runner = sweep.Runner(
        candles, strategies, cfg, jobs=jobs, start_quote=start_quote, notional=notional,
        through_server=through_server, log_level=level,
    )  # fmt: skip
    total = runs * (walk_forward or 1) + (walk_forward or 0)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # Only on a terminal: elsewhere a bar is one blank line at the end.
    with runner, Progress(*columns, console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("backtests", total=total)
        advance = functools.partial(bar.advance, task)
        if walk_forward is not None:
            result = sweep.walk_forward(
                runner, space, walk_forward, rank_by=ranking, trials=optimize, seed=seed, done=advance
            )
        elif optimize is not None:
            found = sweep.optimize(runner, space, optimize, seed=seed, rank_by=ranking, done=advance)
        else:
            found = sweep.grid(runner, space, rank_by=ranking, done=advance)
    what = "trials" if optimize is not None else "combinations"
    if walk_forward is not None:
        if result.skipped:
            err.print(sweep.skipped_note(result.skipped, result.total, what), highlight=False)
        if as_json:
            print(json.dumps(result.as_json()))
        else:
            console.print(sweep.folds_table(result))
        return
    if found.skipped:
        err.print(sweep.skipped_note(found.skipped, found.total, what), highlight=False)
    if not found.rows:
        raise ConfigError("no combination left to run; change the --grid values")
    if as_json:
        print(json.dumps([row.as_json(number) for number, row in enumerate(found.rows, start=1)]))
        return
    console.print(sweep.rows_table(found.rows, [axis.key for axis in space], ranking, top or None))
    if top and len(found.rows) > top:
        console.print(f"… {len(found.rows) - top} more (--top 0 or --json shows them all)", highlight=False)


def _warn_if_trained_on(strategies: list[Strategy], candles: Sequence[Candle]) -> None:
    """A learned model backtested on candles it was trained on scores what it memorised."""
    for strategy in strategies:
        trained = getattr(getattr(strategy, "trained", None), "metadata", {}).get("training_range")  # learned only
        if not trained or not candles:
            continue
        if candles[0].open_time <= trained[1] and candles[-1].open_time >= trained[0]:
            err.print(
                "warning: the backtest covers the model's training range "
                f"({_iso(trained[0])} to {_iso(trained[1])}): its figures overstate the model; "
                f"backtest from after it, e.g. --from {_iso(trained[1] + 1000)}",
                highlight=False,
                markup=False,
            )


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def register(app: typer.Typer) -> None:
    """Add the market-data and research commands to the main CLI."""
    app.command("feed")(feed)
    app.command("train")(train)
    app.command("backtest")(backtest)
