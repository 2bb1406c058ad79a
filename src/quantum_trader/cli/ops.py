"""Operator commands: ``doctor``, ``recover``, ``systemd render|install|rollback``, ``proof snapshot|report``."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import typer

from quantum_trader.bus.connection import connected, server_url
from quantum_trader.cli.common import JSON_OPT, configured, console, state, with_redis
from quantum_trader.cli.views import doctor_table
from quantum_trader.errors import BusError, ConfigError
from quantum_trader.logs import configure
from quantum_trader.ops import doctor as doctor_checks
from quantum_trader.ops import proof, recover, systemd
from quantum_trader.settings import load_settings

systemd_app = typer.Typer(help="Render, install and roll back hardened systemd systemd.", no_args_is_help=True)
proof_app = typer.Typer(help="BEFORE/AFTER proof of a change, generated from the live state.", no_args_is_help=True)


def doctor(
    env_file: Path | None = typer.Option(
        None, "--env-file", help="Check and load this settings file (default: the global --env-file / QT_ENV_FILE)."
    ),
    secrets_file: Path | None = typer.Option(None, "--secrets-file", help="Check this secrets file."),
    # No QT_ variable: every QT_ name in the environment must be a setting.
    group: str = typer.Option(
        doctor_checks.SERVICE_GROUP, "--service-group", help="The units' group (systemd --user); the fixes name it."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Check the server, settings, file permissions, kill switch, groups, lag, dead letters, clock."""
    env_path = env_file or state["env_file"]
    try:
        cfg = load_settings(env_path)
    except (ConfigError, OSError) as exc:
        # A broken settings file is one FAIL row of the table, not an exit before it. OSError: the
        # loader reads a directory or a file that vanished without turning that into a ConfigError.
        reason = str(exc) if isinstance(exc, ConfigError) else f"cannot read the settings: {exc}"
        checks = doctor_checks.unloadable(reason, env_file=env_path, secrets_file=secrets_file, service_group=group)
    else:
        configure(cfg.log_level, cfg.log_format)

        async def main() -> list[doctor_checks.Check]:
            with server_url(cfg) as url:
                try:
                    async with connected(url) as redis:
                        return await doctor_checks.run_checks(
                            redis, cfg, env_file=env_path, secrets_file=secrets_file, service_group=group
                        )
                except BusError:
                    return await doctor_checks.run_checks(
                        None, cfg, env_file=env_path, secrets_file=secrets_file, service_group=group
                    )

        checks = asyncio.run(main())
    if as_json:
        print(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        console.print(doctor_table(checks))
    raise typer.Exit(1 if doctor_checks.failed(checks) else 0)


def recover_command(
    idle_ms: int = typer.Option(
        60_000, "--idle-ms", min=0, help="Consumers idle this long, with no live heartbeat, are treated as dead."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Create missing groups, expire stale intents, drop idle empty consumers (systemd ExecStartPre)."""
    cfg = configured()
    report = with_redis(cfg, lambda r: recover.recover(r, cfg, idle_ms=idle_ms))
    if as_json:
        print(json.dumps(report.as_dict()))
        return
    console.print(
        f"recover: groups created {report.groups_created or 'none'}; stale pending {report.stale_pending}; "
        f"expired {report.expired}; left for execution {report.left_for_execution}; "
        f"held by live consumers {report.held_by_live_consumers}; "
        f"consumers removed {report.consumers_deleted or 'none'}"
    )


def _layout(venv: Path, data_dir: Path, user: str) -> systemd.Layout:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        raise ConfigError(f"--user {user!r} is not a valid user name (lower-case letters, digits, _ and -)")
    return systemd.Layout(venv=venv, data_dir=data_dir, user=user, group=user)


VENV_OPT = typer.Option(Path(sys.prefix), "--venv", help="The virtualenv holding quantum-trader.")
DATA_OPT = typer.Option(Path("/var/lib/quantum-trader"), "--data-dir", help="The services' only writable path.")
USER_OPT = typer.Option("quantum", "--user", help="Service user and group.")


@systemd_app.command("render")
def systemd_render(venv: Path = VENV_OPT, data_dir: Path = DATA_OPT, user: str = USER_OPT) -> None:
    """Print every unit."""
    for name, text in systemd.render_all(_layout(venv, data_dir, user)).items():
        print(f"# --- {name} ---\n{text}")


@systemd_app.command("install")
def systemd_install(
    root: Path = typer.Option(Path("/"), "--root", help="Install under this directory."),
    venv: Path = VENV_OPT,
    data_dir: Path = DATA_OPT,
    user: str = USER_OPT,
    do_apply: bool = typer.Option(False, "--apply", help="Also run the systemctl commands."),
) -> None:
    """Write the units and env templates (root:<group>, secrets 0640, config dir 0750), backing up what they replace."""
    done = systemd.install(root, _layout(venv, data_dir, user))
    for path in done.written:
        console.print(f"wrote {path}")
    if done.backup:
        console.print(f"backup of the replaced files: {done.backup}")
    for note in done.notes:
        console.print(f"note: {note}")
    _next(done.commands, do_apply)


@systemd_app.command("rollback")
def systemd_rollback(
    root: Path = typer.Option(Path("/"), "--root"),
    do_apply: bool = typer.Option(False, "--apply", help="Also run the systemctl commands."),
) -> None:
    """Restore the files the last install replaced."""
    done = systemd.rollback(root)
    for path in done.written:
        console.print(f"restored {path}")
    _next(done.commands, do_apply)


def _next(commands: list[str], do_apply: bool) -> None:
    if do_apply:
        systemd.apply(commands)
        console.print("ran: " + " && ".join(commands))
    else:
        console.print("next: " + " && ".join(commands))


@proof_app.command("snapshot")
def proof_snapshot(
    label: str = typer.Option(..., "--label", help="A name for this moment, e.g. before or after."),
    out: Path | None = typer.Option(None, "--out", help="Also write the snapshot to this JSON file."),
) -> None:
    """Record the state of every stream, group, the governor and the systemd."""
    cfg = configured()
    snap = with_redis(cfg, lambda r: proof.take(r, cfg, label))
    if out is not None:
        out.write_text(json.dumps(snap, indent=2) + "\n")
    console.print(f"snapshot {label!r} taken at {snap['taken_at']}" + (f" -> {out}" if out else ""))


@proof_app.command("report")
def proof_report(
    before: str = typer.Argument(..., help="Label or JSON file of the BEFORE snapshot."),
    after: str = typer.Argument(..., help="Label or JSON file of the AFTER snapshot."),
    out: Path | None = typer.Option(None, "--out", help="Write the Markdown here instead of printing it."),
) -> None:
    """Render BEFORE and AFTER side by side with deltas, as Markdown."""
    cfg = configured()
    refs = [before, after]
    files = {ref: proof.load_file(Path(ref)) for ref in refs if ref.endswith(".json")}
    labels = [ref for ref in refs if ref not in files]

    async def lookup(redis: object) -> dict[str, dict[str, object]]:
        return {label: await proof.find(redis, label) for label in labels}

    found = with_redis(cfg, lookup) if labels else {}
    text = proof.report({**files, **found}[before], {**files, **found}[after])
    if out is not None:
        out.write_text(text)
        console.print(f"report written to {out}")
    else:
        print(text)


def register(app: typer.Typer) -> None:
    """Add the operator commands to the main CLI."""
    app.command("doctor")(doctor)
    app.command("recover")(recover_command)
    app.add_typer(systemd_app, name="systemd")
    app.add_typer(proof_app, name="proof")
