"""Requirement: the fault matrix (spec: memory-manager / Service failures, Fault matrix).

Every command against every state of every dependency, on the real stack: the exit code, one line
naming the failed service and its address, a bound on the time taken, nothing lost (episode and
queue counts before and after), and no secret (canaries for every credential) in stdout, stderr,
the spans the Datadog test agent received, the DogStatsD datagrams, the spool or the dead letters.

MATRIX below is the table; docs/faults.md carries the same table, rendered by `render_table()` and
checked by a test, so the two cannot drift.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
import redis

from conftest import MODULE, ROOT, DogStatsd, Memory, Result, b2_faults, free_port, wait_for_no_worker

COMMANDS = ("store", "worker", "query hit", "query miss", "entities", "health", "export", "restore")
STATES = (
    "falkordb down", "falkordb killed mid-operation", "falkordb black-holed",
    "valkey down", "valkey killed mid-operation", "valkey black-holed",
    "openai 401", "openai 429 storm", "openai 500", "openai malformed output", "openai hang",
    "b2 bad key", "b2 missing bucket", "b2 5xx storm", "b2 stall",
    "datadog agent absent", "datadog agent black-holed", "malformed DD_*",
)
SECRETS = {
    "OPENAI_API_KEY": "sk-canary-openai-5d2c81",
    "B2_APP_KEY": "canary-b2-app-key-a3f09b",
    "VALKEY_PASSWORD": "canary-valkey-pw-77e1c4",
    "FALKORDB_PASSWORD": "canary-falkordb-pw-0c93aa",
}
CONTENT = "canary-content-e4b1d7"
QUESTION = "what did Alice choose for the graph database"
EPISODES = ("Alice chose FalkorDB over Neo4j for the graph database.",
            "Bob moved the Billing service from MySQL to Postgres.")


@dataclass(frozen=True)
class Outcome:
    code: int
    service: str = ""      # named on the error line (or, exit 0, the warning line); "" for none
    after: str = "kept"    # kept | queued | spooled | ingested | dead letter | still queued
    within_s: float = 10

    def cell(self) -> str:
        named = f" {self.service}" if self.service else ""
        after = "" if self.after == "kept" else f", {self.after}"
        return f"{self.code}{named}{after}, ≤{self.within_s:g} s"


NA = None  # the command never reaches that dependency in that state (see docs/faults.md)
OK = Outcome(0)
DD_BAD = Outcome(2, "DD_TRACE_AGENT_PORT", within_s=5)



def every(outcome: Outcome) -> dict[str, Outcome | None]:
    return dict.fromkeys(COMMANDS, outcome)


MATRIX: dict[str, dict[str, Outcome | None]] = {
    "falkordb down": {
        "store": Outcome(0, after="queued"), "worker": Outcome(0, after="ingested", within_s=60),
        "query hit": OK, "query miss": Outcome(1, "falkordb"), "entities": Outcome(1, "falkordb"),
        "health": Outcome(1, "falkordb", within_s=5), "export": Outcome(1, "falkordb"),
        "restore": Outcome(1, "falkordb")},
    "falkordb killed mid-operation": {
        "store": NA, "worker": Outcome(0, after="ingested", within_s=90), "query hit": NA,
        "query miss": Outcome(1, "falkordb"), "entities": NA, "health": NA, "export": NA, "restore": NA},
    "falkordb black-holed": {
        "store": Outcome(0, after="queued"), "worker": NA, "query hit": OK,
        "query miss": Outcome(1, "falkordb", within_s=25), "entities": Outcome(1, "falkordb", within_s=25),
        "health": Outcome(1, "falkordb", within_s=5), "export": Outcome(1, "falkordb", within_s=25),
        "restore": Outcome(1, "falkordb", within_s=25)},
    "valkey down": {
        "store": Outcome(0, "valkey", after="spooled"), "worker": Outcome(0, after="ingested", within_s=60),
        "query hit": Outcome(0, "valkey"), "query miss": Outcome(0, "valkey"), "entities": OK,
        "health": Outcome(1, "valkey", within_s=5), "export": OK, "restore": Outcome(0, "valkey", within_s=20)},
    "valkey killed mid-operation": {
        "store": NA, "worker": Outcome(0, after="ingested", within_s=90), "query hit": NA,
        "query miss": Outcome(0, "valkey"), "entities": NA, "health": NA, "export": NA, "restore": NA},
    "valkey black-holed": {
        "store": Outcome(0, "valkey", after="spooled"), "worker": NA, "query hit": Outcome(0, "valkey"),
        "query miss": Outcome(0, "valkey"), "entities": OK, "health": Outcome(1, "valkey", within_s=5),
        "export": OK, "restore": Outcome(0, "valkey", within_s=15)},
    "openai 401": {
        "store": Outcome(0, after="queued"), "worker": Outcome(1, "openai", after="still queued"),
        "query hit": OK, "query miss": Outcome(0, "openai"), "entities": OK, "health": OK, "export": OK,
        "restore": OK},
    "openai 429 storm": {
        "store": Outcome(0, after="queued"), "worker": Outcome(0, after="ingested", within_s=60),
        "query hit": OK, "query miss": Outcome(0, "openai"), "entities": OK, "health": OK, "export": OK,
        "restore": OK},
    "openai 500": {
        "store": Outcome(0, after="queued"), "worker": Outcome(0, after="ingested", within_s=60),
        "query hit": OK, "query miss": Outcome(0, "openai"), "entities": OK, "health": OK, "export": OK,
        "restore": OK},
    "openai malformed output": {
        "store": Outcome(0, after="queued"), "worker": Outcome(0, after="dead letter", within_s=60),
        "query hit": OK, "query miss": Outcome(0, "openai"), "entities": OK, "health": OK, "export": OK,
        "restore": OK},
    "openai hang": {
        "store": Outcome(0, after="queued"), "worker": Outcome(0, after="ingested", within_s=120),
        "query hit": OK, "query miss": Outcome(0, "openai", within_s=15), "entities": OK,
        "health": Outcome(0, within_s=5), "export": OK, "restore": OK},
    "b2 bad key": {
        "store": NA, "worker": NA, "query hit": OK, "query miss": NA, "entities": NA, "health": NA,
        "export": Outcome(1, "b2"), "restore": Outcome(1, "b2")},
    "b2 missing bucket": {
        "store": NA, "worker": NA, "query hit": OK, "query miss": NA, "entities": NA, "health": NA,
        "export": Outcome(1, "b2"), "restore": Outcome(1, "b2")},
    "b2 5xx storm": {
        "store": NA, "worker": NA, "query hit": NA, "query miss": NA, "entities": NA, "health": NA,
        "export": Outcome(1, "b2", within_s=60), "restore": NA},
    "b2 stall": {
        "store": NA, "worker": NA, "query hit": NA, "query miss": NA, "entities": NA, "health": NA,
        "export": Outcome(1, "b2", within_s=60), "restore": Outcome(1, "b2", within_s=60)},
    "datadog agent absent": {
        **every(OK), "store": Outcome(0, after="queued"), "worker": Outcome(0, after="ingested", within_s=60)},
    "datadog agent black-holed": {
        **every(OK), "store": Outcome(0, after="queued"), "worker": Outcome(0, after="ingested", within_s=60)},
    "malformed DD_*": every(DD_BAD),
}


def render_table() -> str:
    """docs/faults.md's table: one row per dependency state, one column per command."""
    lines = ["| state | " + " | ".join(COMMANDS) + " |", "|---" * (len(COMMANDS) + 1) + "|"]
    for state in STATES:
        cells = [MATRIX[state][command] for command in COMMANDS]
        lines.append(f"| {state} | " + " | ".join(c.cell() if c else "·" for c in cells) + " |")
    return "\n".join(lines)


