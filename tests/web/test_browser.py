"""The dashboard in a real browser: Debian's headless Chromium against a real web server, pipeline and Valkey.

``quantum-trader web`` serves the page with the token from a secrets file (mode 0600); router,
execution and the journal run as one ``quantum-trader run`` process. While decisions flow the
page's figures move without a reload, and the journaled exits draw the realised-PnL chart. The
kill switch refuses a click without the token and with a wrong one; with the right one it halts
trading, and the next decision ends REJECTED KILL_SWITCH.

The screenshot is saved under the test's temporary directory, or where ``QT_TEST_SCREENSHOT``
says (``QT_TEST_SCREENSHOT=docs/dashboard.png`` renews the README's picture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from quantum_trader import keys
from quantum_trader.bus.embedded import free_port
from tests.conftest import TEST_SECRETS
from tests.pipeline import decision

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-test-token-0123456789abcdef"
DECISIONS = "quantum:stream:ai.decision"
RESULTS = "quantum:stream:execution.result"
CONSUMER = "web-test"
WAIT_MS = 20_000  # a loaded two-core machine: generous, each wait ends as soon as the page shows it


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    return CHROMIUM


def stage_env(url: str, data: Path) -> dict[str, str]:
    """The environment of a process of the product on the test's server and data directory (the journal's
    SQLite file), none of the caller's QT_ settings."""
    return {name: value for name, value in os.environ.items() if not name.startswith("QT_")} | {
        "QT_REDIS_URL": url,
        "QT_DATA_DIR": str(data),
        "QT_BLOCK_MS": "50",
        "QT_HEARTBEAT_S": "0.5",
        "QT_LOG_LEVEL": "warning",
        "QT_CONSUMER": CONSUMER,
        "QT_PAPER_BALANCES": "USDT=100000",
        "QT_DAILY_LIMIT": "1000",
    }


