"""What a backtest leaves behind, whichever transport ran it: the streams and the state the report reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from quantum_trader.events import Fields


@dataclass
class Streams:
    """The intent, result, rejection and trading-state streams, the book, the paper balances and the levels."""

    intents: list[tuple[str, Fields]]
    results: list[tuple[str, Fields]]
    rejected: list[tuple[str, Fields]]
    states: list[Fields]
    book: dict[str, str] = field(default_factory=dict)
    balances: dict[str, Decimal] = field(default_factory=dict)
    stops: dict[str, str] = field(default_factory=dict)  # JSON with sorted keys: the same levels, the same text
    dead: int = 0  # entries set aside in the dead-letter stream
