"""The check's rule for dense detector heads: detections after decoding and NMS, not cosine."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.check import CheckConfig, DetectionAgreement, check_model, output_kinds, split_data
from onnxcomp.data import Dataset
from onnxcomp.measure import detection

A = 64  # anchors of the toy head: an 8x8 grid
C = 3  # classes


def _head(boxes: list[tuple[float, float, float, float]], scores: list[list[float]], extra_rows: int = 0) -> np.ndarray:
    """One image's ``[4 + C (+ extra), A]`` head: the given anchors, the others background (score 0.01)."""
    head = np.zeros((4 + C + extra_rows, A))
    head[:4] = 10.0
    head[4 : 4 + C] = 0.01
    for a, (box, sc) in enumerate(zip(boxes, scores, strict=True)):
        head[:4, a] = box
        head[4 : 4 + C, a] = sc
    if extra_rows:
        head[4 + C :] = np.linspace(-3.0, 3.0, extra_rows * A).reshape(extra_rows, A)  # mask coefficients
    return head[None]


BOXES = [(20, 20, 10, 10), (60, 20, 10, 10), (20, 60, 16, 8), (21, 20, 10, 10)]  # the 4th overlaps the 1st
SCORES = [[0.9, 0.1, 0.0], [0.1, 0.8, 0.0], [0.0, 0.2, 0.7], [0.6, 0.0, 0.0]]


def test_decoding_keeps_the_best_box_per_object_and_class():
    head = detection.attributes_first(_head(BOXES, SCORES))
    boxes, classes, scores = detection.detections(head[0], detection.class_rows(head))
    # the 4th anchor (same class, IoU 0.82 with the 1st) is suppressed; best first
    assert classes.tolist() == [0, 1, 2] and scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert boxes[0].tolist() == pytest.approx([15, 15, 25, 25])
    # of another class it is kept: NMS is per class
    other = [s[:] for s in SCORES]
    other[3] = [0.0, 0.0, 0.6]
    head = detection.attributes_first(_head(BOXES, other))
    assert sorted(detection.detections(head[0], detection.class_rows(head))[1].tolist()) == [0, 1, 2, 2]


def test_layout_is_read_from_the_data():
    head = _head(BOXES, SCORES, extra_rows=5)
    assert detection.class_rows(head) == slice(4, 4 + C)  # the mask coefficients are not classes
    flipped = head.transpose(0, 2, 1)  # [N, A, K]
    assert detection.attributes_first(flipped).shape == head.shape
    with pytest.raises(ValueError, match="4 box values"):
        detection.attributes_first(np.zeros((1, 4, 100)))
    with pytest.raises(ValueError, match="rank|4 \\+ C"):
        detection.attributes_first(np.zeros((1, 7)))


def test_detection_agreement_is_the_f1_of_paired_detections():
    ref = _head(BOXES, SCORES)
    same = DetectionAgreement()
    same.update(ref, ref.copy())
    assert same.value() == 1.0
    # one object's score falls under the threshold: 2 of 3 paired -> 2*2 / (3 + 2)
    lost = [s[:] for s in SCORES]
    lost[2] = [0.0, 0.2, 0.2]
    fig = DetectionAgreement()
    fig.update(ref, _head(BOXES, lost))
    assert fig.value() == pytest.approx(0.8)
    # a class flip or a box moved off its object breaks the pair
    flip = [s[:] for s in SCORES]
    flip[1] = [0.8, 0.1, 0.0]
    moved = list(BOXES)
    moved[1] = (75, 20, 10, 10)
    fig = DetectionAgreement()
    fig.update(ref, _head(BOXES, flip))
    fig.update(ref, _head(moved, SCORES))
    assert fig.value() == pytest.approx((2 * 2 + 2 * 2) / (6 + 6))
    # images where neither model finds anything agree
    empty = DetectionAgreement()
    blank = _head([], [])
    empty.update(blank, blank)
    assert empty.value() == 1.0


