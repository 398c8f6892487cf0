"""`make bench-ingest`: sustained load on the write path, on the embedded local stack.

One real `worker` (MEMORY_WORKER_CONCURRENCY=4), the OpenAI stand-in (test infrastructure) at
--latency-ms per request. Each group receives one event every --every-s seconds, queued through the
real `store` path (enqueue_episode in this process) for --minutes; then the queue drains. Per group
count: 1, then 4 at once. Prints, per run: ingestion lag (queued -> in the graph) p50/p95 over the
first, middle and last third of the events, queue depth sampled over time, LLM requests, embeddings
requests and prompt size per event (the stand-in's counts and recorded bodies), and the worker's
RSS (VmRSS at the end, VmHWM peak).

  python local/bench_ingest.py [--minutes 10] [--every-s 5] [--latency-ms 1000] [--groups 1,4]
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
from datetime import datetime
from pathlib import Path

import redis

from bench import MODULE, percentile
from bench_queue import event, set_latency, wait_heartbeat
from bench_recall import print_bill, standin
from stack import Stack

sys.path.insert(0, str(MODULE.parent))


async def feed(groups: list[str], minutes: float, every_s: float, depth: list[tuple[float, int]],
               stack: Stack) -> dict[str, float]:
    """Queue one event per group every `every_s`; {job id: monotonic time it was queued}."""
    import memory_manager as mm

    queued: dict[str, float] = {}
    valkey = redis.Redis(port=stack.ports["valkey"])
    started = time.monotonic()
    for i in range(int(minutes * 60 / every_s)):
        for group in groups:
            os.environ["MEMORY_GROUP_ID"] = group
            await mm.close()
            job = await mm.enqueue_episode(event(group, i), {"run": i})
            queued[job.job_id] = time.time()
        depth.append((time.monotonic() - started, backlog(valkey, groups)))
        await asyncio.sleep(max(0.0, started + (i + 1) * every_s - time.monotonic()))
    await mm.close()
    return queued


def backlog(valkey: redis.Redis, groups: list[str]) -> int:
    """Entries not yet acknowledged, over every group (queued and in flight)."""
    total = 0
    for group in groups:
        key = f"memory:{{{group}}}:episodes"
        total += valkey.xlen(key) if valkey.exists(key) else 0
    return total


def ingested_at(stack: Stack, group: str) -> dict[str, float]:
    """{job id: when graphiti wrote the episode} from the group's graph."""
    db = redis.Redis(port=stack.ports["falkordb"], decode_responses=True)
    try:
        rows = db.execute_command("GRAPH.RO_QUERY", group, "MATCH (e:Episodic) RETURN e.job_id, e.created_at")[1]
    finally:
        db.close()
    return {job: datetime.fromisoformat(created).timestamp() for job, created in rows}


def rss_kb(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def run(stack: Stack, run_dir: Path, count: int, args: argparse.Namespace) -> None:
    groups = [f"ingest_{count}_{n}" for n in range(count)]
    env = {**stack.env(), "DD_TRACE_ENABLED": "false", "MEMORY_AUTO_DRAIN": "off", "MEMORY_WORKER_CONCURRENCY": "4",
           "MEMORY_SPOOL_DIR": str(run_dir / "spool")}
    os.environ.update(env)
    standin(stack, "/_standin/reset", {})
    set_latency(stack, args.latency_ms)
    standin(stack, "/_standin/faults", {"record": True})
    with open(run_dir / f"worker-{count}.log", "w") as log:
        worker = subprocess.Popen([sys.executable, str(MODULE), "worker"], env={**os.environ, **env},
                                  stdout=log, stderr=subprocess.STDOUT)
    wait_heartbeat(stack, present=True)
    depth: list[tuple[float, int]] = []
    started = time.monotonic()
    queued = asyncio.run(feed(groups, args.minutes, args.every_s, depth, stack))
    valkey = redis.Redis(port=stack.ports["valkey"])
    while backlog(valkey, groups):
        depth.append((time.monotonic() - started, backlog(valkey, groups)))
        time.sleep(args.every_s)
    drained_s = time.monotonic() - started
    rss, peak = rss_kb(worker.pid)
    worker.terminate()
    worker.wait(timeout=60)
    counts: dict = standin(stack, "/_standin/stats")  # type: ignore[assignment]
    bodies: list = standin(stack, "/_standin/requests")  # type: ignore[assignment]
    standin(stack, "/_standin/reset", {})

    done = {job: at for group in groups for job, at in ingested_at(stack, group).items()}
    lags = [done[job] - at for job, at in sorted(queued.items(), key=lambda kv: kv[1]) if job in done]
    events = len(queued)
    llm = sum(counts.get(k, 0) for k in ("responses", "chat/completions"))
    prompts = sum(len(b) for b in bodies if "embedding" not in json.loads(b).get("model", ""))
    thirds = [lags[i * len(lags) // 3:(i + 1) * len(lags) // 3] for i in range(3)]
    print(f"\n{count} group(s), one event every {args.every_s:g} s each for {args.minutes:g} min "
          f"({events} events, {len(lags)} ingested), {args.latency_ms} ms per LLM request; drained after "
          f"{drained_s:.0f} s\n")
    print("| lag queued → in the graph | p50 | p95 |")
    print("|---|---|---|")
    for name, part in zip(("first third of the events", "middle third", "last third"), thirds, strict=True):
        if part:
            print(f"| {name} | {statistics.median(part):.0f} s | {percentile(part, 0.95):.0f} s |")
    print(f"| all | {statistics.median(lags):.0f} s | {percentile(lags, 0.95):.0f} s |")
    samples = depth[:: max(1, len(depth) // 8)]
    print("\nqueue depth over time: " + ", ".join(f"{t:.0f} s: {n}" for t, n in samples))
    print(f"per event: {llm / events:.2f} LLM requests, {counts.get('embeddings', 0) / events:.2f} embeddings "
          f"requests, {prompts / events / 1000:.1f} KB of LLM request bodies (~{prompts / events / 4:,.0f} "
          f"prompt tokens at 4 characters each); worker RSS {rss / 1024:.0f} MB at the end, peak {peak / 1024:.0f} MB")
    print()
    print_bill(counts, events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--every-s", type=float, default=5)
    parser.add_argument("--latency-ms", type=int, default=1000)
    parser.add_argument("--groups", default="1,4")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="memory-bench-ingest-") as run_dir:
        stack = Stack(Path(run_dir))
        stack.start()
        try:
            for count in (int(c) for c in args.groups.split(",")):
                run(stack, Path(run_dir), count, args)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
