"""Prometheus metrics: what the stages did (counted as they do it) and what the server holds (read at scrape time).

Two kinds, on one registry per process (``Metrics``):

- **In the stages**, counted from each batch, never per entry on the hot path: outcomes by stage,
  status and reason (one ``inc`` per group of a batch), the decision → result latency (one lock
  per batch: ``BatchHistogram``), and the exchange's calls, timed with their errors by kind
  (``InstrumentedExchange``, around the adapter).
- **In the server**, read when Prometheus scrapes (``StateCollector``): stream lengths, each
  group's lag and pending entries, the trading state and the kill switch, today's count and
  limit, the book's positions and equity, the journal's lag and the latest reconciliation's
  differences. One pipeline per scrape on a synchronous client (the exporter answers from its
  own thread); a scrape that cannot reach the server says ``quantum_trader_up 0`` and no more.

``start_exporter`` serves a process's registry over HTTP (``QT_METRICS_PORT``; the runner starts
it); ``asgi_app`` is the same registry as an ASGI application for the web server's ``/metrics``.
prometheus-client costs ~50 ms to import: the runner imports this module only when asked.

One piece: every metric's name, type and labels are defined here and nowhere else, so the
README's list and the Grafana dashboard (``ops/grafana/quantum-trader.json``, whose names the
tests check against this module) have one source; the two halves share the registry and its lifetime.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    make_asgi_app,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from quantum_trader import keys, portfolio, risk
from quantum_trader.bus.access import read_url_file
from quantum_trader.bus.cluster import is_cluster_url, sync_cluster_client
from quantum_trader.bus.embedded import client_name
from quantum_trader.errors import (
    ConfigError,
    ExchangeError,
    FatalExchangeError,
    QuantumTraderError,
    TransientError,
    TransientExchangeError,
)
from quantum_trader.events import TradingState
from quantum_trader.exchanges.base import Exchange, ExchangeOrder, Guards, OrderOutcome, OrderRequest
from quantum_trader.logs import get_logger
from quantum_trader.portfolio import PortfolioError, Position
from quantum_trader.redaction import redact_url, redact_urls
from quantum_trader.settings import Settings

log = get_logger("metrics")

PREFIX = "quantum_trader"
T = TypeVar("T")

# Decision → result: from a fill in milliseconds to an intent that waited out QT_MAX_INTENT_AGE_S.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# One call to an exchange: a paper MGET (under a millisecond) to a ccxt order tracked until final.
EXCHANGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
EXCHANGE_CALLS = ("place_orders", "fetch_orders", "last_prices", "balances", "fetch_activity")
SCRAPE_TIMEOUT_S = 2.0  # a scrape of an unreachable server answers quickly with up 0


class BatchHistogram(Collector):
    """A histogram observed a batch at a time: one lock per batch, a bisect per value.

    prometheus-client's ``Histogram.observe`` takes two locks per value; a batch of a thousand
    results would pay that a thousand times on the stage's event loop.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(float(bound) for bound in buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: Iterable[float]) -> None:
        """Add every value (seconds)."""
        counts = [0] * len(self._counts)
        total = 0.0
        where = bisect.bisect_left  # ``le`` buckets: a value equal to a bound is in that bound's bucket
        bounds = self.bounds
        for value in values:
            counts[where(bounds, value)] += 1
            total += value
        with self._lock:
            for index, count in enumerate(counts):
                self._counts[index] += count
            self._sum += total

    def describe(self) -> Iterable[Metric]:
        """The family without samples (registering never collects)."""
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        """Cumulative buckets, count and sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, total)
        return [family]


def epoch_s(stamp: str) -> float | None:
    """An ISO-8601 timestamp as seconds since the epoch (naive means UTC); None when it is not one."""
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def error_kind(exc: BaseException) -> str:
    """The ``kind`` label of an exchange call's error."""
    if isinstance(exc, FatalExchangeError):
        return "auth"
    if type(exc).__name__ == "OrderStateUnknown":
        return "order_state_unknown"
    if isinstance(exc, TransientExchangeError):
        return "transient"
    if isinstance(exc, ExchangeError):
        return "refused"
    if isinstance(exc, (RedisError, OSError, TransientError)):
        return "unreachable"  # the paper exchange's server, or the network
    if isinstance(exc, QuantumTraderError):
        return "error"
    return "unexpected"


