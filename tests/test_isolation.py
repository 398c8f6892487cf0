"""Requirement: Memory groups are isolated (spec: memory-manager / Group isolation)."""

from conftest import Memory


def test_two_groups_never_see_each_others_entities_facts_or_cached_answers(memory, standin):
    alpha = memory
    beta = Memory(memory.stack, memory.group + "_beta")
    alpha.store("Alice prefers pytest for the OpenCode repo.")
    beta.store("Bob prefers unittest for the Zed repo.")

    assert {e["name"] for e in alpha.entities()} == {"Alice", "OpenCode"}
    assert {e["name"] for e in beta.entities()} == {"Bob", "Zed"}

    # Warm alpha's cache for the same question, then ask beta: beta must not get alpha's answer.
    alpha_answer = alpha.ok("query", "who prefers which test framework")
    requests = standin.requests()
    beta_answer = beta.ok("query", "who prefers which test framework")

    assert "Alice" in alpha_answer and "Bob" not in alpha_answer
    assert "Bob" in beta_answer and "Alice" not in beta_answer
    assert standin.requests() > requests, "beta's first query must miss, not reuse alpha's cache"
