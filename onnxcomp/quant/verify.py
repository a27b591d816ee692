"""Proof of fusion: count the int8 kernels in the graph onnxruntime actually runs.

Q/DQ nodes only pay off when onnxruntime fuses them with their op into an int8 kernel; a Q/DQ
pair it cannot fuse makes the model slower than float. :func:`fusion_report` reads onnxruntime's
optimized graph (``ORT_ENABLE_ALL``) and counts the int8 kernels against the float compute nodes
left (Conv, MatMul, Gemm and their fused float forms) and the Q/DQ nodes left unfused.
"""

from __future__ import annotations

import collections
from typing import Any

import onnx_ir as ir

from onnxcomp.quant.rules import FLOAT_COMPUTE, INT8_KERNELS
from onnxcomp.runtime import ort_optimized_model, session_options

__all__ = ["fusion_report"]


def fusion_report(model: ir.Model, *, threads: int | None = 1) -> dict[str, Any]:
    """Op counts of onnxruntime's optimized graph: int8 kernels, float compute, leftover Q/DQ."""
    optimized = ort_optimized_model(model, sess_options=session_options("all", threads=threads))
    counts = collections.Counter(node.op_type for node in optimized.graph.all_nodes())
    int8 = {op: n for op, n in counts.items() if op in INT8_KERNELS}
    float_compute = {op: n for op, n in counts.items() if op in FLOAT_COMPUTE}
    return {
        "int8_kernels": sum(int8.values()),
        "float_compute": sum(float_compute.values()),
        "int8_by_op": dict(sorted(int8.items())),
        "float_by_op": dict(sorted(float_compute.items())),
        "quantize_linear": counts.get("QuantizeLinear", 0) + counts.get("DynamicQuantizeLinear", 0),
        "dequantize_linear": counts.get("DequantizeLinear", 0),
    }
