"""Wiring stages to the stream server: build, run side by side, heartbeat, trim, stop cleanly.

``serve`` runs any set of stages in one asyncio process (``quantum-trader run``) or
one stage alone (one systemd unit per stage). SIGTERM/SIGINT finish the batch in
hand, then exit. With QT_METRICS_PORT set, the process serves its Prometheus metrics
there (``metrics``) while it runs; off by default.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from quantum_trader import alerts, keys
from quantum_trader.bus.connection import Redis, server_version
from quantum_trader.bus.partitions import Partitioned, check_layout
from quantum_trader.bus.streams import Handler, sleep_or_stop, until_reachable
from quantum_trader.bus.trim import Retention, has_native_acked_trim, trim_consumed, trim_retained
from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.execution import Execution
from quantum_trader.governor import kill_state, set_kill
from quantum_trader.logs import get_logger
from quantum_trader.protect import Protect
from quantum_trader.reconcile import keep_reconciling
from quantum_trader.router import Router
from quantum_trader.settings import Settings

log = get_logger("runner")
if TYPE_CHECKING:
    from quantum_trader.ai_engine import AiEngine
    from quantum_trader.journal.stage import Journal
    from quantum_trader.metrics import Metrics

    Stage = AiEngine | Router | Execution | Journal | Protect
else:
    Stage = object


def halt_trading(redis: Redis) -> Callable[[str], Awaitable[None]]:
    """What a real exchange does when it refuses the credentials: turn the kill switch on (fail-closed)."""

    async def halt(_error: str) -> None:  # the adapter logs the error and the fix itself
        await set_kill(redis, on=True)

    return halt


async def build_stage(name: str, redis: Redis, settings: Settings, metrics: Metrics | None = None) -> Stage:
    """One stage, ready to run; with ``metrics``, the router and execution count their outcomes there."""
    if name == keys.AI_ENGINE:
        from quantum_trader.ai_engine import AiEngine  # numpy, pandas, scikit-learn: only when needed

        return AiEngine(redis, settings)
    if name == keys.ROUTER:
        return Router(redis, settings, metrics=metrics)
    if name == keys.EXECUTION:
        exchange = await build_exchange(redis, settings, on_auth_failure=halt_trading(redis))
        return Execution(redis, settings, exchange, metrics=metrics)
    if name == keys.JOURNAL:
        from quantum_trader.journal.stage import Journal  # SQLAlchemy, Alembic: only when needed

        return await Journal.open(redis, settings)
    if name == keys.PROTECT:
        return Protect(redis, settings)
    raise ConfigError(f"unknown stage {name!r}; choose from {', '.join(keys.STAGES)}")


def consumers_of(stage: Stage) -> list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]]:
    """Each consumer loop a stage runs: one for most stages, one per stream for the journal, the partitions'
    for execution with QT_PARTITIONS > 1."""
    if hasattr(stage, "consumers"):
        return [functools.partial(consumer.run, handler) for consumer, handler in stage.consumers]
    partitioned = getattr(stage, "partitioned", None)
    if isinstance(partitioned, Partitioned) and isinstance(stage, Execution):
        return [functools.partial(partitioned.run, stage.handle)]
    handler: Handler = stage.handle
    loops: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = [functools.partial(stage.consumer.run, handler)]
    if isinstance(partitioned, Partitioned) and isinstance(stage, Router):
        # The one decision stream (publishers that know nothing of partitions) and the decision partitions.
        loops.append(functools.partial(partitioned.run, stage.handle))
    return loops


def input_streams(stage: Stage) -> list[str]:
    """The streams a stage consumes (every partition of the intent stream, partitioned)."""
    partitioned = getattr(stage, "partitioned", None)
    if isinstance(partitioned, Partitioned) and isinstance(stage, Router):
        return [stage.consumer.stream, *partitioned.streams]
    if isinstance(partitioned, Partitioned):
        return list(partitioned.streams)
    return [stage.consumer.stream]


@dataclass
class Runner:
    """Runs stages until ``stop`` is set, with heartbeats and safe trimming."""

    redis: Redis
    settings: Settings
    stages: dict[str, Stage]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    web: bool = False  # also serve the dashboard and API (``run`` with QT_RUN_WEB)
    alerting: bool = True  # send alerts when QT_ALERT_URLS are configured (not the demo's private server)
    metrics: Metrics | None = None

    async def heartbeat(self) -> None:
        """Refresh one key per stage with an expiry; ``quantum-trader check`` reads it."""
        ttl = max(1, int(self.settings.heartbeat_s * 3))
        while not self.stop.is_set():
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name, stage in self.stages.items():
                        beat = {"pid": os.getpid(), "at": time.time(), "totals": stage.totals}
                        pipe.set(keys.heartbeat(name, stage.consumer.consumer), json.dumps(beat), ex=ttl)
                    await pipe.execute()
            except RedisError as exc:
                log.warning("heartbeat_failed", error=str(exc))
            await sleep_or_stop(self.stop, self.settings.heartbeat_s)

    async def trim(self) -> None:
        """Every ``QT_TRIM_INTERVAL_S``: trim each input stream up to what every group has finished,
        and bound the outcome streams these stages write to their retention."""
        try:
            server, version = await server_version(self.redis)
            native = has_native_acked_trim(server, version)
        except RedisError:
            native = False
        # The journal reads outcome streams: they keep their retention, not the consumed-input rule.
        inputs = list(
            dict.fromkeys(
                stream for name, stage in self.stages.items() if name != keys.JOURNAL for stream in input_streams(stage)
            )
        )
        outcomes = retained_streams(self.settings, list(self.stages))
        while not self.stop.is_set():
            await sleep_or_stop(self.stop, self.settings.trim_interval_s)
            for stream in inputs:
                try:
                    await trim_consumed(self.redis, stream, self.settings.trim_keep_s, native_acked=native)
                except RedisError as exc:
                    log.warning("trim_failed", stream=stream, error=str(exc))
            for stream, retention in outcomes.items():
                if stream in inputs:
                    continue  # an input keeps its backlog: only the group rule applies to it
                try:
                    await trim_retained(self.redis, stream, retention)
                except RedisError as exc:
                    log.warning("trim_failed", stream=stream, error=str(exc))

    async def reconcile(self) -> None:
        """Execution compares the exchange with the book at start, then every ``QT_RECONCILE_S``."""
        execution = self.stages.get(keys.EXECUTION)
        if isinstance(execution, Execution):
            await keep_reconciling(self.redis, execution.exchange, self.settings, self.stop)

    async def run(self) -> None:
        """Run every stage, the heartbeat, the trimmer and reconciliation; return once stopped."""
        await until_reachable(functools.partial(announce_kill_state, self.redis), self.stop, "kill switch")
        # QT_ALERT_URLS from the secrets file: a file that is unsafe or a URL that is unusable stops the
        # start here, in one line, rather than inside a task where the error would go unseen.
        alert_urls = alerts.alert_urls(self.settings) if self.alerting else []
        tasks = [
            asyncio.create_task(run(self.stop), name=name)
            for name, stage in self.stages.items()
            for run in consumers_of(stage)
        ]
        if self.web:
            from quantum_trader.web.server import serve_web  # FastAPI, uvicorn: only when asked

            # A web server that cannot start (port in use, refused bind) stops the process like a stage.
            tasks.append(asyncio.create_task(serve_web(self.redis, self.settings, self.stop, self.metrics), name="web"))
        consuming = len(tasks)
        tasks += [asyncio.create_task(t) for t in (self.heartbeat(), self.trim(), self.reconcile())]
        if alert_urls:  # every process may look; one at a time sends (a lease on the server)
            tasks.append(asyncio.create_task(alerts.watch(self.redis, self.settings, self.stop, urls=alert_urls)))
        try:
            done, _ = await asyncio.wait(tasks[:consuming], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for stage in self.stages.values():
                if isinstance(stage, Execution):
                    await stage.exchange.close()
                elif hasattr(stage, "close"):
                    stage.close()
            log.info(
                "stopped",
                stages=list(self.stages),
                totals={n: s.totals for n, s in self.stages.items()},
            )


def retained_streams(settings: Settings, stage_names: list[str]) -> dict[str, Retention]:
    """The outcome streams the named stages write, each with its retention.

    Every stage may dead-letter; the router writes rejections, execution the results (and the
    legacy copy). Each process bounds what its own stages write, so any deployment split keeps
    every outcome stream bounded.
    """
    outcome = Retention(settings.result_keep_s, settings.result_maxlen)
    out = {settings.dead_letter_stream: Retention(settings.dead_letter_keep_s, settings.dead_letter_maxlen)}
    if keys.ROUTER in stage_names:
        out[settings.rejected_stream] = outcome
    if keys.EXECUTION in stage_names:
        out[settings.result_stream] = outcome
        if settings.result_stream_legacy:
            out[settings.result_stream_legacy] = outcome
    return out


async def announce_kill_state(redis: Redis) -> None:
    """One clear line at start-up when trading is halted (fail-closed)."""
    try:
        value, allowed = await kill_state(redis)
    except RedisError as exc:
        log.error(
            "kill_switch_unknown",
            error=str(exc),
            effect="no intent is approved until the server answers",
        )
        return
    if not allowed:
        log.warning(
            "trading_halted",
            kill_switch=value,
            effect="every intent will be REJECTED KILL_SWITCH",
            fix="run: quantum-trader kill off",
        )


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT ask the runner to stop after the batch in hand."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(
    redis: Redis,
    settings: Settings,
    stage_names: list[str],
    stop: asyncio.Event,
    *,
    duration: float | None = None,
    on_start: Callable[[Runner], Awaitable[None]] | None = None,
    web: bool = False,
    alerting: bool = True,
) -> Runner:
    """Build and run the named stages until stopped (or ``duration`` seconds).

    With QT_METRICS_PORT, the process's metrics are served there (one port per process: two
    processes on one host need two ports) from before the stages start until they have stopped.
    ``web``: serve the dashboard and API too (``run`` passes QT_RUN_WEB), with this process's metrics;
    ``alerting``: send the alerts QT_ALERT_URLS asks for (the demo, on its private server, does not).
    """
    metrics, exporter = None, None
    if settings.metrics_port is not None:
        from quantum_trader import metrics as exported  # prometheus-client: only when asked

        metrics = exported.Metrics.for_process(settings)
        exporter = exported.start_exporter(settings, metrics)  # a port in use stops here, before any stage
    try:
        if {keys.ROUTER, keys.EXECUTION} & set(stage_names):
            # Another QT_PARTITIONS while the last layout's streams hold work: refused before anything is read.
            await until_reachable(functools.partial(check_layout, redis, settings), stop, "partition layout")
        stages = {
            name: await until_reachable(
                functools.partial(build_stage, name, redis, settings, metrics), stop, f"starting {name}"
            )
            for name in stage_names
        }
        runner = Runner(redis, settings, stages, stop, web=web, alerting=alerting, metrics=metrics)
        if duration is not None:
            asyncio.get_running_loop().call_later(duration, stop.set)
        if on_start is not None:
            await on_start(runner)
        await runner.run()
    finally:
        if exporter is not None:
            await asyncio.to_thread(exporter.close)
    return runner


async def alive_consumers(redis: Redis, service: str) -> list[str]:
    """Consumers of ``service`` whose heartbeat has not expired."""
    found = [key async for key in redis.scan_iter(match=keys.heartbeat_pattern(service), count=1000)]
    return sorted(str(key).rsplit(":", 1)[-1] for key in found)
