"""Structured logs: JSON lines for journald, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from quantum_trader.redaction import redact_text

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog once per process. ``auto`` = JSON unless stderr is a terminal."""
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            redact,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    configure_outcomes(level, fmt, out)


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: URL passwords, signatures and keys out of every text value.

    The last line of defence: code redacts what it formats, this catches what slips through
    (an exception's text, a value from a library).
    """
    for name, value in event.items():
        if isinstance(value, str):
            event[name] = redact_text(value)
    return event


def get_logger(component: str) -> Any:
    """A logger bound to one component name."""
    return structlog.get_logger(component=component)


class _Outcomes:
    json = True
    enabled = True
    out: Any = None


def configure_outcomes(level: str, fmt: str, stream: Any = None) -> None:
    """Outcome lines follow the same level and format as the other logs."""
    out = stream or sys.stderr
    _Outcomes.out = out
    _Outcomes.enabled = _LEVELS[level] <= logging.INFO
    _Outcomes.json = fmt == "json" or (fmt == "auto" and not out.isatty())


def outcomes_enabled() -> bool:
    """Whether outcome lines are written (build the records only then)."""
    return _Outcomes.enabled


def emit_outcomes(component: str, records: list[dict[str, Any]]) -> None:
    """One log line per terminal outcome, written for a whole batch at once.

    The hot path can end tens of thousands of intents a second; encoding them with
    msgspec and writing once per batch keeps logging from becoming the bottleneck.
    """
    if not records or not _Outcomes.enabled:
        return
    out = _Outcomes.out or sys.stderr
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if _Outcomes.json:
        lines = [
            _encoder.encode({"component": component, "level": "info", "timestamp": stamp, **record})
            for record in records
        ]
        out.write(b"\n".join(lines).decode() + "\n")
    else:
        text = [
            f"{stamp} [info] {record.get('event', '')} "
            + " ".join(f"{k}={v}" for k, v in record.items() if k != "event")
            + f" component={component}"
            for record in records
        ]
        out.write("\n".join(text) + "\n")
    out.flush()


_encoder = msgspec.json.Encoder(decimal_format="string")
