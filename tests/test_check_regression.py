"""The check judges an output of one value per sample (a regression, ``[N, 1]``) by its R^2 against
the original, centred on the original's mean, not by a cosine of raw values that their common
offset dominates; wider outputs keep their rule. And an F1's decision count prints whole, with
its unit ("15 detections", not "7.5 decisions").

Found by the thirteenth session's sweep: an sklearn MLPRegressor of diabetes progression (mean
~150) pruned to 0.7 passed at cosine 0.9939 while its R^2 on held-out rows fell from 0.588 to 0.500.
"""

from __future__ import annotations

import json

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.check import (
    FIGURES,
    KIND_DETECTORS,
    RULES,
    CheckConfig,
    DetectionAgreement,
    OutputView,
    R2AgainstOriginal,
    check_model,
    classify,
    output_kinds,
    resolution_note,
    split_data,
    verdict_line,
)
from onnxcomp.data import Dataset

OFFSET = 150.0


def _regressor(scale: float = 1.0, width: int = 1, shift: float = 0.0):
    """``y = x @ (scale * w) + OFFSET + shift``, ``x [N, 8]`` -> ``y [N, width]`` (seeded)."""
    w = np.random.default_rng(3).standard_normal((8, width)).astype(np.float32) * 10.0
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Add", ["h", "b"], ["y"])]
    inits = [("w", w * np.float32(scale)), ("b", np.full(width, OFFSET + shift, np.float32))]
    return io.load_model(make_proto(nodes, [("x", ["N", 8])], [("y", ["N", width])], inits))


def _feeds(n: int = 30, rows: int = 4):
    rng = np.random.default_rng(11)
    return [{"x": rng.standard_normal((rows, 8)).astype(np.float32)} for _ in range(n)]


def _check(reference, candidate, feeds, config=None):
    split = split_data(Dataset(feeds, reference), config or CheckConfig())
    return check_model(reference, candidate, split, config or CheckConfig(), compressed=1)


def _one_shot_r2(r: np.ndarray, c: np.ndarray) -> float:
    """1 - SSE / (SST + 0.01^2 sum r^2), the worst column (the spread floor: R2AgainstOriginal)."""
    r, c = r.astype(np.float64), c.astype(np.float64)
    spread = ((r - r.mean(axis=0)) ** 2).sum(axis=0) + 1e-4 * (r ** 2).sum(axis=0)
    return float((1.0 - ((c - r) ** 2).sum(axis=0) / spread).min())


def test_regression_is_a_kind_of_the_tables():
    assert RULES["regression"].figure == "r2_vs_original" and RULES["regression"].threshold == "min_r2"
    assert FIGURES["r2_vs_original"] is R2AgainstOriginal
    assert ("regression", KIND_DETECTORS[-1][1]) == KIND_DETECTORS[-1]
    assert CheckConfig().min_r2 == 0.99 and CheckConfig().budget()["min_r2"] == 0.99
    view = OutputView("y", "Add", False, False, ("N", 1), True)
    assert classify(view) == "regression"
    # wide values, rank-1 vectors and integers keep their kinds
    assert classify(OutputView("e", "MatMul", False, False, ("N", 4, 64), True)) == "values"
    assert classify(OutputView("e", "Add", False, False, ("N", 64), True, beside_scores=True)) == "values"
    assert classify(OutputView("v", "Add", False, False, ("N",), True)) == "values"
    assert classify(OutputView("i", "Add", False, False, ("N", 1), False)) == "exact"
    assert output_kinds(_regressor()) == {"y": "regression"}


