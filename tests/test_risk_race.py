"""The risk limits under racing execution processes: the position limit and the order rate hold exactly.

Four ``quantum-trader execution`` processes share one intent stream. Every approval is applied
by the gate only on the snapshot it was computed from, so however the processes interleave the
position never passes QT_MAX_POSITION_QTY, and no second ever holds more approvals than the
throttle allows (overall, and per symbol), while throttled intents wait rather than fail.

The approvals' times are read from the throttle's own window (``quantum:risk:orders``, each
approval scored by the time the gate approved it), recorded while the run goes on: the gate
keeps an approval in the set for seconds after it leaves the window, so a recorder polling it
many times a second sees every one (and the test checks it did).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

from quantum_trader import keys, portfolio
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.events import TRADE_INTENT, Fields, TradeIntent, envelope, now_iso
from tests.pipeline import results

INTENTS = "quantum:stream:trade.intent"
RESULTS = "quantum:stream:execution.result"
GROUP = "quantum:group:execution:trade.intent"
PROCESSES = 4
WINDOW_MS = 1000
DETAIL = re.compile(r"MAX_POSITION: ETHUSDT position ([0-9.]+) \+ 0\.01 > 1\.5 \(QT_MAX_POSITION_QTY\)")


def intents(symbols: Sequence[str], count: int, qty: str = "0.01") -> list[Fields]:
    """``count`` BUY intents, the symbols taking turns, each with its own identity."""
    stamp = now_iso()
    return [
        envelope(
            TRADE_INTENT,
            TradeIntent(symbol=symbols[i % len(symbols)], side="BUY", qty=Decimal(qty), decision_ts=stamp),
            trace_id=f"t{i}",
            correlation_id=f"c{i}",
            source="test",
        )
        for i in range(count)
    ]


class Approvals:
    """Every approval the gate records in the throttle's window: member (``<intent id>|<symbol>``) -> ms."""

    def __init__(self, r: Redis) -> None:
        self.r = r
        self.seen: dict[str, int] = {}

    async def poll(self) -> None:
        rows = await self.r.zrange(keys.RISK_ORDERS, 0, -1, withscores=True)
        for member, score in rows:
            self.seen.setdefault(member, int(score))

    async def record(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
        await self.poll()

    def times(self, symbol: str | None = None) -> list[int]:
        """Approval times (ms), sorted; of one symbol, or all."""
        return sorted(at for member, at in self.seen.items() if symbol is None or member.endswith(f"|{symbol}"))

    def intent_ids(self) -> set[str]:
        return {member.rpartition("|")[0] for member in self.seen}


def busiest_second(times: Sequence[int]) -> int:
    """The most approvals in any one-second window ``(t - 1000 ms, t]``, as the throttle counts them."""
    most, start = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - WINDOW_MS:
            start += 1
        most = max(most, end - start + 1)
    return most


@contextlib.asynccontextmanager
async def racing_executions(r: Redis, url: str, settings: Mapping[str, str]) -> AsyncIterator[Approvals]:
    """Four execution processes consuming the intent stream, with approvals recorded meanwhile."""
    await r.set(keys.KILL_SWITCH, "0")
    await ensure_group(r, INTENTS, GROUP)
    env = os.environ | {
        "QT_REDIS_URL": url,
        "QT_BATCH_SIZE": "5",
        "QT_BLOCK_MS": "50",
        "QT_LOG_LEVEL": "warning",
        "QT_PAPER_BALANCES": "USDT=10000000",
        "QT_DAILY_LIMIT": "100000",
        "QT_MAX_INTENT_AGE_S": "300",  # throttled intents wait; none may expire meanwhile
        **settings,
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quantum_trader", "execution", env=env | {"QT_CONSUMER": f"exec-{n}"}
        )
        for n in range(PROCESSES)
    ]
    approvals = Approvals(r)
    stop = asyncio.Event()
    recorder = asyncio.create_task(approvals.record(stop))
    try:
        for _ in range(600):  # every process blocked on the group before the intents arrive
            if len(await r.xinfo_consumers(INTENTS, GROUP)) == PROCESSES:
                break
            await asyncio.sleep(0.05)
        assert len(await r.xinfo_consumers(INTENTS, GROUP)) == PROCESSES, "the execution processes did not start"
        yield approvals
    finally:
        stop.set()
        await recorder
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        codes = [await proc.wait() for proc in procs]
    assert codes == [0] * PROCESSES  # SIGTERM: each finishes its batch and exits cleanly


