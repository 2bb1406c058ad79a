"""What a backtest leaves behind, whichever transport ran it: the streams and the state the report reads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

import msgspec

from quantum_trader.events import Fields, parse_iso


@dataclass
class Streams:
    """The result, rejection and trading-state streams, what each intent was decided at and by, the book,
    the paper balances and the levels."""

    decided: dict[str, tuple[int, str]]  # intent id -> (its decision's time in ms, its strategy)
    results: list[tuple[str, Fields]]
    rejected: list[tuple[str, Fields]]
    states: list[Fields]
    book: dict[str, str] = field(default_factory=dict)
    balances: dict[str, Decimal] = field(default_factory=dict)
    stops: dict[str, str] = field(default_factory=dict)  # JSON with sorted keys: the same levels, the same text
    dead: int = 0  # entries set aside in the dead-letter stream


class _Decided(msgspec.Struct):
    decision_ts: str | None = None
    strategy: str | None = None


_decided = msgspec.json.Decoder(_Decided)


def decided(intents: Iterable[tuple[str, str]]) -> dict[str, tuple[int, str]]:
    """Per (intent id, intent payload): when its decision was made (ms) and by which strategy."""
    out = {}
    for intent_id, payload in intents:
        intent = _decided.decode(payload)
        at = int(parse_iso(intent.decision_ts).timestamp() * 1000) if intent.decision_ts else 0
        out[intent_id] = (at, intent.strategy or "")
    return out
