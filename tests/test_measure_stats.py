from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from onnxcomp.measure import stats
from onnxcomp.measure.stats import LatencySummary, interleaved_schedule, ratio_ci, summarize

# ----------------------------------------------------------------------------- summarize


def test_summarize_known_values() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0], batch_size=8)
    assert isinstance(s, LatencySummary)
    assert s.n == 4
    assert s.min == 1.0
    assert s.median == 2.5
    # linear method: h = (n-1) q; P90: h = 2.7 -> 3 + 0.7 * (4 - 3)
    assert s.p90 == pytest.approx(3.7, abs=1e-12)
    assert s.p99 == pytest.approx(3.97, abs=1e-12)
    assert s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-12)  # sample std, ddof=1
    assert s.throughput == pytest.approx(0.4, rel=1e-12)
    assert s.items_per_s == pytest.approx(3.2, rel=1e-12)
    assert s.batch_size == 8


def test_summarize_percentiles_on_integer_grid() -> None:
    s = summarize(np.arange(101, dtype=float))
    assert (s.min, s.median, s.p90, s.p99) == (0.0, 50.0, 90.0, 99.0)
    assert s.items_per_s == s.throughput


def test_summarize_single_run() -> None:
    s = summarize([0.25])
    assert (s.n, s.min, s.median, s.p90, s.p99) == (1, 0.25, 0.25, 0.25, 0.25)
    assert (s.mean, s.std) == (0.25, 0.0)
    assert s.throughput == 4.0


def test_summarize_all_zero_times_has_infinite_throughput() -> None:
    assert summarize([0.0, 0.0]).throughput == math.inf


@pytest.mark.parametrize(
    ("times", "kwargs", "needle"),
    [
        ([], {}, "times"),
        ([[1.0, 2.0]], {}, "times"),
        ([1.0, float("nan")], {}, "times"),
        ([1.0, float("inf")], {}, "times"),
        ([1.0, -1.0], {}, "times"),
        ([1.0], {"batch_size": 0}, "batch_size"),
        ([1.0], {"batch_size": 1.5}, "batch_size"),
    ],
)
def test_summarize_refuses(times: list, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        summarize(times, **kwargs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=1e-7, max_value=10.0), min_size=1, max_size=60))
@example(times=[6.086484131474888] * 3)  # the float mean of three equal times fell an ulp below them
def test_summarize_order_invariants(times: list[float]) -> None:
    s = summarize(times)
    assert s.min <= s.median <= s.p90 <= s.p99 <= max(times)
    assert s.min <= s.mean <= max(times)
    assert s.std >= 0
    assert s.n == len(times)


# ----------------------------------------------------------------------------- ratio_ci


def test_ratio_of_identical_data_is_exactly_one() -> None:
    x = np.random.default_rng(3).lognormal(0.0, 0.3, 50)
    assert ratio_ci(x, x) == (1.0, 1.0, 1.0)  # paired: every resample ratio is 1


def test_ratio_of_identical_data_unpaired_contains_one() -> None:
    x = np.random.default_rng(4).lognormal(0.0, 0.3, 50)
    r, lo, hi = ratio_ci(x, x, paired=False)
    assert r == 1.0
    assert lo < 1.0 < hi


