"""`make bench-recall`: does recall find what happened? The memory beside BM25 and dense retrieval
over the same raw texts, measured in the same run.

Stores every event of local/recall_corpus.py (a multi-session chat and a coding agent's log, each
its own memory group, each event with the time it happened) through the real queue and a real
`worker` process, on the local stack with the OpenAI stand-in (test infrastructure) at zero latency
and semantic embeddings (wordllama's static vectors) unless told otherwise. Then asks every
labelled question in process and counts a question as found at k when one of its answer-bearing
events is among the first k recalled items: an episode itself, or a fact's source episodes.

Baselines over the raw event texts of the same memory: BM25 (bm25s, Lucene variant, k1 1.2,
b 0.75, English stopwords) and dense retrieval (cosine over the same embeddings endpoint the memory
uses). Also: in-process miss latency of recall() (every question is asked once per scope, so each is
a cache miss) and an ingestion summary. Every question is then asked again with the groups' vector
indexes dropped (recall's exact scan), so the indexed search is compared with the exact one in the
same run; the indexes are built again afterwards.

  python local/bench_recall.py [--embeddings semantic|hashed] [--scopes all,facts,episodes]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np

from recall_corpus import Event, Question, build
from stack import ROOT, Stack

sys.path.insert(0, str(ROOT / "containers" / "opencode-server" / "graphiti"))
MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
KS = (5, 10)
KINDS = ("single", "multihop", "temporal", "changed")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def store_all(events: list[Event]) -> None:
    import memory_manager as mm

    for memory in sorted({e.memory for e in events}):
        os.environ["MEMORY_GROUP_ID"] = f"recall_{memory}"
        await mm.close()
        for event in (e for e in events if e.memory == memory):
            await mm.enqueue_episode(event.text, {"event": event.id}, at=event.at)
    await mm.close()


def standin(stack: Stack, path: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(stack.standin_url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)


def llm_bill(stack: Stack, events: int) -> str:
    """What ingestion asked of the LLM endpoint, per event: requests by kind, and the size of the
    prompts sent (graphiti's real prompts; tokens estimated at 4 characters each; the stand-in's
    answers are short, so completion tokens are not measured here)."""
    counts: dict = standin(stack, "/_standin/stats")  # type: ignore[assignment]
    bodies: list = standin(stack, "/_standin/requests")  # type: ignore[assignment]
    llm = sum(counts.get(k, 0) for k in ("responses", "chat/completions"))
    prompt_chars = sum(len(body) for body in bodies if "embedding" not in json.loads(body).get("model", ""))
    stages = ", ".join(f"{k.split(':', 1)[1]} {v / events:.2f}" for k, v in sorted(counts.items())
                       if k.startswith("responses:"))
    return (f"LLM requests per event: {llm / events:.2f} ({stages}); embeddings requests per event: "
            f"{counts.get('embeddings', 0) / events:.2f}; request bodies sent to the LLM per event: "
            f"{prompt_chars / events / 1000:.1f} KB (~{prompt_chars / events / 4:,.0f} prompt tokens)")


def ingest(stack: Stack, events: list[Event], env: dict[str, str], log: Path) -> tuple[float, str]:
    """Queue every event, then one real worker ingests them all; the wall time of the ingestion and
    what it asked of the LLM."""
    os.environ.update(env, MEMORY_AUTO_DRAIN="off")
    asyncio.run(store_all(events))
    standin(stack, "/_standin/reset", {})
    standin(stack, "/_standin/faults", {"record": True})
    started = time.monotonic()
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, str(MODULE), "worker"], env={**os.environ, **env},
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        import redis

        db = redis.Redis(port=stack.ports["valkey"], decode_responses=True)
        groups = sorted({f"recall_{e.memory}" for e in events})
        while any(db.xlen(f"memory:{{{g}}}:episodes") for g in groups):
            if worker.poll() is not None:
                raise SystemExit(f"worker exited {worker.returncode}; see {log}")
            time.sleep(1)
        dead = sum(db.xlen(f"memory:{{{g}}}:dead") for g in groups)
        if dead:
            raise SystemExit(f"{dead} episode(s) dead-lettered; see {log}")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    spent = time.monotonic() - started
    bill = llm_bill(stack, len(events))
    standin(stack, "/_standin/reset", {})
    return spent, bill


async def ask(questions: list[Question], scopes: list[str]) -> tuple[dict, dict[str, list[float]], dict]:
    """{(scope, question id): [event ids of the recalled items, in order]}, latencies per scope, and
    the graph's sizes per memory."""
    import memory_manager as mm

    found: dict[tuple[str, str], list[list[str]]] = {}
    latencies: dict[str, list[float]] = defaultdict(list)
    sizes = {}
    for memory in sorted({q.memory for q in questions}):
        group = f"recall_{memory}"
        os.environ["MEMORY_GROUP_ID"] = group
        await mm.close()
        graph = (await mm._falkordb()).select_graph(group)
        rows = (await graph.ro_query("MATCH (e:Episodic) RETURN e.uuid, e.metadata")).result_set
        event_of = {uid: json.loads(meta)["event"] for uid, meta in rows}
        facts = (await graph.ro_query("MATCH ()-[e:RELATES_TO]->() RETURN count(e)")).result_set[0][0]
        entities = (await graph.ro_query("MATCH (n:Entity) RETURN count(n)")).result_set[0][0]
        sizes[memory] = (len(rows), entities, facts)
        await mm.recall("warm up the clients", 10)
        for scope in scopes:
            for q in (q for q in questions if q.memory == memory):
                started = time.perf_counter()
                items = await mm.recall(q.text, 10, scope=scope)
                latencies[scope].append((time.perf_counter() - started) * 1000)
                found[scope, q.id] = [[event_of[u] for u in item.episodes if u in event_of] for item in items]
    await mm.close()
    return found, latencies, sizes


