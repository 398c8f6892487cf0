"""Shared fixtures: one real local stack (FalkorDB, Valkey 8, the OpenAI stand-in) per session.

Nothing here fakes our code or its dependencies: the CLI runs as a real subprocess, and the only
substitute is the OpenAI stand-in server (test infrastructure in local/openai_standin.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
OPENCODE_VERSION = "1.18.33"  # the OpenCode the plugin and MCP tests run, and the pod image pins
sys.path.insert(0, str(ROOT / "local"))
sys.path.insert(0, str(MODULE.parent))

from stack import Stack, free_port  # noqa: E402

OUR_VARIABLES = (
    "FALKORDB_", "VALKEY_", "OPENAI_", "MEMORY_", "B2_", "DD_", "GRAPHITI_", "EMBEDDING_DIM",
)


SUITE_LOCK = Path(tempfile.gettempdir()) / "memory-manager-suite.lock"
SUITE_LOCK_KEY = pytest.StashKey[Any]()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: two test processes (each with its own stack) when this is the only suite on the
    machine; one beside another suite, whose two would otherwise share the two cores with ours and
    push the fault matrix's time bounds. The lock is held until this session ends."""
    lock = open(SUITE_LOCK, "w")  # noqa: SIM115 - held for the whole session
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return 1
    config.stash[SUITE_LOCK_KEY] = lock
    return 2


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    local = Stack(tmp_path_factory.mktemp("stack"))
    local.start()
    yield local
    local.stop()


def valkey_services(kind: Callable[[Path], Any], run_dir: Path, what: str) -> Iterator[Any]:
    """A module's own Valkey-based services beside the session stack (TLS, a cluster): they need
    Debian's valkey-server and valkey-cli; without them the module is skipped, never in CI."""
    import shutil

    if not (shutil.which("valkey-server") and shutil.which("valkey-cli")) and not os.environ.get("CI"):
        pytest.skip(f"{what} needs Debian's valkey-server and valkey-cli (local/install-valkey.sh); CI has them")
    services = kind(run_dir)
    services.start()
    yield services
    services.stop()


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


DRAIN_IDLE_S = 5  # drainers that tests start leave soon after their work is done