class Metrics:
    """The metrics a process counts while its stages run, on one registry.

    Stages get it from the runner (None: nothing counted, nothing paid). Children of the labelled
    metrics are looked up once and kept, so a batch pays a dict lookup and one ``inc`` per group.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.outcomes = Counter(
            f"{PREFIX}_outcomes",
            "Terminal outcomes written: execution's results by status and reason, the router's intents "
            "(ROUTED) and rejections (REJECTED with INVALID or DUPLICATE_SKIP)",
            ("stage", "status", "reason"),
            registry=self.registry,
        )
        self.decision_latency = BatchHistogram(
            f"{PREFIX}_decision_latency_seconds",
            "From a decision's timestamp to its intent's result committed, per result",
            LATENCY_BUCKETS,
        )
        self.registry.register(self.decision_latency)
        self.exchange_seconds = Histogram(
            f"{PREFIX}_exchange_request_seconds",
            "One call to the exchange adapter (a whole batch for place_orders and fetch_orders)",
            ("exchange", "call"),
            buckets=EXCHANGE_BUCKETS,
            registry=self.registry,
        )
        self.exchange_errors = Counter(
            f"{PREFIX}_exchange_errors",
            "Exchange calls that raised, by kind, and orders the exchange answered FAILED, by reason",
            ("exchange", "kind"),
            registry=self.registry,
        )
        self._outcome: dict[tuple[str, str, str], Any] = {}
        self._errors: dict[tuple[str, str], Any] = {}
        self.state: StateCollector | None = None

    @classmethod
    def for_process(cls, settings: Settings) -> Metrics:
        """A process's registry: its stages' metrics, the server's state at scrape time, and the
        process's own (CPU, memory, file descriptors, garbage collection, Python version)."""
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        metrics = cls(registry)
        metrics.state = StateCollector(settings)
        registry.register(metrics.state)
        return metrics

    def count(self, stage: str, status: str, reason: str, amount: int) -> None:
        """``amount`` outcomes of one kind (nothing for 0)."""
        if amount <= 0:
            return
        key = (stage, status, reason)
        child = self._outcome.get(key)
        if child is None:
            child = self._outcome[key] = self.outcomes.labels(stage, status, reason)
        child.inc(amount)

    def results(self, stage: str, outcomes: Iterable[tuple[str, str, str]], committed_at: float) -> None:
        """A committed batch: (status, reason, the decision's ISO timestamp) per result; ``committed_at``
        in seconds since the epoch. One ``inc`` per (status, reason) and one histogram update."""
        groups: dict[tuple[str, str], int] = {}
        latencies: list[float] = []
        seen: dict[str, float | None] = {}  # a batch's decisions often share their timestamp
        for status, reason, decided in outcomes:
            key = (status, reason)
            groups[key] = groups.get(key, 0) + 1
            if decided in seen:
                at = seen[decided]
            else:
                at = seen[decided] = epoch_s(decided)
            if at is not None:
                latencies.append(max(0.0, committed_at - at))
        for (status, reason), amount in groups.items():
            self.count(stage, status, reason, amount)
        if latencies:
            self.decision_latency.observe_many(latencies)

    def exchange_error(self, exchange: str, kind: str, amount: int = 1) -> None:
        """``amount`` errors of one kind."""
        key = (exchange, kind)
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = self.exchange_errors.labels(exchange, kind)
        child.inc(amount)

    def instrument(self, exchange: Exchange) -> InstrumentedExchange:
        """``exchange`` with its calls timed and its errors counted."""
        return InstrumentedExchange(exchange, self)

    def close(self) -> None:
        """Release the scrape-time client."""
        if self.state is not None:
            self.state.close()


