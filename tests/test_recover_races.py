"""recover runs while services run: a consumer it lists as empty may take a batch a moment later.

Deleting a consumer (XGROUP DELCONSUMER) drops its pending entries from the group: delivered,
never acknowledged, never delivered again. So "it held nothing when listed" must still be true
when it is deleted. Here a real second client reads a batch as that consumer right after recover
listed the consumers (an execution process waking up, or a second recover run, as when systemd
starts several units at once, each with recover as ExecStartPre).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.events import TRADE_INTENT, TradeIntent, envelope, now_iso
from quantum_trader.ops.recover import RECOVER_CONSUMER, recover
from quantum_trader.settings import Settings
from tests.pipeline import results

INTENTS = "quantum:stream:trade.intent"
GROUP = "quantum:group:execution:trade.intent"


def fresh_intent(n: int) -> dict[str, str]:
    payload = TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.1"), decision_ts=now_iso(datetime.now(UTC)))
    return envelope(TRADE_INTENT, payload, trace_id=f"t{n}", correlation_id=f"c{n}", source="router")


class ReadsAfterListing(aioredis.Redis):
    """recover's own client, real in every call; right after it lists the intent group's consumers,
    another client (``reader``) reads the next intent as ``consumer``."""

    reader: Redis
    consumer: str

    async def xinfo_consumers(self, name: Any, groupname: Any) -> Any:
        listed = await super().xinfo_consumers(name, groupname)
        if name == INTENTS:
            await self.reader.xreadgroup(GROUP, self.consumer, {INTENTS: ">"}, count=1)
        return listed


@pytest.mark.parametrize("consumer", ["exec-1", RECOVER_CONSUMER])
async def test_a_consumer_that_takes_an_intent_after_recover_listed_it_as_empty_keeps_it(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str, consumer: str
) -> None:
    await ensure_group(r, INTENTS, GROUP)
    [done_id] = await publish(r, INTENTS, [fresh_intent(0)])
    await r.xreadgroup(GROUP, consumer, {INTENTS: ">"}, count=1)
    await r.xack(INTENTS, GROUP, done_id)  # it finished its work: empty, idle
    [intent_id] = await publish(r, INTENTS, [fresh_intent(1)])

    client = ReadsAfterListing.from_url(clean_url, decode_responses=True)
    client.reader, client.consumer = r, consumer
    try:
        report = await recover(client, settings_for(clean_url), idle_ms=0)
    finally:
        await client.aclose()

    # The intent was delivered to it after the listing: it must still be pending (so it is
    # finished or reclaimed later), not dropped from the group with its consumer.
    pending = await r.xpending_range(INTENTS, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(intent_id, consumer)]
    assert f"{GROUP} / {consumer}" not in report.consumers_deleted
    [info] = await r.xinfo_groups(INTENTS)
    assert (info["pending"], info["lag"]) == (1, 0)  # delivered and pending: nothing lost

    # Once it has finished that intent too, a later run removes it.
    await r.xack(INTENTS, GROUP, intent_id)
    await recover(r, settings_for(clean_url), idle_ms=0)
    assert await r.xinfo_consumers(INTENTS, GROUP) == []


async def test_recover_still_removes_idle_empty_consumers_and_keeps_busy_ones(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    await ensure_group(r, INTENTS, GROUP)
    await publish(r, INTENTS, [fresh_intent(n) for n in range(2)])
    await r.xreadgroup(GROUP, "busy", {INTENTS: ">"}, count=1)
    [(_, [(done_id, _)])] = await r.xreadgroup(GROUP, "finished", {INTENTS: ">"}, count=1)
    await r.xack(INTENTS, GROUP, done_id)

    report = await recover(r, settings_for(clean_url, max_intent_age_s=3600), idle_ms=0)

    assert report.consumers_deleted == [f"{GROUP} / finished"]
    assert [c["name"] for c in await r.xinfo_consumers(INTENTS, GROUP)] == ["busy"]


def stale_intent(n: int) -> dict[str, str]:
    born = now_iso(datetime.now(UTC) - timedelta(seconds=600))
    payload = TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.1"), decision_ts=born)
    return envelope(TRADE_INTENT, payload, trace_id=f"t{n}", correlation_id=f"c{n}", source="router")


class TakenAfterPaging(aioredis.Redis):
    """recover's own client; right after it pages the pending intents, a live execution process
    (``taker``, with a heartbeat) reclaims them from the dead consumer, as it does every few seconds."""

    taker: Redis

    async def xpending_range(self, name: Any, groupname: Any, *args: Any, **kwargs: Any) -> Any:
        page = await super().xpending_range(name, groupname, *args, **kwargs)
        if name == INTENTS and page:
            await self.taker.set(keys.heartbeat("execution", "live-exec"), "{}", ex=15)
            await self.taker.xclaim(INTENTS, GROUP, "live-exec", 0, [p["message_id"] for p in page])
        return page


async def test_an_intent_a_live_consumer_took_after_recover_paged_it_is_not_expired_under_it(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    # The live consumer may already be placing its order: an EXPIRED result now would hide a fill.
    await ensure_group(r, INTENTS, GROUP)
    [intent_id] = await publish(r, INTENTS, [stale_intent(1)])
    await r.xreadgroup(GROUP, "dead-exec", {INTENTS: ">"}, count=1)  # then it died

    client = TakenAfterPaging.from_url(clean_url, decode_responses=True)
    client.taker = r
    try:
        report = await recover(client, settings_for(clean_url, max_intent_age_s=60), idle_ms=0)
    finally:
        await client.aclose()

    assert await results(r) == []
    assert report.expired == 0
    [held] = await r.xpending_range(INTENTS, GROUP, min="-", max="+", count=10)
    assert (held["message_id"], held["consumer"]) == (intent_id, "live-exec")


async def test_stale_intents_of_a_dead_consumer_are_still_expired_once(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    await ensure_group(r, INTENTS, GROUP)
    ids = await publish(r, INTENTS, [stale_intent(n) for n in range(3)])
    await r.xreadgroup(GROUP, "dead-exec", {INTENTS: ">"}, count=3)

    report = await recover(r, settings_for(clean_url, max_intent_age_s=60), idle_ms=0)

    assert report.expired == 3
    assert sorted((res["intent_id"], res["status"]) for res in await results(r)) == [(i, "EXPIRED") for i in ids]
    assert await r.xpending_range(INTENTS, GROUP, min="-", max="+", count=10) == []
