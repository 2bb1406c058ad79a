"""Alerts' pure core, its data: one look at the server, an alert, a message, and their storage.

An ``Observation`` is one look (``look.observe`` reads it): the levels that matter (the kill
switch, the live heartbeats, the groups over the lag limit, the latest reconciliation, the UTC
day), the events written since the previous look (trading-state changes, FAILED results, dead
letters) and the stream cursors saying how far those were read. ``changes.alerts_between``
turns two looks into ``Alert`` values; ``throttle.Throttle`` decides which become messages.
No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from quantum_trader import keys
from quantum_trader.events import StateChange
from quantum_trader.redaction import redact_text

# Hash: one field per watched stream (the id read up to) and LEVELS_FIELD (JSON of the levels last
# seen). A restarted watcher starts where the previous one stopped: nothing is alerted twice.
CURSORS = keys.ALERT_CURSORS
LEVELS_FIELD = "levels"
# The one watcher that looks and sends when several processes run one (value: its name, with an expiry).
LEASE = keys.ALERT_LEASE

TITLE_CHARS = 160
BODY_CHARS = 1500


class Severity(StrEnum):
    """How bad: the values are Apprise's notification types (the colour or icon of a message)."""

    INFO = "info"
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"

    @property
    def rank(self) -> int:
        """Order of badness, for the severity of a digest (its worst alert's)."""
        return (Severity.INFO, Severity.SUCCESS, Severity.WARNING, Severity.FAILURE).index(self)


@dataclass(frozen=True, slots=True)
class Alert:
    """One thing the operator should hear about.

    ``key`` says which alerts are the same one (the throttle sends a key at most once per
    interval); ``count`` is how many events it stands for (ten FAILED orders of one cause are one
    alert with count 10).
    """

    key: str
    title: str
    body: str = ""
    severity: Severity = Severity.WARNING
    count: int = 1


@dataclass(frozen=True, slots=True)
class Message:
    """What is sent: one alert, or a digest of several; ``keys`` names the alerts it carries."""

    title: str
    body: str
    severity: Severity
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FailedOrder:
    """A FAILED execution result."""

    entry_id: str
    symbol: str
    side: str
    qty: str
    reason: str
    detail: str
    intent_id: str


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A new dead letter: where its entry came from and why it was set aside."""

    entry_id: str
    origin: str
    reason: str


@dataclass(frozen=True, slots=True)
class Reconciled:
    """The latest reconciliation (``quantum:book:reconciled``), as far as alerts care."""

    at: str
    exchange: str
    differences: tuple[str, ...]  # what makes each difference the one it is, sorted
    summary: str
    halt_reason: str = ""


@dataclass(frozen=True, slots=True)
class DailySummary:
    """One UTC day's trading: orders sent, fills and PnL per quote asset.

    ``source`` is ``journal`` (fills, realised PnL, fees and volume from the SQL journal) or
    ``server`` (realised PnL from the book's daily figures in Redis, when the journal could not
    answer; ``note`` says why). ``orders`` is the governor's count of orders sent (None: expired).
    """

    day: str
    source: str
    orders: int | None = None
    fills: int | None = None
    realised: Mapping[str, Decimal] = field(default_factory=dict)
    fees: Mapping[str, Decimal] = field(default_factory=dict)
    volume: Mapping[str, Decimal] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True, slots=True)
class Observation:
    """One look at the server.

    Levels: ``trading_allowed`` (the kill switch is exactly ``0``; None: not read),
    ``heartbeats`` (``service:consumer`` of every live heartbeat), ``lagging`` ((stream, group)
    -> lag, only the groups above ``lag_limit``), ``reconciled``, ``day`` (UTC, ISO).
    Events since the previous look: ``state_changes``, ``failed``, ``dead_letters``, and the
    previous day's ``summary`` when the day changed. ``cursors``: stream -> the last id read.
    """

    at: float
    day: str
    cursors: Mapping[str, str] = field(default_factory=dict)
    trading_allowed: bool | None = None
    kill_value: str | None = None
    heartbeats: frozenset[str] = frozenset()
    lagging: Mapping[tuple[str, str], int] = field(default_factory=dict)
    lag_limit: int = 0
    reconciled: Reconciled | None = None
    state_changes: tuple[StateChange, ...] = ()
    failed: tuple[FailedOrder, ...] = ()
    dead_letters: tuple[DeadLettered, ...] = ()
    summary: DailySummary | None = None

    def settled(self) -> Observation:
        """The look without its events: what the next look is compared with, and what is stored."""
        return replace(self, state_changes=(), failed=(), dead_letters=(), summary=None)


def encode_levels(observation: Observation) -> str:
    """The levels of a look as JSON (the cursors are stored beside it, one field per stream)."""
    rec = observation.reconciled
    return json.dumps(
        {
            "at": observation.at,
            "day": observation.day,
            "trading_allowed": observation.trading_allowed,
            "kill_value": observation.kill_value,
            "heartbeats": sorted(observation.heartbeats),
            "lagging": [[stream, group, lag] for (stream, group), lag in sorted(observation.lagging.items())],
            "lag_limit": observation.lag_limit,
            "reconciled": None
            if rec is None
            else {
                "at": rec.at,
                "exchange": rec.exchange,
                "differences": list(rec.differences),
                "summary": rec.summary,
                "halt_reason": rec.halt_reason,
            },
        }
    )


def decode_stored(fields: Mapping[str, str]) -> Observation | None:
    """The stored look (``CURSORS``' fields) back; None when there is none or it does not decode."""
    raw = fields.get(LEVELS_FIELD)
    if raw is None:
        return None
    try:
        data: dict[str, Any] = json.loads(raw)
        rec = data.get("reconciled")
        return Observation(
            at=float(data["at"]),
            day=str(data["day"]),
            cursors={name: value for name, value in fields.items() if name != LEVELS_FIELD},
            trading_allowed=None if data.get("trading_allowed") is None else bool(data["trading_allowed"]),
            kill_value=None if data.get("kill_value") is None else str(data["kill_value"]),
            heartbeats=frozenset(str(name) for name in data.get("heartbeats", [])),
            lagging={(str(stream), str(group)): int(lag) for stream, group, lag in data.get("lagging", [])},
            lag_limit=int(data.get("lag_limit", 0)),
            reconciled=None
            if rec is None
            else Reconciled(
                at=str(rec["at"]),
                exchange=str(rec["exchange"]),
                differences=tuple(str(d) for d in rec["differences"]),
                summary=str(rec["summary"]),
                halt_reason=str(rec.get("halt_reason", "")),
            ),
        )
    except (ValueError, TypeError, KeyError):
        return None


def clip(text: str, keep: int) -> str:
    """``text`` on one line, secrets out, at most ``keep`` characters."""
    flat = " ".join(redact_text(text).split())
    return flat if len(flat) <= keep else flat[: keep - 1] + "…"


def amount(value: Decimal) -> str:
    """A decimal as an operator reads it: at most 8 decimals, no exponent, no trailing zeros."""
    try:
        rounded = value.quantize(Decimal("0.00000001")).normalize()
    except InvalidOperation:
        return str(value)
    return f"{rounded:f}"
