"""``quantum-trader state`` and ``governor status`` against a real server: the change is stored, on its
stream once, and shown with every risk rule; a change without a reason or to an unknown state is refused."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from quantum_trader import keys, protect
from quantum_trader.bus.connection import Redis
from tests.cli.test_commands import cli

STATE_STREAM = "quantum:stream:risk.state"
RULE_FIELDS = {"name", "setting", "limit", "current", "headroom"}


async def state_events(r: Redis) -> list[dict[str, Any]]:
    return [{**fields, "payload": json.loads(fields["payload"])} for _id, fields in await r.xrange(STATE_STREAM)]


async def test_a_change_is_stored_streamed_once_and_shown_by_governor_status_with_every_rule(
    r: Redis, clean_url: str
) -> None:
    limits = {"QT_DAILY_LIMIT": "10", "QT_DAILY_LOSS_LIMIT": "50", "QT_MAX_GROSS_EXPOSURE": "1000"}
    today = datetime.now(UTC).date()
    await r.set(keys.daily_trades(today), "3")
    await r.hset(keys.risk_realised(today), "USDT", "-20")
    stop = protect.Stop(symbol="ETHUSDT", stop=Decimal("2900"), take=Decimal("3300"), at="2026-01-01T00:00:00Z")
    await r.hset(keys.PROTECT_STOPS, "ETHUSDT", protect.encode(stop))

    done = cli(clean_url, "state", "halted", "--reason", "exchange maintenance", "--by", "alice", **limits)

    assert done.returncode == 0, done.stderr
    assert "HALTED (was ACTIVE): exchange maintenance" in done.stdout
    stored = await r.hgetall(keys.TRADING_STATE)
    assert (stored["state"], stored["reason"], stored["detail"], stored["by"]) == (
        "HALTED",
        "OPERATOR",
        "exchange maintenance",
        "alice",
    )
    [event] = await state_events(r)
    assert event["event_type"] == "risk.state"
    assert event["payload"] == {
        "state": "HALTED",
        "previous": "ACTIVE",
        "reason": "OPERATOR",
        "detail": "exchange maintenance",
        "by": "alice",
        "at": stored["at"],
        "until": "",
    }

    gov = json.loads(cli(clean_url, "governor", "status", "--json", **limits).stdout)
    assert (gov["trading_allowed"], gov["kill_value"], gov["limit"]) == (False, None, 10)  # the keys kept from before
    shown = gov["trading_state"]
    assert (shown["state"], shown["reason"], shown["detail"], shown["by"], shown["at"]) == (
        "HALTED",
        "OPERATOR",
        "exchange maintenance",
        "alice",
        stored["at"],
    )
    rules = {rule["setting"]: rule for rule in gov["rules"]}
    assert all(set(rule) == RULE_FIELDS for rule in gov["rules"])
    assert {"QT_DAILY_LIMIT", "QT_MAX_GROSS_EXPOSURE", "QT_DAILY_LOSS_LIMIT", "QT_MAX_ORDERS_PER_S"} <= set(rules)
    assert [rules["QT_DAILY_LIMIT"][k] for k in ("limit", "current", "headroom")] == ["10", "3", "7"]
    assert [rules["QT_DAILY_LOSS_LIMIT"][k] for k in ("limit", "current", "headroom")] == ["50", "20", "30"]
    assert [rules["QT_MAX_GROSS_EXPOSURE"][k] for k in ("limit", "current", "headroom")] == ["1000", "0", "1000"]
    assert [rules["QT_MAX_POSITION_NOTIONAL"][k] for k in ("limit", "headroom")] == ["off", "-"]
    assert gov["stops"]["ETHUSDT"] == {
        "stop": "2900",
        "take": "3300",
        "armed_at": "2026-01-01T00:00:00Z",
        "fired": "",
        "fired_at": "",
        "kind": "",
    }

    table = cli(clean_url, "governor", "status", **limits)
    assert table.returncode == 0, table.stderr
    state_row = next(line for line in table.stdout.splitlines() if "trading state" in line)
    assert "HALTED: OPERATOR: exchange maintenance (by alice" in state_row
    loss_row = next(line for line in table.stdout.splitlines() if "QT_DAILY_LOSS_LIMIT" in line)
    assert [cell.strip() for cell in loss_row.split("│") if cell.strip()][2:] == ["50", "20", "30"]
    assert "ETHUSDT" in table.stdout.split("Protective stops", 1)[1]


async def test_state_show_prints_it_and_active_defaults_by_to_the_os_user(r: Redis, clean_url: str) -> None:
    assert json.loads(cli(clean_url, "state", "--json").stdout)["state"] == "ACTIVE"  # nothing stored: ACTIVE
    assert cli(clean_url, "state", "reducing", "--reason", "news at 14:00").returncode == 0

    shown = json.loads(cli(clean_url, "state", "show", "--json").stdout)
    assert (shown["state"], shown["detail"], shown["by"]) == ("REDUCING", "news at 14:00", getpass.getuser())
    text = cli(clean_url, "state")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"REDUCING: OPERATOR: news at 14:00 (by {getpass.getuser()}, at {shown['at']})")

    assert cli(clean_url, "state", "ACTIVE", "--reason", "news passed", "--by", "bob").returncode == 0
    events = [e["payload"] for e in await state_events(r)]
    assert [(e["state"], e["previous"], e["by"]) for e in events] == [
        ("REDUCING", "ACTIVE", getpass.getuser()),
        ("ACTIVE", "REDUCING", "bob"),
    ]


async def test_a_change_without_a_reason_or_to_an_unknown_state_is_one_line_and_changes_nothing(
    r: Redis, clean_url: str
) -> None:
    for args in (["halted"], ["halted", "--reason", "   "], ["reducing", "--by", "alice"]):
        done = cli(clean_url, "state", *args)
        assert done.returncode == 2, args
        assert done.stderr.startswith(f"error: --reason is required to change the trading state: "
                                      f"quantum-trader state {args[0]} --reason"), done.stderr  # fmt: skip
        assert "Traceback" not in done.stderr

    for word in ("paused", "halt"):
        done = cli(clean_url, "state", word, "--reason", "x")
        assert done.returncode == 2
        assert (
            done.stderr.strip()
            == f"error: unknown trading state {word!r}: choose one of active, reducing, halted (or show)"
        )
        assert "Traceback" not in done.stderr

    assert await r.exists(keys.TRADING_STATE, STATE_STREAM) == 0
