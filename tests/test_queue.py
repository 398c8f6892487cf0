"""Requirement: Durable write queue (spec: memory-manager / Durable write queue).

`store` queues; a worker (or the drainer `store` starts) ingests. Every scenario runs the real CLI
against the session's FalkorDB, Valkey (AOF on) and the OpenAI stand-in with its latency and faults.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import pytest
import redis

from conftest import MODULE, stop, wait_for_no_worker

EDIT = "Edited src/server/routes.py to add retry logic around FalkorDB connections in connect_graph()."
QUEUED = re.compile(r"queued (episode_\d{8}T\d{12}Z) ([0-9a-f]{32})\n")


def queued_name(output: str) -> str:
    match = QUEUED.fullmatch(output)
    assert match, output
    return match.group(1)


def no_drain(memory):
    """Stores that only queue: no drainer is started, so the test decides when a worker runs."""
    wait_for_no_worker(memory.stack)
    return memory.with_env(MEMORY_AUTO_DRAIN="off")


def pending_consumers(valkey, group: str) -> list[str]:
    """The workers (host:pid:tag) holding an unacknowledged entry of the group's stream."""
    try:
        pending = valkey.xpending(f"memory:{{{group}}}:episodes", "ingest")
    except redis.ResponseError:  # no consumer group yet: no worker has looked at the stream
        return []
    return [consumer["name"] for consumer in pending["consumers"]]


def name_time(name: str) -> datetime:
    return datetime.strptime(name.removeprefix("episode_"), "%Y%m%dT%H%M%S%fZ")


def test_store_queues_and_prints_the_episode_and_job_before_anything_is_ingested(memory):
    queued_only = no_drain(memory)

    result = queued_only.run("store", EDIT)

    assert result.code == 0, result.stderr
    assert QUEUED.fullmatch(result.stdout)
    assert result.stderr == ""
    assert queued_only.queue()["queued"] == 1
    assert memory.episode_count() == 0


def test_a_worker_ingests_what_was_queued_and_the_entities_come_back(memory):
    queued_only = no_drain(memory)
    name = queued_name(queued_only.ok("store", EDIT))

    worker = memory.worker()
    try:
        memory.wait_until_ingested(1)
    finally:
        assert stop(worker) == 0

    assert [e["name"] for e in memory.episodes()] == [name]
    assert memory.entities() == [
        {"name": "connect_graph", "type": "CodeSymbol"},
        {"name": "FalkorDB", "type": "Technology"},
        {"name": "src/server/routes.py", "type": "File"},
    ]


def test_store_wait_returns_once_the_episode_is_in_the_graph(memory):
    out = memory.ok("store", "--wait", EDIT, '{"event": "file.edited"}')

    state, name, job = out.split()
    assert state == "stored"
    [episode] = memory.episodes()
    assert (episode["name"], episode["job_id"]) == (name, job)
    assert json.loads(episode["metadata"]) == {"event": "file.edited"}


def test_the_reference_time_is_the_time_of_the_event_not_of_its_ingestion(memory):
    queued_only = no_drain(memory)
    names = [queued_name(queued_only.ok("store", f"Step {i}: Alice edited src/step_{i}.py."))
             for i in range(3)]
    time.sleep(2)  # the worker starts well after the events happened

    worker = memory.worker()
    try:
        memory.wait_until_ingested(3)
    finally:
        stop(worker)

    episodes = memory.episodes()
    assert [e["name"] for e in episodes] == names  # ingested in queue order
    for episode in episodes:
        valid_at = datetime.fromisoformat(episode["valid_at"]).replace(tzinfo=None)
        created_at = datetime.fromisoformat(episode["created_at"]).replace(tzinfo=None)
        assert valid_at == name_time(episode["name"])
        assert (created_at - valid_at).total_seconds() > 1.5


def drain_all(memory, episodes: int) -> None:
    worker = memory.worker("drain")
    try:
        memory.wait_until_ingested(episodes)
    finally:
        stop(worker)


def test_a_backlog_is_ingested_in_one_pass_yet_each_event_keeps_its_episode_time_and_facts(memory, standin):
    queued_only = no_drain(memory)
    names = [queued_name(queued_only.ok("store", f"Step {i}: Alice edited src/step_{i}.py."))
             for i in range(4)]

    drain_all(memory, 4)

    stats = standin.stats()  # one extraction of each kind for the four, one embeddings request for their texts
    assert (stats["responses:ExtractedEntities"], stats["responses:ExtractedEdges"]) == (1, 1), stats
    # each later event's fact asked about the earlier events' (same person, same relation), all in one
    # request; the graph held nothing to ask about before the pass
    assert (stats.get("responses:EdgeDuplicateBatch"), stats.get("responses:EdgeDuplicate")) == (1, None), stats
    # three LLM requests and two embeddings requests for the four (entity names with the events' own
    # texts, then the facts)
    assert (stats["responses"], stats["embeddings"]) == (3, 2), stats
    episodes = memory.episodes()
    assert [e["name"] for e in episodes] == names
    assert len({e["job_id"] for e in episodes}) == 4
    for i, episode in enumerate(episodes):
        assert episode["content"] == f"Step {i}: Alice edited src/step_{i}.py."
        assert datetime.fromisoformat(episode["valid_at"]).replace(tzinfo=None) == name_time(episode["name"])
        assert memory.cypher(f"MATCH (e:Episodic)-[:MENTIONS]->(:Entity {{name: 'src/step_{i}.py'}}) "
                             "RETURN e.name") == [[episode["name"]]]
        [[facts_episodes, valid_at]] = memory.cypher(
            f"MATCH (e:Episodic {{name: '{episode['name']}'}}), ()-[r:RELATES_TO]->() "
            f"WHERE r.fact CONTAINS 'src/step_{i}.py' RETURN collect(r.episodes = [e.uuid]), min(r.valid_at)")
        assert all(facts_episodes) and facts_episodes, facts_episodes
        assert valid_at.startswith(episode["valid_at"][:19])
    recalled = memory.ok("query", "--scope", "episodes", "--limit", "4", "Alice edited")
    assert all(f"Step {i}: Alice edited src/step_{i}.py." in recalled for i in range(4)), recalled
    names_found = [e["name"] for e in memory.entities()]
    assert sorted(names_found) == sorted(set(names_found))  # Alice and the like once, not once per event


