"""The API's bodies: what each endpoint answers and accepts, as the OpenAPI schema publishes them.

These are the public contract, kept apart from the internal structs they are filled from (a
field renamed inside the journal must not rename it for every client). Amounts are exact
decimals sent as strings, as in the command line's ``--json``; times are ISO 8601.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, field_validator

# A dead-letter (stream entry) id, as ``dlq list`` shows it.
ENTRY_ID = r"^[0-9]{1,20}(-[0-9]{1,20})?$"


class Out(BaseModel):
    """Every answer: filled from the package's dataclasses and structs by attribute."""

    model_config = ConfigDict(from_attributes=True)


# --- status ---


class ConsumerStatus(Out):
    """One consumer of a group."""

    name: str
    pending: int
    idle_ms: int


class GroupStatus(Out):
    """One consumer group: how far behind (``lag``: entries not delivered yet), how much in flight."""

    name: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str
    entries_read: int | None
    consumer_list: list[ConsumerStatus]


class StreamStatus(Out):
    """One stream of the pipeline (``exists`` false until its first entry) and its groups."""

    name: str
    exists: bool
    length: int
    entries_added: int
    last_generated_id: str
    first_entry_id: str
    last_entry_id: str
    groups: list[GroupStatus]


# --- governor ---


class TradingStateRecord(Out):
    """The trading state in force, why, who set it and since when (``until`` "" = until changed)."""

    state: Literal["ACTIVE", "REDUCING", "HALTED"]
    reason: str
    detail: str
    by: str
    at: str
    until: str
    loss_ack_day: str


class RiskRule(Out):
    """One risk rule: its setting, limit ("off" when off), current value and headroom."""

    name: str
    setting: str
    limit: str
    current: str
    headroom: str


class ProtectiveLevels(Out):
    """A position's stop-loss and take-profit, and whether its exit fired."""

    stop: Decimal | None
    take: Decimal | None
    armed_at: str
    fired: str
    fired_at: str
    kind: str


class GovernorStatus(BaseModel):
    """Today's count and limit, mode, kill switch, trading state, every risk rule, the protective levels."""

    day: date
    count: int
    limit: int
    mode: str
    kill_value: str | None = Field(description="quantum:kill as stored; trading only while it is exactly 0")
    trading_allowed: bool = Field(description="the kill switch allows trading (the trading state may still not)")
    max_notional: Decimal
    symbol_allowlist: list[str]
    max_intent_age_s: float
    trading_state: TradingStateRecord
    rules: list[RiskRule]
    stops: dict[str, ProtectiveLevels]


# --- the book ---


class Position(BaseModel):
    """One position of the live book, marked at the last market price (else its last fill's)."""

    symbol: str
    base: str
    quote: str
    qty: Decimal
    avg_price: Decimal | None
    cost: Decimal
    mark: Decimal | None
    value: Decimal
    unrealised: Decimal
    realised: Decimal
    fees: dict[str, Decimal]
    unbooked: Decimal
    fills: int


class Totals(Out):
    """Book-wide figures per quote asset."""

    realised: dict[str, Decimal]
    unrealised: dict[str, Decimal]
    fees: dict[str, Decimal]
    exposure: dict[str, Decimal]


class Positions(BaseModel):
    """Every position and the totals."""

    positions: list[Position]
    totals: Totals


class AssetBalance(BaseModel):
    """One asset: the paper account's balance (null when the exchange is not the paper one) and the book's flow."""

    asset: str
    balance: Decimal | None
    book_flow: Decimal = Field(description="net change the book's fills made to this asset")


class Balances(BaseModel):
    """The paper account next to what the book's fills moved (a real exchange's: ``quantum-trader reconcile``)."""

    exchange: str
    assets: list[AssetBalance]


class Trade(Out):
    """One execution result the journal recorded (any status; ``filled_qty`` 0 when nothing filled)."""

    entry_id: str
    timestamp: datetime | None
    status: str
    reason: str
    detail: str
    symbol: str
    side: str
    qty: Decimal
    filled_qty: Decimal
    avg_price: Decimal | None
    fee: Decimal
    fee_asset: str
    strategy: str
    confidence: float | None
    client_order_id: str
    exchange_order_id: str
    intent_id: str
    decision_id: str
    exchange: str
    trace_id: str
    correlation_id: str
    source: str


