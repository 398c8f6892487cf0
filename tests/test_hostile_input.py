"""Requirement: hostile input (spec: memory-manager / Input validation).

A corpus of hostile queries, metadata, content, entity types, group ids and environment values,
each through the CLI and through the library. A query always answers (exit 0) or is refused with
exit 2 and one line; nothing ever prints a traceback; a refused input leaves the graph and the
queue unchanged (asserted by counts).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from conftest import MODULE, Memory, wait_for_no_worker

ANSWER, REFUSE = "answer", "refuse"

QUERIES = [
    # RediSearch / Lucene syntax, alone and mixed into a question
    "@", "|", "-", "*", "(", ")", '"', "~", "{", "}", "[", "]", "%", "$", ":", "\\",
    '@|-*()"~{}[]%$:\\', "@name:FalkorDB", "graph|database", "-graph", "graph*", "(graph database)",
    '"graph database"', "~graph", "{graph}", "[graph TO database]", "%graph%", "$graph", "group_id:opencode",
    "graph\\database", "*:*", "graph AND database OR NOT neo4j", "_", "__init__", "@group_id:{opencode}",
    # Cypher and SQL shaped
    "'}) MATCH (n) DETACH DELETE n //", "; GRAPH.DELETE opencode", "' OR 1=1 --", "$limit", "`x`",
    # control, RTL, zero-width, emoji, long
    "\x1b[31mred\x1b[0m graph", "graph\r\ndatabase\t", "\u202egraph database", "graph\u200bdatabase",
    "граф база данных", "图数据库", "🦜 graph", "graph " * 1300,
]
REFUSED_QUERIES = ["", "   ", "\t\n", "x" * 8_001]
LIBRARY_ONLY_QUERIES = {"nul": "graph\x00database", "lone surrogate": "graph \ud800 database", "1 MB": "x" * 1_000_000}

METADATA = [  # all are stored (exit 0): none, objects, or raw text kept beside the episode
    "undefined", "null", "", "{}", '{"event": "file.edited", "path": "src/app.py"}', "[]", "[1, 2, 3]",
    '"a string"', "42", "true", "{not json", "[" * 10_000 + "]" * 10_000,
    json.dumps({"a" * 10: {"b": [1, {"c": None}]}}), json.dumps({"k": "x" * 60_000}),
]
REFUSED_METADATA = [json.dumps({"k": "x" * 70_000})]

CONTENT_REFUSED = ["", "   ", "\n\t  \n"]
ENTITY_TYPES_REFUSED = ["File) DETACH DELETE n //", "File`", "' OR 1=1", "a" * 65, "Ünïcode", "1File", "File Type",
                        "$type", "File:Entity"]
GROUPS_REFUSED = ["x}) MATCH (n) DETACH DELETE n //", "../etc", "a b", "x" * 65, "g;rm -rf", "{g}", "g:h",
                  "g*"]
ENVIRONMENT_REFUSED = [
    ("MEMORY_GROUP_ID", "a b"), ("MEMORY_GROUP_ID", "x}) DETACH DELETE n"), ("FALKORDB_PORT", "99999"),
    ("FALKORDB_PORT", "-1"), ("VALKEY_PORT", "6380; rm -rf /"), ("OPENAI_BASE_URL", "javascript:alert(1)"),
    ("OPENAI_BASE_URL", "not a url"), ("MEMORY_CACHE_TTL", "0"), ("MEMORY_MAX_ATTEMPTS", "1e9"),
    ("MEMORY_AUTO_DRAIN", "perhaps"), ("DD_TRACE_AGENT_PORT", "80\nHost: evil"), ("DD_AGENT_HOST", "a b"),
    ("FALKORDB_HOST", "db\r\nFLUSHALL"), ("VALKEY_HOST", "-oProxyCommand=x y"),
]


def snapshot(memory: Memory) -> tuple:
    return memory.graph_counts(), memory.queue()["queued"], sorted(p.name for p in memory.spool_dir.iterdir())


@pytest.fixture
def seeded(memory):
    """A group with one episode, and no drainer left to ingest what the tests queue."""
    memory.with_env(MEMORY_DRAIN_IDLE="1").store("Alice chose FalkorDB over Neo4j for the graph database.")
    wait_for_no_worker(memory.stack, timeout_s=90)
    return memory.with_env(MEMORY_AUTO_DRAIN="off")


def assert_answered_or_refused(result, expected: str | None = None) -> None:
    assert "Traceback" not in result.stderr
    if expected == ANSWER or (expected is None and result.code == 0):
        assert (result.code, result.stderr) == (0, ""), result.stderr
        assert result.stdout.strip()
    else:
        assert result.code == 2, (result.code, result.stderr)
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("memory-manager: error: ")


def test_hostile_queries_always_answer_through_the_cli(seeded):
    before = snapshot(seeded)
    for result in seeded.run_all([["query", query] for query in QUERIES]):
        assert_answered_or_refused(result, ANSWER)
    assert "FalkorDB over Neo4j" in seeded.run("query", "graph database").stdout
    assert snapshot(seeded) == before


@pytest.mark.parametrize("query", REFUSED_QUERIES, ids=["empty", "spaces", "whitespace", "over-8000"])
def test_empty_or_oversized_queries_are_refused_in_one_line(seeded, query):
    before = snapshot(seeded)

    result = seeded.run("query", query)

    assert_answered_or_refused(result, REFUSE)
    assert snapshot(seeded) == before


def test_an_argument_that_is_not_utf8_is_refused(seeded):
    before = snapshot(seeded)
    arguments: list[list[bytes]] = [[b"query", b"graph \xff\xfe"], [b"store", b"Edited \xff.py"],
                                    [b"store", b"x", b'{"k": "\xff"}']]
    for args in arguments:
        done = subprocess.run([sys.executable, str(MODULE), *args], env=seeded.env, capture_output=True,
                              timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.decode().endswith("is not valid UTF-8 text\n") and done.stderr.count(b"\n") == 1
    assert snapshot(seeded) == before


def test_hostile_metadata_is_stored_or_refused_never_crashes(seeded):
    before_graph, queued, _ = snapshot(seeded)
    for metadata in METADATA:
        result = seeded.run("store", "Bob edited src/app.py.", metadata)
        assert result.code == 0, (metadata[:40], result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 1
    for metadata in REFUSED_METADATA:
        assert_answered_or_refused(seeded.run("store", "Bob edited src/app.py.", metadata), REFUSE)
    assert snapshot(seeded)[:2] == (before_graph, queued + len(METADATA))


@pytest.mark.parametrize("content", CONTENT_REFUSED, ids=["empty", "spaces", "whitespace"])
def test_empty_content_is_refused_and_nothing_is_queued(seeded, content):
    before = snapshot(seeded)

    assert_answered_or_refused(seeded.run("store", content), REFUSE)
    assert_answered_or_refused(seeded.run("store", "-", stdin=content), REFUSE)
    assert snapshot(seeded) == before


def test_content_over_the_limit_and_binary_stdin_are_refused(seeded):
    before = snapshot(seeded)
    over = seeded.run("store", "-", stdin="x" * 100_001)
    binary = subprocess.run([sys.executable, str(MODULE), "store", "-"], env=seeded.env, capture_output=True,
                            input=bytes(range(256)) * 4, timeout=60)
    nul = subprocess.run([sys.executable, str(MODULE), "store", "-"], env=seeded.env, capture_output=True,
                         input=b"Edited a\x00b.py", timeout=60)

    assert_answered_or_refused(over, REFUSE)
    assert (binary.returncode, binary.stderr.decode()) == (
        2, "memory-manager: error: the event on stdin is not UTF-8 text (byte 128)\n")
    assert (nul.returncode, nul.stderr.decode()) == (2, "memory-manager: error: content contains NUL characters\n")
    assert snapshot(seeded) == before


def test_cypher_shaped_entity_types_and_group_ids_are_refused(seeded):
    before = snapshot(seeded)
    for entity_type in ENTITY_TYPES_REFUSED:
        assert_answered_or_refused(seeded.run("entities", entity_type), REFUSE)
    for group in GROUPS_REFUSED:
        for args in (["query", "graph"], ["store", "x"], ["entities"]):
            assert_answered_or_refused(seeded.run(*args, "--group", group), REFUSE)
    assert snapshot(seeded) == before
    assert [e["name"] for e in seeded.entities()] == ["Alice", "FalkorDB", "Neo4j"]


def test_hostile_environment_values_are_refused_naming_the_variable(seeded):
    before = snapshot(seeded)
    for name, value in ENVIRONMENT_REFUSED:
        result = seeded.with_env(**{name: value}).run("store", "Carol prefers mypy.")
        assert_answered_or_refused(result, REFUSE)
        assert name in result.stderr, result.stderr
    assert snapshot(seeded) == before


# --- the same corpus through the library -----------------------------------------------------------

@pytest.fixture
def library(seeded, monkeypatch):
    import memory_manager

    for key in [k for k in os.environ if k.startswith(("FALKORDB_", "VALKEY_", "OPENAI_", "MEMORY_", "B2_", "DD_"))]:
        monkeypatch.delenv(key)
    for key, value in seeded.env.items():
        monkeypatch.setenv(key, value)

    def call(coroutine_function, *args, **kwargs):
        async def run():
            try:
                return await coroutine_function(*args, **kwargs)
            finally:
                await memory_manager.close()

        return asyncio.run(run())

    return memory_manager, call


def test_hostile_queries_through_the_library_answer_or_raise_usage_error(seeded, library):
    mm, call = library
    before = snapshot(seeded)
    for query in QUERIES:
        assert isinstance(call(mm.query_memory, query), str), query
        assert isinstance(call(mm.search_facts, query), list), query
    for query in [*LIBRARY_ONLY_QUERIES.values(), *REFUSED_QUERIES]:
        with pytest.raises(mm.UsageError):
            call(mm.query_memory, query)
    for limit in (0, 51, -1, True, "5", 2.5, None):
        with pytest.raises(mm.UsageError):
            call(mm.query_memory, "graph", limit)
    assert snapshot(seeded) == before


def test_hostile_content_and_metadata_through_the_library(seeded, library):
    mm, call = library
    before_graph, queued, _ = snapshot(seeded)
    deep: dict = {}
    node = deep
    for _ in range(10_000):
        node["a"] = {}
        node = node["a"]
    cyclic: dict = {}
    cyclic["self"] = cyclic
    refused: list[tuple[object, object]] = [
        ("x\x00y", None), ("graph \ud800", None), ("", None), (" ", None), (None, None), (42, None),
        ("x" * 100_001, None), ("ok", deep), ("ok", cyclic), ("ok", {1: "a", "b": 2}),
        ("ok", {"k": "x" * 70_000}), ("ok", "{\"k\": \"\ud800\"}")]
    for content, metadata in refused:
        with pytest.raises(mm.UsageError):
            call(mm.enqueue_episode, content, metadata)
    stored: list[tuple[object, object]] = [
        ("ok", None), ("ok", {"nested": [1, {"deep": True}]}), ("ok", ["a", "list"]), ("ok", "undefined"),
              ("ok", "[" * 10_000 + "]" * 10_000), ("ok", {"when": __import__("datetime").date(2026, 11, 24)})]
    for content, metadata in stored:
        queued_episode = call(mm.enqueue_episode, content, metadata)
        assert queued_episode.job_id
    for entity_type in [*ENTITY_TYPES_REFUSED, 42, ""]:
        with pytest.raises(mm.UsageError):
            call(mm.get_entities, entity_type)
    assert snapshot(seeded)[:2] == (before_graph, queued + len(stored))
