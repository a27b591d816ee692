"""Small graph helpers shared by the passes: type inference, exposing tensors, constants.

Nothing here changes the model it is given except where the name says so; ``with_outputs``
works on a clone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, NameFixPass, ShapeInferencePass
from onnx_ir.passes.common.naming import SimpleNameGenerator

from onnxcomp.errors import OnnxcompError, OpsetError
from onnxcomp.io import ModelSource, clone_model, load_model, onnx_opset, unique_node_names, upgrade_opset
from onnxcomp.ops import is_constant_node, is_default_domain

__all__ = [
    "working_copy",
    "detach_initializer_inputs",
    "run_feed",
    "name_nodes",
    "lift_constants",
    "weight_tensors",
    "parameter_nbytes",
    "FLOAT_TYPES",
    "infer_types",
    "with_outputs",
    "exposed",
    "stream_values",
    "produced_values",
    "constant_array",
    "unique_name",
    "add_initializer",
    "all_value_names",
    "fix_subgraph_outputs",
    "restore_model",
    "ORIGINAL_NAMES",
    "attribute_weights",
    "attribute_weights_note",
]

#: ``model.meta`` key of ``{new name: original name}`` for tensors a pass renamed (graph
#: compaction); in memory only, never written. The per-layer comparison of
#: :mod:`onnxcomp.measure.fidelity` pairs a renamed tensor with the original's.
ORIGINAL_NAMES = "onnxcomp.original_names"

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def infer_types(model: ir.Model) -> None:
    """Run ONNX shape inference in place so intermediate values carry dtypes and shapes.

    Where ONNX's inference fails (a shape the exporter declared that an opset upgrade's inference
    contradicts), onnx_ir leaves the model unchanged and logs the failure with its traceback,
    which would reach the terminal of a command that goes on fine (onnxruntime infers the types
    itself): that log is kept quiet."""
    from onnxcomp.ops import SHAPE_KEEPING_OPS, keep_shapes_through

    log = logging.getLogger(ShapeInferencePass.__module__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        ShapeInferencePass()(model)
        # ops outside the default domain that keep their input's shape (ai.onnx.ml's Scaler): ONNX
        # infers nothing after them; each round gives their outputs a shape, then infers again
        for _ in range(sum(1 for n in model.graph if (n.domain, n.op_type) in SHAPE_KEEPING_OPS)):
            if not keep_shapes_through(model):
                break
            ShapeInferencePass()(model)
    except Exception as exc:  # onnx's inference errors carry their own message
        raise OnnxcompError(f"ONNX shape inference failed on the model: {exc}") from None
    finally:
        log.setLevel(level)


def produced_values(model: ir.Model) -> dict[str, ir.Value]:
    """Values produced by nodes of the main graph, by name."""
    return {v.name: v for node in model.graph for v in node.outputs if v.name}


def with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of ``model`` whose graph also outputs the main-graph tensors ``names``.

    Types are inferred first when a value has none (onnxruntime needs typed graph outputs).
    """
    clone = clone_model(model)
    values = produced_values(clone)
    if any(values[n].dtype is None for n in names if n in values):
        infer_types(clone)
        values = produced_values(clone)
    existing = {v.name for v in clone.graph.outputs}
    for name in names:
        if name not in values:
            raise OnnxcompError(f"tensor {name!r} is not produced by a node of the main graph")
        if values[name].dtype is None:
            raise OnnxcompError(f"tensor {name!r} has no known type, even after shape inference")
        if name not in existing:
            clone.graph.outputs.append(values[name])
    return clone


@contextlib.contextmanager
def exposed(model: ir.Model, names: Sequence[str]) -> Iterator[ir.Model]:
    """``model`` with the main-graph tensors ``names`` as extra graph outputs, for the block only.

    No copy: the outputs are appended and removed again on exit, so build the session inside the
    block. A value without a type is exposed untyped (onnxruntime infers the type of a graph
    output that has none). A name no main-graph node produces is an error.
    """
    values = produced_values(model)
    wanted = list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in values]
    if missing:
        raise OnnxcompError(f"tensor {missing[0]!r} is not produced by a node of the main graph")
    outputs = model.graph.outputs
    existing = {v.name for v in outputs}
    added = [values[n] for n in wanted if n not in existing]
    outputs.extend(added)
    try:
        yield model
    finally:
        for _ in added:
            outputs.pop()


