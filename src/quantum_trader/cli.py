"""The ``quantum-trader`` command: parses, calls the package, prints. No logic of its own."""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer

from quantum_trader import cli_support, governor, ops, services
from quantum_trader.bus.connection import Redis, connected, server_url
from quantum_trader.bus.embedded import EmbeddedValkey, write_url_file
from quantum_trader.bus.streams import publish
from quantum_trader.cli_support import JSON_OPT, console, err, state, with_redis
from quantum_trader.errors import ConfigError, DecodeError, QuantumTraderError
from quantum_trader.events import DECISION, envelope
from quantum_trader.logs import configure
from quantum_trader.redaction import redact_url, redact_urls
from quantum_trader.router import validate as validate_decision
from quantum_trader.status import pipeline_status
from quantum_trader.views import governor_table, status_table

app = typer.Typer(help="Quantum Trader: a fail-closed trading pipeline on Redis Streams.", no_args_is_help=True)
kill_app = typer.Typer(help="The kill switch: trading only while quantum:kill is exactly 0.", no_args_is_help=True)
governor_app = typer.Typer(help="The risk governor's counters and limits.", no_args_is_help=True)
dlq_app = typer.Typer(help="Inspect and replay the dead-letter stream.", no_args_is_help=True)
app.add_typer(kill_app, name="kill")
app.add_typer(governor_app, name="governor")
app.add_typer(dlq_app, name="dlq")


@app.callback()
def _root(
    env_file: Path | None = typer.Option(
        None,
        "--env-file",
        envvar="QT_ENV_FILE",
        help="Settings file in systemd EnvironmentFile syntax.",
    ),
) -> None:
    state["env_file"] = env_file


def run_stages(stage_names: list[str], duration: float | None) -> None:
    settings = cli_support.settings()
    if duration is not None and duration <= 0:
        raise ConfigError(
            f"--duration {duration:g}: give a number of seconds above 0 (or leave it out to run until stopped)"
        )

    async def main(url: str) -> None:
        async with connected(url) as redis:
            stop = asyncio.Event()
            services.install_signal_handlers(stop)
            await services.serve(redis, settings, stage_names, stop, duration=duration)

    with server_url(settings) as url:
        asyncio.run(main(url))


@app.command()
def run(
    stages: str = typer.Option(",".join(services.STAGES), envvar="QT_STAGES", help="Comma-separated stages."),
    duration: float | None = typer.Option(None, envvar="QT_DURATION", help="Stop after this many seconds."),
) -> None:
    """Run the whole pipeline (or the named stages) in one process."""
    run_stages([name.strip() for name in stages.split(",") if name.strip()], duration)


@app.command()
def router(duration: float | None = typer.Option(None, envvar="QT_DURATION")) -> None:
    """Run the router alone (one systemd unit)."""
    run_stages(["router"], duration)


@app.command()
def execution(duration: float | None = typer.Option(None, envvar="QT_DURATION")) -> None:
    """Run execution alone; several processes with different QT_CONSUMER share the group."""
    run_stages(["execution"], duration)


@app.command()
def status(
    as_json: bool = JSON_OPT,
    watch: float = typer.Option(0, "--watch", help="Refresh every N seconds until Ctrl-C."),
    consumers: bool = typer.Option(False, "--consumers", help="Include each consumer's pending and idle time."),
) -> None:
    """Length, entries added, last id, and per group: consumers, pending, lag, last delivered id."""
    settings = cli_support.settings()
    if watch < 0 or (watch and watch < 0.1):
        raise ConfigError(f"--watch {watch:g}: give the refresh interval in seconds, 0.1 or more (0 = once)")

    async def show(redis: Redis) -> None:
        while True:
            stats = await pipeline_status(redis, settings.streams.pipeline(), with_consumers=consumers)
            if as_json:
                print(json.dumps([stat.as_dict() for stat in stats], indent=2))
            else:
                console.print(status_table(stats))
            if not watch:
                return
            await asyncio.sleep(watch)

    with_redis(settings, show)


@kill_app.command("on")
def kill_on() -> None:
    """Halt trading now (every intent REJECTED KILL_SWITCH)."""
    with_redis(cli_support.settings(), lambda r: governor.set_kill(r, on=True))
    console.print("kill switch ON: trading halted")


