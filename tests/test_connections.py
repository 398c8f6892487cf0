"""Requirement: Connection URLs, users and TLS (spec: memory-manager / Connection URLs, users and TLS).

FalkorDB and Valkey as managed services hand them out: TLS only, an ACL user of their own and the
default user off (local/stack.py's SecuredServices: FalkorDB's module in Debian's valkey-server,
certificates made by the stack). The CLI runs against them for real; the OpenAI stand-in and the
local B2 endpoint are the session's.
"""

from urllib.parse import quote

import pytest
import redis

from conftest import valkey_services
from stack import SecuredServices

EDIT = "Edited src/server/routes.py to add retry logic around FalkorDB connections in connect_graph()."
PLAIN = dict.fromkeys(("FALKORDB_HOST", "FALKORDB_PORT", "VALKEY_HOST", "VALKEY_PORT"))


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    yield from valkey_services(SecuredServices, tmp_path_factory.mktemp("secured"), "TLS")


def over_tls(memory, secured, **changes):
    return memory.with_env(**{**PLAIN, **secured.env(), **changes})


def test_store_ingest_query_entities_export_and_restore_run_over_tls_with_acl_users(memory, secured, tmp_path):
    tls = over_tls(memory, secured)
    tls.store(EDIT)
    answer = tls.ok("query", "who touched the FalkorDB connection code")
    entities = tls.entities()
    document = tmp_path / "export.json"
    tls.ok("export", "--output", str(document))
    tls.ok("erase", "--group", memory.group, "--yes")
    emptied = tls.entities()

    restored = tls.ok("restore", str(document), "--replace", "--yes")

    assert "connect_graph" in answer and "routes.py" in answer
    assert {"name": "connect_graph", "type": "CodeSymbol"} in entities
    assert emptied == []
    assert restored.startswith("restored ")
    assert tls.entities() == entities
    assert tls.ok("query", "who touched the FalkorDB connection code") == answer
    graphs = redis.Redis(**secured.client_options("falkordb"))
    assert memory.group.encode() in graphs.execute_command("GRAPH.LIST")
    assert memory.graph_counts() == (0, 0)  # nothing reached the plain-TCP FalkorDB of the session


def test_health_over_tls_names_each_service_by_address_and_never_prints_a_password(memory, secured):
    result = over_tls(memory, secured).run("health")

    lines = result.stdout.splitlines()
    assert [line.split()[:3] for line in lines[:2]] == [
        ["falkordb", "ok", f"127.0.0.1:{secured.ports['falkordb']}"],
        ["valkey", "ok", f"127.0.0.1:{secured.ports['valkey']}"]]
    for password in secured.passwords.values():
        assert password not in result.stdout + result.stderr
        assert quote(password, safe="") not in result.stdout + result.stderr


@pytest.mark.parametrize(("service", "command"), [("falkordb", "entities"), ("valkey", "queue")])
def test_a_wrong_ca_is_exit_1_naming_the_service_and_the_certificate(memory, secured, service, command):
    tls = over_tls(memory, secured, **{f"{service.upper()}_TLS_CA_FILE": str(secured.certificates["wrong_ca"])})

    result = tls.run(command)

    assert (result.code, result.stdout) == (1, "")
    [line] = result.error_lines
    assert line.startswith(f"memory-manager: error: {service} at 127.0.0.1:{secured.ports[service]}: ")
    assert "certificate verify failed" in line


@pytest.mark.parametrize("service", ["falkordb", "valkey"])
def test_a_wrong_password_is_exit_1_naming_the_service_and_printing_no_password(memory, secured, service):
    changes = ({"FALKORDB_URL": f"falkors://falkordb:not-it@127.0.0.1:{secured.ports['falkordb']}"}
               if service == "falkordb" else {"VALKEY_PASSWORD": "not-it"})
    command = "entities" if service == "falkordb" else "queue"

    result = over_tls(memory, secured, **changes).run(command)

    assert result.code == 1
    [line] = result.error_lines
    assert line.startswith(f"memory-manager: error: {service} at 127.0.0.1:{secured.ports[service]}: ")
    assert "not-it" not in line and secured.passwords[service] not in line


