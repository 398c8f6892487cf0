"""Requirement: Datadog traces and metrics (spec: memory-manager / Traces, Metrics, Never slow).

Spans go to Datadog's own test agent (ddapm-test-agent, started by the stack); each test ties the
CLI's spans to its own session token through the writer header the test agent documents. Snapshots
of the trace structure live in tests/snapshots and are compared by the test agent itself.
DogStatsD datagrams are read off a UDP socket the test owns.
"""

import json
import re
import subprocess
import sys
import time

import pytest
import redis

from conftest import MODULE, Memory, stop, wait_for_no_worker

# Values that legitimately differ between runs and machines; everything else must match.
SNAPSHOT_IGNORES = ",".join([
    "meta.memory.episode", "meta.memory.job", "metrics.memory.bytes", "meta.error.message", "meta._dd.tags.process",
    "metrics.memory.nodes", "metrics.memory.edges", "metrics.memory.groups",
])
CANARIES = {
    "OPENAI_API_KEY": "sk-canary-openai-4e1f9a",
    "B2_APP_KEY": "canary-b2-key-77c0d2",
    "VALKEY_PASSWORD": "canary-valkey-pw-31ab8e",
    "FALKORDB_PASSWORD": "canary-falkor-pw-9d5c6f",
}
CONTENT_CANARY = "canary-content-0b7e55"


def traced(memory: Memory, token: str, **changes: str) -> Memory:
    """Tracing on, tied to the test's session token. Traced stores start no drainer: its ingest
    traces would land in the same session (test_ingestion_is_one_trace... covers those)."""
    return memory.with_env(DD_TRACE_ENABLED="true", MEMORY_AUTO_DRAIN="off",
                           _DD_TRACE_WRITER_ADDITIONAL_HEADERS=f"X-Datadog-Test-Session-Token:{token}", **changes)


@pytest.fixture
def fixed_group(stack, request) -> Memory:
    """A group named after the test (snapshots compare tags) and emptied first."""
    group = "obs_" + request.node.name.split("[")[-1].rstrip("]").replace("-", "_")
    db = redis.Redis(port=stack.ports["falkordb"])
    if db.exists(group):
        db.execute_command("GRAPH.DELETE", group)
    db.close()
    memory = Memory(stack, group)
    redis.Redis(port=stack.ports["valkey"]).delete(f"memory:{{{group}}}:gen")
    return memory


def span_tree(trace: list[dict]) -> tuple[dict, dict[str, list[str]]]:
    root = next(s for s in trace if s["parent_id"] == 0)
    by_id = {s["span_id"]: s for s in trace}
    children: dict[str, list[str]] = {}
    for s in trace:
        if s["parent_id"]:
            children.setdefault(by_id[s["parent_id"]]["name"], []).append(s["name"])
    return root, {k: sorted(v) for k, v in children.items()}


COMMANDS = {
    "store": (["store", "We chose FalkorDB over Neo4j for the graph database.", '{"event": "decision"}'],
              {"memory.store": ["memory.enqueue"]}),
    "query-miss": (["query", "graph database", "3"],
                   {"memory.query": ["memory.cache.write", "memory.graph.search"]}),
    "query-hit": (["query", "graph database", "3"], {}),  # one MGET: the root span says cache.hit
    "entities": (["entities", "Technology"], {}),
    "health": (["health"], {}),
    "export-file": (["export", "--output", "{tmp}/e.json"], {"memory.export": ["memory.export.stream"]}),
    "export-b2": (["export"], {"memory.export": ["memory.b2.upload", "memory.export.stream"]}),
    "restore": (["restore", "{tmp}/e.json", "--dry-run", "--replace"], {"memory.restore": ["memory.restore.validate"]}),
}


