"""Layer-input Gram matrices (onnxcomp.analysis.gram) and error-compensating rounding (GPTQ).

Small seeded models built in code; every Gram is checked against onnxruntime's own layer outputs
(output energy = tr(W H W^T)), and GPTQ against round-to-nearest on the output SQNR.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.analysis.gram import collect_grams
from onnxcomp.testing import run_model


def _model(nodes, inputs, outputs, inits, opset=17):
    return io.load_model(make_proto(nodes, inputs, outputs, list(inits.items()), opset=opset))


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def _conv_dense_model(rng):
    """x[2,4,9,9] -> grouped Conv (no bias) -> c ; t[2,5,8] -> MatMul and Gemm(transB) sharing t."""
    inits = {
        "wc": rng.standard_normal((6, 2, 3, 3)).astype(np.float32),
        "wm": rng.standard_normal((8, 3)).astype(np.float32),
        "wg": rng.standard_normal((7, 8)).astype(np.float32),
    }
    nodes = [
        oh.make_node("Conv", ["x", "wc"], ["c"], group=2, strides=[2, 1], pads=[1, 0, 1, 2], dilations=[1, 2],
                     name="conv"),
        oh.make_node("MatMul", ["t", "wm"], ["m"], name="mm"),
        oh.make_node("Reshape", ["t", "shape"], ["t2"], name="flat"),
        oh.make_node("Gemm", ["t2", "wg"], ["g"], transB=1, name="gemm"),
    ]
    inits["shape"] = np.array([-1, 8], dtype=np.int64)
    model = _model(nodes, [("x", [2, 4, 9, 9]), ("t", [2, 5, 8])],
                   [("c", [2, 6, 5, 7]), ("m", [2, 5, 3]), ("g", [10, 7])], inits)
    return model, inits


def _feeds(rng, n):
    return [{"x": rng.standard_normal((2, 4, 9, 9)).astype(np.float32),
             "t": rng.standard_normal((2, 5, 8)).astype(np.float32)} for _ in range(n)]


def test_gram_output_energy_matches_onnxruntime(rng):
    model, inits = _conv_dense_model(rng)
    feeds = _feeds(rng, 3)
    nodes = [_node(model, n) for n in ("conv", "mm", "gemm")]
    grams = collect_grams(model, nodes, feeds, max_rows=10**6)
    outs = run_model(model, feeds, optimization="disable")
    c = np.concatenate([o[0] for o in outs]).astype(np.float64)  # [N, 6, H, W]
    m = np.concatenate([o[1] for o in outs]).astype(np.float64)
    # Conv: group g's rows of the flattened weight against its matrix.
    hc = grams["conv"]
    assert hc.gram.shape == (2, 18, 18) and hc.rows == c.shape[0] * c.shape[2] * c.shape[3]
    w = inits["wc"].astype(np.float64).reshape(2, 3, 18)
    energy = sum(np.trace(w[g] @ hc.gram[g] @ w[g].T) for g in range(2))
    np.testing.assert_allclose(energy, np.sum(c * c), rtol=1e-5)
    for g in range(2):  # per group: the output channels of that group
        np.testing.assert_allclose(np.trace(w[g] @ hc.gram[g] @ w[g].T), np.sum(c[:, 3 * g : 3 * g + 3] ** 2),
                                   rtol=1e-5)
    # MatMul and Gemm(transB=1) read the same tensor... through a Reshape: different names, own matrices.
    hm = grams["mm"]
    wm = inits["wm"].astype(np.float64)
    np.testing.assert_allclose(np.trace(wm.T @ hm.gram[0] @ wm), np.sum(m * m), rtol=1e-5)
    assert hm.rows == 3 * 2 * 5
    np.testing.assert_allclose(grams["gemm"].gram, hm.gram, rtol=1e-12)


def test_gram_shared_input_computed_once_and_rows_bounded(rng):
    wq = rng.standard_normal((8, 4)).astype(np.float32)
    wk = rng.standard_normal((8, 4)).astype(np.float32)
    model = _model(
        [oh.make_node("MatMul", ["t", "wq"], ["q"], name="q"), oh.make_node("MatMul", ["t", "wk"], ["k"], name="k")],
        [("t", [2, 50, 8])], [("q", [2, 50, 4]), ("k", [2, 50, 4])], {"wq": wq, "wk": wk},
    )
    feeds = [{"t": rng.standard_normal((2, 50, 8)).astype(np.float32)} for _ in range(4)]
    grams = collect_grams(model, [_node(model, "q"), _node(model, "k")], feeds, max_rows=120)
    assert grams["q"] is grams["k"]
    assert grams["q"].rows == 120
    again = collect_grams(model, [_node(model, "q")], feeds, max_rows=120)
    np.testing.assert_array_equal(again["q"].gram, grams["q"].gram)  # deterministic sampling
    full = collect_grams(model, [_node(model, "q")], feeds, max_rows=10**6)["q"]
    # the sampled mean approximates the full mean
    rel = np.linalg.norm(grams["q"].mean() - full.mean()) / np.linalg.norm(full.mean())
    assert rel < 0.35


def test_gram_refuses_bad_max_rows(rng):
    model, _ = _conv_dense_model(rng)
    with pytest.raises(ValueError, match="max_rows"):
        collect_grams(model, [_node(model, "mm")], _feeds(rng, 1), max_rows=0)


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------

from onnxcomp.quant.api import quantize  # noqa: E402
from onnxcomp.quant.config import QuantizeConfig  # noqa: E402
from onnxcomp.quant.gptq import compensated_round, gptq_round, output_error  # noqa: E402
from onnxcomp.testing import sqnr_db  # noqa: E402


def _mlp(rng, k=64, h=128, m=64):
    """x[N,k] -> MatMul W1[k,h] + b1 -> Relu -> Gemm(transB=1) W2[m,h] + b2 -> y[N,m]."""
    inits = {
        "w1": (rng.standard_normal((k, h)) / np.sqrt(k)).astype(np.float32),
        "b1": (rng.standard_normal(h) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((m, h)) / np.sqrt(h)).astype(np.float32),
        "b2": (rng.standard_normal(m) * 0.1).astype(np.float32),
    }
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
        oh.make_node("Add", ["a", "b1"], ["ab"], name="bias1"),
        oh.make_node("Relu", ["ab"], ["r"], name="relu"),
        oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="fc2"),
    ]
    return _model(nodes, [("x", ["N", k])], [("y", ["N", m])], inits)


def _correlated(rng, n_feeds, rows, k, seed_mix=7):
    """Inputs with strongly unequal, correlated features (as real layer inputs are)."""
    mix = np.random.default_rng(seed_mix).standard_normal((k, k)) * np.geomspace(3.0, 0.05, k)[:, None]
    return [{"x": (rng.standard_normal((rows, k)) @ mix).astype(np.float32)} for _ in range(n_feeds)]


def _sqnr_on(model, quantized, feeds, optimization="disable"):
    ref = np.concatenate([o[0] for o in run_model(model, feeds, optimization=optimization)])
    got = np.concatenate([o[0] for o in run_model(quantized, feeds, optimization=optimization)])
    return sqnr_db(ref, got)


def test_gptq_round_beats_nearest_on_the_hessian_and_stays_on_the_grid(rng):
    k, n = 96, 40
    x = _correlated(rng, 1, 2000, k)[0]["x"].astype(np.float64)
    h = x.T @ x
    w = rng.standard_normal((n, k))
    scale = np.abs(w).max(axis=1, keepdims=True) / 7.0
    q_near = np.clip(np.rint(w / scale), -8, 7)
    q = gptq_round(w, h, scale, -8, 7)
    assert q.dtype == np.int32 and q.min() >= -8 and q.max() <= 7
    e_near, e_gptq = output_error(w, q_near * scale, h), output_error(w, q * scale, h)
    assert 10 * np.log10(e_near / e_gptq) > 2.0
    q_act = gptq_round(w, h, scale, -8, 7, act_order=True)
    assert output_error(w, q_act * scale, h) < e_near
    # With H = I (uncorrelated unit inputs) GPTQ is round-to-nearest exactly.
    np.testing.assert_array_equal(gptq_round(w, np.eye(k), scale, -8, 7, damp=1e-6), q_near)
    # All-zero inputs: nothing to compensate; round-to-nearest is kept.
    res = compensated_round(w, np.zeros((k, k)), scale, q_near, -8, 7)
    assert res.method == "nearest"
    np.testing.assert_array_equal(res.q, q_near)


@pytest.mark.parametrize("fmt,block", [("qdq", 32), ("qdq", 64), ("ort", 32)])
def test_weight_only_int4_gptq_beats_nearest_in_onnxruntime(rng, fmt, block):
    model = _mlp(rng)
    calib = _correlated(rng, 16, 32, 64)
    evaluation = _correlated(np.random.default_rng(99), 8, 32, 64)
    base = QuantizeConfig(mode="weight-only", bits=4, block_size=block, weight_only_format=fmt)
    near, rep_n = quantize(model, calib, dataclasses.replace(base, rounding="nearest"))
    gptq, rep_g = quantize(model, calib, base)  # auto: GPTQ with data at 4 bits
    assert rep_n["rounding"]["method"] == "nearest"
    assert rep_g["rounding"]["method"] == "gptq" and rep_g["rounding"]["weights"] == 2
    assert rep_g["weight_bytes_after"] == rep_n["weight_bytes_after"]  # same storage
    s_near = _sqnr_on(model, near, evaluation)
    s_gptq = _sqnr_on(model, gptq, evaluation)
    assert s_gptq > s_near + 2.0, (s_near, s_gptq)
    assert s_gptq > 20.0
    # onnxruntime's optimized graph (MatMulNBits fusion) computes the same model.
    assert abs(_sqnr_on(model, gptq, evaluation, "all") - s_gptq) < 0.5
    # without data, auto is round-to-nearest and identical to the explicit option
    again, rep = quantize(model, None, base)
    assert rep["rounding"]["method"] == "nearest"
    assert _sqnr_on(model, again, evaluation) == pytest.approx(s_near, abs=1e-6)


def test_gptq_without_data_is_refused(rng):
    from onnxcomp.errors import ConfigError

    with pytest.raises(ConfigError, match="rounding 'gptq' needs calibration"):
        quantize(_mlp(rng), None, QuantizeConfig(mode="weight-only", rounding="gptq"))
    with pytest.raises(ConfigError, match="rounding"):
        QuantizeConfig(rounding="stochastic")


def test_dynamic_int8_gptq_not_worse(rng):
    model = _mlp(rng)
    calib = _correlated(rng, 16, 32, 64)
    evaluation = _correlated(np.random.default_rng(5), 8, 32, 64)
    near, _ = quantize(model, calib, QuantizeConfig(mode="dynamic", rounding="nearest"))
    gptq, rep = quantize(model, calib, QuantizeConfig(mode="dynamic", rounding="gptq"))
    assert rep["rounding"]["method"] == "gptq"
    layers = rep["rounding"]["layers"]
    assert all(v["output_error"] <= v["output_error_nearest"] for v in layers.values())
    assert _sqnr_on(model, gptq, evaluation, "all") > _sqnr_on(model, near, evaluation, "all") - 0.2


def _cnn(rng):
    """x[N,8,10,10] -> Conv 3x3 (16) -> Relu -> depthwise Conv 3x3 (group 16) -> Relu -> Conv 1x1 (8)."""
    inits = {
        "w1": (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72)).astype(np.float32),
        "b1": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((16, 1, 3, 3)) / 3.0).astype(np.float32),
        "w3": (rng.standard_normal((8, 16, 1, 1)) / 4.0).astype(np.float32),
    }
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=16, name="dw"),
        oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        oh.make_node("Conv", ["r2", "w3"], ["y"], name="pw"),
    ]
    return _model(nodes, [("x", ["N", 8, 10, 10])], [("y", ["N", 8, 10, 10])], inits)


def _smooth_images(rng, n, batch=2, channels=8, size=10, low=0.2):
    """``n`` feeds ``x[batch, channels, size, size]``: 3x3 box-filtered noise, channel scales from 2 down to ``low``."""
    feeds = []
    for _ in range(n):
        z = rng.standard_normal((batch, channels, size + 2, size + 2))
        z = z * np.geomspace(2.0, low, channels)[None, :, None, None]
        x = sum(z[:, :, i : i + size, j : j + size] for i in range(3) for j in range(3)) / 3.0
        feeds.append({"x": x.astype(np.float32)})
    return feeds


@pytest.mark.parametrize("bits,margin", [(4, 1.0), (8, 0.5)])
def test_weight_only_conv_per_channel_gptq_beats_nearest(rng, bits, margin):
    model = _cnn(rng)
    calib = _smooth_images(rng, 12)
    evaluation = _smooth_images(np.random.default_rng(21), 6)
    cfg = QuantizeConfig(mode="weight-only", bits=bits, op_types=("Conv", "MatMul", "Gemm"))
    near, rep_n = quantize(model, calib, dataclasses.replace(cfg, rounding="nearest"))
    gptq, rep_g = quantize(model, calib, dataclasses.replace(cfg, rounding="gptq"))
    assert rep_n["nodes_quantized"] == rep_g["nodes_quantized"] == 3
    assert rep_g["rounding"]["weights"] == 3
    for opt in ("disable", "all"):
        s_near, s_gptq = _sqnr_on(model, near, evaluation, opt), _sqnr_on(model, gptq, evaluation, opt)
        assert s_gptq > s_near + margin, (opt, s_near, s_gptq)
    if bits == 4:  # MatMulNBits has no Conv form: the ort format leaves Conv float and says so
        _, rep = quantize(model, calib, dataclasses.replace(cfg, weight_only_format="ort"))
        assert rep["nodes_quantized"] == 0 and "qdq" in rep["skipped"]["conv1"]


@pytest.mark.parametrize("weight_range", ["reduced", "full"])
def test_static_int8_gptq_on_the_weight_grid(rng, weight_range):
    model = _cnn(rng)
    calib = _smooth_images(rng, 12)
    evaluation = _smooth_images(np.random.default_rng(22), 6)
    cfg = QuantizeConfig(weight_range=weight_range, fold_activations=True)
    near, _ = quantize(model, calib, dataclasses.replace(cfg, rounding="nearest"), verify=False)
    gptq, rep = quantize(model, calib, dataclasses.replace(cfg, rounding="gptq"), verify=False)
    assert rep["rounding"]["method"] == "gptq" and rep["rounding"]["weights"] == rep["quantized_weights"] >= 2
    limit = 63 if weight_range == "reduced" else 127
    for init in gptq.graph.initializers.values():
        if init.name.endswith("_quantized") and init.const_value.dtype == ir.DataType.INT8:
            assert np.abs(init.const_value.numpy()).max() <= limit
    s_near, s_gptq = _sqnr_on(model, near, evaluation, "all"), _sqnr_on(model, gptq, evaluation, "all")
    assert s_gptq > s_near - 0.1, (s_near, s_gptq)
    assert rep["rounding"]["layer_sqnr_db_median"] > rep["rounding"]["layer_sqnr_db_nearest_median"] + 1.0


def test_gptq_snap_to_a_codebook_beats_nearest_centroid(rng):
    from onnxcomp.quant.gptq import gptq_snap

    k, n = 96, 48
    x = _correlated(rng, 1, 2000, k)[0]["x"].astype(np.float64)
    h = x.T @ x
    w = rng.standard_normal((n, k))
    codebook = np.quantile(w, (np.arange(16) + 0.5) / 16)  # a 16-entry (4-bit) shared codebook

    def nearest(col, _j):
        return codebook[np.abs(col[:, None] - codebook[None, :]).argmin(axis=1)]

    plain = nearest(w.reshape(-1), 0).reshape(w.shape)
    snapped = gptq_snap(w, h, nearest)
    assert set(np.unique(snapped)) <= set(codebook)  # still only codebook entries
    gain = 10 * np.log10(output_error(w, plain, h) / output_error(w, snapped, h))
    assert gain > 2.0, gain


def test_a_hessian_of_another_width_is_refused_by_both_loops():
    """``gptq_snap`` took a ``[k+1, k+1]`` Hessian's leading ``[k, k]`` block in silence once its
    column order was applied before the shape check; both entry points now check it first."""
    from onnxcomp.quant.gptq import gptq_snap, gptq_snap_blocks

    w = np.ones((3, 40))
    for call in (lambda h: gptq_snap(w, h, lambda col, j: col),
                 lambda h: gptq_snap(w, h, lambda col, j: col, act_order=True),
                 lambda h: gptq_snap_blocks(w, h, lambda cols, j, metric: cols, 2)):
        with pytest.raises(ValueError, match=r"Hessian shape \(41, 41\) does not match the weight's 40 columns"):
            call(np.eye(41))
        assert np.array_equal(call(np.eye(40)), w)  # the right width runs, and an exact grid keeps w
