"""``Notifier``: every message to every URL, each URL from its own thread; ``submit`` never blocks.

Each URL has its own thread and bounded queue, so a slow or dead endpoint delays nothing but
itself. When its queue is full the oldest message is dropped and counted; the next message
delivered there says how many were. A failed delivery is logged and tried once more.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from quantum_trader.alerts.core import Message
from quantum_trader.alerts.delivery import Sender, apprise_loaded, deliver
from quantum_trader.alerts.urls import AlertURL
from quantum_trader.logs import get_logger

log = get_logger("alerts")

QUEUE_SIZE = 50  # messages waiting per URL; beyond, the oldest is dropped (and counted)
RETRY_DELAY_S = 1.0


def with_dropped_note(message: Message, dropped: int) -> Message:
    """``message`` saying that ``dropped`` earlier ones never reached this endpoint."""
    note = f"({dropped} earlier alert(s) dropped: this endpoint was too slow or unreachable)"
    return replace(message, body=f"{message.body}\n{note}" if message.body else note)


class _Lane:
    """One URL's queue and the thread that delivers from it."""

    def __init__(self, target: AlertURL, timeout_s: float, size: int, retry_delay_s: float, send: Sender) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.size = size
        self.retry_delay_s = retry_delay_s
        self.send = send
        self.queue: deque[Message] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.dropped_unsaid = 0  # dropped since the last note about it went out
        self.delivered = self.failed = self.dropped = 0
        self.thread = threading.Thread(target=self._run, name=f"alerts-{target.index}", daemon=True)
        self.thread.start()

    def put(self, message: Message) -> None:
        with self.cond:
            if self.closing:
                return
            first_drop = False
            if len(self.queue) >= self.size:
                self.queue.popleft()
                self.dropped += 1
                self.dropped_unsaid += 1
                first_drop = self.dropped_unsaid == 1
            self.queue.append(message)
            self.cond.notify()
        if first_drop:
            log.warning(
                "alerts_dropped",
                endpoint=self.target.shown,
                effect=f"its queue of {self.size} is full (slow or unreachable): the oldest alerts are dropped, "
                "and the next message delivered there says how many",
            )

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                message = self.queue.popleft()
                dropped, self.dropped_unsaid = self.dropped_unsaid, 0
            outgoing = with_dropped_note(message, dropped) if dropped else message
            if self._attempt(outgoing, last=self.closing):
                continue
            if not self.closing:
                time.sleep(self.retry_delay_s)
                if self._attempt(outgoing, last=True):
                    continue
            with self.cond:
                self.dropped_unsaid += dropped  # still unsaid

    def _attempt(self, message: Message, *, last: bool) -> bool:
        done = self.send(self.target, message, self.timeout_s)
        if done.ok:
            self.delivered += 1
            log.debug("alert_delivered", endpoint=self.target.shown, seconds=round(done.seconds, 2))
            return True
        if last:
            self.failed += 1
            log.error(
                "alert_not_delivered",
                endpoint=self.target.shown,
                title=message.title,
                reason=done.reason,
                effect="given up after a retry; later alerts are still sent",
            )
        else:
            log.warning(
                "alert_delivery_failed",
                endpoint=self.target.shown,
                reason=done.reason,
                effect=f"tried again in {self.retry_delay_s:g} s",
            )
        return False


@dataclass(frozen=True, slots=True)
class LaneStats:
    """What one URL's lane did so far."""

    endpoint: str
    delivered: int
    failed: int
    dropped: int
    queued: int


class Notifier:
    """Sends messages to every URL, each from its own thread: ``submit`` never waits for a network."""

    def __init__(
        self,
        urls: Sequence[AlertURL],
        timeout_s: float,
        *,
        queue_size: int = QUEUE_SIZE,
        retry_delay_s: float = RETRY_DELAY_S,
        send: Sender = deliver,
    ) -> None:
        if send is deliver:
            apprise_loaded()  # here, not in a worker: module loading is not for threads racing
        self._lanes = [_Lane(url, timeout_s, queue_size, retry_delay_s, send) for url in urls]

    def submit(self, message: Message) -> None:
        """Queue ``message`` for every URL (dropping the oldest of a full queue)."""
        for lane in self._lanes:
            lane.put(message)

    def stats(self) -> list[LaneStats]:
        """Per URL: delivered, failed after a retry, dropped from a full queue, still queued."""
        return [
            LaneStats(lane.target.shown, lane.delivered, lane.failed, lane.dropped, len(lane.queue))
            for lane in self._lanes
        ]

    async def aclose(self, wait_s: float) -> None:
        """Stop taking messages; deliver what is queued (no retries) for at most ``wait_s`` seconds.

        A lane still busy after that is left to finish alone (its thread is a daemon thread).
        """
        for lane in self._lanes:
            lane.close()
        deadline = time.monotonic() + wait_s
        for lane in self._lanes:
            left = deadline - time.monotonic()
            if left > 0:
                # Joined in a thread of its own: the loop goes on meanwhile.
                await asyncio.to_thread(lane.thread.join, left)
