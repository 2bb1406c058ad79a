"""Alerts through Apprise: what the operator must hear about, at most once, without an alert storm.

- The pure part: ``core`` (``Observation``, one look at the server; ``Alert``, ``Message``),
  ``changes`` (``alerts_between(previous, current)``: the alerts two looks make) and ``throttle``
  (``Throttle``: one key at most once per ``QT_ALERT_INTERVAL_S``, a burst in one digest).
- ``look``: ``observe`` reads a look from the server (cursors on the event streams, kept in
  ``CURSORS``), ``daily_summary`` the day's orders and PnL (journal, else the server).
- ``urls`` (how a URL may be shown, its secrets out of any text), ``delivery`` (``QT_ALERT_URLS``
  from the secrets file; ``deliver``: one message to one URL through Apprise, now) and ``notifier``
  (``Notifier``: a thread and a bounded queue per URL, so delivery never blocks the pipeline).
- ``watch``: the loop ``run`` starts when alert URLs are configured.
"""

from __future__ import annotations

from quantum_trader.alerts.changes import alerts_between
from quantum_trader.alerts.core import CURSORS, LEASE, Alert, DailySummary, Message, Observation, Severity
from quantum_trader.alerts.delivery import Delivery, alert_urls, deliver
from quantum_trader.alerts.look import daily_summary, observe
from quantum_trader.alerts.notifier import Notifier
from quantum_trader.alerts.throttle import Throttle
from quantum_trader.alerts.urls import AlertURL, shown_url
from quantum_trader.alerts.watch import configured, trial_message, watch

__all__ = [
    "CURSORS",
    "LEASE",
    "Alert",
    "AlertURL",
    "DailySummary",
    "Delivery",
    "Message",
    "Notifier",
    "Observation",
    "Severity",
    "Throttle",
    "alert_urls",
    "alerts_between",
    "configured",
    "daily_summary",
    "deliver",
    "observe",
    "shown_url",
    "trial_message",
    "watch",
]
