"""A backtest's report: its trades, the equity curve and the figures, pure functions of the fills and the closes."""

from __future__ import annotations

import base64
import io
import itertools
import math
from array import array
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from html import escape
from typing import Any

import numpy as np

from quantum_trader import portfolio
from quantum_trader.backtest.streams import Streams
from quantum_trader.bars import Bars
from quantum_trader.events import Candle
from quantum_trader.exchanges.base import split_symbol
from quantum_trader.settings import DEFAULT_QUOTE_ASSETS


@dataclass(frozen=True, slots=True)
class Trade:
    """One fill."""

    time: int
    side: str
    qty: Decimal
    price: Decimal
    fee: Decimal
    strategy: str = ""
    symbol: str = ""

    def as_json(self) -> dict[str, str]:
        """Exact decimals as strings, the time as ISO-8601 UTC."""
        return {
            "time": datetime.fromtimestamp(self.time / 1000, UTC).isoformat().replace("+00:00", "Z"),
            "symbol": self.symbol,
            "side": self.side,
            "qty": str(self.qty),
            "price": str(self.price),
            "fee": str(self.fee),
            "strategy": self.strategy,
        }


@dataclass
class Report:
    """What a backtest found."""

    symbol: str
    candles: int
    trades: list[Trade]
    start_equity: float
    end_equity: float
    pnl: float
    return_pct: float
    max_drawdown_pct: float
    win_rate: float | None
    sharpe: float | None
    exposure_pct: float
    fees: float
    # Compact arrays (8 bytes a point): a year of minutes is half a million points.
    equity: Sequence[float] = field(default_factory=lambda: array("d"))
    times: Sequence[int] = field(default_factory=lambda: array("q"))
    rejections: dict[str, int] = field(default_factory=dict)  # reason code -> orders rejected for it
    settings: dict[str, str] = field(default_factory=dict)  # the settings that shaped the trades
    states: list[dict[str, str]] = field(default_factory=list)  # trading-state changes (breakers), in order
    streams: Streams | None = field(default=None, repr=False)  # what the run left: streams, book, balances

    @property
    def rejected(self) -> int:
        """Decisions that did not become fills (router, governor or exchange said no)."""
        return sum(self.rejections.values())

    def summary(self) -> dict[str, Any]:
        """The figures, without the curves."""
        return {
            "symbol": self.symbol,
            "candles": self.candles,
            "trades": len(self.trades),
            "rejected": self.rejected,
            "pnl": round(self.pnl, 6),
            "return_pct": round(self.return_pct, 4),
            "max_drawdown_pct": round(self.max_drawdown_pct, 4),
            "win_rate": None if self.win_rate is None else round(self.win_rate, 4),
            "sharpe": None if self.sharpe is None else round(self.sharpe, 4),
            "exposure_pct": round(self.exposure_pct, 2),
            "fees": round(self.fees, 6),
        }

    def as_json(self) -> dict[str, Any]:
        """The summary, the rejections by reason, the settings and every trade."""
        return {
            **self.summary(),
            "start_equity": self.start_equity,
            "rejections": dict(sorted(self.rejections.items())),
            "settings": self.settings,
            "trade_list": [trade.as_json() for trade in self.trades],
            "state_changes": self.states,
        }


