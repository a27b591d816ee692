r"""Automatic float fallback to the check's budget, from the quantize run's own calibration.

When the held-out check (:mod:`onnxcomp.check`) finds that a default static quantization misses
its budget, some nodes go back to float until the budget holds **on the fitting data** (the check
then judges the result on the held-out data again). Everything reuses the quantize run:

* **No second calibration.** The quantize run keeps its calibration
  (:class:`onnxcomp.quant.static.Calibrated`: the prepared float model, the plans, and the ranges
  of the plan with and without activation folding, observed in its one pass); every variant is a
  Q/DQ rewrite of it (:class:`onnxcomp.quant.sensitivity.QuantStudy`).
* **One run ranks** the int8 nodes by the noise each adds by itself (fed float inputs), in blocks of
  consecutive nodes (:mod:`onnxcomp.quant.damage`). A run goes to float whole: one float island
  costs one pair of Q/DQ boundaries, where as many scattered nodes cost one pair each (and the
  latency that goes with them).
* **The check's own figures decide.** The fewest top-ranked blocks that meet the budget are found
  by bisection between none (the all-int8 model, which the check found short) and the most the
  float limit allows: :math:`\lceil\log_2(B + 1)\rceil` evaluations for *B* blocks. Each candidate is judged with
  the figures and the rule of the check itself (:class:`onnxcomp.check.OutputFigures`,
  :func:`onnxcomp.check.figures_meet`: decoded-sequence agreement, region agreement, pooled
  embedding cosine, ...) on the fitting feeds, so the stop rule is the final check's verdict on
  other data. More than ``max_float_fraction`` (a quarter) of the int8 nodes in float is refused: such a
  model has lost what int8 was for.
* **Recurrent weights and embedding tables are candidates too.** The steps after the Q/DQ rewrite
  (:class:`onnxcomp.quant.static.FinishStep`) give an LSTM int8 weights and an embedding table
  int8 blocks; each such node is ranked by its own isolated damage, a block of its own, and may
  go back to float like a block of the plan (the report's ``finish_nodes`` names them, its
  ``recurrent`` / ``embeddings`` sections are those of the chosen model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.check import CheckConfig, figures_meet, output_kinds, pooled_outputs
from onnxcomp.data import DataSource, Dataset, load_data
from onnxcomp.quant.damage import ranked_blocks

__all__ = ["fallback_to_budget", "study_of"]


def study_of(calibrated, fit_data: DataSource | Dataset, *, max_eval_feeds: int | None = 32):
    """The :class:`~onnxcomp.quant.sensitivity.QuantStudy` of a quantize run's calibration
    (``calibrated``: :class:`onnxcomp.quant.static.Calibrated`) on at most ``max_eval_feeds``
    fitting feeds, measuring the check's figures."""
    from onnxcomp.quant.sensitivity import QuantStudy

    feeds = []
    for feed in load_data(fit_data, calibrated.work):
        if max_eval_feeds is not None and len(feeds) >= max_eval_feeds:
            break
        feeds.append(feed)
    return QuantStudy.from_calibrated(calibrated, feeds)


