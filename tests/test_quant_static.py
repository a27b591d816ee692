"""Static quantization: placement, fusion in onnxruntime, exclusions, opsets, control flow, accuracy."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError, OpsetError
from onnxcomp.measure.fidelity import compare_models
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.runtime import ort_optimized_model
from onnxcomp.testing import run_model


def _cnn_proto(rng, opset=17):
    """Conv-Relu, Conv-Relu, residual Add, MaxPool, Conv, GAP, Flatten, Gemm."""
    c = 8
    inits = [
        ("w0", rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3),
        ("b0", rng.standard_normal(c).astype(np.float32) * 0.1),
        ("w1", rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.2),
        ("b1", rng.standard_normal(c).astype(np.float32) * 0.1),
        ("w2", rng.standard_normal((16, c, 1, 1)).astype(np.float32) * 0.3),
        ("b2", rng.standard_normal(16).astype(np.float32) * 0.1),
        ("wg", rng.standard_normal((10, 16)).astype(np.float32) * 0.3),
        ("bg", rng.standard_normal(10).astype(np.float32) * 0.1),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        oh.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        oh.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Add", ["r0", "r1"], ["a"], name="add"),
        oh.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        oh.make_node("Conv", ["p", "w2", "b2"], ["c2"], name="conv2"),
        oh.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        oh.make_node("Flatten", ["g"], ["f"], name="flatten"),
        oh.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1, name="fc"),
    ]
    return make_proto(nodes, [("x", ["N", 3, 16, 16])], [("y", ["N", 10])], inits, opset=opset)


def _calib(rng, n=32):
    return [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(n)]


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.all_nodes())


def test_placement_and_fusion(rng):
    proto = _cnn_proto(rng)
    quantized, report = quantize(proto, _calib(rng))
    ops = _ops(quantized)
    assert report["int8_nodes"] == 6  # 3 Conv, Add, GAP, Gemm
    assert report["folded_activations"] == 2
    assert ops["Relu"] == 0 and ops["Conv"] == 3
    assert ops["DequantizeLinear"] > 0 and ops["QuantizeLinear"] > 0
    assert report["quantized_weights"] == 4 and report["quantized_biases"] == 4
    ort = report["onnxruntime"]
    assert ort["int8_by_op"].get("QLinearConv") == 3
    assert ort["int8_by_op"].get("QLinearAdd") == 1
    assert ort["int8_by_op"].get("QLinearGlobalAveragePool") == 1
    assert ort["int8_by_op"].get("QGemm") == 1
    assert ort["float_compute"] == 0
    # weights are stored as int8
    int8_inits = [v for v in quantized.graph.initializers.values() if v.dtype == onnx.TensorProto.INT8]
    assert len(int8_inits) >= 4


def test_fidelity_floor_per_configuration(rng):
    proto = _cnn_proto(rng)
    reference = io.load_model(proto)
    calib = _calib(rng, 48)
    held_out = [{"x": rng.random((4, 3, 16, 16), dtype=np.float32)} for _ in range(8)]
    floors = {"minmax": 28.0, "percentile": 28.0, "entropy": 20.0, "mse": 28.0}
    for act in ("uint8", "int8"):
        for method, floor in floors.items():
            cfg = QuantizeConfig(activation_type=act, calibration=method)
            quantized, _ = quantize(proto, calib, cfg)
            cmp = compare_models(reference, quantized, Dataset(held_out, reference))
            sqnr = cmp.outputs[0].sqnr_db
            assert sqnr >= floor, f"{act}/{method}: SQNR {sqnr:.1f} dB below {floor}"


def test_input_model_untouched_and_dynamic_batch(rng):
    proto = _cnn_proto(rng)
    model = io.load_model(proto)
    before = io.model_to_bytes(model)
    quantized, _ = quantize(model, _calib(rng, 8))
    assert io.model_to_bytes(model) == before
    for batch in (1, 7):
        (out,) = run_model(quantized, [{"x": rng.random((batch, 3, 16, 16), dtype=np.float32)}])[0]
        assert out.shape == (batch, 10)


def test_excluded_nodes_stay_float(rng):
    proto = _cnn_proto(rng)
    for exclude in (("conv1",), ("re:^conv1$",)):
        quantized, report = quantize(proto, _calib(rng, 8), QuantizeConfig(exclude=exclude))
        conv1 = next(n for n in quantized.graph if n.name == "conv1")
        assert conv1.inputs[1].name == "w1" and conv1.inputs[1].const_value is not None
        assert conv1.inputs[1].const_value.dtype == onnx.TensorProto.FLOAT
        assert report["skipped"]["conv1"] == "excluded by the selection"
        assert report["onnxruntime"]["int8_by_op"]["QLinearConv"] == 2
    _, report = quantize(proto, _calib(rng, 8), QuantizeConfig(op_types=("Conv",)))
    assert set(report["onnxruntime"]["int8_by_op"]) == {"QLinearConv"}


def test_old_opset_is_upgraded_or_refused(rng):
    proto = _cnn_proto(rng, opset=12)
    quantized, report = quantize(proto, _calib(rng, 8))
    assert any("opset 12 to 13" in note for note in report["notes"])
    assert io.onnx_opset(quantized) >= 13
    assert report["onnxruntime"]["int8_by_op"]["QLinearConv"] == 3
    with pytest.raises(OpsetError, match="opset 12"):
        quantize(proto, _calib(rng, 8), allow_upgrade=False)


def test_model_with_if_keeps_branches_working(rng):
    w = rng.standard_normal((4, 4)).astype(np.float32)
    then_g = oh.make_graph([oh.make_node("Relu", ["m"], ["t_out"])], "then", [], [oh.make_tensor_value_info("t_out", 1, None)])
    else_g = oh.make_graph([oh.make_node("Neg", ["m"], ["e_out"])], "else", [], [oh.make_tensor_value_info("e_out", 1, None)])
    proto = make_proto(
        [
            oh.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            oh.make_node("Greater", ["s", "zero"], ["cond"]),
            oh.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
            oh.make_node("MatMul", ["branch", "w"], ["y"], name="mm2"),
        ],
        [("x", [1, 4])],
        [("y", [1, 4])],
        [("w", w), ("zero", np.zeros((), np.float32))],
    )
    reference = io.load_model(proto)
    feeds = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(16)]
    quantized, report = quantize(proto, feeds)
    assert _ops(quantized)["If"] == 1
    cmp = compare_models(reference, quantized, Dataset(feeds, reference))
    assert cmp.outputs[0].sqnr_db > 25


def test_mixed_range_concat_stays_float(rng):
    """Boxes in pixels and scores near 0..1 concatenated: one scale would erase the scores.

    Both come straight from int8 convolutions, so the Concat would go int8 by its neighbours (a
    Concat between float ops, as after a Sigmoid, stays float for that reason alone)."""
    proto = make_proto(
        [
            oh.make_node("Conv", ["x", "wb"], ["boxes"], name="box_conv"),
            oh.make_node("Conv", ["x", "ws"], ["scores"], name="score_conv"),
            oh.make_node("Concat", ["boxes", "scores"], ["det"], axis=1, name="concat"),
            oh.make_node("Transpose", ["det"], ["y"], perm=[0, 2, 3, 1]),
        ],
        [("x", [1, 8, 8, 8])],
        [("y", [1, 8, 8, 6])],
        [("wb", rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 100),
         ("ws", rng.standard_normal((2, 8, 1, 1)).astype(np.float32) * 0.1)],
    )
    reference = io.load_model(proto)
    feeds = [{"x": rng.random((1, 8, 8, 8), dtype=np.float32)} for _ in range(16)]
    quantized, report = quantize(proto, feeds, QuantizeConfig(quantize_outputs=True))
    assert "concat" in report["skipped"] and "ranges differ" in report["skipped"]["concat"]
    cmp = compare_models(reference, quantized, Dataset(feeds, reference), channel_axis=3)
    worst = cmp.outputs[0].worst_channel
    assert worst is not None and worst[1] > 20, f"score channels must survive, worst {worst}"


def test_shipped_models_accuracy():
    labels = np.load(MODELS / "digits_eval_labels.npy")
    for name, max_drop in (("digits_cnn.onnx", 0.005), ("digits_transformer.onnx", 0.01), ("digits_mlp.onnx", 0.01)):
        reference = io.load_model(MODELS / name)
        quantized, report = quantize(reference, MODELS / "digits_calib.npz")
        assert report["onnxruntime"]["float_compute"] == 0, report["onnxruntime"]
        cmp = compare_models(reference, quantized, Dataset(MODELS / "digits_eval.npz", reference, batch_size=90),
                             labels=labels)
        drop = cmp.accuracy["reference"] - cmp.accuracy["candidate"]
        assert drop <= max_drop, f"{name}: accuracy dropped {100 * drop:.2f} points"


def test_cli_quantize(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    argv = ["quantize", str(MODELS / "digits_cnn.onnx"), "-o", str(out),
            "--calibration", str(MODELS / "digits_calib.npz"), "--max-samples", "32", "--json"]
    assert main(argv) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert out.exists() and report["output"]["bytes"] < report["input"]["bytes"]
    assert report["onnxruntime"]["int8_by_op"]["QLinearConv"] == 8
    assert main(["quantize", str(MODELS / "digits_cnn.onnx"), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "needs --calibration" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="percentile"):
        QuantizeConfig(percentile=0)
    with pytest.raises(ConfigError, match="not a valid regex"):
        QuantizeConfig(exclude=("re:(",))
    with pytest.raises(ConfigError, match="calibration"):
        QuantizeConfig.from_dict({"calibration": "kl"})


def test_recovery_options_through_quantize():
    """CLE + bias correction lift per-tensor int8 of the digits CNN; kernels stay int8."""
    reference = io.load_model(MODELS / "digits_cnn.onnx")
    ds = Dataset(MODELS / "digits_eval.npz", reference, batch_size=90)
    plain, _ = quantize(reference, MODELS / "digits_calib.npz", QuantizeConfig(per_channel=False))
    better, report = quantize(reference, MODELS / "digits_calib.npz",
                              QuantizeConfig(per_channel=False, equalize=True, bias_correction=True))
    assert set(report["recovery"]) == {"equalize", "bias_correction"}
    assert report["onnxruntime"]["float_compute"] == 0
    before = compare_models(reference, plain, ds).outputs[0].sqnr_db
    after = compare_models(reference, better, ds).outputs[0].sqnr_db
    assert after > before + 4, (before, after)  # measured 30.0 -> 37.2 dB
    with pytest.raises(ConfigError, match="static mode"):
        QuantizeConfig(mode="dynamic", bias_correction=True)


def _conv_chain_proto(rng, c=8):
    inits = [(f"w{i}", rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.2) for i in range(4)]
    nodes = [oh.make_node("Conv", [a, f"w{i}"], [b], pads=[1, 1, 1, 1], name=f"conv{i}")
             for i, (a, b) in enumerate([("x", "c0"), ("c0", "c1"), ("c1", "c2"), ("c2", "y")])]
    return make_proto(nodes, [("x", ["N", c, 8, 8])], [("y", ["N", c, 8, 8])], inits)


def test_float_node_between_int8_nodes_stays_float(rng):
    """onnxruntime quantizes a float Conv read through a per-tensor DQ and written into a Q by itself
    (WeightBiasQuantization); a node kept float must not run in int8 behind the user's back."""
    proto = _conv_chain_proto(rng)
    calib = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(8)]
    quantized, report = quantize(proto, calib, QuantizeConfig(exclude=("conv1",)))
    # conv0 and conv2 int8; conv1 excluded; conv3 writes the graph output
    assert report["onnxruntime"]["int8_by_op"] == {"QLinearConv": 2}
    assert report["onnxruntime"]["float_by_op"] == {"Conv": 2}
    assert report["float_reader_dequantize"] == 1 and not report["float_readers_unguarded"]  # conv1 only
    feeds = [{"x": rng.standard_normal((2, 8, 8, 8)).astype(np.float32)}]
    for level in ("disable", "all"):
        assert compare_models(io.load_model(proto), quantized, feeds, optimization=level).outputs[0].sqnr_db > 25


