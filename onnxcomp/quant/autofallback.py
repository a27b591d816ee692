r"""Automatic float fallback to the check's budget, from the quantize run's own calibration.

When the held-out check (:mod:`onnxcomp.check`) finds that a default static quantization misses
its budget, some nodes go back to float until the budget holds **on the fitting data** (the check
then judges the result on the held-out data again). Everything reuses the quantize run:

* **No second calibration.** The quantize run keeps its calibration
  (:class:`onnxcomp.quant.static.Calibrated`: the prepared float model, the plans, and the ranges
  of the plan with and without activation folding, observed in its one pass); every variant is a
  Q/DQ rewrite of it (:class:`onnxcomp.quant.sensitivity.QuantStudy`).
* **One per-layer comparison ranks.** The float and the all-int8 model run once with every shared
  intermediate tensor exposed, on a few fitting feeds. For an int8 node *u*, the damage it adds is
  the relative noise power it adds, :math:`d_u = \rho(\mathrm{out}(u)) - \min_{x \in
  \mathrm{in}(u)} \rho(x)` with :math:`\rho = 10^{-\mathrm{SQNR}/10}` (graph inputs count as
  exact, constants are not activations). In linear power, not dB: a drop from 12 to 9 dB deep in
  the network adds far more noise than one from 60 to 40 dB at the first layer, and noise powers
  add up along the network.
* **Blocks move, not nodes.** The int8 nodes, in graph order, are cut into runs of about
  :math:`\sqrt{N}/2` consecutive nodes (:func:`damage_blocks`), ranked by the noise their nodes
  add. A run goes to float whole: one float island costs one pair of Q/DQ boundaries, where as
  many scattered nodes cost one pair each (and the latency that goes with them).
* **The check's own figures decide.** The fewest top-ranked blocks that meet the budget are found
  by bisection between none (the all-int8 model, which the check found short) and the most the
  float limit allows: :math:`\lceil\log_2(B + 1)\rceil` evaluations for *B* blocks. Each candidate is judged with
  the figures and the rule of the check itself (:class:`onnxcomp.check.OutputFigures`,
  :func:`onnxcomp.check.figures_meet`: decoded-sequence agreement, region agreement, pooled
  embedding cosine, ...) on the fitting feeds, so the stop rule is the final check's verdict on
  other data. More than ``max_float_fraction`` (a quarter) of the int8 nodes in float is refused: such a
  model has lost what int8 was for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.check import CheckConfig, figures_meet, layer_sqnr, output_kinds, pooled_outputs
from onnxcomp.data import DataSource, Dataset, load_data
from onnxcomp.ops import is_constant_node

__all__ = ["fallback_to_budget", "local_damage", "damage_blocks", "ranked_blocks", "study_of"]


def local_damage(float_model: ir.Model, int8_model: ir.Model, nodes: Sequence[str],
                 feeds: Sequence[dict[str, np.ndarray]], units: dict[str, tuple[str, str]] | None = None
                 ) -> dict[str, float]:
    """Relative noise power added at each int8 node (module docstring); nodes not measured get 0.
    A quantized subgraph (``units``: name -> (control-flow node, attribute)) is measured at its
    node's outputs (both branches of an If get the If's damage)."""
    sqnr = layer_sqnr(float_model, int8_model, list(feeds), with_outputs=True)  # a last node's output is one
    by_name = {n.name: n for n in float_model.graph}
    units = units or {}
    damage = {}
    for name in nodes:
        node = by_name.get(units[name][0] if name in units else name)
        out = _measured_output(node, sqnr) if node is not None and node.outputs else None
        if out is None:
            damage[name] = 0.0
            continue
        ins = []
        for v in node.inputs:
            if v is None or v.const_value is not None:
                continue
            v = _measured_input(v, sqnr, float_model)
            producer = v.producer()
            if producer is None:
                ins.append(0.0)  # a graph input: exact
            elif not is_constant_node(producer) and v.name in sqnr:
                ins.append(noise_ratio(sqnr[v.name]))
        damage[name] = noise_ratio(sqnr[out]) - (min(ins) if ins else 0.0)
    return damage


def _measured_output(node: ir.Node, sqnr: dict[str, float], steps: int = 3) -> str | None:
    """The first tensor from ``node``'s output on that both models compute: an activation folded
    into an int8 node (Relu, Clip) hides the node's own output, so its sole consumer's is taken."""
    value = node.outputs[0]
    for _ in range(steps):
        if value.name in sqnr:
            return value.name
        consumers = value.consumers()
        if len(consumers) != 1 or not consumers[0].outputs:
            return None
        value = consumers[0].outputs[0]
    return None


def _measured_input(value: ir.Value, sqnr: dict[str, float], model: ir.Model, steps: int = 3) -> ir.Value:
    """``value``, or the tensor before it that both models compute: a Relu/Clip folded into the
    int8 producer (and data movement, which adds no noise of its own) hides ``value`` in the int8
    model, so the input of the op that made it is taken. Without this, the noise a node receives
    through a folded Relu counted as noise it adds."""
    from onnxcomp.quant.rules import QUANT_RULES

    for _ in range(steps):
        producer = value.producer()
        if value.name in sqnr or producer is None or not producer.inputs or producer.inputs[0] is None:
            return value
        rule = QUANT_RULES.lookup(producer, model)
        if rule is None or rule.kind not in ("fold", "shared"):
            return value
        value = producer.inputs[0]
    return value


def noise_ratio(db: float) -> float:
    """Noise-to-signal power of an SQNR in dB, at most 1 (NaN: 1)."""
    return 1.0 if math.isnan(db) else min(1.0, 10.0 ** (-db / 10.0))


def damage_blocks(nodes: Sequence[str], damage: dict[str, float], size: int | None = None) -> list[list[str]]:
    """``nodes`` (in graph order) cut into runs of ``size`` consecutive nodes (default about
    sqrt(N)/2, one node each below 16 nodes), worst first: by the noise their nodes add
    (the sum of the positive damages: noise powers add)."""
    if size is None:
        size = 1 if len(nodes) < 16 else max(2, round(math.sqrt(len(nodes)) / 2))
    blocks = [list(nodes[i:i + size]) for i in range(0, len(nodes), size)]
    return sorted(blocks, key=lambda b: -sum(max(damage.get(n, 0.0), 0.0) for n in b))


def ranked_blocks(study, nodes: Sequence[str], float_nodes: frozenset[str] = frozenset(), *, damage_feeds: int = 2,
                  block_size: int | None = None) -> tuple[list[list[str]], dict[str, float]]:
    """``nodes`` of ``study`` (a :class:`~onnxcomp.quant.sensitivity.QuantStudy`) in blocks, worst
    first (:func:`damage_blocks`), and each node's damage (:func:`local_damage`), from one per-layer
    comparison of the float model with the variant that keeps ``float_nodes`` float, on the first
    ``damage_feeds`` of the study's feeds."""
    quantized = study.build(frozenset(float_nodes))
    reference = study.float_work if study.float_work is not None else study.work
    damage = local_damage(reference, quantized, list(nodes), study.feeds[:damage_feeds], study.units)
    return damage_blocks(nodes, damage, block_size), damage


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
) -> tuple[ir.Model, dict[str, Any]]:
    """Static int8 with the fewest high-damage blocks in float so that ``budget`` holds on the
    study's feeds (the fitting data), judged by the check's own rule.

    ``study``: a :class:`~onnxcomp.quant.sensitivity.QuantStudy` (:func:`study_of` makes one from
    a quantize run without calibrating again). Refuses to keep more than ``max_float_fraction`` of
    the int8 nodes in float: the all-int8 model is then returned with ``met_on_fitting_data``
    False and the check's verdict stands. ``executor``: where candidates are evaluated (default:
    in this process).

    Returns the model and a report: ``met_on_fitting_data``, ``float_nodes`` (in ranking order),
    ``blocks`` (the runs moved), ``int8_nodes``, ``evaluations``, ``history``, ``fitting_outputs``
    (the chosen model's figures on the fitting feeds) and ``seconds``.
    """
    from onnxcomp.executors import Inline
    from onnxcomp.quant import static
    from onnxcomp.quant.sensitivity import fewest_passing

    started = time.perf_counter()
    if study.outputs is None:
        study.outputs = ([v.name for v in study.work.graph.outputs], output_kinds(study.work),
                         pooled_outputs(study.work))
    names, kinds, _ = study.outputs
    kind_list = [kinds.get(n, "values") for n in names]
    executor = executor or Inline()

    def evaluate(float_nodes: Sequence[str]) -> tuple[ir.Model, dict[str, Any], bool]:
        candidate = study.build(frozenset(float_nodes))
        result = study.evaluate([candidate], executor)[0]
        return candidate, result, figures_meet(kind_list, result["outputs"], budget)

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
        "damage": {n: damage[n] for n in float_nodes},
        "evaluations": len(history),
        "history": history,
        "eval_feeds": len(study.feeds),
        "fitting_outputs": result["outputs"] if result is not None else None,
        "seconds": time.perf_counter() - started,
    }
