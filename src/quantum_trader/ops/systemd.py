"""``quantum-trader systemd render|install|rollback``: hardened units, one per service.

Rendering is pure (text from a few paths). Installing writes the units and the env
file templates under a root directory, keeps a timestamped backup of whatever it
replaces, and prints the ``systemctl`` commands (or runs them with ``--apply``).
Rolling back restores the newest backup.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from quantum_trader import keys
from quantum_trader.errors import ConfigError

SERVICES = {
    keys.ROUTER: "validates and dedups AI decisions into trade intents",
    keys.EXECUTION: "gates intents with the governor and places orders",
    keys.AI_ENGINE: "turns market data into trade decisions",
    keys.JOURNAL: "records results, rejections and dead letters in SQL",
    keys.PROTECT: "fires each position's stop-loss or take-profit exit once",
}
TARGET = "quantum-trader.target"
SERVER_UNIT = "quantum-trader-server.service"
UNIT_DIR = Path("etc/systemd/system")
CONFIG_DIR = Path("etc/quantum")
BACKUP_DIR = Path("var/backups/quantum-trader")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things live on the host."""

    venv: Path = Path("/opt/quantum-trader/.venv")
    data_dir: Path = Path("/var/lib/quantum-trader")
    settings_file: Path = Path("/etc/quantum/quantum-trader.env")
    secrets_file: Path = Path("/etc/quantum/secrets.env")
    user: str = "quantum"
    group: str = "quantum"


def unit_name(service: str) -> str:
    """``quantum-<service>.service`` (the seed's naming)."""
    return f"quantum-{service}.service"


# The same sandbox for every unit: `systemd-analyze security` rates it below 2 ("OK").
HARDENING = """TimeoutStopSec=30s
KillSignal=SIGTERM
StateDirectory=quantum-trader
StateDirectoryMode=0700
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ReadWritePaths={data_dir}
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources"""


def _environment(layout: Layout) -> str:
    # The secrets file is not an EnvironmentFile: the process reads it itself (QT_SECRETS_FILE in
    # the settings file), so credentials never sit in any process's environment.
    path = f"{layout.venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return f"""User={layout.user}
Group={layout.group}
EnvironmentFile={layout.settings_file}
Environment=PATH={path}
Environment=QT_DATA_DIR={layout.data_dir}
Environment=QT_LOG_FORMAT=json"""


def render_unit(service: str, layout: Layout) -> str:
    """One hardened unit. The recover step runs first; stop waits for the batch in hand."""
    exe = layout.venv / "bin" / "quantum-trader"
    return f"""[Unit]
Description=Quantum Trader {service}: {SERVICES[service]}
Documentation=file://{layout.venv.parent}/README.md
# The embedded server runs in its own unit: a process that started it itself (the recover
# step first of all) would stop it on exit, under every other service. With QT_REDIS_URL set,
# that unit skips itself and this dependency is met at once.
Requires={SERVER_UNIT}
After=network-online.target {SERVER_UNIT}
Wants=network-online.target
PartOf={TARGET}
# Back off: at most 10 restarts in 5 minutes, then stay failed for the operator to look.
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=exec
{_environment(layout)}
ExecStartPre={exe} recover
ExecStart={exe} {service}
Restart=on-failure
RestartSec=5s
{HARDENING.format(data_dir=layout.data_dir)}

[Install]
WantedBy={TARGET}
"""


def render_server(layout: Layout) -> str:
    """The embedded Valkey server's unit: started before, and shared by, every service."""
    exe = layout.venv / "bin" / "quantum-trader"
    url_file = layout.data_dir / "server.url"
    return f"""[Unit]
Description=Quantum Trader embedded Valkey server (streams, governor counters; AOF in {layout.data_dir})
Documentation=file://{layout.venv.parent}/README.md
PartOf={TARGET}
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=simple
{_environment(layout)}
# Skipped (not failed) when the settings name an external server: the services use that one.
ExecCondition=/usr/bin/test -z "${{QT_REDIS_URL}}"
# The server writes server.url once it answers PING; the services attach through that file, so
# the unit counts as started only then, and never on a file left by the previous run.
ExecStartPre=/bin/rm -f {url_file}
ExecStart={exe} server
ExecStartPost=/bin/sh -c 'until [ -s {url_file} ]; do sleep 0.1; done'
TimeoutStartSec=60s
Restart=on-failure
RestartSec=2s
# Enough descriptors up front: Valkey would otherwise try to raise its own limit.
LimitNOFILE=16384
{HARDENING.format(data_dir=layout.data_dir)}

[Install]
WantedBy={TARGET}
"""


