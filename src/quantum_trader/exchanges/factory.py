"""The exchange adapter the settings select: paper by default, any ccxt exchange otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantum_trader.bus.connection import Redis
from quantum_trader.exchanges.base import Exchange
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.settings import Settings

if TYPE_CHECKING:
    from quantum_trader.exchanges.ccxt.client import OnAuthFailure


async def build_exchange(redis: Redis, settings: Settings, *, on_auth_failure: OnAuthFailure | None = None) -> Exchange:
    """The adapter the settings select (paper by default), started.

    A real exchange needs ``on_auth_failure``: what halts trading when the exchange refuses the
    credentials (the runner turns the kill switch on). The paper exchange has no credentials.
    """
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
    if on_auth_failure is None:
        # Fail-closed: a real exchange is never built without a way to halt trading.
        raise TypeError(f"build_exchange: QT_EXCHANGE={settings.exchange} needs on_auth_failure (halts trading)")
    # Imported here: ccxt takes a second to import and the paper exchange does not need it.
    from quantum_trader.exchanges.ccxt import CcxtExchange

    exchange = CcxtExchange.from_settings(redis, settings, on_auth_failure=on_auth_failure)
    try:
        await exchange.start()
    except BaseException:
        await exchange.close()
        raise
    return exchange
