"""The check's budget rules (onnxcomp.check.RULES): figures per kind of output, on seeded data and models."""

from __future__ import annotations

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
    Rule,
    RegionAgreement,
    SequenceAgreement,
    blame,
    check_model,
    decode_sequence,
    edit_distance,
    judge_output,
    label_regions,
    layer_sqnr,
    output_kinds,
    split_data,
)
from onnxcomp.data import Dataset


def _flood_count(mask: np.ndarray) -> int:
    """8-connected regions by a plain flood fill (the reference for label_regions)."""
    seen = np.zeros_like(mask, bool)
    count = 0
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                count += 1
                stack = [(y, x)]
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                stack.append((ny, nx))
    return count


def test_label_regions_matches_a_flood_fill():
    mask = np.array([[1, 0, 0, 1, 1],
                     [0, 1, 0, 0, 1],
                     [0, 0, 0, 0, 0],
                     [1, 1, 0, 1, 0],
                     [0, 0, 1, 0, 1]], bool)
    labels, n = label_regions(mask)
    assert n == 3  # the diagonal pair top-left, the top-right L, and the bottom (joined diagonally)
    assert labels[0, 0] == labels[1, 1] and labels[3, 0] == labels[4, 2] == labels[4, 4] == labels[3, 3]
    assert (labels > 0).sum() == mask.sum()
    rng = np.random.default_rng(7)
    for density in (0.2, 0.45, 0.6):
        m = rng.random((23, 31)) < density
        labels, n = label_regions(m)
        assert n == _flood_count(m)
        assert set(np.unique(labels[m])) == set(range(1, n + 1)) and not labels[~m].any()
    assert label_regions(np.zeros((4, 4), bool))[1] == 0


def test_region_agreement_is_the_f1_of_matched_regions():
    ref = np.zeros((1, 1, 20, 30), np.float32)
    ref[0, 0, 2:6, 2:12] = 0.9   # region A
    ref[0, 0, 10:14, 2:20] = 0.8  # region B
    cand = ref.copy()
    fig = RegionAgreement()
    fig.update(ref, cand)
    assert fig.value() == 1.0
    cand[0, 0, 10:14, 2:20] = 0.2  # B lost
    cand[0, 0, 16:19, 22:28] = 0.7  # a spurious region (18 pixels: not a speck)
    fig = RegionAgreement()
    fig.update(ref, cand)
    assert fig.value() == pytest.approx(2 * 1 / (2 + 2))  # one match of 2 + 2 regions
    specks = ref.copy()
    specks[0, 0, 18, 0] = specks[0, 0, 0, 29] = 0.6  # one-pixel regions: below a quarter of the median region
    fig = RegionAgreement()
    fig.update(ref, specks)
    assert fig.value() == 1.0
    shifted = ref.copy()
    shifted[0, 0, 2:6, 2:12] = 0.0
    shifted[0, 0, 2:6, 8:18] = 0.9  # IoU of A with itself shifted by 6 of 10 columns: 16/64
    fig = RegionAgreement()
    fig.update(ref, shifted)
    assert fig.value() == pytest.approx(0.5)


def test_sequence_agreement_decodes_like_ctc_and_learns_blank_and_separator():
    assert decode_sequence(np.array([0, 3, 3, 0, 3, 5, 5, 0]), 0).tolist() == [3, 3, 5]
    assert edit_distance(np.array([1, 2, 3, 4]), np.array([1, 3, 4])) == 1
    assert edit_distance(np.array([1, 2]), np.array([3, 4, 5])) == 3
    assert edit_distance(np.array([], int), np.array([3, 4])) == 2
    classes = 6  # class 5 is the blank (most steps), class 4 a word separator

    def scores(rows):
        out = np.zeros((len(rows), len(rows[0]), classes), np.float32)
        for n, row in enumerate(rows):
            out[n, np.arange(len(row)), row] = 1.0
        return out

    b = 5
    ref = scores([[b, 1, b, 4, b, 2, b, 4, b, 3, b, b], [b, 2, 2, b, 4, b, 1, b, 4, b, 1, b]])
    # a separator (4, the most frequent symbol) added at the end of row 0 and the start of row 1
    same_but_trailing_space = scores([[b, 1, b, 4, b, 2, b, 4, b, 3, 4, b], [4, 2, 2, b, 4, b, 1, b, 4, b, 1, b]])
    fig = SequenceAgreement()
    fig.update(ref, same_but_trailing_space)
    assert fig.value() == 1.0
    one_wrong = scores([[b, 1, b, 4, b, 2, b, 4, b, 1, b, b], [b, 2, 2, b, 4, b, 1, b, 4, b, 1, b]])
    fig = SequenceAgreement()
    fig.update(ref, one_wrong)
    assert fig.value() == pytest.approx((1 - 1 / 5 + 1) / 2)  # row 0: one substitution in 5 symbols
    inner = scores([[b, 1, b, 4, b, 2, b, 4, b, 3, b, b], [b, 2, 2, b, 4, b, 1, b, 1, b, 1, b]])
    fig = SequenceAgreement()
    fig.update(ref, inner)  # a separator inside a sequence counts: 2 4 1 4 1 vs 2 4 1 1 1
    assert fig.value() == pytest.approx((1 + 1 - 1 / 5) / 2)


def _seq_model():
    return io.load_model(make_proto([oh.make_node("Softmax", ["x"], ["p"], axis=-1)], [("x", [1, 8, 5])],
                                    [("p", [1, 8, 5])]))


