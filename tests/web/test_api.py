"""The read endpoints on a real server: empty, after a pipeline traded (router, execution and journal
in-process), with bad parameters, and with the journal's database or the stream server down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from quantum_trader import keys, trading
from quantum_trader.bus import connection
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.events import TradingState
from quantum_trader.journal.stage import Journal
from quantum_trader.settings import Settings
from tests.bus.test_dead_letters import dead_lettered_intent
from tests.journal.helpers import drain_journal
from tests.pipeline import decision, drain
from tests.test_execution import Pipeline, allow
from tests.web.conftest import AUTH, DOWN_DATABASE, Client

READS = [
    "/api/health",
    "/api/status",
    "/api/governor",
    "/api/trades",
    "/api/positions",
    "/api/pnl",
    "/api/balances",
    "/api/dead-letters",
    "/api/results",
    "/api/rejections",
    "/api/state-changes",
    "/api/equity",
]
JOURNAL_READS = ["/api/trades", "/api/pnl", "/api/state-changes", "/api/equity"]


async def get(api: httpx.AsyncClient, path: str, **params: Any) -> Any:
    """The JSON of a GET that must answer 200."""
    response = await api.get(path, params=params)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
    return response.json()


async def traded(r: Redis, settings: Settings) -> None:
    """A pipeline that bought 1 ETH at 3000 and sold 0.5 at 3300, refused one decision, set one
    aside, and was moved to REDUCING; everything journaled."""
    await allow(r)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    pipeline = Pipeline(r, settings)
    await pipeline.run(decision(qty="1", strategy="ema-cross"))
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3300")
    await pipeline.run(decision(side="SELL", qty="0.5", price="3300", strategy="ema-cross"))
    await publish(r, settings.decision_stream, [decision(qty="-1")])
    await drain(pipeline.router)
    await dead_lettered_intent(r)
    await trading.set_state(r, settings, TradingState.REDUCING, "web test", "tester")
    journal = await Journal.open(r, settings)
    try:
        await drain_journal(journal)
    finally:
        journal.close()


async def test_every_read_endpoint_answers_on_an_empty_pipeline(api: httpx.AsyncClient) -> None:
    shown = {path: await get(api, path) for path in READS}

    assert shown["/api/health"] == {"ok": True}
    assert shown["/api/status"]
    assert not any(stream["exists"] for stream in shown["/api/status"])
    governor = shown["/api/governor"]
    # No kill switch set yet: halted (fail closed), in the ACTIVE state, nothing counted.
    assert (governor["kill_value"], governor["trading_allowed"], governor["count"]) == (None, False, 0)
    assert governor["trading_state"]["state"] == "ACTIVE"
    assert any(rule["setting"] == "QT_DAILY_LIMIT" for rule in governor["rules"])
    assert shown["/api/positions"] == {
        "positions": [],
        "totals": {"realised": {}, "unrealised": {}, "fees": {}, "exposure": {}},
    }
    assert shown["/api/balances"] == {"exchange": "paper", "assets": []}
    for path in (*JOURNAL_READS, "/api/dead-letters", "/api/results", "/api/rejections"):
        assert shown[path] == [], path


async def test_every_read_endpoint_shows_what_the_pipeline_did(
    r: Redis, api: httpx.AsyncClient, web_settings: Any
) -> None:
    await traded(r, web_settings())

    trades = await get(api, "/api/trades")
    assert [(t["side"], t["status"], Decimal(t["filled_qty"])) for t in trades] == [
        ("SELL", "FILLED", Decimal("0.5")),
        ("BUY", "FILLED", Decimal(1)),
    ]  # newest first
    assert Decimal(trades[0]["avg_price"]) == 3300
    assert trades[0]["strategy"] == "ema-cross"

    [position] = (await get(api, "/api/positions"))["positions"]
    assert (position["symbol"], Decimal(position["qty"]), Decimal(position["mark"])) == (
        "ETHUSDT",
        Decimal("0.5"),
        3300,
    )
    realised = Decimal(position["realised"])
    assert 0 < realised < 150  # 0.5 x 300, less the fees

    [by_symbol] = await get(api, "/api/pnl", by="symbol")
    assert (by_symbol["key"], by_symbol["quote"], by_symbol["fills"]) == ("ETHUSDT", "USDT", 2)
    assert Decimal(by_symbol["realised"]) == realised  # the journal's replay agrees with the live book
    assert [group["key"] for group in await get(api, "/api/pnl", by="strategy")] == ["ema-cross"]
    [today] = await get(api, "/api/pnl")
    assert today["key"] == f"{datetime.now(UTC):%Y-%m-%d}"

    curve = await get(api, "/api/equity")
    assert [(point["quote"], point["fills"]) for point in curve] == [("USDT", 1), ("USDT", 2)]
    assert (Decimal(curve[0]["realised"]), Decimal(curve[-1]["realised"])) == (0, realised)
    assert len(await get(api, "/api/equity", limit=1)) == 1

    balances = {row["asset"]: row for row in (await get(api, "/api/balances"))["assets"]}
    assert Decimal(balances["ETH"]["balance"]) == Decimal(balances["ETH"]["book_flow"]) == Decimal("0.5")

    results = await get(api, "/api/results")
    assert [(entry["result"]["side"], entry["problem"]) for entry in results] == [("SELL", None), ("BUY", None)]
    assert results[0]["trace_id"]
    assert results[0]["timestamp"]
    [rejection] = await get(api, "/api/rejections")
    assert rejection["rejection"]["reason"] == "INVALID"
    [dead] = await get(api, "/api/dead-letters")
    assert (dead["dead_letter"]["stream"], dead["dead_letter"]["deliveries"]) == ("quantum:stream:trade.intent", 6)
    [change] = await get(api, "/api/state-changes")
    assert (change["state"], change["previous"], change["detail"], change["by"]) == (
        "REDUCING", "ACTIVE", "web test", "tester",
    )  # fmt: skip

    governor = await get(api, "/api/governor")
    assert (governor["count"], governor["trading_allowed"], governor["trading_state"]["state"]) == (2, True, "REDUCING")
    streams = {stream["name"]: stream for stream in await get(api, "/api/status", consumers="true")}
    result_stream = streams["quantum:stream:execution.result"]
    assert result_stream["length"] == 2
    assert "quantum:group:journal" in [group["name"] for group in result_stream["groups"]]


async def test_trades_are_filtered_like_the_cli(r: Redis, api: httpx.AsyncClient, web_settings: Any) -> None:
    await traded(r, web_settings())
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()

    assert [t["side"] for t in await get(api, "/api/trades", symbol="ethusdt", status="FILLED", limit=1)] == ["SELL"]
    assert len(await get(api, "/api/trades", strategy="ema-cross")) == 2
    assert await get(api, "/api/trades", strategy="rsi") == []
    assert await get(api, "/api/trades", symbol="BTCUSDT") == []
    assert await get(api, "/api/trades", since=tomorrow) == []
    assert len(await get(api, "/api/trades", until=tomorrow)) == 2
    assert await get(api, "/api/equity", since=tomorrow) == []


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        ("/api/trades", {"limit": 0}, "limit"),
        ("/api/trades", {"status": "filled"}, "status"),
        ("/api/trades", {"since": "yesterday"}, "since"),
        ("/api/trades", {"symbol": "ETH USDT"}, "symbol"),
        ("/api/pnl", {"by": "week"}, "by"),
        ("/api/results", {"limit": 1001}, "limit"),
        ("/api/equity", {"since": "0001-01-01T00:00:00+14:00"}, "since"),
    ],
)
async def test_a_bad_query_parameter_is_422_naming_it(
    api: httpx.AsyncClient, path: str, params: dict[str, Any], named: str
) -> None:
    response = await api.get(path, params=params)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"][:2] == ["query", named]
    assert error["msg"]


async def test_an_undecodable_entry_is_shown_with_its_problem(r: Redis, api: httpx.AsyncClient) -> None:
    await r.xadd("quantum:stream:execution.result", {"event_type": "execution.result", "payload": "{not json"})
    await r.xadd("quantum:stream:dead_letter", {"payload": "[1, 2]", "trace_id": b"\xff\xfe"})

    [entry] = await get(api, "/api/results")
    assert entry["result"] is None
    assert "missing envelope field" in entry["problem"]
    [dead] = await get(api, "/api/dead-letters")
    assert dead["dead_letter"] is None
    assert dead["trace_id"] == "\\xff\\xfe"  # bytes that are not UTF-8, shown escaped


async def test_the_journal_down_is_503_with_the_reason_and_the_rest_still_answers(client_for: Client) -> None:
    async with client_for(database_url=DOWN_DATABASE) as api:
        for path in JOURNAL_READS:
            response = await api.get(path)
            assert response.status_code == 503, f"{path}: {response.status_code} {response.text}"
            detail = response.json()["detail"]
            assert "journal database postgresql+psycopg://qt:***@127.0.0.1:1/journal" in detail
            assert "unavailable" in detail
        # The live state is in Redis: it still answers.
        for path in ("/api/status", "/api/governor", "/api/positions", "/api/results"):
            assert (await api.get(path)).status_code == 200, path


async def test_the_stream_server_down_is_503_with_the_reason(client_for: Client) -> None:
    down = connection.client("redis://127.0.0.1:1/0")
    try:
        async with client_for(redis=down) as api:
            for path in ("/api/health", "/api/status", "/api/governor", "/api/results"):
                response = await api.get(path)
                assert response.status_code == 503, f"{path}: {response.status_code} {response.text}"
                assert "quantum-trader status" in response.json()["detail"]
            refused = await api.post("/api/kill-switch", json={"on": True}, headers=AUTH)
            assert refused.status_code == 503
    finally:
        await down.aclose()
