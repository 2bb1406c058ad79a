"""The live book in Redis: positions as execution's commit leaves them, marked at the last prices.

Positions per symbol live in ``quantum:book:positions`` (``portfolio.Position`` as JSON), written
only by ``commit.lua`` together with the results; this module reads them for people (``positions``,
``balance``, the demo) and resets a paper account (``paper reset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from quantum_trader import keys, portfolio
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError
from quantum_trader.keys import StreamNames
from quantum_trader.portfolio import PortfolioError, Position


@dataclass(frozen=True, slots=True)
class Marked:
    """One position with the price it is marked at (the market's last price, else its last fill's)."""

    position: Position
    mark: Decimal | None

    def as_dict(self) -> dict[str, Any]:
        """Exact decimals as strings, for ``--json``."""
        p = self.position
        avg = p.avg_price
        return {
            "symbol": p.symbol,
            "base": p.base,
            "quote": p.quote,
            "qty": str(p.qty),
            "avg_price": None if avg is None else str(avg),
            "cost": str(p.cost),
            "mark": None if self.mark is None else str(self.mark),
            "value": str(p.value(self.mark)),
            "unrealised": str(p.unrealised(self.mark)),
            "realised": str(p.realised),
            "fees": {asset: str(amount) for asset, amount in sorted(p.fees.items())},
            "unbooked": str(p.unbooked),
            "fills": p.fills,
        }


async def read_positions(redis: Redis) -> dict[str, Position]:
    """Every position the book holds, by symbol; an unreadable one is a ``ConfigError`` with the fix."""
    out = {}
    for symbol, raw in sorted((await redis.hgetall(keys.BOOK_POSITIONS)).items()):
        try:
            out[symbol] = portfolio.decode_stored(symbol, raw)
        except PortfolioError as exc:
            raise ConfigError(str(exc)) from None
    return out


async def marked_positions(redis: Redis) -> list[Marked]:
    """The book's positions, each marked at the market's last price when the feed has one."""
    book = await read_positions(redis)
    if not book:
        return []
    prices = await redis.hmget(keys.PRICE_HASH, list(book))
    return [
        Marked(position, Decimal(price) if price is not None else position.last_price)
        for position, price in zip(book.values(), prices, strict=True)
    ]


def marks(marked: list[Marked]) -> dict[str, Decimal]:
    """Symbol -> the price each position is marked at (those that have one)."""
    return {m.position.symbol: m.mark for m in marked if m.mark is not None}


# What a paper reset deletes besides the orders: the account, the book and its reconciliation.
_PAPER_STATE = (
    keys.paper_balances(),
    keys.paper_version(),
    keys.paper_unfinished(),
    keys.BOOK_POSITIONS,
    keys.BOOK_BASELINE,
    keys.AI_POSITIONS,  # the engine's strategies hold nothing either after a reset
    # What the risk rules knew of the old account: its positions' stops, its peak, its losing exits.
    # (The trading state and today's realised PnL stay: a reset is no way around a loss limit.)
    keys.PROTECT_STOPS,
    keys.RISK_PEAK,
    keys.RISK_LOSSES,
    keys.RISK_INFLIGHT,
)


async def paper_reset(redis: Redis, balances: dict[str, Decimal], streams: StreamNames) -> int:
    """Empty the paper account and the book, then fund the account with ``balances``; the orders deleted.

    The journal's groups start again at the end of their streams (pending entries dropped): what
    the old account did is never journaled into the new one. The caller makes sure no execution
    or journal runs (their writes would land half in the old account, half in the new) and wipes
    the journal's database.
    """
    orders = [name async for name in redis.scan_iter(match=keys.paper_order_pattern(), count=1000)]
    async with redis.pipeline(transaction=True) as pipe:
        for stream in streams.journaled():
            # Only a group that exists: creating one for a journal never deployed would hold every
            # outcome from now on (retention keeps what a group has not acknowledged).
            if await redis.exists(stream) and any(
                group["name"] == streams.journal_group for group in await redis.xinfo_groups(stream)
            ):
                pipe.xgroup_destroy(stream, streams.journal_group)
                pipe.xgroup_create(stream, streams.journal_group, id="$")
        pipe.delete(*_PAPER_STATE, keys.BOOK_RECONCILED, *orders)
        pipe.incr(keys.RISK_EPOCH)  # the rules' snapshots taken before are stale
        if balances:
            pipe.hset(keys.paper_balances(), mapping={asset: str(amount) for asset, amount in balances.items()})
            # The book starts from the funded account: reconciliation expects these plus the fills.
            pipe.hset(keys.BOOK_BASELINE, mapping={asset: str(amount) for asset, amount in balances.items()})
        await pipe.execute()
    return len(orders)
