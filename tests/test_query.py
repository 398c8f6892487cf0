"""Requirement: Query memory, with a cache (spec: memory-manager / Query memory, Query cache)."""

import socket
import threading

import pytest

DECISION = "We chose FalkorDB over Neo4j for the graph database."
ERROR = "Fixed TimeoutError in sync_worker when Valkey restarts during deploys."


def test_query_returns_the_stored_event_with_its_time_and_facts_with_their_validity_window(memory):
    name = memory.store(DECISION)

    answer = memory.ok("query", "which graph database did we choose")
    facts = memory.ok("query", "--scope", "facts", "which graph database did we choose")

    [episode] = memory.episodes()
    assert answer.splitlines()[0] == f"- event {episode['valid_at']}: {DECISION}" and name
    assert "We chose FalkorDB over Neo4j" in facts and "→ present)" in facts
    assert all(line.startswith("- ") for line in answer.splitlines() + facts.splitlines())


def test_query_with_nothing_relevant_says_so_in_one_line(memory):
    memory.store(DECISION)

    assert memory.ok("query", "kubernetes helm chart") == "No relevant memories found.\n"


def test_a_repeated_query_is_served_from_the_cache(memory, standin, valkey):
    memory.store(DECISION)
    first = memory.ok("query", "graph database choice")
    requests_after_miss = standin.requests()

    second = memory.ok("query", "graph database choice")

    assert second == first
    assert standin.requests() == requests_after_miss, "a cache hit must not reach the LLM"
    keys = valkey.keys(f"memory:{{{memory.group}}}:answer:*")
    assert len(keys) == 1
    assert 0 < valkey.ttl(keys[0]) <= 300


def test_an_answer_over_the_byte_bound_is_answered_but_not_cached(memory, valkey):
    """Attack round three, item 6: each question about a group with a large event cached its whole
    answer (10 questions added 143 MB beside the queue's leases and job outcomes)."""
    large = "The FalkorDB benchmark log follows. " + "Another benchmark line. " * 3_000
    memory.store(large)
    memory.store(DECISION)

    big, small = memory.ok("query", "--json", "FalkorDB benchmark log"), memory.ok("query", "Neo4j choice", "1")

    assert "Another benchmark line." in big and "Neo4j" in small
    keys = valkey.keys(f"memory:{{{memory.group}}}:answer:*")
    assert len(keys) == 1 and all(len(valkey.get(key)) < 64 * 1024 for key in keys)