def _hardswish_se_proto(rng, c=8):
    """Conv -> HardSwish as Paddle exports it (x * clip(x + 3, 0, 6) / 6) -> squeeze-excitation gate
    (GAP, Conv, Relu, Conv, HardSigmoid, Mul) -> residual Add -> Conv."""
    f32 = np.float32
    inits = [
        ("w0", rng.standard_normal((c, 3, 3, 3)).astype(f32) * 0.4), ("b0", rng.standard_normal(c).astype(f32) * 0.1),
        ("ws1", rng.standard_normal((c // 2, c, 1, 1)).astype(f32) * 0.4),
        ("ws2", rng.standard_normal((c, c // 2, 1, 1)).astype(f32) * 0.4),
        ("w1", rng.standard_normal((c, c, 3, 3)).astype(f32) * 0.2), ("w2", rng.standard_normal((c, c, 1, 1)).astype(f32) * 0.3),
        ("three", np.array(3.0, f32)), ("zero", np.array(0.0, f32)), ("six", np.array(6.0, f32)),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        oh.make_node("Add", ["c0", "three"], ["a3"], name="hs_add"),
        oh.make_node("Clip", ["a3", "zero", "six"], ["cl"], name="hs_clip"),
        oh.make_node("Div", ["cl", "six"], ["d6"], name="hs_div"),
        oh.make_node("Mul", ["c0", "d6"], ["hs"], name="hs_mul"),
        oh.make_node("GlobalAveragePool", ["hs"], ["g"], name="se_gap"),
        oh.make_node("Conv", ["g", "ws1"], ["s1"], name="se_conv1"),
        oh.make_node("Relu", ["s1"], ["s1r"], name="se_relu"),
        oh.make_node("Conv", ["s1r", "ws2"], ["s2"], name="se_conv2"),
        oh.make_node("HardSigmoid", ["s2"], ["gate"], alpha=0.2, beta=0.5, name="se_gate"),
        oh.make_node("Mul", ["hs", "gate"], ["se"], name="se_mul"),
        oh.make_node("Conv", ["se", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Add", ["c1", "se"], ["res"], name="residual"),
        oh.make_node("Conv", ["res", "w2"], ["y"], name="conv2"),
    ]
    return make_proto(nodes, [("x", ["N", 3, 12, 12])], [("y", ["N", c, 12, 12])], inits, opset=13)


def test_hardswish_and_gates_run_in_int8(rng):
    proto = _hardswish_se_proto(rng)
    calib = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(16)]
    quantized, report = quantize(proto, calib)
    ort = report["onnxruntime"]
    # HardSwish's Add and Mul, the gate Mul and the residual Add run as int8 kernels; the Clip is folded
    # into the Add's output range; Div by a constant stays float between a DQ and a Q.
    assert ort["int8_by_op"].get("QLinearAdd") == 2 and ort["int8_by_op"].get("QLinearMul") == 2, ort
    assert report["folded_activations"] == 2  # HardSwish's Clip and the gate's Relu
    assert not {"Add", "Mul", "Clip"} & {n.op_type for n in ort_optimized_model(quantized).graph}
    feeds = [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)}]
    for level in ("disable", "all"):
        assert compare_models(io.load_model(proto), quantized, feeds, optimization=level).outputs[0].sqnr_db > 25


def test_bias_add_after_matmul_stays_float(rng):
    """MatMul + bias Add: onnxruntime fuses them into MatMulIntegerToFloat only with the Add in float."""
    w = rng.standard_normal((16, 8)).astype(np.float32)
    proto = make_proto(
        [oh.make_node("MatMul", ["x", "w"], ["m"], name="mm"), oh.make_node("Add", ["m", "b"], ["a"], name="bias"),
         oh.make_node("Relu", ["a"], ["y"], name="relu")],
        [("x", ["N", 5, 16])], [("y", ["N", 5, 8])], [("w", w), ("b", rng.standard_normal(8).astype(np.float32))])
    calib = [{"x": rng.standard_normal((2, 5, 16)).astype(np.float32)} for _ in range(8)]
    _, report = quantize(proto, calib)
    assert "bias" in report["skipped"] and report["onnxruntime"]["int8_by_op"] == {"MatMulIntegerToFloat": 1}


@pytest.mark.parametrize("excluded", ["conv0", "hs_add", "hs_mul", "se_gap", "se_conv1", "se_mul", "residual"])
def test_any_excluded_node_leaves_a_runnable_model(rng, excluded):
    """Whatever node is kept float, the model runs and stays close (optimizations off and on).

    Excluding 'se_gap' here also turns the HardSwish Mul float, so this does not reach the
    per-axis DQ guard: :func:`test_pooling_kept_float_reads_a_per_tensor_dq` does."""
    proto = _hardswish_se_proto(rng)
    calib = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    quantized, report = quantize(proto, calib, QuantizeConfig(exclude=(excluded,)))
    assert report["skipped"][excluded] == "excluded by the selection"
    feeds = [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)}]
    for level in ("disable", "all"):
        assert compare_models(io.load_model(proto), quantized, feeds, optimization=level).outputs[0].sqnr_db > 20


def test_pooling_kept_float_reads_a_per_tensor_dq(rng):
    """A GlobalAveragePool kept float between an int8 producer and an int8 Conv.

    Its input (the Relu after conv0) stays int8 for conv_a, and its output feeds the int8 conv_g,
    so onnxruntime fuses DQ -> GlobalAveragePool -> Q into QLinearGlobalAveragePool, which takes a
    per-tensor scale only. The per-axis DQ guard (for ops onnxruntime quantizes by itself) must not
    be given to it: that failed at run time ('x_scale must be a scalar or 1D tensor of size 1').
    """
    f32, c = np.float32, 8
    proto = make_proto(
        [
            oh.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
            oh.make_node("Relu", ["c0"], ["r0"], name="relu0"),
            oh.make_node("Conv", ["r0", "wa"], ["ya"], pads=[1, 1, 1, 1], name="conv_a"),
            oh.make_node("GlobalAveragePool", ["r0"], ["g"], name="gap"),
            oh.make_node("Conv", ["g", "wg"], ["yg"], name="conv_g"),
            oh.make_node("Add", ["ya", "yg"], ["y"], name="add"),
        ],
        [("x", ["N", 3, 12, 12])], [("y", ["N", c, 12, 12])],
        [("w0", rng.standard_normal((c, 3, 3, 3)).astype(f32) * 0.4),
         ("wa", rng.standard_normal((c, c, 3, 3)).astype(f32) * 0.2),
         ("wg", rng.standard_normal((c, c, 1, 1)).astype(f32) * 0.3)],
        opset=13,
    )
    calib = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    quantized, report = quantize(proto, calib, QuantizeConfig(exclude=("gap",)))
    assert report["skipped"]["gap"] == "excluded by the selection"
    assert report["onnxruntime"]["int8_by_op"]["QLinearConv"] == 3  # conv0, conv_a, conv_g: the fusion's setting
    feeds = [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)}]
    for level in ("disable", "all"):
        assert compare_models(io.load_model(proto), quantized, feeds, optimization=level).outputs[0].sqnr_db > 20
    dq = quantized.graph.node("gap").inputs[0].producer()
    assert dq.op_type == "DequantizeLinear" and dq.inputs[1].const_value.numpy().size == 1, "a per-tensor DQ"

