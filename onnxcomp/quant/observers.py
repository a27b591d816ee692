r"""Streaming range observers for static-quantization calibration.

An observer is fed batches of one activation tensor with :meth:`update`
(shapes may vary between batches) and finally reports a real range with
:meth:`compute_range`.  Batches are never stored: every observer keeps
``O(bins)`` numbers whatever the number and size of the batches.  Observers of
the same kind and configuration can be combined with :meth:`merge` (e.g. one
per worker process), giving the same statistics as one observer fed all the
data.  NaN or Inf in a batch is refused (ValueError): calibration data with
non-finite values is a user error, and silently skipping it would bias ranges.

All observers track the exact running ``min`` and ``max``; the ranges they
return always lie within ``[min, max]``.

Histogram on a power-of-two lattice
-----------------------------------
Histogram-based observers count values in ``bins`` bins of width
``w = 2^e`` (``e`` an integer), aligned to the global lattice of multiples of
``w``: lattice cell ``c`` is ``[c w, (c + 1) w)`` and a value ``v`` falls in
cell ``floor(v / 2^e)`` -- an exact computation in binary floating point.  The
histogram stores the counts of the ``bins`` consecutive cells
``offset, ..., offset + bins - 1``.

The exponent is the smallest one that lets a window of ``bins`` cells cover
``[min(0, lo), max(0, hi)]`` (``lo``/``hi`` the extreme values seen; zero is
always covered because quantization ranges always contain zero), and at least
``E(max|v|) - 53`` where ``max|v| < 2^E`` (so cell indices stay exact
integers below ``2^53``).

When a batch falls outside the window (or needs a larger exponent), the range
*grows*: the exponent increases by ``d >= 0`` to the smallest value satisfying
the rule above for the union of old and new data, and each old count moves to
cell ``c >> d`` (``floor(c / 2^d)``).  Because lattices of widths ``2^e`` and
``2^(e+d)`` nest, every old bin lies entirely inside one new bin, so this
re-binning is *exact* (no proportional splitting, no approximation) and the
total count is preserved.  Merging two histograms does the same with the larger
of the two exponents.  Since the rule depends only on the extremes of all data
seen and is monotone in them, the final histogram (as counts per lattice cell)
is identical whether the data arrive in one batch, in many batches in any
order, or split over observers that are merged.  At most a factor 2 of
resolution is lost to the power-of-two width: unless the precision floor
decides the exponent (a span below about ``bins * 2^-53 * max|v|``, e.g.
constant data), ``[min(0, lo), max(0, hi)]`` spans between ``bins / 2`` and ``bins``
cells.

Percentile
----------
With ``N`` values and cumulative counts ``C_j``, the ``p``-th percentile is
located at rank ``r = p N / 100``: the first bin ``j`` with ``C_j >= r``, and
linearly within it, ``t = edge_j + w (r - C_{j-1}) / count_j`` (values are
taken as uniform inside a bin), so the estimate is within one bin width of the
exact percentile.  Symmetric mode histograms ``|x|`` and returns
``[max(min, -t), min(max, t)]``; asymmetric mode histograms ``x`` and uses the
``(100 - p)``-th and ``p``-th percentiles.

Entropy (KL-divergence) calibration
-----------------------------------
On the histogram ``h_0 .. h_{n-1}`` of ``|x|`` over ``[0, n w)``, every
candidate threshold ``T_i = i w``, ``i = m .. n`` (``m`` = number of quantized
levels on the magnitude axis: ``2^(b-1)`` for signed ``b``-bit types, ``2^b``
for unsigned ones) is scored by ``KL(P_i || Q_i)``:

* ``P_i`` is ``h_0 .. h_{i-1}`` with the clipped mass ``sum_{k >= i} h_k``
  added to the last bin, normalised;
* ``Q_i`` merges ``h_0 .. h_{i-1}`` into ``m`` contiguous groups (group ``g``
  is bins ``floor(g i / m) .. floor((g + 1) i / m) - 1``) and spreads each
  group's count uniformly over the group's non-empty bins (empty bins stay
  empty), normalised;
* ``KL(P || Q) = sum_{P_k > 0} P_k log(P_k / Q_k)``, with ``Q_k`` replaced by
  ``1e-10`` where it is 0 but ``P_k`` is not (the clipped mass can land in an
  empty bin).

The threshold with the smallest divergence (the largest one on ties) gives
``[max(min, -T), min(max, T)]``.  KL is estimated from counts, so the
histogram must hold enough values per bin: while it holds fewer than 32 per
bin, adjacent pairs of cells are merged (exact on the lattice).  With
``n <= m`` bins left there is nothing to choose and ``[min, max]`` is
returned.  Without this, a tensor of a few thousand values (a
squeeze-and-excitation vector) has a KL curve made of sampling noise whose
minimum can clip a channel that is large on every input.

MSE calibration
---------------
On the histogram of ``x`` (bin centres ``c_j`` clamped to ``[min, max]``,
counts ``h_j``), a candidate range ``[a, b]`` is turned into the scale ``s``
and zero point ``z`` that :func:`~onnxcomp.quant.primitives.compute_scale_zero_point`
would produce, whose representable interval is
``R = [(qmin - z) s, (qmax - z) s]``.  Its expected squared error is

``E(a, b) = sum_j h_j * (s^2 / 12  if c_j in R  else  (c_j - clip(c_j, R))^2)``

-- the uniform-quantization error model (rounding error uniform on
``[-s/2, s/2]``, variance ``s^2 / 12``) for values inside the range and the
squared clipping distance for values outside.  Candidates shrink the full
range ``[L, H] = [min(min, 0), max(max, 0)]``: ``[alpha L, beta H]`` with
``alpha, beta`` on the grid ``k / K``, ``k = 1 .. K``.  Symmetric mode searches
``alpha = beta``; asymmetric mode does two rounds of coordinate descent (best
``beta`` for the current ``alpha``, then best ``alpha`` for that ``beta``,
starting from ``alpha = 1``).  Ties go to the wider range.  The model
charges ``s^2 / 12`` even to values that quantize exactly (e.g. ReLU zeros),
which slightly favours narrower ranges when such values dominate.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

from onnxcomp.quant.primitives import QDType, compute_scale_zero_point, qdtype_info, qrange

__all__ = [
    "Observer",
    "MinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "OBSERVER_METHODS",
    "make_observer",
]

_EXP_FLOOR = -1000  # bin width never below 2**-1000 (a normal float64)
_KL_EPS = 1e-10
_KL_MIN_PER_BIN = 32  # values per histogram bin below which KL is sampling noise (see _sparse_merge)


def _check_batch(x: Any) -> np.ndarray | None:
    """Validate one batch; return it as an array (``None`` when empty)."""
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"x must be a real numeric array, got dtype {a.dtype}")
    if a.size == 0:
        return None
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        n_nan = int(np.isnan(a).sum())
        n_inf = int(np.isinf(a).sum())
        raise ValueError(
            f"x contains non-finite values ({n_nan} NaN, {n_inf} Inf); calibration data must be finite"
        )
    return a


def _cell(v: float, exp: int) -> int:
    """Lattice cell ``floor(v / 2**exp)`` of a scalar."""
    return math.floor(math.ldexp(v, -exp))


def _exp_floor_for(maxabs: float) -> int:
    if maxabs == 0.0:
        return _EXP_FLOOR
    return max(_EXP_FLOOR, math.frexp(maxabs)[1] - 53)


def _fit_exp(lo: float, hi: float, bins: int, start: int) -> int:
    """Smallest exponent >= start (and >= the precision floor) whose window fits [lo, hi]."""
    e = max(start, _exp_floor_for(max(-lo, hi)))
    per_bin = (hi - lo) / bins
    if per_bin > 0.0:
        e = max(e, math.frexp(per_bin)[1] - 1)
    while _cell(hi, e) - _cell(lo, e) + 1 > bins:
        e += 1
    return e


class _LatticeHistogram:
    """Fixed-size histogram on the power-of-two lattice (see module docstring)."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.exp: int | None = None
        self.offset = 0
        self.counts = np.zeros(bins, dtype=np.int64)
        self.lo = 0.0  # min(0, smallest value seen)
        self.hi = 0.0  # max(0, largest value seen)
        self.total = 0

    def _ensure(self, lo: float, hi: float, start: int) -> None:
        e = _fit_exp(lo, hi, self.bins, start)
        c_lo, c_hi = _cell(lo, e), _cell(hi, e)
        self.lo, self.hi = lo, hi
        if self.exp == e and c_lo >= self.offset and c_hi < self.offset + self.bins:
            return
        new_offset = c_lo - (self.bins - (c_hi - c_lo + 1)) // 2
        new_counts = np.zeros(self.bins, dtype=np.int64)
        if self.exp is not None and self.total:
            self._add_shifted(new_counts, new_offset, e, self.counts, self.offset, self.exp)
        self.exp, self.offset, self.counts = e, new_offset, new_counts

    @staticmethod
    def _add_shifted(
        dst: np.ndarray, dst_offset: int, dst_exp: int, src: np.ndarray, src_offset: int, src_exp: int
    ) -> None:
        nz = np.flatnonzero(src)
        if nz.size == 0:
            return
        shift = min(dst_exp - src_exp, 62)
        cells = (nz.astype(np.int64) + np.int64(src_offset)) >> np.int64(shift)
        np.add.at(dst, cells - np.int64(dst_offset), src[nz])

    def add(self, v: np.ndarray) -> None:
        v = np.asarray(v, dtype=np.float64).ravel()
        if v.size == 0:
            return
        lo = min(self.lo, float(v.min()))
        hi = max(self.hi, float(v.max()))
        self._ensure(lo, hi, _EXP_FLOOR if self.exp is None else self.exp)
        assert self.exp is not None
        idx = np.floor(np.ldexp(v, -self.exp)) - self.offset
        # The clip only guards against float64 underflow corner cases.
        idx = np.clip(idx, 0, self.bins - 1).astype(np.int64)
        self.counts += np.bincount(idx, minlength=self.bins)
        self.total += int(v.size)

    def merge(self, other: _LatticeHistogram) -> None:
        if other.exp is None:
            return
        start = other.exp if self.exp is None else max(self.exp, other.exp)
        self._ensure(min(self.lo, other.lo), max(self.hi, other.hi), start)
        assert self.exp is not None
        self._add_shifted(self.counts, self.offset, self.exp, other.counts, other.offset, other.exp)
        self.total += other.total

    @property
    def width(self) -> float:
        assert self.exp is not None
        return math.ldexp(1.0, self.exp)

    def edges(self) -> np.ndarray:
        assert self.exp is not None
        return np.ldexp(np.arange(self.offset, self.offset + self.bins + 1, dtype=np.float64), self.exp)

    def cells(self, first: int, last: int) -> np.ndarray:
        """Counts of lattice cells ``first .. last`` (zeros outside the window)."""
        out = np.zeros(last - first + 1, dtype=np.int64)
        a = max(first, self.offset)
        b = min(last, self.offset + self.bins - 1)
        if a <= b:
            out[a - first : b - first + 1] = self.counts[a - self.offset : b - self.offset + 1]
        return out

    def quantile(self, fraction: float) -> float:
        """Value below which ``fraction`` of the counts lie (linear inside a bin)."""
        rank = fraction * self.total
        cdf = np.cumsum(self.counts)
        edges = self.edges()
        nz = np.flatnonzero(self.counts)
        if rank <= 0.0:
            return float(edges[nz[0]])
        j = int(np.searchsorted(cdf, rank, side="left"))
        j = min(j, int(nz[-1]))
        before = float(cdf[j - 1]) if j > 0 else 0.0
        frac = min(max((rank - before) / float(self.counts[j]), 0.0), 1.0)
        return float(edges[j] + frac * self.width)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class Observer:
    """Base class: validates batches and tracks the exact running min, max and count.

    Subclasses implement :meth:`compute_range`.  :meth:`update` refuses
    non-numeric arrays and non-finite values (ValueError) and ignores empty
    batches; :meth:`compute_range` refuses to run before any value was seen;
    :meth:`merge` refuses observers of another class or configuration.
    """

    def __init__(self) -> None:
        self._min = math.inf
        self._max = -math.inf
        self._count = 0

    # -- configuration -----------------------------------------------------
    def _config(self) -> tuple[Any, ...]:
        return ()

    # -- public API --------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of values observed so far."""
        return self._count

    @property
    def min(self) -> float:
        """Exact minimum of all observed values (``inf`` before any update)."""
        return self._min

    @property
    def max(self) -> float:
        """Exact maximum of all observed values (``-inf`` before any update)."""
        return self._max

    def update(self, x: np.ndarray) -> None:
        """Fold one batch (any shape) into the statistics; the batch is not kept."""
        a = _check_batch(x)
        if a is None:
            return
        self._min = min(self._min, float(a.min()))
        self._max = max(self._max, float(a.max()))
        self._count += int(a.size)
        self._update(a)

    def _update(self, a: np.ndarray) -> None:
        pass

    def compute_range(self) -> tuple[float, float]:
        """Return ``(rmin, rmax)`` with ``min <= rmin <= rmax <= max``."""
        raise NotImplementedError

    def merge(self, other: Observer) -> Observer:
        """Fold another observer's statistics into this one (in place); return ``self``.

        Refuses (ValueError) an observer of a different class or configuration.
        ``other`` is left unchanged.
        """
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other._config() != self._config():
            raise ValueError(
                f"cannot merge {type(self).__name__} with configuration {other._config()} "
                f"into one with configuration {self._config()}"
            )
        if other._count:
            self._min = min(self._min, other._min)
            self._max = max(self._max, other._max)
            self._count += other._count
            self._merge(other)
        return self

    def _merge(self, other: Any) -> None:
        pass

    def _require_data(self) -> None:
        if self._count == 0:
            raise ValueError(f"{type(self).__name__}.compute_range() called before any data was observed")


