"""Backtest speed: ``quantum-trader backtest`` beside backtesting.py, the same EMA cross on the same CSV.

Every figure comes from a fresh subprocess, so each side pays its own start-up, imports and CSV
read, as a user does:

- the whole command, several times, interleaved (ours, theirs, ours, theirs …): machines vary 2-3x
  from one minute to the next, so each of ours is compared with the reference run beside it;
- the engine alone: ``quantum_trader.backtest.run()`` timed inside a process that has already read
  the file, and backtesting.py's ``Backtest.run()`` as the reference script times it;
- the peak RSS of our command on a year of one-minute candles;
- both trade counts, side by side (a sanity check that both traded the rule, not a goal).

``python -m bench.backtest [--candles N --pairs N --year-candles N]`` runs the scenario alone
(``python -m bench --only backtest`` too); ``python -m bench.backtest engine FILE`` is the
engine-only child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("quantum-trader"))
REFERENCE = Path(__file__).with_name("backtesting_reference.py")
SYMBOL, FIRST_PRICE = "BTCUSDT", 60_000.0  # the file's stem names the symbol for our command
YEAR_CANDLES = 365 * 24 * 60
TIMEOUT_S = 600.0
ENGINE_BUDGET_S = 60.0  # engine-only: up to 5 runs of run(), none started once the runs so far took this long
GOAL_RATIO = 2.0  # ours / theirs, whole command
GOAL_ENGINE = 50_000  # candles/s, run() alone
GOAL_RSS_MB = 300  # our command on the year file
SIZES: dict[bool, dict[str, int]] = {
    False: {"candles": 100_000, "pairs": 5, "year_candles": YEAR_CANDLES},
    True: {"candles": 20_000, "pairs": 1, "year_candles": 0},
}

# The settings of the comparison in tests/test_backtest.py: 10,000 of quote and 1,000 per entry
# (backtesting.py buys 10 % of its equity), no fee and no slippage (commission=0, fills at the
# close). The caller's other QT_ variables are dropped, as the test does, so the figures do not
# depend on the shell they were run from.
SETTINGS = {
    "QT_PAPER_BALANCES": "USDT=10000",
    "QT_AI_SIZING": "fixed",
    "QT_AI_NOTIONAL": "1000",
    "QT_PAPER_FEE_RATE": "0",
    "QT_PAPER_SLIPPAGE_BPS": "0",
    "QT_LOG_LEVEL": "warning",
}


# backtesting.py draws a tqdm progress bar when tqdm is installed (optuna brings it): off, as ours is with --json.
QUIET = {"TQDM_DISABLE": "1"}


def child_env() -> dict[str, str]:
    """The environment of every measured process."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | SETTINGS | QUIET


def write_csv(path: Path, count: int, seed: int = 7) -> Path:
    """``count`` one-minute candles of one symbol (the project's synthetic market) as timestamp,open,...,volume."""
    from quantum_trader.marketdata import synthetic

    candles = synthetic({SYMBOL: FIRST_PRICE}, count, seed=seed)
    frame = pd.DataFrame(
        {
            "timestamp": [c.open_time for c in candles],  # epoch milliseconds: both sides read it unambiguously
            "open": [c.open for c in candles],
            "high": [c.high for c in candles],
            "low": [c.low for c in candles],
            "close": [c.close for c in candles],
            "volume": [c.volume for c in candles],
        }
    )
    frame.to_csv(path, index=False)
    return path


@dataclass
class Measured:
    """One measured process: wall seconds (None when it timed out), its peak RSS, what it printed."""

    wall_s: float | None
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    @property
    def problem(self) -> str | None:
        """None when the process finished cleanly; else what went wrong, in a few words."""
        if self.wall_s is None:
            return "timed out"
        if self.returncode != 0:
            last = self.stderr.strip().splitlines()[-1:] or [""]
            return f"exit {self.returncode}: {last[0][:200]}"
        return None


# The launcher between the bench and each measured command. ru_maxrss is a high-water mark that
# survives exec, and Python starts children with vfork: launched from the bench itself (hundreds of
# MB once it has built the year file), every command would "peak" at the bench's own size. This
# launcher is a bare interpreter (-I -S, standard library only, about 10 MB): the command's
# ru_maxrss from wait4 is then its own, and the launcher times it from spawn to exit.
LAUNCHER = """
import json, os, signal, sys, time
signal.signal(signal.SIGINT, lambda *_: None)  # a timeout's SIGINT is for the command (a handler is not inherited)
started = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(sys.argv[1], "w") as out:
    json.dump({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "returncode": os.waitstatus_to_exitcode(status)}, out)
"""


