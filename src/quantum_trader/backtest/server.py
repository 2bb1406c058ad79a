"""The backtest through a private server (``--through-server``): each candle published, each stage draining it.

A private Valkey in a temporary directory (a fresh namespace: live keys are never touched) runs
the same stage classes as production. The clock is simulated: each candle is published, then
the engine, the protect stage, the router and execution each handle what is waiting, with "now"
at the candle's open time, before the next candle. Slow (a few hundred candles a second): it
exists to prove that the in-process transport (``inprocess``) decides exactly what the stages
decide on a server.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from quantum_trader import keys
from quantum_trader.ai_engine import AiEngine
from quantum_trader.backtest.inprocess import Inject
from quantum_trader.backtest.streams import Streams, decided
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.embedded import EmbeddedValkey, free_port
from quantum_trader.bus.streams import GroupConsumer
from quantum_trader.events import Candle
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.execution import Execution
from quantum_trader.feed import publish
from quantum_trader.marketdata import GapRule
from quantum_trader.protect import Protect
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from quantum_trader.strategies import Strategy


async def _drain(consumer: GroupConsumer, handle: Callable[[list[Any]], Any]) -> None:
    while batch := await consumer.read_new(wait=False):
        await handle(batch)
        if len(batch) < consumer.count:
            return  # nothing else writes to the private server: a short batch was the rest


async def replay(
    candles: Sequence[Candle],
    strategies: list[Strategy],
    settings: Settings,
    gap: GapRule,
    *,
    script: Mapping[int, Inject] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Streams:
    """Publish each candle (and what ``script`` adds at it) and drain every stage; what the streams hold."""
    now = {"t": datetime.fromtimestamp(candles[0].open_time / 1000, UTC)}
    clock = lambda: now["t"]  # noqa: E731  (the simulated clock every stage shares)

    async def advance(seconds: float) -> None:
        """Execution waiting for the order rate: simulated time passes, nothing sleeps."""
        now["t"] += timedelta(seconds=seconds)

    with tempfile.TemporaryDirectory(prefix="qt-backtest-") as tmp:
        server = EmbeddedValkey(Path(tmp), port=free_port(), appendfsync="no")
        server.start()
        redis: Redis = client(server.url)
        try:
            cfg = settings.model_copy(update={"redis_url": server.url, "data_dir": Path(tmp)})
            await redis.set(keys.KILL_SWITCH, "0")
            engine = AiEngine(redis, cfg, strategies, clock=clock, gap=gap)
            router = Router(redis, cfg, clock=clock)
            paper = await build_exchange(redis, cfg)
            execution = Execution(redis, cfg, paper, clock=clock, sleep=advance)
            protect = Protect(redis, cfg, clock=clock)
            for stage in (engine.consumer, protect.consumer, router.consumer, execution.consumer):
                await stage.setup()
            for index, candle in enumerate(candles):
                now["t"] = datetime.fromtimestamp(candle.open_time / 1000, UTC)
                await publish(redis, cfg.candle_stream, [candle])
                inject = script.get(index) if script else None
                if inject is not None:
                    if inject.kill is not None:
                        await redis.set(keys.KILL_SWITCH, inject.kill)
                    for fields in inject.decisions:
                        await redis.xadd(cfg.decision_stream, dict(fields))
                decided = engine.totals["decisions"] + protect.totals["exits"]
                await _drain(engine.consumer, engine.handle)
                await _drain(protect.consumer, protect.handle)
                if engine.totals["decisions"] + protect.totals["exits"] > decided or (inject and inject.decisions):
                    await _drain(router.consumer, router.handle)
                    await _drain(execution.consumer, execution.handle)
                if progress is not None:
                    progress(index + 1)
            return await _streams(redis, cfg)
        finally:
            await redis.aclose()
            server.stop()


async def _streams(redis: Redis, settings: Settings) -> Streams:
    balances = await redis.hgetall(keys.paper_balances())
    return Streams(
        decided=decided((i, f["payload"]) for i, f in await redis.xrange(settings.intent_stream)),
        results=list(await redis.xrange(settings.result_stream)),
        rejected=list(await redis.xrange(settings.rejected_stream)),
        states=[fields for _id, fields in await redis.xrange(settings.streams.risk_state)],
        book=dict(await redis.hgetall(keys.BOOK_POSITIONS)),
        balances={asset: Decimal(value) for asset, value in balances.items()},
        stops={
            symbol: json.dumps(json.loads(raw), sort_keys=True)
            for symbol, raw in (await redis.hgetall(keys.PROTECT_STOPS)).items()
        },
        dead=int(await redis.xlen(settings.dead_letter_stream)),
    )
