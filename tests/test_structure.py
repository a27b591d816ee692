"""Package structure: no import cycles, product code never imports onnxcomp.testing, io has no sessions.

The import graph counts every ``import`` statement, module level or inside a function (a lazy import
is still a dependency), and ``importlib.import_module("onnxcomp...")`` calls with a literal name.
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
            elif isinstance(node, ast.ImportFrom) and (module := _absolute(node, name, path)):
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)
            elif (dynamic := _dynamic_import(node)) is not None:
                targets.add(dynamic)
        graph[name] = {t for t in targets if t in mods and t != name and t != "onnxcomp"}
    return graph


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str | None:
    """The module a ``from ... import`` reads, relative imports resolved against ``module``."""
    if node.level == 0:
        return node.module
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else [])) or None


def _dynamic_import(node: ast.AST) -> str | None:
    """The literal module name of an ``import_module("...")`` / ``__import__("...")`` call."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


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


def test_import_graph_resolves_relative_imports():
    def resolved(code: str, module: str, file: str) -> list[str]:
        return [_absolute(n, module, Path(file)) for n in ast.walk(ast.parse(code)) if isinstance(n, ast.ImportFrom)]

    assert resolved("from . import testing\nfrom ..io import load_model\nfrom .static import x\n",
                    "onnxcomp.quant.api", "api.py") == ["onnxcomp.quant", "onnxcomp.io", "onnxcomp.quant.static"]
    assert resolved("from .static import x\n", "onnxcomp.quant", "__init__.py") == ["onnxcomp.quant.static"]
    assert resolved("from onnxcomp import testing\n", "onnxcomp.check", "check.py") == ["onnxcomp"]


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_import_graph_sees_dynamic_imports(tmp_path):
    tree = ast.parse("import importlib\nimportlib.import_module('onnxcomp.io')\n__import__('onnxcomp.ops')\n")
    assert {n for node in ast.walk(tree) if (n := _dynamic_import(node))} == {"onnxcomp.io", "onnxcomp.ops"}


def test_command_modules_import_the_shared_helpers_not_the_cli():
    """``onnxcomp.cli`` imports the command modules; they take their helpers from cli_common."""
    graph = import_graph()
    commands = {m for m in graph if m.endswith(".cli") and m != "onnxcomp.cli"}
    assert commands <= graph["onnxcomp.cli"], commands - graph["onnxcomp.cli"]
    assert sorted(m for m in commands if "onnxcomp.cli" in graph[m]) == []
    assert all("onnxcomp.cli_common" in graph[m] for m in commands)
    assert "onnxcomp.cli" not in graph["onnxcomp.cli_common"]


def _catches_import_errors(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(n is None or (isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError",
                                                                    "Exception", "BaseException"))
               for n in names)


def test_no_import_error_of_the_package_is_swallowed():
    """An ``import onnxcomp...`` never sits in a ``try`` whose handler would catch its ImportError
    (an optional third-party package may: the handler then names what to install)."""
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Try) or not any(_catches_import_errors(h) for h in node.handlers):
                continue
            for inner in (n for stmt in node.body for n in ast.walk(stmt)):
                module = (inner.module if isinstance(inner, ast.ImportFrom) else
                          inner.names[0].name if isinstance(inner, ast.Import) else _dynamic_import(inner))
                if module and module.split(".")[0] == "onnxcomp":
                    offenders.append(f"{name}:{inner.lineno}")
    assert offenders == []


#: Layering: a package prefix -> the onnxcomp packages its modules never import (anywhere in their
#: body, lazily too). The generic passes (cleanup, compaction, specialization) serve every
#: compression method, so they take their graph analysis from onnxcomp.analysis / onnxcomp.ops,
#: never from a method's package.
FORBIDDEN_IMPORTS = {
    "onnxcomp.passes": ("onnxcomp.quant", "onnxcomp.prune", "onnxcomp.cluster", "onnxcomp.sparsity"),
    "onnxcomp.analysis.excitation": ("onnxcomp.quant", "onnxcomp.passes"),
}


