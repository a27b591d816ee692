"""Unstructured sparsity (magnitude, activation-aware, least-squares refit) and the label storage codecs."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError
from onnxcomp.graph import add_initializer
from onnxcomp.measure.fidelity import compare_models
from onnxcomp.recipe import STAGES, load_recipe
from onnxcomp.runtime import run_model
from onnxcomp.sparsity.passes import SparsityConfig, SparsityPass, magnitude_mask, sparsify
from onnxcomp.sparsity.storage import (
    bits_for,
    build_label_decoder,
    decode_labels,
    encode_labels,
    pack_bits,
    unpack_bits,
)


def _proto(rng):
    """MatMul -> Relu -> Gemm (transB) and a Conv beside, all weights seeded."""
    return make_proto(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h"]),
            oh.make_node("Add", ["h", "b1"], ["hb"]),
            oh.make_node("Relu", ["hb"], ["r"]),
            oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
            oh.make_node("Conv", ["img", "wc", "bc"], ["z"], pads=[1, 1, 1, 1]),
        ],
        [("x", ["N", 48]), ("img", ["N", 4, 6, 6])],
        [("y", ["N", 20]), ("z", ["N", 16, 6, 6])],
        [("w1", rng.standard_normal((48, 64)).astype(np.float32)),
         ("b1", rng.standard_normal(64).astype(np.float32)),
         ("w2", (rng.standard_normal((20, 64)) / 8).astype(np.float32)),
         ("b2", rng.standard_normal(20).astype(np.float32)),
         ("wc", rng.standard_normal((16, 4, 3, 3)).astype(np.float32)),
         ("bc", rng.standard_normal(16).astype(np.float32))],
        opset=18,
    )


def _feeds(rng, n=24):
    # correlated inputs, so that the least-squares fix has something to exploit
    mix = np.random.default_rng(7).standard_normal((48, 48)) / 4  # one input distribution for every call
    return [{"x": (rng.standard_normal((4, 48)) @ mix + rng.standard_normal((4, 48)) * 0.3).astype(np.float32),
             "img": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)} for _ in range(n)]


def _weights(model):
    return {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}


def _layer_weights(model):
    return {n.op_type: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv")}


def _numpy_forward(w, feed):
    h = np.maximum(feed["x"].astype(np.float64) @ w["w1"] + w["b1"], 0)
    y = h @ w["w2"].T + w["b2"]
    return y


# ------------------------------------------------------------------------------------------ masks


def test_magnitude_mask_drops_exactly_the_smallest():
    values = np.array([[0.5, -0.1, 3.0], [-2.0, 0.2, 0.0]])
    keep = magnitude_mask(values, 0.5)
    assert keep.tolist() == [[True, False, True], [True, False, False]]
    assert magnitude_mask(values, 0.0).all()
    ties = magnitude_mask(np.ones(10), 0.3)  # ties: by position, deterministic
    assert ties.tolist() == [False] * 3 + [True] * 7


@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.95])
def test_magnitude_pass_zeroes_the_ratio_and_keeps_survivors(rng, ratio):
    model = io.load_model(_proto(rng))
    before = _weights(model)
    stats = SparsityPass(SparsityConfig(ratio=ratio, min_elements=100))(model).stats
    after = _weights(model)
    assert set(stats["tensors"]) == {"w1", "w2", "wc"}  # biases are too small
    for name in ("w1", "w2", "wc"):
        w, p = before[name], after[name]
        assert np.count_nonzero(p == 0) == round(ratio * w.size), name
        kept = p != 0
        np.testing.assert_array_equal(p[kept], w[kept])  # survivors untouched
        assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()  # the smallest went
        assert stats["tensors"][name]["sparsity"] == pytest.approx(ratio, abs=1e-3)
    np.testing.assert_array_equal(after["b1"], before["b1"])


def test_conv_ratio_and_std_quality(rng):
    model = io.load_model(_proto(rng))
    SparsityPass(SparsityConfig(ratio=0.9, conv_ratio=0.25, min_elements=100))(model)
    w = _weights(model)
    assert np.mean(w["wc"] == 0) == pytest.approx(0.25, abs=1 / w["wc"].size)
    assert np.mean(w["w1"] == 0) == pytest.approx(0.9, abs=1e-3)
    model = io.load_model(_proto(rng))
    orig = _weights(model)["w1"]
    SparsityPass(SparsityConfig(std_quality=0.5, min_elements=100))(model)
    pruned = _weights(model)["w1"]
    np.testing.assert_array_equal(pruned == 0, np.abs(orig) < 0.5 * np.std(orig.astype(np.float64)))


def test_sparse_model_in_onnxruntime_matches_numpy(rng):
    """The pass only changes weights: onnxruntime (optimizations off and on) computes the numpy reference."""
    model = io.load_model(_proto(rng))
    SparsityPass(SparsityConfig(ratio=0.7, min_elements=100))(model)
    w = {k: v.astype(np.float64) for k, v in _weights(model).items()}
    feeds = _feeds(rng, 3)
    for level in ("disable", "all"):
        outs = run_model(model, feeds, optimization=level)
        for feed, out in zip(feeds, outs):
            np.testing.assert_allclose(out[0], _numpy_forward(w, feed), atol=1e-5, rtol=1e-5)


def test_refit_beats_zeroing_and_keeps_the_zeros(rng):
    proto = _proto(rng)
    feeds = _feeds(rng)
    reference = io.load_model(proto)
    plain = io.load_model(proto)
    SparsityPass(SparsityConfig(ratio=0.8, min_elements=100))(plain)
    fitted = io.load_model(proto)
    stats = sparsify(fitted, SparsityConfig(ratio=0.8, min_elements=100, refit=True), Dataset(feeds, fitted))
    layers = {r["node"]: r for r in stats["layers"]}
    assert len(layers) == 3 and all(r["refit"] for r in layers.values()), layers
    for r in layers.values():
        assert r["error_refit"] < r["error_zeroed"]
    w_plain, w_fit = _layer_weights(plain), _layer_weights(fitted)  # refitted weights are new tensors
    for op in ("MatMul", "Gemm", "Conv"):
        np.testing.assert_array_equal(w_fit[op] == 0, w_plain[op] == 0)  # same mask, exact zeros
    check = _feeds(np.random.default_rng(99), 8)  # held out
    sqnr_plain = compare_models(reference, plain, Dataset(check, reference)).outputs[0].sqnr_db
    sqnr_fit = compare_models(reference, fitted, Dataset(check, reference)).outputs[0].sqnr_db
    assert sqnr_fit > sqnr_plain + 1.0, (sqnr_plain, sqnr_fit)
    assert sqnr_fit > 4.0  # 80% of random weights gone: the fix recovers part of it


def test_activation_criterion_keeps_weights_on_large_inputs(rng):
    proto = _proto(rng)
    feeds = _feeds(rng)
    for feed in feeds:
        feed["x"][:, :8] *= 50.0  # eight loud input features
    model = io.load_model(proto)
    sparsify(model, SparsityConfig(ratio=0.8, min_elements=100, criterion="activation"), Dataset(feeds, model))
    w1 = _layer_weights(model)["MatMul"]
    assert np.mean(w1[:8] != 0) > 0.9 > 0.2 > np.mean(w1[8:] != 0) - 0.01
    assert np.mean(w1 == 0) == pytest.approx(0.8, abs=1e-3)


def test_config_and_data_errors(rng):
    with pytest.raises(ConfigError, match="ratio"):
        SparsityConfig.from_dict({"ratio": 1.0})
    with pytest.raises(ConfigError, match="needs calibration data"):
        sparsify(io.load_model(_proto(rng)), SparsityConfig(refit=True))
    assert list(STAGES)[:4] == ["cleanup", "prune", "sparsity", "cluster"]
    assert load_recipe({"sparsity": {"ratio": 0.5}}).stages["sparsity"].ratio == 0.5


# ---------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8, 11, 16])
def test_pack_bits_round_trip(rng, bits):
    values = rng.integers(0, 1 << bits, size=1001)
    packed = pack_bits(values, bits)
    assert packed.size == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), values)
    assert bits_for(2) == 1 and bits_for(16) == 4 and bits_for(17) == 5


def _labels(rng, shape, k, sparsity):
    labels = rng.integers(1, k, size=shape)
    labels[rng.random(shape) < sparsity] = 0
    return labels


def _decoder_model(enc):
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 18})
    nodes = []

    def add(op, inputs, **attrs):
        node = ir.node(op, inputs, attributes=attrs, name=f"n{len(nodes)}")
        node.outputs[0].name = f"v{len(nodes)}"
        nodes.append(node)
        return node.outputs[0]

    out = build_label_decoder(add, lambda suffix, array: add_initializer(graph, suffix, array), enc)
    for node in nodes:
        graph.append(node)
    out.dtype, out.shape = ir.DataType.INT64, ir.Shape(list(enc.shape))
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("kind", ["dense", "bitmask", "relative"])
@pytest.mark.parametrize("sparsity,k", [(0.0, 16), (0.6, 16), (0.93, 32), (0.995, 4)])
def test_each_encoding_decodes_exactly_in_numpy_and_onnxruntime(rng, kind, sparsity, k):
    labels = _labels(rng, (24, 7, 5), k, sparsity)
    enc = encode_labels(labels, k, 0, kinds=(kind,))
    assert enc.kind == kind
    np.testing.assert_array_equal(decode_labels(enc), labels)
    model = _decoder_model(enc)
    for level in ("disable", "all"):
        np.testing.assert_array_equal(run_model(model, [{}], optimization=level)[0][0], labels)


def test_smallest_encoding_is_chosen_and_sizes_add_up(rng):
    n = 20_000
    dense = encode_labels(_labels(rng, (n,), 16, 0.0), 16, 0)
    assert dense.kind == "dense" and dense.nbytes == n // 2
    half = encode_labels(_labels(rng, (n,), 16, 0.5), 16, 0)
    assert half.kind == "bitmask"
    assert half.nbytes == n // 8 + -(-half.count * 4 // 8)
    sparse = encode_labels(_labels(rng, (n,), 16, 0.95), 16, 0)
    assert sparse.kind == "relative" and sparse.nbytes < 0.1 * n  # < 0.8 bits per weight at 95% zeros
    for enc in (dense, half, sparse):
        assert enc.entropy_bytes() <= enc.nbytes + 1
        assert enc.zlib_bytes() > 0
    assert encode_labels(_labels(rng, (n,), 16, 0.95), 16, None).kind == "dense"  # no zero centroid


def test_wide_layers_fall_back_to_magnitude(rng):
    proto = _proto(rng)
    model = io.load_model(proto)
    stats = sparsify(model, SparsityConfig(ratio=0.5, min_elements=100, refit=True, max_features=40),
                     Dataset(_feeds(rng), model))
    assert [r["op_type"] for r in stats["layers"]] == ["Conv"]  # 4 * 3 * 3 = 36 inputs; MatMul 48, Gemm 64
    assert {t["how"] for n, t in stats["tensors"].items() if n in ("w1", "w2")} == {"magnitude"}
    assert stats["totals"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
