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


# Short codes that pointed into notes kept outside the repository ("(A3f)", "B1/B2") and issue numbers.
_CODES = re.compile(r"[(/ ][ABC]\d{1,2}[a-z]?[)/,:]|\bissue #?\d+\b")
_DOC_NAME = re.compile(r"\b([A-Za-z][\w-]*\.md)\b")
_UP_PATH = re.compile(r"(?:\.\./)+[\w.-][\w./-]*")


def _outside_references(path: Path, line: str, have: set[str]) -> list[str]:
    """What ``line`` of ``path`` cites that a person who clones sslrun does not have: a short code or issue
    number, a Markdown document no tracked file is named after, or a relative path that leaves the repository
    or names nothing."""
    found = [m.group(0) for m in _CODES.finditer(line)]
    found += [d for d in _DOC_NAME.findall(line) if d not in have]
    for rel in _UP_PATH.findall(line):
        target = (path.parent / rel.rstrip(".,)")).resolve()
        if not target.is_relative_to(ROOT) or not target.exists():
            found.append(rel)
    return found


def test_outside_reference_finder_sees_them() -> None:
    """The check can fail: a code, an unknown document and a path out of the repository are each reported; a
    link to a tracked file is not."""
    here = ROOT / "docs" / "x.md"
    assert _outside_references(here, "see (A3f)", set()) == ["(A3f)"]
    assert _outside_references(here, "see NOTES.md", {"README.md"}) == ["NOTES.md"]
    assert _outside_references(here, "see ../../elsewhere/NOTES", set()) == ["../../elsewhere/NOTES"]
    assert _outside_references(here, "[b](../benchmarks/README.md)", {"README.md"}) == []


def test_comments_need_nothing_outside_the_repository() -> None:
    have = {p.name for p in _tracked()}
    hits = []
    for p in _tracked("*.py", "*.md", "*.toml", "Makefile", "*.yaml"):
        if "docs/results" in str(p) or p.name == "test_architecture.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if _outside_references(p, line, have):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert hits == [], "\n".join(hits)
