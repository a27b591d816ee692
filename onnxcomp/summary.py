"""Model summary for ``onnxcomp inspect``: versions, inputs/outputs, ops, parameters, external data.

Parameters are attributed to the op type of the node that consumes the initializer (an initializer
read by several op types is counted once, under the first consumer in graph order; unconsumed
initializers are listed under ``(unused)``). Sizes of external tensors come from their metadata:
no tensor is read to build the summary, except the constant chains that decode bit-packed weights
(:func:`packed_weights`: onnxruntime decodes them to count the nonzero weights).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import model_inputs
from onnxcomp.graph import attribute_weights, lift_constants, weight_tensors
from onnxcomp.io import clone_model, external_data_files, onnx_opset, source_path
from onnxcomp.ops import (
    DECODE_INPUT_ROLES,
    OUTPUT_ELEMENTS,
    QUANT_PARAM_INPUTS,
    QUANT_SCALE_OUTPUTS,
    QUANTIZED_WEIGHT_INPUTS,
    is_constant_node,
)
from onnxcomp.passes.cleanup import op_histogram

__all__ = ["packed_weights", "summarize_model", "weight_counts"]

_CONTROL_FLOW = ("If", "Loop", "Scan")


def _shape_str(value: ir.Value) -> str:
    if value.shape is None:
        return "?"
    return "[" + ",".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape) + "]"


def _io(value: ir.Value) -> dict[str, Any]:
    return {
        "name": value.name,
        "dtype": value.dtype.name.lower() if value.dtype is not None else "?",
        "shape": _shape_str(value),
    }


def summarize_model(model: ir.Model) -> dict[str, Any]:
    """A JSON-ready dict describing ``model`` (see module docstring)."""
    params: dict[str, dict[str, int]] = collections.defaultdict(
        lambda: {"tensors": 0, "parameters": 0, "bytes": 0}
    )
    external_bytes = 0

    def count(value: ir.Value, tensor: ir.TensorProtocol) -> None:
        uses = value.uses()
        row = params[uses[0].node.op_type if uses else "(unused)"]
        row["tensors"] += 1
        row["parameters"] += int(tensor.size)
        row["bytes"] += int(tensor.nbytes)

    # Exporters such as paddle2onnx keep weights in Constant nodes rather than initializers.
    for value, tensor in weight_tensors(model):
        count(value, tensor)
        if isinstance(tensor, ir.ExternalTensor):
            external_bytes += int(tensor.nbytes)
    storage = _storage(model)
    hist = op_histogram(model)
    control_flow = {op: hist[op] for op in _CONTROL_FLOW if hist.get(op)}
    inputs = [s.name for s in model_inputs(model) if not s.optional]
    src = source_path(model)
    return {
        "path": str(src) if src else None,
        "ir_version": model.ir_version,
        "opset": onnx_opset(model),
        "opset_imports": dict(model.opset_imports),
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "inputs": [_io(v) for v in model.graph.inputs if v.name in inputs],
        "outputs": [_io(v) for v in model.graph.outputs],
        "nodes": sum(hist.values()),
        "op_types": dict(hist.most_common()),
        "parameters": sum(r["parameters"] for r in params.values()),
        "parameter_bytes": sum(r["bytes"] for r in params.values()),
        "parameters_by_op": dict(sorted(params.items(), key=lambda kv: -kv[1]["bytes"])),
        "weights": _counts(storage),
        "attribute_weights": attribute_weights(model),
        "packed": packed_weights(model, storage),
        "external_data": {
            "files": sorted(external_data_files(model)),
            "bytes": external_bytes,
        },
        "subgraphs": {"count": len(list(model.graph.subgraphs())), "control_flow_ops": control_flow},
        "functions": len(model.functions),
    }


_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _elements(value: ir.Value) -> int | None:
    if value.const_value is not None:
        return int(value.const_value.size)
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return int(np.prod(value.shape.dims, dtype=np.int64))
    return None


def weight_counts(model: ir.Model) -> dict[str, int]:
    """Weights apart from quantization parameters, as element counts.

    ``weight_elements`` counts the elements of the weight tensors the model computes with, however
    they are stored: a float initializer, an int8/int4 tensor behind a DequantizeLinear, a 4-bit
    MatMulNBits weight (N x K, though packed two per byte), cluster labels decoded through a
    codebook, bit-packed in one stream or not. ``quant_params`` counts what the storage adds:
    scales, zero points, codebook entries and what scales them. ``other`` counts the remaining
    constants (shapes, indices, the integer plumbing of a decoding chain: channel offsets, bit
    shifts, slice bounds). The inputs of quantized ops come from the tables
    :data:`~onnxcomp.ops.QUANT_PARAM_INPUTS` and :data:`~onnxcomp.ops.QUANTIZED_WEIGHT_INPUTS`;
    a *decoded* weight is the output of a chain of nodes whose inputs are all constant
    (DequantizeLinear of an initializer, Cast -> Gather of a codebook), counted once where a
    computing node reads it; the roles inside a chain come from
    :data:`~onnxcomp.ops.DECODE_INPUT_ROLES`. :func:`packed_weights` describes bit-packed storage.
    Tensors held by Constant nodes (paddle2onnx's and tf2onnx's weights) count as initializers do.
    """
    return _counts(_storage(model))


def _counts(storage: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in storage.items() if k in ("weight_elements", "quant_params", "other")}


_INDEX_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


def _storage(model: ir.Model) -> dict[str, Any]:
    """:func:`weight_counts`, and the decoded weights read from a bit-packed stream (``packed``:
    (value, elements) pairs), the packed streams (``streams``) and the codebooks their labels pick
    from (``packed_codebook_entries``)."""
    if any(is_constant_node(node) for node in model.graph.all_nodes()):
        model = clone_model(model)
        lift_constants(model)
    constant: set[int] = set()
    initializers: list[ir.Value] = []
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                constant.add(id(value))
                initializers.append(value)
    decode: set[int] = set()
    decode_nodes: list[ir.Node] = []
    for node in model.graph.all_nodes():  # topological order: producers first
        inputs = [v for v in node.inputs if v is not None]
        if inputs and all(id(v) in constant for v in inputs):
            decode.add(id(node))
            decode_nodes.append(node)
            constant.update(id(out) for out in node.outputs)

    def is_scale(value: ir.Value | None) -> bool:
        producer = value.producer() if value is not None else None
        return producer is not None and value.index() in (QUANT_SCALE_OUTPUTS.lookup(producer, model) or ())

    def role(node: ir.Node, index: int) -> str | None:
        params = QUANT_PARAM_INPUTS.lookup(node, model) or ()
        if index in params:
            return "param"
        if node.op_type == "Mul" and any(is_scale(v) for i, v in enumerate(node.inputs) if i != index):
            return "param"
        packed = QUANTIZED_WEIGHT_INPUTS.lookup(node, model) or {}
        return "weight" if index in packed else None

    def sources(value: ir.Value) -> list[ir.Value]:
        """The initializers a constant value is computed from (itself when it is one)."""
        found, stack, seen = [], [value], set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if v.const_value is not None and v.producer() is None:
                found.append(v)
                continue
            producer = v.producer()
            if producer is not None and id(producer) in decode:
                stack.extend(x for x in producer.inputs if x is not None)
        return found

    def carrier_elements(value: ir.Value) -> int:
        """Elements of a decoded weight whose shape is unknown (a model loaded from a file carries
        no intermediate shapes): those of the largest initializer it is decoded from."""
        best, stack, seen = 0, [value], set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if v.const_value is not None:
                best = max(best, int(v.const_value.size))
                continue
            producer = v.producer()
            if producer is not None:
                stack.extend(x for i, x in enumerate(producer.inputs) if x is not None and role(producer, i) != "param")
        return best

    def decoded_elements(value: ir.Value) -> int:
        """Elements of a decoded weight: its shape, else what its producer's constant inputs tell
        (a Reshape to a constant shape, a Split of a stream shared by every tensor: the sparse
        format), else :func:`carrier_elements`."""
        known = _elements(value)
        if known is not None:
            return known
        producer = value.producer()
        rule = OUTPUT_ELEMENTS.lookup(producer, model) if producer is not None else None
        if rule is not None:

            def constant(i: int):
                v = producer.inputs[i] if i < len(producer.inputs) else None
                return v.const_value.numpy() if v is not None and v.const_value is not None else None

            def elements(i: int) -> int | None:
                v = producer.inputs[i] if i < len(producer.inputs) else None
                return decoded_elements(v) if v is not None else None

            count = rule(producer, value.index(), constant, elements)
            if count is not None:
                return count
        return carrier_elements(value)

    # the roles of a decoding chain's initializers: a codebook's side, the labels' side, bit streams
    sides: dict[str, set[int]] = {"codebook": set(), "index": set(), "packed": set()}
    packed_codebook_entries = 0
    for node in decode_nodes:
        for index, side in (DECODE_INPUT_ROLES.lookup(node, model) or {}).items():
            if index < len(node.inputs) and node.inputs[index] is not None:
                sides[side].update(id(v) for v in sources(node.inputs[index]))
    for node in decode_nodes:  # the codebooks whose labels are unpacked from a bit stream
        roles = DECODE_INPUT_ROLES.lookup(node, model) or {}
        table = next((i for i, r in roles.items() if r == "codebook"), None)
        labels = next((i for i, r in roles.items() if r == "index"), None)
        if table is not None and labels is not None and len(node.inputs) > max(table, labels) \
                and any(id(v) in sides["packed"] for v in sources(node.inputs[labels])):
            packed_codebook_entries += decoded_elements(node.inputs[table])

    weights = params = other = 0
    decoded_stored = decoded = 0  # chains without a codebook: stored carrier plus its parameters
    codebook_params: set[int] = set()  # chains with one: everything but the labels' side
    packed: list[tuple[ir.Value, int]] = []
    seen_decoded: set[int] = set()
    for node in model.graph.all_nodes():
        if id(node) in decode:
            continue
        for index, value in enumerate(node.inputs):
            if value is None or id(value) in seen_decoded or value.const_value is not None:
                continue
            if id(value) in constant and role(node, index) is None and value.dtype in (None, *_FLOAT_TYPES):
                seen_decoded.add(id(value))
                count = decoded_elements(value)
                decoded_from = {id(v) for v in sources(value)}
                weights += count
                if decoded_from & sides["codebook"]:
                    codebook_params.update(decoded_from - sides["index"])
                else:
                    decoded += count
                if decoded_from & sides["packed"]:
                    packed.append((value, count))
    for value in initializers:
        uses = value.uses()
        roles = {role(use.node, use.idx) for use in uses if id(use.node) not in decode}
        size = int(value.const_value.size)
        if uses and all(id(use.node) in decode or role(use.node, use.idx) == "param" for use in uses) \
                and any(id(use.node) in decode for use in uses):
            # part of a decoding chain
            if id(value) in sides["packed"]:
                continue  # a bit stream: the labels of decoded weights, counted as those
            if value.dtype in _INDEX_TYPES or (id(value) in sides["index"] and sides["packed"]):
                other += size  # offsets, shifts, shapes, slice bounds, split sizes
            elif id(value) in codebook_params and id(value) not in sides["index"]:
                params += size
            elif id(value) not in sides["index"]:
                decoded_stored += size
        elif uses and roles == {"param"}:
            params += size
        elif "weight" in roles:
            use = next(u for u in uses if role(u.node, u.idx) == "weight")
            count = (QUANTIZED_WEIGHT_INPUTS.lookup(use.node, model) or {}).get(use.idx)
            weights += count(use.node) if count is not None else size
        elif value.dtype in _FLOAT_TYPES:
            weights += size
        else:
            other += size
    # A chain without a codebook stores its weight's elements (integer codes) plus parameters.
    params += max(decoded_stored - decoded, 0)
    streams = [v for v in initializers if id(v) in sides["packed"]]
    return {"weight_elements": weights, "quant_params": params, "other": other, "packed": packed,
            "streams": streams, "packed_codebook_entries": packed_codebook_entries}


def packed_weights(model: ir.Model, storage: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The weights stored bit-packed (clustering's ``sparse`` format, the deep-compression route),
    or None when there are none: how many tensors and weights, the bytes and bits of the streams
    that hold their labels (bits per weight), the codebook entries the labels pick from, and the
    sparse values: the weights that are not zero once decoded (onnxruntime decodes the constant
    chain, as it does at session creation)."""
    storage = storage or _storage(model)
    if not storage["packed"]:
        return None
    nbytes = sum(int(v.const_value.nbytes) for v in storage["streams"])
    weights = sum(count for _, count in storage["packed"])
    return {"tensors": len(storage["packed"]), "weights": weights, "bytes": nbytes, "bits": 8 * nbytes,
            "bits_per_weight": 8 * nbytes / weights if weights else None,
            "codebook_entries": storage["packed_codebook_entries"],
            "sparse_values": _nonzero_decoded(model, [v for v, _ in storage["packed"]])}


