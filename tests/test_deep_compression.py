"""Deep Compression, size route: sparsity + weight sharing stored as bit-packed sparse labels."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.cluster.passes import ClusterConfig, ClusterPass
from onnxcomp.compress import compress
from onnxcomp.graph import with_outputs
from onnxcomp.io import model_to_bytes
from onnxcomp.recipe import load_recipe, shipped_recipes
from onnxcomp.runtime import ort_optimized_model, run_model
from onnxcomp.sparsity.passes import SparsityConfig, SparsityPass
from onnxcomp.testing import assert_equivalent

WEIGHTS = ("w1", "w2", "wc", "emb")


def _proto(rng):
    """MatMul, Gemm (transB), Conv and a Gather table: every kind of tensor clustering takes."""
    return make_proto(
        [
            oh.make_node("Gather", ["emb", "ids"], ["e"]),
            oh.make_node("MatMul", ["x", "w1"], ["h"]),
            oh.make_node("Relu", ["h"], ["r"]),
            oh.make_node("Gemm", ["r", "w2"], ["y"], transB=1),
            oh.make_node("Conv", ["img", "wc"], ["z"]),
        ],
        [("x", ["N", 64]), ("img", ["N", 8, 5, 5]), ("ids", ["N"], 7)],
        [("y", ["N", 40]), ("z", ["N", 24, 3, 3]), ("e", ["N", 32])],
        [("w1", rng.standard_normal((64, 96)).astype(np.float32)),
         ("w2", rng.standard_normal((40, 96)).astype(np.float32)),
         ("wc", rng.standard_normal((24, 8, 3, 3)).astype(np.float32)),
         ("emb", rng.standard_normal((50, 32)).astype(np.float32))],
        opset=18,
    )


def _feeds(rng, n=3):
    return [{"x": rng.standard_normal((2, 64)).astype(np.float32),
             "img": rng.standard_normal((2, 8, 5, 5)).astype(np.float32),
             "ids": rng.integers(0, 50, size=2).astype(np.int64)} for _ in range(n)]


def _pruned(rng, ratio):
    model = io.load_model(_proto(rng))
    SparsityPass(SparsityConfig(ratio=ratio, min_elements=100))(model)
    return model


@pytest.mark.parametrize("ratio,bits,granularity", [(0.0, 4, "never"), (0.6, 4, "always"), (0.9, 5, "never"),
                                                    (0.7, 3, "per_channel")])
def test_sparse_storage_decodes_exactly(rng, ratio, bits, granularity):
    """Decoded weights equal the clustered weights bit for bit; outputs match the float form to 1e-5.

    (Channel scales "auto" are left out: the float format skips a tensor with at most K values
    per channel, the sparse format still stores its labels.)
    """
    model = _pruned(rng, ratio)
    snapped = model.clone()
    sparse = model.clone()
    cfg = dict(bits=bits, min_elements=100, per_channel=granularity == "per_channel",
               channel_scales="never" if granularity == "per_channel" else granularity)
    ClusterPass(ClusterConfig(format="float", **cfg))(snapped)
    stats = ClusterPass(ClusterConfig(format="sparse", **cfg))(sparse).stats
    assert set(stats["tensors"]) == set(WEIGHTS)
    assert not set(WEIGHTS) & set(sparse.graph.initializers)  # weights are rebuilt in the graph
    expected = {name: snapped.graph.initializers[name].const_value.numpy() for name in WEIGHTS}
    exposing = with_outputs(sparse, list(WEIGHTS))
    feeds = _feeds(rng)
    for level in ("disable", "all"):
        outs = run_model(exposing, feeds[:1], optimization=level)[0]
        names = [v.name for v in exposing.graph.outputs]
        for name in WEIGHTS:
            np.testing.assert_array_equal(outs[names.index(name)], expected[name], err_msg=f"{name} [{level}]")
    assert_equivalent(snapped, sparse, feeds, atol=1e-5, rtol=1e-5)
    if ratio:
        assert np.mean(expected["w1"] == 0) >= ratio - 1e-3  # the zeros survive clustering


def test_decoding_is_folded_at_session_creation(rng):
    sparse = _pruned(rng, 0.8)
    ClusterPass(ClusterConfig(format="sparse", bits=4, min_elements=100))(sparse)
    ops = {n.op_type for n in sparse.graph}
    assert {"BitShift", "CumSum", "Gather"} <= ops
    optimized = {n.op_type for n in ort_optimized_model(sparse).graph}
    assert not optimized & {"BitShift", "BitwiseAnd", "CumSum", "ScatterElements", "Slice"}, optimized


@pytest.mark.parametrize("ratio,label_storage,max_bits_per_weight", [(0.0, "dense", 4.2), (0.5, "bitmask", 3.2),
                                                                      (0.9, "relative", 1.1)])
def test_storage_sizes(rng, ratio, label_storage, max_bits_per_weight):
    """Bytes follow the encoding: 4 bits/weight dense, 1 + 4 (1 - s) bitmask, fewer still with relative indices."""
    model = _pruned(rng, ratio)
    stats = ClusterPass(ClusterConfig(format="sparse", bits=4, min_elements=100))(model).stats
    totals = stats["totals"]
    assert totals["storage"]["storage"] == label_storage
    side = sum(16 * 4 for _ in WEIGHTS)  # one float codebook of 16 entries per tensor
    assert 8 * (totals["bytes_after"] - side) / totals["elements"] <= max_bits_per_weight
    assert totals["entropy_bytes"] <= totals["bytes_after"]
    assert totals["bytes_before"] / totals["bytes_after"] >= 32 / (max_bits_per_weight + 1)


def test_recipes_name_their_route():
    recipes = shipped_recipes()
    assert "size route" in recipes["deep-compression"] and "speed route" in recipes["prune-cluster-int8"]
    deep = load_recipe("deep-compression")
    assert list(deep.stages) == ["cleanup", "sparsity", "cluster", "verify", "measure"]
    assert deep.stages["cluster"].format == "sparse"
    assert "prune" in load_recipe("prune-cluster-int8").stages


def test_deep_compression_recipe_on_the_digits_mlp():
    """>= 10x smaller file within 1.5 points on the shipped digits MLP (held-out eval split)."""
    recipe = load_recipe("deep-compression").with_overrides({"measure.latency": False})
    labels = np.load(MODELS / "digits_eval_labels.npy")
    model, report = compress(MODELS / "digits_mlp.onnx", recipe, MODELS / "digits_calib.npz",
                             eval_data=MODELS / "digits_eval.npz", labels=labels)
    before = len((MODELS / "digits_mlp.onnx").read_bytes())
    after = len(model_to_bytes(model))
    assert before / after >= 10.0, (before, after)
    acc = report["measure"]["fidelity"]["accuracy"]
    assert acc["reference"] - acc["candidate"] <= 0.015, acc
    sparsity = report["stages"][1]["stats"]
    assert sparsity["totals"]["sparsity"] >= 0.79 and any(r["refit"] for r in sparsity["layers"])


def _biased_proto(rng):
    return make_proto(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h"]),
            oh.make_node("Add", ["h", "b1"], ["hb"]),
            oh.make_node("Gemm", ["hb", "w2", "b2"], ["y"], transB=1),
            oh.make_node("Conv", ["img", "wc", "bc"], ["z"]),
            oh.make_node("Add", ["z", "not_a_bias"], ["zz"]),
        ],
        [("x", ["N", 64]), ("img", ["N", 8, 5, 5])],
        [("y", ["N", 40]), ("zz", ["N", 24, 3, 3])],
        [("w1", rng.standard_normal((64, 96)).astype(np.float32)),
         ("b1", rng.standard_normal(96).astype(np.float32)),
         ("w2", rng.standard_normal((40, 96)).astype(np.float32)),
         ("b2", rng.standard_normal(40).astype(np.float32)),
         ("wc", rng.standard_normal((24, 8, 3, 3)).astype(np.float32)),
         ("bc", rng.standard_normal(24).astype(np.float32)),
         ("not_a_bias", rng.standard_normal((24, 1, 1)).astype(np.float32))],
        opset=18,
    )


def test_int8_biases_decode_exactly(rng):
    """Biases of Conv, Gemm and a MatMul's Add become int8 * scale; outputs match the in-memory reference."""
    from onnxcomp.sparsity.storage import int8_symmetric

    model = io.load_model(_biased_proto(rng))
    SparsityPass(SparsityConfig(ratio=0.7, min_elements=100))(model)
    originals = {n: model.graph.initializers[n].const_value.numpy() for n in ("b1", "b2", "bc")}
    reference = model.clone()
    ClusterPass(ClusterConfig(format="float", bits=4, min_elements=100, channel_scales="never"))(reference)
    expected = {}
    for name, values in originals.items():
        q, scale = int8_symmetric(values)
        expected[name] = (q.astype(np.float32) * scale).astype(np.float32)
        reference.graph.initializers[name].const_value = ir.tensor(expected[name], name=name)
    stats = ClusterPass(ClusterConfig(format="sparse", bits=4, min_elements=100, channel_scales="never",
                                      int8_biases=True))(model).stats
    assert set(stats["int8_biases"]) == {"b1", "b2", "bc"}  # not the Add after the Conv
    assert "not_a_bias" in model.graph.initializers
    for name, info in stats["int8_biases"].items():
        assert info["relative_error"] < 1e-4 and info["bytes_after"] == originals[name].size + 4
    exposing = with_outputs(model, ["b1", "b2", "bc"])
    names = [v.name for v in exposing.graph.outputs]
    feeds = [{"x": rng.standard_normal((2, 64)).astype(np.float32),
              "img": rng.standard_normal((2, 8, 5, 5)).astype(np.float32)}]
    for level in ("disable", "all"):
        outs = run_model(exposing, feeds, optimization=level)[0]
        for name, values in expected.items():
            np.testing.assert_array_equal(outs[names.index(name)], values, err_msg=f"{name} [{level}]")
    assert_equivalent(reference, model, feeds, atol=1e-5, rtol=1e-5)