async def set_vector_indexes(groups: list[str], present: bool) -> None:
    """Drop every group's vector indexes (recall falls back to an exact scan), or build them again
    as the worker does; either way the cached answers are made stale."""
    import memory_manager as mm

    for group in groups:
        os.environ["MEMORY_GROUP_ID"] = group
        await mm.close()
        graph = (await mm._falkordb()).select_graph(group)
        if present:
            await mm._ensure_indices(group)
        else:
            for _label, prop, pattern in mm.VECTOR_INDEXES:
                await graph.query(f"DROP VECTOR INDEX FOR {pattern} ON (x.{prop})")
        await mm._invalidate(group)  # bench instrumentation
    await mm.close()


def bm25_rankings(events: list[Event], questions: list[Question]) -> dict[str, list[list[str]]]:
    import bm25s

    ranked = {}
    for memory in sorted({e.memory for e in events}):
        mine = [e for e in events if e.memory == memory]
        retriever = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
        retriever.index(bm25s.tokenize([e.text for e in mine], stopwords="en", show_progress=False),
                        show_progress=False)
        for q in (q for q in questions if q.memory == memory):
            docs, _ = retriever.retrieve(bm25s.tokenize([q.text], stopwords="en", show_progress=False),
                                         k=max(KS), show_progress=False)
            ranked[q.id] = [[mine[int(i)].id] for i in docs[0]]
    return ranked


