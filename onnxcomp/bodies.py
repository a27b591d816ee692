"""Control-flow bodies (If branches, Loop and Scan bodies) as models of their own.

A body reads values of the enclosing graphs by name. :func:`body_as_model` detaches one from a
clone of the model: the outer activations it reads become its inputs, the outer constants its
initializers (tensors shared, not copied), so a pass can work on it as on any model;
:func:`graft_body` puts the result back, reading the outer scope again and renaming what it made
so that names stay unique in the whole model. :func:`body_feeds` gives such a model calibration
feeds: the outer values it reads, captured on every main-graph feed, plus its formal inputs as the
op passes them; Loop and Scan are emulated step by step (the float body run by onnxruntime, its
carried state fed back), at most 32 recorded steps per main feed (evenly spread, at most 4096
emulated) and 256 feeds in all. :data:`BODY_KINDS` says, per control-flow op, which attributes
hold bodies and how their feeds are made. Used by quantization and pruning inside bodies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.graph import all_value_names, stream_values, unique_name
from onnxcomp.ops import is_default_domain

__all__ = ["BODY_KINDS", "BRANCHES", "BodyKind", "body_as_model", "body_feeds", "body_kind", "detach_graph",
           "drop_unread", "graft_body", "outer_reads"]

BRANCHES = ("then_branch", "else_branch")


def outer_reads(branch: ir.Graph) -> list[ir.Value]:
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


def body_as_model(model: ir.Model, if_index: int, attr: str) -> ir.Model:
    """The branch ``attr`` of the ``if_index``-th main-graph node, detached from a clone of
    ``model`` as a model: outer activations are its inputs, outer constants its initializers."""
    clone = model.clone()
    branch = list(clone.graph)[if_index].attributes[attr].value
    inside = {id(n) for n in branch.all_nodes()}
    for outer in outer_reads(branch):
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


def graft_body(model: ir.Model, node: ir.Node, attr: str, quantized: ir.Model, formal: int = 0) -> None:
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
class BodyKind:
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


BODY_KINDS: dict[tuple[str, str], BodyKind] = {
    ("", "If"): BodyKind(BRANCHES, _if_feeds),
    ("", "Loop"): BodyKind(("body",), _loop_feeds, emulated=True),
    ("", "Scan"): BodyKind(("body",), _scan_feeds, min_opset=9, emulated=True),
}


def body_kind(node: ir.Node, opset: int) -> BodyKind | None:
    kind = BODY_KINDS.get(("", node.op_type)) if is_default_domain(node.domain) else None
    return kind if kind is not None and opset >= kind.min_opset else None


def body_feeds(model: ir.Model, node: ir.Node, kind: BodyKind, attr: str, standalone: ir.Model,
                reads: list[str], data: Dataset) -> list[dict[str, np.ndarray]]:
    """The standalone body's calibration feeds: the outer values it reads, captured on every main
    feed, plus its own formal inputs as the op would pass them (emulated step by step)."""
    from onnxcomp.runtime import create_session, session_options

    formal = [v.name for v in node.attributes[attr].value.inputs]
    # onnxruntime's Loop hands the iteration number and condition over with the rank the body
    # declares (paddle2onnx declares [1], not a scalar); the standalone body wants the same
    ranks = {v.name: v.shape.rank() for v in node.attributes[attr].value.inputs if v.shape is not None}

    def conform(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (np.reshape(a, (1,) * ranks[k]) if k in ranks and np.ndim(a) != ranks[k] and np.size(a) == 1
                    and ranks[k] <= 1 else a) for k, a in feed.items()}

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
        for step in kind.feeds(node, attr, inputs, formal, lambda f: run(conform({**f, **outer}))):
            feeds.append(conform({**step, **outer}))
            if len(feeds) >= _MAX_FEEDS:
                return feeds
    return feeds


def detach_graph(graph: ir.Graph) -> None:
    """Drop the uses a discarded graph's nodes hold on outer values."""
    for node in graph.all_nodes():
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)


def drop_unread(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Drop the outer initializers among ``values`` that no node of the model reads any more (a
    quantized subgraph reads its own int8 copies): left in, the file would grow by the float weights."""
    keep = {id(v) for n in graph.all_nodes() for v in n.inputs if v is not None}
    keep.update(id(v) for v in (*graph.inputs, *graph.outputs))
    for value in values:
        if id(value) not in keep and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
