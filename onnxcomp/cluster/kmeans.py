"""Exact 1-D k-means for weight sharing (Deep-Compression style), plus index coding helpers.

Objective
---------
Given scalars ``x_1..x_n`` with non-negative weights ``w_i`` (all 1 unless ``weights`` is
given), k-means looks for at most ``k`` centroids ``c_1 < ... < c_K`` and an assignment
``a(i)`` minimising the (weighted) inertia::

    J(c, a) = sum_i w_i * (x_i - c_{a(i)})**2

Lloyd's algorithm alternates the two exact partial minimisations: assign every value to its
nearest centroid, then move every centroid to the weighted mean of its cluster. Neither step
can increase ``J``, so the inertia is monotone non-increasing.

Why 1-D is cheap
----------------
Duplicates are merged first: the values are sorted once and reduced to the unique values
``u_0 < ... < u_{m-1}`` with multiplicities (or summed weights) ``w_t``. For sorted centroids
the nearest-centroid cell of ``c_j`` is the interval between the midpoints
``(c_{j-1} + c_j)/2`` and ``(c_j + c_{j+1})/2``, so every cluster is a contiguous index range
``[b_j, b_{j+1})`` of ``u`` with ``b_j = searchsorted(u, (c_{j-1} + c_j)/2, side="left")``.
A value exactly on a midpoint goes to the upper cluster (both are nearest). With prefix sums
``W_t = sum_{s<t} w_s``, ``S_t = sum_{s<t} w_s u_s`` and ``Q_t = sum_{s<t} w_s u_s**2``::

    weight of cluster j   N_j   = W[b_{j+1}] - W[b_j]
    its weighted mean     mu_j  = (S[b_{j+1}] - S[b_j]) / N_j
    its cost about c      phi_j = (Q[b_{j+1}] - Q[b_j]) - 2 c (S[b_{j+1}] - S[b_j]) + c**2 N_j

so one Lloyd iteration costs ``O(K log m)`` after the one-off ``O(n log n)`` sort; no ``n x K``
distance matrix is ever formed. The final labels of the original tensor are one
``searchsorted`` of every value against the ``K - 1`` midpoints (``O(n log K)``).

Numerics: ``S`` and ``Q`` are accumulated *outwards from zero* (negative values right-to-left,
non-negative values left-to-right, so ``S_t`` is anchored at the first non-negative value).
A range sum then carries a rounding error of order ``eps * (total weight / cluster weight)``
relative to the cluster's own magnitude, independent of how far the data spread. The cost
estimates ``phi`` still lose digits to cancellation for tight clusters far from zero; they are
only used to *choose* (k-means++ sampling, which cluster to split) and never reported. The
reported inertia is recomputed directly from the final labels.

Initialisation (``init``)
-------------------------
* ``"linear"``: ``k`` centroids evenly spaced between the minimum and maximum value.
* ``"density"``: the ``(i + 1/2)/k`` quantiles (``i = 0..k-1``) of the weighted empirical CDF,
  i.e. the smallest value whose cumulative weight reaches each target.
* ``"kmeans++"``: D^2 sampling (Arthur & Vassilvitskii) over the unique values weighted by
  their counts, driven by ``np.random.default_rng(seed)``: the first centroid is drawn with
  probability proportional to ``w_t``, each further one proportionally to
  ``w_t * D(u_t)**2`` where ``D`` is the distance to the nearest centroid chosen so far. The
  cell to split is drawn from per-cell costs ``phi`` (prefix sums), the value inside it by an
  exact scan for small cells; large cells are first narrowed 64-way on the prefix-sum cost,
  so the whole initialisation costs ``O(k (log m + sqrt k))`` rather than ``O(m k)``.
* an explicit array of starting centroids.

Empty clusters and missing centroids
------------------------------------
After the initialisation and after every update, a *repair* pass runs: non-fixed centroids
whose cell holds no (positive-weight) value are removed, and every free slot up to ``k`` is
re-seeded at the member value farthest from its centroid (the lower one on a tie) of the
clusters with the largest cost ``phi``, one slot per cluster, in decreasing ``phi`` order
(ties: lower cluster first); passes repeat until ``k`` centroids exist. Re-seeding a value
that already belongs to a cluster gives it distance 0, so a repair never increases the
inertia. If every cluster collapses onto its centroid no donor exists and the empty centroids
are dropped, hence "at most ``k``" centroids. Duplicates produced by an initialisation (e.g.
``density`` on heavily repeated values) are filled the same way.

Convergence: Lloyd stops after ``max_iter`` updates, when the cluster boundaries repeat (an
exact fixed point), or when no centroid moves by more than ``tol * (max - min)`` of the
fitted values. ``iterations`` counts performed updates; ``max_iter=0`` returns the repaired
initialisation.

``preserve_zero``
-----------------
Pruned weights must stay exactly zero. With ``preserve_zero=True`` exact zeros (``0.0`` and
``-0.0``) are excluded from the fit, a centroid of exactly ``0.0`` is reserved and never moved,
and only ``k - 1`` centroids are fitted. The zero centroid is an ordinary centroid during
assignment: non-zero values nearer to 0 than to any fitted centroid are assigned to it (and
thus become zero on reconstruction). This keeps the nearest-centroid property everywhere,
never increases the error versus excluding them, and only adds sparsity. Zeros always get
the zero label because a value at distance 0 cannot lie on a midpoint.

Output
------
Centroids are rounded to float32 (the storage type of a shared-weight table), de-duplicated,
and the labels and inertia are computed against the rounded centroids, so
``centroids[labels]`` is exactly the reconstruction the inertia describes. ``-0.0`` centroids
are normalised to ``+0.0``. Labels use ``uint8`` when ``k <= 256``, else ``uint16`` (chosen
from ``k``, not from the number of centroids actually found, so the dtype is predictable).

Channel-scaled codebook
-----------------------
One codebook per tensor fails on weights whose output channels differ in scale by orders of
magnitude (BatchNorm folded into a Conv, a dead channel of ``1e-20`` weights): the small
channels are snapped onto centroids sized for the large ones and their relative error explodes.
One codebook per channel fixes that but costs ``k`` floats per channel, more than the labels of a
3x3 depthwise filter. ``cluster_channel_scaled`` shares one codebook ``c`` across the tensor and
gives each output channel a scale ``s_r``: ``W[r, i] ~ s_r * c[l(r, i)]``.

1. Normalise every channel by its largest magnitude, ``v_ri = W_ri / m_r`` (``m_r = 1`` for an
   all-zero channel), so every channel spans ``[-1, 1]`` and counts alike in the fit.
2. Fit ``c`` and ``l`` by 1-D k-means on all ``v`` at once (``preserve_zero`` as above, zeros stay
   zeros since ``s_r * 0 = 0``).
3. Refit each scale by least squares given the labels, ``q_r = c[l(r, .)]``:
   ``s_r = <W_r, q_r> / <q_r, q_r>`` (``m_r`` if ``q_r = 0``), which minimises
   ``||W_r - s_r q_r||^2`` exactly and so is never worse than keeping ``m_r``.

Each channel then holds at most ``k`` distinct values; the scales cost one float per channel.

Entropy-coding estimate
-----------------------
For a histogram of label counts ``n_s`` with total ``N``, ``entropy_bits`` is the Shannon
entropy ``H = -sum p_s log2 p_s`` (``p_s = n_s / N``) and ``huffman_bits_per_symbol`` the
average code length ``L = sum n_s len_s / N`` of an optimal (Huffman) prefix code, computed
as the sum of the weights of all internal merge nodes divided by ``N``. For two or more
symbols ``H <= L < H + 1``. A single symbol needs no information but a real code still emits
one bit per symbol, so ``L = 1`` by convention there.

Index packing
-------------
``pack_indices`` stores ``bits`` in {1, 2, 4, 8, 16} per index. For ``bits < 8`` the indices
are packed little-end first inside each byte: index ``i`` occupies bits
``[(i % per) * bits, (i % per + 1) * bits)`` of byte ``i // per`` (``per = 8 // bits``), which is
ONNX's layout for ``uint4`` (low nibble first) and ``uint2``; the tail is zero padded.
``bits == 16`` stores little-endian uint16.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MAX_K",
    "KMeansResult",
    "kmeans_1d",
    "cluster_per_channel",
    "cluster_channel_scaled",
    "huffman_bits_per_symbol",
    "entropy_bits",
    "pack_indices",
    "unpack_indices",
]

MAX_K = 65536
_INITS = ("kmeans++", "linear", "density")
_PACK_BITS = (1, 2, 4, 8, 16)
_F32_MAX = float(np.finfo(np.float32).max)
_EXACT_SCAN = 4096  # k-means++: cells up to this many unique values are sampled exactly
_BLOCK = 256  # k-means++: block size of the two-level sampling table
_LABEL_CHUNK = 1 << 21  # values labelled per call (bounds the temporaries)
_BUCKET_CMP = 4  # final labelling: explicit comparisons per value before falling back


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """Result of :func:`kmeans_1d`.

    ``centroids``: float32, strictly ascending, at most ``k`` entries.
    ``labels``: uint8 (``k <= 256``) or uint16, same shape as the input; ``centroids[labels]``
    is the reconstruction.
    ``inertia``: (weighted) sum of squared errors of that reconstruction, float.
    ``iterations``: number of Lloyd updates performed (0 when no fit was needed).
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    iterations: int

    def reconstruct(self) -> np.ndarray:
        """``centroids[labels]``: the clustered tensor as float32."""
        return self.centroids[self.labels]