def test_a_group_caches_at_most_its_byte_budget_of_answers(memory, valkey):
    """Attack round three, item 6 (per group): distinct questions each cached their answer, so a
    flood of them filled Valkey, whose volatile-lru then evicts leases and job outcomes first."""
    memory.store(DECISION)
    questions = [f"graph database choice {word}" for word in
                 ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")]

    answers = memory.with_env(MEMORY_CACHE_GROUP_BYTES="5000").ok_all([["query", q] for q in questions])

    cached = [valkey.get(key).split("\n", 1)[1] for key in valkey.keys(f"memory:{{{memory.group}}}:answer:*")]
    assert all("Neo4j" in answer for answer in answers)
    assert 0 < len(cached) < len(questions)
    assert sum(len(answer.encode()) for answer in cached) <= 5000
    assert 0 < valkey.ttl(f"memory:{{{memory.group}}}:cache_bytes") <= 300
    memory.with_env(MEMORY_CACHE_GROUP_BYTES="0").ok("query", "graph database choice thirteen")
    assert len(valkey.keys(f"memory:{{{memory.group}}}:answer:*")) == len(cached)


def test_the_cache_ttl_follows_memory_cache_ttl(memory, valkey):
    memory.store(DECISION)
    memory.with_env(MEMORY_CACHE_TTL="7").ok("query", "graph database")

    [key] = valkey.keys(f"memory:{{{memory.group}}}:answer:*")
    assert 0 < valkey.ttl(key) <= 7


def test_the_cache_key_ignores_case_and_spacing(memory, standin):
    memory.store(DECISION)
    memory.ok("query", "Graph   database choice")
    requests = standin.requests()

    memory.ok("query", "graph database CHOICE")

    assert standin.requests() == requests


def test_a_store_invalidates_the_cached_answers_of_its_group(memory, standin):
    memory.store(DECISION)
    before = memory.ok("query", "Valkey restarts")
    assert "sync_worker" not in before

    memory.store(ERROR)
    requests = standin.requests()
    after = memory.ok("query", "Valkey restarts")

    assert standin.requests() > requests, "the query after a store must miss the cache"
    assert "sync_worker when Valkey restarts during deploys" in after


def test_a_cache_hit_needs_no_openai_key(memory, standin):
    memory.store(DECISION)
    first = memory.ok("query", "graph database")

    assert memory.with_env(OPENAI_API_KEY=None).ok("query", "graph database") == first


def test_query_still_answers_when_valkey_is_down_and_says_so_once(memory, dead_port):
    memory.store(DECISION)

    result = memory.with_env(VALKEY_PORT=str(dead_port)).run("query", "graph database")

    assert result.code == 0
    assert "We chose FalkorDB over Neo4j" in result.stdout
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith("memory-manager: warning: cache unavailable (valkey at 127.0.0.1:")


@pytest.fixture
def hang_up_port():
    """A loopback port that accepts each connection and closes it at once; counts the connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def test_a_cache_that_is_down_costs_one_connection_attempt_per_query_process(memory, hang_up_port):
    memory.store(DECISION)
    port, accepted = hang_up_port

    result = memory.with_env(VALKEY_PORT=str(port)).run("query", "graph database")

    assert result.code == 0
    assert "We chose FalkorDB over Neo4j" in result.stdout
    assert len(accepted) == 1  # the lookup's; neither a retry nor the answer's write tries again


def test_a_standalone_underscore_in_the_query_does_not_break_search(memory):
    memory.store(ERROR)

    answer = memory.ok("query", "sync_worker _ Valkey")

    assert "sync_worker when Valkey restarts" in answer


def test_unquoted_words_are_one_question_and_a_last_number_is_the_limit(memory):
    memory.store(DECISION)

    assert memory.ok("query", "which", "graph", "database", "1") == memory.ok("query", "which graph database", "1")
    assert memory.ok("query", "which", "graph", "database") == memory.ok("query", "which graph database")


def test_the_limit_bounds_the_number_of_facts(memory):
    memory.store("Edited src/a.py and src/b.py and src/c.py and src/d.py with FalkorDB and Valkey.")

    assert len(memory.ok("query", "src FalkorDB Valkey", "1").splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["query", "x", "0"], "limit must be an integer from 1 to 50, got 0"),
    (["query", "x", "-1"], "limit must be an integer from 1 to 50, got -1"),
    (["query", "x", "51"], "limit must be an integer from 1 to 50, got 51"),
    (["query", "x", "--limit", "abc"], "query: argument --limit: invalid int value: 'abc'"),
    (["query", "  "], "query must be non-empty text"),
    (["query"], "query: the following arguments are required: search_query"),
], ids=["limit-0", "limit-negative", "limit-51", "limit-abc", "blank-query", "missing-query"])
def test_bad_query_input_exits_2_with_one_line(memory, args, message):
    memory.store(DECISION)
    before = memory.graph_counts()

    result = memory.run(*args)

    assert result.code == 2
    assert result.error_lines == [f"memory-manager: error: {message}"]
    assert result.stdout == ""
    assert memory.graph_counts() == before


def test_query_of_a_group_never_written_creates_no_graph(memory):
    assert memory.ok("query", "anything at all") == "No relevant memories found.\n"
    assert memory.cypher_graph_exists() is False


def test_a_long_lived_process_does_not_retry_a_down_cache_on_every_query(memory, hang_up_port, monkeypatch):
    import asyncio

    import memory_manager

    memory.store(DECISION)
    port, accepted = hang_up_port
    for key, value in memory.with_env(VALKEY_PORT=str(port)).env.items():
        monkeypatch.setenv(key, value)

    async def three_queries() -> list[str]:
        answers = [await memory_manager.query_memory(q) for q in ("graph database", "Neo4j", "FalkorDB choice")]
        await memory_manager.close()
        return answers

    answers = asyncio.run(three_queries())

    assert all("We chose FalkorDB over Neo4j" in answer for answer in answers)
    assert len(accepted) == 1  # the cache is skipped for CACHE_DOWN_RETRY_S after the first failure
