r"""The held-out check: every lossy command measures what it wrote against the original.

A compressed model is only as good as the data it was fitted on; a default that suits one model can
ruin another. So after writing, every lossy command (``quantize``, ``prune``, ``cluster``,
``compress``) loads the **written file** back and compares it with the original model on data the
compression did not fit on, against a budget, and says in one line whether the budget was met.

Split
    With ``--eval`` data, the check uses it (and its labels) and the calibration data is all used for
    fitting. Otherwise the calibration feeds are split deterministically: feed ``i`` goes to the
    check when ``i mod k = k - 1`` with :math:`k = \mathrm{round}(1/f)` (``fraction`` *f*, default
    0.2, so every 5th feed), at most ``max_feeds`` of them; the rest are fitted on. Interleaving
    rather than a tail keeps both parts alike when the data is ordered (by class, by source). With
    fewer than ``min_feeds`` calibration feeds nothing is held out: the check then runs on the
    fitting data and says so. Without any data (a ``cluster`` or ``prune`` run without it) the check
    runs on seeded uniform random inputs and says that it is only a sanity check.

Budget (per output; all must hold)
    * an output of **class scores** (produced by Softmax/LogSoftmax, or of rank 2 with more than one
      column) passes when the top-1 decision agrees with the original on at least
      ``min_agreement`` of its positions (default 0.99);
    * any other float output passes when the cosine similarity of the flattened outputs,
      :math:`\frac{r\cdot c}{\lVert r\rVert\,\lVert c\rVert}`, is at least ``min_cosine``
      (default 0.985);
    * with labels, the accuracy of the first output may drop by at most ``max_drop`` points
      (default 1.0);
    * non-float outputs (indices, masks) must be equal wherever the original's are.

    The thresholds were chosen leave-one-model-out on the benchmark suite (``benchmarks/budget_lomo.py``):
    for each suite model, the most permissive thresholds that admit no build of the *other* models
    whose task metric fell by more than a point, then judged on the left-out model. The agreement rule
    carries across the five classifier-like models; the cosine rule is stricter than a detector's
    probability map needs (its box F1 survives cosine 0.90), which the RESULTS table shows as false
    alarms: give labels, or lower ``min_cosine`` for such outputs, when the task metric is known to be
    robust.

A run that compressed nothing (0 int8 nodes, 0 channels cut, 0 tensors clustered) never meets its
budget: there is nothing to meet it with, and the check says so and why.

When the budget is missed, the check names the worst outputs and the tensors most likely to blame
(per-layer SQNR on a few check feeds, worst first).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset, fill_free_dims, model_inputs, synthetic_feed
from onnxcomp.errors import ConfigError, DataError, OnnxcompError
from onnxcomp.passes.base import PassConfig

__all__ = ["CheckConfig", "DataSplit", "split_data", "check_model", "judge_output", "verdict_line", "SCORE_PRODUCERS"]

#: Ops whose output is a distribution over classes along the last axis.
SCORE_PRODUCERS = frozenset({"Softmax", "LogSoftmax"})
#: Ops that only move or relabel data: an output behind them keeps its producer's kind.
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast"})


@dataclasses.dataclass(frozen=True)
class CheckConfig(PassConfig):
    """How the written model is checked (see the module docstring).

    Attributes:
        enabled: run the check at all.
        fraction: share of the calibration feeds held out when no evaluation data is given.
        max_feeds: at most this many feeds are checked.
        min_feeds: with fewer calibration feeds, nothing is held out (the check says so).
        min_agreement: top-1 agreement an output of class scores must keep.
        min_cosine: cosine similarity any other float output must keep.
        max_drop: accuracy points the first output may lose, when labels are given.
        blame: how many tensors to name when the budget is missed.
    """

    enabled: bool = True
    fraction: float = 0.2
    max_feeds: int = 64
    min_feeds: int = 10
    min_agreement: float = 0.99
    min_cosine: float = 0.985
    max_drop: float = 1.0
    blame: int = 5

    def validate(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 0.5):
            raise ConfigError(f"check fraction must be in (0, 0.5], got {self.fraction!r}")
        if self.max_feeds < 1:
            raise ConfigError(f"check max_feeds must be >= 1, got {self.max_feeds!r}")
        if self.min_feeds < 2:
            raise ConfigError(f"check min_feeds must be >= 2, got {self.min_feeds!r}")
        for name in ("min_agreement", "min_cosine"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -1.0 <= value <= 1.0):
                raise ConfigError(f"check {name} must be a number in [-1, 1], got {value!r}")
        if not (isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop) and 0 <= self.max_drop <= 100):
            raise ConfigError(f"check max_drop must be in [0, 100] points, got {self.max_drop!r}")
        if self.blame < 0:
            raise ConfigError(f"check blame must be >= 0, got {self.blame!r}")

    def budget(self) -> dict[str, float]:
        return {"min_agreement": self.min_agreement, "min_cosine": self.min_cosine, "max_drop_points": self.max_drop}


@dataclasses.dataclass
class DataSplit:
    """Fitting and checking data, and how they were chosen (``describe`` is for reports)."""

    fit: Dataset | None
    check: Dataset | list[dict[str, np.ndarray]] | None
    held_out: bool
    source: str
    labels: np.ndarray | None = None
    fit_feeds: int | None = None
    check_feeds: int | None = None
    rule: str = ""

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "held_out": self.held_out, "rule": self.rule,
                "fit_feeds": self.fit_feeds, "check_feeds": self.check_feeds,
                "labels": self.labels is not None}


def split_data(
    calibration: Dataset | None,
    config: CheckConfig,
    *,
    evaluation: Dataset | None = None,
    labels: np.ndarray | None = None,
    model: ir.Model | None = None,
) -> DataSplit:
    """Choose the fitting and the checking data (module docstring: Split)."""
    if evaluation is not None:
        check = evaluation if labels is not None else evaluation.subset(lambda i: i < config.max_feeds)
        n = evaluation.num_feeds
        return DataSplit(calibration, check, True, f"evaluation data {evaluation.name}", labels,
                         calibration.num_feeds if calibration is not None else None,
                         n if labels is not None else (min(n, config.max_feeds) if n is not None else None),
                         "all evaluation feeds" if labels is not None else f"the first {config.max_feeds} evaluation feeds")
    if calibration is None:
        if model is None:
            return DataSplit(None, None, False, "none")
        feeds, why = _synthetic_feeds(model)
        if feeds is None:
            return DataSplit(None, None, False, f"none ({why})")
        return DataSplit(None, feeds, False, "seeded uniform random inputs (no data given): a sanity check only",
                         check_feeds=len(feeds), rule="8 generated feeds")
    total = calibration.num_feeds
    if total is None:
        total = sum(1 for _ in calibration)
    if total < config.min_feeds:
        return DataSplit(calibration, calibration, False, f"calibration data {calibration.name}", None, total, total,
                         f"only {total} calibration feed(s) (< {config.min_feeds}): checked on the fitting data, "
                         "not held out; give --eval data for a real check")
    k = max(2, round(1.0 / config.fraction))
    cap = config.max_feeds

    def is_check(i: int) -> bool:
        return i % k == k - 1 and i // k < cap

    check = calibration.subset(is_check, name=f"{calibration.name} (held out)")
    fit = calibration.subset(lambda i: not is_check(i), name=f"{calibration.name} (fitting part)")
    n_check = sum(1 for i in range(total) if is_check(i))
    return DataSplit(fit, check, True, f"calibration data {calibration.name}", None, total - n_check, n_check,
                     f"every {_ordinal(k)} calibration feed (index mod {k} = {k - 1}), at most {cap}, held out")


def _ordinal(k: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def _synthetic_feeds(model: ir.Model) -> tuple[list[dict[str, np.ndarray]] | None, str]:
    inputs = model_inputs(model)
    shapes, _ = fill_free_dims(inputs, {})
    try:
        return [synthetic_feed(inputs, shapes, seed=i) for i in range(8)], ""
    except DataError as exc:
        return None, str(exc)


def output_kinds(model: ir.Model) -> dict[str, str]:
    """``"scores"``, ``"values"`` or ``"exact"`` for each graph output (module docstring: Budget)."""
    kinds = {}
    for value in model.graph.outputs:
        dtype = value.dtype
        if dtype is not None and not dtype.is_floating_point():
            kinds[value.name] = "exact"
            continue
        producer = value.producer()
        while producer is not None and producer.op_type in _PASS_THROUGH and producer.inputs and producer.inputs[0] is not None:
            producer = producer.inputs[0].producer()
        shape = value.shape
        rank2 = shape is not None and len(shape) == 2 and not (isinstance(shape[1], int) and shape[1] < 2)
        if (producer is not None and producer.op_type in SCORE_PRODUCERS and producer.domain in ("", "ai.onnx")) or rank2:
            kinds[value.name] = "scores"
        else:
            kinds[value.name] = "values"
    return kinds


def judge_output(kind: str, cosine: float, agreement: float | None, max_abs: float | None,
                 config: CheckConfig) -> tuple[bool, str, str]:
    """The budget rule for one output (module docstring): ``(ok, rule, the figure judged)``."""
    if kind == "scores" and agreement is not None:
        return bool(agreement >= config.min_agreement), f"top-1 agreement >= {config.min_agreement:g}", \
            f"top-1 agreement {agreement:.4f}"
    if kind == "exact":
        return bool(max_abs == 0), "equal to the original", f"max abs difference {max_abs:g}"
    return bool(cosine >= config.min_cosine), f"cosine >= {config.min_cosine:g}", f"cosine {cosine:.4f}"


def check_model(
    reference: ir.Model,
    candidate: ir.Model,
    split: DataSplit,
    config: CheckConfig | None = None,
    *,
    compressed: int | None = None,
    what: str = "",
    nothing_why: str = "",
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Compare ``candidate`` (the model as written) with ``reference`` on the check data.

    Args:
        compressed: how many things were compressed (int8 nodes, channels cut, tensors clustered);
            0 means nothing was, and the budget is then not met.
        what: what ``compressed`` counts, for the report ("int8 nodes").
        nothing_why: why nothing was compressed, when known.

    Returns:
        A JSON-able dict: ``data`` (the split), ``budget``, ``outputs`` (per output: kind, cosine,
        SQNR, top-1 agreement, verdict), ``accuracy`` (with labels), ``met``, ``problems`` (one
        line each) and ``blame`` (worst tensors, when missed).
    """
    from onnxcomp.measure.fidelity import compare_models

    config = config or CheckConfig()
    started = time.perf_counter()
    report: dict[str, Any] = {"data": split.describe(), "budget": config.budget(), "outputs": [], "problems": [],
                              "blame": []}
    if compressed is not None:
        report["compressed"] = {"count": int(compressed), "what": what}
    if compressed == 0:
        report["problems"].append(
            f"nothing was compressed (0 {what or 'changes'})" + (f": {nothing_why}" if nothing_why else "")
        )
    if split.check is None:
        report["problems"].append(f"not checked: no data to check on ({split.source})")
        report["met"] = False
        report["checked"] = False
        report["seconds"] = time.perf_counter() - started
        return report
    data = split.check if isinstance(split.check, Dataset) else Dataset(split.check, reference)
    try:
        cmp = compare_models(reference, candidate, data, labels=split.labels, progress=progress)
    except OnnxcompError as exc:
        report["problems"].append(f"the written model could not be compared with the original: {exc}")
        report["met"] = False
        report["checked"] = False
        report["seconds"] = time.perf_counter() - started
        return report
    report["checked"] = True
    report["data"]["check_feeds"] = cmp.feeds
    report["data"]["check_samples"] = cmp.samples
    kinds = output_kinds(reference)
    from onnxcomp.measure.embedding import embedding_fidelity

    pooled = embedding_fidelity(reference, candidate, data)  # encoders: {} for other models
    for out in cmp.outputs:
        kind = kinds.get(out.name, "values")
        cosine = pooled[out.name]["pooled_cosine"] if out.name in pooled else out.cosine
        ok, rule, figure = judge_output(kind, cosine, out.top1_agreement, out.max_abs, config)
        row: dict[str, Any] = {"name": out.name, "kind": kind, "cosine": out.cosine, "sqnr_db": out.sqnr_db,
                               "top1_agreement": out.top1_agreement if kind == "scores" else None,
                               "rule": rule, "ok": ok}
        if out.name in pooled:  # judged on the mean-pooled embedding (attention mask)
            row["embedding"] = pooled[out.name]
            rule, figure = f"pooled-embedding {rule}", f"pooled-embedding {figure}"
            row["rule"] = rule
        if not ok:
            report["problems"].append(f"output {out.name!r}: {figure}, budget {rule}")
        report["outputs"].append(row)
    if cmp.accuracy:
        drop = 100.0 * (cmp.accuracy["reference"] - cmp.accuracy["candidate"])
        report["accuracy"] = {"original": cmp.accuracy["reference"], "written": cmp.accuracy["candidate"],
                              "drop_points": drop, "output": cmp.label_output}
        if drop > config.max_drop:
            report["problems"].append(
                f"accuracy {100 * cmp.accuracy['candidate']:.2f}% vs {100 * cmp.accuracy['reference']:.2f}% "
                f"(-{drop:.2f} points), budget {config.max_drop:g} points"
            )
    report["met"] = not report["problems"]
    if not report["met"] and compressed != 0 and config.blame:
        report["blame"] = _blame(reference, candidate, data, config.blame)
    report["seconds"] = time.perf_counter() - started
    return report