def render_target() -> str:
    """The target grouping every service."""
    wants = " ".join([SERVER_UNIT, *(unit_name(service) for service in SERVICES)])
    return f"""[Unit]
Description=Quantum Trader pipeline (all services)
Wants={wants}

[Install]
WantedBy=multi-user.target
"""


def render_all(layout: Layout) -> dict[str, str]:
    """Every unit by file name."""
    units = {SERVER_UNIT: render_server(layout)}
    units |= {unit_name(service): render_unit(service, layout) for service in SERVICES}
    units[TARGET] = render_target()
    return units


SETTINGS_TEMPLATE = """# Quantum Trader settings (systemd EnvironmentFile syntax); see the README, Configuration.
QT_MODE=paper
QT_EXCHANGE=paper
QT_SECRETS_FILE={secrets}
# QT_REDIS_URL=redis://127.0.0.1:6379/0   (empty: the embedded Valkey in QT_DATA_DIR, run by
#   quantum-trader-server.service; when set, that unit skips itself and is not needed)
# QT_DAILY_LIMIT=1000000
# QT_MAX_NOTIONAL=100000
"""
SECRETS_TEMPLATE = """# Exchange credentials: readable by root and the service group only (0640).
# BINANCE_API_KEY=
# BINANCE_API_SECRET=
"""


@dataclass(frozen=True, slots=True)
class Installed:
    """What ``install`` or ``rollback`` did, and what to run next."""

    written: list[Path]
    backup: Path | None
    commands: list[str]
    notes: list[str] = field(default_factory=list)


def _commands(enable: bool) -> list[str]:
    if enable:
        return ["systemctl daemon-reload", f"systemctl enable --now {TARGET}"]
    return ["systemctl daemon-reload", f"systemctl restart {TARGET}"]


def install(root: Path, layout: Layout, *, now: datetime | None = None) -> Installed:
    """Write units and env templates under ``root``; back up anything replaced first."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    backup = root / BACKUP_DIR / stamp
    units = render_all(layout)
    targets = {root / UNIT_DIR / name: text for name, text in units.items()}
    config_dir = root / CONFIG_DIR
    settings_path = root / layout.settings_file.relative_to("/")
    secrets_path = root / layout.secrets_file.relative_to("/")
    written: list[Path] = []
    saved = False
    for path in [*targets, settings_path, secrets_path]:
        if path.exists():
            copy = backup / path.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
            saved = True
    for path, text in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
        written.append(path)
    config_dir.mkdir(parents=True, exist_ok=True)
    config_dir.chmod(0o750)
    if not settings_path.exists():
        settings_path.write_text(SETTINGS_TEMPLATE.format(secrets=layout.secrets_file))
        written.append(settings_path)
    settings_path.chmod(0o640)
    if not secrets_path.exists():
        secrets_path.write_text(SECRETS_TEMPLATE)
        written.append(secrets_path)
    secrets_path.chmod(0o640)
    notes = _hand_to_group([config_dir, settings_path, secrets_path], layout.group)
    return Installed(written, backup if saved else None, _commands(enable=True), notes)


def _hand_to_group(paths: list[Path], group: str) -> list[str]:
    """``root:<group>`` on the config dir and env files, so the service (and only it) can read them."""
    if os.geteuid() != 0:
        return [f"not root: run  chown root:{group} {' '.join(map(str, paths))}  before starting the units"]
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return [
            f"group {group!r} does not exist, so {paths[0]} and its env files keep their group; create the user "
            f"(useradd --system {group}) and install again, or run  chown root:{group} {' '.join(map(str, paths))}"
        ]
    for path in paths:
        os.chown(path, 0, gid)
    return []


def rollback(root: Path) -> Installed:
    """Restore the newest backup (units and env files as they were before the last install)."""
    base = root / BACKUP_DIR
    backups = sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []
    if not backups:
        raise ConfigError(f"no backup under {base}: nothing to roll back (install keeps one when it replaces files)")
    newest = backups[-1]
    restored = []
    for copy in sorted(p for p in newest.rglob("*") if p.is_file()):
        target = root / copy.relative_to(newest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(copy, target)
        restored.append(target)
    shutil.rmtree(newest)
    return Installed(restored, newest, _commands(enable=False))


def apply(commands: list[str]) -> None:
    """Run the systemctl commands (``--apply``)."""
    for command in commands:
        subprocess.run(command.split(), check=True)
