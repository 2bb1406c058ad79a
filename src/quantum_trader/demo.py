"""The demo's decision source: a seeded random walk of prices and decisions on it.

It publishes prices where the paper exchange reads them and decisions on the
decision stream, with a few retries (the same decision published twice) and a few
malformed decisions mixed in, so every outcome path shows up.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.events import DECISION, Fields, envelope

START_PRICES = {"BTCUSDT": 60_000.0, "ETHUSDT": 3_000.0, "SOLUSDT": 150.0}


@dataclass
class DecisionGenerator:
    """Seeded, so two demos with the same seed publish the same decisions."""

    redis: Redis
    stream: str
    seed: int = 7
    notional: float = 200.0
    duplicate_every: int = 25
    invalid_every: int = 40
    published: int = 0
    distinct: int = 0
    prices: dict[str, float] = field(default_factory=lambda: dict(START_PRICES))

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _step_prices(self) -> None:
        for symbol, price in self.prices.items():
            self.prices[symbol] = max(price * (1 + self.rng.gauss(0, 0.002)), 0.01)

    def _decision(self, n: int) -> Fields:
        symbol = self.rng.choice(sorted(self.prices))
        price = Decimal(f"{self.prices[symbol]:.2f}")
        qty = (Decimal(str(self.notional)) / price).quantize(Decimal("0.00001"))
        payload: dict[str, object] = {
            "symbol": symbol,
            "side": self.rng.choice(["BUY", "SELL"]),
            "qty": str(qty),
            "price": str(price),
            "confidence": round(self.rng.uniform(0.5, 1.0), 3),
            "strategy": "demo-random-walk",
        }
        if self.invalid_every and n % self.invalid_every == self.invalid_every - 1:
            payload["qty"] = "-1"  # malformed on purpose: the router rejects it as INVALID
        return envelope(
            DECISION,
            payload,
            trace_id=uuid.uuid4().hex,
            correlation_id=f"demo-{self.seed}-{n}",
            source="demo",
        )

    async def publish_batch(self, count: int) -> None:
        """Move prices one step and publish ``count`` decisions (plus retries of some)."""
        self._step_prices()
        await self.redis.hset(keys.PRICE_HASH, mapping={s: f"{p:.2f}" for s, p in self.prices.items()})
        batch: list[Fields] = []
        for _ in range(count):
            fields = self._decision(self.distinct)
            self.distinct += 1
            batch.append(fields)
            if self.duplicate_every and self.distinct % self.duplicate_every == 0:
                batch.append(dict(fields))  # a retry: same decision, new stream id
        await publish(self.redis, self.stream, batch)
        self.published += len(batch)

    async def run(self, total: int, rate: float, stop: asyncio.Event) -> None:
        """Publish ``total`` distinct decisions at about ``rate`` per second."""
        tick = 0.1
        per_tick = max(1, int(rate * tick))
        while self.distinct < total and not stop.is_set():
            await self.publish_batch(min(per_tick, total - self.distinct))
            await asyncio.sleep(tick)
