"""The size route's compact storage: one bit stream, one codebook table (int8 * scale), one
float16 bias stream, inferable Conv attributes dropped; all exact against a numpy reference."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.cluster.passes import ClusterConfig, ClusterPass
from onnxcomp.graph import with_outputs
from onnxcomp.io import model_to_bytes
from onnxcomp.runtime import run_model
from onnxcomp.sparsity.passes import SparsityConfig, SparsityPass
from onnxcomp.sparsity.storage import build_label_decoder, decode_labels, encode_labels
from onnxcomp.testing import assert_equivalent

WEIGHTS = ("wc1", "wc2", "w1", "w2")
BIASES = ("bc1", "bc2", "b1", "b2")


def _proto(rng):
    """Two Convs (one grouped), a MatMul with its bias Add and a Gemm: weights and biases of every kind."""
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return make_proto(
        [
            oh.make_node("Conv", ["img", "wc1", "bc1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            oh.make_node("Relu", ["c1"], ["r1"]),
            oh.make_node("Conv", ["r1", "wc2", "bc2"], ["c2"], kernel_shape=[3, 3], group=2),
            oh.make_node("Flatten", ["c2"], ["fl"]),
            oh.make_node("MatMul", ["fl", "w1"], ["h"]),
            oh.make_node("Add", ["h", "b1"], ["hb"]),
            oh.make_node("Relu", ["hb"], ["hr"]),
            oh.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1),
        ],
        [("img", ["N", 4, 6, 6])],
        [("y", ["N", 10])],
        [("wc1", f(16, 4, 3, 3)), ("bc1", f(16)), ("wc2", f(8, 8, 3, 3)), ("bc2", 3 * f(8)),
         ("w1", f(128, 48)), ("b1", 0.1 * f(48)), ("w2", f(10, 48)), ("b2", f(10))],
        opset=18,
    )


def _feeds(rng, n=3):
    return [{"img": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)} for _ in range(n)]


def _pruned(rng, ratio=0.7):
    model = io.load_model(_proto(rng))
    SparsityPass(SparsityConfig(ratio=ratio, min_elements=100))(model)
    return model


def _decoded(model, names, rng):
    """The values of ``names`` as onnxruntime computes them, at both optimization levels (equal)."""
    exposing = with_outputs(model, list(names))
    out_names = [v.name for v in exposing.graph.outputs]
    got = {}
    for level in ("disable", "all"):
        outs = run_model(exposing, _feeds(rng, 1), optimization=level)[0]
        for name in names:
            value = outs[out_names.index(name)]
            if name in got:
                np.testing.assert_array_equal(value, got[name], err_msg=f"{name} [{level}]")
            got[name] = value
    return got


def _with_initializers(model, values):
    """``model`` with its initializers ``values`` replaced: the un-compacted form of the same weights."""
    ref = model.clone()
    for name, array in values.items():
        ref.graph.initializers[name].const_value = ir.tensor(np.asarray(array, np.float32), name=name)
    return ref


@pytest.mark.parametrize("kind", ["dense", "bitmask", "relative"])
@pytest.mark.parametrize("bits", [1, 3, 5])
def test_one_stream_decoder_matches_the_numpy_reference(rng, kind, bits):
    k = 2**bits
    labels = rng.integers(1, k, size=(7, 11, 3)) * (rng.random((7, 11, 3)) < 0.3)
    enc = encode_labels(labels, k, 0, kinds=(kind,))
    assert enc.kind == kind
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)
    graph = model.graph
    nodes = []

    def add(op, inputs, **attrs):
        node = ir.node(op, inputs, attributes=attrs)
        nodes.append(node)
        return node.outputs[0]

    def const(suffix, array):
        value = ir.Value(name=suffix, const_value=ir.tensor(np.asarray(array), name=suffix))
        graph.register_initializer(value)
        return value

    out = build_label_decoder(add, const, enc)
    for node in nodes:
        graph.append(node)
    out.name = "labels"
    graph.outputs.append(out)
    assert sum(1 for v in graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8
               and v.const_value.size > 8) == 1  # one packed stream
    for level in ("disable", "all"):
        got = run_model(model, [{}], optimization=level)[0][0]
        np.testing.assert_array_equal(got, decode_labels(enc))
        np.testing.assert_array_equal(got, labels)


def test_compact_layout_decodes_the_clustered_weights_exactly(rng):
    """Float codebook table: every weight equals the float format's clustered weight bit for bit."""
    model = _pruned(rng)
    snapped, sparse = model.clone(), model.clone()
    cfg = dict(bits=4, min_elements=100, channel_scales="never")
    ClusterPass(ClusterConfig(format="float", **cfg))(snapped)
    ClusterPass(ClusterConfig(format="sparse", **cfg))(sparse)
    ops = [n.op_type for n in sparse.graph]
    assert ops.count("Split") == 2 and ops.count("Gather") == len(WEIGHTS) + 1  # labels, columns; per tensor
    expected = {n: snapped.graph.initializers[n].const_value.numpy() for n in WEIGHTS}
    got = _decoded(sparse, WEIGHTS, rng)
    for name in WEIGHTS:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert_equivalent(snapped, sparse, _feeds(rng), atol=1e-5, rtol=1e-5)


