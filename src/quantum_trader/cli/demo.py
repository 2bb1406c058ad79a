"""``quantum-trader demo``: the pipeline on the paper exchange, on a private server, drawn live."""

from __future__ import annotations

import shutil
import tempfile
from decimal import Decimal
from pathlib import Path

import typer
from rich.live import Live

from quantum_trader import book, portfolio
from quantum_trader import demo as demo_run
from quantum_trader.cli.common import configured, console, err, with_redis
from quantum_trader.cli.views import demo_screen, positions_table
from quantum_trader.errors import ConfigError
from quantum_trader.logs import configure
from quantum_trader.redaction import redact_urls

SERVER_URL_HELP = (
    "Run on this server instead of a private one; its streams, kill switch and balances change "
    "(give it an empty database)."
)


def demo(
    source: str = typer.Option("candles", help="candles: AI engine on synthetic market data; decisions: generated."),
    count: int = typer.Option(
        600, min=1, envvar="QT_DEMO_COUNT", help="Candles per symbol (candles) or distinct decisions (decisions)."
    ),
    rate: float = typer.Option(300.0, min=1, envvar="QT_DEMO_RATE", help="Candles or decisions per second."),
    duration: float | None = typer.Option(None, envvar="QT_DURATION", help="Stop after this many seconds."),
    timeout: float = typer.Option(120.0, min=1, help="Give up after this many seconds (without --duration)."),
    seed: int = typer.Option(7),
    server: str | None = typer.Option(None, "--server-url", help=SERVER_URL_HELP),
) -> None:
    """Run market data → AI engine → router → governor → execution on the paper exchange, live.

    The demo runs on a private server of its own in a temporary directory: the operator's
    kill switch, balances, counters and data directory stay exactly as they were.
    """
    settings = configured()
    if source not in ("candles", "decisions"):
        raise ConfigError(f"--source {source!r}: choose candles or decisions")
    if settings.mode != "paper" or settings.exchange != "paper":
        raise ConfigError(
            "the demo turns the kill switch off and trades: it runs only with QT_MODE=paper and QT_EXCHANGE=paper"
        )
    if server is not None and not server.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"--server-url {redact_urls(server)!r} must start with redis://, rediss:// or unix://")
    private = Path(tempfile.mkdtemp(prefix="quantum-trader-demo-"))  # 0700
    if server is None and settings.redis_url:
        console.print("the demo runs on a private server: QT_REDIS_URL is left alone")
    # Protective exits show in the demo too: 2 % below and 4 % above each entry unless set otherwise.
    settings = settings.with_changes(
        redis_url=server,
        data_dir=private / "server",
        stop_loss_pct=settings.stop_loss_pct or DEMO_STOP_LOSS_PCT,
        take_profit_pct=settings.take_profit_pct or DEMO_TAKE_PROFIT_PCT,
    )
    log_path = private / "demo.log"
    log_file = log_path.open("a", encoding="utf-8")
    configure(settings.log_level, "json", log_file)  # keep the live table readable; outcomes go to the file
    console.print(f"outcome log: {log_path}")
    try:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            report = with_redis(
                settings,
                lambda r: demo_run.run_demo(
                    r,
                    settings,
                    source=source,
                    count=count,
                    rate=rate,
                    duration=duration,
                    limit_s=timeout,
                    seed=seed,
                    on_progress=lambda progress: live.update(demo_screen(progress)),
                ),
            )
    finally:
        shutil.rmtree(private / "server", ignore_errors=True)  # the private server's data; the log stays
    if report.source == "candles":
        console.print(f"\n{report.candles:,} candles → {report.published:,} decisions by the AI engine's strategies")
    else:
        console.print(f"\npublished {report.published:,} decisions ({report.distinct:,} distinct, the rest retries)")
    for outcome, count_ in sorted(report.outcomes.items()):
        console.print(f"  {outcome:<34}{count_:>8,}")
    shown = (
        f"{asset} {Decimal(value).quantize(Decimal('0.00000001')).normalize():f}"
        for asset, value in report.balances.items()
    )
    console.print("paper balances: " + ", ".join(shown))
    if report.journaled:
        rows = ", ".join(f"{count:,} {table.replace('_', ' ')}" for table, count in report.journaled.items())
        console.print(f"journal (SQLite, in the demo's private directory): {rows}")
    if report.source == "candles":
        console.print(
            f"risk: trading state {report.trading_state}; protective exits fired: {report.protective_exits:,}"
            f" (stop-loss {settings.stop_loss_pct}% / take-profit {settings.take_profit_pct}%)"
        )
    if report.positions:
        console.print(positions_table(report.positions))
        figures = portfolio.totals(
            {m.position.symbol: m.position for m in report.positions}, book.marks(report.positions)
        )
        for quote in sorted(figures.realised):
            console.print(
                f"PnL in {quote}: realised {figures.realised[quote]:.2f}, unrealised {figures.unrealised[quote]:.2f}"
                f" (average cost; fees {figures.fees.get(quote, Decimal(0)):.4f} {quote} included)"
            )
    if report.interrupted:
        console.print("stopped before the end (Ctrl-C or --duration); unfinished entries stay pending for the next run")
    elif not report.complete:
        err.print("not every decision reached an outcome before the timeout")
        raise typer.Exit(1)


DEMO_STOP_LOSS_PCT = Decimal(2)
DEMO_TAKE_PROFIT_PCT = Decimal(4)


def register(app: typer.Typer) -> None:
    """Add the demo command to the main CLI."""
    app.command()(demo)
