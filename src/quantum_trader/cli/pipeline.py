"""Pipeline commands: run the stages, watch them, steer them.

``run``, ``router``, ``execution``, ``ai-engine``, ``journal``, ``server``, ``status``, ``check``,
``kill on|off|status``, ``state [show|active|reducing|halted]``, ``governor status``, ``decide``,
``dlq list|replay``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import signal
import threading
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import typer

from quantum_trader import execution as execution_stage
from quantum_trader import governor, keys, runner, trading
from quantum_trader.bus import dead_letters
from quantum_trader.bus.access import write_url_file
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.embedded import EmbeddedValkey
from quantum_trader.bus.inspect import last_ids, pipeline_status, wait_for_outcome
from quantum_trader.cli.common import JSON_OPT, configured, console, err, run_stages, with_redis
from quantum_trader.cli.views import describe_outcome, describe_state, governor_table, status_table
from quantum_trader.errors import ConfigError, DecodeError
from quantum_trader.events import DECISION, StateChange, TradingState, envelope
from quantum_trader.journal import rows as journal_rows
from quantum_trader.publisher import publish_decisions
from quantum_trader.redaction import redact_url
from quantum_trader.router import validate as validate_decision

kill_app = typer.Typer(help="The kill switch: trading only while quantum:kill is exactly 0.", no_args_is_help=True)
governor_app = typer.Typer(help="The risk governor's counters and limits.", no_args_is_help=True)
dlq_app = typer.Typer(help="Inspect and replay the dead-letter stream.", no_args_is_help=True)


def run(
    stages: str = typer.Option(",".join(keys.STAGES), envvar="QT_STAGES", help="Comma-separated stages."),
    duration: float | None = typer.Option(None, envvar="QT_DURATION", help="Stop after this many seconds."),
) -> None:
    """Run the whole pipeline (or the named stages) in one process; with QT_RUN_WEB, the dashboard too."""
    run_stages([name.strip() for name in stages.split(",") if name.strip()], duration, web=configured().run_web)


def router(duration: float | None = typer.Option(None, envvar="QT_DURATION")) -> None:
    """Run the router alone (one systemd unit)."""
    run_stages([keys.ROUTER], duration)


def execution(duration: float | None = typer.Option(None, envvar="QT_DURATION")) -> None:
    """Run execution alone; several processes with different QT_CONSUMER share the group."""
    run_stages([keys.EXECUTION], duration)


def journal(duration: float | None = typer.Option(None, envvar="QT_DURATION")) -> None:
    """Run the journal alone: results, rejections and dead letters into SQL (QT_DATABASE_URL, default SQLite)."""
    run_stages([keys.JOURNAL], duration)


def protect(duration: float | None = typer.Option(None, envvar="QT_DURATION")) -> None:
    """Run the protect stage alone: each position's stop-loss or take-profit exit, fired once."""
    run_stages([keys.PROTECT], duration)


def ai_engine(
    duration: float | None = typer.Option(None, envvar="QT_DURATION", help="Stop after this many seconds."),
) -> None:
    """Run the AI engine alone (one systemd unit): candles in, decisions out."""
    run_stages([keys.AI_ENGINE], duration)


def status(
    as_json: bool = JSON_OPT,
    watch: float = typer.Option(0, "--watch", help="Refresh every N seconds until Ctrl-C."),
    consumers: bool = typer.Option(False, "--consumers", help="Include each consumer's pending and idle time."),
) -> None:
    """Length, entries added, last id, and per group: consumers, pending, lag, last delivered id."""
    settings = configured()
    if watch < 0 or (watch and watch < 0.1):
        raise ConfigError(f"--watch {watch:g}: give the refresh interval in seconds, 0.1 or more (0 = once)")

    async def show(redis: Redis) -> None:
        while True:
            stats = await pipeline_status(redis, settings.pipeline_streams(), with_consumers=consumers)
            if as_json:
                print(json.dumps([stat.as_dict() for stat in stats], indent=2))
            else:
                console.print(status_table(stats))
                if settings.partitions > 1:
                    await show_partitions(redis)
            if not watch:
                return
            await asyncio.sleep(watch)

    async def show_partitions(redis: Redis) -> None:
        """Who holds each partition's lease, and for how long still (the lag is in the table above)."""
        for service, stream in ((keys.EXECUTION, settings.intent_stream), (keys.ROUTER, settings.decision_stream)):
            for k in range(settings.partitions):
                lease = keys.partition_lease(k, service)
                holder, left_ms = await redis.get(lease), await redis.pttl(lease)
                held = f"held by {holder.split(' ')[0]} ({left_ms} ms left)" if holder else "free"
                name = keys.partition_stream(stream, k, settings.partitions)
                console.print(f"partition {k} ({name}): {held}", highlight=False, markup=False)

    with_redis(settings, show)


