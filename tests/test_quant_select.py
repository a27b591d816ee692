"""The model-level guard of ``auto`` ranges (onnxcomp.quant.select): variants judged whole."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.graph import infer_types
from onnxcomp.quant.api import quantize
from onnxcomp.quant.calibrate import calibrate
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.select import METHODS, SINGLE, _score, choose, select_ranges, variant_ranges
from onnxcomp.runtime import run_model


def _classifier(seed: int = 3):
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((16, 32)) * 0.3).astype(np.float32)
    w2 = (r.standard_normal((32, 5)) * 0.3).astype(np.float32)
    model = io.load_model(make_proto(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["a"]),
         oh.make_node("MatMul", ["a", "w2"], ["z"]), oh.make_node("Softmax", ["z"], ["p"], axis=-1)],
        [("x", ["N", 16])], [("p", ["N", 5])], [("w1", w1), ("w2", w2)]))
    infer_types(model)
    x = r.standard_normal((24 * 16, 16)).astype(np.float32)
    x[::97, 3] = 30.0  # rare outliers: the single methods disagree on them
    return model, [{"x": x[i : i + 16]} for i in range(0, len(x), 16)]


def test_variants_come_from_the_candidate_histograms():
    model, feeds = _classifier()
    result = calibrate(model, ["x", "a"], feeds, method="auto")
    variants = variant_ranges(result.ranges, result.observers)
    assert list(variants)[0] == "mse" and set(variants) <= set(SINGLE) and len(variants) >= 3
    assert variants["mse"] == result.ranges  # auto calibrates to the MSE ranges until one is chosen
    for name, ranges in variants.items():
        assert ranges == {t: obs.candidates()[name] for t, obs in result.observers.items()}
    # the per-tensor choice competes first
    per = calibrate(model, ["x", "a"], feeds, method="per-tensor")
    assert list(variant_ranges(per.ranges, per.observers, per_tensor=True))[0] == "per-tensor"
    # without candidate histograms there is only what was calibrated
    plain = calibrate(model, ["x", "a"], feeds, method="minmax")
    assert list(variant_ranges(plain.ranges, plain.observers)) == ["calibrated"]


def test_score_orders_by_worst_rule_figure_then_sqnr():
    kinds = ["scores", "values"]
    a = _score([{"top1_agreement": 0.99, "sqnr_db": 20.0}, {"cosine": 0.999, "sqnr_db": 30.0}], kinds)
    b = _score([{"top1_agreement": 1.0, "sqnr_db": 10.0}, {"cosine": 0.98, "sqnr_db": 40.0}], kinds)
    c = _score([{"top1_agreement": 0.99, "sqnr_db": float("inf")}, {"cosine": 0.999, "sqnr_db": 30.0}], kinds)
    assert a == (0.99, 25.0) and b == (0.98, 25.0) and c == (0.99, 65.0)
    assert c > a > b


def test_choose_takes_the_closest_among_the_near_best_decisions():
    # PP-OCR rec's held-out feeds: min/max keeps every line, mse flips a few characters but is
    # closer everywhere else; raw entropy loses most lines
    rec = {"mse": (0.976, 9.62), "minmax": (1.0, 8.39), "percentile": (0.960, 9.46), "entropy": (0.377, 4.07)}
    assert choose(rec) == "mse" and choose(rec, tolerance=0.0) == "minmax"
    assert choose(rec, margin=2.0) == "minmax"  # mse is not 2 dB ahead
    assert choose({"mse": (0.5, 30.0), "minmax": (0.9, 10.0)}) == "minmax"  # far worse decisions lose
    assert choose({"minmax": (1.0, 20.0), "mse": (1.0, 20.5)}) == "minmax"  # within the margin
    assert choose({"minmax": (1.0, 20.0), "mse": (1.0, 20.0)}, prefer="none") == "mse"  # METHODS order breaks ties
    # magika's held-out feeds: percentile 0.4 dB ahead, 1.5 points behind min/max on the tune split
    assert choose({"mse": (1.0, 22.8), "minmax": (1.0, 23.9), "percentile": (1.0, 24.3), "entropy": (1.0, 18.1)}) == "minmax"


def test_the_least_damaging_variant_wins():
    """``build`` that damages each variant by a known amount: the least damaged one is chosen."""
    model, feeds = _classifier()
    result = calibrate(model, ["x", "a"], feeds, method="auto")
    variants = variant_ranges(result.ranges, result.observers)
    held = variant_ranges(result.ranges, result.observers, held_out=True)  # what the variants are built with
    damage = {name: 0.5 * i for i, name in enumerate(reversed(list(variants)))}  # the last variant is exact

    def build(trial, ranges):
        w = trial.graph.initializers["w2"]
        noise = np.random.default_rng(0).standard_normal(w.const_value.shape).astype(np.float32)
        w.const_value = ir.tensor(w.const_value.numpy() + damage[next(n for n, r in held.items() if r == ranges)] * noise, name="w2")

    best, ranges, report = select_ranges(model, result.ranges, result.observers, feeds, build)
    assert best == list(variants)[-1] and ranges == variants[best]
    assert report["variant"] == best and set(report["variants"]) == set(variants) and report["feeds"] == 6  # every 4th of 24 feeds
    assert report["variants"][best]["sqnr_db"] == 100.0  # untouched: capped SQNR
    assert all(report["variants"][n]["sqnr_db"] < 100.0 for n in variants if n != best)
    assert model.graph.initializers["w2"].const_value.numpy().std() > 0  # the model itself is untouched


def test_quantize_auto_reports_the_chosen_variant_and_writes_its_ranges():
    model = MODELS / "digits_cnn.onnx"
    q, report = quantize(model, MODELS / "digits_calib.npz", QuantizeConfig(calibration="auto", max_samples=48),
                         verify=False)
    sel = report["calibration"]["selected"]
    assert sel["variant"] in sel["variants"] and sel["variant"] in METHODS
    assert sel["variant"] == choose({k: (v["worst"], v["sqnr_db"]) for k, v in sel["variants"].items()})
    # one plan for every variant: the digits CNN keeps every Conv int8 whatever the ranges
    assert report["int8_nodes"] == quantize(model, MODELS / "digits_calib.npz",
                                            QuantizeConfig(calibration="minmax", max_samples=48),
                                            verify=False)[1]["int8_nodes"]
    with np.load(MODELS / "digits_eval.npz") as z:
        x = z["image"][:200]
    labels = np.load(MODELS / "digits_eval_labels.npy")[:200]
    acc = float(np.mean(run_model(q, [{"image": x}])[0][0].argmax(1) == labels))
    assert acc > 0.95


def test_a_large_model_keeps_the_per_tensor_choice(monkeypatch):
    model, feeds = _classifier()
    result = calibrate(model, ["x", "a"], feeds, method="auto")
    monkeypatch.setattr("onnxcomp.quant.select.LARGE_MODEL_BYTES", 16)
    best, ranges, report = select_ranges(model, result.ranges, result.observers, feeds,
                                         lambda *a: pytest.fail("no variant may be built"))
    assert best == "mse" and ranges == result.ranges and "large" in report["skipped"]


def test_auto_judges_variants_on_feeds_their_ranges_did_not_see():
    """Min/max fitted on feeds without outliers meets one on a held-out feed and clips it: the
    variant judged on that feed is the one the held-out data would choose."""
    model, _ = _classifier()
    r = np.random.default_rng(4)
    feeds = [{"x": r.standard_normal((16, 16)).astype(np.float32)} for _ in range(16)]
    result = calibrate(model, ["x", "a"], feeds, method="auto")
    obs = result.observers["x"]
    assert obs.updates == 16 and obs.fit.candidates() != obs.candidates()  # every 4th feed is held out of obs.fit
    built = []

    def build(trial, ranges):
        built.append(ranges)

    best, ranges, report = select_ranges(model, result.ranges, result.observers, feeds, build)
    assert report["held_out"] and report["feeds"] == 4
    # the variants are built with the ranges without the held-out feeds; the result keeps all feeds'
    held = variant_ranges(result.ranges, result.observers, held_out=True)
    assert built == [held[k] for k in report["variants"]]
    assert ranges == variant_ranges(result.ranges, result.observers)[best]
    lo, hi = obs.fit.candidates()["minmax"]
    assert hi <= obs.candidates()["minmax"][1] and lo >= obs.candidates()["minmax"][0]
