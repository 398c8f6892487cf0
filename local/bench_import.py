"""`make bench-import`: `import opencode` over many sessions real OpenCode wrote. OpenCode
(opencode-ai 1.18.33, offline, the stand-in as its scripted model) runs N one-turn sessions in a
fresh git project; then `import opencode` runs twice and a worker drains: every turn must be stored
once. Prints the timings and counts.

  python local/bench_import.py --stack-dir /tmp/stk-sem [--sessions 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

import bench_recall
from bench_plugin import OPENCODE_VERSION as VERSION
from bench_plugin import install_opencode, post
from stack import ROOT

MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"


def project(root: Path, base_url: str) -> tuple[Path, dict[str, str]]:
    directory, home = root / "project", root / "home"
    directory.mkdir()
    subprocess.run(["git", "init", "-q", str(directory)], check=True)
    subprocess.run(["git", "-C", str(directory), "remote", "add", "origin",
                    f"git@github.com:acme/import-{os.getpid()}.git"], check=True)
    for config in (home / ".config" / "opencode", directory / ".opencode"):  # no start-up npm install
        (config / "node_modules").mkdir(parents=True)
        (config / "package-lock.json").write_text(json.dumps(
            {"lockfileVersion": 3, "packages": {"": {"dependencies": {"@opencode-ai/plugin": VERSION}}}}))
    (directory / "opencode.json").write_text(json.dumps({
        "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Stand-in",
                              "options": {"baseURL": base_url, "apiKey": "x"},
                              "models": {"fake-model": {"name": "Fake", "tool_call": True}}}},
        "model": "fake/fake-model", "small_model": "fake/fake-model", "autoupdate": False, "share": "disabled"}))
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_DATA_HOME": str(home / ".local" / "share"), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_STATE_HOME": str(home / ".local" / "state"),
           **{f"OPENCODE_DISABLE_{n}": "1" for n in ("AUTOUPDATE", "MODELS_FETCH", "LSP_DOWNLOAD", "SHARE",
                                                     "DEFAULT_PLUGINS", "CLAUDE_CODE", "EXTERNAL_SKILLS")}}
    return directory, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack-dir", type=Path, required=True)
    parser.add_argument("--sessions", type=int, default=100)
    args = parser.parse_args()
    stack = bench_recall.running_stack(args.stack_dir)
    binary = install_opencode(args.stack_dir / "opencode")
    with tempfile.TemporaryDirectory() as tmp:
        directory, env = project(Path(tmp), stack.env()["OPENAI_BASE_URL"])
        started = time.monotonic()
        for i in range(args.sessions):
            post(stack.standin_url + "/_standin/chat", {"script": [{"text": f"Noted decision {i}: the ledger keeps "
                                                                    f"{i} shards."}]})
            subprocess.run([str(binary), "run", f"Decision {i}: how many shards does the ledger keep?"], cwd=directory,
                           env=env, check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        wrote = time.monotonic() - started
        memory_env = {**os.environ, **stack.env(), "XDG_DATA_HOME": env["XDG_DATA_HOME"], "PWD": str(directory),
                      "DD_TRACE_ENABLED": "false",
                      "MEMORY_AUTO_DRAIN": "off", "MEMORY_COALESCE_WAIT": "0"}
        memory_env.pop("MEMORY_GROUP_ID", None)

        def manager(*argv: str) -> str:
            return subprocess.run([sys.executable, str(MODULE), *argv], cwd=directory, env=memory_env, check=True,
                                  capture_output=True, text=True, timeout=600).stdout

        timings = []
        for _ in range(2):  # twice before any worker: the second queues every turn again
            began = time.monotonic()
            report = json.loads(manager("import", "opencode", "--json"))
            timings.append((time.monotonic() - began, report))
        began = time.monotonic()
        manager("drain")
        drained = time.monotonic() - began
        third = json.loads(manager("import", "opencode", "--json"))
        group = report["group"]
        print(f"{args.sessions} sessions written by OpenCode {VERSION} in {wrote:.0f} s; group {group}", flush=True)
        for n, (took, report) in enumerate(timings, start=1):
            print(f"import {n}: {took:.1f} s, stored {report['stored']}, already {report['already']}, "
                  f"sessions {report['sessions']}", flush=True)
        print(f"drain: {drained:.0f} s; import 3: stored {third['stored']}, already {third['already']}", flush=True)
        graph = redis.Redis(port=stack.ports["falkordb"]).execute_command(
            "GRAPH.RO_QUERY", group, "MATCH (e:Episodic) RETURN count(e), count(DISTINCT e.content)")
        print(f"episodes in the group: {graph[1][0][0]}, distinct texts {graph[1][0][1]}")
        manager("erase", "--group", group, "--yes")


if __name__ == "__main__":
    main()