def test_output_kinds_and_rules():
    proto = make_proto(
        [oh.make_node("Softmax", ["x"], ["seq"]), oh.make_node("Sigmoid", ["m"], ["map"]),
         oh.make_node("Softmax", ["v"], ["cls"]), oh.make_node("Relu", ["m"], ["feat"])],
        [("x", [1, 5, 7]), ("m", [1, 1, 6, 6]), ("v", [1, 3])],
        [("seq", [1, 5, 7]), ("map", [1, 1, 6, 6]), ("cls", [1, 3]), ("feat", [1, 1, 6, 6])],
    )
    assert output_kinds(io.load_model(proto)) == {"seq": "sequence", "map": "map", "cls": "scores", "feat": "values"}
    config = CheckConfig(min_agreement=0.95, min_cosine=0.9)
    assert judge_output("sequence", {"sequence_agreement": 0.96}, config) == (
        True, "decoded-sequence agreement >= 0.95", "decoded-sequence agreement 0.9600")
    assert judge_output("map", {"region_agreement": 0.94}, config)[0] is False
    assert judge_output("values", {"cosine": 0.91}, config)[0] is True
    assert judge_output("exact", {"equal": 0.999}, config) == (False, "share of equal elements >= 1", "share of equal elements 0.9990")
    assert judge_output("scores", {}, config)[2] == "top-1 agreement not measured"


def test_a_new_kind_is_one_table_entry(monkeypatch):
    class MeanGap(FIGURES["cosine"]):
        pass

    monkeypatch.setitem(FIGURES, "mean_gap", MeanGap)
    monkeypatch.setitem(RULES, "mine", Rule("mean_gap", "my figure", 0.5))
    monkeypatch.setattr("onnxcomp.check.KIND_DETECTORS", [("mine", lambda v: v.name == "p")] + KIND_DETECTORS)
    model = _seq_model()
    assert output_kinds(model) == {"p": "mine"}
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8, 5)).astype(np.float32)} for i in range(3)]
    report = check_model(model, model, split_data(Dataset(feeds, model), CheckConfig()), compressed=1)
    assert report["outputs"][0]["mean_gap"] == pytest.approx(1.0) and report["outputs"][0]["rule"] == "my figure >= 0.5"


def test_check_judges_sequences_by_decoding():
    model = _seq_model()
    rng = np.random.default_rng(3)
    feeds = []
    for _ in range(12):
        x = rng.standard_normal((1, 8, 5)).astype(np.float32)
        x[0, ::2, 0] += 6.0  # class 0 wins every other step: the blank
        feeds.append({"x": x})
    split = split_data(Dataset(feeds, model), CheckConfig())
    # Softmax over a temperature-scaled copy: the same decisions, other scores
    hot = io.load_model(make_proto(
        [oh.make_node("Mul", ["x", "t"], ["xt"]), oh.make_node("Softmax", ["xt"], ["p"], axis=-1)],
        [("x", [1, 8, 5])], [("p", [1, 8, 5])], [("t", np.array(3.0, np.float32))]))
    report = check_model(model, hot, split, compressed=1)
    row = report["outputs"][0]
    assert row["kind"] == "sequence" and row["sequence_agreement"] == 1.0 and report["met"]
    assert row["cosine"] < 0.985  # the cosine rule would have flagged it
    assert report["data"]["check_feeds"] == 2


def test_blame_names_the_first_damaged_tensor():
    rng = np.random.default_rng(11)
    w1 = rng.standard_normal((6, 6)).astype(np.float32)
    w2 = rng.standard_normal((6, 4)).astype(np.float32)

    def model(w1_, w2_):
        return io.load_model(make_proto(
            [oh.make_node("MatMul", ["x", "w1"], ["h1"]), oh.make_node("Relu", ["h1"], ["h2"]),
             oh.make_node("MatMul", ["h2", "w2"], ["y"])],
            [("x", [1, 6])], [("y", [1, 4])], [("w1", w1_), ("w2", w2_)]))

    ref = model(w1, w2)
    noisy = model(w1 + 0.1 * rng.standard_normal(w1.shape).astype(np.float32), w2)
    feeds = [{"x": rng.standard_normal((1, 6)).astype(np.float32)} for _ in range(2)]
    sqnr = layer_sqnr(ref, noisy, feeds)
    assert set(sqnr) == {"h1", "h2"} and 5 < sqnr["h1"] < 40
    assert layer_sqnr(ref, ref, feeds) == {"h1": float("inf"), "h2": float("inf")}
    worst = blame(ref, noisy, Dataset(feeds, ref), 1, feeds=2)
    assert worst[0]["tensor"] in ("h1", "h2") and worst[0]["sqnr_db"] == pytest.approx(min(sqnr.values()))


def test_a_second_check_on_the_split_reuses_the_original_outputs():
    model = _seq_model()
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8, 5)).astype(np.float32)} for i in range(10)]
    split = split_data(Dataset(feeds, model), CheckConfig())
    first = check_model(model, model, split, compressed=1)
    assert first["met"] and len(split.reference_outputs) == 2
    x = feeds[9]["x"]  # the second held-out feed (index 9)
    softmax = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(split.reference_outputs[1][0], softmax / softmax.sum(-1, keepdims=True), rtol=1e-5)
    split.reference_outputs = [[1.0 - v for v in outs] for outs in split.reference_outputs]  # not the model's
    second = check_model(model, model, split, compressed=1)
    assert second["outputs"][0]["cosine"] < 0.9  # judged against the kept outputs, not a new run