def test_int8_codebooks_and_float16_biases_decode_to_the_intended_values(rng):
    model = _pruned(rng)
    original = {n: model.graph.initializers[n].const_value.numpy() for n in (*WEIGHTS, *BIASES)}
    sparse = model.clone()
    stats = ClusterPass(ClusterConfig(format="sparse", bits=4, min_elements=100, channel_scales="never",
                                      codebook_int8=True, float16_biases=True))(sparse).stats
    assert set(stats["int8_biases"]) == set(BIASES)
    assert not set(WEIGHTS + BIASES) & set(sparse.graph.initializers)
    got = _decoded(sparse, WEIGHTS + BIASES, rng)
    for name in BIASES:  # float16 rounding, nothing else
        np.testing.assert_array_equal(got[name], original[name].astype(np.float16).astype(np.float32), err_msg=name)
        assert stats["int8_biases"][name]["relative_error"] < 1e-6
    for name in WEIGHTS:
        w, dec = original[name], got[name]
        scale = np.float32(stats["tensors"][name]["codebook_int8_scale"])
        q = np.round(dec.astype(np.float64) / scale)
        assert np.abs(q).max() <= 127
        np.testing.assert_array_equal((q.astype(np.float32) * scale).astype(np.float32), dec)  # on the int8 grid
        values = np.unique(dec)
        assert values.size <= 16
        np.testing.assert_array_equal(dec[w == 0], 0)  # pruned weights stay exactly zero
        nearest = np.abs(w.reshape(-1, 1) - values.reshape(1, -1)).min(axis=1)
        assert np.all(np.abs(w - dec).reshape(-1)[w.reshape(-1) != 0] <= nearest[w.reshape(-1) != 0] + 1e-7)
    reference = _with_initializers(model, got)  # the same weights as plain float initializers
    assert_equivalent(reference, sparse, _feeds(rng), atol=1e-5, rtol=1e-5)


def test_int8_codebook_with_channel_scales_is_exact(rng):
    """Channel scales on top of the int8 table: the graph computes what its decoded weights compute."""
    model = _pruned(rng, 0.5)
    sparse = model.clone()
    stats = ClusterPass(ClusterConfig(format="sparse", bits=3, min_elements=100, channel_scales="always",
                                      codebook_int8=True, float16_biases=True))(sparse).stats
    assert all(stats["tensors"][n]["granularity"] == "scaled channel" for n in WEIGHTS)
    assert sum(n.op_type == "Mul" for n in sparse.graph) >= len(WEIGHTS)  # the channel scales
    got = _decoded(sparse, WEIGHTS + BIASES, rng)
    for name in WEIGHTS:
        np.testing.assert_array_equal(got[name][model.graph.initializers[name].const_value.numpy() == 0], 0)
    assert_equivalent(_with_initializers(model, got), sparse, _feeds(rng), atol=1e-5, rtol=1e-5)


def test_compaction_drops_kernel_shape_only_where_the_weight_gives_it(rng):
    from onnxcomp.passes.compact import CompactGraphPass

    model = io.load_model(_proto(rng))
    before = model.clone()
    stats = CompactGraphPass()(model).stats
    assert stats["inferable_attributes_dropped"] == 2
    assert all("kernel_shape" not in n.attributes for n in model.graph if n.op_type == "Conv")
    assert_equivalent(before, model, _feeds(rng), atol=1e-5, rtol=1e-5)
    # a kernel_shape that differs from the weight's (invalid model, but not ours to fix) stays
    odd = io.load_model(_proto(rng))
    next(n for n in odd.graph if n.op_type == "Conv").attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [2, 2])
    assert CompactGraphPass()(odd).stats["inferable_attributes_dropped"] == 1


def test_the_compact_layout_is_smaller(rng):
    model = _pruned(rng, 0.8)
    old_style, new_style = model.clone(), model.clone()
    base = dict(format="sparse", bits=4, min_elements=100, channel_scales="never", compact_graph=True)
    ClusterPass(ClusterConfig(int8_biases=True, **base))(old_style)
    ClusterPass(ClusterConfig(codebook_int8=True, float16_biases=True, **base))(new_style)
    assert len(model_to_bytes(new_style)) < len(model_to_bytes(old_style))


def test_grouped_widths_decode_exactly(rng):
    """Label streams of different widths in one bitmask: onnxruntime equals the numpy reference."""
    from onnxcomp.sparsity.storage import encode_bitmask_groups

    parts = [rng.integers(1, 8, size=300) * (rng.random(300) < 0.4), rng.integers(1, 16, size=100) * (rng.random(100) < 0.5)]
    enc = encode_bitmask_groups(parts, [3, 4], 0)
    assert enc.groups == ((3, int(np.count_nonzero(parts[0]))), (4, int(np.count_nonzero(parts[1]))))
    np.testing.assert_array_equal(decode_labels(enc), np.concatenate(parts))
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)
    nodes = []

    def add(op, inputs, **attrs):
        nodes.append(ir.node(op, inputs, attributes=attrs))
        return nodes[-1].outputs[0]

    def const(suffix, array):
        value = ir.Value(name=suffix, const_value=ir.tensor(np.asarray(array), name=suffix))
        model.graph.register_initializer(value)
        return value

    out = build_label_decoder(add, const, enc)
    for node in nodes:
        model.graph.append(node)
    out.name = "labels"
    model.graph.outputs.append(out)
    for level in ("disable", "all"):
        np.testing.assert_array_equal(run_model(model, [{}], optimization=level)[0][0], np.concatenate(parts))


