"""The controls and their token: refused without it (and nothing changes), applied with it, every
attempt logged with its source and never the token; the kill switch with the journal and the exchange down;
the token's loader and its secrets file checks."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.errors import ConfigError
from quantum_trader.exchanges.base import client_order_id
from quantum_trader.web.auth import load_token
from tests.bus.test_dead_letters import DEAD_LETTERS, INTENTS, dead_lettered_intent
from tests.conftest import LogTrap
from tests.web.conftest import AUTH, DOWN_DATABASE, TOKEN, WRONG, Client


@dataclass(frozen=True)
class Control:
    """A state-changing endpoint: how to prepare a request, and what it changes."""

    path: str
    prepare: Callable[[Redis], Awaitable[dict[str, Any]]]  # the request body
    snapshot: Callable[[Redis], Awaitable[Any]]  # what it changes
    applied: Callable[[Any], bool]


async def _kill_body(r: Redis) -> dict[str, Any]:
    await r.set(keys.KILL_SWITCH, "0")
    return {"on": True}


async def _kill(r: Redis) -> Any:
    return await r.get(keys.KILL_SWITCH)


async def _state_body(r: Redis) -> dict[str, Any]:
    return {"state": "HALTED", "reason": "maintenance window"}


async def _state(r: Redis) -> Any:
    return await r.hgetall(keys.TRADING_STATE), await r.xlen("quantum:stream:risk.state")


async def _replay_body(r: Redis) -> dict[str, Any]:
    return {"ids": [await dead_lettered_intent(r)]}


async def _replay(r: Redis) -> Any:
    return await r.xlen(DEAD_LETTERS), await r.xlen(INTENTS)


CONTROLS = {
    "kill-switch": Control("/api/kill-switch", _kill_body, _kill, lambda value: value == "1"),
    "trading-state": Control(
        "/api/trading-state",
        _state_body,
        _state,
        lambda value: value[0].get("state") == "HALTED" and value[0].get("by") == "web:127.0.0.1" and value[1] == 1,
    ),
    "replay": Control("/api/dead-letters/replay", _replay_body, _replay, lambda value: value == (0, 1)),
}


def audit(trap: LogTrap) -> list[dict[str, Any]]:
    """Every ``web_auth`` log line."""
    return [line for line in map(json.loads, trap.lines('"web_auth"'))]


@pytest.mark.parametrize("name", CONTROLS)
async def test_a_control_is_off_without_a_configured_token_and_says_how_to_configure_one(
    r: Redis, client_for: Client, log_trap: LogTrap, name: str
) -> None:
    control = CONTROLS[name]
    body = await control.prepare(r)
    before = await control.snapshot(r)
    async with client_for(token=None) as api:
        response = await api.post(control.path, json=body, headers=AUTH)

    assert response.status_code == 403
    assert "QT_WEB_TOKEN" in response.json()["detail"]
    assert "QT_SECRETS_FILE" in response.json()["detail"]
    assert await control.snapshot(r) == before
    [line] = audit(log_trap)
    assert (line["outcome"], line["reason"], line["source"], line["path"]) == (
        "refused", "no token configured", "127.0.0.1", control.path,
    )  # fmt: skip


@pytest.mark.parametrize("name", CONTROLS)
@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "no bearer token"),
        ({"Authorization": f"Bearer {WRONG}"}, "wrong token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "wrong token"),
        ({"Authorization": f"Basic {TOKEN}"}, "no bearer token"),
        ({"Authorization": "Bearer ünïcode-0123456789".encode("latin-1")}, "wrong token"),
    ],
    ids=["none", "wrong", "longer", "basic", "latin-1"],
)
async def test_a_control_without_the_right_token_is_401_and_changes_nothing(
    r: Redis, api: httpx.AsyncClient, log_trap: LogTrap, name: str, headers: dict[str, Any], reason: str
) -> None:
    control = CONTROLS[name]
    body = await control.prepare(r)
    before = await control.snapshot(r)

    response = await api.post(control.path, json=body, headers=headers)

    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert await control.snapshot(r) == before
    [line] = audit(log_trap)
    assert (line["outcome"], line["reason"], line["source"]) == ("refused", reason, "127.0.0.1")
    assert (line["method"], line["path"], line["timestamp"][:2]) == ("POST", control.path, "20")
    # The trap fails the test if either token shows up anywhere; the header value never does either.
    assert "Bearer" not in log_trap.text()


@pytest.mark.parametrize("name", CONTROLS)
async def test_a_control_with_the_token_is_applied_and_logged(
    r: Redis, api: httpx.AsyncClient, log_trap: LogTrap, name: str
) -> None:
    control = CONTROLS[name]
    body = await control.prepare(r)

    response = await api.post(control.path, json=body, headers=AUTH)

    assert response.status_code == 200, response.text
    assert control.applied(await control.snapshot(r))
    [line] = audit(log_trap)
    assert (line["outcome"], line["source"], line["path"]) == ("accepted", "127.0.0.1", control.path)


async def test_the_answers_of_the_controls(r: Redis, api: httpx.AsyncClient) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    halted = await api.post("/api/trading-state", json={"state": "HALTED", "reason": " night "}, headers=AUTH)
    assert halted.json() | {"at": ""} == {
        "state": "HALTED",
        "previous": "ACTIVE",
        "reason": "OPERATOR",
        "detail": "night",
        "by": "web:127.0.0.1",
        "at": "",
        "until": "",
        "kill_switch_halts": False,
    }
    killed = await api.post("/api/kill-switch", json={"on": True}, headers=AUTH)
    assert killed.json() == {"on": True, "value": "1", "trading_allowed": False}
    back = await api.post("/api/trading-state", json={"state": "ACTIVE", "reason": "done"}, headers=AUTH)
    assert (back.json()["previous"], back.json()["kill_switch_halts"]) == ("HALTED", True)
    allowed = await api.post("/api/kill-switch", json={"on": False}, headers=AUTH)
    assert allowed.json() == {"on": False, "value": "0", "trading_allowed": True}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/kill-switch", {"on": "yes"}),
        ("/api/kill-switch", {"on": 1}),
        ("/api/kill-switch", {}),
        ("/api/trading-state", {"state": "PAUSED", "reason": "x"}),
        ("/api/trading-state", {"state": "halted", "reason": "x"}),
        ("/api/trading-state", {"state": "HALTED", "reason": "   "}),
        ("/api/trading-state", {"state": "HALTED", "reason": "two\nlines"}),
        ("/api/trading-state", {"state": "HALTED"}),
        ("/api/dead-letters/replay", {"ids": []}),
        ("/api/dead-letters/replay", {"ids": ["latest"]}),
    ],
)
async def test_a_bad_control_body_is_422_and_changes_nothing(
    r: Redis, api: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    response = await api.post(path, json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["msg"]
    assert await r.get(keys.KILL_SWITCH) == "0"
    assert not await r.exists(keys.TRADING_STATE)


async def test_a_replay_stops_at_the_first_missing_or_refused_id_naming_what_went_back(
    r: Redis, api: httpx.AsyncClient
) -> None:
    first = await dead_lettered_intent(r)
    done = await api.post("/api/dead-letters/replay", json={"ids": [first, "1-0"]}, headers=AUTH)
    assert done.status_code == 409
    assert done.json()["detail"].startswith("no dead-letter entry 1-0")
    assert done.json()["detail"].endswith(f"replayed before it: {first}")
    assert await r.xlen(INTENTS) == 1

    second = await dead_lettered_intent(r)
    await r.set(keys.paper_order(client_order_id("1-1", "t1", "c1")), "{}")  # its first delivery placed it
    refused = await api.post("/api/dead-letters/replay", json={"ids": [second]}, headers=AUTH)
    assert refused.status_code == 409
    assert "second order" in refused.json()["detail"]
    assert [entry_id for entry_id, _ in await r.xrange(DEAD_LETTERS)] == [second]  # kept for the operator
    assert await r.xlen(INTENTS) == 1

    garbage = await r.xadd(DEAD_LETTERS, {"payload": "[1, 2]"})  # anyone can XADD
    refused = await api.post("/api/dead-letters/replay", json={"ids": [garbage]}, headers=AUTH)
    assert refused.status_code == 409
    assert f"dead-letter entry {garbage} cannot be replayed" in refused.json()["detail"]
    assert await r.xlen(DEAD_LETTERS) == 2


async def test_the_kill_switch_works_with_the_journal_database_and_the_exchange_down(
    r: Redis, client_for: Client
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    async with client_for(database_url=DOWN_DATABASE, exchange_api_url="http://127.0.0.1:1") as api:
        assert (await api.get("/api/trades")).status_code == 503  # the database is down indeed

        engaged = await api.post("/api/kill-switch", json={"on": True}, headers=AUTH)
        assert engaged.status_code == 200, engaged.text
        assert await r.get(keys.KILL_SWITCH) == "1"
        released = await api.post("/api/kill-switch", json={"on": False}, headers=AUTH)
        assert released.status_code == 200
        assert await r.get(keys.KILL_SWITCH) == "0"


# --- the loader ---


def secrets(tmp_path: Path, text: str, mode: int = 0o640) -> Path:
    path = tmp_path / "secrets.env"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_token_comes_from_the_secrets_file(tmp_path: Path) -> None:
    assert load_token(None) is None
    assert load_token(secrets(tmp_path, "BINANCE_API_KEY=k\n")) is None
    token = load_token(secrets(tmp_path, f"BINANCE_API_KEY=k\nQT_WEB_TOKEN='{TOKEN}'\n"))
    assert token is not None
    assert token.get_secret_value() == TOKEN
    assert TOKEN not in repr(token)


@pytest.mark.parametrize("mode", ["testnet", "live"])
def test_a_secrets_file_others_can_read_stops_testnet_and_live(tmp_path: Path, mode: Any) -> None:
    path = secrets(tmp_path, f"QT_WEB_TOKEN={TOKEN}\n", 0o644)
    with pytest.raises(ConfigError, match=r"other users can open it.*chmod 0640"):
        load_token(path, mode)


def test_a_secrets_file_others_can_read_is_a_warning_in_paper(tmp_path: Path, log_trap: LogTrap) -> None:
    path = secrets(tmp_path, f"QT_WEB_TOKEN={TOKEN}\n", 0o644)
    assert load_token(path, "paper") is not None
    assert log_trap.lines("secrets_file_world_readable")


@pytest.mark.parametrize("value", ["", "short", "has spaces in the token ok", "tøken-with-non-ascii-chars"])
def test_a_weak_or_garbled_token_is_refused_with_how_to_make_one(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_token(secrets(tmp_path, f"QT_WEB_TOKEN={value}\n"))
    assert "openssl rand -hex 32" in str(caught.value)
    assert not value or value not in str(caught.value)


def test_a_missing_secrets_file_is_one_line_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; create it, mode 0640"):
        load_token(tmp_path / "absent.env")
