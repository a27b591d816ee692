"""Range choice by measured error (calibration ``auto``) and the entropy observer on sparse data."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.graph import infer_types
from onnxcomp.quant.api import quantize
from onnxcomp.quant.calibrate import calibrate
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.observers import EntropyObserver, _KL_MIN_PER_BIN
from onnxcomp.quant.primitives import compute_scale_zero_point, dequantize, quantize as fake_q
from onnxcomp.quant.ranges import CANDIDATE_ORDER, CandidateObserver, choose_ranges
from onnxcomp.testing import run_model


def _fq(x: np.ndarray, rng_: tuple[float, float]) -> np.ndarray:
    s, z = compute_scale_zero_point(rng_[0], rng_[1], "uint8", False)
    return dequantize(fake_q(x, s, z, "uint8"), s, z).astype(np.float64)


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((out - ref) ** 2)))


def _two_matmuls(w1: np.ndarray, w2: np.ndarray):
    """x -> MatMul(w1) -> h ; y = MatMul(h, w2): ``x`` and ``h`` are the tensors to range."""
    return io.load_model(make_proto(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("MatMul", ["h", "w2"], ["y"])],
        [("x", ["N", w1.shape[0]])], [("y", ["N", w2.shape[1]])], [("w1", w1), ("w2", w2)],
    ))


def _feeds(x: np.ndarray, batch: int = 64) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i : i + batch]} for i in range(0, len(x), batch)]


@pytest.fixture
def heavy_tailed():
    """``x``: Gaussian activations plus two outliers (+-50) in a channel that the consumer almost
    ignores: clipping pays at the consumer, not on the tensor itself."""
    r = np.random.default_rng(5)
    x = r.standard_normal((1024, 32)).astype(np.float32)
    x[100, 31], x[700, 31] = 50.0, -50.0
    w1 = (r.standard_normal((32, 60)) * 0.1).astype(np.float32)
    w1[31] *= 0.001
    w2 = (r.standard_normal((60, 8)) * 0.1).astype(np.float32)
    return x, w1, w2


def test_auto_clips_heavy_tails_and_beats_minmax_at_the_consumer(heavy_tailed):
    x, w1, w2 = heavy_tailed
    model = _two_matmuls(w1, w2)
    infer_types(model)
    choices, observers, feeds, _ = choose_ranges(model, ["x"], _feeds(x, 32), score_feeds=32)
    assert feeds == 32
    c = choices["x"]
    assert c.method != "minmax"
    lo, hi = c.range
    assert hi - lo < 0.2 * (float(x.max()) - float(x.min()))  # clipped
    # the MSE of the tensor itself keeps the outliers: only the consumer's error says clip
    assert observers["x"].candidates()["mse"][1] > 40.0
    # the consumer's SQNR, measured here in numpy, beats min/max's by at least 12 dB
    ref = x.astype(np.float64) @ w1
    auto_db = _sqnr_db(ref, _fq(x, c.range) @ w1)
    minmax_db = _sqnr_db(ref, _fq(x, (float(x.min()), float(x.max()))) @ w1)
    assert auto_db > minmax_db + 12.0, (auto_db, minmax_db)
    # and the errors auto measured through onnxruntime are the numpy ones
    cands = observers["x"].candidates()
    for method, err in c.errors.items():
        want = np.sum((_fq(x, cands[method]) @ w1 - ref) ** 2) / np.sum(ref**2)
        assert err == pytest.approx(want, rel=1e-3)
    assert c.method == min(c.errors, key=c.errors.get)


def test_auto_keeps_minmax_where_clipping_hurts():
    """A sparse feature: channel 0 is 15 on 0.5% of the samples and 0 elsewhere, and the next
    layer weighs it heavily. Percentiles and entropy clip it to about 1-2; min/max keeps it."""
    model, v, w = _sparse_feature_model()
    choices, observers, _, _ = choose_ranges(model, ["v"], _feeds(v, 64))
    cands = observers["v"].candidates()
    clipping = [m for m in ("percentile99.99", "entropy") if cands[m][1] < 3.0]
    assert len(clipping) == 2  # tensor-level statistics clip the feature away
    ch = choices["v"]
    assert ch.method == "minmax" and ch.range[1] == pytest.approx(15.0)
    assert ch.consumers == 1
    ref = v.astype(np.float64) @ w
    minmax_db = _sqnr_db(ref, _fq(v, cands["minmax"]) @ w)
    assert minmax_db > 30.0
    for m in clipping:
        assert _sqnr_db(ref, _fq(v, cands[m]) @ w) < minmax_db - 20.0, m


def _sparse_feature_model():
    r = np.random.default_rng(7)
    n, c = 2048, 60
    v = np.abs(r.standard_normal((n, c))).astype(np.float32) * 0.3
    v[r.random(n) < 0.005, 0] = 15.0
    w = (r.standard_normal((c, 16)) * 0.1).astype(np.float32)
    w[0] = 2.0
    model = io.load_model(make_proto(
        [oh.make_node("Relu", ["x"], ["v"]), oh.make_node("MatMul", ["v", "w"], ["y"])],
        [("x", ["N", c])], [("y", ["N", 16])], [("w", w)],
    ))
    infer_types(model)
    return model, v, w


def test_entropy_keeps_minmax_where_its_clip_hurts_the_consumer():
    model, v, w = _sparse_feature_model()
    plain = EntropyObserver(qdtype="uint8")
    plain.update(v)
    assert plain.compute_range()[1] < 3.0  # KL alone clips the feature
    result = calibrate(model, ["v"], _feeds(v, 64), method="entropy", observer_kwargs={"qdtype": "uint8"})
    assert result.choices["v"].method == "minmax"
    assert result.ranges["v"][1] == pytest.approx(15.0)


def test_entropy_keeps_its_threshold_where_it_helps(heavy_tailed):
    x, w1, w2 = heavy_tailed
    model = _two_matmuls(w1, w2)
    infer_types(model)
    result = calibrate(model, ["x"], _feeds(x, 64), method="entropy", observer_kwargs={"qdtype": "uint8"})
    assert result.choices["x"].method == "entropy"
    assert result.ranges["x"][1] < 0.5 * float(x.max())


def test_tensor_without_scorable_consumer_is_scored_on_itself(heavy_tailed):
    x, w1, _ = heavy_tailed
    model = io.load_model(make_proto(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("TopK", ["h", "k"], ["vals", "idx"])],
        [("x", ["N", 32])], [("vals", ["N", 2]), ("idx", ["N", 2], 7)], [("w1", w1), ("k", np.array([2], np.int64))],
    ))
    infer_types(model)
    choices, observers, _, _ = choose_ranges(model, ["h"], _feeds(x))
    h = x.astype(np.float64) @ w1
    cands = observers["h"].candidates()
    c = choices["h"]
    assert c.consumers == 0
    for method, err in c.errors.items():
        assert err == pytest.approx(np.sum((_fq(h.astype(np.float32), cands[method]) - h) ** 2) / np.sum(h**2), rel=1e-3)


def test_candidates_are_deduplicated_and_ordered():
    obs = CandidateObserver()
    obs.update(np.full(100, 0.5, np.float32))
    cands = obs.candidates()
    assert list(cands) == list(CANDIDATE_ORDER)
    assert all(lo <= hi for lo, hi in cands.values())
    model = io.load_model(make_proto([oh.make_node("Relu", ["x"], ["y"])], [("x", ["N", 4])], [("y", ["N", 4])]))
    infer_types(model)
    choices, _, _, _ = choose_ranges(model, ["x"], [{"x": np.full((2, 4), 0.5, np.float32)}])
    assert choices["x"].method == "minmax" and list(choices["x"].errors) == ["minmax"]


def test_quantize_auto_end_to_end_on_digits_cnn():
    model = MODELS / "digits_cnn.onnx"
    data = MODELS / "digits_calib.npz"
    with np.load(MODELS / "digits_eval.npz") as z:
        x = z["image"]
    labels = np.load(MODELS / "digits_eval_labels.npy")
    acc = {}
    for method in ("minmax", "per-tensor"):
        q, report = quantize(model, data, QuantizeConfig(calibration=method, max_samples=48), verify=False)
        acc[method] = float(np.mean(run_model(q, [{"image": x}])[0][0].argmax(1) == labels))
    chosen = report["calibration"]["chosen"]
    assert sum(chosen.values()) == report["calibration"]["tensors"] > 0
    assert acc["per-tensor"] >= acc["minmax"] - 0.01 and acc["per-tensor"] > 0.8, acc


def test_cli_method_auto(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--calibration",
                 str(MODELS / "digits_calib.npz"), "--method", "per-tensor", "--max-samples", "32"])
    assert code == 0 and out.is_file()
    assert "ranges chosen:" in capsys.readouterr().out


# --------------------------------------------------------------------------- entropy root cause


def _se_vector(samples: int, seed: int = 0) -> np.ndarray:
    """What PP-OCRv4 rec's first squeeze-and-excitation Relu outputs: 60 values a line, mostly
    small, channel 0 about 14.9 on every line."""
    r = np.random.default_rng(seed)
    v = np.maximum(r.standard_normal((samples, 60)) * 0.7, 0.0)
    v[:, 7] = r.uniform(1.0, 4.1, samples)
    v[:, 0] = 14.85 + 0.02 * r.standard_normal(samples)
    return v.astype(np.float32)


@pytest.mark.parametrize("qdtype", ["uint8", "int8"])
def test_entropy_keeps_an_always_on_channel_of_a_small_tensor(qdtype):
    v = _se_vector(32)  # 1920 values: fewer than the 2048 bins
    obs = EntropyObserver(qdtype=qdtype)
    for row in v:
        obs.update(row)
    lo, hi = obs.compute_range()
    assert hi == pytest.approx(float(v.max()))  # before the fix: about 3.9, the channel clipped by 4x
    # the consumer's output (a 1x1 Conv on the vector) keeps its SQNR
    w = np.random.default_rng(1).standard_normal((60, 60)) * 0.2
    ref = v.astype(np.float64) @ w
    assert _sqnr_db(ref, _fq(v, (lo, hi)) @ w) > 30.0


def test_entropy_is_unchanged_on_a_dense_histogram(monkeypatch):
    r = np.random.default_rng(3)
    x = r.standard_normal(200_000).astype(np.float32)
    x[r.random(x.size) < 0.01] *= 30.0
    obs = EntropyObserver(qdtype="int8")
    obs.update(x)
    fixed = obs.compute_range()
    thresholds, _ = obs.divergences()
    assert thresholds[1] - thresholds[0] == obs.bin_width  # nothing merged
    monkeypatch.setattr("onnxcomp.quant.observers._KL_MIN_PER_BIN", 0)  # no merging: the old rule
    assert obs.compute_range() == fixed


def test_entropy_on_a_sparse_histogram_merges_bins_exactly():
    v = _se_vector(400)  # 24000 values: enough for KL once bins are merged
    obs = EntropyObserver(qdtype="uint8")
    obs.update(v)
    thresholds, kl = obs.divergences()
    assert thresholds.size > 0
    width = thresholds[1] - thresholds[0]
    assert width > obs.bin_width and np.log2(width / obs.bin_width).is_integer()
    assert v.size >= _KL_MIN_PER_BIN * (thresholds[-1] / width) / 2


def test_entropy_reads_ppocr_rec_lines_the_suite_never_renders(ppocr_models):
    """The real model: entropy ranges made PP-OCRv4 rec read nothing (char accuracy 0.0) on lines
    rendered with other text, sizes and colours; calibrated on the suite's calibration lines."""
    pytest.importorskip("PIL")
    from benchmarks import fetch, textdata
    from benchmarks.ranges_study import other_rec

    path = ppocr_models / "ch_PP-OCRv4_rec_infer.onnx"
    if not textdata.fonts_available():
        pytest.skip("no DejaVu fonts (Debian: fonts-dejavu-core)")
    from benchmarks import metrics

    calib, _ = textdata.rec_samples(textdata.split_sentences()["calib"], 6, 101)
    x, texts = other_rec(8, 4242)
    charset = fetch.rec_charset(path)
    q, report = quantize(path, [{"x": calib[i : i + 1]} for i in range(len(calib))],
                         QuantizeConfig(calibration="entropy"), verify=False)
    out = run_model(q, [{"x": x}])[0][0]
    pred = [s.strip() for s in metrics.ctc_greedy_decode(out, charset)]
    assert metrics.char_accuracy(pred, texts) > 0.8
    assert report["calibration"]["chosen"].get("minmax", 0) > 0  # some KL thresholds were refused


def test_auto_keeps_the_mse_range_without_a_clear_gain():
    """Laplace activations: every candidate is within a few tenths of a dB; auto keeps MSE."""
    r = np.random.default_rng(5)
    x = r.laplace(size=(1024, 32)).astype(np.float32)
    w1 = (r.standard_normal((32, 60)) * 0.1).astype(np.float32)
    model = _two_matmuls(w1, w1[:8].T.copy())
    infer_types(model)
    choices, _, _, _ = choose_ranges(model, ["x"], _feeds(x, 64))
    c = choices["x"]
    assert c.method == "mse"
    assert len(c.errors) >= 3 and all(e * 2.0 >= c.errors["mse"] for e in c.errors.values())
