"""`quantum-trader run` with QT_RUN_WEB, QT_METRICS_PORT and QT_ALERT_URLS: the dashboard and API, the metrics
and the alerts from one process, while decisions flow; the kill switch through the API halts trading and is heard."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx

from quantum_trader.bus.connection import Redis
from quantum_trader.bus.embedded import free_port
from tests.pipeline import decision, results
from tests.test_alerts import TOKEN as ALERT_TOKEN
from tests.test_alerts import Hook, hook  # noqa: F401  (the local webhook fixture)

TOKEN = "f" * 40
DECISIONS = "quantum:stream:ai.decision"


async def until(check: object, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if await check():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("not within the time allowed")


async def test_run_serves_the_dashboard_exports_metrics_and_alerts_a_local_endpoint(
    r: Redis,
    clean_url: str,
    tmp_path: Path,
    hook: Hook,  # noqa: F811
) -> None:
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"QT_WEB_TOKEN={TOKEN}\nQT_ALERT_URLS={hook.url()}\n")
    secrets.chmod(0o600)
    web_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {
        "QT_REDIS_URL": clean_url,
        "QT_DATA_DIR": str(tmp_path / "data"),
        "QT_SECRETS_FILE": str(secrets),
        "QT_RUN_WEB": "true",
        "QT_WEB_PORT": str(web_port),
        "QT_METRICS_PORT": str(metrics_port),
        "QT_ALERT_CHECK_S": "0.2",
        "QT_ALERT_INTERVAL_S": "0",
        "QT_LOG_LEVEL": "warning",
        "QT_BLOCK_MS": "50",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quantum_trader", "run", "--stages", "router,execution", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    web = httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=5)
    try:
        await until(lambda: _ok(web.get("/api/health")))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await web.post("/api/kill-switch", json={"on": False})).status_code == 401
        assert (await web.post("/api/kill-switch", json={"on": False}, headers=auth)).status_code == 200
        for n in range(5):
            await r.xadd(DECISIONS, decision(qty="0.01", corr=f"c{n}"))  # type: ignore[arg-type]
        await until(lambda: _count(r, 5))
        assert {o["status"] for o in await results(r)} == {"FILLED"}

        # Metrics: the process's counters on its own port and on the web server, the server's state with them.
        for url in (f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{web_port}/metrics/"):
            text = (await web.get(url)).text
            assert 'quantum_trader_outcomes_total{reason="",stage="execution",status="FILLED"} 5.0' in text
            assert "quantum_trader_up 1.0" in text

        # The kill switch through the API halts trading, and the local endpoint hears of it.
        assert (await web.post("/api/kill-switch", json={"on": True}, headers=auth)).json()["trading_allowed"] is False
        await r.xadd(DECISIONS, decision(qty="0.01", corr="after"))  # type: ignore[arg-type]
        await until(lambda: _count(r, 6))
        assert (await results(r))[-1]["reason"] == "KILL_SWITCH"
        await until(lambda: _heard(hook, "kill switch"), within_s=15)
    finally:
        await web.aclose()
        process.terminate()
        _out, err = await process.communicate()
    assert process.returncode == 0, err.decode()[-2000:]
    assert TOKEN not in err.decode()  # neither the web token nor the alert URL's token in a log line
    assert ALERT_TOKEN not in err.decode()


async def _ok(response: object) -> bool:
    return (await response).status_code == 200  # type: ignore[misc, no-any-return]


async def _count(r: Redis, n: int) -> bool:
    return len(await results(r)) >= n


async def _heard(hook: Hook, words: str) -> bool:  # noqa: F811
    return any(words in str(message).lower() for message in hook.messages())