def fallback_to_budget(
    study,
    budget: CheckConfig,
    *,
    max_float_fraction: float = 0.25,
    damage_feeds: int = 2,
    block_size: int | None = None,
    executor=None,
    progress: Callable[[int, int], object] | None = None,
    kinds: dict[str, str] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Static int8 with the fewest high-damage blocks in float so that ``budget`` holds on the
    study's feeds (the fitting data), judged by the check's own rule.

    ``study``: a :class:`~onnxcomp.quant.sensitivity.QuantStudy` (:func:`study_of` makes one from
    a quantize run without calibrating again). Refuses to keep more than ``max_float_fraction`` of
    the int8 nodes in float: the all-int8 model is then returned with ``met_on_fitting_data``
    False and the check's verdict stands. ``executor``: where candidates are evaluated (default:
    in this process). ``kinds``: the kinds the held-out check judged
    (:attr:`onnxcomp.check.DataSplit.judged_kinds`), so that the fallback stops on the rule the
    check applies, whatever its own feeds return.

    Returns the model and a report: ``met_on_fitting_data``, ``float_nodes`` (in ranking order),
    ``blocks`` (the runs moved), ``int8_nodes``, ``finish_nodes`` (the candidates that are
    recurrent ops or embedding lookups, by kind), ``evaluations``, ``history``, ``fitting_outputs``
    (the chosen model's figures on the fitting feeds) and ``seconds``; when met, the chosen model's
    ``recurrent`` and ``embeddings`` sections (what its finish steps wrote, see
    :meth:`~onnxcomp.quant.sensitivity.QuantStudy.build_with_reports`).
    """
    from onnxcomp.executors import Inline
    from onnxcomp.quant import static
    from onnxcomp.quant.sensitivity import fewest_passing

    started = time.perf_counter()
    if study.outputs is None:
        study.outputs = ([v.name for v in study.work.graph.outputs], output_kinds(study.work),
                         pooled_outputs(study.work))
    if kinds:
        names, own, pooled = study.outputs
        study.outputs = (names, {**own, **kinds}, pooled)
    names, kinds, _ = study.outputs
    kind_list = [kinds.get(n, "values") for n in names]
    executor = executor or Inline()

    def evaluate(float_nodes: Sequence[str]) -> tuple[ir.Model, dict[str, Any], bool]:
        candidate, sections = study.build_with_reports(frozenset(float_nodes))
        result = study.evaluate([candidate], executor)[0]
        return candidate, {**result, "sections": sections}, figures_meet(kind_list, result["outputs"], budget)

    # The check already found the all-int8 model short of the budget: it is built once for the
    # per-layer comparison, not evaluated again.
    blocks, damage = ranked_blocks(study, study.nodes, damage_feeds=damage_feeds, block_size=block_size)
    limit_nodes = max(1, int(max_float_fraction * len(study.nodes)))
    counts = np.cumsum([len(b) for b in blocks])
    limit = max(1, int(np.searchsorted(counts, limit_nodes, side="right")))  # blocks within the limit

    def nodes_of(k: int) -> list[str]:
        return [n for b in blocks[:k] for n in b]

    history: list[dict[str, Any]] = []
    best: tuple[int, ir.Model, dict[str, Any]] | None = None

    def trial(k: int) -> bool:
        nonlocal best
        candidate, result, ok = evaluate(nodes_of(k))
        history.append({"blocks": k, "float_nodes": len(nodes_of(k)), "met": ok, "outputs": result["outputs"]})
        if progress is not None:
            progress(len(history), math.ceil(math.log2(limit + 1)))
        if ok and (best is None or k < best[0]):
            best = (k, candidate, result)
        return ok

    # bisection: none of the blocks misses (the check said so), limit + 1 stands for "too many"
    fewest_passing(0, limit + 1, trial)
    if best is None:
        report = _report(False, [], [], study, history, started, damage, None)
        report["gave_up"] = (f"the budget needs more than {limit_nodes} of {len(study.nodes)} int8 nodes in float "
                             f"({max_float_fraction:.0%}); the all-int8 model is kept")
        return study.build(frozenset()), report
    k, model, result = best
    corrected = static.correct_biases(model, study.prepared) if study.prepared is not None else None
    report = _report(True, nodes_of(k), blocks[:k], study, history, started, damage, result)
    report.update(result["sections"])  # what the finish steps wrote: the model's recurrent / embeddings sections
    if corrected is not None:
        report["bias_correction"] = corrected
    return model, report


def _report(met: bool, float_nodes: Sequence[str], blocks: Sequence[Sequence[str]], study, history,
            started: float, damage: dict[str, float], result: dict[str, Any] | None) -> dict[str, Any]:
    chosen = set(float_nodes)
    return {
        "met_on_fitting_data": met,
        "float_nodes": list(float_nodes),
        "blocks": [list(b) for b in blocks],
        "int8_nodes": [n for n in study.nodes if n not in chosen],
        # candidates int8 by the steps after the Q/DQ rewrite (recurrent weights, embedding tables)
        "finish_nodes": dict(study.finish_nodes),
        "damage": {n: damage[n] for n in float_nodes},
        "evaluations": len(history),
        "history": history,
        "eval_feeds": len(study.feeds),
        "fitting_outputs": result["outputs"] if result is not None else None,
        "seconds": time.perf_counter() - started,
    }
