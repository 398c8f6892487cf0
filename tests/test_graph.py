"""Requirement: A look at the memory (spec: memory-manager / Graph page). `graph` returns the group's
entities and facts; `graph --html FILE` writes one self-contained page, checked here in Debian's
Chromium, headless (skipped where it is not installed; under CI its absence fails)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import Memory

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="needs Debian's chromium (make install adds it as root)")
EVENTS = ["Alice moved `billing-api` from `MySQL` to `Postgres`.",
          "Bob put `Valkey` in front of `billing-api` as its cache.",
          "Carol wrote the runbook <img src=x onerror=alert(1)> for `Postgres` failover."]


def rendered(page: Path, query: str = "") -> str:
    """The DOM after the page's script ran, as Chromium serialises it."""
    assert CHROMIUM, "chromium is not installed"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                           "--window-size=1280,760", "--disable-background-networking",
                           "--dump-dom", f"{page.as_uri()}#q={query}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def stored(stack, tmp_path_factory) -> Memory:
    memory = Memory(stack, f"t_graph_{os.getpid()}", tmp_path_factory.mktemp("graph_spool"))
    for event in EVENTS:
        memory.store(event)
    return memory


def test_graph_returns_the_entities_and_the_facts_between_them(stored):
    view = json.loads(stored.ok("graph", "--limit", "50"))

    names = {e["name"] for e in view["entities"]}
    ids = {e["id"] for e in view["entities"]}
    assert view["group"] == stored.group
    assert {"billing-api", "MySQL", "Postgres", "Valkey"} <= names
    assert view["facts"] and all({f["source"], f["target"]} <= ids for f in view["facts"])
    assert all(set(f) == {"source", "target", "fact", "valid_at", "invalid_at"} for f in view["facts"])


@pytest.mark.parametrize("limit", ["0", "2001", "many"])
def test_a_bad_limit_is_refused_with_one_line(stored, limit):
    result = stored.run("graph", "--limit", limit)

    assert result.code == 2 and len(result.error_lines) == 1


@needs_chromium
def test_the_page_draws_every_entity_and_fact_and_its_search_narrows_them(stored, tmp_path):
    page = tmp_path / "memory.html"
    written = stored.ok("graph", "--html", str(page))
    view = json.loads(stored.ok("graph"))

    everything, narrowed = rendered(page), rendered(page, "Valkey")

    assert written == f"wrote {page}: {len(view['entities'])} entities, {len(view['facts'])} facts of group " \
                      f"{stored.group}\n"
    assert everything.count("<circle") == len(view["entities"])
    assert everything.count("<line") == len(view["facts"])
    total = f"{len(view['entities'])} of {len(view['entities'])} entities, {len(view['facts'])} of " \
            f"{len(view['facts'])} facts"
    assert total in everything
    shown = re.search(r'<p id="count">(\d+) of \d+ entities, (\d+) of', narrowed)
    assert shown and 0 < int(shown.group(2)) < len(view["facts"])
    assert all("Valkey" in item or "billing-api" in item
               for item in re.findall(r"<li>(.*?)</li>", narrowed))


@needs_chromium
def test_the_page_is_offline_and_stored_markup_stays_text(stored, tmp_path):
    page = tmp_path / "memory.html"
    stored.ok("graph", "--html", str(page))
    source = page.read_text()

    dom = rendered(page)

    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", source)  # nothing fetched
    assert "default-src 'none'" in source
    assert "\\u003cimg src=x" in source  # the stored tag is in the page's data, escaped
    assert "<img" not in dom.split("<body>", 1)[1]  # the stored tag is shown as text, never made an element


def test_the_page_is_readable_by_its_owner_only_as_an_export_is(stored, tmp_path):
    """Attack round three, item 11: the page holds the memories' text and was written 0644."""
    page = tmp_path / "memory.html"

    stored.ok("graph", "--html", str(page))

    assert page.stat().st_mode & 0o777 == 0o600


def a_crowded_view() -> dict:
    """A hub with thirty spokes, two chains, twenty lone entities and names forty letters long: the
    shape that piled entities along the canvas's edges and ran labels under the side panel."""
    names = (["hub"] + [f"spoke_{i}_of_the_hub" for i in range(30)] + [f"chain-{i}" for i in range(10)]
             + [f"lone entity {i} with a long name, forty letters" for i in range(20)])
    entities = [{"id": f"e{i}", "name": name, "type": "Entity", "summary": ""} for i, name in enumerate(names)]
    facts = ([{"source": "e0", "target": f"e{i}", "fact": f"hub links spoke {i}"} for i in range(1, 31)]
             + [{"source": f"e{i}", "target": f"e{i + 1}", "fact": f"chain {i}"} for i in range(31, 40)])
    return {"group": "crowded", "entities": entities,
            "facts": [{**f, "valid_at": None, "invalid_at": None} for f in facts]}


@needs_chromium
def test_the_page_keeps_every_entity_and_its_whole_label_inside_the_canvas(tmp_path):
    import memory_manager as mm
    view, page = a_crowded_view(), tmp_path / "crowded.html"
    page.write_text(mm._GraphPage.of(view))

    dom = rendered(page)

    view_box = re.search(r'<svg id="graph" viewBox="([^"]+)"', dom)
    assert view_box
    left, top, width, height = map(float, view_box.group(1).split())
    font_size = re.search(r'<svg[^>]*style="font-size: ([\d.]+)px', dom)  # the page's own 11 px unless scaled
    font = float(font_size.group(1)) if font_size else 11.0
    dots = [tuple(map(float, d)) for d in re.findall(r'<circle cx="([-\d.e]+)" cy="([-\d.e]+)" r="([\d.e]+)"', dom)]
    labels = [(float(x), float(y), html.unescape(name))
              for x, y, name in re.findall(r'<text x="([-\d.e]+)" y="([-\d.e]+)">([^<]*)</text>', dom)]
    assert len(dots) == len(labels) == len(view["entities"])
    assert all(left <= x - r and x + r <= left + width and top <= y - r and y + r <= top + height
               for x, y, r in dots)
    assert all(left <= x and x + 0.4 * font * len(name) <= left + width and top <= y - font and y <= top + height
               for x, y, name in labels)  # 0.4 em a letter: less than a sans-serif line of words takes
    crowded_x, crowded_y = Counter(x for x, _, _ in dots), Counter(y for _, y, _ in dots)
    assert max(crowded_x.values()) <= 2 and max(crowded_y.values()) <= 2  # no pile along an edge
