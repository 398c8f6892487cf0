"""`make bench-queue`: the durable write path, on the embedded local stack.

Prints Markdown tables:
  queued store     `memory-manager store` (the console script, bytecode compiled once as an install
                   would) and `python memory_manager.py store` (a __main__ script is compiled on
                   every run) against `python -c 'import redis.asyncio'`; runs interleaved, with no
                   worker competing for the 2 cores (MEMORY_AUTO_DRAIN=off)
  throughput       episodes per minute one `worker` ingests, stand-in latency 0 and 1000 ms per
                   OpenAI request, one group and four groups; the worker's peak RSS
  burst            24 `store` processes spawned at once on one group, no worker running (the drainer
                   path the pod uses by default), stand-in at 1000 ms: kept, CLI p50/p95, time until
                   every episode is in the graph
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

from bench import MODULE, percentile
from stack import Stack


def run_ms(env: dict[str, str], args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
    return (time.perf_counter() - started) * 1000


def set_latency(stack: Stack, latency_ms: int) -> None:
    request = urllib.request.Request(f"{stack.standin_url}/_standin/faults", method="POST",
                                     data=json.dumps({"latency_ms": latency_ms}).encode())
    urllib.request.urlopen(request, timeout=5).close()


def episodes(stack: Stack, group: str) -> int:
    db = redis.Redis(port=stack.ports["falkordb"])
    try:
        if not db.exists(group):
            return 0
        return db.execute_command("GRAPH.RO_QUERY", group, "MATCH (e:Episodic) RETURN count(e)")[1][0][0]
    finally:
        db.close()


def wait_ingested(stack: Stack, expected: dict[str, int], timeout_s: float = 900) -> float:
    """Seconds until every group holds its expected number of episodes."""
    started = time.monotonic()
    while any(episodes(stack, g) < n for g, n in expected.items()):
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"bench: not ingested within {timeout_s} s")
        time.sleep(0.2)
    return time.monotonic() - started


def wait_heartbeat(stack: Stack, present: bool) -> None:
    db = redis.Redis(port=stack.ports["valkey"])
    while bool(db.exists("memory:heartbeat")) != present:
        time.sleep(0.1)
    db.close()


def event(group: str, i: int) -> str:
    return f"Run {i} in {group}: Erin edited src/app/module_{i}.py to call Valkey through fetch_answer_{i}()."


def run_script_ms(env: dict[str, str], args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, env=env, check=True, capture_output=True)
    return (time.perf_counter() - started) * 1000


def store_rows(stack: Stack, env: dict[str, str], runs: int) -> list[str]:
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(MODULE.parent)], check=True)
    console_script = str(Path(sys.executable).parent / "memory-manager")
    store_env = {**env, "MEMORY_GROUP_ID": "bench_store"}
    consoles, scripts, floor = [], [], []
    for i in range(runs):
        consoles.append(run_script_ms(store_env, [console_script, "store", event("store", i)]))
        scripts.append(run_ms(store_env, [str(MODULE), "store", event("store", i)]))
        floor.append(run_ms(env, ["-c", "import redis.asyncio"]))
    db = redis.Redis(port=stack.ports["valkey"])
    db.delete("memory:{bench_store}:episodes")  # measured, not to be ingested by the throughput runs
    db.srem("memory:groups", "bench_store")
    db.close()
    floor_median = statistics.median(floor)
    return [f"| {name}, whole process | {statistics.median(samples):.0f} ms | {percentile(samples, 0.95):.0f} ms | "
            f"`python -c 'import redis.asyncio'` | {floor_median:.0f} ms | "
            f"{statistics.median(samples) / floor_median:.2f}× |"
            for name, samples in (("`memory-manager store` (queued)", consoles),
                                  ("`python memory_manager.py store` (queued)", scripts))]


def throughput_rows(stack: Stack, env: dict[str, str], per_group: dict[int, int]) -> list[str]:
    rows = []
    for latency_ms in (0, 1000):
        set_latency(stack, latency_ms)
        for group_count in (1, 4):
            n = per_group[latency_ms]
            groups = {f"bench_tp_{latency_ms}_{group_count}_{g}": n for g in range(group_count)}
            started = time.monotonic()
            for i in range(n):
                for group in groups:
                    subprocess.run([sys.executable, str(MODULE), "store", event(group, i)],
                                   env={**env, "MEMORY_GROUP_ID": group}, check=True, capture_output=True)
            wait_ingested(stack, groups)
            elapsed = time.monotonic() - started
            total = n * group_count
            rows.append(f"| {latency_ms} ms | {group_count} | {total} | {elapsed:.1f} s | "
                        f"{total / elapsed * 60:.1f} |")
    set_latency(stack, 0)
    return rows


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def burst_row(stack: Stack, env: dict[str, str], count: int) -> str:
    set_latency(stack, 1000)
    group = "bench_burst"
    burst_env = {**env, "MEMORY_GROUP_ID": group, "MEMORY_AUTO_DRAIN": "on"}
    started = time.perf_counter()
    processes = [(time.perf_counter(), subprocess.Popen([sys.executable, str(MODULE), "store", event(group, i)],
                                                        env=burst_env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE))
                 for i in range(count)]
    durations, codes = [], []
    for spawned, process in processes:
        process.communicate(timeout=120)
        durations.append((time.perf_counter() - spawned) * 1000)
        codes.append(process.returncode)
    wait_ingested(stack, {group: codes.count(0)}, timeout_s=1200)
    total_s = time.perf_counter() - started
    kept = episodes(stack, group)
    set_latency(stack, 0)
    return (f"| {count} at once, one group, 1000 ms per LLM call | {kept} of {count} | "
            f"{statistics.median(durations):.0f} ms | {percentile(durations, 0.95):.0f} ms | {total_s:.0f} s |")


def print_table(stores: list[str]) -> None:
    print("| measurement | median | p95 | floor (same run) | floor median | ratio |")
    print("|---|---|---|---|---|---|")
    print("\n".join(stores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="whole-process runs per store measurement")
    parser.add_argument("--burst", type=int, default=24, help="stores in the burst")
    parser.add_argument("--store-only", action="store_true", help="only the queued-store table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memory-bench-queue-") as run_dir:
        stack = Stack(Path(run_dir))
        stack.start()
        worker = None
        try:
            env = {**os.environ, **stack.env(), "DD_TRACE_ENABLED": "false", "MEMORY_AUTO_DRAIN": "off",
                   "MEMORY_SPOOL_DIR": str(Path(run_dir) / "spool"), "MEMORY_DRAIN_IDLE": "5"}
            stores = store_rows(stack, env, args.runs)
            if args.store_only:
                print_table(stores)
                return
            with open(Path(run_dir) / "worker.log", "w") as log:
                worker = subprocess.Popen([sys.executable, str(MODULE), "worker"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT)
            wait_heartbeat(stack, present=True)
            throughput = throughput_rows(stack, env, per_group={0: 12, 1000: 6})
            rss = peak_rss_mb(worker.pid)
            worker.terminate()
            worker.wait(timeout=30)
            wait_heartbeat(stack, present=False)
            burst = burst_row(stack, env, args.burst)
        finally:
            if worker is not None and worker.poll() is None:
                worker.kill()
            stack.stop()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, cache server: {stack.cache_flavour}, "
          f"{args.runs} runs per store row\n")
    print_table(stores)
    print("\n| stand-in latency per request | groups | episodes | until all ingested | episodes/min |")
    print("|---|---|---|---|---|")
    print("\n".join(throughput))
    print(f"\nworker peak RSS (VmHWM) after the throughput runs: {rss:.0f} MB\n")
    print("| burst (no worker running: `store` starts a drainer) | kept | CLI p50 | CLI p95 | until all ingested |")
    print("|---|---|---|---|---|")
    print(burst)


if __name__ == "__main__":
    main()
