"""Recurrent weights in int8 under the default (static) quantize, and weight-only int8 where
calibration cannot reach.

Seeded models built in code: LSTM and GRU in every direction, with and without initial states and
sequence lengths (LSTM -> onnxruntime's DynamicQuantizeLSTM, GRU -> weight-only int8 W and R); an
If whose else branch no calibration feed takes (its weights stored int8 behind DequantizeLinear,
compute in float); a Conv reading a spiky signal that 8 bits cannot hold (kept float, its weight
stored int8). Outputs are compared with fp32 with onnxruntime's graph optimizations off and on.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.ops import RECURRENT_INT8
from onnxcomp.passes.base import model_problems
from onnxcomp.quant.api import quantize
from onnxcomp.quant.cli import _compressed
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.testing import run_model, sqnr_db

F = onnx.TensorProto.FLOAT
HIDDEN, INPUT, STEPS, BATCH = 16, 12, 7, 2

# Output SQNR floors (dB), the worst output over all feeds, onnxruntime optimizations off and on.
# Measured minima when written (AVX2 CPU without VNNI, so 7-bit weights for the kernel): LSTM as
# DynamicQuantizeLSTM (one scale per direction, activations quantized per call by the kernel)
# 31.8 dB; GRU weight-only (8-bit, one scale per gate row) 44.6 dB; the uncalibrated branch
# (weight-only per output channel, and its GRU) 41.0 dB; the calibrated branch (static int8) 27.4 dB.
FLOOR = {"LSTM": 25.0, "GRU": 38.0, "branch": 35.0, "static": 22.0}


def _w(rng, *shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def recurrent_model(rng, op: str, direction: str, states: bool, lengths: bool, layout: int = 0,
                    opset: int = 17) -> onnx.ModelProto:
    """``op`` over ``xs`` (time-major, or batch-major with ``layout=1``), every output a graph output."""
    dirs, gates = (2 if direction == "bidirectional" else 1), (4 if op == "LSTM" else 3)
    inputs = [oh.make_tensor_value_info("xs", F, [BATCH, STEPS, INPUT] if layout else [STEPS, BATCH, INPUT])]
    names = ["xs", "W", "R", "B", "", ""]
    state_shape = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    if lengths:
        inputs.append(oh.make_tensor_value_info("lens", onnx.TensorProto.INT32, [BATCH]))
        names[4] = "lens"
    if states:
        inputs.append(oh.make_tensor_value_info("h0", F, state_shape))
        names[5] = "h0"
        if op == "LSTM":
            inputs.append(oh.make_tensor_value_info("c0", F, state_shape))
            names.append("c0")
    names = names[:max(i for i, n in enumerate(names) if n) + 1]
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = oh.make_node(op, names, outs, hidden_size=HIDDEN, direction=direction, name=op.lower(),
                        **({"layout": 1} if layout else {}))
    y_shape = [BATCH, STEPS, dirs, HIDDEN] if layout else [STEPS, dirs, BATCH, HIDDEN]
    inits = [
        onnx.numpy_helper.from_array(_w(rng, dirs, gates * HIDDEN, INPUT), "W"),
        onnx.numpy_helper.from_array(_w(rng, dirs, gates * HIDDEN, HIDDEN, scale=0.2), "R"),
        onnx.numpy_helper.from_array(_w(rng, dirs, 2 * gates * HIDDEN, scale=0.1), "B"),
    ]
    outputs = [oh.make_tensor_value_info("Y", F, y_shape)] + [oh.make_tensor_value_info(n, F, state_shape)
                                                              for n in outs[1:]]
    graph = oh.make_graph([node], "recurrent", inputs, outputs, inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def _feeds(proto: onnx.ModelProto, seed: int, n: int) -> list[dict[str, np.ndarray]]:
    """Gaussian inputs; sequence lengths between 2 and STEPS."""
    rng = np.random.default_rng(seed)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in proto.graph.input}
    return [{name: (rng.integers(2, STEPS + 1, size=shape).astype(np.int32) if name == "lens"
                    else rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
            for _ in range(n)]


def _worst_sqnr(reference: ir.Model, candidate: ir.Model, feeds, level: str) -> float:
    ref = run_model(reference, feeds, optimization=level)
    out = run_model(candidate, feeds, optimization=level)
    return min(sqnr_db(np.concatenate([r[j].ravel() for r in ref]), np.concatenate([c[j].ravel() for c in out]))
               for j in range(len(ref[0])))


def _assert_floor(reference: ir.Model, candidate: ir.Model, feeds, floor: float) -> None:
    for level in ("disable", "all"):
        worst = _worst_sqnr(reference, candidate, feeds, level)
        assert worst >= floor, f"[optimization={level}] SQNR {worst:.1f} dB below {floor} dB"


def _initializers(model: ir.Model) -> dict[str, ir.Value]:
    found = dict(model.graph.initializers)
    for graph in model.graph.subgraphs():
        found.update(graph.initializers)
    return found


def test_table_declares_kernel_and_weight_only():
    lstm, gru, rnn = (RECURRENT_INT8.get("", op, 17) for op in ("LSTM", "GRU", "RNN"))
    assert lstm.kernel == "DynamicQuantizeLSTM" and lstm.kernel_layouts == (0,)
    assert gru.kernel is None and rnn.kernel is None
    assert [role for _, role in lstm.weights] == ["W", "R"]


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("states, lengths", [(False, False), (True, True), (True, False)])
def test_static_quantize_stores_recurrent_weights_int8(op, direction, states, lengths):
    proto = recurrent_model(np.random.default_rng(3), op, direction, states, lengths)
    reference = io.load_model(proto)
    quantized, report = quantize(proto, _feeds(proto, 1, 4), QuantizeConfig())
    assert model_problems(quantized) == {}
    recurrent = report["recurrent"]
    assert recurrent["recurrent_kept_float"] == {}
    inits = _initializers(quantized)
    assert "W" not in inits and "R" not in inits  # no float copy left in the file
    if op == "LSTM":
        assert recurrent["lstm_int8"] == ["lstm"]
        node = next(n for n in quantized.graph if n.name == "lstm")
        assert (node.domain, node.op_type) == ("com.microsoft", "DynamicQuantizeLSTM")
        assert node.inputs[1].dtype == ir.DataType.INT8 and node.inputs[2].dtype == ir.DataType.INT8
        assert report["onnxruntime"]["int8_by_op"].get("DynamicQuantizeLSTM") == 1
    else:
        assert recurrent["recurrent_weight_only"] == ["gru"]
        node = next(n for n in quantized.graph if n.name == "gru")
        for index in (1, 2):
            producer = node.inputs[index].producer()
            while producer.op_type == "Reshape":  # two directions: rows of the flattened weight
                producer = producer.inputs[0].producer()
            assert producer.op_type == "DequantizeLinear" and producer.inputs[0].dtype == ir.DataType.INT8
    assert recurrent["recurrent_weight_bytes"]["after"] * 4 == recurrent["recurrent_weight_bytes"]["before"]
    assert _compressed(report, "static")[0] == 1  # the CLI's "compressed nothing" rule counts it
    _assert_floor(reference, quantized, _feeds(proto, 2, 6), FLOOR[op])


def test_lstm_the_kernel_cannot_take_gets_weight_only():
    """layout=1 (batch first): DynamicQuantizeLSTM reads layout 0 only, so W and R are stored int8
    behind DequantizeLinear and the LSTM stays an LSTM. onnxruntime runs no layout=1 LSTM at all, so
    the numbers come from onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    from onnxcomp.quant.recurrent import RecurrentInt8Config, RecurrentInt8Pass

    proto = recurrent_model(np.random.default_rng(4), "LSTM", "forward", True, False, layout=1, opset=21)
    model = io.load_model(proto)
    stats = RecurrentInt8Pass(RecurrentInt8Config())(model).stats
    assert stats["recurrent_weight_only"] == ["lstm"] and stats["lstm_int8"] == []
    assert next(n for n in model.graph if n.name == "lstm").op_type == "LSTM"
    written = onnx.load_from_string(io.model_to_bytes(model))
    onnx.checker.check_model(written, full_check=True)
    before, after = ReferenceEvaluator(proto), ReferenceEvaluator(written)
    for feed in _feeds(proto, 2, 3):
        for ref, out in zip(before.run(None, feed), after.run(None, feed)):
            assert sqnr_db(ref.ravel(), out.ravel()) >= FLOOR["GRU"]


