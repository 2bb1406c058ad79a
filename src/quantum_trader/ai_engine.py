"""The AI engine: candles in, trade decisions out, in the pipeline's contract.

It consumes the candle stream in its own group, keeps each symbol's recent closes,
runs the configured strategies once their warm-up is met, sizes each signal (a
fixed quote notional, or a fraction of the paper quote balance) and publishes the
decisions and acknowledges the candles in one MULTI/EXEC. A decision's trace id is
derived from the candle entry and the strategy, so a redelivered candle produces the
same decision again, which the router then skips as a duplicate.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal

import numpy as np

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import Entry, GroupConsumer
from quantum_trader.errors import ConfigError, DecodeError
from quantum_trader.events import DECISION, Fields, decode_event, envelope, now_iso
from quantum_trader.exchanges.base import split_symbol
from quantum_trader.logs import get_logger
from quantum_trader.marketdata import MARKET_CANDLE, Candle, clean, gap
from quantum_trader.settings import Settings
from quantum_trader.strategies import BUILT_IN, Signal, Strategy

log = get_logger("ai_engine")
_QTY_STEP = Decimal("0.000001")


def build_strategies(settings: Settings) -> list[Strategy]:
    """The strategies the settings name (``learned`` needs QT_AI_MODEL_PATH)."""
    out: list[Strategy] = []
    for name in settings.ai_strategies:
        if name == "learned":
            from quantum_trader.strategies.learned import LearnedModel, load  # scikit-learn: only when used

            if settings.ai_model_path is None:
                raise ConfigError("QT_AI_STRATEGIES includes 'learned' but QT_AI_MODEL_PATH is not set")
            out.append(LearnedModel(load(settings.ai_model_path), threshold=settings.ai_model_threshold))
        elif name in BUILT_IN:
            out.append(BUILT_IN[name]())
        else:
            raise ConfigError(
                f"QT_AI_STRATEGIES: unknown strategy {name!r}; choose from {', '.join([*BUILT_IN, 'learned'])}"
            )
    return out


def size(close: float, quote_balance: Decimal | None, settings: Settings) -> Decimal:
    """Quantity for one decision: fixed quote notional, or a fraction of the quote balance."""
    notional = settings.ai_notional
    if settings.ai_sizing == "fraction" and quote_balance is not None:
        notional = quote_balance * settings.ai_fraction
    return (notional / Decimal(repr(close))).quantize(_QTY_STEP, rounding=ROUND_DOWN)


def trace_id(candle_entry: str, strategy: str, symbol: str) -> str:
    """Deterministic per (candle, strategy): a replayed candle yields the same decision."""
    return hashlib.blake2b(f"{candle_entry}|{strategy}|{symbol}".encode(), digest_size=16).hexdigest()


class AiEngine:
    """The AI engine stage."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        strategies: list[Strategy] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.strategies = strategies if strategies is not None else build_strategies(settings)
        self.clock = clock or (lambda: datetime.now(UTC))
        # Stable across restarts (the consumer name), so a replayed candle repeats the same identity.
        self.run_id = settings.consumer_name("ai-engine")
        self.history: dict[str, deque[float]] = {}
        self.last_time: dict[str, int] = {}
        self.previous: dict[str, int] = {}
        self.consumer = GroupConsumer.for_stage(redis, settings, "ai-engine", settings.candle_stream, settings.ai_group)
        self.consumer.depth = 1  # candles feed each symbol's history in order: one batch at a time
        self.totals: dict[str, int] = {"candles": 0, "decisions": 0, "skipped": 0}

    def signals(self, candles: list[tuple[str, Candle]]) -> list[tuple[str, Candle, Strategy, Signal]]:
        """Feed candles into the per-symbol history and collect every strategy's signal (pure)."""
        out = []
        for entry_id, candle in candles:
            closes = self.history.setdefault(candle.symbol, deque(maxlen=self.settings.ai_history))
            previous = self.previous.get(candle.symbol)
            if previous is not None and gap(previous, candle):
                # Indicators across a hole would mix two markets: warm up again from here.
                log.warning("candle_gap", symbol=candle.symbol, after_open_time=previous,
                            open_time=candle.open_time, action="history reset, warm-up again")  # fmt: skip
                closes.clear()
            self.previous[candle.symbol] = candle.open_time
            closes.append(candle.close)
            array = np.fromiter(closes, dtype=np.float64, count=len(closes))
            for strategy in self.strategies:
                if len(array) < strategy.warmup:
                    continue
                signal = strategy.decide(array)
                if signal is not None and signal.confidence >= self.settings.ai_min_confidence:
                    out.append((entry_id, candle, strategy, signal))
        return out

    async def handle(self, entries: list[Entry]) -> None:
        """Decide on a batch of candles; publish decisions and ack candles atomically."""
        decoded: list[tuple[str, Candle]] = []
        for entry in entries:
            try:
                _env, candle = decode_event(entry.fields, Candle, MARKET_CANDLE)
            except DecodeError as exc:
                await self.consumer.dead_letter([entry], f"undecodable candle: {exc.reason}", exc.field)
                continue
            decoded.append((entry.id, candle))
        kept, skipped = clean([c for _id, c in decoded], self.last_time)
        kept_ids = {id(c) for c in kept}
        fresh = [(entry_id, c) for entry_id, c in decoded if id(c) in kept_ids]
        found = self.signals(fresh)
        balance = None
        if self.settings.ai_sizing == "fraction" and found:
            raw = await self.redis.hgetall(keys.paper_balances())
            balance = {asset: Decimal(value) for asset, value in raw.items()}
        stamp = now_iso(self.clock())
        decisions: list[Fields] = []
        for entry_id, candle, strategy, signal in found:
            quote = split_symbol(candle.symbol, self.settings.quote_assets)[1] if balance is not None else ""
            qty = size(candle.close, balance.get(quote) if balance is not None else None, self.settings)
            if qty <= 0:
                continue
            payload = {
                "symbol": candle.symbol,
                "side": signal.side,
                "qty": str(qty),
                "price": repr(candle.close),
                "confidence": round(float(signal.confidence), 4),
                "strategy": strategy.name,
                "model_version": strategy.version,
            }
            decisions.append(
                envelope(
                    DECISION,
                    payload,
                    trace_id=trace_id(entry_id, strategy.name, candle.symbol),
                    correlation_id=f"{strategy.name}:{candle.symbol}:{self.run_id}",
                    source="ai-engine",
                    timestamp=stamp,
                )
            )
        async with self.redis.pipeline(transaction=True) as pipe:
            for fields in decisions:
                pipe.xadd(self.settings.decision_stream, fields)
            pipe.xack(self.settings.candle_stream, self.settings.ai_group, *[entry.id for entry in entries])
            await pipe.execute()
        self.totals["candles"] += len(fresh)
        self.totals["decisions"] += len(decisions)
        self.totals["skipped"] += len(skipped)
