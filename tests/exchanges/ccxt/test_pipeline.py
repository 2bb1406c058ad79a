"""Decision → router → execution → result, with the ccxt adapter on the fake Binance server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.ccxt import CcxtExchange
from tests.exchanges.conftest import LogTrap, write_secrets
from tests.exchanges.fake_binance import FakeBinance
from tests.pipeline import decision, drain, results

DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"
GROUP = "quantum:group:execution:trade.intent"


async def test_decision_is_filled_on_the_exchange_with_its_price_and_fee(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    fake.market_fill_split = 2  # fills at 3000.00 and 3000.01
    pipeline = await make_pipeline()
    assert isinstance(pipeline.execution.exchange, CcxtExchange)
    [res] = await pipeline.run(decision("ETHUSDT", "BUY", qty="0.1", price="3000"))
    [order] = fake.placed()
    assert res["status"] == "FILLED"
    assert res["exchange"] == "binance"
    assert res["client_order_id"] == order.client_order_id
    assert res["exchange_order_id"] == str(order.order_id)
    assert res["filled_qty"] == "0.1"
    assert res["avg_price"] == "3000.005"
    assert (res["fee"], res["fee_asset"]) == ("0.0001", "ETH")


async def test_timeout_after_accept_gives_one_order_and_one_filled_result(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    fake.script("order", "hang_after_accept")
    pipeline = await make_pipeline()
    [res] = await pipeline.run(decision(qty="0.1"))
    assert len(fake.placed()) == 1
    assert fake.calls("POST", "/api/v3/order") == 1
    assert res["status"] == "FILLED"
    assert res["client_order_id"] == fake.placed()[0].client_order_id
    assert (await r.xpending(INTENTS, GROUP))["pending"] == 0


async def test_crash_after_the_order_restart_reports_it_without_resending(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    first = await make_pipeline()

    async def crash(_done: object, _sent: object = ()) -> None:
        raise SystemExit("process died after placing the order, before writing the result")

    first.execution.commit = crash
    with pytest.raises(SystemExit):
        await first.run(decision(qty="0.1"))
    assert len(fake.placed()) == 1
    assert (await r.xpending(INTENTS, GROUP))["pending"] == 1

    restarted = await make_pipeline()  # new process: new adapter, same consumer name
    await drain(restarted.execution)
    [res] = await results(r)
    assert res["status"] == "FILLED"
    assert res["fee"] == "0.0001"
    assert len(fake.placed()) == 1
    assert fake.calls("POST", "/api/v3/order") == 1


async def test_bad_credentials_fail_the_order_and_halt_the_pipeline(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance, log_trap: LogTrap, tmp_path: Any
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    wrong = write_secrets(tmp_path / "wrong.env", key="revoked-key-000000000000000000")
    pipeline = await make_pipeline(secrets_file=wrong)
    [res] = await pipeline.run(decision(qty="0.1"))
    assert res["status"] == "FAILED"
    assert res["reason"] == "AUTH_FAILED"
    assert await r.get(keys.KILL_SWITCH) == "1"
    # Fail-closed: the next decision is stopped by the governor, never sent.
    _, res2 = await pipeline.run(decision(qty="0.1"))
    assert (res2["status"], res2["reason"]) == ("REJECTED", "KILL_SWITCH")
    assert fake.placed() == []
    assert len(log_trap.lines("exchange_auth_failed")) == 1
    assert "revoked-key-000000000000000000" not in log_trap.text()


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_kill_on_mid_batch_lets_only_the_requests_already_in_flight_reach_the_exchange(
    r: Redis, make_pipeline: Callable[..., Any], fake: FakeBinance, clean_url: str, concurrency: int
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    fake.order_delay_s = 0.025  # each order takes 25 ms at the exchange
    count = 80 * concurrency  # one batch the gate approves whole: ~2 s of orders at this pace
    pipeline = await make_pipeline(exchange_concurrency=concurrency, batch_size=1000)
    await publish(r, DECISIONS, [decision(qty="0.01", price="3000") for _ in range(count)])
    await drain(pipeline.router)
    running = asyncio.create_task(drain(pipeline.execution))
    for _ in range(5000):  # until orders flow
        if fake.calls("POST", "/api/v3/order") >= 10 * concurrency or running.done():
            break
        await asyncio.sleep(0.002)
    operator = client(clean_url)  # `quantum-trader kill on`, from another client
    try:
        await operator.set(keys.KILL_SWITCH, "1")
        flipped = time.monotonic()
    finally:
        await operator.aclose()
    await running

    sends = [at for at, method, path in fake.arrivals if (method, path) == ("POST", "/api/v3/order")]
    late = [at for at in sends if at > flipped]
    assert len(late) <= concurrency  # only requests checked before the flip, at most one per slot
    out = await results(r)
    assert len(out) == count
    filled = [o for o in out if o["status"] == "FILLED"]
    halted = [o for o in out if (o["status"], o["reason"]) == ("REJECTED", "KILL_SWITCH")]
    assert len(filled) + len(halted) == count
    assert halted, "the whole batch was sent before the switch: the scenario did not happen"
    assert len(filled) == len(fake.placed()) == len(sends)
    assert {o["exchange"] for o in halted} == {""}  # never reached the exchange
    day = keys.daily_trades(datetime.now(UTC).date())
    assert await r.get(day) == str(len(filled))  # the stopped orders' counts given back