def measure(command: list[str], timeout_s: float = TIMEOUT_S) -> Measured:
    """Run ``command`` to its end (or ``timeout_s``): wall seconds from spawn to exit, and its peak RSS.

    Through ``LAUNCHER``, in a session of its own (a timeout ends the whole group). A pidfd gives
    the launcher's exit without polling or racing a reused pid. Output goes to files: a full pipe
    would stall the command.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(result), *command]
        proc = subprocess.Popen(launcher, env=child_env(), cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
        exited = os.pidfd_open(proc.pid)
        try:
            timed_out = not select.select([exited], [], [], timeout_s)[0]
            if timed_out:
                stop(proc.pid, exited)
            proc.wait()
        finally:
            os.close(exited)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
        ran = json.loads(result.read_text()) if result.exists() else None
    if ran is None:  # the launcher did not finish: killed after a timeout's grace period
        return Measured(None if timed_out else 0.0, 0.0, proc.returncode or -1, stdout, stderr)
    return Measured(None if timed_out else ran["wall_s"], round(ran["maxrss_kb"] / 1024, 1), ran["returncode"],
                    stdout, stderr)  # fmt: skip


def stop(pid: int, exited: int) -> None:
    """End a child that ran past its time, and what it started.

    SIGINT first: the command's cleanup runs (the server-path engine stops its private server,
    which lives in a session of its own and would outlive a SIGKILL of the group). Whatever is
    left of the child and its descendants after a grace period gets SIGKILL.
    """
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    os.killpg(pid, signal.SIGINT)
    if not select.select([exited], [], [], 15)[0]:
        os.killpg(pid, signal.SIGKILL)
    for process in descendants:
        with contextlib.suppress(psutil.Error):  # already gone
            process.kill()


def ours(data: Path) -> list[str]:
    """The command a user types."""
    return [EXE, "backtest", "--data", str(data), "--strategy", "ema-cross", "--json"]


def theirs(data: Path) -> list[str]:
    """The reference script, with the project's EMA-cross parameters."""
    from quantum_trader.strategies import EmaCross

    rule = EmaCross()
    return [sys.executable, str(REFERENCE), str(data), "--fast", str(rule.fast), "--slow", str(rule.slow),
            "--warmup", str(rule.warmup)]  # fmt: skip


def our_trades(stdout: str) -> dict[str, int]:
    """Entries and fills from our JSON report (an entry is a BUY fill; backtesting.py counts entries)."""
    report = json.loads(stdout)
    entries = sum(1 for trade in report["trade_list"] if trade["side"] == "BUY")
    return {"entries": entries, "fills": int(report["trades"]), "rejected": int(report["rejected"])}


def median(values: list[float]) -> float | None:
    """The median, None for no values (a side whose every run failed)."""
    return statistics.median(values) if values else None


def per_s(candles: int, seconds: float | None) -> int | None:
    """Candles per second, None without a time."""
    return round(candles / seconds) if seconds else None


def whole_commands(data: Path, candles: int, pairs: int) -> dict[str, Any]:
    """Ours and theirs in turn, ``pairs`` times; a side that times out or fails is not run again."""
    runs: dict[str, list[Measured]] = {"ours": [], "theirs": []}
    problems: dict[str, str] = {}
    for pair in range(pairs):
        for side, command in (("ours", ours(data)), ("theirs", theirs(data))):
            if side in problems:
                continue
            measured = measure(command)
            runs[side].append(measured)
            if measured.problem is not None:
                problems[side] = f"run {pair + 1}: {measured.problem}"
            print(f"backtest {candles:,} candles, {side} {pair + 1}/{pairs}: "
                  f"{measured.problem or f'{measured.wall_s:.2f} s'}", file=sys.stderr)  # fmt: skip
    good = {side: [m for m in done if m.problem is None] for side, done in runs.items()}
    out: dict[str, Any] = {}
    for side, done in good.items():
        walls = [m.wall_s for m in done if m.wall_s is not None]
        out[side] = {
            "wall_s": [round(w, 3) for w in walls],
            "median_s": round(statistics.median(walls), 3) if walls else None,
            "candles_per_s": per_s(candles, median(walls)),
            "peak_rss_mb": max((m.peak_rss_mb for m in done), default=None),
            "problem": problems.get(side),
        }
    # Only runs side by side are compared: a pair is run i of both sides, both finished.
    ratios = [a.wall_s / b.wall_s for a, b in zip(runs["ours"], runs["theirs"], strict=False)
              if a.problem is None and b.problem is None and a.wall_s and b.wall_s]  # fmt: skip
    out["ratios"] = [round(r, 2) for r in ratios]
    out["median_ratio"] = round(statistics.median(ratios), 2) if ratios else None
    out["goal_ratio"] = GOAL_RATIO
    out["met"] = out["median_ratio"] is not None and out["median_ratio"] <= GOAL_RATIO
    reference = [json.loads(m.stdout) for m in good["theirs"]]
    out["trades"] = {
        "ours": our_trades(good["ours"][0].stdout) if good["ours"] else None,
        "theirs": reference[0]["trades"] if reference else None,
    }
    # backtesting.py's Backtest.run() alone, as the reference script timed it in each of its runs.
    run_s = median([r["run_s"] for r in reference])
    out["reference_run_only"] = {"run_s": [r["run_s"] for r in reference], "candles_per_s": per_s(candles, run_s)}
    return out


