"""Backtests through the production code path: engine → router → governor → paper exchange.

A private Valkey in a temporary directory (a fresh namespace: live keys are never
touched) runs the same stages as production, with the same settings as ``run`` (fees,
slippage, quote assets, sizing, limits, gap rule), the paper exchange funded with the
starting quote balance only. The clock is simulated: each candle is published, then
the engine, the router and execution each handle what is waiting, with "now" at the
candle's close, before the next candle. Same data, same strategies, same settings: the
same trades. The report's figures are pure functions of the trades and the closes.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from quantum_trader import keys, portfolio
from quantum_trader.ai_engine import AiEngine
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.embedded import EmbeddedValkey, free_port
from quantum_trader.bus.streams import GroupConsumer
from quantum_trader.errors import ConfigError
from quantum_trader.events import Candle
from quantum_trader.exchanges.base import split_symbol
from quantum_trader.exchanges.factory import build_exchange
from quantum_trader.execution import Execution
from quantum_trader.feed import publish
from quantum_trader.marketdata import clean, gap_rule
from quantum_trader.protect import Protect
from quantum_trader.router import Router
from quantum_trader.settings import DEFAULT_QUOTE_ASSETS, Settings, load_settings
from quantum_trader.strategies import Strategy

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

    def as_json(self) -> dict[str, str]:
        """Exact decimals as strings, the time as ISO-8601 UTC."""
        return {
            "time": datetime.fromtimestamp(self.time / 1000, UTC).isoformat().replace("+00:00", "Z"),
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


def evaluate(symbol: str, candles: list[Candle], trades: list[Trade], start_quote: float) -> Report:
    """Equity curve and figures from the fills (pure)."""
    by_time: dict[int, list[Trade]] = {}
    for trade in trades:
        by_time.setdefault(trade.time, []).append(trade)
    quote, base, held = start_quote, 0.0, Decimal(0)  # held: exact, so a closed position is exactly zero
    equity, exposed = [], 0
    for candle in candles:
        for trade in by_time.get(candle.open_time, []):
            signed = float(trade.qty) if trade.side == "BUY" else -float(trade.qty)
            held += trade.qty if trade.side == "BUY" else -trade.qty
            base += signed
            quote -= signed * float(trade.price) + float(trade.fee)
        equity.append(quote + base * candle.close)
        exposed += held != 0
    wins, closed = 0, 0
    # The book's method (average cost, portfolio.py), one book per strategy: an exit closes its own
    # strategy's entries; it wins when it realises more than its share of the cost, fees included.
    books: dict[str, dict[str, portfolio.Position]] = {}
    try:
        base_asset, quote_asset = split_symbol(symbol, [*DEFAULT_QUOTE_ASSETS])
    except ValueError:
        base_asset, quote_asset = symbol, ""  # fees then count in the quote all the same: only PnL is read
    for trade in trades:
        book = books.setdefault(trade.strategy, {})
        before = book.get(symbol)
        fill = portfolio.Fill(
            symbol=symbol, base=base_asset, quote=quote_asset, side=trade.side, qty=trade.qty, price=trade.price,
            fee=trade.fee, fee_asset=quote_asset,
        )  # fmt: skip
        book.update(portfolio.replay([fill], strict=False, start={symbol: before} if before else None))
        if trade.side == "SELL" and before is not None and before.qty > 0:
            closed += 1
            wins += book[symbol].realised > before.realised
    peak, drawdown = -math.inf, 0.0
    for value in equity:
        peak = max(peak, value)
        drawdown = max(drawdown, (peak - value) / peak if peak > 0 else 0.0)
    returns = [b / a - 1 for a, b in itertools.pairwise(equity) if a > 0]
    sharpe = None
    if len(returns) > 1 and len(candles) > 1:
        mean = sum(returns) / len(returns)
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1))
        spacing = sorted(b.open_time - a.open_time for a, b in itertools.pairwise(candles))
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
        exposure_pct=exposed / len(candles) * 100 if candles else 0.0,
        fees=sum(float(t.fee) for t in trades),
        equity=equity,
        times=[c.open_time for c in candles],
    )


async def _drain(consumer: GroupConsumer, handle: Callable[[list[Any]], Any]) -> None:
    while batch := await consumer.read_new(wait=False):
        await handle(batch)
        if len(batch) < consumer.count:
            return  # nothing else writes to the private server: a short batch was the rest


def quote_of(symbol: str, settings: Settings) -> str:
    """The symbol's quote asset under QT_QUOTE_ASSETS, or a ConfigError saying how to fix it."""
    try:
        return split_symbol(symbol, settings.quote_assets)[1]
    except ValueError as exc:
        raise ConfigError(
            f"{exc}; name the market with --symbol (e.g. BTCUSDT) or add its quote asset to QT_QUOTE_ASSETS"
        ) from None


