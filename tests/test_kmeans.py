"""Tests for onnxcomp.cluster.kmeans: exact 1-D k-means, entropy estimates, index packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxcomp.cluster.kmeans import (
    MAX_K,
    KMeansResult,
    _Bucketer,
    cluster_channel_scaled,
    cluster_per_channel,
    entropy_bits,
    huffman_bits_per_symbol,
    kmeans_1d,
    pack_indices,
    unpack_indices,
)

INITS = ["kmeans++", "linear", "density"]

finite32 = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)
# Mix in exact zeros and a few repeated values so duplicates and preserve_zero matter.
element32 = st.one_of(finite32, st.just(0.0), st.sampled_from([1.0, -1.0, 0.5]))
values32 = hnp.arrays(np.float32, st.integers(1, 120), elements=element32)


# ----------------------------------------------------------------------------- reference


def naive_assign(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Nearest centroid by an n x K distance matrix; ties go to the upper centroid."""
    d = np.abs(x[:, None] - c[None, :])
    return c.size - 1 - np.argmin(d[:, ::-1], axis=1)


def naive_repair(x, w, c, fixed, k):
    """The documented empty-cluster policy, written directly on the raw values."""
    order = np.argsort(c, kind="stable")
    c, fixed = c[order], fixed[order]
    while True:
        lab = naive_assign(x, c)
        nonempty = np.bincount(lab, minlength=c.size) > 0
        empty = ~nonempty & ~fixed
        slots = k - c.size + int(empty.sum())
        if slots <= 0:
            return c, fixed
        cands = []
        for j in np.flatnonzero(nonempty):
            mem, mw = x[lab == j], w[lab == j]
            d_lo, d_hi = c[j] - mem.min(), mem.max() - c[j]
            if max(d_lo, d_hi) > 0:
                phi = float(np.sum(mw * (mem - c[j]) ** 2))
                cands.append((-phi, j, mem.min() if d_lo >= d_hi else mem.max()))
        cands.sort(key=lambda t: (t[0], t[1]))
        new = np.array([t[2] for t in cands[:slots]], dtype=np.float64)
        c = np.concatenate((c[~empty], new))
        fixed = np.concatenate((fixed[~empty], np.zeros(new.size, dtype=bool)))
        order = np.argsort(c, kind="stable")
        c, fixed = c[order], fixed[order]
        if new.size == 0:
            return c, fixed


def naive_lloyd(x, c0, k, *, preserve_zero=False, max_iter=200):
    """O(n k) Lloyd with the same repair policy; returns float64 centroids."""
    x = np.asarray(x, dtype=np.float64)
    if preserve_zero:
        x = x[x != 0]
    w = np.ones_like(x)
    c = np.unique(np.asarray(c0, dtype=np.float64))
    fixed = (c == 0) if preserve_zero else np.zeros(c.size, dtype=bool)
    c, fixed = naive_repair(x, w, c, fixed, k)
    lab = naive_assign(x, c)
    for _ in range(max_iter):
        new = c.copy()
        for j in range(c.size):
            if not fixed[j] and np.any(lab == j):
                new[j] = np.sum(w[lab == j] * x[lab == j]) / np.sum(w[lab == j])
        new, new_fixed = naive_repair(x, w, new, fixed, k)
        new_lab = naive_assign(x, new)
        done = new.size == c.size and np.array_equal(new_lab, lab)
        c, fixed, lab = new, new_fixed, new_lab
        if done:
            break
    return c


def check_nearest(x: np.ndarray, res: KMeansResult) -> None:
    """Every value's centroid is a nearest one (ties either), in O(n) via the neighbours."""
    x64 = np.asarray(x, dtype=np.float64).reshape(-1)
    c = res.centroids.astype(np.float64)
    lab = res.labels.reshape(-1).astype(np.int64)
    assert lab.min() >= 0 and lab.max() < c.size
    d = np.abs(x64 - c[lab])
    scale = 1e-12 * np.maximum(np.abs(x64), np.abs(c).max())
    for nb in (lab - 1, lab + 1):
        ok = (nb >= 0) & (nb < c.size)
        d_nb = np.abs(x64[ok] - c[nb[ok]])
        assert np.all(d[ok] <= d_nb + scale[ok])


