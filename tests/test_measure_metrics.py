from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcomp.measure.metrics import (
    FidelityAccumulator,
    OutputFidelity,
    accuracy,
    compare_outputs,
    sqnr_db,
)

# ----------------------------------------------------------------------------- sqnr_db


def test_sqnr_hand_computed() -> None:
    # signal 1 + 4 + 9 + 16 = 30, noise 1 -> 10 log10 30
    assert sqnr_db(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0])) == pytest.approx(
        10 * math.log10(30.0), abs=1e-12
    )
    # error of 10% everywhere -> 20 dB
    x = np.array([3.0, -4.0, 5.0])
    assert sqnr_db(x, 1.1 * x) == pytest.approx(20.0, abs=1e-9)


def test_sqnr_identical_is_inf() -> None:
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    assert sqnr_db(x, x.copy()) == math.inf
    assert sqnr_db(np.zeros(4), np.zeros(4)) == math.inf


def test_sqnr_zero_reference_with_error_is_minus_inf() -> None:
    assert sqnr_db(np.zeros(4), np.array([0.0, 0.0, 1e-3, 0.0])) == -math.inf


def test_sqnr_shape_mismatch_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        sqnr_db(np.zeros((2, 3)), np.zeros((3, 2)))


def test_sqnr_nan_propagates() -> None:
    assert math.isnan(sqnr_db(np.ones(3), np.array([1.0, np.nan, 1.0])))


# ----------------------------------------------------------------------------- compare_outputs


def test_compare_outputs_hand_computed() -> None:
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    cand = np.array([[1.0, 2.0], [3.0, 5.0]])
    f = compare_outputs(ref, cand, name="logits")
    assert isinstance(f, OutputFidelity)
    assert f.name == "logits"
    assert f.shape == (2, 2)
    assert f.n_elements == 4
    assert f.max_abs == 1.0
    assert f.mean_abs == 0.25
    assert f.cosine == pytest.approx(34.0 / math.sqrt(30.0 * 39.0), abs=1e-12)
    assert f.sqnr_db == pytest.approx(10 * math.log10(30.0), abs=1e-12)
    assert f.top1_agreement == 1.0
    assert f.channel_axis == 1
    c0, c1 = f.channels
    assert (c0.index, c0.sqnr_db, c0.max_abs, c0.range_ratio) == (0, math.inf, 0.0, 1.0)
    assert c1.index == 1
    assert c1.sqnr_db == pytest.approx(10 * math.log10(20.0), abs=1e-12)  # 4 + 16 over 1
    assert c1.max_abs == 1.0
    assert c1.range_ratio == 1.5  # (5 - 2) / (4 - 2)
    assert f.worst_channel == (1, c1.sqnr_db)


def test_compare_identical_outputs() -> None:
    x = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    f = compare_outputs(x, x.copy())
    assert f.sqnr_db == math.inf
    assert f.max_abs == 0.0 and f.mean_abs == 0.0
    assert f.cosine == pytest.approx(1.0, abs=1e-12)
    assert f.top1_agreement == 1.0
    assert all(ch.sqnr_db == math.inf and ch.range_ratio == 1.0 for ch in f.channels)
    assert f.worst_channel == (0, math.inf)


def test_compare_shape_mismatch_names_shapes_and_output() -> None:
    with pytest.raises(ValueError, match=r"'boxes'.*\(1, 4\).*\(1, 5\)"):
        compare_outputs(np.zeros((1, 4)), np.zeros((1, 5)), name="boxes")


def test_cosine_edge_cases() -> None:
    assert compare_outputs(np.zeros((2, 3)), np.zeros((2, 3))).cosine == 1.0
    assert compare_outputs(np.zeros((2, 3)), np.ones((2, 3))).cosine == 0.0
    assert compare_outputs(np.ones((2, 3)), np.zeros((2, 3))).cosine == 0.0
    x = np.arange(1.0, 7.0).reshape(2, 3)
    assert compare_outputs(x, -x).cosine == -1.0
    assert compare_outputs(x, 3 * x).cosine == pytest.approx(1.0, abs=1e-15)


