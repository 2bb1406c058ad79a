"""doctor: each check's verdict and fix, then the command against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.ops.doctor import (
    check_config_dir,
    check_journal,
    check_kill,
    check_reconciled,
    check_secret_file,
    check_skew,
    check_version,
    run_checks,
)
from quantum_trader.ops.recover import recover
from quantum_trader.reconcile import Difference, Kind, Report, encode_report
from quantum_trader.settings import Settings


def test_world_readable_secrets_fail_with_the_exact_fix() -> None:
    check = check_secret_file(Path("/etc/quantum/testnet.env"), 0o100644, 0, 0)  # the seed's root:root 0644
    assert check.verdict == "FAIL"
    assert "readable by every user" in check.detail
    # The service's group, not the file's: root:root 0640 would lock the service out of its own keys.
    assert check.fix == "chown root:quantum /etc/quantum/testnet.env && chmod 0640 /etc/quantum/testnet.env"
    other = check_secret_file(Path("/x"), 0o100644, 0, 0, service_group="trader")
    assert other.fix == "chown root:trader /x && chmod 0640 /x"
    assert check_secret_file(Path("/x"), 0o100640, 0, 0).verdict == "PASS"
    assert check_secret_file(Path("/x"), 0o100600, 0, 0).verdict == "PASS"


def test_the_seeds_open_config_directory_is_flagged() -> None:
    check = check_config_dir(Path("/etc/quantum"), 0o040755, 0, 0)
    assert (check.verdict, check.fix) == ("FAIL", "chown root:quantum /etc/quantum && chmod 0750 /etc/quantum")
    assert check_config_dir(Path("/etc/quantum"), 0o040750, 0, 0).verdict == "PASS"


def test_versions_kill_switch_and_clock() -> None:
    assert check_version("redis", (6, 2, 14)).verdict == "FAIL"
    assert check_version("redis", (7, 0, 15)).verdict == "PASS"
    assert check_version("valkey", (7, 0, 0)).verdict == "FAIL"
    assert check_kill(None).verdict == "WARN"
    assert check_kill("1").verdict == "WARN"
    assert check_kill("0").verdict == "PASS"
    assert check_skew(100.0, 100.2, 5).verdict == "PASS"
    assert check_skew(100.0, 101.5, 5).verdict == "WARN"
    assert check_skew(100.0, 110.0, 5).verdict == "FAIL"


def run_doctor(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": url}
    return subprocess.run([sys.executable, "-m", "quantum_trader", "doctor", "--json", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.skipif(os.getuid() != 0, reason="chmod checks assume the test owns the files")
def test_doctor_fails_on_readable_secrets_and_never_prints_them(clean_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": clean_url}
    subprocess.run([sys.executable, "-m", "quantum_trader", "recover"], env=env, check=True, capture_output=True)
    secrets = tmp_path / "testnet.env"
    secrets.write_text("BINANCE_API_KEY=AKIA-super-secret-key\nBINANCE_API_SECRET=shh-very-secret\n")
    secrets.chmod(0o644)
    done = run_doctor(clean_url, "--secrets-file", str(secrets))
    assert done.returncode == 1
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["secrets file"]["verdict"] == "FAIL"
    assert "chmod 0640" in rows["secrets file"]["fix"]
    assert rows["server version"]["verdict"] == "PASS"
    assert rows["kill switch"]["verdict"] == "WARN"
    assert "super-secret" not in done.stdout + done.stderr
    assert "very-secret" not in done.stdout + done.stderr

    secrets.chmod(0o640)
    tmp_path.chmod(0o750)
    fixed = run_doctor(clean_url, "--secrets-file", str(secrets))
    assert fixed.returncode == 0, fixed.stdout  # the only FAIL was the file's mode
    rows = {row["name"]: row for row in json.loads(fixed.stdout)}
    assert rows["secrets file"]["verdict"] == "PASS"


def test_doctor_reports_missing_groups_then_recover_creates_them(clean_url: str) -> None:
    rows = {row["name"]: row for row in json.loads(run_doctor(clean_url).stdout)}
    assert rows["group quantum:group:execution:trade.intent"]["verdict"] == "FAIL"
    assert rows["group quantum:group:execution:trade.intent"]["fix"] == "quantum-trader recover"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"QT_REDIS_URL": clean_url}
    subprocess.run([sys.executable, "-m", "quantum_trader", "recover"], env=env, check=True, capture_output=True)
    after = run_doctor(clean_url)
    assert after.returncode == 0, after.stdout
    rows = {row["name"]: row for row in json.loads(after.stdout)}
    assert rows["group quantum:group:execution:trade.intent"]["verdict"] == "PASS"


def test_doctor_without_a_server_still_checks_files_and_fails() -> None:
    done = run_doctor("redis://127.0.0.1:1/0")
    assert done.returncode == 1
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["server"]["verdict"] == "FAIL"


def test_doctor_checks_and_loads_its_own_env_file(clean_url: str, tmp_path: Path) -> None:
    settings = tmp_path / "quantum-trader.env"
    settings.write_text("QT_MODE=paper\nQT_EXCHANGE=paper\n")
    settings.chmod(0o640)
    done = run_doctor(clean_url, "--env-file", str(settings))
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["env file"]["verdict"] == "PASS"
    assert str(settings) in rows["env file"]["detail"]

    settings.chmod(0o666)
    rows = {row["name"]: row for row in json.loads(run_doctor(clean_url, "--env-file", str(settings)).stdout)}
    assert rows["env file"]["verdict"] == "FAIL"
    assert rows["env file"]["fix"] == f"chown root:quantum {settings} && chmod 0640 {settings}"


def test_an_invalid_settings_file_is_a_fail_row_not_an_early_exit(clean_url: str, tmp_path: Path) -> None:
    settings = tmp_path / "quantum-trader.env"
    settings.write_text("QT_MODE=paper\nQT_MAX_NOTIONL=5\n")
    settings.chmod(0o640)
    done = run_doctor(clean_url, "--env-file", str(settings), "--service-group", "trader")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["configuration"]["verdict"] == "FAIL"
    assert "QT_MAX_NOTIONL" in rows["configuration"]["detail"]
    assert rows["env file"]["verdict"] == "PASS"  # the file itself is fine; its content is not

    folder = tmp_path / "conf.d"
    folder.mkdir()
    done = run_doctor(clean_url, "--env-file", str(folder), "--service-group", "trader")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["configuration"]["verdict"] == "FAIL"
    assert rows["env file"]["verdict"] == "FAIL"
    assert "not a regular file" in rows["env file"]["detail"]


async def test_doctor_warns_on_dead_letters_and_a_backlog_past_a_hundred_batches(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, batch_size=1)  # a backlog over 100 intents is a WARN
    await recover(r, settings, idle_ms=0)
    rows = {check.name: check for check in await run_checks(r, settings)}
    intents = f"group {settings.streams.execution_group}"
    assert (rows[intents].verdict, rows["dead letters"].verdict) == ("PASS", "PASS")

    await publish(r, settings.streams.intent, [{"n": str(n)} for n in range(101)])
    await publish(r, settings.dead_letter_stream, [{"reason": "undecodable"}, {"reason": "undecodable"}])
    rows = {check.name: check for check in await run_checks(r, settings)}

    assert rows[intents].verdict == "WARN"
    assert rows[intents].detail.startswith("lag 101, pending 0")
    assert rows[intents].fix == "start more execution processes"
    assert (rows["dead letters"].verdict, rows["dead letters"].detail) == (
        "WARN",
        "2 entries on the dead-letter stream",
    )
    assert rows["dead letters"].fix == "quantum-trader dlq list"


def test_a_secrets_file_its_group_can_rewrite_fails_as_start_up_refuses_it() -> None:
    check = check_secret_file(Path("/etc/quantum/testnet.env"), 0o100660, 0, 0)
    assert check.verdict == "FAIL"
    assert "its group can rewrite it" in check.detail
    assert check.fix == "chown root:quantum /etc/quantum/testnet.env && chmod 0640 /etc/quantum/testnet.env"
    assert check_secret_file(Path("/x"), 0o100600, 1000, 1000).verdict == "WARN"  # the service may rewrite it


def test_doctor_never_prints_the_password_of_a_mistyped_url() -> None:
    done = run_doctor("http://:pw-in-doctor@127.0.0.1:1/0")
    assert done.returncode == 1
    assert "pw-in-doctor" not in done.stdout + done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["configuration"]["verdict"] == "FAIL"
    assert "QT_REDIS_URL='http://:***@127.0.0.1:1/0'" in rows["configuration"]["detail"]


def report(*differences: Difference, halted: bool = False) -> str:
    return encode_report(
        Report(
            at="2024-05-01T12:00:00.000Z",
            exchange="binance",
            differences=list(differences),
            assets=3,
            orders=4,
            since="2024-05-01T11:00:00.000Z",
            halted=halted,
        )
    )


AT = 1714564800.0  # 2024-05-01T12:00:00Z
OFF = Difference(kind=Kind.BALANCE, subject="ETH", size=Decimal("-0.2"), detail="ETH: the exchange holds 0.8 ...")


def test_the_latest_reconciliation_is_a_warning_when_it_found_differences_or_never_ran() -> None:
    assert check_reconciled(report(), True, AT + 30, 60).verdict == "PASS"
    assert check_reconciled(None, False, AT, 60).verdict == "PASS"  # nothing runs, nothing to reconcile
    never = check_reconciled(None, True, AT, 60)
    assert (never.verdict, never.detail) == ("WARN", "none yet while execution runs")
    found = check_reconciled(report(OFF, OFF, halted=True), True, AT, 60)
    assert found.verdict == "WARN"
    assert found.detail == (
        "2 difference(s) at 2024-05-01T12:00:00.000Z; kill switch turned on: ETH: the exchange holds 0.8 ... (+1 more)"
    )
    assert found.fix.startswith("quantum-trader reconcile")
    stale = check_reconciled(report(), True, AT + 600, 60)
    assert (stale.verdict, stale.detail) == ("WARN", "clean, but the latest is 600s old (QT_RECONCILE_S=60)")
    assert check_reconciled("{not json", True, AT, 60).verdict == "WARN"


async def test_doctor_reads_the_reconciliation_and_whether_execution_is_up(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url)
    rows = {check.name: check for check in await run_checks(r, settings)}
    assert rows["reconciliation"].verdict == "PASS"
    await r.set(keys.heartbeat(keys.EXECUTION, "execution-host"), "{}", ex=30)
    rows = {check.name: check for check in await run_checks(r, settings)}
    assert rows["reconciliation"].detail == "none yet while execution runs"
    await r.set(keys.BOOK_RECONCILED, report(OFF))
    rows = {check.name: check for check in await run_checks(r, settings)}
    assert rows["reconciliation"].verdict == "WARN"
    assert "1 difference(s)" in rows["reconciliation"].detail


def test_the_journal_row_says_whether_outcomes_wait_for_a_journal() -> None:
    results, rejected = "quantum:stream:execution.result", "quantum:stream:decision.rejected"
    assert check_journal({}, journal_up=False, batch_size=1000).verdict == "PASS"  # never deployed
    assert check_journal({results: (0, 0), rejected: (0, 0)}, journal_up=False, batch_size=1000).verdict == "PASS"
    stopped = check_journal({results: (40, 2), rejected: (0, 0)}, journal_up=False, batch_size=1000)
    assert stopped.verdict == "WARN"
    assert (
        stopped.detail
        == "not running, 42 entries waiting (execution.result lag 40 pending 2, decision.rejected lag 0 pending 0)"
    )
    assert "quantum-trader journal" in stopped.fix
    assert check_journal({results: (40, 2)}, journal_up=True, batch_size=1000).verdict == "PASS"
    behind = check_journal({results: (100_001, 0)}, journal_up=True, batch_size=1000)
    assert (behind.verdict, behind.detail.split(" (")[0]) == ("WARN", "behind by 100001 entries")


async def test_doctor_warns_when_results_wait_for_a_journal_that_is_not_running(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url)
    stream = settings.result_stream
    await ensure_group(r, stream, settings.journal_group)
    await publish(r, stream, [{"n": "1"}, {"n": "2"}])
    rows = {check.name: check for check in await run_checks(r, settings)}
    assert rows["journal"].verdict == "WARN"
    assert rows["journal"].detail.startswith("not running, 2 entries waiting")
    await r.set(keys.heartbeat(keys.JOURNAL, "journal-host"), "{}", ex=30)
    rows = {check.name: check for check in await run_checks(r, settings)}
    assert rows["journal"].verdict == "PASS"
