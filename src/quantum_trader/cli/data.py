"""Data commands: ``data download`` (an exchange's public candles into Parquet files)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from quantum_trader.cli.common import configured, console, err
from quantum_trader.errors import ConfigError

if TYPE_CHECKING:
    from quantum_trader.download import Saved

data_app = typer.Typer(help="Historical market data.", no_args_is_help=True)


@data_app.command("download")
def download(
    exchange: str | None = typer.Option(
        None, "--exchange", help="ccxt exchange id, e.g. binance, kraken (default: QT_FEED_EXCHANGE)."
    ),
    symbols: str = typer.Option(..., "--symbols", help="Comma-separated, e.g. BTC/USDT,ETH/USDT."),
    interval: str = typer.Option("1m", "--interval", help="Candle interval the exchange offers, e.g. 1m, 1h, 1d."),
    since: str = typer.Option(..., "--since", help="First candle's open time (ISO-8601, UTC), e.g. 2024-01-01."),
    until: str | None = typer.Option(
        None, "--until", help="Only candles opened before this time (ISO-8601, UTC; default: now)."
    ),
    out: Path = typer.Option(Path("data"), "--out", help="Directory of the files (<SYMBOL>-<interval>.parquet)."),
) -> None:
    """Fetch closed OHLCV candles through the exchange's public API (no key) into one Parquet file per symbol.

    A file that exists is continued after its last candle, so running the command again
    fetches only what is new. Progress goes to stderr, one summary line per symbol to stdout.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from quantum_trader import download as dl
    from quantum_trader.exchanges.ccxt import CcxtConfig
    from quantum_trader.marketdata import parse_time

    cfg = configured()
    wanted = [s.strip() for s in symbols.split(",") if s.strip()]
    if not wanted:
        raise ConfigError("--symbols: give at least one market, e.g. --symbols BTC/USDT,ETH/USDT")
    since_ms = parse_time(since, "--since")
    until_ms = parse_time(until, "--until") if until is not None else None
    if until_ms is not None and since_ms >= until_ms:
        raise ConfigError(f"--since {since} is not before --until {until}; give an earlier --since or a later --until")
    if since_ms > time.time() * 1000:
        raise ConfigError(f"--since {since} is in the future; give a time in the past")
    _writable(out)
    config = dl.public_config(CcxtConfig.from_settings(cfg), (exchange or cfg.feed_exchange).strip())

    async def go() -> list[Saved]:
        downloader = dl.Downloader(config)
        try:
            downloader.step_ms(interval)  # a bad interval fails before any request
            markets = await downloader.markets(wanted)
            done: list[Saved] = []
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            # A bar needs a terminal; elsewhere it would only leave blank lines in a log.
            with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
                for market in markets:
                    task = bar.add_task(f"{market} {interval}", total=None)

                    def advance(kept: int, expected: int, task: TaskID = task) -> None:
                        bar.update(task, completed=kept, total=expected)

                    saved = await downloader.download(market, interval, since_ms, until_ms, out, advance)
                    done.append(saved)
                    if saved.note:
                        err.print(f"warning: {saved.symbol} {interval}: {saved.note}", highlight=False)
                    # Each symbol's line as soon as it is done: a later symbol's failure leaves it said.
                    console.print(saved.summary(), highlight=False, markup=False, soft_wrap=True)
            return done
        finally:
            await downloader.close()

    asyncio.run(go())


def _writable(out: Path) -> None:
    """The output directory exists (created if needed) and takes a file, or a ConfigError saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--out {out}: cannot write there ({exc.strerror or exc}); choose a writable directory"
        ) from None


def register(app: typer.Typer) -> None:
    """Add the data commands to the main CLI."""
    app.add_typer(data_app, name="data")
