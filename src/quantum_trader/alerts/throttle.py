"""How many alerts become messages: ``Throttle`` (de-duplication and storm control), pure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from quantum_trader.alerts.core import BODY_CHARS, Alert, Message, clip

DIGEST_LINES = 20


def message_of(alert: Alert) -> Message:
    """One alert as its own message."""
    return Message(alert.title, alert.body, alert.severity, (alert.key,))


def digest(alerts: Sequence[Alert]) -> Message:
    """Many alerts in one message: a line each (the first DIGEST_LINES), the worst severity."""
    events = sum(alert.count for alert in alerts)
    lines = [f"- {alert.title}" for alert in alerts[:DIGEST_LINES]]
    if len(alerts) > DIGEST_LINES:
        lines.append(f"... and {len(alerts) - DIGEST_LINES} more")
    worst = max((alert.severity for alert in alerts), key=lambda severity: severity.rank)
    return Message(
        f"{len(alerts)} alerts ({events} events)",
        "\n".join(lines),
        worst,
        tuple(alert.key for alert in alerts),
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


class Throttle:
    """Rate limit and de-duplication of alerts, in time ``now`` given by the caller (pure).

    - **The same key at most once per ``interval_s``.** Repeats meanwhile are counted, and once
      the interval is over one message says how many there were and shows the latest.
    - **No storm.** At most ``burst`` messages per ``window_s``: when more distinct alerts arrive
      at once than the window has room for, they go out together as one digest; alerts that
      arrive once the window is used up wait for its end and go out as one digest then.
    """

    HELD_MAX = 1000  # alerts kept for the next digest; beyond, only counted

    def __init__(self, interval_s: float, *, burst: int = 3, window_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.burst = max(1, burst)
        self.window_s = window_s
        self._sent: dict[str, float] = {}
        self._repeats: dict[str, tuple[int, Alert]] = {}
        self._held: list[Alert] = []
        self._held_over = 0
        self._window_start: float | None = None
        self._in_window = 0

    def admit(self, alerts: Iterable[Alert], now: float) -> list[Message]:
        """The messages to send now for ``alerts`` (and for what waited); call it on every look."""
        fresh = self._due_repeats(now)
        for alert in alerts:
            last = self._sent.get(alert.key)
            if last is not None and now - last < self.interval_s:
                count, _older = self._repeats.get(alert.key, (0, alert))
                self._repeats[alert.key] = (count + alert.count, alert)
                continue
            self._sent[alert.key] = now
            fresh.append(alert)
        self._forget(now)
        out: list[Message] = []
        if self._window_start is None or now - self._window_start >= self.window_s:
            self._window_start, self._in_window = now, 0
            if self._held:
                out.append(self._held_digest())
                self._in_window = 1
        room = self.burst - self._in_window
        if not fresh:
            return out
        if len(fresh) <= room:
            out += [message_of(alert) for alert in fresh]
            self._in_window += len(fresh)
        elif room > 0:
            out.append(digest(fresh))
            self._in_window = self.burst
        else:
            self._hold(fresh)
        return out

    def _due_repeats(self, now: float) -> list[Alert]:
        due = []
        for key, (count, latest) in list(self._repeats.items()):
            if now - self._sent.get(key, 0.0) >= self.interval_s:
                del self._repeats[key]
                self._sent[key] = now
                body = f"{count} more like this in the last {_duration(self.interval_s)}. The latest: {latest.body}"
                due.append(replace(latest, title=f"Repeated: {latest.title}", body=clip(body, BODY_CHARS), count=count))
        return due

    def _forget(self, now: float) -> None:
        for key, at in list(self._sent.items()):
            if now - at >= self.interval_s and key not in self._repeats:
                del self._sent[key]

    def _hold(self, alerts: Sequence[Alert]) -> None:
        room = self.HELD_MAX - len(self._held)
        self._held += alerts[:room]
        self._held_over += max(0, len(alerts) - room)

    def _held_digest(self) -> Message:
        message = digest(self._held)
        if self._held_over:
            message = replace(message, body=f"{message.body}\n... and {self._held_over} more not listed")
        self._held, self._held_over = [], 0
        return message
