"""The pipeline on a real Valkey Cluster: effectively once under SIGKILLs, and across a failover.

The stages run as separate processes with ``QT_REDIS_URL=redis+cluster://...``: the router,
two execution processes and (in one variant) the journal, on a 3-primary, 3-replica cluster
(``tests/cluster.py``). Every key of the pipeline carries the hash tag ``{quantum}``, so its
scripts and transactions each run on one slot, and that slot's primary holds the pipeline's
whole state in one replication stream.

The failover variant SIGKILLs that primary twice mid-flow; its replica takes over. What a
failover may do is roll the state back to the last write the replica had: everything at once
(one replication stream is a prefix of the primary's), which the stages then redo as after a
crash of their own. What it must not do, and these tests check with ``tests/chaos.py``: a
decision whose publisher was told it is held (it waited for a replica) without exactly one
outcome, an order twice, balances or a daily count that disagree with the results.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantum_trader import keys
from quantum_trader.bus.connection import client
from quantum_trader.bus.streams import publish
from tests.chaos import named
from tests.cluster import ValkeyCluster
from tests.test_effectively_once import burst, chaos_run


@dataclass(frozen=True)
class OnCluster:
    """The cluster as the chaos run's server: only its URL (a failover is a ``disrupt``)."""

    url: str


def the_pipelines_primary(cluster: ValkeyCluster) -> int:
    """The port of the primary that holds every key of the pipeline (the ``{quantum}`` slot)."""
    return cluster.primary_for(keys.cluster_name(keys.KILL_SWITCH))


async def test_the_pipeline_on_a_cluster_loses_and_duplicates_nothing_when_stages_are_killed(
    cluster: ValkeyCluster,
) -> None:
    problems = await chaos_run(OnCluster(cluster.url), rounds=16)
    assert problems == []


async def test_a_failover_of_the_pipelines_primary_mid_flow_loses_and_duplicates_nothing(
    cluster: ValkeyCluster, tmp_path: Path
) -> None:
    failed_over: list[tuple[int, int]] = []

    async def failover(round_no: int) -> None:
        if round_no not in (4, 10):
            return
        old = the_pipelines_primary(cluster)
        cluster.kill(old)
        new = await asyncio.to_thread(cluster.wait_for_failover, keys.cluster_name(keys.KILL_SWITCH))
        # The old primary comes back as the new one's replica, so the next failover has one to promote.
        await asyncio.to_thread(cluster.restart, old)
        failed_over.append((old, new))

    url = f"sqlite:///{tmp_path / 'journal.sqlite3'}"
    problems = await chaos_run(OnCluster(cluster.url), rounds=16, disrupt=failover, database_url=url)
    assert len(failed_over) == 2
    assert all(old != new for old, new in failed_over)
    assert problems == []


async def failover_to_a_stale_replica(cluster: ValkeyCluster, rng: random.Random, first: int) -> tuple[int, int]:
    """Freeze the replica of the pipeline's primary, let the stages work on decisions it never sees, then
    SIGKILL the primary: the replica is promoted without that work, which the failover takes back.

    The decisions of that window are published without waiting for a replica: their publisher was never
    told they are held, and they vanish with the primary (with everything the stages did for them).
    """
    old = the_pipelines_primary(cluster)
    (stale,) = cluster.replicas_of(old)
    await asyncio.to_thread(cluster.wait_aof_written, stale)  # what it applied survives its own restart
    cluster.freeze(stale)
    r = client(cluster.url)
    try:
        await publish(r, named("quantum:stream:ai.decision"), burst(rng, first, 60))
    finally:
        await r.aclose()
    await asyncio.sleep(1.5)  # the stages route, execute and journal what the replica will not have
    # The primary dies, and the replica comes back from its AOF without what its socket still held
    # (thawing it instead would let it read that first: the loss of a replica cut off from its primary).
    cluster.kill(old)
    cluster.kill(stale)
    await asyncio.to_thread(cluster.revive, stale)
    new = await asyncio.to_thread(cluster.wait_for_failover, keys.cluster_name(keys.KILL_SWITCH))
    await asyncio.to_thread(cluster.restart, old)  # back as the new primary's replica
    return old, new


async def stale_failover_run(cluster: ValkeyCluster, tmp_path: Path, replicas: int) -> list[str]:
    """The chaos run with two failovers to a stale replica, the journal on; its violations."""
    rng = random.Random(7)
    failed_over: list[tuple[int, int]] = []

    async def failover(round_no: int) -> None:
        if round_no in (3, 9):
            failed_over.append(await failover_to_a_stale_replica(cluster, rng, 100_000 + round_no * 1000))

    url = f"sqlite:///{tmp_path / 'journal.sqlite3'}"
    problems = await chaos_run(
        OnCluster(cluster.url), rounds=12, disrupt=failover, database_url=url,
        env={"QT_CLUSTER_REPLICAS": str(replicas), "QT_CLUSTER_REPLICA_WAIT_MS": "300"},
    )  # fmt: skip
    assert len(failed_over) == 2
    return problems


@pytest.mark.slow
async def test_a_failover_that_takes_work_back_still_leaves_one_outcome_per_decision_and_one_journal_row(
    cluster: ValkeyCluster, tmp_path: Path
) -> None:
    # Orders leave and the journal records only what a replica holds (QT_CLUSTER_REPLICAS=1, the
    # default): what the failover takes back was never seen outside the cluster, and is done again.
    # Run with -m slow: in about 1 run in 5 under load every stage waits, from the start, for a replica
    # that never acknowledges ("0 of 1 replicas hold the pipeline's state"), failing closed as it
    # should, until the test times out; why the test cluster's replica stops acknowledging is open.
    assert await stale_failover_run(cluster, tmp_path, replicas=1) == []


@pytest.mark.slow
async def test_without_waiting_for_replicas_the_journal_keeps_rows_the_failover_took_back(
    cluster: ValkeyCluster, tmp_path: Path
) -> None:
    problems = await stale_failover_run(cluster, tmp_path, replicas=0)
    assert any(problem.startswith("journal:") for problem in problems), problems
