"""The package's layering (docs/ARCHITECTURE.md), checked on its source.

Every import of a ``lyoncompress`` module, including imports inside functions, is an
edge of the import graph. The graph must have no cycle, and a module may import only
from its own layer or the layers below it, so that the runtime (layer 2) never
imports a verb (layer 3) and editing ``quantize`` cannot break loading.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lyoncompress"

# 0: leaves; 1: factors, formats, fitting and rescaling algorithms, artifact/checkpoint I/O;
# 2: runtime modules, model building, calibration data and capture, recipes and plans;
# 3: the verbs; 4: budget search, transformers integration, demo, CLI, the package root.
LAYERS = {
    "lyoncompress.errors": 0,
    "lyoncompress.butterfly": 0,
    "lyoncompress.kernels": 0,
    "lyoncompress.cpu_routes": 0,
    "lyoncompress.schema": 0,
    "lyoncompress.distributed": 0,
    "lyoncompress.processes": 0,
    "lyoncompress.artifact": 1,
    "lyoncompress.checkpoint": 1,
    "lyoncompress.frontier_claims": 1,
    "lyoncompress.output": 1,
    "lyoncompress.report": 1,
    "lyoncompress.factorization": 1,
    "lyoncompress.factorization.methods": 1,
    "lyoncompress.factorization.projection": 1,
    "lyoncompress.quantization": 1,
    "lyoncompress.quantization.chain": 1,
    "lyoncompress.quantization.descent": 1,
    "lyoncompress.quantization.diagonal": 1,
    "lyoncompress.quantization.fakequant": 1,
    "lyoncompress.quantization.feedback": 1,
    "lyoncompress.quantization.formats": 1,
    "lyoncompress.quantization.learned": 1,
    "lyoncompress.quantization.payloads": 1,
    "lyoncompress.quantization.rankone": 1,
    "lyoncompress.quantization.rescale": 1,
    "lyoncompress.refine": 1,
    "lyoncompress.refine.allocation": 1,
    "lyoncompress.refine.aware": 1,
    "lyoncompress.refine.distill": 1,
    "lyoncompress.refine.gram": 1,
    "lyoncompress.refine.layerwise": 1,
    "lyoncompress.refine.permutation": 1,
    "lyoncompress.refine.varpro": 1,
    "lyoncompress.structures": 1,
    "lyoncompress.layers": 2,
    "lyoncompress.models": 2,
    "lyoncompress.plan": 2,
    "lyoncompress.recipe": 2,
    "lyoncompress.data": 2,
    "lyoncompress.capture": 2,
    "lyoncompress.blocks": 2,
    "lyoncompress.factorization.journal": 2,
    "lyoncompress.evaluation": 3,
    "lyoncompress.evaluation.tasks": 3,
    "lyoncompress.inspection": 3,
    "lyoncompress.factorization.calibrated": 3,
    "lyoncompress.factorization.permute": 3,
    "lyoncompress.factorization.streaming": 3,
    "lyoncompress.factorization.pipeline": 3,
    "lyoncompress.quantization.calibration": 3,
    "lyoncompress.quantization.pipeline": 3,
    "lyoncompress.quantization.qad": 3,
    "lyoncompress.factorization.budget_search": 4,
    "lyoncompress.frontier": 4,
    "lyoncompress.hf_integration": 4,
    "lyoncompress.demo": 4,
    "lyoncompress.cli": 4,
    "lyoncompress.__main__": 4,
    "lyoncompress.tables": 4,
    "lyoncompress": 4,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from package import module` imports the submodule too
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


@functools.cache
def _graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_vs_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_every_module_has_a_layer():
    unplaced = sorted(set(_graph()) - set(LAYERS))
    assert not unplaced, f"add {unplaced} to LAYERS here and to docs/ARCHITECTURE.md"
    assert not sorted(set(LAYERS) - set(_graph())), "LAYERS names modules that no longer exist"


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_module_imports_only_its_layer_and_below(module):
    upward = sorted(
        f"{other} (layer {LAYERS[other]})" for other in _graph()[module] if LAYERS[other] > LAYERS[module]
    )
    assert not upward, f"{module} (layer {LAYERS[module]}) imports {upward}"


def test_every_module_says_what_it_owns():
    missing = sorted(
        name
        for name, path in ((_module_name(p), p) for p in PACKAGE.rglob("*.py"))
        if not ast.get_docstring(ast.parse(path.read_text()))
    )
    assert not missing, f"modules without an opening docstring: {missing}"