def test_a_regression_that_keeps_its_raw_cosine_but_loses_its_spread_is_flagged():
    feeds = _feeds()
    ref, cand = _regressor(), _regressor(scale=0.6)  # predictions shrunk toward the mean by 40%
    report = _check(ref, cand, feeds)
    row = report["outputs"][0]
    assert row["kind"] == "regression" and row["rule"] == "R^2 against the original >= 0.99"
    assert row["cosine"] > 0.99  # what the old rule judged, and passed
    held_out = [f for i, f in enumerate(feeds) if i % 5 == 4]
    r = np.concatenate([ref_out for f in held_out for ref_out in [f["x"] @ io_weights(ref)]]) + OFFSET
    c = np.concatenate([f["x"] @ io_weights(cand) for f in held_out]) + OFFSET
    assert row["r2_vs_original"] == pytest.approx(_one_shot_r2(r, c), abs=1e-6)
    assert row["r2_vs_original"] == pytest.approx(1 - 0.4 ** 2, abs=1e-3)  # 0.84: 16% of the variance lost
    assert not report["met"] and report["verdict"] == "failed"
    assert report["problems"] == [f"output 'y': R^2 against the original {row['r2_vs_original']:.4f}, "
                                  "budget R^2 against the original >= 0.99"]
    # an offset (a bias moved by a tenth of the spread) is seen too, where the cosine hardly moves
    shifted = _check(ref, _regressor(shift=5.0), feeds)["outputs"][0]
    assert shifted["cosine"] > 0.998 and shifted["r2_vs_original"] < 0.99


def io_weights(model) -> np.ndarray:
    return next(v.const_value.numpy() for v in model.graph.initializers.values() if v.name == "w")


def test_an_unchanged_regression_passes_and_a_small_error_passes():
    feeds = _feeds()
    ref = _regressor()
    same = _check(ref, ref, feeds)
    assert same["met"] and same["outputs"][0]["r2_vs_original"] == 1.0
    assert "y (regression): R^2 against the original 1.0000, cosine 1.0000" in verdict_line(same)
    near = _check(ref, _regressor(scale=0.99), feeds)
    assert near["met"] and near["outputs"][0]["r2_vs_original"] == pytest.approx(1 - 0.01 ** 2, abs=1e-5)
    # --min-r2 sets the threshold
    strict = _check(ref, _regressor(scale=0.99), feeds, CheckConfig(min_r2=0.99995))
    assert not strict["met"]


def test_a_wide_output_is_still_judged_by_cosine():
    # hidden states [N, T, 64] with the same offset: the rule stays cosine, whatever the shrink
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 64)) * 10.0).astype(np.float32)

    def encoder(scale):
        nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Add", ["h", "b"], ["y"])]
        inits = [("w", w * np.float32(scale)), ("b", np.full(64, OFFSET, np.float32))]
        return io.load_model(make_proto(nodes, [("x", ["N", 4, 8])], [("y", ["N", 4, 64])], inits))

    feeds = [{"x": rng.standard_normal((2, 4, 8)).astype(np.float32)} for _ in range(20)]
    report = _check(encoder(1.0), encoder(0.6), feeds)
    row = report["outputs"][0]
    assert row["kind"] == "values" and row["rule"] == "cosine >= 0.985" and "r2_vs_original" not in row
    assert row["cosine"] > 0.99 and report["met"]


