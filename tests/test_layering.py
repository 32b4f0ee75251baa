"""The package's layers (docs/ARCHITECTURE.md, "Layers"): no import goes upward, none forms a cycle.

Every ``import`` / ``from ... import`` in ``src/cpnn`` counts, including the ones inside
functions (a lazy import still ties the layers together)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module may import from its own layer and the layers below it. The same
# table is drawn in docs/ARCHITECTURE.md.
LAYERS: List[Set[str]] = [
    {"cpnn", "cpnn._constants", "cpnn.errors", "cpnn.utils", "cpnn._numerics", "cpnn.config",
     "cpnn.presets", "cpnn.metrics", "cpnn.outputs", "cpnn.runfolder"},
    {"cpnn.image", "cpnn.data", "cpnn.module"},
    {"cpnn.encoders", "cpnn.prototypes", "cpnn.train"},
    {"cpnn.model"},
    {"cpnn.plot", "cpnn.export"},
    {"cpnn.viewer"},
    {"cpnn.workflows"},
    {"cpnn.evaluate"},
    {"cpnn.api", "cpnn.cli*", "cpnn.__main__"},
]


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(name: str, modules: Set[str]) -> str:
    """The longest known module ``name`` refers to (``cpnn.a.b.attr`` -> ``cpnn.a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph(src: Path = SRC) -> Dict[str, Set[str]]:
    """Module -> the cpnn modules it imports (anywhere in the file)."""
    files = {module_name(p, src): p for p in (src / "cpnn").rglob("*.py")}
    modules = set(files)
    graph: Dict[str, Set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                names = [f"{stem}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if n.split(".")[0] == "cpnn":
                    t = _resolve(n, modules)
                    if t and t != mod:
                        targets.add(t)
        graph[mod] = targets
    return graph


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a module (by its first two name parts)."""
    unit = ".".join(module.split(".")[:2])
    for i, layer in enumerate(LAYERS):
        for pattern in layer:
            if unit == pattern or (pattern.endswith("*") and unit.startswith(pattern[:-1])):
                return i
    raise KeyError(f"{module} is in no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)")


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for mod in import_graph():
        layer_of(mod)


def test_no_upward_import():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("case", ["upward", "cycle"])
def test_the_checks_catch_a_bad_package(tmp_path, case):
    # a miniature cpnn with the two faults this test exists for
    pkg = tmp_path / "cpnn"
    for sub in ("model", "evaluate", "workflows"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    if case == "upward":
        (pkg / "model" / "cpnn_model.py").write_text("def f():\n    from ..evaluate.metrics import x\n")
        (pkg / "evaluate" / "metrics.py").write_text("x = 1\n")
        bad = upward_imports(import_graph(tmp_path))
        assert bad == ["cpnn.model.cpnn_model (layer 3) imports cpnn.evaluate.metrics (layer 7)"]
    else:
        (pkg / "workflows" / "fit.py").write_text("def f():\n    from .pseudobulk import g\n")
        (pkg / "workflows" / "pseudobulk.py").write_text("from .fit import f\n")
        assert import_cycles(import_graph(tmp_path)) == [["cpnn.workflows.fit", "cpnn.workflows.pseudobulk"]]
