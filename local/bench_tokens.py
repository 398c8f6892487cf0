"""`make bench-tokens`: what an agent's memory tools cost in prompt tokens per question, and whether
what they return holds the answer. search_memory_facts (10 results, every text whole) against the
compact index (search_memory_index: a line per memory) and the index plus the first three memories
opened (get_memories), on the stack that `bench_recall.py --stack-dir` ingested; tokens as OpenAI's
o200k tokenizer counts them (bpe-openai, offline).

  python local/bench_tokens.py --stack-dir /tmp/stk-sem [--corpora dev,project]
"""

from __future__ import annotations

import asyncio
import json
import statistics

import bench_recall
from recall_corpus import Question

OPENED = 3  # memories an agent opens after reading the index


async def costs(questions: list[Question]) -> dict[str, list[tuple[int, bool]]]:
    """Per way of asking: (tokens, holds an answer-bearing event) for every question."""
    import bpe_openai

    import memory_manager as mm

    encoding = bpe_openai.get_encoding("o200k_base")
    measured: dict[str, list[tuple[int, bool]]] = {"search_memory_facts (10)": [], "search_memory_index (10)": [],
                                                   f"index, then get_memories of its first {OPENED}": []}
    for memory in sorted({q.memory for q in questions}):
        with mm.in_group(f"recall_{memory}") as group:
            graph = (await mm._falkordb()).select_graph(group)  # bench instrumentation
            rows = (await graph.ro_query("MATCH (e:Episodic) RETURN e.uuid, e.metadata")).result_set
            event_of = {uid: json.loads(meta)["event"] for uid, meta in rows}
            for q in (q for q in questions if q.memory == memory):
                items = await mm.recall(q.text, 10)
                found = [any(event_of.get(e) in q.answers for e in item.episodes) for item in items]
                facts = await mm.query_memory(q.text, 10)
                index = "\n".join(map(mm._ContextBlock.index_line, items))  # bench instrumentation: the tools' own text
                opened = await mm.get_memories([item.uuid[:mm.SHORT_ID_CHARS] for item in items[:OPENED]])
                details = "\n\n".join(map(mm._McpServer.memory_text, opened))
                for rows_, text, hit in zip(measured.values(), (facts, index, index + "\n" + details),
                                            (any(found), any(found), any(found[:OPENED])), strict=True):
                    rows_.append((len(encoding.encode(text)), hit))
    await mm.close()
    return measured


def main() -> None:
    args, _ = bench_recall.on_an_ingested_stack(__doc__.splitlines()[0])
    for corpus in args.corpora.split(","):
        _, questions = bench_recall.CORPORA[corpus][0]()
        measured = asyncio.run(costs(questions))
        print(f"### corpus {corpus}: {len(questions)} questions, stack {args.stack_dir}\n")
        print("| the agent asks | tokens per question, median | mean | holds an answer-bearing event |")
        print("|---|---|---|---|")
        for name, rows in measured.items():
            tokens = [t for t, _ in rows]
            print(f"| {name} | {statistics.median(tokens):,.0f} | {statistics.mean(tokens):,.0f} | "
                  f"{100 * sum(hit for _, hit in rows) / len(rows):.1f} % |")
        print()


if __name__ == "__main__":
    main()