CELLS = [pytest.param(state, command, id=re.sub(r"[^A-Za-z0-9-]+", "_", f"{state}-{command}"))
         for state in STATES for command in COMMANDS if MATRIX[state][command] is not None]


# --- the world of one cell -----------------------------------------------------------------------

class Blackhole:
    """A loopback port that accepts connections and never answers."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(256)
        self.port = self.server.getsockname()[1]

    def close(self) -> None:
        self.server.close()


def agent_traces(stack, token: str) -> str:
    url = f"{stack.agent_url}/test/session/traces?test_session_token={token}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def post_to_standin(stack, path: str, body: dict) -> None:
    request = urllib.request.Request(stack.standin_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()


@pytest.fixture(scope="module")
def matrix(stack, tmp_path_factory):
    """One group with two episodes and its export in B2, shared by the read cells; rebuilt after a
    cell that killed FalkorDB (the local FalkorDB keeps nothing across a restart)."""
    group = f"faults_{uuid.uuid4().hex[:6]}"
    state: dict[str, str | None] = {"group": group, "b2_name": None}
    home = Memory(stack, group, tmp_path_factory.mktemp("matrix-spool")).with_env(MEMORY_DRAIN_IDLE="1")

    def ensure() -> Memory:
        if home.episode_count() < len(EPISODES):
            db = redis.Redis(port=stack.ports["falkordb"])
            for graph in db.execute_command("GRAPH.LIST"):
                db.execute_command("GRAPH.DELETE", graph)
            db.close()
            home.forget_queue()
            for episode in EPISODES:
                home.store(episode)
            exported = json.loads(home.ok("export", "--json"))
            state["b2_name"] = exported["target"]
        return home

    ensure()
    yield state, ensure
    home.forget_queue()


def cell_env(memory: Memory, state: str, command: str, statsd: DogStatsd, token: str,
             holes: list[Blackhole]) -> dict[str, str]:
    """The environment of a cell: canary credentials where the faulted service never checks them,
    tracing and DogStatsD pointed at what the test reads, and the state's own change."""
    env = {"OPENAI_API_KEY": SECRETS["OPENAI_API_KEY"], "MEMORY_AUTO_DRAIN": "off", "MEMORY_DRAIN_IDLE": "1",
           "MEMORY_MAX_ATTEMPTS": "2", "B2_KEEP": "0",  # the shared export must outlive the cells' exports
           "DD_TRACE_ENABLED": "true", "DD_DOGSTATSD_PORT": str(statsd.port),
           "_DD_TRACE_WRITER_ADDITIONAL_HEADERS": f"X-Datadog-Test-Session-Token:{token}"}

    def hole() -> str:
        holes.append(Blackhole())
        return str(holes[-1].port)

    changes = {
        "falkordb down": {"FALKORDB_PORT": str(free_port()), "FALKORDB_PASSWORD": SECRETS["FALKORDB_PASSWORD"]},
        "falkordb black-holed": {"FALKORDB_PORT": hole(), "FALKORDB_PASSWORD": SECRETS["FALKORDB_PASSWORD"]},
        "valkey down": {"VALKEY_PORT": str(free_port()), "VALKEY_PASSWORD": SECRETS["VALKEY_PASSWORD"]},
        "valkey black-holed": {"VALKEY_PORT": hole(), "VALKEY_PASSWORD": SECRETS["VALKEY_PASSWORD"]},
        "b2 bad key": {"B2_APP_KEY": SECRETS["B2_APP_KEY"]},
        "b2 missing bucket": {"B2_BUCKET": "no-such-bucket"},
        "b2 stall": {"B2_REALM": f"http://127.0.0.1:{hole()}", "B2_STALL_S": "20"},
        "datadog agent absent": {"DD_TRACE_AGENT_PORT": str(free_port())},
        "datadog agent black-holed": {"DD_TRACE_AGENT_PORT": hole()},
        "malformed DD_*": {"DD_TRACE_AGENT_PORT": "abc"},
    }.get(state, {})
    if command == "worker" and state in ("falkordb down", "valkey down"):
        changes = {}  # a long-running process: the service itself goes down and comes back
    return {**memory.env, **env, **changes}