@kill_app.command("on")
def kill_on() -> None:
    """Halt trading now (every intent REJECTED KILL_SWITCH)."""
    with_redis(configured(), lambda r: governor.set_kill(r, on=True))
    console.print("kill switch ON: trading halted")


@kill_app.command("off")
def kill_off() -> None:
    """Allow trading (sets quantum:kill to 0)."""
    settings = configured()
    with_redis(settings, lambda r: governor.set_kill(r, on=False))
    console.print(f"kill switch OFF: trading allowed (mode {settings.mode})")


@kill_app.command("status")
def kill_status(as_json: bool = JSON_OPT) -> None:
    """Show the kill switch; exit 1 when trading is halted."""
    value, allowed = with_redis(configured(), governor.kill_state)
    if as_json:
        print(json.dumps({"value": value, "trading_allowed": allowed}))
    else:
        # Anything but "0" halts; a value that is neither "0" nor "1" gets the fix on the same line.
        odd = "" if value in (None, "0", "1") else " (unexpected; `quantum-trader kill on|off` rewrites it)"
        line = f"{keys.KILL_SWITCH} = {value!r}: trading {'ALLOWED' if allowed else 'HALTED'}{odd}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(0 if allowed else 1)


STATE_WORDS = tuple(member.value.lower() for member in TradingState)


def operator_name() -> str:
    """Who changes the state (``--by``'s default): the OS user name, else the numeric uid."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
        return str(os.getuid())


def state(
    word: str | None = typer.Argument(
        None, metavar="[show|active|reducing|halted]", help="The state to set; leave out (or show) to print it."
    ),
    reason: str | None = typer.Option(None, "--reason", help="Why (required for a change; kept with the state)."),
    by: str | None = typer.Option(None, "--by", help="Who changes it (default: the OS user name)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Show or set the trading state: ACTIVE trades, REDUCING only reduces positions, HALTED sends nothing.

    A change is stored, put on the trading-state stream and logged; back to active also accepts
    the day's losses so far (the loss breakers measure from now).
    """
    choice = (word or "show").strip().lower()
    if choice != "show" and choice not in STATE_WORDS:
        raise ConfigError(f"unknown trading state {word!r}: choose one of {', '.join(STATE_WORDS)} (or show)")
    if choice == "show" and (reason is not None or by is not None):
        raise ConfigError("--reason and --by go with a change: quantum-trader state halted --reason '...'")
    if choice != "show" and (reason is None or not reason.strip()):
        raise ConfigError(
            f"--reason is required to change the trading state: quantum-trader state {choice} --reason '...'"
        )
    settings = configured()
    if choice == "show" or reason is None:
        status = with_redis(settings, lambda r: trading.risk_status(r, settings))
        if as_json:
            print(json.dumps(status.as_dict()["trading_state"]))
        else:
            console.print(describe_state(status.state), highlight=False, markup=False, soft_wrap=True)
        return
    why, who = reason.strip(), (by or "").strip() or operator_name()
    target = TradingState(choice.upper())

    async def change(redis: Redis) -> tuple[StateChange, bool]:
        done = await trading.set_state(redis, settings, target, why, who)
        _value, allowed = await governor.kill_state(redis)
        return done, allowed

    done, kill_allows = with_redis(settings, change)
    if as_json:
        print(json.dumps({name: str(getattr(done, name)) for name in done.__struct_fields__}))
        return
    line = f"trading state {done.state} (was {done.previous}): {done.detail} (by {done.by} at {done.at})"
    console.print(line, highlight=False, markup=False, soft_wrap=True)
    if done.state is not TradingState.ACTIVE:
        console.print("resume with: quantum-trader state active --reason '...'", highlight=False, markup=False)
    elif not kill_allows:
        console.print("the kill switch still halts trading: quantum-trader kill off", highlight=False, markup=False)