def engine_only(data: Path, candles: int) -> dict[str, Any]:
    """Our engine's run() alone, in a child that has read the file first (see ``engine_child``)."""
    measured = measure([sys.executable, "-m", "bench.backtest", "engine", str(data)])
    if measured.problem is not None:
        return {"problem": measured.problem, "goal_candles_per_s": GOAL_ENGINE, "met": False}
    child = json.loads(measured.stdout)
    rate = per_s(candles, statistics.median(child["run_s"]))
    return {"run_s": child["run_s"], "candles_per_s": rate, "trades": child["trades"],
            "goal_candles_per_s": GOAL_ENGINE, "met": rate is not None and rate >= GOAL_ENGINE}  # fmt: skip


def engine_child(data: Path) -> None:
    """The engine-only child: read the file, then time ``run()`` alone, as often as the budget allows (median).

    One process, one thread: the rate is per core. The settings are the command's (the same
    environment); the file is read before the clock starts.
    """
    from quantum_trader import backtest as bt
    from quantum_trader import marketdata
    from quantum_trader.settings import load_settings
    from quantum_trader.strategies import EmaCross

    settings = load_settings()
    candles = marketdata.read_file(data)
    times: list[float] = []
    while not times or (sum(times) < ENGINE_BUDGET_S and len(times) < 5):
        started = time.perf_counter()
        report = asyncio.run(bt.run(candles, [EmaCross()], settings))
        times.append(round(time.perf_counter() - started, 4))
    print(json.dumps({"candles": report.candles, "trades": len(report.trades), "run_s": times}))


def year_rss(data: Path, candles: int) -> dict[str, Any]:
    """Peak RSS of our whole command on a year of one-minute candles, and of the reference's for scale."""
    reference = measure(theirs(data))
    reference_mb = reference.peak_rss_mb if reference.problem is None else None
    out: dict[str, Any] = {"candles": candles, "goal_mb": GOAL_RSS_MB, "reference_peak_rss_mb": reference_mb}
    measured = measure(ours(data))
    if measured.problem is not None:
        return out | {"problem": measured.problem, "met": False}
    return out | {"peak_rss_mb": measured.peak_rss_mb, "wall_s": round(measured.wall_s or 0, 2),
                  "met": measured.peak_rss_mb <= GOAL_RSS_MB}  # fmt: skip


def commit() -> dict[str, Any]:
    """The commit measured, and whether src/ differed from it (the checkout is shared)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=ROOT)
    return {"commit": head, "src_uncommitted_changes": bool(changed.stdout.strip())}


def backtest_speed(candles: int, pairs: int, year_candles: int) -> dict[str, Any]:
    """The backtest-speed rows: ``candles`` for the speed figures, ``year_candles`` (0 = skip) for the RSS one."""
    out: dict[str, Any] = {**commit(), "candles": candles, "pairs": pairs, "timeout_s": TIMEOUT_S,
                           "settings": SETTINGS}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="qt-bench-backtest-") as tmp:
        data = write_csv(Path(tmp) / f"{SYMBOL}.csv", candles)
        out["whole_command"] = whole_commands(data, candles, pairs)
        if out["whole_command"]["ours"]["problem"] is not None:
            # Each figure below takes longer than the one that already failed or timed out.
            skipped = f"skipped: the whole command {out['whole_command']['ours']['problem']}"
            out["engine_only"] = {"problem": skipped, "goal_candles_per_s": GOAL_ENGINE, "met": False}
            if year_candles:
                out["year_rss"] = {"candles": year_candles, "problem": skipped, "goal_mb": GOAL_RSS_MB, "met": False}
            return out
        out["engine_only"] = engine_only(data, candles)
        print(f"backtest engine only: {out['engine_only']}", file=sys.stderr)
        if year_candles:
            (Path(tmp) / "year").mkdir()  # a directory of its own: the file's stem must stay the symbol
            year = write_csv(Path(tmp) / "year" / f"{SYMBOL}.csv", year_candles)
            out["year_rss"] = year_rss(year, year_candles)
            print(f"backtest year RSS: {out['year_rss']}", file=sys.stderr)
    return out


def verdict(met: bool) -> str:
    """A goal's word in the table."""
    return "met" if met else "NOT met"