def test_top1_agreement_fraction_and_applicability() -> None:
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    cand = np.array([[0.1, 0.9, 0.0], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    assert compare_outputs(ref, cand).top1_agreement == 0.5
    # argmax over the last axis, positions over all leading axes
    assert compare_outputs(ref.reshape(2, 2, 3), cand.reshape(2, 2, 3)).top1_agreement == 0.5
    assert compare_outputs(np.ones(5), np.ones(5)).top1_agreement is None  # rank 1
    assert compare_outputs(np.ones((5, 1)), np.ones((5, 1))).top1_agreement is None  # last dim 1


def test_detector_collapsed_score_channel_is_worst() -> None:
    # [1, anchors, 4 box coords in 0..320 + 1 score in 0..1], one uint8 scale for everything.
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0.0, 320.0, (1, 500, 4))
    scores = rng.uniform(0.0, 1.0, (1, 500, 1))
    ref = np.concatenate([boxes, scores], axis=-1).astype(np.float32)
    scale = float(ref.max() - ref.min()) / 255.0
    zero = float(ref.min())
    cand = (np.clip(np.round((ref - zero) / scale), 0, 255) * scale + zero).astype(np.float32)

    f = compare_outputs(ref, cand, channel_axis=-1, name="detections")
    assert f.cosine > 0.999  # the whole-tensor view says all is well
    assert f.sqnr_db > 40.0
    score = f.channels[4]
    assert score.sqnr_db < 10.0  # but the scores are destroyed
    assert all(ch.sqnr_db > 40.0 for ch in f.channels[:4])
    assert f.worst_channel == (4, score.sqnr_db)
    # every score is snapped to one of two levels
    assert len(np.unique(cand[..., 4])) <= 2


def test_range_ratio_reveals_collapse_and_constant_channels() -> None:
    ref = np.stack([np.linspace(0, 1, 8), np.full(8, 2.0), np.full(8, 3.0)], axis=-1)[None]
    cand = np.stack([np.full(8, 0.5), np.full(8, 2.0), np.linspace(3, 4, 8)], axis=-1)[None]
    f = compare_outputs(ref, cand)
    assert [ch.range_ratio for ch in f.channels] == [0.0, 1.0, math.inf]


def test_channel_axis_selection() -> None:
    x = np.arange(24, dtype=float).reshape(2, 3, 4)
    y = x.copy()
    y[:, 1, :] += 1.0  # damage channel 1 of axis 1
    f = compare_outputs(x, y, channel_axis=1)
    assert f.channel_axis == 1 and len(f.channels) == 3
    assert f.worst_channel is not None and f.worst_channel[0] == 1
    assert [ch.sqnr_db for ch in f.channels][0] == math.inf
    g = compare_outputs(x, y, channel_axis=None)
    assert g.channel_axis is None and g.channels == () and g.worst_channel is None
    h = compare_outputs(np.ones(3), np.ones(3))  # rank 1: no channel axis besides the sample axis
    assert h.channel_axis is None and h.channels == ()


@pytest.mark.parametrize("axis", [0, -3, 3])
def test_channel_axis_refused(axis: int) -> None:
    with pytest.raises(ValueError, match="channel_axis"):
        compare_outputs(np.ones((2, 3, 4)), np.ones((2, 3, 4)), channel_axis=axis)


def test_nan_candidate_channel_is_worst() -> None:
    ref = np.ones((2, 3))
    cand = ref.copy()
    cand[0, 2] = np.nan
    f = compare_outputs(ref, cand)
    assert math.isnan(f.sqnr_db) and math.isnan(f.max_abs)
    assert f.worst_channel is not None and f.worst_channel[0] == 2


def test_integer_and_scalar_outputs() -> None:
    ref = np.array([[1, 2, 3]], dtype=np.int64)
    f = compare_outputs(ref, np.array([[1, 2, 4]], dtype=np.int64))
    assert f.max_abs == 1.0
    s = compare_outputs(np.float32(2.0), np.float32(2.0))
    assert s.shape == (1,) and s.sqnr_db == math.inf


def test_non_numeric_refused() -> None:
    with pytest.raises(ValueError, match="cand.*'names'.*dtype"):
        compare_outputs(np.zeros(2), np.array(["a", "b"]), name="names")


# ----------------------------------------------------------------------------- accumulator


def test_accumulator_equals_concatenation_exactly_for_integer_data() -> None:
    rng = np.random.default_rng(5)
    refs = [rng.integers(-20, 20, (n, 6, 3)).astype(np.float32) for n in (2, 5, 1)]
    cands = [r + rng.integers(-2, 3, r.shape) for r in refs]
    acc = FidelityAccumulator(channel_axis=1, name="y")
    for r, c in zip(refs, cands):
        acc.update(r, c)
    streamed = acc.result()
    whole = compare_outputs(np.concatenate(refs), np.concatenate(cands), channel_axis=1, name="y")
    assert streamed == whole
    assert streamed.shape == (8, 6, 3)
    assert acc.n_batches == 3 and acc.n_rows == 8


def _assert_fidelity_close(a: OutputFidelity, b: OutputFidelity) -> None:
    for key in ("name", "shape", "n_elements", "channel_axis"):
        assert getattr(a, key) == getattr(b, key), key
    assert a.max_abs == b.max_abs  # max is exact
    assert a.top1_agreement == b.top1_agreement  # counts are exact
    for key in ("mean_abs", "cosine", "sqnr_db"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-9, abs=1e-12), key
    assert len(a.channels) == len(b.channels)
    for ca, cb in zip(a.channels, b.channels):
        assert ca.index == cb.index
        assert ca.max_abs == cb.max_abs
        assert ca.range_ratio == cb.range_ratio  # from exact min/max
        assert ca.sqnr_db == pytest.approx(cb.sqnr_db, rel=1e-9, abs=1e-12)
    assert (a.worst_channel is None) == (b.worst_channel is None)
    if a.worst_channel is not None and b.worst_channel is not None:
        assert a.worst_channel[1] == pytest.approx(b.worst_channel[1], rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=5),
    st.integers(0, 2**31 - 1),
    st.sampled_from([-1, 1, None]),
)
def test_accumulator_matches_concatenation_on_random_batches(
    batch_sizes: list[int], seed: int, channel_axis: int | None
) -> None:
    rng = np.random.default_rng(seed)
    refs = [rng.standard_normal((n, 3, 5)).astype(np.float32) for n in batch_sizes]
    cands = [(r + 0.05 * rng.standard_normal(r.shape)).astype(np.float32) for r in refs]
    acc = FidelityAccumulator(channel_axis=channel_axis)
    for r, c in zip(refs, cands):
        acc.update(r, c)
    _assert_fidelity_close(
        acc.result(),
        compare_outputs(np.concatenate(refs), np.concatenate(cands), channel_axis=channel_axis),
    )