async def until_results(r: Redis, count: int, timeout_s: float = 45) -> None:
    """Wait until ``count`` results are written (or the timeout passes: the assertions then say what is missing)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await r.xlen(RESULTS) >= count:
            return
        await asyncio.sleep(0.05)


def one_result_each(published: Sequence[str], outcomes: Sequence[Mapping[str, Any]]) -> None:
    """Every intent has exactly one result: none lost, none twice."""
    ids = [o["intent_id"] for o in outcomes]
    assert len(ids) == len(set(ids)), "an intent has two results"
    assert set(ids) == set(published), f"{len(set(published) - set(ids))} intents have no result"


def approvals_cover(approvals: Approvals, outcomes: Sequence[Mapping[str, Any]]) -> None:
    """The recorder saw every approval: each order that reached the exchange, and nothing else."""
    sent = {o["intent_id"] for o in outcomes if o["exchange"] == "paper"}
    assert approvals.intent_ids() == sent, "the recorder missed approvals: the rate cannot be checked"


async def test_four_execution_processes_never_pass_the_position_limit_or_the_rate(r: Redis, clean_url: str) -> None:
    rate, cap, qty, count = 40, Decimal("1.5"), Decimal("0.01"), 300
    fits = int(cap / qty)  # 150 orders exactly fill the position
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    settings = {"QT_MAX_POSITION_QTY": f"ETHUSDT={cap}", "QT_MAX_ORDERS_PER_S": str(rate)}
    async with racing_executions(r, clean_url, settings) as approvals:
        published = await publish(r, INTENTS, intents(["ETHUSDT"], count, str(qty)))
        await until_results(r, count)

    outcomes = await results(r)
    one_result_each(published, outcomes)
    filled = [o for o in outcomes if o["status"] == "FILLED"]
    refused = [o for o in outcomes if o["status"] != "FILLED"]
    assert sum(Decimal(o["filled_qty"]) for o in filled) == cap
    assert len(filled) == fits
    assert {(o["status"], o["reason"]) for o in refused} == {("REJECTED", "MAX_POSITION")}
    assert len(refused) == count - fits
    # Refused only once the book and the orders in flight hold the whole limit, and the detail says so.
    held = [DETAIL.fullmatch(o["detail"]) for o in refused]
    assert all(held), refused[0]["detail"]
    assert {Decimal(match.group(1)) for match in held if match} == {cap}
    book = portfolio.decode(await r.hget(keys.BOOK_POSITIONS, "ETHUSDT") or "")
    assert book.qty == cap
    assert await r.hlen(keys.RISK_INFLIGHT) == 0  # every approval released by its commit

    approvals_cover(approvals, outcomes)
    times = approvals.times()
    assert busiest_second(times) == rate  # the throttle held, and it was what paced the run
    assert times[-1] - times[0] >= (fits - 1) // rate * WINDOW_MS


async def test_the_per_symbol_rate_holds_for_each_symbol_without_holding_back_the_other(
    r: Redis, clean_url: str
) -> None:
    per_symbol, count = 15, 120
    await r.hset(keys.PRICE_HASH, mapping={"ETHUSDT": "3000", "BTCUSDT": "60000"})
    settings = {"QT_MAX_ORDERS_PER_S": "1000", "QT_MAX_ORDERS_PER_S_SYMBOL": str(per_symbol)}
    async with racing_executions(r, clean_url, settings) as approvals:
        published = await publish(r, INTENTS, intents(["ETHUSDT", "BTCUSDT"], count, "0.001"))
        await until_results(r, count)

    outcomes = await results(r)
    one_result_each(published, outcomes)
    assert {o["status"] for o in outcomes} == {"FILLED"}  # throttled intents waited, none refused or expired
    approvals_cover(approvals, outcomes)
    for symbol in ("ETHUSDT", "BTCUSDT"):
        times = approvals.times(symbol)
        assert len(times) == count // 2
        assert busiest_second(times) == per_symbol, symbol
    # Both symbols had their full rate in the same second: one symbol's wait never held the other back.
    assert busiest_second(approvals.times()) == 2 * per_symbol
    positions = {s: portfolio.decode(raw).qty for s, raw in (await r.hgetall(keys.BOOK_POSITIONS)).items()}
    assert positions == {"ETHUSDT": Decimal("0.060"), "BTCUSDT": Decimal("0.060")}


def test_the_busiest_second_counts_as_the_throttle_does() -> None:
    assert busiest_second([]) == 0
    assert busiest_second([0, 999]) == 2
    assert busiest_second([0, 1000]) == 1  # an approval a full second later is in the next window
    assert busiest_second([0, 10, 20, 1005, 1015, 1019]) == 4  # (19, 1019]
    assert busiest_second([0, 400, 800, 1200]) == 3
