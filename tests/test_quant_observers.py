"""Tests for onnxcomp.quant.observers: streaming calibration statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxcomp.quant.observers import (
    OBSERVER_METHODS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from onnxcomp.quant.primitives import compute_scale_zero_point, dequantize, quantize

HIST_CLASSES = [HistogramObserver, PercentileObserver, EntropyObserver, MSEObserver]
ALL_METHODS = sorted(OBSERVER_METHODS)


def small(cls: type[Observer]) -> Observer:
    """A cheap instance (few bins) for property tests."""
    if cls is MinMaxObserver:
        return cls()
    if cls is EntropyObserver:
        return cls(bins=256, target_bins=16)
    return cls(bins=256)


def feed(obs: Observer, batches) -> Observer:
    for b in batches:
        obs.update(b)
    return obs


def same_histogram(a: HistogramObserver, b: HistogramObserver) -> bool:
    (ca, ea), (cb, eb) = a.histogram(), b.histogram()
    return np.array_equal(ca, cb) and np.array_equal(ea, eb)


@pytest.fixture(scope="module")
def heavy_tailed():
    return np.random.default_rng(3).standard_t(2.5, size=100_000).astype(np.float32)


@pytest.fixture(scope="module")
def gaussian_outliers():
    rng = np.random.default_rng(4)
    return np.concatenate([rng.normal(size=100_000), [40.0, -35.0, 55.0]]).astype(np.float32)


# ---------------------------------------------------------------- min/max


def test_minmax_known_data_and_streaming_exact():
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-3, 5, size=s).astype(np.float32) for s in (10, (4, 7), (2, 3, 5), 1)]
    obs = feed(MinMaxObserver(), batches)
    allx = np.concatenate([b.ravel() for b in batches])
    assert obs.compute_range() == (float(allx.min()), float(allx.max()))
    assert obs.count == allx.size
    one = MinMaxObserver()
    one.update(allx)
    assert one.compute_range() == obs.compute_range()


def test_minmax_merge_is_exact():
    rng = np.random.default_rng(1)
    x = rng.normal(size=1000) * 7
    a, b = MinMaxObserver(), MinMaxObserver()
    a.update(x[:400])
    b.update(x[400:])
    assert a.merge(b) is a
    assert a.compute_range() == (x.min(), x.max()) and a.count == 1000
    assert b.count == 600  # unchanged
    empty = MinMaxObserver()
    assert empty.merge(a).compute_range() == a.compute_range()
    assert a.merge(MinMaxObserver()).compute_range() == (x.min(), x.max())


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batches_are_refused(method, bad):
    obs = make_observer(method)
    with pytest.raises(ValueError, match="non-finite"):
        obs.update(np.array([1.0, bad, 2.0], np.float32))
    assert obs.count == 0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_refusals_common(method):
    obs = make_observer(method)
    with pytest.raises(ValueError, match="before any data"):
        obs.compute_range()
    with pytest.raises(ValueError, match="real numeric"):
        obs.update(np.array(["a"]))
    with pytest.raises(ValueError, match="real numeric"):
        obs.update(np.array([1 + 2j]))
    obs.update(np.zeros((0, 3), np.float32))  # empty batches are ignored
    assert obs.count == 0
    other = MinMaxObserver() if method != "minmax" else PercentileObserver()
    with pytest.raises(ValueError, match="cannot merge"):
        obs.merge(other)


def test_merge_refuses_other_configuration():
    with pytest.raises(ValueError, match="configuration"):
        HistogramObserver(bins=128).merge(HistogramObserver(bins=256))
    with pytest.raises(ValueError, match="configuration"):
        PercentileObserver(99.0).merge(PercentileObserver(99.9))
    with pytest.raises(ValueError, match="configuration"):
        MSEObserver(qdtype="int8").merge(MSEObserver(qdtype="uint8"))


def test_make_observer():
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    assert isinstance(make_observer("MSE", symmetric=True), MSEObserver)
    p = make_observer("percentile", percentile=99.0, bins=512, symmetric=True)
    assert isinstance(p, PercentileObserver) and p.percentile == 99.0 and p.bins == 512 and p.symmetric
    assert make_observer("entropy", qdtype="uint8").target_bins == 256
    assert make_observer("entropy", qdtype="int8").target_bins == 128
    assert make_observer("entropy", qdtype="int4", bins=64).target_bins == 8
    with pytest.raises(ValueError, match=r"valid methods: \['entropy', 'minmax', 'mse', 'percentile'\]"):
        make_observer("kl")
    with pytest.raises(ValueError, match="does not accept.*percentile"):
        make_observer("minmax", percentile=99.0)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: HistogramObserver(bins=1), "bins"),
        (lambda: HistogramObserver(bins=2.5), "bins"),
        (lambda: PercentileObserver(percentile=101), "percentile"),
        (lambda: PercentileObserver(percentile=50), "percentile"),
        (lambda: EntropyObserver(bins=128, target_bins=128), "target_bins"),
        (lambda: EntropyObserver(qdtype="int32"), "qdtype"),
        (lambda: MSEObserver(num_candidates=0), "num_candidates"),
    ],
)
def test_constructor_refusals(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# ---------------------------------------------------------------- histogram mechanics


def test_histogram_uniform_counts_and_resolution():
    x = np.random.default_rng(5).uniform(0, 1, size=50_000).astype(np.float32)
    obs = HistogramObserver(bins=1024)
    obs.update(x)
    counts, edges = obs.histogram()
    assert counts.sum() == x.size == obs.count
    w = obs.bin_width
    assert np.log2(w) == int(np.log2(w))  # power of two
    np.testing.assert_array_equal(np.diff(edges), w)
    assert 512 <= 1.0 / w <= 1024  # at most a factor 2 of resolution lost
    ref, _ = np.histogram(x, bins=edges)
    np.testing.assert_array_equal(counts, ref)
    # roughly flat
    assert counts.std() / counts.mean() < 0.2


def test_range_growth_keeps_total_count():
    obs = HistogramObserver(bins=256)
    batches = [
        np.full(10, 0.001),
        np.linspace(-1e-3, 1e-3, 100),
        np.linspace(0, 50, 1000),
        np.array([-1e4, 3e5]),
        np.linspace(-2, 2, 77),
    ]
    total = 0
    for b in batches:
        obs.update(b)
        total += b.size
        counts, edges = obs.histogram()
        assert counts.sum() == total == obs.count
        assert edges[0] <= obs.min and obs.max < edges[-1]
    one = HistogramObserver(bins=256)
    one.update(np.concatenate(batches))
    assert same_histogram(obs, one)


@settings(max_examples=25, deadline=None)
@given(
    batches=st.lists(
        st.tuples(
            hnp.arrays(np.float32, st.integers(1, 60), elements=st.floats(-1, 1, width=32)),
            st.floats(min_value=-6, max_value=6),
            st.floats(min_value=-3, max_value=3),
        ).map(lambda t: (t[0] * np.float32(10.0 ** t[1]) + np.float32(t[2])).astype(np.float32)),
        min_size=1,
        max_size=8,
    ),
    cls=st.sampled_from(HIST_CLASSES),
    split=st.integers(0, 8),
)
def test_streaming_equals_one_shot_and_merge(batches, cls, split):
    """Histograms (and hence ranges) are identical for streaming, one-shot and merged observers."""
    streamed = feed(small(cls), batches)
    one = small(cls)
    one.update(np.concatenate(batches))
    a = feed(small(cls), batches[:split])
    b = feed(small(cls), batches[split:][::-1])
    merged = a.merge(b)
    for obs in (one, merged):
        assert same_histogram(streamed, obs)
        assert obs.count == streamed.count == sum(x.size for x in batches)
        assert obs.compute_range() == streamed.compute_range()
    counts, _ = streamed.histogram()
    assert counts.sum() == streamed.count


@pytest.mark.parametrize("cls", HIST_CLASSES + [MinMaxObserver])
def test_memory_stays_bounded(cls):
    rng = np.random.default_rng(6)

    def footprint(o):
        return sorted((k, v.nbytes) for k, v in vars(o).items() if isinstance(v, np.ndarray)) + sorted(
            (k, v.nbytes) for k, v in vars(getattr(o, "_hist", o)).items() if isinstance(v, np.ndarray)
        )

    obs = small(cls)
    obs.update(rng.normal(size=10))
    first = footprint(obs)
    for i in range(300):
        obs.update(rng.normal(size=(rng.integers(1, 50), 3)) * 10.0 ** rng.uniform(-2, 2))
    assert footprint(obs) == first
    if cls is not MinMaxObserver:
        assert obs._hist.counts.size == obs.bins


# ---------------------------------------------------------------- degenerate data


@pytest.mark.parametrize("method", ALL_METHODS)
def test_all_zero_data(method):
    obs = make_observer(method)
    obs.update(np.zeros((4, 5), np.float32))
    obs.update(np.zeros(3, np.float32))
    assert obs.compute_range() == (0.0, 0.0)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("value", [3.5, -0.25, 1e-20, 7e5])
def test_single_value_data(method, value):
    obs = make_observer(method)
    obs.update(np.full(100, value, np.float32))
    v = float(np.float32(value))
    assert obs.compute_range() == (v, v)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_negative_only_data(method):
    x = -np.abs(np.random.default_rng(7).standard_t(3, size=20_000)).astype(np.float32)
    obs = make_observer(method)
    obs.update(x)
    lo, hi = obs.compute_range()
    assert x.min() <= lo <= hi <= x.max() <= 0.0
    assert lo < -0.5


@pytest.mark.parametrize("method", ALL_METHODS)
def test_integer_and_varying_shape_batches(method):
    obs = make_observer(method)
    obs.update(np.arange(-5, 6, dtype=np.int32).reshape(11, 1))
    obs.update(np.ones((2, 3, 4, 5), np.uint8))
    lo, hi = obs.compute_range()
    assert -5.0 <= lo <= hi <= 5.0
    assert obs.count == 11 + 120


# ---------------------------------------------------------------- clipping methods


def test_percentile_matches_numpy_within_a_bin():
    rng = np.random.default_rng(8)
    x = rng.normal(size=40_000).astype(np.float32)
    obs = PercentileObserver(percentile=99.0, bins=512)
    feed(obs, np.array_split(x, 9))
    lo, hi = obs.compute_range()
    w = obs.bin_width
    assert abs(hi - np.percentile(x, 99.0)) <= w
    assert abs(lo - np.percentile(x, 1.0)) <= w
    sym = PercentileObserver(percentile=99.0, bins=512, symmetric=True)
    sym.update(x)
    slo, shi = sym.compute_range()
    assert slo == -shi
    assert abs(shi - np.percentile(np.abs(x), 99.0)) <= sym.bin_width
    full = PercentileObserver(percentile=100.0)
    full.update(x)
    assert full.compute_range() == (float(x.min()), float(x.max()))


@pytest.mark.parametrize(
    ("obs_factory", "max_ratio"),
    [
        (lambda: PercentileObserver(percentile=99.9), 0.5),
        (lambda: PercentileObserver(percentile=99.9, symmetric=True), 0.5),
        (lambda: EntropyObserver(), 0.5),
        (lambda: EntropyObserver(qdtype="uint8"), 0.5),
        # squared error weighs far outliers heavily: MSE clips, but less
        (lambda: MSEObserver(), 0.95),
        (lambda: MSEObserver(symmetric=True), 0.95),
    ],
)
@pytest.mark.parametrize("data", ["heavy_tailed", "gaussian_outliers"])
def test_clipping_methods_shrink_heavy_tails(obs_factory, max_ratio, data, request):
    x = request.getfixturevalue(data)
    obs = obs_factory()
    feed(obs, np.array_split(x, 5))
    lo, hi = obs.compute_range()
    assert x.min() <= lo < 0.0 < hi <= x.max()
    assert hi - lo < max_ratio * (float(x.max()) - float(x.min()))  # clearly narrower than min/max
    assert -lo > 2.0 and hi > 2.0  # but still covers the bulk of the data


def test_entropy_clips_gaussian_outliers_hard(gaussian_outliers):
    obs = EntropyObserver()
    obs.update(gaussian_outliers)
    lo, hi = obs.compute_range()
    assert 2.5 < hi < 0.3 * gaussian_outliers.max()
    assert lo == -hi
    thresholds, kl = obs.divergences()
    assert np.all(np.diff(thresholds) > 0) and np.isfinite(kl).any()
    assert hi == pytest.approx(thresholds[np.argmin(kl)])


def test_entropy_without_outliers_keeps_range():
    x = np.random.default_rng(9).uniform(-1, 1, size=50_000).astype(np.float32)
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.compute_range()
    assert hi > 0.9 and lo < -0.9


def _actual_sq_error(x: np.ndarray, rng_: tuple[float, float], symmetric: bool) -> float:
    s, z = compute_scale_zero_point(rng_[0], rng_[1], "int8", symmetric)
    y = dequantize(quantize(x, s, z, "int8"), s, z)
    return float(np.sum((y.astype(np.float64) - x) ** 2))


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_beats_minmax_and_model_is_accurate(heavy_tailed, symmetric):
    x = heavy_tailed
    obs = MSEObserver(symmetric=symmetric)
    obs.update(x)
    chosen = obs.compute_range()
    full = (float(x.min()), float(x.max()))
    assert _actual_sq_error(x, chosen, symmetric) < 0.9 * _actual_sq_error(x, full, symmetric)
    for r in (chosen, full, (-5.0, 5.0)):
        predicted = float(obs.expected_error(*r))
        assert predicted == pytest.approx(_actual_sq_error(x, r, symmetric), rel=0.05)


def test_mse_keeps_range_for_uniform_data():
    x = np.random.default_rng(10).uniform(0, 6, size=20_000).astype(np.float32)
    obs = MSEObserver(qdtype="uint8")
    obs.update(x)
    lo, hi = obs.compute_range()
    assert lo == float(x.min()) and hi > 5.9
