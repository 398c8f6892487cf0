"""`make bench-miss`: an uncached query in process on a 10k-entity memory, beside its FalkorDB floor.

Builds a synthetic graph shaped like graphiti-core's (local/bench_export.py: 10,000 Entity nodes
with 1024-dim vectors, two RELATES_TO facts each with fact_embedding; graphiti's own indexes), then
asks N different questions through query_memory() in one process, the stand-in at zero latency, so
every one is a cache miss: embed the question, recall's BM25 and cosine searches over facts and
events, fuse, format, cache the answer. The floor, measured in the same run: the Cypher queries that
one recall sent to FalkorDB (recorded at the falkordb client), replayed through the same client.

  python local/bench_miss.py [--entities 10000] [--questions 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench_export import build_graph, wait_for_indexes
from stack import ROOT, Stack

sys.path.insert(0, str(ROOT / "containers" / "opencode-server" / "graphiti"))

WORDS = ("graph", "database", "worker", "retry", "cache", "billing", "timeout", "deploy")  # in no fact


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def question(i: int) -> str:
    return f"what does {10 + i * 37 % 9_990} need for the {WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]}"


async def measure(group: str, questions: int) -> tuple[list[float], list[float], list[tuple[str, list[float]]]]:
    from falkordb.asyncio.graph import AsyncGraph

    import memory_manager as mm

    await mm._ensure_indices(group)  # what the worker does before its first episode
    graph = (await mm._falkordb()).select_graph(group)
    building = "CALL db.indexes() YIELD status WHERE status <> 'OPERATIONAL' RETURN count(status)"
    while (await graph.ro_query(building)).result_set[0][0]:  # noqa: ASYNC110 - polling the server
        await asyncio.sleep(0.2)  # the fulltext indexes fill in the background
    await mm.query_memory(question(-1))  # warm: clients, graphiti import, connections
    recorded: list[tuple[str, dict]] = []
    original = AsyncGraph.ro_query

    async def recording(self: AsyncGraph, cypher: str, params: dict | None = None, **rest: object) -> object:
        recorded.append((cypher, dict(params or {})))
        return await original(self, cypher, params, **rest)

    AsyncGraph.ro_query = recording  # bench instrumentation
    await mm.query_memory(question(-2))
    AsyncGraph.ro_query = original

    misses, empty = [], []
    for i in range(questions):
        started = time.perf_counter()
        answer = await mm.query_memory(question(i))
        misses.append((time.perf_counter() - started) * 1000)
        if not answer.startswith("- "):
            empty.append(question(i))
    print(f"{questions - len(empty)} of {questions} questions found memories; none for e.g. {empty[:3]}")
    floors = []
    for _ in range(questions):
        started = time.perf_counter()
        for cypher, params in recorded:
            await graph.ro_query(cypher, params)
        floors.append((time.perf_counter() - started) * 1000)
    each = []
    for cypher, params in recorded:
        samples = []
        for _ in range(max(5, questions // 10)):
            started = time.perf_counter()
            await graph.ro_query(cypher, params)
            samples.append((time.perf_counter() - started) * 1000)
        each.append((" ".join(cypher.split())[:60], samples))
    await mm.close()
    return misses, floors, each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    group = "bench_miss"
    with tempfile.TemporaryDirectory(prefix="memory-bench-miss-") as run_dir:
        stack = Stack(Path(run_dir))
        stack.start()
        try:
            db = redis.Redis(port=stack.ports["falkordb"])
            build_graph(db, group, args.entities)
            wait_for_indexes(db, group)
            nodes = db.execute_command("GRAPH.RO_QUERY", group, "MATCH (n) RETURN count(n)")[1][0][0]
            edges = db.execute_command("GRAPH.RO_QUERY", group, "MATCH ()-[e]->() RETURN count(e)")[1][0][0]
            os.environ.update({**stack.env(), "MEMORY_GROUP_ID": group, "DD_TRACE_ENABLED": "false"})
            misses, floors, each = asyncio.run(measure(group, args.questions))
        finally:
            stack.stop()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {args.entities:,} entities "
          f"({nodes:,} nodes, {edges:,} edges), {args.questions} different questions, stand-in at 0 ms\n")
    print("| in process | p50 | p99 | FalkorDB floor p50 | floor p99 | p50 ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| query_memory(), cache miss | {statistics.median(misses):.1f} ms | {percentile(misses, 0.99):.1f} ms | "
          f"{statistics.median(floors):.1f} ms | {percentile(floors, 0.99):.1f} ms | "
          f"{statistics.median(misses) / statistics.median(floors):.2f}× |")
    for cypher, samples in each:
        print(f"| floor part: `{cypher}...` | | | {statistics.median(samples):.1f} ms | "
              f"{percentile(samples, 0.99):.1f} ms | |")
    print(f"\nfloor: the {len(each)} Cypher queries one recall sends (several run concurrently), replayed "
          "one after the other through the same falkordb client")


if __name__ == "__main__":
    main()
