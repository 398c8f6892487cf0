"""`make bench-recall`: does recall find what happened? The memory beside BM25, dense retrieval and
their hybrid over the same raw texts, measured in the same run, on two corpora under two embedders.

Corpora: the project's own (local/recall_corpus.py: a multi-session chat and a coding agent's log)
and the dev set (local/locomo_dev.py: two LoCoMo conversations, every turn one event at its
session's date). Embeddings regimes (the OpenAI stand-in's, test infrastructure): `semantic`
(wordllama's static word vectors) and `minilm` (all-MiniLM-L6-v2, a real sentence-embedding
model). Each regime gets its own local stack; every event goes through the real queue and a real
`worker` process at zero latency. Then every labelled question is asked in process; a question is
found at k when one of its answer-bearing events is among the events the first k recalled items
come from (an episode itself, or a fact's source episodes); `share @10` is the share of its
answer-bearing events found in the first 10 (the LoCoMo paper's measure).

Rows per corpus x regime: recall in each scope; each of recall's own lists alone (its BM25 and its
vector search, over events and over facts); BM25 (bm25s, Lucene variant, k1 1.2, b 0.75, English
stopwords), dense (cosine over the same embeddings endpoint) and their reciprocal-rank hybrid over
the raw texts; and `context` (the plugin's session-start block, default budget): the share of
questions whose block holds an answer-bearing event's text. Latency: recall() in process, cache miss.

  python local/bench_recall.py [--corpora project,dev] [--embeddings semantic,minilm] [--exact]
                               [--stack-dir .stack]   (one running stack, one regime: ingests once)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import locomo_dev
import recall_corpus
from recall_corpus import Event, Question
from stack import ROOT, Stack

sys.path.insert(0, str(ROOT / "containers" / "opencode-server" / "graphiti"))
MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
KS = (5, 10)
RAW_DEPTH = 50  # the raw baselines rank this deep, so that collapsing repeated texts still leaves ten
Corpus = Callable[[], tuple[list[Event], list[Question]]]
CORPORA: dict[str, tuple[Corpus, tuple[str, ...]]] = {
    "project": (recall_corpus.build, ("single", "multihop", "temporal", "changed")),
    "dev": (locomo_dev.build, locomo_dev.KINDS)}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def store_all(events: list[Event]) -> None:
    import memory_manager as mm

    for memory in sorted({e.memory for e in events}):
        with mm.in_group(f"recall_{memory}"):
            for event in (e for e in events if e.memory == memory):
                await mm.enqueue_episode(event.text, {"event": event.id}, at=event.at)
    await mm.close()


def standin(stack: Stack, path: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(stack.standin_url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)


# The default models' prices in US$ per million tokens (input, output), as OpenAI published them
# with the GPT-4.1 family on 2025-04-14 (openai.com/api/pricing); docs/benchmarks.md dates them.
PRICES_PER_M = {"gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40), "text-embedding-3-small": (0.02, 0.0)}
CHARS_PER_TOKEN = 4  # tokens estimated from characters (English and code average about four)


def bill_rows(counts: dict, events: int) -> list[tuple[str, str, float, float, float, float]]:
    """(stage, model, requests, prompt tokens, completion tokens, US$ per 1,000 events) per event,
    from the stand-in's bill counters; the last row is the total."""
    stages: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for key, n in counts.items():
        if key.startswith("bill:"):
            stage_model, measure = key.removeprefix("bill:").rsplit(":", 1)
            stage, model = stage_model.rsplit("@", 1)
            stages[(stage, model)][measure] = n
    rows: list[tuple[str, str, float, float, float, float]] = []
    for (stage, model), m in sorted(stages.items()):
        prompt, completion = (m.get(k, 0) / CHARS_PER_TOKEN / events for k in ("prompt_chars", "completion_chars"))
        price_in, price_out = PRICES_PER_M.get(model, (math.nan, math.nan))
        rows.append((stage, model, m.get("requests", 0) / events, prompt, completion,
                     (prompt * price_in + completion * price_out) / 1000))
    def total(name: str, kept: list) -> tuple[str, str, float, float, float, float]:
        return (name, "", *(sum(float(row[i]) for row in kept) for i in range(2, 6)))  # type: ignore[return-value]

    llm = [row for row in rows if row[0] != "embeddings"]
    return [*rows, total("LLM, all stages", llm), total("LLM and embeddings", rows)]