class MinMaxObserver(Observer):
    """Running minimum and maximum; :meth:`compute_range` returns them exactly.

    Merging is exact.  Refuses what :class:`Observer` refuses.
    """

    def compute_range(self) -> tuple[float, float]:
        """Return the exact ``(min, max)`` of all observed values."""
        self._require_data()
        return self._min, self._max


class HistogramObserver(Observer):
    """Histogram of the observed values on a growing power-of-two lattice.

    Keeps ``bins`` int64 counts plus the exact min/max; the histogram grows
    exactly when new data fall outside it (module docstring).  The base class
    returns the exact ``(min, max)``; subclasses choose narrower ranges from
    the histogram.  Refuses ``bins < 2`` (ValueError) and what
    :class:`Observer` refuses.
    """

    _magnitude = False  # histogram |x| instead of x

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = _check_int(bins, "bins", 2)
        self._hist = _LatticeHistogram(self.bins)

    def _config(self) -> tuple[Any, ...]:
        return (self.bins, self._magnitude)

    def _update(self, a: np.ndarray) -> None:
        v = a.astype(np.float64, copy=False)
        self._hist.add(np.abs(v) if self._magnitude else v)

    def _merge(self, other: Any) -> None:
        self._hist.merge(other._hist)

    @property
    def bin_width(self) -> float:
        """Current bin width (a power of two); refuses (ValueError) before any data."""
        self._require_data()
        return self._hist.width

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(counts, edges)`` from the first to the last non-empty bin.

        ``counts`` is int64 with ``len(edges) - 1`` entries; the histogram is of
        ``|x|`` for magnitude-based observers.  Refuses (ValueError) before
        any data.
        """
        self._require_data()
        counts = self._hist.counts
        nz = np.flatnonzero(counts)
        i0, i1 = int(nz[0]), int(nz[-1])
        return counts[i0 : i1 + 1].copy(), self._hist.edges()[i0 : i1 + 2]

    def compute_range(self) -> tuple[float, float]:
        """Return the exact ``(min, max)`` of all observed values."""
        self._require_data()
        return self._min, self._max

    def _clip_to_data(self, lo: float, hi: float) -> tuple[float, float]:
        lo = min(max(lo, self._min), self._max)
        hi = min(max(hi, self._min), self._max)
        return (lo, hi) if lo <= hi else (hi, lo)


class PercentileObserver(HistogramObserver):
    """Range from histogram percentiles (clips the rarest ``100 - percentile`` %).

    ``symmetric=True`` histograms ``|x|`` and returns ``[-t, t]`` (intersected
    with ``[min, max]``) for ``t`` the ``percentile``-th percentile of ``|x|``;
    otherwise each tail is cut at its own percentile.  Refuses (ValueError)
    ``percentile`` outside ``(50, 100]`` and what :class:`HistogramObserver`
    refuses.
    """

    def __init__(self, percentile: float = 99.999, bins: int = 2048, symmetric: bool = False) -> None:
        p = float(percentile)
        if not 50.0 < p <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = p
        self.symmetric = bool(symmetric)
        self._magnitude = self.symmetric
        super().__init__(bins)

    def _config(self) -> tuple[Any, ...]:
        return (self.bins, self._magnitude, self.percentile)

    def compute_range(self) -> tuple[float, float]:
        """Return the percentile range, within ``[min, max]``."""
        self._require_data()
        frac = self.percentile / 100.0
        if self.symmetric:
            t = self._hist.quantile(frac)
            return self._clip_to_data(-t, t)
        return self._clip_to_data(self._hist.quantile(1.0 - frac), self._hist.quantile(frac))


def _kl_divergences(h: np.ndarray, m: int) -> np.ndarray:
    """KL(P_i || Q_i) for thresholds i = m .. len(h) (module docstring), all at once.

    Per group ``g`` of threshold ``i`` with count ``S_g``, non-empty bins ``n_g`` and
    ``A_g = sum h_k log h_k``, the bins below the last one contribute
    ``(A_g - S_g log(T S_g / (n_g N_i))) / T`` (``T`` all values, ``N_i`` those below the
    threshold); the last bin, which also receives the clipped mass, is then corrected.  Group sums
    come from prefix sums, so no threshold costs more than ``O(m)``.
    """
    n = h.size
    hf = h.astype(np.float64)
    total = float(hf.sum())
    zero = np.zeros(1)
    c_h = np.concatenate([zero, np.cumsum(hf)])
    c_hl = np.concatenate([zero, np.cumsum(np.where(hf > 0, hf * np.log(np.where(hf > 0, hf, 1.0)), 0.0))])
    c_nz = np.concatenate([zero, np.cumsum(hf > 0)])
    i = np.arange(m, n + 1, dtype=np.int64)
    bounds = (np.arange(m + 1, dtype=np.int64)[None, :] * i[:, None]) // m  # [K, m + 1]
    s = np.diff(c_h[bounds], axis=1)
    nnz = np.diff(c_nz[bounds], axis=1)
    a = np.diff(c_hl[bounds], axis=1)
    below = c_h[i]  # N_i
    clipped = total - below
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = s > 0
        log_q = np.where(ok, np.log(np.where(ok, s, 1.0)) - np.log(np.maximum(nnz, 1.0)), 0.0)
        log_q -= np.log(np.maximum(below, 1.0))[:, None]  # log of Q's mass per non-empty bin
        terms = np.where(ok, a - s * (np.log(total) + log_q), 0.0)
        kl = terms.sum(axis=1) / total
        # the last bin: remove its plain term, add its term with the clipped mass
        last = hf[i - 1]
        lq = log_q[:, -1]
        p_last = (last + clipped) / total
        plain = np.where(last > 0, last / total * (np.log(np.where(last > 0, last, 1.0) / total) - lq), 0.0)
        q_last = np.where(last > 0, lq, np.log(_KL_EPS))
        with_clip = np.where(p_last > 0, p_last * (np.log(np.where(p_last > 0, p_last, 1.0)) - q_last), 0.0)
        kl = kl - plain + with_clip
    return np.where(below > 0, kl, np.inf)


def _sparse_merge(h: np.ndarray, width: float, m: int) -> tuple[np.ndarray, float]:
    """Merge pairs of adjacent cells until the histogram holds ``_KL_MIN_PER_BIN`` values per bin.

    KL is estimated from counts: on a histogram with fewer values than bins (a squeeze-and-
    excitation vector holds a few dozen values per sample) sampling noise dominates it, and the
    cost of smoothing that noise outweighs clipping a channel that is always large.  Cells of the
    power-of-two lattice nest, so merging pairs is exact.  Stops at ``m`` bins or fewer.
    """
    while h.size > m and h.sum() < _KL_MIN_PER_BIN * h.size:
        if h.size % 2:
            h = np.concatenate([h, np.zeros(1, dtype=h.dtype)])
        h = h.reshape(-1, 2).sum(axis=1)
        width *= 2.0
    return h, width


def entropy_threshold(h: np.ndarray, width: float, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(thresholds, kl)`` of the histogram ``h`` of ``|x|`` (bins of ``width`` from 0), ``m`` levels.

    Empty when, after :func:`_sparse_merge`, there are no more than ``m`` bins to choose from.
    """
    h, width = _sparse_merge(h, width, m)
    if h.size <= m:
        return np.zeros(0), np.zeros(0)
    kl = _kl_divergences(h, m)
    return np.arange(m, h.size + 1, dtype=np.float64) * width, kl


