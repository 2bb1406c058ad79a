"""Server outages longer than the claim idle time, with several execution processes racing to reclaim.

A router and four execution processes (real processes, each looking for idle entries every
50 ms, ``QT_CLAIM_IDLE_MS=300``) work through bursts of decisions while the server is frozen
(SIGSTOP for longer than the idle time, then SIGCONT: every consumer's entries are idle at
once and all race to reclaim them) or killed and restarted from its AOF (appendfsync always).
Whatever the interleaving, every intent must end with exactly one result, nothing pending,
nothing dead-lettered, paper orders = FILLED results = the governor's daily counter, and the
balances must equal the fills. Orders and balances are read through the paper exchange.

The defect this guards against: reclaim read "XCLAIM did not return this id" as "deleted"
and acknowledged it, but XCLAIM with a min-idle also omits an id another consumer has just
claimed; that consumer's intent then had no result (GONE at the gate, or its commit's XACK
found it already acknowledged, leaving an order without a result).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO

import pytest

import quantum_trader
from quantum_trader import keys
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.embedded import EmbeddedValkey
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.base import client_order_id
from quantum_trader.exchanges.paper import PaperExchange
from tests.pipeline import decision

ROOT = Path(__file__).parents[1]
WORKER = str(Path(__file__).with_name("reclaim_worker.py"))
START = {"USDT": Decimal(10_000_000), "ETH": Decimal(10_000), "BTC": Decimal(1_000)}
PRICES = {"ETHUSDT": "3000", "BTCUSDT": "60000"}
DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"
RESULTS = "quantum:stream:execution.result"
REJECTED = "quantum:stream:decision.rejected"
DEAD_LETTERS = "quantum:stream:dead_letter"
GROUPS = {DECISIONS: "quantum:group:router:ai.decision", INTENTS: "quantum:group:execution:trade.intent"}
EXECUTIONS = 4


@dataclass
class Fleet:
    """One router and ``EXECUTIONS`` execution processes, logging to files."""

    url: str
    logs: Path
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    files: list[IO[bytes]] = field(default_factory=list)

    async def start(self) -> None:
        env = os.environ | {
            "QT_REDIS_URL": self.url,
            "QT_BATCH_SIZE": "20",
            "QT_BLOCK_MS": "50",
            "QT_CLAIM_IDLE_MS": "300",
            "QT_MAX_INTENT_AGE_S": "3600",
            "QT_LOG_LEVEL": "info",
            "QT_HEARTBEAT_S": "0.2",
            "QT_PAPER_BALANCES": ",".join(f"{asset}={amount}" for asset, amount in START.items()),
            "RECLAIM_EVERY_S": "0.05",
            # The workers import the same quantum_trader as this test (a worktree's, when given).
            "PYTHONPATH": os.pathsep.join([str(Path(quantum_trader.__file__).parents[1]), str(ROOT)]),
        }
        names = {"router-0": "router"} | {f"exec-{n}": "execution" for n in range(EXECUTIONS)}
        for name, stage in names.items():
            log = self._log_file(name)
            self.procs[name] = await asyncio.create_subprocess_exec(
                sys.executable, WORKER, stage, env=env | {"QT_CONSUMER": name}, stdout=log, stderr=log
            )

    def _log_file(self, name: str) -> IO[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.files.append(log)
        return log

    async def ready(self) -> None:
        """Wait until every execution process has beaten once (it is consuming)."""
        r = client(self.url)
        try:
            for _ in range(400):
                if len(await r.keys(keys.heartbeat_pattern("execution"))) >= EXECUTIONS:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the execution processes did not start")
        finally:
            await r.aclose()

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs.values():
            await proc.wait()
        for log in self.files:
            log.close()
        self.files.clear()

    def reclaims(self) -> Counter[str]:
        """Entries each execution process reclaimed from idle consumers (its ``reclaimed`` log lines)."""
        out: Counter[str] = Counter()
        for path in sorted(self.logs.glob("exec-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if '"reclaimed"' in line:
                    out[path.stem] += int(json.loads(line)["count"])
        return out


def burst(rng: random.Random, first: int, size: int) -> list[dict[str, str]]:
    """``size`` valid decisions numbered from ``first``; every 13th is published twice (a retry)."""
    out = []
    for n in range(first, first + size):
        symbol, side = rng.choice(sorted(PRICES)), rng.choice(["BUY", "SELL"])
        out.append(decision(symbol, side, "0.001", None, corr=f"c{n}", trace=f"t{n}"))
        if n % 13 == 0:
            out.append(dict(out[-1]))
    return out


async def everything_done(r: Redis, limit_s: float = 30.0) -> None:
    """Wait until every decision has an outcome and nothing is pending, or progress stalls."""
    loop = asyncio.get_running_loop()
    deadline, last, stalled_since = loop.time() + limit_s, -1, loop.time()
    while loop.time() < deadline:
        total = await r.xlen(DECISIONS)
        done = await r.xlen(REJECTED) + await r.xlen(RESULTS)
        pending = sum([(await r.xpending(s, g))["pending"] for s, g in GROUPS.items()])
        if done >= total and pending == 0:
            return
        if done != last:
            last, stalled_since = done, loop.time()
        elif loop.time() - stalled_since > 3:
            return  # no progress: whatever is missing is lost
        await asyncio.sleep(0.1)


async def all_entries(r: Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = []
    start = "-"
    while chunk := await r.xrange(stream, min=start, max="+", count=5000):
        out += chunk
        start = f"({chunk[-1][0]}"
    return out


async def ledger_problems(r: Redis) -> list[str]:
    """Every way the run broke exactly-once; empty when it held."""
    problems: list[str] = []
    decisions = await all_entries(r, DECISIONS)
    rejections = [json.loads(f["payload"]) for _, f in await all_entries(r, REJECTED)]
    intents = await all_entries(r, INTENTS)
    results = [json.loads(f["payload"]) for _, f in await all_entries(r, RESULTS)]

    outcomes = Counter(rej["original_id"] for rej in rejections)
    per_intent = Counter(res["intent_id"] for res in results)
    coids = {}
    for intent_id, fields in intents:
        outcomes[json.loads(fields["payload"])["decision_id"]] += 1
        coids[intent_id] = client_order_id(intent_id, fields["trace_id"], fields["correlation_id"])
        if per_intent[intent_id] != 1:
            problems.append(f"intent {intent_id} has {per_intent[intent_id]} results")
    problems += [f"decision {d} has {outcomes[d]} outcomes" for d, _ in decisions if outcomes[d] != 1]
    problems += [f"result for unknown intent {i}" for i in per_intent if i not in coids]

    for stream, group in GROUPS.items():
        pending = (await r.xpending(stream, group))["pending"]
        if pending:
            problems.append(f"{pending} entries still pending in {group}")
    if dead := await r.xlen(DEAD_LETTERS):
        problems.append(f"{dead} entries dead-lettered")

    paper = PaperExchange(r, quote_assets=["USDT"])
    orders = await paper.fetch_orders(sorted(coids.values()))
    filled = [res for res in results if res["status"] == "FILLED"]
    counter = int(await r.get(keys.daily_trades(datetime.now(UTC).date())) or 0)
    if not len(orders) == len(filled) == counter:
        problems.append(f"paper orders {len(orders)}, FILLED results {len(filled)}, daily counter {counter}")
    reported = {res["client_order_id"] for res in filled}
    problems += [f"order {coid} has no FILLED result" for coid in sorted(set(orders) - reported)]

    expected = dict(START)
    for res in filled:
        base = res["symbol"].removesuffix("USDT")
        qty, price, fee = Decimal(res["filled_qty"]), Decimal(res["avg_price"]), Decimal(res["fee"])
        sign = 1 if res["side"] == "BUY" else -1
        expected[base] = expected.get(base, Decimal(0)) + sign * qty
        expected["USDT"] = expected["USDT"] - sign * qty * price - fee
    balances = await paper.balances()
    for asset in sorted(set(expected) | set(balances)):
        if expected.get(asset, Decimal(0)) != balances.get(asset, Decimal(0)):
            problems.append(f"balance {asset}: {balances.get(asset)} != sum of fills {expected.get(asset)}")
    return problems


async def outage_run(
    server: EmbeddedValkey, logs: Path, outages: list[str], *, per_burst: int = 300, down_s: float = 1.2
) -> tuple[list[str], Fleet]:
    """Bursts of decisions, each hit mid-flight by one outage (``freeze`` or ``kill``); the ledger's problems."""
    rng = random.Random(1212)
    pid = server.process.pid if server.process else 0
    r = client(server.url)
    fleet = Fleet(server.url, logs)
    try:
        await r.set(keys.KILL_SWITCH, "0")
        await r.hset(keys.PRICE_HASH, mapping=PRICES)
        await fleet.start()
        await fleet.ready()
        for n, kind in enumerate(outages):
            await publish(r, DECISIONS, burst(rng, n * per_burst, per_burst))
            await asyncio.sleep(rng.uniform(0.02, 0.1))  # mid-burst: entries are in flight everywhere
            if kind == "freeze":
                # Every pending entry goes idle past QT_CLAIM_IDLE_MS at once; on SIGCONT all race.
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(down_s)
                os.kill(pid, signal.SIGCONT)
            else:
                server.kill()
                await asyncio.sleep(down_s)
                server.restart()
                pid = server.process.pid if server.process else 0
                await r.connection_pool.disconnect()
            await asyncio.sleep(0.5)
        await everything_done(r)
        await asyncio.sleep(0.3)  # a late duplicate result would land now
        await fleet.stop()
        return await ledger_problems(r), fleet
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)  # never leave a frozen server behind
        await fleet.stop()
        await r.aclose()