def _blame(reference: ir.Model, candidate: ir.Model, data: Dataset, top: int) -> list[dict[str, Any]]:
    """The ``top`` intermediate tensors with the lowest SQNR on a few check feeds (first damage)."""
    from onnxcomp.measure.fidelity import compare_models

    few = data.subset(lambda i: True)
    few.limit = 4 if few.limit is None else min(4, few.limit)
    try:
        cmp = compare_models(reference, candidate, few, per_layer=True)
    except OnnxcompError:
        return []
    return [{"tensor": f.name, "sqnr_db": f.sqnr_db, "cosine": f.cosine} for f in cmp.layers[:top]]


def verdict_line(check: dict[str, Any]) -> str:
    """One line for the terminal: the verdict, the data, and the worst figures."""
    data = check["data"]
    where = data["source"]
    if data.get("check_feeds") is not None:
        where += f", {data['check_feeds']} feed(s)"
    if not data.get("held_out") and check.get("checked"):
        where += ", NOT held out"
    if check.get("met"):
        figures = "; ".join(_figure(r) for r in check["outputs"][:4])
        acc = check.get("accuracy")
        if acc:
            figures += f"; accuracy {100 * acc['written']:.2f}% (original {100 * acc['original']:.2f}%)"
        return f"check passed on {where}: {figures}"
    problems = "; ".join(check["problems"][:3]) + (f" (+{len(check['problems']) - 3} more)" if len(check["problems"]) > 3 else "")
    blame = ""
    if check.get("blame"):
        blame = "; first damage at " + ", ".join(f"{b['tensor']!r} ({b['sqnr_db']:.1f} dB)" for b in check["blame"][:3])
    return f"CHECK FAILED on {where}: {problems}{blame}"


def _figure(row: dict[str, Any]) -> str:
    if row.get("embedding"):
        emb = row["embedding"]
        nn = f", nearest-neighbour agreement {100 * emb['nn_agreement']:.1f}%" if emb["nn_agreement"] is not None else ""
        return f"{row['name']}: pooled-embedding cosine {emb['pooled_cosine']:.4f} (min {emb['pooled_cosine_min']:.4f}){nn}"
    if row["kind"] == "scores" and row.get("top1_agreement") is not None:
        return f"{row['name']}: top-1 agreement {100 * row['top1_agreement']:.2f}%, cosine {row['cosine']:.4f}"
    if row["kind"] == "exact":
        return f"{row['name']}: {'equal' if row['ok'] else 'differs'}"
    return f"{row['name']}: cosine {row['cosine']:.4f}, SQNR {row['sqnr_db']:.1f} dB"
