"""The command line on a real Valkey Cluster (``QT_REDIS_URL=redis+cluster://...``).

`run` with partitions, a decision by hand waited for, the kill switch, the trading state,
`status`, `recover` and `doctor`, each as an operator types it, against the 3-primary,
3-replica cluster of ``tests/cluster.py``. On a cluster every key and stream carries the
hash tag ``{quantum}``, and the commands name them so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from quantum_trader import keys
from tests.cluster import ValkeyCluster


def cli(url: str, data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args],
        env=base | {"QT_REDIS_URL": url, "QT_DATA_DIR": str(data_dir), "QT_LOG_FORMAT": "json"} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_operator_trades_on_a_cluster_from_the_command_line(cluster: ValkeyCluster, tmp_path: Path) -> None:
    url, data = cluster.url, tmp_path / "data"
    partitions = {"QT_PARTITIONS": "2", "QT_PAPER_BALANCES": "USDT=10000"}
    assert cli(url, data, "kill", "off").returncode == 0
    status = cli(url, data, "kill", "status")
    assert status.returncode == 0
    assert status.stdout.startswith("{quantum}:kill = '0': trading ALLOWED")

    runner = subprocess.Popen(
        [sys.executable, "-m", "quantum_trader", "run", "--duration", "20"],
        env={k: v for k, v in os.environ.items() if not k.startswith("QT_")}
        | {"QT_REDIS_URL": url, "QT_DATA_DIR": str(data), "QT_LOG_FORMAT": "json", **partitions},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        bought = cli(url, data, "decide", "--symbol", "ETHUSDT", "--side", "BUY", "--qty", "0.01",
                     "--price", "3000", "--wait", "--timeout", "15", **partitions)  # fmt: skip
        assert bought.returncode == 0, bought.stdout + bought.stderr
        assert "FILLED BUY 0.01 ETHUSDT" in bought.stdout
        assert "{quantum}:stream:ai.decision" in bought.stdout

        shown = cli(url, data, "status", **partitions)
        assert shown.returncode == 0, shown.stderr
        for k in range(2):
            assert f"partition {k} ({{quantum}}:stream:trade.intent:{{p{k}}}): held by" in shown.stdout

        assert cli(url, data, "kill", "on").returncode == 0
        halted = cli(url, data, "decide", "--symbol", "ETHUSDT", "--side", "SELL", "--qty", "0.01",
                     "--price", "3000", "--wait", "--timeout", "15", **partitions)  # fmt: skip
        assert halted.returncode == 1
        assert "KILL_SWITCH" in halted.stdout
        assert cli(url, data, "kill", "off").returncode == 0

        reducing = cli(url, data, "state", "REDUCING", "--reason", "cluster drill")
        assert reducing.returncode == 0, reducing.stderr
        assert cli(url, data, "state").stdout.startswith("REDUCING")
        assert cli(url, data, "state", "ACTIVE", "--reason", "done").returncode == 0
    finally:
        runner.terminate()
        _, errors = runner.communicate(timeout=30)
    assert runner.returncode == 0, errors[-2000:]
    assert not [line for line in errors.splitlines() if '"level": "error"' in line]

    # What the commands wrote is where a single-server deployment has it, under the cluster's names.
    with cluster.client(cluster.primary_for(keys.cluster_name(keys.KILL_SWITCH))) as node:
        assert node.get("{quantum}:kill") == "0"
        assert node.xlen("{quantum}:stream:execution.result") == 2
    doctor = cli(url, data, "doctor", "--json")
    checks = {check["name"]: check for check in json.loads(doctor.stdout)}
    assert checks["kill switch"]["verdict"] == "PASS"
    assert checks["kill switch"]["detail"] == "{quantum}:kill = '0': trading allowed"
    assert cluster.password not in doctor.stdout + doctor.stderr