def stream_values(
    model: ir.Model,
    names: Sequence[str],
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    max_feeds: int | None = None,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """For each feed of ``data``, ``{name: value}`` of the named tensors.

    Tensors computed in the main graph come from one onnxruntime session on the model with them
    exposed as outputs (:func:`exposed`; built in memory, basic optimizations); graph inputs are read from the feed. Nothing is
    kept between feeds, so memory is bounded by one feed's tensors.
    """
    from onnxcomp.runtime import create_session, session_options

    names = list(dict.fromkeys(names))
    graph_inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in graph_inputs]
    session = None
    if computed:
        with exposed(model, computed) as exposing:
            session = create_session(exposing, sess_options=session_options("basic", threads=threads))
    for i, feed in enumerate(data):
        if max_feeds is not None and i >= max_feeds:
            return
        values = dict(zip(computed, run_feed(session, computed, feed, data))) if session is not None else {}
        yield {name: feed[name] if name in graph_inputs else values[name] for name in names}


def run_feed(session, names: list[str], feed: Mapping[str, np.ndarray], data: object) -> list[np.ndarray]:
    """``session.run`` on one feed of ``data``; onnxruntime's refusal of the feed (an index out of
    a table's range, a size the graph cannot take) names the feed when ``data`` says which it
    yielded last (:attr:`onnxcomp.data.Dataset.reading`)."""
    try:
        return session.run(names, dict(feed))
    except Exception as exc:
        where = getattr(data, "reading", None)
        if where is None or not type(exc).__module__.startswith("onnxruntime"):
            raise
        from onnxcomp.errors import DataError
        from onnxcomp.io import first_line

        raise DataError(f"{where}: onnxruntime cannot run the model on this feed: {first_line(exc)}") from None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or folded constant), or None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    """A Clip's ``(min, max)``: inputs 1 and 2 (opset 11 on) or the attributes (before); a bound
    not given is -inf / +inf, one that is not a constant scalar None. The one reader of Clip
    bounds (int8 folding, the Clip before an int8 node, equalization's homogeneity)."""
    bounds: list[float | None] = []
    for i, name, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is None:
            attr = node.attributes.get(name)
            bounds.append(attr.as_float() if attr is not None else default)
            continue
        arr = constant_array(value)
        bounds.append(float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None)
    return bounds[0], bounds[1]


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, taken: set[str] | None = None) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` under a unique name based on ``name``."""
    name = unique_name(graph, name, taken)
    tensor = ir.tensor(np.asarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, base: str, taken: set[str] | None = None) -> str:
    """``base`` or ``base_1``, ``base_2``... not used by any value of ``graph`` (or ``taken``)."""
    used = taken if taken is not None else _all_names(graph)
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def _all_names(graph: ir.Graph) -> set[str]:
    names: set[str] = set()
    for g in (graph, *graph.subgraphs()):
        names.update(v.name for v in g.inputs if v.name)
        names.update(g.initializers)
    for node in graph.all_nodes():
        names.update(v.name for v in node.outputs if v.name)
    return names


def all_value_names(graph: ir.Graph) -> set[str]:
    """Every value name in ``graph`` and its subgraphs (for :func:`unique_name`'s ``taken``).

    Subgraph inputs and initializers count too: a subgraph sees every outer name, so a new value
    named like one of them would shadow it or be shadowed.
    """
    return _all_names(graph)


def _owned_by(value: ir.Value, graph: ir.Graph) -> bool:
    """Whether ``graph`` itself defines ``value`` (a node of it, one of its inputs or initializers)."""
    producer = value.producer()
    if producer is not None:
        return producer.graph is graph
    return any(v is value for v in graph.inputs) or graph.initializers.get(value.name or "") is value


def fix_subgraph_outputs(model: ir.Model) -> int:
    """Route subgraph outputs that are outer-scope values through an Identity; returns how many.

    A rewrite that removes ``y = Identity(x)`` or ``y = Mul(x, 1)`` at the end of an If branch or
    a Loop/Scan body can leave the body returning ``x``, a value of an enclosing graph, directly;
    onnx.checker ("Graph output ... is not an output of any node") and onnxruntime ("Subgraph
    output ... is an outer scope value being returned directly") refuse that. The Identity
    restores a valid graph and computes the same thing. The main graph may return its inputs and
    initializers as they are.
    """
    fixed = 0
    taken: set[str] | None = None
    for graph in model.graph.subgraphs():
        for i, value in enumerate(list(graph.outputs)):
            if _owned_by(value, graph) and not any(v is value for v in graph.outputs[:i]):
                continue
            if taken is None:
                taken = all_value_names(model.graph)
            name = unique_name(graph, f"{value.name or 'output'}_identity", taken)
            out = ir.Value(name=name, shape=value.shape, type=value.type)
            node = ir.Node("", "Identity", [value], outputs=[out], name=f"{name}/Identity")
            graph.append(node)
            graph.outputs[i] = out
            fixed += 1
    return fixed


def restore_model(model: ir.Model, snapshot: ir.Model) -> None:
    """Make ``model`` (in place) what ``snapshot`` is: its graph (with the opset imports, which
    onnx_ir keeps in the graph) and functions.

    ``snapshot`` is a :func:`~onnxcomp.io.clone_model` taken earlier and is used up: its graph
    becomes ``model``'s.
    """
    model.graph = snapshot.graph
    functions = dict(snapshot.functions)
    model.functions.clear()
    model.functions.update(functions)
    model.ir_version = snapshot.ir_version


def iter_consumers(value: ir.Value) -> Iterable[tuple[ir.Node, int]]:
    """(node, input index) for each use of ``value``."""
    for use in value.uses():
        yield use.node, use.idx


class _OutputNameGenerator(SimpleNameGenerator):
    """Unnamed nodes are named after their first output (reports then say where they are)."""

    def generate_node_name(self, node: ir.Node) -> str:
        if node.name:
            return node.name
        if node.outputs and node.outputs[0].name:
            return f"{node.outputs[0].name}/{node.op_type}"
        return node.op_type


def name_nodes(model: ir.Model) -> None:
    """Give every node and value a unique name (unnamed nodes after their first output)."""
    NameFixPass(_OutputNameGenerator())(model)


#: IR version from which initializers need not be listed among the graph inputs.
_FREE_INITIALIZERS_IR = 4


def lift_constants(model: ir.Model) -> int:
    """Turn ``Constant`` nodes holding a tensor (``value``) into initializers, in place; returns how many.

    Paddle and tf2onnx exports (PP-OCR det/rec/cls among them) keep their weights in Constant
    nodes; every pass looks for weights as initializers. A Constant inside a subgraph becomes an
    initializer of that subgraph, so names stay in the scope they had. Constants that are graph
    outputs stay nodes (an initializer cannot be an output), and so does every Constant of a model
    older than IR version 4, where an initializer must also be a graph input.
    """
    if (model.ir_version or 0) < _FREE_INITIALIZERS_IR:
        return 0
    before = sum(1 for _ in _constant_nodes(model))
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    return before - sum(1 for _ in _constant_nodes(model))


def _constant_nodes(model: ir.Model) -> Iterator[ir.Node]:
    for node in model.graph.all_nodes():
        if is_constant_node(node):
            yield node


def weight_tensors(model: ir.Model) -> Iterator[tuple[ir.Value, ir.TensorProtocol]]:
    """(value, tensor) of every initializer (all graphs) and every Constant node holding a tensor."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value, value.const_value
    for node in _constant_nodes(model):
        if "value" in node.attributes:
            yield node.outputs[0], node.attributes["value"].as_tensor()


def parameter_nbytes(model: ir.Model) -> int:
    """Bytes of the model's weights: initializers and tensors held by Constant nodes."""
    return sum(int(tensor.nbytes) for _, tensor in weight_tensors(model))


def working_copy(model: ModelSource, min_opset: int, *, allow_upgrade: bool, notes: list[str]) -> ir.Model:
    """A working clone of ``model`` at ``min_opset`` or newer (upgraded when allowed, noted).

    Nodes and values without names get unique ones (onnx_ir's NameFixPass): passes and reports
    refer to nodes by name. The copies of a node name used twice in a graph are renamed
    (:func:`onnxcomp.io.unique_node_names`, noted). Initializers also listed as graph inputs are
    weights (:func:`detach_initializer_inputs`, noted). Constant nodes holding a tensor become
    initializers (:func:`lift_constants`), so weights stored as Constant nodes are seen as weights.
    """
    work = clone_model(load_model(model))
    opset = onnx_opset(work)
    if opset < min_opset:
        if not allow_upgrade:
            raise OpsetError(
                f"the model uses opset {opset}; this needs opset {min_opset} or newer. "
                "Allow the upgrade or convert the model first"
            )
        work = upgrade_opset(work, min_opset)
        notes.append(f"upgraded the model from opset {opset} to {min_opset} (onnx.version_converter)")
    detached = detach_initializer_inputs(work)
    if detached:
        shown = ", ".join(repr(n) for n in detached[:4]) + (", ..." if len(detached) > 4 else "")
        notes.append(f"{len(detached)} weight(s) were also listed as graph inputs ({shown}), as IR < 4 models "
                     "and some exporters list them; onnxruntime takes them as defaults a caller may replace: "
                     "they are compressed as constant weights, and the written model no longer lists them "
                     "as inputs")
    renamed = unique_node_names(work)  # done on load already, unless the model came as an onnx_ir.Model
    if renamed:
        pairs = [(name, new) for name, copies in renamed.items() for new in copies]
        shown = ", ".join(f"{name!r} -> {new!r}" for name, new in pairs[:4]) + (", ..." if len(pairs) > 4 else "")
        notes.append(f"{len(pairs)} node(s) had the name of another node of their graph, which onnxruntime "
                     f"refuses: renamed {shown}; an exclude naming such a name excludes all its nodes")
    name_nodes(work)
    lift_constants(work)
    return work


def detach_initializer_inputs(model: ir.Model) -> list[str]:
    """Remove from the main graph's inputs those that are also initializers, in place; their names.

    Models of IR version < 4 (and exporters told to keep them there) list every initializer among
    the graph inputs, which onnxruntime reads as a default the caller may replace. A compressor
    compresses weights: every command treats them as constants (as onnxruntime's
    ``remove_initializer_from_input`` tool does), so a pass never skips them as replaceable
    inputs, and the written model does not list them. The IR version is raised to 4, from which an
    initializer need not be an input (the new initializers passes add would fail the checker).
    """
    graph = model.graph
    detached = [v.name for v in graph.inputs if v.name and graph.initializers.get(v.name) is v]
    if not detached:
        return []
    kept = [v for v in graph.inputs if v.name not in detached]
    graph.inputs.clear()
    graph.inputs.extend(kept)
    model.ir_version = max(model.ir_version or 0, _FREE_INITIALIZERS_IR)
    return detached


def attribute_weights(model: ir.Model) -> dict[str, dict[str, int]]:
    """Values that nodes outside the default domain hold in float attributes, the parameters of
    scikit-learn's ai.onnx.ml operators (a LinearClassifier's coefficients, a TreeEnsemble's
    thresholds and leaf weights, an SVM's support vectors, a Scaler's offsets): ``{"domain::op":
    {"nodes": n, "values": count}}``, main graph and subgraphs. onnxcomp compresses weight tensors,
    never attributes, so these count neither as parameters nor as weights."""
    found: dict[str, dict[str, int]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if is_default_domain(node.domain):
            continue
        values = 0
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.FLOATS:
                values += len(attr.value)
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype in FLOAT_TYPES:
                values += int(attr.value.size)
            elif attr.type == ir.AttributeType.TENSORS:
                values += sum(int(t.size) for t in attr.value if t.dtype in FLOAT_TYPES)
        if values:
            row = found.setdefault(f"{node.domain}::{node.op_type}", {"nodes": 0, "values": 0})
            row["nodes"] += 1
            row["values"] += values
    return dict(sorted(found.items(), key=lambda kv: -kv[1]["values"]))


def attribute_weights_note(model: ir.Model, subject: str = "its") -> str:
    """One clause naming the weights ``model`` holds in attributes (:func:`attribute_weights`), for
    a run that compressed nothing (``"<subject> weights are attributes of ..."``); empty when it
    holds none."""
    found = attribute_weights(model)
    if not found:
        return ""
    ops = ", ".join(f"{row['nodes']} {op} node{'s' if row['nodes'] > 1 else ''} ({row['values']:,} values)"
                    for op, row in found.items())
    return (f"{subject} weights are attributes of {ops}, which onnxcomp does not compress (it compresses weight "
            "tensors: initializers and Constant nodes)")
