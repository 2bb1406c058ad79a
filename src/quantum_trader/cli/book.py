"""The book's commands: ``positions``, ``balance``, ``paper reset`` (and the journal's ``trades``, ``pnl``)."""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation

import typer

from quantum_trader import book, keys, portfolio, runner
from quantum_trader.bus.connection import Redis
from quantum_trader.cli.common import JSON_OPT, configured, console, err, with_redis
from quantum_trader.cli.views import balance_table, positions_table
from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.paper import PaperExchange

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
    """Empty the paper account and the book's positions, then fund the account again."""
    cfg = configured()
    if cfg.exchange != "paper":
        raise ConfigError(f"paper reset resets the paper exchange; QT_EXCHANGE={cfg.exchange} is not paper")
    funds = parse_balances(balances) if balances else dict(cfg.paper_balances)
    alive = with_redis(cfg, lambda r: runner.alive_consumers(r, keys.EXECUTION))
    if alive:
        err.print(
            f"error: execution is running ({', '.join(alive)}): stop it (and quantum-trader run) before a reset",
            highlight=False,
        )
        raise typer.Exit(1)
    shown = ", ".join(f"{asset}={amount}" for asset, amount in funds.items()) or "nothing"
    if not yes and not typer.confirm(
        f"Delete the paper account, its orders and the book's positions, and fund {shown}?"
    ):
        err.print("nothing changed", highlight=False)
        raise typer.Exit(1)
    deleted = with_redis(cfg, lambda r: book.paper_reset(r, funds))
    console.print(f"paper account reset: {deleted} order records deleted, funded with {shown}")


def register(app: typer.Typer) -> None:
    """Add this family's commands to ``app``."""
    app.command("positions")(positions)
    app.command("balance")(balance)
    app.add_typer(paper_app, name="paper")