@governor_app.command("status")
def governor_status(as_json: bool = JSON_OPT) -> None:
    """Mode, kill switch, trading state, every risk rule (limit, current, headroom), protective stops."""
    settings = configured()

    async def read(redis: Redis) -> tuple[governor.GovernorState, trading.RiskStatus]:
        return await governor.governor_state(redis, settings), await trading.risk_status(redis, settings)

    counters, risk_status = with_redis(settings, read)
    if as_json:
        print(json.dumps(asdict(counters) | risk_status.as_dict(), default=str))
    else:
        console.print(governor_table(counters, risk_status))


def check(service: str = typer.Argument(..., help="router or execution")) -> None:
    """Exit 0 when SERVICE has a live heartbeat, 1 otherwise (for systemd and probes)."""
    settings = configured()
    alive = with_redis(settings, lambda r: runner.alive_consumers(r, service))
    if not alive:
        err.print(f"{service}: no live heartbeat")
        raise typer.Exit(1)
    console.print(f"{service}: alive ({', '.join(alive)})")


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
    settings = configured()
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
        since = await last_ids(redis, [settings.result_stream, settings.streams.rejected])
        [(stream, entry_id)] = await publish_decisions(redis, settings, [fields])
        console.print(f"published {entry_id} on {stream} (trace_id {fields['trace_id']})")
        if not wait:
            return entry_id, None
        return entry_id, await wait_for_outcome(redis, settings.streams, entry_id, since, wait_s)

    entry_id, outcome = with_redis(settings, publish_and_wait)
    if not wait:
        return
    if outcome is None:
        err.print(f"no outcome for {entry_id} within {wait_s:g}s: is the pipeline running? (quantum-trader status)")
        raise typer.Exit(3)
    console.print(describe_outcome(outcome), highlight=False)
    if outcome.get("status") != "FILLED":
        raise typer.Exit(1)


@dlq_app.command("list")
def dlq_list(count: int = typer.Option(20, min=1), as_json: bool = JSON_OPT) -> None:
    """The newest dead-letter entries with their reasons."""
    settings = configured()
    rows = with_redis(settings, lambda r: dead_letters.newest(r, settings.dead_letter_stream, count))
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
    settings = configured()
    try:
        done = with_redis(
            settings,
            lambda r: dead_letters.replay(
                r,
                settings.dead_letter_stream,
                ids,
                dead_letters.refusing(
                    journal_rows.replay_refusal(settings.streams), execution_stage.replay_refusal(r, settings.exchange)
                ),
                numbered=settings.partition_streams(),
                counter=keys.PARTITION_IDS,
            ),
        )
    except LookupError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(2) from None
    for dead_id, origin, new_id in done:
        console.print(f"{dead_id} -> {origin} {new_id}")


def server() -> None:
    """Run the embedded Valkey server in the foreground (for a systemd unit of its own)."""
    settings = configured()
    if settings.redis_url:
        raise ConfigError("QT_REDIS_URL is set: the embedded server is not used; unset it to run one")
    # systemd stops the unit with SIGTERM: stop Valkey (it flushes its AOF) before exiting, never
    # leave it running without its parent. Handled from before the start: a SIGTERM that lands
    # once the URL file is there (or while the server starts) must not kill this process alone.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    valkey = EmbeddedValkey(settings.data_dir, appendfsync=settings.appendfsync)
    valkey.start()
    try:
        write_url_file(settings.data_dir, valkey.url)
        console.print(f"valkey serving at {redact_url(valkey.url)} (data in {settings.data_dir})")
        while valkey.process is not None and valkey.process.poll() is None and not stopping.wait(0.5):
            pass
    finally:
        valkey.stop()


def register(app: typer.Typer) -> None:
    """Add the pipeline commands to the main CLI."""
    app.command()(run)
    app.command()(router)
    app.command()(execution)
    app.command("ai-engine")(ai_engine)
    app.command()(journal)
    app.command()(protect)
    app.command()(status)
    app.add_typer(kill_app, name="kill")
    app.command()(state)
    app.add_typer(governor_app, name="governor")
    app.command()(check)
    app.command()(decide)
    app.add_typer(dlq_app, name="dlq")
    app.command()(server)
