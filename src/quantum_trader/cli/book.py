"""The book's commands: ``trades`` and ``pnl`` from the journal, ``positions``, ``balance``, ``paper reset``."""

from __future__ import annotations

import csv
import json
import re
import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

import typer

from quantum_trader import book, keys, portfolio, runner
from quantum_trader.bus.connection import Redis
from quantum_trader.cli.common import JSON_OPT, configured, console, err, with_redis
from quantum_trader.cli.views import balance_table, pnl_table, positions_table, trades_table
from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.settings import Settings

if TYPE_CHECKING:
    from quantum_trader.journal.database import Database

STATUSES = ("FILLED", "REJECTED", "EXPIRED", "FAILED")
MAX_BALANCE = Decimal("1e16")  # the contract's largest amount
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")  # ASCII decimal notation only (not 1_000)
paper_app = typer.Typer(help="The paper exchange's account.", no_args_is_help=True)


def positions(as_json: bool = JSON_OPT) -> None:
    """What the book holds per symbol: quantity, average entry, mark, value, unrealised and realised PnL, fees."""
    cfg = configured()
    marked = with_redis(cfg, book.marked_positions)
    if as_json:
        figures = portfolio.totals({m.position.symbol: m.position for m in marked}, book.marks(marked))
        print(json.dumps({"positions": [m.as_dict() for m in marked], "totals": _totals(figures)}, indent=2))
        return
    if not marked:
        console.print("The book holds nothing yet: no fill has been recorded.")
        return
    console.print(positions_table(marked))


def balance(as_json: bool = JSON_OPT) -> None:
    """The paper account's balances next to what the book's fills moved (exchange accounts: ``reconcile``)."""
    cfg = configured()

    async def read(redis: Redis) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        held = await PaperExchange(redis).balances()
        return held, portfolio.asset_flows(await book.read_positions(redis))

    if cfg.exchange != "paper":
        raise ConfigError(
            f"balance reads the paper account; with QT_EXCHANGE={cfg.exchange} run quantum-trader reconcile instead"
        )
    held, flows = with_redis(cfg, read)
    if as_json:
        assets = sorted(set(held) | set(flows))
        rows = {a: {"balance": str(held.get(a, 0)), "book_flow": str(flows.get(a, 0))} for a in assets}
        print(json.dumps(rows, indent=2))
        return
    console.print(balance_table(held, flows))


def _totals(figures: portfolio.Totals) -> dict[str, dict[str, str]]:
    return {
        name: {asset: str(amount) for asset, amount in sorted(getattr(figures, name).items())}
        for name in ("realised", "unrealised", "fees", "exposure")
    }


def parse_balances(text: str) -> dict[str, Decimal]:
    """``USDT=10000,ETH=1`` -> balances; a ConfigError naming the bad pair."""
    out: dict[str, Decimal] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        asset, sep, amount = part.partition("=")
        try:
            value = Decimal(amount.strip()) if sep and _DECIMAL.fullmatch(amount.strip()) else None
        except InvalidOperation:
            value = None
        if (
            value is None
            or not value.is_finite()
            or not 0 <= value <= MAX_BALANCE
            or not (asset.strip().isascii() and asset.strip().isalnum())
        ):
            raise ConfigError(
                f"--balances: {part!r} is not ASSET=AMOUNT with an amount from 0 to 1e16 (USDT=10000,ETH=1)"
            )
        out[asset.strip().upper()] = value
    return out