def test_valkey_by_unix_socket_with_its_acl_user_queues_and_reports(memory, secured):
    socket_only = over_tls(memory, secured, VALKEY_URL=f"unix://{secured.valkey_socket}", VALKEY_TLS_CA_FILE=None,
                           VALKEY_TLS_CERT_FILE=None, VALKEY_TLS_KEY_FILE=None, MEMORY_AUTO_DRAIN="off")

    queued = socket_only.ok("store", EDIT)
    status = socket_only.run("health")

    assert queued.startswith("queued episode_")
    assert f"valkey    ok    {secured.valkey_socket}" in status.stdout
    assert redis.Redis(**secured.client_options("valkey")).xlen(f"memory:{{{memory.group}}}:episodes") == 1


@pytest.mark.parametrize(("changes", "message"), [
    ({"FALKORDB_URL": "http://user:hunter2@db:6379"},
     "FALKORDB_URL must start with falkor://, falkors://, redis://, rediss://, unix://, got 'http://db:6379'"),
    ({"VALKEY_URL": "memcached://cache:11211"},
     "VALKEY_URL must start with redis://, rediss://, valkey://, valkeys://, unix://, got 'memcached://cache:11211'"),
    ({"VALKEY_URL": "valkeys://user:hunter2@cache:port"}, "VALKEY_URL has a malformed port: 'valkeys://cache:port'"),
    ({"FALKORDB_URL": "falkors://:hunter2@"}, "FALKORDB_URL needs a host: 'falkors://'"),
    ({"VALKEY_URL": "unix://"}, "VALKEY_URL: a unix:// URL needs the socket's path (unix:///run/valkey.sock)"),
    ({"FALKORDB_TLS_CA_FILE": "/nonexistent/ca.crt"}, "FALKORDB_TLS_CA_FILE: no such file /nonexistent/ca.crt"),
    ({"VALKEY_TLS_CA_FILE": __file__},
     "VALKEY_TLS_CA_FILE needs TLS: set VALKEY_URL to a rediss:// or valkeys:// URL"),
    ({"VALKEY_URL": "valkeys://cache:6380", "VALKEY_TLS_CERT_FILE": __file__},
     "VALKEY_TLS_CERT_FILE and VALKEY_TLS_KEY_FILE go together (a client certificate)"),
    ({"VALKEY_URL": "unix:///run/valkey.sock", "VALKEY_CLUSTER": "on"},
     "VALKEY_CLUSTER=on needs a host and port, not a unix socket (a cluster's nodes are found by address)"),
], ids=["falkordb-scheme", "valkey-scheme", "port", "host", "unix-path", "missing-file", "tls-file-plain-url",
        "cert-without-key", "cluster-on-a-socket"])
def test_a_malformed_connection_setting_is_exit_2_naming_it_and_never_its_password(memory, changes, message):
    result = memory.with_env(**changes).run("query", "anything")

    assert (result.code, result.stdout) == (2, "")
    assert result.error_lines == [f"memory-manager: error: {message}"]
    assert "hunter2" not in result.stderr


def test_cluster_mode_against_a_plain_valkey_spools_the_event_answers_from_falkordb_and_names_the_address(memory):
    """Attack round three, item 8: the store exited 1 without spooling, and the line named no address."""
    clustered = memory.with_env(VALKEY_CLUSTER="on")
    address = f"127.0.0.1:{memory.stack.ports['valkey']}"

    stored, answered, health = (clustered.run("store", EDIT), clustered.run("query", "anything"),
                                clustered.run("health"))

    assert stored.code == 0 and stored.stdout.startswith("spooled "), stored.stderr
    assert f"valkey at {address}: not a cluster node" in stored.stderr
    assert answered.code == 0 and f"valkey at {address}: not a cluster node" in answered.stderr
    assert health.code == 1 and "not a cluster node" in health.stdout
    name = stored.stdout.split()[1]
    memory.store("Then the cluster setting was fixed.")  # a plain store moves the spool into the queue
    assert name in [e["name"] for e in memory.episodes()]