def test_ratio_exact_scaling_paired() -> None:
    assert ratio_ci([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(("n_a", "n_b"), [(200, 200), (200, 150)])
def test_bootstrap_interval_contains_true_ratio(n_a: int, n_b: int) -> None:
    rng = np.random.default_rng(12)
    a = 1e-3 * rng.lognormal(0.0, 0.25, n_a)  # median 1 ms
    b = 1.5e-3 * rng.lognormal(0.0, 0.25, n_b)  # median 1.5 ms
    r, lo, hi = ratio_ci(a, b, seed=5)
    assert lo < 1.5 < hi
    assert lo < r < hi
    assert hi - lo < 0.5


def test_bootstrap_coverage_is_near_nominal() -> None:
    # 100 independent experiments with a known ratio of medians 0.8.
    hits = 0
    for k in range(100):
        rng = np.random.default_rng(1000 + k)
        a = rng.lognormal(0.0, 0.3, 41)
        b = 0.8 * rng.lognormal(0.0, 0.3, 41)
        _, lo, hi = ratio_ci(a, b, n_boot=400, seed=k)
        hits += lo <= 0.8 <= hi
    assert hits >= 85


def test_paired_bootstrap_uses_shared_round_drift() -> None:
    # Strong per-round drift shared by both models, small own noise.
    rng = np.random.default_rng(8)
    drift = rng.lognormal(0.0, 0.5, 100)
    a = drift * rng.lognormal(0.0, 0.02, 100)
    b = 1.2 * drift * rng.lognormal(0.0, 0.02, 100)
    r, lo_p, hi_p = ratio_ci(a, b, seed=1)
    _, lo_u, hi_u = ratio_ci(a, b, seed=1, paired=False)
    assert lo_p < 1.2 < hi_p
    assert hi_p - lo_p < 0.5 * (hi_u - lo_u)


def test_ratio_ci_deterministic_per_seed() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=30), rng.lognormal(size=30)
    assert ratio_ci(a, b, seed=7) == ratio_ci(a, b, seed=7)
    assert ratio_ci(a, b, seed=7)[1:] != ratio_ci(a, b, seed=8)[1:]


def test_ratio_ci_chunking_does_not_change_paired_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.lognormal(size=40), rng.lognormal(size=40)
    whole = ratio_ci(a, b, n_boot=300, seed=3)
    monkeypatch.setattr(stats, "_BOOT_CHUNK_ELEMENTS", 40 * 7)  # chunks of 7 resamples
    assert ratio_ci(a, b, n_boot=300, seed=3) == whole


def test_ratio_ci_confidence_widens_interval() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.lognormal(size=80), rng.lognormal(size=80)
    _, lo50, hi50 = ratio_ci(a, b, confidence=0.5)
    _, lo99, hi99 = ratio_ci(a, b, confidence=0.99)
    assert lo99 <= lo50 < hi50 <= hi99


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "needle"),
    [
        ([], [1.0], {}, "a_times"),
        ([1.0], [], {}, "b_times"),
        ([1.0], [-1.0], {}, "b_times"),
        ([0.0, 0.0, 1.0], [1.0], {}, "median\\(a_times\\)"),
        ([1.0], [1.0], {"n_boot": 0}, "n_boot"),
        ([1.0], [1.0], {"confidence": 1.0}, "confidence"),
        ([1.0], [1.0], {"confidence": 0.0}, "confidence"),
        ([1.0, 2.0], [1.0], {"paired": True}, "paired"),
    ],
)
def test_ratio_ci_refuses(a: list, b: list, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ratio_ci(a, b, **kwargs)


# ----------------------------------------------------------------------------- schedule


def test_schedule_without_seed_is_round_robin() -> None:
    assert interleaved_schedule(3, 3) == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert interleaved_schedule(1, 4) == [0, 0, 0, 0]


def test_schedule_with_seed_permutes_each_round() -> None:
    order = interleaved_schedule(4, 50, seed=11)
    assert len(order) == 200
    rounds = [order[i : i + 4] for i in range(0, 200, 4)]
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)
    # Not the fixed order, and every model is first in some round.
    assert order != interleaved_schedule(4, 50)
    assert {r[0] for r in rounds} == {0, 1, 2, 3}
    assert order == interleaved_schedule(4, 50, seed=11)
    assert order != interleaved_schedule(4, 50, seed=12)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_schedule_rounds_are_permutations(n_models: int, n_rounds: int, seed: int | None) -> None:
    order = interleaved_schedule(n_models, n_rounds, seed=seed)
    assert len(order) == n_models * n_rounds
    for r in range(n_rounds):
        assert sorted(order[r * n_models : (r + 1) * n_models]) == list(range(n_models))


@pytest.mark.parametrize(
    ("n_models", "n_rounds", "needle"),
    [(0, 3, "n_models"), (2, 0, "n_rounds"), (2.5, 1, "n_models")],
)
def test_schedule_refuses(n_models: object, n_rounds: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        interleaved_schedule(n_models, n_rounds)  # type: ignore[arg-type]
