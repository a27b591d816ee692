"""Weight clustering: K distinct values, zeros kept, codebook == float form in onnxruntime, determinism."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.cluster.api import cluster
from onnxcomp.cluster.passes import ClusterConfig, ClusterPass
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError
from onnxcomp.measure.fidelity import compare_models
from onnxcomp.quant.api import quantize
from onnxcomp.testing import assert_equivalent


def _mlp_proto(rng, zero_rows=0):
    w1 = rng.standard_normal((64, 96)).astype(np.float32)
    w1[:, :zero_rows] = 0.0
    w2 = rng.standard_normal((96, 40)).astype(np.float32)
    conv = rng.standard_normal((12, 4, 3, 3)).astype(np.float32)
    return make_proto(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h"]),
            oh.make_node("Relu", ["h"], ["r"]),
            oh.make_node("Gemm", ["r", "w2"], ["y"]),
            oh.make_node("Conv", ["img", "wc"], ["z"]),
        ],
        [("x", ["N", 64]), ("img", ["N", 4, 5, 5])],
        [("y", ["N", 40]), ("z", ["N", 12, 3, 3])],
        [("w1", w1), ("w2", w2), ("wc", conv)],
        opset=21,
    )


def _feeds(rng, n=3):
    return [{"x": rng.standard_normal((2, 64)).astype(np.float32),
             "img": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)} for _ in range(n)]


def _weights(model):
    return {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_at_most_k_distinct_values(rng, bits):
    model = io.load_model(_mlp_proto(rng))
    result = ClusterPass(ClusterConfig(bits=bits, min_elements=100))(model)
    assert set(result.stats["tensors"]) == {"w1", "w2", "wc"}
    for name, w in _weights(model).items():
        assert np.unique(w).size <= 2**bits, name


def test_per_channel_distinct_values(rng):
    model = io.load_model(_mlp_proto(rng))
    ClusterPass(ClusterConfig(bits=3, per_channel=True, min_elements=100))(model)
    w = _weights(model)
    assert all(np.unique(w["w1"][:, j]).size <= 8 for j in range(96))  # MatMul: output channel = last axis
    assert all(np.unique(w["wc"][c]).size <= 8 for c in range(12))      # Conv: output channel = axis 0
    assert np.unique(w["w1"]).size > 8


def test_zeros_preserved(rng):
    model = io.load_model(_mlp_proto(rng, zero_rows=30))
    ClusterPass(ClusterConfig(bits=3, min_elements=100))(model)
    w1 = _weights(model)["w1"]
    assert np.all(w1[:, :30] == 0.0)


@pytest.mark.parametrize("bits, granularity", [(4, "tensor"), (4, "channel"), (4, "scaled"), (8, "tensor"),
                                               (8, "scaled"), (9, "tensor")])
def test_codebook_matches_float_form(rng, bits, granularity):
    proto = _mlp_proto(rng)
    per_channel = granularity == "channel"
    scales = "always" if granularity == "scaled" else "never"
    cfg = dict(bits=bits, per_channel=per_channel, channel_scales=scales, min_elements=100)
    as_float = io.load_model(proto)
    ClusterPass(ClusterConfig(format="float", **cfg))(as_float)
    as_codebook = io.load_model(proto)
    result = ClusterPass(ClusterConfig(format="codebook", **cfg))(as_codebook)
    clustered = set(result.stats["tensors"])
    assert {"w1", "w2"} <= clustered
    assert not clustered & set(as_codebook.graph.initializers), "weights replaced by labels"
    feeds = _feeds(rng)
    # onnxruntime folds the decoding at session creation: bit-identical to the float form
    assert_equivalent(as_float, as_codebook, feeds, atol=0, rtol=0, optimizations=("all",))
    assert_equivalent(as_float, as_codebook, feeds, atol=1e-5, rtol=1e-5, optimizations=("disable",))
    totals = result.stats["totals"]
    assert totals["bytes_after"] < totals["bytes_before"]
    label_bytes = {4: 0.5, 8: 1, 9: 2}[bits]
    w1 = result.stats["tensors"]["w1"]
    side = 4 * 2**bits * (96 if per_channel else 1) + 4 * 96 * (granularity == "scaled")
    assert w1["bytes_after"] <= 64 * 96 * label_bytes + side
    # the labels keep the weight's shape (no Reshape) and the decoded weight keeps its name
    assert "Reshape" not in {node.op_type for node in as_codebook.graph}
    matmul = next(node for node in as_codebook.graph if node.op_type == "MatMul")
    assert matmul.inputs[1].name == "w1" and matmul.inputs[1].producer().op_type in ("Gather", "Mul")
    assert list(as_codebook.graph.initializers["w1_labels"].const_value.shape) == [64, 96]


def _channel_spread_weight(rng):
    """Conv weight whose output channels differ in scale by 1e4 (as after BatchNorm folding)."""
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    w *= np.logspace(-4, 0, 16, dtype=np.float32)[:, None, None, None]
    return w


def _conv_proto(w):
    return make_proto([oh.make_node("Conv", ["img", "w"], ["y"], pads=[1, 1, 1, 1])],
                      [("img", ["N", 8, 6, 6])], [("y", ["N", 16, 6, 6])], [("w", w)], opset=21)


def _channel_errors(w, snapped):
    return ((snapped - w) ** 2).sum(axis=(1, 2, 3)) / (w ** 2).sum(axis=(1, 2, 3))


def test_channel_scales_bound_every_channels_error(rng):
    w = _channel_spread_weight(rng)
    proto = _conv_proto(w)
    per_tensor, scaled = io.load_model(proto), io.load_model(proto)
    ClusterPass(ClusterConfig(bits=4, channel_scales="never"))(per_tensor)
    result = ClusterPass(ClusterConfig(bits=4, channel_scales="always"))(scaled)
    assert result.stats["granularity"] == "scaled channel"
    err_tensor = _channel_errors(w, _weights(per_tensor)["w"])
    err_scaled = _channel_errors(w, _weights(scaled)["w"])
    assert err_tensor.max() > 0.5, "per-tensor clustering wipes out the small channels"
    assert err_scaled.max() < 0.05, err_scaled
    snapped = _weights(scaled)["w"]
    assert all(np.unique(snapped[c]).size <= 16 for c in range(16))
    feeds = [{"img": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)}]
    ref = io.load_model(proto)
    # onnxruntime outputs: the worst output channel keeps its signal only with channel scales
    worst_scaled = compare_models(ref, scaled, feeds).outputs[0].worst_channel[1]
    worst_tensor = compare_models(ref, per_tensor, feeds).outputs[0].worst_channel[1]
    assert worst_scaled > 15 and worst_tensor < 5, (worst_scaled, worst_tensor)
    again = ClusterPass(ClusterConfig(bits=4, channel_scales="always"))(scaled)
    assert not again.modified and "per channel" in again.stats["skipped"]["w"]
    # auto: scales only where one codebook wipes out a channel
    auto = io.load_model(proto)
    result = ClusterPass(ClusterConfig(bits=4))(auto)
    assert result.stats["tensors"]["w"]["granularity"] == "scaled channel"
    np.testing.assert_array_equal(_weights(auto)["w"], snapped)
    assert not ClusterPass(ClusterConfig(bits=4))(auto).modified
    even = io.load_model(_conv_proto(rng.standard_normal((16, 8, 3, 3)).astype(np.float32)))
    result = ClusterPass(ClusterConfig(bits=4))(even)
    assert result.stats["tensors"]["w"]["granularity"] == "tensor" and np.unique(_weights(even)["w"]).size <= 16


def test_graph_input_initializers_are_left_alone(rng):
    proto = _mlp_proto(rng)
    proto.graph.input.append(oh.make_tensor_value_info("w2", onnx.TensorProto.FLOAT, [96, 40]))
    model = io.load_model(proto)
    result = ClusterPass(ClusterConfig(bits=4, min_elements=100))(model)
    assert "w2" not in result.stats["tensors"] and "graph input" in result.stats["skipped"]["w2"]


def test_deterministic_and_second_run_noop(rng):
    proto = _mlp_proto(rng)
    a, b = io.load_model(proto), io.load_model(proto)
    ClusterPass(ClusterConfig(bits=4, min_elements=100, seed=3))(a)
    ClusterPass(ClusterConfig(bits=4, min_elements=100, seed=3))(b)
    assert io.model_to_bytes(a) == io.model_to_bytes(b)
    again = ClusterPass(ClusterConfig(bits=4, min_elements=100, seed=3))(a)
    assert not again.modified and io.model_to_bytes(a) == io.model_to_bytes(b)
    cb = io.load_model(proto)
    ClusterPass(ClusterConfig(bits=4, min_elements=100, format="codebook"))(cb)
    before = io.model_to_bytes(cb)
    assert not ClusterPass(ClusterConfig(bits=4, min_elements=100, format="codebook"))(cb).modified
    assert io.model_to_bytes(cb) == before


def test_small_and_excluded_tensors_left_alone(rng):
    model = io.load_model(_mlp_proto(rng))
    result = ClusterPass(ClusterConfig(bits=2, min_elements=1000, exclude=("Gemm",)))(model)
    assert set(result.stats["tensors"]) == {"w1"}
    assert result.stats["skipped"]["wc"].startswith("432 elements")
    assert result.stats["skipped"]["w2"] == "excluded"


def test_digits_cnn_4_bits(tmp_path):
    source = MODELS / "digits_cnn.onnx"
    reference = io.load_model(source)
    labels = np.load(MODELS / "digits_eval_labels.npy")
    ds = Dataset(MODELS / "digits_eval.npz", reference, batch_size=90)
    clustered, report = cluster(reference, ClusterConfig(bits=4, format="codebook"))
    assert any("opset 17 to 21" in n for n in report["notes"])
    cmp = compare_models(reference, clustered, ds, labels=labels)
    assert cmp.accuracy["reference"] - cmp.accuracy["candidate"] <= 0.01
    out = io.save_model(clustered, tmp_path / "digits_cnn.cb4.onnx")
    ratio = out.stat().st_size / source.stat().st_size
    assert ratio <= 0.2, f"codebook file is {ratio:.3f}x the fp32 file"


def test_quantize_accepts_clustered_model(rng):
    proto = _mlp_proto(rng)
    clustered, _ = cluster(proto, ClusterConfig(bits=4, min_elements=100))
    quantized, report = quantize(clustered, _feeds(rng, 8))
    assert report["quantized_weights"] >= 2
    q_w1 = quantized.graph.initializers["w1_quantized"].const_value.numpy()
    # per-channel int8 scales: each output channel (MatMul: last axis) holds at most K values
    assert all(np.unique(q_w1[:, j]).size <= 16 for j in range(q_w1.shape[1]))


def test_config_and_cli(tmp_path, capsys):
    with pytest.raises(ConfigError, match="bits"):
        ClusterConfig(bits=0)
    with pytest.raises(ConfigError, match="clusters"):
        ClusterConfig(clusters=1)
    with pytest.raises(ConfigError, match="exclude each other"):
        ClusterConfig(per_channel=True, channel_scales="always")
    with pytest.raises(ConfigError, match="channel_scales"):
        ClusterConfig.from_dict({"channel_scales": "sometimes"})
    out = tmp_path / "c.onnx"
    assert main(["cluster", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--bits", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clusters"] == 32 and report["totals"]["entropy_bytes"] < report["totals"]["bytes_before"]
    assert report["output"]["session_creation_s"] > 0
    assert main(["cluster", str(MODELS / "digits_mlp.onnx"), "-o", str(MODELS / "digits_mlp.onnx")]) == 1
    capsys.readouterr()
    scaled = tmp_path / "s.onnx"
    assert main(["cluster", str(MODELS / "digits_cnn.onnx"), "-o", str(scaled), "--channel-scales", "always",
                 "--format", "codebook", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["granularity"] == "scaled channel"
    assert {t["granularity"] for t in report["tensors"].values()} == {"scaled channel"}
    assert report["output"]["bytes"] < 0.25 * report["input"]["bytes"]


def test_codebook_model_can_be_quantized_and_reclustered(rng, tmp_path):
    """Cleanup folds a codebook back into the weight (quantization needs constant weights); the
    codebook format stores a float-clustered tensor as its exact codebook."""
    proto = _mlp_proto(rng)
    as_float, _ = cluster(proto, ClusterConfig(bits=4, min_elements=100))
    as_codebook, _ = cluster(as_float, ClusterConfig(bits=4, min_elements=100, format="codebook"))
    assert "w1" not in as_codebook.graph.initializers and "w1_labels" in as_codebook.graph.initializers
    feeds = _feeds(rng)
    assert_equivalent(as_float, as_codebook, feeds, atol=0, rtol=0, optimizations=("all",))
    # the exact codebook is one per tensor even when per-channel codebooks were asked for
    per_channel, _ = cluster(as_float, ClusterConfig(bits=4, min_elements=100, format="codebook", per_channel=True))
    assert_equivalent(as_float, per_channel, feeds, atol=0, rtol=0, optimizations=("all",))
    q_float, r_float = quantize(as_float, _feeds(rng, 8))
    q_codebook, r_codebook = quantize(as_codebook, _feeds(rng, 8))
    assert r_codebook["int8_nodes"] == r_float["int8_nodes"] >= 2
    assert r_codebook["onnxruntime"]["int8_by_op"] == r_float["onnxruntime"]["int8_by_op"]