def _detector(cls_bias: float):
    """A seeded toy head: boxes in pixels (8x8 grid of a 64-pixel image) beside Sigmoid class scores."""
    rng = np.random.default_rng(5)
    wb = (rng.standard_normal((4, 2, 1, 1)) * 0.5).astype(np.float32)
    wc = (rng.standard_normal((C, 2, 1, 1)) * 2.0).astype(np.float32)
    bc = np.full(C, cls_bias, np.float32)
    grid = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), 0).reshape(2, 64) * 8.0 + 4.0
    offset = np.concatenate([grid[::-1], np.full((2, 64), 12.0)], 0)[None].astype(np.float32)
    nodes = [
        oh.make_node("Conv", ["x", "wb"], ["b0"]),
        oh.make_node("Reshape", ["b0", "shape_b"], ["b1"]),
        oh.make_node("Add", ["b1", "offset"], ["boxes"]),
        oh.make_node("Conv", ["x", "wc", "bc"], ["c0"]),
        oh.make_node("Sigmoid", ["c0"], ["c1"]),
        oh.make_node("Reshape", ["c1", "shape_c"], ["cls"]),
        oh.make_node("Concat", ["boxes", "cls"], ["out"], axis=1),
    ]
    inits = [("wb", wb), ("wc", wc), ("bc", bc), ("offset", offset),
             ("shape_b", np.array([1, 4, A], np.int64)), ("shape_c", np.array([1, C, A], np.int64))]
    return io.load_model(make_proto(nodes, [("x", [1, 2, 8, 8])], [("out", [1, 4 + C, A])], inits))


def test_the_check_judges_a_detector_head_by_its_detections():
    ref = _detector(-2.0)
    assert output_kinds(ref) == {"out": "detections"}
    rng = np.random.default_rng(9)
    feeds = [{"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(15)]
    split = split_data(Dataset(feeds, ref), CheckConfig())
    good = check_model(ref, ref, split, compressed=1)
    assert good["met"] and good["outputs"][0]["detection_agreement"] == 1.0
    # scores shifted down: some detections drop under 0.25 while the boxes dominate the cosine
    bad = check_model(ref, _detector(-2.3), split, compressed=1)
    row = bad["outputs"][0]
    assert row["kind"] == "detections" and row["cosine"] > 0.99
    assert row["detection_agreement"] < 0.985 and not bad["met"]
    assert any("detection agreement" in p for p in bad["problems"])


def test_detection_agreement_has_its_own_threshold():
    """Detection agreement is judged against ``min_detection_agreement`` (0.98), the other agreement
    figures against ``min_agreement`` (0.99): pairing boxes flips knife-edge detections."""
    from onnxcomp.check import judge_output
    from onnxcomp.errors import ConfigError

    ok, rule, seen = judge_output("detections", {"detection_agreement": 0.985}, CheckConfig())
    assert ok and rule == "detection agreement (F1) >= 0.98" and seen == "detection agreement (F1) 0.9850"
    assert not judge_output("detections", {"detection_agreement": 0.975}, CheckConfig())[0]
    assert not judge_output("detections", {"detection_agreement": 0.985}, CheckConfig(min_detection_agreement=0.99))[0]
    assert not judge_output("scores", {"top1_agreement": 0.985}, CheckConfig())[0]
    assert CheckConfig().budget()["min_detection_agreement"] == 0.98
    with pytest.raises(ConfigError, match="min_detection_agreement"):
        CheckConfig(min_detection_agreement=1.5)


def test_the_cli_sets_the_detection_threshold(tmp_path, capsys):
    import json

    from test_review_eleventh import _cli

    ref = _detector(-2.0)
    model, out = tmp_path / "det.onnx", tmp_path / "q.onnx"
    io.save_model(ref, model)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((15, 2, 8, 8)).astype(np.float32))
    code, _, err = _cli(capsys, "quantize", model, "-o", out, "--calibration", tmp_path / "c.npz",
                        "--min-detection-agreement", "1.5")
    assert code == 1 and "--min-detection-agreement" in err and not out.exists()
    code, stdout, err = _cli(capsys, "quantize", model, "-o", out, "--calibration", tmp_path / "c.npz", "--json",
                             "--min-detection-agreement", "0.5", "--no-fallback")
    check = json.loads(stdout)["check"]
    assert code == 0, err
    assert check["budget"]["min_detection_agreement"] == 0.5
    row = check["outputs"][0]
    assert row["kind"] == "detections" and row["rule"] == "detection agreement (F1) >= 0.5"
