"""What two looks at the server make: ``alerts_between(previous, current)``, and each alert's words.

Pure. Every alert names what happened, how big, and the command that shows more or fixes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from quantum_trader import keys
from quantum_trader.alerts.core import (
    BODY_CHARS,
    TITLE_CHARS,
    Alert,
    DailySummary,
    DeadLettered,
    FailedOrder,
    Observation,
    Reconciled,
    Severity,
    amount,
    clip,
)
from quantum_trader.events import Reason, StateChange, TradingState

BREAKERS = frozenset({Reason.DAILY_LOSS.value, Reason.DRAWDOWN.value})


def alerts_between(previous: Observation | None, current: Observation) -> list[Alert]:
    """What the operator hears about ``current``, compared with the look before it.

    The first look (``previous`` None) only records where things stand: alerts are about
    changes after it.
    """
    if previous is None:
        return []
    out = _kill_switch(previous, current)
    out += [state_alert(change) for change in current.state_changes]
    out += failed_alerts(current.failed)
    out += dead_letter_alerts(current.dead_letters)
    out += _reconciliation(previous.reconciled, current.reconciled)
    out += _lag(previous, current)
    out += [heartbeat_lost(name) for name in sorted(previous.heartbeats - current.heartbeats)]
    if current.summary is not None and current.day != previous.day:
        out.append(summary_alert(current.summary))
    return out


def _kill_switch(previous: Observation, current: Observation) -> list[Alert]:
    if previous.trading_allowed is None or current.trading_allowed is None:
        return []
    if previous.trading_allowed == current.trading_allowed:
        return []
    if current.trading_allowed:
        return [
            Alert(
                "kill:off",
                "Kill switch OFF: trading allowed",
                f"{keys.KILL_SWITCH} is '0': the governor approves orders again.",
                Severity.SUCCESS,
            )
        ]
    shown = "absent" if current.kill_value is None else repr(clip(current.kill_value, 40))
    reason = current.reconciled.halt_reason if current.reconciled is not None else ""
    halt = f" Reason: {reason}." if reason else ""
    return [
        Alert(
            "kill:on",
            "Kill switch ON: no order is sent",
            f"{keys.KILL_SWITCH} is {shown}: every intent ends REJECTED KILL_SWITCH.{halt} "
            "Once the cause is dealt with: quantum-trader kill off",
            Severity.FAILURE,
        )
    ]


def state_alert(change: StateChange) -> Alert:
    """One change of the trading state; a loss breaker's trip is an alert of its own."""
    state, previous = change.state.value, change.previous.value
    when = f" at {change.at}" + (f"; until {change.until}" if change.until else "")
    if change.reason in BREAKERS:
        resume = (
            "It ends by itself at the next UTC midnight, or: quantum-trader state active --reason '...'"
            if change.reason == Reason.DAILY_LOSS
            else "It lasts until the operator resumes: quantum-trader state active --reason '...'"
        )
        return Alert(
            f"breaker:{change.reason}",
            clip(f"Breaker tripped ({change.reason}): trading {state}", TITLE_CHARS),
            clip(f"{change.detail}. Trading state {previous} -> {state} by {change.by}{when}. {resume}", BODY_CHARS),
            Severity.FAILURE,
        )
    severity = {
        TradingState.ACTIVE: Severity.SUCCESS,
        TradingState.REDUCING: Severity.WARNING,
        TradingState.HALTED: Severity.FAILURE,
    }[change.state]
    detail = f": {change.detail}" if change.detail else ""
    return Alert(
        f"state:{state}",
        clip(f"Trading state {state} (was {previous})", TITLE_CHARS),
        clip(f"{change.reason}{detail}, by {change.by}{when}.", BODY_CHARS),
        severity,
    )


def failed_alerts(failed: Sequence[FailedOrder]) -> list[Alert]:
    """FAILED orders, one alert per symbol and reason (a burst of one cause is one alert)."""
    groups: dict[tuple[str, str], list[FailedOrder]] = {}
    for order in failed:
        groups.setdefault((order.symbol, order.reason), []).append(order)
    out = []
    for (symbol, reason), orders in groups.items():
        first = orders[0]
        title = (
            f"Order FAILED: {first.side} {first.qty} {symbol} ({reason})"
            if len(orders) == 1
            else f"{len(orders)} orders FAILED on {symbol} ({reason})"
        )
        out.append(
            Alert(
                f"failed:{symbol}:{reason}",
                clip(title, TITLE_CHARS),
                clip(f"{first.detail or 'no detail'} (intent {first.intent_id}, result {first.entry_id})", BODY_CHARS),
                Severity.FAILURE,
                count=len(orders),
            )
        )
    return out


