"""The ``quantum-trader`` command: parses, calls the package, prints. No logic of its own.

One module per command family (``pipeline``, ``demo``, ``market``, ``ops``, ``book``, ``reconcile``, ``web``,
``alerts``), each with ``register(app)``; everything drawn with rich lives in ``views``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from quantum_trader.cli import alerts, book, data, demo, market, ops, pipeline, reconcile, web
from quantum_trader.cli.common import err, state
from quantum_trader.errors import ConfigError, QuantumTraderError
from quantum_trader.redaction import redact_urls

app = typer.Typer(help="Quantum Trader: a fail-closed trading pipeline on Redis Streams.", no_args_is_help=True)


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


for _family in (pipeline, demo, ops, market, data, book, reconcile, web, alerts):
    _family.register(app)


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
