"""What every scenario needs: a private server, preloaded streams, stage processes, RSS sampling."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import redis

from quantum_trader import keys
from quantum_trader.bus.embedded import EmbeddedValkey, free_port
from quantum_trader.events import DECISION, TRADE_INTENT, TradeIntent, envelope, now_iso

EXE = str(Path(sys.executable).with_name("quantum-trader"))
INTENTS = "quantum:stream:trade.intent"
DECISIONS = "quantum:stream:ai.decision"
RESULTS = "quantum:stream:execution.result"
INTENT_GROUP = "quantum:group:execution:trade.intent"

# Every guard stays on: kill switch armed at "0", a daily limit far above the run, a max age long
# enough that a preloaded backlog is still fresh when drained (a 750,000-intent backlog takes longer
# to build than the default 60 s), validation and dedup as in production. Outcome log lines are off
# (QT_LOG_LEVEL=warning): the figures measure the pipeline, not the terminal.
ENV = {
    "QT_DAILY_LIMIT": "100000000",
    "QT_MAX_INTENT_AGE_S": "3600",
    "QT_MAX_NOTIONAL": "1000000",
    "QT_PAPER_BALANCES": "USDT=1000000000000,ETH=1000000000",
    "QT_LOG_LEVEL": "warning",
    "QT_TRIM_KEEP_S": "0",  # trim as soon as consumed: server memory must stay bounded
    "QT_STAGES": "router,execution",  # `run` without the AI engine: the issue measures decisions onwards
    # The throughput and latency scenarios count results and time them by their ids: every result
    # stays (retention off). The memory scenario turns retention on (MEMORY_ENV).
    "QT_RESULT_KEEP_S": "0",
    "QT_RESULT_MAXLEN": "0",
}

# Steady traffic with every window short, so that each is full well before the first sample: what
# the server holds is then rate x window, whatever the number of decisions so far. Production
# windows are longer (README, "Memory"); the bound they give is the same formula.
MEMORY_ENV = {
    "QT_TRIM_INTERVAL_S": "1",  # consumed decisions and intents: at most 1 s of traffic between passes
    "QT_RESULT_KEEP_S": "86400",  # the production default: the count limit is the one that binds here
    "QT_RESULT_MAXLEN": "20000",
    "QT_MAX_INTENT_AGE_S": "3",
    "QT_CLOCK_SKEW_S": "1",
    "QT_DEDUP_WINDOW_S": "4",  # dedup keys: 4 s of traffic (the window must cover max age + skew)
}


@contextmanager
def server() -> Iterator[EmbeddedValkey]:
    """A private Valkey (AOF everysec, as in production) in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="qt-bench-") as tmp:
        valkey = EmbeddedValkey(Path(tmp), port=free_port(), appendfsync="everysec")
        valkey.start()
        try:
            yield valkey
        finally:
            valkey.stop()


def prepare(url: str) -> redis.Redis:
    """Kill switch armed, a price for the symbol, groups created."""
    client = redis.Redis.from_url(url, decode_responses=True)
    client.set(keys.KILL_SWITCH, "0")
    client.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    return client


def intent_fields(n: int, stamp: str) -> dict[str, str]:
    """One valid trade intent as the router writes it."""
    intent = TradeIntent(symbol="ETHUSDT", side="BUY" if n % 2 else "SELL", qty=Decimal("0.001"), decision_ts=stamp)
    return envelope(TRADE_INTENT, intent, trace_id=f"t{n}", correlation_id=f"c{n}", source="router", timestamp=stamp)


def decision_fields(n: int, stamp: str | None = None) -> dict[str, str]:
    """One valid decision as the AI engine writes it."""
    payload = {"symbol": "ETHUSDT", "side": "BUY" if n % 2 else "SELL", "qty": "0.001", "price": "3000"}
    return envelope(DECISION, payload, trace_id=f"t{n}", correlation_id=f"c{n}", source="bench", timestamp=stamp)


