"""The shape of the code (issue 13): contracts below engines, no import cycles (counting
imports inside functions, so none can hide one), spec modules import only the spec contract,
the build helpers and the helper modules `pykernels/_*.py`, and no harness file outgrows one job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "pykernels")
MAX_LINES = 410  # "no harness file above ~400 lines"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """kt modules `name` imports anywhere in its body (module level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_module_imports_a_module_that_imports_it_back():
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("pykernels.")))
def test_spec_modules_import_only_the_contract(name):
    allowed = {"harness", "harness.spec", "harness.build"}
    helpers = {m for m in MODULES if m.startswith("pykernels._")}  # _common, _paged_kv
    assert GRAPH[name] <= allowed | helpers, GRAPH[name] - allowed - helpers


def test_the_contract_sits_below_the_engines():
    below = {"harness.spec", "harness.build", "harness.checking", "harness.timing",
             "harness.io", "harness.devices"}
    for name in below:
        engines = {m for m in GRAPH[name]
                   if m.startswith(("harness.verify", "harness.bench", "harness.serving",
                                    "harness.cli", "pykernels"))}
        assert not engines, (name, engines)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("harness")))
def test_no_harness_file_outgrows_one_job(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES
