"""The command line against a real server: status with a lagging group, kill switch, errors, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.events import TRADE_INTENT, TradeIntent, envelope, now_iso


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


async def test_router_command_routes_decisions_into_intents(r: Redis, clean_url: str) -> None:
    from tests.pipeline import decision

    await publish(r, "quantum:stream:ai.decision", [decision(), decision(side="HOLD")])
    done = cli(clean_url, "router", "--duration", "1")
    assert done.returncode == 0, done.stderr
    assert await r.xlen("quantum:stream:trade.intent") == 1
    [(_id, rejected)] = await r.xrange("quantum:stream:decision.rejected")
    assert json.loads(rejected["payload"])["reason"] == "INVALID"


async def test_sigterm_mid_backlog_exits_zero_and_leaves_no_intent_half_done(r: Redis, clean_url: str) -> None:
    intents, stream, group = 3000, "quantum:stream:trade.intent", "quantum:group:execution:trade.intent"
    await r.set("quantum:kill", "0")
    await r.hset("quantum:market:last_price", "ETHUSDT", "3000")
    stamp = now_iso(datetime.now(UTC))
    backlog = [
        envelope(
            TRADE_INTENT,
            TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.001"), decision_ts=stamp),
            trace_id=f"t{n}",
            correlation_id=f"c{n}",
            source="test",
        )
        for n in range(intents)
    ]
    await publish(r, stream, backlog)
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quantum_trader", "execution",
        env=base | {"QT_REDIS_URL": clean_url, "QT_BATCH_SIZE": "10", "QT_LOG_LEVEL": "warning",
                    "QT_DAILY_LIMIT": "1000000", "QT_PAPER_BALANCES": "USDT=1000000"},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    for _ in range(600):  # SIGTERM once it is well into the backlog
        if await r.exists("quantum:stream:execution.result") and await r.xlen("quantum:stream:execution.result") >= 50:
            break
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()

    results = [json.loads(f["payload"]) for _, f in await r.xrange("quantum:stream:execution.result")]
    assert 0 < len(results) < intents, "the signal must land mid-backlog"
    done = [res["intent_id"] for res in results]
    assert len(set(done)) == len(done)  # one result per intent
    pending = {p["message_id"] for p in await r.xpending_range(stream, group, min="-", max="+", count=intents)}
    assert not pending & set(done)  # no result without its ack
    [info] = await r.xinfo_groups(stream)
    unread = len(await r.xrange(stream, min=f"({info['last-delivered-id']}", max="+"))
    assert len(done) + len(pending) + unread == intents
    orders = [key.removeprefix("quantum:paper:order:") for key in await r.keys("quantum:paper:order:*")]
    assert set(orders) == {res["client_order_id"] for res in results}  # no order without its result


async def test_status_consumers_shows_each_consumer_with_pending_and_idle(r: Redis, clean_url: str) -> None:
    stream, group = "quantum:stream:trade.intent", "quantum:group:execution:trade.intent"
    await ensure_group(r, stream, group)
    await publish(r, stream, [{"n": str(i)} for i in range(7)])
    await r.xreadgroup(group, "exec-a", {stream: ">"}, count=4)
    await r.xreadgroup(group, "exec-b", {stream: ">"}, count=3)

    plain = cli(clean_url, "status")
    detailed = cli(clean_url, "status", "--consumers")

    assert detailed.returncode == 0, detailed.stderr
    assert "exec-a" not in plain.stdout
    rows = {line.split("└")[1].split("│")[0].strip(): line for line in detailed.stdout.splitlines() if "  └ " in line}
    assert set(rows) == {"exec-a", "exec-b"}
    assert [c.strip() for c in rows["exec-a"].split("│") if c.strip()][1] == "4"
    assert "idle" in rows["exec-b"]


def test_status_watch_refuses_a_negative_or_zero_interval_in_one_line(clean_url: str) -> None:
    for bad in ("-1", "0.01"):
        done = cli(clean_url, "status", "--watch", bad)
        assert done.returncode == 2
        assert done.stderr.startswith(f"error: --watch {float(bad):g}")
        assert "Traceback" not in done.stderr
