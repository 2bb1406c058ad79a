"""What every command module shares: settings loading, the server connection, running stages, consoles."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console

from quantum_trader import runner
from quantum_trader.bus.connection import Redis, connected, server_url
from quantum_trader.errors import ConfigError
from quantum_trader.logs import configure
from quantum_trader.settings import Settings, load_settings

T = TypeVar("T")
state: dict[str, Path | None] = {"env_file": None}

# Piped output keeps the full table (rich would otherwise squeeze it to 80 columns).
console = Console(width=None if sys.stdout.isatty() else 200)
# Messages carry keys such as quantum:book:positions and raw input: no emoji codes, no markup.
err = Console(stderr=True, soft_wrap=True, emoji=False, markup=False)
JSON_OPT = typer.Option(False, "--json", envvar="QT_JSON", help="Machine-readable output.")


def configured() -> Settings:
    """The settings (from ``--env-file`` / ``QT_ENV_FILE`` and the environment), logging configured."""
    loaded = load_settings(state["env_file"])
    configure(loaded.log_level, loaded.log_format)
    return loaded


def with_redis(cfg: Settings, action: Callable[[Redis], Awaitable[T]]) -> T:
    """Run ``action`` with a connected client (starting the embedded server if needed)."""

    async def main(url: str) -> T:
        async with connected(url) as redis:
            return await action(redis)

    with server_url(cfg) as url:
        return asyncio.run(main(url))


def run_stages(stage_names: list[str], duration: float | None, *, web: bool = False) -> None:
    """Run the named stages in this process until stopped (or ``duration`` seconds); ``web``: the dashboard too."""
    cfg = configured()
    if duration is not None and duration <= 0:
        raise ConfigError(
            f"--duration {duration:g}: give a number of seconds above 0 (or leave it out to run until stopped)"
        )

    async def main(url: str) -> None:
        async with connected(url) as redis:
            stop = asyncio.Event()
            runner.install_signal_handlers(stop)
            await runner.serve(redis, cfg, stage_names, stop, duration=duration, web=web)

    with server_url(cfg) as url:
        asyncio.run(main(url))