def dead_letter_alerts(letters: Sequence[DeadLettered]) -> list[Alert]:
    """New dead letters, one alert per stream they came from, with their reasons counted."""
    groups: dict[str, list[DeadLettered]] = {}
    for letter in letters:
        groups.setdefault(letter.origin, []).append(letter)
    out = []
    for origin, items in groups.items():
        reasons: dict[str, int] = {}
        for item in items:
            reasons[item.reason] = reasons.get(item.reason, 0) + 1
        listed = "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]))
        out.append(
            Alert(
                f"dead_letter:{origin}",
                clip(f"{len(items)} new dead letter(s) from {origin}", TITLE_CHARS),
                clip(f"{listed}. See: quantum-trader dlq list; once fixed: quantum-trader dlq replay ID", BODY_CHARS),
                Severity.WARNING,
                count=len(items),
            )
        )
    return out


def _reconciliation(previous: Reconciled | None, current: Reconciled | None) -> list[Alert]:
    if current is None or (previous is not None and previous.at == current.at):
        return []
    before = previous.differences if previous is not None else ()
    if current.differences and current.differences != before:
        halted = f" The kill switch is on: {current.halt_reason}." if current.halt_reason else ""
        return [
            Alert(
                "reconcile:differences",
                clip(f"Reconciliation: {len(current.differences)} difference(s) with {current.exchange}", TITLE_CHARS),
                clip(f"{current.summary}.{halted} Every difference with its fix: quantum-trader reconcile", BODY_CHARS),
                Severity.FAILURE,
            )
        ]
    if not current.differences and before:
        return [
            Alert(
                "reconcile:clean",
                f"Reconciliation clean again with {current.exchange}",
                f"The exchange and the book agree (reconciled at {current.at}).",
                Severity.SUCCESS,
            )
        ]
    return []


def _lag(previous: Observation, current: Observation) -> list[Alert]:
    out = []
    for (stream, group), lag in sorted(current.lagging.items()):
        if (stream, group) not in previous.lagging:
            out.append(
                Alert(
                    f"lag:{stream}:{group}",
                    clip(f"Lag: {group} is {lag:,} entries behind on {stream}", TITLE_CHARS),
                    f"Above QT_ALERT_LAG={current.lag_limit:,}: its consumers are stopped or too slow. "
                    "See: quantum-trader status --consumers",
                    Severity.WARNING,
                )
            )
    for stream, group in sorted(set(previous.lagging) - set(current.lagging)):
        out.append(
            Alert(
                f"lag-ok:{stream}:{group}",
                clip(f"Lag back under {current.lag_limit:,}: {group} on {stream}", TITLE_CHARS),
                "Its consumers have caught up.",
                Severity.SUCCESS,
            )
        )
    return out


def heartbeat_lost(name: str) -> Alert:
    """A service that had a live heartbeat has none any more (``name``: ``service:consumer``)."""
    service, _, consumer = name.partition(":")
    return Alert(
        f"heartbeat:{name}",
        clip(f"Heartbeat lost: {service} ({consumer})", TITLE_CHARS),
        clip(
            f"{keys.HEARTBEAT_PREFIX}{name} expired: the process stopped or hangs. "
            f"Check: quantum-trader check {service}; its unit's journal (journalctl -u quantum-trader-{service})",
            BODY_CHARS,
        ),
        Severity.FAILURE,
    )


def summary_alert(summary: DailySummary) -> Alert:
    """The day's summary, sent once at the UTC day change."""
    lines = [
        f"Orders sent: {'unknown (the day counter expired)' if summary.orders is None else f'{summary.orders:,}'}"
        + ("" if summary.fills is None else f"; fills: {summary.fills:,}")
    ]
    if summary.realised:
        pnl = ", ".join(f"{quote} {_signed(value)}" for quote, value in sorted(summary.realised.items()))
        lines.append(f"Realised PnL: {pnl}")
    else:
        lines.append("Realised PnL: nothing realised")
    if summary.fees:
        lines.append("Fees: " + ", ".join(f"{asset} {amount(value)}" for asset, value in sorted(summary.fees.items())))
    if summary.volume:
        lines.append(
            "Volume: " + ", ".join(f"{quote} {amount(value)}" for quote, value in sorted(summary.volume.items()))
        )
    lines.append(
        "From the journal."
        if summary.source == "journal"
        else f"From the book's figures on the server ({summary.note or 'no journal'})."
    )
    return Alert(f"summary:{summary.day}", f"Daily summary {summary.day} (UTC)", "\n".join(lines), Severity.INFO)


def _signed(value: Decimal) -> str:
    text = amount(value)
    return text if text.startswith("-") else f"+{text}"
