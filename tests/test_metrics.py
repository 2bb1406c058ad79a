"""Prometheus metrics: outcomes counted per batch, the decision latency, the exchange's calls, the
server's state read at scrape time (and ``up 0`` without a server), the endpoint of ``run``.

Every test builds its own registry: nothing is left in prometheus-client's global one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from quantum_trader import keys, risk, trading
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.embedded import free_port
from quantum_trader.bus.streams import publish
from quantum_trader.errors import ConfigError, FatalExchangeError, TransientExchangeError
from quantum_trader.events import TradingState
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.metrics import LATENCY_BUCKETS, Metrics, StateCollector, asgi_app, error_kind, start_exporter
from quantum_trader.reconcile import Difference, Kind, Report, encode_report
from quantum_trader.router import Router
from quantum_trader.runner import serve
from quantum_trader.settings import Settings
from tests.pipeline import decision, drain, results

DECISIONS = "quantum:stream:ai.decision"
INTENTS = "quantum:stream:trade.intent"
RESULTS = "quantum:stream:execution.result"
OUTCOMES = "quantum_trader_outcomes_total"
DASHBOARD = Path(__file__).resolve().parents[1] / "ops" / "grafana" / "quantum-trader.json"


@pytest.fixture
def settings(settings_for: Callable[..., Settings], clean_url: str) -> Settings:
    return settings_for(
        clean_url,
        block_ms=10,
        paper_balances={"USDT": Decimal(10_000)},
        paper_fee_rate=Decimal(0),
        max_notional=Decimal(5_000),
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def state(settings: Settings) -> Iterator[tuple[CollectorRegistry, StateCollector]]:
    """The scrape-time collector alone, on a registry of its own."""
    registry = CollectorRegistry()
    collector = StateCollector(settings)
    registry.register(collector)
    try:
        yield registry, collector
    finally:
        collector.close()


class Flow:
    """Router and execution in this process, counting into ``metrics``."""

    def __init__(self, r: Redis, settings: Settings, metrics: Metrics | None) -> None:
        self.r = r
        self.paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
        self.router = Router(r, settings, metrics=metrics)
        self.execution = Execution(r, settings, self.paper, metrics=metrics)

    async def run(self, *decisions: dict[str, str]) -> list[dict[str, Any]]:
        await self.paper.fund()
        await publish(self.r, DECISIONS, list(decisions))
        await drain(self.router)
        await drain(self.execution)
        return await results(self.r)


async def every_outcome(r: Redis, settings: Settings, metrics: Metrics) -> list[dict[str, Any]]:
    """Two fills, a notional over the limit, a sale beyond the balance, an expired decision, an
    invalid one and a duplicate: every kind of outcome, counted by the router and execution."""
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    flow = Flow(r, settings, metrics)
    return await flow.run(
        decision(qty="0.1", trace="a", corr="a"),
        decision(qty="0.1"),
        decision(qty="2"),  # 6,000 > QT_MAX_NOTIONAL 5,000
        decision(side="SELL", qty="1"),  # the account holds 0.2 ETH
        decision(qty="0.1", timestamp=datetime.now(UTC) - timedelta(minutes=5)),  # older than QT_MAX_INTENT_AGE_S
        decision(side="HOLD"),
        decision(qty="0.1", trace="a", corr="a"),  # the first one again
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_outcomes_are_counted_per_status_and_reason_as_the_streams_hold_them(
    r: Redis, settings: Settings, metrics: Metrics
) -> None:
    written = await every_outcome(r, settings, metrics)

    by_kind = Counter((res["status"], res["reason"]) for res in written)
    assert by_kind == {
        ("FILLED", ""): 2,
        ("REJECTED", "MAX_NOTIONAL"): 1,
        ("REJECTED", "INSUFFICIENT_BALANCE"): 1,
        ("EXPIRED", "EXPIRED"): 1,
    }
    reg = metrics.registry
    for (status, reason), count in by_kind.items():
        assert sample(reg, OUTCOMES, stage="execution", status=status, reason=reason) == count
    assert sample(reg, OUTCOMES, stage="router", status="ROUTED", reason="") == 5
    assert sample(reg, OUTCOMES, stage="router", status="REJECTED", reason="INVALID") == 1
    assert sample(reg, OUTCOMES, stage="router", status="REJECTED", reason="DUPLICATE_SKIP") == 1
    assert sample(reg, OUTCOMES, stage="execution", status="FAILED", reason="") is None


async def test_the_latency_histogram_holds_one_observation_per_result(
    r: Redis, settings: Settings, metrics: Metrics
) -> None:
    written = await every_outcome(r, settings, metrics)

    reg = metrics.registry
    name = "quantum_trader_decision_latency_seconds"
    assert sample(reg, f"{name}_count") == len(written) == 5
    # Four decisions of a moment ago; the expired one is five minutes old, above every bound.
    assert sample(reg, f"{name}_bucket", le="60.0") == 4
    assert sample(reg, f"{name}_bucket", le=repr(LATENCY_BUCKETS[-1])) == 4
    assert sample(reg, f"{name}_bucket", le="+Inf") == 5
    total = sample(reg, f"{name}_sum")
    assert total is not None
    assert 300 < total < 330
    buckets = [sample(reg, f"{name}_bucket", le=repr(bound)) or 0 for bound in LATENCY_BUCKETS]
    assert buckets == sorted(buckets)  # cumulative


async def test_the_exchange_calls_of_a_batch_are_timed(r: Redis, settings: Settings, metrics: Metrics) -> None:
    await every_outcome(r, settings, metrics)

    reg = metrics.registry
    seconds = "quantum_trader_exchange_request_seconds_count"
    assert (sample(reg, seconds, exchange="paper", call="place_orders") or 0) >= 1
    assert (sample(reg, seconds, exchange="paper", call="last_prices") or 0) >= 1
    assert sample(reg, "quantum_trader_exchange_errors_total", exchange="paper", kind="unreachable") is None


def test_a_batch_pays_one_increment_per_status_and_reason(metrics: Metrics) -> None:
    counted: list[tuple[str, str, str, int]] = []
    original = metrics.count

    def spy(stage: str, status: str, reason: str, amount: int) -> None:
        counted.append((stage, status, reason, amount))
        original(stage, status, reason, amount)

    metrics.count = spy  # type: ignore[method-assign]
    stamp = datetime.now(UTC).isoformat()
    batch = [("FILLED", "", stamp)] * 900 + [("REJECTED", "KILL_SWITCH", stamp)] * 100 + [("EXPIRED", "EXPIRED", "?")]
    metrics.results("execution", batch, time.time())

    assert sorted(counted) == [
        ("execution", "EXPIRED", "EXPIRED", 1),
        ("execution", "FILLED", "", 900),
        ("execution", "REJECTED", "KILL_SWITCH", 100),
    ]
    # An unreadable timestamp has no latency; the others one each.
    assert sample(metrics.registry, "quantum_trader_decision_latency_seconds_count") == 1000


class _Refusing:
    name = "stub"
    activity_unrecorded_only = False

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.closed = False

    async def balances(self) -> dict[str, Decimal]:
        raise self.error

    async def last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        return {symbol: Decimal(1) for symbol in symbols}

    def extra(self) -> str:
        return "passed through"

    async def close(self) -> None:
        self.closed = True


async def test_exchange_errors_are_counted_by_kind_and_raised_as_they_were(metrics: Metrics) -> None:
    inner = _Refusing(FatalExchangeError("bad key"))
    exchange = metrics.instrument(inner)  # type: ignore[arg-type]

    with pytest.raises(FatalExchangeError):
        await exchange.balances()
    assert await exchange.last_prices(["ETHUSDT"]) == {"ETHUSDT": Decimal(1)}
    assert exchange.extra() == "passed through"
    await exchange.close()

    reg = metrics.registry
    assert sample(reg, "quantum_trader_exchange_errors_total", exchange="stub", kind="auth") == 1
    assert sample(reg, "quantum_trader_exchange_request_seconds_count", exchange="stub", call="balances") == 1
    assert sample(reg, "quantum_trader_exchange_request_seconds_count", exchange="stub", call="last_prices") == 1
    assert inner.closed
    assert error_kind(TransientExchangeError("timeout")) == "transient"
    assert error_kind(ConnectionError("refused")) == "unreachable"


async def test_an_instrumented_paper_exchange_still_gets_its_order_records_expired(
    r: Redis, settings: Settings, metrics: Metrics
) -> None:
    execution = Execution(r, settings, PaperExchange(r), metrics=metrics)

    assert execution.committer.paper_records
    assert execution.exchange.name == "paper"
    assert execution.exchange.activity_unrecorded_only


async def test_the_gauges_read_streams_groups_switches_and_the_book(
    r: Redis, settings: Settings, metrics: Metrics, state: tuple[CollectorRegistry, StateCollector]
) -> None:
    registry, _collector = state
    await every_outcome(r, settings, metrics)
    await r.xgroup_create(RESULTS, settings.journal_group, id="0")  # a journal that has read nothing yet
    await publish(r, DECISIONS, [decision() for _ in range(3)])  # waiting for the router
    await r.set(keys.BOOK_RECONCILED, encode_report(_report(differences=2)))

    def gauge(name: str, **labels: str) -> float | None:
        return sample(registry, f"quantum_trader_{name}", **labels)

    assert gauge("up") == 1
    assert gauge("stream_length", stream=DECISIONS) == 10
    assert gauge("stream_length", stream=INTENTS) == 5
    assert gauge("stream_length", stream=RESULTS) == 5
    assert gauge("stream_length", stream=settings.rejected_stream) == 2
    assert gauge("group_lag", stream=DECISIONS, group=settings.router_group) == 3
    assert gauge("group_pending", stream=DECISIONS, group=settings.router_group) == 0
    assert gauge("group_lag", stream=INTENTS, group=settings.execution_group) == 0
    assert gauge("group_pending", stream=INTENTS, group=settings.execution_group) == 0
    assert gauge("group_lag", stream=RESULTS, group=settings.journal_group) == 5
    assert gauge("journal_lag") == 5
    assert gauge("kill_switch_engaged") == 0
    assert [gauge("trading_state", state=s.value) for s in TradingState] == [1, 0, 0]
    today = datetime.now(UTC).date()
    assert gauge("daily_trades") == int(await r.get(keys.daily_trades(today))) == 3  # two fills and the refused sale
    assert gauge("daily_trades_limit") == settings.effective_daily_limit
    assert gauge("position_qty", symbol="ETHUSDT", base="ETH") == 0.2
    assert gauge("position_value", symbol="ETHUSDT", quote="USDT") == 600
    limits = risk.RiskLimits.from_settings(settings)
    snapshot = await trading.read_snapshot(r, limits, [], datetime.now(UTC), full=True)
    assert gauge("equity", quote="USDT") == float(risk.breakers(snapshot, limits).equity["USDT"])
    assert gauge("reconcile_differences") == 2

    await r.set(keys.KILL_SWITCH, "1")
    await trading.set_state(r, settings, TradingState.HALTED, "maintenance", "test")
    assert gauge("kill_switch_engaged") == 1
    assert [gauge("trading_state", state=s.value) for s in TradingState] == [0, 0, 1]
    await r.delete(keys.KILL_SWITCH)  # absent: halted (fail-closed)
    assert gauge("kill_switch_engaged") == 1


def _report(differences: int) -> Report:
    found = [Difference(kind=Kind.BALANCE, subject=f"A{n}", size=Decimal(1)) for n in range(differences)]
    return Report(at="2026-01-01T00:00:00Z", exchange="paper", differences=found, assets=2, orders=0, since="")


def test_a_scrape_without_a_server_says_up_0_and_nothing_else(settings_for: Callable[..., Settings]) -> None:
    registry = CollectorRegistry()
    collector = StateCollector(settings_for(f"redis://127.0.0.1:{free_port()}/0"))
    registry.register(collector)
    try:
        started = time.monotonic()
        text = generate_latest(registry).decode()
        assert time.monotonic() - started < 5
    finally:
        collector.close()

    assert "quantum_trader_up 0.0" in text
    assert "quantum_trader_stream_length" not in text
    assert "quantum_trader_kill_switch_engaged" not in text


def test_a_scrape_without_an_embedded_server_says_up_0(tmp_path: Any) -> None:
    collector = StateCollector(Settings(data_dir=tmp_path / "data"))
    registry = CollectorRegistry()
    registry.register(collector)

    assert sample(registry, "quantum_trader_up") == 0


async def test_the_asgi_app_serves_the_process_registry(settings: Settings) -> None:
    metrics = Metrics.for_process(settings)
    metrics.count("router", "ROUTED", "", 7)
    try:
        transport = httpx.ASGITransport(app=asgi_app(settings, metrics))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            reply = await client.get("/")
    finally:
        metrics.close()

    assert reply.status_code == 200
    assert 'quantum_trader_outcomes_total{reason="",stage="router",status="ROUTED"} 7.0' in reply.text
    assert "quantum_trader_up 1.0" in reply.text
    assert "process_cpu_seconds_total" in reply.text


def test_a_port_in_use_is_a_setting_error(settings_for: Callable[..., Settings], clean_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = settings_for(clean_url, metrics_port=port, web_host="127.0.0.1")
        metrics = Metrics(CollectorRegistry())
        with pytest.raises(ConfigError, match=f"QT_METRICS_PORT={port}"):
            start_exporter(settings, metrics)


def test_run_serves_its_metrics_over_http(clean_url: str, tmp_path: Any) -> None:
    client = redis.Redis.from_url(clean_url, decode_responses=True)
    try:
        client.set(keys.KILL_SWITCH, "0")
        client.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
        for fields in (decision(qty="0.01"), decision(qty="0.01"), decision(side="HOLD")):
            client.xadd(DECISIONS, fields)  # type: ignore[arg-type]
    finally:
        client.close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_REDIS_URL": clean_url,
        "QT_DATA_DIR": str(tmp_path / "data"),
        "QT_METRICS_PORT": str(port),
        "QT_WEB_HOST": "127.0.0.1",
        "QT_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "quantum_trader", "run", "--stages", "router,execution", "--duration", "8"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                    text = reply.read().decode()
            except OSError:
                time.sleep(0.1)
                continue
            if 'status="FILLED"} 2.0' in text:
                break
            time.sleep(0.1)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, err[-2000:]
    assert 'quantum_trader_outcomes_total{reason="",stage="execution",status="FILLED"} 2.0' in text
    assert 'quantum_trader_outcomes_total{reason="INVALID",stage="router",status="REJECTED"} 1.0' in text
    assert "quantum_trader_decision_latency_seconds_count 2.0" in text
    assert "quantum_trader_up 1.0" in text
    assert f'quantum_trader_stream_length{{stream="{RESULTS}"}} 2.0' in text
    assert "quantum_trader_kill_switch_engaged 0.0" in text


async def test_serve_stops_its_endpoint_with_its_stages(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    port = free_port()
    settings = settings_for(clean_url, block_ms=10, metrics_port=port, web_host="127.0.0.1")
    seen: list[str] = []

    async def scrape(_runner: Any) -> None:
        reply = await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", timeout=5)
        seen.append(reply.read().decode())

    await serve(r, settings, [keys.ROUTER], asyncio.Event(), duration=0.3, on_start=scrape)

    assert "quantum_trader_up 1.0" in seen[0]
    with socket.socket() as listener:  # nobody listens there any more (a closed connection may linger)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))


async def test_the_dashboard_uses_only_metrics_this_package_exports(
    r: Redis, settings: Settings, metrics: Metrics
) -> None:
    await every_outcome(r, settings, metrics)
    process = Metrics.for_process(settings)
    try:
        families = [*metrics.registry.collect(), *process.registry.collect(), *StateCollector(settings).describe()]
    finally:
        process.close()
    exported = {family.name for family in families} | {s.name for family in families for s in family.samples}
    exported |= {f"{family.name}_total" for family in families if family.type == "counter"}  # none counted yet
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used = set(re.findall(r"\b(?:quantum_trader|process)_[a-z_]+", json.dumps(dashboard["panels"])))

    assert used
    assert used <= exported, f"the dashboard queries metrics nobody exports: {sorted(used - exported)}"