def test_layering_rules():
    graph = import_graph()
    offenders = sorted(f"{m} -> {dep}" for m, deps in graph.items() for layer, banned in FORBIDDEN_IMPORTS.items()
                       if m == layer or m.startswith(layer + ".")
                       for dep in deps if any(dep == b or dep.startswith(b + ".") for b in banned))
    assert offenders == []
    # the rule sees the lazy import cleanup used to hold
    assert "onnxcomp.analysis.excitation" in graph["onnxcomp.passes.cleanup"]


def test_product_code_never_imports_testing():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if "onnxcomp.testing" in deps and m != "onnxcomp.testing")
    assert offenders == []


def test_io_creates_no_sessions():
    """Sessions, session options and optimized-graph export live in onnxcomp.runtime."""
    source = (PACKAGE / "io.py").read_text(encoding="utf-8")
    assert "onnxruntime" not in {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert "InferenceSession(" not in source


#: Modules whose own pattern matching compares op types (a rewrite looks for Add after MatMul,
#: a DequantizeLinear of a constant, ...), with the most comparisons each may hold. Knowledge about
#: ops themselves (weight axes, bias slots, channel rules, attribute defaults) lives in ops.py, so
#: this list only shrinks; a module not listed may hold none.
OP_TYPE_COMPARISONS = {
    "onnxcomp/quant/equalize.py": 15,
    "onnxcomp/quant/bias_correction.py": 5,
    "onnxcomp/prune/reconstruct.py": 8,
    "onnxcomp/quant/weight_only.py": 7,
    "onnxcomp/quant/smoothquant.py": 6,
    "onnxcomp/quant/qdq.py": 5,
    "onnxcomp/prune/fold.py": 5,
    "onnxcomp/prune/importance.py": 1,
    "onnxcomp/cluster/passes.py": 1,
    "onnxcomp/summary.py": 1,
    "onnxcomp/passes/cleanup.py": 2,
    "onnxcomp/quant/subgraphs.py": 1,  # If branches
    "onnxcomp/sparsity/storage.py": 2,  # a MatMul's bias: the constant of the Add after it
    "onnxcomp/quant/transformer.py": 13,  # encoder detection: the attention head split, the fused ops' types
}


def _is_op_type(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "op_type") or (
        isinstance(node, ast.Name) and node.id == "op_type")


def _op_type_comparisons(source: str | Path) -> int:
    """``x.op_type == ...`` / ``!=`` comparisons (either side; a variable named ``op_type`` too) and
    ``match x.op_type:`` statements in a module's code."""
    text = source.read_text(encoding="utf-8") if isinstance(source, Path) else source
    count = 0
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            count += any(_is_op_type(side) for side in [node.left, *node.comparators])
        elif isinstance(node, ast.Match) and _is_op_type(node.subject):
            count += 1
    return count


def test_the_op_type_counter_sees_every_spelling():
    source = (
        "if node.op_type == 'Conv': pass\n"
        "if 'Relu' != n.op_type: pass\n"
        "if op_type == 'Gemm': pass\n"
        "match node.op_type:\n    case 'Add': pass\n"
        "if node.op_type in ('Conv', 'Gemm'): pass\n"  # membership in a set of op types: not counted
        "if node.domain == '': pass\n"
    )
    assert _op_type_comparisons(source) == 4


def test_op_type_comparisons_only_in_pattern_matching_modules():
    found = {}
    for name, path in _modules().items():
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if rel == "onnxcomp/ops.py":
            continue
        n = _op_type_comparisons(path)
        if n > OP_TYPE_COMPARISONS.get(rel, 0):
            found[rel] = n
    assert found == {}, f"op type comparisons beyond the allowance (move the op knowledge into ops.py): {found}"


def test_weight_axes_come_from_the_ops_table():
    import onnx_ir as ir

    from onnxcomp.ops import bias_input, weight_axes

    def node(op, **ints):
        return ir.Node("", op, inputs=[], attributes=[ir.AttrInt64(k, v) for k, v in ints.items()])

    assert weight_axes(node("Conv")) == (0, 1)
    assert weight_axes(node("ConvTranspose")) == (1, 0)
    assert weight_axes(node("Gemm")) == (1, 0)
    assert weight_axes(node("Gemm", transB=1)) == (0, 1)
    assert weight_axes(node("MatMul")) == (-1, -2)
    assert (bias_input(node("Conv")), bias_input(node("Gemm")), bias_input(node("MatMul"))) == (2, 2, None)
