"""Model summary for ``onnxcomp inspect``: versions, inputs/outputs, ops, parameters, external data.

Parameters are attributed to the op type of the node that consumes the initializer (an initializer
read by several op types is counted once, under the first consumer in graph order; unconsumed
initializers are listed under ``(unused)``). Sizes of external tensors come from their metadata:
no tensor is read to build the summary.
"""

from __future__ import annotations

import collections
from typing import Any

import onnx_ir as ir

from onnxcomp.data import model_inputs
from onnxcomp.graph import weight_tensors
from onnxcomp.io import external_data_files, onnx_opset, source_path
from onnxcomp.passes.cleanup import op_histogram

__all__ = ["summarize_model"]

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
        "external_data": {
            "files": sorted(external_data_files(model)),
            "bytes": external_bytes,
        },
        "subgraphs": {"count": len(list(model.graph.subgraphs())), "control_flow_ops": control_flow},
        "functions": len(model.functions),
    }
