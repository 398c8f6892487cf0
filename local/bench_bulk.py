"""`make bench-bulk`: would graphiti's add_episode_bulk ingest a backlog faster or cheaper than the
worker's one add_episode per event? Measured, not adopted (docs/benchmarks.md says why).

On a fresh local stack, with the OpenAI stand-in (test infrastructure) at --latency-ms per request
(embeddings too), the same --events events (bench-ingest's: each names Erin and Valkey again) go
into two groups: one through graphiti's add_episode, one event at a time, as the worker stores them;
the other through add_episode_bulk in batches of --batch. Prints wall time, events a minute, LLM
requests per event by graphiti stage (response schema), embeddings requests, and what the graphs
hold (facts, entities), so a cheaper path that stores less would show.

  python local/bench_bulk.py [--events 10] [--batch 5] [--latency-ms 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench import MODULE
from bench_queue import event, set_latency
from bench_recall import standin
from stack import Stack

sys.path.insert(0, str(MODULE.parent))
START = datetime(2026, 12, 1, tzinfo=UTC)


async def ingest(stack: Stack, group: str, events: int, batch: int, latency_ms: int) -> float:
    """Seconds to ingest `events` into `group`: batch 1 is add_episode per event."""
    from graphiti_core.nodes import EpisodeType
    from graphiti_core.utils.bulk_utils import RawEpisode

    import memory_manager as mm

    os.environ["MEMORY_GROUP_ID"] = group
    await mm.close()
    graphiti = await mm._graphiti(group)
    await mm._Indexes.ensure(group)
    standin(stack, "/_standin/reset", {})
    set_latency(stack, latency_ms)
    started = time.monotonic()
    for first in range(0, events, batch):
        raws = [RawEpisode(name=f"event_{i}", content=event(group, i), source_description=mm.EPISODE_SOURCE,
                           source=EpisodeType.text, reference_time=START + timedelta(seconds=5 * i))
                for i in range(first, min(events, first + batch))]
        if batch == 1:
            [raw] = raws
            await graphiti.add_episode(name=raw.name, episode_body=raw.content,
                                       source_description=raw.source_description, reference_time=raw.reference_time,
                                       source=raw.source, group_id=group, entity_types=mm._entity_types())
        else:
            await graphiti.add_episode_bulk(raws, group_id=group, entity_types=mm._entity_types())
    return time.monotonic() - started


async def graph_holds(group: str) -> tuple[int, int]:
    import memory_manager as mm

    graph = (await mm._falkordb()).select_graph(group)
    facts = (await graph.ro_query("MATCH ()-[r:RELATES_TO]->() RETURN count(r)")).result_set[0][0]
    entities = (await graph.ro_query("MATCH (n:Entity) RETURN count(n)")).result_set[0][0]
    return facts, entities


async def compare(stack: Stack, args: argparse.Namespace) -> None:
    import memory_manager as mm

    rows = []
    for label, batch in (("add_episode, one event at a time (the worker)", 1),
                         (f"add_episode_bulk, batches of {args.batch}", args.batch)):
        group = f"bulk_{batch}"
        seconds = await ingest(stack, group, args.events, batch, args.latency_ms)
        counts: dict = standin(stack, "/_standin/stats")  # type: ignore[assignment]
        rows.append((label, seconds, counts, *await graph_holds(group)))
    await mm.close()
    print(f"\n{args.events} events, {args.latency_ms} ms per request (LLM and embeddings)\n")
    print("| path | wall | events / min | LLM requests / event | embeddings / event | facts | entities |")
    print("|---|---|---|---|---|---|---|")
    for label, seconds, counts, facts, entities in rows:
        llm = counts.get("responses", 0) + counts.get("chat/completions", 0)
        print(f"| {label} | {seconds:.1f} s | {args.events / seconds * 60:.1f} | {llm / args.events:.2f} | "
              f"{counts.get('embeddings', 0) / args.events:.2f} | {facts} | {entities} |")
    for label, _, counts, _, _ in rows:
        stages = sorted((k.split(":", 1)[1], n) for k, n in counts.items() if k.startswith("responses:"))
        print(f"\n{label}: " + ", ".join(f"{name} {n / args.events:.2f}" for name, n in stages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--latency-ms", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as run_dir:
        stack = Stack(Path(run_dir))
        stack.start()
        try:
            os.environ.update({**stack.env(), "DD_TRACE_ENABLED": "false"})
            print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
            asyncio.run(compare(stack, args))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
