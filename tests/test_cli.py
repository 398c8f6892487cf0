"""Requirement: CLI contract (spec: memory-manager / Command line, Service failures)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_help_lists_every_command(memory):
    result = memory.run("--help")

    assert result.code == 0
    for command in ("store", "query", "entities", "health", "queue", "worker", "drain", "export", "restore"):
        assert command in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("command", ["store", "query", "entities", "health", "queue", "worker", "drain", "export",
                                     "restore"])
def test_each_command_has_its_own_help(memory, command):
    result = memory.run(command, "--help")

    assert result.code == 0
    assert result.stdout.startswith(f"usage: memory-manager {command}")


@pytest.mark.parametrize(("args", "message"), [
    (["forget", "x"], "memory-manager: argument COMMAND: invalid choice: 'forget'"),
    ([], "memory-manager: the following arguments are required: COMMAND"),
    (["entities", "File", "extra"], "memory-manager: unrecognized arguments: extra"),
], ids=["unknown-command", "no-command", "extra-argument"])
def test_usage_errors_exit_2_with_one_line(memory, args, message):
    result = memory.run(*args)

    assert result.code == 2
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith(f"memory-manager: error: {message}")
    assert result.stdout == ""


def test_health_reports_each_dependency_and_exits_0_when_all_answer(memory):
    result = memory.run("health")

    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["falkordb", "ok"], ["valkey", "ok"], ["llm", "ok"],
                                                        ["queue", "ok"]]
    assert lines[4].split()[:2] in (["worker", "ok"], ["worker", "off"])  # a drainer may be finishing
    assert "valkey 8." in lines[1] or "redis" in lines[1]


def test_health_exits_1_when_falkordb_is_down_and_names_it(memory, dead_port):
    result = memory.with_env(FALKORDB_PORT=str(dead_port)).run("health")

    assert result.code == 1
    assert result.stdout.splitlines()[0].startswith(f"falkordb  FAIL  127.0.0.1:{dead_port}")


def test_health_answers_within_about_a_second_when_a_service_black_holes(memory, blackhole_port):
    started = time.monotonic()
    result = memory.with_env(VALKEY_PORT=str(blackhole_port)).run("health")
    elapsed = time.monotonic() - started

    assert result.code == 1
    assert f"valkey    FAIL  127.0.0.1:{blackhole_port}  no answer within 1 s" in result.stdout
    assert elapsed < 5, f"health took {elapsed:.1f} s"  # ~1 s bound plus interpreter start


def test_health_without_openai_key_still_passes_and_says_llm_is_off(memory):
    result = memory.with_env(OPENAI_API_KEY=None).run("health")

    assert result.code == 0
    assert result.stdout.splitlines()[2].startswith("llm       off")


@pytest.mark.parametrize("args", [
    ["query", "what does Alice prefer"],
    ["entities"],
], ids=["query", "entities"])
def test_falkordb_down_exits_1_naming_host_and_port_quickly(memory, dead_port, args):
    started = time.monotonic()
    result = memory.with_env(FALKORDB_PORT=str(dead_port)).run(*args)

    assert result.code == 1
    assert len(result.error_lines) == 1
    assert result.error_lines[0].startswith(f"memory-manager: error: falkordb at 127.0.0.1:{dead_port}: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 15


def test_memory_debug_shows_the_traceback(memory, dead_port):
    result = memory.with_env(FALKORDB_PORT=str(dead_port), MEMORY_DEBUG="1").run("entities")

    assert result.code == 1
    assert "Traceback" in result.stderr


def test_the_memory_manager_console_script_runs_the_same_cli(memory):
    import shutil

    script = shutil.which("memory-manager", path=str(Path(sys.executable).parent))
    assert script, "pip install -e . must install the memory-manager console script"
    done = subprocess.run([script, "health"], env=memory.env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("falkordb  ok")
