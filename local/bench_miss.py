"""`make bench-miss`: an uncached query in process on a 10k-entity memory, beside its FalkorDB floor.

Builds a synthetic graph shaped like graphiti-core's (local/bench_export.py: 10,000 Entity nodes
with 1024-dim vectors, two RELATES_TO facts each with fact_embedding; graphiti's own indexes), then
asks N different questions through query_memory() in one process, the stand-in at zero latency, so
every one is a cache miss: embed the question, recall's BM25 and cosine searches over facts and
events, fuse, format, cache the answer. The floor, measured in the same run: the Cypher queries that
one recall sent to FalkorDB (recorded at the falkordb client), replayed through the same client.

Vector search runs on the group's vector indexes (built by _ensure_indices, as the worker does).
The same questions are then asked again with those indexes dropped (the exact scan recall falls
back to), and the answers compared. The synthetic vectors are random, so no question's vector is
near any fact's (both paths find no vector match); the index's own top-10 against the exact scan's
is therefore also measured directly, with 100 stored fact vectors plus noise as the questions.

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
from typing import Any

import redis

from bench_export import build_graph, wait_for_indexes
from stack import ROOT, Stack

sys.path.insert(0, str(ROOT / "containers" / "opencode-server" / "graphiti"))

VECTOR_K = 200  # memory_manager._Recall.VECTOR_CANDIDATES
WORDS = ("graph", "database", "worker", "retry", "cache", "billing", "timeout", "deploy")  # in no fact


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def question(i: int) -> str:
    """Every other question also holds words most memories share ("entity" and "uses" are in every
    fact, "synthetic" and "event" in every event): the slow tail of issue 34 item 7."""
    if i % 2:
        return f"what happened with the synthetic entity {10 + i * 37 % 9_990} that uses the event"
    return f"what does {10 + i * 37 % 9_990} need for the {WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]}"


async def every_word_read(mm: Any, group: str, questions: int) -> tuple[list[float], int]:
    """The common-word questions again with every text of every word read (as before the bound):
    their latencies, and how many answers equal the bounded ones."""
    bounded = [await mm.query_memory(question(i)) for i in range(1, questions, 2)]  # cached
    mm._Recall.COMMON_WORD_MIN_TEXTS = 10**9  # bench instrumentation: no word is common
    await mm._Cache.invalidate(group)
    latencies, same = [], 0
    for answer, i in zip(bounded, range(1, questions, 2), strict=True):
        started = time.perf_counter()
        same += await mm.query_memory(question(i)) == answer
        latencies.append((time.perf_counter() - started) * 1000)
    mm._Recall.COMMON_WORD_MIN_TEXTS = 1_000
    await mm._Cache.invalidate(group)
    return latencies, same


async def measure(group: str, questions: int) -> tuple[list[float], list[float], list[tuple[str, list[float]]],
                                                      list[tuple[float, bool]], tuple[int, float],
                                                      tuple[list[float], int], list[float]]:
    from falkordb.asyncio.graph import AsyncGraph

    import memory_manager as mm

    await mm._Indexes.ensure(group)  # what the worker does before its first episode
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

    misses, empty, present = [], [], []
    for i in range(questions):
        started = time.perf_counter()
        answer = await mm.query_memory(question(i))
        misses.append((time.perf_counter() - started) * 1000)
        if not answer.startswith("- "):
            empty.append(question(i))
    print(f"{questions - len(empty)} of {questions} questions found memories; none for e.g. {empty[:3]}")
    for i in range(0, questions, 4):  # a question about the present sends one more query (later words)
        started = time.perf_counter()
        await mm.query_memory(question(i) + " now")
        present.append((time.perf_counter() - started) * 1000)
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
    agreement = await index_agreement(graph)
    unbounded = await every_word_read(mm, group, questions)
    answers = [await mm.query_memory(question(i)) for i in range(questions)]  # cached: the indexed answers
    for _label, prop, pattern in mm.VECTOR_INDEXES:
        await graph.query(f"DROP VECTOR INDEX FOR {pattern} ON (x.{prop})")
    await mm._Cache.invalidate(group)  # bench instrumentation: forget the cached answers
    exact = []
    for i in range(questions):
        started = time.perf_counter()
        same = await mm.query_memory(question(i)) == answers[i]
        exact.append(((time.perf_counter() - started) * 1000, same))
    await mm.close()
    return misses, floors, each, exact, agreement, unbounded, present


async def index_agreement(graph: Any, samples: int = 100) -> tuple[int, float]:
    """(questions whose top-10 the index and the exact scan agree on, mean overlap of the two)."""
    import random

    rows = (await graph.ro_query("MATCH ()-[x:RELATES_TO]->() RETURN x.fact_embedding LIMIT $n",
                                 {"n": samples})).result_set
    rng = random.Random(7)
    same, overlap = 0, 0.0
    for (vector,) in rows:
        probe = [float(v) + rng.gauss(0, 0.1) for v in vector]
        tops = []
        for cypher in ("CALL db.idx.vector.queryRelationships('RELATES_TO', 'fact_embedding', $k, vecf32($v)) "
                       "YIELD relationship AS x, score RETURN x.uuid ORDER BY score, x.uuid LIMIT 10",
                       "MATCH ()-[x:RELATES_TO]->() RETURN x.uuid "
                       "ORDER BY vec.cosineDistance(x.fact_embedding, vecf32($v)), x.uuid LIMIT 10"):
            tops.append([r[0] for r in (await graph.ro_query(cypher, {"v": probe, "k": 200})).result_set])
        same += tops[0] == tops[1]
        overlap += len(set(tops[0]) & set(tops[1])) / 10
    return same, overlap / len(rows)


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
            misses, floors, each, exact, agreement, unbounded, misses_now = asyncio.run(
                measure(group, args.questions))
        finally:
            stack.stop()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {args.entities:,} entities "
          f"({nodes:,} nodes, {edges:,} edges), {args.questions} different questions, stand-in at 0 ms\n")
    print("| in process | p50 | p95 | p99 | FalkorDB floor p50 | floor p99 | p50 ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| query_memory(), cache miss | {statistics.median(misses):.1f} ms | {percentile(misses, 0.95):.1f} ms | "
          f"{percentile(misses, 0.99):.1f} ms | {statistics.median(floors):.1f} ms | "
          f"{percentile(floors, 0.99):.1f} ms | "
          f"{statistics.median(misses) / statistics.median(floors):.2f}× |")
    for name, samples in (("questions with common words", misses[1::2]), ("questions without", misses[::2]),
                          ("questions about the present (`... now`: later words)", misses_now),
                          ("common-word questions, every text of every word read (before)", unbounded[0])):
        print(f"| {name} | {statistics.median(samples):.1f} ms | {percentile(samples, 0.95):.1f} ms | "
              f"{percentile(samples, 0.99):.1f} ms | | | |")
    for cypher, samples in each:
        print(f"| floor part: `{cypher}...` | | | | {statistics.median(samples):.1f} ms | "
              f"{percentile(samples, 0.99):.1f} ms | |")
    exact_ms = [ms for ms, _ in exact]
    print(f"| query_memory(), cache miss, vector indexes dropped (exact scan) | {statistics.median(exact_ms):.1f} ms | "
          f"{percentile(exact_ms, 0.95):.1f} ms | {percentile(exact_ms, 0.99):.1f} ms | | | "
          f"{statistics.median(exact_ms) / statistics.median(floors):.2f}× |")
    print(f"\ncommon-word answers identical to reading every word's texts for {unbounded[1]} of "
          f"{len(unbounded[0])} questions")
    print(f"answers with and without the vector indexes identical for {sum(s for _, s in exact)} of {len(exact)} "
          f"questions; the index's top-10 (k {VECTOR_K}) equals the exact scan's for {agreement[0]} of 100 "
          f"probes (mean overlap {agreement[1]:.1%})")
    print(f"\nfloor: the {len(each)} Cypher queries one recall sends (several run concurrently), replayed "
          "one after the other through the same falkordb client")


if __name__ == "__main__":
    main()