OPENAI_FAULTS = {
    "openai 401": {"fault": "401", "fault_count": -1},
    "openai 429 storm": {"fault": "429", "fault_for_s": 4, "fault_count": -1},
    "openai 500": {"fault": "500", "fault_for_s": 4, "fault_count": -1},
    "openai malformed output": {"fault": "malformed", "fault_count": -1},
    "openai hang": {"fault": "hang", "fault_count": 1},
}


def address(stack, env: dict[str, str], service: str) -> str:
    return {"falkordb": f"127.0.0.1:{env['FALKORDB_PORT']}", "valkey": f"127.0.0.1:{env['VALKEY_PORT']}",
            "openai": env["OPENAI_BASE_URL"], "b2": env["B2_REALM"]}.get(service, "")


# --- running a cell --------------------------------------------------------------------------------

def run(env: dict[str, str], args: list[str], timeout_s: float) -> tuple[Result, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(MODULE), *args], env=env, text=True, capture_output=True,
                          timeout=timeout_s + 30)
    return Result(done.returncode, done.stdout, done.stderr), time.monotonic() - started


def standin_requests(stack) -> int:
    with urllib.request.urlopen(stack.standin_url + "/_standin/stats", timeout=5) as reply:
        stats = json.load(reply)
    return sum(stats.get(k, 0) for k in ("responses", "embeddings", "chat/completions"))


