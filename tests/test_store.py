"""Requirement: Store an episode (spec: memory-manager / Store episodes)."""

import json
import re

import pytest

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
    memory.ok("store", "-", stdin="Fixed TimeoutError in sync_worker when Valkey restarts.")

    assert {e["name"] for e in memory.entities()} == {"TimeoutError", "sync_worker", "Valkey"}


BAD_STORES = [
    pytest.param(["store", ""], "content must be non-empty text", id="empty-content"),
    pytest.param(["store", "   \n\t"], "content must be non-empty text", id="blank-content"),
    pytest.param(["store", EDIT, "[1, 2]"], "metadata must be a JSON object, got list", id="metadata-list"),
    pytest.param(["store", EDIT, '"text"'], "metadata must be a JSON object, got str", id="metadata-string"),
    pytest.param(["store", EDIT, "{not json"], "metadata is not valid JSON", id="metadata-invalid-json"),
    pytest.param(["store"], "store: the following arguments are required: content", id="missing-content"),
]


@pytest.mark.parametrize(("args", "message"), BAD_STORES)
def test_bad_store_input_exits_2_with_one_line_and_leaves_the_graph_as_it_was(memory, args, message):
    memory.store("Alice prefers pytest for the OpenCode repo.")
    before = memory.graph_counts()

    result = memory.run(*args)

    assert result.code == 2
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith("memory-manager: error: ")
    assert message in result.stderr
    assert result.stdout == ""
    assert memory.graph_counts() == before


def test_content_over_the_size_limit_is_refused(memory):
    result = memory.with_env(MEMORY_MAX_EPISODE_CHARS="20").run("store", "x" * 21)

    assert result.code == 2
    assert result.error_lines == [
        "memory-manager: error: content is 21 characters; MEMORY_MAX_EPISODE_CHARS allows 20"]
    assert memory.graph_counts() == (0, 0)


def test_store_without_openai_key_fails_early_naming_the_variable(memory):
    result = memory.with_env(OPENAI_API_KEY=None).run("store", EDIT)

    assert result.code == 2
    assert result.error_lines == ["memory-manager: error: OPENAI_API_KEY is not set "
                                  "(needed to store and to answer uncached queries)"]
    assert memory.graph_counts() == (0, 0)


def test_store_still_writes_when_valkey_is_down_and_says_so_once(memory, dead_port):
    result = memory.with_env(VALKEY_PORT=str(dead_port)).run("store", "Alice prefers pytest for the OpenCode repo.")

    assert result.code == 0
    assert result.stdout.startswith("episode_")
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith("memory-manager: warning: cache unavailable (valkey at 127.0.0.1:")
    assert {e["name"] for e in memory.entities()} == {"Alice", "OpenCode"}
