"""The write-ahead record in Redis of every order the adapter starts sending.

Written before an order's request leaves; an id with a record is looked up at the exchange
before it is ever sent again (after a crash, or when its intent is redelivered).
"""

from __future__ import annotations

import json
import time

from quantum_trader import keys
from quantum_trader.bus.connection import Redis

# How long a record is kept: longer than any redelivery of the intent that sent it.
SENT_TTL_S = 7 * 86_400


class SentRecords:
    """The write-ahead records of one exchange (``keys.exchange_sent``)."""

    def __init__(self, redis: Redis, exchange: str) -> None:
        self.redis = redis
        self.exchange = exchange

    async def remember(self, client_order_id: str, symbol: str) -> None:
        """From now on, this id is looked up before it is ever sent again."""
        record = json.dumps({"symbol": symbol, "at": time.time()})
        await self.redis.set(keys.exchange_sent(self.exchange, client_order_id), record, ex=SENT_TTL_S)

    async def symbols(self, client_order_ids: list[str]) -> dict[str, str]:
        """Symbol of every id of ``client_order_ids`` the adapter has started sending."""
        if not client_order_ids:
            return {}
        raw = await self.redis.mget([keys.exchange_sent(self.exchange, coid) for coid in client_order_ids])
        return {
            coid: str(json.loads(value)["symbol"])
            for coid, value in zip(client_order_ids, raw, strict=True)
            if value is not None
        }