def print_bill(counts: dict, events: int) -> None:
    print("| per stored event: stage (response schema) | model | requests | prompt tokens | completion tokens "
          "| US$ per 1,000 events |")
    print("|---|---|---|---|---|---|")
    for stage, model, requests, prompt, completion, cost in bill_rows(counts, events):
        print(f"| {stage} | {model} | {requests:.2f} | {prompt:,.0f} | {completion:,.0f} | {cost:.3f} |")


def llm_bill(stack: Stack, events: int) -> str:
    """What ingestion asked of the LLM endpoint, per event: requests by kind and the bill table."""
    counts: dict = standin(stack, "/_standin/stats")  # type: ignore[assignment]
    llm = sum(counts.get(k, 0) for k in ("responses", "chat/completions"))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_bill(counts, events)
    return (f"LLM requests per event: {llm / events:.2f}; embeddings requests per event: "
            f"{counts.get('embeddings', 0) / events:.2f}\n\n{buffer.getvalue()}")


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


async def ask(questions: list[Question], scopes: list[str], texts: dict[str, str]) -> Asked:
    """What recall returns for every question in every scope, what each of its own lists returns
    alone, whether the context block holds an answer-bearing event, and the latencies."""
    import memory_manager as mm

    asked = Asked()
    for memory in sorted({q.memory for q in questions}):
        with mm.in_group(f"recall_{memory}") as group:
            await ask_one_memory(mm, group, memory, questions, scopes, texts, asked)
    await mm.close()
    return asked


async def ask_one_memory(mm: Any, group: str, memory: str, questions: list[Question], scopes: list[str],
                         texts: dict[str, str], asked: Asked) -> None:
    """ask() for the questions of one memory (one group)."""
    graph = (await mm._falkordb()).select_graph(group)
    rows = (await graph.ro_query("MATCH (e:Episodic) RETURN e.uuid, e.metadata")).result_set
    event_of = {uid: json.loads(meta)["event"] for uid, meta in rows}
    facts = (await graph.ro_query("MATCH ()-[e:RELATES_TO]->() RETURN count(e)")).result_set[0][0]
    entities = (await graph.ro_query("MATCH (n:Entity) RETURN count(n)")).result_set[0][0]
    invalidated = (await graph.ro_query("MATCH ()-[e:RELATES_TO]->() WHERE e.invalid_at IS NOT NULL "
                                        "RETURN count(e)")).result_set[0][0]
    asked.sizes[memory] = (len(rows), entities, facts, invalidated)
    await mm._Cache.invalidate(group)  # every question a cache miss, whatever an earlier run cached
    await mm.recall("warm up the clients", 10)
    mine = [q for q in questions if q.memory == memory]
    for scope in scopes:
        for q in mine:
            started = time.perf_counter()
            items = await mm.recall(q.text, 10, scope=scope)
            asked.latencies[f"scope {scope}"].append((time.perf_counter() - started) * 1000)
            asked.found[f"memory, scope {scope}"][q.id] = [[event_of[u] for u in item.episodes if u in event_of]
                                                           for item in items]
    for q in mine:
        await own_lists(mm, graph, q, event_of, asked.found)
        started = time.perf_counter()
        block = await mm.context(q.text)
        asked.latencies["context"].append((time.perf_counter() - started) * 1000)
        asked.context_hits[q.id] = any(" ".join(texts[a].split())[:120] in block for a in q.answers)


@dataclass
class Asked:
    found: dict[str, dict[str, list[list[str]]]] = field(default_factory=lambda: defaultdict(dict))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    sizes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    context_hits: dict[str, bool] = field(default_factory=dict)