def render(res: dict[str, Any]) -> list[str]:
    """The backtest-speed rows of the bench's Markdown table."""
    n, whole = res["candles"], res["whole_command"]
    lines = []
    for side, name in (("ours", "`quantum-trader backtest`"), ("theirs", "backtesting.py script")):
        row = whole[side]
        measured = row["problem"] or f"{row['median_s']} s ({row['candles_per_s']:,} candles/s)"
        lines.append(f"| backtest {n:,} candles, {name}, whole command (median of {len(row['wall_s'])}) "
                     f"| {measured} | |")  # fmt: skip
    ratio = "" if whole["median_ratio"] is None else f"{whole['median_ratio']}×"
    pairs = ", ".join(f"{r}×" for r in whole["ratios"])
    lines.append(f"| backtest, ours / backtesting.py, median of the pairs ({pairs or 'none'}) "
                 f"| {ratio} | ≤ {GOAL_RATIO:g}×: {verdict(whole['met'])} |")  # fmt: skip
    engine = res["engine_only"]
    measured = engine.get("problem") or f"{engine['candles_per_s']:,} candles/s"
    lines.append(f"| backtest engine alone, `backtest.run()`, 1 core | {measured} "
                 f"| ≥ {GOAL_ENGINE:,}: {verdict(engine['met'])} |")  # fmt: skip
    reference = whole["reference_run_only"]["candles_per_s"]
    lines.append(f"| backtesting.py `Backtest.run()` alone | {'' if reference is None else f'{reference:,} candles/s'} "
                 "| |")  # fmt: skip
    if "year_rss" in res:
        year = res["year_rss"]
        measured = year.get("problem") or f"{year['peak_rss_mb']} MB"
        if year.get("reference_peak_rss_mb") is not None:
            measured += f" (backtesting.py: {year['reference_peak_rss_mb']} MB)"
        span = " (a year)" if year["candles"] == YEAR_CANDLES else ""
        lines.append(f"| peak RSS, `quantum-trader backtest` on {year['candles']:,} one-minute candles{span} "
                     f"| {measured} | ≤ {GOAL_RSS_MB} MB: {verdict(year['met'])} |")  # fmt: skip
    trades = whole["trades"]
    ours_trades = trades["ours"]
    shown = "–" if ours_trades is None else f"{ours_trades['entries']:,} entries ({ours_trades['fills']:,} fills)"
    theirs_trades = "–" if trades["theirs"] is None else f"{trades['theirs']:,} trades"
    lines.append(f"| backtest trades, ours / backtesting.py (a sanity check) | {shown} / {theirs_trades} | |")
    return lines


def main() -> None:
    if sys.argv[1:2] == ["engine"]:
        engine_child(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.backtest", description="The backtest-speed rows alone.")
    parser.add_argument("--quick", action="store_true", help="20,000 candles, 1 pair, no year file")
    parser.add_argument("--candles", type=int, help="candles of the speed file")
    parser.add_argument("--pairs", type=int, help="runs of each side, interleaved")
    parser.add_argument("--year-candles", type=int, help="candles of the RSS file (0 = skip that row)")
    args = parser.parse_args()
    size = SIZES[args.quick]
    res = backtest_speed(args.candles or size["candles"], args.pairs or size["pairs"],
                   size["year_candles"] if args.year_candles is None else args.year_candles)  # fmt: skip
    print(json.dumps(res, indent=2), file=sys.stderr)
    print("\n".join(["| figure | measured | target |", "| --- | ---: | ---: |", *render(res)]))


if __name__ == "__main__":
    main()
