"""The book's arithmetic: positions, PnL and asset flows from fills (pure, exact decimals).

One implementation serves every place that needs it: execution's commit (the live position
per symbol kept in Redis, written atomically with the results), the journal (history in
SQL, recomputed from the fills it holds), the backtest report and reconciliation.

Method: **average cost**. A buy adds its quantity and its cost (quantity x price, plus the
fee when it is paid in the quote asset) to the position; a sell takes out its quantity at
the position's average cost and realises ``proceeds - cost`` (proceeds net of a quote fee).
A fee paid in the base asset changes the quantity held instead (a buy receives less, a sell
gives more). A fee in a third asset (BNB, say) is counted under that asset in ``fees`` and
in the flows, and not valued into PnL: the book does not price it.

Spot positions never go below zero. A sell of more than the book holds is refused by
``apply(..., strict=True)`` (the backtest and the tests); the live book, which must record
what the exchange did, books the part it holds and counts the rest as ``unbooked`` (sold from
holdings the book never saw, which reconciliation then reports).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal

import msgspec

from quantum_trader import keys
from quantum_trader.errors import QuantumTraderError
from quantum_trader.events import ExecutionResult
from quantum_trader.exchanges.base import split_symbol

ZERO = Decimal(0)


class PortfolioError(QuantumTraderError):
    """A fill the book refuses (a spot position would cross zero)."""


class Fill(msgspec.Struct, frozen=True, kw_only=True):
    """One execution: ``qty`` of ``base`` bought or sold at ``price`` (average), and its fee."""

    symbol: str
    base: str
    quote: str
    side: str  # BUY or SELL
    qty: Decimal
    price: Decimal
    fee: Decimal = ZERO
    fee_asset: str = ""


class Position(msgspec.Struct, frozen=True, kw_only=True):
    """What the book holds of one symbol, and what holding it has earned so far.

    ``cost`` is the quote amount the quantity held cost (average cost basis, buy fees in the
    quote asset included); ``realised`` the quote PnL of every sell; ``fees`` every fee by
    asset; ``flows`` the net change of each asset's balance the fills made (fees included),
    which reconciliation compares with the exchange; ``unbooked`` the base quantity sold
    beyond what the book held.
    """

    symbol: str
    base: str
    quote: str
    qty: Decimal = ZERO
    cost: Decimal = ZERO
    realised: Decimal = ZERO
    fees: dict[str, Decimal] = msgspec.field(default_factory=dict)
    flows: dict[str, Decimal] = msgspec.field(default_factory=dict)
    unbooked: Decimal = ZERO
    fills: int = 0
    last_price: Decimal | None = None

    @property
    def avg_price(self) -> Decimal | None:
        """Average entry price of the quantity held (None when flat)."""
        return self.cost / self.qty if self.qty > 0 else None

    def unrealised(self, price: Decimal | None = None) -> Decimal:
        """PnL of the quantity held at ``price`` (default: the last fill's price)."""
        mark = price if price is not None else self.last_price
        if self.qty == 0 or mark is None:
            return ZERO
        return self.qty * mark - self.cost

    def value(self, price: Decimal | None = None) -> Decimal:
        """Quote value of the quantity held at ``price`` (default: the last fill's price)."""
        mark = price if price is not None else self.last_price
        return self.qty * mark if mark is not None else ZERO


def _add(into: dict[str, Decimal], asset: str, amount: Decimal) -> dict[str, Decimal]:
    out = dict(into)
    total = out.get(asset, ZERO) + amount
    out[asset] = total
    return out


def empty(symbol: str, base: str, quote: str) -> Position:
    """A flat position with no history."""
    return Position(symbol=symbol, base=base, quote=quote)


def apply(position: Position, fill: Fill, *, strict: bool = True) -> Position:
    """The position after ``fill`` (see the module docstring for the method).

    ``strict``: a sell of more than is held raises ``PortfolioError``; otherwise the excess
    is counted in ``unbooked`` and the position stops at zero.
    """
    return apply_all(position, [fill], strict=strict)


def apply_all(
    position: Position, fills: Iterable[Fill], *, strict: bool = True, exits: list[Decimal] | None = None
) -> Position:
    """The position after ``fills`` of its symbol, in order (``apply`` one at a time, without the copies).

    Execution books a thousand fills per batch: the figures are carried in locals and the
    position is built once at the end. ``exits``, when given, receives the PnL each sell realised.
    """
    qty, cost, realised, unbooked = position.qty, position.cost, position.realised, position.unbooked
    fees, flows = dict(position.fees), dict(position.flows)
    count, last_price = position.fills, position.last_price
    for fill in fills:
        if fill.qty <= 0 or fill.price <= 0:
            raise PortfolioError(
                f"{fill.symbol}: a fill needs a positive quantity and price, got {fill.qty} @ {fill.price}"
            )
        if fill.fee < 0:
            raise PortfolioError(f"{fill.symbol}: a fee cannot be negative, got {fill.fee} {fill.fee_asset}")
        base_fee = fill.fee if fill.fee_asset == fill.base else ZERO
        quote_fee = fill.fee if fill.fee_asset == fill.quote else ZERO
        notional = fill.qty * fill.price
        if fill.fee and fill.fee_asset:
            fees[fill.fee_asset] = fees.get(fill.fee_asset, ZERO) + fill.fee
            flows[fill.fee_asset] = flows.get(fill.fee_asset, ZERO) - fill.fee
        if fill.side == "BUY":
            flows[fill.base] = flows.get(fill.base, ZERO) + fill.qty
            flows[fill.quote] = flows.get(fill.quote, ZERO) - notional
            held = qty + fill.qty - base_fee
            if held < 0 and strict:
                raise PortfolioError(
                    f"{fill.symbol}: a fee of {base_fee} {fill.base} on a buy of {fill.qty} leaves {held}: "
                    "a spot position cannot go below zero"
                )
            cost += notional + quote_fee
            if held <= 0:
                # A base fee that takes all there is leaves nothing to carry the cost: a loss at once.
                realised -= cost
                cost = ZERO
                unbooked -= held
                held = ZERO
            qty = held
        elif fill.side == "SELL":
            leaving = fill.qty + base_fee  # a base fee on a sell leaves the account with the sold quantity
            flows[fill.base] = flows.get(fill.base, ZERO) - fill.qty
            flows[fill.quote] = flows.get(fill.quote, ZERO) + notional
            if leaving > qty and strict:
                raise PortfolioError(
                    f"{fill.symbol}: selling {leaving} {fill.base} but the book holds {qty}: "
                    "a spot position cannot go below zero"
                )
            booked = min(leaving, qty)
            basis = cost if booked == qty else cost * booked / qty
            # Proceeds of the booked share only: what was sold from unseen holdings has no known cost.
            gain = (notional - quote_fee) * booked / leaving - basis
            realised += gain
            if exits is not None:
                exits.append(gain)
            unbooked += leaving - booked
            qty -= booked
            cost = cost - basis if qty else ZERO
        else:
            raise PortfolioError(f"{fill.symbol}: side must be BUY or SELL, got {fill.side!r}")
        count += 1
        last_price = fill.price
    return Position(
        symbol=position.symbol,
        base=position.base,
        quote=position.quote,
        qty=qty,
        cost=cost,
        realised=realised,
        fees=fees,
        flows=flows,
        unbooked=unbooked,
        fills=count,
        last_price=last_price,
    )


def replay(
    fills: Iterable[Fill], *, strict: bool = True, start: Mapping[str, Position] | None = None
) -> dict[str, Position]:
    """Positions per symbol after ``fills`` in order, from ``start`` (default: flat)."""
    by_symbol: dict[str, list[Fill]] = {}
    for fill in fills:
        by_symbol.setdefault(fill.symbol, []).append(fill)
    book = dict(start or {})
    for symbol, runs in by_symbol.items():
        first = runs[0]
        book[symbol] = apply_all(book.get(symbol) or empty(symbol, first.base, first.quote), runs, strict=strict)
    return book


def fill_of(result: ExecutionResult, quote_assets: Sequence[str]) -> Fill | None:
    """The fill an execution result reports (any status with a filled quantity and a price), or None."""
    if result.filled_qty <= 0 or result.avg_price is None or result.avg_price <= 0:
        return None
    try:
        base, quote = split_symbol(result.symbol, list(quote_assets))
    except ValueError:
        base, quote = result.symbol, ""
    return Fill(
        symbol=result.symbol,
        base=base,
        quote=quote,
        side=result.side,
        qty=result.filled_qty,
        price=result.avg_price,
        fee=result.fee,
        fee_asset=result.fee_asset,
    )


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Book-wide figures, in each quote asset (a book trading against USDT and BTC has two)."""

    realised: dict[str, Decimal]
    unrealised: dict[str, Decimal]
    fees: dict[str, Decimal]
    exposure: dict[str, Decimal]  # quote value of what is held


def totals(book: Mapping[str, Position], prices: Mapping[str, Decimal] | None = None) -> Totals:
    """Realised and unrealised PnL, fees and exposure across the book, by quote asset."""
    prices = prices or {}
    realised: dict[str, Decimal] = {}
    unrealised: dict[str, Decimal] = {}
    fees: dict[str, Decimal] = {}
    exposure: dict[str, Decimal] = {}
    for symbol, position in sorted(book.items()):
        mark = prices.get(symbol)
        realised = _add(realised, position.quote, position.realised)
        unrealised = _add(unrealised, position.quote, position.unrealised(mark))
        exposure = _add(exposure, position.quote, position.value(mark))
        for asset, amount in position.fees.items():
            fees = _add(fees, asset, amount)
    return Totals(realised=realised, unrealised=unrealised, fees=fees, exposure=exposure)


def asset_flows(book: Mapping[str, Position]) -> dict[str, Decimal]:
    """Net change of each asset's balance that the book's fills made (what the exchange should show)."""
    out: dict[str, Decimal] = {}
    for position in book.values():
        for asset, amount in position.flows.items():
            out = _add(out, asset, amount)
    return out


_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder = msgspec.json.Decoder(Position)


def encode(position: Position) -> str:
    """A position as JSON (decimals as strings), the form kept in Redis and SQL."""
    return _encoder.encode(position).decode()


def decode(text: str | bytes) -> Position:
    """A position read back from ``encode``; raises ``PortfolioError`` when it is not one."""
    try:
        position = _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise PortfolioError(f"a stored position does not decode: {exc}") from None
    # A record this module wrote always holds these; anything else was written by someone else.
    amounts = [position.qty, position.cost, position.realised, position.unbooked]
    amounts += [*position.fees.values(), *position.flows.values()]
    if not all(amount.is_finite() for amount in amounts):
        raise PortfolioError("a stored position holds an amount that is not a finite number")
    if position.qty < 0 or position.cost < 0 or position.unbooked < 0 or position.fills < 0:
        raise PortfolioError(
            f"a stored position holds a negative quantity, cost, unbooked amount or count (qty {position.qty})"
        )
    if position.qty == 0 and position.cost != 0:
        raise PortfolioError(f"a stored position holds a cost of {position.cost} for a quantity of zero")
    return position


def decode_stored(symbol: str, text: str | bytes) -> Position:
    """The book's position of ``symbol`` as Redis keeps it; a ``PortfolioError`` saying how to repair it."""
    try:
        return decode(text)
    except PortfolioError as exc:
        raise PortfolioError(
            f"{exc}: the position of {symbol} in {keys.BOOK_POSITIONS} is damaged; delete it "
            f"(HDEL {keys.BOOK_POSITIONS} {symbol}) and run quantum-trader reconcile"
        ) from None
