"""``data download``: the pure parts, then the command against the local fake Binance (ccxt's real client).

The fake serves a deterministic klines history (``FakeBinance.kline``) at most ``kline_cap`` rows
an answer, so a download takes several pages. It runs on its own event loop in a thread, so the
command runs in this process through its real entry point (``quantum_trader.cli.main``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from quantum_trader import cli, marketdata
from quantum_trader.download import (
    Downloader,
    Row,
    candle_end,
    file_name,
    gap_note,
    merge,
    page_limit,
    resume_from,
    save,
    take_page,
    to_row,
)
from quantum_trader.exchanges.ccxt import CcxtConfig
from tests.exchanges.fake_binance import FakeBinance

MINUTE = 60_000
JAN1 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)


def row(ts: int, close: float = 1.0) -> Row:
    return ts, 1.0, 2.0, 0.5, close, 10.0


# ---- pure parts ----------------------------------------------------------------------------


def test_the_file_name_is_the_symbol_letters_and_the_interval() -> None:
    assert file_name("BTC/USDT", "1m") == "BTCUSDT-1m.parquet"
    assert file_name("eth-usdt", "1h") == "ETHUSDT-1h.parquet"
    assert file_name("BTC/USDT:USDT", "1d") == "BTCUSDTUSDT-1d.parquet"


def test_a_page_asks_for_what_reaches_the_end_and_no_more_than_the_most() -> None:
    assert page_limit(0, 25 * MINUTE, MINUTE, most=1000) == 25
    assert page_limit(0, 25 * MINUTE + 1, MINUTE, most=1000) == 26  # a part-candle still needs one
    assert page_limit(0, 10_000 * MINUTE, MINUTE, most=1000) == 1000
    assert page_limit(5, 5, MINUTE) == 1


def test_candles_close_after_their_interval_and_months_by_the_calendar() -> None:
    assert candle_end(JAN1, "1m") == JAN1 + MINUTE
    assert candle_end(JAN1, "4h") == JAN1 + 4 * 3_600_000
    feb1 = int(datetime(2024, 2, 1, tzinfo=UTC).timestamp() * 1000)
    mar1 = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)
    assert candle_end(feb1, "1M") == mar1  # 29 days in 2024, not 30
    assert candle_end(JAN1, "1y") == int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)
    with pytest.raises(ValueError, match="interval"):
        candle_end(JAN1, "15")


def test_a_page_keeps_closed_candles_in_the_window_and_says_where_the_next_starts() -> None:
    rows = [row(JAN1 + i * MINUTE) for i in range(7)]
    kept, following = take_page(rows[::-1], JAN1, JAN1 + 60 * MINUTE, "1m", now_ms=JAN1 + 3600 * MINUTE)
    assert kept == rows  # sorted, all closed
    assert following == JAN1 + 7 * MINUTE

    # Before the cursor (an exchange ignoring since) and at or after the end: not kept.
    kept, following = take_page(rows, JAN1 + 2 * MINUTE, JAN1 + 5 * MINUTE, "1m", now_ms=JAN1 + 3600 * MINUTE)
    assert [r[0] for r in kept] == [JAN1 + i * MINUTE for i in (2, 3, 4)]
    assert following is None  # the next candle would open at the end

    # Nothing newer: done.
    assert take_page(rows, JAN1 + 7 * MINUTE, JAN1 + 60 * MINUTE, "1m", now_ms=JAN1 + 3600 * MINUTE) == ([], None)
    assert take_page([], JAN1, JAN1 + 60 * MINUTE, "1m", now_ms=JAN1 + 3600 * MINUTE) == ([], None)


def test_the_candle_still_open_is_dropped_and_ends_the_download() -> None:
    rows = [row(JAN1 + i * MINUTE) for i in range(5)]
    now = JAN1 + 4 * MINUTE + 30_000  # the candle opened at +4 closes at +5
    kept, following = take_page(rows, JAN1, JAN1 + 60 * MINUTE, "1m", now_ms=now)
    assert kept == rows[:4]
    assert following is None
    kept, _ = take_page(rows, JAN1, JAN1 + 60 * MINUTE, "1m", now_ms=JAN1 + 5 * MINUTE)
    assert kept == rows  # closed exactly now


def test_merging_keeps_one_row_per_timestamp_sorted_the_newer_winning() -> None:
    old = merge(None, [row(JAN1 + MINUTE, close=1.0), row(JAN1, close=1.0)])
    assert old["timestamp"].tolist() == [JAN1, JAN1 + MINUTE]
    both = merge(old, [row(JAN1 + 2 * MINUTE, close=3.0), row(JAN1 + MINUTE, close=2.0)])
    assert both["timestamp"].tolist() == [JAN1, JAN1 + MINUTE, JAN1 + 2 * MINUTE]
    assert both["close"].tolist() == [1.0, 2.0, 3.0]
    assert list(both.columns) == ["timestamp", "open", "high", "low", "close", "volume"]
    assert str(both["timestamp"].dtype) == "int64"
    assert {str(both[c].dtype) for c in ("open", "high", "low", "close", "volume")} == {"float64"}
    empty = merge(None, [])
    assert len(empty) == 0
    assert str(empty["timestamp"].dtype) == "int64"


def test_a_download_resumes_after_the_files_last_candle_and_warns_of_a_gap() -> None:
    assert resume_from(JAN1, None, "1m") == JAN1
    assert resume_from(JAN1, JAN1 + 9 * MINUTE, "1m") == JAN1 + 10 * MINUTE
    assert resume_from(JAN1 + 60 * MINUTE, JAN1, "1m") == JAN1 + 60 * MINUTE
    assert gap_note(JAN1, None, "1m") == ""
    assert gap_note(JAN1 + MINUTE, JAN1, "1m") == ""  # the very next candle: no gap
    assert "gap" in gap_note(JAN1 + 2 * MINUTE, JAN1, "1m")


def test_a_ccxt_entry_becomes_a_typed_row() -> None:
    assert to_row([JAN1, 1, "2", 0.5, 1.5, 3]) == (JAN1, 1.0, 2.0, 0.5, 1.5, 3.0)
    ts, *values = to_row([JAN1, None, 2, 0.5, 1.5, None]) or (0,)
    assert ts == JAN1
    assert [v != v for v in values] == [True, False, False, False, True]  # None -> NaN
    assert to_row([None, 1, 2, 3, 4, 5]) is None
    assert to_row([JAN1, 1]) is None


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "BTCUSDT-1m.parquet"
    save(path, [row(JAN1), row(JAN1 + MINUTE)])
    original = path.read_bytes()

    def half_then_fail(frame: pd.DataFrame, target: object, **kwargs: object) -> None:
        assert hasattr(target, "write")
        target.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save(path, [row(JAN1 + 2 * MINUTE)])
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    assert len(marketdata.read_file(path, "BTCUSDT")) == 2


# ---- against the fake exchange -------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeBinance]:
    """The fake Binance on its own event loop in a thread, so the command can run its own loop here."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = FakeBinance()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def env(fake: FakeBinance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Settings pointing ccxt at the fake, with one quick retry."""
    values = {
        "QT_EXCHANGE_API_URL": fake.url,
        "QT_DATA_DIR": str(tmp_path / "state"),
        "QT_EXCHANGE_RETRIES": "1",
        "QT_EXCHANGE_BACKOFF_S": "0.01",
        "QT_EXCHANGE_BACKOFF_MAX_S": "0.02",
        "QT_EXCHANGE_TIMEOUT_S": "5",
        "QT_LOG_LEVEL": "warning",
    }
    for name in [n for n in os.environ if n.startswith("QT_")]:
        monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def run(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], *args: str) -> tuple[object, str, str]:
    """``quantum-trader data download ARGS`` through the real entry point: (exit code, stdout, stderr)."""
    capfd.readouterr()
    monkeypatch.setattr(sys, "argv", ["quantum-trader", "data", "download", *args])
    code: object = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    out = capfd.readouterr()
    return code, out.out, out.err


