"""Package structure: no import cycles, product code never imports onnxcomp.testing, io has no sessions.

The import graph counts every ``import`` statement, module level or inside a function: a lazy import
is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import onnxcomp

PACKAGE = Path(onnxcomp.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the onnxcomp modules it imports (anywhere in its body)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in mods and t != name and t != "onnxcomp"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_lazy_imports():
    graph = import_graph()
    assert "onnxcomp.quant.bias_correction" in graph["onnxcomp.quant.static"]  # inside a function
    assert "onnxcomp.io" in graph["onnxcomp.runtime"]


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_product_code_never_imports_testing():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if "onnxcomp.testing" in deps and m != "onnxcomp.testing")
    assert offenders == []


def test_io_creates_no_sessions():
    """Sessions, session options and optimized-graph export live in onnxcomp.runtime."""
    source = (PACKAGE / "io.py").read_text(encoding="utf-8")
    assert "onnxruntime" not in {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert "InferenceSession(" not in source


def test_command_modules_do_not_import_the_cli():
    graph = import_graph()
    assert sorted(m for m, deps in graph.items() if "onnxcomp.cli" in deps) == ["onnxcomp.__main__"]
