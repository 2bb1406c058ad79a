"""recover: stale intents of dead consumers and at the backlog's head get EXPIRED once; fresh ones are left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import Redis
from quantum_trader.bus.streams import ensure_group, publish
from quantum_trader.events import TRADE_INTENT, TradeIntent, envelope, now_iso
from quantum_trader.exchanges.base import client_order_id
from quantum_trader.ops.recover import recover
from quantum_trader.settings import Settings
from tests.pipeline import results

INTENTS = "quantum:stream:trade.intent"
GROUP = "quantum:group:execution:trade.intent"


def intent(age_s: float, n: int) -> dict[str, str]:
    born = now_iso(datetime.now(UTC) - timedelta(seconds=age_s))
    payload = TradeIntent(symbol="ETHUSDT", side="BUY", qty=Decimal("0.1"), decision_ts=born)
    return envelope(TRADE_INTENT, payload, trace_id=f"t{n}", correlation_id=f"c{n}", source="router")


async def test_groups_are_created_once(r: Redis, settings_for: Callable[..., Settings], clean_url: str) -> None:
    first = await recover(r, settings_for(clean_url), idle_ms=0)
    again = await recover(r, settings_for(clean_url), idle_ms=0)
    assert len(first.groups_created) == 2
    assert again.groups_created == []


async def test_stale_intents_of_a_dead_consumer_expire_and_fresh_ones_stay(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, max_intent_age_s=60)
    await ensure_group(r, INTENTS, GROUP)
    old_ids = await publish(r, INTENTS, [intent(600, n) for n in range(3)])
    fresh_ids = await publish(r, INTENTS, [intent(1, n) for n in range(3, 5)])
    await r.xreadgroup(GROUP, "dead-exec", {INTENTS: ">"}, count=5)  # then the process died

    report = await recover(r, settings, idle_ms=0)

    assert (report.stale_pending, report.expired, report.left_for_execution) == (5, 3, 2)
    out = await results(r)
    assert sorted(res["intent_id"] for res in out) == sorted(old_ids)
    assert {res["status"] for res in out} == {"EXPIRED"}
    pending = await r.xpending_range(INTENTS, GROUP, min="-", max="+", count=10)
    assert sorted(p["message_id"] for p in pending) == sorted(
        fresh_ids
    )  # still the dead consumer's: execution reclaims
    assert await r.keys(keys.paper_order_pattern()) == []  # recover never trades

    again = await recover(r, settings, idle_ms=0)
    assert again.expired == 0
    assert len(await results(r)) == 3


async def test_with_partitions_stale_intents_of_a_dead_consumer_expire_on_every_partition_stream(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, max_intent_age_s=60, partitions=3)
    streams = [keys.partition_stream(INTENTS, k, 3) for k in range(3)]
    old_ids: list[str] = []
    fresh: dict[str, list[str]] = {}
    for n, stream in enumerate(streams):
        await ensure_group(r, stream, GROUP)
        old_ids += await publish(r, stream, [intent(600, 10 * n)])
        fresh[stream] = await publish(r, stream, [intent(1, 10 * n + 1)])
        await r.xreadgroup(GROUP, f"dead-exec-{n}", {stream: ">"}, count=5)  # then the process died
    # An old intent no one read yet, at the head of a partition's backlog.
    [head_id] = await publish(r, streams[1], [intent(600, 99)])

    report = await recover(r, settings, idle_ms=0)

    assert (report.stale_pending, report.expired) == (6, 4)
    assert len(report.groups_created) == 5  # the decision stream and its 3 partitions, the one intent stream
    out = await results(r)
    assert sorted(res["intent_id"] for res in out) == sorted([*old_ids, head_id])
    assert {res["status"] for res in out} == {"EXPIRED"}
    for stream in streams:  # each acknowledged on its own stream; the fresh one still pending there
        pending = await r.xpending_range(stream, GROUP, min="-", max="+", count=10)
        assert [p["message_id"] for p in pending] == fresh[stream]
    assert (await recover(r, settings, idle_ms=0)).expired == 0


async def test_a_stale_intent_whose_order_exists_is_left_for_execution_to_report(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, max_intent_age_s=60)
    await ensure_group(r, INTENTS, GROUP)
    [ordered_id, plain_id] = await publish(r, INTENTS, [intent(600, 1), intent(600, 2)])
    await r.xreadgroup(GROUP, "dead-exec", {INTENTS: ">"}, count=2)
    # The dead consumer placed the first intent's order, then died before its result.
    coid = client_order_id(ordered_id, "t1", "c1")
    await r.set(keys.paper_order(coid), '{"client_order_id": "' + coid + '", "status": "FILLED"}')

    report = await recover(r, settings, idle_ms=0)

    assert (report.expired, report.left_with_order) == (1, 1)
    assert [res["intent_id"] for res in await results(r)] == [plain_id]  # an EXPIRED result would hide a fill
    pending = await r.xpending_range(INTENTS, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(ordered_id, "dead-exec")]


async def test_old_undelivered_backlog_head_expires_up_to_the_first_fresh_intent(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, max_intent_age_s=60)
    await ensure_group(r, INTENTS, GROUP)
    old_ids = await publish(r, INTENTS, [intent(3600, n) for n in range(4)])
    await publish(r, INTENTS, [intent(1, 9), intent(3600, 10)])

    report = await recover(r, settings, idle_ms=60_000)

    assert report.expired == 4
    assert sorted(res["intent_id"] for res in await results(r)) == sorted(old_ids)
    [group] = await r.xinfo_groups(INTENTS)
    assert group["lag"] == 2  # the fresh intent and everything after it wait for execution
    assert group["pending"] == 0


async def test_idle_empty_consumers_are_removed(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    await ensure_group(r, INTENTS, GROUP)
    [entry_id] = await publish(r, INTENTS, [intent(1, 1)])
    await r.xreadgroup(GROUP, "gone-1", {INTENTS: ">"}, count=1)
    await r.xack(INTENTS, GROUP, entry_id)  # it finished its work, then went away
    assert [c["name"] for c in await r.xinfo_consumers(INTENTS, GROUP)] == ["gone-1"]
    report = await recover(r, settings_for(clean_url), idle_ms=0)
    assert report.consumers_deleted == [f"{GROUP} / gone-1"]
    assert await r.xinfo_consumers(INTENTS, GROUP) == []


async def test_a_live_consumer_keeps_its_old_intent_and_a_dead_one_loses_it(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    # A ccxt batch can wait on the exchange longer than --idle-ms; the heartbeat says it is alive.
    settings = settings_for(clean_url, max_intent_age_s=60)
    await ensure_group(r, INTENTS, GROUP)
    [old_id] = await publish(r, INTENTS, [intent(600, 1)])
    await r.xreadgroup(GROUP, "busy-exec", {INTENTS: ">"}, count=1)
    await r.set(keys.heartbeat("execution", "busy-exec"), "{}", ex=15)

    report = await recover(r, settings, idle_ms=0)

    assert (report.expired, report.stale_pending, report.held_by_live_consumers) == (0, 0, 1)
    assert await results(r) == []
    [held] = await r.xpending_range(INTENTS, GROUP, min="-", max="+", count=10)
    assert (held["message_id"], held["consumer"]) == (old_id, "busy-exec")

    await r.delete(keys.heartbeat("execution", "busy-exec"))  # the process died: its heartbeat expired
    report = await recover(r, settings, idle_ms=0)

    assert report.expired == 1
    assert [(res["intent_id"], res["status"]) for res in await results(r)] == [(old_id, "EXPIRED")]
    assert await r.xpending_range(INTENTS, GROUP, min="-", max="+", count=10) == []


async def test_a_consumer_that_just_took_its_entries_is_not_idle_enough_to_lose_them(
    r: Redis, settings_for: Callable[..., Settings], clean_url: str
) -> None:
    settings = settings_for(clean_url, max_intent_age_s=60)
    await ensure_group(r, INTENTS, GROUP)
    ids = await publish(r, INTENTS, [intent(600, n) for n in range(2)])
    await r.xreadgroup(GROUP, "worker", {INTENTS: ">"}, count=2)  # no heartbeat, but delivered just now

    report = await recover(r, settings, idle_ms=60_000)

    assert (report.expired, report.stale_pending) == (0, 0)
    assert await results(r) == []
    pending = await r.xpending_range(INTENTS, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(i, "worker") for i in ids]


def run_recover(env_file: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")} | {"COLUMNS": "300"}
    command = [*prefix, sys.executable, "-m", "quantum_trader", "--env-file", str(env_file), "recover"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is 0700, which would hide the file itself)."""
    path = Path(tempfile.mkdtemp(prefix="qt-recover-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_an_unreadable_env_file_is_one_line_naming_it_and_exit_2(open_dir: Path) -> None:
    env_file = open_dir / "quantum-trader.env"
    env_file.write_text("QT_MODE=paper\n")
    os.chown(env_file, 65534, 65534)  # nobody's file, 0600
    env_file.chmod(0o600)
    # Root reads anything: drop the two capabilities that let it, for a real permission error.
    # (Running as nobody is no option here: the venv's interpreter lives under /root.)
    done = run_recover(env_file, "setpriv", "--bounding-set=-dac_override,-dac_read_search")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert any(str(env_file) in line and "not readable" in line for line in done.stderr.splitlines()), done.stderr


def test_a_directory_given_as_env_file_is_one_line_and_exit_2(open_dir: Path) -> None:
    done = run_recover(open_dir)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
