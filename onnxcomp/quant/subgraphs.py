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

Loop and Scan bodies are handled the same way, with their own formal inputs first: the op is
emulated step by step on each calibration feed (the float body run by onnxruntime, its carried
state fed back), and the body's feeds are its per-iteration inputs, at most 32 per calibration
feed (evenly spread over the iterations, at most 4096 emulated) and 256 in all. One set of
scales serves every iteration, as a static Q/DQ must. A quantized body is kept only where
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

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.graph import all_value_names, stream_values, unique_name
from onnxcomp.ops import COMPUTE_OPS, is_default_domain, linear_spec
from onnxcomp.quant.primitives import quantize_weight
from onnxcomp.quant.recurrent import dequantized_weight

__all__ = ["quantize_branches", "branch_units", "restore_float_body", "weight_only_int8"]

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


def _graft(model: ir.Model, node: ir.Node, attr: str, quantized: ir.Model, formal: int = 0) -> None:
    """Make ``quantized``'s graph the subgraph ``attr`` of ``node``: its first ``formal`` inputs
    stay the subgraph's own (a Loop or Scan body's), the others read the outer scope again."""
    graph = quantized.graph
    old = node.attributes[attr].value
    outer = {v.name: v for v in model.graph.inputs}
    outer.update(model.graph.initializers)
    outer.update({v.name: v for n in model.graph for v in n.outputs if v.name})
    for value in list(graph.inputs)[formal:]:
        value.replace_all_uses_with(outer[value.name])
    del graph.inputs[formal:]
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


@dataclasses.dataclass(frozen=True)
class _BodyKind:
    """How calibration feeds for a subgraph of one control-flow op are produced.

    ``feeds(node, attr, inputs, formal, run)`` yields the body's own formal inputs for one
    main-graph feed: ``inputs`` are the node's input values by position (None where absent),
    ``formal`` the body's formal input names, ``run(feed)`` runs the float body once.
    ``emulated``: the body runs once per iteration, so onnxruntime's fusion inside it is checked.
    """

    attrs: tuple[str, ...]
    feeds: Callable[..., Iterator[dict[str, np.ndarray]]]
    min_opset: int = 1
    emulated: bool = False


_MAX_STEPS = 4096  # iterations emulated per calibration feed at most
_MAX_RECORDED = 32  # body feeds recorded per calibration feed (evenly spread over the steps)
_MAX_FEEDS = 256  # body feeds per subgraph in all


def _if_feeds(node, attr, inputs, formal, run):
    if bool(np.asarray(inputs[0]).reshape(-1)[0]) == (attr == "then_branch"):
        yield {}