def sse(x: np.ndarray, res: KMeansResult, w: np.ndarray | None = None) -> float:
    err = np.asarray(x, dtype=np.float64) - res.centroids.astype(np.float64)[res.labels]
    return float(np.sum((1.0 if w is None else w) * err**2))


def check_result(x: np.ndarray, k: int, res: KMeansResult) -> None:
    c = res.centroids
    assert c.dtype == np.float32 and c.ndim == 1
    assert 1 <= c.size <= k
    assert np.all(np.diff(c) > 0)
    assert res.labels.shape == np.shape(x)
    assert res.labels.dtype == (np.uint8 if k <= 256 else np.uint16)
    assert res.inertia >= 0.0
    check_nearest(x, res)
    assert math.isclose(res.inertia, sse(x, res), rel_tol=1e-9, abs_tol=0.0)


# ----------------------------------------------------------------------------- kmeans_1d properties


@settings(max_examples=150, deadline=None)
@given(
    x=values32,
    k=st.integers(1, 40),
    init=st.sampled_from(INITS),
    seed=st.integers(0, 2**32 - 1),
    preserve_zero=st.booleans(),
)
def test_kmeans_properties(x, k, init, seed, preserve_zero):
    res = kmeans_1d(x, k, init=init, seed=seed, preserve_zero=preserve_zero)
    check_result(x, k, res)
    if preserve_zero:
        assert 0.0 in res.centroids
        recon = res.reconstruct()
        assert np.all(recon[x == 0] == 0.0)
        assert np.all(res.centroids[res.labels[x == 0]] == 0.0)

    again = kmeans_1d(x, k, init=init, seed=seed, preserve_zero=preserve_zero)
    assert np.array_equal(again.centroids, res.centroids)
    assert np.array_equal(again.labels, res.labels)
    assert again.inertia == res.inertia and again.iterations == res.iterations

    start = kmeans_1d(x, k, init=init, seed=seed, preserve_zero=preserve_zero, max_iter=0)
    assert start.iterations == 0
    check_result(x, k, start)
    # Lloyd never increases the inertia; the slack covers rounding the centroids to float32.
    slack = x.size * (2.0**-22 * float(np.abs(x).max(initial=0.0))) ** 2
    assert res.inertia <= start.inertia * (1 + 1e-9) + slack


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 150),
    k=st.integers(1, 12),
    init=st.sampled_from(INITS),
    dist=st.sampled_from(["normal", "uniform", "laplace", "bimodal", "sparse"]),
    preserve_zero=st.booleans(),
)
def test_matches_naive_lloyd(seed, n, k, init, dist, preserve_zero):
    rng = np.random.default_rng(seed)
    x = {
        "normal": lambda: rng.standard_normal(n),
        "uniform": lambda: rng.uniform(-3, 5, n),
        "laplace": lambda: rng.laplace(0, 0.1, n),
        "bimodal": lambda: np.concatenate(
            (rng.normal(-2, 0.1, n // 2), rng.normal(3, 0.5, n - n // 2))
        ),
        "sparse": lambda: rng.standard_normal(n) * (rng.random(n) < 0.4),
    }[dist]().astype(np.float32)
    c0 = kmeans_1d(x, k, init=init, seed=seed, preserve_zero=preserve_zero, max_iter=0).centroids
    fast = kmeans_1d(x, k, init=c0, preserve_zero=preserve_zero, max_iter=200, tol=0.0)
    ref = naive_lloyd(x, c0, k, preserve_zero=preserve_zero, max_iter=200)
    assert fast.centroids.size == ref.size
    np.testing.assert_allclose(fast.centroids, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", ["kmeans++", "density"])
def test_explicit_init_reproduces_named_init(init):
    # kmeans++ and density start on data values, which float32 stores exactly.
    x = np.random.default_rng(3).standard_normal(3000).astype(np.float32)
    c0 = kmeans_1d(x, 12, init=init, seed=5, max_iter=0).centroids
    a = kmeans_1d(x, 12, init=init, seed=5)
    b = kmeans_1d(x, 12, init=c0)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.labels, b.labels)


def test_init_methods_start_where_documented():
    x = np.arange(1, 101, dtype=np.float32)  # 1..100
    lin = kmeans_1d(x, 4, init="linear", max_iter=0).centroids
    np.testing.assert_allclose(lin, [1, 34, 67, 100])
    dens = kmeans_1d(x, 4, init="density", max_iter=0).centroids
    np.testing.assert_array_equal(dens, [13, 38, 63, 88])  # the 12.5/37.5/62.5/87.5 % points
    pp = kmeans_1d(x, 4, init="kmeans++", max_iter=0, seed=1).centroids
    assert pp.size == 4 and np.all(np.isin(pp, x))
    assert not np.array_equal(pp, kmeans_1d(x, 4, init="kmeans++", max_iter=0, seed=2).centroids)


@settings(max_examples=60, deadline=None)
@given(x=values32, extra=st.integers(0, 5), preserve_zero=st.booleans())
def test_few_unique_values_are_exact(x, extra, preserve_zero):
    u = np.unique(x)
    fitted = u[u != 0] if preserve_zero else u
    k = fitted.size + extra + (1 if preserve_zero else 0)
    assume(1 <= k <= MAX_K)
    res = kmeans_1d(x, k, preserve_zero=preserve_zero)
    assert res.inertia == 0.0 and res.iterations == 0
    assert np.array_equal(res.reconstruct(), x + np.float32(0.0))  # -0.0 may come back as +0.0
    expected = np.union1d(fitted, [0.0]) if preserve_zero else u
    np.testing.assert_array_equal(res.centroids, expected.astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 100), elements=st.floats(-100, 100, width=32)))
