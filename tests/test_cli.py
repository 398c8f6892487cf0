"""Requirement: CLI contract (spec: memory-manager / Command line, Service failures)."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from conftest import MODULE, wait_for_no_worker


def help_commands(help_text: str) -> list[str]:
    return re.findall(r"^    ([a-z]+) ", help_text, re.M)


def test_help_lists_every_command(memory):
    result = memory.run("--help")

    assert (result.code, result.stderr) == (0, "")
    assert help_commands(result.stdout) == ["store", "query", "context", "entities", "health", "queue", "worker",
                                            "drain", "export", "backups", "mcp", "restore", "graph", "episodes",
                                            "episode", "forget", "correct", "erase", "import", "group"]


@pytest.mark.parametrize("command", ["store", "query", "context", "entities", "health", "queue", "worker", "drain",
                                     "export", "backups", "mcp", "restore", "graph", "episodes", "episode",
                                     "forget", "correct", "erase", "group"])
def test_each_command_has_its_own_help(memory, command):
    result = memory.run(command, "--help")

    assert result.code == 0
    assert result.stdout.startswith(f"usage: memory-manager {command}")


@pytest.mark.parametrize(("args", "line"), [
    (["qurey", "x"], "unknown command 'qurey' (did you mean 'query'? see memory-manager --help)"),
    (["remember", "x"], "unknown command 'remember' (see memory-manager --help)"),
    (["entities", "File", "extra"], "unrecognized arguments: extra"),
    (["query"], "query: the following arguments are required: search_query"),
    (["query", "x", "4", "--limit", "3"], "query: give the limit once (--limit N or a second argument)"),
    (["query", "x", "--group", "a b"], "--group must match ^[A-Za-z0-9_-]{1,64}$, got 'a b'"),
], ids=["typo", "unknown-command", "extra-argument", "missing-argument", "limit-twice", "bad-group"])
def test_usage_errors_exit_2_with_exactly_one_prefixed_line(memory, args, line):
    result = memory.run(*args)

    assert (result.code, result.stdout) == (2, "")
    assert result.error_lines == [f"memory-manager: error: {line}"]


def test_health_reports_each_dependency_and_exits_0_when_all_answer(memory):
    wait_for_no_worker(memory.stack)  # the worker line then says "off", not a drainer finishing
    result = memory.run("health")

    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["falkordb", "ok"], ["valkey", "ok"], ["llm", "ok"],
                                                        ["queue", "ok"]]
    assert lines[4].split()[:2] == ["worker", "off"]
    assert lines[5].split()[:3] == ["redaction", "on", "MEMORY_REDACT"]
    assert lines[6].split()[:4] == ["group", "ok", "MEMORY_GROUP_ID", memory.group]
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
    assert f"valkey    FAIL  127.0.0.1:{blackhole_port}  timed out: no answer within 1 s" in result.stdout
    assert elapsed < 5, f"health took {elapsed:.1f} s"  # ~1 s bound plus interpreter start


def test_health_without_openai_key_still_passes_and_says_llm_is_not_configured(memory):
    result = memory.with_env(OPENAI_API_KEY=None).run("health")

    assert result.code == 0
    assert result.stdout.splitlines()[2] == (f"llm       off   {memory.env['OPENAI_BASE_URL']}  "
                                             "not configured (OPENAI_API_KEY not set)")


@pytest.mark.parametrize(("fault", "detail"), [
    (None, "answered (key accepted)"),
    ("401", "rejected the key (check OPENAI_API_KEY)"),
    ("500", "answered HTTP 500"),
    ("hang", "unreachable: no answer within 1 s"),
], ids=["answers", "rejects-the-key", "http-500", "hangs"])
def test_health_really_calls_the_llm_endpoint_and_keeps_exit_0_when_it_fails(memory, standin, fault, detail):
    if fault:
        standin.faults(fault=fault, fault_count=-1)
    before = standin.stats().get("models", 0)
    started = time.monotonic()
    result = memory.run("health")
    elapsed = time.monotonic() - started

    state = "ok  " if fault is None else "FAIL"
    assert result.stdout.splitlines()[2] == f"llm       {state}  {memory.env['OPENAI_BASE_URL']}  {detail}"
    assert result.code == 0  # an OpenAI outage must not get the pod restarted by its healthcheck
    assert standin.stats()["models"] == before + 1
    assert memory.env["OPENAI_API_KEY"] not in result.stdout + result.stderr
    assert elapsed < 9, f"health took {elapsed:.1f} s"  # not a timing: below the 10 s of any other request bound


def test_health_says_the_llm_endpoint_is_unreachable_when_nothing_listens(memory, dead_port):
    result = memory.with_env(OPENAI_BASE_URL=f"http://127.0.0.1:{dead_port}/v1").run("health")

    assert result.code == 0
    assert result.stdout.splitlines()[2] == \
        f"llm       FAIL  http://127.0.0.1:{dead_port}/v1  unreachable: connection refused"


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


# --- conventions users know from other CLIs (clig.dev, llm, sqlite-utils) ---------------------------

def test_version_names_this_package_and_graphiti_core(memory):
    from importlib.metadata import version

    result = memory.run("--version")

    assert (result.code, result.stderr) == (0, "")
    assert result.stdout == f"memory-manager {version('opencode-memory-manager')} (graphiti-core 0.31.1)\n"


def test_no_arguments_prints_usage_and_two_examples_and_exits_2(memory):
    result = memory.run()

    assert (result.code, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "usage: memory-manager [-h] [--version] COMMAND ...",
        "",
        "examples:",
        """  echo "Edited src/app.py: retry FalkorDB writes" | memory-manager store - '{"event": "file.edited"}'""",
        '  memory-manager query "how do we retry FalkorDB writes" --limit 3',
        "",
        "run 'memory-manager --help' for every command",
    ]


def test_help_shows_examples_the_environment_and_the_exit_codes(memory):
    result = memory.run("--help")

    sections = [line for line in result.stdout.splitlines() if line and not line.startswith(" ")]
    assert sections[-3:] == ["examples:", "environment (see .env.example for all, with defaults):", "exit status:"]
    assert "  2  usage, input or configuration error" in result.stdout.splitlines()


def readme_cli_block() -> list[str]:
    text = (MODULE.parents[3] / "docs" / "cli.md").read_text()
    block = text.split("# CLI", 1)[1].split("```", 2)[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("memory-manager ")]


def test_the_readme_cli_block_and_help_agree(memory):
    lines = readme_cli_block()
    listed = {line.split()[1] for line in lines if not line.split()[1].startswith("[")}
    assert listed == set(help_commands(memory.ok("--help")))
    for line in lines:
        command = line.split()[1]
        if command.startswith("["):
            continue
        options = set(re.findall(r"(--[a-z-]+)", line))
        command_help = memory.ok(command, "--help")
        assert options <= set(re.findall(r"(--[a-z-]+)", command_help)), (command, options)


def test_query_takes_limit_as_an_option_or_an_argument_alike(memory):
    memory.store("We chose FalkorDB over Neo4j for the graph database.")

    assert memory.ok("query", "graph database", "--limit", "1") == memory.ok("query", "graph database", "1")


def test_group_option_overrides_memory_group_id_on_every_command(memory):
    other = memory.group + "_other"
    try:
        memory.ok("store", "--wait", "--group", other, "Alice prefers pytest for the OpenCode repo.")

        assert memory.entities() == []
        assert [e["name"] for e in json.loads(memory.ok("entities", "--group", other))] == ["Alice", "OpenCode"]
    finally:
        memory.with_env(MEMORY_GROUP_ID=other).forget_queue()


def test_in_a_project_every_command_uses_the_project_group_with_no_variable_set(memory, tmp_path):
    """Issue 37 item 2: the plugin stored under the project's group while `query` in the same
    directory read MEMORY_GROUP_ID=opencode from .env.example and found nothing."""
    project = tmp_path / "widget"
    project.mkdir()
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    repository = f"widget-{memory.group[-6:]}"
    subprocess.run(["git", "-C", str(project), "remote", "add", "origin", f"git@github.com:Acme/{repository}.git"],
                   check=True)
    expected = f"github-com-acme-{repository}"
    unset = {**memory.with_env(MEMORY_GROUP_ID=None).env, "PWD": str(project)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(MODULE), *args], env=unset, cwd=project, text=True,
                              capture_output=True, timeout=120)

    group = run("group")
    stored = run("store", "--wait", "Alice moved the widget's CI to GitHub Actions runners.")
    answer = run("query", "widget CI runners")
    health = json.loads(run("health", "--json").stdout)
    try:
        assert (group.stdout, group.stderr) == (f"{expected}\n", "memory-manager: from the git remote origin of "
                                                f"{project} (github.com/acme/{repository})\n")
        assert stored.returncode == 0, stored.stderr
        assert "GitHub Actions" in answer.stdout
        assert health["group"]["address"] == "project" and health["group"]["detail"].startswith(expected)
        with_variable = subprocess.run([sys.executable, str(MODULE), "group", "--json"], text=True,
                                       capture_output=True, cwd=project, env={**unset, "MEMORY_GROUP_ID": "pinned"})
        assert json.loads(with_variable.stdout) == {"group": "pinned", "rule": "MEMORY_GROUP_ID"}
    finally:
        memory.with_env(MEMORY_GROUP_ID=expected).forget_queue()


def test_quiet_silences_warnings_but_not_errors(memory, dead_port):
    warned = memory.run("store", "--wait", "Completed: lint for the OpenCode repo", "[1]")
    quiet = memory.run("store", "--wait", "-q", "Completed: lint for the OpenCode repo", "[1]")
    failed = memory.with_env(FALKORDB_PORT=str(dead_port)).run("entities", "-q")

    assert (warned.code, len(warned.error_lines)) == (0, 1)
    assert (quiet.code, quiet.stderr) == (0, "")
    assert failed.code == 1 and len(failed.error_lines) == 1


def test_store_from_stdin_takes_an_event_too_long_for_an_argument(memory):
    event = "修复了同步工作进程中的超时错误。" * 3125  # 50,000 CJK characters: 150 KB of UTF-8
    with pytest.raises(OSError, match="Argument list too long"):
        memory.run("store", event)

    stored = memory.ok("store", "--wait", "-", stdin=event)

    assert stored.startswith("stored ")
    [episode] = memory.episodes()
    assert episode["content"] == event


def run_on_a_terminal(memory, args: list[str], typed: bytes) -> tuple[int, str]:
    """Run with a pseudo-terminal as stdin (stdout and stderr piped); type `typed` into it."""
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, str(MODULE), *args], env=memory.env, stdin=terminal,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(terminal)
    import select

    assert process.stderr is not None
    ready, _, _ = select.select([process.stderr], [], [], 60)  # its prompt (or hint): it is waiting for us
    prompted = os.read(process.stderr.fileno(), 65536).decode() if ready else ""
    os.write(controller, typed)
    _, err = process.communicate(timeout=120)
    os.close(controller)
    return process.returncode, prompted + err


def test_store_dash_on_a_terminal_says_what_it_is_waiting_for(memory):
    code, err = run_on_a_terminal(memory, ["store", "--wait", "-"], b"Alice prefers pytest.\n\x04")

    assert code == 0, err
    assert err.splitlines()[0] == "memory-manager: reading the event from stdin; end it with Ctrl-D"


def test_mcp_started_on_a_terminal_says_what_it_waits_for(memory):
    """Issue 36: `memory-manager mcp` on a terminal waited silently."""
    code, err = run_on_a_terminal(memory, ["mcp"], b"\x04")

    assert code == 0, err
    assert err.splitlines()[0] == ("memory-manager: serving MCP on stdin/stdout for an MCP client (OpenCode starts "
                                   "it: docs/opencode.md); Ctrl-D ends it")


def test_restore_replace_asks_on_a_terminal_and_needs_yes_in_a_script(memory, tmp_path):
    memory.store("Alice prefers pytest for the OpenCode repo.")
    path = tmp_path / "export.json"
    memory.ok("export", "--output", str(path))
    before = memory.graph_counts()

    scripted = memory.run("restore", str(path), "--replace")
    code, err = run_on_a_terminal(memory, ["restore", str(path), "--replace"], b"n\n")

    assert (scripted.code, scripted.stdout) == (2, "")
    assert scripted.error_lines == ["memory-manager: error: restore: --replace drops the groups the document "
                                    "holds; pass --yes to confirm (or run it from a terminal to be asked)"]
    assert code == 2
    assert err == (f"memory-manager: restore --replace drops every group in {path} that already holds memories, "
                   "then restores it. Continue? [y/N] memory-manager: error: restore: not confirmed; nothing changed\n")
    assert memory.graph_counts() == before


def delete_every_graph(memory) -> None:
    """Export covers every group in FalkorDB; earlier tests' groups are not needed any more."""
    db = redis.Redis(port=memory.stack.ports["falkordb"])
    for group in db.execute_command("GRAPH.LIST"):
        db.execute_command("GRAPH.DELETE", group)
    db.close()


