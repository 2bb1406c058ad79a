"""The account as reconciliation reads it: every order of some markets, open or recent.

Orders, not trades: an order carries its client order id (a trade on Binance does not), which
is what tells the pipeline's orders from manual ones, and its filled quantity and average
price are what a result records. Fees are left to the balances, which include them.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import ccxt  # type: ignore[import-untyped]

from quantum_trader.errors import ExchangeError
from quantum_trader.exchanges.base import ExchangeOrder
from quantum_trader.exchanges.ccxt.connection import CcxtConnection
from quantum_trader.exchanges.ccxt.markets import to_decimal
from quantum_trader.exchanges.ccxt.orders import filled_and_average
from quantum_trader.logs import get_logger

log = get_logger("exchange")

# Orders asked per request (Binance's allOrders caps it at 1000); more are fetched page by page.
PAGE = 1000
# A market with more orders than this in the window is cut short, with a warning in the log.
MAX_PAGES = 20


def order_of(order: Mapping[str, Any], market_id: str) -> ExchangeOrder:
    """A ccxt order structure as an ``ExchangeOrder`` (exact average from Binance's own figures)."""
    filled, average = filled_and_average(order)
    return ExchangeOrder(
        symbol=market_id,
        client_order_id=str(order.get("clientOrderId") or ""),
        exchange_order_id=str(order.get("id") or ""),
        side=str(order.get("side") or "").upper(),
        amount=(to_decimal(order.get("amount")) or Decimal(0)).normalize(),
        filled=filled.normalize(),
        avg_price=average,
        is_open=order.get("status") == "open",
        time_ms=int(order.get("timestamp") or 0),
    )


async def _call(conn: CcxtConnection, method: str, symbol: str, since: int | None, limit: int | None) -> list[Any]:
    """One listing request, retried; a refusal (not transient) as an ExchangeError without secrets."""
    try:
        found = await conn.call(method, lambda: getattr(conn.client, method)(symbol, since, limit))
    except ccxt.BaseError as exc:
        raise ExchangeError(f"{conn.name} {method} {symbol}: {conn.clean(exc)}") from None
    return list(found)


async def fetch_activity(conn: CcxtConnection, symbols: list[str], since_ms: int) -> list[ExchangeOrder] | None:
    """Every order of ``symbols`` placed since ``since_ms``, and every one still open (any age).

    None when ccxt cannot list an exchange's orders. Markets the exchange does not have are
    skipped. Transient errors are retried by the connection; what is left raises.
    """
    client = conn.client
    listed = client.has.get("fetchOrders")
    if not listed and not (client.has.get("fetchClosedOrders") and client.has.get("fetchOpenOrders")):
        return None
    await conn.ensure_markets()
    found: dict[str, ExchangeOrder] = {}
    for unified in sorted({u for s in symbols if (u := conn.unified(s)) is not None}):
        market_id = conn.rules[unified].market_id
        raw: list[Any] = list(await _call(conn, "fetch_open_orders", unified, None, None))
        since = since_ms
        for _page in range(MAX_PAGES):
            page = await _call(conn, "fetch_orders" if listed else "fetch_closed_orders", unified, since, PAGE)
            raw += page
            if len(page) < PAGE:
                break
            since = max(int(o.get("timestamp") or 0) for o in page) + 1
        else:
            log.warning(
                "orders_cut_short",
                exchange=conn.name,
                symbol=unified,
                listed=MAX_PAGES * PAGE,
                effect="later orders of this market are not compared; balances still are",
            )
        for order in raw:
            parsed = order_of(order, market_id)
            found[f"{market_id}:{parsed.exchange_order_id}"] = parsed
    return list(found.values())
