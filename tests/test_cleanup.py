"""Cleanup pipeline: BatchNorm fusion, constant folding, no-op removal; outputs equal to 1e-5."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.errors import ConfigError
from onnxcomp.passes.base import run_pipeline
from onnxcomp.passes.cleanup import CleanupConfig, CleanupPass, op_histogram
from onnxcomp.testing import assert_equivalent


def _bn_inits(rng, c, prefix="bn"):
    return [
        (f"{prefix}_g", rng.uniform(0.5, 2.0, c).astype(np.float32)),
        (f"{prefix}_b", rng.standard_normal(c).astype(np.float32)),
        (f"{prefix}_m", rng.standard_normal(c).astype(np.float32)),
        (f"{prefix}_v", rng.uniform(0.5, 2.0, c).astype(np.float32)),
    ]


def _bn(x, y, prefix="bn"):
    return oh.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y])


def _conv_bn_model(rng):
    c = 6
    inits = [
        ("w1", rng.standard_normal((c, 3, 3, 3)).astype(np.float32)),
        ("b1", rng.standard_normal(c).astype(np.float32)),
        ("wt", rng.standard_normal((c, 4, 2, 2)).astype(np.float32)),
        ("wg", rng.standard_normal((5, 4 * 8 * 8)).astype(np.float32)),
        ("bg", rng.standard_normal(5).astype(np.float32)),
        ("zero", np.zeros((), np.float32)),
        ("one", np.ones((), np.float32)),
        *_bn_inits(rng, c, "bn1"),
        *_bn_inits(rng, 4, "bn2"),
        *_bn_inits(rng, 5, "bn3"),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        _bn("c1", "n1", "bn1"),
        oh.make_node("Relu", ["n1"], ["r1"]),
        oh.make_node("ConvTranspose", ["r1", "wt"], ["t1"], strides=[2, 2]),
        _bn("t1", "n2", "bn2"),
        oh.make_node("Add", ["n2", "zero"], ["a0"]),
        oh.make_node("Mul", ["a0", "one"], ["m1"]),
        oh.make_node("Identity", ["m1"], ["i1"]),
        oh.make_node("Flatten", ["i1"], ["f"]),
        oh.make_node("Gemm", ["f", "wg", "bg"], ["g"], transB=1),
        _bn("g", "y", "bn3"),
    ]
    return make_proto(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 5])], inits)


def test_fuses_batchnorm_and_removes_noops(rng):
    proto = _conv_bn_model(rng)
    reference = io.load_model(proto)
    model = io.load_model(proto)
    result = CleanupPass()(model)
    hist = op_histogram(model)
    assert result.modified
    assert "BatchNormalization" not in hist
    assert result.stats["batchnorm_fused"] == 3
    assert not {"Identity", "Add", "Mul"} & set(hist)
    assert hist["Conv"] == 1 and hist["ConvTranspose"] == 1 and hist["Gemm"] == 1
    feeds = [{"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)} for n in (1, 3)]
    assert_equivalent(reference, model, feeds, atol=1e-5, rtol=1e-5)


def test_second_run_is_a_noop(rng):
    model = io.load_model(_conv_bn_model(rng))
    CleanupPass()(model)
    before = io.model_to_bytes(model)
    again = CleanupPass()(model)
    assert not again.modified
    assert io.model_to_bytes(model) == before


def test_constant_folding(rng):
    a = rng.standard_normal((4, 4)).astype(np.float32)
    proto = make_proto(
        [
            oh.make_node("Transpose", ["a"], ["at"]),
            oh.make_node("Mul", ["at", "two"], ["w"]),
            oh.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [("x", ["N", 4])],
        [("y", ["N", 4])],
        [("a", a), ("two", np.array(2.0, np.float32))],
    )
    reference = io.load_model(proto)
    model = io.load_model(proto)
    CleanupPass()(model)
    assert op_histogram(model) == {"MatMul": 1}
    np.testing.assert_allclose(model.graph.initializers[model.graph.node(0).inputs[1].name].const_value.numpy(), a.T * 2)
    assert_equivalent(reference, model, [{"x": rng.standard_normal((2, 4)).astype(np.float32)}])


def test_batchnorm_kept_when_disabled(rng):
    model = io.load_model(_conv_bn_model(rng))
    CleanupPass(CleanupConfig(fuse_batchnorm=False))(model)
    assert op_histogram(model)["BatchNormalization"] == 3


def test_config_validation():
    with pytest.raises(ConfigError, match="iterations"):
        CleanupConfig(iterations=0)
    with pytest.raises(ConfigError, match="unknown key"):
        CleanupConfig.from_dict({"fold": True}, where="stage cleanup")
    with pytest.raises(ConfigError, match="'fuse_batchnorm' expects bool"):
        CleanupConfig.from_dict({"fuse_batchnorm": "yes"})
    with pytest.raises(ConfigError, match="takes a CleanupConfig"):
        CleanupPass(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["digits_cnn.onnx", "digits_mlp.onnx", "digits_transformer.onnx"])
def test_cleanup_on_shipped_models(name):
    path = MODELS / name
    reference = io.load_model(path)
    model = io.clone_model(reference)
    pipeline = run_pipeline(model, [CleanupPass()])
    assert pipeline.stages[0][0] == "CleanupPass"
    if name == "digits_cnn.onnx":
        assert "BatchNormalization" in op_histogram(reference)
        assert "BatchNormalization" not in op_histogram(model)
    data = np.load(MODELS / "digits_eval.npz")["image"][:16]
    feeds = [{"image": data[:1]}, {"image": data}]
    assert_equivalent(reference, model, feeds, atol=1e-5, rtol=1e-4)


def test_fused_nodes_keep_the_replaced_nodes_names(rng):
    proto = _conv_bn_model(rng)
    for i, node in enumerate(proto.graph.node):
        node.name = f"{node.op_type.lower()}_{i}"
    model = io.load_model(proto)
    CleanupPass()(model)
    names = {node.op_type: node.name for node in model.graph}
    assert names["Conv"] == "conv_0" and names["ConvTranspose"] == "convtranspose_3" and names["Gemm"] == "gemm_9"
    # onnxscript's rewriter tags the nodes it creates; the tag does not reach the output model
    assert not any(node.metadata_props for node in model.graph)


def test_attributes_at_their_default_are_dropped(rng):
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    wg = rng.standard_normal((4 * 3 * 3, 5)).astype(np.float32)
    proto = make_proto(
        [
            oh.make_node("Conv", ["x", "w"], ["c"], dilations=[1, 1], group=1, strides=[1, 1], pads=[0, 0, 0, 0],
                         kernel_shape=[3, 3]),
            oh.make_node("Conv", ["c", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], group=1),
            oh.make_node("MaxPool", ["c2"], ["p"], kernel_shape=[1, 1], storage_order=0, ceil_mode=0),
            oh.make_node("Flatten", ["p"], ["f"], axis=1),
            oh.make_node("Gemm", ["f", "wg"], ["g"], alpha=1.0, beta=1.0, transA=0, transB=0),
            oh.make_node("Softmax", ["g"], ["y"], axis=-1),
        ],
        [("x", ["N", 3, 8, 8])],
        [("y", ["N", 5])],
        [("w", w), ("w2", rng.standard_normal((4, 4, 3, 3)).astype(np.float32)), ("wg", wg)],
    )
    reference = io.load_model(proto)
    model = io.load_model(proto)
    result = CleanupPass()(model)
    attrs = {node.op_type + str(i): dict(node.attributes) for i, node in enumerate(model.graph)}
    assert set(attrs["Conv0"]) == {"kernel_shape"}
    assert {k: list(v.value) for k, v in attrs["Conv1"].items()} == {"strides": [2, 2], "pads": [1, 1, 1, 1]}
    assert set(attrs["MaxPool2"]) == {"kernel_shape"}
    assert not attrs["Flatten3"] and not attrs["Gemm4"] and not attrs["Softmax5"]
    assert result.stats["default_attributes_dropped"] == 13
    feeds = [{"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)} for n in (1, 2)]
    assert_equivalent(reference, model, feeds, atol=1e-5, rtol=1e-5)
    kept = io.load_model(proto)
    CleanupPass(CleanupConfig(drop_default_attributes=False))(kept)
    assert kept.graph.node(0).attributes["group"].value == 1


def test_weight_decoders_are_folded_whatever_their_size(rng):
    """A weight computed from constants (here a transposed int8 copy, bigger than the folding
    limits) becomes a constant: later passes need constant weights."""
    w = rng.standard_normal((64, 48)).astype(np.float32)
    q = np.round(w * 20).astype(np.int8)
    proto = make_proto(
        [oh.make_node("Cast", ["wq"], ["wf"], to=1), oh.make_node("Mul", ["wf", "s"], ["ws"]),
         oh.make_node("Transpose", ["ws"], ["wt"], perm=[1, 0]), oh.make_node("MatMul", ["x", "wt"], ["y"])],
        [("x", ["N", 64])], [("y", ["N", 48])],
        [("wq", q.T.copy()), ("s", np.array(0.05, np.float32))])
    reference = io.load_model(proto)
    model = io.load_model(proto)
    CleanupPass(CleanupConfig(fold_input_size_limit=16, fold_output_size_limit=16))(model)
    assert op_histogram(model) == {"MatMul": 1}
    assert model.graph.node(0).inputs[1].const_value is not None
    assert_equivalent(reference, model, [{"x": rng.standard_normal((3, 64)).astype(np.float32)}])
    kept = io.load_model(proto)
    CleanupPass(CleanupConfig(fold_input_size_limit=16, fold_output_size_limit=16, fold_weights=False))(kept)
    assert op_histogram(kept)["Transpose"] == 1
