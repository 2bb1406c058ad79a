"""The demo: synthetic candles through the AI engine and the whole pipeline, and a clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis


def demo_env(url: str, data_dir: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    return base | {"QT_DATA_DIR": str(data_dir)}


def test_demo_runs_candles_through_strategies_to_results(clean_url: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "quantum_trader", "demo", "--count", "150", "--rate", "2000", "--server-url", clean_url],
        env=demo_env(clean_url, tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = re.search(r"([\d,]+) candles → ([\d,]+) decisions", done.stdout)
    assert found, done.stdout
    candles, decisions = (int(g.replace(",", "")) for g in found.groups())
    assert candles == 450  # 150 per symbol, three symbols
    assert decisions > 0
    # Every decision came from a strategy and ended in exactly one result.
    client = redis.Redis.from_url(clean_url, decode_responses=True)
    made = [json.loads(f["payload"]) for _id, f in client.xrange("quantum:stream:ai.decision")]
    assert len(made) == decisions
    assert {d["strategy"] for d in made} <= {"ema-cross", "rsi", "protect"}
    # Protective exits (the demo's 2 % stop-loss, 4 % take-profit) are decisions too, one per exit fired.
    exits = re.search(r"risk: trading state ACTIVE; protective exits fired: ([\d,]+)", done.stdout)
    assert exits, done.stdout
    assert sum(d["strategy"] == "protect" for d in made) == int(exits.group(1).replace(",", ""))
    results = [json.loads(f["payload"]) for _id, f in client.xrange("quantum:stream:execution.result")]
    client.close()
    assert len(results) == decisions
    assert any(result["status"] == "FILLED" for result in results)
    shown = dict(re.findall(r"^  (FILLED|REJECTED \w+)\s+([\d,]+)$", done.stdout, re.MULTILINE))
    assert sum(int(v.replace(",", "")) for v in shown.values()) == decisions
    # The summary shows what the journal recorded and the book: each filled symbol, and the PnL.
    assert f"journal (SQLite, in the demo's private directory): {decisions:,} results" in done.stdout
    assert sorted({r["symbol"] for r in results if r["status"] == "FILLED"}) == [
        line.split("│")[1].strip() for line in done.stdout.splitlines() if re.match(r"│ \w+USDT ", line)
    ]
    assert "PnL in USDT: realised" in done.stdout


def test_demo_stops_cleanly_on_ctrl_c(clean_url: str, tmp_path: Path) -> None:
    # Output to files, not pipes: nothing can block on a full pipe while the test waits.
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "quantum_trader", "demo", "--count", "100000", "--rate", "100",
             "--server-url", clean_url],
            env=demo_env(clean_url, tmp_path), stdout=out_file, stderr=err_file, text=True,
        )  # fmt: skip
    client = redis.Redis.from_url(clean_url)
    try:
        deadline = time.monotonic() + 60
        while client.xlen("quantum:stream:market.candle") < 50 and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        out, err = out_path.read_text(), err_path.read_text()
        assert process.returncode == 0, err
        assert "stopped before the end" in out
        assert "Traceback" not in err
        # Whatever the engine decided before the stop reached a result or is still pending for the next run.
        group = "quantum:group:execution:trade.intent"
        pending = client.xpending("quantum:stream:trade.intent", group)["pending"]
        assert client.xlen("quantum:stream:execution.result") + pending == client.xlen("quantum:stream:trade.intent")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        client.close()


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = demo_env("", data_dir) | {"QT_LOG_LEVEL": "error"}
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args], env=env, capture_output=True, text=True, timeout=120
    )


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_the_demo_leaves_the_operators_switch_balances_counter_and_data_dir_as_it_found_them(tmp_path: Path) -> None:
    data_dir = tmp_path / "operator"
    assert "HALTED" in cli(data_dir, "kill", "status").stdout  # the operator's embedded server, never armed
    before = tree(data_dir)

    done = cli(data_dir, "demo", "--source", "decisions", "--count", "50", "--rate", "2000")
    assert done.returncode == 0, done.stderr
    assert "FILLED" in done.stdout  # it did trade, on its own server

    assert tree(data_dir) == before
    after = cli(data_dir, "kill", "status")
    assert "HALTED" in after.stdout, after.stdout
    status = json.loads(cli(data_dir, "governor", "status", "--json").stdout)
    assert status["count"] == 0
