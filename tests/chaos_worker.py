"""One pipeline stage as a process, for the crash tests.

``python tests/chaos_worker.py router|execution`` runs the real stage exactly as the
CLI does. ``execution-ack-first`` runs a deliberately broken execution that
acknowledges intents before placing their orders: the crash tests must catch it.
"""

from __future__ import annotations

import asyncio
import sys

from quantum_trader import runner
from quantum_trader.bus.connection import connected
from quantum_trader.bus.streams import Entry
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.execution import Execution, decode
from quantum_trader.logs import configure
from quantum_trader.settings import load_settings


class AckFirstExecution(Execution):
    """The bug the atomic commit prevents: the ack leaves before the order and the result."""

    async def handle(self, entries: list[Entry]) -> None:
        await self.redis.xack(self.streams.intent, self.streams.execution_group, *[e.id for e in entries])
        await asyncio.sleep(0.02)  # the exchange round trip
        jobs, _bad = decode(entries)
        await self.redis.sadd("chaos:ack_first:handled", *[e.id for e in entries])
        await self.commit_unchecked(jobs)

    async def commit_unchecked(self, jobs: list[object]) -> None:
        from quantum_trader.exchanges.base import OrderRequest
        from quantum_trader.execution import Job, result_from_outcome

        typed = [job for job in jobs if isinstance(job, Job)]
        requests = [OrderRequest(j.coid, j.intent.symbol, j.intent.side, j.intent.qty) for j in typed]
        outcomes = await self.exchange.place_orders(requests)
        from quantum_trader.events import EXECUTION_RESULT, envelope

        async with self.redis.pipeline(transaction=False) as pipe:
            for job, outcome in zip(typed, outcomes, strict=True):
                result = result_from_outcome(job, outcome, self.exchange.name)
                pipe.xadd(
                    self.streams.result,
                    envelope(EXECUTION_RESULT, result, trace_id=job.env.trace_id,
                             correlation_id=job.env.correlation_id, source="execution"),
                )  # fmt: skip
            await pipe.execute()


async def main(stage: str) -> None:
    settings = load_settings()
    configure(settings.log_level, "json")
    assert settings.redis_url
    async with connected(settings.redis_url) as redis:
        stop = asyncio.Event()
        runner.install_signal_handlers(stop)
        if stage == "execution-ack-first":
            broken = AckFirstExecution(redis, settings, await build_exchange(redis, settings))
            await runner.Runner(redis, settings, {"execution": broken}, stop).run()
        else:
            await runner.serve(redis, settings, [stage], stop)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
