"""Requirement: Lazy clients (spec: memory-manager / Lazy, loop-safe clients)."""

import ast
import asyncio
import re
import subprocess
import sys
from collections.abc import Callable

from conftest import MODULE


def test_import_connects_to_nothing_and_loads_no_heavy_library(dead_port):
    code = (
        "import sys, socket\n"
        "def refuse(*a, **k): raise AssertionError('import opened a socket')\n"
        "socket.socket.connect = refuse\n"
        f"sys.path.insert(0, {str(MODULE.parent)!r})\n"
        "import memory_manager\n"
        "heavy = [m for m in ('graphiti_core', 'openai', 'falkordb', 'b2sdk', 'ddtrace', 'redis')\n"
        "         if m in sys.modules]\n"
        "print(heavy)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "FALKORDB_PORT": str(dead_port), "VALKEY_PORT": str(dead_port)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
    assert done.stderr == ""


def test_two_asyncio_runs_in_one_process_both_work(memory, monkeypatch):
    import memory_manager

    memory.store("We chose FalkorDB over Neo4j for the graph database.")
    for key, value in memory.env.items():
        monkeypatch.setenv(key, value)

    first = asyncio.run(memory_manager.query_memory("graph database"))
    second = asyncio.run(memory_manager.query_memory("graph database"))  # new loop: clients recreated
    entities = asyncio.run(memory_manager.get_entities())
    asyncio.run(memory_manager.close())
    asyncio.run(memory_manager.close())

    assert "We chose FalkorDB over Neo4j" in first
    assert second == first
    assert {e["name"] for e in entities} == {"FalkorDB", "Neo4j"}


def test_a_library_user_acts_on_another_group_within_in_group_and_the_configured_one_is_untouched(
        memory, monkeypatch):
    import pytest

    import memory_manager

    for key, value in memory.env.items():
        monkeypatch.setenv(key, value)
    other = f"{memory.group}-other"

    async def scenario() -> tuple[str, str]:
        with memory_manager.in_group(other) as chosen:
            assert chosen == other
            await memory_manager.store_episode("Dana moved the billing cron job to Sundays.")  # until stored
            theirs = await memory_manager.query_memory("billing cron job")
        mine = await memory_manager.query_memory("billing cron job")
        await memory_manager.close()
        return theirs, mine

    theirs, mine = asyncio.run(scenario())

    assert "Dana moved the billing cron job to Sundays." in theirs
    assert mine == "No relevant memories found."
    assert memory.with_env(MEMORY_GROUP_ID=other).run("query", "billing cron job").stdout == theirs + "\n"
    with pytest.raises(memory_manager.UsageError, match="a group name must match"), \
            memory_manager.in_group("not a group"):
        pass


def test_all_names_exactly_the_documented_api_and_the_types_it_returns_and_nothing_else_looks_public():
    import inspect
    import typing

    import memory_manager

    documented = set(re.findall(r"^    (\w+)\(", memory_manager.__doc__ or "", re.M))
    errors = set(re.findall(r"(\w+Error|OutputClosed) +exit", memory_manager.__doc__ or ""))
    exported = set(memory_manager.__all__)
    functions = {name for name in exported if inspect.isfunction(getattr(memory_manager, name))}
    returned = set()
    for name in functions:
        hints = typing.get_type_hints(getattr(memory_manager, name))
        returned |= {n for n in re.findall(r"\b[A-Z]\w+", str(hints.get("return", ""))) if hasattr(memory_manager, n)
                     and inspect.isclass(getattr(memory_manager, n)) and getattr(memory_manager, n).__module__ ==
                     "memory_manager"}
    defined = {node.name for node in ast.parse(inspect.getsource(memory_manager)).body
               if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}

    public = {name for name in defined if not name.startswith("_")}

    assert exported <= defined
    assert public == exported, public ^ exported
    assert documented == functions
    assert errors <= exported
    assert returned <= exported, returned - exported


def sections() -> tuple[ast.Module, Callable[[int], str]]:
    """The module's syntax tree, and the `# === Name ===` section a line is in."""
    source = MODULE.read_text()
    starts = [(number, match.group(1)) for number, line in enumerate(source.splitlines(), start=1)
              if (match := re.fullmatch(r"# === (.+?) =+", line))]

    def section(line: int) -> str:
        return max(((start, name) for start, name in starts if start <= line), default=(0, "(top)"))[1]

    assert len(starts) >= 10
    return ast.parse(source), section


def test_each_section_of_the_module_uses_only_what_the_sections_above_it_define():
    tree, section = sections()
    order = list(dict.fromkeys(section(node.lineno) for node in tree.body))
    home: dict[str, int] = {}
    for node in tree.body:
        targets = [node] if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else []
        names = [n.name for n in targets] + [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])
                                             if isinstance(t, ast.Name)]
        home.update((name, order.index(section(node.lineno))) for name in names)
    later = sorted({(section(node.lineno), name.id, order[home[name.id]])
                    for node in tree.body for name in ast.walk(node)
                    if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load) and name.id in home
                    and home[name.id] > order.index(section(node.lineno))})

    assert later == []  # (section, name it uses, the later section that defines it)


def test_the_module_reads_as_a_namespace_of_small_classes():
    """Issue 36: families that share state or a concern are classes, so the top level holds the public
    API, the singletons' getters and the classes (imports counted too)."""
    tree, _ = sections()
    names: set[str] = set()
    in_classes = 0
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            in_classes += (node.end_lineno or node.lineno) - node.lineno + 1 if isinstance(node, ast.ClassDef) else 0
        names.update(t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name))
    source = MODULE.read_text()

    assert len(names) <= 300, len(names)
    assert in_classes / len(source.splitlines()) >= 0.45
    assert source.count("type: ignore") <= 3


def test_a_class_s_private_members_are_used_only_inside_that_class():
    """Issue 36: sections meet through their classes' public methods (`_Recall.bm25`), never a
    `_helper` of another class; graphiti's own private methods are named in one place only."""
    tree, _ = sections()
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    reached_into = sorted({(name.value.id, name.attr, getattr(top, "name", "?")) for top in tree.body
                           for name in ast.walk(top) if isinstance(name, ast.Attribute)
                           and isinstance(name.value, ast.Name) and name.value.id in classes
                           and name.attr.startswith("_") and not name.attr.startswith("__")
                           and top is not classes[name.value.id]})
    graphiti_private = [line for line in MODULE.read_text().splitlines() if re.search(r"graphiti\._[a-z]", line)]

    assert len(classes) >= 40 and not reached_into, reached_into
    assert 0 < len(graphiti_private) <= 3, graphiti_private


MUTATORS = {"add", "discard", "clear", "pop", "update", "setdefault", "append"}


def test_only_the_clients_section_writes_the_client_singletons():
    tree, section = sections()

    def of_clients(node: ast.AST) -> bool:
        while isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        return isinstance(node, ast.Name) and node.id == "_clients"

    writers = set()
    for top in tree.body:
        for node in ast.walk(top):
            stored = isinstance(node, ast.Attribute | ast.Subscript) and isinstance(node.ctx, ast.Store)
            mutated = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                       and of_clients(node.func.value) and node.func.attr in MUTATORS)
            if (stored and of_clients(node)) or mutated:
                writers.add((section(top.lineno), getattr(top, "name", "?")))

    assert writers and {where for where, _ in writers} == {"Clients"}, writers
