"""Requirement: Store an episode (spec: memory-manager / Store episodes)."""

import json
import re

from conftest import wait_for_no_worker

EDIT = "Edited src/server/routes.py to add retry logic around FalkorDB connections in connect_graph()."


def test_store_prints_the_episode_name_and_entities_lists_what_was_extracted(memory):
    name = memory.store(EDIT)

    assert re.fullmatch(r"episode_\d{8}T\d{12}Z", name)
    assert memory.entities() == [
        {"name": "connect_graph", "type": "CodeSymbol"},
        {"name": "FalkorDB", "type": "Technology"},
        {"name": "src/server/routes.py", "type": "File"},
    ]


def test_store_keeps_the_metadata_on_the_episode(memory):
    name = memory.store(EDIT, {"event": "file.edit", "path": "src/server/routes.py"})

    rows = memory.cypher(f"MATCH (e:Episodic {{name: '{name}'}}) RETURN e.metadata, e.source_description")
    assert len(rows) == 1
    assert json.loads(rows[0][0]) == {"event": "file.edit", "path": "src/server/routes.py"}
    assert rows[0][1] == "opencode"


def test_store_reads_content_from_stdin_with_a_dash(memory):
    memory.ok("store", "--wait", "-", stdin="Fixed TimeoutError in sync_worker when Valkey restarts.")

    assert {e["name"] for e in memory.entities()} == {"TimeoutError", "sync_worker", "Valkey"}


def test_store_without_an_openai_key_still_queues_and_says_no_drainer_was_started(memory):
    wait_for_no_worker(memory.stack)

    result = memory.with_env(OPENAI_API_KEY=None).run("store", EDIT)

    assert result.code == 0
    assert result.stdout.startswith("queued episode_")
    assert result.error_lines == ["memory-manager: warning: no worker is running and OPENAI_API_KEY is not set "
                                  "here, so none was started; the episode waits in the queue"]
    assert memory.queue()["queued"] == 1


def test_a_worker_without_an_openai_key_refuses_to_start_naming_the_variable(memory):
    result = memory.with_env(OPENAI_API_KEY=None).run("worker")

    assert result.code == 2
    assert result.error_lines == ["memory-manager: error: OPENAI_API_KEY is not set "
                                  "(needed to ingest episodes and to answer uncached queries)"]
