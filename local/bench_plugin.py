"""`make bench-plugin`: the OpenCode plugin's session-start recall as OpenCode sees it, by path.

OpenCode itself (opencode-ai 1.18.33, headless and offline, the stand-in as its chat model) runs one
session per question with the plugin (containers/opencode-server/plugins/memory.js) installed; the
plugin logs how long each recall took and by which path, and how long the first model call waited
for it (the recall starts when the first user message arrives): `memory recall via cli|mcp in N ms
(the first model call waited M ms)`. Those two figures are what this table reports. Every question
is new, so every recall is a cache miss.

Paths: `cli` spawns `memory-manager context` (the default); `mcp` calls a long-lived
`memory-manager mcp --http` (MEMORY_MCP_URL). Stand-in latency per request: 0 ms and 300 ms (the
question's embedding pays it once). Floors from the same run: `python -c 'import redis.asyncio'`
as a whole process, and one embeddings request to the stand-in. A row more: the same get_context
call sent to the server from this process, outside OpenCode (what the server itself takes).

  python local/bench_plugin.py [--sessions 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from stack import ROOT, Stack, free_port

MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
PLUGIN = ROOT / "containers" / "opencode-server" / "plugins" / "memory.js"
OPENCODE_VERSION = "1.18.33"
GROUP = "bench_plugin"
TOKEN = "bench-plugin-token"
EVENTS = ("Decided to keep FalkorDB as the graph store for the billing service.",
          "The release checklist lives in NOTES.md and Priya reviews it.",
          "Fixed the flaky deploy: the disk filled up with old container images.")
TOPICS = ("graph store", "release checklist", "flaky deploy", "billing service", "container images")
RECALL_LINE = re.compile(r"memory recall via (cli|mcp) in (\d+) ms \(the first model call waited (\d+) ms\)")


def post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.read()


def install_opencode(cache: Path) -> Path:
    binary = cache / "node_modules" / ".bin" / "opencode"
    if not binary.exists():
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(cache),
                        f"opencode-ai@{OPENCODE_VERSION}"], check=True, timeout=600)
    return binary


def project(root: Path, stack: Stack) -> tuple[Path, dict[str, str]]:
    """A project directory with the plugin and an OpenCode HOME wired to the stand-in (as the tests do)."""
    directory, home = root / "project", root / "home"
    for config in (home / ".config" / "opencode", directory / ".opencode"):
        (config / "node_modules").mkdir(parents=True)  # no start-up npm install of @opencode-ai/plugin
        (config / "package-lock.json").write_text(json.dumps(
            {"lockfileVersion": 3, "packages": {"": {"dependencies": {"@opencode-ai/plugin": OPENCODE_VERSION}}}}))
    (directory / ".opencode" / "plugins").mkdir()
    shutil.copy(PLUGIN, directory / ".opencode" / "plugins" / "memory.js")
    (directory / "opencode.json").write_text(json.dumps({
        "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Stand-in",
                              "options": {"baseURL": stack.env()["OPENAI_BASE_URL"], "apiKey": "x"},
                              "models": {"fake-model": {"name": "Fake", "tool_call": True}}}},
        "model": "fake/fake-model", "small_model": "fake/fake-model", "autoupdate": False, "share": "disabled"}))
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local" / "share"),
           "XDG_CACHE_HOME": str(home / ".cache"), "XDG_STATE_HOME": str(home / ".local" / "state"),
           **{f"OPENCODE_DISABLE_{name}": "1" for name in ("AUTOUPDATE", "MODELS_FETCH", "LSP_DOWNLOAD", "SHARE",
                                                          "DEFAULT_PLUGINS", "CLAUDE_CODE", "EXTERNAL_SKILLS")},
           **stack.env(), "MEMORY_GROUP_ID": GROUP}
    return directory, env


def recall_times(opencode: Path, directory: Path, env: dict[str, str], stack: Stack, path: str,
                 sessions: int, tag: str) -> tuple[list[float], list[float], list[float]]:
    times, waits, runs = [], [], []
    for i in range(-1, sessions):  # a first session not counted: OpenCode's first run in a new HOME sets it up
        post(stack.standin_url + "/_standin/chat", {"script": [{"text": "Noted."}]})
        question = f"What do we know about the {TOPICS[i % len(TOPICS)]}? ({tag} {i + 1})"
        # --print-logs: the log on stderr as it is written (the log file can miss its last lines at exit)
        started = time.perf_counter()
        run = subprocess.run([str(opencode), "run", "--print-logs", question], cwd=directory, env=env,
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stdout + run.stderr
        wall_ms = (time.perf_counter() - started) * 1000
        log = run.stderr
        found = RECALL_LINE.findall(log)
        if i >= 0:
            runs.append(wall_ms)
            assert [via for via, *_ in found] == ([path] if path != "off" else []), log[-3000:]
            if found:
                times.append(float(found[0][1]))
                waits.append(float(found[0][2]))
    return times, waits, runs


def floor_times(stack: Stack, runs: int) -> tuple[list[float], list[float]]:
    imports, embeddings = [], []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import redis.asyncio"], check=True)
        imports.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        post(stack.standin_url + "/v1/embeddings", {"input": ["a question"], "model": "text-embedding-3-small"})
        embeddings.append((time.perf_counter() - started) * 1000)
    return imports, embeddings


def direct_times(url: str, calls: int, tag: str) -> list[float]:
    """get_context round trips to the server from here, outside OpenCode: one session, new questions."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Authorization": f"Bearer {TOKEN}"}

    def rpc(message: dict) -> urllib.request.Request:
        return urllib.request.Request(url, data=json.dumps(message).encode(), headers=headers)

    with urllib.request.urlopen(rpc({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}),
            timeout=30) as reply:
        headers.update({"mcp-session-id": reply.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"})
    urllib.request.urlopen(rpc({"jsonrpc": "2.0", "method": "notifications/initialized"}), timeout=30).close()
    times = []
    for i in range(calls):
        started = time.perf_counter()
        with urllib.request.urlopen(rpc({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": {
                "name": "get_context", "arguments": {"query": f"billing graph store? ({tag} direct {i})"}}}),
                timeout=30) as reply:
            assert not json.load(reply)["result"].get("isError")
        times.append((time.perf_counter() - started) * 1000)
    return times


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(MODULE), "mcp", "--http", f"127.0.0.1:{port}"],
                              env={**env, "MEMORY_MCP_TOKEN": TOKEN}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
        except urllib.error.HTTPError:
            return server, url  # it answers (401 without the token)
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the MCP server did not listen within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5, help="OpenCode sessions per row")
    args = parser.parse_args()
    if shutil.which("npm") is None:
        raise SystemExit("bench-plugin needs node's npm (to install OpenCode)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    opencode = install_opencode(cache / "memory-bench-opencode")
    rows: list[tuple[str, int, float | None, float | None, tuple[float, float] | None, float, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="bench-plugin-") as run_dir:
        stack = Stack(Path(run_dir) / "stack")
        stack.start()
        server = None
        try:
            directory, env = project(Path(run_dir), stack)
            for content in EVENTS:
                subprocess.run([sys.executable, str(MODULE), "store", "--wait", content], env=env, check=True,
                               capture_output=True, timeout=300)
            server, url = start_server(env)
            for latency in (0, 300):
                post(stack.standin_url + "/_standin/faults", {"latency_ms": latency})
                imports, embeddings = floor_times(stack, args.sessions)
                floor = statistics.median(imports) + statistics.median(embeddings)
                times = direct_times(url, 4 * args.sessions, f"{latency}ms")
                rows.append(("mcp, from outside OpenCode", latency, statistics.median(times), max(times), None, floor,
                             None))
                for path in ("off", "cli", "mcp"):
                    extra = {"off": {"MEMORY_RECALL": "off"}, "cli": {},
                             "mcp": {"MEMORY_MCP_URL": url, "MEMORY_MCP_TOKEN": TOKEN}}[path]
                    times, waits, runs = recall_times(opencode, directory, {**env, **extra}, stack, path,
                                                      args.sessions, f"{latency}ms")
                    if path == "off":
                        rows.append(("recall off", latency, None, None, None, floor, statistics.median(runs)))
                    else:
                        rows.append((path, latency, statistics.median(times), max(times),
                                     (statistics.median(waits), max(waits)), floor, statistics.median(runs)))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=15)
            stack.stop()
    print(f"session-start recall as the plugin inside OpenCode logs it; {args.sessions} sessions per row, "
          "every recall a cache miss")
    print(f"{'path':<27} {'stand-in latency':>16} {'recall p50':>11} {'max':>7} {'turn waited p50 / max':>22} "
          f"{'floor*':>8} {'p50 / floor':>12} {'opencode run p50':>17}")
    for path, latency, p50, worst, waited, floor, run in rows:
        recalled = "-" if p50 is None or worst is None else f"{p50:>8.0f} ms {worst:>4.0f} ms"
        shown = "-" if waited is None else f"{waited[0]:.0f} / {waited[1]:.0f} ms"
        ratio = "-" if p50 is None else f"{p50 / floor:.2f}x"
        print(f"{path:<27} {latency:>13} ms {recalled:>19} {shown:>22} {floor:>5.0f} ms {ratio:>12} "
              f"{'-' if run is None else f'{run:.0f} ms':>17}")
    print("* python -c 'import redis.asyncio' (whole process) + one embeddings request, medians of the same run")


if __name__ == "__main__":
    main()
