"""Partitions: decisions for many symbols through 1 router and P execution processes with QT_PARTITIONS=P.

Each row reports intents/s over the results' span (as the drain rows do) and what one intent costs in CPU:
on the server (INFO cpu, user + sys) and in the stage processes (router and execution, user + sys), both
counted from the moment every process is up and idle to the last result. The decisions are preloaded behind
a router group created at their end; once the processes are idle the group is moved back to the start, so
neither the preload nor the processes' start-up is counted. Until then a second group of the bench's own, at
the start, keeps the router's trim passes from removing them (to the trimmer, entries at or below every
group's position are consumed); it goes in the transaction that moves the router's group back. On a machine
with few cores the rows show the cost per intent, not how far partitions scale: the capacity needed at a rate
is rate x cost.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import psutil
import redis

from bench.harness import DECISIONS, RESULTS, Stage, preload, prepare, server, span_rate, stages, wait_for
from quantum_trader import keys
from quantum_trader.events import DECISION, envelope, now_iso

ROUTER_GROUP = keys.StreamNames().router_group
HOLD_GROUP = "bench:hold"  # holds the preloaded decisions against trimming until the router's group is moved back
SYMBOLS = [f"X{a}{b}USDT" for a in "ABCDEFGH" for b in "ABCDEFGH"]  # 64: every partition gets some
# (execution processes, QT_PARTITIONS): partitions of 1, 2 and 4, and 4 processes sharing one stream.
LAYOUTS = [(1, 1), (2, 2), (4, 4), (4, 1)]
SIZES = {False: 20_000, True: 4_000}
STALL_S = 60.0  # a row whose results stop coming for this long fails, naming where the intents wait


def decision(n: int, stamp: str) -> dict[str, str]:
    """Decision ``n``: the symbols in turn, alternating sides."""
    symbol = SYMBOLS[n % len(SYMBOLS)]
    payload = {"symbol": symbol, "side": "BUY" if (n // len(SYMBOLS)) % 2 else "SELL", "qty": "0.001", "price": "100"}
    return envelope(DECISION, payload, trace_id=f"t{n}", correlation_id=f"c{n}", source="bench", timestamp=stamp)


def server_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def client_cpu_s(procs: list[Stage]) -> float:
    return sum(client_cpu_by_stage(procs).values())


def client_cpu_by_stage(procs: list[Stage]) -> dict[str, float]:
    """User + sys CPU seconds of the processes, summed per stage (``router``, ``execution``)."""
    totals: dict[str, float] = {}
    for stage in procs:
        assert stage.proc is not None
        times = psutil.Process(stage.proc.pid).cpu_times()
        totals[stage.args[0]] = totals.get(stage.args[0], 0.0) + times.user + times.system
    return totals


def wait_idle(client: redis.Redis, procs: list[Stage], partitions: int, limit_s: float = 30.0) -> dict[str, str]:
    """Until every partition's lease is held (one holder per process when they match) and CPU has settled."""
    started = time.perf_counter()
    holders: dict[str, str] = {}
    while time.perf_counter() - started < limit_s:
        for stage in procs:
            if stage.proc is not None and stage.proc.poll() is not None:
                raise RuntimeError(f"{stage.args} exited with {stage.proc.returncode}; see {stage.log}")
        if partitions > 1:
            values = [client.get(keys.partition_lease(k)) for k in range(partitions)]
            holders = {f"p{k}": (v or "").split(" ")[0] for k, v in enumerate(values)}
            spread = len(set(holders.values())) == min(partitions, len(procs)) and all(values)
        else:
            spread = True
        if spread and time.perf_counter() - started > 2.0:
            before = client_cpu_s(procs)
            time.sleep(0.5)
            if client_cpu_s(procs) - before < 0.1 * len(procs):  # below 20% of a core each: start-up is over
                return holders
        time.sleep(0.1)
    raise RuntimeError(f"partition leases not spread within {limit_s:.0f}s: {holders}")


def where_things_are(client: redis.Redis, partitions: int) -> str:
    """The decision and intent streams' groups (lag, pending, consumers) and the leases, for a row that stalled."""
    intent_stream = named(keys.StreamNames().intent)
    streams = [named(DECISIONS), *(keys.partition_stream(intent_stream, k, partitions) for k in range(partitions))]
    names = keys.StreamNames()
    parts = []
    for stream in streams:
        if not client.exists(stream):
            parts.append(f"{stream}: none")
            continue
        groups = client.xinfo_groups(stream)
        shown = [f"{g['name']} lag {g.get('lag')} pending {g['pending']} consumers {g['consumers']}" for g in groups]
        added = client.xinfo_stream(stream)["entries-added"]
        parts.append(f"{stream}: {added} added, {client.xlen(stream)} left, {'; '.join(shown) or 'no group'}")
    for stream in (named(names.rejected), named(names.dead_letter)):
        last = client.xrevrange(stream, count=1)
        parts.append(f"{stream}: {client.xlen(stream)} entries{f', last {last[0][1]}' if last else ''}")
    if partitions > 1:
        parts.append(f"leases {[client.get(keys.partition_lease(k)) for k in range(partitions)]}")
        parts.append(f"members {client.zrange(keys.PARTITION_MEMBERS, 0, -1, withscores=True)}")
    return ", ".join(parts)


