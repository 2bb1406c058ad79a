"""Fixtures of the ccxt tests: the pipeline as ``quantum-trader run`` builds it, on the fake Binance."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.base import Exchange
from quantum_trader.execution import Execution
from quantum_trader.router import Router
from quantum_trader.runner import build_stage
from quantum_trader.settings import Settings
from tests.pipeline import drain, results


@dataclass
class Pipeline:
    """Router and execution built by ``runner.build_stage``, as ``quantum-trader run`` builds them."""

    r: Redis
    settings: Settings
    router: Router
    execution: Execution

    async def run(self, *decisions: dict[str, str]) -> list[dict[str, Any]]:
        await publish(self.r, self.settings.decision_stream, list(decisions))
        await drain(self.router)
        await drain(self.execution)
        return await results(self.r, self.settings.result_stream)


@pytest.fixture
async def make_pipeline(r: Redis, exchange_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    exchanges: list[Exchange] = []

    async def make(**overrides: Any) -> Pipeline:
        settings = exchange_settings(**overrides)
        router, execution = await build_stage(keys.ROUTER, r, settings), await build_stage(keys.EXECUTION, r, settings)
        assert isinstance(router, Router)
        assert isinstance(execution, Execution)
        exchanges.append(execution.exchange)
        return Pipeline(r, settings, router, execution)

    yield make
    for exchange in exchanges:
        await exchange.close()