def test_k1_is_the_mean(x):
    res = kmeans_1d(x, 1)
    assert res.centroids.size == 1 and np.all(res.labels == 0)
    mean = float(np.mean(x.astype(np.float64)))
    assert math.isclose(float(res.centroids[0]), mean, rel_tol=1e-6, abs_tol=1e-5)


def test_preserve_zero_assigns_near_zero_values_to_zero():
    x = np.array([0, 0, 0, 1e-3, -1e-3, 5, 5.1, 4.9, -5, -5.2], dtype=np.float32)
    res = kmeans_1d(x, 3, preserve_zero=True)
    np.testing.assert_allclose(res.centroids, [-5.1, 0, 5], rtol=1e-6)
    assert np.all(res.reconstruct()[:5] == 0.0)
    check_result(x, 3, res)


def test_preserve_zero_k1_and_all_zero():
    x = np.array([0.0, 1.0, -2.0], dtype=np.float32)
    res = kmeans_1d(x, 1, preserve_zero=True)
    assert np.array_equal(res.centroids, [0.0]) and res.inertia == 5.0
    z = kmeans_1d(np.zeros((3, 4), dtype=np.float32), 8, preserve_zero=True)
    assert np.array_equal(z.centroids, [0.0]) and z.labels.shape == (3, 4)


def test_empty_clusters_are_reseeded():
    # Linear init on two far blobs leaves the middle centroids empty.
    x = np.concatenate((np.linspace(-10, -9, 50), np.linspace(9, 10, 50))).astype(np.float32)
    res = kmeans_1d(x, 6, init="linear", max_iter=0)
    assert res.centroids.size == 6
    lab = np.bincount(res.labels, minlength=6)
    assert np.all(lab > 0)
    check_result(x, 6, kmeans_1d(x, 6, init="linear"))


