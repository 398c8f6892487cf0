"""Requirement: Ordered, exactly-once ingestion under load (spec: memory-manager / Durable write queue).

Bursts of real `store` processes with the OpenAI stand-in answering each request after 1 s, as a
real model call would, and several workers at once.
"""

from collections import Counter

from conftest import Memory, stop, wait_for_no_worker


def burst(memories: list[Memory], per_group: int) -> list[set[str]]:
    """Spawn every store at once (as the plugin does); returns the printed names per group."""
    processes = [(m, m.popen("store", f"Run {i} of {m.group[-6:]}: Erin edited src/app/cache.py to call "
                                      f"Valkey through fetch_answer() in module_{i}."))
                 for i in range(per_group) for m in memories]
    results = []
    for memory, process in processes:
        out, err = process.communicate(timeout=60)
        results.append((memory, process.returncode, out, err))
    assert [code for _, code, _, _ in results] == [0] * len(results), [err for _, _, _, err in results]
    names: dict[str, list[str]] = {m.group: [] for m in memories}
    for memory, _, out, _ in results:
        names[memory.group].append(out.split()[1])
    return [set(names[m.group]) for m in memories]


def stream_position(entry_id: str) -> tuple[int, int]:
    millis, sequence = entry_id.split("-")
    return int(millis), int(sequence)


def assert_each_group_in_queue_order_without_duplicates(memory: Memory, names: set[str]) -> None:
    episodes = memory.episodes()  # in ingestion order
    assert {e["name"] for e in episodes} == names and len(episodes) == len(names)
    positions = [stream_position(e["queue_id"]) for e in episodes]
    assert positions == sorted(positions), "ingested out of queue order"
    counts = Counter(e["name"] for e in memory.entities())
    assert counts["src/app/cache.py"] == 1 and counts["Valkey"] == 1 and counts["fetch_answer"] == 1
    assert max(counts.values()) == 1, counts


def test_a_burst_of_24_store_processes_at_one_second_per_llm_call_keeps_all_24(memory, standin):
    groups = [memory] + [Memory(memory.stack, f"{memory.group}_{i}", memory.spool_dir) for i in range(1, 4)]
    standin.faults(latency_ms=1000)
    try:
        names = burst(groups, per_group=6)
        for group, expected in zip(groups, names, strict=True):
            group.wait_until_ingested(6, timeout_s=240)
            assert_each_group_in_queue_order_without_duplicates(group, expected)
    finally:
        for group in groups[1:]:
            group.forget_queue()


def test_two_workers_share_two_groups_and_one_group_without_duplicates_and_in_order(memory):
    other = Memory(memory.stack, memory.group + "_b", memory.spool_dir)
    wait_for_no_worker(memory.stack)
    queued_only = [m.with_env(MEMORY_AUTO_DRAIN="off") for m in (memory, other)]
    try:
        names = burst(queued_only, per_group=5)
        workers = [memory.worker(), memory.worker()]
        try:
            memory.wait_until_ingested(5)
            other.wait_until_ingested(5)
        finally:
            assert [stop(w) for w in workers] == [0, 0]
        assert_each_group_in_queue_order_without_duplicates(memory, names[0])
        assert_each_group_in_queue_order_without_duplicates(other, names[1])
    finally:
        other.forget_queue()
