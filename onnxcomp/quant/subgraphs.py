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

Loop and Scan bodies are handled the same way, with their own formal inputs first: the body's
feeds are its per-iteration inputs, the op emulated step by step (:mod:`onnxcomp.bodies`, which
also detaches and grafts bodies). One set of scales serves every iteration, as a static Q/DQ must. A quantized body is kept only where
onnxruntime fuses its Q/DQ into int8 kernels: inside loop bodies it first fuses MatMul + Add
into a float Gemm, and a DequantizeLinear feeding float compute on every iteration is a loss.

A subgraph no calibration feed reaches (the 8 kHz branch of a VAD calibrated at 16 kHz) has no
activation ranges, but its weights need none: the weights of its linear ops (Conv, ConvTranspose,
Gemm, MatMul, from :data:`onnxcomp.ops.LINEAR_OPS`) are stored int8, symmetric over [-127, 127],
one scale per output channel, behind a DequantizeLinear, and the ops compute in float
(weight-only: exact to int8 weight precision whatever the inputs, and the file no longer carries
them in float). The DequantizeLinear sits in the If branch itself (it runs only when the branch
does); for a Loop/Scan body, in the graph that owns the weight (once per run, not per
iteration). The report names such a subgraph and what was stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import onnx_ir as ir

from onnxcomp.bodies import (BRANCHES, body_as_model, body_feeds, body_kind, detach_graph, drop_unread, graft_body,
                             outer_reads)
from onnxcomp.data import Dataset
from onnxcomp.graph import all_value_names
from onnxcomp.ops import COMPUTE_OPS, linear_spec
from onnxcomp.quant.primitives import quantize_weight
from onnxcomp.quant.recurrent import dequantized_weight

__all__ = ["quantize_branches", "branch_units", "restore_float_body", "bodies_hidden", "weight_only_int8"]



def _unfused_bodies(model: ir.Model, grafted: dict[tuple[str, str], Any]) -> dict[tuple[str, str], str]:
    """Grafted bodies in which onnxruntime's optimized graph still feeds a DequantizeLinear into a
    float compute op (the Q/DQ were not fused: the body would only get slower), with the op."""
    from onnxcomp.runtime import ort_optimized_model, session_options

    optimized = ort_optimized_model(model, sess_options=session_options("all"))
    found: dict[tuple[str, str], str] = {}
    for node in optimized.graph:
        for attr in node.attributes:
            if (node.name, attr) not in grafted:
                continue
            for inner in node.attributes[attr].value.all_nodes():
                if COMPUTE_OPS.lookup(inner, optimized) is None:
                    continue
                if any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                       for v in inner.inputs):
                    found[(node.name, attr)] = inner.op_type
                    break
    return found


