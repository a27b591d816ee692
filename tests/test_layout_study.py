"""The layout study's statistics (pooled F1 from per-page counts, page bootstrap, paired differences) and
its perturbations (benchmarks/layout_study.py), on seeded synthetic boxes and a tiny model built in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime as ort
import pytest

from benchmarks import layout_study as ls
from benchmarks import suite_extra as se


def _pages(rng: np.random.Generator, n: int, classes: int = 3):
    """Per page ``(boxes, classes)`` for truths, and predictions that keep, drop, move or relabel some."""
    truths, preds = [], []
    for _ in range(n):
        k = int(rng.integers(0, 6))
        xy = rng.uniform(0, 500, size=(k, 2))
        wh = rng.uniform(20, 80, size=(k, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        cls = rng.integers(0, classes, size=k)
        truths.append((boxes, cls))
        keep = rng.random(k) > 0.2
        pb, pc = boxes[keep].copy(), cls[keep].copy()
        if len(pb):
            pb[0] += 30  # moved: IoU below 0.5 for the 20-80 px boxes
            pc[-1] = (pc[-1] + 1) % classes  # relabelled
        extra = rng.uniform(600, 700, size=(int(rng.integers(0, 2)), 2))
        pb = np.concatenate([pb, np.concatenate([extra, extra + 40], axis=1)])
        pc = np.concatenate([pc, np.zeros(len(extra), np.int64)])
        preds.append((pb, pc))
    return preds, truths


def test_summed_page_counts_give_class_f1_over_all_pages():
    preds, truths = _pages(np.random.default_rng(3), 40)
    counts = ls.page_counts(preds, truths)
    assert counts.shape == (40, 3)
    pooled = ls.f1_of(counts.sum(0))
    ref = se.class_f1(preds, truths)
    assert counts.sum(0).tolist() == [ref["tp"], ref["n_pred"], ref["n_gt"]]
    for k in ("precision", "recall", "f1"):
        assert float(pooled[k]) == pytest.approx(ref[k], abs=1e-12)
    assert 0.1 < ref["f1"] < 0.9  # the synthetic pages are neither all right nor all wrong


def test_f1_of_edge_cases_follow_detection_scores():
    f = ls.f1_of(np.array([[0, 0, 0], [0, 3, 0], [0, 0, 2], [2, 4, 2]]))
    assert f["precision"].tolist() == [1.0, 0.0, 0.0, 0.5]
    assert f["recall"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert f["f1"].tolist() == pytest.approx([1.0, 0.0, 0.0, 2 / 3])


def test_resample_is_seeded_and_shared():
    a, b = ls.resample(10, 50, seed=7), ls.resample(10, 50, seed=7)
    assert a.shape == (50, 10) and np.array_equal(a, b)
    assert not np.array_equal(a, ls.resample(10, 50, seed=8))
    assert a.min() >= 0 and a.max() <= 9


def test_bootstrap_interval_and_paired_difference():
    rng = np.random.default_rng(5)
    preds, truths = _pages(rng, 30)
    base = ls.page_counts(truths, truths)  # a perfect "fp32": F1 1 on every resample
    cand = ls.page_counts(preds, truths)
    idx = ls.resample(30, 500, seed=0)
    s = ls.summary(cand, idx, base=base)
    f1 = s["f1"]
    assert f1["ci"][0] <= f1["value"] <= f1["ci"][1] and f1["ci"][0] < f1["ci"][1]
    # against a constant base the paired difference is the candidate's figure minus 1, interval too
    assert f1["diff"] == pytest.approx(f1["value"] - 1.0)
    assert f1["diff_ci"] == pytest.approx((f1["ci"][0] - 1.0, f1["ci"][1] - 1.0))
    # one resample by hand
    manual = ls.f1_of(cand[idx[0]].sum(0))["f1"] - ls.f1_of(base[idx[0]].sum(0))["f1"]
    boots = ls.f1_of(cand[idx].sum(1))["f1"] - ls.f1_of(base[idx].sum(1))["f1"]
    assert boots[0] == pytest.approx(manual)
    assert f1["diff_ci"] == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])))
    # a candidate equal to the base: difference exactly 0, interval [0, 0]
    same = ls.summary(cand, idx, base=cand)["recall"]
    assert same["diff"] == 0.0 and same["diff_ci"] == (0.0, 0.0)


def test_paired_interval_is_narrower_than_unpaired_for_correlated_pages():
    """Pages differ a lot in difficulty; a candidate that loses one box on a few pages differs little."""
    rng = np.random.default_rng(11)
    n = 60
    gt = rng.integers(5, 30, size=n)
    tp = (gt * rng.uniform(0.5, 1.0, size=n)).astype(np.int64)
    base = np.stack([tp, gt, gt], axis=1)
    cand = base.copy()
    cand[:6, 0] -= 1
    idx = ls.resample(n, 1000, seed=1)
    s = ls.summary(cand, idx, base=base)["f1"]
    width_paired = s["diff_ci"][1] - s["diff_ci"][0]
    width_alone = s["ci"][1] - s["ci"][0]
    assert s["diff"] < 0 and s["diff_ci"][1] <= 0.0
    assert width_paired < width_alone / 4


def test_parse_spec_modifiers(tmp_path):
    fp32 = tmp_path / "m.onnx"
    s = ls.parse_spec("fp32:opt=basic:fp16w:noise=0.5:seed=3", fp32)
    assert (s.path, s.opt, s.fp16w, s.noise, s.seed, s.shift) == (fp32, "basic", True, 0.5, 3, 0.0)
    assert ls.parse_spec("fp32", fp32).is_reference
    assert not ls.parse_spec("fp32:shift=1", fp32).is_reference
    assert ls.parse_spec("x/y.onnx").path.name == "y.onnx"
    assert ls.parse_spec("fp32:dx=-150:dy=30", fp32).dx == -150
    for bad in ("fp32:opt=fast", "fp32:noise", "fp32:wat=1", "fp32:dx=151", "fp32:dy=-31"):
        with pytest.raises(ValueError, match="modifier"):
            ls.parse_spec(bad, fp32)


def test_perturb_is_bounded_clipped_and_seeded_per_page():
    x = np.full((1, 3, 8, 8), 0.5, np.float32)
    x[..., :4] = 1.0
    y = ls.perturb(x, 1.0, seed=0, page=2)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= 1 / 255 + 1e-7 and np.abs(y - x).max() > 0.5 / 255
    assert y.max() <= 1.0  # clipped at white
    assert np.array_equal(y, ls.perturb(x, 1.0, seed=0, page=2))
    assert not np.array_equal(y, ls.perturb(x, 1.0, seed=0, page=3))
    assert not np.array_equal(y, ls.perturb(x, 1.0, seed=1, page=2))


def _head_model(w: np.ndarray) -> bytes:
    """``images [1,3,4,4]`` -> a YOLO head ``[1, 15, 2]``: ``w * (1 + mean(images))`` (one box of class 2)."""
    nodes = [
        oh.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
        oh.make_node("Add", ["m", "one"], ["g"]),
        oh.make_node("Mul", ["w", "g"], ["out"]),
    ]
    graph = oh.make_graph(
        nodes, "head", [oh.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [oh.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 15, 2])],
        [onh.from_array(w, "w"), onh.from_array(np.array(1.0, np.float32), "one")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()


def _one_box_model(tmp_path) -> Path:
    """A head model whose first anchor is a box (cx 100, cy 100, w 40, h 20) of class 2 at score 0.3."""
    w = np.zeros((1, 15, 2), np.float32)
    w[0, :4, 0] = (100.0, 100.0, 40.0, 20.0)
    w[0, 4 + 2, 0] = 0.3
    model = tmp_path / "head.onnx"
    model.write_bytes(_head_model(w))
    return model


def test_fp16_roundtrip_rounds_initializers_and_runs_in_onnxruntime():
    w = np.zeros((1, 15, 2), np.float32)
    w[0, :4, 0] = (100.0, 100.0, 40.0, 20.0)
    w[0, 4 + 2, 0] = 0.3
    w[0, :4, 1] = (1000.123, 1.0001, 3.0, 3.0)
    raw = _head_model(w)
    x = np.zeros((1, 3, 4, 4), np.float32)
    got = ort.InferenceSession(ls.fp16_roundtrip(raw), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
    assert got[0, 0, 1] != w[0, 0, 1]  # 1000.123 is not a float16
    orig = ort.InferenceSession(raw, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    np.testing.assert_array_equal(orig, w)


def test_detections_decode_cache_and_modifiers(tmp_path):
    model = _one_box_model(tmp_path)
    x = np.zeros((2, 3, 4, 4), np.float32)
    spec = ls.parse_spec(str(model))
    det = ls.detections(spec, "tune", x, tmp_path / "cache", threads=1)
    assert len(det) == 2
    np.testing.assert_allclose(det[0][0], [[80, 90, 120, 110]])
    assert det[0][1].tolist() == [2] and det[0][2] == pytest.approx([0.3])
    assert len(list((tmp_path / "cache").glob("*-tune-2.npz"))) == 1
    again = ls.detections(spec, "tune", x, tmp_path / "cache", threads=1)
    np.testing.assert_array_equal(again[1][0], det[1][0])
    # a page of ones 64 grey levels darker scales the head by 1 + (1 - 64/255)
    ones = np.ones((1, 3, 4, 4), np.float32)
    shifted = ls.detections(ls.parse_spec(f"{model}:shift=64"), "tune", ones, tmp_path / "cache", threads=1)
    assert shifted[0][2] == pytest.approx([0.3 * (2 - 64 / 255)], rel=1e-5)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # a separate cache entry per modifier set


def test_dx_moves_the_boxes_back(tmp_path):
    """A page rolled by dx pixels: the model sees the same mean, so the decoded box comes back dx to the left."""
    model = _one_box_model(tmp_path)
    x = np.random.default_rng(0).random((1, 3, 4, 4), dtype=np.float32)
    det = ls.detections(ls.parse_spec(f"{model}:dx=3:dy=-1"), "tune", x, tmp_path, threads=1)
    g = 1 + float(x.mean())  # the head's scale, the same for the rolled page
    np.testing.assert_allclose(det[0][0], [[80 * g - 3, 90 * g + 1, 120 * g - 3, 110 * g + 1]], rtol=1e-5)


def test_matched_agrees_with_match_boxes():
    from benchmarks.metrics import match_boxes

    preds, truths = _pages(np.random.default_rng(9), 25)
    for (pb, _), (gb, _) in zip(preds, truths):
        mp, mg = ls.matched(pb, gb)
        tp, n_pred, n_gt = match_boxes(pb, gb)
        assert (int(mp.sum()), int(mg.sum()), len(mp), len(mg)) == (tp, tp, n_pred, n_gt)


def test_disagreements_name_class_flips_shifts_and_threshold_edges():
    box = np.array([[0, 0, 100, 100], [200, 0, 300, 100], [400, 0, 500, 100], [600, 0, 700, 100]], float)
    ref = [(box, np.array([1, 1, 2, 3]), np.array([0.9, 0.3, 0.8, 0.9]))]
    det = [(np.array([[0, 0, 100, 100], [200, 0, 300, 100], [440, 0, 540, 100], [0, 500, 50, 550]], float),
            np.array([1, 0, 2, 4]), np.array([0.9, 0.3, 0.7, 0.26]))]
    # fp32's second box comes back as class 0 (a flip, fp32 score 0.3), its third moved 40 px (IoU 60/140),
    # its fourth is gone; the candidate adds a class-4 box at 0.26 and its flipped and moved boxes are extras
    d = ls.disagreements(det, ref)
    assert d == {"missed": 3, "missed_near": 1, "missed_class": 1, "missed_shifted": 1, "missed_gone": 1,
                 "extra": 3, "extra_near": 2}
    assert ls.disagreements(ref, ref)["missed"] == 0
    # fp32 has two classes at one place and the candidate keeps only one: that one is matched, no flip
    two = [(np.array([[0, 0, 100, 100], [0, 0, 100, 100]], float), np.array([1, 5]), np.array([0.5, 0.6]))]
    one = [(np.array([[0, 0, 100, 100]], float), np.array([5]), np.array([0.6]))]
    assert ls.disagreements(one, two) == {"missed": 1, "missed_near": 0, "missed_class": 0, "missed_shifted": 0,
                                          "missed_gone": 1, "extra": 0, "extra_near": 0}
