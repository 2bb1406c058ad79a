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

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
import numpy as np

from quantum_trader.backtest.inprocess import Inject, simulate, streams_of
from quantum_trader.backtest.report import Report, Trade, evaluate, html, shown
from quantum_trader.backtest.streams import Streams
from quantum_trader.bars import Bars, ordered_clean
from quantum_trader.errors import ConfigError
from quantum_trader.events import Candle
from quantum_trader.exchanges.base import split_symbol
from quantum_trader.logs import get_logger
from quantum_trader.marketdata import GapRule, gap_rule
from quantum_trader.settings import Settings, load_settings
from quantum_trader.strategies import Strategy

__all__ = ["Inject", "Report", "Streams", "Trade", "evaluate", "html", "outcomes", "quote_of", "replay", "run", "shown"]

log = get_logger("backtest")
DEFAULT_START_QUOTE = Decimal(10_000)  # when neither --balance nor QT_PAPER_BALANCES names the quote asset


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
    """``replay`` from a coroutine (the server path's stages are asyncio; the in-process path never waits)."""
    if not through_server:
        return replay(candles, strategies, settings, start_quote=start_quote, notional=notional, progress=progress,
                      script=script)  # fmt: skip
    prepared = _prepare(candles, settings, start_quote, notional)
    from quantum_trader.backtest.server import replay as through

    streams = await through(prepared.kept, strategies, prepared.cfg, prepared.gap, script=script, progress=progress)
    return _report(prepared, streams)


def replay(
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
    if through_server:
        return asyncio.run(
            run(candles, strategies, settings, start_quote=start_quote, notional=notional, progress=progress,
                through_server=True, script=script)
        )  # fmt: skip
    prepared = _prepare(candles, settings, start_quote, notional)
    start = {prepared.quote: prepared.start}
    pipeline = simulate(prepared.kept, strategies, prepared.cfg, prepared.gap, start=start, script=script,
                        progress=progress)  # fmt: skip
    return _report(prepared, streams_of(pipeline))


@dataclass(frozen=True)
class _Prepared:
    kept: Bars
    symbols: list[str]
    quote: str
    start: Decimal
    gap: GapRule
    cfg: Settings


def _prepare(
    candles: Sequence[Candle], settings: Settings | None, start_quote: Decimal | None, notional: Decimal | None
) -> _Prepared:
    """The candles sorted and cleaned, their quote asset, the starting balance, the gap rule and the settings."""
    base = settings if settings is not None else load_settings()
    given = Bars.of(candles)
    kept, skipped = ordered_clean(given)
    for row, reason in skipped:
        log.warning("candle_skipped", symbol=given.symbols[given.symbol[row]], open_time=int(given.open_time[row]),
                    reason=reason)  # fmt: skip
    if not len(given):
        raise ConfigError("the data holds no candles: give a file with at least one row of prices")
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
    # One execution, so one intent stream: partitions are how live processes share the load.
    update: dict[str, Any] = {
        "exchange": "paper",
        "paper_balances": {quote: start},
        "consumer": "backtest",
        "partitions": 1,
    }
    if notional is not None:
        update["ai_notional"] = notional
    return _Prepared(kept, symbols, quote, start, gap, base.model_copy(update=update))


def _report(prepared: _Prepared, streams: Streams) -> Report:
    """The report of a run: its figures from the fills and closes, what was refused, the states, the settings."""
    kept, symbols, quote, start, gap, cfg = (
        prepared.kept, prepared.symbols, prepared.quote, prepared.start, prepared.gap, prepared.cfg
    )  # fmt: skip
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


class _Result(msgspec.Struct):
    status: str
    side: str
    symbol: str
    intent_id: str
    reason: str = ""
    filled_qty: Decimal = Decimal(0)
    avg_price: Decimal | None = None
    fee: Decimal = Decimal(0)


class _Refused(msgspec.Struct):
    reason: str | None = None


_results = msgspec.json.Decoder(_Result)
_refused = msgspec.json.Decoder(_Refused)


def outcomes(streams: Streams) -> tuple[list[Trade], dict[str, int]]:
    """Fills (timed by their decision) and rejections by reason code, from the streams (pure)."""
    trades: list[Trade] = []
    rejections: dict[str, int] = {}
    for _id, fields in streams.results:
        result = _results.decode(fields["payload"])
        if result.status != "FILLED":
            code = result.reason or result.status
            rejections[code] = rejections.get(code, 0) + 1
            continue
        at, strategy = streams.decided[result.intent_id]
        price = result.avg_price if result.avg_price is not None else Decimal(0)
        trades.append(Trade(at, result.side, result.filled_qty, price, result.fee, strategy, result.symbol))
    for _id, fields in streams.rejected:
        code = _refused.decode(fields["payload"]).reason or "UNKNOWN"
        rejections[code] = rejections.get(code, 0) + 1
    return trades, rejections
