"""proof: snapshots around a real pipeline run, and the Markdown report's deltas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import publish
from quantum_trader.exchanges.paper import PaperExchange
from quantum_trader.execution import Execution
from quantum_trader.ops.proof import find, report, take
from quantum_trader.router import Router
from quantum_trader.settings import Settings
from tests.pipeline import decision, drain


async def test_report_shows_what_a_run_did_between_two_snapshots(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0)
    settings = settings_for(clean_url, block_ms=10, paper_balances={"USDT": Decimal(100_000)})
    await r.set(keys.KILL_SWITCH, "0")
    router = Router(r, settings)
    paper = PaperExchange(r, quote_assets=settings.quote_assets, starting_balances=settings.paper_balances)
    execution = Execution(r, settings, paper)
    await router.consumer.setup()
    await execution.consumer.setup()
    await publish(r, "quantum:stream:ai.decision", [decision(qty="0.01") for _ in range(30)])
    await drain(router)  # 30 intents now wait for execution: lag 30
    before = await take(r, settings, "before", now=t0)

    await paper.fund()
    await drain(execution)
    after = await take(r, settings, "after", now=t0 + timedelta(seconds=10))

    text = report(before, after)
    intent_row = next(line for line in text.splitlines() if line.startswith("| quantum:stream:trade.intent | quantum:"))
    cells = [cell.strip() for cell in intent_row.strip("|").split("|")]
    assert cells[2:9] == ["30", "0", "-30", "0", "0", "30", "3.0"]  # lag before/after/change, pending, processed, /s
    result_row = next(line for line in text.splitlines() if line.startswith("| quantum:stream:execution.result |"))
    assert [cell.strip() for cell in result_row.strip("|").split("|")][5:7] == ["+30", "3.0"]
    assert f"| daily trades ({t0.date()}) | 0 / 1,000,000 | 30 / 1,000,000 |" in text
    assert (await find(r, "before"))["taken_at"] == before["taken_at"]


def test_cli_snapshot_to_file_and_report(clean_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": clean_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quantum_trader", *args], env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    assert cli("proof", "snapshot", "--label", "before", "--out", str(tmp_path / "before.json")).returncode == 0
    assert cli("kill", "off").returncode == 0
    assert cli("proof", "snapshot", "--label", "after").returncode == 0
    done = cli("proof", "report", str(tmp_path / "before.json"), "after", "--out", str(tmp_path / "proof.md"))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "proof.md").read_text()
    assert "| kill switch | None | '0' |" in text
    assert json.loads((tmp_path / "before.json").read_text())["label"] == "before"
    missing = cli("proof", "report", "nope", "after")
    assert missing.returncode == 2
    assert "no snapshot labelled 'nope'" in missing.stderr
