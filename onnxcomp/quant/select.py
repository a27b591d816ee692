r"""The model-level guard of ``auto`` ranges: the per-tensor choice against every single method, judged whole.

``auto`` (:mod:`onnxcomp.quant.ranges`) picks each tensor's clipping range by its consumers' error,
one tensor at a time. That is local: errors that only add up through the network, or a range that
is harmless for the next node but fatal three nodes later, stay unseen. No single method is safe
either: on a YOLO-style detector the MSE-optimal ranges lose most detections where min/max keeps
them, and on a CTC text recognizer read on unfamiliar lines min/max loses several points where MSE
does not.

So after calibration, :func:`select_ranges` builds the model with the per-tensor choice and with
each single method's ranges (:data:`METHODS`; the calibration's candidate histograms hold them
all, so nothing is observed again), runs each on the first :data:`FEEDS` fitting feeds beside the
float model, and scores it with the held-out check's own figures (:data:`onnxcomp.check.RULES`, per
kind of output): the variant whose worst output figure is highest wins; equal worst figures are
decided by the mean output SQNR (capped at 100 dB), then by the order of :data:`METHODS` (the
per-tensor choice first). Variants whose ranges equal an earlier one's are not built twice.

The figures come from the fitting data, not the check's held-out feeds: the check stays a test on
data no decision has seen. Min/max never clips its own fitting data, which favours it slightly
here; the check then measures the chosen model on data it has not seen.

Refused (the per-tensor choice is kept, and the report says why): models holding
:data:`onnxcomp.io.LARGE_MODEL_BYTES` of weights or more (each variant is a copy of the model), and
calibrations without candidate histograms.
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
from onnxcomp.quant.ranges import CandidateObserver
from onnxcomp.runtime import run_model

__all__ = ["METHODS", "FEEDS", "select_ranges", "variant_ranges"]

#: The variants compared, in tie-break order: the per-tensor choice, then the single methods.
METHODS = ("auto", "mse", "minmax", "percentile")
#: Fitting feeds each variant runs.
FEEDS = 16
#: SQNR above this counts as this (an output equal to the float one would be +inf).
SQNR_CAP = 100.0

Ranges = dict[str, tuple[float, float]]


def variant_ranges(chosen: Ranges, observers: dict[str, Any]) -> dict[str, Ranges]:
    """``{variant: ranges}``: ``auto`` = ``chosen``, each single method's from the candidate histograms."""
    out: dict[str, Ranges] = {"auto": dict(chosen)}
    cands = {name: obs.candidates() for name, obs in observers.items() if isinstance(obs, CandidateObserver)}
    if set(cands) != set(chosen):
        return out
    for method in METHODS[1:]:
        ranges = {name: c[method] for name, c in cands.items()}
        if not any(_same(ranges, seen) for seen in out.values()):
            out[method] = ranges
    return out


def _same(a: Ranges, b: Ranges) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-6, atol=0.0) for k in a)


def _score(figures: list[dict[str, float]], kinds: list[str]) -> tuple[float, float]:
    """``(worst rule figure over the outputs, mean capped SQNR)``: higher is better."""
    worst = min((f.get(RULES[k].figure, -math.inf) for f, k in zip(figures, kinds)), default=0.0)
    sqnr = [min(f.get("sqnr_db", SQNR_CAP), SQNR_CAP) for f, k in zip(figures, kinds) if k != "exact"]
    return float(worst), float(np.mean(sqnr)) if sqnr else 0.0


def select_ranges(
    work: ir.Model,
    chosen: Ranges,
    observers: dict[str, Any],
    data: Dataset,
    build: Callable[[ir.Model, Ranges], object],
    *,
    feeds: int = FEEDS,
) -> tuple[str, Ranges, dict[str, Any]]:
    """The best of the per-tensor choice and the single methods' ranges, judged whole (module docstring).

    Args:
        work: the float model as calibrated (typed, not yet rewritten); left untouched.
        chosen: the per-tensor choice ``{tensor: (lo, hi)}``; observers: the calibration's.
        build: ``build(copy, ranges)`` rewrites a copy of ``work`` in place with ``ranges``.

    Returns ``(variant, its ranges, report)``; the report lists each variant's figures.
    """
    started = time.perf_counter()
    if initializer_nbytes(work) >= LARGE_MODEL_BYTES:
        return "auto", chosen, {"skipped": "a model this large is not copied once per variant"}
    variants = variant_ranges(chosen, observers)
    if len(variants) == 1:
        return "auto", chosen, {"skipped": "no other variant differs from the per-tensor choice"}
    batch = list(itertools.islice(iter(data), feeds))
    if not batch:
        return "auto", chosen, {"skipped": "no fitting feed"}
    names = [v.name for v in work.graph.outputs]
    kinds_of = output_kinds(work)
    reference = run_model(work, batch)
    scores: dict[str, tuple[float, float]] = {}
    table: dict[str, dict[str, Any]] = {}
    for name, ranges in variants.items():
        trial = clone_model(work)
        build(trial, ranges)
        figures = OutputFigures(names, kinds_of)
        for ref, cand in zip(reference, run_model(trial, batch)):
            figures.update(ref, cand)
        result = figures.result()
        scores[name] = _score(result, figures.kinds)
        table[name] = {"worst": scores[name][0], "sqnr_db": scores[name][1]}
        del trial
    best = max(scores, key=lambda m: (scores[m], -METHODS.index(m)))
    report = {"variant": best, "feeds": len(batch), "variants": table,
              "seconds": round(time.perf_counter() - started, 2)}
    return best, variants[best], report
