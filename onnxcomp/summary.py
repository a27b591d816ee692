"""Model summary for ``onnxcomp inspect``: versions, inputs/outputs, ops, parameters, external data.

Parameters are attributed to the op type of the node that consumes the initializer (an initializer
read by several op types is counted once, under the first consumer in graph order; unconsumed
initializers are listed under ``(unused)``). Sizes of external tensors come from their metadata:
no tensor is read to build the summary.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import model_inputs
from onnxcomp.graph import lift_constants, weight_tensors
from onnxcomp.io import clone_model, external_data_files, onnx_opset, source_path
from onnxcomp.ops import (
    OUTPUT_ELEMENTS,
    QUANT_PARAM_INPUTS,
    QUANT_SCALE_OUTPUTS,
    QUANTIZED_WEIGHT_INPUTS,
    is_constant_node,
)
from onnxcomp.passes.cleanup import op_histogram

__all__ = ["summarize_model", "weight_counts"]

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
        "weights": weight_counts(model),
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
    codebook. ``quant_params`` counts what the storage adds: scales, zero points, codebooks,
    channel offsets. ``other`` counts the remaining constants (shapes, indices). The inputs of
    quantized ops come from the tables :data:`~onnxcomp.ops.QUANT_PARAM_INPUTS` and
    :data:`~onnxcomp.ops.QUANTIZED_WEIGHT_INPUTS`; a *decoded* weight is the output of a chain of
    nodes whose inputs are all constant (DequantizeLinear of an initializer, Cast -> Gather of a
    codebook), counted once where a computing node reads it. Tensors held by Constant nodes
    (paddle2onnx's and tf2onnx's weights) count as initializers do.
    """
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
    for node in model.graph.all_nodes():  # topological order: producers first
        inputs = [v for v in node.inputs if v is not None]
        if inputs and all(id(v) in constant for v in inputs):
            decode.add(id(node))
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

    weights = params = other = 0
    decoded_stored = decoded = 0
    seen_decoded: set[int] = set()
    for node in model.graph.all_nodes():
        if id(node) in decode:
            continue
        for index, value in enumerate(node.inputs):
            if value is None or id(value) in seen_decoded or value.const_value is not None:
                continue
            if id(value) in constant and role(node, index) is None and value.dtype in (None, *_FLOAT_TYPES):
                seen_decoded.add(id(value))
                decoded += decoded_elements(value)
    for value in initializers:
        uses = value.uses()
        roles = {role(use.node, use.idx) for use in uses if id(use.node) not in decode}
        size = int(value.const_value.size)
        if uses and all(id(use.node) in decode or role(use.node, use.idx) == "param" for use in uses) \
                and any(id(use.node) in decode for use in uses):
            decoded_stored += size  # part of a decoding chain: weight carrier plus its parameters
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
    # A decoding chain stores its weight's elements (labels, integer codes) plus parameters.
    weights += decoded
    params += max(decoded_stored - decoded, 0)
    return {"weight_elements": weights, "quant_params": params, "other": other}