def named(stream: str) -> str:
    """A stream's name under the key names in force: the seed's, or on a cluster with its hash tag."""
    return keys.cluster_name(stream) if keys.cluster_names_in_use() else stream


def run(decisions: int, processes: int, partitions: int) -> dict[str, Any]:
    """One row on a private server: ``decisions`` preloaded, 1 router and ``processes`` execution processes."""
    with server() as valkey:
        client = prepare(valkey.url)
        return measure(valkey.url, client, {"server": client}, decisions, processes, partitions)


def measure(
    url: str,
    client: redis.Redis,
    nodes: dict[str, redis.Redis],
    decisions: int,
    processes: int,
    partitions: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One row: ``decisions`` preloaded through ``client`` (it serves every key of the pipeline), 1 router and
    ``processes`` execution processes on ``url`` with QT_PARTITIONS=partitions (plus ``env``).

    Server CPU is the sum over ``nodes`` (name -> a client on that server); with more than one node the row
    also has each node's share.
    """
    decision_stream, result_stream = named(DECISIONS), named(RESULTS)
    client.hset(keys.PRICE_HASH, mapping=dict.fromkeys(SYMBOLS, "100"))
    preload(client, decision_stream, decisions, decision)
    client.xgroup_create(decision_stream, ROUTER_GROUP, id="$")  # held back until the processes are idle
    client.xgroup_create(decision_stream, HOLD_GROUP, id="0")  # and kept from the trim passes until then
    balances = ",".join(["USDT=1000000000000", *(f"{s.removesuffix('USDT')}=1000000000" for s in SYMBOLS)])
    extra = {"QT_PARTITIONS": str(partitions), "QT_PAPER_BALANCES": balances, **(env or {})}
    specs = [("router", "bench-router"), *(("execution", f"bench-exec-{n}") for n in range(processes))]
    procs = stages(url, specs, extra)
    for stage in procs:
        stage.start()
    try:
        holders = wait_idle(client, procs, partitions)
        server0, client0 = {name: server_cpu_s(node) for name, node in nodes.items()}, client_cpu_by_stage(procs)
        release = client.pipeline(transaction=True)
        release.xgroup_setid(decision_stream, ROUTER_GROUP, id="0")
        release.xgroup_destroy(decision_stream, HOLD_GROUP)
        release.execute()
        try:
            wall = wait_for(client, result_stream, decisions, procs, limit_s=900, stall_s=STALL_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; {where_things_are(client, partitions)}") from None
        server_s = {name: server_cpu_s(node) - server0[name] for name, node in nodes.items()}
        client_s = {name: seconds - client0[name] for name, seconds in client_cpu_by_stage(procs).items()}
    finally:
        for stage in procs:
            stage.stop()
    intent_stream = named(keys.StreamNames().intent)
    per_stream = {
        f"p{k}": client.xinfo_stream(keys.partition_stream(intent_stream, k, partitions))["entries-added"]
        for k in range(partitions)
    }
    row: dict[str, Any] = {
        "decisions": decisions,
        "execution_processes": processes,
        "partitions": partitions,
        "intents_per_s": round(span_rate(client, result_stream, decisions)),
        "wall_s": round(wall, 2),
        "server_cpu_us_per_intent": round(sum(server_s.values()) / decisions * 1e6, 1),
        "client_cpu_us_per_intent": round(sum(client_s.values()) / decisions * 1e6, 1),
        "client_cpu_us_per_intent_by_stage": {name: round(t / decisions * 1e6, 1) for name, t in client_s.items()},
    }
    if len(nodes) > 1:
        row["server_cpu_us_per_intent_by_node"] = {
            name: round(seconds / decisions * 1e6, 1) for name, seconds in server_s.items()
        }
    results = client.xrange(result_stream)
    return row | {
        "results_by_status": dict(Counter(json.loads(f["payload"])["status"] for _i, f in results)),
        "intents_per_partition": per_stream,
        "lease_holders": holders,
        "peak_rss_mb": {" ".join(s.args) + f"-{n}": round(s.peak_rss_mb, 1) for n, s in enumerate(procs)},
    }


def partitions(quick: bool) -> dict[str, Any]:
    """Every layout on the same number of decisions."""
    decisions = SIZES[quick]
    rows = []
    for processes, parts in LAYOUTS:
        row = run(decisions, processes, parts)
        print(
            f"partitions, {processes} execution x QT_PARTITIONS={parts}: {row['intents_per_s']:,} intents/s,"
            f" server {row['server_cpu_us_per_intent']} µs, clients {row['client_cpu_us_per_intent']} µs per intent",
            file=sys.stderr,
        )
        rows.append(row)
    return {"decisions": decisions, "symbols": len(SYMBOLS), "stamp": now_iso(datetime.now(UTC)), "rows": rows}


def render(res: dict[str, Any]) -> list[str]:
    """Table rows (figure | measured | target), one per layout."""
    return [
        f"| partitions: 1 router + {r['execution_processes']} execution, QT_PARTITIONS={r['partitions']}"
        f" ({res['decisions']:,} decisions, {res['symbols']} symbols) | {r['intents_per_s']:,} intents/s;"
        f" CPU per intent: server {r['server_cpu_us_per_intent']} µs, processes {r['client_cpu_us_per_intent']} µs | |"
        for r in res["rows"]
    ]
