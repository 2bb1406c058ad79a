"""One real stage process that reclaims often, for the outage/reclaim race test.

``python tests/reclaim_worker.py router|execution`` runs the stage exactly as the CLI
does (settings from the environment), except that its consumer looks for idle entries
every ``RECLAIM_EVERY_S`` seconds instead of every 5 s, so that after an outage every
process races to reclaim at once.
"""

from __future__ import annotations

import asyncio
import os
import sys

from quantum_trader import runner
from quantum_trader.bus.connection import connected
from quantum_trader.logs import configure
from quantum_trader.settings import load_settings


async def main(stage_name: str) -> None:
    settings = load_settings()
    configure(settings.log_level, "json")
    assert settings.redis_url
    async with connected(settings.redis_url) as redis:
        stop = asyncio.Event()
        runner.install_signal_handlers(stop)
        stage = await runner.build_stage(stage_name, redis, settings)
        stage.consumer.claim_every_s = float(os.environ.get("RECLAIM_EVERY_S", "5"))
        await runner.Runner(redis, settings, {stage_name: stage}, stop).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
