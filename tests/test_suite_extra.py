"""Decoding and metrics of the benchmark suite's wheel models (benchmarks/suite_extra.py), on synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import suite_extra as se


def _head(anchors: list[tuple[float, float, float, float, int, float]], classes: int = 3) -> np.ndarray:
    """A YOLOv8 head ``[1, 4 + classes, A]`` with one (cx, cy, w, h, class, score) per anchor."""
    out = np.zeros((1, 4 + classes, len(anchors)), np.float32)
    for a, (cx, cy, w, h, c, s) in enumerate(anchors):
        out[0, :4, a] = (cx, cy, w, h)
        out[0, 4 + c, a] = s
    return out


def test_yolo_decode_thresholds_and_classwise_nms():
    out = _head([
        (50, 50, 20, 20, 0, 0.9),   # kept
        (51, 50, 20, 20, 0, 0.8),   # same class, IoU 0.90 with the first: suppressed
        (51, 50, 20, 20, 1, 0.7),   # other class at the same place: kept
        (200, 200, 10, 40, 2, 0.3),  # kept
        (300, 300, 10, 10, 2, 0.2),  # below the 0.25 threshold
    ])
    [(boxes, cls, scores)] = se.yolo_decode(out)
    np.testing.assert_allclose(boxes, [[40, 40, 60, 60], [41, 40, 61, 60], [195, 180, 205, 220]], atol=1e-5)
    assert cls.tolist() == [0, 1, 2]
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.3], atol=1e-6)


def test_nms_keeps_boxes_below_the_iou_threshold():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 12], [5, 0, 15, 10], [100, 100, 110, 110]], float)
    scores = np.array([0.5, 0.9, 0.8, 0.1])
    # IoU(1,0) = 100/120 > 0.45 suppressed; IoU(1,2) = 50/170 kept; box 3 is alone
    assert se.nms(boxes, scores, 0.45).tolist() == [1, 2, 3]


def test_class_f1_needs_the_class_to_match():
    truth = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([1, 2]))]
    same = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([1, 2]))]
    swapped = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([2, 1]))]
    extra = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float), np.array([1, 2, 1]))]
    assert se.class_f1(same, truth)["f1"] == 1.0
    assert se.class_f1(swapped, truth)["f1"] == 0.0
    r = se.class_f1(extra, truth)  # 2 of 3 predictions right, both truths found
    assert (r["precision"], r["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert r["f1"] == pytest.approx(0.8)


def test_vad_scores_and_frame_labels():
    prob = np.array([[0.9], [0.6], [0.4], [0.1]], np.float32)
    ref = np.array([[0.8], [0.4], [0.45], [0.2]], np.float32)
    r = se.vad_scores(prob, ref, np.array([1, 1, 0, 0]))
    assert r["agree_fp32"] == 0.75  # the second window flips
    assert r["label_acc"] == 1.0
    assert r["prob_mae_fp32"] == pytest.approx((0.1 + 0.2 + 0.05 + 0.1) / 4, abs=1e-6)
    clean = np.concatenate([np.zeros(512), 0.5 * np.ones(512), 0.001 * np.ones(512), np.zeros(100)])
    assert se.frame_labels(clean).tolist() == [0, 1, 0]  # 0.001 is 54 dB below 0.5 (< -35 dB)


def test_stream_windows_carry_64_samples_of_context():
    audio = np.arange(3 * 512 + 7, dtype=np.float32)
    w = se.stream_windows(audio)
    assert w.shape == (3, 576)
    assert w[0, :64].tolist() == [0.0] * 64 and w[0, 64] == 0.0 and w[0, -1] == 511
    assert w[1, 0] == 512 - 64 and w[1, 64] == 512 and w[2, -1] == 3 * 512 - 1


def test_stream_feeds_each_window_the_previous_state():
    class Accumulate:  # state += mean of the window; probability = the state's first element
        def run(self, _names, feed):
            state = feed["state"] + feed["input"].mean(1)[None, :, None]
            return [state[0, :, :1].copy(), state]

    clips = [np.ones(1024, np.float32), 2 * np.ones(512, np.float32)]
    probs, states = se.stream(Accumulate(), clips)
    first = 512 / 576  # the first window starts with 64 zeros of context
    np.testing.assert_allclose(probs[0], [first, first + 1], rtol=1e-6)
    np.testing.assert_allclose(probs[1], [2 * first], rtol=1e-6)
    assert states[0].shape == (2, 2, 128) and states[0][0].max() == 0 and states[0][1, 0, 0] == pytest.approx(first)


def test_lowpass_resample_keeps_a_tone_and_its_length():
    t = np.arange(22050) / 22050
    y = se.lowpass_resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), 22050, 16000)
    assert y.shape == (16000,)
    ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.corrcoef(y[200:-200], ref[200:-200])[0, 1] > 0.999


def test_magika_features_strip_whitespace_and_pad():
    data = b"  \n#!/bin/sh\necho hi\n\n  "
    f = se.magika_features(data)
    assert f.dtype == np.int32 and f.shape == (2048,)
    beg, end = b"#!/bin/sh\necho hi\n\n  ", b"  \n#!/bin/sh\necho hi"  # leading / trailing whitespace gone
    assert bytes(f[: len(beg)].astype(np.uint8)) == beg and (f[len(beg) : 1024] == 256).all()
    assert bytes(f[-len(end) :].astype(np.uint8)) == end and (f[1024 : 2048 - len(end)] == 256).all()
    long = bytes(range(256)) * 40  # 10240 bytes: the first and last 1024
    g = se.magika_features(long)
    assert g[:1024].tolist() == list(long[:1024]) and g[1024:].tolist() == list(long[-1024:])


def test_magika_score_agreement_and_extension_accuracy():
    names = ["python", "c", "txt"]
    score = se._magika_score(["python", None, "c", "c"], names)
    ref = np.eye(3)[[0, 2, 1, 1]]
    out = np.eye(3)[[0, 2, 1, 0]]
    r = score(out, ref)
    assert r["agree_fp32"] == 0.75 and r["ext_acc"] == pytest.approx(2 / 3) and r["files_with_ext_label"] == 3


def test_pick_files_round_robin_over_extensions(tmp_path):
    for name in ["a.py", "b.py", "c.py", "d.txt", "e.c", "tiny.h"]:
        (tmp_path / name).write_bytes(b"x" * (10 if name == "tiny.h" else 100))
    picked = se.pick_files([str(tmp_path)], 4)
    assert sorted(p.suffix for p in picked) == [".c", ".py", ".py", ".txt"]  # one of each first; tiny.h too small
    assert picked == se.pick_files([str(tmp_path)], 4)


def test_layout_page_labels_lie_on_the_page():
    pytest.importorskip("PIL")
    from benchmarks import textdata

    if not textdata.fonts_available():
        pytest.skip("DejaVu fonts not installed")
    pool = ["The quick brown fox jumps over the lazy dog near the river bank today."] * 5
    x, labels = se.layout_samples(pool, 1, seed=3, fonts="serif", columns=2)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == np.float32
    arr = np.asarray(labels[0], float)
    assert {se.CLS["Page-header"], se.CLS["Page-footer"]} <= set(arr[:, 0].astype(int))
    dx = (1024 - se.PAGE_W) // 2
    assert (arr[:, 1] >= dx).all() and (arr[:, 3] <= dx + se.PAGE_W).all() and (arr[:, 4] <= 1024).all()
    assert (arr[:, 3] > arr[:, 1]).all() and (arr[:, 4] > arr[:, 2]).all()
    assert np.allclose(x[0, :, :, :dx], 114 / 255)  # letterbox padding
