r"""Calibration ``auto``: the range method chosen per model, by the check's own figures.

No single range method is right for every model: MSE-optimal ranges can lose a detector's
detections where min/max keeps them, and min/max can lose a recognizer's characters where MSE does
not. Nor is a per-tensor choice enough on its own (``per-tensor``, :mod:`onnxcomp.quant.ranges`):
it weighs each tensor's error at its consumers, one tensor at a time, so damage that only adds up
through the network stays unseen, and scoring every candidate at every consumer costs many
forward passes.

So ``auto`` calibrates once with histograms that propose every method's range
(:class:`~onnxcomp.quant.ranges.SplitCandidateObserver`), builds the model with each method's
ranges (:data:`SINGLE`; with ``per-tensor`` the per-tensor choice competes too, first), runs each
variant beside the float model and scores it with the held-out check's figures
(:data:`onnxcomp.check.RULES`, per kind of output: top-1 agreement for scores, decoded-sequence
agreement for CTC, region agreement for maps, detection agreement for detector heads, R^2 against
the original for a regression ``[N, 1]``, cosine otherwise). Among the variants whose worst
output figure is within :data:`WORST_TOLERANCE` of the best one's, the one of highest mean output
SQNR (capped at :data:`SQNR_CAP` dB) wins, then the order of :data:`METHODS`; but min/max (with
``per-tensor``: the per-tensor choice) stays unless the winner's SQNR is :data:`SQNR_MARGIN_DB`
higher: smaller differences are within what a few feeds can tell. The agreement figures count
decisions: on the few feeds judged they move in steps of a line or a box, while the SQNR sums
every output value; the tolerance lets a variant that flips one decision more but is closer
everywhere else win, and still rejects one that loses many.
Every variant is built on one plan, the nodes min/max ranges cannot serve kept float
(:func:`onnxcomp.quant.static.planning_ranges`): with a plan per variant, a variant could win by
keeping more nodes float, closeness bought with speed. Variants whose ranges equal an earlier
one's are not built twice.

Not the default: a few fitting feeds do not always carry what the choice needs; the SQNR of the
feeds judged can prefer a method the task metric does not (``benchmarks/RESULTS.md``).

What the variants are judged on matters: on its own fitting feeds min/max never clips, so there it
always looks better than on new data. So the variants are built with ranges from the histograms
*without* every :data:`~onnxcomp.quant.ranges.HOLD_EVERY`-th fitting feed and judged on up to
:data:`FEEDS` of those feeds; the winner's ranges then come from every fitting feed. With fewer
than ``2 * HOLD_EVERY`` feeds, or for ``per-tensor``, the variants are judged on the first fitting
feeds. These are all fitting feeds: the check's held-out data stays unseen by any decision.

Refused (the first variant is kept, and the report says why): models holding
:data:`onnxcomp.io.LARGE_MODEL_BYTES` of weights or more (each variant is a copy of the model).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.check import RULES, OutputFigures, output_kinds
from onnxcomp.data import Dataset
from onnxcomp.io import LARGE_MODEL_BYTES, clone_model, initializer_nbytes
from onnxcomp.quant.ranges import HOLD_EVERY, CandidateObserver, SplitCandidateObserver
from onnxcomp.runtime import run_model

__all__ = ["METHODS", "FEEDS", "select_ranges", "variant_ranges"]

#: The variants compared, in tie-break order: the per-tensor choice (method ``per-tensor`` only),
#: then the single methods.
METHODS = ("per-tensor", "mse", "minmax", "percentile", "entropy")
SINGLE = METHODS[1:]
#: Fitting feeds each variant runs.
FEEDS = 16
#: SQNR above this counts as this (an output equal to the float one would be +inf).
SQNR_CAP = 100.0
#: Variants whose worst output figure is within this of the best one's count as equally good.
WORST_TOLERANCE = 0.03
#: Mean output SQNR (dB) by which a variant must beat the preferred one (min/max; for ``per-tensor``
#: the per-tensor choice) to replace it: smaller differences are within what a few feeds can tell.
SQNR_MARGIN_DB = 1.0

Ranges = dict[str, tuple[float, float]]


def variant_ranges(chosen: Ranges, observers: dict[str, Any], per_tensor: bool = False,
                   held_out: bool = False) -> dict[str, Ranges]:
    """``{variant: ranges}``: ``per-tensor`` = ``chosen`` (when ``per_tensor``), then each single
    method's from the candidate histograms, those equal to an earlier one left out. Without
    candidate histograms: ``{"calibrated": chosen}``. ``held_out``: the single methods' ranges
    from the histograms without the held-out feeds (:class:`SplitCandidateObserver`)."""
    cands = {name: (obs.fit if held_out else obs).candidates() for name, obs in observers.items()
             if isinstance(obs, CandidateObserver)}
    if set(cands) != set(chosen) or not cands:
        return {"calibrated": dict(chosen)}
    out: dict[str, Ranges] = {"per-tensor": dict(chosen)} if per_tensor else {}
    for method in SINGLE:
        ranges = {name: c[method] for name, c in cands.items()}
        if not any(_same(ranges, seen) for seen in out.values()):
            out[method] = ranges
    return out


def _same(a: Ranges, b: Ranges) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-6, atol=0.0) for k in a)


def _score(figures: list[dict[str, float]], kinds: list[str]) -> tuple[float, float]:
    """``(worst rule figure over the outputs, mean capped SQNR)``: higher is better."""
    worst = min((f.get(RULES[k].figure, -math.inf) for f, k in zip(figures, kinds)), default=0.0)
    sqnr = [min(f.get("sqnr_db", SQNR_CAP), SQNR_CAP) for f, k in zip(figures, kinds) if RULES[k].reported]
    return float(worst), float(np.mean(sqnr)) if sqnr else 0.0


def choose(scores: dict[str, tuple[float, float]], prefer: str = "minmax", tolerance: float = WORST_TOLERANCE,
           margin: float = SQNR_MARGIN_DB) -> str:
    """Among the variants whose worst figure is within ``tolerance`` of the best worst figure, the
    one of highest mean SQNR, unless ``prefer`` is among them and no more than ``margin`` dB
    behind it (``scores``: ``{variant: (worst figure, mean SQNR)}``; ties to :data:`METHODS` order)."""
    top = max(worst for worst, _ in scores.values())
    near = [m for m, (worst, _) in scores.items() if worst >= top - tolerance]
    best = max(near, key=lambda m: (scores[m][1], -METHODS.index(m)))
    if prefer in near and scores[best][1] < scores[prefer][1] + margin:
        return prefer
    return best


def select_ranges(
    work: ir.Model,
    chosen: Ranges,
    observers: dict[str, Any],
    data: Dataset,
    build: Callable[[ir.Model, Ranges], object],
    *,
    per_tensor: bool = False,
    feeds: int = FEEDS,
) -> tuple[str, Ranges, dict[str, Any]]:
    """The best of the per-tensor choice and the single methods' ranges, judged whole (module docstring).

    Args:
        work: the float model as calibrated (typed, not yet rewritten); left untouched.
        chosen: the calibrated ranges ``{tensor: (lo, hi)}``; observers: the calibration's.
        per_tensor: ``chosen`` is the per-tensor choice and competes as a variant of its own.
        build: ``build(copy, ranges)`` rewrites a copy of ``work`` in place with ``ranges``.

    Returns ``(variant, its ranges, report)``; the report lists each variant's figures.
    """
    started = time.perf_counter()
    variants = variant_ranges(chosen, observers, per_tensor)
    first = next(iter(variants))
    if initializer_nbytes(work) >= LARGE_MODEL_BYTES:
        return first, variants[first], {"variant": first, "skipped": "a model this large is not copied once per variant"}
    if len(variants) == 1:
        return first, variants[first], {"variant": first, "skipped": "every method gives the same ranges"}
    split = not per_tensor and all(isinstance(o, SplitCandidateObserver) and o.updates >= 2 * HOLD_EVERY
                                   for o in observers.values())
    if split:  # ranges without every HOLD_EVERY-th feed, judged on those feeds
        scored = variant_ranges(chosen, observers, held_out=True)
        scored = {k: scored[k] for k in variants if k in scored}
        batch = [f for i, f in enumerate(itertools.islice(iter(data), HOLD_EVERY * feeds)) if i % HOLD_EVERY == HOLD_EVERY - 1]
    else:
        scored = variants
        batch = list(itertools.islice(iter(data), feeds))
    if not batch or len(scored) != len(variants):
        return first, variants[first], {"variant": first, "skipped": "no feed to judge the variants on"}
    names = [v.name for v in work.graph.outputs]
    kinds_of = output_kinds(work)
    reference = run_model(work, batch)
    scores: dict[str, tuple[float, float]] = {}
    table: dict[str, dict[str, Any]] = {}
    for name, ranges in scored.items():
        trial = clone_model(work)
        build(trial, ranges)
        figures = OutputFigures(names, kinds_of)
        for feed, ref, cand in zip(batch, reference, run_model(trial, batch)):
            figures.update(ref, cand, feed)  # the feed: pooled outputs, token counts, batch size
        result = figures.result()
        scores[name] = _score(result, figures.kinds)
        table[name] = {"worst": scores[name][0], "sqnr_db": scores[name][1]}
        del trial
    best = choose(scores, prefer="per-tensor" if per_tensor else "minmax")
    report = {"variant": best, "feeds": len(batch), "held_out": split, "variants": table,
              "seconds": round(time.perf_counter() - started, 2)}
    return best, variants[best], report