def test_excluded_recurrent_op_stays_float_and_says_so():
    proto = recurrent_model(np.random.default_rng(5), "GRU", "forward", False, False)
    quantized, report = quantize(proto, _feeds(proto, 1, 4), QuantizeConfig(exclude=("GRU",)))
    assert report["recurrent"]["recurrent_kept_float"] == {"gru": "excluded by the selection"}
    assert _initializers(quantized)["W"].dtype == ir.DataType.FLOAT


def _branch(name: str, nodes: list, out: str, shape: list) -> onnx.GraphProto:
    return oh.make_graph(nodes, name, [], [oh.make_tensor_value_info(out, F, shape)])


def model_if_gated(rng) -> onnx.ModelProto:
    """If on the sign of the input's mean. then: Conv + Relu; else: Conv reading a main-graph weight,
    a Gemm reading its own weight, and a GRU (an 8 kHz-like branch that calibration never takes)."""
    then = _branch("then", [oh.make_node("Conv", ["x", "w_then"], ["t_c"], pads=[1, 1], name="then_conv"),
                            oh.make_node("Relu", ["t_c"], ["t_y"], name="then_relu"),
                            oh.make_node("Flatten", ["t_y"], ["t_f"], name="then_flat")], "t_f", [1, 8 * 16])
    els = oh.make_graph(
        [oh.make_node("Conv", ["x", "w_else"], ["e_c"], pads=[1, 1], name="else_conv"),
         oh.make_node("Transpose", ["e_c"], ["e_seq"], perm=[2, 0, 1], name="else_seq"),  # [16, 1, 8]
         oh.make_node("GRU", ["e_seq", "gru_W", "gru_R"], ["e_Y", "e_h"], hidden_size=8, name="else_gru"),
         oh.make_node("Transpose", ["e_Y"], ["e_t"], perm=[1, 2, 3, 0], name="else_back"),  # [1, 1, 8, 16]
         oh.make_node("Flatten", ["e_t"], ["e_f"], name="else_flat"),
         oh.make_node("Gemm", ["e_f", "gemm_w"], ["e_y"], transB=1, name="else_gemm")],
        "else", [], [oh.make_tensor_value_info("e_y", F, [1, 8 * 16])],
        [onnx.numpy_helper.from_array(_w(rng, 8 * 16, 16 * 8, scale=0.1), "gemm_w"),
         onnx.numpy_helper.from_array(_w(rng, 1, 24, 8), "gru_W"),
         onnx.numpy_helper.from_array(_w(rng, 1, 24, 8), "gru_R")],
    )
    nodes = [
        oh.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
        oh.make_node("Greater", ["m", "zero"], ["c"], name="sign"),
        oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els, name="if"),
    ]
    inits = [("zero", np.zeros((), np.float32)), ("w_then", _w(rng, 8, 4, 3)), ("w_else", _w(rng, 8, 4, 3))]
    return make_proto(nodes, [("x", [1, 4, 16])], [("y", [1, 8 * 16])], inits)


