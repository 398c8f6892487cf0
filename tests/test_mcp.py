"""Requirement: MCP server (spec: memory-manager / MCP server, MCP over HTTP). Driven by the
official `mcp` Python SDK client over stdio and streamable HTTP, and by the MCP Inspector's CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import MCP_TOKEN as TOKEN
from conftest import MODULE, ROOT, Memory, free_port, mcp_http_server

NOTE = "Decided to keep FalkorDB as the graph store; Valkey holds the write queue for MemoryWorker."

# The schemas a model sees: pinned, so a change to a tool's arguments is deliberate.
INPUT_SCHEMAS = {
    "add_memory": ({"content"}, {"content": "string", "metadata": "object|null", "at": "string|null",
                                 "group_id": "string|null", "name": "string|null", "source": "string|null",
                                 "source_description": "string|null"}),
    "search_memory_facts": ({"query"}, {"query": "string", "limit": "integer", "group_ids": "array|null",
                                        "center_node_uuid": "string|null"}),
    "get_context": ({"query"}, {"query": "string", "budget_tokens": "integer", "recent": "integer|null",
                                "group_ids": "array|null"}),
    "search_memory_index": ({"query"}, {"query": "string", "limit": "integer", "group_ids": "array|null"}),
    "get_memories": ({"ids"}, {"ids": "array", "group_ids": "array|null"}),
    "search_nodes": ({"query"}, {"query": "string", "max_nodes": "integer|null", "group_ids": "array|null",
                                 "entity_types": "array|null", "center_node_uuid": "string|null"}),
    "search_entities": (set(), {"query": "string|null", "entity_type": "string|null", "max_nodes": "integer|null",
                                "group_ids": "array|null"}),
    "get_episodes": (set(), {"last_n": "integer", "since": "string|null", "group_ids": "array|null"}),
    "get_episode": ({"uuid"}, {"uuid": "string", "group_ids": "array|null"}),
    "get_entity_edge": ({"uuid"}, {"uuid": "string", "group_ids": "array|null"}),
    "delete_episode": ({"name"}, {"name": "string", "group_ids": "array|null"}),
    "delete_entity_edge": ({"uuid"}, {"uuid": "string", "group_ids": "array|null"}),
    "correct_fact": ({"uuid", "fact"}, {"uuid": "string", "fact": "string", "group_ids": "array|null"}),
    "clear_graph": (set(), {"group_ids": "array|null"}),
    "get_status": (set(), {}),
}
# What a client may ask before calling (readOnlyHint, destructiveHint).
ANNOTATIONS = {"add_memory": (False, False), "delete_episode": (False, True), "search_memory_facts": (True, None),
               "get_context": (True, None), "search_entities": (True, None), "search_nodes": (True, None),
               "search_memory_index": (True, None), "get_memories": (True, None),
               "get_episodes": (True, None),
               "get_episode": (True, None), "get_entity_edge": (True, None), "delete_entity_edge": (False, True),
               "correct_fact": (False, False), "clear_graph": (False, True), "get_status": (True, None)}


def schema_types(schema: dict) -> dict[str, str]:
    def kind(prop: dict) -> str:
        if "anyOf" in prop:
            return "|".join(option.get("type", "?") for option in prop["anyOf"])
        return prop.get("type", "?")

    return {name: kind(prop) for name, prop in schema.get("properties", {}).items()}


def stdio_client(memory: Memory) -> Client:
    return Client(StdioServerParameters(command=sys.executable, args=[str(MODULE), "mcp"], env=memory.env),
                  cache=None)


@asynccontextmanager
async def http_client(url: str, token: str = TOKEN) -> AsyncIterator[Client]:
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http, \
            Client(streamable_http_client(url, http_client=http), cache=None) as client:
        yield client


def text_of(result: Any) -> str:
    return "".join(block.text for block in result.content)


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    return result


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_stdio_server_offers_its_tools_with_pinned_input_schemas_and_instructions(memory):
    async def scenario() -> tuple[Any, Any]:
        async with stdio_client(memory) as client:
            return client.instructions, await client.list_tools()

    instructions, listed = run(scenario())

    assert "Long-term memory of this project" in instructions
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == set(INPUT_SCHEMAS)
    for name, (required, types) in INPUT_SCHEMAS.items():
        schema = tools[name].input_schema
        assert set(schema.get("required", [])) == required, name
        assert schema_types(schema) == types, name
        assert schema["additionalProperties"] is False, name
        hints = tools[name].annotations
        assert (hints.read_only_hint, hints.destructive_hint) == ANNOTATIONS[name], name
        assert len(tools[name].description) > 60, name  # written for a model deciding when to call it


def test_stdio_tools_store_recall_list_and_delete_with_the_cli_s_results(memory):
    async def store() -> Any:
        async with stdio_client(memory) as client:
            return await call(client, "add_memory", content=NOTE, metadata={"event": "decision"})

    added = run(store())
    assert added.structured_content["state"] == "queued"
    assert re.fullmatch(r"queued episode_\d{8}T\d{12}Z [0-9a-f]{32}", text_of(added))
    memory.wait_until_ingested(1)
    cli_text = memory.ok("query", "graph store write queue").rstrip("\n")
    cli_results = json.loads(memory.ok("query", "graph store write queue", "--json"))["results"]
    cli_technologies = memory.entities("Technology")
    cli_first = json.loads(memory.ok("query", "graph store write queue", "--json", "--limit", "1"))["results"]
    cli_entities = memory.entities()

    async def read_and_delete() -> dict[str, Any]:
        async with stdio_client(memory) as client:
            found = await call(client, "search_memory_facts", query="graph store write queue")
            as_graphiti = await call(client, "search_memory_facts", query="graph store write queue", max_facts=1,
                                     group_ids=[memory.group])
            one_entity = await call(client, "search_entities", max_nodes=1)
            entities = await call(client, "search_entities", query="falkor")
            typed = await call(client, "search_entities", entity_type="Technology")
            episodes = await call(client, "get_episodes", last_n=5)
            status = await call(client, "get_status")
            deleted = await call(client, "delete_episode", name=added.structured_content["episode"])
            after = await call(client, "search_memory_facts", query="graph store write queue")
            return {"found": found, "as_graphiti": as_graphiti, "one_entity": one_entity,
                    "entities": entities, "typed": typed, "episodes": episodes,
                    "status": status, "deleted": deleted, "after": after}

    results = run(read_and_delete())

    assert text_of(results["found"]) == cli_text
    assert results["found"].structured_content["results"] == cli_results and cli_results
    assert results["as_graphiti"].structured_content["results"] == cli_first and cli_first
    assert results["one_entity"].structured_content["entities"] == cli_entities[:1] and len(cli_entities) > 1
    assert results["entities"].structured_content["entities"] == [{"name": "FalkorDB", "type": "Technology"}]
    assert results["typed"].structured_content["entities"] == cli_technologies
    [episode] = results["episodes"].structured_content["episodes"]
    assert (episode["name"], episode["content"], episode["metadata"]) == \
        (added.structured_content["episode"], NOTE, {"event": "decision"})
    assert episode["reference_time"].startswith(time.strftime("%Y-%m-%d", time.gmtime()))
    assert results["status"].structured_content["health"]["healthy"] is True
    assert results["after"].structured_content["results"] == []  # the cached answer was invalidated
    assert memory.episode_count() == 0


def test_the_compact_index_gives_a_line_per_memory_and_get_memories_opens_them_by_short_id(memory):
    """Issue 37 item 8: an agent reads a line per memory and opens only what it needs."""
    memory.store("Chose FalkorDB over Neo4j for the graph store: it runs as a Redis module we already operate.")
    memory.store("The nightly export to Backblaze B2 failed twice because the application key had expired.")

    async def browse() -> tuple[Any, Any]:
        async with stdio_client(memory) as client:
            index = await call(client, "search_memory_index", query="graph store choice Neo4j", limit=5)
            first = text_of(index).splitlines()[0].split()[0]
            return index, await call(client, "get_memories", ids=[first])

    index, opened = run(browse())

    lines = text_of(index).splitlines()
    assert all(re.fullmatch(r"[0-9a-f]{8} \d{4}-\d\d-\d\d (episode|fact): .{1,100}", line) for line in lines), lines
    assert "Chose FalkorDB over Neo4j" in lines[0]
    [chosen] = opened.structured_content["memories"]
    assert chosen["kind"] == "episode" and chosen["uuid"].startswith(lines[0][:8])
    assert re.match(rf"{lines[0][:8]} \d{{4}}-\d\d-\d\d \d\d:\d\d UTC: Chose FalkorDB over Neo4j for the graph store: "
                    "it runs as a Redis module we already operate.", text_of(opened)), text_of(opened)


def test_private_text_given_to_add_memory_never_reaches_the_queue(memory, valkey):
    """Issue 37 item 4: <private> spans are cut before anything is queued, on the MCP path too."""
    canary = f"private-canary-{time.monotonic_ns()}"
    queued_only = memory.with_env(MEMORY_AUTO_DRAIN="off")

    async def add() -> Any:
        async with stdio_client(queued_only) as client:
            return await call(client, "add_memory", content=f"Paired with Dana on the export. <private>{canary}"
                              "</private> Shipped it.", metadata={"note": f"<private>{canary}</private> kept out"})

    assert run(add()).structured_content["state"] == "queued"
    [(_, entry)] = valkey.xrange(f"memory:{{{memory.group}}}:episodes")
    assert entry["content"] == "Paired with Dana on the export. [REDACTED:private] Shipped it."
    assert canary not in json.dumps(entry)


@pytest.mark.parametrize(("tool", "arguments", "message"), [
    ("add_memory", {"content": "   "}, "content must be non-empty text"),
    ("add_memory", {"content": "<private>all of it</private>"}, "content is empty once its <private> spans"),
    ("add_memory", {"content": "x" * 100_001}, "MEMORY_MAX_EPISODE_CHARS allows 100000"),
    ("search_memory_facts", {"query": ""}, "query must be non-empty text"),
    ("search_memory_facts", {"query": "x", "limit": 0}, "limit must be"),
    ("search_memory_facts", {"query": "x", "limit": "many"}, "limit"),
    ("search_entities", {"entity_type": "File) DETACH DELETE n //"}, "entity type"),
    ("get_episodes", {"last_n": 0}, "last_n must be an integer from 1 to 100"),
    ("delete_episode", {"name": "' OR 1=1"}, "an episode is named like episode_20261124T101500123456Z or by its"),
    ("delete_episode", {"name": "episode_20200101T000000000000Z"}, "no episode episode_20200101T000000000000Z"),
    # Graphiti's argument names mean ours; the SDK alone would drop an unknown one and answer anyway
    ("delete_episode", {"uuid": "00000000-0000-4000-8000-000000000000"},
     "no episode 00000000-0000-4000-8000-000000000000"),
    ("search_memory_facts", {"query": "x", "center_node_uuid": "u"},
     "search_memory_facts does not rank by distance to an entity (center_node_uuid): put the entity's name in"),
    ("search_memory_facts", {"query": "x", "centre": "u"},
     "search_memory_facts does not take centre (it takes center_node_uuid, group_ids, limit, max_facts, query)"),
    ("search_nodes", {"query": "x", "entity_types": ["File", "Person"]}, "search_nodes takes one entity type"),
    ("search_memory_facts", {"query": "x", "max_facts": 0}, "limit must be an integer from 1 to 50, got 0"),
    ("get_episodes", {"max_episodes": 0}, "last_n must be an integer from 1 to 100"),
    ("search_memory_facts", {"max_facts": 3}, "search_memory_facts needs query"),
    ("search_memory_facts", {"query": "x", "limit": 2, "max_facts": 3}, "give max_facts or limit, not both"),
    ("search_memory_facts", {"query": "x", "group_ids": ["someone-else"]}, "group_ids 'someone-else' refused"),
    ("get_context", {"query": "x", "group_ids": "mine"}, "group_ids must be a list of group names"),
    ("search_entities", {"max_nodes": 0}, "max_nodes must be an integer from 1 to 10000"),
    ("get_status", {"verbose": True}, "get_status does not take verbose (it takes no arguments)"),
    ("get_episode", {}, "get_episode needs uuid"),
    ("get_entity_edge", {"uuid": "00000000-0000-4000-8000-000000000000"}, "no fact 00000000-0000-4000-8000-"),
    ("correct_fact", {"uuid": "00000000-0000-4000-8000-000000000000", "fact": ""}, "the corrected fact is empty"),
    ("delete_entity_edge", {"uuid": "x"}, "a fact is named by its uuid"),
    ("clear_graph", {"group_ids": ["someone-else"]}, "group_ids 'someone-else' refused"),
    ("get_memories", {"ids": []}, "ids must be a list of 1 to 20 memory ids"),
    ("get_memories", {"ids": ["zz' OR 1=1"]}, "a memory id is a uuid or its first 8 characters"),
    ("get_memories", {"ids": ["0000abcd"]}, "no memory 0000abcd in group"),
    ("search_memory_index", {"query": "x", "limit": 51}, "limit must be an integer from 1 to 50"),
    # attack round three, item 7: a name with a newline forged log lines; a 3 MB one filled the log
    ("get_context", {"query": "x", "group_ids": ["a\nwarning: forged"]}, "is not a group name"),
    ("get_context", {"query": "x", "group_ids": ["g" * 3_000_000]}, f"{'g' * 64!r} is not a group name"),
], ids=lambda value: value if isinstance(value, str) and len(value) < 25 else None)
def test_a_refused_argument_is_a_tool_error_and_the_server_keeps_answering(memory, tool, arguments, message):
    async def scenario() -> tuple[Any, Any]:
        async with stdio_client(memory) as client:
            refused = await client.call_tool(tool, arguments)
            return refused, await call(client, "get_status")

    refused, status = run(scenario())

    assert refused.is_error
    assert message in text_of(refused)
    assert "\n" not in text_of(refused) and "Traceback" not in text_of(refused)
    assert status.structured_content["health"]["healthy"] is True
    assert memory.queue()["queued"] == 0


def test_calls_written_for_graphiti_s_own_mcp_server_store_and_search_with_its_meaning(memory):
    """Issue 37 item 7: prompts written for Graphiti's MCP server call add_memory with name,
    episode_body, source and source_description, and search_nodes; as Graphiti documents them."""
    async def scenario() -> dict[str, Any]:
        async with stdio_client(memory) as client:
            added = await call(client, "add_memory", name="Graph store decision", episode_body=NOTE, source="text",
                               source_description="architecture review", group_id=memory.group)
            memory.wait_until_ingested(1)
            return {"added": added,
                    "nodes": await call(client, "search_nodes", query="FalkorDB", max_nodes=5,
                                        group_ids=[memory.group]),
                    "facts": await call(client, "search_memory_facts", query="graph store", max_facts=3,
                                        group_ids=[memory.group]),
                    "episodes": await call(client, "get_episodes", max_episodes=1)}

    results = run(scenario())

    [episode] = results["episodes"].structured_content["episodes"]
    assert episode["content"] == NOTE
    assert episode["metadata"] == {"name": "Graph store decision", "source": "text",
                                   "source_description": "architecture review"}
    assert "FalkorDB" in [e["name"] for e in results["nodes"].structured_content["entities"]]
    assert "FalkorDB" in text_of(results["facts"])


def test_stdio_tools_show_correct_and_forget_a_fact_as_the_cli_does(memory):
    memory.store(NOTE)
    [listed] = json.loads(memory.ok("episodes", "--json"))
    cli_episode = json.loads(memory.ok("episode", listed["uuid"], "--json"))
    fact = cli_episode["facts"][0]

    async def scenario() -> dict[str, Any]:
        async with stdio_client(memory) as client:
            episodes = await call(client, "get_episodes", since="2020-01-01T00:00:00Z")
            episode = await call(client, "get_episode", uuid=listed["uuid"])
            edge = await call(client, "get_entity_edge", uuid=fact["uuid"])
            corrected = await call(client, "correct_fact", uuid=fact["uuid"], fact="FalkorDB stays the graph store.")
            new = corrected.structured_content["fact"]["uuid"]
            after = await call(client, "search_memory_facts", query="graph store", limit=10)
            deleted = await call(client, "delete_entity_edge", uuid=new)
            gone = await client.call_tool("get_entity_edge", {"uuid": new})
            return {"episodes": episodes, "episode": episode, "edge": edge, "corrected": corrected, "after": after,
                    "deleted": deleted, "gone": gone, "new": new}

    got = run(scenario())

    assert got["episodes"].structured_content["episodes"] == [listed]
    assert got["episode"].structured_content == cli_episode
    assert got["edge"].structured_content == fact and text_of(got["edge"]) == fact["fact"]
    assert got["corrected"].structured_content["invalidated"]["invalid_at"] is not None
    recalled = [u for r in got["after"].structured_content["results"] for u in [r["uuid"]] + [
        f["uuid"] for f in r["facts"]]]  # an event carries the facts recalled with it
    assert got["new"] in recalled and fact["uuid"] not in recalled
    assert got["deleted"].structured_content["deleted"]["uuid"] == got["new"]
    assert got["gone"].is_error and text_of(got["gone"]).endswith(f": no fact {got['new']} in group {memory.group}")
    history = json.loads(memory.ok("query", "graph store", "--history", "--scope", "facts", "--json"))["results"]
    assert fact["uuid"] in [r["uuid"] for r in history]  # the corrected fact is kept as history


NO_SUCH_UUID = "00000000-0000-4000-8000-000000000000"


def test_one_http_server_serves_two_tokens_each_only_within_its_groups(memory):
    other = Memory(memory.stack, f"b_{memory.group[-20:]}", memory.spool_dir)
    spare = f"c_{memory.group[-20:]}"
    memory.store(NOTE)
    other.store("Bob moved the CI to GitHub Actions runners.")
    [theirs] = json.loads(other.ok("episodes", "--json"))
    first, second = "token-for-alpha-0c1d2e", "token-for-beta-9f8e7d"
    scopes = f"{first}={memory.group};{second}={other.group},{spare}"
    before = (memory.graph_counts(), other.graph_counts())

    with mcp_http_server(memory, MEMORY_MCP_TOKENS=scopes) as (url, server):
        async def scenario() -> dict[str, Any]:
            async with http_client(url, first) as alpha, http_client(url, second) as beta:
                return {
                    "alpha": await call(alpha, "search_memory_facts", query="graph store"),
                    "alpha_asks_beta": await alpha.call_tool("search_memory_facts", {
                        "query": "CI", "group_ids": [other.group]}),
                    "alpha_reads_beta_uuid": await alpha.call_tool("get_episode", {"uuid": theirs["uuid"]}),
                    "alpha_deletes_beta_uuid": await alpha.call_tool("delete_episode", {"uuid": theirs["uuid"]}),
                    "alpha_reads_no_uuid": await alpha.call_tool("get_episode", {"uuid": NO_SUCH_UUID}),
                    "alpha_deletes_no_uuid": await alpha.call_tool("delete_episode", {"uuid": NO_SUCH_UUID}),
                    "beta": await call(beta, "search_memory_facts", query="CI runners"),
                    "beta_spare": await call(beta, "get_context", query="CI runners", group_ids=[spare]),
                    "beta_reads_own_uuid": await call(beta, "get_episode", uuid=theirs["uuid"]),
                    "beta_adds_to_spare": await call(beta, "add_memory", content="Spare note.", group_id=spare),
                    "beta_two_groups": await beta.call_tool("search_memory_facts", {
                        "query": "CI", "group_ids": [other.group, spare]}),
                    "alpha_status": await call(alpha, "get_status"),
                }

        got = run(scenario())
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=15)

    assert "graph store" in text_of(got["alpha"]).lower()
    assert text_of(got["alpha_asks_beta"]).endswith(f": this token may use group(s) {memory.group!r} only; group_ids "
                                                      f"{other.group!r} refused")
    # risk of attack round three: the refusal told a token that the uuid exists in another group
    for action in ("reads", "deletes"):
        refused, missing = text_of(got[f"alpha_{action}_beta_uuid"]), text_of(got[f"alpha_{action}_no_uuid"])
        assert refused.replace(theirs["uuid"], NO_SUCH_UUID) == missing and f"in group {memory.group}" in missing
    assert all(got[k].is_error for k in ("alpha_asks_beta", "alpha_reads_beta_uuid", "alpha_deletes_beta_uuid"))
    assert "GitHub Actions" in text_of(got["beta"])
    assert got["beta_spare"].structured_content["group"] == spare
    assert got["beta_reads_own_uuid"].structured_content["content"] == theirs["content"]
    assert got["beta_adds_to_spare"].structured_content["group"] == spare
    assert text_of(got["beta_two_groups"]).endswith(": give one group per call (group_ids names 2)")
    # attack round three, item 4: a token's status named every group with work, dead letters and errors
    status = json.dumps(got["alpha_status"].structured_content)
    assert other.group not in status and spare not in status and "graph(s)" not in status
    assert {row["group"] for row in got["alpha_status"].structured_content["queue"]["groups"]} <= {memory.group}
    assert (memory.graph_counts(), other.graph_counts()) == before
    refusals = [line for line in log.splitlines() if "outside its scope" in line]
    assert len(refusals) == 3, log
    assert not any(secret in log for secret in (first, second, NOTE, theirs["content"], "CI"))
    Memory(memory.stack, spare, memory.spool_dir).forget_queue()
    other.forget_queue()


@pytest.mark.parametrize(("scopes", "message"), [
    ("just-a-token", "MEMORY_MCP_TOKENS: entry 1 must be TOKEN=GROUP[,GROUP...] (the token shown nowhere)"),
    ("t1=alpha;t2=no way", "MEMORY_MCP_TOKENS: entry 2: group 'no way' must match"),
    ("t1=alpha;t1=beta", "MEMORY_MCP_TOKENS: a token is listed twice"),
    ("@/nonexistent/tokens", "MEMORY_MCP_TOKENS: cannot read /nonexistent/tokens (No such file or directory)"),
], ids=["no-groups", "bad-group", "twice", "missing-file"])
def test_a_malformed_token_map_is_refused_at_start_without_showing_a_token(memory, scopes, message):
    result = memory.with_env(MEMORY_MCP_TOKENS=scopes).run("mcp", "--http", f"127.0.0.1:{free_port()}", timeout_s=30)

    assert result.code == 2
    assert len(result.error_lines) == 1 and message in result.error_lines[0], result.stderr
    assert "t1" not in result.stderr.replace(message, "") and "just-a-token" not in result.stderr


def test_a_token_map_file_scopes_the_server_like_the_variable(memory, tmp_path):
    listed = tmp_path / "tokens"
    listed.write_text(f"# who may use what\nfile-token-1a2b3c = {memory.group}  # alpha\n")
    listed.chmod(0o644)  # readable by others (as Docker secrets are): served, with a warning
    memory.store(NOTE)
    with mcp_http_server(memory, MEMORY_MCP_TOKENS=f"@{listed}") as (url, server):
        async def scenario() -> Any:
            async with http_client(url, "file-token-1a2b3c") as client:
                return await call(client, "get_context", query="graph store")

        found = run(scenario())
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=15)

    assert found.structured_content["group"] == memory.group and "FalkorDB" in text_of(found)
    assert f"warning: MEMORY_MCP_TOKENS: other users can read {listed} (chmod 600 it)" in log


def test_a_token_map_file_others_can_write_is_refused_at_start(memory, tmp_path):
    """Risk of attack round three: anyone who can write the file can add a token for any group."""
    listed = tmp_path / "tokens"
    listed.write_text(f"file-token-1a2b3c = {memory.group}\n")
    listed.chmod(0o666)

    result = memory.with_env(MEMORY_MCP_TOKENS=f"@{listed}").run("mcp", "--http", f"127.0.0.1:{free_port()}",
                                                                 timeout_s=30)

    assert (result.code, result.error_lines) == (2, [f"memory-manager: error: MEMORY_MCP_TOKENS: {listed} may be "
                                                     "changed by another user (mode 0666, owner uid "
                                                     f"{os.geteuid()}); make it 0600 and yours"])


def test_http_needs_the_bearer_token_and_then_serves_what_stdio_serves(memory):
    memory.store(NOTE)
    with mcp_http_server(memory) as (url, _server):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            request = urllib.request.Request(url, data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json", **headers})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=5)
            refused.value.close()
            assert refused.value.code == 401

        async def scenario() -> tuple[Any, Any]:
            async with http_client(url) as client:
                tools = await client.list_tools()
                return tools, await call(client, "search_memory_facts", query="graph store")

        tools, found = run(scenario())

    assert {tool.name for tool in tools.tools} == set(INPUT_SCHEMAS)
    assert text_of(found) == memory.ok("query", "graph store").rstrip("\n")


def open_session(url: str, session: str | None = None, method: str = "initialize",
                 source: str | None = None) -> tuple[int, str | None]:
    """One raw JSON-RPC request, from `source` (a loopback address) if given: (HTTP status, the
    session id the server gave or kept)."""
    if source is not None:
        return open_session_from(source, url, session, method)
    params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "flood", "version": "1"}}
    body = {"jsonrpc": "2.0", "id": 1, "method": method, **({"params": params} if method == "initialize" else {})}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Authorization": f"Bearer {TOKEN}", **({"mcp-session-id": session} if session else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers.get("mcp-session-id")
    except urllib.error.HTTPError as refused:
        refused.close()
        return refused.code, None


def open_session_from(source: str, url: str, session: str | None, method: str) -> tuple[int, str | None]:
    import http.client
    from urllib.parse import urlsplit

    params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "flood", "version": "1"}}
    body = {"jsonrpc": "2.0", "id": 1, "method": method, **({"params": params} if method == "initialize" else {})}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Authorization": f"Bearer {TOKEN}", **({"mcp-session-id": session} if session else {})}
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request("POST", parts.path, json.dumps(body), headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status, answer.getheader("mcp-session-id") if answer.status == 200 else None
    finally:
        connection.close()


def test_sessions_from_many_loopback_addresses_count_as_one_client(memory):
    """Attack round three, item 3: 400 loopback addresses x 30 sessions reached the SDK's 10,000 and then
    every new client got 503; all of 127/8 is one client now."""
    with mcp_http_server(memory, MEMORY_MCP_SESSIONS_PER_CLIENT="3") as (url, _server):
        flood = [open_session(url, source=f"127.0.0.{2 + n % 20}") for n in range(40)]
        oldest, newest = (open_session(url, flood[i][1], "ping", source="127.0.0.2")[0] for i in (0, -1))

    assert [code for code, _ in flood] == [200] * 40
    assert (oldest, newest) == (404, 200)


def test_a_client_opening_sessions_without_end_churns_its_own_and_a_new_client_still_connects(memory):
    with mcp_http_server(memory, MEMORY_MCP_SESSIONS_PER_CLIENT="3") as (url, _server):
        flood = [open_session(url) for _ in range(60)]
        oldest, newest = (open_session(url, flood[i][1], "ping")[0] for i in (0, -1))

        async def scenario() -> Any:
            async with http_client(url) as client:
                return await call(client, "get_status")

        status = run(scenario())

    assert [code for code, _ in flood] == [200] * 60 and all(session for _, session in flood)
    assert (oldest, newest) == (404, 200)  # the least recently used session was closed, the newest serves
    assert text_of(status).startswith("healthy")


def test_http_refuses_a_foreign_origin(memory):
    with mcp_http_server(memory) as (url, _server):
        request = urllib.request.Request(url, data=b"{}", method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        refused.value.close()
    assert refused.value.code == 403


def test_binding_beyond_loopback_without_a_token_is_refused_at_start(memory):
    bind = f"0.0.0.0:{free_port()}"
    result = memory.run("mcp", "--http", bind, timeout_s=30)

    assert result.code == 2
    assert result.error_lines == [f"memory-manager: error: mcp --http {bind}: binding "
                                  "beyond loopback needs MEMORY_MCP_TOKEN or MEMORY_MCP_TOKENS (every request "
                                  "must then carry Authorization: Bearer <token>)"]


def test_sigterm_ends_the_server_and_its_worker_cleanly(memory):
    with mcp_http_server(memory, "--worker", MEMORY_AUTO_DRAIN="off") as (url, server):
        async def store() -> Any:
            async with http_client(url) as client:
                return await call(client, "add_memory", content=NOTE)

        run(store())
        memory.wait_until_ingested(1)  # the server's own worker ingested it
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
        assert server.stderr is not None and "Traceback" not in server.stderr.read()


def open_stream(url: str, session: str | None) -> Any:
    """A client's standing GET /mcp (server-to-client messages), left open as a client leaves it."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    connection.request("GET", parts.path, headers={"Accept": "text/event-stream", "Authorization": f"Bearer {TOKEN}",
                                                   "mcp-session-id": session or ""})
    assert connection.getresponse().status == 200
    return connection