def test_streaming_equals_the_one_shot_formula():
    rng = np.random.default_rng(7)
    r = 1e3 + rng.standard_normal((101, 3))  # a large mean against a unit spread: shifted sums keep it exact
    c = r + 0.05 * rng.standard_normal((101, 3)) + np.array([0.0, 0.02, -0.1])
    fig = R2AgainstOriginal()
    for lo, hi in ((0, 1), (1, 17), (17, 18), (18, 64), (64, 101)):  # uneven feeds, one of one sample
        fig.update(r[lo:hi].astype(np.float32).astype(np.float64), c[lo:hi])
    expected = _one_shot_r2(r.astype(np.float32).astype(np.float64), c)
    assert fig.value() == pytest.approx(expected, abs=1e-9)
    r32 = r.astype(np.float32).astype(np.float64)
    per_column = 1 - ((c - r32) ** 2).sum(0) / (((r32 - r32.mean(0)) ** 2).sum(0) + 1e-4 * (r32 ** 2).sum(0))
    assert fig.columns() == pytest.approx(per_column, abs=1e-9)
    # rank 1 is read as one column: 0..4, SST 10, sum r^2 30
    one = R2AgainstOriginal()
    one.update(np.arange(5.0), np.arange(5.0) + 1.0)
    assert one.value() == pytest.approx(1 - 5 / (10 + 0.003))
    # an original constant over the samples (one sample, say) has no spread: it is judged against
    # its magnitude (an RMS error of 0.1% of it reads 0.99), 1 when matched exactly
    flat = R2AgainstOriginal()
    flat.update(np.full((4, 1), 2.0), np.full((4, 1), 2.0))
    assert flat.value() == 1.0
    flat.update(np.full((1, 1), 2.0), np.full((1, 1), 2.5))
    assert flat.value() == pytest.approx(1 - 0.25 / (1e-4 * 5 * 4.0))
    single = R2AgainstOriginal()
    single.update(np.array([[150.0]]), np.array([[150.15]]))  # 0.1% off
    assert single.value() == pytest.approx(0.99)
    zeros = R2AgainstOriginal()
    zeros.update(np.zeros((3, 1)), np.full((3, 1), 0.1))
    assert zeros.value() == -np.inf
    assert R2AgainstOriginal().value() == 1.0 and R2AgainstOriginal().decisions() is None


def _head_model(shift: float):
    """``out = Concat(boxes, Sigmoid(logits + shift))``: a YOLO-style head ``[1, 4 + 3, 64]``."""
    nodes = [oh.make_node("Add", ["logits", "s"], ["l2"]), oh.make_node("Sigmoid", ["l2"], ["p"]),
             oh.make_node("Concat", ["boxes", "p"], ["out"], axis=1)]
    return io.load_model(make_proto(nodes, [("boxes", [1, 4, 64]), ("logits", [1, 3, 64])], [("out", [1, 7, 64])],
                                    [("s", np.array(shift, np.float32))]))


def _head_feed(rng) -> dict[str, np.ndarray]:
    boxes = np.full((1, 4, 64), 10.0, np.float32)
    scores = np.full((1, 3, 64), 0.01, np.float32)
    for a, ((x, y, w, h), sc) in enumerate(zip([(20, 20, 10, 10), (60, 20, 10, 10), (20, 60, 16, 8)],
                                               [[0.9, 0.1, 0.0], [0.1, 0.8, 0.0], [0.0, 0.2, 0.7]])):
        boxes[0, :, a] = (x + rng.uniform(-1, 1), y, w, h)
        scores[0, :, a] = sc
    scores = np.clip(scores, 1e-4, 1 - 1e-4)
    return {"boxes": boxes, "logits": np.log(scores / (1 - scores)).astype(np.float32)}


def test_the_detection_count_prints_whole_with_its_unit():
    fig = DetectionAgreement()
    fig.add(2 * 4, 5 + 4)  # 5 detections of the original, 4 of the written model, 4 paired
    assert fig.decisions() == 4.5 and fig.counted() == (9, "detections")
    note = resolution_note([{"name": "out", "kind": "detections", "decisions": 9, "decision_unit": "detections",
                             "resolution": 2 / 9}], CheckConfig())
    assert note == ("the check saw 9 detections (detection agreement (F1) of output 'out'): it cannot resolve a "
                    "change below 22.2 points where the budget allows 2 points; pass --eval with more data")
    one = resolution_note([{"name": "out", "kind": "detections", "decisions": 1, "decision_unit": "detections",
                            "resolution": 2.0}], CheckConfig())
    assert one.startswith("the check saw 1 detection (") and "cannot resolve any change" in one
    # the check itself: 3 feeds, 3 detections each in the original, 2 in the written model (the 0.7
    # score falls under 0.25): 15 detections, which the F1 counted as 7.5 decisions
    rng = np.random.default_rng(2)
    feeds = [_head_feed(rng) for _ in range(3)]
    ref = _head_model(0.0)
    split = split_data(None, CheckConfig(), evaluation=Dataset(feeds, ref))
    report = check_model(ref, _head_model(-2.0), split, CheckConfig(), compressed=1)
    row = report["outputs"][0]
    assert row["kind"] == "detections" and row["detection_agreement"] == pytest.approx(2 * 6 / 15)
    assert row["decisions"] == 15 and isinstance(row["decisions"], int) and row["decision_unit"] == "detections"
    assert row["resolution"] == pytest.approx(2 / 15)
    assert report["resolution_note"].startswith("the check saw 15 detections (detection agreement (F1) of output 'out'): "
                                                "it cannot resolve a change below 13.3 points")
    text = json.dumps(report)
    assert '"decisions": 15,' in text and '"decisions": 7.5' not in text and "7.5 decisions" not in text