@pytest.mark.parametrize("case", list(COMMANDS))
def test_every_command_produces_one_trace_with_its_structure_and_tags(fixed_group, agent, tmp_path, case):
    args, expected_children = COMMANDS[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if case != "store":
        fixed_group.store("We chose FalkorDB over Neo4j for the graph database.")
    if case == "query-hit":
        fixed_group.ok(*args)
    if case == "restore":
        fixed_group.ok("export", "--output", str(tmp_path / "e.json"))
    token = f"memory_{case.replace('-', '_')}"
    agent.start(token)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fixed_group = traced(fixed_group, token, TMPDIR=str(scratch))
    fixed_group.ok(*args)

    assert list(scratch.iterdir()) == []  # nothing left behind by the tracer either
    [trace] = agent.traces(token, expected=1)
    root, children = span_tree(trace)
    operation = case.split("-")[0]
    assert (root["name"], root["resource"], root["service"]) == (f"memory.{operation}", operation, "memory-manager")
    assert root["meta"]["env"] == "local" and root["meta"]["version"] == "0.1.0"
    assert root["meta"]["memory.group"] == fixed_group.group
    assert root["error"] == 0
    assert children == expected_children
    if operation == "query":
        assert root["meta"]["cache.hit"] == ("true" if case == "query-hit" else "false")
        assert root["metrics"]["memory.limit"] == 3 and root["metrics"]["memory.results"] == 1
    if operation == "entities":
        assert root["meta"]["memory.entity_type"] == "Technology" and root["metrics"]["memory.results"] == 2
    status, diff = agent.snapshot(token, SNAPSHOT_IGNORES)
    assert status == 200, diff


def test_a_traced_query_answers_without_ddtrace_and_its_spans_arrive_later(memory, agent):
    memory.store("We chose FalkorDB over Neo4j for the graph database.")
    token = "memory_query_sent_after_exit"
    agent.start(token)
    code = ("import sys, memory_manager\n"
            "code = memory_manager.main(['query', 'graph database'])\n"
            "print(code, 'ddtrace' in sys.modules, file=sys.stderr)\n")

    done = subprocess.run([sys.executable, "-c", code], env={**traced(memory, token).env,
                                                             "PYTHONPATH": str(MODULE.parent)},
                          capture_output=True, text=True, timeout=60)

    assert done.stderr.splitlines() == ["0 False"], done.stderr
    assert "We chose FalkorDB over Neo4j" in done.stdout
    [trace] = agent.traces(token, expected=1)
    root, children = span_tree(trace)
    assert (root["name"], root["meta"]["cache.hit"], root["error"]) == ("memory.query", "false", 0)
    assert children and all(span["start"] >= root["start"] and span["duration"] <= root["duration"]
                            for span in trace if span is not root)


def test_ingestion_is_one_trace_tagged_with_the_job(fixed_group, agent):
    wait_for_no_worker(fixed_group.stack)
    job = fixed_group.with_env(MEMORY_AUTO_DRAIN="off").ok("store", "We chose FalkorDB over Neo4j.").split()[2]
    token = "memory_ingest"
    agent.start(token)

    worker = traced(fixed_group, token).worker("drain")
    try:
        fixed_group.wait_until_ingested(1)
    finally:
        assert stop(worker) == 0

    [trace] = [t for t in agent.traces(token, expected=1) if span_tree(t)[0]["name"] == "memory.ingest"]
    root, children = span_tree(trace)
    assert (root["resource"], root["error"]) == ("ingest", 0)
    assert (root["meta"]["memory.job"], root["meta"]["memory.group"]) == (job, fixed_group.group)
    assert children == {"memory.ingest": ["memory.graph.add_episode"]}


def test_a_failing_command_produces_an_error_span(fixed_group, agent, dead_port):
    token = "memory_error_falkordb_down"
    agent.start(token)

    result = traced(fixed_group, token, FALKORDB_PORT=str(dead_port)).run("entities")

    assert result.code == 1
    [trace] = agent.traces(token, expected=1)
    root, _ = span_tree(trace)
    assert root["error"] == 1
    assert root["meta"]["error.type"] == "ServiceError"
    assert f"falkordb at 127.0.0.1:{dead_port}" in root["meta"]["error.message"]
    status, diff = agent.snapshot(token, SNAPSHOT_IGNORES)
    assert status == 200, diff


def test_a_usage_error_is_an_error_span_too(fixed_group, agent):
    token = "memory_error_usage"
    agent.start(token)

    result = traced(fixed_group, token).run("query", "x", "0")

    assert result.code == 2
    [trace] = agent.traces(token, expected=1)
    root, _ = span_tree(trace)
    assert (root["error"], root["meta"]["error.type"]) == (1, "UsageError")


def test_a_miss_then_a_hit_emit_one_cache_miss_then_one_cache_hit(memory, dogstatsd):
    memory.store("We chose FalkorDB over Neo4j for the graph database.")
    counting = memory.with_env(DD_DOGSTATSD_PORT=str(dogstatsd.port))

    counting.ok("query", "graph database")
    counting.ok("query", "graph database")

    cache = [(name, tags) for name, kind, tags in dogstatsd.metrics() if "cache_" in name]
    expected_tags = {"operation": "query", "group": memory.group, "service": "memory-manager",
                     "env": "local", "version": "0.1.0"}
    assert cache == [("opencode.memory.cache_miss", expected_tags), ("opencode.memory.cache_hit", expected_tags)]


def test_every_operation_reports_its_duration_and_failures_are_counted(memory, dogstatsd, tmp_path, dead_port):
    counting = memory.with_env(DD_DOGSTATSD_PORT=str(dogstatsd.port))
    counting.with_env(MEMORY_AUTO_DRAIN="off").ok("store", "We chose Valkey for the cache.")
    memory.store("We chose FalkorDB over Neo4j for the graph database.")  # an uncounted drainer ingests both
    counting.ok("query", "graph database")
    counting.ok("entities")
    counting.ok("health")
    counting.ok("export", "--output", str(tmp_path / "e.json"))
    counting.ok("restore", str(tmp_path / "e.json"), "--dry-run", "--replace")
    counting.with_env(FALKORDB_PORT=str(dead_port)).run("entities")
    counting.with_env(VALKEY_PORT=str(dead_port)).run("query", "graph database")

    metrics = dogstatsd.metrics()
    durations = {name.split(".")[2] for name, kind, _ in metrics if name.endswith(".duration") and kind == "d"}
    assert durations == {"store", "query", "entities", "health", "export", "restore"}
    [error] = [tags for name, _, tags in metrics if name == "opencode.memory.errors"]
    assert (error["operation"], error["error_type"], error["group"]) == ("entities", "ServiceError", memory.group)
    assert [name for name, _, _ in metrics if name == "opencode.memory.cache_unavailable"] == \
        ["opencode.memory.cache_unavailable"]
    assert [kind for n, kind, _ in metrics if n == "opencode.memory.export.bytes"] == ["d"]
    assert dogstatsd.values["opencode.memory.export.bytes"] == [(tmp_path / "e.json").stat().st_size]


def test_a_worker_reports_queue_gauges_ingest_duration_and_enqueue_counts(memory, dogstatsd):
    wait_for_no_worker(memory.stack)
    counting = memory.with_env(DD_DOGSTATSD_PORT=str(dogstatsd.port), MEMORY_AUTO_DRAIN="off")
    counting.ok("store", "We chose FalkorDB over Neo4j for the graph database.")

    worker = counting.worker()
    try:
        memory.wait_until_ingested(1)
        time.sleep(6)  # one heartbeat period: the gauges go out with the heartbeat
    finally:
        assert stop(worker) == 0

    metrics = dogstatsd.metrics()
    kinds = {(name, kind) for name, kind, tags in metrics if tags.get("group") == memory.group}
    assert {("opencode.memory.queue.enqueued", "c"), ("opencode.memory.ingest.duration", "d"),
            ("opencode.memory.queue.depth", "g"), ("opencode.memory.queue.oldest_age", "g"),
            ("opencode.memory.queue.dead_letters", "g")} <= kinds, kinds


def test_no_secret_or_content_reaches_spans_metrics_logs_the_queue_or_output(memory, agent, dogstatsd, standin,
                                                                             valkey, tmp_path):
    wait_for_no_worker(memory.stack)
    token = "memory_canaries"
    agent.start(token)
    base = traced(memory, token, DD_DOGSTATSD_PORT=str(dogstatsd.port))
    keyed = base.with_env(OPENAI_API_KEY=CANARIES["OPENAI_API_KEY"], B2_APP_KEY=CANARIES["B2_APP_KEY"],
                          MEMORY_DRAIN_IDLE="1")
    outputs = [
        keyed.run("store", f"Alice prefers pytest for the OpenCode repo ({CONTENT_CANARY}).",
                  json.dumps({"note": CONTENT_CANARY})),
        keyed.run("query", f"what does Alice prefer {CONTENT_CANARY}"),
        keyed.run("entities"),
        keyed.run("export"),  # the B2 key is wrong: a failure path
    ]
    standin.faults(fault="401", fault_count=-1)  # the stand-in echoes the key back, as OpenAI does
    outputs.append(keyed.run("drain"))  # ingesting with the rejected key: the drainer reports and exits
    standin.reset()
    passworded = base.with_env(VALKEY_PASSWORD=CANARIES["VALKEY_PASSWORD"],
                               FALKORDB_PASSWORD=CANARIES["FALKORDB_PASSWORD"])
    outputs += [passworded.run("health"), passworded.run("query", "anything"), passworded.run("store", "Carol.")]

    assert [r.code for r in outputs] == [0, 0, 0, 1, 1, 1, 1, 0], [r.stderr for r in outputs]
    assert outputs[-1].stdout.startswith("spooled ")
    spans = json.dumps(agent.traces(token, expected=len(outputs)))
    assert spans.count('"parent_id": 0') == len(outputs)
    queue_state = json.dumps(memory.queue()) + (memory.spool_dir / "spool.jsonl").read_text()
    telemetry_and_logs = spans + "\n".join(dogstatsd.lines()) + "".join(r.stderr for r in outputs) + queue_state
    for canary in CANARIES.values():
        assert canary not in telemetry_and_logs, canary
    assert CONTENT_CANARY not in spans + "\n".join(dogstatsd.lines()) + "".join(r.stderr for r in outputs)
    # stdout is the user's data (a stored fact may quote the content), but never a secret.
    for canary in CANARIES.values():
        assert canary not in "".join(r.stdout for r in outputs), canary


@pytest.mark.parametrize("agent_state", ["absent", "black-holed"])
def test_exit_codes_and_stdout_do_not_depend_on_the_agent(memory, dead_port, blackhole_port, agent_state):
    memory.store("We chose FalkorDB over Neo4j for the graph database.")
    # health's worker line changes when the drainer leaves (a loaded machine once saw it go between
    # the two runs): compare once it has gone
    wait_for_no_worker(memory.stack)
    port = dead_port if agent_state == "absent" else blackhole_port
    plain = memory
    with_agent = memory.with_env(DD_TRACE_ENABLED="true", DD_TRACE_AGENT_PORT=str(port))

    def steady(stdout: str) -> str:  # in case another test's worker beats meanwhile
        return re.sub(r"heartbeat [\d.]+ s ago", "heartbeat N s ago", stdout)

    for args in (["query", "graph database"], ["entities"], ["health"], ["query", "x", "0"]):
        expected, got = plain.run(*args), with_agent.run(*args)
        assert (got.code, steady(got.stdout)) == (expected.code, steady(expected.stdout)), args
        assert got.stderr == expected.stderr, args
