"""Forget, correct and erase (openspec/changes/forget-and-scoped-mcp): what a user removes or
corrects is gone from recall at once, through the CLI as through the library; an erase leaves
nothing of the group in FalkorDB, Valkey, the spool or the local B2 bucket, and another group as it was.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid

import pytest
import redis
import zstandard

from conftest import Memory, wait_for_no_worker

EDIT = "Alice edited src/retry.py to retry FalkorDB writes with exponential backoff."
DECISION = "Bob decided the team uses pytest for the OpenCode repo."


def facts(memory: Memory, question: str, *options: str) -> list[dict]:
    answer = json.loads(memory.ok("query", question, "--scope", "facts", "--limit", "10", "--json", *options))
    return answer["results"]


def episode_uuids(memory: Memory) -> list[str]:
    return [e["uuid"] for e in json.loads(memory.ok("episodes", "--json"))]


def test_forget_a_fact_removes_it_from_a_cached_recall_at_once(memory, valkey):
    memory.store(EDIT)
    [fact, *_] = facts(memory, "who edited retry.py")  # the answer is cached now
    assert "retry" in fact["text"].lower()

    out = memory.ok("forget", "--fact", fact["uuid"])
    # risk of attack round three: the stale answer kept the forgotten text in Valkey until its TTL
    assert valkey.keys(f"memory:{{{memory.group}}}:answer:*") == []

    assert out.startswith(f"forgot fact {fact['uuid']}  {fact['text']} (valid ")
    assert fact["uuid"] not in [f["uuid"] for f in facts(memory, "who edited retry.py")]
    assert fact["uuid"] not in [f["uuid"] for f in facts(memory, "who edited retry.py", "--history")]
    assert memory.episode_count() == 1  # the event itself stays
    assert memory.entities()  # and so do the entities it names


def test_correct_a_fact_invalidates_the_old_one_and_recalls_the_new_one(memory):
    memory.store(EDIT)
    [old, *_] = facts(memory, "who edited retry.py")

    out = memory.ok("correct", "--fact", old["uuid"], "Alice edited src/retry.py to retry Valkey writes.")

    invalidated, new = out.splitlines()
    assert invalidated.startswith(f"invalidated {old['uuid']}  {old['text']} (valid ")
    assert not invalidated.endswith("→ present)")
    new_uuid = new.split()[2]
    assert re.fullmatch(rf"new fact    {new_uuid}  Alice edited src/retry\.py to retry Valkey writes\. "
                        r"\(valid \S+ → present\)", new), new
    current = facts(memory, "who edited retry.py")
    assert new_uuid in [f["uuid"] for f in current] and old["uuid"] not in [f["uuid"] for f in current]
    history = {f["uuid"]: f for f in facts(memory, "who edited retry.py", "--history")}
    assert history[old["uuid"]]["invalid_at"] is not None and history[new_uuid]["invalid_at"] is None
    episode = json.loads(memory.ok("episode", episode_uuids(memory)[0], "--json"))
    assert {old["uuid"], new_uuid} <= {f["uuid"] for f in episode["facts"]}  # the new one keeps its source


def test_a_corrected_fact_cannot_be_corrected_again_and_the_text_is_redacted(memory):
    memory.store(EDIT)
    [old, *_] = facts(memory, "who edited retry.py")
    secret = "sk-proj-" + "A1b2C3d4" * 6

    out = memory.ok("correct", "--fact", old["uuid"], f"Alice rotated the OpenAI key {secret}.")
    again = memory.run("correct", "--fact", old["uuid"], "something else")

    assert secret not in out and "[REDACTED:" in out
    assert again.code == 2
    assert re.fullmatch(rf"memory-manager: error: fact {old['uuid']} is no longer current \(ended \S+\); "
                        "correct the fact that replaced it", again.error_lines[0])


def test_episodes_lists_the_newest_first_with_limit_and_since(memory):
    memory.ok("store", "--wait", "--at", "2020-01-01T00:00:00Z", EDIT)
    later = memory.store(DECISION)

    listed = json.loads(memory.ok("episodes", "--json"))
    newest = json.loads(memory.ok("episodes", "--limit", "1", "--json"))
    since = json.loads(memory.ok("episodes", "--since", "2020-01-01T00:00:01Z", "--json"))
    text = memory.ok("episodes")

    assert [e["content"] for e in listed] == [DECISION, EDIT]
    assert [e["name"] for e in newest] == [later] == [e["name"] for e in since]
    assert text.splitlines()[0] == f"{listed[0]['uuid']}  {listed[0]['reference_time']}  {DECISION}"


def test_episode_shows_its_event_time_metadata_and_the_facts_it_produced(memory):
    memory.store(EDIT, {"event": "file.edited", "file": "src/retry.py"})
    [fact, *_] = facts(memory, "who edited retry.py")
    [uuid_] = episode_uuids(memory)

    shown = json.loads(memory.ok("episode", uuid_, "--json"))
    text = memory.ok("episode", uuid_)

    assert (shown["uuid"], shown["content"], shown["metadata"]) == (
        uuid_, EDIT, {"event": "file.edited", "file": "src/retry.py"})
    assert fact["uuid"] in [f["uuid"] for f in shown["facts"]]
    assert {e["name"] for e in shown["entities"]} >= {"Alice"}
    assert text.startswith(f"episode {uuid_} ({shown['name']})\nhappened {shown['reference_time']}, ingested ")
    assert f"\n\n{EDIT}\n\nfacts:\n" in text and f"{fact['uuid']}  {fact['text']} (valid " in text


def test_forget_an_episode_by_uuid_removes_it_from_recall_and_the_listing(memory):
    memory.store(EDIT)
    memory.store(DECISION)
    assert "retry" in memory.ok("query", "who edited retry.py", "--scope", "episodes")  # now cached
    forgotten = next(e for e in json.loads(memory.ok("episodes", "--json")) if e["content"] == EDIT)

    out = memory.ok("forget", "--episode", forgotten["uuid"])

    assert out == f"forgot episode {forgotten['uuid']}\n"
    assert [e["content"] for e in json.loads(memory.ok("episodes", "--json"))] == [DECISION]
    assert EDIT not in memory.ok("query", "who edited retry.py", "--scope", "episodes")


@pytest.mark.parametrize(("args", "message"), [
    (["forget"], "forget: one of the arguments --episode --fact is required"),
    (["forget", "--fact", "not-a-uuid"], "a fact is named by its uuid (as query --json shows it), got 'not-a-uuid'"),
    (["forget", "--fact", "00000000-0000-4000-8000-000000000000"], "no fact 00000000-0000-4000-8000-000000000000 "
     "in group {group}"),
    (["forget", "--episode", "x"], "an episode is named like episode_20261124T101500123456Z or by its uuid, got 'x'"),
    (["episode", "00000000-0000-4000-8000-000000000000"], "no episode 00000000-0000-4000-8000-000000000000 in "
     "group {group} (a queued one is not in the graph yet)"),
    (["correct", "--fact", "00000000-0000-4000-8000-000000000000", " "], "the corrected fact is empty"),
    (["episodes", "--limit", "0"], "last_n must be an integer from 1 to 100, got 0"),
    (["episodes", "--since", "yesterday"], "since must be an ISO 8601 time"),
    (["erase", "--yes"], "erase: name the group to erase with --group G (it is not taken from MEMORY_GROUP_ID)"),
    (["erase", "--group", "{group}"], "erase: this deletes every memory of group '{group}' (graph, queue, cache, "
     "spool) for good; pass --yes to confirm"),
], ids=["forget-nothing", "fact-not-a-uuid", "no-such-fact", "episode-not-a-name", "no-such-episode",
        "empty-correction", "limit-0", "since-not-a-time", "erase-without-group", "erase-without-yes"])
def test_bad_forget_correct_and_erase_input_is_one_line_and_exit_2(memory, args, message):
    memory.store(EDIT)
    before = memory.graph_counts()

    result = memory.run(*[a.format(group=memory.group) for a in args])

    assert result.code == 2, result.stderr
    assert len(result.error_lines) == 1
    assert message.format(group=memory.group) in result.error_lines[0], result.error_lines[0]
    assert memory.graph_counts() == before


def test_a_corrected_fact_too_long_on_stdin_names_the_fact_limit_not_the_episode_one(memory):
    """Attack round three, item 12: `correct` blamed MEMORY_MAX_EPISODE_CHARS for its own 8,000 cap."""
    result = memory.run("correct", "--fact", "00000000-0000-4000-8000-000000000000", "-", stdin="x" * 40_000)

    assert (result.code, result.error_lines) == (2, [
        "memory-manager: error: the corrected fact on stdin is over 32000 bytes; a fact may hold 8000 characters"])


def test_the_library_forgets_and_corrects_in_process(memory, monkeypatch):
    memory.store(EDIT)
    for name, value in memory.env.items():
        monkeypatch.setenv(name, value)
    import memory_manager as mm

    async def run() -> tuple[list, dict, dict, list]:
        try:
            [episode] = await mm.get_episodes(5)
            shown = await mm.get_episode(episode["uuid"])
            fact = shown["facts"][0]["uuid"]
            changed = await mm.correct_fact(fact, "Alice edited src/retry.py to retry Valkey writes.")
            await mm.forget_fact(changed["fact"]["uuid"])
            recalled = await mm.recall("who edited retry.py", 10, scope="facts")
            return [episode], shown, changed, recalled
        finally:
            await mm.close()
            mm._use_settings(None)

    [episode], shown, changed, recalled = asyncio.run(run())

    assert shown["content"] == EDIT and episode["uuid"] == shown["uuid"]
    assert changed["invalidated"]["invalid_at"] and changed["fact"]["fact"].endswith("Valkey writes.")
    assert changed["fact"]["uuid"] not in [r.uuid for r in recalled]
    assert changed["invalidated"]["uuid"] not in [r.uuid for r in recalled]


# --- erase ---------------------------------------------------------------------------------------

def b2_bucket(stack):
    from b2sdk.v2 import B2Api, InMemoryAccountInfo

    env = stack.b2_env()
    api = B2Api(InMemoryAccountInfo())
    api.authorize_account(env["B2_REALM"], env["B2_KEY_ID"], env["B2_APP_KEY"])
    return api.get_bucket_by_name(env["B2_BUCKET"])


def stored_exports(stack, prefix: str) -> dict[tuple[str, str], bytes]:
    """Every version of every file under the prefix, decompressed: (name, version id) -> text."""
    bucket, found = b2_bucket(stack), {}
    for version, _ in bucket.ls(folder_to_list=prefix, latest_only=False, recursive=True):
        if version.action != "upload":
            continue
        data = io.BytesIO()
        bucket.download_file_by_id(version.id_).save(data)
        found[(version.file_name, version.id_)] = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data.getvalue())).read()
    return found


def everything_of(memory: Memory, group: str, prefix: str) -> dict[str, list]:
    """Where the group's name still appears: FalkorDB graphs, Valkey keys (and memory:groups),
    spool files, and B2 files under the prefix."""
    falkordb = redis.Redis(port=memory.stack.ports["falkordb"], decode_responses=True)
    valkey = redis.Redis(port=memory.stack.ports["valkey"], decode_responses=True)
    try:
        graphs = [g for g in falkordb.execute_command("GRAPH.LIST") if group in g]
        keys = [k for k in valkey.scan_iter(count=1000) if group in k]
        keys += ["memory:groups"] if valkey.sismember("memory:groups", group) else []
    finally:
        falkordb.close()
        valkey.close()
    spooled = [p.name for p in memory.spool_dir.iterdir() if p.is_file() and group.encode() in p.read_bytes()]
    backups = [name for (name, _), text in stored_exports(memory.stack, prefix).items() if group.encode() in text]
    return {"graphs": graphs, "keys": keys, "spool": spooled, "backups": backups}


def test_erase_leaves_nothing_of_the_group_anywhere_and_another_group_untouched(memory, standin, dead_port):
    prefix = f"erase-{uuid.uuid4().hex[:8]}"
    erased = memory.with_env(B2_PREFIX=prefix)
    kept = Memory(memory.stack, f"k_{uuid.uuid4().hex[:12]}", memory.spool_dir).with_env(B2_PREFIX=prefix)
    erased.store(EDIT)
    kept.store(DECISION)
    erased.ok("query", "who edited retry.py")  # a cached answer
    erased.ok("export")
    erased.ok("export")  # two exports; both hold the group
    wait_for_no_worker(memory.stack)
    standin.faults(fault="malformed", fault_count=-1)
    dead = erased.with_env(MEMORY_MAX_ATTEMPTS="1").run("store", "--wait", "--timeout", "120", "A dead letter.")
    standin.reset()
    assert dead.code == 1, dead.stderr
    wait_for_no_worker(memory.stack)
    idle = erased.with_env(MEMORY_AUTO_DRAIN="0")
    idle.ok("store", "Queued and never ingested.")
    idle.with_env(VALKEY_PORT=str(dead_port)).ok("store", "Spooled while Valkey was away.")
    kept_before = (kept.graph_counts(), kept.ok("query", "which test framework"))
    before = everything_of(memory, memory.group, prefix)
    assert before["graphs"] and before["keys"] and before["spool"] and len(before["backups"]) == 2, before
    assert erased.queue()["queued"] == 1 and erased.queue()["dead_letters"] == 1

    report = erased.run("erase", "--group", memory.group, "--yes", "--backups", "--json")

    assert report.code == 0, report.stderr
    shown = json.loads(report.stdout)
    assert (shown["queued"], shown["spooled"], len(shown["backups_rewritten"])) == (2, 1, 2)
    assert shown["nodes"] > 0 and shown["backups_holding"] == []
    assert shown["unreachable"] == ["the spools of other hosts (run erase there too, or empty their "
                                    "MEMORY_SPOOL_DIR)", "files written by export --output (not tracked)"]
    assert everything_of(memory, memory.group, prefix) == {"graphs": [], "keys": [], "spool": [], "backups": []}
    assert (kept.graph_counts(), kept.ok("query", "which test framework")) == kept_before
    exports = stored_exports(memory.stack, prefix)
    assert len(exports) == 2 and all(kept.group.encode() in text for text in exports.values())
    bucket = memory.stack.b2_env()["B2_BUCKET"]
    for name, _ in exports:  # each rewritten export is a valid document that restore accepts
        plan = kept.ok("restore", f"b2://{bucket}/{name}", "--dry-run", "--replace")
        assert f"\ngroup {kept.group}: " in plan and f"group {memory.group}:" not in plan
    assert erased.ok("episodes", "--json") == "[]\n"
    kept.forget_queue()


def test_erase_without_backups_reports_the_exports_that_still_hold_the_group(memory):
    prefix = f"erase-{uuid.uuid4().hex[:8]}"
    erased = memory.with_env(B2_PREFIX=prefix)
    erased.store(EDIT)
    [location] = re.findall(r"b2://\S+\.json\.zst", erased.ok("export"))

    out = erased.ok("erase", "--group", memory.group, "--yes")

    lines = out.splitlines()
    assert re.fullmatch(rf"erased group {memory.group}: \d+ nodes, \d+ edges, 0 queued or dead-lettered "
                        r"episode\(s\), \d+ Valkey key\(s\), 0 spooled line\(s\)", lines[0]), lines[0]
    assert re.fullmatch(rf"still holds it: {re.escape(location)} \(version \S+\) \(erase --backups rewrites it\)",
                        lines[1]), lines[1]
    assert lines[2:] == ["not reachable from here: the spools of other hosts (run erase there too, or empty "
                         "their MEMORY_SPOOL_DIR)", "not reachable from here: files written by export --output "
                         "(not tracked)"]
    assert memory.graph_counts() == (0, 0)
    assert any(memory.group.encode() in text for text in stored_exports(memory.stack, prefix).values())
    again = erased.run("erase", "--group", memory.group, "--yes", "--backups")
    assert again.code == 0, again.stderr
    assert "rewrote b2://" in again.stdout
    assert not any(memory.group.encode() in text for text in stored_exports(memory.stack, prefix).values())


@pytest.mark.parametrize("service", ["falkordb", "valkey"])
def test_erase_with_a_service_down_is_exit_1_naming_it_and_removes_nothing(memory, dead_port, service):
    memory.store(EDIT)
    answer = memory.ok("query", "who edited retry.py")
    before = memory.graph_counts()
    down = memory.with_env(**{f"{service.upper()}_PORT": str(dead_port)})

    result = down.run("erase", "--group", memory.group, "--yes")

    assert result.code == 1
    assert len(result.error_lines) == 1 and result.error_lines[0].startswith(
        f"memory-manager: error: {service} at 127.0.0.1:{dead_port}: "), result.stderr
    assert memory.graph_counts() == before and memory.ok("query", "who edited retry.py") == answer


def test_erase_removes_only_the_drainer_log_lines_of_that_group(memory):
    """Attack round three, item 9: `erase --group proj` removed proj2's lines; `--group e` emptied the log."""
    log = memory.spool_dir / "drainer.log"
    other = f"{memory.group}2"
    lines = [f"memory-manager: stored episode_1 (job 1) in group {memory.group}\n",
             f"memory-manager: error: w1 lost its lease on group '{memory.group}'; abandoning the episode in flight\n",
             f"memory-manager: stored episode_2 (job 2) in group {other}\n",
             "memory-manager: drain w1 started: concurrency 4, max attempts 5, redaction on\n"]
    log.write_text("".join(lines))
    log.chmod(0o600)

    memory.ok("erase", "--group", memory.group, "--yes")

    assert log.read_text() == "".join(lines[2:])