def test_init_outside_data_is_repaired():
    x = np.linspace(0, 1, 200, dtype=np.float32)
    start = kmeans_1d(x, 3, init=np.array([-100.0, 0.5, 100.0]), max_iter=0)
    assert start.centroids.size == 3 and np.all(np.bincount(start.labels, minlength=3) > 0)
    assert np.all((start.centroids >= 0) & (start.centroids <= 1))
    check_result(x, 3, kmeans_1d(x, 3, init=np.array([-100.0, 0.5, 100.0])))


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(1, 60), elements=finite32, unique=True),
    data=st.data(),
    k=st.integers(1, 10),
    init=st.sampled_from(INITS),
)
def test_integer_weights_equal_repetition(x, data, k, init):
    counts = data.draw(hnp.arrays(np.int64, x.shape, elements=st.integers(1, 4)))
    a = kmeans_1d(x, k, init=init, weights=counts, seed=7)
    b = kmeans_1d(np.repeat(x, counts), k, init=init, seed=7)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert math.isclose(a.inertia, b.inertia, rel_tol=1e-9, abs_tol=1e-30)
    assert math.isclose(a.inertia, sse(x, a, counts), rel_tol=1e-9, abs_tol=0.0)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), k=st.integers(1, 10))
def test_zero_weights_do_not_influence_fit(data, k):
    n = data.draw(st.integers(k + 1, 80))
    x = data.draw(hnp.arrays(np.float32, n, elements=finite32, unique=True))
    w = data.draw(hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 1.0])))
    w[0] = 1.0
    a = kmeans_1d(x, k, weights=w, seed=3)
    b = kmeans_1d(x[w > 0], k, seed=3)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    check_nearest(x, a)  # zero-weight values are still labelled


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.uint8])
def test_input_dtypes(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 30)) * 50).astype(dtype)
    res = kmeans_1d(x, 10)
    check_result(x, 10, res)


def test_large_tensor_many_clusters_mixed_scales():
    rng = np.random.default_rng(2)
    x = np.concatenate(
        (rng.standard_normal(100_000), rng.standard_normal(2000) * 1e-20, rng.laplace(0, 50, 2000))
    ).astype(np.float32)
    for k in (256, 300):
        res = kmeans_1d(x, k)
        assert res.centroids.size == k
        check_nearest(x, res)
        assert math.isclose(res.inertia, sse(x, res), rel_tol=1e-9)


def test_tight_cluster_far_from_zero_float64():
    # Prefix-sum costs cancel completely here; the fallbacks must still give a valid result.
    x = 1e6 + np.arange(20_000) * 1e-9
    for k in (2, 64):
        res = kmeans_1d(x, k)
        check_result(x, k, res)
    y = 3.0 + np.random.default_rng(1).standard_normal(5000) * 1e-6
    check_result(y, 16, kmeans_1d(y, 16))