def embed(url: str, texts: list[str]) -> np.ndarray:
    vectors = []
    for start in range(0, len(texts), 256):
        body = json.dumps({"model": "text-embedding-3-small", "input": texts[start:start + 256]}).encode()
        request = urllib.request.Request(f"{url}/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            vectors += [d["embedding"][:1024] for d in json.load(reply)["data"]]  # what graphiti keeps
    matrix = np.array(vectors, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-9)


def dense_rankings(url: str, events: list[Event], questions: list[Question]) -> dict[str, list[list[str]]]:
    ranked = {}
    for memory in sorted({e.memory for e in events}):
        mine = [e for e in events if e.memory == memory]
        matrix = embed(url, [e.text for e in mine])
        asked = [q for q in questions if q.memory == memory]
        scores = embed(url, [q.text for q in asked]) @ matrix.T
        for q, row in zip(asked, scores, strict=True):
            ranked[q.id] = [[mine[int(i)].id] for i in np.argsort(-row, kind="stable")[:max(KS)]]
    return ranked


def hit(ranking: list[list[str]], answers: tuple[str, ...], k: int) -> bool:
    return any(event in answers for item in ranking[:k] for event in item)


def rate(questions: list[Question], ranking: dict[str, list[list[str]]], k: int, kind: str | None = None) -> str:
    chosen = [q for q in questions if kind is None or q.kind == kind]
    found = sum(hit(ranking[q.id], q.answers, k) for q in chosen)
    return f"{100 * found / len(chosen):.1f} %"


def running_stack(run_dir: Path) -> Stack:
    """The stack `local/stack.py up` started in run_dir: ingest once, then ask again after each
    change to the ranking."""
    return Stack(run_dir, ports=json.loads((run_dir / "stack.json").read_text())["ports"])


def run(stack: Stack, run_dir: Path, events: list[Event], questions: list[Question],
        scopes: list[str]) -> tuple[tuple[float, str] | None, dict, dict, dict, dict, dict]:
    import redis

    env = {**stack.env(), "DD_TRACE_ENABLED": "false", "MEMORY_SPOOL_DIR": str(run_dir / "spool")}
    os.environ.update(env)
    db = redis.Redis(port=stack.ports["falkordb"])
    ingest_s = None if all(db.exists(f"recall_{m}") for m in ("chat", "agent")) else \
        ingest(stack, events, env, run_dir / "worker.log")
    found, latencies, sizes = asyncio.run(ask(questions, scopes))
    groups = [f"recall_{m}" for m in sizes]
    asyncio.run(set_vector_indexes(groups, present=False))
    exact, exact_latencies, _ = asyncio.run(ask(questions, scopes))
    asyncio.run(set_vector_indexes(groups, present=True))
    baselines = {"BM25 over raw texts": bm25_rankings(events, questions),
                 "dense over raw texts": dense_rankings(stack.standin_url, events, questions)}
    latencies |= {f"{scope}, exact scan": exact_latencies[scope] for scope in scopes}
    return ingest_s, found, latencies, sizes, baselines, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", choices=["semantic", "hashed"], default="semantic")
    parser.add_argument("--scopes", default="all,facts,episodes")
    parser.add_argument("--stack-dir", type=Path, help="use the stack `local/stack.py up --embeddings semantic` "
                        "started (its run directory, .stack); ingests only when the groups are not there yet")
    args = parser.parse_args()
    scopes = args.scopes.split(",")
    events, questions = build()
    if args.stack_dir:
        ingest_s, found, latencies, sizes, baselines, exact = run(
            running_stack(args.stack_dir), args.stack_dir, events, questions, scopes)
    else:
        with tempfile.TemporaryDirectory(prefix="memory-bench-recall-") as run_dir:
            stack = Stack(Path(run_dir), embeddings=args.embeddings)
            stack.start()
            try:
                ingest_s, found, latencies, sizes, baselines, exact = run(stack, Path(run_dir), events, questions,
                                                                          scopes)
            finally:
                stack.stop()

    rows = ({f"memory, scope {s}": {q.id: found[s, q.id] for q in questions} for s in scopes}
            | {f"memory, scope {s}, exact scan": {q.id: exact[s, q.id] for q in questions} for s in scopes}
            | baselines)
    counts = {k: sum(q.kind == k for q in questions) for k in KINDS}
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {len(events)} events, {len(questions)} "
          f"questions ({', '.join(f'{n} {k}' for k, n in counts.items())}); stand-in embeddings: "
          f"{args.embeddings}; " + (f"ingestion {ingest_s[0]:.0f} s" if ingest_s else "ingested before"))
    if ingest_s:
        print(ingest_s[1])
    for memory, (episodes, entities, facts) in sizes.items():
        print(f"memory {memory}: {episodes} episodes, {entities} entities, {facts} facts")
    print()
    print("| recall | @5 | @10 | " + " | ".join(f"{k} @10" for k in KINDS) + " | @10 / BM25 |")
    print("|---|---|---|" + "---|" * len(KINDS) + "---|")
    bm25_at_10 = sum(hit(baselines["BM25 over raw texts"][q.id], q.answers, 10) for q in questions)
    for name, ranking in rows.items():
        at_10 = sum(hit(ranking[q.id], q.answers, 10) for q in questions)
        print(f"| {name} | {rate(questions, ranking, 5)} | {rate(questions, ranking, 10)} | "
              + " | ".join(rate(questions, ranking, 10, k) for k in KINDS)
              + f" | {at_10 / bm25_at_10:.2f}× |")
    for scope in scopes:
        missed = [q.id for q in questions if not hit(found[scope, q.id], q.answers, 10)]
        print(f"scope {scope}: missed at 10: {', '.join(missed) or 'none'}")
    print()
    for scope in scopes:
        same = sum(found[scope, q.id] == exact[scope, q.id] for q in questions)
        print(f"scope {scope}: the indexed and the exact search return the same top-10 for {same} of "
              f"{len(questions)} questions ({same / len(questions):.1%})")
    print()
    print("| in-process recall(), cache miss | p50 | p95 |")
    print("|---|---|---|")
    for scope in latencies:
        print(f"| scope {scope} | {statistics.median(latencies[scope]):.1f} ms | "
              f"{percentile(latencies[scope], 0.95):.1f} ms |")


if __name__ == "__main__":
    main()
