"""Cost model: parameters and multiply-accumulates of the linear ops, per sample.

MACs of a Conv are ``output elements x (C_in / group) x prod(kernel)``, of a ConvTranspose
``input elements x (C_out / group) x prod(kernel)``, of a Gemm/MatMul ``rows x K x N``. Symbolic
dimensions count as 1 (per sample, per token); unknown shapes contribute nothing and are counted
in ``unknown``. Types must have been inferred (:func:`onnxcomp.graph.infer_types`).
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir

from onnxcomp.ops import linear_spec

__all__ = ["count_cost"]


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]


def count_cost(model: ir.Model) -> dict[str, Any]:
    """Parameters (initializer elements) and MACs of Conv/ConvTranspose/Gemm/MatMul per sample."""
    macs, unknown = 0, 0
    for node in model.graph.all_nodes():
        spec = linear_spec(node)  # the linear ops of the default domain (onnxcomp.ops.LINEAR_OPS)
        if spec is None:
            continue
        x, w, y = _dims(node.inputs[0]), _dims(node.inputs[1]), _dims(node.outputs[0])
        if x is None or w is None or y is None:
            unknown += 1
            continue
        if spec.per_group == "in":  # Conv: w [C_out, C_in / group, k...]
            macs += math.prod(y) * math.prod(w[1:])
        elif spec.per_group == "out":  # ConvTranspose: w [C_in, C_out / group, k...]
            macs += math.prod(x) * math.prod(w[1:])
        else:  # Gemm / MatMul: the reduction is the data's last axis (its first under Gemm's transA)
            k = x[0] if node.attributes.get_int("transA", 0) else x[-1]
            macs += math.prod(y) * k
    params = sum(
        int(v.const_value.size)
        for g in (model.graph, *model.graph.subgraphs())
        for v in g.initializers.values()
        if v.const_value is not None
    )
    return {"parameters": params, "macs": int(macs), "unknown_shapes": unknown}