def run_killing(stack, env: dict[str, str], args: list[str], service: str, after_s: float,
                down_s: float, on_request: bool = False) -> tuple[Result, float]:
    """Run a command, SIGKILL `service` after `after_s` (with `on_request`: once the command's first
    OpenAI request is under way, which a loaded machine may delay by seconds), start it again
    `down_s` later."""
    started = time.monotonic()
    seen = standin_requests(stack)
    process = subprocess.Popen([sys.executable, str(MODULE), *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(after_s)
    while on_request and standin_requests(stack) == seen and process.poll() is None:
        time.sleep(0.02)
    stack.kill(service)
    time.sleep(down_s)
    stack.restart(service)
    try:
        out, err = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return Result(process.returncode, out, err), time.monotonic() - started


def run_worker_cell(stack, memory: Memory, state: str, env: dict[str, str], outcome: Outcome) -> Result:
    wait_for_no_worker(stack, timeout_s=90)
    healthy = memory.with_env(MEMORY_AUTO_DRAIN="off")
    healthy.ok("store", f"Carol chose Valkey for the write queue ({CONTENT}).")
    if state in ("falkordb down", "valkey down"):
        service = state.split()[0]
        result, elapsed = run_killing(stack, env, ["drain"], service, after_s=0, down_s=4)
    elif state.endswith("killed mid-operation"):
        post_to_standin(stack, "/_standin/faults", {"latency_ms": 1000})
        result, elapsed = run_killing(stack, env, ["drain"], state.split()[0], after_s=3, down_s=1)
    else:
        result, elapsed = run(env, ["drain"], outcome.within_s)
    assert elapsed <= outcome.within_s, f"{elapsed:.1f} s"
    post_to_standin(stack, "/_standin/reset", {})
    row = memory.queue()
    expected = {"ingested": (1, 0, 0), "still queued": (0, 1, 0), "kept": (0, 1, 0),
                "dead letter": (0, 0, 1)}[outcome.after]
    assert (memory.episode_count(), row["queued"], row["dead_letters"]) == expected, row
    return result


def run_cell(stack, memory: Memory, matrix, state: str, command: str, env: dict[str, str],
             outcome: Outcome, faults: dict | None) -> Result:
    shared, ensure = matrix
    home = ensure().with_env(MEMORY_AUTO_DRAIN="off")
    wait_for_no_worker(stack, timeout_s=90)  # a drainer ensure() started would ingest what a cell only queues
    counts_before = home.graph_counts()
    env = {**env, "MEMORY_GROUP_ID": home.group, "MEMORY_SPOOL_DIR": str(memory.spool_dir)}
    queued_before = home.queue()["queued"]
    args = {
        "store": ["store", f"Dana prefers ruff over flake8 ({CONTENT})."],
        "query hit": ["query", QUESTION],
        "query miss": ["query", f"{QUESTION} {uuid.uuid4().hex[:8]}"],
        "entities": ["entities"], "health": ["health"], "export": ["export"],
        "restore": ["restore", shared["b2_name"] or "", "--replace", "--yes"],
    }[command]
    if state == "b2 missing bucket" and command == "restore":
        args[1] = args[1].replace("b2://opencode-memory/", "b2://no-such-bucket/")
    expected_answer = home.ok("query", QUESTION) if command == "query hit" else None
    if state == "b2 5xx storm":
        b2_faults(stack, upload_errors=1000)
    if faults:
        post_to_standin(stack, "/_standin/faults", faults)
    try:
        if state.endswith("killed mid-operation"):
            post_to_standin(stack, "/_standin/faults", {"latency_ms": 1000})
            result, elapsed = run_killing(stack, env, args, state.split()[0], after_s=0, down_s=3,
                                          on_request=True)
        else:
            result, elapsed = run(env, args, outcome.within_s)
    finally:
        b2_faults(stack)
        post_to_standin(stack, "/_standin/reset", {})
    assert elapsed <= outcome.within_s, f"{elapsed:.1f} s: {result}"
    if state.startswith("falkordb killed"):
        return result  # FalkorDB restarted empty: nothing to compare
    if expected_answer is not None and outcome.code == 0 and state != "malformed DD_*":
        assert result.stdout.rstrip("\n") == expected_answer.rstrip("\n")
    if command == "store" and outcome.code == 0:
        spooled = (memory.spool_dir / "spool.jsonl").read_text() if outcome.after == "spooled" else ""
        assert (home.queue()["queued"] - queued_before, spooled.count(CONTENT)) == \
            ((1, 0) if outcome.after == "queued" else (0, 1))
        home.forget_queue()  # a later worker cell's drainer must not ingest it into the shared group
    else:
        assert home.graph_counts() == counts_before
    return result


@pytest.mark.parametrize(("state", "command"), CELLS)
def test_fault_matrix(stack, memory, matrix, state, command):
    outcome = MATRIX[state][command]
    assert outcome is not None
    token = f"faults_{uuid.uuid4().hex[:10]}"
    urllib.request.urlopen(f"{stack.agent_url}/test/session/start?test_session_token={token}", timeout=10).close()
    statsd, holes = DogStatsd(), list[Blackhole]()
    try:
        env = cell_env(memory, state, command, statsd, token, holes)
        faults = OPENAI_FAULTS.get(state)
        if faults and command != "worker":  # a one-shot command sees a fault that lasts
            faults = {"fault": faults["fault"], "fault_count": -1}
        if command == "worker":
            if faults:
                post_to_standin(stack, "/_standin/faults", faults)
            env = {**env, "MEMORY_GROUP_ID": memory.group, "MEMORY_SPOOL_DIR": str(memory.spool_dir)}
            result = run_worker_cell(stack, memory, state, env, outcome)
        else:
            result = run_cell(stack, memory, matrix, state, command, env, outcome, faults)
        assert_outcome(stack, env, command, outcome, result)
        assert_no_secret_anywhere(stack, memory, token, statsd, result)
    finally:
        post_to_standin(stack, "/_standin/reset", {})
        statsd.close()
        for hole in holes:
            hole.close()


def assert_outcome(stack, env: dict[str, str], command: str, outcome: Outcome, result: Result) -> None:
    assert result.code == outcome.code, (result.stdout[-500:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    where = address(stack, env, outcome.service)
    if command == "health" and outcome.code != 2:
        assert lines == []
        if outcome.service:
            failed = [line for line in result.stdout.splitlines() if " FAIL " in line]
            assert failed[0].split()[:3] == [outcome.service, "FAIL", where]
        return
    if outcome.code:
        assert len(lines) == 1, lines
        prefix = f"memory-manager: error: {outcome.service}" + (f" at {where}" if where else "")
        assert lines[0].startswith(prefix), lines[0]
    elif outcome.service:
        warnings = [line for line in lines if line.startswith("memory-manager: warning:")]
        assert warnings and all(line in warnings for line in lines), lines
        assert f"{outcome.service} at {where}" in warnings[0], warnings[0]
    elif command != "worker":
        assert lines == [], lines


def assert_no_secret_anywhere(stack, memory: Memory, token: str, statsd: DogStatsd, result: Result) -> None:
    spans = agent_traces(stack, token)
    metrics = statsd.text()
    spool = "".join(p.read_text(errors="replace") for p in memory.spool_dir.glob("*") if p.is_file())
    dead = redis.Redis(port=stack.ports["valkey"], decode_responses=True)
    try:
        dead_letters = json.dumps([dead.xrange(key) for key in dead.scan_iter(match="memory:*:dead")])
    finally:
        dead.close()
    everywhere = "\n".join([result.stdout, result.stderr, spans, metrics, spool, dead_letters])
    for name, canary in SECRETS.items():
        assert canary not in everywhere, name
    assert CONTENT not in "\n".join([result.stderr, spans, metrics])


def test_the_readme_fault_table_is_the_tested_matrix():
    readme = (ROOT / "docs" / "faults.md").read_text()

    assert render_table() in readme


def test_every_state_and_command_has_a_cell():
    assert set(MATRIX) == set(STATES)
    assert all(set(row) == set(COMMANDS) for row in MATRIX.values())
    assert len(CELLS) >= 80
    rows = render_table().splitlines()[2:]
    assert [row.count("·") for row in rows] == [sum(MATRIX[state][c] is None for c in COMMANDS) for state in STATES]
    assert sum(len(row.split(" | ")) - 1 for row in rows) == len(STATES) * len(COMMANDS)
