"""Commands of the book (book): registered here, filled in by the work in progress."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this family's commands to ``app``."""
    del app
