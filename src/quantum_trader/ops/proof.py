"""``quantum-trader proof snapshot|report``: the seed's BEFORE/AFTER document, generated from facts.

A snapshot records every pipeline stream and group, the kill switch, the governor's
count and limit, versions and (where systemd runs) each unit's state; it is stored in a
capped stream and/or a JSON file. A report renders two snapshots as Markdown tables
side by side with the deltas and the processing rate over the interval.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from quantum_trader import __version__, keys
from quantum_trader.bus.connection import Redis, server_version
from quantum_trader.bus.inspect import pipeline_status
from quantum_trader.errors import ConfigError
from quantum_trader.governor import governor_state
from quantum_trader.ops.systemd import SERVICES, TARGET, unit_name
from quantum_trader.settings import Settings


def _id_time(entry_id: str) -> str:
    if not entry_id:
        return ""
    return datetime.fromtimestamp(int(entry_id.split("-")[0]) / 1000, UTC).isoformat().replace("+00:00", "Z")


def unit_states() -> dict[str, str]:
    """``systemctl is-active`` of each unit, when systemd is here."""
    if shutil.which("systemctl") is None:
        return {}
    states = {}
    for name in [*(unit_name(service) for service in SERVICES), TARGET]:
        done = subprocess.run(["systemctl", "is-active", name], capture_output=True, text=True, check=False)
        states[name] = done.stdout.strip() or "unknown"
    return states


async def take(redis: Redis, settings: Settings, label: str, *, now: datetime | None = None) -> dict[str, Any]:
    """Collect a snapshot and store it in the capped snapshot stream."""
    moment = now or datetime.now(UTC)
    streams = []
    for stat in await pipeline_status(redis, settings.pipeline_streams(), with_consumers=True):
        data = stat.as_dict()
        data["first_entry_time"] = _id_time(stat.first_entry_id)
        data["last_entry_time"] = _id_time(stat.last_entry_id)
        streams.append(data)
    state = await governor_state(redis, settings, moment)
    server, version = await server_version(redis)
    snapshot = {
        "label": label,
        "taken_at": moment.isoformat().replace("+00:00", "Z"),
        "streams": streams,
        "governor": json.loads(json.dumps(asdict(state), default=str)),
        "versions": {"quantum_trader": __version__, "server": f"{server} {'.'.join(map(str, version))}"},
        "units": unit_states(),
    }
    await redis.xadd(
        keys.PROOF_SNAPSHOTS, {"label": label, "snapshot": json.dumps(snapshot)}, maxlen=1000, approximate=True
    )
    return snapshot


def load_file(path: Path) -> dict[str, Any]:
    """A snapshot saved with ``--out``."""
    if not path.exists():
        raise ConfigError(
            f"snapshot file {path} does not exist; take one with: quantum-trader proof snapshot --out {path}"
        )
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def find(redis: Redis, label: str) -> dict[str, Any]:
    """The newest stored snapshot with ``label``."""
    for _entry_id, fields in await redis.xrevrange(keys.PROOF_SNAPSHOTS, count=1000):
        if fields.get("label") == label:
            found: dict[str, Any] = json.loads(fields["snapshot"])
            return found
    raise ConfigError(f"no snapshot labelled {label!r}; take one with: quantum-trader proof snapshot --label {label}")


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _delta(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return "-"
    return f"{after - before:+,}"


def report(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Markdown: the BEFORE and AFTER tables side by side with deltas and processing rates."""
    t0 = datetime.fromisoformat(before["taken_at"].replace("Z", "+00:00"))
    t1 = datetime.fromisoformat(after["taken_at"].replace("Z", "+00:00"))
    seconds = max((t1 - t0).total_seconds(), 1e-9)
    lines = [
        f"# Proof: {before['label']} → {after['label']}",
        "",
        f"BEFORE taken {before['taken_at']}, AFTER taken {after['taken_at']} ({seconds:,.0f} s apart).",
        "",
        "## Streams",
        "",
        "| stream | XLEN before | XLEN after | entries-added before | entries-added after | added | rate (/s) "
        "| last-generated-id after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    old = {s["name"]: s for s in before["streams"]}
    for stream in after["streams"]:
        prev = old.get(stream["name"], {"length": 0, "entries_added": 0, "groups": []})
        added = stream["entries_added"] - prev["entries_added"]
        lines.append(
            f"| {stream['name']} | {_n(prev['length'])} | {_n(stream['length'])} | {_n(prev['entries_added'])} "
            f"| {_n(stream['entries_added'])} | {added:+,} | {added / seconds:,.1f} | {stream['last_generated_id']} |"
        )
    lines += [
        "",
        "## Consumer groups",
        "",
        "| stream | group | lag before | lag after | lag change | pending before | pending after "
        "| processed | rate (/s) | last-delivered-id after | consumers after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for stream in after["streams"]:
        prev_groups = {g["name"]: g for g in old.get(stream["name"], {"groups": []})["groups"]}
        for group in stream["groups"]:
            prev = prev_groups.get(group["name"], {"lag": None, "pending": None, "entries_read": None})
            read = (
                group["entries_read"] - (prev["entries_read"] or 0) if group.get("entries_read") is not None else None
            )
            rate = "-" if read is None else f"{read / seconds:,.1f}"
            lines.append(
                f"| {stream['name']} | {group['name']} | {_n(prev['lag'])} | {_n(group['lag'])} "
                f"| {_delta(prev['lag'], group['lag'])} | {_n(prev['pending'])} | {_n(group['pending'])} "
                f"| {_n(read)} | {rate} | {group['last_delivered_id']} | {group['consumers']} |"
            )
    gov0, gov1 = before["governor"], after["governor"]
    lines += [
        "",
        "## Governor and services",
        "",
        "| | before | after |",
        "| --- | --- | --- |",
        f"| kill switch | {gov0['kill_value']!r} | {gov1['kill_value']!r} |",
        f"| trading | {'ALLOWED' if gov0['trading_allowed'] else 'HALTED'} "
        f"| {'ALLOWED' if gov1['trading_allowed'] else 'HALTED'} |",
        f"| daily trades ({gov1['day']}) | {gov0['count']:,} / {gov0['limit']:,} "
        f"| {gov1['count']:,} / {gov1['limit']:,} |",
        f"| mode | {gov0['mode']} | {gov1['mode']} |",
        f"| versions | {before['versions']['quantum_trader']}, {before['versions']['server']} "
        f"| {after['versions']['quantum_trader']}, {after['versions']['server']} |",
    ]
    for unit in sorted(set(before.get("units", {})) | set(after.get("units", {}))):
        lines.append(f"| {unit} | {before.get('units', {}).get(unit, '-')} | {after.get('units', {}).get(unit, '-')} |")
    return "\n".join(lines) + "\n"