def test_a_later_event_of_a_pass_supersedes_an_earlier_events_fact_as_when_ingested_one_at_a_time(
        memory, standin):
    queued_only = no_drain(memory)
    old = "The Ledger service uses PostgreSQL for accounts."
    queued_only.ok("store", "--at", "2026-03-01T09:00:00Z", old)
    new = "The team switched the Ledger service from PostgreSQL to SQLite."
    queued_only.ok("store", "--at", "2026-03-09T09:00:00Z", new)

    drain_all(memory, 2)

    assert standin.stats()["responses:ExtractedEntities"] == 1
    current = memory.ok("query", "--scope", "facts", "Ledger PostgreSQL accounts")
    history = memory.ok("query", "--scope", "facts", "--history", "Ledger PostgreSQL accounts")
    assert old not in current and "switched the Ledger service from PostgreSQL" in current
    assert f"- {old} (valid 2026-03-01T09:00:00+00:00 → 2026-03-09T09:00:00+00:00)" in history.splitlines()


def test_with_coalescing_off_every_event_is_a_pass_of_its_own(memory, standin):
    queued_only = no_drain(memory)
    for i in range(3):
        queued_only.ok("store", f"Step {i}: Alice edited src/step_{i}.py.")

    drain_all(memory.with_env(MEMORY_COALESCE_EVENTS="1"), 3)

    stats = standin.stats()
    assert stats["responses:ExtractedEntities"] == 3
    assert stats["embeddings"] == 6  # each event's own text rides with its entities' names; then its facts


def test_one_event_the_model_cannot_handle_is_dead_lettered_alone_and_the_rest_of_its_pass_is_stored_in_order(
        memory, standin, valkey):
    queued_only = no_drain(memory)
    texts = ["Step 0: Alice edited src/step_0.py.", "Step 1: Alice broke src/poison_7f3a.py.",
             "Step 2: Alice edited src/step_2.py."]
    names = [queued_name(queued_only.ok("store", text)) for text in texts]
    standin.faults(fault="malformed", fault_count=-1, fault_match="poison_7f3a")

    drain_all(memory.with_env(MEMORY_MAX_ATTEMPTS="2"), 2)

    assert [e["name"] for e in memory.episodes()] == [names[0], names[2]]
    row = memory.queue()
    assert (row["queued"], row["dead_letters"]) == (0, 1)
    [(_, dead)] = valkey.xrange(f"memory:{{{memory.group}}}:dead")
    assert (dead["name"], dead["attempts"]) == (names[1], "2")


def test_store_wait_times_out_with_one_line_and_the_episode_stays_queued(memory):
    queued_only = no_drain(memory)

    result = queued_only.run("store", "--wait", "--timeout", "1", EDIT)

    assert result.code == 1
    [line] = result.error_lines
    assert re.fullmatch(r"memory-manager: error: episode_\d+T\d+Z \([0-9a-f]{32}\) not ingested within 1 s; "
                        r"it stays queued \(see `memory-manager queue`\)", line)
    assert queued_only.queue()["queued"] == 1


def test_library_store_episode_waits_by_default_and_not_with_wait_false(memory, monkeypatch):
    import memory_manager

    for key, value in memory.env.items():
        monkeypatch.setenv(key, value)

    async def both() -> tuple[str, int, str, int]:
        waited = await memory_manager.store_episode("We chose FalkorDB over Neo4j for the graph database.")
        after_wait = memory.episode_count()
        queued = await memory_manager.store_episode("Alice prefers pytest for the OpenCode repo.", wait=False)
        right_after = memory.episode_count()
        await memory_manager.close()
        return waited, after_wait, queued, right_after

    waited, after_wait, queued, right_after = asyncio.run(both())

    assert (after_wait, right_after) == (1, 1)
    memory.wait_until_ingested(2)
    assert [e["name"] for e in memory.episodes()] == [waited, queued]


@pytest.mark.parametrize("metadata", ["undefined", "null", ""], ids=["undefined", "null", "empty"])
def test_metadata_that_means_none_is_no_metadata_and_no_warning(memory, metadata):
    result = memory.run("store", "--wait", "Completed: lint", metadata)

    assert result.code == 0, result.stderr
    assert result.stderr == ""
    [episode] = memory.episodes()
    assert (episode["metadata"], episode["metadata_raw"]) == (None, None)


@pytest.mark.parametrize(("metadata", "warning"), [
    ("[1, 2]", "metadata is a JSON list, not an object; stored as raw text beside the episode"),
    ('"text"', "metadata is a JSON str, not an object; stored as raw text beside the episode"),
    ("{not json", "metadata is not valid JSON; stored as raw text beside the episode"),
], ids=["list", "string", "invalid-json"])
def test_metadata_that_is_not_an_object_never_costs_the_memory(memory, metadata, warning):
    result = memory.run("store", "--wait", "Completed: lint for the OpenCode repo", metadata)

    assert result.code == 0
    assert result.error_lines == [f"memory-manager: warning: {warning}"]
    [episode] = memory.episodes()
    assert (episode["metadata"], episode["metadata_raw"]) == (None, metadata)


@pytest.mark.parametrize(("args", "message"), [
    (["store", ""], "content must be non-empty text"),
    (["store", "   \n\t"], "content must be non-empty text"),
    (["store"], "store: the following arguments are required: content"),
    (["store", "--timeout", "0", EDIT], "store: argument --timeout: must be seconds from 0 to 86400, got '0'"),
], ids=["empty", "blank", "missing", "bad-timeout"])
def test_bad_store_input_exits_2_and_queues_nothing(memory, args, message):
    result = memory.run(*args)

    assert (result.code, result.stdout) == (2, "")
    assert result.error_lines == [f"memory-manager: error: {message}"]
    assert memory.queue()["queued"] == 0


