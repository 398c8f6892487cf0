"""`make bench-export`: export, backup and restore time and peak memory against graph size.

Builds synthetic graphs shaped like graphiti-core's (Entity nodes with 1024-dim name_embedding,
two RELATES_TO facts per entity with fact_embedding, one Episodic node per five entities with a
MENTIONS edge to each), then times the real CLI with GNU time: `export --output FILE`, `export`
(the backup: zstd to the stack's B2 endpoint), `restore FILE` and `restore b2://.../latest`, each
into an emptied FalkorDB. Floors measured in the same run: `DUMP` of the same graph key (native
binary, not portable; FalkorDB crashed on RESTORE of one, see README) and the CLI's own fixed
cost (`export` of an empty memory).

  python local/bench_export.py [--sizes 5000 50000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from stack import ROOT, Stack

MODULE = ROOT / "containers" / "opencode-server" / "graphiti" / "memory_manager.py"
BATCH = 500
# Vectors are computed server-side so that building a large graph ships no float text. They are
# random, as real embeddings are near-random floats: a patterned vector would compress 100x.
VECTOR = "vecf32([x IN range(0, 1023) | rand() - 0.5])"  # 1024 dimensions


def build_graph(db: redis.Redis, group: str, entities: int) -> None:
    def run(query: str) -> None:
        db.execute_command("GRAPH.QUERY", group, query)

    now = "'2026-11-24T00:00:00+00:00'"
    for start in range(0, entities, BATCH):
        end = min(entities, start + BATCH) - 1
        run(f"UNWIND range({start}, {end}) AS i CREATE (:Entity:Technology {{uuid: 'e' + toString(100000000 + i), "
            f"name: 'Entity ' + toString(i), group_id: '{group}', summary: 'synthetic entity ' + toString(i), "
            f"created_at: {now}, name_embedding: {VECTOR}}})")
    run("CREATE INDEX FOR (n:Entity) ON (n.uuid)")
    run("CREATE INDEX FOR (n:Episodic) ON (n.uuid)")
    wait_for_indexes(db, group)  # matching against an index still being built can return a node twice
    for start in range(0, entities, BATCH):
        end = min(entities, start + BATCH) - 1
        for offset in (1, 7):
            run(f"UNWIND range({start}, {end}) AS i MATCH (a:Entity {{uuid: 'e' + toString(100000000 + i)}}) "
                f"MATCH (b:Entity {{uuid: 'e' + toString(100000000 + (i + {offset}) % {entities})}}) "
                f"CREATE (a)-[:RELATES_TO {{uuid: 'r{offset}' + toString(100000000 + i), name: 'USES', "
                f"fact: a.name + ' uses ' + b.name, group_id: '{group}', episodes: [], created_at: {now}, "
                f"fact_embedding: {VECTOR}}}]->(b)")
    episodes = max(1, entities // 5)
    for start in range(0, episodes, BATCH):
        end = min(episodes, start + BATCH) - 1
        run(f"UNWIND range({start}, {end}) AS i CREATE (:Episodic {{uuid: 'p' + toString(100000000 + i), "
            f"name: 'episode_' + toString(i), group_id: '{group}', source: 'text', source_description: 'opencode', "
            f"content: 'Synthetic event ' + toString(i), entity_edges: [], created_at: {now}, valid_at: {now}, "
            f"content_embedding: {VECTOR}}})")
    for start in range(0, entities, BATCH):
        end = min(entities, start + BATCH) - 1
        run(f"UNWIND range({start}, {end}) AS i MATCH (p:Episodic {{uuid: 'p' + toString(100000000 + i / 5)}}) "
            f"MATCH (e:Entity {{uuid: 'e' + toString(100000000 + i)}}) "
            f"CREATE (p)-[:MENTIONS {{uuid: 'm' + toString(100000000 + i), group_id: '{group}', "
            f"created_at: {now}}}]->(e)")


def wait_for_indexes(db: redis.Redis, group: str) -> None:
    while any(status != b"OPERATIONAL" for _, status in db.execute_command(
            "GRAPH.RO_QUERY", group, "CALL db.indexes() YIELD label, status RETURN label, status")[1]):
        time.sleep(0.1)


def assert_no_duplicates(db: redis.Redis, group: str) -> None:
    for pattern in ("(n)", "()-[n]->()"):
        total, distinct = db.execute_command("GRAPH.RO_QUERY", group,
                                             f"MATCH {pattern} RETURN count(n), count(DISTINCT n.uuid)")[1][0]
        assert total == distinct, f"synthetic graph has duplicate uuids: {total} vs {distinct}"


def timed(env: dict[str, str], *args: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of one CLI run, from GNU time."""
    with tempfile.NamedTemporaryFile("r") as report:
        done = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%e %M", sys.executable, str(MODULE),
                               *args], env=env, check=True, stdout=subprocess.PIPE, text=True)
        seconds, kilobytes = report.read().split()
    return float(seconds), int(kilobytes) / 1024, done.stdout


