"""The recall dev set: two LoCoMo conversations (../shared/data/locomo-dev.json; its README says how
it is judged) as the benchmark's events and questions. Each turn is one event, `"<speaker>: <text>"`,
at its session's date plus one second per turn; each question of categories 1-4 keeps the turns
its evidence names. Category 5 (adversarial, no answer in the conversation) is left out.

Only these two conversations are used for tuning: the release's other eight judge the work.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from recall_corpus import Event, Question

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo-dev.json"
CATEGORIES = {1: "multihop", 2: "temporal", 3: "open", 4: "single"}
KINDS = ("single", "multihop", "temporal", "open")


def _session_time(text: str) -> datetime:
    """'1:56 pm on 8 May, 2023' as UTC."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def build(path: Path = DATA) -> tuple[list[Event], list[Question]]:
    samples = json.loads(path.read_text())
    events: list[Event] = []
    questions: list[Question] = []
    for sample in samples:
        memory = sample["sample_id"].replace("-", "")  # a group name: conv26
        conversation = sample["conversation"]
        sessions = sorted(int(key.split("_")[1]) for key in conversation if re.fullmatch(r"session_\d+", key))
        for number in sessions:
            start = _session_time(conversation[f"session_{number}_date_time"])
            for offset, turn in enumerate(conversation[f"session_{number}"]):
                at = (start + timedelta(seconds=offset)).isoformat()
                events.append(Event(f"{memory}:{turn['dia_id']}", memory, at, f"{turn['speaker']}: {turn['text']}"))
        known = {e.id for e in events}
        for i, qa in enumerate(sample["qa"]):
            if qa["category"] not in CATEGORIES:
                continue
            evidence = [part.strip() for entry in qa["evidence"] for part in re.split(r"[;,]", entry) if part.strip()]
            answers = tuple(dict.fromkeys(f"{memory}:{e}" for e in evidence if f"{memory}:{e}" in known))
            if answers:
                questions.append(Question(f"{memory}-q{i:03d}", memory, CATEGORIES[qa["category"]],
                                          qa["question"], answers))
    return events, questions