def _nonzero_decoded(model: ir.Model, values: list[ir.Value]) -> int | None:
    """Nonzero elements of the constant ``values`` (decoded weights), computed by onnxruntime on a
    model that holds only the constant nodes they come from; None when it cannot."""
    from onnxcomp.graph import infer_types
    from onnxcomp.io import clone_model
    from onnxcomp.runtime import run_model

    names = [v.name for v in values]
    if any(not name for name in names):
        return None
    clone = clone_model(model)
    graph = clone.graph
    wanted = set(names)
    needed: set[int] = set()
    stack = [v for node in graph for v in node.outputs if v.name in wanted]
    while stack:  # the nodes the values are computed by
        producer = stack.pop().producer()
        if producer is not None and id(producer) not in needed:
            needed.add(id(producer))
            stack.extend(v for v in producer.inputs if v is not None)
    graph.outputs.clear()
    for node in reversed(list(graph)):
        if id(node) not in needed:
            graph.remove(node, safe=False)
    graph.inputs.clear()
    outputs = {v.name: v for node in graph for v in node.outputs if v.name in wanted}
    if len(outputs) != len(wanted):  # decoded inside a subgraph: not counted rather than undercounted
        return None
    graph.outputs.extend(outputs[name] for name in names)
    try:
        if any(v.dtype is None for v in graph.outputs):
            infer_types(clone)
        decoded = run_model(clone, [{}])[0]
    except Exception:  # onnxruntime's own errors too: a description, not a verdict (the count is left out)
        return None
    return int(sum(np.count_nonzero(array) for array in decoded))
