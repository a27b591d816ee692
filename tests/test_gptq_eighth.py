"""4-bit weight-only grids chosen on the data: block scale search and the least-squares scale refit.

``QuantizeConfig.scale_search`` (each block's scale shrunk to the one with the smallest, optionally
Hessian-weighted, rounding error) and ``scale_refit`` (each row's block scales refitted by least
squares on the layer Hessian once GPTQ has chosen the integers). Small seeded models built in code;
the output SQNR is measured with onnxruntime on data the calibration did not see.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto
from test_gptq import _correlated
from test_gptq import _mlp as _gptq_mlp
from test_gptq import _smooth_images

from onnxcomp import io
from onnxcomp.errors import ConfigError
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.gptq import _column_scales, gptq_round, output_error, refit_scales
from onnxcomp.quant.weight_only import quantize_blockwise, search_block_scales
from onnxcomp.testing import run_model, sqnr_db


def _model(nodes, inputs, outputs, inits, opset=17):
    return io.load_model(make_proto(nodes, inputs, outputs, list(inits.items()), opset=opset))


def _heavy_tailed(rng, shape):
    """Weights with a few large values per block, as trained layers have (Student-t, 3 dof)."""
    return rng.standard_t(3, size=shape)


def _mlp(rng, k=96, h=128, m=48):
    """test_gptq's MLP (MatMul + Add -> Relu -> Gemm transB) with heavy-tailed weights."""
    model = _gptq_mlp(rng, k, h, m)
    for name, fan_in in (("w1", k), ("w2", h)):
        value = model.graph.initializers[name]
        shape = tuple(value.const_value.shape)
        value.const_value = ir.tensor((_heavy_tailed(rng, shape) / np.sqrt(3 * fan_in)).astype(np.float32), name=name)
    return model


def _cnn(rng):
    """x[N,16,8,8] -> Conv 3x3 (32) + b -> Relu -> Conv 1x1 (24)."""
    inits = {
        "w1": (_heavy_tailed(rng, (32, 16, 3, 3)) / np.sqrt(3 * 144)).astype(np.float32),
        "b1": (rng.standard_normal(32) * 0.1).astype(np.float32),
        "w2": (_heavy_tailed(rng, (24, 32, 1, 1)) / np.sqrt(3 * 32)).astype(np.float32),
    }
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "w2"], ["y"], name="pw"),
    ]
    return _model(nodes, [("x", ["N", 16, 8, 8])], [("y", ["N", 24, 8, 8])], inits)


def _images(rng, n, batch=2):
    return _smooth_images(rng, n, batch, channels=16, size=8, low=0.1)


def _sqnr_on(model, quantized, feeds, optimization):
    ref = np.concatenate([o[0] for o in run_model(model, feeds, optimization=optimization)])
    got = np.concatenate([o[0] for o in run_model(quantized, feeds, optimization=optimization)])
    return sqnr_db(ref, got)


# ------------------------------------------------------------------------------------------ numerics


def test_scale_search_lowers_each_blocks_error_and_clips_only_where_it_pays(rng):
    w = rng.standard_normal((40, 96)).astype(np.float32)
    base = quantize_blockwise(w, 1, 4, 16)
    found = quantize_blockwise(w, 1, 4, 16, scale_search=True)
    assert found.scale.shape == base.scale.shape and np.all(found.scale <= base.scale)
    assert np.any(found.scale < base.scale)  # some blocks clip their extremes

    def block_err(bq):
        return ((bq.dequantize() - w) ** 2).reshape(40, 6, 16).sum(-1)

    assert np.all(block_err(found) <= block_err(base) * (1 + 1e-6))
    assert 10 * np.log10(np.sum(block_err(base)) / np.sum(block_err(found))) > 0.3
    assert found.q.min() >= -8 and found.q.max() <= 7
    # blocked along axis 0 gives the same scales as the transposed weight along axis 1
    np.testing.assert_array_equal(quantize_blockwise(w.T, 0, 4, 16, scale_search=True).scale, found.scale.T)
    # a feature weighted to zero does not count: its values may clip freely
    imp = np.ones_like(w)
    imp[:, ::16] = 0.0
    weighted = search_block_scales(w, base.scale, 1, 16, -8, 7, imp)
    assert np.all(weighted <= base.scale)


