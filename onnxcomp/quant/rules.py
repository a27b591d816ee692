"""Where Q/DQ goes: a declarative table of how each op is quantized, matched to onnxruntime's fusions.

onnxruntime's CPU provider turns a *node unit* (DequantizeLinear on every quantized input, the op,
QuantizeLinear on its output) into one int8 kernel: Conv -> QLinearConv, MatMul -> QLinearMatMul
(or MatMulIntegerToFloat when the output stays float), Gemm -> QGemm, Add/Mul -> QLinearAdd/Mul,
Concat -> QLinearConcat, GlobalAveragePool/AveragePool -> QLinearGlobalAveragePool/AveragePool.
Data-movement ops (Reshape, Transpose, MaxPool, ...) run on int8 directly when the Q after them
has the same scale and zero point as the DQ before them; so their output *shares* their input's
quantization parameters instead of getting its own range. Relu and Clip(0, x) after a quantized
producer are *folded*: removed, their output range used for the producer's output Q, whose zero
point saturates negative values exactly as Relu does (asymmetric ranges only).

Each row is a :class:`QuantRule` keyed by (domain, op type, opset range) in :data:`QUANT_RULES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

from onnxcomp.ops import OpTable

__all__ = ["QuantRule", "QUANT_RULES", "SENSITIVE_CONSUMERS", "sensitive_use", "WEIGHT_QUANTIZED_BY_ORT",
           "INT8_KERNELS", "WEIGHT_ONLY_KERNELS"]


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How one op is quantized.

    Attributes:
        kind: ``compute`` (own output range; fused into an int8 kernel), ``shared`` (data movement:
            output shares the input's parameters), ``fold`` (Relu/Clip folded into the producer).
        activations: input indices quantized as activations; ``None`` means every input.
        weight: index of the weight input (a constant, quantized offline per channel).
        weight_axis: its per-channel axis, an int or a function of the node.
        bias: index of the bias input (int32, scale = input scale x weight scale).
        weight_may_be_activation: the weight input may be a computed tensor (MatMul of two
            activations, as in attention); it is then quantized as an activation.
        float_output_ok: the op still runs an int8 kernel when its output is left in float
            (MatMul/Gemm -> MatMulIntegerToFloat), so it can be quantized when its output cannot;
            its output is then quantized only when an int8 node consumes it.
        by_neighbours: quantize the op only where that saves conversions: at least one input comes
            from an int8 node (through data movement and folded activations) and the Q/DQ nodes an
            int8 version needs (a Q per input from float compute, a DQ if a float node reads the
            output) are no more than a float version needs (a DQ per int8 input, a Q if an int8
            node reads the output). An int8 Add or Mul pays off between int8 convolutions
            (residual connections, HardSwish ``x * clip(x + 3, 0, 6) / 6``, squeeze-excitation
            gates), where it also moves a quarter of the bytes; elsewhere it only adds Q/DQ work.
            Inputs from MatMul/Gemm count as float: onnxruntime fuses a bias Add after them into
            MatMulIntegerToFloat or (``bias_add_fusion``) a Gemm with a float output, which need
            their output float.
            Concat too: between int8 tensors (C2f/CSP blocks, SPPF) it joins them without a
            conversion; between float ops (a detector's box decoding after its last convolution:
            anchor arithmetic, centre and size joined, then times the strides) an int8 Concat
            only puts the coordinates on one 8-bit grid (4-pixel steps over a 1024-pixel image,
            16 at stride 32 before the stride multiply) and pulls the Mul after it into int8
            with the strides on a uint8 grid: a YOLOv8 layout detector lost 17 F1 points so.
        bias_add_fusion: whether onnxruntime fuses the op with the float Add of a constant ``[N]``
            bias after it into a Gemm (MatMulAddFusion: a 2-D weight, the op's only reader, an
            input of rank 2 or of static shape). The Gemm then runs int8 (QGemm, float output)
            only when the bias comes int32 from a DequantizeLinear on input scale x weight
            scale, as a Gemm's own bias does; a float bias leaves it a float Gemm, reading the
            dequantized int8 tensors (the int8 node unused, its Q/DQ paid for). The bias of an
            int8 op whose output stays float is so written int32 (``quantized_biases``).
    """

    kind: str
    activations: tuple[int, ...] | None = (0,)
    weight: int | None = None
    weight_axis: int | Callable[[ir.Node], int] | None = None
    bias: int | None = None
    weight_may_be_activation: bool = False
    float_output_ok: bool = False
    by_neighbours: bool = False
    bias_add_fusion: Callable[[ir.Node], bool] | None = None

    def resolve_weight_axis(self, node: ir.Node) -> int | None:
        if self.weight_axis is None or isinstance(self.weight_axis, int):
            return self.weight_axis
        return self.weight_axis(node)