def _calibration(rng, n=24):
    return [{"img": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(n)]


def test_sharing_inside_the_refit_loop(rng):
    """share_bits: every fixed layer ends with at most 2^b values (zeros kept), its error on the
    calibration rows is recorded, and the sparse format then stores those values exactly."""
    from onnxcomp.sparsity.passes import sparsify

    model = io.load_model(_proto(rng))
    original = {n: model.graph.initializers[n].const_value.numpy() for n in WEIGHTS}
    cfg = SparsityConfig(ratio=0.6, refit=True, min_elements=100, share_bits=3, min_inputs_kept=6)
    stats = sparsify(model, cfg, _calibration(rng))
    assert len(stats["layers"]) == len(WEIGHTS)
    for layer in stats["layers"]:
        assert layer["share_bits"] == 3 and layer["share"] in ("nearest", "compensated")
        assert np.isfinite(layer["error_shared"])
    shared = {}
    for name, value in model.graph.initializers.items():
        base = name.removesuffix("_refit")
        if base in WEIGHTS:
            w = value.const_value.numpy()
            shared[name] = w
            assert np.unique(w).size <= 8 and np.any(w == 0), name
            # min_inputs_kept: the grouped conv (36 inputs per output) keeps >= 6 per output on average
            assert np.count_nonzero(w) >= min(6 * w.shape[0], 0.4 * w.size) - 1, name
    assert len(shared) == len(WEIGHTS)
    assert set(np.unique(original["wc1"])) != set(np.unique(next(v for k, v in shared.items() if "wc1" in k)))
    stored = model.clone()
    stats = ClusterPass(ClusterConfig(format="sparse", bits=3, min_elements=100, codebook_int8=True,
                                      float16_biases=True))(stored).stats
    got = _decoded(stored, list(shared), rng)
    for name, w in shared.items():
        assert stats["tensors"][name]["relative_mse"] < 1e-12, name  # stored as they are (int8 grid: exact)
        np.testing.assert_allclose(got[name], w, rtol=1e-6, atol=0)


def test_min_inputs_kept_caps_the_ratio():
    cfg = SparsityConfig(ratio=0.8, conv_ratio=0.6, min_inputs_kept=6)
    assert cfg.ratio_for("Conv", 9) == pytest.approx(1 / 3)
    assert cfg.ratio_for("Conv", 288) == pytest.approx(0.6)
    assert cfg.ratio_for("Gemm", 48) == pytest.approx(0.8)
    assert SparsityConfig(ratio=0.8).ratio_for("Gemm", 4) == pytest.approx(0.8)


def test_only_output_layers_take_wider_shared_values(rng):
    """share_bits_max: the Gemm feeding the graph output widens (no later fit absorbs its error);
    the layers before it keep share_bits whatever their error."""
    from onnxcomp.sparsity.passes import sparsify

    model = io.load_model(_proto(rng))
    cfg = SparsityConfig(ratio=0.6, refit=True, min_elements=100, share_bits=2, share_bits_max=4, share_tolerance=0.0)
    layers = {r["op_type"]: r for r in sparsify(model, cfg, _calibration(rng))["layers"]}
    assert layers["Gemm"]["share_bits"] > 2 or layers["Gemm"]["error_shared"] <= layers["Gemm"]["error_refit"]
    assert layers["MatMul"]["share_bits"] == 2
    widths = {n: np.unique(v.const_value.numpy()).size for n, v in model.graph.initializers.items() if n.startswith("w")}
    assert max(widths.values()) > 4 and all(v <= 16 for v in widths.values())


def test_compaction_stores_small_int64_constants_as_varints(rng):
    from onnxcomp.passes.compact import CompactGraphPass

    model = _pruned(rng)
    ClusterPass(ClusterConfig(format="sparse", bits=4, min_elements=100, channel_scales="never"))(model)
    before = model.clone()
    shapes = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()
              if v.const_value.dtype == ir.DataType.INT64}
    stats = CompactGraphPass()(model).stats
    assert stats["varint_int64"] >= len(WEIGHTS)  # every weight's shape at least
    assert len(model_to_bytes(model)) < len(model_to_bytes(before))
    reloaded = io.load_model(model_to_bytes(model))
    got = sorted(tuple(v.const_value.numpy().reshape(-1)) for v in reloaded.graph.initializers.values()
                 if v.const_value.dtype == ir.DataType.INT64)
    assert got == sorted(tuple(a.reshape(-1)) for a in shapes.values())  # same values (names changed)
    assert_equivalent(before, reloaded, _feeds(rng), atol=1e-5, rtol=1e-5)
