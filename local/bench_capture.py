"""`make bench-capture`: what a scripted OpenCode session leaves for the next one to recall.

OpenCode itself (opencode-ai 1.18.33, headless and offline, the stand-in as its chat model) runs one
scripted piece of work with the plugin installed: an edit, a test run that fails, the fix and the test
run that passes, and a decision, each turn its own session. Then every question a user would ask about
that work is put to `recall()` (scope all, 5 items, what `search_memory_facts` returns) and to the
session-start block (`context`, the plugin's budget, `--recent 5`); a question counts as answered when
its answer's words are in what came back. Once with the plugin as it was before outcomes were captured
(git revision --before, default fa8a57d) and once with the working tree's.

  python local/bench_capture.py [--before REV]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_plugin import PLUGIN, install_opencode, post, project
from stack import ROOT, Stack

MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
sys.path.insert(0, str(MODULE.parent))

# (what the user asks, what the scripted model does: tool calls, then its answer)
WORK: list[tuple[str, list[dict], str]] = [
    ("Add a retry to connect_graph in src/db.py",
     [{"tool": "write", "arguments": {"filePath": "src/db.py", "content": "def connect_graph():\n    ...\n"}}],
     "Added a retry with exponential backoff, 3 attempts, to connect_graph in src/db.py."),
    ("Run the tests",
     [{"tool": "bash", "arguments": {"command": "sh -c 'echo 2 failed; exit 1'", "description": "tests"}}],
     "2 tests failed: test_retry_gives_up expects 5 attempts and the code makes 3."),
    ("Fix the failing tests",
     [{"tool": "write", "arguments": {"filePath": "src/db.py", "content": "def connect_graph():\n    ...  # 5\n"}},
      {"tool": "bash", "arguments": {"command": "sh -c 'echo 14 passed'", "description": "tests"}}],
     "Raised the retry limit to 5 attempts; all 14 tests pass now."),
    ("Which store should the query cache use?", [],
     "We decided on Valkey for the query cache, since it speaks the Redis protocol; FalkorDB stays the graph store."),
]
QUESTIONS = [  # (question, words its answer holds)
    ("How many attempts does connect_graph make now?", "5 attempts"),
    ("What backoff does the retry in connect_graph use?", "exponential backoff"),
    ("Why did the tests fail?", "expects 5 attempts"),
    ("Which test failed?", "test_retry_gives_up"),
    ("Did the test run fail or pass the first time?", "exit 1"),
    ("How many tests pass now?", "14 tests pass"),
    ("Which file holds connect_graph?", "src/db.py"),
    ("What did we decide for the query cache?", "Valkey for the query cache"),
    ("Why Valkey?", "Redis protocol"),
    ("Which graph store do we keep?", "FalkorDB stays the graph store"),
]


def run_the_work(opencode: Path, directory: Path, env: dict[str, str], stack: Stack) -> None:
    for asked, calls, answer in WORK:
        script = [{"tool": c["tool"], "arguments": {**c["arguments"], **(
            {"filePath": str(directory / c["arguments"]["filePath"])} if "filePath" in c["arguments"] else {})}}
            for c in calls] + [{"text": answer}]
        post(stack.standin_url + "/_standin/chat", {"script": script})
        run = subprocess.run([str(opencode), "run", asked], cwd=directory, env=env, capture_output=True, text=True,
                             timeout=180, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stdout + run.stderr
        time.sleep(1)  # the plugin's detached store


async def answered(group: str) -> tuple[int, int, list[str]]:
    import memory_manager as mm

    os.environ["MEMORY_GROUP_ID"] = group
    await mm.close()
    deadline = time.monotonic() + 180
    while (await mm.queue_status())["groups"] and any(g["queued"] or g["in_flight"]
                                                     for g in (await mm.queue_status())["groups"]):
        assert time.monotonic() < deadline, "ingestion did not finish"
        await asyncio.sleep(1)
    by_recall = by_block = 0
    missed = []
    for question, words in QUESTIONS:
        items = await mm.recall(question, 5)
        block = await mm.context(question, 1500, recent=5)
        found = any(words in " ".join(item.text.split()) for item in items)
        by_recall += found
        by_block += words in block
        if not found:
            missed.append(question)
    stored = [e["content"] for e in await mm.get_episodes(20)]
    await mm.close()
    return by_recall, by_block, [*missed, "", *stored]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="fa8a57d", help="git revision of the plugin to compare with")
    args = parser.parse_args()
    before = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.before}:containers/opencode-server/plugins/"
                             "memory.js"], check=True, capture_output=True, text=True).stdout
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {len(WORK)} scripted turns, "
          f"{len(QUESTIONS)} questions; answered: the answer's words among recall's 5 items / in the block\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-bench-capture-") as run_dir:
        stack = Stack(Path(run_dir) / "stack")
        stack.start()
        try:
            opencode = install_opencode(Path(run_dir) / "opencode")
            os.environ.update(stack.env(), DD_TRACE_ENABLED="false", MEMORY_COALESCE_WAIT="0",
                              MEMORY_SPOOL_DIR=str(Path(run_dir) / "spool"))
            for name, plugin in (("before (" + args.before + ")", before), ("now", PLUGIN.read_text())):
                root = Path(run_dir) / name.split()[0]
                directory, env = project(root, stack)
                (directory / ".opencode" / "plugins" / "memory.js").write_text(plugin)
                (directory / "src").mkdir()
                subprocess.run(["git", "init", "-q", str(directory)], check=True)  # paths relative to it
                group = f"bench_capture_{name.split()[0]}"
                env.update(MEMORY_GROUP_ID=group, MEMORY_COALESCE_WAIT="0", MEMORY_MANAGER=str(MODULE),
                           MEMORY_PYTHON=sys.executable, MEMORY_SPOOL_DIR=str(Path(run_dir) / "spool"))
                run_the_work(opencode, directory, env, stack)
                rows.append((name, *asyncio.run(answered(group))))
        finally:
            stack.stop()
    print("| plugin | answered by recall (5 items) | answered by the session-start block |")
    print("|---|---|---|")
    for name, by_recall, by_block, _ in rows:
        print(f"| {name} | {by_recall}/{len(QUESTIONS)} ({100 * by_recall / len(QUESTIONS):.0f} %) | "
              f"{by_block}/{len(QUESTIONS)} ({100 * by_block / len(QUESTIONS):.0f} %) |")
    for name, *_, detail in rows:
        print(f"\n{name}: missed by recall, then what was stored:\n" + "\n".join(f"  {line}" for line in detail))


if __name__ == "__main__":
    main()
