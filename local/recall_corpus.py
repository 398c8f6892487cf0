"""The recall benchmark's corpus: BENCHMARK INFRASTRUCTURE, written for this project (no third-party
text), built deterministically from a seed.

Two memories, each a list of events with the time they happened and labelled questions:
  chat   a long multi-session chat between two friends, Maya and Theo (one event per turn), in
         weekly sessions: life news among a lot of small talk that shares their words and names;
  agent  a coding agent's event log on one project (edits, errors, test runs, decisions, the
         user's preferences and changes of mind), in daily sessions.
Question kinds: single (one event answers it, asked in other words), multihop (two events, linked
by a name, answer it together), temporal (when something happened, or what happened at a time),
changed (something changed over time: only the newest event answers "now" questions).

  python local/recall_corpus.py [--stats]     print the corpus as JSON (or its sizes)
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class Event:
    id: str
    memory: str  # chat | agent
    at: str      # ISO 8601, when it happened
    text: str


@dataclass(frozen=True)
class Question:
    id: str
    memory: str
    kind: str    # single | multihop | temporal | changed
    text: str
    answers: tuple[str, ...]  # ids of the answer-bearing events


@dataclass
class _Script:
    """Key events by session, each with the questions it (or it with others) answers."""

    memory: str
    start: datetime
    step: timedelta
    sessions: int
    turns_per_session: int
    keys: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # session -> [(key, text)]
    questions: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)  # (kind, text, keys)

    def key(self, session: int, key: str, text: str) -> None:
        self.keys.setdefault(session, []).append((key, text))

    def ask(self, kind: str, text: str, *keys: str) -> None:
        self.questions.append((kind, text, keys))


# --- the chat -------------------------------------------------------------------------------------

def _chat() -> _Script:
    c = _Script("chat", datetime(2026, 1, 5, 19, 0, tzinfo=UTC), timedelta(days=7), sessions=16, turns_per_session=22)
    c.key(0, "dog", "Maya: Big news, I finally adopted a dog on Saturday! A beagle puppy, I named him Pixel.")
    c.ask("single", "What breed is the puppy Maya took home?", "dog")
    c.ask("single", "What is the name of Maya's pet?", "dog")
    c.key(0, "theo_job", "Theo: I started my new job at Northwind Labs this week, I'm building their "
                         "billing dashboards.")
    c.ask("single", "Which company hired Theo?", "theo_job")
    c.key(1, "sister", "Theo: My sister Ines moved to Porto last month, she loves being near the ocean.")
    c.key(5, "ines_job", "Theo: Ines just got a position at the aquarium, she studies octopus behaviour there.")
    c.ask("multihop", "What does Theo's sister do for a living?", "ines_job", "sister")
    c.ask("single", "Which city did Ines relocate to?", "sister")
    c.key(1, "pottery", "Maya: I signed up for a pottery class on Tuesday evenings, my first bowl came out lopsided.")
    c.ask("single", "What hobby did Maya take up on weeknights?", "pottery")
    c.key(2, "marathon", "Maya: I ran my first half marathon on Sunday in 2 hours and 4 minutes, my legs are jelly.")
    c.ask("temporal", "When did Maya complete her first half marathon?", "marathon")
    c.ask("single", "How long did Maya need for the half marathon?", "marathon")
    c.key(2, "cello", "Theo: I bought a second-hand cello and booked lessons with an old teacher called Mr. Okafor.")
    c.ask("single", "What instrument is Theo learning?", "cello")
    c.key(9, "okafor", "Theo: Mr. Okafor retired from teaching, so he gave me his sheet music collection as a goodbye.")
    c.ask("multihop", "What did Theo's music teacher give him when he stopped teaching?", "okafor", "cello")
    c.key(3, "allergy", "Maya: Turns out I'm allergic to cashews, found out the hard way at a dinner party.")
    c.ask("single", "Which nut can Maya not eat?", "allergy")
    c.key(3, "flat_old", "Theo: I'm renting a tiny flat above a bakery on Elm Street, it always smells of bread.")
    c.key(11, "flat_new", "Theo: I moved out of the Elm Street flat, I now live in a house by the river "
                          "with two roommates.")
    c.ask("changed", "Where does Theo live now?", "flat_new")
    c.ask("temporal", "When did Theo move into the house by the river?", "flat_new")
    c.key(4, "book", "Maya: I'm reading The Glass Orchard by Lena Voss, the ending made me cry on the train.")
    c.ask("single", "Which novel moved Maya to tears?", "book")
    c.key(4, "car_old", "Theo: I still drive my dad's old blue Volvo, it's loud but it never breaks down.")
    c.key(12, "car_new", "Theo: I sold the Volvo and bought an electric bike instead, I cycle to work every day now.")
    c.ask("changed", "How does Theo get to work these days?", "car_new")
    c.key(5, "vegetarian", "Maya: I've been vegetarian for a month now, I don't miss meat as much as I expected.")
    c.key(13, "vegan", "Maya: I went fully vegan this week, no more cheese, which is the hardest part honestly.")
    c.ask("changed", "What diet does Maya follow now?", "vegan")
    c.key(6, "trip", "Maya: We're planning a trip to Kyoto in April to see the cherry blossoms.")
    c.key(10, "trip_done", "Maya: Back from Kyoto! The temples were quiet at dawn and we ate ramen every night.")
    c.ask("multihop", "What did Maya eat every evening on her spring trip to Japan?", "trip_done", "trip")
    c.ask("temporal", "When was Maya planning to go to Kyoto?", "trip")
    c.key(6, "promotion", "Theo: I got promoted to team lead at Northwind, I now manage four engineers.")
    c.ask("single", "How many people report to Theo?", "promotion")
    c.ask("temporal", "When did Theo become a team lead?", "promotion")
    c.key(7, "pixel_vet", "Maya: Pixel swallowed a sock and we spent the night at the emergency vet, he's fine now.")
    c.ask("multihop", "What happened to Maya's beagle that needed an emergency visit?", "pixel_vet", "dog")
    c.key(7, "garden", "Theo: I planted tomatoes and basil on the balcony, the basil is already taking over.")
    c.ask("single", "What is Theo growing outside his window?", "garden")
    c.key(8, "birthday", "Maya: My birthday is on the 14th of March, I'm thinking of a small picnic in the park.")
    c.ask("single", "What is Maya's date of birth?", "birthday")
    c.key(8, "chess", "Theo: I joined a chess club that meets at the library on Thursdays, I lost every game so far.")
    c.ask("single", "Where does Theo's board game club gather?", "chess")
    c.key(9, "painting", "Maya: I painted a sunrise over the harbour for my mum, it's hanging in her kitchen now.")
    c.ask("single", "What artwork did Maya make for her mother?", "painting")
    c.key(10, "sprain", "Theo: I sprained my ankle playing five-a-side football, no running for six weeks.")
    c.ask("single", "Why can't Theo jog for a while?", "sprain")
    c.key(11, "course", "Maya: I enrolled in an evening course on data visualisation, the first assignment is a map.")
    c.ask("single", "What is Maya studying at night?", "course")
    c.key(12, "coffee_old", "Maya: I drink three espressos a day, I can't function before the second one.")
    c.key(14, "coffee_new", "Maya: I quit coffee completely and switched to green tea, the headaches "
                            "stopped after a week.")
    c.ask("changed", "What does Maya drink in the morning now?", "coffee_new")
    c.key(13, "wedding", "Theo: My cousin Rafael is getting married in Lisbon in September and I'm the best man.")
    c.ask("single", "Whose wedding is Theo going to be best man at?", "wedding")
    c.ask("temporal", "When is Rafael's wedding?", "wedding")
    c.key(14, "band", "Theo: Our band played its first gig at the Copper Lantern pub, twelve people came.")
    c.ask("single", "Where did Theo's band perform for the first time?", "band")
    c.key(15, "kitten", "Maya: We adopted a grey kitten called Nori, Pixel is jealous but curious.")
    c.ask("multihop", "How did the dog react to the new cat?", "kitten", "dog")
    c.ask("single", "What animal did Maya add to her home most recently?", "kitten")
    c.key(15, "lead_back", "Theo: Being team lead is too many meetings, I asked to go back to being an engineer.")
    c.ask("changed", "What is Theo's current role at work?", "lead_back")
    return c


CHAT_SMALL_TALK = [
    "{a}: Haha, that sounds great, {b}! How was the rest of your week?",
    "{a}: Honestly this week was long, work was busy and the weather was grey.",
    "{a}: Same here, I mostly stayed in and cooked something simple.",
    "{a}: Did you watch anything good lately? I need a new show.",
    "{a}: Not really, I fell asleep on the sofa twice this weekend.",
    "{a}: That's so you, {b}. We should get dinner soon.",
    "{a}: Yes! Maybe next Friday? I'll check my calendar.",
    "{a}: I'm so tired today, I need a proper weekend.",
    "{a}: Good morning {b}! Coffee time?",
    "{a}: Thanks for asking, {b}, things are fine, just busy.",
    "{a}: I saw a funny video of a dog on a skateboard, sending it to you.",
    "{a}: It rained all day, so I cleaned the flat and did laundry.",
    "{a}: My phone battery keeps dying, I think I need a new one.",
    "{a}: Work is fine, lots of meetings, nothing exciting.",
    "{a}: I went for a walk in the park, it was nice and sunny for once.",
    "{a}: Wow, congratulations {b}! That's amazing news.",
    "{a}: Oh no, I'm sorry to hear that, {b}. Hope it gets better.",
    "{a}: Let's catch up properly on the weekend, I have so much to tell you.",
    "{a}: I tried a new recipe, a lentil soup, it was okay.",
    "{a}: The train was late again this morning, classic.",
    "{a}: Talk soon, {b}! Have a good night.",
    "{a}: I have to run, my mum is calling. Bye {b}!",
    "{a}: Did you see the news about the new bridge in town?",
    "{a}: I bought new running shoes but haven't used them yet.",
    "{a}: My neighbour's dog barks every morning at six.",
    "{a}: That made me laugh so much, {b}.",
    "{a}: I'm thinking of repainting the living room, maybe green.",
    "{a}: It's been ages since we went to the cinema together.",
]


# --- the coding agent's log -------------------------------------------------------------------

def _agent() -> _Script:
    a = _Script("agent", datetime(2026, 3, 2, 9, 0, tzinfo=UTC), timedelta(days=1), sessions=14, turns_per_session=18)
    a.key(0, "db_old", "Decision: the ledger service stores accounts in PostgreSQL 16 through SQLAlchemy 2; "
                       "the user wants one database for production and tests.")
    a.key(9, "db_new", "Decision changed: the user switched the ledger service from PostgreSQL to SQLite in WAL "
                       "mode, because the deployment is a single small container. Migrations moved to "
                       "src/ledger/migrations_sqlite.py.")
    a.ask("changed", "Which database engine does the ledger service use now?", "db_new")
    a.ask("temporal", "When did the project move off PostgreSQL?", "db_new")
    a.key(0, "formatter", "Preference: the user prefers ruff format with a line length of 100 and no black; "
                          "never reformat untouched files.")
    a.ask("single", "What code formatter and width does the user want?", "formatter")
    a.key(1, "auth_edit", "Edited src/ledger/auth.py: added refresh-token rotation in rotate_refresh_token(); "
                          "old tokens are revoked after one use.")
    a.ask("single", "Where was the refresh token rotation implemented?", "auth_edit")
    a.key(1, "timeout_err", "Error: tests/test_sync.py::test_bulk_import failed with httpx.ReadTimeout after "
                            "30 s against the payments sandbox.")
    a.key(2, "timeout_fix", "Fixed the bulk import timeout: the payments client now streams the import in pages of "
                            "500 and the timeout is 120 s (src/ledger/payments.py).")
    a.ask("multihop", "How was the failing bulk import test fixed?", "timeout_fix", "timeout_err")
    a.ask("single", "Which test hit a read timeout against the sandbox?", "timeout_err")
    a.key(2, "ci", "Decision: CI runs on GitHub Actions with a matrix of Python 3.11 and 3.12; the user does "
                   "not want Windows runners.")
    a.ask("single", "Which Python versions does the build pipeline test?", "ci")
    a.key(3, "currency_bug", "Error: ValueError: invalid literal for Decimal in src/ledger/money.py when a "
                             "currency amount had a comma as the decimal separator (German locale input).")
    a.key(4, "currency_fix", "Fixed parse_amount() in src/ledger/money.py to accept locale-specific separators "
                             "with babel.numbers.parse_decimal; added tests for de_DE and fr_FR.")
    a.ask("multihop", "Which library fixed the amount parsing bug with commas?", "currency_fix", "currency_bug")
    a.key(3, "naming", "Preference: the user wants test names written as full sentences describing the scenario, "
                       "like test_a_refund_larger_than_the_payment_is_refused.")
    a.ask("single", "How should tests be named in this repo?", "naming")
    a.key(4, "logging_old", "Decision: logs are plain text lines through the standard logging module.")
    a.key(11, "logging_new", "Decision changed: logs are now JSON lines via structlog, so Datadog can index the "
                             "account_id field; plain text logging was removed.")
    a.ask("changed", "What format do the service logs use now?", "logging_new")
    a.key(5, "rate_limit", "Added a rate limiter to the public API: 100 requests per minute per API key, "
                           "implemented with a Valkey token bucket in src/ledger/ratelimit.py.")
    a.ask("single", "How many calls per minute may one API key make?", "rate_limit")
    a.ask("single", "What store backs the throttling of the public API?", "rate_limit")
    a.key(5, "reviewer", "The user said Priya reviews every change to the money module and must be tagged on "
                         "pull requests touching src/ledger/money.py.")
    a.ask("multihop", "Who has to review the change that fixed the decimal separator bug?", "reviewer",
          "currency_fix")
    a.key(6, "deadlock", "Error: deadlock detected in transfer_funds() when two transfers lock the same pair of "
                         "accounts in opposite order.")
    a.key(6, "deadlock_fix", "Fixed the transfer deadlock by always locking accounts in ascending id order in "
                             "transfer_funds().")
    a.ask("single", "How was the concurrency problem in money transfers solved?", "deadlock_fix")
    a.ask("temporal", "When was the transfer deadlock first seen?", "deadlock")
    a.key(7, "python_old", "Decision: the project targets Python 3.11 only.")
    a.key(12, "python_new", "Decision changed: the project now requires Python 3.12 because of the new typing "
                            "syntax; 3.11 support was dropped from pyproject.toml.")
    a.ask("changed", "What is the minimum Python version now?", "python_new")
    a.key(7, "docs", "Completed a turn. The user asked: write the API reference for the transfers endpoint. "
                     "Tools used: write(docs/api/transfers.md).")
    a.ask("single", "Where is the documentation for the transfers endpoint?", "docs")
    a.key(8, "flaky", "Error: tests/test_reports.py::test_monthly_statement is flaky: it depends on the "
                      "machine's timezone and fails after 23:00 UTC.")
    a.key(10, "flaky_fix", "Fixed the flaky monthly statement test by freezing time with time-machine at "
                           "2026-03-15T12:00Z.")
    a.ask("multihop", "What tool was used to fix the test that failed late at night?", "flaky_fix", "flaky")
    a.key(8, "secret_store", "Decision: secrets come from environment variables loaded by pydantic-settings; "
                             "the user refuses to commit any .env file.")
    a.ask("single", "How does the service get its credentials?", "secret_store")
    a.key(9, "perf", "Measured the statement export: 4.2 s for 10,000 transactions, 80 % spent rendering PDF "
                     "with WeasyPrint.")
    a.ask("single", "What dominates the time of the statement export?", "perf")
    a.key(10, "pdf_change", "Decision changed: statements are now rendered as HTML emails instead of PDFs; "
                            "WeasyPrint was removed from the dependencies.")
    a.ask("changed", "In what format are monthly statements delivered now?", "pdf_change")
    a.key(11, "branch", "Preference: the user wants every change on a branch named feature/<ticket>, squashed "
                        "into main, never merge commits.")
    a.ask("single", "What branch naming rule does the user follow?", "branch")
    a.key(12, "webhook", "Edited src/ledger/webhooks.py: webhook deliveries are retried five times with "
                         "exponential backoff and signed with HMAC-SHA256.")
    a.ask("single", "How are outgoing webhook calls authenticated?", "webhook")
    a.key(13, "release", "Released ledger 1.4.0: tagged v1.4.0 and published the changelog with the "
                         "SQLite migration and the rate limiter.")
    a.ask("temporal", "When was version 1.4.0 released?", "release")
    a.ask("multihop", "Which release first shipped the API throttling?", "release", "rate_limit")
    return a


AGENT_ROUTINE = [
    "Ran pytest: {n} passed, 0 failed in {s} s.",
    "Edited src/ledger/{f}.py: renamed a local variable and fixed a typo in a docstring.",
    "Ran ruff check: no findings.",
    "Completed a turn. The user asked: explain what {f}.py does. Tools used: read(src/ledger/{f}.py).",
    "Edited tests/test_{f}.py: added a case for an empty input.",
    "Ran mypy: Success, no issues found in {n} source files.",
    "Completed a turn. The user asked: run the tests again. Tools used: bash(pytest -q).",
    "Edited src/ledger/{f}.py: moved a helper function closer to its caller.",
    "Read README.md and pyproject.toml to understand the project layout.",
    "Completed a turn. The user asked: show the git log of the last week. Tools used: bash(git log).",
    "Edited docs/changelog.md: added an entry for the {f} module.",
    "Ran the dev server: uvicorn started on port 8000 and answered the health check.",
    "Completed a turn. The user asked: summarise the open pull requests. Tools used: bash(gh pr list).",
    "Edited src/ledger/{f}.py: added type hints to two functions.",
    "Ran pytest -k {f}: {n} passed in {s} s.",
    "Completed a turn. The user asked: what changed in {f}.py yesterday? Tools used: bash(git diff).",
]
AGENT_FILES = ["accounts", "api", "reports", "transfers", "users", "audit", "config", "cli"]


def _render(script: _Script, rng: random.Random, filler: list[str]) -> tuple[list[Event], dict[str, str]]:
    events: list[Event] = []
    ids: dict[str, str] = {}
    for session in range(script.sessions):
        day = script.start + session * script.step
        keys = script.keys.get(session, [])
        slots = sorted(rng.sample(range(script.turns_per_session), len(keys)))
        lines: list[tuple[str | None, str]] = []
        for turn in range(script.turns_per_session):
            if turn in slots:
                lines.append(keys[slots.index(turn)])
            else:
                a, b = rng.sample(["Maya", "Theo"], 2)
                lines.append((None, rng.choice(filler).format(a=a, b=b, f=rng.choice(AGENT_FILES),
                                                              n=rng.randint(40, 400), s=rng.randint(2, 60))))
        for turn, (key, text) in enumerate(lines):
            event = Event(f"{script.memory}-{session:02d}-{turn:02d}", script.memory,
                          (day + timedelta(minutes=3 * turn)).isoformat(), text)
            events.append(event)
            if key:
                ids[key] = event.id
    return events, ids


def build(seed: int = 7) -> tuple[list[Event], list[Question]]:
    rng = random.Random(seed)
    events: list[Event] = []
    questions: list[Question] = []
    for script, filler in ((_chat(), CHAT_SMALL_TALK), (_agent(), AGENT_ROUTINE)):
        rendered, ids = _render(script, rng, filler)
        events += rendered
        for i, (kind, text, keys) in enumerate(script.questions):
            questions.append(Question(f"{script.memory}-q{i:02d}", script.memory, kind, text,
                                      tuple(ids[k] for k in keys)))
    return events, questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", action="store_true")
    args = parser.parse_args()
    events, questions = build()
    if args.stats:
        kinds: dict[str, int] = {}
        for q in questions:
            kinds[q.kind] = kinds.get(q.kind, 0) + 1
        print(f"{len(events)} events, {len(questions)} questions: {kinds}")
    else:
        print(json.dumps({"events": [asdict(e) for e in events], "questions": [asdict(q) for q in questions]},
                         indent=1))


if __name__ == "__main__":
    main()
