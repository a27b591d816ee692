"""Static quantization inside If branches: each branch calibrated and quantized as its own model.

onnxruntime cannot return a value computed inside an If branch, so the main-graph calibration
never sees one, and a model whose compute sits in branches (silero-vad: every Conv) kept all of it
in float. Here each branch of each If of the main graph becomes a model of its own: its inputs
are the main-graph values it reads, captured on every calibration feed that takes that branch;
the outer initializers it reads are its own constants (tensors shared, not copied). That model
goes through :func:`onnxcomp.quant.api.quantize` (whose own If nodes are handled the same way, so
nested If recurse), and its graph replaces the branch: new constants become branch initializers
under names unique in the whole model, outer constants it left alone are read from the outer
scope again. A branch that no calibration feed takes stays float, said so in the report.

Loop and Scan bodies stay float: their values change from one iteration to the next.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.graph import all_value_names, stream_values, unique_name

__all__ = ["quantize_branches"]

_BRANCHES = ("then_branch", "else_branch")


def _outer_reads(branch: ir.Graph) -> list[ir.Value]:
    """Values of enclosing graphs that nodes of ``branch`` (or of graphs nested in it) read."""
    inner: set[int] = set()
    for g in (branch, *branch.subgraphs()):
        inner.update(id(v) for v in g.inputs)
        inner.update(id(v) for v in g.initializers.values())
    for node in branch.all_nodes():
        inner.update(id(v) for v in node.outputs)
    reads: dict[int, ir.Value] = {}
    for node in branch.all_nodes():
        for v in node.inputs:
            if v is not None and id(v) not in inner:
                reads.setdefault(id(v), v)
    return list(reads.values())


def _as_model(model: ir.Model, if_index: int, attr: str) -> ir.Model:
    """The branch ``attr`` of the ``if_index``-th main-graph node, detached from a clone of
    ``model`` as a model: outer activations are its inputs, outer constants its initializers."""
    clone = model.clone()
    branch = list(clone.graph)[if_index].attributes[attr].value
    inside = {id(n) for n in branch.all_nodes()}
    for outer in _outer_reads(branch):
        uses = [(u.node, u.idx) for u in outer.uses() if id(u.node) in inside]
        local = ir.Value(name=outer.name, type=outer.type, shape=outer.shape)
        if outer.is_initializer() and outer.const_value is not None:
            local.const_value = outer.const_value
            branch.register_initializer(local)
        else:
            branch.inputs.append(local)
        for node, idx in uses:
            node.replace_input_with(idx, local)
    branch.opset_imports.clear()
    branch.opset_imports.update(model.opset_imports)
    return ir.Model(branch, ir_version=model.ir_version)


def _graft(model: ir.Model, node: ir.Node, attr: str, quantized: ir.Model) -> None:
    """Make ``quantized``'s graph the branch ``attr`` of ``node``, reading the outer scope again."""
    graph = quantized.graph
    old = node.attributes[attr].value
    outer = {v.name: v for v in model.graph.inputs}
    outer.update(model.graph.initializers)
    outer.update({v.name: v for n in model.graph for v in n.outputs if v.name})
    for value in list(graph.inputs):
        value.replace_all_uses_with(outer[value.name])
    graph.inputs.clear()
    for name, value in list(graph.initializers.items()):
        mine = outer.get(name)
        if mine is not None and mine.const_value is value.const_value:  # an outer constant, untouched
            graph.initializers.pop(name)
            value.replace_all_uses_with(mine)
    # Names unique across scopes: the old branch's names are free again.
    old_names = all_value_names(old) | {v.name for v in old.outputs}
    taken = all_value_names(model.graph) - old_names
    renamed = [*graph.initializers.values(), *(v for n in graph.all_nodes() for v in n.outputs)]
    for value in renamed:
        if value.name in taken:
            new = unique_name(graph, value.name, taken)
            if value.is_initializer():
                graph.initializers.pop(value.name)
                value.name = new
                graph.register_initializer(value)
            else:
                value.name = new
        elif value.name:
            taken.add(value.name)
    graph.opset_imports.clear()
    node.attributes[attr] = ir.AttrGraph(attr, graph)


def quantize_branches(model: ir.Model, data: Dataset, config: Any, quantize: Any) -> dict[str, Any]:
    """Quantize the branches of the main graph's If nodes in place; returns a report per branch.

    ``quantize(standalone_model, feeds, config) -> (quantized_model, report)`` is the static
    pipeline (passed in: it calls this function for nested Ifs).
    """
    report: dict[str, Any] = {}
    cfg = dataclasses.replace(config, fidelity_target=None, max_drop=None, latency_aware=False)
    ifs = [(i, node) for i, node in enumerate(model.graph) if node.op_type == "If" and node.domain in ("", "ai.onnx")]
    for index, node in ifs:
        cond = node.inputs[0]
        if cond is None or cond.is_initializer() or not cond.name:
            continue  # a constant condition: cleanup folds the If
        for attr in _BRANCHES:
            where = f"{node.name}/{attr}"
            branch = node.attributes[attr].value
            if not any(n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") for n in branch.all_nodes()):
                continue
            reads = [v for v in _outer_reads(branch) if not (v.is_initializer() and v.const_value is not None)]
            if any(v.type is None or v.name is None for v in reads):
                report[where] = "left float: an outer value it reads has no known type"
                continue
            names = [v.name for v in reads]
            feeds: list[dict[str, np.ndarray]] = []
            for values in stream_values(model, [*names, cond.name], data):
                if bool(np.asarray(values[cond.name]).reshape(-1)[0]) == (attr == "then_branch"):
                    feeds.append({n: values[n] for n in names})
            if not feeds:
                report[where] = "left float: no calibration feed takes this branch"
                continue
            standalone = _as_model(model, index, attr)
            quantized, stats = quantize(standalone, feeds, cfg)
            _graft(model, node, attr, quantized)
            report[where] = {"feeds": len(feeds), "int8_nodes": stats.get("int8_nodes", 0),
                             **({"branches": stats["branches"]} if stats.get("branches") else {})}
    return report