def test_store_jsonl_queues_each_event_as_its_line_arrives_and_refuses_a_bad_line_alone(memory):
    queued_only = no_drain(memory)
    store = subprocess.Popen([sys.executable, str(MODULE), "store", "--jsonl", "-"], env=queued_only.env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert store.stdin and store.stdout
    store.stdin.write(json.dumps({"content": EDIT, "metadata": {"event": "file.edited"}}) + "\n")
    store.stdin.flush()

    first = store.stdout.readline()  # while its input is still open: the plugin's process between events

    assert QUEUED.fullmatch(first), first
    later = [json.dumps({"content": "Bob fixed the login bug.", "at": "2026-03-02T09:00:00Z"}), "not json", "",
             json.dumps({"content": ""}), json.dumps({"content": "Carol chose Valkey.", "at": "yesterday"})]
    out, err = store.communicate("\n".join(later) + "\n", timeout=60)
    assert store.returncode == 2
    assert [QUEUED.fullmatch(line + "\n") is not None for line in out.splitlines()] == [True]
    assert err.splitlines() == [
        "memory-manager: error: line 3: not a JSON object (Expecting value: line 1 column 1 (char 0))",
        "memory-manager: error: line 5: content must be non-empty text",
        "memory-manager: error: line 6: at must be an ISO 8601 time such as 2026-11-24T10:15:00Z, got 'yesterday'"]
    assert queued_only.queue()["queued"] == 2


def test_store_jsonl_takes_its_events_from_stdin_alone(memory):
    result = memory.run("store", "--jsonl", EDIT)

    assert (result.code, result.stdout) == (2, "")
    assert result.error_lines == ["memory-manager: error: store --jsonl reads events from stdin: give - and "
                                  "nothing else (each line has its own content, metadata and at)"]
    assert memory.queue()["queued"] == 0


def test_content_over_the_size_limit_is_refused_and_nothing_is_queued(memory):
    result = memory.with_env(MEMORY_MAX_EPISODE_CHARS="20").run("store", "x" * 21)

    assert result.code == 2
    assert result.error_lines == [
        "memory-manager: error: content is 21 characters; MEMORY_MAX_EPISODE_CHARS allows 20"]
    assert memory.queue()["queued"] == 0


def test_stdin_beyond_the_size_limit_is_refused_at_the_limit_not_after_reading_it_all(memory):
    result = memory.with_env(MEMORY_MAX_EPISODE_CHARS="1000").run("store", "-", stdin="x" * 5_000_000)

    assert (result.code, result.error_lines) == (2, [
        "memory-manager: error: the event on stdin is over 4000 bytes; MEMORY_MAX_EPISODE_CHARS allows 1000 "
        "characters"])
    assert memory.queue()["queued"] == 0


def test_with_valkey_down_store_spools_and_the_next_store_queues_both_in_order(memory, dead_port):
    first = memory.with_env(VALKEY_PORT=str(dead_port)).run("store", "Alice prefers pytest for the OpenCode repo.")

    assert first.code == 0
    assert re.fullmatch(r"spooled episode_\d+T\d+Z [0-9a-f]{32}\n", first.stdout)
    assert first.error_lines == [
        f"memory-manager: warning: valkey at 127.0.0.1:{dead_port}: Error 111 connecting to 127.0.0.1:{dead_port}. "
        f"Connect call failed ('127.0.0.1', {dead_port}).; episode spooled to {memory.spool_dir}/spool.jsonl, "
        "queued when Valkey is back"]
    assert os.stat(memory.spool_dir / "spool.jsonl").st_mode & 0o777 == 0o600

    second = memory.run("store", "--wait", "Bob prefers Bun for the OpenCode scripts.")

    assert second.code == 0, second.stderr
    assert second.error_lines == ["memory-manager: warning: moved 1 spooled episode(s) into the queue"]
    memory.wait_until_ingested(2)
    assert [e["name"] for e in memory.episodes()] == [first.stdout.split()[1], second.stdout.split()[1]]
    assert (memory.spool_dir / "spool.jsonl").read_text() == ""


def test_a_worker_moves_the_spool_into_the_queue_too(memory, dead_port):
    memory.with_env(VALKEY_PORT=str(dead_port)).ok("store", "Alice prefers pytest for the OpenCode repo.")
    wait_for_no_worker(memory.stack)

    worker = memory.worker()
    try:
        memory.wait_until_ingested(1)
    finally:
        stop(worker)


def test_when_neither_valkey_nor_the_spool_can_take_it_store_exits_1_with_one_line(memory, dead_port, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")

    result = memory.with_env(VALKEY_PORT=str(dead_port), MEMORY_SPOOL_DIR=str(not_a_dir)).run("store", EDIT)

    assert (result.code, result.stdout) == (1, "")
    assert result.error_lines == [
        f"memory-manager: warning: spool {not_a_dir}/spool.jsonl cannot be read (Not a directory)",
        f"memory-manager: error: valkey at 127.0.0.1:{dead_port}: Error 111 connecting to 127.0.0.1:{dead_port}. "
        f"Connect call failed ('127.0.0.1', {dead_port}).; and the spool {not_a_dir} cannot be written "
        "(File exists): episode not stored"]


def test_store_jsonl_reports_each_event_neither_valkey_nor_the_spool_took_and_goes_on_reading(
        memory, dead_port, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    lines = "".join(json.dumps({"content": text}) + "\n" for text in (EDIT, "Bob fixed the login bug."))

    result = memory.with_env(VALKEY_PORT=str(dead_port), MEMORY_SPOOL_DIR=str(not_a_dir)).run(
        "store", "--jsonl", "-", stdin=lines)

    assert (result.code, result.stdout) == (1, "")
    failed = [line for line in result.error_lines if ": error: " in line]
    assert [line.split(": valkey at ")[0] for line in failed] == ["memory-manager: error: line 1",
                                                                  "memory-manager: error: line 2"]
    assert all(line.endswith("episode not stored") for line in failed), failed


def test_a_spool_write_cut_short_by_a_full_disk_exits_1_and_leaves_no_torn_line(memory, dead_port):
    import resource

    down = memory.with_env(VALKEY_PORT=str(dead_port))
    assert down.run("store", EDIT).code == 0
    spool = memory.spool_dir / "spool.jsonl"
    kept = spool.read_bytes()

    def small_disk() -> None:  # what a full disk does to a write: only part of it lands
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(kept) + 40, len(kept) + 40))

    done = subprocess.run([sys.executable, str(MODULE), "store", EDIT], env=down.env, capture_output=True,
                          text=True, timeout=60, preexec_fn=small_disk)

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.count("\n") == 1
    assert "cannot be written (No space left on device): episode not stored" in done.stderr
    assert spool.read_bytes() == kept
    assert down.run("store", EDIT).code == 0
    assert [json.loads(line)["content"] for line in spool.read_text().splitlines()] == [EDIT, EDIT]


def test_a_spool_directory_others_can_write_to_is_refused_and_the_event_not_spooled_there(memory, dead_port):
    """Attack round three, item 5: a shared spool directory let another user read spooled episodes."""
    memory.spool_dir.chmod(0o777)

    result = memory.with_env(VALKEY_PORT=str(dead_port)).run("store", EDIT)

    assert (result.code, result.stdout) == (1, "")
    assert result.error_lines[-1].endswith(f"; and the spool {memory.spool_dir} cannot be written (writable by "
                                           "group or others: mode 0777, expected 0700): episode not stored")
    assert not (memory.spool_dir / "spool.jsonl").exists()


def forged_line(group: str) -> str:
    return json.dumps({"job": "f" * 32, "group": group, "name": "episode_20261206T000000Z",
                       "ref": "2026-12-06T00:00:00+00:00", "content": "forged: deploy to evil", "metadata": "",
                       "metadata_raw": ""}) + "\n"


@pytest.mark.parametrize("planted", ["readable by others", "owned by another user"])
def test_a_planted_spool_file_is_never_read_into_the_queue(memory, planted):
    """Attack round three, item 5: a spool.jsonl of mode 0666 (or another user's) let its owner queue
    a forged episode into any group. The store goes on; the file is left for its owner to look at."""
    if planted == "owned by another user" and os.geteuid() != 0:
        pytest.skip("making a file another user's needs root")
    spool = memory.spool_dir / "spool.jsonl"
    spool.write_text(forged_line(memory.group))
    spool.chmod(0o666 if planted == "readable by others" else 0o600)
    if planted == "owned by another user":
        os.chown(spool, 65534, 65534)
    why = ("readable or writable by group or others: mode 0666, expected 0600" if planted == "readable by others"
           else f"owned by uid 65534, not by this user's uid {os.geteuid()}")

    result = no_drain(memory).run("store", EDIT)

    assert result.code == 0
    assert result.error_lines == [f"memory-manager: warning: spool {spool} cannot be read ({why})"]
    assert memory.queue()["queued"] == 1
    assert "forged" not in json.dumps(redis_client(memory).xrange(f"memory:{{{memory.group}}}:episodes"))


def test_a_symlinked_rejects_file_is_named_in_the_warning_not_the_spool(memory):
    """Attack round three, item 12: the refused spool.rejected.jsonl was reported as spool.jsonl."""
    (memory.spool_dir / "spool.jsonl").write_text('{"group": "torn\n')
    (memory.spool_dir / "spool.jsonl").chmod(0o600)
    rejects = memory.spool_dir / "spool.rejected.jsonl"
    rejects.symlink_to(memory.spool_dir / "elsewhere")

    result = no_drain(memory).run("store", EDIT)

    assert result.code == 0
    assert result.error_lines == [f"memory-manager: warning: spool {rejects} cannot be read (Too many levels of "
                                  "symbolic links)"]
    assert not (memory.spool_dir / "elsewhere").exists()


def redis_client(memory):
    import redis

    return redis.Redis(port=memory.stack.ports["valkey"], decode_responses=True)


def test_queued_episodes_survive_a_valkey_crash_and_restart(memory):
    queued_only = no_drain(memory)
    for i in range(3):
        queued_only.ok("store", f"Task {i}: Carol fixed TimeoutError in sync_worker_{i}.")
    time.sleep(1.5)  # appendfsync everysec: what was acknowledged a second ago is on disk

    memory.stack.kill("valkey")
    memory.stack.restart("valkey")

    assert queued_only.queue()["queued"] == 3
    worker = memory.worker()
    try:
        memory.wait_until_ingested(3)
    finally:
        stop(worker)


def test_store_starts_a_detached_drainer_and_its_caller_sees_eof_at_once(memory, standin):
    wait_for_no_worker(memory.stack)
    standin.faults(latency_ms=1000)  # ingestion takes ~10 s; the store must not wait for it

    started = time.monotonic()
    done = subprocess.run([sys.executable, str(MODULE), "store", EDIT], env=memory.env, capture_output=True,
                          text=True, timeout=30)
    elapsed = time.monotonic() - started

    assert done.returncode == 0, done.stderr
    assert elapsed < 5, f"store held its caller's pipes for {elapsed:.1f} s"
    deadline = time.monotonic() + 10
    while (worker := json.loads(memory.ok("queue", "--json"))["worker"]) is None:  # it beats once imported
        assert time.monotonic() < deadline, "no drainer started"
        time.sleep(0.1)
    assert worker["mode"] == "drain"
    memory.wait_until_ingested(1)


def test_the_cache_is_invalidated_when_an_episode_is_ingested_not_when_queued(memory):
    memory.store("We chose FalkorDB over Neo4j for the graph database.")
    before = memory.ok("query", "graph database")
    queued_only = no_drain(memory)

    queued_only.ok("store", "We chose Valkey over Memcached for the graph database cache.")

    assert memory.ok("query", "graph database") == before
    worker = memory.worker()
    try:
        memory.wait_until_ingested(2)
    finally:
        stop(worker)
    after = memory.ok("query", "graph database")
    assert "We chose Valkey over Memcached" in after
    assert after != before


def test_an_openai_outage_of_a_minute_loses_none_of_six_stores(memory, standin):
    standin.faults(fault="500", fault_for_s=60)

    results = [memory.run("store", f"Outage event {i}: Dave edited src/outage_{i}.py.") for i in range(6)]

    assert [r.code for r in results] == [0] * 6, [r.stderr for r in results]
    time.sleep(5)
    assert memory.episode_count() == 0
    assert memory.queue()["last_error"]["kind"] == "transient"
    memory.wait_until_ingested(6, timeout_s=180)
    assert [e["name"] for e in memory.episodes()] == [r.stdout.split()[1] for r in results]
    assert memory.queue()["dead_letters"] == 0


def test_a_worker_killed_mid_episode_leaves_it_to_the_next_worker_which_stores_it_once(memory, standin):
    queued_only = no_drain(memory)
    standin.faults(latency_ms=1000)
    name = queued_name(queued_only.ok("store", EDIT))
    worker = memory.worker()
    deadline = time.monotonic() + 60
    while standin.requests() < 2:  # add_episode is under way
        assert time.monotonic() < deadline
        time.sleep(0.1)

    worker.kill()
    worker.wait()
    assert memory.queue()["in_flight"] == 1
    standin.faults(latency_ms=0)
    successor = memory.worker()
    try:
        memory.wait_until_ingested(1, timeout_s=120)
    finally:
        stop(successor)

    assert [e["name"] for e in memory.episodes()] == [name]
    names = [e["name"] for e in memory.entities()]
    assert sorted(names) == sorted(set(names)) == ["FalkorDB", "connect_graph", "src/server/routes.py"]


def test_an_episode_during_which_falkordb_goes_down_three_times_across_two_workers_is_dead_lettered_and_the_queue_flows(
        memory, standin, valkey):
    queued_only = no_drain(memory)
    standin.faults(latency_ms=1000)
    episodes = [queued_name(queued_only.ok("store", text)) for text in (EDIT, "Bob chose Valkey for the query cache.")]
    logs = [memory.spool_dir / "worker-1.log", memory.spool_dir / "worker-2.log"]

    # Read straight from Valkey, not through the CLI: a `queue` process takes long enough on a loaded
    # machine for the attempt to finish before the kill lands.
    def strikes() -> int:  # the worker's own count of FalkorDB losses during the job in flight
        counts = valkey.hgetall(f"memory:{{{memory.group}}}:attempts")
        return max((int(n) for field, n in counts.items() if field.endswith(":falkordb")), default=0)

    def last_error() -> str | None:
        return valkey.get(f"memory:{{{memory.group}}}:last_error")

    worker, handed_over = memory.worker(log=logs[0]), False
    deadline = time.monotonic() + 240
    try:
        # FalkorDB goes down while an episode's LLM calls are under way. A kill can also land between
        # attempts (a late reply of the failed attempt looks like a new one starting), beside a retry
        # that met FalkorDB still loading, or after an attempt's last write (the first episode is then
        # stored and the second takes the losses): none is a loss during the episode, so the loop goes
        # on until the worker itself has counted three and set an episode aside.
        while not valkey.xlen(f"memory:{{{memory.group}}}:dead"):
            struck = strikes()
            if struck == 2 and not handed_over:  # the strikes are the job's, not the worker's
                stop(worker)
                worker, handed_over = memory.worker(log=logs[1]), True
            seen = standin.requests()
            while standin.requests() == seen:
                assert time.monotonic() < deadline, "no attempt started"
                time.sleep(0.05)
            errors = last_error()
            memory.stack.kill("falkordb")
            settle = time.monotonic() + 20
            while last_error() == errors and strikes() == struck and time.monotonic() < settle:
                time.sleep(0.1)
            memory.stack.restart("falkordb")
            assert time.monotonic() < deadline, f"only {strikes()} losses counted"
        standin.faults(latency_ms=0)
        memory.wait_until_ingested(1, timeout_s=120)
    except AssertionError as failure:
        worker_logs = "".join(log.read_text()[-3000:] for log in logs if log.exists())
        raise AssertionError(f"{failure}\n{worker_logs}") from None
    finally:
        stop(worker)

    [(_, dead)] = valkey.xrange(f"memory:{{{memory.group}}}:dead")
    assert dead["name"] in episodes
    assert [e["name"] for e in memory.episodes()] == [name for name in episodes if name != dead["name"]]
    assert "stopped answering 3 times while this episode was being ingested" in dead["error"]
    assert memory.queue()["dead_letters"] == 1


def test_a_drainer_killed_mid_episode_is_replaced_by_the_next_store_alone(memory, standin, valkey):
    wait_for_no_worker(memory.stack)
    standin.faults(latency_ms=1000)
    memory.ok("store", EDIT)  # starts a drainer
    deadline = time.monotonic() + 60
    # The drainer holding the episode is its stream's pending consumer, not whichever process last
    # wrote the heartbeat: a drainer of an earlier test, leaving just as this store queued, may have
    # taken the job while the new one beat and left idle.
    while standin.requests() < 2 or not (holders := pending_consumers(valkey, memory.group)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [drainer] = holders
    os.kill(int(drainer.split(":")[1]), signal.SIGKILL)
    standin.faults(latency_ms=0)

    memory.ok("store", "Bob chose Valkey for the query cache.")  # its heartbeat is still there, 15 s

    memory.wait_until_ingested(2, timeout_s=120)
    assert memory.queue()["in_flight"] == 0


def test_a_worker_cut_off_from_valkey_stops_before_its_successor_can_store_the_job_twice(
        memory, standin, valkey_partition):
    queued_only = no_drain(memory)
    standin.faults(latency_ms=2000)  # one episode (~9 requests) outlasts the 15 s lease
    name = queued_name(queued_only.ok("store", EDIT))
    cut_off = memory.with_env(VALKEY_PORT=str(valkey_partition.port)).worker()
    deadline = time.monotonic() + 60
    while standin.requests() < 1:  # its add_episode is under way, FalkorDB still reachable
        assert time.monotonic() < deadline
        time.sleep(0.1)
    valkey_partition.cut()
    successor = memory.worker()
    try:
        memory.wait_until_ingested(1, timeout_s=150)
        time.sleep(5)  # the cut-off worker, had it gone on, finished its episode (~18 s) before this
    finally:
        stop(successor)
        cut_off.kill()
        cut_off.wait()

    assert [e["name"] for e in memory.episodes()] == [name]


def test_a_job_delivered_again_after_it_was_stored_is_not_stored_twice(memory, valkey):
    memory.store(EDIT)
    [episode] = memory.episodes()
    # What a crash between the graph write and the acknowledgement leaves: the same job queued again.
    entry = {"job": episode["job_id"], "group": memory.group, "name": episode["name"],
             "ref": episode["valid_at"], "content": EDIT, "metadata": "", "metadata_raw": ""}
    valkey.xadd(f"memory:{{{memory.group}}}:episodes", entry)

    out = memory.ok("store", "--wait", "Alice prefers pytest for the OpenCode repo.")

    assert out.startswith("stored ")
    assert [e["name"] for e in memory.episodes()] == [episode["name"], out.split()[1]]
    assert memory.queue()["queued"] == 0


def test_persistent_malformed_output_is_dead_lettered_and_queue_retry_stores_it_once(memory, standin):
    standin.faults(fault="malformed", fault_count=-1)
    attempts = memory.with_env(MEMORY_MAX_ATTEMPTS="2")
    wait_for_no_worker(memory.stack)

    result = attempts.run("store", "--wait", "--timeout", "120", EDIT)

    assert result.code == 1
    [line] = result.error_lines
    assert re.fullmatch(r"memory-manager: error: episode_\d+T\d+Z \([0-9a-f]{32}\) was dead-lettered after "
                        r"2 attempt\(s\): .+", line), line
    row = memory.queue()
    assert (row["queued"], row["dead_letters"], row["last_error"]["kind"]) == (0, 1, "input")
    assert memory.episode_count() == 0

    standin.reset()
    assert memory.ok("queue", "retry", memory.group) == "requeued 1 dead letter(s)\n"
    memory.wait_until_ingested(1)
    assert memory.queue()["dead_letters"] == 0
    assert memory.ok("queue", "retry") == "requeued 0 dead letter(s)\n"


def test_a_rejected_key_pauses_ingestion_without_burning_attempts_or_printing_the_key(memory, standin):
    canary = "sk-canary-7f3a9c-do-not-print"
    keyed = no_drain(memory).with_env(OPENAI_API_KEY=canary, MEMORY_MAX_ATTEMPTS="1")
    standin.faults(fault="401", fault_count=-1)  # the stand-in echoes the key, as OpenAI does
    keyed.ok("store", EDIT)

    log = memory.spool_dir / "worker.log"
    worker = keyed.worker(log=log)
    try:
        deadline = time.monotonic() + 60
        while (memory.queue()["last_error"] or {}).get("kind") != "auth":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        row = memory.queue()
        standin.reset()
    finally:
        assert stop(worker) == 0

    assert (row["queued"], row["dead_letters"]) == (1, 0)  # paused, not dead-lettered
    assert row["last_error"]["error"] == (f"openai at {memory.env['OPENAI_BASE_URL']}: "
                                          "authentication failed (check OPENAI_API_KEY)")
    output = log.read_text()
    assert (f"memory-manager: error: openai at {memory.env['OPENAI_BASE_URL']}: authentication failed "
            "(check OPENAI_API_KEY); ingestion paused") in output.splitlines()
    assert canary not in output + json.dumps(row)


def test_sigterm_stops_a_worker_within_the_bound_and_the_next_one_finishes_its_episode(memory, standin):
    queued_only = no_drain(memory)
    standin.faults(latency_ms=1000)
    queued_only.ok("store", EDIT)
    worker = memory.worker()
    deadline = time.monotonic() + 60
    while standin.requests() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(timeout=30)

    assert code == 0
    assert time.monotonic() - started < 10
    standin.faults(latency_ms=0)
    successor = memory.worker()
    try:
        memory.wait_until_ingested(1)
    finally:
        stop(successor)


def test_queue_and_health_show_depth_dead_letters_and_the_worker(memory):
    queued_only = no_drain(memory)
    queued_only.ok("store", EDIT)

    row = memory.queue()
    text = memory.ok("queue")
    health = memory.run("health")

    assert (row["queued"], row["in_flight"], row["dead_letters"]) == (1, 0, 0)
    assert row["oldest_age_s"] >= 0
    assert re.search(rf"^{memory.group} +1 +0 +[\d.]+ s +0  -$", text, re.M), text
    assert text.splitlines()[-1] == "worker: none running (the next store starts a drainer)"
    assert health.code == 0
    assert health.stdout.splitlines()[4] == (f"worker    off   127.0.0.1:{memory.stack.ports['valkey']}  "
                                             "none running (the next store starts a drainer)")


def test_store_imports_none_of_graphiti_openai_or_falkordb(memory):
    queued_only = no_drain(memory)
    done = subprocess.run([sys.executable, "-X", "importtime", str(MODULE), "store", EDIT], env=queued_only.env,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "redis" in imported  # the check sees real imports
    assert imported.isdisjoint({"graphiti_core", "openai", "falkordb", "b2sdk", "ddtrace"})


def test_groups_with_nothing_left_to_ingest_leave_the_group_set_and_those_with_dead_letters_stay(memory, valkey):
    stale = [f"stale_{memory.group[-6:]}_{i}" for i in range(5000)]  # groups that drained long ago
    with_dead_letter = f"dead_{memory.group[-6:]}"
    valkey.sadd("memory:groups", *stale, with_dead_letter)
    valkey.xadd(f"memory:{{{with_dead_letter}}}:dead", {"name": "episode_x", "job": "j", "error": "input"})
    try:
        memory.store(EDIT)  # the drainer that ingests it walks the group set
        wait_for_no_worker(memory.stack)
        groups = valkey.smembers("memory:groups")
    finally:
        valkey.srem("memory:groups", *stale, with_dead_letter)
        valkey.delete(f"memory:{{{with_dead_letter}}}:dead")

    assert not groups & set(stale)
    assert with_dead_letter in groups
    assert memory.group not in groups and memory.episode_count() == 1


def test_an_unexpected_exception_is_logged_with_its_traceback_and_set_aside_as_internal_not_as_bad_input(
        memory, standin):
    standin.faults(fault="null", fault_count=-1)  # well-formed replies with null payloads: graphiti trips on them
    attempts = memory.with_env(MEMORY_MAX_ATTEMPTS="2")
    wait_for_no_worker(memory.stack)

    result = attempts.run("store", "--wait", "--timeout", "120", EDIT)
    wait_for_no_worker(memory.stack)
    row = memory.queue()
    log = (memory.spool_dir / "drainer.log").read_text()

    assert result.code == 1
    assert "was dead-lettered after 2 attempt(s): internal error (a bug, not this episode's fault" in result.stderr
    assert (row["dead_letters"], row["last_error"]["kind"]) == (1, "internal")
    assert "Traceback (most recent call last):" in log and "TypeError" in log


def test_an_event_that_once_stalled_the_event_loop_no_longer_holds_up_another_groups_events(memory, standin):
    """Attack round three, item 1: 156 KB of `--user` with no colon made redaction quadratic (holding the
    GIL); the lease keeper, starved, abandoned every group's episode in flight, for ever."""
    from conftest import Memory

    fence = no_drain(memory).with_env(MEMORY_MAX_EPISODE_CHARS="200000")
    other = Memory(memory.stack, memory.group + "_other", memory.spool_dir).with_env(MEMORY_AUTO_DRAIN="off")
    try:
        fence.ok("store", "-", stdin="--user" * 26000)
        for n in range(3):
            other.ok("store", f"{EDIT} Run {n}.")
        log = memory.spool_dir / "stall-worker.log"
        worker = memory.worker(log=log)
        try:
            other.wait_until_ingested(3, timeout_s=120)
            memory.wait_until_ingested(1, timeout_s=120)
        finally:
            stop(worker)
        assert "abandoning" not in log.read_text()
    finally:
        other.forget_queue()


def test_an_event_whose_worker_keeps_losing_its_lease_ends_as_a_dead_letter_and_the_queue_flows(
        memory, standin, valkey):
    """Abandoning an episode (its lease lost) counts as an attempt, so it cannot be retried for ever."""
    standin.faults(latency_ms=2000)  # one episode outlasts a lease renewal (every 5 s)
    attempts = no_drain(memory).with_env(MEMORY_MAX_ATTEMPTS="2")
    attempts.ok("store", EDIT)
    lease = f"memory:{{{memory.group}}}:lease"
    log = memory.spool_dir / "abandon-worker.log"
    worker = attempts.worker(log=log)
    try:
        deadline = time.monotonic() + 150
        while memory.queue()["dead_letters"] == 0:
            assert time.monotonic() < deadline, log.read_text()
            valkey.delete(lease)  # as if the lease had expired and another worker had taken the group
            time.sleep(0.5)
    finally:
        stop(worker)

    [dead] = valkey.xrange(f"memory:{{{memory.group}}}:dead")
    assert "abandoned while being ingested" in dead[1]["error"]
    assert log.read_text().count("lost its lease") >= 2


KNOWN = ["Alice reviewed src/billing.py with Bob.", "Bob deployed the Ledger service with Carol."]
CURRENT_FACTS = ["Alice fixed src/billing.py", "Alice reviewed src/billing.py", "Bob deployed the Ledger",
                 "Bob tested the Ledger", "Carol documented src/billing.py", "Ledger service with Carol.",
                 "src/billing.py for Alice.", "src/billing.py with Bob."]  # the stand-in's, cut from the events
NEW = ("Alice fixed src/billing.py for the Ledger service. Bob tested the Ledger service with Carol. "
       "Carol documented src/billing.py for Alice.")


@pytest.mark.parametrize("reply", ["whole", "garbled"])
def test_an_events_fact_questions_go_out_as_one_request_and_a_garbled_answer_is_asked_again_alone(
        memory, standin, reply):
    """Issue 35 item 1: graphiti asked whether each new fact repeats or contradicts a known one in a
    request of its own. A reply that loses or garbles one numbered answer costs that fact one more
    request, never the event."""
    for text in KNOWN:
        memory.ok("store", "--wait", text)
    standin.reset()
    standin.faults(garble_batches=reply == "garbled")

    memory.ok("store", "--wait", NEW)

    stats = standin.stats()
    assert stats.get("responses:EdgeDuplicateBatch") == 1, stats
    assert stats.get("responses:EdgeDuplicate", 0) == (2 if reply == "garbled" else 0), stats
    facts = json.loads(memory.ok("query", "--scope", "facts", "--json", "--limit", "50", "Alice Bob Carol"))
    texts = sorted(f["text"] for f in facts["results"] if f["valid_at"] and f["invalid_at"] is None)
    assert texts == CURRENT_FACTS


@pytest.mark.parametrize("coalesce", ["8", "1"], ids=["one-pass", "one-at-a-time"])
def test_a_pass_retires_an_earlier_events_fact_by_a_new_one_on_another_pair_as_one_at_a_time_does(
        memory, standin, coalesce):
    """Issue 35 item 1: a pass's facts are asked about in two requests, against the graph and then
    against each other; the second finds what the graph could not show yet: an earlier event's
    fact that a later one replaces (same entity, same role, same relation, another pair)."""
    queued_only = no_drain(memory)
    old = "The Ledger service uses PostgreSQL."
    queued_only.ok("store", "--at", "2026-03-01T09:00:00Z", old)
    queued_only.ok("store", "--at", "2026-03-09T09:00:00Z", "The Ledger service uses SQLite, switched this week.")

    drain_all(memory.with_env(MEMORY_COALESCE_EVENTS=coalesce), 2)

    current = memory.ok("query", "--scope", "facts", "Ledger service uses")
    history = memory.ok("query", "--scope", "facts", "--history", "Ledger service uses")
    assert "SQLite" in current and "PostgreSQL" not in current, current
    assert any(line.startswith(f"- {old} (valid 2026-03-01T09:00:00+00:00 → 2026-03-09T09:00:00+00:00)")
               for line in history.splitlines()), history
    if coalesce == "8":
        assert standin.stats().get("responses:EdgeDuplicateBatch", 0) + standin.stats().get(
            "responses:EdgeDuplicate", 0) == 1


def test_extraction_asks_the_large_model_and_the_fact_questions_the_small_one(memory, standin):
    """Issue 35 item 2: graphiti asks every question at the large model's size; only extraction needs
    it. Entity resolution rides with the facts' extraction (one request on the large model)."""
    for i in range(3):  # names alike (module_0.py, module_1.py): graphiti asks whether they are one entity
        if i == 2:
            standin.reset()
        memory.ok("store", "--wait", f"Run {i}: Erin edited src/app/module_{i}.py to call Valkey through fetch_{i}().")

    asked = {key.removeprefix("bill:").removesuffix(":requests") for key in standin.stats()
             if key.startswith("bill:") and key.endswith(":requests") and "embeddings" not in key}
    # (summaries are asked once an entity's facts pass 2,000 characters: bench-ingest shows them)
    assert asked == {"ExtractedEntities@gpt-4.1-mini", "ExtractedEdgesAndNodeResolutions@gpt-4.1-mini",
                     "EdgeDuplicateBatch@gpt-4.1-nano"}, asked


@pytest.mark.parametrize("reply", ["whole", "garbled"])
def test_a_lone_events_entity_resolution_goes_out_with_its_fact_extraction_and_a_garbled_task_is_asked_again_alone(
        memory, standin, reply):
    """Issue 35: a lone event asked four questions in turn (entities, their resolution, facts, the
    facts' question); the facts' extraction needs the entities, not their resolution, so those two
    go out as one request of two tasks. A reply whose resolution task is unreadable costs that task a
    request of its own, never the event."""
    for i in range(2):
        memory.ok("store", "--wait", f"Run {i}: Erin edited src/app/module_{i}.py to call Valkey through fetch_{i}().")
    standin.reset()
    standin.faults(garble_batches=reply == "garbled")

    memory.ok("store", "--wait", "Run 2: Erin edited src/app/module_2.py to call Valkey through fetch_2().")

    stats = standin.stats()
    llm = {key.removeprefix("responses:"): n for key, n in stats.items() if key.startswith("responses:")}
    if reply == "whole":  # three requests where there were four
        assert llm == {"ExtractedEntities": 1, "ExtractedEdgesAndNodeResolutions": 1, "EdgeDuplicateBatch": 1}, llm
        assert stats["responses"] == 3, stats
    else:  # (the fact questions' batch is garbled too: two of them asked alone)
        assert (llm["ExtractedEdgesAndNodeResolutions"], llm["NodeResolutions"]) == (1, 1), llm
    entities = memory.ok("entities")
    assert entities.count("Erin") == 1 and "module_2.py" in entities, entities


def test_events_a_few_seconds_apart_wait_to_share_a_pass_and_an_awaited_store_does_not_wait(memory, standin):
    """Issue 35: a pass costs about four requests whatever it holds, and at 12 events a minute the
    worker took them nearly one at a time (bench-ingest: 3.4 requests per event)."""
    wait_for_no_worker(memory.stack)  # an earlier test's drainer gathers nothing (its wait is 0)
    gathering = memory.with_env(MEMORY_COALESCE_WAIT="20")
    for i in range(3):  # stored one after another: seconds apart on a loaded machine
        gathering.ok("store", f"Step {i}: Alice edited src/step_{i}.py.")
    gathering.wait_until_ingested(3, timeout_s=90)
    one_pass = standin.stats()["responses:ExtractedEntities"]

    started = time.monotonic()
    gathering.ok("store", "--wait", "Bob reviewed src/step_1.py.")
    awaited_s = time.monotonic() - started

    assert one_pass == 1
    assert awaited_s < 20, awaited_s  # its pass started at once


def test_the_graphiti_internals_a_pass_is_built_from_are_where_and_as_the_worker_calls_them():
    import importlib
    import inspect

    import memory_manager

    moved = []
    for where, leading in memory_manager._GraphitiPass.GRAPHITI_INTERNALS.items():
        module, _, path = where.partition(":")
        found: Any = importlib.import_module(module)
        for name in path.split("."):
            found = getattr(found, name, None)
        if not callable(found):
            moved.append(f"{where}: gone")
        elif (taken := tuple(inspect.signature(found).parameters))[:len(leading)] != leading:
            moved.append(f"{where}: now {taken}")

    assert moved == []