def test_bucketer_matches_searchsorted():
    rng = np.random.default_rng(4)
    t = np.sort(
        np.concatenate(
            (
                np.float32([0, 1e-30, 2e-30, 3e-30, 4e-30, 5e-30, 1e-20, 1e-10]),
                rng.standard_normal(300).astype(np.float32),
            )
        )
    )
    probes = np.concatenate(
        (
            t,
            np.nextafter(t, np.float32(np.inf)),
            np.nextafter(t, np.float32(-np.inf)),
            rng.standard_normal(5000).astype(np.float32) * 1e-29,
            rng.standard_normal(5000).astype(np.float32) * 3,
            np.float32([3e38, -3e38, 0.0, -0.0, np.inf, -np.inf]),
        )
    )
    b = _Bucketer(t)
    assert b.ok
    np.testing.assert_array_equal(b(probes), np.searchsorted(t, probes, side="right"))
    t64 = rng.standard_normal(50)
    t64.sort()
    p64 = rng.standard_normal(1000)
    np.testing.assert_array_equal(_Bucketer(t64)(p64), np.searchsorted(t64, p64, side="right"))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must"),
        (dict(k=MAX_K + 1), "k must"),
        (dict(k=2.5), "k must"),
        (dict(k=True), "k must"),
        (dict(k=2, init="random"), "init must"),
        (dict(k=2, init=np.array([1.0, 2.0, 3.0])), "init array"),
        (dict(k=2, init=np.array([[1.0]])), "init array"),
        (dict(k=2, init=np.array([np.nan])), "init array"),
        (dict(k=2, max_iter=-1), "max_iter"),
        (dict(k=2, tol=-1.0), "tol"),
        (dict(k=2, tol=float("nan")), "tol"),
        (dict(k=2, seed=-1), "seed"),
        (dict(k=2, weights=np.ones(3)), "weights must have the shape"),
        (dict(k=2, weights=-np.ones(5)), "weights must be finite"),
        (dict(k=2, weights=np.full(5, np.inf)), "weights must be finite"),
        (dict(k=2, weights=np.zeros(5)), "weights are zero"),
    ],
)
def test_kmeans_refusals(kwargs, match):
    x = np.arange(5, dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        kmeans_1d(x, **kwargs)


@pytest.mark.parametrize(
    "values, match",
    [
        (np.array([], dtype=np.float32), "values is empty"),
        (np.array([1.0, np.nan]), "values contains non-finite"),
        (np.array([np.inf, 1.0]), "values contains non-finite"),
        (np.array([-np.inf, 1.0]), "values contains non-finite"),
        (np.array([1e39, 1.0]), "values exceed the float32 range"),
        (np.array([1 + 1j]), "values must be a real"),
        (np.array([True, False]), "values must be a real"),
    ],
)
def test_kmeans_refuses_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        kmeans_1d(values, 2)


def test_preserve_zero_init_array_counts_free_centroids():
    x = np.arange(-5, 6, dtype=np.float32)
    res = kmeans_1d(x, 3, init=np.array([-3.0, 0.0, 3.0]), preserve_zero=True)
    assert 0.0 in res.centroids
    with pytest.raises(ValueError, match="init array"):
        kmeans_1d(x, 3, init=np.array([-3.0, -1.0, 3.0]), preserve_zero=True)


# ----------------------------------------------------------------------------- per channel


def test_cluster_per_channel_matches_kmeans_1d():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3, 20)).astype(np.float32)
    w[2] = 1.0  # a channel with a single value -> padded row
    for axis in (0, -1, 1):
        cen, lab = cluster_per_channel(w, 4, axis=axis, seed=9, preserve_zero=False)
        moved_w = np.moveaxis(w, axis, 0)
        moved_l = np.moveaxis(lab, axis, 0)
        assert cen.shape == (w.shape[axis], 4) and cen.dtype == np.float32
        assert lab.shape == w.shape and lab.dtype == np.uint8 and lab.flags.c_contiguous
        for ch in range(moved_w.shape[0]):
            ref = kmeans_1d(moved_w[ch], 4, seed=9)
            n = ref.centroids.size
            np.testing.assert_array_equal(cen[ch, :n], ref.centroids)
            assert np.all(cen[ch, n:] == ref.centroids[-1])
            np.testing.assert_array_equal(moved_l[ch], ref.labels)
            np.testing.assert_array_equal(cen[ch][moved_l[ch]], ref.reconstruct())
    cen, _ = cluster_per_channel(w, 4)
    assert np.all(cen[2] == 1.0)


def test_cluster_per_channel_weights_and_refusals():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 40))
    imp = rng.random((3, 40))
    cen, lab = cluster_per_channel(w, 5, axis=0, weights=imp)
    for ch in range(3):
        ref = kmeans_1d(w[ch], 5, weights=imp[ch])
        np.testing.assert_array_equal(cen[ch, : ref.centroids.size], ref.centroids)
    with pytest.raises(ValueError, match="weights must have the shape"):
        cluster_per_channel(w, 5, weights=imp[:2])
    with pytest.raises(ValueError, match="axis"):
        cluster_per_channel(w, 5, axis=2)
    with pytest.raises(ValueError, match="w must have"):
        cluster_per_channel(np.float32(1.0), 5)
    with pytest.raises(ValueError, match="no channels"):
        cluster_per_channel(np.zeros((0, 4)), 5)
    with pytest.raises(ValueError, match="k must"):
        cluster_per_channel(w, 0)


# ----------------------------------------------------------------------------- entropy coding