def summary(problems: list[str]) -> str:
    """How many problems of each kind, with the first few in full."""
    kinds = Counter(re.sub(r"qt-\w+|\d+-\d+|-?\d+(\.\d+)?(?=[,\s]|$)", "#", p) for p in problems)
    lines = [f"{len(problems)} problems:"] + [f"  {n} x {kind}" for kind, n in kinds.most_common()]
    return "\n".join(lines + [f"  e.g. {p}" for p in problems[:5]])


def assert_really_raced(fleet: Fleet, outages: int) -> None:
    """The outages must have made several execution processes reclaim idle entries."""
    reclaims = fleet.reclaims()
    assert len(reclaims) >= 2, f"several processes must reclaim, got {dict(reclaims)}"
    assert sum(reclaims.values()) >= 2 * outages, f"outages must leave entries to reclaim, got {dict(reclaims)}"


async def test_outages_with_four_executions_racing_to_reclaim_lose_nothing(
    valkey_factory: Callable[..., EmbeddedValkey], tmp_path: Path
) -> None:
    outages = ["freeze"] * 8 + ["kill", "freeze", "kill", "freeze"]
    problems, fleet = await outage_run(valkey_factory(appendfsync="always"), tmp_path, outages)
    assert not problems, summary(problems)
    assert_really_raced(fleet, len(outages))


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_many_outages_with_racing_reclaims_lose_nothing_soak(
    valkey_factory: Callable[..., EmbeddedValkey], tmp_path: Path
) -> None:
    outages = (["freeze"] * 4 + ["kill"]) * 12
    problems, fleet = await outage_run(valkey_factory(appendfsync="always"), tmp_path, outages, per_burst=400)
    assert not problems, summary(problems)
    assert_really_raced(fleet, len(outages))