def branch_units(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The subgraphs :func:`quantize_branches` calibrated and kept quantized, by its report's key
    ``node/attribute``: ``(node name, attribute)`` (the sensitivity study's units)."""
    return {key: tuple(key.rsplit("/", 1)) for key, entry in report.items()
            if isinstance(entry, dict) and entry.get("feeds")}


def restore_float_body(model: ir.Model, float_model: ir.Model, node_name: str, attr: str) -> None:
    """Put back, in ``model``, the float subgraph ``attr`` of main-graph node ``node_name`` as
    ``float_model`` (the same model before its subgraphs were quantized) has it (the sensitivity
    study's units, onnxcomp.quant.sensitivity).

    Raises:
        ValueError: either model has no main-graph node ``node_name`` with a subgraph ``attr``.
    """
    index = next((i for i, n in enumerate(float_model.graph) if n.name == node_name), None)
    node = next((n for n in model.graph if n.name == node_name), None)
    for where, found in (("the float model", index), ("the model", node)):
        if found is None:
            raise ValueError(f"subgraph unit {node_name}/{attr}: {where} has no node {node_name!r}")
    for where, owner in (("the float model's", list(float_model.graph)[index]), ("the model's", node)):
        graph = owner.attributes.get(attr)
        if graph is None or graph.type != ir.AttributeType.GRAPH:
            raise ValueError(f"subgraph unit {node_name}/{attr}: {where} node {node_name!r} has no subgraph {attr!r}")
    old = node.attributes[attr].value
    graft_body(model, node, attr, body_as_model(float_model, index, attr), len(old.inputs))
    detach_graph(old)


@contextlib.contextmanager
def bodies_hidden(model: ir.Model, units: Iterable[tuple[str, str]]) -> Iterator[None]:
    """Within the block, the subgraphs ``units`` (``(node name, attribute)`` of main-graph nodes)
    are out of reach of passes that walk the model (``all_nodes``, ``subgraphs``): each is
    replaced by an empty graph whose inputs carry its value names (new names made meanwhile stay
    unique), then put back as it was. The study's bodies moved to float are kept from the steps
    after the Q/DQ rewrite that reach into subgraphs (recurrent weights) this way."""
    hidden: list[tuple[ir.Node, str, ir.Graph]] = []
    by_name = {n.name: n for n in model.graph}
    try:
        for node_name, attr in units:
            node = by_name[node_name]
            body = node.attributes[attr].value
            names = sorted(all_value_names(body))
            node.attributes[attr] = ir.AttrGraph(attr, ir.Graph([ir.Value(name=n) for n in names], [], nodes=[]))
            hidden.append((node, attr, body))
        yield
    finally:
        for node, attr, body in hidden:
            node.attributes[attr] = ir.AttrGraph(attr, body)


def weight_only_int8(model: ir.Model, nodes: Iterable[ir.Node], selector: Any, body: ir.Graph | None = None
                     ) -> tuple[dict[str, Any], list[ir.Value]]:
    """Weight-only int8 of the constant weights of the linear ops among ``nodes`` (see module
    docstring): one scale per output channel, a DequantizeLinear in the graph that owns the weight,
    or in ``body`` (an If branch whose nodes these are) for a weight of an enclosing graph.
    Returns the report (empty when nothing was stored) and the weights of enclosing graphs it
    stopped reading (see :func:`drop_unread`)."""
    scope = {id(g) for g in (body, *body.subgraphs())} if body is not None else set()
    taken = all_value_names(model.graph)
    done: dict[int, ir.Value] = {}  # float weight -> its DequantizeLinear output
    floats: dict[int, ir.Value] = {}
    stored: list[str] = []
    before = after = 0
    outer: list[ir.Value] = []
    for node in list(nodes):
        spec = linear_spec(node)
        role = spec.role("weight") if spec is not None else None
        if role is None or role.input_index >= len(node.inputs) or not selector.allows(node.name or "", node.op_type):
            continue
        value = node.inputs[role.input_index]
        if (value is None or value.const_value is None or value.dtype != ir.DataType.FLOAT or value.graph is None
                or not value.is_initializer() or len(value.const_value.shape) < 2):
            continue
        if id(value) not in done:
            w = value.const_value.numpy()
            axis = role.axes(node)[0] % w.ndim
            q, scale, _ = quantize_weight(w, "int8", axis=axis, symmetric=True)
            owned_inside = body is None or id(value.graph) in scope
            done[id(value)] = dequantized_weight(value, q, scale, axis, taken, graph=None if owned_inside else body)
            floats[id(value)] = value
            before += value.const_value.nbytes
            after += q.nbytes + scale.nbytes
            if not owned_inside:
                outer.append(value)
        node.replace_input_with(role.input_index, done[id(value)])
        stored.append(node.name or node.op_type)
    for value in floats.values():  # the float copies nothing reads any more
        if not value.uses() and not value.is_graph_output() and (body is None or id(value.graph) in scope):
            value.graph.initializers.pop(value.name, None)
    return ({"nodes": stored, "weights": len(done), "bytes_before": before, "bytes_after": after} if done else {}), outer


def quantize_branches(model: ir.Model, data: Dataset, config: Any, quantize: Any) -> dict[str, Any]:
    """Quantize the subgraphs of the main graph's If, Loop and Scan nodes in place; returns a
    report per subgraph (``node/attribute``).

    ``quantize(standalone_model, feeds, config) -> (quantized_model, report)`` is the static
    pipeline (passed in: it calls this function for nested control flow). A Loop or Scan body
    whose Q/DQ onnxruntime does not fuse (it fuses MatMul + Add into a float Gemm inside loop
    bodies first, for one) is put back as it was: it would only run slower.
    """
    report: dict[str, Any] = {}
    cfg = dataclasses.replace(config, fidelity_target=None, max_drop=None, latency_aware=False)
    opset = model.opset_imports.get("", 0)
    sites = [(i, node, kind) for i, node in enumerate(model.graph) if (kind := body_kind(node, opset)) is not None]
    emulated: dict[tuple[str, str], tuple[ir.Node, ir.Graph]] = {}
    replaced: list[ir.Value] = []  # outer constants read by subgraphs that were quantized
    for index, node, kind in sites:
        if kind.attrs == BRANCHES:
            cond = node.inputs[0]
            if cond is None or cond.const_value is not None or not cond.name:
                continue  # a constant condition: cleanup folds the If
        for attr in kind.attrs:
            where = f"{node.name}/{attr}"
            body = node.attributes[attr].value
            if not any(linear_spec(n) is not None for n in body.all_nodes()):  # nothing to quantize
                continue
            reads = [v for v in outer_reads(body) if not (v.is_initializer() and v.const_value is not None)]
            if any(v.type is None or v.name is None for v in reads):
                report[where] = "left float: an outer value it reads has no known type"
                continue
            standalone = body_as_model(model, index, attr)
            feeds = body_feeds(model, node, kind, attr, standalone, [v.name for v in reads], data)
            if not feeds:
                why = ("no calibration feed takes this branch" if kind.attrs == BRANCHES
                       else "no calibration feed runs an iteration")
                # an If branch holds its own DequantizeLinear (run only when taken); a loop body's
                # go to the graph owning the weight (run once, not per iteration)
                stored, outer = weight_only_int8(model, body.all_nodes(), cfg.selector,
                                                 body if kind.attrs == BRANCHES else None)
                replaced.extend(outer)
                report[where] = ({"feeds": 0, "int8_nodes": 0, "not_calibrated": why, "weight_only_int8": stored}
                                 if stored else f"left float: {why}")
                continue
            formal = [v.name for v in body.inputs]
            quantized, stats = quantize(standalone, feeds, cfg)
            if [v.name for v in quantized.graph.inputs][:len(formal)] != formal or len(
                    quantized.graph.outputs) != len(body.outputs):
                report[where] = "left float: quantizing changed the subgraph's signature"
                continue
            replaced.extend(v for v in outer_reads(body) if v.is_initializer())
            graft_body(model, node, attr, quantized, len(formal))
            if kind.emulated and node.name:
                emulated[(node.name, attr)] = (node, body)
            recurrent = {k: v for k, v in (stats.get("recurrent") or {}).items()
                         if k in ("lstm_int8", "recurrent_weight_only", "recurrent_kept_float") and v}
            report[where] = {"feeds": len(feeds), "int8_nodes": stats.get("int8_nodes", 0),
                             **({"branches": stats["branches"]} if stats.get("branches") else {}),
                             **({"recurrent": recurrent} if recurrent else {}),
                             **({"weight_only_int8": stats["weight_only_int8"]} if stats.get("weight_only_int8") else {}),
                             **({"skipped": stats["skipped"]} if stats.get("skipped") else {})}
    if emulated:
        for (name, attr), op in _unfused_bodies(model, emulated).items():
            node, original = emulated[(name, attr)]
            detach_graph(node.attributes[attr].value)
            node.attributes[attr] = ir.AttrGraph(attr, original)
            report[f"{name}/{attr}"] = (f"left float: onnxruntime does not fuse its Q/DQ there "
                                        f"(it would run DequantizeLinear -> float {op} every iteration)")
    drop_unread(model.graph, replaced)
    return report