@kill_app.command("off")
def kill_off() -> None:
    """Allow trading (sets quantum:kill to 0)."""
    settings = cli_support.settings()
    with_redis(settings, lambda r: governor.set_kill(r, on=False))
    console.print(f"kill switch OFF: trading allowed (mode {settings.mode})")


@kill_app.command("status")
def kill_status(as_json: bool = JSON_OPT) -> None:
    """Show the kill switch; exit 1 when trading is halted."""
    value, allowed = with_redis(cli_support.settings(), governor.kill_state)
    if as_json:
        print(json.dumps({"value": value, "trading_allowed": allowed}))
    else:
        # Anything but "0" halts; a value that is neither "0" nor "1" gets the fix on the same line.
        odd = "" if value in (None, "0", "1") else " (unexpected; `quantum-trader kill on|off` rewrites it)"
        line = f"quantum:kill = {value!r}: trading {'ALLOWED' if allowed else 'HALTED'}{odd}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(0 if allowed else 1)


@governor_app.command("status")
def governor_status(as_json: bool = JSON_OPT) -> None:
    """Today's count and limit, mode, kill switch, other limits."""
    settings = cli_support.settings()
    state = with_redis(settings, lambda r: governor.governor_state(r, settings))
    if as_json:
        print(json.dumps(asdict(state), default=str))
    else:
        console.print(governor_table(state))


@app.command()
def check(service: str = typer.Argument(..., help="router or execution")) -> None:
    """Exit 0 when SERVICE has a live heartbeat, 1 otherwise (for systemd and probes)."""
    settings = cli_support.settings()
    alive = with_redis(settings, lambda r: services.alive_consumers(r, service))
    if not alive:
        err.print(f"{service}: no live heartbeat")
        raise typer.Exit(1)
    console.print(f"{service}: alive ({', '.join(alive)})")


@app.command()
def decide(
    symbol: str = typer.Option(..., help="Exchange symbol, e.g. ETHUSDT."),
    side: str = typer.Option(..., help="BUY or SELL."),
    qty: str = typer.Option(..., help="Quantity (decimal)."),
    price: str | None = typer.Option(None, help="Reference price (MARKET) or limit price (LIMIT)."),
    order_type: str = typer.Option("MARKET", "--order-type"),
    correlation_id: str = typer.Option("", "--correlation-id"),
    trace_id: str = typer.Option("", "--trace-id"),
    wait: bool = typer.Option(False, "--wait", help="Wait for the decision's outcome and print it."),
    wait_s: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds --wait waits for the outcome."),
) -> None:
    """Publish one decision by hand, checked by the router's own rules first.

    With --wait: exit 0 when it FILLED, 1 for any other outcome (printed with its reason),
    3 when no outcome came within --timeout (is the pipeline running?).
    """
    settings = cli_support.settings()
    payload: dict[str, Any] = {"symbol": symbol, "side": side, "qty": qty, "order_type": order_type}
    if price is not None:
        payload["price"] = price
    fields = envelope(
        DECISION,
        payload,
        trace_id=trace_id or uuid.uuid4().hex,
        correlation_id=correlation_id or uuid.uuid4().hex,
        source="cli",
    )
    try:
        validate_decision(fields, datetime.now(UTC), timedelta(seconds=settings.clock_skew_s), settings.quote_assets)
    except DecodeError as exc:
        raise ConfigError(f"not published: {exc.reason} (the router would reject it INVALID)") from None

    async def publish_and_wait(redis: Redis) -> tuple[str, dict[str, Any] | None]:
        since = await ops.last_ids(redis, [settings.result_stream, settings.streams.rejected])
        [entry_id] = await publish(redis, settings.decision_stream, [fields])
        console.print(f"published {entry_id} on {settings.decision_stream} (trace_id {fields['trace_id']})")
        if not wait:
            return entry_id, None
        return entry_id, await ops.wait_for_outcome(redis, settings, entry_id, since, wait_s)

    entry_id, outcome = with_redis(settings, publish_and_wait)
    if not wait:
        return
    if outcome is None:
        err.print(f"no outcome for {entry_id} within {wait_s:g}s: is the pipeline running? (quantum-trader status)")
        raise typer.Exit(3)
    console.print(describe_outcome(outcome), highlight=False)
    if outcome.get("status") != "FILLED":
        raise typer.Exit(1)