def counts(db: redis.Redis, group: str) -> tuple[int, int]:
    nodes = db.execute_command("GRAPH.RO_QUERY", group, "MATCH (n) RETURN count(n)")[1][0][0]
    edges = db.execute_command("GRAPH.RO_QUERY", group, "MATCH ()-[e]->() RETURN count(e)")[1][0][0]
    return nodes, edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-bench-export-") as run_dir:
        stack = Stack(Path(run_dir))
        stack.start()
        try:
            env = {**os.environ, **stack.env()}
            db = redis.Redis(port=stack.ports["falkordb"], socket_timeout=900)  # DUMP of 50k: minutes
            document = Path(run_dir) / "export.json"
            empty_s, empty_mb, _ = timed(env, "export", "--output", str(document))
            for size in args.sizes:
                for graph in db.execute_command("GRAPH.LIST"):
                    db.execute_command("GRAPH.DELETE", graph)
                group = f"bench_{size}"
                build_graph(db, group, size)
                assert_no_duplicates(db, group)
                before = counts(db, group)
                started = time.perf_counter()
                db.dump(group)  # native binary serialisation: the floor a portable export is compared with
                row = {"size": size, "counts": before, "dump": time.perf_counter() - started}
                row["export"], row["export_mb"], _ = timed(env, "export", "--output", str(document))
                row["document_mb"] = document.stat().st_size / 1e6
                row["backup"], row["backup_mb"], out = timed(env, "export")  # to B2, zstd
                row["stored_mb"] = int(out.split(" bytes (zstd)")[0].rsplit(" ", 1)[1]) / 1e6
                db.execute_command("GRAPH.DELETE", group)
                row["restore"], row["restore_mb"], _ = timed(env, "restore", str(document))
                assert counts(db, group) == before, (counts(db, group), before)
                db.execute_command("GRAPH.DELETE", group)
                row["b2_restore"], row["b2_restore_mb"], _ = timed(env, "restore", "b2://opencode-memory/latest")
                assert counts(db, group) == before, (counts(db, group), before)
                rows.append(row)
                print(f"done {size}: {before}", file=sys.stderr)
        finally:
            stack.stop()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; fixed cost (export of an empty memory): "
          f"{empty_s:.2f} s, peak RSS {empty_mb:.0f} MB\n")
    print("| entities | nodes / edges | DUMP (floor) | export to file | backup to B2 (zstd) | restore from file | "
          "restore from B2 | document / stored | peak RSS export / backup / restore |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nodes, edges = r["counts"]
        ratio = [f"{r[k]:.1f} s ({r[k] / r['dump']:.0f}×)" for k in ("export", "backup", "restore", "b2_restore")]
        print(f"| {r['size']:,} | {nodes:,} / {edges:,} | {r['dump']:.2f} s | {' | '.join(ratio)} | "
              f"{r['document_mb']:.0f} MB / {r['stored_mb']:.0f} MB | "
              f"{r['export_mb']:.0f} / {r['backup_mb']:.0f} / {r['restore_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
