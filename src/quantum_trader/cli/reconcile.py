"""``quantum-trader reconcile``: compare the exchange with the book, print every difference with its size."""

from __future__ import annotations

import typer

from quantum_trader.bus.connection import Redis
from quantum_trader.cli.common import JSON_OPT, configured, console, err, with_redis
from quantum_trader.cli.views import reconcile_screen
from quantum_trader.errors import ConfigError, QuantumTraderError
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.reconcile import Report, accept, encode_report, reconcile
from quantum_trader.reconcile.shell import SETTLE_S
from quantum_trader.redaction import redact_urls
from quantum_trader.runner import halt_trading

# Exit codes: 0 clean, 1 differences found, 2 bad settings or arguments, 3 nothing compared.
UNREACHABLE = 3


def reconcile_command(
    as_json: bool = JSON_OPT,
    accept_now: bool = typer.Option(
        False,
        "--accept",
        help="Record the exchange's holdings as the book's starting point and leave earlier orders out "
        "(after checking every difference is meant: a deposit, a manual trade).",
    ),
    settle_s: float = typer.Option(
        SETTLE_S, "--settle-s", min=0, help="Seconds between the two looks that must agree on a difference."
    ),
) -> None:
    """Compare the exchange's balances and orders with the book; exit 1 when they differ."""
    cfg = configured()

    async def run(redis: Redis) -> Report:
        exchange = await build_exchange(redis, cfg, on_auth_failure=halt_trading(redis))
        try:
            if accept_now:
                return await accept(redis, exchange, cfg, settle_s=settle_s)
            return await reconcile(redis, exchange, cfg, settle_s=settle_s)
        finally:
            await exchange.close()

    try:
        report = with_redis(cfg, run)
    except ConfigError:
        raise
    except QuantumTraderError as exc:  # the exchange or the server: nothing was compared
        err.print(f"error: not reconciled with {cfg.exchange}: {redact_urls(str(exc))}", highlight=False)
        raise typer.Exit(UNREACHABLE) from None
    if as_json:
        print(encode_report(report))
    else:
        console.print(reconcile_screen(report), highlight=False)
    raise typer.Exit(0 if report.clean else 1)


def register(app: typer.Typer) -> None:
    """Add this family's commands to ``app``."""
    app.command("reconcile")(reconcile_command)
