"""The tree shows the layers: imports point one way, no module imports itself through others, modules stay small.

Parsed with ``ast``, so imports inside functions count too (they hide cycles
from the interpreter, not from a reader).
"""
import ast
import os
from typing import Dict, Iterator, List, Set

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ckptmgr")

# Lower layers never import higher ones. Modules in one layer may import each other, without cycles.
LAYERS = [
    {"errors", "version", "faults"},
    {"io"},
    {"format"},
    {"distributed"},
    {"state"},
    {"sharded"},
    {"step"},
    {"hub"},
    {"loaders"},
    {"checkpoint", "retention", "keeping", "advice", "inventory", "describe", "exporter", "release", "warmstart",
     "manager", "restoring", "hooks", "resume"},
    {"integrations"},
    {"cli"},
    {""},  # the facade, ckptmgr/__init__.py
]
MAX_LINES = 400


def _modules() -> Dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))
    return target


def _imports(module: str) -> Iterator[str]:
    path = MODULES[module]
    is_package = path.endswith("__init__.py")
    with open(path) as fh:
        tree = ast.parse(fh.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ckptmgr":
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module or "")
            if base.split(".")[0] != "ckptmgr":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if sub in MODULES else base


GRAPH: Dict[str, Set[str]] = {m: {t for t in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer; add its top-level name to LAYERS")


def _cycles() -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return found


def test_the_checks_see_the_imports_they_are_about():
    # the parser finds function-level imports and resolves relative ones
    assert "ckptmgr.step.save" in GRAPH["ckptmgr.manager"]
    assert "ckptmgr.sharded.dcp_io" in GRAPH["ckptmgr.sharded.engine"]  # imported inside a function
    assert "ckptmgr.errors" in GRAPH["ckptmgr.io.local"]


def test_no_import_cycle():
    assert _cycles() == []


def test_lower_layers_never_import_higher_ones():
    wrong = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m)]
    assert wrong == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    with open(MODULES[module]) as fh:
        lines = sum(1 for _ in fh)
    assert lines <= MAX_LINES, f"{module} has {lines} lines"
