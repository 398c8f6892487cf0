"""Requirement: Configuration from the environment (spec: memory-manager / Configuration)."""

import re
from urllib.parse import quote

import pytest

from conftest import MODULE, ROOT

SYSTEM_VARIABLES = {"PWD"}  # the shell's, read for the working directory


def test_every_variable_the_module_and_the_plugin_read_is_documented_and_in_env_example():
    """Issue 36: the plugin's six variables were in no configuration page."""
    module = MODULE.read_text()
    plugin = (ROOT / "containers" / "opencode-server" / "plugins" / "memory.js").read_text()
    read = {*re.findall(r'_Env\.\w+\(\s*"([A-Z][A-Z0-9_]+)"', module),
            *re.findall(r'environ(?:\.get)?[\[(]\s*"([A-Z][A-Z0-9_]+)"', module),
            *re.findall(r"process\.env\.([A-Z][A-Z0-9_]+)", plugin)} - SYSTEM_VARIABLES
    documented, example = (ROOT / "docs" / "configuration.md").read_text(), (ROOT / ".env.example").read_text()

    assert len(read) > 40
    assert sorted(name for name in read if f"`{name}`" not in documented and name not in documented) == []
    the_systems = ("XDG_STATE_HOME", "XDG_DATA_HOME")  # documented, but not ours to set in .env
    assert sorted(name for name in read if name not in example and name not in the_systems) == []


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("MEMORY_GROUP_ID", "bad group!", "MEMORY_GROUP_ID must match ^[A-Za-z0-9_-]{1,64}$, got 'bad group!'"),
    ("MEMORY_GROUP_ID", "x" * 65, "MEMORY_GROUP_ID must match ^[A-Za-z0-9_-]{1,64}$"),
    ("FALKORDB_PORT", "sixty", "FALKORDB_PORT must be an integer, got 'sixty'"),
    ("VALKEY_PORT", "70000", "VALKEY_PORT must be between 1 and 65535, got 70000"),
    ("MEMORY_CACHE_TTL", "0", "MEMORY_CACHE_TTL must be between 1 and 2592000, got 0"),
    ("MEMORY_CACHE_GROUP_BYTES", "4MB", "MEMORY_CACHE_GROUP_BYTES must be an integer, got '4MB'"),
    ("MEMORY_MAX_EPISODE_CHARS", "-5", "MEMORY_MAX_EPISODE_CHARS must be between 1 and 10000000, got -5"),
    ("OPENAI_BASE_URL", "ftp://x", "OPENAI_BASE_URL must be an http(s) URL, got 'ftp://x'"),
    ("EMBEDDING_DIM", "wide", "EMBEDDING_DIM must be an integer, got 'wide'"),
], ids=["group-chars", "group-length", "port-not-int", "port-range", "ttl-zero", "cache-bytes", "max-chars",
        "base-url", "embedding-dim"])
@pytest.mark.parametrize("command", [["query", "anything"], ["entities"], ["health"]],
                         ids=["query", "entities", "health"])
def test_a_malformed_setting_fails_early_with_one_line_naming_it(memory, variable, value, message, command):
    result = memory.with_env(**{variable: value}).run(*command)

    assert result.code == 2
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith(f"memory-manager: error: {message}")
    assert result.stdout == ""


@pytest.mark.parametrize(("variable", "value", "message", "command"), [
    ("B2_STALL_S", "0", "B2_STALL_S must be between 1 and 3600, got 0", ["export"]),
    ("B2_KEEP", "-1", "B2_KEEP must be between 0 and 1000000, got -1", ["backups"]),
    ("MEMORY_MCP_SESSIONS_PER_CLIENT", "0", "MEMORY_MCP_SESSIONS_PER_CLIENT must be between 1 and 10000, got 0",
     ["mcp", "--http", "127.0.0.1:1"]),
], ids=["b2-stall", "b2-keep", "mcp-sessions"])
def test_a_setting_only_some_commands_read_fails_those_early_and_nothing_else(memory, variable, value, message,
                                                                              command):
    configured = memory.with_env(**{variable: value})

    used, unused = configured.run(*command), configured.run("query", "anything")

    assert (used.code, used.stdout, used.error_lines) == (2, "", [f"memory-manager: error: {message}"])
    assert unused.code == 0, unused.stderr


def test_a_base_url_with_credentials_is_never_echoed(memory):
    result = memory.with_env(OPENAI_BASE_URL="ftp://user:hunter2@example.test/v1").run("entities")

    assert result.code == 2
    assert "hunter2" not in result.stderr


RESERVED_PASSWORD = "Ab/Cnry+q=?x#y"  # generated passwords often hold / and +


@pytest.mark.parametrize(("variable", "value"), [
    ("VALKEY_URL", f"redis://default:{RESERVED_PASSWORD}@127.0.0.1:1"),
    ("FALKORDB_URL", f"falkor://default:{RESERVED_PASSWORD}@127.0.0.1:1"),
    ("VALKEY_URL", f"redis://default:{RESERVED_PASSWORD}@127.0.0.1:notaport"),
    ("OPENAI_BASE_URL", f"http://user:{RESERVED_PASSWORD}@127.0.0.1:1/v1"),
])
def test_a_url_password_with_reserved_characters_is_refused_and_never_printed(memory, variable, value):
    """Attack round three, item 2: `/` ended urlsplit's netloc early and the message printed the rest."""
    configured = memory.with_env(**{variable: value})

    for command in (["store", "x"], ["query", "anything"], ["health"], ["context", "anything"]):
        result = configured.run(*command)
        assert result.code == 2, (command, result.stderr)
        [line] = result.error_lines
        assert "percent-encode" in line, line
        for fragment in ("Cnry", "Ab/", "q=?x", "#y"):
            assert fragment not in result.stderr + result.stdout, (command, line)