def test_refit_scales_is_the_least_squares_optimum_and_never_worse(rng):
    k, n, block = 96, 30, 16
    x = _correlated(rng, 1, 3000, k)[0]["x"].astype(np.float64)
    h = x.T @ x / len(x)
    w = _heavy_tailed(rng, (n, k))
    bq = quantize_blockwise(w.astype(np.float32), 1, 4, block)
    q = gptq_round(w, h, bq.scale, -8, 7, group_size=block)
    new = refit_scales(w, q, h, bq.scale, block)
    before = output_error(w, q * _column_scales(bq.scale, n, k, block), h)
    after = output_error(w, q * _column_scales(new, n, k, block), h)
    assert after < before and 10 * np.log10(before / after) > 0.2
    # row 0 against a direct least-squares solve of ||X (w - Q_r s)||^2
    basis = np.zeros((k, k // block))
    for b in range(k // block):
        basis[b * block : (b + 1) * block, b] = q[0, b * block : (b + 1) * block]
    s, *_ = np.linalg.lstsq(x @ basis, x @ w[0], rcond=None)
    np.testing.assert_allclose(new[0], s, rtol=1e-6)
    # integers that cannot get better keep their scales exactly
    np.testing.assert_array_equal(refit_scales(w, q, np.zeros((k, k)), bq.scale, block), bq.scale)


# ---------------------------------------------------------------------------------- end to end (ORT)


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
def test_weight_only_int4_scale_search_and_refit_raise_output_sqnr(rng, fmt):
    model = _mlp(rng)
    calib = _correlated(rng, 16, 32, 96)
    evaluation = _correlated(np.random.default_rng(99), 8, 32, 96)
    base = QuantizeConfig(mode="weight-only", bits=4, block_size=16, weight_only_format=fmt, rounding="gptq",
                          scale_refit=False)
    plain, rep_p = quantize(model, calib, base)
    mse, _ = quantize(model, calib, dataclasses.replace(base, scale_search="mse"))
    refit, rep_r = quantize(model, calib, dataclasses.replace(base, scale_search="hessian", scale_refit=True))
    assert rep_r["weight_bytes_after"] == rep_p["weight_bytes_after"]  # the same storage
    for opt in ("disable", "all"):
        s_plain = _sqnr_on(model, plain, evaluation, opt)
        s_mse = _sqnr_on(model, mse, evaluation, opt)
        s_refit = _sqnr_on(model, refit, evaluation, opt)
        assert s_mse > s_plain + 0.08, (opt, s_plain, s_mse)  # measured +0.12 dB
        assert s_refit > s_plain + 0.3, (opt, s_plain, s_refit)  # +0.49
    layers = rep_r["rounding"]["layers"]
    assert all(v["output_error"] < v["output_error_before_refit"] for v in layers.values())


def test_conv_blocks_scale_search_and_refit_raise_output_sqnr(rng):
    model = _cnn(rng)
    calib = _images(rng, 12)
    evaluation = _images(np.random.default_rng(21), 6)
    base = QuantizeConfig(mode="weight-only", bits=4, op_types=("Conv", "MatMul", "Gemm"), conv_block_size=16,
                          rounding="gptq", scale_refit=False)
    plain, rep = quantize(model, calib, base)
    assert rep["nodes_quantized"] == 2
    refit, _ = quantize(model, calib, dataclasses.replace(base, scale_refit=True))
    best, _ = quantize(model, calib, dataclasses.replace(base, scale_search="mse", scale_refit=True))
    for opt in ("disable", "all"):
        s_plain = _sqnr_on(model, plain, evaluation, opt)
        assert _sqnr_on(model, refit, evaluation, opt) > s_plain + 0.1, opt  # measured +0.16 dB
        assert _sqnr_on(model, best, evaluation, opt) > s_plain + 0.15, opt  # +0.20


def test_scale_search_without_data_is_the_plain_squared_error(rng):
    model = _mlp(rng)
    evaluation = _correlated(np.random.default_rng(5), 8, 32, 96)
    cfg = QuantizeConfig(mode="weight-only", bits=4, block_size=16)
    near, _ = quantize(model, None, cfg)
    hess, rep = quantize(model, None, dataclasses.replace(cfg, scale_search="hessian"))
    mse, _ = quantize(model, None, dataclasses.replace(cfg, scale_search="mse"))
    assert rep["rounding"]["method"] == "nearest"
    s_hess, s_mse = _sqnr_on(model, hess, evaluation, "disable"), _sqnr_on(model, mse, evaluation, "disable")
    assert s_hess == pytest.approx(s_mse, abs=1e-9)
    assert s_mse > _sqnr_on(model, near, evaluation, "disable")


def test_scale_search_refuses_unknown_values():
    with pytest.raises(ConfigError, match="scale_search"):
        QuantizeConfig(mode="weight-only", scale_search="percentile")
    with pytest.raises(ConfigError, match="scale_search"):
        QuantizeConfig(mode="static", scale_search="mse")


# ------------------------------------------------------------------------- mean error into the bias


def test_gram_input_mean_is_the_mean_row(rng):
    from onnxcomp.analysis.gram import collect_grams

    model = _mlp(rng)
    feeds = _correlated(rng, 3, 20, 96)
    for f in feeds:
        f["x"] += np.float32(0.5)
    grams = collect_grams(model, [n for n in model.graph if n.name == "fc1"], feeds, max_rows=10**6)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(grams["fc1"].input_mean()[0], x.mean(axis=0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp-qdq", "mlp-ort", "cnn"])
def test_gptq_bias_absorbs_the_mean_error(rng, kind):
    if kind == "cnn":
        model, calib, evaluation = _cnn(rng), _images(rng, 12), _images(np.random.default_rng(21), 6)
        base = QuantizeConfig(mode="weight-only", bits=4, op_types=("Conv", "MatMul", "Gemm"), conv_block_size=16,
                              rounding="gptq", scale_refit=False)
        gain_plain, gain_refit = 0.08, 0.15  # measured +0.115 and +0.214 dB
    else:
        model = _mlp(rng)
        calib, evaluation = _correlated(rng, 16, 32, 96), _correlated(np.random.default_rng(99), 8, 32, 96)
        base = QuantizeConfig(mode="weight-only", bits=4, block_size=16, rounding="gptq", weight_only_format=kind[4:],
                              scale_refit=False)
        gain_plain, gain_refit = 0.15, 0.2  # measured +0.22 and +0.33 dB
    before = io.model_to_bytes(model)
    plain, _ = quantize(model, calib, base)
    biased, _ = quantize(model, calib, dataclasses.replace(base, gptq_bias=True))
    refit, _ = quantize(model, calib, dataclasses.replace(base, scale_search="hessian", scale_refit=True))
    both, _ = quantize(model, calib, dataclasses.replace(base, scale_search="hessian", scale_refit=True, gptq_bias=True))
    for opt in ("disable", "all"):
        assert _sqnr_on(model, biased, evaluation, opt) > _sqnr_on(model, plain, evaluation, opt) + gain_plain, opt
        assert _sqnr_on(model, both, evaluation, opt) > _sqnr_on(model, refit, evaluation, opt) + gain_refit, opt
    assert io.model_to_bytes(model) == before  # the input model is left as it was
    nodes = {n.name: n for n in biased.graph}
    if kind == "cnn":  # both Convs carry a moved bias; the one that had none got one
        assert nodes["conv1"].inputs[2].name.endswith("_mean_error")
        assert len(nodes["pw"].inputs) == 3 and nodes["pw"].inputs[2].name.endswith("_mean_error")
        assert {n.name: len(n.inputs) for n in model.graph}["pw"] == 2
    else:  # the Add after the MatMul and the Gemm's C
        assert nodes["bias1"].inputs[1].name.endswith("_mean_error")
        moved = [v.name for n in biased.graph for v in n.inputs if v is not None and v.name.startswith("b2")]
        assert moved and all(name.endswith("_mean_error") for name in moved)
        assert {n.name: n for n in model.graph}["bias1"].inputs[1].name == "b1"