def preload(client: redis.Redis, stream: str, count: int, make: Any, chunk: int = 10_000) -> float:
    """XADD ``count`` entries in pipelined chunks; returns seconds taken."""
    started = time.perf_counter()
    stamp = now_iso(datetime.now(UTC))
    for first in range(0, count, chunk):
        pipe = client.pipeline(transaction=False)
        for n in range(first, min(first + chunk, count)):
            pipe.xadd(stream, make(n, stamp))
        pipe.execute()
    return time.perf_counter() - started


@dataclass
class Stage:
    """A stage process started through the console script."""

    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    peak_rss_mb: float = 0.0
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="qt-bench-", suffix=".log")[1]))

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([EXE, *self.args], env=os.environ | self.env, stderr=out, stdout=out)

    def sample(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            rss = psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except psutil.Error:
            return
        self.peak_rss_mb = max(self.peak_rss_mb, rss)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def stages(url: str, specs: list[tuple[str, str]], extra: dict[str, str] | None = None) -> list[Stage]:
    """Processes for (command, consumer) pairs, sharing the bench environment (plus ``extra``)."""
    env = os.environ | ENV | (extra or {})
    return [Stage([command], env | {"QT_REDIS_URL": url, "QT_CONSUMER": name}) for command, name in specs]


def wait_for(
    client: redis.Redis,
    stream: str,
    target: int,
    procs: list[Stage],
    limit_s: float,
    stall_s: float | None = None,
) -> float:
    """Sample RSS until ``stream`` holds ``target`` entries; returns the wall time waited.

    Fails after ``limit_s``, or as soon as ``stream`` has not grown for ``stall_s`` (when given).
    """
    started = last_change = time.perf_counter()
    for stage in procs:
        stage.sample()
    seen = client.xlen(stream)
    while seen < target:
        for stage in procs:
            stage.sample()
            if stage.proc is not None and stage.proc.poll() is not None:
                raise RuntimeError(f"{stage.args} exited with {stage.proc.returncode}; see {stage.log}")
        now = time.perf_counter()
        if now - started > limit_s:
            raise RuntimeError(f"{stream} reached {seen} of {target} within {limit_s:.0f}s")
        if stall_s is not None and now - last_change > stall_s:
            raise RuntimeError(f"{stream} stuck at {seen} of {target} for {stall_s:.0f}s")
        time.sleep(0.05)
        count = client.xlen(stream)
        if count != seen:
            seen, last_change = count, time.perf_counter()
    return time.perf_counter() - started


def id_ms(entry_id: str) -> int:
    """Server milliseconds of a stream id."""
    return int(entry_id.split("-", 1)[0])


def span_rate(client: redis.Redis, stream: str, count: int) -> float:
    """Entries per second between the first and the last entry of ``stream`` (server clock)."""
    first = client.xrange(stream, count=1)[0][0]
    last = client.xrevrange(stream, count=1)[0][0]
    elapsed_ms = max(1, id_ms(last) - id_ms(first))
    return count / (elapsed_ms / 1000)


def used_memory_mb(client: redis.Redis) -> float:
    """The server's used_memory, in MB."""
    return int(client.info("memory")["used_memory"]) / 2**20


def entries_added(client: redis.Redis, stream: str) -> int:
    """Entries ever added to ``stream`` (trimming does not lower it); 0 when it does not exist."""
    if not client.exists(stream):
        return 0
    return int(client.xinfo_stream(stream)["entries-added"])


def paper_orders_mb(client: redis.Redis) -> float:
    """MEMORY USAGE of the paper exchange's order records (every ``quantum:paper:order*`` key), in MB."""
    found = list(client.scan_iter(match=f"{keys.PAPER_PREFIX}order*", count=10_000))
    total = 0
    for first in range(0, len(found), 10_000):
        pipe = client.pipeline(transaction=False)
        for key in found[first : first + 10_000]:
            pipe.memory_usage(key)
        total += sum(int(size or 0) for size in pipe.execute())
    return total / 2**20


async def sleep_until(deadline: float) -> None:
    """asyncio sleep until a perf_counter deadline."""
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