@pytest.mark.parametrize(
    "counts, bits",
    [
        ([1, 1, 2, 4], 1.75),
        ([1, 1], 1.0),
        ([3, 3, 3, 3], 2.0),
        ([5], 1.0),
        ([0, 7, 0], 1.0),
        ([1, 1, 1], 5 / 3),
        ([0.25, 0.25, 0.5], 1.5),
    ],
)
def test_huffman_known(counts, bits):
    assert huffman_bits_per_symbol(np.array(counts)) == pytest.approx(bits, abs=1e-12)


def test_entropy_known():
    assert entropy_bits(np.array([1, 1, 2, 4])) == pytest.approx(1.75)
    assert entropy_bits(np.array([9])) == 0.0
    assert entropy_bits(np.array([1, 1, 0, 1, 1])) == pytest.approx(2.0)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.int64, st.integers(2, 300), elements=st.integers(0, 10**6)))
def test_huffman_within_one_bit_of_entropy(counts):
    assume(np.count_nonzero(counts) >= 2)
    h = entropy_bits(counts)
    L = huffman_bits_per_symbol(counts)
    assert h <= L + 1e-9
    assert L < h + 1
    # Never worse than a fixed-length code.
    assert L <= math.ceil(math.log2(np.count_nonzero(counts))) + 1e-12


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=20))
def test_huffman_equals_entropy_for_dyadic(splits):
    # Grow a complete binary tree by splitting leaves; counts 2^(D - depth) are dyadic,
    # for which the Huffman code is exactly the entropy.
    depths = [0]
    for i in splits:
        d = depths.pop(i % len(depths))
        depths += [d + 1, d + 1]
    counts = np.array([2 ** (max(depths) - d) for d in depths])
    assert huffman_bits_per_symbol(counts) == pytest.approx(entropy_bits(counts), abs=1e-12)
    assert huffman_bits_per_symbol(counts) == pytest.approx(
        float(np.sum(counts * np.array(depths)) / counts.sum()), abs=1e-12
    )


@pytest.mark.parametrize(
    "counts, match",
    [
        (np.array([]), "positive"),
        (np.zeros(3), "positive"),
        (np.array([1, -1]), "non-negative"),
        (np.array([1.0, np.nan]), "finite"),
        (np.ones((2, 2)), "1-D"),
        (np.array(["a"]), "1-D real"),
    ],
)
def test_counts_refusals(counts, match):
    with pytest.raises(ValueError, match=match):
        huffman_bits_per_symbol(counts)
    with pytest.raises(ValueError, match=match):
        entropy_bits(counts)


# ----------------------------------------------------------------------------- packing


@settings(max_examples=150, deadline=None)
@given(data=st.data(), bits=st.sampled_from([1, 2, 4, 8, 16]), n=st.integers(0, 70))
def test_pack_roundtrip(data, bits, n):
    dtype = np.uint16 if bits == 16 else data.draw(st.sampled_from([np.uint8, np.int32, np.uint16]))
    labels = data.draw(hnp.arrays(dtype, n, elements=st.integers(0, 2**bits - 1)))
    packed = pack_indices(labels, bits)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n * bits / 8),)
    out = unpack_indices(packed, bits, n)
    assert out.dtype == (np.uint16 if bits == 16 else np.uint8)
    np.testing.assert_array_equal(out, labels)