def history(fake: FakeBinance, symbol: str, start: int, end: int) -> list[list[float]]:
    """The fake's 1m candles opened in [start, end), as the file should hold them."""
    return [[float(v) for v in fake.kline(symbol, t)[:6]] for t in range(start, end, MINUTE)]


def in_file(path: Path) -> list[list[float]]:
    frame = pd.read_parquet(path)
    assert list(frame.columns) == ["timestamp", "open", "high", "low", "close", "volume"]
    assert str(frame["timestamp"].dtype) == "int64"
    return [[float(v) for v in values] for values in frame.itertuples(index=False)]


def test_a_download_of_several_pages_across_two_symbols_matches_the_exchange(
    env: dict[str, str],
    fake: FakeBinance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    fake.kline_cap = 7  # 25 candles: pages of 7, 7, 7 and 4
    out = tmp_path / "data"
    code, stdout, stderr = run(
        monkeypatch, capfd, "--exchange", "binance", "--symbols", "BTC/USDT,ETH/USDT", "--interval", "1m",
        "--since", "2024-01-01", "--until", "2024-01-01T00:25", "--out", str(out),
    )  # fmt: skip
    assert code in (0, None), stderr
    assert "Traceback" not in stderr
    for symbol in ("BTCUSDT", "ETHUSDT"):
        path = out / f"{symbol}-1m.parquet"
        assert in_file(path) == history(fake, symbol, JAN1, JAN1 + 25 * MINUTE)
        candles = marketdata.read_file(path, symbol)  # the project's reader takes the file as it is
        assert [(c.symbol, c.open_time, c.close) for c in candles] == [
            (symbol, int(k[0]), float(k[4]))
            for k in (fake.kline(symbol, t) for t in range(JAN1, JAN1 + 25 * MINUTE, MINUTE))
        ]
        assert candles[0].interval == "60s"
    assert fake.calls("GET", "/api/v3/klines") == 8  # 4 pages per symbol, none wasted
    assert stdout.splitlines() == [
        f"BTC/USDT 1m: 25 new rows, 25 in file, 2024-01-01T00:00:00Z to 2024-01-01T00:24:00Z, {out}/BTCUSDT-1m.parquet",
        f"ETH/USDT 1m: 25 new rows, 25 in file, 2024-01-01T00:00:00Z to 2024-01-01T00:24:00Z, {out}/ETHUSDT-1m.parquet",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["BTCUSDT-1m.parquet", "ETHUSDT-1m.parquet"]


def test_a_rerun_downloads_only_what_is_new(
    env: dict[str, str],
    fake: FakeBinance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    fake.kline_cap = 7
    out = str(tmp_path / "data")
    first = run(
        monkeypatch, capfd, "--symbols", "BTCUSDT", "--since", "2024-01-01", "--until", "2024-01-01T00:25", "--out", out
    )
    assert first[0] in (0, None), first[2]
    assert fake.calls("GET", "/api/v3/klines") == 4

    code, stdout, stderr = run(
        monkeypatch, capfd, "--symbols", "BTCUSDT", "--since", "2024-01-01", "--until", "2024-01-01T00:40", "--out", out
    )
    assert code in (0, None), stderr
    assert fake.calls("GET", "/api/v3/klines") == 4 + 3  # 15 new candles: 7, 7, 1
    assert in_file(Path(out) / "BTCUSDT-1m.parquet") == history(fake, "BTCUSDT", JAN1, JAN1 + 40 * MINUTE)
    assert stdout.startswith("BTC/USDT 1m: 15 new rows, 40 in file, 2024-01-01T00:00:00Z to 2024-01-01T00:39:00Z")

    # Up to date: no request at all.
    code, stdout, _ = run(
        monkeypatch, capfd, "--symbols", "BTCUSDT", "--since", "2024-01-01", "--until", "2024-01-01T00:40", "--out", out
    )
    assert code in (0, None)
    assert fake.calls("GET", "/api/v3/klines") == 7
    assert stdout.startswith("BTC/USDT 1m: 0 new rows, 40 in file")


def test_the_candle_still_open_is_not_written(fake: FakeBinance, tmp_path: Path) -> None:
    now = JAN1 + 30 * MINUTE + 30_000  # the candle opened at 00:30 is still open
    fake.now_ms, fake.kline_cap = now, 7
    config = CcxtConfig(
        exchange="binance", mode="paper", secrets_file=None, api_url=fake.url, timeout_s=5, retries=0,
        backoff_s=0.01, backoff_max_s=0.01, lookup_grace_s=0, order_wait_s=0, poll_s=0.1,
        markets_refresh_s=3600, concurrency=1,
    )  # fmt: skip

    async def go() -> None:
        downloader = Downloader(config, clock=lambda: now)
        try:
            await downloader.markets(["ETH/USDT"])
            saved = await downloader.download("ETH/USDT", "1m", JAN1 + 20 * MINUTE, None, tmp_path, lambda *_: None)
        finally:
            await downloader.close()
        assert (saved.new_rows, saved.last_ms) == (10, JAN1 + 29 * MINUTE)

    asyncio.run(go())
    assert in_file(tmp_path / "ETHUSDT-1m.parquet") == history(fake, "ETHUSDT", JAN1 + 20 * MINUTE, JAN1 + 30 * MINUTE)
    assert fake.calls("GET", "/api/v3/klines") == 2  # 7, then 3 and the open one: the present is reached


def test_the_command_drops_the_open_candle_by_the_clock(
    env: dict[str, str],
    fake: FakeBinance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    since = datetime.fromtimestamp(time.time() - 600, UTC).strftime("%Y-%m-%dT%H:%M")
    code, _, stderr = run(monkeypatch, capfd, "--symbols", "ETHUSDT", "--since", since, "--out", str(tmp_path))
    done_ms = time.time() * 1000
    assert code in (0, None), stderr
    stamps = pd.read_parquet(tmp_path / "ETHUSDT-1m.parquet")["timestamp"].tolist()
    assert 9 <= len(stamps) <= 11
    assert all(t + MINUTE <= done_ms for t in stamps)  # every candle written had closed


def test_an_exchange_failure_midway_keeps_the_rows_fetched_and_a_rerun_resumes(
    env: dict[str, str],
    fake: FakeBinance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    fake.kline_cap = 7
    fake.script("klines", "ok", "ok", "503", "503")  # the third page fails, and its one retry
    out = tmp_path / "data"
    args = ["--symbols", "BTC/USDT,ETH/USDT", "--since", "2024-01-01", "--until", "2024-01-01T00:25", "--out", str(out)]
    code, stdout, stderr = run(monkeypatch, capfd, *args)
    assert code == 1
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: binance: fetching BTC/USDT 1m candles from 2024-01-01T00:14:00Z failed")
    assert "14 new candles kept" in line
    assert "run the same command again to resume" in line
    assert stdout == ""
    assert in_file(out / "BTCUSDT-1m.parquet") == history(fake, "BTCUSDT", JAN1, JAN1 + 14 * MINUTE)
    assert not (out / "ETHUSDT-1m.parquet").exists()

    calls = fake.calls("GET", "/api/v3/klines")
    code, stdout, stderr = run(monkeypatch, capfd, *args)
    assert code in (0, None), stderr
    assert fake.calls("GET", "/api/v3/klines") == calls + 2 + 4  # BTC: the 11 missing (7, 4); ETH: all 25
    assert stdout.splitlines()[0].startswith("BTC/USDT 1m: 11 new rows, 25 in file")
    for symbol in ("BTCUSDT", "ETHUSDT"):
        assert in_file(out / f"{symbol}-1m.parquet") == history(fake, symbol, JAN1, JAN1 + 25 * MINUTE)


def test_bad_options_get_one_line_naming_the_option_and_exit_2(
    env: dict[str, str],
    fake: FakeBinance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "BTCUSDT-1m.parquet").write_text("not parquet")
    ok = ["--since", "2024-01-01", "--until", "2024-01-02", "--out", str(tmp_path / "out")]
    symbols = ["--symbols", "BTC/USDT"]
    cases: list[tuple[list[str], str]] = [
        (
            ["--exchange", "binanse", *symbols, *ok],
            "--exchange 'binanse' is not a ccxt exchange id; did you mean binance",
        ),
        (["--exchange", "nosuchplace", *symbols, *ok], "e.g. binance, bybit"),
        (["--symbols", "DOGE/XYZ", *ok], "--symbols DOGE/XYZ: not a spot market on binance"),
        (["--symbols", " , ", *ok], "--symbols: give at least one market"),
        (["--interval", "7m", *symbols, *ok], "--interval '7m': binance offers 1s, 1m, 3m"),
        ([*symbols, "--since", "last tuesday", "--out", str(tmp_path)], "--since 'last tuesday': give a date or time"),
        ([*symbols, "--since", "2024-01-01", "--until", "soon", "--out", str(tmp_path)], "--until 'soon'"),
        ([*symbols, "--since", "2024-02-01", "--until", "2024-01-01", "--out", str(tmp_path)], "is not before --until"),
        ([*symbols, "--since", "2999-01-01", "--out", str(tmp_path)], "--since 2999-01-01 is in the future"),
        ([*symbols, "--since", "2024-01-01", "--out", str(a_file / "sub")], f"--out {a_file}/sub: cannot write there"),
        ([*symbols, "--since", "2024-01-01", "--out", str(broken)], "exists but cannot be read as Parquet"),
    ]
    failures = []
    for args, expected in cases:
        code, stdout, stderr = run(monkeypatch, capfd, *args)
        lines = stderr.strip().splitlines()
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or expected not in lines[0] or stdout:
            failures.append(f"{' '.join(args)}: exit {code}, stdout {stdout!r}, stderr {stderr!r}")
    assert failures == [], "\n".join(failures)
    assert fake.calls("GET", "/api/v3/klines") == 0


def test_the_installed_command_downloads_in_its_own_process(
    env: dict[str, str], fake: FakeBinance, tmp_path: Path
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    done = subprocess.run(
        [sys.executable, "-m", "quantum_trader", "data", "download", "--exchange", "binance", "--symbols", "ETH/USDT",
         "--interval", "1h", "--since", "2024-01-01", "--until", "2024-01-02", "--out", str(tmp_path)],
        env=base | env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ETH/USDT 1h: 24 new rows, 24 in file, 2024-01-01T00:00:00Z to 2024-01-01T23:00:00Z")
    assert done.stderr == ""
    expected = [[float(v) for v in fake.kline("ETHUSDT", JAN1 + h * 3_600_000, "1h")[:6]] for h in range(24)]
    assert in_file(tmp_path / "ETHUSDT-1h.parquet") == expected


def test_an_exchange_that_cannot_be_reached_is_named_in_one_line(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from quantum_trader.bus.embedded import free_port

    monkeypatch.setenv("QT_EXCHANGE_API_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    code, stdout, stderr = run(
        monkeypatch, capfd, "--symbols", "BTC/USDT", "--since", "2024-01-01", "--out", str(tmp_path)
    )
    assert code == 1
    assert stdout == ""
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]  # after the retry's log line
    assert line.startswith("error: binance: loading the markets failed: ")
    assert line.endswith("(check the network and --exchange)")