def _gemm_weight_axis(node: ir.Node) -> int:
    trans_b = node.attributes.get("transB")
    return 0 if trans_b is not None and trans_b.as_int() else 1


def _matmul_weight_axis(node: ir.Node) -> int | None:
    """Per column for a 2-D weight only: onnxruntime's integer MatMul kernels refuse a per-column
    zero point on a vector ([K]) or batched ([B, K, N]) weight at run time; those are per tensor."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    shape = w.const_value.shape if w is not None and w.const_value is not None else None
    return -1 if shape is not None and len(shape) == 2 else None


def _matmul_add_becomes_gemm(node: ir.Node) -> bool:
    """onnxruntime's MatMulAddFusion conditions on the MatMul side (the Add's bias is checked by
    the caller): a 2-D weight, the output read by one node and no graph output, an input
    of rank 2 (a Gemm as it is) or of fully static shape (reshaped to 2-D around the Gemm)."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return False
    w = node.inputs[1]
    w_shape = w.const_value.shape if w.const_value is not None else w.shape  # or its DequantizeLinear's
    out = node.outputs[0]
    if w_shape is None or len(w_shape) != 2 or len(out.uses()) != 1 or out.is_graph_output():
        return False
    shape = node.inputs[0].shape
    return shape is not None and (len(shape) == 2 or all(isinstance(d, int) for d in shape))


QUANT_RULES: OpTable[QuantRule] = OpTable("quantization placement")
QUANT_RULES.register("Conv", QuantRule("compute", (0,), weight=1, weight_axis=0, bias=2), since=10)
QUANT_RULES.register(
    "MatMul",
    QuantRule("compute", (0,), weight=1, weight_axis=_matmul_weight_axis, weight_may_be_activation=True, float_output_ok=True,
              bias_add_fusion=_matmul_add_becomes_gemm),
    since=9,
)
QUANT_RULES.register(
    "Gemm", QuantRule("compute", (0,), weight=1, weight_axis=_gemm_weight_axis, bias=2, float_output_ok=True), since=11
)
QUANT_RULES.register(("Add", "Mul"), QuantRule("compute", (0, 1), by_neighbours=True), since=7)
QUANT_RULES.register("Concat", QuantRule("compute", None, by_neighbours=True), since=4)
QUANT_RULES.register(("GlobalAveragePool", "AveragePool"), QuantRule("compute", (0,)), since=1)
QUANT_RULES.register(
    ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice",
     "Gather", "Identity", "SpaceToDepth", "DepthToSpace", "Split"),
    QuantRule("shared", (0,)),
    since=1,
)
QUANT_RULES.register(("Relu", "Clip"), QuantRule("fold", (0,)), since=1)

#: Consumers before which a tensor stays float: quantizing their input costs accuracy out of
#: proportion (exponentials, normalization statistics). The value lists the sensitive inputs, or
#: is ``None`` for all: a Div is sensitive in its divisor (``x / sqrt(var)``), not its dividend
#: (HardSwish's ``/ 6``).
SENSITIVE_CONSUMERS: dict[str, tuple[int, ...] | None] = {
    **dict.fromkeys(("Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "LayerNormalization",
                     "ReduceMean", "Erf"), None),
    "Div": (1,),
}


def sensitive_use(node: ir.Node, input_index: int) -> bool:
    """Whether ``node`` reading its input ``input_index`` quantized costs accuracy out of proportion."""
    if node.op_type not in SENSITIVE_CONSUMERS:
        return False
    inputs = SENSITIVE_CONSUMERS[node.op_type]
    return inputs is None or input_index in inputs

#: Ops onnxruntime's WeightBiasQuantization quantizes on its own (float weight, input from a
#: per-tensor DQ, output path into a Q): a node of these kept float reads a per-axis DQ instead.
#: Other ops must not get one: some of onnxruntime's fusions take a per-axis DQ anyway and then
#: fail at run time (QLinearGlobalAveragePool, the QLinear lookup-table kernels).
WEIGHT_QUANTIZED_BY_ORT = frozenset({"Conv", "ConvTranspose", "Gemm"})

#: Op types of onnxruntime's optimized graph that run in int8 (the proof that fusion happened).
INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
    "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QAttention", "MatMulNBits", "QLinearConvTranspose", "NhwcQLinearConv",
})

#: Kernels among INT8_KERNELS that quantize only the weights, with their default weight bits (the
#: node's ``bits`` attribute wins): MatMulNBits reads 4-bit weight blocks.
WEIGHT_ONLY_KERNELS: dict[str, int] = {"MatMulNBits": 4}
