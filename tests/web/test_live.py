"""The live page's data: the snapshot against a real server, and the event stream that carries it.

The snapshot is read before anything exists, with decisions waiting for execution, and after
router and execution have drained them; the event stream is read through the ASGI app, and by
several clients at once that then disconnect (one read per tick for all of them, nothing left
running afterwards).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from quantum_trader import keys, trading
from quantum_trader.bus.connection import Redis, client
from quantum_trader.bus.streams import publish
from quantum_trader.events import TradingState
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.governor import set_kill
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from quantum_trader.web import live
from quantum_trader.web.app import create_app
from tests.pipeline import decision, drain

DECISIONS = "quantum:stream:ai.decision"
PIPELINE = ["candle", "decision", "intent", "result", "rejected", "dead_letter", "risk_state"]


def streams_of(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {stream["key"]: stream for stream in snap["streams"]}


@pytest.fixture
def settings(settings_for: Callable[..., Settings], clean_url: str) -> Settings:
    return settings_for(clean_url, block_ms=10, daily_limit=50, paper_balances={"USDT": Decimal(100_000)})


async def allow(r: Redis, settings: Settings) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "3000")
    await PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances).fund()


async def test_an_empty_server_is_a_snapshot_of_zeros_and_a_halted_switch(r: Redis, settings: Settings) -> None:
    snap = await live.snapshot(r, settings)

    assert [s["key"] for s in snap["streams"]] == PIPELINE
    assert [s["name"] for s in snap["streams"]] == settings.streams.pipeline()
    for stream in snap["streams"]:
        assert (stream["exists"], stream["length"], stream["entries_added"], stream["rate"]) == (False, 0, 0, None)
        assert (stream["groups"], stream["lag"], stream["pending"]) == ([], None, 0)
    assert snap["stages"] == {}
    assert snap["kill"] == {"value": None, "on": True, "trading_allowed": False}  # absent halts
    assert snap["trading_state"]["state"] == "ACTIVE"
    assert snap["trades"] == {"day": datetime.now(UTC).strftime("%Y-%m-%d"), "today": 0, "limit": 50}
    assert (snap["results"], snap["rejections"], snap["positions"], snap["pnl"]) == ([], [], [], {})
    assert json.loads(json.dumps(snap)) == snap  # plain JSON, as the event stream sends it


async def test_the_snapshot_follows_decisions_through_router_and_execution(r: Redis, settings: Settings) -> None:
    await allow(r, settings)
    first = decision(qty="0.1", trace="t0", corr="c0")
    entries = [first] + [decision(qty="0.1") for _ in range(11)]
    entries += [decision(qty="0.1", trace="t0", corr="c0"), decision(symbol="BTCUSDT", side="HOLD", qty="2")]
    await publish(r, DECISIONS, entries)
    await drain(Router(r, settings))
    execution = Execution(r, settings, PaperExchange(r, quote_assets=settings.quote_assets))
    await execution.consumer.setup()

    moment = datetime.now(UTC)
    waiting = await live.snapshot(r, settings, now=moment)
    streams = streams_of(waiting)
    assert (streams["decision"]["length"], streams["decision"]["lag"], streams["decision"]["pending"]) == (14, 0, 0)
    assert (streams["intent"]["length"], streams["intent"]["lag"], streams["intent"]["pending"]) == (12, 12, 0)
    assert [(g["stage"], g["lag"], g["pending"]) for g in streams["intent"]["groups"]] == [("execution", 12, 0)]
    assert waiting["stages"]["router"] == {"lag": 0, "pending": 0, "consumers": 1}
    assert waiting["stages"]["execution"] == {"lag": 12, "pending": 0, "consumers": 0}
    assert [(row["reason"], row["symbol"], row["side"], row["qty"]) for row in waiting["rejections"]] == [
        ("INVALID", "BTCUSDT", "HOLD", "2"),
        ("DUPLICATE_SKIP", "ETHUSDT", "BUY", "0.1"),
    ]
    assert "side" in waiting["rejections"][0]["detail"]
    assert waiting["results"] == []
    assert waiting["trades"]["today"] == 0

    await drain(execution)
    later = moment + timedelta(seconds=2)
    done = await live.snapshot(r, settings, previous=waiting, now=later)
    streams = streams_of(done)
    assert (streams["result"]["length"], streams["result"]["rate"]) == (12, 6.0)  # 12 results in 2 s
    assert streams["decision"]["rate"] == 0.0
    assert done["stages"]["execution"] == {"lag": 0, "pending": 0, "consumers": 1}
    assert done["trades"]["today"] == 12
    assert len(done["results"]) == live.LATEST  # the newest ten, newest first
    ids = [tuple(map(int, row["id"].split("-"))) for row in done["results"]]
    assert ids == sorted(ids, reverse=True)
    assert {(row["status"], row["symbol"], row["side"], row["qty"]) for row in done["results"]} == {
        ("FILLED", "ETHUSDT", "BUY", "0.1")
    }
    assert done["results"][0]["avg_price"] == "3000"
    [position] = done["positions"]
    assert (position["symbol"], Decimal(position["qty"]), position["mark"]) == ("ETHUSDT", Decimal("1.2"), "3000")
    assert Decimal(done["pnl"]["USDT"]["unrealised"]) == Decimal(position["unrealised"]) < 0  # the fees paid
    assert Decimal(done["pnl"]["USDT"]["realised"]) == 0

    await set_kill(r, True)
    await trading.set_state(r, settings, TradingState.HALTED, "maintenance window", by="alice")
    halted = await live.snapshot(r, settings)
    assert halted["kill"] == {"value": "1", "on": True, "trading_allowed": False}
    state = halted["trading_state"]
    assert (state["state"], state["reason"], state["detail"], state["by"]) == (
        "HALTED", "OPERATOR", "maintenance window", "alice",
    )  # fmt: skip
    assert streams_of(halted)["risk_state"]["length"] == 1
    assert streams_of(halted)["result"]["rate"] is None  # no previous snapshot, no rate


async def test_a_rate_needs_a_recent_previous_snapshot(r: Redis, settings: Settings) -> None:
    await publish(r, DECISIONS, [decision() for _ in range(3)])
    moment = datetime.now(UTC)
    before = await live.snapshot(r, settings, now=moment)
    await publish(r, DECISIONS, [decision() for _ in range(5)])
    soon = await live.snapshot(r, settings, previous=before, now=moment + timedelta(seconds=0.5))
    stale = await live.snapshot(r, settings, previous=before, now=moment + timedelta(seconds=live.RATE_GAP_S + 1))
    assert streams_of(soon)["decision"]["rate"] == 10.0
    assert streams_of(stale)["decision"]["rate"] is None


async def test_an_unreachable_server_is_an_error_event_without_the_password(settings: Settings) -> None:
    unreachable = client("redis://:hunter2-web@127.0.0.1:1/0")
    try:
        data = await live.Feed(unreachable, settings)._read()
    finally:
        await unreachable.aclose()
    assert "ConnectionError" in data["error"]
    assert "hunter2" not in json.dumps(data)


def events_in(body: str) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in body.splitlines() if line.startswith("data: ")]


async def test_the_event_stream_sends_a_changing_snapshot_every_second(
    r: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "STREAM_S", 2.5)  # the stream ends by itself: the ASGI transport reads it whole
    await allow(r, settings)
    app = create_app(r, settings, None)

    async def flow() -> None:
        router = Router(r, settings)
        execution = Execution(r, settings, PaperExchange(r, quote_assets=settings.quote_assets))
        for _ in range(6):
            await asyncio.sleep(0.4)
            await publish(r, DECISIONS, [decision(qty="0.01") for _ in range(5)])
            await drain(router)
            await drain(execution)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://web") as web:
        response, _ = await asyncio.wait_for(asyncio.gather(web.get("/api/events"), flow()), timeout=20)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text.startswith(f"retry: {live.RETRY_MS}\n\n")
    events = events_in(response.text)
    assert 3 <= len(events) <= 5, len(events)
    lengths = [streams_of(event)["result"]["length"] for event in events]
    assert lengths == sorted(lengths)
    assert lengths[0] < lengths[-1]
    today = [event["trades"]["today"] for event in events]
    assert today == sorted(today)
    assert today[0] < today[-1]
    assert any(streams_of(event)["result"]["rate"] for event in events[1:])  # measured between ticks
    assert [event["t"] for event in events] == sorted({event["t"] for event in events})  # one snapshot per tick


async def asgi_events(app: Any, wanted: int) -> list[dict[str, Any]]:
    """One client of ``/api/events`` at the ASGI level that disconnects after ``wanted`` events; the events."""
    gone = asyncio.Event()
    body = b""
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal body
        if message["type"] == "http.response.body":
            body += message.get("body", b"")
            if body.count(b"data: ") >= wanted:
                gone.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/api/events", "raw_path": b"/api/events", "query_string": b"", "headers": [],
        "server": ("web", 80), "client": ("127.0.0.1", 40000), "root_path": "",
    }  # fmt: skip
    await app(scope, receive, send)
    return events_in(body.decode())


async def test_clients_share_one_read_per_tick_and_leave_nothing_running(r: Redis, settings: Settings) -> None:
    app = create_app(r, settings, None)
    feed = live.feed_of(app)
    loop = asyncio.get_running_loop()
    started = loop.time()
    seen = await asyncio.wait_for(asyncio.gather(*(asgi_events(app, 3) for _ in range(4))), timeout=20)

    assert [len(events) >= 3 for events in seen] == [True] * 4
    assert loop.time() - started < live.STREAM_S / 2  # each disconnect ended its response, long before its time
    assert feed.listeners == 0
    assert feed.reads <= 4, feed.reads  # four clients, three ticks: one read per tick
    await asyncio.sleep(0.05)
    assert not feed.running  # nobody listens: no more reads
    reads = feed.reads
    await asyncio.sleep(live.TICK_S * 1.5)
    assert feed.reads == reads

    # A new client starts the ticker again, and gets a fresh snapshot, not the last one kept.
    await set_kill(r, False)
    [event] = await asyncio.wait_for(asgi_events(app, 1), timeout=10)
    assert event["kill"]["value"] == "0"
    assert feed.reads == reads + 1


async def test_the_page_is_served_with_its_files(r: Redis, settings: Settings) -> None:
    app = create_app(r, settings, None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://web") as web:
        page = await web.get("/")
        script = await web.get("/static/app.js")
        style = await web.get("/static/style.css")
        schema = (await web.get("/api/openapi.json")).json()
    assert page.status_code == script.status_code == style.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'src="/static/app.js"' in page.text
    assert 'href="/static/style.css"' in page.text
    assert "EventSource" in script.text
    assert "/api/events" not in schema["paths"]  # an endless response: no fuzzer should call it