def _signed_feeds(seed: int, n: int, sign: float) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((1, 4, 16)) + sign).astype(np.float32)} for _ in range(n)]


def test_branch_no_feed_takes_gets_weight_only_int8():
    proto = model_if_gated(np.random.default_rng(6))
    reference = io.load_model(proto)
    quantized, report = quantize(proto, _signed_feeds(1, 8, +1.0), QuantizeConfig())  # then branch only
    assert model_problems(quantized) == {}
    then, els = report["branches"]["if/then_branch"], report["branches"]["if/else_branch"]
    assert then["feeds"] == 8 and then["int8_nodes"] >= 1
    assert els["not_calibrated"] == "no calibration feed takes this branch"
    assert sorted(els["weight_only_int8"]["nodes"]) == ["else_conv", "else_gemm"]
    assert els["weight_only_int8"]["bytes_after"] < els["weight_only_int8"]["bytes_before"] / 3.5
    assert report["recurrent"]["recurrent_weight_only"] == ["else_gru"]  # its GRU: weight-only too
    inits = _initializers(quantized)
    assert not {"w_else", "gemm_w", "gru_W", "gru_R"} & set(inits)  # no float copy left anywhere
    branch = next(n for n in quantized.graph if n.op_type == "If").attributes["else_branch"].value
    conv = next(n for n in branch if n.name == "else_conv")
    assert conv.inputs[1].producer().op_type == "DequantizeLinear"
    assert conv.inputs[1].producer().graph is branch  # it runs only when the branch does
    assert not any(n.op_type == "QuantizeLinear" for n in branch)  # activations stay float
    # the branch calibration never took, run: within budget of fp32
    _assert_floor(reference, quantized, _signed_feeds(2, 6, -1.0), FLOOR["branch"])
    _assert_floor(reference, quantized, _signed_feeds(3, 6, +1.0), FLOOR["static"])


def test_coarse_grid_node_stays_float_with_its_float_weight():
    """A Conv reading a spiky signal (rare large values set its range): 8 bits keep < 25 dB of it, so
    the Conv stays float, on its float weight (a DequantizeLinear feeding a float Conv costs
    onnxruntime more than the Conv: magika 1.41x fp32); on Gaussian data the same Conv goes int8."""
    rng = np.random.default_rng(8)
    proto = make_proto([oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[2, 2], name="conv"),
                        oh.make_node("Relu", ["c"], ["r"], name="relu"),
                        oh.make_node("Conv", ["r", "w2"], ["y"], name="conv2")],
                       [("x", [1, 1, 4096])], [("y", [1, 4, 4096])],
                       [("w", _w(rng, 8, 1, 5)), ("b", _w(rng, 8)), ("w2", _w(rng, 4, 8, 1))])

    def spiky(seed, n):
        r = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            x = 0.01 * r.standard_normal((1, 1, 4096))  # quiet, with two clicks at full scale
            x[0, 0, r.integers(0, 4096, 2)] = r.choice([-1.0, 1.0], 2)
            out.append({"x": x.astype(np.float32)})
        return out

    reference = io.load_model(proto)
    quantized, report = quantize(proto, spiky(1, 8), QuantizeConfig(calibration="minmax"))
    assert "8-bit grid" in report["skipped"]["conv"]
    assert "weight_only_int8" not in report
    conv = next(n for n in quantized.graph if n.name == "conv")
    assert conv.inputs[1].producer() is None and conv.inputs[1].const_value is not None
    assert conv.inputs[1].const_value.numpy().dtype == np.float32
    _assert_floor(reference, quantized, spiky(2, 6), FLOOR["static"])
    gaussian = [{"x": np.random.default_rng(i).standard_normal((1, 1, 4096)).astype(np.float32)} for i in range(8)]
    _, report = quantize(proto, gaussian, QuantizeConfig(calibration="minmax"))
    assert "conv" not in report["skipped"] and report["int8_nodes"] == 1
