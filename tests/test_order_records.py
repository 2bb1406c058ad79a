"""The paper exchange's order records: kept while their intent may be delivered again, then they expire.

A record is what stops a redelivered intent from placing a second order, so it must outlive
every delivery; once the intent's result is written nothing can ask for it, and it expires
QT_TRIM_KEEP_S later. Without that, one record per order ever placed stays on the server.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.pipeline import decision, drain, results

DECISIONS = "quantum:stream:ai.decision"
RICH = {"USDT": Decimal(10_000_000)}
RECORDS = "quantum:paper:order*"  # whatever the layout: every key holding paper orders


@pytest.fixture
async def trading(r: Redis) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")


async def test_finished_orders_expire_while_a_pending_intent_keeps_its_record(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str, trading: None
) -> None:
    settings = settings_for(clean_url, block_ms=10, trim_keep_s=60, paper_balances=RICH, consumer="exec-a")
    router = Router(r, settings)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=RICH)
    await paper.fund()

    # exec-a places one order, then dies before writing its result: the intent stays pending.
    crashed = Execution(r, settings, paper)

    async def crash(*_: object) -> None:
        raise SystemExit("died after the order, before the result")

    crashed.commit = crash  # type: ignore[method-assign]
    await publish(r, DECISIONS, [decision(qty="0.01")])
    await drain(router)
    with pytest.raises(SystemExit):
        await drain(crashed)
    [pending_record] = await r.keys(RECORDS)

    # Meanwhile exec-b finishes thirty intents.
    other = Execution(r, settings.model_copy(update={"consumer": "exec-b"}), paper)
    await publish(r, DECISIONS, [decision(qty="0.01") for _ in range(30)])
    await drain(router)
    await drain(other)
    assert len(await results(r)) == 30

    ttls = {key: await r.ttl(key) for key in await r.keys(RECORDS)}
    assert ttls.pop(pending_record) == -1  # its intent may be delivered again: no expiry
    assert len(ttls) == 30
    assert all(0 < ttl <= 60 for ttl in ttls.values())  # finished: gone within QT_TRIM_KEEP_S

    # exec-a comes back: the record makes it report the order instead of placing a second one.
    restarted = Execution(r, settings, PaperExchange(r, quote_assets=settings.quote_assets))
    await drain(restarted)
    out = await results(r)
    assert [o["status"] for o in out] == ["FILLED"] * 31
    assert (await paper.balances())["ETH"] == Decimal("0.31")
    assert 0 < await r.ttl(pending_record) <= 60


async def test_with_no_retention_finished_orders_leave_no_record(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str, trading: None
) -> None:
    settings = settings_for(clean_url, block_ms=10, trim_keep_s=0, paper_balances=RICH)
    router = Router(r, settings)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=RICH)
    await paper.fund()
    execution = Execution(r, settings, paper)
    for _ in range(3):
        await publish(r, DECISIONS, [decision(qty="0.01") for _ in range(100)])
        await drain(router)
        await drain(execution)
        assert await r.keys(RECORDS) == []  # bounded: nothing accumulates
    assert [o["status"] for o in await results(r)] == ["FILLED"] * 300
    assert (await paper.balances())["ETH"] == Decimal("3.00")
