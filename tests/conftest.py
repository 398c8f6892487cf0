"""Shared fixtures: one real local stack (FalkorDB, Valkey 8, the OpenAI stand-in) per session.

Nothing here fakes our code or its dependencies: the CLI runs as a real subprocess, and the only
substitute is the OpenAI stand-in server (test infrastructure in local/openai_standin.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
sys.path.insert(0, str(ROOT / "local"))
sys.path.insert(0, str(MODULE.parent))

from stack import Stack, free_port  # noqa: E402

OUR_VARIABLES = (
    "FALKORDB_", "VALKEY_", "OPENAI_", "MEMORY_", "B2_", "DD_", "GRAPHITI_", "EMBEDDING_DIM",
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    local = Stack(tmp_path_factory.mktemp("stack"))
    local.start()
    yield local
    local.stop()


def pytest_report_header() -> list[str]:
    import shutil

    valkey = shutil.which("valkey-server")
    return [f"cache server: {valkey or 'valkey-server NOT installed (fallback: plain redis-server)'}"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


class Memory:
    """The CLI as a user runs it, against one memory group of the session's stack."""

    def __init__(self, stack: Stack, group: str) -> None:
        self.stack = stack
        self.group = group
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_VARIABLES)}
        # Tracing is on only in test_observability.py; elsewhere it would just slow every command.
        self.env.update(stack.env(), MEMORY_GROUP_ID=group, DD_TRACE_ENABLED="false")

    def with_env(self, **changes: str | None) -> Memory:
        other = Memory(self.stack, self.group)
        other.env = dict(self.env)
        for key, value in changes.items():
            if value is None:
                other.env.pop(key, None)
            else:
                other.env[key] = value
        return other

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(MODULE), *args], env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE)

    def run(self, *args: str, stdin: str | None = None, timeout_s: float = 120) -> Result:
        done = subprocess.run([sys.executable, str(MODULE), *args], env=self.env, text=True,
                              capture_output=True, input=stdin, timeout=timeout_s)
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.code == 0, f"exit {result.code}: {result.stderr}"
        return result.stdout

    def store(self, content: str, metadata: dict | None = None) -> str:
        args = ["store", content] + ([json.dumps(metadata)] if metadata is not None else [])
        return self.ok(*args).strip()

    def entities(self, entity_type: str | None = None) -> list[dict]:
        return json.loads(self.ok("entities", *([entity_type] if entity_type else [])))

    def graph_counts(self) -> tuple[int, int]:
        """(nodes, relationships) in the group's graph, read straight from FalkorDB."""
        db = redis.Redis(port=self.stack.ports["falkordb"])
        try:
            if not db.exists(self.group):
                return 0, 0
            nodes = db.execute_command("GRAPH.RO_QUERY", self.group, "MATCH (n) RETURN count(n)")
            edges = db.execute_command("GRAPH.RO_QUERY", self.group, "MATCH ()-[r]->() RETURN count(r)")
            return nodes[1][0][0], edges[1][0][0]
        finally:
            db.close()

    def cypher_graph_exists(self) -> bool:
        db = redis.Redis(port=self.stack.ports["falkordb"])
        try:
            return bool(db.exists(self.group))
        finally:
            db.close()

    def cypher(self, query: str) -> list[list]:
        db = redis.Redis(port=self.stack.ports["falkordb"], decode_responses=True)
        try:
            return db.execute_command("GRAPH.RO_QUERY", self.group, query)[1]
        finally:
            db.close()


@pytest.fixture
def memory(stack: Stack, request: pytest.FixtureRequest) -> Memory:
    """A fresh memory group per test: groups are separate graphs, so tests never interfere."""
    return Memory(stack, f"t_{request.node.name[:40]}_{uuid.uuid4().hex[:6]}".replace("[", "_")
                  .replace("]", "").replace("-", "_"))


class StandIn:
    def __init__(self, url: str) -> None:
        self.url = url

    def _post(self, path: str, body: dict) -> None:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/_standin/stats", timeout=5) as reply:
            return json.load(reply)

    def requests(self) -> int:
        stats = self.stats()
        return sum(stats.get(k, 0) for k in ("responses", "embeddings", "chat/completions"))

    def faults(self, **knobs: object) -> None:
        self._post("/_standin/faults", knobs)

    def reset(self) -> None:
        self._post("/_standin/reset", {})


@pytest.fixture
def standin(stack: Stack) -> StandIn:
    client = StandIn(stack.standin_url)
    client.reset()
    yield client
    client.reset()


@pytest.fixture
def valkey(stack: Stack) -> redis.Redis:
    client = redis.Redis(port=stack.ports["valkey"], decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def dead_port() -> int:
    """A loopback port nothing listens on: connections are refused at once."""
    return free_port()


@pytest.fixture
def blackhole_port() -> int:
    """A loopback port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()
