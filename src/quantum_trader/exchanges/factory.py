"""The exchange adapter the settings select: paper by default, any ccxt exchange otherwise."""

from __future__ import annotations

from quantum_trader.bus.connection import Redis
from quantum_trader.exchanges.base import Exchange
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.settings import Settings


async def build_exchange(redis: Redis, settings: Settings) -> Exchange:
    """The adapter the settings select (paper by default)."""
    if settings.exchange == "paper":
        paper = PaperExchange(
            redis,
            fee_rate=settings.paper_fee_rate,
            slippage_bps=settings.paper_slippage_bps,
            quote_assets=settings.quote_assets,
            starting_balances=settings.paper_balances,
        )
        await paper.fund()
        return paper
    # Imported here: ccxt takes a second to import and the paper exchange does not need it.
    from quantum_trader.exchanges.ccxt import CcxtExchange

    exchange = CcxtExchange.from_settings(redis, settings)
    try:
        await exchange.start()
    except BaseException:
        await exchange.close()
        raise
    return exchange