def test_pack_layout_low_bits_first():
    assert pack_indices(np.array([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack_indices(np.array([1, 2, 3, 0, 2]), 2).tolist() == [0b00111001, 0b10]
    assert pack_indices(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    assert pack_indices(np.array([0x1234]), 16).tolist() == [0x34, 0x12]
    lab = np.arange(12, dtype=np.uint8).reshape(3, 4)  # multi-dimensional: C order
    np.testing.assert_array_equal(unpack_indices(pack_indices(lab, 4), 4, 12), lab.ravel())


@pytest.mark.parametrize("bits, name", [(4, "uint4"), (2, "uint2")])
def test_pack_matches_onnx_layout(bits, name):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    onh = pytest.importorskip("onnx.numpy_helper")
    if not hasattr(ml_dtypes, name):
        pytest.skip(f"ml_dtypes has no {name}")
    labels = np.random.default_rng(0).integers(0, 2**bits, 37).astype(np.uint8)
    tensor = onh.from_array(labels.astype(getattr(ml_dtypes, name)))
    assert pack_indices(labels, bits).tobytes() == tensor.raw_data


def test_pack_refusals():
    with pytest.raises(ValueError, match="bits"):
        pack_indices(np.array([1]), 3)
    with pytest.raises(ValueError, match="labels must lie"):
        pack_indices(np.array([16]), 4)
    with pytest.raises(ValueError, match="labels must lie"):
        pack_indices(np.array([-1]), 8)
    with pytest.raises(ValueError, match="labels must be an integer"):
        pack_indices(np.array([1.0]), 8)
    with pytest.raises(ValueError, match="packed has"):
        unpack_indices(np.zeros(3, dtype=np.uint8), 4, 7)
    with pytest.raises(ValueError, match="packed must be"):
        unpack_indices(np.zeros(4, dtype=np.int8), 4, 7)
    with pytest.raises(ValueError, match="n must"):
        unpack_indices(np.zeros(0, dtype=np.uint8), 4, -1)
    with pytest.raises(ValueError, match="bits"):
        unpack_indices(np.zeros(1, dtype=np.uint8), 5, 1)


def test_kmeans_labels_pack_end_to_end():
    x = np.random.default_rng(8).standard_normal(1001).astype(np.float32)
    res = kmeans_1d(x, 16)
    packed = pack_indices(res.labels, 4)
    assert packed.size == 501
    back = unpack_indices(packed, 4, x.size)
    np.testing.assert_array_equal(res.centroids[back], res.reconstruct())
    counts = np.bincount(res.labels, minlength=16)
    assert entropy_bits(counts) <= huffman_bits_per_symbol(counts) <= 4.0


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cluster_channel_scaled(axis):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 7, 5)).astype(np.float32)
    scale = np.logspace(-6, 1, w.shape[axis]).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    w = w * scale.reshape(shape)
    np.moveaxis(w, axis, 0)[2] = 0.0  # a dead channel stays exactly zero
    cen, lab, s = cluster_channel_scaled(w, 8, axis=axis, preserve_zero=True)
    assert lab.shape == w.shape and s.shape == (w.shape[axis],) and s.dtype == np.float32
    assert cen.size <= 8 and np.all(np.diff(cen) > 0) and 0.0 in cen
    recon = cen[lab] * s.reshape(shape)
    assert recon.dtype == np.float32
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    rec_rows = np.moveaxis(recon, axis, 0).reshape(rows.shape)
    assert np.all(rec_rows[2] == 0.0)
    live = np.arange(rows.shape[0]) != 2
    rel = ((rec_rows - rows) ** 2).sum(1)[live] / (rows ** 2).sum(1)[live]
    assert rel.max() < 0.1  # every channel, 7 decades of scale apart, keeps its shape
    flat = kmeans_1d(w, 8, preserve_zero=True).reconstruct()
    flat_rows = np.moveaxis(flat, axis, 0).reshape(rows.shape)
    assert (((flat_rows - rows) ** 2).sum(1)[live] / (rows ** 2).sum(1)[live]).max() > 0.5  # one codebook does not
    # the least-squares scale never does worse than the max-magnitude normalisation it refines
    peak = np.abs(rows).max(1)
    peak[peak == 0] = 1
    with_peak = cen[np.moveaxis(lab, axis, 0).reshape(rows.shape)] * peak[:, None]
    assert np.all(((rec_rows - rows) ** 2).sum(1) <= ((with_peak - rows) ** 2).sum(1) * (1 + 1e-6) + 1e-30)
    with pytest.raises(ValueError, match="weights"):
        cluster_channel_scaled(w, 8, weights=np.ones_like(w))
    with pytest.raises(ValueError, match="axis"):
        cluster_channel_scaled(w, 8, axis=3)
