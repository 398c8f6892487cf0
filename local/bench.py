"""`make bench`: latency of the memory manager against floors measured in the same run.

Runs on the embedded local stack (FalkorDB, Valkey 8, the OpenAI stand-in with zero latency) and
prints a Markdown table of medians (and p99 where many samples are taken), each with its ratio to
the floor it should be compared with:

  in-process cache hit   query_memory() on a warm cache  vs  a raw redis.asyncio GET
  whole-process hit      `python memory_manager.py query` vs  `python -c 'import redis.asyncio'`
  (the queued store, ingestion throughput and bursts: local/bench_queue.py)
  query miss             `python memory_manager.py query` (new question each time), same floor
  tracing                cached `query` and `health` with the Datadog agent present, absent and
                         black-holed, against the same command with DD_TRACE_ENABLED=false
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stack import ROOT, Stack

MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
sys.path.insert(0, str(MODULE.parent))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_process(env: dict[str, str], args: list[str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def sample_us(call: Any, iterations: int) -> list[float]:
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


async def in_process(env: dict[str, str], iterations: int) -> tuple[list[float], list[float]]:
    """Hits and raw GETs in this process, tracing as `env` says (the tracer is probed once per process)."""
    import redis.asyncio

    import memory_manager

    os.environ.update(env)
    await memory_manager.query_memory("graph database")  # warm: miss, then cached
    hits = await sample_us(lambda: memory_manager.query_memory("graph database"), iterations)
    await memory_manager.close()

    raw = redis.asyncio.Redis(port=int(env["VALKEY_PORT"]), protocol=2)
    await raw.set("bench:floor", "x" * 512)
    gets = await sample_us(lambda: raw.get("bench:floor"), iterations)
    await raw.aclose()
    return hits, gets


def in_fresh_process(env: dict[str, str], iterations: int) -> tuple[list[float], list[float]]:
    done = subprocess.run([sys.executable, __file__, "--hits-json", str(iterations)], env=env, check=True,
                          capture_output=True, text=True)
    hits, gets = json.loads(done.stdout)
    return hits, gets


def tail_row(name: str, hits: list[float], gets: list[float]) -> str:
    """p50 and p99 of the hit beside the raw GET's, and the p99 ratio (the issue's bar: ≤ 3×)."""
    p50, p99 = statistics.median(hits), percentile(hits, 0.99)
    g50, g99 = statistics.median(gets), percentile(gets, 0.99)
    return f"| {name} | {p50:.0f} µs | {p99:.0f} µs | {g50:.0f} µs | {g99:.0f} µs | {p99 / g99:.2f}× |"


def row(name: str, samples: list[float], unit: str, floor_name: str, floor: list[float], p99: bool = False) -> str:
    median, floor_median = statistics.median(samples), statistics.median(floor)
    tail = f"{percentile(samples, 0.99):.0f}" if p99 else "–"
    return (f"| {name} | {median:.0f} {unit} | {tail} | {floor_name} | {floor_median:.0f} {unit} | "
            f"{median / floor_median:.2f}× |")


def tracing_rows(env: dict[str, str], agent_port: int, runs: int) -> list[str]:
    """Whole-process cost of tracing, per agent state, against tracing off in the same run."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(512)  # the kernel completes connections; nobody ever answers
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    states = {"agent present": str(agent_port), "agent absent": str(dead_port),
              "agent black-holed": str(blackhole.getsockname()[1])}
    rows = []
    try:
        for command in (["query", "graph database"], ["health"]):
            off = time_process({**env, "DD_TRACE_ENABLED": "false"}, [str(MODULE), *command], runs)
            for state, port in states.items():
                on = time_process({**env, "DD_TRACE_ENABLED": "true", "DD_TRACE_AGENT_PORT": port},
                                  [str(MODULE), *command], runs)
                delta = statistics.median(on) - statistics.median(off)
                rows.append(f"| `{' '.join(command[:1])}`{' (cache hit)' if command[0] == 'query' else ''}, "
                            f"{state} | {statistics.median(on):.0f} ms | {statistics.median(off):.0f} ms | "
                            f"{delta:+.0f} ms |")
    finally:
        blackhole.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="whole-process runs per measurement")
    parser.add_argument("--iterations", type=int, default=2000, help="in-process cache hits")
    parser.add_argument("--hits-json", type=int, metavar="N", help=argparse.SUPPRESS)  # the child of in_fresh_process
    args = parser.parse_args()
    if args.hits_json:
        print(json.dumps(asyncio.run(in_process(dict(os.environ), args.hits_json))))
        return
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as run_dir:
        stack = Stack(Path(run_dir))
        stack.start()
        try:
            env = {**os.environ, **stack.env(), "MEMORY_GROUP_ID": "bench", "DD_TRACE_ENABLED": "false",
                   "MEMORY_SPOOL_DIR": str(Path(run_dir) / "spool"), "MEMORY_DRAIN_IDLE": "5"}
            subprocess.run([sys.executable, str(MODULE), "store", "--wait",
                            "We chose FalkorDB over Neo4j for the graph database."],
                           env=env, check=True, capture_output=True)
            hits, gets = in_fresh_process(env, args.iterations)
            traced_hits, traced_gets = in_fresh_process({**env, "DD_TRACE_ENABLED": "true"}, args.iterations)
            time_process(env, [str(MODULE), "query", "graph database"], 1)  # cache it
            whole_hit = time_process(env, [str(MODULE), "query", "graph database"], args.runs)
            import_floor = time_process(env, ["-c", "import redis.asyncio"], args.runs)
            misses = [time_process(env, [str(MODULE), "query", f"src app_{i} Valkey"], 1)[0]
                      for i in range(args.runs)]
            graphiti_floor = time_process(env, ["-c", "import graphiti_core"], max(3, args.runs // 3))
            tracing = tracing_rows(env, stack.ports["ddagent"], args.runs)
        finally:
            stack.stop()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, cache server: {stack.cache_flavour}; "
          f"{args.iterations} in-process hits, {args.runs} runs per whole-process row\n")
    print("| measurement | median | p99 | floor (same run) | floor median | ratio |")
    print("|---|---|---|---|---|---|")
    print(row("query, cache hit, in process", hits, "µs", "raw Valkey GET (redis.asyncio)", gets, p99=True))
    print(row("query, cache hit, whole process", whole_hit, "ms", "`python -c 'import redis.asyncio'`", import_floor))
    print(row("query, cache miss, whole process", misses, "ms", "`python -c 'import graphiti_core'`", graphiti_floor))
    print("\n| in-process cache hit | p50 | p99 | raw GET p50 (same process) | raw GET p99 | p99 ratio |")
    print("|---|---|---|---|---|---|")
    print(tail_row("tracing off", hits, gets))
    print(tail_row("tracing on, agent present", traced_hits, traced_gets))
    print("\n| command, Datadog agent | median, tracing on | median, DD_TRACE_ENABLED=false (same run) | cost |")
    print("|---|---|---|---|")
    print("\n".join(tracing))


if __name__ == "__main__":
    main()
