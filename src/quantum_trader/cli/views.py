"""Everything the command line draws with rich: tables, the demo's live screen, outcome lines."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from quantum_trader.book import Marked
from quantum_trader.bus.inspect import StreamStat
from quantum_trader.demo import DemoProgress
from quantum_trader.events import TradingState
from quantum_trader.governor import GovernorState
from quantum_trader.ops.doctor import Check
from quantum_trader.risk import StateRecord
from quantum_trader.trading import RiskStatus

if TYPE_CHECKING:  # SQLAlchemy loads only for the commands that read the journal
    from quantum_trader.journal.queries import PnL, Trade
from quantum_trader.reconcile import Report


def _num(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def status_table(stats: list[StreamStat], title: str = "Pipeline streams") -> Table:
    """One row per stream, one sub-row per group."""
    table = Table(title=title, title_justify="left")
    for name in (
        "stream",
        "XLEN",
        "entries-added",
        "last-generated-id",
        "group",
        "consumers",
        "pending",
        "lag",
        "last-delivered-id",
    ):
        table.add_column(
            name,
            justify="right" if name in ("XLEN", "entries-added", "consumers", "pending", "lag") else "left",
        )
    for stat in stats:
        if not stat.exists:
            table.add_row(stat.name, "-", "-", "(no stream yet)", "", "", "", "", "")
            continue
        head = [stat.name, _num(stat.length), _num(stat.entries_added), stat.last_generated_id]
        if not stat.groups:
            table.add_row(*head, "(no group)", "", "", "", "")
        for index, group in enumerate(stat.groups):
            lead = head if index == 0 else ["", "", "", ""]
            table.add_row(
                *lead, group.name, _num(group.consumers), _num(group.pending), _num(group.lag), group.last_delivered_id
            )
            for consumer in group.consumer_list:
                # One sub-row per consumer (status --consumers): its pending entries and idle time.
                idle = f"idle {consumer.idle_ms / 1000:,.1f}s"
                table.add_row("", "", "", "", f"  └ {consumer.name}", "", _num(consumer.pending), "", idle)
    return table


def describe_state(record: StateRecord) -> str:
    """One line: ``HALTED: OPERATOR: exchange maintenance (by alice at ..., until ...)``."""
    why = ": ".join(part for part in (record.reason, record.detail) if part)
    when = ", ".join(
        part
        for part in (
            f"by {record.by}" if record.by else "",
            f"at {record.at}" if record.at else "",
            f"until {record.until}" if record.until else "",
        )
        if part
    )
    return f"{record.state.value}" + (f": {why}" if why else "") + (f" ({when})" if when else "")


def governor_table(state: GovernorState, risk: RiskStatus | None = None) -> Table | Group:
    """Today's count, limit, mode, kill switch and trading state; then every risk rule and the stops."""
    table = Table(title="Governor", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value")
    kill = "absent" if state.kill_value is None else repr(state.kill_value)
    trading = "ALLOWED" if state.trading_allowed else "HALTED (fail-closed)"
    if state.trading_allowed and risk is not None and risk.state.state is not TradingState.ACTIVE:
        trading = f"{risk.state.state.value} (trading state)"
    table.add_row("trading", trading)
    table.add_row("kill switch quantum:kill", kill)
    if risk is not None:
        table.add_row("trading state", Text(describe_state(risk.state)))
    table.add_row("mode", state.mode)
    table.add_row(f"daily trades {state.day:%Y-%m-%d} (UTC)", f"{state.count:,} / {state.limit:,}")
    table.add_row("max notional", f"{state.max_notional}")
    table.add_row("symbol allow-list", ", ".join(state.symbol_allowlist) or "(all symbols)")
    table.add_row("max intent age", f"{state.max_intent_age_s:g}s")
    if risk is None:
        return table
    return Group(table, rules_table(risk), stops_table(risk))


def rules_table(risk: RiskStatus) -> Table:
    """One row per risk rule: its setting, limit ("off" when unset), current value and headroom."""
    table = Table(title="Risk rules", title_justify="left")
    for name in ("rule", "setting", "limit", "current", "headroom"):
        table.add_column(name, justify="right" if name in ("limit", "current", "headroom") else "left")
    for rule in risk.rules:
        table.add_row(Text(rule.name), rule.setting, rule.limit, Text(rule.current), rule.headroom)
    return table


def stops_table(risk: RiskStatus) -> Table:
    """One row per position with protective levels: stop, take, when armed, and whether its exit fired."""
    table = Table(title="Protective stops", title_justify="left")
    for name in ("symbol", "stop", "take", "armed at", "fired"):
        table.add_column(name, justify="right" if name in ("stop", "take") else "left")
    for symbol, stop in sorted(risk.stops.items()):
        fired = f"{stop.kind or 'yes'} at {stop.fired_at} ({stop.fired})" if stop.fired else "no"
        table.add_row(symbol, _dec(stop.stop, 8), _dec(stop.take, 8), stop.at or "-", Text(fired))
    if not risk.stops:
        table.add_row("(none)", "-", "-", "-", "-")
    return table


def _dec(value: Decimal | None, places: int = 8) -> str:
    if value is None:
        return "-"
    rounded = value.quantize(Decimal(1).scaleb(-places)).normalize() if value.is_finite() else value
    return f"{rounded:,f}"


def positions_table(marked: list[Marked]) -> Table:
    """One row per symbol the book has traded: held, average entry, mark, value, PnL, fees."""
    table = Table(title="Positions (the book)", title_justify="left")
    for name in ("symbol", "qty", "avg entry", "mark", "value", "unrealised", "realised", "fees", "fills"):
        table.add_column(name, justify="left" if name in ("symbol", "fees") else "right")
    for m in marked:
        p = m.position
        fees = ", ".join(f"{_dec(amount)} {asset}" for asset, amount in sorted(p.fees.items()))
        table.add_row(
            p.symbol,
            _dec(p.qty),
            _dec(p.avg_price, 4),
            _dec(m.mark, 4),
            _dec(p.value(m.mark), 2),
            _dec(p.unrealised(m.mark), 2),
            _dec(p.realised, 2),
            fees,
            f"{p.fills:,}",
        )
    return table


def balance_table(held: dict[str, Decimal], flows: dict[str, Decimal]) -> Table:
    """Per asset: the paper account's balance and the net change the book's fills made."""
    table = Table(title="Paper account", title_justify="left")
    for name in ("asset", "balance", "moved by the book's fills"):
        table.add_column(name, justify="left" if name == "asset" else "right")
    for asset in sorted(set(held) | set(flows)):
        table.add_row(asset, _dec(held.get(asset)), _dec(flows.get(asset)))
    return table


def trades_table(found: list[Trade]) -> Table:
    """One row per recorded result, newest first."""
    table = Table(title="Trades (the journal)", title_justify="left")
    for name in ("time (UTC)", "symbol", "side", "qty", "filled", "price", "fee", "status", "strategy"):
        table.add_column(name, justify="right" if name in ("qty", "filled", "price", "fee") else "left")
    for t in found:
        when = f"{t.timestamp:%Y-%m-%d %H:%M:%S}" if t.timestamp else "-"
        outcome = t.status + (f" {t.reason}" if t.reason else "")
        fee = f"{_dec(t.fee)} {t.fee_asset}" if t.fee else "-"
        table.add_row(
            when, t.symbol, t.side, _dec(t.qty), _dec(t.filled_qty), _dec(t.avg_price, 4), fee, outcome, t.strategy
        )
    return table


def pnl_table(groups: list[PnL], by: str) -> Table:
    """Realised (and, by symbol or strategy, unrealised) PnL per group and quote asset."""
    table = Table(title=f"PnL by {by} (average cost)", title_justify="left")
    for name in (by, "quote", "realised", "unrealised", "fees", "fills", "volume"):
        table.add_column(name, justify="left" if name in (by, "quote", "fees") else "right")
    for g in groups:
        fees = ", ".join(f"{_dec(amount)} {asset}" for asset, amount in sorted(g.fees.items()))
        unrealised = "-" if by == "day" else _dec(g.unrealised, 2)
        table.add_row(g.key or "-", g.quote, _dec(g.realised, 2), unrealised, fees, f"{g.fills:,}", _dec(g.volume, 2))
    return table


def describe_outcome(outcome: dict[str, Any]) -> str:
    """One line: ``FILLED 0.1 ETHUSDT at 3000 (fee 0.3 USDT)`` or ``REJECTED KILL_SWITCH: detail``."""
    if outcome.get("status") == "FILLED":
        return (
            f"FILLED {outcome.get('side')} {outcome.get('filled_qty')} {outcome.get('symbol')} at "
            f"{outcome.get('avg_price')} (fee {outcome.get('fee')} {outcome.get('fee_asset')})"
        )
    status = outcome.get("status") or outcome.get("reason")  # a rejection has only a reason
    reason = outcome.get("reason", "") if outcome.get("status") else ""
    detail = outcome.get("detail", "")
    return " ".join(part for part in (str(status), str(reason)) if part) + (f": {detail}" if detail else "")


def demo_screen(progress: DemoProgress) -> Group:
    """The demo's live screen: every stream and group, then a line of what was fed and what came out."""
    done = sum(progress.outcomes.values())
    line = Text(
        f"{progress.elapsed:5.1f}s  {progress.head}  outcomes {done:,}  "
        + "  ".join(f"{k} {v:,}" for k, v in sorted(progress.outcomes.items()))
    )
    return Group(status_table(progress.streams, f"Demo ({progress.source}): paper exchange"), line)


def doctor_table(checks: list[Check]) -> Table:
    """One row per check: its verdict in colour, what was found, the fix."""
    table = Table(title="quantum-trader doctor", title_justify="left")
    for column in ("check", "result", "detail", "fix"):
        table.add_column(column)
    colours = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}
    for check in checks:
        table.add_row(check.name, f"[{colours[check.verdict]}]{check.verdict}[/]", check.detail, check.fix)
    return table


def reconcile_screen(report: Report) -> Group:
    """A line saying what was compared and whether it was clean, then one row per difference."""
    compared = f"{report.assets} assets" + (
        f", {report.orders} orders since {report.since}" if report.orders >= 0 else ""
    )
    notes = [note for flag, note in (
        (report.baseline_recorded, "baseline recorded (the exchange's holdings minus the book's fills)"),
        (report.baseline_pending, "no baseline yet: the book kept moving, the next run records it"),
        (report.halted, f"kill switch turned on: {report.halt_reason}"),
    ) if flag]  # fmt: skip
    verdict = "[green]clean[/]" if report.clean else f"[yellow]{len(report.differences)} difference(s)[/]"
    head = Text.from_markup(f"reconciled with {report.exchange} at {report.at}: {verdict} ({compared})")
    parts: list[Text | Table] = [head, *(Text(note) for note in notes)]
    if report.differences:
        table = Table(title_justify="left")
        for column in ("difference", "of", "size", "what", "fix"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for d in report.differences:
            table.add_row(d.kind.value, d.subject or "-", f"{d.size.normalize():f}", d.detail, d.fix)
        parts.append(table)
    return Group(*parts)