def test_a_confident_probability_is_judged_against_its_magnitude_not_its_float_noise():
    """A Sigmoid at logit ~18 on every checked sample barely varies: against that spread alone one
    float32 step read as R^2 -9e6 and a logit moved by 1 (no decision changed, cosine 0.99999999997)
    as -3.4. The spread floor (a hundredth of the magnitude) judges such a column by its RMS error
    against its size instead."""
    rng = np.random.default_rng(4)
    logits = 18.0 + 0.01 * rng.standard_normal((20, 1))
    p = 1.0 / (1.0 + np.exp(-logits))
    step = p.astype(np.float32).astype(np.float64)
    step[3] = np.nextafter(np.float32(step[3, 0]), np.float32(2.0))
    moved = 1.0 / (1.0 + np.exp(-(logits - 1.0)))
    for cand in (step, moved):
        fig = R2AgainstOriginal()
        fig.update(p, cand)
        assert fig.value() > 0.999999
    # a real change of such a column is still seen: p from 0.99999998 to 0.9
    fig = R2AgainstOriginal()
    fig.update(p, np.full_like(p, 0.9))
    assert fig.value() < 0.5


def test_the_rule_prints_its_threshold_as_given():
    # `--min-r2 0.99999999` read ">= 1" (six significant digits)
    from onnxcomp.check import judge_output

    ok, rule, _ = judge_output("regression", {"r2_vs_original": 0.9999999}, CheckConfig(min_r2=0.99999999))
    assert not ok and rule == "R^2 against the original >= 0.99999999"
    assert judge_output("values", {"cosine": 0.99}, CheckConfig())[1] == "cosine >= 0.985"


def test_compare_shows_the_r2_of_a_regression_output(tmp_path, capsys):
    """``onnxcomp compare`` names a regression's kind and now its R^2 against the original too (the
    check's figure), which the cosine beside it does not see; other kinds have none."""
    from onnxcomp.cli import main
    from onnxcomp.measure.fidelity import compare_models

    ref, cand = _regressor(), _regressor(scale=0.6)
    feeds = _feeds(10)
    result = compare_models(ref, cand, feeds)
    r = np.concatenate([f["x"] @ io_weights(ref) for f in feeds]) + OFFSET
    c = np.concatenate([f["x"] @ io_weights(cand) for f in feeds]) + OFFSET
    row = result.to_dict()["outputs"][0]
    assert row["kind"] == "regression" and row["cosine"] > 0.99
    assert row["r2_vs_original"] == pytest.approx(_one_shot_r2(r, c), abs=1e-6) and row["r2_vs_original"] < 0.9
    io.save_model(ref, tmp_path / "ref.onnx")
    io.save_model(cand, tmp_path / "cand.onnx")
    np.savez(tmp_path / "d.npz", x=np.concatenate([f["x"] for f in feeds]))
    assert main(["compare", str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"), "--data", str(tmp_path / "d.npz")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "R^2 vs original" in out and f"{row['r2_vs_original']:.4f}" in out
    wide = compare_models(_regressor(width=4), _regressor(width=4, scale=0.6), feeds).to_dict()["outputs"][0]
    assert wide["kind"] != "regression" and wide["r2_vs_original"] is None