def test_accumulator_refuses_shape_change_and_empty_result() -> None:
    acc = FidelityAccumulator(name="probs")
    with pytest.raises(ValueError, match="no batches.*'probs'"):
        acc.result()
    acc.update(np.zeros((2, 10)), np.zeros((2, 10)))
    acc.update(np.zeros((7, 10)), np.zeros((7, 10)))  # batch axis may vary
    with pytest.raises(ValueError, match=r"'probs' changed shape.*\(2, 11\)"):
        acc.update(np.zeros((2, 11)), np.zeros((2, 11)))
    with pytest.raises(ValueError, match=r"'probs'.*\(2, 10\).*\(2, 9\)"):
        acc.update(np.zeros((2, 10)), np.zeros((2, 9)))
    with pytest.raises(ValueError, match="'probs' is empty"):
        FidelityAccumulator(name="probs").update(np.zeros((0, 3)), np.zeros((0, 3)))
    assert acc.result().shape == (9, 10)


def test_accumulator_bad_channel_axis_does_not_corrupt_state() -> None:
    acc = FidelityAccumulator(channel_axis=5)
    with pytest.raises(ValueError, match="channel_axis=5"):
        acc.update(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="no batches"):
        acc.result()
    with pytest.raises(ValueError, match="channel_axis"):
        FidelityAccumulator(channel_axis=1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_from_scores_and_labels() -> None:
    logits = np.array([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 2.0]])
    labels = np.array([1, 0, 0, 1])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([1, 0, 2, 2]), labels) == 0.5
    assert accuracy(np.array([1.0, 0.0]), np.array([1, 1])) == 0.5


def test_accuracy_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match=r"3 samples.*labels has 4"):
        accuracy(np.zeros((3, 5)), np.zeros(4, dtype=int))


@pytest.mark.parametrize(
    ("preds", "labels", "needle"),
    [
        (np.zeros((3, 1)), np.zeros(3, dtype=int), "at least 2 columns"),
        (np.zeros((3, 2, 2)), np.zeros(3, dtype=int), r"shape \[N, C\] or \[N\]"),
        (np.array([0.5, 1.0]), np.zeros(2, dtype=int), "logits_or_preds.*integer"),
        (np.array([0, 1]), np.array([0.5, 1.0]), "labels.*integer"),
        (np.array([0, 1]), np.zeros((2, 1), dtype=int), r"labels must have shape \[N\]"),
        (np.zeros(0, dtype=int), np.zeros(0, dtype=int), "empty"),
    ],
)
def test_accuracy_refuses(preds: np.ndarray, labels: np.ndarray, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        accuracy(preds, labels)
