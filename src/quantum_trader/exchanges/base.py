"""The interface every exchange adapter implements, and the data it exchanges.

Placement is idempotent by client order id: ``place_orders`` must return the
existing order instead of placing a second one, and ``fetch_orders`` must find an
order the exchange already has. Execution relies on both after a crash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Literal, Protocol

OrderStatus = Literal["FILLED", "REJECTED", "FAILED"]


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """One order to place. ``price`` is the limit price; ``reference_price`` the decision's hint."""

    client_order_id: str
    symbol: str
    side: Literal["BUY", "SELL"]
    qty: Decimal
    order_type: Literal["MARKET", "LIMIT"] = "MARKET"
    price: Decimal | None = None
    reference_price: Decimal | None = None


@dataclass(frozen=True, slots=True)
class OrderOutcome:
    """What the exchange did with one order."""

    client_order_id: str
    status: OrderStatus
    reason: str = ""
    filled_qty: Decimal = Decimal(0)
    avg_price: Decimal | None = None
    fee: Decimal = Decimal(0)
    fee_asset: str = ""
    exchange_order_id: str = ""


class Exchange(Protocol):
    """An exchange adapter (paper, or ccxt for testnet and live)."""

    name: str

    async def last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        """Latest known price per symbol; symbols without one are absent."""
        ...

    async def fetch_orders(self, client_order_ids: list[str]) -> dict[str, OrderOutcome]:
        """Orders the exchange already has, by client order id; unknown ids are absent."""
        ...

    async def place_orders(self, orders: list[OrderRequest]) -> list[OrderOutcome]:
        """Place each order once; an id the exchange already has returns that order."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def client_order_id(intent_id: str, trace_id: str, correlation_id: str) -> str:
    """Deterministic id of the one order an intent may place (<= 36 chars, Binance's limit)."""
    digest = hashlib.blake2b(f"{intent_id}|{trace_id}|{correlation_id}".encode(), digest_size=16).hexdigest()
    return f"qt-{digest}"[:36]


def split_symbol(symbol: str, quote_assets: list[str]) -> tuple[str, str]:
    """``ETHUSDT`` or ``ETH/USDT`` -> (``ETH``, ``USDT``), the quote one of ``quote_assets``.

    A market has a base and a quote that are distinct, non-empty ASCII capitals and digits;
    anything else (``USDTUSDT``, ``/USDT``, ``ETH:USDT``, ``eth-usdt``, non-ASCII look-alikes)
    raises ValueError saying what is wrong.
    """
    return _split(symbol, tuple(quote_assets))


_ASSET = re.compile(r"[A-Z0-9]{1,20}\Z")


@lru_cache(maxsize=4096)
def _split(symbol: str, quote_assets: tuple[str, ...]) -> tuple[str, str]:
    if "/" in symbol:
        base, _, quote = symbol.partition("/")
    else:
        base = quote = ""
        for known in sorted(quote_assets, key=len, reverse=True):
            if symbol.endswith(known) and len(symbol) > len(known):
                base, quote = symbol[: -len(known)], known
                break
    if not _ASSET.match(base) or not _ASSET.match(quote):
        raise ValueError(
            f"symbol {symbol!r} is not BASEQUOTE or BASE/QUOTE with ASCII capitals and digits "
            f"and a quote asset of QT_QUOTE_ASSETS ({', '.join(quote_assets)})"
        )
    if quote not in quote_assets:
        raise ValueError(
            f"symbol {symbol!r}: quote asset {quote} is not in QT_QUOTE_ASSETS ({', '.join(quote_assets)})"
        )
    if base == quote:
        raise ValueError(f"symbol {symbol!r}: base and quote are the same asset")
    return base, quote
