"""MACs of the linear ops (onnxcomp.analysis.cost) from the ops table's rows, not op-type comparisons."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
from conftest import make_proto

from onnxcomp import io
from onnxcomp.analysis.cost import count_cost
from onnxcomp.graph import infer_types


def test_macs_of_every_linear_op_kind():
    r = np.random.default_rng(0)

    def w(*shape):
        return r.standard_normal(shape).astype(np.float32)

    model = io.load_model(make_proto(
        [oh.make_node("Conv", ["c_in", "wc"], ["c_out"], group=2, pads=[1, 1, 1, 1]),
         oh.make_node("ConvTranspose", ["t_in", "wt"], ["t_out"], group=2),
         oh.make_node("Gemm", ["g_in", "wg"], ["g_out"], transA=1),
         oh.make_node("MatMul", ["m_in", "wm"], ["m_out"]),
         oh.make_node("Relu", ["m_out"], ["m_relu"])],
        [("c_in", [1, 4, 6, 6]), ("t_in", [1, 4, 5, 5]), ("g_in", [8, 4]), ("m_in", ["N", 3, 5])],
        [("c_out", [1, 6, 6, 6]), ("t_out", [1, 6, 7, 7]), ("g_out", [4, 3]), ("m_relu", ["N", 3, 7])],
        [("wc", w(6, 2, 3, 3)), ("wt", w(4, 3, 3, 3)), ("wg", w(8, 3)), ("wm", w(5, 7))]))
    infer_types(model)
    conv = 6 * 6 * 6 * (2 * 3 * 3)  # output elements x (C_in / group) x kernel
    conv_t = 4 * 5 * 5 * (3 * 3 * 3)  # input elements x (C_out / group) x kernel
    gemm = 4 * 3 * 8  # rows x N x K, K the first axis of A under transA
    matmul = 1 * 3 * 7 * 5  # the free batch counts as 1
    params = 6 * 2 * 9 + 4 * 3 * 9 + 8 * 3 + 5 * 7
    assert count_cost(model) == {"parameters": params, "macs": conv + conv_t + gemm + matmul, "unknown_shapes": 0}
