r"""Automatic float fallback to the check's budget, in a handful of evaluations.

When the held-out check (:mod:`onnxcomp.check`) finds that a default static quantization misses
its budget, some nodes go back to float until the budget holds **on the fitting data** (the check
then judges the result on the held-out data again). Ranking every node by trying it alone in float
costs one onnxruntime session per node (minutes on a real network); this module needs one
per-layer comparison and :math:`O(\log N)` evaluations instead:

1. **Local damage.** Run the float and the all-int8 model once with every shared intermediate
   tensor exposed, on a few fitting feeds, and take each tensor's SQNR. For an int8 node *u*, the
   damage it adds is :math:`d_u = \max_{x \in \mathrm{in}(u)} \mathrm{SQNR}(x) - \mathrm{SQNR}(\mathrm{out}(u))`
   (graph inputs count as exact, constants are not activations, and SQNRs are capped at 60 dB,
   beyond which a tensor is as good as exact): the node where the error first appears or grows
   most ranks first.
2. **Doubling.** Keep the top 1, 2, 4, 8, ... nodes of that ranking in float, evaluating each
   model on the fitting feeds against the budget (per output: top-1 agreement for class scores,
   cosine otherwise, as the check does), until the budget holds; then bisect between the last miss
   and the first hit until the float set is within a quarter of the smallest prefix that works.
   The all-int8 model is not evaluated again: the check has just found it short. More
   than ``max_float_fraction`` (a quarter) of the int8 nodes in float is refused: such a model has
   lost what int8 was for.

Each evaluation is one session and one pass over at most ``max_eval_feeds`` feeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.check import CheckConfig, OutputFigures, layer_sqnr, output_kinds
from onnxcomp.data import DataSource, Dataset
from onnxcomp.io import ModelSource, model_to_bytes
from onnxcomp.quant.config import QuantizeConfig

__all__ = ["fallback_to_budget", "budget_metrics", "local_damage"]


def budget_metrics(model: bytes, feeds: Sequence[dict[str, np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
                   names: Sequence[str], kinds: dict[str, str]) -> OutputFigures:
    """The check's figures of every output (:class:`onnxcomp.check.OutputFigures`) on ``feeds``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    figures = OutputFigures(list(names), kinds)
    for feed, ref in zip(feeds, reference):
        figures.update(list(ref), session.run(list(names), feed))
    return figures


def local_damage(float_model: ir.Model, int8_model: ir.Model, nodes: Sequence[str],
                 feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """SQNR lost at each int8 node (module docstring, step 1); nodes not measured get 0."""
    sqnr = layer_sqnr(float_model, int8_model, list(feeds))
    by_name = {n.name: n for n in float_model.graph}
    damage = {}
    for name in nodes:
        node = by_name.get(name)
        if node is None or not node.outputs or node.outputs[0].name not in sqnr:
            damage[name] = 0.0
            continue
        ins = []
        for v in node.inputs:
            if v is None or v.const_value is not None:
                continue
            producer = v.producer()
            if producer is None:
                ins.append(math.inf)  # a graph input: exact
            elif producer.op_type != "Constant" and v.name in sqnr:
                ins.append(sqnr[v.name])
        if not ins:
            damage[name] = 0.0
            continue
        # Above EXACT_DB a tensor is as good as exact: cap both ends so that a first layer's
        # "infinite" input does not outrank the real damage further on.
        damage[name] = _cap(max(ins)) - _cap(sqnr[node.outputs[0].name])
    return damage


EXACT_DB = 60.0


def _cap(db: float) -> float:
    return -EXACT_DB if math.isnan(db) else min(db, EXACT_DB)


def fallback_to_budget(
    model: ModelSource,
    fit_data: DataSource | Dataset,
    config: QuantizeConfig,
    budget: CheckConfig,
    *,
    max_eval_feeds: int = 16,
    max_float_fraction: float = 0.25,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Static int8 with the fewest high-damage nodes in float so that ``budget`` holds on ``fit_data``.

    Refuses to keep more than ``max_float_fraction`` of the int8 nodes in float: a model that
    needs that much float has lost the point of int8 (latency), so the all-int8 model is returned
    with ``met_on_fitting_data`` False and the check's verdict stands.

    Returns the model and a report: ``met_on_fitting_data``, ``float_nodes`` (in ranking order),
    ``int8_nodes``, ``evaluations``, ``history`` and ``seconds``.
    """
    from onnxcomp.quant.sensitivity import QuantStudy

    started = time.perf_counter()
    study = QuantStudy.prepare(model, fit_data, config, max_eval_feeds=max_eval_feeds)
    kinds = output_kinds(study.work)
    names = [v.name for v in study.work.graph.outputs]
    feeds, reference = study.feeds, study.reference

    def evaluate(float_nodes: Sequence[str]) -> tuple[ir.Model, OutputFigures]:
        candidate = study.build(frozenset(float_nodes))
        return candidate, budget_metrics(model_to_bytes(candidate), feeds, reference, names, kinds)

    history = []
    # The check already found the all-int8 model short of the budget: it is built once for the
    # per-layer comparison, not evaluated again.
    all_int8 = study.build(frozenset())
    damage = local_damage(study.work, all_int8, study.nodes, feeds[:2])
    ranking = sorted(study.nodes, key=lambda n: -damage[n])
    best: tuple[int, ir.Model] | None = None
    limit = max(1, int(max_float_fraction * len(ranking)))
    lo, k = 0, 1
    while True:
        k = min(k, limit)
        candidate, metrics = evaluate(ranking[:k])
        history.append({"float_nodes": k, "outputs": metrics.result()})
        if progress is not None:
            progress(k, len(ranking))
        if metrics.meets(budget):
            best = (k, candidate)
            break
        lo = k
        if k == limit:
            break
        k *= 2
    if best is not None:  # bisect between the last miss (lo) and the first hit
        hi = best[0]
        while hi - lo > max(1, hi // 4):
            mid = (lo + hi) // 2
            candidate, metrics = evaluate(ranking[:mid])
            history.append({"float_nodes": mid, "outputs": metrics.result()})
            if metrics.meets(budget):
                hi, best = mid, (mid, candidate)
            else:
                lo = mid
        report = _report(True, ranking[: best[0]], study, history, started, damage)
        return best[1], report
    report = _report(False, [], study, history, started, damage)
    report["gave_up"] = (f"the budget needs more than {limit} of {len(ranking)} int8 nodes in float "
                         f"({max_float_fraction:.0%}); the all-int8 model is kept")
    return all_int8, report


def _report(met: bool, float_nodes: Sequence[str], study, history, started: float,
            damage: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "met_on_fitting_data": met,
        "float_nodes": list(float_nodes),
        "int8_nodes": [n for n in study.nodes if n not in set(float_nodes)],
        "damage_db": {n: damage[n] for n in float_nodes} if damage else {},
        "evaluations": len(history),
        "history": history,
        "eval_feeds": len(study.feeds),
        "seconds": time.perf_counter() - started,
    }