def test_a_percent_encoded_url_password_works(memory):
    valkey = f"redis://default:{quote(RESERVED_PASSWORD, safe='')}@127.0.0.1:{memory.stack.ports['valkey']}"
    configured = memory.with_env(VALKEY_URL=valkey, VALKEY_PORT=None)

    result = configured.run("query", "anything")

    assert result.code == 0, result.stderr
    assert "Cnry" not in result.stderr


def test_settings_hide_secrets_in_their_repr(monkeypatch):
    import memory_manager

    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-1")
    monkeypatch.setenv("VALKEY_PASSWORD", "canary-2")
    monkeypatch.setenv("FALKORDB_PASSWORD", "canary-3")

    text = repr(memory_manager.Settings.from_env())

    assert "canary" not in text


def test_documented_defaults_apply_when_nothing_is_set(monkeypatch, tmp_path):
    import memory_manager

    monkeypatch.chdir(tmp_path)  # not a repository: the group comes from the directory
    monkeypatch.setenv("PWD", str(tmp_path))
    for name in ("FALKORDB_HOST", "FALKORDB_PORT", "VALKEY_HOST", "VALKEY_PORT", "MEMORY_GROUP_ID",
                 "MEMORY_CACHE_TTL", "MEMORY_MAX_EPISODE_CHARS", "MEMORY_EMBEDDING_MODEL", "EMBEDDING_DIM",
                 "MEMORY_CACHE_GROUP_BYTES"):
        monkeypatch.delenv(name, raising=False)

    s = memory_manager.Settings.from_env()

    assert (s.falkordb_address, s.valkey_address) == ("localhost:6379", "localhost:6380")
    assert s.group_id == memory_manager.project_group(str(tmp_path))
    assert s.group_id.startswith(tmp_path.name.replace("_", "-")[:40])
    assert (s.cache_ttl_s, s.cache_group_bytes, s.max_episode_chars) == (300, 4 << 20, 100_000)
    assert (s.embedding_model, s.embedding_dim) == (None, 1024)


def test_the_embedding_defaults_are_graphitis_own():
    # A query embeds its question without graphiti, an ingestion its events through it: same vectors.
    from graphiti_core.embedder.client import EmbedderConfig
    from graphiti_core.embedder.openai import DEFAULT_EMBEDDING_MODEL

    import memory_manager

    assert memory_manager.DEFAULT_EMBEDDING_MODEL == DEFAULT_EMBEDDING_MODEL
    assert memory_manager.Settings().embedding_dim == EmbedderConfig.model_fields["embedding_dim"].default == 1024


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("DD_TRACE_AGENT_PORT", "abc", "DD_TRACE_AGENT_PORT must be an integer, got 'abc'"),
    ("DD_DOGSTATSD_PORT", "99999", "DD_DOGSTATSD_PORT must be between 1 and 65535, got 99999"),
    ("DD_TRACE_ENABLED", "maybe", "DD_TRACE_ENABLED must be on or off, got 'maybe'"),
    ("DD_TRACE_AGENT_URL", "ftp://agent", "DD_TRACE_AGENT_URL must be http/https://host:port or unix:///path, "
                                          "got 'ftp://agent'"),
    ("DD_DOGSTATSD_URL", "tcp://agent:8125", "DD_DOGSTATSD_URL must be udp://host:port or unix:///path, "
                                             "got 'tcp://agent:8125'"),
], ids=["agent-port", "statsd-port", "trace-enabled", "agent-url", "statsd-url"])
@pytest.mark.parametrize("command", [["query", "anything"], ["store", "Alice prefers pytest."], ["health"], ["worker"]],
                         ids=["query", "store", "health", "worker"])
def test_a_malformed_datadog_variable_fails_early_naming_it(memory, variable, value, message, command):
    result = memory.with_env(**{"DD_TRACE_ENABLED": "true", variable: value}).run(*command, timeout_s=30)

    assert (result.code, result.stdout) == (2, "")
    assert result.error_lines == [f"memory-manager: error: {message}"]
    assert memory.queue()["queued"] == 0


def test_b2_realm_is_checked_only_by_the_commands_that_use_b2(memory):
    bad = memory.with_env(B2_REALM="bad realm")

    assert bad.run("query", "anything").code == 0
    export = bad.run("export")
    assert (export.code, export.error_lines) == (
        2, ["memory-manager: error: B2_REALM must be a realm name or an http(s) URL, got 'bad realm'"])


def test_every_variable_the_settings_read_is_in_env_example_with_a_comment_above_it(monkeypatch):
    import os
    import re

    import memory_manager
    from conftest import ROOT

    read: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

    monkeypatch.setattr(os, "environ", Recording())
    memory_manager.Settings.from_env()
    ours = {name for name in read if name not in ("PWD", "PATH", "XDG_STATE_HOME")}  # the system's
    lines = (ROOT / ".env.example").read_text().splitlines()
    documented = {match.group(1): number for number, line in enumerate(lines)
                  if (match := re.match(r"^(?:# )?([A-Z][A-Z0-9_]*)=", line))}  # `# NAME=`: best left unset

    assert {"FALKORDB_URL", "VALKEY_TLS_KEY_FILE", "MEMORY_MCP_TOKENS"} <= ours  # the recording saw the reads
    assert sorted(ours - documented.keys()) == []
    assert [name for name in ours if not lines[documented[name] - 1].startswith("# ")] == []
