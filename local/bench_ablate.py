"""`make bench-ablate`: does each of recall's rules hold on every conversation, or on one? Found @10
(default recall, scope all) with each rule taken out in turn, per memory (a LoCoMo conversation, or
the project corpus's chat and agent log) and overall, beside BM25 and the reciprocal-rank hybrid over
the same raw texts, on the stack that `bench_recall.py --stack-dir` ingested (one embeddings regime).

A rule tuned to one conversation would help it and not the other; the rules are judged on
conversations the project does not have, so each should help (or at least not hurt) every memory
here. A rule is taken out by setting its weight to nothing (bench instrumentation: the module's own
constants, restored after each row), so the rest of recall runs as shipped.

  python local/bench_ablate.py --stack-dir /tmp/stk-sem [--corpora dev,project]
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import redis

import bench_recall
from recall_corpus import Question

# (row, {"Class.CONSTANT": value that takes the rule out}); the first row takes nothing out.
RULES: tuple[tuple[str, dict[str, object]], ...] = (
    ("recall as shipped", {}),
    ("without the vector list", {"_Fusion.MEANING_WEIGHT": 0.0}),
    ("without facts' text evidence", {"_Fusion.FACT_TEXT_SHARE": 0.0}),
    ("without neighbours in time", {"_Recall.NEIGHBOUR_SHARE": 0.0}),
    ("without the second neighbour", {"_Recall.NEIGHBOUR_REACH": 1}),
    ("stock phrases gain as neighbours", {"_SaidAgain.COPIES": "UNWIND $uuids AS u WITH u WHERE false RETURN u"}),
    ("without the named time", {"_NamedTime.NAMED_TIME_BOOST": 0.0}),
    ("without later words (present)", {"_Recall.LATER_WORD_SHARE": 0.0}),
    ("without the named speaker", {"_Fusion.NAMED_SPEAKER_BOOST": 0.0}),
)


def set_constants(mm: Any, values: dict[str, object]) -> dict[str, object]:
    """Set the module's constants; returns what they were."""
    before = {}
    for name, value in values.items():
        owner, constant = name.split(".")
        before[name] = getattr(getattr(mm, owner), constant)
        setattr(getattr(mm, owner), constant, value)
    return before


async def found_without(questions: list[Question], values: dict[str, object]) -> dict[str, list[list[str]]]:
    """Every question's recalled events (as the corpus names them) with `values` set."""
    import memory_manager as mm

    before = set_constants(mm, values)
    ranked: dict[str, list[list[str]]] = {}
    try:
        for memory in sorted({q.memory for q in questions}):
            with mm.in_group(f"recall_{memory}") as group:
                graph = (await mm._falkordb()).select_graph(group)  # bench instrumentation
                rows = (await graph.ro_query("MATCH (e:Episodic) RETURN e.uuid, e.metadata")).result_set
                event_of = {uid: json.loads(meta)["event"] for uid, meta in rows}
                await mm._Cache.invalidate(group)  # the cache knows nothing of the constants
                for q in (q for q in questions if q.memory == memory):
                    items = await mm.recall(q.text, 10)
                    ranked[q.id] = [[event_of[u] for u in item.episodes if u in event_of] for item in items]
    finally:
        set_constants(mm, before)
        await mm.close()
    return ranked


def row(name: str, questions: list[Question], ranking: dict[str, list[list[str]]], memories: list[str]) -> str:
    cells = [bench_recall.rate([q for q in questions if q.memory == m], ranking, 10) for m in memories]
    return f"| {name} | " + " | ".join(f"{c:.1f} %" for c in [*cells, bench_recall.rate(questions, ranking, 10)]) + " |"


def main() -> None:
    args, stack = bench_recall.on_an_ingested_stack(__doc__.splitlines()[0])
    for corpus in args.corpora.split(","):
        events, questions = bench_recall.CORPORA[corpus][0]()
        memories = sorted({q.memory for q in questions})
        missing = [m for m in memories if not redis.Redis(port=stack.ports["falkordb"]).exists(f"recall_{m}")]
        if missing:
            sys.exit(f"bench_ablate: {corpus} is not ingested on {args.stack_dir} (no {', '.join(missing)}): "
                     f"run local/bench_recall.py --stack-dir {args.stack_dir} --corpora {corpus} first")
        bm25 = bench_recall.bm25_rankings(events, questions)
        dense = bench_recall.dense_rankings(stack.standin_url, events, questions)
        print(f"### corpus {corpus}: {len(questions)} questions, stack {args.stack_dir}, found @10\n")
        print("| recall | " + " | ".join(f"{m} ({sum(q.memory == m for q in questions)})" for m in memories)
              + " | all |")
        print("|---|" + "---|" * (len(memories) + 1))
        print(row("BM25 over raw texts", questions, bm25, memories))
        print(row("hybrid over raw texts (RRF)", questions, bench_recall.hybrid_rankings(bm25, dense), memories))
        for name, values in RULES:
            print(row(name, questions, asyncio.run(found_without(questions, values)), memories))
        print()


if __name__ == "__main__":
    main()
