"""`decide`: checked by the router's rules before it is published; `--wait` prints the outcome."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quantum_trader.bus.connection import Redis
from tests.cli.test_commands import cli

DECISIONS = "quantum:stream:ai.decision"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--qty", "-1"], "qty"),
        (["--qty", "0"], "qty"),
        (["--qty", "abc"], "qty"),
        (["--qty", "nan"], "qty"),
        (["--side", "HOLD"], "side"),
        (["--symbol", ""], "symbol"),
        (["--symbol", "USDTUSDT"], "symbol"),
        (["--price", "-3"], "price"),
    ],
)
async def test_a_decision_the_router_would_reject_is_not_published(
    r: Redis, clean_url: str, args: list[str], named: str
) -> None:
    base = {"--symbol": "ETHUSDT", "--side": "BUY", "--qty": "0.1", "--price": "3000"}
    base[args[0]] = args[1]
    done = cli(clean_url, "decide", *[part for pair in base.items() for part in pair])
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: not published:")
    assert named in done.stderr
    assert "Traceback" not in done.stderr
    assert await r.xlen(DECISIONS) == 0


def env(url: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": url}


def decide_and_wait(url: str, *extra: str) -> subprocess.Popen[str]:
    args = ["decide", "--symbol", "ETHUSDT", "--side", "BUY", "--qty", "0.01", "--price", "3000", "--wait", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "quantum_trader", *args], env=env(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def pipeline(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "quantum_trader", "run", "--duration", "30"],
        env=env(url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kill", "code", "printed"),
    [
        ("off", 0, "FILLED BUY 0.01 ETHUSDT at 3000 (fee "),
        ("on", 1, "REJECTED KILL_SWITCH"),  # halted: execution rejects the intent, with its reason
    ],
)
def test_wait_prints_the_outcome_and_exits_by_it(clean_url: str, kill: str, code: int, printed: str) -> None:
    assert cli(clean_url, "kill", kill).returncode == 0
    runner = pipeline(clean_url)
    try:
        waiting = decide_and_wait(clean_url, "--timeout", "25")
        out, err = waiting.communicate(timeout=40)
        assert waiting.returncode == code, out + err
        assert printed in out
    finally:
        runner.terminate()
        runner.wait(timeout=30)


def test_wait_without_a_pipeline_gives_up_with_exit_three(clean_url: str) -> None:
    waiting = decide_and_wait(clean_url, "--timeout", "1")
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 3, out + err
    assert "no outcome" in err
    assert "is the pipeline running" in err
