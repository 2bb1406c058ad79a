"""The watcher: a look every ``QT_ALERT_CHECK_S``, its alerts through the throttle, the messages out.

One watcher looks and sends at a time (``LEASE``), however many ``run`` processes have alert
URLs; the looks are stored (``CURSORS``), so a watcher that restarts or takes over goes on from
the last look and alerts nothing twice. A look that fails (the server unreachable) is tried again
at the next period; three in a row are an alert of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, replace

from redis.exceptions import RedisError

from quantum_trader import keys
from quantum_trader.alerts.changes import alerts_between
from quantum_trader.alerts.core import Alert, Message, Observation, Severity
from quantum_trader.alerts.delivery import alert_urls
from quantum_trader.alerts.look import load_previous, observe, store
from quantum_trader.alerts.notifier import Notifier
from quantum_trader.alerts.throttle import Throttle
from quantum_trader.alerts.urls import AlertURL
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import sleep_or_stop
from quantum_trader.errors import QuantumTraderError
from quantum_trader.logs import get_logger
from quantum_trader.redaction import redact_text
from quantum_trader.settings import Settings

log = get_logger("alerts")
UNREACHABLE_LOOKS = 3  # failed looks in a row that are an alert


def configured(settings: Settings) -> bool:
    """Whether the secrets file holds alert URLs (ConfigError when it is unsafe or a URL is unusable)."""
    return bool(alert_urls(settings))


async def watch(
    redis: Redis, settings: Settings, stop: asyncio.Event, *, urls: Sequence[AlertURL] | None = None
) -> None:
    """Look for alert events every QT_ALERT_CHECK_S and send them, until ``stop`` is set.

    ``urls`` defaults to ``QT_ALERT_URLS`` from the secrets file; with none, it returns at once.
    """
    targets = alert_urls(settings) if urls is None else list(urls)
    if not targets:
        log.info("alerts_off", reason=f"no QT_ALERT_URLS in the secrets file ({settings.secrets_file or 'none set'})")
        return
    notifier = Notifier(targets, settings.alert_timeout_s)
    throttle = Throttle(settings.alert_interval_s)
    name = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
    lease_s = 3 * settings.alert_check_s + settings.alert_timeout_s + 5
    prefix = f"[{settings.mode}] "
    loop = asyncio.get_running_loop()
    previous: Observation | None = None
    leading = False
    failures = 0
    log.info("alerts_on", endpoints=[target.shown for target in targets], check_s=settings.alert_check_s)

    def send(alerts: Sequence[Alert]) -> None:
        for message in throttle.admit(alerts, time.time()):
            notifier.submit(replace(message, title=prefix + message.title))

    try:
        while not stop.is_set():
            started = loop.time()
            try:
                if await _lead(redis, name, lease_s):
                    if not leading:
                        previous, leading = await load_previous(redis), True
                    current = await observe(redis, settings, previous)
                    found = alerts_between(previous, current)
                    await store(redis, current)  # before sending: a crash now loses alerts, never repeats them
                    previous = current.settled()
                else:
                    found, leading = [], False
            except (RedisError, QuantumTraderError, OSError) as exc:
                failures += 1
                found = _unreachable(failures, exc)
                leading = False  # look again from what is stored, once the server answers
            except Exception as exc:  # a bug in a look must not end the alerts: logged, tried next period
                log.error("alerts_look_error", error=redact_text(f"{type(exc).__name__}: {exc}"))
                found, leading = [], False
            else:
                if failures:
                    log.info("alerts_look_recovered", failed_looks=failures)
                if failures >= UNREACHABLE_LOOKS:
                    found.insert(0, Alert("server:back", "Alerts read the server again", "", Severity.SUCCESS))
                failures = 0
            send(found)
            await sleep_or_stop(stop, max(0.0, settings.alert_check_s - (loop.time() - started)))
    finally:
        await _release(redis, name)
        await notifier.aclose(wait_s=min(settings.alert_timeout_s, 2.0))
        log.info("alerts_stopped", deliveries=[asdict(stats) for stats in notifier.stats()])


def _unreachable(failures: int, exc: BaseException) -> list[Alert]:
    error = redact_text(str(exc)) or type(exc).__name__
    if failures == 1:
        log.warning("alerts_look_failed", error=error, effect="tried again every QT_ALERT_CHECK_S")
    if failures != UNREACHABLE_LOOKS:
        return []
    return [
        Alert(
            "server:unreachable",
            "Alerts cannot read the server",
            f"{failures} looks in a row failed ({error}). While the server is unreachable no order is approved.",
            Severity.FAILURE,
        )
    ]


async def _lead(redis: Redis, name: str, ttl_s: float) -> bool:
    """Hold the lease (take it when free or expired); False while another watcher holds it."""
    return bool(await redis.eval(_LEAD, 1, keys.ALERT_LEASE, name, str(max(1, int(ttl_s * 1000)))))


async def _release(redis: Redis, name: str) -> None:
    """Give the lease back if it is still ours, so another watcher takes over at once."""
    with contextlib.suppress(RedisError, OSError):  # else it expires by itself
        await redis.eval(_RELEASE, 1, keys.ALERT_LEASE, name)


_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def trial_message(settings: Settings) -> Message:
    """The message ``quantum-trader alerts test`` sends."""
    return Message(
        f"[{settings.mode}] Test alert",
        f"quantum-trader alerts test on {os.uname().nodename}: alerts of this deployment reach this channel.",
        Severity.INFO,
        ("test",),
    )