async def own_lists(mm: object, graph: object, q: Question, event_of: dict[str, str],
                    found: dict[str, dict[str, list[list[str]]]]) -> None:
    """Recall's own four lists, each alone (bench instrumentation: the module's private searches)."""
    window, at = mm._Window(), mm._utc_iso(mm.datetime.now(mm.UTC))  # type: ignore[attr-defined]
    vector = await mm._QuestionEmbedding.of(mm.UNSEARCHABLE.sub(" ", q.text))  # type: ignore[attr-defined]
    terms = mm._Recall.query_terms(q.text)  # type: ignore[attr-defined]
    for name, kind in (("events", mm.EPISODES), ("facts", mm.FACTS)):  # type: ignore[attr-defined]
        text = await mm._Recall.bm25(graph, kind, terms, window, at)  # type: ignore[attr-defined]
        meaning = await mm._Recall.nearest(graph, kind, vector, window, at)  # type: ignore[attr-defined]
        for label, hits in ((f"its BM25 over {name} alone", text), (f"its vector search over {name} alone", meaning)):
            uuids = [uid for _, uid in hits[:max(KS)]]
            if kind is mm.FACTS:  # type: ignore[attr-defined]
                records = await mm._Recall.details(graph, kind, uuids)  # type: ignore[attr-defined]
                found[label][q.id] = [[event_of[e] for e in records[u]["episodes"] or [] if e in event_of]
                                      for u in uuids if u in records]
            else:
                found[label][q.id] = [[event_of[u]] for u in uuids if u in event_of]


async def set_vector_indexes(groups: list[str], present: bool) -> None:
    """Drop every group's vector indexes (recall falls back to an exact scan), or build them again
    as the worker does; either way the cached answers are made stale."""
    import memory_manager as mm

    for group in groups:
        with mm.in_group(group):
            graph = (await mm._falkordb()).select_graph(group)
            if present:
                await mm._Indexes.ensure(group)
            else:
                for _label, prop, pattern in mm.VECTOR_INDEXES:
                    await graph.query(f"DROP VECTOR INDEX FOR {pattern} ON (x.{prop})")
            await mm._Cache.invalidate(group)  # bench instrumentation
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
                                         k=min(RAW_DEPTH, len(mine)), show_progress=False)
            ranked[q.id] = [[mine[int(i)].id] for i in docs[0]]
    return ranked


