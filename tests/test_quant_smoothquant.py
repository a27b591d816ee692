"""SmoothQuant: exactness per producer kind, shared scales, refusals, alpha search, int8 gain."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError
from onnxcomp.graph import working_copy
from onnxcomp.io import clone_model
from onnxcomp.measure.fidelity import compare_models
from onnxcomp.passes.cleanup import CleanupPass
from onnxcomp.quant.api import quantize
from onnxcomp.quant.smoothquant import SmoothQuantConfig, SmoothQuantPass, smoothing_scales
from onnxcomp.testing import assert_equivalent

F32 = np.float32


def _zoo(rng):
    """One of each producer kind, on [N, 32] data:

    h = LN(x) -> {Gemm a (transB), MatMul b}        LayerNorm group, two consumers, one scale
    b2 = b + bb -> MatMul c                         MatMul + bias Add producer (b is also a consumer)
    m = a * k -> Gemm d (scalar C)                  Mul-by-constant producer
    d -> MatMul e                                   Gemm producer
    y = c + e
    """
    gamma = 1.0 + 0.1 * rng.standard_normal(32)
    gamma[[2, 9]] *= 20.0
    inits = [
        ("gamma", gamma), ("beta", 0.1 * rng.standard_normal(32)),
        ("wa", rng.standard_normal((16, 32)) * 0.2), ("ba", rng.standard_normal(16) * 0.1),
        ("wb", rng.standard_normal((32, 24)) * 0.2), ("bb", rng.standard_normal(24) * 0.1),
        ("wc", rng.standard_normal((24, 8)) * 0.2),
        ("k", np.abs(rng.standard_normal(16)) + 0.1),
        ("wd", rng.standard_normal((16, 8)) * 0.3), ("cd", np.array(0.25)),
        ("we", rng.standard_normal((8, 8)) * 0.3),
    ]
    nodes = [
        oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
        oh.make_node("Gemm", ["h", "wa", "ba"], ["a"], transB=1, name="gemm_a"),
        oh.make_node("MatMul", ["h", "wb"], ["b"], name="mm_b"),
        oh.make_node("Add", ["bb", "b"], ["b2"], name="bias_b"),
        oh.make_node("MatMul", ["b2", "wc"], ["c"], name="mm_c"),
        oh.make_node("Mul", ["a", "k"], ["m"], name="mul_k"),
        oh.make_node("Gemm", ["m", "wd", "cd"], ["d"], name="gemm_d"),
        oh.make_node("MatMul", ["d", "we"], ["e"], name="mm_e"),
        oh.make_node("Add", ["c", "e"], ["y"], name="out"),
    ]
    return io.load_model(make_proto(nodes, [("x", ["N", 32])], [("y", ["N", 8])],
                                    [(n, np.asarray(a, F32)) for n, a in inits]))


def _data(rng, n=8, shape=(4, 32), name="x"):
    return [{name: rng.standard_normal(shape).astype(F32)} for _ in range(n)]


def _smooth(model, data, **cfg):
    out = clone_model(model)
    result = SmoothQuantPass(SmoothQuantConfig(**cfg), data)(out)
    return out, result.stats


@pytest.mark.parametrize("search", [False, True], ids=["alpha-0.5", "search"])
def test_every_producer_kind_is_exact(rng, search):
    model = _zoo(rng)
    smoothed, stats = _smooth(model, _data(rng), search=search, require_improvement=False)
    groups = {g["tensor"]: g for g in stats["groups"]}
    assert set(groups) == {"h", "b2", "m", "d"}
    assert groups["h"]["producer_op"] == "LayerNormalization"
    assert groups["h"]["consumers"] == ["gemm_a", "mm_b"]
    assert groups["b2"]["producer"] == "mm_b" and groups["m"]["producer_op"] == "Mul"
    assert groups["d"]["producer"] == "gemm_d"
    if not search:
        assert all(g["alpha"] == 0.5 for g in groups.values())
    assert_equivalent(model, smoothed, _data(rng, 3, (16, 32)))
    # mm_b's weight was scaled on both axes (consumer rows in 'h', producer columns in 'b2');
    # the scalar Gemm bias became one value per channel
    nodes = {n.name: n for n in smoothed.graph}
    assert nodes["gemm_d"].inputs[2].const_value.numpy().shape == (8,)


def test_shared_scale_moves_outliers_out_of_the_layernorm(rng):
    model = _zoo(rng)
    data = _data(rng)
    smoothed, stats = _smooth(model, data, search=False)
    group = next(g for g in stats["groups"] if g["tensor"] == "h")
    assert group["outlier_ratio_before"] > 10 and group["outlier_ratio_after"] < group["outlier_ratio_before"] / 3
    # the shared scale: gamma_j / s_j and every consumer's row j * s_j, with the same s
    before = {n.name: n for n in model.graph}
    after = {n.name: n for n in smoothed.graph}
    s = before["ln"].inputs[1].const_value.numpy() / after["ln"].inputs[1].const_value.numpy()
    np.testing.assert_allclose(after["gemm_a"].inputs[1].const_value.numpy(),
                               before["gemm_a"].inputs[1].const_value.numpy() * s[None, :], rtol=1e-5)
    rows = after["mm_b"].inputs[1].const_value.numpy() / before["mm_b"].inputs[1].const_value.numpy()
    cols = rows / s[:, None]  # what is left is mm_b's own column scaling (producer of b2)
    np.testing.assert_allclose(cols, np.broadcast_to(cols[:1], cols.shape), rtol=1e-4)


def test_digits_transformer_is_exact_and_shares_qkv_scale():
    model = working_copy(MODELS / "digits_transformer.onnx", 13, allow_upgrade=True, notes=[])
    CleanupPass()(model)
    calib = Dataset(MODELS / "digits_calib.npz", model, batch_size=50)
    smoothed, stats = _smooth(model, calib, max_samples=2)
    images = np.load(MODELS / "digits_eval.npz")["image"]
    assert_equivalent(model, smoothed, [{"image": images[:16]}, {"image": images[16:17]}])
    assert stats["feeds"] == 2
    by_tensor = {g["tensor"]: g for g in stats["groups"]}
    qkv = by_tensor["/layers.0/ln1/LayerNormalization_output_0"]
    assert [c.split("/")[-2] for c in qkv["consumers"]] == ["q", "k", "v"]
    assert qkv["alpha"] in SmoothQuantConfig().alphas
    assert "ReduceMean" in stats["skipped"]["/ReduceMean_output_0"]
    assert "Reshape" in stats["skipped"]["/layers.0/attn/Reshape_3_output_0"]


def _ln_model(extra_nodes, outputs, producer="ln"):
    """x -> [LayerNormalization 'ln' | Relu] -> h -> MatMul q -> y, plus ``extra_nodes``."""
    rng = np.random.default_rng(3)
    inits = [("gamma", np.ones(8, F32)), ("beta", np.zeros(8, F32)), ("wq", rng.standard_normal((8, 4)).astype(F32)),
             ("wt", rng.standard_normal((3, 8)).astype(F32))]
    first = (oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln")
             if producer == "ln" else oh.make_node(producer, ["x"], ["h"], name="prod"))
    nodes = [first, oh.make_node("MatMul", ["h", "wq"], ["y"], name="q"), *extra_nodes]
    return io.load_model(make_proto(nodes, [("x", ["N", 8])], outputs, inits))


@pytest.mark.parametrize(
    "extra, outputs, producer, reason",
    [
        ([oh.make_node("Add", ["h", "x"], ["res"], name="residual")], [("y", ["N", 4]), ("res", ["N", 8])], "ln",
         "also feeds Add 'residual'"),
        ([], [("y", ["N", 4]), ("h", ["N", 8])], "ln", "tensor 'h' is a graph output"),
        ([oh.make_node("Gemm", ["wt", "h"], ["z"], name="gemm_t")], [("y", ["N", 4]), ("z", [3, "N"])], "ln",
         "is input 1 of Gemm 'gemm_t'"),
        ([], [("y", ["N", 4])], "Relu", "comes from Relu 'prod', which cannot absorb"),
        ([oh.make_node("MatMul", ["x", "wq"], ["y2"], name="from_input")], [("y", ["N", 4]), ("y2", ["N", 4])], "ln",
         "tensor 'x' is a graph input"),
    ],
    ids=["other-consumer", "graph-output", "weight-position", "relu-producer", "graph-input"],
)
def test_refusals_leave_the_model_alone(extra, outputs, producer, reason, rng):
    model = _ln_model(extra, outputs, producer)
    before = io.model_to_bytes(model)
    result = SmoothQuantPass(SmoothQuantConfig(search=False), _data(rng, 2, (4, 8)))(model)
    reasons = " | ".join(result.stats["skipped"].values())
    assert reason in reasons, result.stats["skipped"]
    if producer == "ln" and "graph input" not in reason:
        assert result.stats["smoothed"] == 0 and not result.modified
        assert io.model_to_bytes(model) == before


def test_gemm_with_transa_is_refused(rng):
    inits = [("gamma", np.ones(8, F32)), ("w", rng.standard_normal((8, 4)).astype(F32))]
    nodes = [oh.make_node("LayerNormalization", ["x", "gamma"], ["h"], axis=-1, name="ln"),
             oh.make_node("Gemm", ["h", "w"], ["y"], transA=1, name="g")]
    model = io.load_model(make_proto(nodes, [("x", [8, 8])], [("y", [8, 4])], inits))
    stats = SmoothQuantPass(SmoothQuantConfig(search=False), _data(rng, 2, (8, 8)))(model).stats
    assert "transA=1" in stats["skipped"]["h"]


def _outlier_attention(rng, c=64, t=16, outliers=(3, 17, 40), factor=50.0):
    """LayerNorm whose scale has ``outliers`` channels x ``factor`` -> q, k, v -> attention -> o."""
    gamma = 1.0 + 0.1 * rng.standard_normal(c)
    gamma[list(outliers)] *= factor
    inits = [("gamma", gamma), ("beta", 0.1 * rng.standard_normal(c))]
    for name in "qkvo":
        inits.append((f"w{name}", rng.standard_normal((c, c)) / np.sqrt(c) * (0.1 if name in "qk" else 1.0)))
        inits.append((f"b{name}", 0.1 * rng.standard_normal(c)))
    inits.append(("scale", np.array(1.0 / np.sqrt(c))))
    nodes = [
        oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
        *[n for name in "qkv" for n in (
            oh.make_node("MatMul", ["h", f"w{name}"], [f"{name}0"], name=f"{name}_proj"),
            oh.make_node("Add", [f"{name}0", f"b{name}"], [name], name=f"{name}_bias"))],
        oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        oh.make_node("MatMul", ["q", "kt"], ["att0"], name="qk"),
        oh.make_node("Mul", ["att0", "scale"], ["att1"], name="att_scale"),
        oh.make_node("Softmax", ["att1"], ["att"], axis=-1, name="softmax"),
        oh.make_node("MatMul", ["att", "v"], ["ctx"], name="av"),
        oh.make_node("MatMul", ["ctx", "wo"], ["o0"], name="o_proj"),
        oh.make_node("Add", ["o0", "bo"], ["y"], name="o_bias"),
    ]
    return io.load_model(make_proto(nodes, [("x", ["N", t, c])], [("y", ["N", t, c])],
                                    [(n, np.asarray(a, F32)) for n, a in inits]))


def test_outlier_channels_static_int8_gains(rng):
    model = _outlier_attention(rng)
    calib = _data(rng, 16, (2, 16, 64))
    held_out = _data(rng, 4, (4, 16, 64))
    smoothed, stats = _smooth(model, calib)
    assert_equivalent(model, smoothed, held_out[:1])
    (group,) = stats["groups"]
    assert group["consumers"] == ["q_proj", "k_proj", "v_proj"]
    # the search reports every candidate and keeps the best one
    assert set(group["search"]) == {f"{a:g}" for a in SmoothQuantConfig().alphas}
    assert group["search"][f"{group['alpha']:g}"] == max(group["search"].values())
    assert group["simulated_sqnr_db"] > group["simulated_sqnr_unsmoothed_db"] + 6.0
    sqnr = {}
    for label, m in (("plain", model), ("smoothed", smoothed)):
        quantized, _ = quantize(m, calib)
        sqnr[label] = compare_models(model, quantized, Dataset(held_out, model)).outputs[0].sqnr_db
    # measured on this seed: 23.5 dB -> 27.6 dB (alpha 0.55; simulated q/k/v outputs 28.7 -> 41.1 dB,
    # outlier ratio max/median of max|X_j| 64 -> 6.6)
    assert sqnr["smoothed"] > sqnr["plain"] + 3.0, sqnr


def test_search_skips_a_group_it_cannot_improve(rng):
    model = _outlier_attention(rng, factor=1.0)
    data = _data(rng, 8, (2, 16, 64))
    smoothed, stats = _smooth(model, data, alphas=(0.0,))
    assert stats["smoothed"] == 0 and not stats["initializers_written"]
    assert "does not reduce the simulated int8 error" in stats["skipped"]["h"]
    _, forced = _smooth(model, data, alphas=(0.0,), require_improvement=False)
    assert forced["smoothed"] == 1


def test_smoothing_scales_formula():
    x = np.array([8.0, 1.0, 0.0, 4.0])
    w = np.array([2.0, 1.0, 3.0, 0.0])
    s = smoothing_scales(x, w, 0.5)
    np.testing.assert_allclose(s, [2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(smoothing_scales(x[:2], w[:2], 1.0), [8.0, 1.0])
    np.testing.assert_allclose(smoothing_scales(x[:2], w[:2], 0.0), [0.5, 1.0])


def test_config_and_data_validation():
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="alphas"):
        SmoothQuantConfig(alphas=(0.5, 2.0))
    with pytest.raises(ConfigError, match="alphas must not be empty"):
        SmoothQuantConfig(alphas=())
    cfg = SmoothQuantConfig.from_dict({"alphas": [0.4, 0.6], "search_rows": 64})
    assert cfg.alphas == (0.4, 0.6)
    with pytest.raises(ConfigError, match="calibration data"):
        SmoothQuantPass(SmoothQuantConfig())