def describe_outcome(outcome: dict[str, Any]) -> str:
    """One line: ``FILLED 0.1 ETHUSDT at 3000 (fee 0.3 USDT)`` or ``REJECTED KILL_SWITCH: detail``."""
    if outcome.get("status") == "FILLED":
        return (
            f"FILLED {outcome.get('side')} {outcome.get('filled_qty')} {outcome.get('symbol')} at "
            f"{outcome.get('avg_price')} (fee {outcome.get('fee')} {outcome.get('fee_asset')})"
        )
    status = outcome.get("status") or outcome.get("reason")  # a rejection has only a reason
    reason = outcome.get("reason", "") if outcome.get("status") else ""
    detail = outcome.get("detail", "")
    return " ".join(part for part in (str(status), str(reason)) if part) + (f": {detail}" if detail else "")


@dlq_app.command("list")
def dlq_list(count: int = typer.Option(20, min=1), as_json: bool = JSON_OPT) -> None:
    """The newest dead-letter entries with their reasons."""
    settings = cli_support.settings()
    rows = with_redis(settings, lambda r: ops.dead_letters(r, settings.dead_letter_stream, count))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("dead-letter stream is empty")
    for row in rows:
        console.print(f"{row['id']}  from {row.get('stream')} {row.get('entry_id')}: {row.get('reason')}")


@dlq_app.command("replay")
def dlq_replay(
    ids: list[str] = typer.Argument(..., help="Dead-letter entry ids to put back."),
) -> None:
    """Put dead-letter entries back on their origin stream, once the cause is fixed."""
    settings = cli_support.settings()
    try:
        done = with_redis(
            settings, lambda r: ops.replay_dead_letters(r, settings.dead_letter_stream, ids, settings.exchange)
        )
    except LookupError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(2) from None
    for dead_id, origin, new_id in done:
        console.print(f"{dead_id} -> {origin} {new_id}")


@app.command()
def server() -> None:
    """Run the embedded Valkey server in the foreground (for a systemd unit of its own)."""
    settings = cli_support.settings()
    if settings.redis_url:
        raise ConfigError("QT_REDIS_URL is set: the embedded server is not used; unset it to run one")
    valkey = EmbeddedValkey(settings.data_dir, appendfsync=settings.appendfsync)
    valkey.start()
    write_url_file(settings.data_dir, valkey.url)
    console.print(f"valkey serving at {redact_url(valkey.url)} (data in {settings.data_dir})")
    # systemd stops the unit with SIGTERM: stop Valkey (it flushes its AOF) before exiting, never
    # leave it running without its parent.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        while valkey.process is not None and valkey.process.poll() is None and not stopping.wait(0.5):
            pass
    finally:
        valkey.stop()


SERVER_URL_HELP = (
    "Run on this server instead of a private one; its streams, kill switch and balances change "
    "(give it an empty database)."
)


@app.command()
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
    settings = cli_support.settings()
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
    settings = settings.model_copy(update={"redis_url": server, "data_dir": private / "server"})
    log_path = private / "demo.log"
    log_file = log_path.open("a", encoding="utf-8")
    configure(settings.log_level, "json", log_file)  # keep the live table readable; outcomes go to the file
    console.print(f"outcome log: {log_path}")
    try:
        report = with_redis(
            settings,
            lambda r: ops.run_demo(
                r,
                settings,
                source=source,
                count=count,
                rate=rate,
                duration=duration,
                limit_s=timeout,
                seed=seed,
                console=console,
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
    if report.interrupted:
        console.print("stopped before the end (Ctrl-C or --duration); unfinished entries stay pending for the next run")
    elif not report.complete:
        err.print("not every decision reached an outcome before the timeout")
        raise typer.Exit(1)


# Command groups that live in their own modules: each module has ``register(app)``.
EXTENSIONS: list[str] = ["cli_operations", "cli_ai"]
for _module in EXTENSIONS:
    importlib.import_module(f"quantum_trader.{_module}").register(app)


def main() -> None:
    """Entry point: operator errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        app()
    except ConfigError as exc:
        err.print(f"error: {redact_urls(str(exc))}", highlight=False)
        sys.exit(2)
    except QuantumTraderError as exc:
        err.print(f"error: {redact_urls(str(exc))}", highlight=False)
        sys.exit(1)
    except OSError as exc:
        # A path the operator gave (or the server's files) cannot be used: say which and why.
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"error: {exc.strerror or redact_urls(str(exc))}{where}", highlight=False)
        sys.exit(1)