def embed(url: str, texts: list[str]) -> np.ndarray:
    vectors = []
    for start in range(0, len(texts), 32):  # small requests: MiniLM takes ~0.1 s a text on a loaded machine
        body = json.dumps({"model": "text-embedding-3-small", "input": texts[start:start + 32]}).encode()
        request = urllib.request.Request(f"{url}/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as reply:
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
            ranked[q.id] = [[mine[int(i)].id] for i in np.argsort(-row, kind="stable")[:RAW_DEPTH]]
    return ranked


def hybrid_rankings(*rankings: dict[str, list[list[str]]]) -> dict[str, list[list[str]]]:
    """Reciprocal-rank fusion (k 60) of the first ten of rankings over the raw texts, equal votes."""
    fused = {}
    for qid in rankings[0]:
        scores: dict[str, float] = defaultdict(float)
        for ranking in rankings:
            for rank, item in enumerate(ranking[qid][:max(KS)], start=1):
                scores[item[0]] += 1 / (60 + rank)
        fused[qid] = [[event] for event in sorted(scores, key=lambda e: (-scores[e], e))[:max(KS)]]
    return fused


def collapsed(ranking: dict[str, list[list[str]]], texts: dict[str, str]) -> dict[str, list[list[str]]]:
    """Each text once, where it first ranks: recall's own collapse of repeated events, on a baseline."""
    def once(items: list[list[str]]) -> list[list[str]]:
        first = {texts[item[0]]: item for item in reversed(items)}  # reversed: the first of each text wins
        return [item for item in items if first[texts[item[0]]] is item]

    return {qid: once(items) for qid, items in ranking.items()}


def hit(ranking: list[list[str]], answers: tuple[str, ...], k: int) -> bool:
    return any(event in answers for item in ranking[:k] for event in item)


def first_hit(ranking: list[list[str]], answers: tuple[str, ...]) -> int:
    return next((i for i, item in enumerate(ranking) if any(event in answers for event in item)), len(ranking) + 1)


def best_per_question(questions: list[Question],
                      rankings: list[dict[str, list[list[str]]]]) -> dict[str, list[list[str]]]:
    """For each question, whichever ranking finds an answer-bearing event first: what a fusion that
    always picked the right list would find (fusion can beat it only by lifting what every list
    ranks low)."""
    return {q.id: min((r[q.id] for r in rankings), key=lambda ranking: first_hit(ranking, q.answers))
            for q in questions}


def share(ranking: list[list[str]], answers: tuple[str, ...], k: int) -> float:
    got = {event for item in ranking[:k] for event in item}
    return sum(a in got for a in answers) / len(answers)


def rate(questions: list[Question], ranking: dict[str, list[list[str]]], k: int, kind: str | None = None) -> float:
    chosen = [q for q in questions if kind is None or q.kind == kind]
    return 100 * sum(hit(ranking[q.id], q.answers, k) for q in chosen) / max(1, len(chosen))


def running_stack(run_dir: Path) -> Stack:
    """The stack `local/stack.py up` started in run_dir: ingest once, then ask again after each
    change to the ranking."""
    return Stack(run_dir, ports=json.loads((run_dir / "stack.json").read_text())["ports"])


def on_an_ingested_stack(description: str) -> tuple[argparse.Namespace, Stack]:
    """`--stack-dir` and `--corpora` of a bench that asks again on a stack this bench ingested, with the
    module's environment pointed at that stack."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--stack-dir", type=Path, required=True)
    parser.add_argument("--corpora", default="dev,project")
    args = parser.parse_args()
    stack = running_stack(args.stack_dir)
    os.environ.update({**stack.env(), "DD_TRACE_ENABLED": "false", "MEMORY_SPOOL_DIR": str(args.stack_dir / "spool")})
    return args, stack


@dataclass
class Measured:
    corpus: str
    regime: str
    questions: list[Question]
    kinds: tuple[str, ...]
    rows: dict[str, dict[str, list[list[str]]]]
    asked: Asked
    ingestion: tuple[float, str] | None
    exact_same: dict[str, float] = field(default_factory=dict)


CEILING = "its best list for each question (a ceiling for picking one)"


def measure(stack: Stack, run_dir: Path, corpus: str, regime: str, scopes: list[str], exact: bool) -> Measured:
    import redis

    build, kinds = CORPORA[corpus]
    events, questions = build()
    env = {**stack.env(), "DD_TRACE_ENABLED": "false", "MEMORY_SPOOL_DIR": str(run_dir / "spool")}
    os.environ.update(env)
    db = redis.Redis(port=stack.ports["falkordb"])
    memories = sorted({e.memory for e in events})
    ingestion = None if all(db.exists(f"recall_{m}") for m in memories) else \
        ingest(stack, events, env, run_dir / f"worker-{corpus}.log")
    texts = {e.id: e.text for e in events}
    asked = asyncio.run(ask(questions, scopes, texts))
    bm25, dense = bm25_rankings(events, questions), dense_rankings(stack.standin_url, events, questions)
    rows = {**{f"memory, scope {s}": asked.found[f"memory, scope {s}"] for s in scopes},
            **{k: v for k, v in asked.found.items() if k.startswith("its ")},
            "BM25 over raw texts": bm25, "dense over raw texts": dense,
            "hybrid over raw texts (RRF)": hybrid_rankings(bm25, dense)}
    spoken = {e.id: f"{e.memory} {' '.join(e.text.split())}" for e in events}
    bm25_once, dense_once = collapsed(bm25, spoken), collapsed(dense, spoken)
    rows |= {"BM25 over raw texts, repeats collapsed": bm25_once, "dense over raw texts, repeats collapsed": dense_once,
             "hybrid over raw texts, repeats collapsed": hybrid_rankings(bm25_once, dense_once)}
    own = [ranking for name, ranking in rows.items() if name.startswith("its ")]
    if own:
        rows[CEILING] = best_per_question(questions, own)
    measured = Measured(corpus, regime, questions, kinds, rows, asked, ingestion)
    if exact:  # every question again with the vector indexes dropped: recall's exact scan
        groups = [f"recall_{m}" for m in memories]
        asyncio.run(set_vector_indexes(groups, present=False))
        scan = asyncio.run(ask(questions, scopes, texts))
        asyncio.run(set_vector_indexes(groups, present=True))
        for s in scopes:
            same = sum(scan.found[f"memory, scope {s}"][q.id] == rows[f"memory, scope {s}"][q.id] for q in questions)
            measured.exact_same[s] = same / len(questions)
    return measured


def report(m: Measured) -> None:
    qs = m.questions
    counts = ", ".join(f"{sum(q.kind == k for q in qs)} {k}" for k in m.kinds)
    print(f"### corpus {m.corpus}, embeddings {m.regime}: {len(qs)} questions ({counts})")
    for memory, (episodes, entities, facts, invalidated) in m.asked.sizes.items():
        print(f"memory {memory}: {episodes} episodes, {entities} entities, {facts} facts, {invalidated} of them "
              f"invalidated ({100 * invalidated / max(1, episodes):.1f} per 100 events)")
    if m.ingestion:
        print(f"ingestion {m.ingestion[0]:.0f} s; {m.ingestion[1]}")
    baselines = ("BM25 over raw texts", "dense over raw texts", "hybrid over raw texts (RRF)")
    best_baseline = max(rate(qs, m.rows[b], 10) for b in baselines)
    print()
    print("| recall | @5 | @10 | share @10 | " + " | ".join(f"{k} @10" for k in m.kinds) + " | @10 / best raw |")
    print("|---|---|---|---|" + "---|" * len(m.kinds) + "---|")
    for name, ranking in m.rows.items():
        shares = 100 * sum(share(ranking[q.id], q.answers, 10) for q in qs) / len(qs)
        print(f"| {name} | {rate(qs, ranking, 5):.1f} % | {rate(qs, ranking, 10):.1f} % | {shares:.1f} % | "
              + " | ".join(f"{rate(qs, ranking, 10, k):.1f} %" for k in m.kinds)
              + f" | {rate(qs, ranking, 10) / best_baseline:.2f}× |")
    def block_rate(kind: str | None = None) -> str:
        chosen = [q for q in qs if kind is None or q.kind == kind]
        return f"{100 * sum(m.asked.context_hits[q.id] for q in chosen) / max(1, len(chosen)):.1f} %"

    print(f"| context block (default budget): holds an answer-bearing event | | {block_rate()} | | "
          + " | ".join(block_rate(k) for k in m.kinds) + " | |")
    print()
    print("| in process, cache miss | p50 | p95 |")
    print("|---|---|---|")
    for name, samples in m.asked.latencies.items():
        print(f"| {name} | {statistics.median(samples):.1f} ms | {percentile(samples, 0.95):.1f} ms |")
    for scope, same in m.exact_same.items():
        print(f"scope {scope}: the indexed and the exact search return the same top-10 for {same:.1%} of questions")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", default="project,dev")
    parser.add_argument("--embeddings", default="semantic,minilm",
                        help="stand-in regimes: semantic, minilm, hashed")
    parser.add_argument("--scopes", default="all,facts,episodes")
    parser.add_argument("--exact", action="store_true", help="also ask with the vector indexes dropped")
    parser.add_argument("--stack-dir", type=Path, help="use the stack `local/stack.py up --embeddings X` started "
                        "(its run directory); ingests only the corpora not there yet; one regime")
    args = parser.parse_args()
    scopes, corpora, regimes = args.scopes.split(","), args.corpora.split(","), args.embeddings.split(",")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; corpora {', '.join(corpora)}; "
          f"stand-in embeddings {', '.join(regimes)}; found @k: an answer-bearing event among the first k "
          "items' events")
    print()
    for regime in regimes:
        if args.stack_dir:
            stack = running_stack(args.stack_dir)
            for corpus in corpora:
                report(measure(stack, args.stack_dir, corpus, regime, scopes, args.exact))
            continue
        with tempfile.TemporaryDirectory(prefix="memory-bench-recall-") as run_dir:
            stack = Stack(Path(run_dir), embeddings=regime)
            stack.start()
            try:
                for corpus in corpora:
                    report(measure(stack, Path(run_dir), corpus, regime, scopes, args.exact))
            finally:
                stack.stop()


if __name__ == "__main__":
    main()
