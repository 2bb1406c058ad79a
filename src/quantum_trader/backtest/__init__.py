"""Backtests through the production rules: engine → protect → router → governor → paper exchange → commit.

Same data, same strategies, same settings as ``run`` (fees, slippage, quote assets, sizing,
limits, risk rules, gap rule): the same trades. Two transports carry the candles, with one
outcome (a property test holds them to it):

- in process (the default, ``inprocess``): the stages' rules called in order on the server's
  state held in memory, tens of thousands of candles a second;
- through a private server (``--through-server``, ``server``): every candle published to a
  private Valkey and drained by the stage classes themselves, a few hundred a second.

The clock is simulated: "now" is each candle's open time. The paper exchange starts with the
starting quote balance only. The report's figures are pure functions of the trades and the closes.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from html import escape
from typing import Any

import numpy as np

from quantum_trader import portfolio
from quantum_trader.backtest.inprocess import Inject, simulate, streams_of
from quantum_trader.backtest.streams import Streams
from quantum_trader.bars import Bars, ordered_clean
from quantum_trader.errors import ConfigError
from quantum_trader.events import Candle
from quantum_trader.exchanges.base import split_symbol
from quantum_trader.logs import get_logger
from quantum_trader.marketdata import gap_rule
from quantum_trader.settings import DEFAULT_QUOTE_ASSETS, Settings, load_settings
from quantum_trader.strategies import Strategy

__all__ = ["Inject", "Report", "Streams", "Trade", "evaluate", "html", "outcomes", "quote_of", "run", "shown"]

log = get_logger("backtest")
DEFAULT_START_QUOTE = Decimal(10_000)  # when neither --balance nor QT_PAPER_BALANCES names the quote asset


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
    equity: list[float] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
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
    times: list[int] = stamps[firsts].tolist()
    by_point: dict[int, list[Trade]] = {}
    for trade in trades:
        point = min(bisect_left(times, trade.time), len(times) - 1) if times else 0
        by_point.setdefault(point, []).append(trade)
    quote = start_quote
    base: dict[str, float] = {}
    held: dict[str, Decimal] = {}  # exact, so a closed position is exactly zero
    closes = [0.0] * len(bars.symbols)
    equity: list[float] = []
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
    returns = [b / a - 1 for a, b in itertools.pairwise(equity) if a > 0]
    sharpe = None
    if len(returns) > 1 and len(times) > 1:
        mean = sum(returns) / len(returns)
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1))
        spacing = sorted(b - a for a, b in itertools.pairwise(times))
        per_year = 365 * 86_400_000 / max(1, spacing[len(spacing) // 2])
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


def quote_of(symbol: str, settings: Settings) -> str:
    """The symbol's quote asset under QT_QUOTE_ASSETS, or a ConfigError saying how to fix it."""
    try:
        return split_symbol(symbol, settings.quote_assets)[1]
    except ValueError as exc:
        raise ConfigError(
            f"{exc}; name the market with --symbol (e.g. BTCUSDT) or add its quote asset to QT_QUOTE_ASSETS"
        ) from None


async def run(
    candles: Sequence[Candle],
    strategies: list[Strategy],
    settings: Settings | None = None,
    *,
    start_quote: Decimal | None = None,
    notional: Decimal | None = None,
    progress: Callable[[int], None] | None = None,
    through_server: bool = False,
    script: Mapping[int, Inject] | None = None,
) -> Report:
    """Replay ``candles`` (one or more symbols of one quote asset) through the pipeline's rules.

    ``settings`` are those ``run`` would use (read from the environment when None);
    ``start_quote`` and ``notional`` override the starting quote balance
    (``QT_PAPER_BALANCES`` of the quote asset, else 10,000) and ``QT_AI_NOTIONAL``.
    ``through_server``: every candle through a private server and the stage classes (slow; for
    proving agreement). ``script``: per index of the cleaned candles, what else happens there
    (kill-switch flips, decisions published by another publisher).
    """
    base = settings if settings is not None else load_settings()
    given = Bars.of(candles)
    kept, skipped = ordered_clean(given)
    for row, reason in skipped:
        log.warning("candle_skipped", symbol=given.symbols[given.symbol[row]], open_time=int(given.open_time[row]),
                    reason=reason)  # fmt: skip
    if not len(kept):
        raise ConfigError(f"no usable candles in the data ({len(candles)} read, every one skipped as bad data)")
    symbols = sorted({kept.symbols[at] for at in np.unique(kept.symbol).tolist()})
    quotes = {symbol: quote_of(symbol, base) for symbol in symbols}
    quote = quotes[symbols[0]]
    if len(set(quotes.values())) > 1:
        raise ConfigError(
            "the data holds markets of different quote assets ("
            + ", ".join(f"{s} in {q}" for s, q in quotes.items())
            + "): backtest the markets of one quote asset together"
        )
    start = start_quote if start_quote is not None else base.paper_balances.get(quote, DEFAULT_START_QUOTE)
    gap = gap_rule(base.ai_gap, kept)  # the whole file is known: a market with closures gets a tolerant rule
    # Only where the run happens changes (and a private consumer name): every trading setting is the user's.
    update: dict[str, Any] = {"exchange": "paper", "paper_balances": {quote: start}, "consumer": "backtest"}
    if notional is not None:
        update["ai_notional"] = notional
    cfg = base.model_copy(update=update)
    if through_server:
        from quantum_trader.backtest.server import replay

        streams = await replay(kept, strategies, cfg, gap, script=script, progress=progress)
    else:
        streams = streams_of(
            simulate(kept, strategies, cfg, gap, start={quote: start}, script=script, progress=progress)
        )
    trades, rejections = outcomes(streams)
    report = evaluate(",".join(symbols), kept, trades, float(start))
    report.rejections = rejections
    report.states = [json.loads(fields["payload"]) for fields in streams.states]
    report.streams = streams
    sizing = f"fixed {cfg.ai_notional} {quote}" if cfg.ai_sizing == "fixed" else f"fraction {cfg.ai_fraction}"
    report.settings = {
        "start_quote": f"{start} {quote}",
        "sizing": sizing,
        "exit_fraction": str(cfg.ai_exit_fraction),
        "fee_rate": str(cfg.paper_fee_rate),
        "slippage_bps": str(cfg.paper_slippage_bps),
        "gap_rule": str(gap),
    }
    return report


def outcomes(streams: Streams) -> tuple[list[Trade], dict[str, int]]:
    """Fills (timed by their decision) and rejections by reason code, from the streams (pure)."""
    trades: list[Trade] = []
    rejections: dict[str, int] = {}
    intents = {i: json.loads(f["payload"]) for i, f in streams.intents}
    for _id, fields in streams.results:
        result = json.loads(fields["payload"])
        if result["status"] != "FILLED":
            code = result.get("reason") or result["status"]
            rejections[code] = rejections.get(code, 0) + 1
            continue
        intent = intents[result["intent_id"]]
        decided = intent["decision_ts"]
        at = int(datetime.fromisoformat(decided.replace("Z", "+00:00")).timestamp() * 1000)
        trades.append(
            Trade(
                at,
                result["side"],
                Decimal(result["filled_qty"]),
                Decimal(result["avg_price"]),
                Decimal(result["fee"]),
                intent.get("strategy") or "",
                result["symbol"],
            )
        )
    for _id, fields in streams.rejected:
        code = json.loads(fields["payload"]).get("reason") or "UNKNOWN"
        rejections[code] = rejections.get(code, 0) + 1
    return trades, rejections


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
