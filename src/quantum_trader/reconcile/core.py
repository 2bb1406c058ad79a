"""Reconciliation's pure core: one look's differences, each with its size and its fix.

``compare`` turns a ``Snapshot`` (what one look read of the exchange and the book) into
``Difference`` values; ``confirmed`` keeps those two looks agree on; ``Report`` is what the
latest reconciliation found, as kept in ``quantum:book:reconciled``. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from enum import StrEnum

import msgspec

from quantum_trader import keys, portfolio
from quantum_trader.errors import QuantumTraderError
from quantum_trader.exchanges.base import ExchangeOrder, is_ours
from quantum_trader.portfolio import Position

ZERO = Decimal(0)


class Kind(StrEnum):
    """What kind of difference."""

    BALANCE = "BALANCE"
    UNRECORDED_FILL = "UNRECORDED_FILL"
    FOREIGN_FILL = "FOREIGN_FILL"
    UNKNOWN_OPEN_ORDER = "UNKNOWN_OPEN_ORDER"


class Difference(msgspec.Struct, frozen=True, kw_only=True):
    """One way the exchange and the book disagree, with its size and what to do about it.

    ``subject`` is the asset (BALANCE) or the market; ``size`` is held - expected for a balance,
    and the quantity (base asset) for an order.
    """

    kind: Kind
    subject: str
    size: Decimal
    expected: Decimal | None = None
    held: Decimal | None = None
    side: str = ""
    price: Decimal | None = None
    client_order_id: str = ""
    exchange_order_id: str = ""
    detail: str = ""
    fix: str = ""

    def key(self) -> tuple[str, str, str, str]:
        """What makes two looks' differences the same one."""
        return (self.kind, self.subject, self.client_order_id, self.exchange_order_id)


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What one look read: the exchange's side, then the book's.

    ``baseline`` None: not recorded yet. ``orders`` None: the exchange cannot list them.
    ``recorded``: per ``order_key``, the quantity the results in the window say filled.
    """

    balances: dict[str, Decimal]
    orders: list[ExchangeOrder] | None
    book: dict[str, Position]
    baseline: dict[str, Decimal] | None
    recorded: dict[str, Decimal]
    now_ms: int


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """The latest reconciliation, as kept in ``quantum:book:reconciled`` and printed by the command."""

    at: str
    exchange: str
    differences: list[Difference]
    assets: int  # assets compared
    orders: int  # exchange orders looked at; -1 when the exchange cannot list them
    since: str  # start of the window of orders compared
    baseline_recorded: bool = False  # this reconciliation recorded the baseline
    baseline_pending: bool = False  # no baseline yet: the book kept moving; the next one records it
    halted: bool = False  # this reconciliation turned the kill switch on
    halt_reason: str = ""
    accepted_ms: int = 0  # orders placed up to this moment were accepted by an operator

    @property
    def clean(self) -> bool:
        """No difference found."""
        return not self.differences


def order_key(client_order_id: str, exchange_order_id: str) -> str:
    """How a result and an exchange order are matched."""
    return f"{client_order_id}|{exchange_order_id}"


def _amount(value: Decimal) -> str:
    return f"{value.normalize():f}"


def _signed(value: Decimal) -> str:
    return f"{value.normalize():+f}"


def balance_difference(asset: str, expected: Decimal, held: Decimal, baseline: Decimal, flow: Decimal) -> Difference:
    """A BALANCE difference with its words."""
    size = held - expected
    more = "more" if size > 0 else "less"
    return Difference(
        kind=Kind.BALANCE,
        subject=asset,
        size=size,
        expected=expected,
        held=held,
        detail=(
            f"{asset}: the exchange holds {_amount(held)}, the book expects {_amount(expected)} "
            f"(baseline {_amount(baseline)}, fills {_signed(flow)}): {_amount(abs(size))} {more}"
        ),
        fix=(
            "find what moved it (a manual trade or transfer, a fill the book missed: see the other differences); "
            "when it is meant, run: quantum-trader reconcile --accept, then quantum-trader kill off"
        ),
    )


def _order_words(order: ExchangeOrder, qty: Decimal) -> str:
    market = order.symbol or "paper"
    side = f"{order.side} " if order.side else ""
    price = f" at {_amount(order.avg_price)}" if order.avg_price is not None else ""
    return f"{market}: order {order.exchange_order_id} ({order.client_order_id}) {side}{_amount(qty)}{price}"


def _about(order: ExchangeOrder, kind: Kind, size: Decimal, detail: str, fix: str) -> Difference:
    return Difference(
        kind=kind,
        subject=order.symbol,
        size=size,
        side=order.side,
        price=order.avg_price,
        client_order_id=order.client_order_id,
        exchange_order_id=order.exchange_order_id,
        detail=detail,
        fix=fix,
    )


def order_differences(
    orders: Sequence[ExchangeOrder], recorded: Mapping[str, Decimal], *, tolerance: Decimal, open_before_ms: int
) -> list[Difference]:
    """Fills no result records, fills that are not ours, and our orders still open since before ``open_before_ms``."""
    out: list[Difference] = []
    for order in orders:
        if not is_ours(order.client_order_id):
            if order.filled > 0:
                words = f"{_order_words(order, order.filled)} filled, not placed by the pipeline (a manual trade)"
                fix = "trade on this account only through the pipeline; once checked: quantum-trader reconcile --accept"
                out.append(_about(order, Kind.FOREIGN_FILL, order.filled, words, fix))
            continue
        unrecorded = order.filled - recorded.get(order_key(order.client_order_id, order.exchange_order_id), ZERO)
        if unrecorded > tolerance:
            words = f"{_order_words(order, unrecorded)} filled and no result records it"
            fix = (
                "the book's positions miss this fill (a lost response, or a dead-lettered intent: "
                "quantum-trader dlq list); once checked: quantum-trader reconcile --accept"
            )
            out.append(_about(order, Kind.UNRECORDED_FILL, unrecorded, words, fix))
        if order.is_open and order.time_ms <= open_before_ms:
            rest = order.amount - order.filled
            words = f"{_order_words(order, rest)} is open, and execution tracks none this old"
            fix = "cancel it on the exchange, then run: quantum-trader reconcile"
            out.append(_about(order, Kind.UNKNOWN_OPEN_ORDER, rest, words, fix))
    return out


def expected_balances(book: Mapping[str, Position], baseline: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """What the exchange should hold of each asset: the baseline plus the book's flows."""
    flows = portfolio.asset_flows(book)
    return {asset: baseline.get(asset, ZERO) + flows.get(asset, ZERO) for asset in sorted({*baseline, *flows})}