class Memory:
    """The CLI as a user runs it, against one memory group of the session's stack."""

    def __init__(self, stack: Stack, group: str, spool_dir: Path | None = None) -> None:
        self.stack = stack
        self.group = group
        self.spool_dir = spool_dir or stack.run_dir / "spool"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_VARIABLES)}
        # Tracing is on only in test_observability.py; elsewhere it would just slow every command. A
        # pass starts at once (MEMORY_COALESCE_WAIT=0) but where a test says otherwise (test_queue.py).
        self.env.update(stack.env(), MEMORY_GROUP_ID=group, DD_TRACE_ENABLED="false",
                        MEMORY_SPOOL_DIR=str(self.spool_dir), MEMORY_DRAIN_IDLE=str(DRAIN_IDLE_S),
                        MEMORY_COALESCE_WAIT="0")

    def with_env(self, **changes: str | None) -> Memory:
        other = Memory(self.stack, self.group, self.spool_dir)
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

    def worker(self, command: str = "worker", log: Path | None = None) -> subprocess.Popen:
        """A `worker` (or `drain`) process; its log goes to a file so a full pipe never blocks it."""
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(log or self.spool_dir / f"{command}-{time.monotonic_ns()}.log", "w") as out:
            return subprocess.Popen([sys.executable, str(MODULE), command], env=self.env, text=True,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def run(self, *args: str, stdin: str | None = None, timeout_s: float = 120) -> Result:
        done = subprocess.run([sys.executable, str(MODULE), *args], env=self.env, text=True,
                              capture_output=True, input=stdin, timeout=timeout_s)
        return Result(done.returncode, done.stdout, done.stderr)

    def run_all(self, commands: list[list[str]], at_once: int = 3) -> list[Result]:
        """Several independent CLI runs, `at_once` at a time (each is its own process, as the plugin
        runs them); results in the order given."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(at_once) as pool:
            return list(pool.map(lambda args: self.run(*args), commands))

    def ok_all(self, commands: list[list[str]]) -> list[str]:
        results = self.run_all(commands)
        assert [r.code for r in results] == [0] * len(results), [r.stderr for r in results if r.code]
        return [r.stdout for r in results]

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.code == 0, f"exit {result.code}: {result.stderr}"
        return result.stdout

    def store(self, content: str, metadata: dict | None = None) -> str:
        """Store and wait until the episode is in the graph; returns the episode name."""
        args = ["store", "--wait", "--timeout", "180", content] + ([json.dumps(metadata)] if metadata else [])
        state, name, _job = self.ok(*args).split()
        assert state == "stored"
        return name

    def queue(self) -> dict:
        """This group's row of `queue --json` (zeros when it never queued)."""
        status = json.loads(self.ok("queue", "--json"))
        empty = {"group": self.group, "queued": 0, "in_flight": 0, "oldest_age_s": None, "dead_letters": 0,
                 "last_error": None}
        return next((g for g in status["groups"] if g["group"] == self.group), empty)

    def wait_until_ingested(self, episodes: int, timeout_s: float = 180) -> None:
        """Poll the graph until it holds `episodes` Episodic nodes and the queue is empty."""
        deadline = time.monotonic() + timeout_s
        while True:
            count = self.episode_count()
            if count >= episodes and self.queue()["queued"] == 0:
                assert count == episodes, f"{count} episodes, expected {episodes}"
                return
            assert time.monotonic() < deadline, f"{count}/{episodes} episodes after {timeout_s} s: {self.queue()}"
            time.sleep(0.5)

    def episode_count(self) -> int:
        if not self.cypher_graph_exists():
            return 0
        return self.cypher("MATCH (e:Episodic) RETURN count(e)")[0][0]

    def episodes(self) -> list[dict]:
        """Every Episodic node in ingestion order (graphiti's created_at)."""
        rows = self.cypher("MATCH (e:Episodic) RETURN e.name, e.job_id, e.valid_at, e.created_at, e.content, "
                           "e.metadata, e.metadata_raw, e.queue_id ORDER BY e.created_at")
        keys = ("name", "job_id", "valid_at", "created_at", "content", "metadata", "metadata_raw", "queue_id")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def forget_queue(self) -> None:
        """Delete this group's queue, cache and lease keys, so no later worker picks them up."""
        db = redis.Redis(port=self.stack.ports["valkey"])
        try:
            keys = list(db.scan_iter(match=f"memory:{{{self.group}}}:*", count=1000))
            if keys:
                db.delete(*keys)
            db.srem("memory:groups", self.group)
        finally:
            db.close()

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

    def vector_indexes(self) -> set[tuple[str, str]]:
        """(label, property) of every vector index on the group's graph."""
        rows = self.cypher("CALL db.indexes() YIELD label, types RETURN label, types")  # types: '{p: [VECTOR], ...}'
        return {(label, kinds.split(":")[0].strip("{ ")) for label, types in rows for kinds in types.split("],")
                if "VECTOR" in kinds}

    def cypher_write(self, query: str) -> None:
        db = redis.Redis(port=self.stack.ports["falkordb"])
        try:
            db.execute_command("GRAPH.QUERY", self.group, query)
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
def memory(stack: Stack, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Memory]:
    """A fresh memory group per test: groups are separate graphs, so tests never interfere; its
    queue keys are removed afterwards so that no worker of a later test spends time on them."""
    group = f"t_{request.node.name[:40]}_{uuid.uuid4().hex[:6]}".replace("[", "_").replace("]", "").replace("-", "_")
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)  # the module refuses a spool directory others can write to
    memory = Memory(stack, group, spool)
    yield memory
    memory.forget_queue()


def wait_for_no_worker(stack: Stack, timeout_s: float = 30) -> None:
    """Wait until no worker or drainer heartbeat is live (drainers of earlier tests leave when idle)."""
    db = redis.Redis(port=stack.ports["valkey"])
    try:
        deadline = time.monotonic() + timeout_s
        while db.exists("memory:heartbeat"):
            assert time.monotonic() < deadline, "a worker from an earlier test is still running"
            time.sleep(0.2)
    finally:
        db.close()