def evaluate(symbol: str, candles: Sequence[Candle], trades: list[Trade], start_quote: float) -> Report:
    """Equity curve and figures from the fills (pure).

    Equity is sampled once per open time (every symbol's candles of that time seen): the quote
    balance plus each symbol's holding at its latest close. A trade counts from the first open
    time at or after its decision.
    """
    bars = Bars.of(candles)
    stamps = bars.open_time
    firsts = np.flatnonzero(np.r_[True, stamps[1:] != stamps[:-1]]) if len(stamps) else np.zeros(0, dtype=np.intp)
    times = array("q")
    times.frombytes(np.ascontiguousarray(stamps[firsts], dtype=np.int64).tobytes())
    by_point: dict[int, list[Trade]] = {}
    for trade in trades:
        point = min(bisect_left(times, trade.time), len(times) - 1) if times else 0
        by_point.setdefault(point, []).append(trade)
    quote = start_quote
    base: dict[str, float] = {}
    held: dict[str, Decimal] = {}  # exact, so a closed position is exactly zero
    closes = [0.0] * len(bars.symbols)
    equity = array("d")
    exposed = 0
    single = len(bars.symbols) == 1
    point = -1
    for at, row_symbol, close in _rows(bars):
        if single or point < 0 or at != times[point]:
            if point >= 0 and not single:
                equity.append(quote + sum(amount * closes[bars.symbols.index(n)] for n, amount in base.items()))
                exposed += any(qty != 0 for qty in held.values())
            point += 1
        closes[row_symbol] = close
        if point in by_point:
            for trade in by_point.pop(point):
                name = trade.symbol or symbol
                signed = float(trade.qty) if trade.side == "BUY" else -float(trade.qty)
                held[name] = held.get(name, Decimal(0)) + (trade.qty if trade.side == "BUY" else -trade.qty)
                base[name] = base.get(name, 0.0) + signed
                quote -= signed * float(trade.price) + float(trade.fee)
        if single:
            equity.append(quote + base.get(bars.symbols[0], 0.0) * close if base else quote)
            exposed += any(qty != 0 for qty in held.values())
    if point >= 0 and not single:
        equity.append(quote + sum(amount * closes[bars.symbols.index(n)] for n, amount in base.items()))
        exposed += any(qty != 0 for qty in held.values())
    wins, closed = 0, 0
    # The book's method (average cost, portfolio.py), one book per strategy: an exit closes its own
    # strategy's entries; it wins when it realises more than its share of the cost, fees included.
    books: dict[str, dict[str, portfolio.Position]] = {}
    for trade in trades:
        name = trade.symbol or symbol
        try:
            base_asset, quote_asset = split_symbol(name, [*DEFAULT_QUOTE_ASSETS])
        except ValueError:
            base_asset, quote_asset = name, ""  # fees then count in the quote all the same: only PnL is read
        book = books.setdefault(trade.strategy, {})
        before = book.get(name)
        fill = portfolio.Fill(
            symbol=name, base=base_asset, quote=quote_asset, side=trade.side, qty=trade.qty, price=trade.price,
            fee=trade.fee, fee_asset=quote_asset,
        )  # fmt: skip
        book.update(portfolio.replay([fill], strict=False, start={name: before} if before else None))
        if trade.side == "SELL" and before is not None and before.qty > 0:
            closed += 1
            wins += book[name].realised > before.realised
    peak, drawdown = -math.inf, 0.0
    for value in equity:
        peak = max(peak, value)
        drawdown = max(drawdown, (peak - value) / peak if peak > 0 else 0.0)
    # Two passes over the curve rather than a list of half a million returns.
    count, total = 0, 0.0
    for a, b in itertools.pairwise(equity):
        if a > 0:
            count += 1
            total += b / a - 1
    sharpe = None
    if count > 1 and len(times) > 1:
        mean = total / count
        squares = 0.0
        for a, b in itertools.pairwise(equity):
            if a > 0:
                squares += (b / a - 1 - mean) ** 2
        std = math.sqrt(squares / (count - 1))
        gaps = np.diff(np.frombuffer(times, dtype=np.int64))
        per_year = 365 * 86_400_000 / max(1, int(np.partition(gaps, len(gaps) // 2)[len(gaps) // 2]))
        sharpe = mean / std * math.sqrt(per_year) if std > 0 else None
    end = equity[-1] if equity else start_quote
    return Report(
        symbol=symbol,
        candles=len(candles),
        trades=trades,
        start_equity=start_quote,
        end_equity=end,
        pnl=end - start_quote,
        return_pct=(end / start_quote - 1) * 100,
        max_drawdown_pct=drawdown * 100,
        win_rate=wins / closed if closed else None,
        sharpe=sharpe,
        exposure_pct=exposed / len(times) * 100 if times else 0.0,
        fees=sum(float(t.fee) for t in trades),
        equity=equity,
        times=times,
    )


def _rows(bars: Bars) -> Iterator[tuple[int, int, float]]:
    """(open time, symbol index, close) of each row, a chunk at a time."""
    for first in range(0, len(bars), 8192):
        part = slice(first, first + 8192)
        yield from zip(
            bars.open_time[part].tolist(), bars.symbol[part].tolist(), bars.close[part].tolist(), strict=True
        )


def shown(value: Decimal | float, places: int = 8) -> str:
    """A figure for people: at most ``places`` decimals, no trailing zeros (``0.99999999895614`` -> ``1``)."""
    rounded = Decimal(str(value)).quantize(Decimal(1).scaleb(-places)).normalize()
    return f"{rounded:f}"


def html(report: Report) -> str:
    """A standalone HTML report with the equity curve (matplotlib PNG inline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4))
    axis.plot(np.array(report.times, dtype="datetime64[ms]"), report.equity, linewidth=1.2)
    axis.set_title(f"Equity, {report.symbol}")
    axis.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    image = base64.b64encode(buffer.getvalue()).decode()
    figures = {**report.summary(), **{f"rejected {code}": n for code, n in sorted(report.rejections.items())}}
    figures |= report.settings
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in figures.items())
    trades = "".join(
        f"<tr><td>{datetime.fromtimestamp(t.time / 1000, UTC):%Y-%m-%d %H:%M}</td><td>{t.side}</td>"
        f"<td>{shown(t.qty)}</td><td>{shown(t.price)}</td><td>{shown(t.fee)}</td><td>{escape(t.strategy)}</td></tr>"
        for t in report.trades
    )
    return (
        "<!doctype html><meta charset=utf-8><title>Backtest</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;text-align:right}</style>"
        f"<h1>Backtest {report.symbol}</h1><img alt='equity curve' src='data:image/png;base64,{image}'>"
        f"<h2>Figures</h2><table>{rows}</table>"
        f"<h2>Trades</h2><table><tr><th>time</th><th>side</th><th>qty</th><th>price</th><th>fee</th><th>strategy</th></tr>"
        f"{trades}</table>"
    )
