"""Alerts: the pure core (what two looks make, the throttle), then the watcher on a real server,
delivering through Apprise to a local HTTP server that stands in for the webhooks.

No network: every endpoint is on 127.0.0.1 (a JSON webhook, a Mattermost server, and the Telegram
and Discord plugins with their fixed API address pointed at the local server).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from quantum_trader import keys
from quantum_trader.alerts import (
    CURSORS,
    Alert,
    AlertURL,
    Message,
    Notifier,
    Observation,
    Severity,
    Throttle,
    alert_urls,
    alerts_between,
    daily_summary,
    deliver,
    shown_url,
    watch,
)
from quantum_trader.alerts.core import (
    DailySummary,
    DeadLettered,
    FailedOrder,
    Reconciled,
    decode_stored,
    encode_levels,
)
from quantum_trader.alerts.delivery import Delivery
from quantum_trader.alerts.look import observe, store
from quantum_trader.alerts.urls import scrub, split_urls
from quantum_trader.bus import connection
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.embedded import EmbeddedValkey, free_port
from quantum_trader.errors import ConfigError
from quantum_trader.events import (
    EXECUTION_RESULT,
    ExecutionResult,
    Reason,
    StateChange,
    TradingState,
    envelope,
    now_iso,
)
from quantum_trader.settings import Settings
from tests.cli.test_commands import cli
from tests.conftest import LogTrap
from tests.journal.helpers import drain_journal
from tests.pipeline import decision
from tests.test_risk_gate import pipeline, trade

TOKEN = "hook-s3cret-4d9f1c"  # the secret part of every test URL: never in a log line or an output
RESULTS = "quantum:stream:execution.result"
NOW = 1_700_000_000.0


# ---------------------------------------------------------------- the pure core: alerts_between


def look(**changes: Any) -> Observation:
    base = Observation(at=NOW, day="2024-03-01", trading_allowed=True, kill_value="0", lag_limit=100)
    return Observation(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, **changes})


def change(state: TradingState, previous: TradingState, reason: str, detail: str = "") -> StateChange:
    return StateChange(state=state, previous=previous, reason=reason, detail=detail, by="execution-1", at=now_iso())


def failed(symbol: str = "ETHUSDT", reason: str = "EXCHANGE_UNAVAILABLE", n: int = 0) -> FailedOrder:
    return FailedOrder(f"{n}-0", symbol, "BUY", "0.1", reason, "binance did not answer in 10 s", f"{n}-1")


def test_the_first_look_only_records_where_things_stand() -> None:
    assert alerts_between(None, look(trading_allowed=False, failed=(failed(),))) == []


def test_the_kill_switch_turned_on_then_off() -> None:
    [on] = alerts_between(look(), look(trading_allowed=False, kill_value="1"))
    assert (on.key, on.severity) == ("kill:on", Severity.FAILURE)
    assert on.title == "Kill switch ON: no order is sent"
    assert "quantum:kill is '1'" in on.body
    assert "quantum-trader kill off" in on.body
    [absent] = alerts_between(look(), look(trading_allowed=False, kill_value=None))
    assert "quantum:kill is absent" in absent.body
    [off] = alerts_between(look(trading_allowed=False), look())
    assert (off.key, off.title, off.severity) == ("kill:off", "Kill switch OFF: trading allowed", Severity.SUCCESS)
    assert alerts_between(look(), look()) == []
    assert alerts_between(look(trading_allowed=None), look(trading_allowed=False)) == []  # not read before


def test_a_change_of_the_trading_state_and_a_breaker_trip() -> None:
    operator = change(TradingState.HALTED, TradingState.ACTIVE, Reason.OPERATOR, "maintenance")
    [alert] = alerts_between(look(), look(state_changes=(operator,)))
    assert (alert.key, alert.title, alert.severity) == (
        "state:HALTED", "Trading state HALTED (was ACTIVE)", Severity.FAILURE,
    )  # fmt: skip
    assert "OPERATOR: maintenance, by execution-1" in alert.body

    trip = change(TradingState.REDUCING, TradingState.ACTIVE, Reason.DAILY_LOSS, "realised loss 512 USDT >= 500")
    [breaker] = alerts_between(look(), look(state_changes=(trip,)))
    assert breaker.key == "breaker:DAILY_LOSS"
    assert breaker.title == "Breaker tripped (DAILY_LOSS): trading REDUCING"
    assert breaker.body.startswith("realised loss 512 USDT >= 500. Trading state ACTIVE -> REDUCING")
    assert "next UTC midnight" in breaker.body
    drawdown = change(TradingState.HALTED, TradingState.ACTIVE, Reason.DRAWDOWN, "equity 8.1% below its peak")
    [dd] = alerts_between(look(), look(state_changes=(drawdown,)))
    assert (dd.key, dd.severity) == ("breaker:DRAWDOWN", Severity.FAILURE)
    assert "until the operator resumes" in dd.body
    back = change(TradingState.ACTIVE, TradingState.REDUCING, Reason.DAY_RESET)
    [reset] = alerts_between(look(), look(state_changes=(back,)))
    assert (reset.key, reset.severity) == ("state:ACTIVE", Severity.SUCCESS)


def test_failed_orders_one_alert_per_symbol_and_reason() -> None:
    orders = (failed(n=1), failed(n=2), failed(n=3), failed("BTCUSDT", "EXCHANGE_ERROR", 4))
    eth, btc = alerts_between(look(), look(failed=orders))
    assert (eth.key, eth.title, eth.count) == (
        "failed:ETHUSDT:EXCHANGE_UNAVAILABLE", "3 orders FAILED on ETHUSDT (EXCHANGE_UNAVAILABLE)", 3,
    )  # fmt: skip
    assert "binance did not answer in 10 s (intent 1-1, result 1-0)" in eth.body
    assert (btc.title, btc.count) == ("Order FAILED: BUY 0.1 BTCUSDT (EXCHANGE_ERROR)", 1)


def test_new_dead_letters_one_alert_per_origin_with_the_reasons_counted() -> None:
    letters = tuple(
        DeadLettered(f"{n}-0", "quantum:stream:trade.intent", "missing envelope field(s): payload" if n else "boom")
        for n in range(3)
    )
    [alert] = alerts_between(look(), look(dead_letters=letters))
    assert (alert.key, alert.count, alert.severity) == ("dead_letter:quantum:stream:trade.intent", 3, Severity.WARNING)
    assert alert.title == "3 new dead letter(s) from quantum:stream:trade.intent"
    assert alert.body.startswith("2 x missing envelope field(s): payload; 1 x boom.")
    assert "quantum-trader dlq list" in alert.body


def test_a_reconciliation_difference_is_alerted_once_and_its_end_too() -> None:
    clean = Reconciled("t1", "paper", (), "")
    found = Reconciled("t2", "paper", ("BALANCE ETH",), "ETH: held 1.5, expected 0", "reconciliation found 1")
    [alert] = alerts_between(look(reconciled=clean), look(reconciled=found))
    assert (alert.key, alert.title) == ("reconcile:differences", "Reconciliation: 1 difference(s) with paper")
    assert "ETH: held 1.5, expected 0. The kill switch is on: reconciliation found 1." in alert.body
    again = Reconciled("t3", "paper", ("BALANCE ETH",), "ETH: held 1.5, expected 0")
    assert alerts_between(look(reconciled=found), look(reconciled=again)) == []  # the same differences
    more = Reconciled("t4", "paper", ("BALANCE BTC", "BALANCE ETH"), "BTC ...; ETH ...")
    assert len(alerts_between(look(reconciled=again), look(reconciled=more))) == 1
    [ok] = alerts_between(look(reconciled=more), look(reconciled=Reconciled("t5", "paper", (), "")))
    assert (ok.key, ok.severity) == ("reconcile:clean", Severity.SUCCESS)
    assert alerts_between(look(reconciled=found), look(reconciled=found)) == []  # the same report


def test_a_group_over_the_lag_limit_and_back_under() -> None:
    group = ("quantum:stream:trade.intent", "quantum:group:execution:trade.intent")
    [over] = alerts_between(look(), look(lagging={group: 25_000}))
    assert over.title == f"Lag: {group[1]} is 25,000 entries behind on {group[0]}"
    assert "QT_ALERT_LAG=100" in over.body
    assert alerts_between(look(lagging={group: 25_000}), look(lagging={group: 30_000})) == []
    [under] = alerts_between(look(lagging={group: 30_000}), look())
    assert (under.key, under.severity) == (f"lag-ok:{group[0]}:{group[1]}", Severity.SUCCESS)


def test_a_heartbeat_lost() -> None:
    before = look(heartbeats=frozenset({"router:router-h1", "execution:execution-h1"}))
    [lost] = alerts_between(before, look(heartbeats=frozenset({"router:router-h1"})))
    assert (lost.key, lost.title) == ("heartbeat:execution:execution-h1", "Heartbeat lost: execution (execution-h1)")
    assert "quantum-trader check execution" in lost.body
    assert alerts_between(look(), before) == []  # a service that starts is no alert


def test_the_daily_summary_at_the_day_change() -> None:
    summary = DailySummary(
        "2024-03-01", "journal", orders=12, fills=10, realised={"USDT": Decimal("-12.3400000001"), "BTC": Decimal(0)},
        fees={"USDT": Decimal("1.5")}, volume={"USDT": Decimal("25000.5")},
    )  # fmt: skip
    [alert] = alerts_between(look(), look(day="2024-03-02", summary=summary))
    assert (alert.key, alert.title, alert.severity) == (
        "summary:2024-03-01", "Daily summary 2024-03-01 (UTC)", Severity.INFO,
    )  # fmt: skip
    assert alert.body.splitlines() == [
        "Orders sent: 12; fills: 10",
        "Realised PnL: BTC +0, USDT -12.34",
        "Fees: USDT 1.5",
        "Volume: USDT 25000.5",
        "From the journal.",
    ]
    server = DailySummary("2024-03-01", "server", orders=None, realised={}, note="no journal database")
    [fallback] = alerts_between(look(), look(day="2024-03-02", summary=server))
    assert "Orders sent: unknown" in fallback.body
    assert "From the book's figures on the server (no journal database)." in fallback.body
    assert alerts_between(look(), look(summary=summary)) == []  # same day: none


def test_the_stored_look_round_trips_without_its_events() -> None:
    full = look(
        cursors={RESULTS: "5-0"},
        heartbeats=frozenset({"router:r1"}),
        lagging={("s", "g"): 500},
        reconciled=Reconciled("t", "paper", ("BALANCE ETH",), "ETH ...", "halted"),
        failed=(failed(),),
    )
    fields = {**full.cursors, "levels": encode_levels(full)}
    assert decode_stored(fields) == full.settled()
    assert decode_stored({}) is None
    assert decode_stored({"levels": "{not json"}) is None


# ---------------------------------------------------------------- the throttle


def alert(key: str, count: int = 1, severity: Severity = Severity.WARNING) -> Alert:
    return Alert(key, f"title {key}", f"body {key}", severity, count)


def test_the_same_key_at_most_once_per_interval_and_the_repeats_counted() -> None:
    throttle = Throttle(300)
    [first] = throttle.admit([alert("failed:ETHUSDT:X", 3)], NOW)
    assert first == Message("title failed:ETHUSDT:X", "body failed:ETHUSDT:X", Severity.WARNING, ("failed:ETHUSDT:X",))
    assert throttle.admit([alert("failed:ETHUSDT:X", 5)], NOW + 10) == []
    assert throttle.admit([alert("failed:ETHUSDT:X", 2)], NOW + 299) == []
    [repeat] = throttle.admit([], NOW + 300)
    assert repeat.title == "Repeated: title failed:ETHUSDT:X"
    assert repeat.body.startswith("7 more like this in the last 5 min. The latest: body failed:ETHUSDT:X")
    assert throttle.admit([], NOW + 900) == []  # nothing more happened
    assert len(throttle.admit([alert("failed:ETHUSDT:X")], NOW + 901)) == 1


def test_without_an_interval_every_alert_passes() -> None:
    throttle = Throttle(0, burst=10)
    assert len(throttle.admit([alert("a")], NOW)) == 1
    assert len(throttle.admit([alert("a")], NOW)) == 1


def test_a_burst_of_distinct_alerts_is_one_digest() -> None:
    throttle = Throttle(300, burst=3)
    burst = [alert(f"k{n}", severity=Severity.FAILURE if n == 7 else Severity.WARNING) for n in range(30)]
    [one] = throttle.admit(burst, NOW)
    assert one.title == "30 alerts (30 events)"
    assert one.severity is Severity.FAILURE
    assert one.body.splitlines()[:2] == ["- title k0", "- title k1"]
    assert one.body.splitlines()[-1] == "... and 10 more"
    assert len(one.keys) == 30


def test_alerts_over_the_window_wait_and_go_out_as_one_digest() -> None:
    throttle = Throttle(300, burst=3, window_s=60)
    sent = [throttle.admit([alert(f"k{n}")], NOW + n) for n in range(3)]
    assert [len(batch) for batch in sent] == [1, 1, 1]
    assert throttle.admit([alert("k3")], NOW + 10) == []
    assert throttle.admit([alert("k4"), alert("k5")], NOW + 20) == []
    [held] = throttle.admit([], NOW + 60)
    assert held.keys == ("k3", "k4", "k5")
    # The digest counts against the new window: two more fit, the third waits.
    assert len(throttle.admit([alert("k6"), alert("k7")], NOW + 61)) == 2
    assert throttle.admit([alert("k8")], NOW + 62) == []


# ---------------------------------------------------------------- URLs and their secrets


def test_a_url_is_shown_without_its_token() -> None:
    assert shown_url(f"json://127.0.0.1:8080/{TOKEN}") == "json://127.0.0.1:8080/***"
    assert shown_url(f"jsons://user:{TOKEN}@hooks.example.org/x?y=1") == "jsons://***@hooks.example.org/***"
    assert shown_url(f"tgram://123456789:{TOKEN}/42") == "tgram://***"
    assert shown_url(f"discord://1234/{TOKEN}") == "discord://***"
    assert shown_url(TOKEN) == "<not an Apprise URL>"
    assert repr(AlertURL(2, f"tgram://1:{TOKEN}/3")) == "AlertURL('#2 tgram://***')"
    assert str([AlertURL(1, f"discord://1/{TOKEN}")]).count(TOKEN) == 0
    said = f"Failed to send to https://api.telegram.org/bot123456789:{TOKEN}/sendMessage: error=404"
    assert TOKEN not in scrub(said, f"tgram://123456789:{TOKEN}/42")


def test_the_urls_are_split_on_commas_and_blanks() -> None:
    text = f" json://a/{TOKEN},tgram://1:2/3\n  mailto://u:p@x.org?to=a@x.org,b@x.org discord://4/5 "
    assert split_urls(text) == [
        f"json://a/{TOKEN}", "tgram://1:2/3", "mailto://u:p@x.org?to=a@x.org,b@x.org", "discord://4/5",
    ]  # fmt: skip


def secrets(path: Path, urls: str, mode: int = 0o600) -> Path:
    path.write_text(f"# alerts\nQT_ALERT_URLS={urls}\n", encoding="utf-8")
    os.chmod(path, mode)
    return path


def test_the_urls_come_from_the_secrets_file_only(
    tmp_path: Path, settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QT_ALERT_URLS", f"json://127.0.0.1:1/{TOKEN}")
    assert alert_urls(settings_for("redis://127.0.0.1:1")) == []  # not from the environment
    path = secrets(tmp_path / "secrets.env", f"json://127.0.0.1:1/{TOKEN}, tgram://123456789:{TOKEN}/42")
    urls = alert_urls(settings_for("redis://127.0.0.1:1", secrets_file=path))
    assert [url.shown for url in urls] == ["#1 json://127.0.0.1:1/***", "#2 tgram://***"]

    bad = secrets(tmp_path / "bad.env", f"json://127.0.0.1:1/{TOKEN} nosuchscheme://{TOKEN}")
    with pytest.raises(ConfigError) as refused:
        alert_urls(settings_for("redis://127.0.0.1:1", secrets_file=bad))
    assert "URL #2 nosuchscheme://*** is not one Apprise can use" in str(refused.value)
    assert TOKEN not in str(refused.value)

    loose = secrets(tmp_path / "loose.env", f"json://127.0.0.1:1/{TOKEN}", mode=0o644)
    with pytest.raises(ConfigError, match="other users can open it, so QT_MODE=testnet will not start"):
        alert_urls(settings_for("redis://127.0.0.1:1", secrets_file=loose, mode="testnet"))
    assert len(alert_urls(settings_for("redis://127.0.0.1:1", secrets_file=loose))) == 1  # paper: a warning


# ---------------------------------------------------------------- the notifier's queue, without a network


def test_a_slow_endpoint_never_blocks_submit_drops_the_oldest_and_says_so() -> None:
    gate = threading.Event()
    seen: list[Message] = []

    def slow(_url: AlertURL, message: Message, _timeout: float) -> Delivery:
        gate.wait(5)
        seen.append(message)
        return Delivery(True, 0.0)

    notifier = Notifier([AlertURL(1, "json://x")], 1.0, queue_size=3, send=slow)
    notifier.submit(Message("m0", "", Severity.INFO))
    deadline = time.monotonic() + 5
    while notifier.stats()[0].queued and time.monotonic() < deadline:
        time.sleep(0.005)  # the lane's thread has m0 in hand, waiting on the endpoint
    started = time.monotonic()
    for n in range(1, 10):
        notifier.submit(Message(f"m{n}", "", Severity.INFO))
    assert time.monotonic() - started < 0.05
    gate.set()
    asyncio.run(notifier.aclose(5))
    # m0 was being sent; m1..m6 were dropped for the newest three; the first after them says so.
    assert [m.title for m in seen] == ["m0", "m7", "m8", "m9"]
    assert "(6 earlier alert(s) dropped: this endpoint was too slow or unreachable)" in seen[1].body
    [stats] = notifier.stats()
    assert (stats.delivered, stats.dropped, stats.failed) == (4, 6, 0)


def test_a_failed_delivery_is_tried_once_more_then_logged(log_trap: LogTrap) -> None:
    calls: list[str] = []

    def failing(_url: AlertURL, message: Message, _timeout: float) -> Delivery:
        calls.append(message.title)
        return Delivery(False, 0.0, "connection refused")

    notifier = Notifier([AlertURL(1, f"json://127.0.0.1:1/{TOKEN}")], 1.0, retry_delay_s=0.01, send=failing)
    notifier.submit(Message("m", "", Severity.INFO))
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    asyncio.run(notifier.aclose(5))
    assert calls == ["m", "m"]
    assert notifier.stats()[0].failed == 1
    assert log_trap.lines("alert_delivery_failed")
    assert log_trap.lines("alert_not_delivered")
    assert "#1 json://127.0.0.1:1/***" in log_trap.lines("alert_not_delivered")[0]
    assert TOKEN not in log_trap.text()


# ---------------------------------------------------------------- a local webhook


@dataclass
class Hook:
    """A local HTTP server standing in for every webhook: records each request, may be slow or fail."""

    server: ThreadingHTTPServer
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    delay_s: float = 0.0
    reply: bytes = b'{"ok": true, "result": {}}'

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, scheme: str = "json") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/{TOKEN}"

    def messages(self) -> list[dict[str, Any]]:
        return [body for _path, body in list(self.requests)]


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    state = Hook(server)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if state.delay_s:
                time.sleep(state.delay_s)
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                payload = {"raw": body.decode("utf-8", "replace")}
            state.requests.append((self.path, payload))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.reply)))
            self.end_headers()
            self.wfile.write(state.reply)

        def log_message(self, *_args: Any) -> None:  # the request line holds the token
            return

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


async def eventually(check: Callable[[], Any], within_s: float = 10.0) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


class Watcher:
    """``alerts.watch`` running as a task of the test's loop, as ``run`` runs it."""

    def __init__(self, r: Redis, settings: Settings) -> None:
        self.r, self.settings = r, settings
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        before = await self.r.hget(CURSORS, "levels")
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(watch(self.r, self.settings, self.stop))
        # The first look records where things stand (or goes on from the stored one).
        for _ in range(500):
            if await self.r.hget(CURSORS, "levels") != before:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the watcher never stored a look")

    async def halt(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def watcher(
    r: Redis, clean_url: str, settings_for: Callable[..., Settings], tmp_path: Path, hook: Hook
) -> AsyncIterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(urls: str | None = None, **overrides: Any) -> Watcher:
        path = secrets(tmp_path / f"secrets{len(made)}.env", urls or hook.url())
        options = {"alert_check_s": 0.1, "alert_timeout_s": 0.5, **overrides}
        made.append(Watcher(r, settings_for(clean_url, secrets_file=path, **options)))
        return made[-1]

    yield make
    for one in made:
        await one.halt()


def failed_result(n: int, symbol: str = "ETHUSDT", reason: str = "EXCHANGE_UNAVAILABLE") -> dict[str, str]:
    result = ExecutionResult(
        status="FAILED", symbol=symbol, side="BUY", qty=Decimal("0.1"), intent_id=f"{n}-0",
        client_order_id=f"qt-{n}", reason=reason, detail="binance did not answer in 10 s",
    )  # fmt: skip
    return envelope(EXECUTION_RESULT, result, trace_id=f"t{n}", correlation_id=f"c{n}", source="execution")


# ---------------------------------------------------------------- the watcher on a real server


async def test_the_kill_switch_turned_on_is_one_alert_with_its_words(
    r: Redis, watcher: Callable[..., Watcher], hook: Hook, log_trap: LogTrap
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    one = watcher()
    await one.start()
    await r.set(keys.KILL_SWITCH, "1")
    assert await eventually(hook.messages)
    await asyncio.sleep(0.5)  # five more looks: nothing more
    [message] = hook.messages()
    assert message["title"] == "[paper] Kill switch ON: no order is sent"
    assert "quantum:kill is '1'" in message["message"]
    assert message["type"] == "failure"
    assert hook.requests[0][0] == f"/{TOKEN}"
    await one.halt()
    assert TOKEN not in log_trap.text()


async def test_a_breaker_tripped_by_the_pipeline_is_alerted_with_its_detail(
    r: Redis, watcher: Callable[..., Watcher], hook: Hook, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(
        clean_url, paper_balances={"USDT": Decimal(10_000)}, paper_fee_rate=Decimal(0), max_drawdown_pct=Decimal(5)
    )
    router, execution = await pipeline(r, settings)  # the kill switch off, the paper account funded
    one = watcher()
    await one.start()
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "2000")
    await trade(r, router, execution, decision(qty="2", price=None))
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "1740")  # 5.2 % below the peak: the drawdown breaker trips
    [refused] = await trade(r, router, execution, decision(qty="0.01", price=None))
    assert (refused["status"], refused["reason"]) == ("REJECTED", "REDUCING")
    assert await eventually(hook.messages)
    await asyncio.sleep(0.3)
    [message] = hook.messages()
    assert message["title"] == "[paper] Breaker tripped (DRAWDOWN): trading REDUCING"
    assert "% below its peak 10000.00" in message["message"]
    assert "Trading state ACTIVE -> REDUCING" in message["message"]


async def test_a_failed_order_is_alerted_and_a_restarted_watcher_sends_nothing_twice(
    r: Redis, watcher: Callable[..., Watcher], hook: Hook
) -> None:
    await r.set(keys.KILL_SWITCH, "0")
    one = watcher()
    await one.start()
    await r.xadd(RESULTS, failed_result(1))
    assert await eventually(hook.messages)
    [first] = hook.messages()
    assert first["title"] == "[paper] Order FAILED: BUY 0.1 ETHUSDT (EXCHANGE_UNAVAILABLE)"
    assert "binance did not answer in 10 s" in first["message"]
    await r.set(keys.KILL_SWITCH, "1")
    assert await eventually(lambda: len(hook.messages()) == 2)
    await one.halt()

    await r.xadd(RESULTS, failed_result(2, "BTCUSDT"))  # while no watcher runs
    again = watcher()  # a new process: a fresh throttle, the stored cursors and levels
    await again.start()
    assert await eventually(lambda: len(hook.messages()) >= 3)
    await asyncio.sleep(0.5)
    titles = [m["title"] for m in hook.messages()]
    assert titles == [
        first["title"],
        "[paper] Kill switch ON: no order is sent",
        "[paper] Order FAILED: BUY 0.1 BTCUSDT (EXCHANGE_UNAVAILABLE)",
    ]


async def test_a_heartbeat_that_expires_is_alerted(r: Redis, watcher: Callable[..., Watcher], hook: Hook) -> None:
    stream, group = "quantum:stream:trade.intent", "quantum:group:execution:trade.intent"
    await r.xgroup_create(stream, group, id="0", mkstream=True)
    await r.xreadgroup(group, "execution-h1", {stream: ">"}, count=1)  # the consumer joins its group
    await r.set(keys.heartbeat(keys.EXECUTION, "execution-h1"), "{}", px=600)
    one = watcher()
    await one.start()
    assert await eventually(hook.messages)
    [message] = hook.messages()
    assert message["title"] == "[paper] Heartbeat lost: execution (execution-h1)"
    assert "quantum-trader check execution" in message["message"]


async def test_an_unreachable_server_is_one_alert_and_its_return_another(
    valkey_factory: Callable[..., EmbeddedValkey],
    settings_for: Callable[..., Settings],
    tmp_path: Path,
    hook: Hook,
) -> None:
    server = valkey_factory()
    client = connection.client(server.url)
    path = secrets(tmp_path / "secrets.env", hook.url())
    one = Watcher(client, settings_for(server.url, secrets_file=path, alert_check_s=0.1, alert_timeout_s=0.5))
    try:
        await one.start()
        server.stop()
        assert await eventually(hook.messages)
        [down] = hook.messages()
        assert down["title"] == "[paper] Alerts cannot read the server"
        assert down["message"].startswith("3 looks in a row failed")
        server.start()
        assert await eventually(lambda: len(hook.messages()) == 2)
        assert hook.messages()[1]["title"] == "[paper] Alerts read the server again"
    finally:
        await one.halt()
        await client.aclose()


async def test_an_alert_storm_is_a_couple_of_messages(r: Redis, watcher: Callable[..., Watcher], hook: Hook) -> None:
    one = watcher()
    await one.start()
    symbols = ["ETHUSDT", "BTCUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT"]
    for batch in range(4):  # 100 FAILED results over several looks, five symbols
        async with r.pipeline(transaction=True) as pipe:  # a look sees all 25 or none
            for n in range(25):
                pipe.xadd(RESULTS, failed_result(batch * 25 + n, symbols[n % 5]))
            await pipe.execute()
        await asyncio.sleep(0.15)
    await asyncio.sleep(0.5)
    messages = hook.messages()
    assert 1 <= len(messages) <= 2, [m["title"] for m in messages]
    assert "orders FAILED on" in messages[0]["message"]
    assert messages[0]["title"].startswith("[paper] 5 alerts")


async def test_the_daily_summary_goes_out_at_the_day_change(
    r: Redis, watcher: Callable[..., Watcher], hook: Hook
) -> None:
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    await r.set(keys.daily_trades(yesterday), "7")
    await r.hset(keys.risk_realised(yesterday), mapping={"USDT": "-41.5000000001", "BTC": "0.002"})
    # The last look was taken yesterday (a watcher stopped before midnight).
    settings = watcher().settings
    await store(r, (await observe(r, settings, None, now=datetime.now(UTC) - timedelta(days=1))))
    one = watcher()
    await one.start()
    assert await eventually(hook.messages)
    [message] = hook.messages()
    assert message["title"] == f"[paper] Daily summary {yesterday.isoformat()} (UTC)"
    assert message["message"].splitlines()[:2] == ["Orders sent: 7", "Realised PnL: BTC +0.002, USDT -41.5"]
    assert "From the book's figures on the server (no journal database)." in message["message"]


async def test_a_dead_and_a_slow_endpoint_delay_nothing(
    r: Redis, watcher: Callable[..., Watcher], hook: Hook, log_trap: LogTrap
) -> None:
    dead = f"json://127.0.0.1:{free_port()}/{TOKEN}"  # nothing listens: connection refused
    slow = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    slow_hook = Hook(slow, delay_s=3.0)  # answers after 3 s, the timeout is 0.5 s

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(slow_hook.delay_s)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            return

    slow.RequestHandlerClass = Slow
    slow.daemon_threads = True
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    try:
        one = watcher(f"{dead} {slow_hook.url()} {hook.url()}")
        await r.set(keys.KILL_SWITCH, "0")
        await one.start()
        looks: list[float] = []
        lags: list[float] = []
        pipeline_ops: list[float] = []

        async def sample(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                tick = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - tick - 0.01)
                levels = await r.hget(CURSORS, "levels")
                at = json.loads(levels)["at"]
                if not looks or at != looks[-1]:
                    looks.append(at)
                began = time.monotonic()
                await r.xadd("quantum:stream:probe", {"n": "1"})  # the pipeline's own kind of work
                await r.get(keys.KILL_SWITCH)
                pipeline_ops.append(time.monotonic() - began)

        sampling = asyncio.create_task(sample(3.0))
        for n in range(2):  # each keeps the slow lane busy 2 s (two attempts of 0.5 s, a retry after 1 s)
            await r.xadd(RESULTS, failed_result(n, f"S{n}USDT"))
            await asyncio.sleep(0.3)
        await r.set(keys.KILL_SWITCH, "1")
        await sampling
        # The good endpoint got its alerts while the others were failing.
        assert any("Kill switch ON" in m["title"] for m in hook.messages())
        periods = [b - a for a, b in itertools.pairwise(looks)]
        assert len(periods) >= 15, periods
        assert max(periods) < 0.3, periods  # QT_ALERT_CHECK_S=0.1; a blocked loop would take >= 0.5
        assert max(lags) < 0.1, max(lags)
        assert sorted(pipeline_ops)[len(pipeline_ops) // 2] < 0.02
        failures = log_trap.lines("alert_delivery_failed")
        assert any("(Connection refused)" in line for line in failures)
        assert any("timed out" in line for line in failures)
        await one.halt()
    finally:
        slow.shutdown()
        slow.server_close()
    assert TOKEN not in log_trap.text()


# ---------------------------------------------------------------- other plugins on the local server


def test_telegram_discord_and_mattermost_plugins_post_to_the_local_server(
    hook: Hook, monkeypatch: pytest.MonkeyPatch, log_trap: LogTrap
) -> None:
    # Telegram's and Discord's API addresses are fixed in Apprise (no host in their URLs): the
    # test points the plugins at the local server. Mattermost takes its host from the URL.
    from apprise.plugins.discord import NotifyDiscord
    from apprise.plugins.telegram import NotifyTelegram

    base = f"http://127.0.0.1:{hook.port}"
    monkeypatch.setattr(NotifyTelegram, "notify_url", f"{base}/bot")
    monkeypatch.setattr(NotifyDiscord, "notify_url", f"{base}/api/webhooks")
    message = Message("[paper] Kill switch ON: no order is sent", "quantum:kill is '1'", Severity.FAILURE)
    urls = [
        AlertURL(1, f"tgram://123456789:{TOKEN}/424242"),
        AlertURL(2, f"discord://987654321/{TOKEN}"),
        AlertURL(3, f"mmost://127.0.0.1:{hook.port}/{TOKEN}"),
    ]
    done = [deliver(url, message, 2.0) for url in urls]
    assert [d.ok for d in done] == [True, True, True], [d.reason for d in done]
    paths = [path for path, _body in hook.requests]
    assert paths == [
        f"/bot123456789:{TOKEN}/sendMessage",
        f"/api/webhooks/987654321/{TOKEN}",
        f"/hooks/{TOKEN}",
    ]
    telegram, discord, mattermost = hook.messages()
    assert "Kill switch ON" in telegram["text"]
    assert str(telegram["chat_id"]) == "424242"
    assert "Kill switch ON" in json.dumps(discord)
    assert "Kill switch ON" in mattermost["text"]
    assert TOKEN not in log_trap.text()


def test_a_refused_delivery_says_why_without_the_url(log_trap: LogTrap) -> None:
    url = AlertURL(1, f"json://127.0.0.1:{free_port()}/{TOKEN}")
    done = deliver(url, Message("t", "b", Severity.INFO), 1.0)
    assert not done.ok
    assert done.reason
    assert TOKEN not in done.reason
    assert TOKEN not in log_trap.text()


# ---------------------------------------------------------------- the daily summary's sources


async def test_the_summary_comes_from_the_journal_else_from_the_server(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    from quantum_trader.journal.stage import Journal

    settings = settings_for(clean_url, paper_balances={"USDT": Decimal(10_000)}, paper_fee_rate=Decimal("0.001"))
    router, execution = await pipeline(r, settings)
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "2000")
    await trade(r, router, execution, decision(qty="1", price=None))
    await r.hset(keys.PRICE_HASH, "ETHUSDT", "2100")
    await trade(r, router, execution, decision(side="SELL", qty="1", price=None))
    today = datetime.now(UTC).date()

    none_yet = await daily_summary(r, settings, today)  # no journal has run: its database does not exist
    assert (none_yet.source, none_yet.orders, none_yet.note) == ("server", 2, "no journal database")
    assert none_yet.realised["USDT"] == Decimal("95.9")  # 2100 - 2000 - fees 2 and 2.1
    assert not (settings.data_dir / "journal.sqlite3").exists()

    journal = await Journal.open(r, settings)
    try:
        await drain_journal(journal)
    finally:
        journal.close()
    summary = await daily_summary(r, settings, today)
    assert (summary.source, summary.orders, summary.fills) == ("journal", 2, 2)
    assert summary.realised == {"USDT": Decimal("95.9")}
    assert summary.fees == {"USDT": Decimal("4.1")}
    assert summary.volume == {"USDT": Decimal("4100")}
    assert (await daily_summary(r, settings, date(2001, 1, 1))).fills == 0

    away = settings_for(clean_url, database_url=f"postgresql+psycopg://qt:pw@127.0.0.1:{free_port()}/journal")
    fallback = await daily_summary(r, away, today)
    assert (fallback.source, fallback.orders) == ("server", 2)
    assert fallback.note.startswith("the journal could not be read")
    assert "pw@" not in fallback.note


# ---------------------------------------------------------------- quantum-trader alerts test


def test_the_test_command_reports_each_url(clean_url: str, tmp_path: Path, hook: Hook) -> None:
    dead_port = free_port()
    path = secrets(tmp_path / "secrets.env", f"{hook.url()},json://127.0.0.1:{dead_port}/{TOKEN}")
    done = cli(clean_url, "alerts", "test", QT_SECRETS_FILE=str(path), QT_ALERT_TIMEOUT_S="2")
    assert done.returncode == 1, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith(f"#1 json://127.0.0.1:{hook.port}/***  delivered")
    assert second.startswith(f"#2 json://127.0.0.1:{dead_port}/***  FAILED: ")
    assert TOKEN not in done.stdout + done.stderr
    [message] = hook.messages()
    assert message["title"] == "[paper] Test alert"

    good = secrets(tmp_path / "good.env", hook.url())
    as_json = cli(clean_url, "alerts", "test", "--json", QT_SECRETS_FILE=str(good))
    assert as_json.returncode == 0, as_json.stderr
    [row] = json.loads(as_json.stdout)
    assert (row["url"], row["delivered"]) == (f"#1 json://127.0.0.1:{hook.port}/***", True)

    none = cli(clean_url, "alerts", "test")
    assert none.returncode == 2
    assert "no alert URLs" in none.stderr
