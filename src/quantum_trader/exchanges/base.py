"""The interface every exchange adapter implements, and the data it exchanges.

Placement is idempotent by client order id: ``place_orders`` must return the
existing order instead of placing a second one, and ``fetch_orders`` must find an
order the exchange already has. Execution relies on both after a crash.

Placement also honours ``SendGuard``s (the kill switch, the trading state, the lease of the
batch's partition): they are read right before each order leaves, so an operator's halt stops
orders already approved by the governor, and a process that lost its partition sends nothing.

Reconciliation reads the account through the same interface: ``balances`` (total per asset)
and ``fetch_activity`` (the orders of some symbols, open or recent, each with its client order
id, so the pipeline's own orders are told apart from manual ones by ``is_ours``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Literal, Protocol

from quantum_trader.bus.connection import Redis
from quantum_trader.events import Reason, Status


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
    """What the exchange did with one order: FILLED, REJECTED or FAILED.

    ``reason`` is a ``Reason`` code ("" for a full fill), ``detail`` what happened in words.
    (Typed ``str``: a record stored by the paper exchange is read back whatever code it holds.)
    """

    client_order_id: str
    status: Status
    reason: str = ""
    detail: str = ""
    filled_qty: Decimal = Decimal(0)
    avg_price: Decimal | None = None
    fee: Decimal = Decimal(0)
    fee_asset: str = ""
    exchange_order_id: str = ""
    sent: bool = True  # False: the order never left (stopped before sending); no exchange has it


@dataclass(frozen=True, slots=True)
class ExchangeOrder:
    """One order as the exchange lists it, for reconciliation (no fees: balances show those).

    ``symbol`` is the exchange's market id (``ETHUSDT``); ``filled`` what it executed so far at
    ``avg_price``; ``time_ms`` when it was placed (0 when the exchange does not say).
    """

    symbol: str
    client_order_id: str
    exchange_order_id: str
    side: str  # BUY or SELL
    amount: Decimal
    filled: Decimal
    avg_price: Decimal | None
    is_open: bool
    time_ms: int = 0


@dataclass(frozen=True, slots=True)
class SendGuard:
    """A switch read right before each order leaves: orders go only while ``key`` holds ``allowed``.

    ``allowed`` is one value, or a set of them (None there: the key is absent). A string key is read
    with MGET, which answers nil for a key that is not a string, so absent, another value or another
    type stops the orders. With ``field``, the key is a hash and that field is read: an absent key
    reads as None, a hash without the field as ``""``, a key of another type as ``"<type>"``. The
    paper exchange reads every guard inside its placement transaction, the keys WATCHed (a flip
    before EXEC makes it read again); ccxt right before each order request goes on the wire. An
    order a guard stops is REJECTED ``reason`` and not sent (``detail`` says why, else the value
    that was expected).
    """

    key: str
    allowed: str | frozenset[str | None] = "0"
    reason: str = Reason.KILL_SWITCH
    field: str = ""
    detail: str = ""
    side: str = ""  # "BUY" or "SELL": the guard judges only orders of that side ("": every order)

    def stops(self, value: str | None) -> bool:
        """True when orders must not leave while the switch holds ``value``."""
        if isinstance(self.allowed, str):
            return value != self.allowed
        return value not in self.allowed

    def stopped(self, client_order_id: str) -> OrderOutcome:
        """The outcome of an order the switch stopped before it left."""
        return OrderOutcome(
            client_order_id,
            "REJECTED",
            reason=self.reason,
            detail=self.detail or f"not sent; {self.key} is no longer {self.allowed!r}",
            sent=False,
        )


# What ``place_orders`` takes: one guard, or several read in the same step (the first that stops an order
# names its outcome).
Guards = SendGuard | Sequence[SendGuard]


def guard_list(guard: Guards | None) -> list[SendGuard]:
    """The guards of a ``place_orders`` call, in the order they are judged."""
    if guard is None:
        return []
    return [guard] if isinstance(guard, SendGuard) else list(guard)


def first_stop(guards: Sequence[SendGuard], values: Sequence[str | None], side: str = "") -> SendGuard | None:
    """The first guard that stops an order of ``side``, given each one's value as read; None when all let it go."""
    return next(
        (g for g, value in zip(guards, values, strict=True) if (not g.side or g.side == side) and g.stops(value)), None
    )


def hash_field_value(kind: str, value: str | None) -> str | None:
    """A ``field`` guard's value from the key's TYPE and HGET (see ``SendGuard``)."""
    if kind == "none":
        return None
    if kind != "hash":
        return f"<{kind}>"
    return value or ""


async def stopping(redis: Redis, guard: Guards, side: str = "") -> SendGuard | None:
    """The first guard that stops orders now (None: all let them go), read in one round trip: MGET for a
    string key (nil for a key of another type), TYPE and HGET for a hash's field (HGET fails on a key of
    another type: its TYPE says what it is)."""
    guards = guard_list(guard)
    async with redis.pipeline(transaction=False) as pipe:
        for one in guards:
            if one.field:
                pipe.type(one.key)
                pipe.hget(one.key, one.field)
            else:
                pipe.execute_command("MGET", one.key)  # by its command: a cluster pipeline refuses the method
        replies = iter(await pipe.execute(raise_on_error=False))
    values: list[str | None] = []
    for one in guards:
        if one.field:
            kind, field = str(next(replies)), next(replies)
            values.append(hash_field_value(kind, None if isinstance(field, Exception) else field))
        else:
            values.append(next(replies)[0])
    return first_stop(guards, values, side)


class Exchange(Protocol):
    """An exchange adapter (paper, or ccxt for testnet and live).

    ``activity_unrecorded_only``: ``fetch_activity`` lists only orders whose intent has no result
    yet, so reconciliation need not read the results to find the fills they record.
    """

    name: str
    activity_unrecorded_only: bool

    async def last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        """Latest known price per symbol; symbols without one are absent."""
        ...

    async def fetch_orders(self, client_order_ids: list[str]) -> dict[str, OrderOutcome]:
        """Orders the exchange already has, by client order id; unknown ids are absent."""
        ...

    async def place_orders(self, orders: list[OrderRequest], guard: Guards | None = None) -> list[OrderOutcome]:
        """Place each order once; an id the exchange already has returns that order.

        With ``guard`` (one or several), an order is sent only if every switch allows it right before
        it leaves; otherwise its outcome is ``stopped`` of the first that does not (``sent=False``).
        """
        ...

    async def balances(self) -> dict[str, Decimal]:
        """Total balance per asset (free and locked); an asset absent holds nothing."""
        ...

    async def fetch_activity(self, symbols: list[str], since_ms: int) -> list[ExchangeOrder] | None:
        """Orders of ``symbols`` still open or placed since ``since_ms``, ours and others'.

        None when the exchange cannot list them (reconciliation then compares balances only).
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


# Every client order id the pipeline makes starts with this (``client_order_id``).
OUR_PREFIX = "qt-"


def is_ours(client_order_id: str) -> bool:
    """True for an order the pipeline placed (its deterministic client order id), False for a manual one."""
    return client_order_id.startswith(OUR_PREFIX)


def client_order_id(intent_id: str, trace_id: str, correlation_id: str) -> str:
    """Deterministic id of the one order an intent may place (<= 36 chars, Binance's limit)."""
    digest = hashlib.blake2b(f"{intent_id}|{trace_id}|{correlation_id}".encode(), digest_size=16).hexdigest()
    return f"{OUR_PREFIX}{digest}"[:36]


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