# ----------------------------------------------------------------------------- validation


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        ivalue = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if ivalue < lo or (hi is not None and ivalue > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {bound}, got {ivalue}")
    return ivalue


def _as_real_array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        return arr
    if arr.dtype.kind in "iu":
        return arr.astype(np.float64)
    raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")


def _label_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint8) if k <= 256 else np.dtype(np.uint16)


# ----------------------------------------------------------------------------- sorted data


def _sorted_unique(flat: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique values of ``flat`` (its dtype) and their counts / summed weights (float64)."""
    if weights is None:
        s = np.sort(flat)
    else:
        order = np.argsort(flat)  # order among equal values is irrelevant
        s = flat[order]
    starts = np.empty(s.size, dtype=bool)
    starts[0] = True
    np.not_equal(s[1:], s[:-1], out=starts[1:])
    idx = np.flatnonzero(starts)
    del starts
    u = s[idx]
    del s
    if weights is None:
        w = np.empty(idx.size, dtype=np.float64)
        np.subtract(idx[1:], idx[:-1], out=w[:-1])
        w[-1] = flat.size - idx[-1]
    else:
        w = np.add.reduceat(weights[order].astype(np.float64, copy=False), idx)
    return u, w


def _anchored_prefix(f: np.ndarray, z: int, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (length ``f.size + 1``) so that ``out[b] - out[a] == f[a:b].sum()``, with the
    sums accumulated outwards from index ``z`` (``out[z] == 0``)."""
    out[z] = 0.0
    np.cumsum(f[z:], out=out[z + 1 :])
    if z:
        np.cumsum(f[z - 1 :: -1], out=out[z - 1 :: -1])
        np.negative(out[:z], out=out[:z])
    return out


class _Data:
    """Sorted distinct values ``u`` with positive weights ``w`` and their prefix sums."""

    def __init__(self, u: np.ndarray, w: np.ndarray) -> None:
        self.u = u
        self.w = w
        m = self.m = u.size
        self.W = np.empty(m + 1)
        self.W[0] = 0.0
        np.cumsum(w, out=self.W[1:])
        z = int(np.searchsorted(u, 0.0, side="left"))
        f = np.multiply(w, u)
        self.S = _anchored_prefix(f, z, np.empty(m + 1))
        np.multiply(f, u, out=f)
        self.Q = _anchored_prefix(f, z, np.empty(m + 1))

    def bounds(self, c: np.ndarray) -> np.ndarray:
        """Cluster boundaries ``b`` (length ``K + 1``) of the sorted centroids ``c``."""
        b = np.empty(c.size + 1, dtype=np.intp)
        b[0] = 0
        b[-1] = self.m
        b[1:-1] = np.searchsorted(self.u, 0.5 * (c[:-1] + c[1:]), side="left")
        return b

    def cost(self, lo: Any, hi: Any, c: Any) -> Any:
        """Estimated ``sum_{lo<=t<hi} w_t (u_t - c)**2`` (vectorised, clipped at 0)."""
        q = self.Q[hi] - self.Q[lo]
        s = self.S[hi] - self.S[lo]
        n = self.W[hi] - self.W[lo]
        return np.maximum(q - 2.0 * c * s + c * c * n, 0.0)


# ----------------------------------------------------------------------------- init


def _init_linear(data: _Data, k_free: int) -> np.ndarray:
    return np.linspace(data.u[0], data.u[-1], k_free)


def _init_density(data: _Data, k_free: int) -> np.ndarray:
    targets = (np.arange(k_free) + 0.5) / k_free * data.W[-1]
    idx = np.searchsorted(data.W[1:], targets, side="left")
    return data.u[np.minimum(idx, data.m - 1)]


def _init_kmeanspp(
    data: _Data, k_free: int, fixed: list[float], rng: np.random.Generator
) -> np.ndarray:
    """D^2 sampling of ``k_free`` distinct values of ``data.u`` on top of ``fixed`` centroids."""
    u, m = data.u, data.m
    cap = len(fixed) + k_free
    cval = np.zeros(cap)  # centroid value per cell id
    clo = np.zeros(cap, dtype=np.intp)  # cell range per id
    chi = np.zeros(cap, dtype=np.intp)
    pot = np.zeros(cap)  # estimated cell cost per id
    nblocks = -(-cap // _BLOCK)
    bsum = np.zeros(nblocks)
    vals: list[float] = []  # sorted centroid values
    ids: list[int] = []  # cell id parallel to vals
    chosen: list[float] = []

    def set_pot(cid: int) -> None:
        pot[cid] = data.cost(clo[cid], chi[cid], cval[cid]) if chi[cid] > clo[cid] else 0.0
        blk = cid // _BLOCK
        bsum[blk] = pot[blk * _BLOCK : (blk + 1) * _BLOCK].sum()

    def insert(v: float) -> None:
        cid = len(ids)
        p = bisect.bisect_left(vals, v)
        left = ids[p - 1] if p > 0 else -1
        right = ids[p] if p < len(ids) else -1
        lo = int(np.searchsorted(u, 0.5 * (cval[left] + v), side="left")) if left >= 0 else 0
        hi = int(np.searchsorted(u, 0.5 * (v + cval[right]), side="left")) if right >= 0 else m
        cval[cid], clo[cid], chi[cid] = v, lo, hi
        vals.insert(p, v)
        ids.insert(p, cid)
        set_pot(cid)
        if left >= 0:
            chi[left] = lo
            set_pot(left)
        if right >= 0:
            clo[right] = hi
            set_pot(right)

    def is_centroid(v: float) -> bool:
        p = bisect.bisect_left(vals, v)
        return p < len(vals) and vals[p] == v

    for v in fixed:
        insert(float(v))
    if not fixed:
        r = rng.random() * data.W[-1]
        first = int(min(np.searchsorted(data.W, r, side="right") - 1, m - 1))
        v0 = float(u[max(first, 0)])
        insert(v0)
        chosen.append(v0)
    while len(chosen) < k_free:
        n_cells = len(ids)
        total = float(bsum.sum())
        v = math.nan
        if total > 0.0:
            r = rng.random() * total
            csb = np.cumsum(bsum)
            blk = int(min(np.searchsorted(csb, r, side="right"), nblocks - 1))
            r -= csb[blk - 1] if blk else 0.0
            cs = np.cumsum(pot[blk * _BLOCK : min((blk + 1) * _BLOCK, n_cells)])
            j = int(min(np.searchsorted(cs, r, side="right"), cs.size - 1))
            cid = blk * _BLOCK + j
            r -= cs[j - 1] if j else 0.0
            frac = min(max(r / pot[cid], 0.0), 1.0) if pot[cid] > 0 else 0.5
            lo, hi, cv = int(clo[cid]), int(chi[cid]), float(cval[cid])
            a, b, target = lo, hi, frac
            if hi - lo > _EXACT_SCAN:
                # Narrow [a, b) on the monotone prefix cost P(i) = cost(lo, i), 64-way per round.
                target = frac * float(data.cost(lo, hi, cv))
                while b - a > _EXACT_SCAN:
                    grid = np.unique(np.linspace(a, b, 65).astype(np.intp))
                    j = int(np.searchsorted(data.cost(lo, grid, cv), target, side="right"))
                    j = min(max(j, 1), grid.size - 1)
                    a, b = int(grid[j - 1]), int(grid[j])
                target -= float(data.cost(lo, a, cv))
            d = data.w[a:b] * (u[a:b] - cv) ** 2
            cd = np.cumsum(d)
            if b - a == hi - lo:  # the whole cell was scanned: sample exactly
                target *= float(cd[-1])
            if cd[-1] > 0:
                t = int(np.searchsorted(cd, target, side="right"))
                v = float(u[a + min(t, b - a - 1)])
        if not (v == v) or is_centroid(v):
            # Cost estimates lost to rounding: fall back to the value farthest from its centroid.
            live = np.array(ids)
            lo_a, hi_a, cv_a = clo[live], chi[live], cval[live]
            ok = hi_a > lo_a
            if not ok.any():
                break
            lo_a, hi_a, cv_a = lo_a[ok], hi_a[ok], cv_a[ok]
            d_lo, d_hi = cv_a - u[lo_a], u[hi_a - 1] - cv_a
            far = np.maximum(d_lo, d_hi)
            j = int(np.argmax(far))
            if far[j] <= 0:
                break  # every value already is a centroid
            v = float(u[lo_a[j]] if d_lo[j] >= d_hi[j] else u[hi_a[j] - 1])
        insert(v)
        chosen.append(v)
    return np.asarray(chosen, dtype=np.float64)


def _initial_centroids(
    data: _Data,
    init: str | np.ndarray,
    k: int,
    preserve_zero: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Starting centroids (float64) and the mask of fixed ones (the reserved zero)."""
    k_free = k - 1 if preserve_zero else k
    fixed = [0.0] if preserve_zero else []
    if isinstance(init, np.ndarray):
        free = init
    elif k_free == 0:
        free = np.empty(0)
    elif init == "linear":
        free = _init_linear(data, k_free)
    elif init == "density":
        free = _init_density(data, k_free)
    else:
        free = _init_kmeanspp(data, k_free, fixed, rng)
    free = np.unique(np.asarray(free, dtype=np.float64))
    if preserve_zero:
        free = free[free != 0.0]
    c = np.concatenate((free, fixed))
    mask = np.zeros(c.size, dtype=bool)
    mask[free.size :] = True
    return c, mask


# ----------------------------------------------------------------------------- Lloyd




def _repair(
    data: _Data, c: np.ndarray, fixed: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop empty free centroids and re-seed free slots up to ``k`` (see module docstring).

    Returns the sorted centroids, their fixed mask and their cluster boundaries.
    """
    order = np.argsort(c, kind="stable")
    c, fixed = c[order], fixed[order]
    u = data.u
    while True:
        b = data.bounds(c)
        lo, hi = b[:-1], b[1:]
        nonempty = hi > lo
        empty = ~nonempty & ~fixed
        slots = k - c.size + int(empty.sum())
        if slots <= 0:
            return c, fixed, b
        ne = np.flatnonzero(nonempty)
        d_lo = c[ne] - u[lo[ne]]
        d_hi = u[hi[ne] - 1] - c[ne]
        ok = np.maximum(d_lo, d_hi) > 0
        ne, d_lo, d_hi = ne[ok], d_lo[ok], d_hi[ok]
        if ne.size:
            phi = data.cost(lo[ne], hi[ne], c[ne])
            rank = np.argsort(-phi, kind="stable")[:slots]
            donors = ne[rank]
            new = np.where(d_lo[rank] >= d_hi[rank], u[lo[donors]], u[hi[donors] - 1])
        else:
            new = np.empty(0)
        keep = ~empty
        c = np.concatenate((c[keep], new))
        fixed = np.concatenate((fixed[keep], np.zeros(new.size, dtype=bool)))
        order = np.argsort(c, kind="stable")
        c, fixed = c[order], fixed[order]
        if new.size == 0:  # every cluster sits on its centroid: nothing left to split
            return c, fixed, data.bounds(c)


def _lloyd(
    data: _Data, c: np.ndarray, fixed: np.ndarray, k: int, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    """Lloyd iterations on the prefix sums; returns the final centroids and the update count."""
    c, fixed, b = _repair(data, c, fixed, k)
    limit = tol * float(data.u[-1] - data.u[0])
    it = 0
    while it < max_iter:
        n = data.W[b[1:]] - data.W[b[:-1]]
        s = data.S[b[1:]] - data.S[b[:-1]]
        new = c.copy()
        np.divide(s, n, out=new, where=(n > 0) & ~fixed)
        it += 1
        new, new_fixed, new_b = _repair(data, new, fixed, k)
        converged = new_b.size == b.size and bool(np.array_equal(new_b, b))
        if not converged and new.size == c.size:
            converged = float(np.max(np.abs(new - c))) <= limit
        c, fixed, b = new, new_fixed, new_b
        if converged:
            break
    return c, it


# ----------------------------------------------------------------------------- assignment


def _ceil_to_dtype(m: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Smallest values of ``dtype`` that are >= ``m``: for ``x`` of that dtype,
    ``x >= m  <=>  x >= _ceil_to_dtype(m)``, so comparisons can run in the input's dtype."""
    if dtype == np.float64:
        return m
    mt = m.astype(dtype)
    low = np.less(mt, m)
    if low.any():
        mt[low] = np.nextafter(mt[low], np.asarray(np.inf, dtype=dtype))
    return mt


class _Bucketer:
    """Counts ``#{j : t_j <= x}`` for sorted thresholds ``t`` (``searchsorted(t, x, "right")``).

    A monotone bucket map ``f(x) = clip(floor((x - t_0) * scale), 0, G - 1)`` (rounded float
    ops are monotone non-decreasing) splits the thresholds: ``f(x) < f(t_j)`` implies
    ``x < t_j`` and ``f(x) > f(t_j)`` implies ``x > t_j``, so only the thresholds sharing the
    bucket of ``x`` need an explicit comparison. With ~16 buckets per threshold that is usually
    0 or 1 comparison per value, much cheaper than a binary search per value; values whose
    bucket holds more than ``_BUCKET_CMP`` thresholds fall back to ``searchsorted``.
    """

    def __init__(self, t: np.ndarray) -> None:
        self.t = t
        self.ct = np.dtype(np.float32) if t.dtype.itemsize <= 4 else np.dtype(np.float64)
        self.n_buckets = int(min(1 << 16, max(1024, 16 * (t.size + 1))))
        self.lo = self.ct.type(t[0])
        span = float(self.ct.type(t[-1]) - self.lo)
        scale = (self.n_buckets - 1) / span if span > 0 else 0.0
        self.ok = math.isfinite(scale) and scale > 0 and math.isfinite(float(self.lo))
        if not self.ok:
            return
        self.scale = self.ct.type(scale)
        ft = self.bucket(t)
        grid = np.arange(self.n_buckets)
        self.base = np.searchsorted(ft, grid, side="left").astype(np.int32)
        cnt = np.searchsorted(ft, grid, side="right") - self.base
        self.cnt = cnt.astype(np.int32)
        self.n_cmp = int(min(cnt.max(), _BUCKET_CMP))
        self.t_pad = np.concatenate((t, np.full(self.n_cmp, np.inf, dtype=t.dtype)))

    def bucket(self, v: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # +-inf is clipped into the end buckets
            y = np.subtract(v, self.lo, dtype=self.ct)
            y *= self.scale
        np.clip(y, 0, self.n_buckets - 1, out=y)
        return y.astype(np.int32)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        if not self.ok:
            return np.searchsorted(self.t, v, side="right")
        g = self.bucket(v)
        base = self.base[g]
        cnt = self.cnt[g]
        out = base.copy()
        for i in range(self.n_cmp):
            out += (cnt > i) & (v >= self.t_pad[base + i])
        crowded = np.flatnonzero(cnt > self.n_cmp)
        if crowded.size:
            out[crowded] = np.searchsorted(self.t, v[crowded], side="right")
        return out


def _finalize(
    x: np.ndarray, u64: np.ndarray, w: np.ndarray, centroids: np.ndarray, k: int, iterations: int
) -> KMeansResult:
    """Round the centroids to float32, label every value against them, recompute the inertia."""
    cen = np.unique(centroids.astype(np.float32)) + np.float32(0.0)  # also -0.0 -> +0.0
    c64 = cen.astype(np.float64)
    mids = 0.5 * (c64[:-1] + c64[1:])
    flat = x.reshape(-1)
    labels = np.zeros(flat.size, dtype=_label_dtype(k))
    if mids.size:
        count_le = _Bucketer(_ceil_to_dtype(mids, flat.dtype))
        for start in range(0, flat.size, _LABEL_CHUNK):
            stop = start + _LABEL_CHUNK
            labels[start:stop] = count_le(flat[start:stop])
    # u64 is sorted, so its clusters are contiguous: repeat each centroid over its range.
    b = np.searchsorted(u64, mids, side="left")
    err = np.repeat(c64, np.diff(np.concatenate(([0], b, [u64.size]))))
    np.subtract(u64, err, out=err)
    np.multiply(err, err, out=err)
    np.multiply(err, w, out=err)
    inertia = float(np.sum(err))
    return KMeansResult(cen, labels.reshape(x.shape), inertia, iterations)


# ----------------------------------------------------------------------------- public API


def kmeans_1d(
    values: np.ndarray,
    k: int,
    *,
    init: str | np.ndarray = "kmeans++",
    max_iter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    preserve_zero: bool = False,
    weights: np.ndarray | None = None,
) -> KMeansResult:
    """Cluster the scalars of ``values`` (any shape) into at most ``k`` shared values.

    Exact 1-D Lloyd on the sorted unique values (see the module docstring for the math, the
    ``init`` options, empty-cluster repair and ``preserve_zero``). ``weights`` (same shape
    as ``values``, finite, >= 0) turns the objective into a weighted SSE; zero-weight values
    do not influence the fit but are still labelled. Deterministic for a given ``seed``.

    If at most ``k`` distinct values are to be fitted (``k - 1`` non-zero ones with
    ``preserve_zero``), the centroids are those values: the reconstruction is exact for
    float32 (or narrower) inputs and the inertia 0. ``k == 1`` gives the (weighted) mean.

    Refuses (ValueError): empty or non-real ``values``; NaN/inf in ``values``; magnitudes
    beyond float32 range; ``k`` outside [1, 65536]; unknown ``init``; an ``init`` array that
    is not 1-D, finite, non-empty and of at most ``k`` (``k - 1`` non-zero) entries;
    negative ``max_iter``/``seed``; negative or non-finite ``tol``; ``weights`` of the wrong
    shape, negative or non-finite, or with zero total on the values to fit.
    """
    x = _as_real_array(values, "values")
    k = _check_int(k, "k", 1, MAX_K)
    max_iter = _check_int(max_iter, "max_iter", 0)
    seed = _check_int(seed, "seed", 0)
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a non-negative float, got {tol!r}") from None
    if not (math.isfinite(tol) and tol >= 0.0):
        raise ValueError(f"tol must be a non-negative finite float, got {tol!r}")
    preserve_zero = bool(preserve_zero)
    k_free = k - 1 if preserve_zero else k
    init_arr: np.ndarray | None = None
    if isinstance(init, str):
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS} or an array of centroids, got {init!r}")
    else:
        try:
            init_arr = np.asarray(init, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"init must be one of {_INITS} or an array of centroids") from None
        if init_arr.ndim != 1 or init_arr.size == 0 or not np.isfinite(init_arr).all():
            raise ValueError("init array must be a non-empty 1-D array of finite centroids")
        n_free = int(np.count_nonzero(init_arr)) if preserve_zero else init_arr.size
        if n_free > k_free:
            raise ValueError(
                f"init array has {n_free} free centroids, more than {k_free} for k={k}"
            )
    if x.size == 0:
        raise ValueError("values is empty")

    flat = x.reshape(-1)
    wflat: np.ndarray | None = None
    if weights is not None:
        wt = _as_real_array(weights, "weights")
        if wt.shape != x.shape:
            raise ValueError(f"weights must have the shape of values {x.shape}, got {wt.shape}")
        wflat = wt.reshape(-1)
        if not np.isfinite(wflat).all() or (wflat < 0).any():
            raise ValueError("weights must be finite and non-negative")
    u, w = _sorted_unique(flat, wflat)
    if not (np.isfinite(u[0]) and np.isfinite(u[-1])):  # sorted: -inf first, inf/NaN last
        raise ValueError("values contains non-finite entries (NaN or inf)")
    u64 = u.astype(np.float64)
    del u
    if max(-u64[0], u64[-1]) > _F32_MAX:
        raise ValueError("values exceed the float32 range")

    fit = u64 != 0.0 if preserve_zero else np.ones(u64.size, dtype=bool)
    fixed_vals = np.zeros(1) if preserve_zero else np.empty(0)
    iterations = 0
    if int(fit.sum()) <= k_free:
        centroids = np.concatenate((u64[fit], fixed_vals))
    else:
        fit &= w > 0
        if not fit.any():
            raise ValueError("weights are zero on every value to fit")
        fu, fw = (u64, w) if fit.all() else (u64[fit], w[fit])
        if fu.size <= k_free:
            centroids = np.concatenate((fu, fixed_vals))
        else:
            data = _Data(fu, fw)
            rng = np.random.default_rng(seed)
            start = init_arr if init_arr is not None else init
            c0, fixed_mask = _initial_centroids(data, start, k, preserve_zero, rng)
            centroids, iterations = _lloyd(data, c0, fixed_mask, k, max_iter, tol)
    return _finalize(x, u64, w, centroids, k, iterations)


def cluster_per_channel(
    w: np.ndarray, k: int, axis: int = 0, **kw: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Run :func:`kmeans_1d` independently on every slice of ``w`` along ``axis``.

    Returns ``(centroids, labels)``: ``centroids`` is float32 ``[C, k]`` (``C = w.shape[axis]``),
    each row ascending and padded to ``k`` with its last centroid when a channel needs fewer;
    ``labels`` has the shape of ``w`` and indexes its channel's row. ``kw`` is forwarded to
    :func:`kmeans_1d` (a ``weights`` array must have the shape of ``w`` and is sliced the
    same way); every channel uses the same ``seed``, so a channel's result does not depend
    on its position. Refuses (ValueError): a 0-d ``w``, an out-of-range ``axis``, no
    channels, and everything :func:`kmeans_1d` refuses.
    """
    arr = np.asarray(w)
    if arr.ndim == 0:
        raise ValueError("w must have at least one dimension")
    axis = _check_int(axis, "axis", -arr.ndim, arr.ndim - 1) % arr.ndim
    k = _check_int(k, "k", 1, MAX_K)
    if arr.shape[axis] == 0:
        raise ValueError(f"w has no channels along axis {axis}")
    weights = kw.pop("weights", None)
    moved = np.moveaxis(arr, axis, 0)
    moved_w = None
    if weights is not None:
        wt = np.asarray(weights)
        if wt.shape != arr.shape:
            raise ValueError(f"weights must have the shape of w {arr.shape}, got {wt.shape}")
        moved_w = np.moveaxis(wt, axis, 0)
    n_ch = moved.shape[0]
    centroids = np.empty((n_ch, k), dtype=np.float32)
    labels = np.empty(moved.shape, dtype=_label_dtype(k))
    for ch in range(n_ch):
        res = kmeans_1d(moved[ch], k, weights=None if moved_w is None else moved_w[ch], **kw)
        n = res.centroids.size
        centroids[ch, :n] = res.centroids
        centroids[ch, n:] = res.centroids[-1]
        labels[ch] = res.labels
    return centroids, np.ascontiguousarray(np.moveaxis(labels, 0, axis))


def cluster_channel_scaled(
    w: np.ndarray, k: int, axis: int = 0, **kw: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One codebook shared by all channels of ``w`` along ``axis``, one scale per channel.

    See "Channel-scaled codebook" in the module docstring. Returns ``(centroids, labels,
    scales)``: ``centroids`` float32 ``[<= k]`` ascending, ``labels`` of the shape of ``w``,
    ``scales`` float32 ``[C]``; the reconstruction is
    ``scales[c] * centroids[labels]`` along ``axis`` (both factors float32, so it is bit-exactly
    what a float32 ``Mul`` computes). ``kw`` is forwarded to :func:`kmeans_1d` (``weights`` is
    refused: the normalisation already sets the weighting). Refuses (ValueError) what
    :func:`cluster_per_channel` refuses.
    """
    arr = np.asarray(w)
    if arr.ndim == 0:
        raise ValueError("w must have at least one dimension")
    if "weights" in kw:
        raise ValueError("cluster_channel_scaled takes no weights")
    axis = _check_int(axis, "axis", -arr.ndim, arr.ndim - 1) % arr.ndim
    if arr.shape[axis] == 0:
        raise ValueError(f"w has no channels along axis {axis}")
    rows = np.moveaxis(_as_real_array(arr, "w"), axis, 0).reshape(arr.shape[axis], -1).astype(np.float64)
    peak = np.abs(rows).max(axis=1)
    peak[peak == 0] = 1.0
    result = kmeans_1d(rows / peak[:, None], k, **kw)
    q = result.centroids.astype(np.float64)[result.labels]
    energy = np.einsum("ij,ij->i", q, q)
    fitted = np.einsum("ij,ij->i", rows, q) / np.where(energy > 0, energy, 1.0)
    scales = np.where(energy > 0, fitted, peak).astype(np.float32)
    labels = np.moveaxis(result.labels.reshape(np.moveaxis(arr, axis, 0).shape), 0, axis)
    return result.centroids, np.ascontiguousarray(labels), scales


# ----------------------------------------------------------------------------- entropy coding


def _positive_counts(counts: Any) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.dtype.kind not in "iuf" or arr.ndim != 1:
        raise ValueError(f"counts must be a 1-D real array, got dtype {arr.dtype} ndim {arr.ndim}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("counts must be finite and non-negative")
    pos = arr[arr > 0]
    if pos.size == 0:
        raise ValueError("counts must contain at least one positive entry")
    return pos


def huffman_bits_per_symbol(counts: np.ndarray) -> float:
    """Average code length (bits/symbol) of an optimal Huffman code for the histogram ``counts``.

    Zero counts are ignored. A single used symbol costs 1 bit by convention (a real stream
    still emits one bit per symbol). Refuses (ValueError): non-1-D or non-real ``counts``,
    negative or non-finite entries, no positive entry.
    """
    pos = _positive_counts(counts)
    if pos.size == 1:
        return 1.0
    heap = pos.tolist()  # Python ints stay exact for integer histograms
    heapq.heapify(heap)
    total_internal = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total_internal += merged
        heapq.heappush(heap, merged)
    return float(total_internal / heap[0])


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy (bits/symbol) of the histogram ``counts``; zero counts are ignored.

    Refuses the same inputs as :func:`huffman_bits_per_symbol`.
    """
    pos = _positive_counts(counts).astype(np.float64)
    p = pos / pos.sum()
    return float(max(-np.sum(p * np.log2(p)), 0.0))


# ----------------------------------------------------------------------------- index packing


def _check_bits(bits: Any) -> int:
    if isinstance(bits, (bool, np.bool_)):
        raise ValueError(f"bits must be one of {_PACK_BITS}, got {bits!r}")
    try:
        ibits = operator.index(bits)
    except TypeError:
        raise ValueError(f"bits must be one of {_PACK_BITS}, got {bits!r}") from None
    if ibits not in _PACK_BITS:
        raise ValueError(f"bits must be one of {_PACK_BITS}, got {ibits}")
    return ibits


def pack_indices(labels: np.ndarray, bits: int) -> np.ndarray:
    """Pack the flattened (C order) integer ``labels`` into a 1-D uint8 array, ``bits`` each.

    ``bits`` in {1, 2, 4}: ``8 // bits`` indices per byte, lowest bits first (ONNX uint4 /
    uint2 layout), zero-padded tail; 8: one byte each; 16: little-endian uint16. Output
    length is ``ceil(n * bits / 8)``. Refuses (ValueError): other ``bits``, non-integer
    ``labels``, labels outside ``[0, 2**bits - 1]``.
    """
    bits = _check_bits(bits)
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(
                f"labels must lie in [0, {(1 << bits) - 1}] for bits={bits}, got range [{lo}, {hi}]"
            )
    if bits == 16:
        return flat.astype("<u2").view(np.uint8)
    if bits == 8:
        return flat.astype(np.uint8)
    per = 8 // bits
    nbytes = -(-flat.size // per)
    padded = np.zeros(nbytes * per, dtype=np.uint8)
    padded[: flat.size] = flat
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(nbytes, per) << shifts, axis=1).astype(np.uint8)


def unpack_indices(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: the first ``n`` indices as a 1-D array.

    Returns uint8 for ``bits <= 8`` and uint16 for ``bits == 16``. Refuses (ValueError):
    other ``bits``, negative ``n``, ``packed`` that is not a 1-D uint8 array of exactly
    ``ceil(n * bits / 8)`` bytes.
    """
    bits = _check_bits(bits)
    n = _check_int(n, "n", 0)
    arr = np.asarray(packed)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"packed must be a 1-D uint8 array, got dtype {arr.dtype} ndim {arr.ndim}")
    expected = -(-n * bits // 8)
    if arr.size != expected:
        raise ValueError(f"packed has {arr.size} bytes, expected {expected} for n={n}, bits={bits}")
    if bits == 16:
        return arr.view("<u2").astype(np.uint16)
    if bits == 8:
        return arr.copy()
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    out = (arr[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return out.reshape(-1)[:n].copy()
