"""A ccxt order structure as an ``OrderOutcome``: filled quantity, exact average price, fees."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from quantum_trader.events import Reason
from quantum_trader.exchanges.base import OrderOutcome
from quantum_trader.exchanges.ccxt.markets import to_decimal


def _fees(entries: list[Any]) -> tuple[Decimal, str]:
    """Total fee and its asset from ccxt fee entries (several assets: the first one's total)."""
    totals: dict[str, Decimal] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        cost = to_decimal(entry.get("cost"))
        if cost is None:
            continue
        currency = str(entry.get("currency") or "")
        totals[currency] = totals.get(currency, Decimal(0)) + cost
    if not totals:
        return Decimal(0), ""
    asset = next(iter(totals))
    return totals[asset], asset


def fees_of(order: Mapping[str, Any], trades: list[Any] | None = None) -> tuple[Decimal, str] | None:
    """Fee and asset of an order, from its own fee entries or from its trades; None if unknown."""
    entries = list(order.get("fees") or ([] if order.get("fee") is None else [order["fee"]]))
    if entries:
        return _fees(entries)
    if trades:
        return _fees([trade.get("fee") for trade in trades if isinstance(trade, Mapping)])
    return None


def unfilled_code(status: str) -> str:
    """The code of an order that filled nothing: ``ORDER_<its status at the exchange>`` (``ORDER_UNKNOWN``).

    ``Reason`` lists those of ccxt's statuses; one it does not know keeps its own name.
    """
    return f"ORDER_{status.upper() or 'UNKNOWN'}"


def filled_and_average(order: Mapping[str, Any]) -> tuple[Decimal, Decimal | None]:
    """How much a ccxt order filled and at what average price, exact from Binance's own figures
    (executed quantity, cumulative quote) where it gives them, else ccxt's."""
    info = order.get("info") or {}
    filled = to_decimal(info.get("executedQty")) if isinstance(info, Mapping) else None
    quote = to_decimal(info.get("cummulativeQuoteQty")) if isinstance(info, Mapping) else None
    if filled is None:
        filled = to_decimal(order.get("filled")) or Decimal(0)
    average = (quote / filled).normalize() if quote is not None and filled > 0 else to_decimal(order.get("average"))
    return filled, average


def outcome_from_order(
    client_order_id: str,
    order: Mapping[str, Any],
    requested: Decimal,
    fee: tuple[Decimal, str] | None,
) -> OrderOutcome:
    """The outcome of a final (or given-up-on) ccxt order structure."""
    filled, average = filled_and_average(order)
    amount = to_decimal(order.get("amount")) or requested
    status = str(order.get("status") or "")
    fee_value, fee_asset = fee if fee is not None else (Decimal(0), "")
    order_id = str(order.get("id") or "")
    if filled <= 0:
        return OrderOutcome(
            client_order_id,
            "REJECTED",
            reason=unfilled_code(status),
            detail=f"nothing filled; exchange order {order_id} is {status or 'unknown'}",
            exchange_order_id=order_id,
        )
    reason, detail = "", ""
    if filled < amount:
        rest = "still open" if status == "open" else status
        reason = Reason.PARTIAL_FILL
        detail = f"filled {filled.normalize():f} of {amount.normalize():f}; the rest is {rest}"
    return OrderOutcome(
        client_order_id,
        "FILLED",
        reason=reason,
        detail=detail,
        filled_qty=filled.normalize(),
        avg_price=average,
        fee=fee_value.normalize(),
        fee_asset=fee_asset,
        exchange_order_id=order_id,
    )
