"""The layers drawn in docs/architecture.md hold in the code: import contracts, no import cycles, modules a reader
can take in, and comments that need nothing outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def test_import_contracts_hold() -> None:
    """pyproject.toml's import-linter contracts: core's layers point one way, core never imports Ray."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", "pyproject.toml"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), lazy imports inside functions included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in graph.modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("sslrun")
    assert _cycles(graph) == []


def test_cycle_finder_sees_a_cycle() -> None:
    """The cycle check can fail: a graph with a -> b -> a is reported."""
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split()]


@pytest.mark.parametrize("area", ["core", "cluster", "cli"])
def test_modules_stay_readable(area: str) -> None:
    files = _tracked(f"{area}/*.py", f"{area}/**/*.py", f"{area}.py")
    assert files, area
    too_long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert too_long == {}, f"modules over {MAX_LINES} lines: {too_long}"


# Names of documents that live outside this repository, and the short codes that pointed into them.
_OUTSIDE = re.compile(r"STACK-NOTES|USERS\.md|STYLE\.md|\.\./shared/|[(/ ][ABC]\d{1,2}[a-z]?[)/,:]|\bissue #?\d+\b")


def test_comments_need_nothing_outside_the_repository() -> None:
    hits = []
    for p in _tracked("*.py", "*.md", "*.toml", "Makefile", "*.yaml"):
        if "docs/results" in str(p) or p.name == "test_architecture.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if _OUTSIDE.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert hits == [], "\n".join(hits)
