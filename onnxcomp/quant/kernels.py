r"""What this CPU's onnxruntime int8 kernels compute exactly, found by probing them once.

On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), onnxruntime's u8 x s8 GEMM multiplies
pairs of bytes into 16-bit sums (``vpmaddubsw``) that **saturate**: with activations up to 255 and
weights up to 127, a pair can reach :math:`2 \cdot 255 \cdot 127 = 64770 > 2^{15} - 1`. Such a
model runs, but its Conv/MatMul/Gemm outputs are clipped wherever two large products meet: it
silently computes wrong outputs. VNNI (``vpdpbusd``) and ARM kernels accumulate in 32 bits and
are exact.

Weights quantized to 7 bits (``[-63, 63]``, onnxruntime's ``reduce_range``) keep every pair below
:math:`2 \cdot 255 \cdot 63 = 32130`, exact on every CPU, at the cost of one bit of weight
precision. :func:`int8_gemm_saturates` runs one tiny ``MatMulInteger`` whose exact result needs
more than 16 bits per pair and compares; the answer is cached for the process.

The other exact split gives the bit up on the activations: uint8 activations fitted to 7 bits
(``QuantizeConfig.activation_range="reduced"``, 0..127) times full 8-bit weights keep every pair
below :math:`2 \cdot 127 \cdot 127 = 32258`, as long as activations stay inside their calibrated
range (a QuantizeLinear still writes up to 255 beyond it). int8 activations do not get this:
onnxruntime shifts them into 0..255 before the u8 x s8 kernel. It is an option, not the default:
on PP-OCRv4 rec the activations' eighth bit is worth more than the weights' (benchmarks/RESULTS.md,
"Which bit to give up").
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["int8_gemm_saturates", "reduce_weight_range"]


@functools.lru_cache(maxsize=1)
def int8_gemm_saturates() -> bool:
    """Whether onnxruntime's u8 x s8 integer GEMM saturates on this CPU (module docstring)."""
    import onnx
    import onnx.helper as oh
    import onnxruntime as ort

    k = 64
    graph = oh.make_graph(
        [oh.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "probe",
        [oh.make_tensor_value_info("a", onnx.TensorProto.UINT8, [1, k])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 1])],
        [onnx.numpy_helper.from_array(np.full((k, 1), 127, np.int8), "b")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = np.full((1, k), 255, np.uint8)
    got = int(session.run(None, {"a": a})[0][0, 0])
    return got != 255 * 127 * k


def reduce_weight_range(weight_range: str) -> bool:
    """Whether int8 weights use 7 bits: ``"reduced"``, or ``"auto"`` where this CPU saturates."""
    if weight_range == "reduced":
        return True
    if weight_range == "full":
        return False
    return int8_gemm_saturates()