class PnL(Out):
    """Realised PnL (average cost) of one day, symbol or strategy in one quote asset, with fees and volume."""

    key: str
    quote: str
    realised: Decimal
    unrealised: Decimal
    fees: dict[str, Decimal]
    fills: int
    volume: Decimal


class EquityPoint(Out):
    """The realised PnL accumulated up to one fill, in its quote asset."""

    time: datetime
    quote: str
    realised: Decimal
    fills: int = Field(description="fills counted so far in this quote asset")


class StateChangeRecord(Out):
    """One change of the trading state as the journal recorded it."""

    entry_id: str
    at: datetime
    state: str
    previous: str
    reason: str
    detail: str
    by: str
    until: datetime | None
    source: str
    trace_id: str
    correlation_id: str


# --- the streams ---


class EntryMeta(BaseModel):
    """A stream entry's id and envelope; ``problem`` says why its payload could not be read (then it is null)."""

    id: str
    timestamp: str
    trace_id: str
    correlation_id: str
    source: str
    problem: str | None = None


class Result(Out):
    """An execution result (the ``execution.result`` payload)."""

    status: str
    symbol: str
    side: str
    qty: Decimal
    intent_id: str
    client_order_id: str
    reason: str
    detail: str
    filled_qty: Decimal
    avg_price: Decimal | None
    fee: Decimal
    fee_asset: str
    exchange_order_id: str
    decision_id: str
    exchange: str
    strategy: str
    confidence: float | None


class ResultEntry(EntryMeta):
    """One entry of the result stream."""

    result: Result | None


class Rejection(Out):
    """Why the router refused a decision (INVALID or DUPLICATE_SKIP) and the decision as it was."""

    reason: str
    detail: str
    field: str
    original_id: str
    original: dict[str, str]
    original_base64: dict[str, str]


class RejectionEntry(EntryMeta):
    """One entry of the rejection stream."""

    rejection: Rejection | None


class DeadLetter(Out):
    """An entry set aside: where from, after how many deliveries, why, and its raw fields."""

    stream: str
    group: str
    entry_id: str
    deliveries: int
    reason: str
    field: str
    raw: dict[str, str]
    raw_base64: dict[str, str]


class DeadLetterEntry(EntryMeta):
    """One entry of the dead-letter stream (its ``id`` is what a replay names)."""

    dead_letter: DeadLetter | None


# --- controls ---


class KillSwitchChange(BaseModel):
    """Turn the kill switch on (halt everything) or off (allow trading)."""

    model_config = ConfigDict(extra="forbid")

    on: StrictBool


class KillSwitch(BaseModel):
    """The kill switch after the change."""

    on: bool
    value: str | None
    trading_allowed: bool


class TradingStateChange(BaseModel):
    """Set the trading state; ``reason`` is kept with it (journal, stream, log)."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["ACTIVE", "REDUCING", "HALTED"]
    reason: str = Field(min_length=1, max_length=500)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        text = value.strip()
        if not text:
            raise ValueError("give a reason: it is kept with the state")
        if any(ord(char) < 32 or ord(char) == 127 for char in text):
            raise ValueError("one line of text, without control characters")
        return text


class StateChange(BaseModel):
    """The change made: to what, from what, who, when; ``kill_switch_halts`` when the switch still stops trading."""

    state: str
    previous: str
    reason: str
    detail: str
    by: str
    at: str
    until: str
    kill_switch_halts: bool


def _in_range(entry_id: str) -> str:
    # The server's ids are two unsigned 64-bit numbers; a bigger one is a typo, not a missing entry.
    if any(int(part) >= 2**64 for part in entry_id.split("-")):
        raise ValueError(f"{entry_id} is not a stream entry id: each number is below 2^64")
    return entry_id


class ReplayRequest(BaseModel):
    """Dead-letter entries to put back on their origin stream, once their cause is fixed."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(pattern=ENTRY_ID, examples=["1700000000000-0"]), AfterValidator(_in_range)]] = Field(
        min_length=1, max_length=1000
    )


class Replayed(BaseModel):
    """One entry put back: its dead-letter id, the stream it went back to, its new id there."""

    id: str
    origin: str
    new_id: str


class Replay(BaseModel):
    """What the replay put back."""

    replayed: list[Replayed]
