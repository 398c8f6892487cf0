"""`make demo`: the real CLI end to end on the embedded local stack.

Starts FalkorDB, Valkey and (unless a real OpenAI key is configured) the OpenAI stand-in on free
loopback ports, queues five OpenCode events (content on stdin, as the plugin sends it; the first
store starts a drainer), shows the queue, waits until the drainer has ingested them, queries twice
(miss, then hit), lists entities,
runs `health`, exports the memory to B2 (the stack's local B2-native endpoint unless B2 credentials
are set), summarises the spans and metrics that Datadog's test agent and the DogStatsD catcher
received, and stops everything it started.

  python local/demo.py [--services plain|tls|cluster]

tls: FalkorDB and Valkey on TLS only with ACL users (certificates made by the stack), as managed
services are; cluster: Valkey Cluster and a FalkorDB cluster, three masters each. Both need
Debian's valkey-server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from stack import ROOT, SecuredServices, Stack, ValkeyCluster

MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"

EVENTS = [
    ("Edited src/server/session.ts to retry FalkorDB writes in persistSession() with exponential backoff.",
     '{"event": "file.edited", "path": "src/server/session.ts"}'),
    ("TypeError in src/tools/grep.ts: readFileSync() returned undefined for binary files; the Bash tool hid it.",
     '{"event": "session.error", "tool": "grep"}'),
    ("Completed task: migrated the OpenCode plugin loader from CommonJS to ESM; all Vitest suites pass.",
     '{"event": "session.idle", "status": "completed"}'),
    ("Decision: Valkey caches memory queries for 300 seconds; FalkorDB stays the source of truth.",
     '{"event": "decision", "by": "team"}'),
    ("Alice prefers Bun over Node for running TypeScript scripts in the OpenCode repo.",
     '{"event": "preference", "user": "alice"}'),
]
QUESTION = "How do we handle FalkorDB write failures in the session code?"


def llm_mode() -> tuple[str, dict[str, str]]:
    """Real OpenAI when a key is set and no base URL redirects it; otherwise the stand-in."""
    if os.environ.get("OPENAI_API_KEY") and not os.environ.get("OPENAI_BASE_URL"):
        return "OpenAI (OPENAI_API_KEY is set)", {"OPENAI_API_KEY": os.environ["OPENAI_API_KEY"]}
    return "the local OpenAI stand-in (test infrastructure; no OpenAI key or a custom base URL)", {}


def b2_mode(stack: Stack) -> tuple[str, dict[str, str]]:
    """Real B2 when all three credentials are set; otherwise the stack's local endpoint."""
    if all(os.environ.get(name) for name in ("B2_KEY_ID", "B2_APP_KEY", "B2_BUCKET")):
        return "Backblaze B2 (B2_KEY_ID, B2_APP_KEY and B2_BUCKET are set)", {}
    return (f"the local B2-native endpoint at {stack.b2_url} (test infrastructure on b2sdk's RawSimulator; "
            "set B2_KEY_ID, B2_APP_KEY and B2_BUCKET for real B2)", stack.b2_env())


def datadog_summary(stack: Stack) -> None:
    """What the local Datadog test agent and the DogStatsD catcher received during the demo."""
    time.sleep(0.5)
    with urllib.request.urlopen(f"{stack.agent_url}/test/traces", timeout=5) as reply:
        traces = json.load(reply)
    spans = Counter(s["name"] for trace in traces for s in trace)
    roots = Counter(s["resource"] for trace in traces for s in trace if not s["parent_id"])
    lines = stack.dogstatsd_log.read_text().splitlines() if stack.dogstatsd_log.exists() else []
    metrics = Counter(line.split(":", 1)[0] for line in lines)
    print(f"\nDatadog (local test agent at {stack.agent_url}): {len(traces)} traces, {sum(spans.values())} spans")
    print("  traces by operation: " + ", ".join(f"{k} {v}" for k, v in sorted(roots.items())))
    print("  child spans: " + ", ".join(f"{k} {v}" for k, v in sorted(spans.items()) if k.count(".") > 1))
    print(f"DogStatsD (catcher on udp://127.0.0.1:{stack.ports['dogstatsd']}): {len(lines)} metrics")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(metrics.items())))