def best_threshold(thresholds: np.ndarray, kl: np.ndarray) -> float:
    """The threshold of smallest divergence (the largest one on ties)."""
    return float(thresholds[kl.size - 1 - int(np.argmin(kl[::-1]))])


class EntropyObserver(HistogramObserver):
    """KL-divergence (entropy) calibration of a symmetric clip threshold on ``|x|``.

    ``target_bins`` is the number of quantized levels on the magnitude axis;
    by default ``2^(b-1)`` for a signed ``b``-bit ``qdtype`` (128 for int8)
    and ``2^b`` for an unsigned one (256 for uint8).  Returns
    ``[max(min, -T), min(max, T)]`` for the threshold ``T`` of smallest
    divergence (module docstring).  Refuses (ValueError) ``target_bins < 2``
    or ``>= bins``, unsupported ``qdtype`` and what :class:`HistogramObserver`
    refuses.
    """

    _magnitude = True

    def __init__(self, bins: int = 2048, qdtype: str | QDType | Any = "int8", target_bins: int | None = None) -> None:
        info = qdtype_info(qdtype)
        self.qdtype = info.name
        if target_bins is None:
            target_bins = 2 ** (info.bits - 1) if info.signed else 2**info.bits
        self.target_bins = _check_int(target_bins, "target_bins", 2)
        super().__init__(bins)
        if self.target_bins >= self.bins:
            raise ValueError(f"target_bins={self.target_bins} must be smaller than bins={self.bins}")

    def _config(self) -> tuple[Any, ...]:
        return (self.bins, self.target_bins)

    def divergences(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(thresholds, kl)`` for every candidate threshold (may be empty).

        Refuses (ValueError) before any data.
        """
        self._require_data()
        maxabs = max(-self._min, self._max)
        if maxabs == 0.0:
            return np.zeros(0), np.zeros(0)
        hist = self._hist
        assert hist.exp is not None
        return entropy_threshold(hist.cells(0, _cell(maxabs, hist.exp)), hist.width, self.target_bins)

    def compute_range(self) -> tuple[float, float]:
        """Return the KL-optimal symmetric clip range, within ``[min, max]``."""
        thresholds, kl = self.divergences()
        if thresholds.size == 0:
            return self._min, self._max
        t = best_threshold(thresholds, kl)
        return self._clip_to_data(-t, t)


class MSEObserver(HistogramObserver):
    """Clip range minimising the expected squared quantization + clipping error.

    The error of each candidate range is estimated from the histogram with the
    uniform-quantization model for ``qdtype``/``symmetric``/``reduce_range``
    (module docstring), over ``num_candidates`` shrink factors per bound.
    Refuses (ValueError) ``num_candidates < 1``, unsupported ``qdtype``, data
    whose range no float32 scale can cover (in :meth:`compute_range`) and what
    :class:`HistogramObserver` refuses.
    """

    _ROUNDS = 2

    def __init__(
        self,
        bins: int = 2048,
        qdtype: str | QDType | Any = "int8",
        symmetric: bool = False,
        reduce_range: bool = False,
        num_candidates: int = 128,
    ) -> None:
        self.qdtype = qdtype_info(qdtype).name
        self.symmetric = bool(symmetric)
        self.reduce_range = bool(reduce_range)
        self.num_candidates = _check_int(num_candidates, "num_candidates", 1)
        super().__init__(bins)

    def _config(self) -> tuple[Any, ...]:
        return (self.bins, self.qdtype, self.symmetric, self.reduce_range, self.num_candidates)

    def expected_error(self, rmin: np.ndarray | float, rmax: np.ndarray | float) -> np.ndarray:
        """Expected total squared error of candidate range(s) ``[rmin, rmax]`` under the model.

        ``rmin``/``rmax`` broadcast; returns one value per candidate.  Refuses
        (ValueError) before any data and invalid ranges (as
        :func:`compute_scale_zero_point` does).
        """
        self._require_data()
        counts, edges = self.histogram()
        centres = np.clip(edges[:-1] + 0.5 * self._hist.width, self._min, self._max)
        keep = counts > 0
        h = counts[keep].astype(np.float64)
        c = centres[keep]
        scale, zp = compute_scale_zero_point(rmin, rmax, self.qdtype, self.symmetric, self.reduce_range)
        s = scale.astype(np.float64)[..., None]
        z = zp.astype(np.float64)[..., None]
        qmin, qmax = qrange(self.qdtype, self.symmetric, self.reduce_range)
        r_lo = (qmin - z) * s
        r_hi = (qmax - z) * s
        clipped = np.clip(c, r_lo, r_hi)
        err = np.where(clipped == c, s * s / 12.0, (c - clipped) ** 2)
        return (err * h).sum(axis=-1)

    def compute_range(self) -> tuple[float, float]:
        """Return the range of smallest expected error, within ``[min, max]``."""
        self._require_data()
        lo_full = min(self._min, 0.0)
        hi_full = max(self._max, 0.0)
        if lo_full == hi_full:
            return self._min, self._max
        k = self.num_candidates
        alphas = np.arange(1, k + 1, dtype=np.float64) / k

        def best(errors: np.ndarray) -> float:
            return float(alphas[k - 1 - int(np.argmin(errors[::-1]))])  # widest on ties

        if self.symmetric:
            t = best(self.expected_error(alphas * lo_full, alphas * hi_full)) * max(-lo_full, hi_full)
            return self._clip_to_data(-t, t)
        a_lo = a_hi = 1.0
        for _ in range(self._ROUNDS):
            a_hi = best(self.expected_error(np.full(k, a_lo * lo_full), alphas * hi_full))
            a_lo = best(self.expected_error(alphas * lo_full, np.full(k, a_hi * hi_full)))
        return self._clip_to_data(a_lo * lo_full, a_hi * hi_full)


#: Calibration methods understood by :func:`make_observer`.
OBSERVER_METHODS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(method: str, **kwargs: Any) -> Observer:
    """Create an observer by method name (``"minmax"``, ``"percentile"``, ``"entropy"``, ``"mse"``).

    ``kwargs`` go to the observer's constructor.  Refuses (ValueError) an
    unknown method (the message lists the valid ones) and keyword arguments the
    chosen observer does not accept (the message lists those it does).
    """
    key = method.lower() if isinstance(method, str) else method
    if key not in OBSERVER_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid methods: {sorted(OBSERVER_METHODS)}")
    cls = OBSERVER_METHODS[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} does not accept {unknown}; accepted arguments: {accepted}")
    return cls(**kwargs)