def baseline_from(balances: Mapping[str, Decimal], book: Mapping[str, Position]) -> dict[str, Decimal]:
    """The baseline that makes the book agree with ``balances``: each balance minus the book's flows."""
    flows = portfolio.asset_flows(book)
    out = {asset: balances.get(asset, ZERO) - flows.get(asset, ZERO) for asset in sorted({*balances, *flows})}
    return {asset: amount for asset, amount in out.items() if amount != 0}


def compare(snapshot: Snapshot, *, tolerance: Decimal, open_grace_ms: int) -> list[Difference]:
    """Every difference one look shows (pure). Without a baseline, balances are not compared."""
    out: list[Difference] = []
    if snapshot.baseline is not None:
        flows = portfolio.asset_flows(snapshot.book)
        expected = expected_balances(snapshot.book, snapshot.baseline)
        for asset in sorted({*expected, *snapshot.balances}):
            want, held = expected.get(asset, ZERO), snapshot.balances.get(asset, ZERO)
            if abs(held - want) > tolerance:
                out.append(
                    balance_difference(asset, want, held, snapshot.baseline.get(asset, ZERO), flows.get(asset, ZERO))
                )
    if snapshot.orders is not None:
        out += order_differences(
            snapshot.orders,
            snapshot.recorded,
            tolerance=tolerance,
            open_before_ms=snapshot.now_ms - open_grace_ms,
        )
    return out


def confirmed(first: Sequence[Difference], second: Sequence[Difference], tolerance: Decimal) -> list[Difference]:
    """The differences of ``second`` that ``first`` found too (a balance off by the same amount).

    An order that was in flight during the first look is booked by the second; one in flight
    during the second was not there in the first. What is left stays until someone acts.
    """
    before = {d.key(): d for d in first}
    out = []
    for difference in second:
        earlier = before.get(difference.key())
        if earlier is None:
            continue
        if difference.kind is Kind.BALANCE and abs(earlier.size - difference.size) > tolerance:
            continue
        out.append(difference)
    return out


def summary(differences: Sequence[Difference]) -> str:
    """All differences in one line, for the log."""
    return "; ".join(d.detail for d in differences)


_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder = msgspec.json.Decoder(Report)


def encode_report(report: Report) -> str:
    """A report as JSON (decimals as strings), the form kept in ``quantum:book:reconciled``."""
    data = msgspec.to_builtins(report, builtin_types=(Decimal,))
    data["clean"] = report.clean
    return _encoder.encode(data).decode()


def decode_report(text: str | bytes) -> Report:
    """A report read back; QuantumTraderError when it is not one."""
    try:
        return _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise QuantumTraderError(f"{keys.BOOK_RECONCILED} does not hold a reconciliation: {exc}") from None