def _stride(steps: int | None) -> int:
    return 1 if not steps else max(1, -(-steps // _MAX_RECORDED))


def _loop_feeds(node, attr, inputs, formal, run):
    """Emulates ``Loop``: iteration ``i`` feeds ``(i, cond, carried...)`` to the body and takes
    ``(cond, carried...)`` back from its outputs."""
    trips = None if inputs[0] is None else int(np.asarray(inputs[0]).reshape(-1)[0])
    cond = True if len(inputs) < 2 or inputs[1] is None else bool(np.asarray(inputs[1]).reshape(-1)[0])
    carried = list(inputs[2:])
    stride = _stride(min(trips, _MAX_STEPS) if trips is not None else None)
    i = 0
    while cond and (trips is None or i < trips) and i < _MAX_STEPS:
        feed = {formal[0]: np.array(i, np.int64), formal[1]: np.array(cond), **dict(zip(formal[2:], carried))}
        if i % stride == 0:
            yield feed
        outs = run(feed)
        cond, carried = bool(np.asarray(outs[0]).reshape(-1)[0]), list(outs[1:1 + len(carried)])
        i += 1


def _scan_feeds(node, attr, inputs, formal, run):
    """Emulates ``Scan`` (opset >= 9): step ``t`` feeds the states and the ``t``-th slice of each
    scan input (along its axis, in its direction) and takes the states back."""
    m = node.attributes.get_int("num_scan_inputs", 0)
    n = len(inputs) - m
    states, scans = list(inputs[:n]), [np.asarray(a) for a in inputs[n:]]
    axes = [a % s.ndim for a, s in zip(node.attributes.get_ints("scan_input_axes", [0] * m), scans)]
    dirs = list(node.attributes.get_ints("scan_input_directions", [0] * m))
    steps = min(scans[0].shape[axes[0]] if scans else 0, _MAX_STEPS)
    stride = _stride(steps)
    for t in range(steps):
        elems = [np.take(s, t if d == 0 else s.shape[a] - 1 - t, axis=a) for s, a, d in zip(scans, axes, dirs)]
        feed = {**dict(zip(formal[:n], states)), **dict(zip(formal[n:], elems))}
        if t % stride == 0:
            yield feed
        states = list(run(feed)[:n])


_KINDS: dict[tuple[str, str], _BodyKind] = {
    ("", "If"): _BodyKind(_BRANCHES, _if_feeds),
    ("", "Loop"): _BodyKind(("body",), _loop_feeds, emulated=True),
    ("", "Scan"): _BodyKind(("body",), _scan_feeds, min_opset=9, emulated=True),
}


def _kind(node: ir.Node, opset: int) -> _BodyKind | None:
    kind = _KINDS.get(("", node.op_type)) if is_default_domain(node.domain) else None
    return kind if kind is not None and opset >= kind.min_opset else None


def _body_feeds(model: ir.Model, node: ir.Node, kind: _BodyKind, attr: str, standalone: ir.Model,
                reads: list[str], data: Dataset) -> list[dict[str, np.ndarray]]:
    """The standalone body's calibration feeds: the outer values it reads, captured on every main
    feed, plus its own formal inputs as the op would pass them (emulated step by step)."""
    from onnxcomp.runtime import create_session, session_options

    formal = [v.name for v in node.attributes[attr].value.inputs]
    session = None

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        nonlocal session
        if session is None:
            session = create_session(standalone, sess_options=session_options("basic"))
        return session.run(None, feed)

    streamed = [v.name for v in node.inputs if v is not None and v.const_value is None]
    feeds: list[dict[str, np.ndarray]] = []
    for values in stream_values(model, [*reads, *streamed], data):
        inputs = [None if v is None else (v.const_value.numpy() if v.const_value is not None else values[v.name])
                  for v in node.inputs]
        outer = {n: values[n] for n in reads}
        for step in kind.feeds(node, attr, inputs, formal, lambda f: run({**f, **outer})):
            feeds.append({**step, **outer})
            if len(feeds) >= _MAX_FEEDS:
                return feeds
    return feeds


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


def _detach(graph: ir.Graph) -> None:
    """Drop the uses a discarded graph's nodes hold on outer values."""
    for node in graph.all_nodes():
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)


def _drop_unread(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Drop the outer initializers among ``values`` that no node of the model reads any more (a
    quantized subgraph reads its own int8 copies): left in, the file would grow by the float weights."""
    keep = {id(v) for n in graph.all_nodes() for v in n.inputs if v is not None}
    keep.update(id(v) for v in (*graph.inputs, *graph.outputs))
    for value in values:
        if id(value) not in keep and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)


def branch_units(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The subgraphs :func:`quantize_branches` calibrated and kept quantized, by its report's key
    ``node/attribute``: ``(node name, attribute)`` (the sensitivity study's units)."""
    return {key: tuple(key.rsplit("/", 1)) for key, entry in report.items()
            if isinstance(entry, dict) and entry.get("feeds")}


def restore_float_body(model: ir.Model, float_model: ir.Model, node_name: str, attr: str) -> None:
    """Put back, in ``model``, the float subgraph ``attr`` of main-graph node ``node_name`` as
    ``float_model`` (the same model before its subgraphs were quantized) has it (the sensitivity
    study's units, onnxcomp.quant.sensitivity)."""
    index = next(i for i, n in enumerate(float_model.graph) if n.name == node_name)
    node = next(n for n in model.graph if n.name == node_name)
    old = node.attributes[attr].value
    _graft(model, node, attr, _as_model(float_model, index, attr), len(old.inputs))
    _detach(old)


def weight_only_int8(model: ir.Model, nodes: Iterable[ir.Node], selector: Any, body: ir.Graph | None = None
                     ) -> tuple[dict[str, Any], list[ir.Value]]:
    """Weight-only int8 of the constant weights of the linear ops among ``nodes`` (see module
    docstring): one scale per output channel, a DequantizeLinear in the graph that owns the weight,
    or in ``body`` (an If branch whose nodes these are) for a weight of an enclosing graph.
    Returns the report (empty when nothing was stored) and the weights of enclosing graphs it
    stopped reading (see :func:`_drop_unread`)."""
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
    sites = [(i, node, kind) for i, node in enumerate(model.graph) if (kind := _kind(node, opset)) is not None]
    emulated: dict[tuple[str, str], tuple[ir.Node, ir.Graph]] = {}
    replaced: list[ir.Value] = []  # outer constants read by subgraphs that were quantized
    for index, node, kind in sites:
        if kind.attrs == _BRANCHES:
            cond = node.inputs[0]
            if cond is None or cond.const_value is not None or not cond.name:
                continue  # a constant condition: cleanup folds the If
        for attr in kind.attrs:
            where = f"{node.name}/{attr}"
            body = node.attributes[attr].value
            if not any(linear_spec(n) is not None for n in body.all_nodes()):  # nothing to quantize
                continue
            reads = [v for v in _outer_reads(body) if not (v.is_initializer() and v.const_value is not None)]
            if any(v.type is None or v.name is None for v in reads):
                report[where] = "left float: an outer value it reads has no known type"
                continue
            standalone = _as_model(model, index, attr)
            feeds = _body_feeds(model, node, kind, attr, standalone, [v.name for v in reads], data)
            if not feeds:
                why = ("no calibration feed takes this branch" if kind.attrs == _BRANCHES
                       else "no calibration feed runs an iteration")
                # an If branch holds its own DequantizeLinear (run only when taken); a loop body's
                # go to the graph owning the weight (run once, not per iteration)
                stored, outer = weight_only_int8(model, body.all_nodes(), cfg.selector,
                                                 body if kind.attrs == _BRANCHES else None)
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
            replaced.extend(v for v in _outer_reads(body) if v.is_initializer())
            _graft(model, node, attr, quantized, len(formal))
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
            _detach(node.attributes[attr].value)
            node.attributes[attr] = ir.AttrGraph(attr, original)
            report[f"{name}/{attr}"] = (f"left float: onnxruntime does not fuse its Q/DQ there "
                                        f"(it would run DequantizeLinear -> float {op} every iteration)")
    _drop_unread(model.graph, replaced)
    return report