class InstrumentedExchange:
    """An exchange adapter whose calls are timed (``exchange_request_seconds``) and whose errors are
    counted by kind; everything else (the adapter's own methods and attributes) passes through."""

    def __init__(self, inner: Exchange, metrics: Metrics) -> None:
        self.inner = inner
        self.name = inner.name
        self.activity_unrecorded_only = inner.activity_unrecorded_only
        self._metrics = metrics
        self._seconds = {call: metrics.exchange_seconds.labels(inner.name, call) for call in EXCHANGE_CALLS}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _timed(self, call: str, request: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await request
        except Exception as exc:
            self._metrics.exchange_error(self.name, error_kind(exc))
            raise
        finally:
            self._seconds[call].observe(time.perf_counter() - started)

    async def last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        """The adapter's ``last_prices``, timed."""
        return await self._timed("last_prices", self.inner.last_prices(symbols))

    async def fetch_orders(self, client_order_ids: list[str]) -> dict[str, OrderOutcome]:
        """The adapter's ``fetch_orders``, timed."""
        return await self._timed("fetch_orders", self.inner.fetch_orders(client_order_ids))

    async def place_orders(self, orders: list[OrderRequest], guard: Guards | None = None) -> list[OrderOutcome]:
        """The adapter's ``place_orders``, timed; orders it answers FAILED count as errors of their reason."""
        outcomes = await self._timed("place_orders", self.inner.place_orders(orders, guard))
        failed: dict[str, int] = {}
        for outcome in outcomes:
            if outcome.status == "FAILED":
                failed[outcome.reason] = failed.get(outcome.reason, 0) + 1
        for reason, amount in failed.items():
            self._metrics.exchange_error(self.name, reason or "FAILED", amount)
        return outcomes

    async def balances(self) -> dict[str, Decimal]:
        """The adapter's ``balances``, timed."""
        return await self._timed("balances", self.inner.balances())

    async def fetch_activity(self, symbols: list[str], since_ms: int) -> list[ExchangeOrder] | None:
        """The adapter's ``fetch_activity``, timed."""
        return await self._timed("fetch_activity", self.inner.fetch_activity(symbols, since_ms))

    async def close(self) -> None:
        """Close the adapter."""
        await self.inner.close()


@dataclass(frozen=True, slots=True)
class _Families:
    """One scrape's gauges, filled from the server's replies."""

    stream_length: GaugeMetricFamily
    group_lag: GaugeMetricFamily
    group_pending: GaugeMetricFamily
    group_consumers: GaugeMetricFamily
    trading_state: GaugeMetricFamily
    kill_switch: GaugeMetricFamily
    daily_trades: GaugeMetricFamily
    daily_limit: GaugeMetricFamily
    position_qty: GaugeMetricFamily
    position_value: GaugeMetricFamily
    equity: GaugeMetricFamily
    journal_lag: GaugeMetricFamily
    reconcile_differences: GaugeMetricFamily
    reconcile_time: GaugeMetricFamily

    @classmethod
    def empty(cls) -> _Families:
        g = GaugeMetricFamily
        return cls(
            stream_length=g(f"{PREFIX}_stream_length", "Entries in the stream (XLEN)", labels=["stream"]),
            group_lag=g(
                f"{PREFIX}_group_lag",
                "Entries of the stream the group has not read yet (absent when the server cannot tell)",
                labels=["stream", "group"],
            ),
            group_pending=g(
                f"{PREFIX}_group_pending",
                "Entries the group read and has not acknowledged",
                labels=["stream", "group"],
            ),
            group_consumers=g(f"{PREFIX}_group_consumers", "Consumers of the group", labels=["stream", "group"]),
            trading_state=g(
                f"{PREFIX}_trading_state",
                "1 for the trading state as stored (ACTIVE, REDUCING, HALTED), 0 for the others",
                labels=["state"],
            ),
            kill_switch=g(
                f"{PREFIX}_kill_switch_engaged",
                "1 while the kill switch halts trading (quantum:kill is anything but the string 0)",
            ),
            daily_trades=g(f"{PREFIX}_daily_trades", "Trades approved today (UTC day)"),
            daily_limit=g(f"{PREFIX}_daily_trades_limit", "Trades allowed per UTC day (QT_DAILY_LIMIT)"),
            position_qty=g(
                f"{PREFIX}_position_qty", "The book's position in the base asset", labels=["symbol", "base"]
            ),
            position_value=g(
                f"{PREFIX}_position_value",
                "The book's position valued at the last price, in the quote asset",
                labels=["symbol", "quote"],
            ),
            equity=g(
                f"{PREFIX}_equity",
                "Capital (QT_RISK_CAPITAL, paper balances in paper mode) plus realised and unrealised PnL",
                labels=["quote"],
            ),
            journal_lag=g(
                f"{PREFIX}_journal_lag",
                "Results the journal has not read yet (its group's lag on the result stream)",
            ),
            reconcile_differences=g(
                f"{PREFIX}_reconcile_differences",
                "Differences the latest reconciliation found between the exchange and the book",
            ),
            reconcile_time=g(
                f"{PREFIX}_reconcile_timestamp_seconds", "When the latest reconciliation ran (seconds since the epoch)"
            ),
        )

    def all(self) -> list[Metric]:
        return [getattr(self, each.name) for each in fields(self)]


def _up(value: float) -> GaugeMetricFamily:
    up = GaugeMetricFamily(f"{PREFIX}_up", "1 when this scrape read the stream server, 0 when it could not")
    up.add_metric([], value)
    return up


def _scrape_seconds(value: float) -> GaugeMetricFamily:
    took = GaugeMetricFamily(f"{PREFIX}_scrape_duration_seconds", "How long this scrape's read of the server took")
    took.add_metric([], value)
    return took


def _float(value: Decimal) -> float:
    return float(value) if value.is_finite() else float("nan")


class StateCollector(Collector):
    """The pipeline's state in the server, read at scrape time in one pipeline.

    The server's URL: ``QT_REDIS_URL``, else the embedded server's URL file in the data directory,
    looked up at each scrape (a restarted embedded server may have a new one); the client is kept
    while the URL holds. Its connections carry the process's client name, so the embedded server's
    last user still knows it is the last.
    """

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        self.settings = settings
        self._url = url
        self._client: Any = None
        self._client_url = ""
        self._lock = threading.Lock()
        self._was_up: bool | None = None

    def url(self) -> str:
        """The server this collector reads."""
        if self._url:
            return self._url
        if self.settings.redis_url:
            return self.settings.redis_url
        found = read_url_file(self.settings.data_dir)
        if not found:
            raise ConfigError(f"no embedded server is running for {self.settings.data_dir} (no server.url)")
        return found

    def client(self) -> Any:
        """A synchronous client on ``url()``; redis-py's clients are safe across the exporter's threads."""
        url = self.url()
        with self._lock:
            if self._client is None or url != self._client_url:
                if self._client is not None:
                    self._client.close()
                # The key names follow the server's kind, as in the stages (``keys.use_cluster_names``).
                keys.use_cluster_names(is_cluster_url(url))
                if is_cluster_url(url):
                    self._client = sync_cluster_client(url, SCRAPE_TIMEOUT_S)
                else:
                    self._client = redis.Redis.from_url(
                        url,
                        decode_responses=True,
                        encoding_errors="surrogateescape",
                        client_name=client_name(),
                        socket_connect_timeout=SCRAPE_TIMEOUT_S,
                        socket_timeout=SCRAPE_TIMEOUT_S,
                        retry_on_timeout=False,
                    )
                self._client_url = url
            return self._client

    def close(self) -> None:
        """Close the client (the next scrape opens another)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def describe(self) -> Iterable[Metric]:
        """The families without samples: registering never reads the server."""
        return [_up(0), _scrape_seconds(0), *_Families.empty().all()]

    def collect(self) -> Iterator[Metric]:
        """Every gauge, or ``quantum_trader_up 0`` alone when the server cannot be read."""
        started = time.perf_counter()
        try:
            families = self.read()
        except (RedisError, OSError, QuantumTraderError) as exc:
            if self._was_up is not False:
                log.warning(
                    "metrics_server_unreachable",
                    error=redact_urls(str(exc)),
                    effect="scrapes report quantum_trader_up 0 until it answers",
                )
            self._was_up = False
            yield _up(0)
            yield _scrape_seconds(time.perf_counter() - started)
            return
        if self._was_up is False:
            log.info("metrics_server_reachable", url=redact_url(self._client_url))
        self._was_up = True
        yield _up(1)
        yield _scrape_seconds(time.perf_counter() - started)
        yield from families.all()

    def read(self) -> _Families:
        """One pipeline: the streams and their groups, the switches, today's count, the book, the
        latest reconciliation; then the figures, computed here."""
        settings = self.settings
        streams = settings.pipeline_streams()
        day = datetime.now(UTC).date()
        with self.client().pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
            pipe.type(keys.KILL_SWITCH)
            pipe.execute_command("MGET", keys.KILL_SWITCH)  # MGET: nil, never WRONGTYPE, for a key of another type
            pipe.type(keys.TRADING_STATE)
            pipe.hgetall(keys.TRADING_STATE)
            pipe.execute_command("MGET", keys.daily_trades(day))
            pipe.hgetall(keys.BOOK_POSITIONS)
            pipe.hgetall(keys.PRICE_HASH)
            pipe.execute_command("MGET", keys.BOOK_RECONCILED)
            replies = pipe.execute(raise_on_error=False)
        out = _Families.empty()
        for index, stream in enumerate(streams):
            length, groups = replies[2 * index], replies[2 * index + 1]
            if isinstance(length, Exception):
                continue  # a key of another type under a stream's name: nothing to report
            out.stream_length.add_metric([stream], float(length))
            for group in groups if isinstance(groups, list) else []:
                name = str(group["name"])
                out.group_pending.add_metric([stream, name], float(group["pending"]))
                out.group_consumers.add_metric([stream, name], float(group["consumers"]))
                lag = group.get("lag")
                if lag is not None:
                    out.group_lag.add_metric([stream, name], float(lag))
                    if stream == settings.result_stream and name == settings.journal_group:
                        out.journal_lag.add_metric([], float(lag))
        kill_kind, (kill,), state_kind, state_fields, (count,), stored, prices, (reconciled,) = (
            reply if not isinstance(reply, Exception) else _FALLBACK[i]
            for i, reply in enumerate(replies[2 * len(streams) :])
        )
        out.kill_switch.add_metric([], 0.0 if kill_kind == "string" and kill == "0" else 1.0)
        state = risk.read_state(str(state_kind), state_fields).state
        for each in TradingState:
            out.trading_state.add_metric([each.value], 1.0 if each is state else 0.0)
        with contextlib.suppress(ValueError):  # not a count: the gate refuses to approve on it
            out.daily_trades.add_metric([], float(int(count or 0)))
        out.daily_limit.add_metric([], float(settings.effective_daily_limit))
        self._book(out, stored, prices)
        self._reconciled(out, reconciled)
        return out

    def _book(self, out: _Families, stored: dict[str, str], prices: dict[str, str]) -> None:
        positions: dict[str, Position] = {}
        for symbol, raw in sorted(stored.items()):
            try:
                positions[symbol] = portfolio.decode_stored(symbol, raw)
            except PortfolioError:
                continue  # `quantum-trader positions` names the unreadable one and its repair
        marks: dict[str, Decimal] = {}
        for symbol, position in positions.items():
            mark = position.last_price
            try:
                price = Decimal(prices[symbol]) if symbol in prices else None
            except ArithmeticError:
                price = None
            if price is not None and price.is_finite() and price > 0:
                mark = price
            if mark is not None:
                marks[symbol] = mark
            out.position_qty.add_metric([symbol, position.base], _float(position.qty))
            out.position_value.add_metric([symbol, position.quote], _float(position.value(mark)))
        for quote, value in sorted(risk.equity(positions, marks, self.settings.effective_risk_capital).items()):
            out.equity.add_metric([quote], _float(value))

    @staticmethod
    def _reconciled(out: _Families, raw: str | None) -> None:
        if raw is None:
            return
        try:
            report = json.loads(raw)
            differences = report["differences"]
            at = epoch_s(str(report.get("at", "")))
        except (ValueError, KeyError, TypeError):
            return  # `quantum-trader doctor` reports an unreadable reconciliation
        if isinstance(differences, list):
            out.reconcile_differences.add_metric([], float(len(differences)))
        if at is not None:
            out.reconcile_time.add_metric([], at)


# What each reply after the streams' stands for when the server refused it (a key of another type).
_FALLBACK: tuple[Any, ...] = ("none", [None], "string", {}, [None], {}, {}, [None])


def asgi_app(settings: Settings, metrics: Metrics | None = None) -> Any:
    """The metrics as an ASGI application (the web server mounts it at ``/metrics``).

    ``metrics``: the process's own, when the web server runs beside stages (``run`` with
    QT_RUN_WEB); without it, a registry of the web process: the server's state and its own figures.
    """
    return make_asgi_app((metrics or Metrics.for_process(settings)).registry)


@dataclass
class Exporter:
    """The HTTP server of a process's metrics, in a thread of its own."""

    server: Any
    thread: threading.Thread
    metrics: Metrics
    address: str

    def close(self) -> None:
        """Stop serving (waits for the server's loop, up to half a second) and close the client."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.metrics.close()


def start_exporter(settings: Settings, metrics: Metrics) -> Exporter:
    """Serve ``metrics`` on QT_METRICS_PORT, at the address of the web server (QT_WEB_HOST, loopback by
    default). Several processes on one host need one port each; a port in use is a ConfigError."""
    port = settings.metrics_port
    if port is None:
        raise ConfigError("QT_METRICS_PORT is not set: no metrics endpoint to start")
    host = settings.web_host
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(
            f"QT_METRICS_PORT={port}: cannot listen on {host}:{port} ({exc.strerror or exc}); every process "
            "on a host needs a port of its own (another quantum-trader process may hold this one)"
        ) from None
    log.info("metrics_serving", address=f"http://{host}:{port}/metrics")
    return Exporter(server, thread, metrics, f"{host}:{port}")
