"""systemd units: hardened content, systemd-analyze verify, install with backups, rollback."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quantum_trader.errors import ConfigError
from quantum_trader.ops.systemd import Layout, install, render_all, render_unit, rollback

VENV = Path(sys.prefix)


def layout(tmp: Path) -> Layout:
    return Layout(venv=VENV, data_dir=tmp / "data", settings_file=Path("/etc/quantum/quantum-trader.env"),
                  secrets_file=Path("/etc/quantum/secrets.env"))  # fmt: skip


def test_unit_runs_recover_first_with_the_venv_path_and_separate_secrets(tmp_path: Path) -> None:
    unit = render_unit("execution", layout(tmp_path))
    lines = unit.splitlines()
    assert f"ExecStartPre={VENV}/bin/quantum-trader recover" in lines
    assert f"ExecStart={VENV}/bin/quantum-trader execution" in lines
    assert any(line.startswith(f"Environment=PATH={VENV}/bin:") for line in lines)
    assert "EnvironmentFile=/etc/quantum/quantum-trader.env" in lines
    # Credentials are read from the secrets file by the process, never put in its environment.
    assert not any("secrets.env" in line for line in lines)
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                      "CapabilityBoundingSet=", "SystemCallFilter=@system-service", "User=quantum",
                      f"ReadWritePaths={tmp_path / 'data'}", "Restart=on-failure", "TimeoutStopSec=30s"):  # fmt: skip
        assert hardening in lines, hardening
    assert set(render_all(layout(tmp_path))) == {
        "quantum-trader-server.service", "quantum-router.service", "quantum-execution.service",
        "quantum-ai-engine.service", "quantum-journal.service", "quantum-protect.service", "quantum-trader.target",
    }  # fmt: skip
    assert f"ExecStart={VENV}/bin/quantum-trader journal" in render_unit("journal", layout(tmp_path)).splitlines()


def test_every_service_waits_for_the_one_embedded_server_unit(tmp_path: Path) -> None:
    units = render_all(layout(tmp_path))
    server = units["quantum-trader-server.service"].splitlines()
    assert f"ExecStart={VENV}/bin/quantum-trader server" in server
    assert "Type=simple" in server
    assert f"ReadWritePaths={tmp_path / 'data'}" in server
    assert 'ExecCondition=/usr/bin/test -z "${QT_REDIS_URL}"' in server  # skipped with an external server
    assert f"ExecStartPre=/bin/rm -f {tmp_path / 'data' / 'server.url'}" in server  # never a stale URL
    assert not any(line.startswith("ExecStartPre=") and "recover" in line for line in server)
    for service in ("router", "execution", "ai-engine", "journal"):
        lines = units[f"quantum-{service}.service"].splitlines()
        assert "Requires=quantum-trader-server.service" in lines, service
        assert "After=network-online.target quantum-trader-server.service" in lines, service
    assert "quantum-trader-server.service" in units["quantum-trader.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)")
def test_units_pass_systemd_analyze_verify_and_score_well(tmp_path: Path) -> None:
    lay = Layout(venv=VENV, data_dir=tmp_path / "data", settings_file=tmp_path / "q.env",
                 secrets_file=tmp_path / "s.env", user="root", group="root")  # fmt: skip
    (tmp_path / "q.env").write_text("QT_MODE=paper\n")
    for name, text in render_all(lay).items():
        (tmp_path / name).write_text(text)
    names = [str(tmp_path / name) for name in render_all(lay)]
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Unknown key" not in done.stderr, done.stderr
    assert "ignoring" not in done.stderr, done.stderr
    for name in ("quantum-execution.service", "quantum-trader-server.service"):
        unit = str(tmp_path / name)
        score = subprocess.run(["systemd-analyze", "security", "--offline=yes", unit], capture_output=True, text=True)
        exposure = float(score.stdout.rsplit("exposure level for", 1)[1].split(":")[1].split()[0])
        assert exposure < 3.0, (name, score.stdout[-300:])


def test_install_writes_units_and_private_env_files_then_rollback_restores(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = install(root, layout(tmp_path), now=datetime(2026, 1, 17, 13, 17, tzinfo=UTC))
    unit = root / "etc/systemd/system/quantum-execution.service"
    secrets = root / "etc/quantum/secrets.env"
    assert unit.exists()
    assert first.backup is None  # nothing was replaced
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/quantum").stat().st_mode) == 0o750
    assert first.commands == ["systemctl daemon-reload", "systemctl enable --now quantum-trader.target"]

    unit.write_text("# the operator's hand edit\n")
    secrets.write_text("BINANCE_API_KEY=kept\n")
    second = install(root, layout(tmp_path), now=datetime(2026, 1, 17, 22, 28, tzinfo=UTC))
    assert second.backup is not None
    assert (
        second.backup / "etc/systemd/system/quantum-execution.service"
    ).read_text() == "# the operator's hand edit\n"
    assert "ExecStart=" in unit.read_text()
    assert secrets.read_text() == "BINANCE_API_KEY=kept\n"  # an existing secrets file is never overwritten

    back = rollback(root)
    assert unit.read_text() == "# the operator's hand edit\n"
    assert back.commands[0] == "systemctl daemon-reload"
    with pytest.raises(ConfigError, match="nothing to roll back"):
        rollback(root)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to a group needs root")
def test_install_hands_the_config_dir_and_env_files_to_the_service_group(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = install(root, replace(layout(tmp_path), user="nobody", group="nogroup"))
    assert done.notes == []
    for path in (root / "etc/quantum", root / "etc/quantum/quantum-trader.env", root / "etc/quantum/secrets.env"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (0, grp.getgrnam("nogroup").gr_gid), path

    missing = install(tmp_path / "other", replace(layout(tmp_path), group="no-such-group-here"))
    [note] = missing.notes
    assert "group 'no-such-group-here' does not exist" in note
    assert "chown root:no-such-group-here" in note
