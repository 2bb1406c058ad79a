"""Historical candles from an exchange's public endpoints, one Parquet file per symbol.

``quantum-trader data download`` pages through ccxt's ``fetch_ohlcv`` with ``since`` and
``limit`` (no API key) and writes ``<out>/<SYMBOL>-<interval>.parquet`` with the columns
``timestamp`` (epoch ms, int64) and ``open``, ``high``, ``low``, ``close``, ``volume``
(float64), which ``marketdata.read_file`` reads.

A file that exists is continued after its last candle; new rows are merged into it
(deduplicated by timestamp, sorted) and the file is replaced atomically, so an interrupted
or failed download leaves the previous file or a longer one, never a broken one, and a
re-run fetches only what is missing. The candle still open is never written.

The pure parts (the file name, how many candles to ask for, which answered candles to keep
and where the next page starts, the merge) are plain functions; the exchange and the file
system are reached only by ``Downloader`` and ``save``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# ccxt ships no type information; its values are converted to typed rows right here.
import ccxt  # type: ignore[import-untyped]
import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]
import pandas as pd
from pydantic import SecretStr

from quantum_trader.errors import ConfigError, ExchangeError, FatalExchangeError, TransientExchangeError
from quantum_trader.exchanges.ccxt.config import CcxtConfig
from quantum_trader.exchanges.ccxt.connection import CcxtConnection
from quantum_trader.exchanges.ccxt.credentials import Credentials
from quantum_trader.logs import get_logger

log = get_logger("download")

# (open time in epoch ms, open, high, low, close, volume)
Row = tuple[int, float, float, float, float, float]
COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")
PAGE_LIMIT = 1000  # candles asked for per request: Binance spot's maximum, and common elsewhere
FLUSH_ROWS = 100_000  # rows held in memory before they are merged into the file (bounds what a crash loses)
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
POPULAR = ("binance", "bybit", "coinbase", "kraken", "okx")


# ---- pure parts ----------------------------------------------------------------------------


def file_name(symbol: str, interval: str) -> str:
    """``BTC/USDT``, ``1m`` -> ``BTCUSDT-1m.parquet`` (the symbol's letters and digits, upper case)."""
    return f"{re.sub(r'[^A-Za-z0-9]', '', symbol).upper()}-{interval}.parquet"


def page_limit(cursor_ms: int, end_ms: int, step_ms: int, most: int = PAGE_LIMIT) -> int:
    """How many candles to ask for from ``cursor_ms``: enough to reach ``end_ms``, at most ``most``, at least 1."""
    return max(1, min(most, -(-(end_ms - cursor_ms) // step_ms)))


def to_row(raw: Sequence[Any]) -> Row | None:
    """A ccxt OHLCV entry ``[ms, o, h, l, c, v]`` as a typed row; None when it has no time.

    A missing price or volume (some exchanges send null for an empty candle) becomes NaN, kept
    so that ``marketdata.clean`` drops a candle without prices when it is read, and says why.
    """
    if len(raw) < 6 or raw[0] is None:
        return None
    values = [math.nan if v is None else float(v) for v in raw[1:6]]
    return int(raw[0]), values[0], values[1], values[2], values[3], values[4]


def candle_end(open_ms: int, interval: str) -> int:
    """When the candle opened at ``open_ms`` closes (the next one opens): calendar months and years for
    ``M`` and ``y`` (or ``Y``), which have no fixed length; a fixed length for ``s``, ``m``, ``h``, ``d``, ``w``."""
    match = re.fullmatch(r"(\d+)([smhdwMyY])", interval)
    if match is None:
        raise ValueError(f"interval {interval!r}: use a number and one of s, m, h, d, w, M, y")
    count, unit = int(match.group(1)), match.group(2)
    if unit in _UNIT_MS:
        return open_ms + count * _UNIT_MS[unit]
    opened = datetime.fromtimestamp(open_ms / 1000, UTC)
    months = opened.year * 12 + opened.month - 1 + count * (1 if unit == "M" else 12)
    closes = opened.replace(year=months // 12, month=months % 12 + 1, day=min(opened.day, 28))
    return int(closes.timestamp() * 1000)


def take_page(
    rows: Sequence[Row], cursor_ms: int, end_ms: int, interval: str, now_ms: int
) -> tuple[list[Row], int | None]:
    """The candles of one answer worth keeping, and where the next page starts (None: the download is done).

    Kept: opened in ``[cursor_ms, end_ms)`` and closed by ``now_ms``. Done when nothing new was
    kept (the exchange has no newer candles, or ignored ``since``), when the answer reached the
    candle still open (the present), or when the next candle would open at or after ``end_ms``.
    """
    wanted = sorted((r for r in rows if cursor_ms <= r[0] < end_ms), key=lambda r: r[0])
    kept = [r for r in wanted if candle_end(r[0], interval) <= now_ms]
    following = candle_end(kept[-1][0], interval) if kept else end_ms
    if len(kept) < len(wanted) or following >= end_ms:
        return kept, None
    return kept, following


def merge(existing: pd.DataFrame | None, rows: Sequence[Row]) -> pd.DataFrame:
    """``existing`` and ``rows`` as one frame of ``COLUMNS``: one row per timestamp (the newer wins), sorted."""
    new = pd.DataFrame.from_records(list(rows), columns=list(COLUMNS)) if rows else None
    frames = [f for f in (existing, new) if f is not None and len(f)]
    if not frames:
        frame = pd.DataFrame({name: pd.Series(dtype="float64") for name in COLUMNS})
    else:
        frame = pd.concat([f[list(COLUMNS)] for f in frames], ignore_index=True)
        frame = frame.drop_duplicates("timestamp", keep="last").sort_values("timestamp", kind="stable")
    frame = frame.astype({name: "float64" for name in COLUMNS[1:]} | {"timestamp": "int64"})
    return frame.reset_index(drop=True)


def resume_from(since_ms: int, last_ms: int | None, interval: str) -> int:
    """Where a download starts: ``since_ms``, or where the candle after the file's last opens when that is later."""
    return since_ms if last_ms is None else max(since_ms, candle_end(last_ms, interval))


def gap_note(since_ms: int, last_ms: int | None, interval: str) -> str:
    """A warning when ``since_ms`` leaves a hole after the file's last candle (empty when it does not)."""
    if last_ms is None or since_ms <= candle_end(last_ms, interval):
        return ""
    return f"--since is after the file's last candle ({iso(last_ms)}): the file will have a gap before {iso(since_ms)}"


def iso(ms: int) -> str:
    """Epoch ms as ``2024-01-01T00:00:00Z``."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def exchange_hint(name: str) -> str:
    """What to say about an exchange id ccxt does not know: the close ones, else a few common ones."""
    close = difflib.get_close_matches(name.lower(), ccxt_async.exchanges, n=3)
    return f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(POPULAR)}"


# ---- the file ------------------------------------------------------------------------------


def read_candles(path: Path) -> pd.DataFrame | None:
    """The candles already in ``path`` (None when there is no file); ConfigError when it is not such a file."""
    if not path.exists():
        return None
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--out: {path} exists but cannot be read as Parquet ({exc}); move it away") from None
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        raise ConfigError(f"--out: {path} exists but lacks column(s) {', '.join(missing)}; move it away")
    return frame[list(COLUMNS)]


def save(path: Path, rows: Sequence[Row]) -> pd.DataFrame:
    """Merge ``rows`` into the file at ``path`` and replace it atomically; returns what the file now holds.

    Written to a temporary file beside it, flushed to disk, then renamed over it: a reader (or
    a crash) sees the old file or the new one, never half of one.
    """
    frame = merge(read_candles(path), rows)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            frame.to_parquet(handle, index=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return frame


# ---- the exchange --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Saved:
    """What one symbol's download left in its file."""

    symbol: str
    interval: str
    path: Path
    new_rows: int  # candles this run added
    rows: int  # candles in the file
    first_ms: int | None  # the file's first and last open times (None: no file)
    last_ms: int | None
    note: str = ""  # a warning about the file (a gap --since leaves)

    def summary(self) -> str:
        """One line: rows written, first and last time, path."""
        if self.first_ms is None or self.last_ms is None:
            return f"{self.symbol} {self.interval}: no closed candles in the range; nothing written"
        return (
            f"{self.symbol} {self.interval}: {self.new_rows:,} new rows, {self.rows:,} in file, "
            f"{iso(self.first_ms)} to {iso(self.last_ms)}, {self.path}"
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


Progress = Callable[[int, int], None]  # (candles kept so far, candles expected) of the symbol being downloaded


class Downloader:
    """Candles of one exchange through ccxt's public endpoints (``CcxtConnection`` without keys).

    ccxt's rate limiter spaces the requests and ``CcxtConnection.call`` retries transient
    errors (QT_EXCHANGE_RETRIES, with back-off) before one fails the download.
    """

    def __init__(
        self,
        config: CcxtConfig,
        *,
        clock: Callable[[], int] = _now_ms,
        page: int = PAGE_LIMIT,
        flush_rows: int = FLUSH_ROWS,
    ) -> None:
        if config.exchange not in ccxt_async.exchanges:
            raise ConfigError(
                f"--exchange {config.exchange!r} is not a ccxt exchange id; {exchange_hint(config.exchange)}"
            )
        blank = Credentials(api_key=SecretStr(""), secret=SecretStr(""))
        try:
            self.conn = CcxtConnection(config, blank, public_only=True)
        except ConfigError as exc:
            raise ConfigError(f"--exchange {config.exchange}: {exc}") from None
        self.name = config.exchange
        self.client: Any = self.conn.client
        self.clock = clock
        self.page = page
        self.flush_rows = flush_rows
        if not self.client.has.get("fetchOHLCV"):
            raise ConfigError(
                f"--exchange {self.name}: ccxt cannot fetch candles from {self.name}; choose another, e.g. binance"
            )

    def step_ms(self, interval: str) -> int:
        """The interval's length in ms; ConfigError naming the exchange's intervals when it offers no such one."""
        offered: dict[str, Any] = self.client.timeframes or {}
        if interval not in offered:
            raise ConfigError(f"--interval {interval!r}: {self.name} offers {', '.join(offered)}; choose one of them")
        try:
            candle_end(0, interval)
        except ValueError:
            raise ConfigError(
                f"--interval {interval!r}: its length is unknown here; choose e.g. 1m, 1h or 1d"
            ) from None
        return int(self.client.parse_timeframe(interval) * 1000)

    async def markets(self, symbols: Sequence[str]) -> list[str]:
        """ccxt's symbols (``BTC/USDT``) for ``symbols``; ConfigError naming any that is not a spot market."""
        try:
            await self.conn.ensure_markets()
        except (TransientExchangeError, FatalExchangeError, ccxt.BaseError) as exc:
            raise ExchangeError(
                f"{self.name}: loading the markets failed: {self.conn.clean(exc)} (check the network and --exchange)"
            ) from None
        unknown = [s for s in symbols if self.conn.unified(s) is None]
        if unknown:
            examples = ", ".join(list(self.conn.rules)[:3]) or "none listed"
            raise ConfigError(
                f"--symbols {','.join(unknown)}: not a spot market on {self.name}; use its symbols, e.g. {examples}"
            )
        return list(dict.fromkeys(str(self.conn.unified(s)) for s in symbols))

    async def download(
        self, symbol: str, interval: str, since_ms: int, until_ms: int | None, out: Path, progress: Progress
    ) -> Saved:
        """Fetch ``symbol``'s closed candles from ``since_ms`` (or after the file's last) to ``until_ms`` (or now).

        Pages are merged into the file every ``flush_rows`` rows and at the end, also when a
        request fails: the ExchangeError then says how many candles were kept.
        """
        step = self.step_ms(interval)
        path = out / file_name(symbol, interval)
        existing = read_candles(path)
        last = int(existing["timestamp"].max()) if existing is not None and len(existing) else None
        end = until_ms if until_ms is not None else self.clock()
        start = resume_from(since_ms, last, interval)
        cursor: int | None = start
        at = start
        pending: list[Row] = []
        kept = 0
        expected = max(0, -(-(end - start) // step))
        progress(0, expected)
        frame = existing
        failure: BaseException | None = None
        try:
            while cursor is not None and cursor < end:
                at = cursor
                limit = page_limit(at, end, step, self.page)
                raw = await self.conn.call(
                    "fetch_ohlcv", functools.partial(self.client.fetch_ohlcv, symbol, interval, at, limit)
                )
                rows = [row for entry in raw if (row := to_row(entry)) is not None]
                page, cursor = take_page(rows, at, end, interval, self.clock())
                pending += page
                kept += len(page)
                progress(kept, max(expected, kept))
                if len(pending) >= self.flush_rows:
                    frame = save(path, pending)
                    pending.clear()
        except (TransientExchangeError, FatalExchangeError, ccxt.BaseError) as exc:
            failure = exc
        finally:
            # A failed request or an interruption (Ctrl-C) keeps what was fetched: a re-run resumes after it.
            if pending:
                frame = save(path, pending)
        if failure is not None:
            kept_where = f"{kept:,} new candles kept in {path}" if frame is not None else "nothing written"
            raise ExchangeError(
                f"{self.name}: fetching {symbol} {interval} candles from {iso(at)} failed: "
                f"{self.conn.clean(failure)} ({kept_where}; run the same command again to resume)"
            )
        log.debug("download_done", exchange=self.name, symbol=symbol, interval=interval, rows=kept, path=str(path))
        return dataclasses.replace(_saved(symbol, interval, path, kept, frame), note=gap_note(since_ms, last, interval))

    async def close(self) -> None:
        """Close ccxt's HTTP session."""
        await self.conn.close()


def _saved(symbol: str, interval: str, path: Path, new_rows: int, frame: pd.DataFrame | None) -> Saved:
    if frame is None or not len(frame):
        return Saved(symbol, interval, path, new_rows, 0, None, None)
    stamps = frame["timestamp"]
    return Saved(symbol, interval, path, new_rows, len(frame), int(stamps.iloc[0]), int(stamps.iloc[-1]))


def public_config(config: CcxtConfig, exchange: str) -> CcxtConfig:
    """``config`` for ``exchange`` (the settings' timeouts, retries and API URL override kept)."""
    return dataclasses.replace(config, exchange=exchange)
