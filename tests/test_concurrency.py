"""Requirement: Writes to one group are serialised (spec: memory-manager / Serialised writes)."""

from collections import Counter


def test_ten_concurrent_store_processes_make_ten_episodes_and_no_duplicate_entity(memory):
    processes = [
        memory.popen("store", f"Worker run {i} edited src/app/cache.py to call Valkey through fetch_answer().")
        for i in range(10)
    ]
    results = [(p.wait(timeout=240), p.stdout.read(), p.stderr.read()) for p in processes]
    for process in processes:
        process.stdout.close()
        process.stderr.close()
        process.stdin.close()

    assert [code for code, _, _ in results] == [0] * 10, [err for _, _, err in results]
    names = [out.strip() for _, out, _ in results]
    assert len(set(names)) == 10
    [[episodes]] = memory.cypher("MATCH (e:Episodic) RETURN count(e)")
    assert episodes == 10
    counts = Counter(e["name"] for e in memory.entities())
    assert counts["src/app/cache.py"] == 1
    assert counts["Valkey"] == 1
    assert counts["fetch_answer"] == 1
    assert max(counts.values()) == 1, counts


def test_a_store_waiting_too_long_for_the_group_lock_fails_clearly(memory, valkey):
    valkey.set(f"memory:{memory.group}:lock", "held-by-someone-else", ex=30)

    result = memory.with_env(MEMORY_LOCK_WAIT="1").run("store", "Alice prefers pytest.")

    assert result.code == 1
    assert result.error_lines == [
        f"memory-manager: error: valkey at 127.0.0.1:{memory.stack.ports['valkey']}: write lock for group "
        f"'{memory.group}' not free within 1 s (another store is still running; raise MEMORY_LOCK_WAIT)"]
    assert memory.graph_counts() == (0, 0)
