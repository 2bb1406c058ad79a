"""Alert delivery through Apprise: ``QT_ALERT_URLS`` from the secrets file, one message to one URL.

``QT_ALERT_URLS`` (Apprise URLs, comma or space separated) is read from the secrets file
(``QT_SECRETS_FILE``) only, like the exchange's credentials. ``deliver`` sends one message to
one URL, blocking (``notifier`` runs it in a thread per URL); what Apprise logs stays out of the
process's logs: its warnings and socket errors become the redacted reason of a failed delivery.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantum_trader.alerts.core import Message
from quantum_trader.alerts.urls import HTTP_LOGGERS, SCRUBBED, AlertURL, scrub, split_urls
from quantum_trader.errors import ConfigError
from quantum_trader.logs import get_logger
from quantum_trader.secrets_file import check_private, read_secrets
from quantum_trader.settings import Settings

if TYPE_CHECKING:
    from apprise.plugins.base import NotifyBase

log = get_logger("alerts")

SECRET_NAME = "QT_ALERT_URLS"


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one delivery went: ``reason`` (redacted) when it failed."""

    ok: bool
    seconds: float
    reason: str = ""


def alert_urls(settings: Settings) -> list[AlertURL]:
    """``QT_ALERT_URLS`` from the secrets file (empty when there is no secrets file or no such line).

    The file's permissions are judged as for the exchange's credentials: other users able to open
    it (or its group to rewrite it) stops testnet and live, and is a warning in paper mode. A URL
    Apprise cannot use is a ConfigError naming its place in the list, never its text.
    """
    path = settings.secrets_file
    if path is None:
        return []
    values, st_mode = read_secrets(path)
    urls = split_urls(values.get(SECRET_NAME, ""))
    if not urls:
        return []
    check_private(path, st_mode, settings.mode)
    chosen = [AlertURL(index, url) for index, url in enumerate(urls, start=1)]
    for target in chosen:
        if _plugin(target.url, 1.0) is None:
            raise ConfigError(
                f"{SECRET_NAME} in secrets file {path}: URL {target.shown} is not one Apprise can use; "
                "check it against https://github.com/caronc/apprise/wiki"
            )
    return chosen


@functools.cache
def apprise_loaded() -> None:
    """Load Apprise and its plugins once, in the calling thread, and keep its logs to ourselves.

    Its e-mail plugin imports ``imghdr``, deprecated since Python 3.11: that warning is Apprise's
    business. Its logger stops propagating (its lines name endpoints and request URLs); the
    warnings it logs during a delivery are captured as that delivery's reason.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import apprise

        apprise.Apprise.instantiate("json://localhost")
    logger = logging.getLogger("apprise")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)  # its socket errors (refused, timed out) are debug lines
    logger.addHandler(_CAPTURED)
    # Apprise sends through requests: urllib3 logs each request's path (a webhook's token) at debug.
    for name in HTTP_LOGGERS:
        logging.getLogger(name).addFilter(SCRUBBED)


def _plugin(url: str, timeout_s: float) -> NotifyBase | None:
    """Apprise's notifier for ``url`` with ``timeout_s`` to connect and to read (None: not a usable URL)."""
    apprise_loaded()
    SCRUBBED.learn(url)
    import apprise

    plugin = apprise.Apprise.instantiate(url)
    if plugin is not None:
        plugin.socket_connect_timeout = timeout_s
        plugin.socket_read_timeout = timeout_s
    return plugin


class _Captured(logging.Handler):
    """Apprise's warnings and socket errors, kept per thread while that thread delivers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._lines: dict[int, list[str]] = {}

    def start(self) -> None:
        self._lines[threading.get_ident()] = []

    def stop(self) -> list[str]:
        return self._lines.pop(threading.get_ident(), [])

    def emit(self, record: logging.LogRecord) -> None:
        lines = self._lines.get(threading.get_ident())
        wanted = record.levelno >= logging.WARNING or str(record.msg).startswith("Socket Exception")
        if wanted and lines is not None and len(lines) < 5:
            try:
                lines.append(record.getMessage())
            except (TypeError, ValueError):
                lines.append(str(record.msg))


_CAPTURED = _Captured()


def deliver(target: AlertURL, message: Message, timeout_s: float) -> Delivery:
    """Send ``message`` to one URL now (blocking: call it from a worker thread or a command)."""
    started = time.monotonic()
    problem = ""
    plugin = _plugin(target.url, timeout_s)
    if plugin is None:
        return Delivery(False, 0.0, "not an Apprise URL Apprise can use")
    _CAPTURED.start()
    try:
        import apprise

        ok = bool(
            plugin.notify(
                body=message.body or message.title,
                title=message.title,
                notify_type=apprise.NotifyType(message.severity.value),
            )
        )
    except Exception as exc:  # a plugin's error is one failed delivery, never the caller's
        ok, problem = False, f"{type(exc).__name__}: {exc}"
    finally:
        said = _CAPTURED.stop()
    seconds = time.monotonic() - started
    if ok:
        return Delivery(True, seconds)
    reason = problem or _reason(said)
    return Delivery(False, seconds, scrub(reason, target.url))


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def _reason(said: Sequence[str]) -> str:
    """What Apprise said of a failed delivery, its socket error cut down to the cause."""
    told = [line for line in said if not line.startswith("Socket Exception")]
    causes = []
    for line in said:
        if line.startswith("Socket Exception"):
            errno = _ERRNO.search(line)
            if errno:
                causes.append(errno.group(1).strip())
            elif "timed out" in line.lower():
                causes.append("timed out")
            else:
                causes.append(line.removeprefix("Socket Exception:").strip())
    text = " ".join(told) or "the endpoint did not accept the message"
    return f"{text} ({'; '.join(causes)})" if causes else text


Sender = Callable[[AlertURL, Message, float], Delivery]
