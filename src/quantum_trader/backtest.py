"""Backtests through the production code path: engine → router → governor → paper exchange.

A private Valkey in a temporary directory (a fresh namespace: live keys are never
touched) runs the same stages as production. The clock is simulated: each candle
is published, then the engine, the router and execution each handle what is
waiting, with "now" at the candle's close, before the next candle. Same data, same
strategies, same settings: the same trades. The report's figures are pure functions
of the trades and the closes.
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
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from quantum_trader import keys
from quantum_trader.ai_engine import AiEngine
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.embedded import EmbeddedValkey, free_port
from quantum_trader.bus.streams import GroupConsumer
from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.base import split_symbol
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.marketdata import Candle, clean, publish
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from quantum_trader.strategies import Strategy


@dataclass(frozen=True, slots=True)
class Trade:
    """One fill."""

    time: int
    side: str
    qty: Decimal
    price: Decimal
    fee: Decimal


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

    def summary(self) -> dict[str, Any]:
        """The figures, without the curves."""
        return {
            "symbol": self.symbol,
            "candles": self.candles,
            "trades": len(self.trades),
            "pnl": round(self.pnl, 6),
            "return_pct": round(self.return_pct, 4),
            "max_drawdown_pct": round(self.max_drawdown_pct, 4),
            "win_rate": None if self.win_rate is None else round(self.win_rate, 4),
            "sharpe": None if self.sharpe is None else round(self.sharpe, 4),
            "exposure_pct": round(self.exposure_pct, 2),
            "fees": round(self.fees, 6),
        }


def evaluate(symbol: str, candles: list[Candle], trades: list[Trade], start_quote: float) -> Report:
    """Equity curve and figures from the fills (pure)."""
    by_time: dict[int, list[Trade]] = {}
    for trade in trades:
        by_time.setdefault(trade.time, []).append(trade)
    quote, base = start_quote, 0.0
    equity, exposed = [], 0
    for candle in candles:
        for trade in by_time.get(candle.open_time, []):
            signed = float(trade.qty) if trade.side == "BUY" else -float(trade.qty)
            base += signed
            quote -= signed * float(trade.price) + float(trade.fee)
        equity.append(quote + base * candle.close)
        exposed += base != 0
    wins, closed = 0, 0
    lots: list[tuple[float, float]] = []  # FIFO of (qty, cost per unit incl. fee)
    for trade in trades:
        qty, price, fee = float(trade.qty), float(trade.price), float(trade.fee)
        if trade.side == "BUY":
            lots.append((qty, price + fee / qty))
            continue
        left, cost = qty, 0.0
        while left > 1e-12 and lots:
            lot_qty, lot_price = lots[0]
            used = min(left, lot_qty)
            cost += used * lot_price
            left -= used
            lots[0] = (lot_qty - used, lot_price)
            if lots[0][0] <= 1e-12:
                lots.pop(0)
        if left < qty:
            closed += 1
            wins += (qty - left) * price - fee * (qty - left) / qty > cost
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


async def run(
    candles: list[Candle],
    strategies: list[Strategy],
    *,
    start_quote: Decimal = Decimal(10_000),
    notional: Decimal = Decimal(1_000),
    fee_rate: Decimal = Decimal("0.001"),
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Replay ``candles`` (one symbol) through the pipeline on a private server."""
    kept, _skipped = clean(candles)
    if not kept:
        raise ConfigError(f"no usable candles in the data ({len(candles)} read, every one skipped as bad data)")
    symbol = kept[0].symbol
    quote_assets = ["USDT", "USDC", "BUSD", "USD", "EUR", "BTC", "ETH"]
    _base, quote = split_symbol(symbol, quote_assets)
    now = {"t": datetime.fromtimestamp(kept[0].open_time / 1000, UTC)}
    clock = lambda: now["t"]  # noqa: E731  (the simulated clock every stage shares)
    with tempfile.TemporaryDirectory(prefix="qt-backtest-") as tmp:
        server = EmbeddedValkey(Path(tmp), port=free_port(), appendfsync="no")
        server.start()
        redis: Redis = client(server.url)
        try:
            settings = Settings(
                redis_url=server.url,
                data_dir=Path(tmp),
                daily_limit=10**9,
                max_notional=Decimal(10**12),
                max_intent_age_s=3600,
                ai_notional=notional,
                paper_fee_rate=fee_rate,
                paper_balances={quote: start_quote},
                quote_assets=quote_assets,
                consumer="backtest",
            )
            await redis.set(keys.KILL_SWITCH, "0")
            engine = AiEngine(redis, settings, strategies, clock=clock)
            router = Router(redis, settings, clock=clock)
            paper = PaperExchange(
                redis, fee_rate=fee_rate, quote_assets=quote_assets, starting_balances={quote: start_quote}
            )
            await paper.fund()
            execution = Execution(redis, settings, paper, clock=clock)
            for stage in (engine.consumer, router.consumer, execution.consumer):
                await stage.setup()
            for index, candle in enumerate(kept):
                now["t"] = datetime.fromtimestamp(candle.open_time / 1000, UTC)
                await publish(redis, settings.candle_stream, [candle])
                await _drain(engine.consumer, engine.handle)
                await _drain(router.consumer, router.handle)
                await _drain(execution.consumer, execution.handle)
                if progress is not None:
                    progress(index + 1)
            trades = []
            intents = {i: json.loads(f["payload"]) for i, f in await redis.xrange(settings.intent_stream)}
            for _id, fields in await redis.xrange(settings.result_stream):
                result = json.loads(fields["payload"])
                if result["status"] != "FILLED":
                    continue
                decided = intents[result["intent_id"]]["decision_ts"]
                at = int(datetime.fromisoformat(decided.replace("Z", "+00:00")).timestamp() * 1000)
                trades.append(
                    Trade(
                        at,
                        result["side"],
                        Decimal(result["filled_qty"]),
                        Decimal(result["avg_price"]),
                        Decimal(result["fee"]),
                    )
                )
        finally:
            await redis.aclose()
            server.stop()
    return evaluate(symbol, kept, trades, float(start_quote))


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
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in report.summary().items())
    trades = "".join(
        f"<tr><td>{datetime.fromtimestamp(t.time / 1000, UTC):%Y-%m-%d %H:%M}</td><td>{t.side}</td><td>{t.qty}</td>"
        f"<td>{t.price}</td><td>{t.fee}</td></tr>"
        for t in report.trades
    )
    return (
        "<!doctype html><meta charset=utf-8><title>Backtest</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;text-align:right}</style>"
        f"<h1>Backtest {report.symbol}</h1><img alt='equity curve' src='data:image/png;base64,{image}'>"
        f"<h2>Figures</h2><table>{rows}</table>"
        f"<h2>Trades</h2><table><tr><th>time</th><th>side</th><th>qty</th><th>price</th><th>fee</th></tr>{trades}</table>"
    )
