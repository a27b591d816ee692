r"""Vector (d-dimensional) codebooks for weight sharing: GPTVQ-style (van Baalen et al., 2024).

A weight ``W`` seen as ``[n, k]`` (one row per output channel, columns in the order of the layer's
input features, :func:`onnxcomp.cluster.passes._rows_layout`) is cut into vectors of ``d``
consecutive columns of a row; one codebook ``C`` of ``K`` entries ``[K, d]`` per tensor and, with
channel scales, one scale ``s_r`` per row give :math:`\hat W_{r, jd:(j+1)d} = s_r C[\ell_{rj}]`.
At ``b`` bits per weight the codebook has ``K = 2^{bd}`` entries (64 pairs at 3 bits, 256 at 4)
and the label of each vector takes ``bd`` bits: the same bytes as ``b``-bit scalar labels, but
the entries can follow the joint distribution of neighbouring weights, and the cells tile the
plane better than a product of two scalar grids.

Three steps, as GPTVQ takes them:

1. The codebook: k-means in ``d`` dimensions (:func:`kmeans_vectors`) on the rows normalised to a
   peak of 1 (with channel scales), each vector weighted by its row's peak squared, so the fit
   minimises the weight error in the weight's own units. GPTVQ also weights each coordinate by
   the Hessian's diagonal ``H_jj``; on PP-OCR rec that let a few high-energy input channels take
   the codebook (squeeze-excitation convs, whose inputs are pooled vectors) and was left out.
2. The assignment: nearest entry, or with calibration data GPTQ over blocks of ``d`` columns
   (:func:`onnxcomp.quant.gptq.gptq_snap_blocks`): each block's entry is chosen under the metric
   of the inverse Hessian's block (the exact output-error increase), and its error is pushed onto
   the columns not yet chosen (:func:`assign_compensated`).
3. Channel scales are the least-squares fit of each row to its nearest entries, before the
   assignment; the codebook is rounded to int8 (one scale per tensor) before the assignment too,
   so the compensation sees what is stored.

This module holds the numerics only (arrays in, arrays out); which tensors take vectors and how
they are stored is :mod:`onnxcomp.cluster.passes`'.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans_vectors", "nearest_vectors", "assign_compensated"]

#: Points a k-means fit sees at most (a seeded sample of the tensor's vectors); every vector is
#: then assigned to the fitted entries.
FIT_SAMPLE = 65536
#: Rows of the distance matrix computed at once.
_CHUNK = 16384


def nearest_vectors(points: np.ndarray, centroids: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest entry of ``centroids`` ``[K, d]`` for every row of ``points`` ``[m, d]``,
    under ``sum_t weights_t (p_t - c_t)^2`` (``weights`` ``[m, d]``, all 1 when None); ties go to
    the lower index."""
    p = np.asarray(points, np.float64)
    c = np.asarray(centroids, np.float64)
    out = np.empty(p.shape[0], np.int64)
    c2 = c * c
    for a in range(0, p.shape[0], _CHUNK):
        pp = p[a:a + _CHUNK]
        ww = np.ones_like(pp) if weights is None else np.asarray(weights[a:a + _CHUNK], np.float64)
        dist = ww @ c2.T - 2.0 * (ww * pp) @ c.T  # + sum w p^2, the same for every entry
        out[a:a + _CHUNK] = np.argmin(dist, axis=1)
    return out


