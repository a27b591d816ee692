"""Proof of fusion: count the int8 kernels in the graph onnxruntime actually runs.

Q/DQ nodes only pay off when onnxruntime fuses them with their op into an int8 kernel; a Q/DQ
pair it cannot fuse makes the model slower than float. :func:`fusion_report` reads onnxruntime's
optimized graph (``ORT_ENABLE_ALL``) and counts the quantized kernels against the float compute
nodes left (every op :data:`onnxcomp.ops.COMPUTE_OPS` calls compute: Conv, MatMul, Gemm, their
fused float forms, LSTM/GRU/RNN, attention, Gather from a constant table, ...) and the Q/DQ nodes
left unfused. Weight-only kernels (MatMulNBits: 4-bit weights, activations float or quantized
inside the kernel) are counted among the quantized kernels and listed apart with their bits.
"""

from __future__ import annotations

import collections
from typing import Any

import onnx_ir as ir

from onnxcomp.ops import COMPUTE_OPS, QUANT_PARAM_INPUTS, is_constant_node
from onnxcomp.quant.rules import INT8_KERNELS, WEIGHT_ONLY_KERNELS
from onnxcomp.runtime import ort_optimized_model, session_options

__all__ = ["fusion_report", "float_compute_nodes", "stored_int8_tensors", "int8_tensors_added"]


def float_compute_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes of ``model`` that :data:`~onnxcomp.ops.COMPUTE_OPS` calls compute and that run in float."""
    found = []
    for node in model.graph.all_nodes():
        if node.op_type in INT8_KERNELS:
            continue
        fact = COMPUTE_OPS.lookup(node, model)
        if fact is None:
            continue
        if fact.constant_input is not None:
            inputs = node.inputs
            value = inputs[fact.constant_input] if fact.constant_input < len(inputs) else None
            if value is None or (value.const_value is None and not value.is_initializer()):
                continue
        found.append(node)
    return found


def fusion_report(model: ir.Model, *, threads: int | None = 1) -> dict[str, Any]:
    """Op counts of onnxruntime's optimized graph: quantized kernels, float compute, leftover Q/DQ.

    ``int8_kernels`` / ``int8_by_op`` count every quantized kernel (weight-only ones included);
    ``weight_only_by_op`` lists the weight-only kernels apart, ``weight_only_bits`` their weight bits.
    """
    optimized = ort_optimized_model(model, sess_options=session_options("all", threads=threads))
    counts = collections.Counter(node.op_type for node in optimized.graph.all_nodes())
    int8 = {op: n for op, n in counts.items() if op in INT8_KERNELS}
    float_compute = collections.Counter(node.op_type for node in float_compute_nodes(optimized))
    bits: dict[str, set[int]] = collections.defaultdict(set)
    for node in optimized.graph.all_nodes():
        if node.op_type in WEIGHT_ONLY_KERNELS:
            attr = node.attributes.get("bits")
            bits[node.op_type].add(attr.as_int() if attr is not None else WEIGHT_ONLY_KERNELS[node.op_type])
    return {
        "int8_kernels": sum(int8.values()),
        "float_compute": sum(float_compute.values()),
        "int8_by_op": dict(sorted(int8.items())),
        "weight_only_by_op": {op: n for op, n in sorted(int8.items()) if op in WEIGHT_ONLY_KERNELS},
        "weight_only_bits": {op: sorted(b) for op, b in sorted(bits.items())},
        "float_by_op": dict(sorted(float_compute.items())),
        "quantize_linear": counts.get("QuantizeLinear", 0) + counts.get("DynamicQuantizeLinear", 0),
        "dequantize_linear": counts.get("DequantizeLinear", 0),
    }


#: Integer types of quantized storage: int8 / uint8 (static, recurrent, embedding tables) and the
#: 4-bit types of weight-only int4.
_LOW_BIT = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4})


def stored_int8_tensors(model: ir.Model) -> int:
    """Constant tensors of ``model`` (initializers and Constant nodes, every graph) stored as
    integers of 8 bits or fewer, quantization parameters apart (a tensor every reader of which
    takes as a scale or zero point, :data:`~onnxcomp.ops.QUANT_PARAM_INPUTS`): int8 weights, the
    int8 W and R of a recurrent op, quantized embedding tables, weight-only weights."""
    constants = [v for g in (model.graph, *model.graph.subgraphs()) for v in g.initializers.values()]
    constants += [v for n in model.graph.all_nodes() if is_constant_node(n) for v in n.outputs]

    def parameter(value: ir.Value) -> bool:
        uses = list(value.uses())
        return bool(uses) and all(u.idx in (QUANT_PARAM_INPUTS.lookup(u.node, model) or ()) for u in uses)

    return sum(1 for v in constants if v.dtype in _LOW_BIT and not parameter(v))


def int8_kernels(model: ir.Model) -> str:
    """onnxruntime int8 kernels in ``model``'s main graph, most frequent first ('ConvInteger x21,
    MatMulInteger x1'); '' when it has none. A model that has them was quantized before: its
    weights are integers, which quantize, cluster and prune leave alone."""
    from onnxcomp.ops import INT8_KERNEL_FLOAT_OPS

    kernels = collections.Counter(n.op_type for n in model.graph if n.op_type in INT8_KERNEL_FLOAT_OPS)
    return ", ".join(f"{op} x{k}" for op, k in kernels.most_common())


def int8_tensors_added(model: ir.Model | None, written: ir.Model) -> int:
    """:func:`stored_int8_tensors` of ``written`` (an output) beyond those of ``model`` (its input;
    None: nothing to subtract): what a quantize run stored in int8, whatever its report counts."""
    return stored_int8_tensors(written) - (stored_int8_tensors(model) if model is not None else 0)