@contextmanager
def started(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m quantum_trader ARGS`` for the block's duration; SIGTERM (then SIGKILL) at its end."""
    process = subprocess.Popen([sys.executable, "-m", "quantum_trader", *args], env=env)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def web(clean_url: str, tmp_path: Path) -> Iterator[str]:
    """``quantum-trader web`` on a free port, its token in a secrets file (0600); the page's base URL."""
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"QT_WEB_TOKEN={TOKEN}\n")
    secrets.chmod(0o600)
    TEST_SECRETS.add(TOKEN)  # the log trap fails the test if the token shows up in any log line or output
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = stage_env(clean_url, tmp_path / "data") | {"QT_SECRETS_FILE": str(secrets)}
    with started("web", "--port", str(port), env=env) as process:

        def answers() -> bool:
            assert process.poll() is None, "quantum-trader web exited"
            try:
                return httpx.get(f"{base}/api/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, "the web server to answer")
        yield base


STAGES = (keys.ROUTER, keys.EXECUTION, keys.JOURNAL)


@pytest.fixture
def pipeline(clean_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Router, execution and the journal in one process, on the test's server; ready once each has beaten."""
    with started("run", "--stages", ",".join(STAGES), env=stage_env(clean_url, tmp_path / "data")) as process:
        r = redis.Redis.from_url(clean_url, decode_responses=True)
        try:

            def beating() -> bool:
                assert process.poll() is None, "quantum-trader run exited"
                return all(r.exists(keys.heartbeat(stage, CONSUMER)) for stage in STAGES)

            wait_for(beating, "router, execution and the journal to start")  # the journal has migrated its file
        finally:
            r.close()
        yield process


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = WAIT_MS / 1000) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def outcome(r: redis.Redis, trace: str) -> dict[str, Any] | None:
    """The result of the decision with this trace id, once written."""
    for _entry_id, fields in r.xrevrange(RESULTS, count=50):
        if fields["trace_id"] == trace:
            payload: dict[str, Any] = json.loads(fields["payload"])
            return payload
    return None


def test_the_dashboard_follows_the_pipeline_and_its_kill_switch_needs_the_token(
    chromium: Path, clean_url: str, web: str, pipeline: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    r = redis.Redis.from_url(clean_url, decode_responses=True)
    r.set(keys.KILL_SWITCH, "0")
    r.hset(keys.PRICE_HASH, mapping={"ETHUSDT": "3000", "BTCUSDT": "60000"})
    expect.set_options(timeout=WAIT_MS)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium))
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(web)
            expect(page.locator("#conn")).to_have_text("live")
            expect(page.locator("#kill-state")).to_have_text("OFF")
            expect(page.locator("#trading-state")).to_have_text("ACTIVE")
            expect(page.locator("#equity-empty")).to_have_text("no journal data")
            page.evaluate("window.sameDocument = true")  # gone if the page reloads

            # Decisions flow: the figures move on the page, from the event stream alone.
            def number(selector: str) -> int:
                return int(page.locator(selector).inner_text().replace(",", "").strip("–") or 0)

            lengths, rates = {number("#stream-result-length")}, set()
            for batch in range(6):
                r.xadd(DECISIONS, decision("ETHUSDT" if batch % 2 else "BTCUSDT", qty="0.01", strategy="ema-cross"))
                r.xadd(DECISIONS, decision("ETHUSDT", qty="0.02", strategy="rsi"))
                for _ in range(6):
                    time.sleep(0.1)
                    lengths.add(number("#stream-result-length"))
                    rates.add(page.locator("#stream-decision-rate").inner_text())
            expect(page.locator("#stream-result-length")).to_have_text("12")
            assert len(lengths) >= 3, f"the result count did not move while decisions flowed: {sorted(lengths)}"
            assert rates - {"–", "0.0"}, f"no decision rate shown while decisions flowed: {rates}"
            expect(page.locator("#stream-decision-length")).to_have_text("12")
            expect(page.locator("#trades-today")).to_have_text("12")
            expect(page.locator("#trades-limit")).to_have_text("1,000")
            expect(page.locator("#stage-execution-lag")).to_have_text("0")
            expect(page.locator("#results tbody tr")).to_have_count(10)
            expect(page.locator("#results tbody tr").first.locator(".status")).to_have_text("FILLED")
            expect(page.locator("#positions tbody tr[data-symbol=ETHUSDT] td").nth(1)).to_have_text("0.15")
            # Two exits at other prices: the journal records them, the chart draws the realised PnL.
            for price, qty in (("3150", "0.05"), ("2980", "0.04")):
                r.hset(keys.PRICE_HASH, "ETHUSDT", price)
                r.xadd(DECISIONS, decision("ETHUSDT", side="SELL", qty=qty, price=price, strategy="rsi"))
                time.sleep(0.3)
            expect(page.locator("#stream-result-length")).to_have_text("14")
            expect(page.locator("#positions tbody tr[data-symbol=ETHUSDT] td").nth(1)).to_have_text("0.06")
            expect(page.locator("#equity-chart polyline")).to_have_count(1)
            expect(page.locator("#equity-empty")).to_be_hidden()
            expect(page.locator("#equity-chart .legend")).to_contain_text("USDT")
            # A refused decision shows with its reason.
            r.xadd(DECISIONS, decision("ETHUSDT", side="HOLD", qty="1"))
            expect(page.locator("#rejections tbody tr").first).to_contain_text("INVALID")
            assert page.evaluate("window.sameDocument") is True

            # Without the token, and with a wrong one: refused, the switch unchanged.
            page.click("#kill-on")
            expect(page.locator("#action-message")).to_have_text("refused: token missing or wrong")
            page.fill("#token", "not-the-token-at-all-0000")
            page.click("#token-save")
            page.click("#kill-on")
            expect(page.locator("#action-message")).to_have_text("refused: token missing or wrong")
            assert r.get(keys.KILL_SWITCH) == "0"
            expect(page.locator("#kill-state")).to_have_text("OFF")

            # With the token: trading halts, and the next decision is refused by the switch.
            page.fill("#token", TOKEN)
            page.click("#token-save")
            expect(page.locator("#token-status")).to_have_text("token set for this tab")
            page.click("#kill-on")
            expect(page.locator("#action-message")).to_have_text("kill switch ON: nothing is sent")
            assert r.get(keys.KILL_SWITCH) == "1"
            expect(page.locator("#kill-state")).to_have_text("ON")
            halted = decision("ETHUSDT", qty="0.01")
            r.xadd(DECISIONS, halted)
            result = wait_for(lambda: outcome(r, halted["trace_id"]), "the decision's result")
            assert (result["status"], result["reason"]) == ("REJECTED", "KILL_SWITCH")
            first = page.locator("#results tbody tr").first
            expect(first).to_contain_text("KILL_SWITCH")
            expect(first.locator(".status")).to_have_text("REJECTED")

            # The trading state asks for a reason, and shows who set it.
            page.once("dialog", lambda dialog: dialog.accept("rebalancing before the close"))
            page.click("#state-reducing")
            expect(page.locator("#trading-state")).to_have_text("REDUCING")
            expect(page.locator("#trading-detail")).to_contain_text("rebalancing before the close")
            assert r.hget(keys.TRADING_STATE, "state") == "REDUCING"

            shot = Path(os.environ.get("QT_TEST_SCREENSHOT") or tmp_path / "dashboard.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            page.close()  # its event stream ends with it: the server stops at once
        finally:
            browser.close()
            r.close()
