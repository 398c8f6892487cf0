"""Requirement: Pod recipe (docs/pod.md). Every memory-manager command the example files run is run
here exactly as written (the path of the console script aside) against the local stack."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from conftest import OPENCODE_VERSION, ROOT, wait_for_no_worker

POD = ROOT / "docs" / "pod"
CONSOLE_SCRIPT = Path(sys.executable).parent / "memory-manager"


def compose() -> dict:
    return yaml.safe_load((POD / "compose.yaml").read_text())


def unit_command(name: str) -> list[str]:
    [line] = [line for line in (POD / name).read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def as_installed(command: list[str]) -> list[str]:
    """The command with the console script of this checkout's venv where the image has its own."""
    assert Path(command[0]).name == "memory-manager", command
    return [str(CONSOLE_SCRIPT), *command[1:]]


def healthchecks() -> list[list[str]]:
    [containerfile] = [line for line in (POD / "Containerfile").read_text().splitlines()
                       if line.startswith("HEALTHCHECK")]
    return [compose()["services"]["opencode"]["healthcheck"]["test"][1:], containerfile.split(" CMD ", 1)[1].split()]


def test_the_healthchecks_as_written_pass_on_a_healthy_stack(memory):
    results = [subprocess.run(as_installed(check), env=memory.env, capture_output=True, text=True, timeout=60)
               for check in healthchecks()]

    assert [(r.returncode, r.stderr) for r in results] == [(0, "")] * 2
    assert all(r.stdout.startswith("falkordb  ok") for r in results)


def test_the_healthcheck_fails_when_falkordb_is_down(memory, dead_port):
    [check, _] = healthchecks()
    result = subprocess.run(as_installed(check), env=memory.with_env(FALKORDB_PORT=str(dead_port)).env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 1


def test_the_export_unit_as_written_uploads_a_backup(memory):
    memory.store("Decided to back the memory up every six hours.")

    result = subprocess.run(as_installed(unit_command("memory-export.service")), env=memory.env,
                            capture_output=True, text=True, timeout=300)
    listed = memory.ok("backups")

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("exported ") and result.stdout.split(" to ")[-1].strip() in listed


@pytest.mark.parametrize("where", ["compose", "systemd"])
def test_the_worker_as_written_ingests_and_stops_within_its_grace_period(memory, where):
    command = compose()["services"]["memory-worker"]["command"] if where == "compose" else \
        unit_command("memory-worker.service")
    grace = {"compose": compose()["services"]["memory-worker"]["stop_grace_period"],
             "systemd": next(line.split("=")[1] + "s" for line in (POD / "memory-worker.service").read_text()
                             .splitlines() if line.startswith("TimeoutStopSec="))}[where]
    wait_for_no_worker(memory.stack)
    memory.with_env(MEMORY_AUTO_DRAIN="off").ok("store", "Edited docs/pod.md to describe the worker.")
    worker = subprocess.Popen(as_installed(command), env=memory.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        memory.wait_until_ingested(1, timeout_s=120)
    finally:
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = worker.wait(timeout=30)
        stopped_in = time.monotonic() - started
        stderr = worker.stderr.read() if worker.stderr else ""
        if worker.stderr:
            worker.stderr.close()

    assert code == 0, stderr
    assert stopped_in < float(grace.removesuffix("s"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_export_timer_s_schedule_is_valid():
    [line] = [line for line in (POD / "memory-export.timer").read_text().splitlines() if line.startswith("OnCalendar=")]

    done = subprocess.run(["systemd-analyze", "calendar", line.removeprefix("OnCalendar=")], capture_output=True,
                          text=True, timeout=30)

    assert done.returncode == 0, done.stderr
    assert "00/6:00:00" in done.stdout


def test_the_pod_doc_names_every_example_file():
    doc = (ROOT / "docs" / "pod.md").read_text()

    assert {path.name for path in POD.iterdir()} <= set(re.findall(r"pod/([\w.-]+)", doc))


def containerfile_lines(starting: str) -> list[str]:
    return [line.removeprefix(starting) for line in (POD / "Containerfile").read_text().splitlines()
            if line.startswith(starting)]


@pytest.fixture(scope="module")
def opencode_stage(tmp_path_factory) -> Path:
    """The image's OpenCode stage, run here as written (into a prefix of ours instead of the node
    image's /usr/local): no container engine runs on this machine, so the image is not built."""
    [install] = [line for line in containerfile_lines("RUN ") if "opencode-ai@" in line]
    prefix = tmp_path_factory.mktemp("opencode-stage")
    subprocess.run([*shlex.split(install), "--silent", "--prefix", str(prefix)], check=True, timeout=600)
    return prefix


def test_the_pod_image_copies_the_pinned_opencode_binary_that_runs_alone(opencode_stage, tmp_path):
    [copied] = [line.split() for line in containerfile_lines("COPY --from=opencode ")]
    source, target = copied
    binary = tmp_path / "opencode"
    shutil.copy(opencode_stage / Path(source).relative_to("/usr/local"), binary)

    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)

    assert f"opencode-ai@{OPENCODE_VERSION}" in (POD / "Containerfile").read_text()
    assert version.stdout.strip() == OPENCODE_VERSION
    assert target == "/usr/local/bin/opencode"  # on PATH, where compose's command finds it


def test_compose_starts_opencode_with_flags_its_serve_command_takes(opencode_stage):
    command = compose()["services"]["opencode"]["command"]
    binary = opencode_stage / "lib" / "node_modules" / "opencode-ai" / "bin" / "opencode.exe"

    usage = subprocess.run([str(binary), command[1], "--help"], capture_output=True, text=True, timeout=60)

    assert command[:2] == ["opencode", "serve"] and usage.returncode == 0
    assert all(flag in usage.stdout + usage.stderr for flag in command[2:] if flag.startswith("--"))


def test_the_mcp_command_and_plugin_directory_in_the_docs_are_the_ones_the_image_makes():
    doc = (ROOT / "docs" / "opencode.md").read_text()
    local = next(json.loads(block)["mcp"]["memory"] for block in re.findall(r"```json\n(.*?)```", doc, re.S)
                 if '"type": "local"' in block)
    [(_, linked)] = re.findall(r"ln -s (\S+) (\S+)", (POD / "Containerfile").read_text())
    [plugin] = [line.split()[-1] for line in containerfile_lines("COPY containers/opencode-server/plugins/")]

    assert local["command"] == ["memory-manager", "mcp"]
    assert linked == "/usr/local/bin/memory-manager"
    assert plugin == "/etc/xdg/opencode/plugins/memory.js" and "ENV XDG_CONFIG_HOME=/etc/xdg" in \
        (POD / "Containerfile").read_text()
    assert "/etc/xdg/opencode/plugins/" in doc
