"""Calibration: stream data through onnxruntime in memory and feed each tensor's observer.

The model is cloned, the tensors to observe are made graph outputs, and the clone is run with
onnxruntime from bytes (no augmented model on disk). Each feed's outputs update one
:class:`~onnxcomp.quant.observers.Observer` per tensor and are then dropped: memory is bounded by
one feed's activations plus the observers' fixed-size histograms, whatever the data set size.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.quant.observers import Observer, make_observer
from onnxcomp.quant.ranges import SplitCandidateObserver, choose_ranges, observe

__all__ = ["CalibrationResult", "calibrate", "observe"]


@dataclasses.dataclass
class CalibrationResult:
    """Observed ranges ``{tensor: (rmin, rmax)}`` plus the observers and how long it took.

    ``choices``: for method ``auto``, what was chosen per tensor (see :mod:`onnxcomp.quant.ranges`).
    """

    ranges: dict[str, tuple[float, float]]
    observers: dict[str, Observer]
    feeds: int
    seconds: float
    choices: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: SiLU inputs whose lower bound :func:`onnxcomp.quant.static.narrow_silu_ranges` raised
    silu_narrowed: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def calibrate(
    model: ir.Model,
    tensors: Sequence[str],
    data: Dataset,
    *,
    method: str = "minmax",
    observer_kwargs: dict[str, Any] | None = None,
    max_feeds: int | None = None,
    threads: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> CalibrationResult:
    """Observe ``tensors`` (graph inputs or values computed in the main graph) over ``data``.

    Args:
        method: minmax, percentile, entropy or mse (see :mod:`onnxcomp.quant.observers`);
            auto: one histogram per tensor that proposes every method's range
            (:class:`~onnxcomp.quant.ranges.SplitCandidateObserver`, which also keeps the
            ranges without every 4th feed; the MSE range is returned, the choice between methods
            is :mod:`onnxcomp.quant.select`'s); or per-tensor: per tensor, the candidate range of least consumer-output error
            (:mod:`onnxcomp.quant.ranges`; two passes over ``data``). ``entropy`` is guarded the
            same way: a tensor keeps its KL threshold only where that does not make its
            consumers' outputs worse than min/max (KL does not see how far clipped values move:
            it can clip the few largest values of a tensor several times over where the network
            relies on them).
        observer_kwargs: passed to each observer (e.g. ``percentile``, ``bins``, ``qdtype``).
        max_feeds: stop after this many feeds.
        progress: called with the number of feeds done.

    Raises:
        DataError: the data set is empty or holds NaN/Inf (from the Dataset), or a tensor
            becomes non-finite during calibration (named).
    """
    names = list(dict.fromkeys(tensors))
    if method in ("per-tensor", "entropy"):
        choices, observers, feeds, seconds = choose_ranges(
            model, names, data, **(observer_kwargs or {}), max_feeds=max_feeds, threads=threads, progress=progress,
            **({} if method == "per-tensor" else {"methods": ("minmax", "entropy"), "default": "minmax", "switch_gain": 1.0}),
        )
        ranges = {name: (float(c.range[0]), float(c.range[1])) for name, c in choices.items()}
        return CalibrationResult(ranges, dict(observers), feeds, seconds, choices)
    start = time.perf_counter()
    make = (lambda: SplitCandidateObserver(**(observer_kwargs or {}))) if method == "auto" else (
        lambda: make_observer(method, **(observer_kwargs or {})))
    observers = {name: make() for name in names}
    if not names:
        return CalibrationResult({}, {}, 0, 0.0)
    feeds = observe(model, observers, data, max_feeds=max_feeds, threads=threads, progress=progress)
    ranges = {}
    for name, obs in observers.items():
        lo, hi = obs.compute_range()
        ranges[name] = (float(lo), float(hi))
    return CalibrationResult(ranges, observers, feeds, time.perf_counter() - start)