def stop(process: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM a worker and wait for it; one that ignores SIGTERM fails its test, after a SIGKILL
    so that it cannot hold the heartbeat for the tests after it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def b2_faults(stack: Stack, **knobs: object) -> None:
    """Set the local B2 endpoint's faults (local/b2_endpoint.py); no knobs clears them."""
    request = urllib.request.Request(stack.b2_url + "/_b2/faults", data=json.dumps(knobs).encode(), method="POST")
    urllib.request.urlopen(request, timeout=5).close()


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

    def recorded(self) -> list[str]:
        """The OpenAI request bodies received since faults(record=True)."""
        with urllib.request.urlopen(self.url + "/_standin/requests", timeout=5) as reply:
            return json.load(reply)

    def reset(self) -> None:
        self._post("/_standin/reset", {})


@pytest.fixture
def standin(stack: Stack) -> Iterator[StandIn]:
    client = StandIn(stack.standin_url)
    client.reset()
    yield client
    client.reset()


@pytest.fixture
def valkey(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis(port=stack.ports["valkey"], decode_responses=True)
    yield client
    client.close()


class Agent:
    """ddapm-test-agent's session API: traces the CLI sent under one session token."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def start(self, token: str) -> None:
        assert self.get(f"/test/session/start?test_session_token={token}")[0] == 200

    def traces(self, token: str, expected: int) -> list[list[dict]]:
        deadline = time.monotonic() + 5
        while True:
            traces = json.loads(self.get(f"/test/session/traces?test_session_token={token}")[1])
            if len(traces) >= expected or time.monotonic() > deadline:
                return traces
            time.sleep(0.1)

    def snapshot(self, token: str, ignores: str) -> tuple[int, str]:
        return self.get(f"/test/session/snapshot?test_session_token={token}&ignores={ignores}")


@pytest.fixture
def agent(stack: Stack) -> Agent:
    return Agent(stack.agent_url)


class DogStatsd:
    """A UDP socket the test owns, read all along by a thread: a burst of datagrams read only at the
    end would overflow the socket's receive buffer and lose the last ones."""

    QUIET_S = 0.5  # no datagram for this long: the sender is done

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[str] = []
        self.last_at = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while self.sock.fileno() != -1:
            with contextlib.suppress(OSError):
                self.received += self.sock.recv(65535).decode(errors="replace").splitlines()
                self.last_at = time.monotonic()

    def lines(self) -> list[str]:
        """Every line received so far, once the sender has been quiet for QUIET_S."""
        while time.monotonic() - self.last_at < self.QUIET_S:
            time.sleep(0.05)
        return list(self.received)

    def text(self) -> str:
        return "\n".join(self.lines())

    def metrics(self) -> list[tuple[str, str, dict[str, str]]]:
        parsed = []
        self.values: dict[str, list[float]] = {}
        for line in self.lines():
            head, kind, tags = line.split("|")
            name, value = head.split(":")
            self.values.setdefault(name, []).append(float(value))
            parsed.append((name, kind, dict(t.split(":", 1) for t in tags.lstrip("#").split(","))))
        return parsed

    def close(self) -> None:
        self.sock.close()
        self.reader.join(timeout=5)


@pytest.fixture
def dogstatsd() -> Iterator[DogStatsd]:
    catcher = DogStatsd()
    yield catcher
    catcher.close()


@pytest.fixture
def dead_port() -> int:
    """A loopback port nothing listens on: connections are refused at once."""
    return free_port()


@pytest.fixture
def blackhole_port() -> Iterator[int]:
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


class PartitionProxy:
    """A TCP relay to a loopback port that can be cut: from then on it relays nothing, in either
    direction, and answers no new connection (a network partition, not a refused connection)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.cut_off = threading.Event()
        self.stopping = threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.cut_off.set()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                continue
            self.sockets.append(client)
            if self.cut_off.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.2)
        while not self.stopping.is_set():
            if self.cut_off.is_set():
                time.sleep(0.2)
                continue
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with contextlib.suppress(OSError):
                sink.sendall(data)

    def close(self) -> None:
        self.stopping.set()
        for sock in [self.server, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def valkey_partition(stack: Stack) -> Iterator[PartitionProxy]:
    proxy = PartitionProxy(stack.ports["valkey"])
    yield proxy
    proxy.close()


MCP_TOKEN = "test-mcp-token-5f0c2e"


@contextmanager
def mcp_http_server(memory: Memory, *args: str, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mcp --http` on a free loopback port with MCP_TOKEN, once it answers; stopped by SIGTERM after."""
    port = free_port()
    server = memory.with_env(MEMORY_MCP_TOKEN=MCP_TOKEN, **env).popen("mcp", "--http", f"127.0.0.1:{port}", *args)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=1)
        except urllib.error.HTTPError as answered:
            answered.close()
            break  # it answers (401 without a token)
        except OSError:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "the MCP server did not listen within 30 s"
            time.sleep(0.1)
    try:
        yield url, server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=15)
        for stream in (server.stdin, server.stdout, server.stderr):
            if stream:
                stream.close()