def _weighted_distance(p: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``sum_t w_t (p_t - c_t)^2`` of each point to ``c``: one entry ``[d]``, or one per point ``[m, d]``."""
    return np.sum(w * (p - c) ** 2, axis=1)


def kmeans_vectors(points: np.ndarray, k: int, *, weights: np.ndarray | None = None, seed: int = 0,
                   max_iter: int = 30, sample: int = FIT_SAMPLE) -> np.ndarray:
    """At most ``k`` entries ``[K, d]`` (float64) for ``points`` ``[m, d]``: weighted k-means
    (Lloyd; ``weights`` ``[m, d]`` per coordinate, all 1 when None) from a k-means++ start, on a
    seeded sample of at most ``sample`` points. An entry left without points is moved to the
    point that costs most. Fewer distinct points than ``k`` give those points."""
    p = np.asarray(points, np.float64)
    m, d = p.shape
    w = np.ones_like(p) if weights is None else np.asarray(weights, np.float64)
    w = np.maximum(w, 0.0) + 1e-30
    rng = np.random.default_rng(seed)
    if m > sample:
        pick = rng.choice(m, sample, replace=False)
        p, w = p[pick], w[pick]
        m = sample
    distinct = np.unique(p, axis=0)
    if distinct.shape[0] <= k:
        return distinct
    mass = w.sum(axis=1)
    # k-means++ (D^2 sampling, each point weighted by its importance)
    centroids = np.empty((k, d))
    centroids[0] = p[rng.choice(m, p=mass / mass.sum())]
    best = _weighted_distance(p, w, centroids[0])
    for i in range(1, k):
        prob = mass * best
        total = prob.sum()
        j = rng.choice(m, p=prob / total) if total > 0 else int(rng.integers(m))
        centroids[i] = p[j]
        best = np.minimum(best, _weighted_distance(p, w, centroids[i]))
    previous = None
    for _ in range(max_iter):
        labels = nearest_vectors(p, centroids, w)
        if previous is not None and np.array_equal(labels, previous):
            break
        previous = labels
        num = np.stack([np.bincount(labels, weights=w[:, t] * p[:, t], minlength=k) for t in range(d)], axis=1)
        den = np.stack([np.bincount(labels, weights=w[:, t], minlength=k) for t in range(d)], axis=1)
        filled = den.min(axis=1) > 1e-30
        centroids[filled] = num[filled] / den[filled]
        empty = np.flatnonzero(~filled)
        if empty.size:  # re-seed at the points that cost most
            cost = _weighted_distance(p, w, centroids[labels])
            worst = np.argsort(-cost, kind="stable")[: empty.size]
            centroids[empty] = p[worst]
            previous = None
    return centroids


def assign_compensated(w_nk: np.ndarray, table: np.ndarray, scales: np.ndarray, h: np.ndarray,
                       d: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Labels ``[n, k / d]`` and the chosen weights ``[n, k]`` for ``W ~ s_r C[labels]`` by GPTQ over
    blocks of ``d`` columns (:func:`onnxcomp.quant.gptq.gptq_snap_blocks`) on the Hessians ``h``
    ``[groups, k, k]`` (rows in ``groups`` equal parts, as a grouped Conv's); ``table`` is
    ``C`` ``[K, d]``, ``scales`` ``s`` ``[n]``. None when a Hessian cannot be factored."""
    from onnxcomp.blas import blas_threads
    from onnxcomp.quant.gptq import gptq_snap_blocks

    n, k = w_nk.shape
    groups = h.shape[0]
    rows = n // groups
    c = np.asarray(table, np.float64)
    s = np.asarray(scales, np.float64)
    safe = np.where(s != 0, s, 1.0)
    labels = np.zeros((n, k // d), np.int64)
    out = np.zeros((n, k))
    for g in range(groups):
        part = slice(g * rows, (g + 1) * rows)
        sg, safe_g = s[part], safe[part]

        def snap(cols: np.ndarray, j: int, metric: np.ndarray, part=part, sg=sg, safe_g=safe_g) -> np.ndarray:
            y = (cols / safe_g[:, None]) @ metric  # the row's scale out, then the output metric
            ct = c @ metric
            idx = np.argmin((ct * ct).sum(axis=1)[None, :] - 2.0 * y @ ct.T, axis=1)
            labels[part, j // d] = idx
            return sg[:, None] * c[idx]

        with blas_threads(1):
            got = gptq_snap_blocks(w_nk[part], h[g], snap, d)
        if got is None:
            return None
        out[part] = got
    return labels, out


#: :func:`refit_vectors` skips a tensor whose ``n k^2`` (the Hessian terms its system sums) exceeds this.
REFIT_MAX_TERMS = 300_000_000
#: Rows of :func:`refit_vectors`' scatter computed at once, as ``rows x k x k`` terms.
_REFIT_CHUNK_TERMS = 1 << 22


def refit_vectors(w_nk: np.ndarray, table: np.ndarray, labels: np.ndarray, scales: np.ndarray,
                  h: np.ndarray) -> np.ndarray | None:
    """The codebook ``[K, d]`` that minimises the output error ``sum_g tr(dW H_g dW^T)`` of
    ``W ~ s_r C[labels]`` with the labels ``[n, k / d]`` and scales ``[n]`` fixed (GPTVQ's codebook
    update): the normal equations ``A c = b`` with ``A = sum_r s_r^2 P_r^T H P_r`` and
    ``b = sum_r s_r P_r^T H w_r`` (``P_r`` maps the codebook's coordinates to row ``r``'s weights),
    with a small pull towards ``table`` so entries no weight uses stay. None when the system is too
    large (:data:`REFIT_MAX_TERMS`) or singular."""
    n, k = w_nk.shape
    entries, d = table.shape
    size = entries * d
    if n * k * k > REFIT_MAX_TERMS:
        return None
    groups = h.shape[0]
    rows = n // groups
    idx = (np.asarray(labels, np.int64)[:, :, None] * d + np.arange(d)).reshape(n, k)
    s = np.asarray(scales, np.float64)
    a = np.zeros(size * size)
    b = np.zeros(size)
    step = max(1, _REFIT_CHUNK_TERMS // (k * k))
    for g in range(groups):
        hg = np.asarray(h[g], np.float64)
        part = slice(g * rows, (g + 1) * rows)
        wh = np.asarray(w_nk[part], np.float64) @ hg
        b += np.bincount(idx[part].reshape(-1), weights=(s[part, None] * wh).reshape(-1), minlength=size)
        for r0 in range(g * rows, (g + 1) * rows, step):
            r1 = min(r0 + step, (g + 1) * rows)
            pairs = idx[r0:r1, :, None] * size + idx[r0:r1, None, :]
            a += np.bincount(pairs.reshape(-1), weights=((s[r0:r1] ** 2)[:, None, None] * hg[None]).reshape(-1),
                             minlength=size * size)
    a = a.reshape(size, size)
    lam = 1e-6 * max(float(np.trace(a)) / size, 1e-30)
    try:
        c = np.linalg.solve(a + lam * np.eye(size), b + lam * np.asarray(table, np.float64).reshape(-1))
    except np.linalg.LinAlgError:
        return None
    return c.reshape(entries, d) if np.all(np.isfinite(c)) else None
