"""`make bench-mcp`: the MCP server's round trips through the official MCP client, over stdio and
streamable HTTP, against a raw Valkey GET (redis.asyncio) in the same run.

Rows: a cached search_memory_facts (the answer is in Valkey), add_memory (queued; no worker runs),
and the server's resident memory idle and after 1,000 calls. Medians and p99 of --calls calls.

  python local/bench_mcp.py [--calls 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis.asyncio
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from stack import ROOT, Stack, free_port

MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
TOKEN = "bench-token"


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered) * 1e6, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6


async def timed_calls(client: Client, calls: int, tool: str, arguments: dict) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        result = await client.call_tool(tool, arguments)
        times.append(time.perf_counter() - started)
        assert not result.is_error, result.content
    return times


async def valkey_gets(port: int, calls: int) -> list[float]:
    client = redis.asyncio.Redis(port=port)
    await client.set("bench:mcp", "x" * 300)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.get("bench:mcp")
        times.append(time.perf_counter() - started)
    await client.aclose()
    return times


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server_pid(pattern: str) -> int:
    found = subprocess.run(["pgrep", "-n", "-f", pattern], capture_output=True, text=True).stdout.split()
    return int(found[0])


def start_http_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(MODULE), "mcp", "--group", "bench_mcp", "--http",
                               f"127.0.0.1:{port}"], env={**env, "MEMORY_MCP_TOKEN": TOKEN}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
        except urllib.error.HTTPError as answered:  # 401: it listens
            answered.close()
            return server, url
        except OSError:
            time.sleep(0.1)


async def measure(env: dict[str, str], stack: Stack, calls: int, url: str) -> dict[str, tuple[float, float]]:
    rows: dict[str, tuple[float, float]] = {}
    query = {"query": "graph store write queue", "limit": 5}
    stdio = StdioServerParameters(command=sys.executable, args=[str(MODULE), "mcp", "--group", "bench_mcp"],
                                  env=env)
    async with Client(stdio, cache=None) as client:
        await client.call_tool("search_memory_facts", query)  # fills the cache
        pid = server_pid(f"{MODULE} mcp --group bench_mcp")
        rows["rss idle (stdio), MB"] = (rss_mb(pid), float("nan"))
        rows["search_memory_facts, cached, stdio"] = percentiles(await timed_calls(client, calls, "search_memory_facts",
                                                                                   query))
        rows["add_memory, stdio"] = percentiles(await timed_calls(client, min(calls, 200), "add_memory",
                                                                  {"content": "Bench note about FalkorDB."}))
        await timed_calls(client, max(0, 1000 - calls - min(calls, 200)), "search_memory_facts", query)
        rows["rss after 1,000 calls (stdio), MB"] = (rss_mb(pid), float("nan"))

    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with create_mcp_http_client(headers=headers) as http, \
            Client(streamable_http_client(url, http_client=http), cache=None) as client:
        await client.call_tool("search_memory_facts", query)
        rows["search_memory_facts, cached, HTTP"] = percentiles(await timed_calls(client, calls, "search_memory_facts",
                                                                                  query))
        rows["add_memory, HTTP"] = percentiles(await timed_calls(client, min(calls, 200), "add_memory",
                                                                 {"content": "Bench note about Valkey."}))
    rows["raw Valkey GET (floor)"] = percentiles(await valkey_gets(stack.ports["valkey"], calls))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    calls = parser.parse_args().calls
    with tempfile.TemporaryDirectory(prefix="memory-bench-mcp-") as run_dir:
        stack = Stack(Path(run_dir))
        stack.start()
        try:
            env = {**os.environ, **stack.env(), "MEMORY_AUTO_DRAIN": "off", "DD_TRACE_ENABLED": "false"}
            subprocess.run([sys.executable, str(MODULE), "store", "--group", "bench_mcp", "--wait",
                            "Decided to keep FalkorDB as the graph store; Valkey holds the write queue."],
                           env={**env, "MEMORY_AUTO_DRAIN": "on"}, check=True, capture_output=True)
            server, url = start_http_server(env)
            try:
                rows = asyncio.run(measure(env, stack, calls, url))
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=15)
        finally:
            stack.stop()
    floor = rows["raw Valkey GET (floor)"][0]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {calls} calls per row (medians, p99)\n")
    print("| measurement | median | p99 | ratio to a raw Valkey GET |")
    print("|---|---|---|---|")
    for name, (median, p99) in rows.items():
        if name.startswith("rss"):
            print(f"| {name} | {median:.0f} MB | | |")
        else:
            print(f"| {name} | {median:.0f} µs | {p99:.0f} µs | {median / floor:.1f}× |")


if __name__ == "__main__":
    main()
