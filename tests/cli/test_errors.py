"""Every command, given a handful of bad arguments, answers in one line: never a traceback.

Each case runs the real entry point in this process (``quantum_trader.cli.main``) against a
real server; an exception escaping it is what an operator would see as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from quantum_trader import cli

MISSING = "/nonexistent-dir/sub"


def cases(tmp: Path) -> list[list[str]]:
    daily = tmp / "btc_daily.csv"
    daily.write_text("date,open,high,low,close,volume\n2024-01-01,1,2,0.5,1.5,10\n2024-01-02,1,2,0.5,1.5,10\n")
    garbage = tmp / "garbage.csv"
    garbage.write_bytes(b"\xff\xfe\x00not,a,csv\n\x00\x00")
    header_only = tmp / "empty.csv"
    header_only.write_text("timestamp,open,high,low,close,volume\n")
    no_symbol = tmp / "no-symbol.csv"
    no_symbol.write_text("timestamp,symbol,open,high,low,close,volume\n1767225600000,,1,1,1,1,1\n")
    two_quotes = tmp / "two-quotes.csv"
    two_quotes.write_text(
        "timestamp,symbol,open,high,low,close,volume\n1767225600000,BTCUSDT,1,1,1,1,1\n1767225600000,ETHBTC,1,1,1,1,1\n"
    )
    return [
        ["run", "--stages", "nope"],
        ["run", "--duration", "abc"],
        ["router", "--duration", "-5"],
        ["execution", "--no-such-option"],
        ["ai-engine", "--duration", "x"],
        ["status", "--watch", "-1"],
        ["status", "--watch", "x"],
        ["check", "nope"],
        ["check"],
        ["decide"],
        ["decide", "--symbol", "ETHUSDT", "--side", "BUY", "--qty", "x"],
        ["decide", "--symbol", "ETHUSDT", "--side", "BUY", "--qty", "1", "--wait", "--timeout", "-1"],
        ["demo", "--source", "nope"],
        ["demo", "--count", "0"],
        ["demo", "--server-url", "http://:secret@localhost:1/0"],
        ["doctor", "--env-file", f"{MISSING}/x.env"],
        ["doctor", "--secrets-file", f"{MISSING}/s.env"],
        ["recover", "--idle-ms", "x"],
        ["feed", "--source", "nope"],
        ["feed", "--source", "file", "--data", f"{MISSING}/x.csv"],
        ["feed", "--source", "file", "--data", str(garbage)],
        ["feed", "--rate", "-1"],
        ["train", "--data", f"{MISSING}/x.csv"],
        ["train", "--data", str(garbage)],
        ["train", "--out", f"{MISSING}/model"],
        ["backtest", "--data", str(daily)],
        ["backtest", "--data", str(garbage)],
        ["backtest", "--html", f"{MISSING}/report.html"],
        ["backtest", "--strategy", "nope"],
        ["backtest", "--notional", "-1"],
        ["backtest", "--data", str(header_only)],
        ["backtest", "--data", str(no_symbol)],
        ["backtest", "--data", str(two_quotes)],
        ["backtest", "--data", str(daily), "--data", str(daily), "--symbol", "BTCUSDT"],
        ["backtest", "--data", str(daily), "--grid", "ema-cross.fast=1..x"],
        ["data", "download", "--symbols", "BTC/USDT", "--since", "yesterday-ish"],
        ["kill", "on", "--bogus"],
        ["kill", "status", "--bogus"],
        ["governor", "status", "extra-arg"],
        ["dlq", "list", "--count", "0"],
        ["dlq", "replay", "abc"],
        ["dlq", "replay"],
        ["systemd", "render", "--user", ""],
        ["systemd", "install", "--root", f"{garbage}/root"],
        ["systemd", "rollback", "--root", f"{garbage}/root"],
        ["proof", "snapshot", "--out", f"{MISSING}/snap.json"],
        ["proof", "report", f"{MISSING}/a.json", f"{MISSING}/b.json"],
        ["proof", "report", str(garbage), str(garbage)],
        ["reconcile", "--settle-s", "x"],
        ["reconcile", "--settle-s", "-1"],
        ["reconcile", "--bogus"],
        ["no-such-command"],
    ]


def test_every_command_answers_bad_arguments_in_one_line_without_a_traceback(
    clean_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QT_REDIS_URL", clean_url)
    monkeypatch.setenv("QT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("QT_LOG_LEVEL", "error")
    failures = []
    for args in cases(tmp_path):
        monkeypatch.setattr(sys, "argv", ["quantum-trader", *args])
        code: object = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # what a user would see as a traceback
            failures.append(f"{' '.join(args)}: {type(exc).__name__}: {exc}")
            continue
        out = capfd.readouterr()
        if "Traceback" in out.err or "Traceback" in out.out:
            failures.append(f"{' '.join(args)}: traceback printed")
        elif code in (0, None):
            failures.append(f"{' '.join(args)}: accepted (exit 0)")
        elif "secret" in out.err:
            failures.append(f"{' '.join(args)}: printed a password")
    assert failures == [], "\n".join(failures)
