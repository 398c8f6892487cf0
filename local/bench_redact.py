"""`make bench-redact`: the cost of credential redaction on 100 KB of coding-agent events.

The quick pass runs in every `store` (budget: 5 ms per 100 KB); the thorough pass (the quick pass
plus detect-secrets) runs in the worker before the LLM call. Text: tests/redaction_corpus.py's
ordinary events repeated to 100 KB, and the same with its 48 credential events mixed in. Floor,
measured in the same run: json.dumps of the same text, which `store` does anyway to queue it.

  python local/bench_redact.py [--runs 50]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "containers" / "opencode-server" / "graphiti"), str(ROOT / "tests")]

import memory_manager  # noqa: E402
from redaction_corpus import CREDENTIAL_EVENTS, ORDINARY_EVENTS  # noqa: E402

SIZE = 100_000


def median_ms(work, text: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work(text)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    runs = parser.parse_args().runs
    texts = {"ordinary events": "\n".join(ORDINARY_EVENTS),
             "with credentials": "\n".join(ORDINARY_EVENTS + [event for event, _ in CREDENTIAL_EVENTS])}
    memory_manager.redact("warm up: imports detect-secrets", thorough=True)
    print(f"python {sys.version.split()[0]}; 100 KB of text; medians of {runs} runs (thorough: 5)\n")
    print("| text | json.dumps (floor) | quick pass (store) | ratio | thorough pass (worker) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, base in texts.items():
        text = (base * (SIZE // len(base) + 1))[:SIZE]
        floor = median_ms(json.dumps, text, runs)
        quick = median_ms(memory_manager.redact, text, runs)
        thorough = median_ms(functools.partial(memory_manager.redact, thorough=True), text, 5)
        print(f"| {name} | {floor:.2f} ms | {quick:.2f} ms | {quick / floor:.0f}× | {thorough:.0f} ms | "
              f"{thorough / floor:.0f}× |")


if __name__ == "__main__":
    main()