@paper_app.command("reset")
def paper_reset(
    balances: str = typer.Option("", "--balances", help="ASSET=AMOUNT,... (default: QT_PAPER_BALANCES)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Empty the paper account, the book and the journal, then fund the account again (a paper account starts over)."""
    cfg = configured()
    if cfg.exchange != "paper":
        raise ConfigError(f"paper reset resets the paper exchange; QT_EXCHANGE={cfg.exchange} is not paper")
    funds = parse_balances(balances) if balances else dict(cfg.paper_balances)

    async def running(redis: Redis) -> dict[str, list[str]]:
        return {service: await runner.alive_consumers(redis, service) for service in (keys.EXECUTION, keys.JOURNAL)}

    for service, alive in with_redis(cfg, running).items():
        if alive:
            err.print(
                f"error: {service} is running ({', '.join(alive)}): stop it (and quantum-trader run) before a reset",
                highlight=False,
            )
            raise typer.Exit(1)
    shown = ", ".join(f"{asset}={amount}" for asset, amount in funds.items()) or "nothing"
    question = f"Delete the paper account, its orders, the book and the journal's records, and fund {shown}?"
    if not yes and not typer.confirm(question):
        err.print("nothing changed", highlight=False)
        raise typer.Exit(1)
    # The journal first: a reset stopped half-way leaves an empty journal beside the old account,
    # which running the reset again puts right.
    from quantum_trader.journal import ledger

    db = _journal(cfg)
    try:
        with db.engine.begin() as connection:
            wiped = ledger.wipe(connection)
    finally:
        db.close()
    deleted = with_redis(cfg, lambda r: book.paper_reset(r, funds, cfg.streams))
    console.print(
        f"paper account reset: {deleted} order records and {wiped['results']:,} journaled results deleted,"
        f" funded with {shown}"
    )


def parse_moment(text: str | None, option: str) -> datetime | None:
    """``2026-12-01`` or ``2026-12-01T08:00`` (UTC unless an offset is given); a ConfigError naming the option."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give a date or time such as 2026-12-01 or 2026-12-01T08:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _journal(cfg: Settings) -> Database:
    from quantum_trader.journal.database import open_database  # SQLAlchemy: only for the journal's commands

    return open_database(cfg.journal_url())


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def trades(
    symbol: str | None = typer.Option(None, "--symbol", help="ETHUSDT: this symbol only."),
    since: str | None = typer.Option(None, "--since", help="From this UTC date or time (inclusive)."),
    until: str | None = typer.Option(None, "--until", help="Up to this UTC date or time (exclusive)."),
    status: str | None = typer.Option(None, "--status", help="FILLED, REJECTED, EXPIRED or FAILED."),
    strategy: str | None = typer.Option(None, "--strategy", help="This strategy's trades only."),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first."),
    as_json: bool = JSON_OPT,
    as_csv: bool = typer.Option(False, "--csv", help="CSV with every recorded field."),
) -> None:
    """Results the journal recorded, newest first (default: the last 50)."""
    from quantum_trader.journal import queries

    cfg = configured()
    if status is not None and status.upper() not in STATUSES:
        raise ConfigError(f"--status {status!r}: choose one of {', '.join(STATUSES)}")
    if as_json and as_csv:
        raise ConfigError("--json and --csv: choose one")
    if limit <= 0:
        raise ConfigError(f"--limit {limit}: give a number of trades above 0")
    start, end = parse_moment(since, "--since"), parse_moment(until, "--until")
    db = _journal(cfg)
    try:
        found = queries.trades(
            db,
            symbol=symbol.upper() if symbol else None,
            since=start,
            until=end,
            status=status.upper() if status else None,
            strategy=strategy,
            limit=limit,
        )
    finally:
        db.close()
    rows = [{name: _text(getattr(trade, name)) for name in queries.Trade.__slots__} for trade in found]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(queries.Trade.__slots__))
        writer.writeheader()
        writer.writerows(rows)
    elif not found:
        console.print("No trades recorded for this selection (is the journal running? quantum-trader status)")
    else:
        console.print(trades_table(found))


def pnl(
    by: str = typer.Option("day", "--by", help="day, symbol or strategy."),
    since: str | None = typer.Option(None, "--since", help="From this UTC date or time (inclusive)."),
    until: str | None = typer.Option(None, "--until", help="Up to this UTC date or time (exclusive)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Realised PnL (average cost), fees and volume per day, symbol or strategy, from the journal."""
    from quantum_trader.journal import queries

    cfg = configured()
    if by not in queries.GROUPINGS:
        raise ConfigError(f"--by {by!r}: choose one of {', '.join(queries.GROUPINGS)}")
    start, end = parse_moment(since, "--since"), parse_moment(until, "--until")
    marked = with_redis(cfg, book.marked_positions)
    db = _journal(cfg)
    try:
        groups = queries.pnl(db, by=by, since=start, until=end, prices=book.marks(marked))  # type: ignore[arg-type]
    finally:
        db.close()
    if as_json:
        out = [
            {
                "key": g.key,
                "quote": g.quote,
                "realised": str(g.realised),
                "unrealised": str(g.unrealised),
                "fees": {asset: str(amount) for asset, amount in sorted(g.fees.items())},
                "fills": g.fills,
                "volume": str(g.volume),
            }
            for g in groups
        ]
        print(json.dumps(out, indent=2))
    elif not groups:
        console.print("No fills recorded for this selection.")
    else:
        console.print(pnl_table(groups, by))


def register(app: typer.Typer) -> None:
    """Add this family's commands to ``app``."""
    app.command("trades")(trades)
    app.command("pnl")(pnl)
    app.command("positions")(positions)
    app.command("balance")(balance)
    app.add_typer(paper_app, name="paper")
