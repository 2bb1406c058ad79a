"""A market's rules (precision and limits) and an order made to fit them before it is sent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from quantum_trader.events import Reason
from quantum_trader.exchanges.base import OrderRequest

# ccxt precision modes (ccxt.base.decimal_to_precision)
DECIMAL_PLACES, SIGNIFICANT_DIGITS, TICK_SIZE = 2, 3, 4


def unified_symbol(symbol: str, ids: Mapping[str, str]) -> str | None:
    """``ETHUSDT`` or ``ETH/USDT`` -> ccxt's ``ETH/USDT`` using the markets' id -> symbol map."""
    if symbol in ids:
        return ids[symbol]
    upper = symbol.upper()
    if upper in ids:
        return ids[upper]
    if "/" in symbol and symbol in ids.values():
        return symbol
    compact = upper.replace("/", "").replace("-", "").replace("_", "")
    return ids.get(compact)


def to_decimal(value: Any) -> Decimal | None:
    """A ccxt number (float, int or str) as an exact Decimal; None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


@dataclass(frozen=True, slots=True)
class MarketRules:
    """A market's precision and limits, as exact decimals (None = no such rule)."""

    symbol: str
    market_id: str
    base: str
    quote: str
    amount_step: Decimal | None
    price_step: Decimal | None
    min_amount: Decimal | None = None
    max_amount: Decimal | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    min_cost: Decimal | None = None

    @classmethod
    def from_ccxt(cls, market: Mapping[str, Any], precision_mode: int = TICK_SIZE) -> MarketRules:
        """Rules from a ccxt market structure."""
        precision = market.get("precision") or {}
        limits = market.get("limits") or {}

        def step(value: Any) -> Decimal | None:
            number = to_decimal(value)
            if number is None or number <= 0:
                return None
            if precision_mode == DECIMAL_PLACES:
                return Decimal(1).scaleb(-int(number))
            if precision_mode == SIGNIFICANT_DIGITS:
                return None  # no fixed step; ccxt rounds such markets itself
            return number

        def limit(group: str, bound: str) -> Decimal | None:
            number = to_decimal((limits.get(group) or {}).get(bound))
            return number if number is not None and number > 0 else None

        return cls(
            symbol=str(market["symbol"]),
            market_id=str(market["id"]),
            base=str(market.get("base", "")),
            quote=str(market.get("quote", "")),
            amount_step=step(precision.get("amount")),
            price_step=step(precision.get("price")),
            min_amount=limit("amount", "min"),
            max_amount=limit("amount", "max"),
            min_price=limit("price", "min"),
            max_price=limit("price", "max"),
            min_cost=limit("cost", "min"),
        )


@dataclass(frozen=True, slots=True)
class Prepared:
    """An order rounded to the market's steps and within its limits: ready to send."""

    amount: Decimal
    price: Decimal | None


@dataclass(frozen=True, slots=True)
class Refused:
    """An order that breaks a rule of its market: the rule's code and what is wrong, in words."""

    code: Reason
    detail: str


def round_to_step(value: Decimal, step: Decimal | None, rounding: str) -> Decimal:
    """``value`` on the grid of ``step`` (unchanged when there is no step)."""
    if step is None:
        return value
    return (value / step).to_integral_value(rounding=rounding) * step


def prepare(order: OrderRequest, rules: MarketRules, price_hint: Decimal | None) -> Prepared | Refused:
    """Round to the market's precision and check its limits; ``Refused`` naming the rule when violated.

    Amounts are rounded down (never trade more than asked); a LIMIT price is rounded
    towards the trader's advantage (BUY down, SELL up), so it never exceeds the limit.
    ``price_hint`` values the notional of MARKET orders.
    """
    amount = round_to_step(order.qty, rules.amount_step, ROUND_FLOOR).normalize()
    if amount <= 0 or (rules.min_amount is not None and amount < rules.min_amount):
        return Refused(
            Reason.LOT_SIZE,
            f"qty {order.qty} rounds to {amount:f} at step {rules.amount_step}; "
            f"{rules.symbol} needs at least {rules.min_amount}",
        )
    if rules.max_amount is not None and amount > rules.max_amount:
        return Refused(Reason.LOT_SIZE, f"qty {amount:f} exceeds the maximum {rules.max_amount} for {rules.symbol}")
    price: Decimal | None = None
    if order.order_type == "LIMIT":
        if order.price is None:
            return Refused(Reason.INVALID, "LIMIT order without price")
        rounding = ROUND_FLOOR if order.side == "BUY" else ROUND_CEILING
        price = round_to_step(order.price, rules.price_step, rounding).normalize()
        if price <= 0 or (rules.min_price is not None and price < rules.min_price):
            return Refused(
                Reason.PRICE_FILTER,
                f"price {order.price} rounds to {price:f}; {rules.symbol} needs at least {rules.min_price}",
            )
        if rules.max_price is not None and price > rules.max_price:
            return Refused(
                Reason.PRICE_FILTER, f"price {price:f} exceeds the maximum {rules.max_price} for {rules.symbol}"
            )
    valued_at = price if price is not None else price_hint
    if rules.min_cost is not None:
        if valued_at is None:
            return Refused(Reason.NO_PRICE, f"no price for {rules.symbol}; the minimum notional cannot be checked")
        notional = amount * valued_at
        if notional < rules.min_cost:
            return Refused(
                Reason.MIN_NOTIONAL,
                f"notional {notional:f} {rules.quote} ({amount:f} x {valued_at:f}) "
                f"is below the minimum {rules.min_cost} for {rules.symbol}",
            )
    return Prepared(amount=amount, price=price)
