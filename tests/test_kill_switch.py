"""The kill switch stops orders the governor already approved, and a switch of the wrong type halts quietly.

The gate checks ``quantum:kill`` once per batch; the paper exchange reads it again inside its
placement transaction. So once the operator's SET has returned, no paper order is placed, not
even one of a batch approved a moment before (the ccxt side is in tests/exchanges).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from quantum_trader import keys
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.events import TRADE_INTENT, TradeIntent, TradingState, envelope, now_iso
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from quantum_trader.trading import set_state
from tests.pipeline import decision, drain, results

DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"
GROUP = "quantum:group:execution:trade.intent"
RESULTS = "quantum:stream:execution.result"
RICH = {"USDT": Decimal(10_000_000)}


def today_count_key() -> str:
    return keys.daily_trades(datetime.now(UTC).date())


async def test_kill_on_landing_right_after_the_gate_stops_the_approved_batch(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    settings = settings_for(clean_url, block_ms=10, paper_balances=RICH)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=RICH)
    await paper.fund()
    execution = Execution(r, settings, paper)
    operator = client(clean_url)
    approve = execution.governor.gate

    async def gate_then_the_operator_halts(*args: Any, **kwargs: Any) -> Any:
        verdicts = await approve(*args, **kwargs)
        await operator.set(keys.KILL_SWITCH, "1")  # `quantum-trader kill on`, from another client
        return verdicts

    execution.governor.gate = gate_then_the_operator_halts  # type: ignore[method-assign]
    await publish(r, DECISIONS, [decision(qty="0.01") for _ in range(50)])
    await drain(Router(r, settings))
    try:
        await drain(execution)
    finally:
        await operator.aclose()

    out = await results(r)
    assert len(out) == 50
    assert {(o["status"], o["reason"], o["exchange"]) for o in out} == {("REJECTED", "KILL_SWITCH", "")}
    assert await paper.balances() == RICH  # nothing filled
    assert await r.keys("quantum:paper:order*") == []  # no order on record, whatever its key
    assert await r.get(today_count_key()) == "0"  # the gate's counts given back: no order was sent


PROCESSES = 4
INTENT_COUNT = 20_000


async def test_kill_on_mid_flow_no_paper_order_is_placed_after_it(r: Redis, clean_url: str) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    await ensure_group(r, INTENTS, GROUP)
    stamp = now_iso()
    intents = [
        envelope(
            TRADE_INTENT,
            TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.001"), decision_ts=stamp),
            trace_id=f"t{n}",
            correlation_id=f"c{n}",
            source="test",
        )
        for n in range(INTENT_COUNT)
    ]
    await publish(r, INTENTS, intents)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_REDIS_URL": clean_url,
        "QT_BATCH_SIZE": "500",
        "QT_BLOCK_MS": "50",
        "QT_LOG_LEVEL": "warning",
        "QT_MAX_INTENT_AGE_S": "600",
        "QT_PAPER_BALANCES": "USDT=10000000",
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quantum_trader", "execution", env=env | {"QT_CONSUMER": f"exec-{n}"}
        )
        for n in range(PROCESSES)
    ]
    operator = client(clean_url)
    try:
        for _ in range(1200):
            if await r.xlen(RESULTS) >= INTENT_COUNT // 10:
                break
            await asyncio.sleep(0.01)
        # The operator halts trading and, in the same transaction, notes what exists at that instant.
        async with operator.pipeline(transaction=True) as tx:
            tx.set(keys.KILL_SWITCH, "1")
            tx.keys("quantum:paper:order*")
            tx.hgetall(keys.paper_balances())
            _, records_at_flip, balances_at_flip = await tx.execute()
        for _ in range(1200):
            if await r.xlen(RESULTS) >= INTENT_COUNT:
                break
            await asyncio.sleep(0.05)
    finally:
        await operator.aclose()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert await proc.wait() == 0

    out = await results(r)
    assert len(out) == INTENT_COUNT
    assert len({o["intent_id"] for o in out}) == INTENT_COUNT  # one result each
    filled = [o for o in out if o["status"] == "FILLED"]
    halted = [o for o in out if (o["status"], o["reason"]) == ("REJECTED", "KILL_SWITCH")]
    assert len(filled) + len(halted) == INTENT_COUNT
    assert halted, "the switch was turned on after the whole flow: the scenario did not happen"
    # Not one fill after the switch: balances and order records are exactly those of that instant.
    assert await r.hgetall(keys.paper_balances()) == balances_at_flip
    assert sorted(await r.keys("quantum:paper:order*")) == sorted(records_at_flip)
    assert len(await PaperExchange(r).orders()) == len(filled)
    assert await r.get(today_count_key()) == str(len(filled))  # counts of the stopped ones given back


async def test_a_switch_of_another_type_halts_the_pipeline_without_dead_letters(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    await r.rpush(keys.KILL_SWITCH, "0")  # e.g. a mistaken LPUSH: not the string "0"
    settings = settings_for(clean_url, block_ms=10)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=RICH)
    await paper.fund()
    await publish(r, DECISIONS, [decision(qty="0.01"), decision(qty="0.01")])
    await drain(Router(r, settings))
    await drain(Execution(r, settings, paper))
    assert [(o["status"], o["reason"]) for o in await results(r)] == [("REJECTED", "KILL_SWITCH")] * 2
    assert await r.xlen("quantum:stream:dead_letter") == 0
    assert (await r.xpending(INTENTS, GROUP))["pending"] == 0


def kill_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", "kill", *args],
        env=env | {"QT_REDIS_URL": url, "QT_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_kill_status_reports_a_switch_of_another_type_in_one_line(r: Redis, clean_url: str) -> None:
    await r.rpush(keys.KILL_SWITCH, "0")
    status = kill_cli(clean_url, "status")
    assert status.returncode == 1  # halted
    assert status.stderr == ""  # no traceback
    [line] = status.stdout.splitlines()
    assert line == (
        "quantum:kill = '<a list, not a string>': trading HALTED (unexpected; `quantum-trader kill on|off` rewrites it)"
    )
    assert kill_cli(clean_url, "off").returncode == 0  # the fix it names works
    assert kill_cli(clean_url, "status").stdout.strip() == "quantum:kill = '0': trading ALLOWED"


async def test_reducing_landing_right_after_the_gate_stops_the_approved_buys_and_lets_the_sells_go(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    """The gate approves a batch of buys and sells; before the orders leave, the state becomes REDUCING (the
    operator's `state reducing`, or the drawdown breaker). REDUCING lets only orders that reduce a position
    pass: the buys end REJECTED REDUCING, never sent, their counts given back; the sells fill."""
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    held = {"USDT": Decimal(100_000), "ETH": Decimal(10)}
    settings = settings_for(clean_url, block_ms=10, paper_balances=held)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=held)
    await paper.fund()
    execution = Execution(r, settings, paper)
    operator = client(clean_url)
    approve = execution.governor.gate

    async def gate_then_the_state_becomes_reducing(*args: Any, **kwargs: Any) -> Any:
        verdicts = await approve(*args, **kwargs)
        await set_state(operator, settings, TradingState.REDUCING, "OPERATOR", "operator")
        return verdicts

    execution.governor.gate = gate_then_the_state_becomes_reducing  # type: ignore[method-assign]
    await publish(r, DECISIONS, [decision(side=side, qty="0.01") for side in ["BUY", "SELL"] * 10])
    await drain(Router(r, settings))
    try:
        await drain(execution)
    finally:
        await operator.aclose()

    out = await results(r)
    assert sorted({(o["side"], o["status"], o["reason"]) for o in out}) == [
        ("BUY", "REJECTED", "REDUCING"),
        ("SELL", "FILLED", ""),
    ]
    assert len(out) == 20
    balances = await paper.balances()
    assert balances["ETH"] == Decimal(10) - Decimal("0.1")  # ten sells, no buy
    assert await r.get(today_count_key()) == "10"  # the sells: the buys' counts given back
