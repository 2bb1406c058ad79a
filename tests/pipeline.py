"""Scenario helpers for pipeline tests: build decisions, drain stages, read outcomes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from quantum_trader.bus.connection import Redis
from quantum_trader.events import DECISION, Fields, envelope, now_iso
from quantum_trader.execution import Execution
from quantum_trader.router import Router


def decision(
    symbol: str = "ETHUSDT",
    side: str = "BUY",
    qty: Any = "0.1",
    price: Any = "3000",
    *,
    trace: str | None = None,
    corr: str | None = None,
    timestamp: datetime | None = None,
    **extra: Any,
) -> Fields:
    """One decision entry; omitted ids are fresh, ``None`` values drop a payload field."""
    payload: dict[str, Any] = {"symbol": symbol, "side": side, "qty": qty, "price": price, **extra}
    payload = {key: value for key, value in payload.items() if value is not None}
    return envelope(
        DECISION,
        payload,
        trace_id=uuid.uuid4().hex if trace is None else trace,
        correlation_id=uuid.uuid4().hex if corr is None else corr,
        source="test",
        timestamp=now_iso(timestamp or datetime.now(UTC)),
    )


async def drain(stage: Router | Execution) -> int:
    """Run a stage's consumer until nothing is left to read; returns the entries handled."""
    await stage.consumer.setup()
    handled = 0
    while True:
        batch = await stage.consumer.next_batch()
        if not batch:
            batch = await stage.consumer.read_new(wait=False)
            if not batch:
                return handled
        await stage.consumer.process(stage.handle, batch)
        handled += len(batch)


async def payloads(r: Redis, stream: str) -> list[dict[str, Any]]:
    """Every entry's payload, with the entry's own fields alongside under ``_env``."""
    out = []
    for entry_id, fields in await r.xrange(stream):
        payload = json.loads(fields["payload"])
        payload["_env"] = fields | {"_id": entry_id}
        out.append(payload)
    return out


async def results(r: Redis, stream: str = "quantum:stream:execution.result") -> list[dict[str, Any]]:
    """Every result payload."""
    return await payloads(r, stream)


async def rejections(r: Redis, stream: str = "quantum:stream:decision.rejected") -> list[dict[str, Any]]:
    """Every rejection payload."""
    return await payloads(r, stream)
