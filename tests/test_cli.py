"""The command line against a real server: status with a lagging group, kill switch, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args],
        env=base | {"QT_REDIS_URL": url, "QT_LOG_FORMAT": "json"} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_status_shows_a_lagging_group(r: Redis, clean_url: str) -> None:
    stream, group = "quantum:stream:trade.intent", "quantum:group:execution:trade.intent"
    await ensure_group(r, stream, group)
    ids = await publish(r, stream, [{"n": str(i)} for i in range(30)])
    await r.xreadgroup(group, "exec-1", {stream: ">"}, count=10)  # 10 delivered, still pending; 20 not yet

    done = cli(clean_url, "status", "--json")
    assert done.returncode == 0, done.stderr
    stats: list[dict[str, Any]] = json.loads(done.stdout)
    intent = next(s for s in stats if s["name"] == stream)
    assert (intent["length"], intent["entries_added"], intent["last_generated_id"]) == (30, 30, ids[-1])
    [g] = intent["groups"]
    assert (g["name"], g["consumers"], g["pending"], g["lag"], g["last_delivered_id"]) == (group, 1, 10, 20, ids[9])
    assert next(s for s in stats if s["name"] == "quantum:stream:ai.decision")["exists"] is False

    table = cli(clean_url, "status")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if stream in line)
    assert group in row
    cells = [cell.strip() for cell in row.split("│") if cell.strip()]
    assert cells[:3] == [stream, "30", "30"]  # stream, XLEN, entries-added


def test_unreachable_redis_is_one_clear_line() -> None:
    done = cli("redis://127.0.0.1:1/0", "status")
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0")
    assert "Traceback" not in done.stderr


def test_password_in_url_is_never_printed() -> None:
    done = cli("redis://admin:s3cret@127.0.0.1:1/0", "status")
    assert "s3cret" not in done.stderr + done.stdout
    assert "admin:***@" in done.stderr


async def test_kill_switch_commands(r: Redis, clean_url: str) -> None:
    assert cli(clean_url, "kill", "status").returncode == 1  # absent: halted
    assert cli(clean_url, "kill", "off").returncode == 0
    assert await r.get("quantum:kill") == "0"
    assert json.loads(cli(clean_url, "kill", "status", "--json").stdout) == {"value": "0", "trading_allowed": True}
    assert cli(clean_url, "kill", "on").returncode == 0
    assert await r.get("quantum:kill") == "1"
    gov = json.loads(cli(clean_url, "governor", "status", "--json").stdout)
    assert (gov["trading_allowed"], gov["kill_value"], gov["limit"]) == (False, "1", 1_000_000)


async def test_run_processes_decisions_and_check_sees_its_heartbeat(r: Redis, clean_url: str) -> None:
    await r.set("quantum:kill", "0")
    from tests.pipeline import decision

    await publish(r, "quantum:stream:ai.decision", [decision(qty="0.01") for _ in range(20)])
    done = cli(clean_url, "run", "--duration", "2")
    assert done.returncode == 0, done.stderr
    assert await r.xlen("quantum:stream:execution.result") == 20
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    filled = [line for line in lines if line.get("outcome") == "FILLED"]
    assert len(filled) == 20
    assert all(line["trace_id"] and line["correlation_id"] for line in filled)
    assert cli(clean_url, "check", "execution").returncode == 0  # heartbeat still within its expiry
    assert cli(clean_url, "check", "ai-nothing").returncode == 1