def test_sigterm_with_many_open_streams_ends_the_server_before_docker_kills_it(memory):
    """Risk of attack round three: after a session flood the server took 6-21 s to exit on SIGTERM,
    and Docker sends SIGKILL after 10 s."""
    with mcp_http_server(memory, MEMORY_MCP_SESSIONS_PER_CLIENT="1000") as (url, server):
        sessions = [session for _, session in (open_session(url) for _ in range(1000))]
        streams = [open_stream(url, session) for session in sessions[-100:]]
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        took = time.monotonic() - started
    for stream in streams:
        stream.close()

    assert code == 0 and took < 8, f"exit {code} after {took:.1f} s"


def test_a_falkordb_outage_is_a_tool_error_and_the_server_serves_again(memory, stack):
    memory.store(NOTE)

    async def scenario() -> tuple[Any, Any]:
        async with stdio_client(memory) as client:
            stack.kill("falkordb")
            try:
                during = await client.call_tool("search_entities", {})
            finally:
                stack.restart("falkordb")
            return during, await client.call_tool("get_status", {})

    during, after = run(scenario())

    assert during.is_error and f"falkordb at 127.0.0.1:{stack.ports['falkordb']}" in text_of(during)
    assert after.structured_content["health"]["falkordb"]["ok"] is True


@pytest.mark.skipif(shutil.which("npx") is None, reason="needs node's npx")
def test_the_mcp_inspector_cli_lists_the_tools_and_calls_one(memory):
    memory.store(NOTE)
    env_args = [arg for name, value in memory.env.items()
                if name.startswith(("FALKORDB_", "VALKEY_", "OPENAI_", "MEMORY_", "DD_", "GRAPHITI_"))
                for arg in ("-e", f"{name}={value}")]
    inspector = ["npx", "--yes", "@modelcontextprotocol/inspector@2.12.0", "--cli", *env_args,
                 sys.executable, str(MODULE), "mcp"]

    listed = subprocess.run([*inspector, "--method", "tools/list"], capture_output=True, text=True, timeout=180,
                            cwd=ROOT)
    called = subprocess.run([*inspector, "--method", "tools/call", "--tool-name", "search_memory_facts",
                             "--tool-arg", "query=graph store"], capture_output=True, text=True, timeout=180,
                            cwd=ROOT)

    assert listed.returncode == 0, listed.stderr
    assert {tool["name"] for tool in json.loads(listed.stdout)["tools"]} == set(INPUT_SCHEMAS)
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["content"][0]["text"] == memory.ok("query", "graph store").rstrip("\n")
