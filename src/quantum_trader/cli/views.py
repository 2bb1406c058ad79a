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
from quantum_trader.governor import GovernorState
from quantum_trader.ops.doctor import Check

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


def governor_table(state: GovernorState) -> Table:
    """Today's count, limit, mode and kill switch."""
    table = Table(title="Governor", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value")
    kill = "absent" if state.kill_value is None else repr(state.kill_value)
    table.add_row("trading", "ALLOWED" if state.trading_allowed else "HALTED (fail-closed)")
    table.add_row("kill switch quantum:kill", kill)
    table.add_row("mode", state.mode)
    table.add_row(f"daily trades {state.day:%Y-%m-%d} (UTC)", f"{state.count:,} / {state.limit:,}")
    table.add_row("max notional", f"{state.max_notional}")
    table.add_row("symbol allow-list", ", ".join(state.symbol_allowlist) or "(all symbols)")
    table.add_row("max intent age", f"{state.max_intent_age_s:g}s")
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
