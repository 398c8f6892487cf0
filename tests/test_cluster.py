"""Requirement: Valkey Cluster (spec: memory-manager / Valkey Cluster).

The queue, the cache and the leases on a real Valkey cluster: three masters, each with a replica
that takes over when its master dies (local/stack.py's ValkeyCluster). FalkorDB, the OpenAI
stand-in and the local B2 endpoint are the session's.
"""

import functools
import itertools

import pytest
import redis

from conftest import Memory, stop, valkey_services
from stack import ValkeyCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from valkey_services(ValkeyCluster, tmp_path_factory.mktemp("cluster"), "a cluster")


def on_cluster(memory: Memory, cluster: ValkeyCluster, group: str) -> Memory:
    return Memory(memory.stack, group, memory.spool_dir).with_env(**cluster.env())


def groups_on_masters(cluster: ValkeyCluster, prefix: str, masters: list[int]) -> list[str]:
    """One group name per master given, each group's keys on that master."""
    chosen: dict[int, str] = {}
    for n in itertools.count():
        group = f"{prefix[:50]}_{n}"
        chosen.setdefault(cluster.master_of(f"memory:{{{group}}}:episodes"), group)
        if all(master in chosen for master in masters):
            return [chosen[master] for master in masters]
    raise AssertionError("unreachable")


def keys_of(cluster: ValkeyCluster, group: str) -> list[str]:
    """The group's keys on every live node."""
    found = []
    for port in cluster.masters():
        with redis.Redis(port=port, decode_responses=True) as node:
            found += node.keys(f"memory:{{{group}}}:*")
    return sorted(found)


def test_groups_on_every_master_store_ingest_recall_from_the_cache_and_erase(memory, cluster, standin):
    masters = sorted(cluster.masters())
    groups = groups_on_masters(cluster, memory.group, masters)
    users = [on_cluster(memory, cluster, group) for group in groups]
    for i, user in enumerate(users):
        user.store(f"Erin edited src/app_{i}.py in {user.group} to call Valkey through fetch_answer_{i}().")

    first = [user.ok("query", "who edited the app") for user in users]
    asked = standin.requests()
    again = [user.ok("query", "who edited the app") for user in users]
    erased = users[0].ok("erase", "--group", groups[0], "--yes")

    assert [f"src/app_{i}.py" in answer for i, answer in enumerate(first)] == [True] * 3
    assert again == first and standin.requests() == asked  # the cache answered: no embedding asked for
    assert erased.startswith(f"erased group {groups[0]}: ")
    assert keys_of(cluster, groups[0]) == []
    for master, group in zip(masters[1:], groups[1:], strict=True):
        with redis.Redis(port=master, decode_responses=True) as node:
            assert node.keys(f"memory:{{{group}}}:answer:*"), f"{group}'s cached answer is not on its master"
    assert [user.ok("query", "who edited the app") for user in users[1:]] == first[1:]


def test_a_master_killed_during_a_burst_fails_over_and_every_event_is_stored_exactly_once(memory, cluster, standin):
    standin.faults(latency_ms=200)  # the worker is mid-episode, its entries pending, when the master dies
    startup = int(cluster.env()["VALKEY_PORT"])
    [group] = groups_on_masters(cluster, memory.group, [next(p for p in sorted(cluster.masters()) if p != startup)])
    user = on_cluster(memory, cluster, group).with_env(MEMORY_AUTO_DRAIN="off")
    worker = user.worker()
    states, jobs = [], []
    try:
        for i in range(12):
            if i == 4:
                cluster.kill(cluster.master_of(f"memory:{{{group}}}:episodes"))
            state, _, job = user.ok("store", f"Event {i}: Dana ran the test suite of module_{i}.").split()
            states.append(state)
            jobs.append(job)
        cluster.wait_healthy()
        standin.faults(latency_ms=0)
        user.wait_until_ingested(12, timeout_s=240)
    finally:
        stop(worker)

    assert set(states) <= {"queued", "spooled"}
    assert sorted(e["job_id"] for e in user.episodes()) == sorted(jobs)  # every event, none twice
    assert (user.queue()["queued"], user.queue()["dead_letters"]) == (0, 0)


@pytest.fixture(scope="module")
def graph_cluster(tmp_path_factory):
    yield from valkey_services(functools.partial(ValkeyCluster, graphs=True), tmp_path_factory.mktemp("graphs"),
                               "a FalkorDB cluster")


def test_groups_on_every_shard_of_a_falkordb_cluster_store_recall_export_erase_and_restore(memory, graph_cluster,
                                                                                        tmp_path):
    on_graphs = {"FALKORDB_HOST": "127.0.0.1", "FALKORDB_PORT": str(graph_cluster.ports[0])}
    groups = groups_on_masters(graph_cluster, memory.group, sorted(graph_cluster.masters()))
    users = [Memory(memory.stack, group, memory.spool_dir).with_env(**on_graphs) for group in groups]
    for i, user in enumerate(users):
        user.store(f"Erin edited src/app_{i}.py in {user.group} to call Valkey through fetch_answer_{i}().")
    entities = [user.entities() for user in users]
    document = tmp_path / "export.json"

    exported = users[0].ok("export", "--output", str(document))
    erased = users[1].ok("erase", "--group", groups[1], "--yes")
    gone = users[1].entities()
    restored = users[1].ok("restore", str(document), "--replace", "--yes")
    health = users[0].run("health")

    assert [any(e["name"] == f"src/app_{i}.py" for e in found) for i, found in enumerate(entities)] == [True] * 3
    assert exported.startswith(f"exported {len(groups)} group(s), ")  # every shard's graphs, none missed
    assert erased.startswith(f"erased group {groups[1]}: ") and gone == []
    assert restored.startswith(f"restored {len(groups)} group(s), ")
    assert [user.entities() for user in users] == entities
    assert "src/app_2.py" in users[2].ok("query", "who edited the app")
    assert "graph(s) on this node of a cluster" in health.stdout.splitlines()[0]
