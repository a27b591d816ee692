"""Summary statistics for latency measurements.

Everything here is pure numpy on sequences of per-run wall-clock times in
seconds; nothing touches onnxruntime or the clock.

Summary (:func:`summarize`)
    For times ``t_1 .. t_n``:

    * ``min``, ``mean = (1/n) * sum t_i``;
    * ``std`` is the *sample* standard deviation
      ``sqrt(sum (t_i - mean)^2 / (n - 1))`` (0.0 when ``n == 1``);
    * ``median``, ``p90``, ``p99`` use ``np.percentile(..., method="linear")``
      (numpy's default, Hyndman & Fan type 7): sort the times into
      ``x_0 <= .. <= x_{n-1}``, let ``h = (n - 1) * q / 100``, then
      ``P_q = x_floor(h) + (h - floor(h)) * (x_ceil(h) - x_floor(h))``;
    * ``throughput = 1 / mean`` runs per second and
      ``items_per_s = batch_size / mean``.  The mean (not the median) is
      used because throughput is total work over total time.

Ratio of medians with a bootstrap interval (:func:`ratio_ci`)
    ``R = median(b) / median(a)``; ``R < 1`` means ``b`` is faster than
    ``a``.  The interval is a percentile bootstrap: draw ``n_boot``
    resamples, compute ``R*_k = median(b*_k) / median(a*_k)``, and report
    the ``(1 - c)/2`` and ``(1 + c)/2`` quantiles of ``R*`` (linear
    interpolation) for confidence ``c``.

    The benchmark runner interleaves the models in rounds, so ``a[i]`` and
    ``b[i]`` were measured in the same round, back to back, on the same
    input.  Slow drift of the machine (frequency scaling, a noisy
    neighbour, thermal throttling) hits both members of a round alike.  When
    the two samples have equal length the bootstrap is therefore *paired*:
    it resamples round indices ``i`` and takes ``a[i]`` and ``b[i]``
    together, which keeps that shared component and gives an honest, usually
    tighter, interval.  With unequal lengths there is no pairing to keep and
    ``a`` and ``b`` are resampled independently.  ``paired=`` overrides the
    automatic choice.

Interleaved schedule (:func:`interleaved_schedule`)
    ``n_rounds`` rounds, each containing every model index exactly once.
    Without a seed every round is ``0, 1, .., n_models - 1`` (``A B C A B C
    ..``).  With a seed each round is an independent uniformly random
    permutation drawn from ``np.random.default_rng(seed)``, so no model is
    systematically first (cold caches after the previous model) or last in
    its round.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LatencySummary",
    "summarize",
    "ratio_ci",
    "sessions_ratio_ci",
    "interleaved_schedule",
]

# Upper bound on the number of elements of one index matrix built by the
# vectorized bootstrap; resamples are processed in chunks below this size.
_BOOT_CHUNK_ELEMENTS = 1 << 21


def _as_times(times: Sequence[float] | np.ndarray, arg: str) -> np.ndarray:
    """Validate per-run times: a non-empty 1-D array of finite values >= 0."""
    try:
        arr = np.asarray(times, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{arg} must be a sequence of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{arg} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{arg} is empty; at least one time is required")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{arg} contains non-finite values")
    if np.any(arr < 0):
        raise ValueError(f"{arg} contains negative times (min {arr.min()!r})")
    return arr


def check_int(value: object, arg: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (bools refused); ValueError naming ``arg`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{arg} must be an integer, got {value!r}")
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{arg} must be an integer, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{arg} must be >= {minimum}, got {out}")
    return out


@dataclass(frozen=True)
class LatencySummary:
    """Summary of per-run latencies, all times in seconds.

    ``throughput`` is runs per second (``1 / mean``); ``items_per_s`` is
    ``batch_size / mean``.  Both are ``inf`` if every time is zero.
    """

    n: int
    min: float
    median: float
    p90: float
    p99: float
    mean: float
    std: float
    throughput: float
    items_per_s: float
    batch_size: int = 1


def summarize(times: Sequence[float] | np.ndarray, batch_size: int = 1) -> LatencySummary:
    """Summarize per-run times in seconds (see the module docstring for the math).

    Refuses (ValueError naming the argument) an empty or non-1-D ``times``,
    non-finite or negative times, and ``batch_size < 1``.
    """
    arr = _as_times(times, "times")
    batch = check_int(batch_size, "batch_size")
    n = int(arr.size)
    median, p90, p99 = np.percentile(arr, [50.0, 90.0, 99.0], method="linear")
    # Rounding can put a float mean an ulp outside [min, max] (three equal times); it never is.
    mean = min(max(float(arr.mean()), float(arr.min())), float(arr.max()))
    std = float(arr.std(ddof=1)) if n > 1 else 0.0
    throughput = 1.0 / mean if mean > 0 else math.inf
    return LatencySummary(
        n=n,
        min=float(arr.min()),
        median=float(median),
        p90=float(p90),
        p99=float(p99),
        mean=mean,
        std=std,
        throughput=throughput,
        items_per_s=batch * throughput,
        batch_size=batch,
    )


def ratio_ci(
    a_times: Sequence[float] | np.ndarray,
    b_times: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
    paired: bool | None = None,
) -> tuple[float, float, float]:
    """Return ``(median(b) / median(a), lo, hi)`` with a percentile bootstrap interval.

    ``paired=None`` (default) pairs the resampling by round index when
    ``len(a_times) == len(b_times)`` and resamples independently otherwise;
    ``paired=True`` demands equal lengths.  Resampling is vectorized
    (``np.median`` over an index matrix, in bounded-size chunks) and
    deterministic for a given ``seed``.

    Refuses (ValueError naming the argument): empty, non-1-D, non-finite or
    negative times; ``median(a_times) == 0`` (ratio undefined);
    ``n_boot < 1``; ``confidence`` outside the open interval (0, 1);
    ``paired=True`` with unequal lengths.
    """
    a = _as_times(a_times, "a_times")
    b = _as_times(b_times, "b_times")
    n_boot = check_int(n_boot, "n_boot")
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if paired is None:
        paired = a.size == b.size
    elif paired and a.size != b.size:
        raise ValueError(
            f"paired=True needs equal lengths, got len(a_times)={a.size} "
            f"and len(b_times)={b.size}"
        )
    med_a = float(np.median(a))
    if med_a == 0.0:
        raise ValueError("median(a_times) is 0; the ratio of medians is undefined")
    ratio = float(np.median(b)) / med_a

    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot, dtype=np.float64)
    longest = max(a.size, b.size)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // longest)
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, n_boot, chunk):
            k = min(chunk, n_boot - start)
            if paired:
                idx = rng.integers(0, a.size, size=(k, a.size))
                ma = np.median(a[idx], axis=1)
                mb = np.median(b[idx], axis=1)
            else:
                ma = np.median(a[rng.integers(0, a.size, size=(k, a.size))], axis=1)
                mb = np.median(b[rng.integers(0, b.size, size=(k, b.size))], axis=1)
            ratios[start : start + k] = mb / ma
    alpha = 1.0 - float(confidence)
    lo, hi = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0], method="linear")
    return ratio, float(lo), float(hi)


def sessions_ratio_ci(
    pairs: Sequence[tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float, float]:
    """:func:`ratio_ci` over several independent measurements: ``pairs`` holds each
    measurement's ``(a_times, b_times)``, paired by round, each from its own sessions.

    ``R = median(all b) / median(all a)``; the bootstrap resamples at two levels: the
    measurements with replacement, then the rounds within each drawn one (paired). A
    single measurement's interval resamples its rounds only, so it cannot see what stays fixed for
    the life of a session (the CPU its intra-op threads land on, whether they wake in time): where
    that varies from one session to the next, two measurements give ratios outside each other's
    intervals, and this interval holds the spread.
    """
    data = [(_as_times(a, "a_times"), _as_times(b, "b_times")) for a, b in pairs]
    if not data:
        raise ValueError("pairs is empty; at least one measurement is required")
    for a, b in data:
        if a.size != b.size:
            raise ValueError(f"each measurement pairs its rounds: got {a.size} and {b.size} times")
    n_boot = check_int(n_boot, "n_boot")
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    med_a = float(np.median(np.concatenate([a for a, _ in data])))
    if med_a == 0.0:
        raise ValueError("median(a_times) is 0; the ratio of medians is undefined")
    ratio = float(np.median(np.concatenate([b for _, b in data]))) / med_a
    rng = np.random.default_rng(seed)
    n = max(a.size for a, _ in data)
    # a measurement cut short by a time budget has fewer rounds: it draws as many rounds as it has
    # (among its own) and fills the rest of its n slots with NaN, which the medians skip
    a_all = np.full((len(data), n), np.nan)
    b_all = np.full((len(data), n), np.nan)
    sizes = np.array([a.size for a, _ in data])
    for j, (a, b) in enumerate(data):
        a_all[j, : a.size], b_all[j, : b.size] = a, b
    pad = np.full((len(data), 1), np.nan)
    a_pad, b_pad = np.hstack([a_all, pad]), np.hstack([b_all, pad])  # column n: the padding slot
    ratios = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // (len(data) * n))
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, n_boot, chunk):
            k = min(chunk, n_boot - start)
            drawn = rng.integers(0, len(data), size=(k, len(data)))
            rows = np.floor(rng.random((k, len(data), n)) * sizes[drawn][:, :, None]).astype(np.int64)
            rows = np.where(np.arange(n) < sizes[drawn][:, :, None], rows, n)
            ma = np.nanmedian(a_pad[drawn[:, :, None], rows].reshape(k, -1), axis=1)
            mb = np.nanmedian(b_pad[drawn[:, :, None], rows].reshape(k, -1), axis=1)
            ratios[start : start + k] = mb / ma
    alpha = 1.0 - float(confidence)
    lo, hi = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0], method="linear")
    return ratio, float(lo), float(hi)


def interleaved_schedule(n_models: int, n_rounds: int, *, seed: int | None = None) -> list[int]:
    """Return the run order: ``n_rounds`` rounds, each a permutation of ``range(n_models)``.

    ``seed=None`` gives the fixed order ``0 1 .. n-1 0 1 .. n-1 ..``; an
    integer seed gives an independent random permutation per round
    (deterministic for that seed).  The result has length
    ``n_models * n_rounds`` and round ``r`` is ``result[r*n_models:(r+1)*n_models]``.

    Refuses (ValueError naming the argument) ``n_models < 1`` or ``n_rounds < 1``.
    """
    n_models = check_int(n_models, "n_models")
    n_rounds = check_int(n_rounds, "n_rounds")
    if seed is None:
        return list(range(n_models)) * n_rounds
    rng = np.random.default_rng(seed)
    order = rng.permuted(np.tile(np.arange(n_models), (n_rounds, 1)), axis=1)
    return [int(i) for i in order.ravel()]
