"""The package graph: floors stack one way, nothing imports upward, and there are no cycles.

    genrecal (cli, run) -> extract | train -> model -> data -> store (the cache) -> common

Every ``import`` of a genrecal module counts, the ones inside functions too (a lazy import is
still a dependency). extract/ and train/ never import each other; both meet in the floors below.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"genrecal": "genrecal", "common": "genrecal.common", "store": "genrecal.store",
            "data": "genrecal.data", "model": "genrecal.model", "extract": "genrecal.extract",
            "train": "genrecal.train"}
#: What each package may import besides itself.
ALLOWED = {
    "common": set(),
    "store": {"common"},
    "data": {"store", "common"},
    "model": {"data", "store", "common"},
    "extract": {"model", "data", "store", "common"},
    "train": {"model", "data", "store", "common"},
    "genrecal": {"extract", "train", "model", "data", "store", "common"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES and parts[1] != "genrecal" else "genrecal"


def _imports(path: Path) -> set[str]:
    """The genrecal modules ``path`` imports (``from pkg import mod`` counts ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genrecal"):
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
            if node.module in MODULES:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
    return found


GRAPH = {module: _imports(path) - {module} for module, path in MODULES.items()}


def test_every_package_has_modules_and_a_one_line_purpose():
    for folder, package in PACKAGES.items():
        init = REPO / folder / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.split(".")[0].strip(), f"{init} needs a docstring saying what {package} is for"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_nothing_imports_upward(package):
    wrong = sorted((module, target) for module, targets in GRAPH.items() if _package(module) == package
                   for target in targets
                   if _package(target) != package and _package(target) not in ALLOWED[package])
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}; found {wrong}"


def test_extract_and_train_never_import_each_other():
    assert not ALLOWED["extract"] & {"train"} and not ALLOWED["train"] & {"extract"}
    crossing = [(m, t) for m, ts in GRAPH.items() for t in ts
                if {_package(m), _package(t)} == {"extract", "train"}]
    assert not crossing


def test_no_import_cycles():
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles


def test_the_pipeline_is_passed_typed():
    untyped = re.compile(r"\b(pipeline|stage|pipe|evaluation)\s*:\s*Any\b")
    found = [f"{path.relative_to(REPO)}:{n}" for module, path in MODULES.items()
             for n, line in enumerate(path.read_text().splitlines(), 1) if untyped.search(line)]
    assert not found, f"annotate with genrecal.common.config types: {found}"


def test_the_graph_sees_the_real_imports():
    """The checks above are only as good as the graph: spot-check edges that must be there."""
    assert "genrecal.store.schema" in GRAPH["genrecal.store.writer"]
    assert "genrecal.common.config" in GRAPH["genrecal.extract.job"]
    assert "genrecal.model.teacher_forward" in GRAPH["genrecal.train.online"]