def test_restore_dash_reads_the_document_from_stdin(memory, tmp_path):
    delete_every_graph(memory)
    memory.store("Alice prefers pytest for the OpenCode repo.")
    document = memory.ok("export", "--output", "-")
    delete_every_graph(memory)

    restored = memory.ok("restore", "-", stdin=document)

    assert restored.startswith("restored ")
    assert [e["name"] for e in memory.entities()] == ["Alice", "OpenCode"]


def test_a_closed_stdout_ends_export_quietly_like_head_expects(memory):
    process = subprocess.Popen([sys.executable, str(MODULE), "export", "--output", "-"], env=memory.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout and process.stderr
    process.stdout.close()  # the reader is gone before the first byte

    code = process.wait(timeout=60)

    assert (code, process.stderr.read()) == (141, b"")
    process.stderr.close()


@pytest.mark.parametrize("where", ["missing-directory", "a-directory"])
def test_an_unwritable_output_path_is_exit_2_naming_it(memory, tmp_path, where):
    path = tmp_path / "no" / "such" / "x.json" if where == "missing-directory" else tmp_path
    result = memory.run("export", "--output", str(path))

    expected = (f"--output {path}: cannot write in {path.parent} (No such file or directory)"
                if where == "missing-directory" else f"--output {path}: is a directory; give a file name")
    assert (result.code, result.stdout) == (2, "")
    assert result.error_lines == [f"memory-manager: error: {expected}"]


def test_restore_from_b2_without_keys_names_restore_not_export(memory):
    result = memory.with_env(B2_KEY_ID=None).run("restore", "b2://bucket/graphiti_export_x.json")

    assert result.code == 2
    assert result.error_lines == ["memory-manager: error: B2_KEY_ID is not set (needed to restore with B2; "
                                  "`restore PATH` reads a local file instead)"]


def test_health_says_refused_timed_out_or_rejected(memory, dead_port, blackhole_port):
    refused = memory.with_env(FALKORDB_PORT=str(dead_port)).run("health")
    timed_out = memory.with_env(FALKORDB_PORT=str(blackhole_port)).run("health")
    rejected = memory.with_env(VALKEY_PASSWORD="wrong-password").run("health")

    assert refused.stdout.splitlines()[0] == f"falkordb  FAIL  127.0.0.1:{dead_port}  connection refused"
    assert timed_out.stdout.splitlines()[0] == \
        f"falkordb  FAIL  127.0.0.1:{blackhole_port}  timed out: no answer within 1 s"
    assert rejected.stdout.splitlines()[1] == (f"valkey    FAIL  127.0.0.1:{memory.stack.ports['valkey']}  "
                                               "rejected the credentials (check VALKEY_PASSWORD)")
    assert [r.code for r in (refused, timed_out, rejected)] == [1, 1, 1]


def test_health_warns_when_openai_default_model_names_go_to_another_server(memory):
    result = memory.with_env(MEMORY_LLM_MODEL=None, MEMORY_LLM_SMALL_MODEL=None).run("health")

    assert result.code == 0
    assert result.stdout.splitlines()[2] == (
        f"llm       WARN  {memory.env['OPENAI_BASE_URL']}  answered, but MEMORY_LLM_MODEL, MEMORY_LLM_SMALL_MODEL "
        "unset: graphiti's OpenAI default model names are sent to this non-OpenAI server")


def test_a_python_without_the_dependencies_gets_told_which_interpreter_to_use(memory):
    done = subprocess.run([sys.executable, "-S", str(MODULE), "query", "anything"], env=memory.env,
                          capture_output=True, text=True, timeout=60)

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"memory-manager: error: this Python ({sys.executable}) lacks the package 'redis': run "
                           "the memory-manager script or the Python it was installed into (e.g. .venv/bin/python)\n")


def test_stack_down_removes_the_env_file_it_wrote(tmp_path):
    env_file = tmp_path / ".stack.env"
    env_file.write_text("export VALKEY_PORT=1\n")

    subprocess.run([sys.executable, str(MODULE.parents[3] / "local" / "stack.py"), "down", "--run-dir",
                    str(tmp_path / "run"), "--env-file", str(env_file)], check=True, capture_output=True, timeout=30)

    assert not env_file.exists()


def test_stack_up_takes_free_ports_when_a_default_one_is_busy_and_the_memory_works_on_them(tmp_path):
    stack_py = MODULE.parents[3] / "local" / "stack.py"
    run_dir, env_file = tmp_path / "run", tmp_path / ".stack.env"
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 16379))  # FalkorDB's default port, held as another checkout's stack would
    except OSError:
        pass  # already held by something else: just as good
    else:
        holder.listen(1)
    try:
        up = subprocess.run([sys.executable, str(stack_py), "up", "--run-dir", str(run_dir), "--env-file",
                             str(env_file)], capture_output=True, text=True, timeout=120)
        env = dict(line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines())
        health = subprocess.run([sys.executable, str(MODULE), "health"], env={**os.environ, **env},
                                capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run([sys.executable, str(stack_py), "down", "--run-dir", str(run_dir), "--env-file",
                        str(env_file)], capture_output=True, timeout=60)
        holder.close()

    assert up.returncode == 0, up.stderr
    assert env["FALKORDB_PORT"] != "16379" and "falkordb 16379 -> " in up.stderr
    assert health.stdout.splitlines()[0].split()[:2] == ["falkordb", "ok"], health.stdout


@pytest.mark.parametrize("text", ["-foo", "-h1", "--postgres"])
def test_a_question_that_starts_with_a_dash_is_a_recall(memory, text):
    memory.store(f"Alice set the flag {text} in the Billing worker.")

    result = memory.run("query", text, "--limit", "3")

    assert (result.code, result.stderr) == (0, "")
    assert "Billing" in result.stdout
    assert memory.ok("query", "--limit", "3", "--", text) == result.stdout


def test_query_h_stays_help(memory):
    result = memory.run("query", "-h")

    assert result.code == 0 and result.stdout.startswith("usage: memory-manager query")


def test_query_json_gives_the_records_in_the_same_order_as_the_text(memory):
    memory.store("We chose FalkorDB over Neo4j for the graph database.")
    memory.store("Alice migrated the Billing service from MySQL to Postgres.")

    text = memory.ok("query", "graph database Billing", "--limit", "5")
    document = json.loads(memory.ok("query", "graph database Billing", "--limit", "5", "--json"))

    assert document["group"] == memory.group
    events = document["results"]
    assert len(events) == 2 and [line for line in text.splitlines() if line.startswith("- event ")] == [
        f"- event {e['valid_at']}: {e['text']}" for e in events]
    assert all(isinstance(e["score"], float) and len(e["uuid"]) == 36 for e in events)
    assert [e["score"] for e in events] == sorted((e["score"] for e in events), reverse=True)


@pytest.mark.parametrize("args", [
    ["store", "Dana prefers ruff."], ["query", "ruff"], ["entities"], ["health"], ["queue"], ["queue", "retry"],
    ["drain"], ["backups"],
], ids=lambda a: "-".join(a[:2]))
def test_every_command_prints_one_json_document_with_json(memory, args):
    result = memory.with_env(MEMORY_DRAIN_IDLE="1").run(*args, "--json")

    assert (result.code, result.stderr) == (0, ""), result.stderr
    document = json.loads(result.stdout)
    expected_keys = {"store": {"state", "episode", "job_id", "group"}, "query": {"group", "scope", "results"},
                     "health": {"falkordb", "valkey", "llm", "queue", "worker", "redaction", "group", "healthy"},
                     "queue": {"groups", "worker"} if len(args) == 1 else {"requeued"},
                     "drain": {"mode", "id", "stored", "dead_lettered", "exit_code"}}
    if args[0] in ("entities", "backups"):
        assert isinstance(document, list)
    else:
        assert set(document) == expected_keys[args[0]]


def test_export_refuses_json_when_the_document_goes_to_stdout(memory):
    result = memory.run("export", "--output", "-", "--json")

    assert (result.code, result.stdout) == (2, "")
    assert result.error_lines == ["memory-manager: error: export: --json and --output - both want stdout; give "
                                  "--output a file name"]


def test_the_module_docstring_lists_every_public_operation_and_command(memory):
    import memory_manager

    doc = memory_manager.__doc__ or ""
    operations = [name for name in memory_manager.__all__
                  if callable(getattr(memory_manager, name)) and not isinstance(getattr(memory_manager, name), type)
                  and name != "main"]
    assert [name for name in operations if f"{name}(" not in doc] == []
    commands = help_commands(memory.ok("--help"))
    cli_block = re.search(r"^CLI: memory-manager (\S+(?:\n {5}\S+)*)", doc, re.M)
    assert cli_block, "no CLI: line"
    assert re.sub(r"\n {5}", "", cli_block.group(1)).split("|") == commands


def test_the_readmes_tour_runs_as_written_in_a_fresh_shell(memory, tmp_path):
    """Issue 36: the tour's first command once failed for a new user (`memory-manager: command not
    found`). Its block runs verbatim in bash -e with a bare PATH, beside the `.venv` and the
    `.stack.env` that `make install` and `make stack` leave (here: this test's stack and group)."""
    from conftest import ROOT

    tour = re.search(r"## A tour\n\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert tour, "README.md has no tour"
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / ".stack.env").write_text("".join(f"export {name}={shlex.quote(value)}\n" for name, value
                                                 in memory.env.items() if name not in ("PATH", "HOME")))
    shell = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}

    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", tour.group(1)], cwd=tmp_path, env=shell,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)

    assert done.returncode == 0, done.stderr
    assert "Chose FalkorDB over Neo4j" in done.stdout and "Fixed the Valkey timeout in sync_worker" in done.stdout
    assert "Memories relevant to: what changed in sync_worker" in done.stdout
    assert (tmp_path / "memory.json.zst").stat().st_size > 0 and "<html" in (tmp_path / "memory.html").read_text()