async def run(
    candles: list[Candle],
    strategies: list[Strategy],
    settings: Settings | None = None,
    *,
    start_quote: Decimal | None = None,
    notional: Decimal | None = None,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Replay ``candles`` (one symbol) through the pipeline on a private server.

    ``settings`` are those ``run`` would use (read from the environment when None);
    ``start_quote`` and ``notional`` override the starting quote balance
    (``QT_PAPER_BALANCES`` of the quote asset, else 10,000) and ``QT_AI_NOTIONAL``.
    """
    base = settings if settings is not None else load_settings()
    kept, _skipped = clean(candles)
    if not kept:
        raise ConfigError(f"no usable candles in the data ({len(candles)} read, every one skipped as bad data)")
    symbol = kept[0].symbol
    quote = quote_of(symbol, base)
    start = start_quote if start_quote is not None else base.paper_balances.get(quote, DEFAULT_START_QUOTE)
    gap = gap_rule(base.ai_gap, kept)  # the whole file is known: a market with closures gets a tolerant rule
    now = {"t": datetime.fromtimestamp(kept[0].open_time / 1000, UTC)}
    clock = lambda: now["t"]  # noqa: E731  (the simulated clock every stage shares)

    async def advance(seconds: float) -> None:
        """Execution waiting for the order rate: simulated time passes, nothing sleeps."""
        now["t"] += timedelta(seconds=seconds)

    with tempfile.TemporaryDirectory(prefix="qt-backtest-") as tmp:
        server = EmbeddedValkey(Path(tmp), port=free_port(), appendfsync="no")
        server.start()
        redis: Redis = client(server.url)
        try:
            # Only where the run happens changes (and a private consumer name): every trading setting is the user's.
            update: dict[str, Any] = {
                "redis_url": server.url,
                "data_dir": Path(tmp),
                "exchange": "paper",
                "paper_balances": {quote: start},
                "consumer": "backtest",
            }
            if notional is not None:
                update["ai_notional"] = notional
            cfg = base.model_copy(update=update)
            await redis.set(keys.KILL_SWITCH, "0")
            engine = AiEngine(redis, cfg, strategies, clock=clock, gap=gap)
            router = Router(redis, cfg, clock=clock)
            paper = await build_exchange(redis, cfg)
            execution = Execution(redis, cfg, paper, clock=clock, sleep=advance)
            protect = Protect(redis, cfg, clock=clock)
            for stage in (engine.consumer, protect.consumer, router.consumer, execution.consumer):
                await stage.setup()
            for index, candle in enumerate(kept):
                now["t"] = datetime.fromtimestamp(candle.open_time / 1000, UTC)
                await publish(redis, cfg.candle_stream, [candle])
                decided = engine.totals["decisions"] + protect.totals["exits"]
                await _drain(engine.consumer, engine.handle)
                await _drain(protect.consumer, protect.handle)
                if engine.totals["decisions"] + protect.totals["exits"] > decided:  # else nothing to route
                    await _drain(router.consumer, router.handle)
                    await _drain(execution.consumer, execution.handle)
                if progress is not None:
                    progress(index + 1)
            trades, rejections = await _outcomes(redis, cfg)
            states = [json.loads(f["payload"]) for _id, f in await redis.xrange(cfg.streams.risk_state)]
        finally:
            await redis.aclose()
            server.stop()
    report = evaluate(symbol, kept, trades, float(start))
    report.rejections = rejections
    report.states = states
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


async def _outcomes(redis: Redis, settings: Settings) -> tuple[list[Trade], dict[str, int]]:
    """Fills (timed by their decision) and rejections by reason code, from the private server's streams."""
    trades: list[Trade] = []
    rejections: dict[str, int] = {}
    intents = {i: json.loads(f["payload"]) for i, f in await redis.xrange(settings.intent_stream)}
    for _id, fields in await redis.xrange(settings.result_stream):
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
            )
        )
    for _id, fields in await redis.xrange(settings.rejected_stream):
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