def run(env: dict[str, str], *args: str, stdin: str | None = None) -> tuple[str, float]:
    shown = " ".join(shlex.quote(a if len(a) < 60 else a[:57] + "...") for a in args)
    piped = f"echo {shlex.quote(stdin[:40] + '...')} | " if stdin else ""
    print(f"\n$ {piped}memory-manager {shown}")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(MODULE), *args], env=env, text=True, capture_output=True,
                          input=stdin)
    elapsed_ms = (time.perf_counter() - started) * 1000
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"demo: command failed with exit {done.returncode}")
    return done.stdout, elapsed_ms


def wait_until_ingested(env: dict[str, str], timeout_s: float = 600) -> float:
    started = time.monotonic()
    while True:
        done = subprocess.run([sys.executable, str(MODULE), "queue", "--json"], env=env, text=True,
                              capture_output=True, check=True)
        groups = json.loads(done.stdout)["groups"]
        if sum(g["queued"] for g in groups) == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"demo: episodes still queued after {timeout_s:.0f} s: {groups}")
        time.sleep(0.5)


def graph_and_cache(services: str, run_dir: Path, stack: Stack, started: contextlib.ExitStack) -> tuple[str, dict]:
    """Where FalkorDB and Valkey are: the stack's own, or TLS-only / clustered ones started here."""
    if services == "tls":
        secured = SecuredServices(run_dir / "secured")
        secured.start()
        started.callback(secured.stop)
        return (f"FalkorDB TLS :{secured.ports['falkordb']} (user falkordb), Valkey TLS :{secured.ports['valkey']} "
                "(user memory, client certificate)"), secured.env()
    if services == "cluster":
        cache, graphs = ValkeyCluster(run_dir / "valkey-cluster"), ValkeyCluster(run_dir / "falkordb-cluster", True)
        for cluster in (cache, graphs):
            cluster.start()
            started.callback(cluster.stop)
        return (f"FalkorDB cluster :{graphs.ports[0]} (3 shards), Valkey Cluster :{cache.ports[0]} (3 masters)",
                {**cache.env(), "FALKORDB_HOST": "127.0.0.1", "FALKORDB_PORT": str(graphs.ports[0])})
    return f"FalkorDB :{stack.ports['falkordb']}, {stack.cache_flavour} :{stack.ports['valkey']}", {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", choices=["plain", "tls", "cluster"], default="plain")
    args = parser.parse_args()
    mode, openai_env = llm_mode()
    print(f"LLM: {mode}")
    with tempfile.TemporaryDirectory(prefix="memory-demo-") as run_dir, contextlib.ExitStack() as started:
        stack = Stack(Path(run_dir))
        stack.start()
        started.callback(stack.stop)
        where, services_env = graph_and_cache(args.services, Path(run_dir), stack, started)
        b2_target, b2_env = b2_mode(stack)
        keep_b2 = b2_env or {k: v for k, v in os.environ.items() if k.startswith("B2_")}
        env = {**os.environ, **stack.env(), **services_env, "MEMORY_GROUP_ID": "demo", **openai_env, **keep_b2,
               "MEMORY_SPOOL_DIR": str(Path(run_dir) / "spool"), "MEMORY_DRAIN_IDLE": "5"}
        if openai_env:
            env.pop("OPENAI_BASE_URL", None)
            for name in ("MEMORY_LLM_MODEL", "MEMORY_LLM_SMALL_MODEL", "MEMORY_EMBEDDING_MODEL"):
                env.pop(name, None)
        print(f"Stack: {where}" + ("" if openai_env else f", stand-in :{stack.ports['standin']}"))
        for content, metadata in EVENTS:
            _, ms = run(env, "store", "-", metadata, stdin=content)
            print(f"  ({ms:.0f} ms: queued; the drainer ingests in the background)")
        run(env, "queue")
        ingest_s = wait_until_ingested(env)
        print(f"\nAll {len(EVENTS)} episodes ingested {ingest_s:.1f} s after the last store returned.")
        _, miss_ms = run(env, "query", QUESTION)
        _, hit_ms = run(env, "query", QUESTION)
        run(env, "entities")
        run(env, "health")
        print(f"\nExport goes to {b2_target}.")
        run(env, "export")
        datadog_summary(stack)
        print(f"\nquery: cache miss {miss_ms:.0f} ms, cache hit {hit_ms:.0f} ms (whole process)")


if __name__ == "__main__":
    main()
