r"""Per-layer sensitivity and automatic float fallback to a fidelity budget.

Everything is derived from **one** calibration: the model is cleaned and planned once, ranges are
observed once, and every candidate model (one int8 node alone, or all but one) is a cheap rewrite
of the same plan with other nodes kept float. The float model's outputs on the evaluation feeds
are computed once and cached; each candidate is then one onnxruntime session and one pass over
those feeds. Candidates are evaluated through any :class:`concurrent.futures.Executor` (default:
a local process pool; a Dask cluster through :mod:`onnxcomp.executors`, which sends the shared
feeds and reference outputs to each worker once): a task is a plain function of bytes and arrays.
Candidates named by their float nodes (:meth:`QuantStudy.evaluate_variants`) are also *built*
where they are evaluated: the study's build inputs (:class:`BuildRecipe`) travel like the feeds,
are read once per worker process, and a task carries only its set of float nodes.

Metrics per candidate: output SQNR (the minimum over outputs,
:math:`10\log_{10}\sum r^2/\sum (r-c)^2` over all evaluation feeds) and, with labels, accuracy.

* **alone**: only node *u* in int8 (the rest float): the damage *u* does by itself.
* **all but u**: everything in int8 except *u*: what leaving *u* in float buys back.

Fallback (:func:`quantize_with_fallback`): quantize everything, measure; if the target
(``fidelity_target`` dB, or ``max_drop`` accuracy points with labels) is not met, rank blocks of
about sqrt(N)/2 consecutive nodes once by the noise power their nodes add, each by itself (one
run of the float graph beside the int8 one, every int8 node fed float inputs,
:func:`onnxcomp.quant.damage.ranked_blocks`),
find the fewest top-ranked blocks that meet the target by bisection (a recurrent op or an
embedding lookup that a step after the rewrite gives int8 weights is a candidate too, a block
of its own: :attr:`QuantStudy.finish_nodes`), then, by bisection again,
keep float only the fewest most damaging nodes of the last block: about
log2(2 sqrt(N)) + log2(sqrt(N)/2) evaluations, where a trial per block and per node of the last
block took about 2 sqrt(N). Below 16 candidates each is ranked by one trial in float instead
(exact; it tells apart the branches of one If, which the per-layer comparison cannot). With ``latency_aware``, op types whose int8 form is measured
slower than float on this CPU (interleaved, 95% interval above 1) are also kept float, and if
the whole int8 model is still slower than the float one, that is reported.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import pickle
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import DataSource, Dataset, eval_labels, load_data
from onnxcomp.errors import ConfigError, DataError
from onnxcomp.executors import Inline, default_executor, spawning, stop_pool
from onnxcomp.graph import working_copy
from onnxcomp.io import ModelSource, clone_model, load_model, model_to_bytes
from onnxcomp.quant import static
from onnxcomp.quant.config import STATIC_MIN_OPSET, QuantizeConfig
from onnxcomp.quant.qdq import StaticPlan, plan_static
from onnxcomp.quant.verify import int8_tensors_added
from onnxcomp.runtime import run_model, session_options

__all__ = ["BuildRecipe", "QuantStudy", "evaluate_model_bytes", "analyze_sensitivity", "quantize_with_fallback"]


def evaluate_model_bytes(
    model: bytes,
    feeds: Sequence[dict[str, np.ndarray]],
    reference: Sequence[Sequence[np.ndarray]],
    labels: np.ndarray | None = None,
    label_output: int = 0,
    outputs: tuple[list[str], dict[str, str], dict[str, str]] | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Output SQNR (min over outputs), accuracy and the check's figures of a serialized model
    against cached outputs: the one evaluator of the sensitivity study and both fallbacks.

    ``outputs``: ``(names, kinds, pooled)`` as :class:`onnxcomp.check.OutputFigures` takes them;
    the result then has ``outputs``, every output's figures as the held-out check measures them
    (judge them with :func:`onnxcomp.check.figures_meet`). ``threads``: intra-op threads (None:
    onnxruntime's default; 1 in pool workers). A plain module-level function of bytes and arrays,
    so any Executor can run it remotely.
    """
    import onnxruntime as ort

    from onnxcomp.check import OutputFigures

    session = ort.InferenceSession(model, session_options("all", threads=threads), providers=["CPUExecutionProvider"])
    figures = OutputFigures(*outputs) if outputs is not None else None
    signal = noise = None
    preds = []
    for feed, ref in zip(feeds, reference):
        outs = session.run(None, feed)
        s = np.array([float(np.sum(np.square(r, dtype=np.float64))) for r in ref])
        n = np.array([float(np.sum(np.square(o.astype(np.float64) - r))) for o, r in zip(outs, ref)])
        signal = s if signal is None else signal + s
        noise = n if noise is None else noise + n
        if figures is not None:
            figures.update(list(ref), outs, feed)
        if labels is not None:
            scores = outs[label_output]
            preds.append(scores.reshape(scores.shape[0], -1).argmax(axis=-1))
    sqnr = [math.inf if nz == 0 else (-math.inf if sg == 0 else 10 * math.log10(sg / nz)) for sg, nz in zip(signal, noise)]
    result: dict[str, Any] = {"sqnr_db": float(min(sqnr))}
    if labels is not None:
        result["accuracy"] = float(np.mean(np.concatenate(preds) == labels))
    if figures is not None:
        result["outputs"] = figures.result()
    return result


def _evaluate_shared(model: bytes, data: tuple, threads: int | None = 1) -> dict[str, Any]:
    """:func:`evaluate_model_bytes` with the shared ``(feeds, reference, labels, label_output,
    outputs)`` in one argument."""
    return evaluate_model_bytes(model, *data, threads=threads)


@dataclasses.dataclass(frozen=True)
class BuildRecipe:
    """What building a candidate of a :class:`QuantStudy` takes, as picklable data: the prepared
    model as bytes, the calibration's ranges and plan, and the finish steps as picklable
    functions. Shipped to a worker like the shared feeds; the worker reads it once
    (:func:`recipe_study`) and builds every candidate it is given from it."""

    #: names this recipe in a worker's cache (one per study)
    key: str
    work: bytes
    config: QuantizeConfig
    ranges: dict[str, tuple[float, float]]
    keep_float: dict[str, str]
    base_plan: StaticPlan | None
    finish: tuple[Callable[[ir.Model], object], ...]
    float_work: bytes | None
    units: dict[str, tuple[str, str]]
    #: the finish steps' candidates (QuantStudy.finish_nodes)
    finish_nodes: dict[str, str] = dataclasses.field(default_factory=dict)


#: the studies read from recipes in this process, by recipe key (the latest few)
_RECIPE_STUDIES: dict[str, QuantStudy] = {}
_RECIPE_LOCK = threading.Lock()
_RECIPES_KEPT = 2


def recipe_study(recipe: BuildRecipe) -> QuantStudy:
    """The study ``recipe`` describes, with no feeds (it only builds), read once per process."""
    with _RECIPE_LOCK:
        study = _RECIPE_STUDIES.get(recipe.key)
        if study is None:
            float_work = load_model(recipe.float_work, check=False) if recipe.float_work is not None else None
            study = QuantStudy(load_model(recipe.work, check=False), recipe.config, recipe.ranges, recipe.keep_float,
                               [], [], [], None, [], recipe.base_plan, None, list(recipe.finish),
                               float_work=float_work, units=recipe.units, finish_nodes=recipe.finish_nodes)
            while len(_RECIPE_STUDIES) >= _RECIPES_KEPT:
                del _RECIPE_STUDIES[next(iter(_RECIPE_STUDIES))]
            _RECIPE_STUDIES[recipe.key] = study
    return study


def _build_and_evaluate(float_nodes: frozenset[str], recipe: BuildRecipe, data: tuple,
                        threads: int | None = 1) -> dict[str, Any]:
    """The candidate with ``float_nodes`` kept float, built from ``recipe`` here, then evaluated
    (:func:`_evaluate_shared`)."""
    return _evaluate_shared(model_to_bytes(recipe_study(recipe).build(float_nodes)), data, threads)


@dataclasses.dataclass
class QuantStudy:
    """One calibration shared by every candidate: the cleaned model, its plan and its ranges."""

    work: ir.Model
    config: QuantizeConfig
    ranges: dict[str, tuple[float, float]]
    keep_float: dict[str, str]
    nodes: list[str]
    feeds: list[dict[str, np.ndarray]]
    reference: list[list[np.ndarray]]
    labels: np.ndarray | None
    notes: list[str]
    #: the plan every variant refines (its tensors are the calibrated ones)
    base_plan: StaticPlan | None = None
    #: what :func:`onnxcomp.quant.static.prepare` did (recovery statistics, float copy, data)
    prepared: static.Prepared | None = None
    #: steps after the rewrite (embedding tables, QAttention), as the quantize run took them
    finish: list[Callable[[ir.Model], object]] = dataclasses.field(default_factory=list)
    #: ``(names, kinds, pooled)``: evaluations also measure the check's figures of every output
    outputs: tuple[list[str], dict[str, str], dict[str, str]] | None = None
    #: (executor, what its tasks carry for the shared data, for the recipe), see :meth:`_shared_data`
    _shared: tuple[Any, Any, Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    #: the prepared model with every subgraph float (``work`` holds them quantized), when ``units``
    float_work: ir.Model | None = None
    #: quantized If branches and Loop/Scan bodies, by ``node/attribute``: candidates like nodes
    #: (see :func:`onnxcomp.quant.static.quantize_bodies`), each moved to float or kept int8 whole
    units: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    #: the subgraphs' report (:func:`onnxcomp.quant.subgraphs.quantize_branches`), when this study
    #: quantized them: the units, and those no calibration feed reaches (weight-only int8, no
    #: candidates: no evaluation feed reaches them either)
    branches: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: candidates the finish steps quantize (a recurrent op, an embedding Gather: name -> the
    #: step's kind, ``recurrent`` or ``embeddings``), after the plan's nodes in :attr:`nodes`
    #: (see :meth:`find_finish_nodes`)
    finish_nodes: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_calibrated(
        cls,
        calibrated: static.Calibrated,
        feeds: Sequence[dict[str, np.ndarray]],
        reference: Sequence[Sequence[np.ndarray]] | None = None,
        *,
        check_figures: bool = True,
    ) -> QuantStudy:
        """The study of a quantize run that has already calibrated (no second calibration).

        ``feeds``: the evaluation feeds; ``reference``: the float model's outputs on them
        (computed here when not given). ``check_figures``: evaluations measure the held-out
        check's figures too (:func:`evaluate_model_bytes` ``outputs``).
        """
        from onnxcomp.check import output_kinds, pooled_outputs

        work = calibrated.work
        feeds = list(feeds)
        float_work, units = calibrated.float_work, dict(calibrated.units)
        if reference is None:
            reference = run_model(float_work if float_work is not None else work, feeds)
        reference = [list(r) for r in reference]
        outputs = None
        if check_figures:
            outputs = ([v.name for v in work.graph.outputs], output_kinds(work), pooled_outputs(work))
        study = cls(work, calibrated.config, calibrated.ranges, calibrated.keep_float,
                    with_units(work, calibrated.plan.nodes, units), feeds, reference, None, [], calibrated.base,
                    calibrated.prepared, list(calibrated.finish), outputs, float_work=float_work, units=units)
        study.find_finish_nodes()
        return study

    @classmethod
    def prepare(
        cls,
        model: ModelSource,
        calibration: DataSource | Dataset,
        config: QuantizeConfig | None = None,
        *,
        eval_data: DataSource | Dataset | None = None,
        labels: np.ndarray | None = None,
        max_eval_feeds: int | None = 64,
        allow_upgrade: bool = True,
        in_place: bool = False,
    ) -> QuantStudy:
        """Prepare and calibrate once, as :func:`onnxcomp.quant.api.quantize` does (quant/static.py).

        ``in_place``: ``model`` is a working copy (an ``onnx_ir.Model`` with named nodes at opset
        >= 13) that is prepared in place; the study then works on a clone of the prepared model,
        and ``build(..., into=model)`` can write the chosen variant back into it.
        """
        config = config or QuantizeConfig()
        labels = eval_labels(labels, eval_data)
        notes: list[str] = []
        if in_place:
            if not isinstance(model, ir.Model):
                raise TypeError("in_place needs an onnx_ir.Model")
            work = model
        else:
            work = working_copy(model, STATIC_MIN_OPSET, allow_upgrade=allow_upgrade, notes=notes)
        prepared = static.prepare(work, config, calibration)
        branches, float_work, units = static.quantize_bodies(work, prepared.data, config, for_variants=True)
        base, plan, result, keep_float = static.calibrate_plan(work, config, prepared.data, for_variants=True)
        evaluation = load_data(eval_data, work) if eval_data is not None else prepared.data
        feeds = []
        for i, feed in enumerate(evaluation):
            if max_eval_feeds is not None and i >= max_eval_feeds:
                break
            feeds.append(feed)
        reference = run_model(float_work if float_work is not None else work, feeds)
        if labels is not None:
            n = sum(int(r[0].shape[0]) for r in reference)
            if labels.shape[0] < n:
                raise DataError(f"labels: {labels.shape[0]} label(s) for the {n} evaluation sample(s) read from "
                                f"{evaluation.name}")
            labels = labels[:n]
        if in_place:
            work = clone_model(work)
        # the steps quantize takes after the rewrite (static.quantize_static), so that the variants
        # are what quantize would write: embedding tables, recurrent weights
        finish = static.finish_steps(config)
        study = cls(work, config, result.ranges, keep_float, with_units(work, plan.nodes, units), feeds, reference,
                    labels, notes, base, prepared, finish, float_work=float_work, units=units, branches=branches)
        study.find_finish_nodes()
        return study

    @property
    def samples(self) -> int:
        """Evaluation samples (rows of the first output over every feed)."""
        return sum(int(r[0].shape[0]) if r and r[0].ndim else 1 for r in self.reference)

    def build(self, float_nodes: set[str] | frozenset[str] = frozenset(), *, into: ir.Model | None = None) -> ir.Model:
        """The model with every planned node in int8 except ``float_nodes``.

        ``into``: rewrite this model in place instead of a clone of the study's (it must be the
        study's prepared model or an identical copy). The finish steps' candidates
        (:attr:`finish_nodes`) in ``float_nodes`` are left float by their step. With every
        candidate in ``float_nodes`` the finish steps (recurrent weights, embedding tables,
        QAttention) are not taken at all: a fallback that keeps everything float writes the float
        model, not one that still carries their int8 tensors.
        """
        return self.build_with_reports(float_nodes, into=into)[0]

    def build_with_reports(self, float_nodes: set[str] | frozenset[str] = frozenset(), *,
                           into: ir.Model | None = None, reports_only: bool = False
                           ) -> tuple[ir.Model, dict[str, dict[str, Any]]]:
        """:meth:`build`, and the report sections of its finish steps
        (:class:`onnxcomp.quant.static.FinishStep`: ``recurrent``, ``embeddings``) by kind.
        ``reports_only``: the other finish steps (QAttention) are skipped: the model is not one
        quantize writes, only the sections count."""
        from onnxcomp.quant.subgraphs import bodies_hidden, restore_float_body

        model = clone_model(self.work) if into is None else into
        units = [self.units[u] for u in float_nodes if u in self.units] if self.float_work is not None else []
        for unit in units:  # first: the main graph is planned around the float body (what it reads)
            restore_float_body(model, self.float_work, *unit)
        keep = dict(self.keep_float)
        keep.update({n: "kept float (sensitivity)" for n in float_nodes if n not in self.finish_nodes})
        plan = plan_static(model, self.config, keep_float=keep, within=self.base_plan)
        static.rewrite(model, self.config, plan, self.ranges)
        reports: dict[str, dict[str, Any]] = {}
        if self.nodes and not set(self.nodes) - set(float_nodes):
            return model, reports  # all float: nothing for the finish steps to finish
        finish_float = frozenset(n for n in float_nodes if n in self.finish_nodes)
        with bodies_hidden(model, units):  # the steps after the rewrite (recurrent weights) reach into bodies
            for step in self.finish:
                if isinstance(step, static.FinishStep):
                    reports[step.kind] = step(model, finish_float)
                elif not reports_only:
                    step(model)
        return model, reports

    def find_finish_nodes(self) -> dict[str, str]:
        """Make the main-graph nodes the finish steps quantize in the all-int8 build (recurrent
        ops, embedding Gathers) candidates: :attr:`finish_nodes`, appended to :attr:`nodes`.
        One build; none without such steps."""
        if not any(isinstance(step, static.FinishStep) for step in self.finish):
            return self.finish_nodes
        _, reports = self.build_with_reports(reports_only=True)
        names = {n.name for n in self.work.graph}
        for step in self.finish:
            if isinstance(step, static.FinishStep) and step.kind in reports:
                for name in step.quantized(reports[step.kind]):
                    if name in names and name not in self.nodes and name not in self.finish_nodes:
                        self.finish_nodes[name] = step.kind
        self.nodes = [*self.nodes, *(n for n in self.finish_nodes if n not in self.nodes)]
        return self.finish_nodes

    def evaluate(self, models: Sequence[ir.Model], executor: concurrent.futures.Executor | None = None,
                 progress: Callable[[int, int], object] | None = None) -> list[dict[str, float]]:
        """Metrics of each model (in order), evaluated through ``executor``."""
        payloads = [model_to_bytes(m) for m in models]
        return self._run(_evaluate_shared, payloads, executor, progress, recipe=False)

    def evaluate_variants(self, float_nodes: Sequence[frozenset[str]],
                          executor: concurrent.futures.Executor | None = None,
                          progress: Callable[[int, int], object] | None = None) -> list[dict[str, float]]:
        """Metrics of the candidate with each set of nodes kept float (in order): what
        ``evaluate([self.build(s) for s in float_nodes])`` gives, with each candidate built
        where it is evaluated (from :meth:`recipe`, read once per worker), not here first.

        In process (:class:`~onnxcomp.executors.Inline`) candidates are built here, one at a
        time; when the finish steps cannot be pickled, all of them here first.
        """
        sets = [frozenset(s) for s in float_nodes]
        if isinstance(executor, Inline) or (executor is None and len(sets) <= 1):
            return self._run(self._build_here, sets, executor, progress, recipe=False)
        if not self._picklable_finish():
            return self.evaluate([self.build(s) for s in sets], executor, progress)
        return self._run(_build_and_evaluate, sets, executor, progress, recipe=True)

    def _build_here(self, float_nodes: frozenset[str], data: tuple, threads: int | None) -> dict[str, Any]:
        return _evaluate_shared(model_to_bytes(self.build(float_nodes)), data, threads)

    def _picklable_finish(self) -> bool:
        try:
            pickle.dumps(self.finish)
        except (pickle.PicklingError, AttributeError, TypeError):
            return False
        return True

    def recipe(self) -> BuildRecipe:
        """The build inputs of this study as picklable data (the models serialized)."""
        float_work = model_to_bytes(self.float_work) if self.float_work is not None else None
        return BuildRecipe(uuid.uuid4().hex, model_to_bytes(self.work), self.config, dict(self.ranges),
                           dict(self.keep_float), self.base_plan, tuple(self.finish), float_work, dict(self.units),
                           dict(self.finish_nodes))

    def _run(self, task: Callable[..., dict[str, Any]], items: Sequence[Any],
             executor: concurrent.futures.Executor | None, progress: Callable[[int, int], object] | None,
             *, recipe: bool) -> list[dict[str, Any]]:
        """``task(item, [recipe,] data, threads)`` for each item through ``executor`` (default:
        in process for one item, else a pool shut down here), results in order."""
        own = executor is None and len(items) > 1
        if executor is None:
            executor = default_executor(len(items))
        cancel = True
        try:
            # in process: onnxruntime's own threads; in workers: one each
            threads = None if isinstance(executor, Inline) else 1
            with spawning(executor):
                shared = self._shared_data(executor, recipe=recipe)
                futures = [executor.submit(task, item, *shared, threads) for item in items]
            results = []
            for i, f in enumerate(futures):
                results.append(f.result())
                if progress is not None:
                    progress(i + 1, len(futures))
            cancel = False
            return results
        finally:
            if own:
                stop_pool(executor, cancel=cancel)

    def _shared_data(self, executor: concurrent.futures.Executor, *, recipe: bool = False) -> tuple[Any, ...]:
        """Feeds, reference outputs and labels (and with ``recipe`` the :meth:`recipe`, ahead of
        them) as ``executor``'s tasks carry them: sent once per worker on Dask
        (:func:`onnxcomp.executors.share`), with each task on a process pool (where a worker
        still reads the recipe's models once)."""
        from onnxcomp.executors import share

        if self._shared is None or self._shared[0] is not executor:
            shared = (self.feeds, self.reference, self.labels, 0, self.outputs)
            self._shared = (executor, share(executor, shared), None)
        if recipe and self._shared[2] is None:
            self._shared = (*self._shared[:2], share(executor, self.recipe()))
        return (self._shared[2], self._shared[1]) if recipe else (self._shared[1],)

    @property
    def float_reference(self) -> ir.Model:
        """The prepared model all float, subgraphs included (``work`` holds quantized ones)."""
        return self.float_work if self.float_work is not None else self.work

    def float_metrics(self) -> dict[str, float]:
        return evaluate_model_bytes(model_to_bytes(self.float_reference), self.feeds, self.reference, self.labels)

    def op_type(self, name: str) -> str:
        """The op type of the candidate ``name``: a node's, or ``If subgraph`` for a unit."""
        if name in self.units:
            node = next(n for n in self.work.graph if n.name == self.units[name][0])
            return f"{node.op_type} subgraph"
        return next(n.op_type for n in self.work.graph if n.name == name)


def with_units(work: ir.Model, nodes: Sequence[str], units: dict[str, tuple[str, str]]) -> list[str]:
    """The candidates in graph order: the planned nodes, each unit where its control-flow node sits."""
    if not units:
        return list(nodes)
    order = {n.name: i for i, n in enumerate(work.graph)}
    return sorted([*nodes, *units], key=lambda c: order.get(units[c][0] if c in units else c, len(order)))


def analyze_sensitivity(
    model: ModelSource,
    calibration: DataSource | Dataset,
    config: QuantizeConfig | None = None,
    *,
    eval_data: DataSource | Dataset | None = None,
    labels: np.ndarray | None = None,
    executor: concurrent.futures.Executor | None = None,
    max_eval_feeds: int | None = 64,
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, Any]:
    """Per-node damage when quantized alone and gain when left alone in float, worst first."""
    study = QuantStudy.prepare(model, calibration, config, eval_data=eval_data, labels=labels,
                               max_eval_feeds=max_eval_feeds)
    nodes = study.nodes
    others = set(nodes)
    variants = [frozenset()]
    variants += [frozenset(others - {n}) for n in nodes]  # alone
    variants += [frozenset({n}) for n in nodes]  # all but n
    results = study.evaluate_variants(variants, executor, progress)
    full = results[0]
    alone = results[1 : 1 + len(nodes)]
    all_but = results[1 + len(nodes) :]
    rows = []
    for name, a, b in zip(nodes, alone, all_but):
        row = {"node": name, "op_type": study.op_type(name), "alone_sqnr_db": a["sqnr_db"],
               "all_but_sqnr_db": b["sqnr_db"], "gain_db": b["sqnr_db"] - full["sqnr_db"]}
        if "accuracy" in a:
            row["alone_accuracy"] = a["accuracy"]
            row["all_but_accuracy"] = b["accuracy"]
        rows.append(row)
    rows.sort(key=lambda r: (r["alone_sqnr_db"], -r["gain_db"]))
    return {
        "float": study.float_metrics(),
        "all_int8": full,
        "nodes": rows,
        "candidates_evaluated": len(variants),
        "eval_feeds": len(study.feeds),
        "notes": study.notes,
    }


def _meets(metrics: dict[str, float], base: dict[str, float], fidelity_target: float | None, max_drop: float | None) -> bool:
    ok = True
    if fidelity_target is not None:
        ok &= metrics["sqnr_db"] >= fidelity_target
    if max_drop is not None:
        ok &= (base["accuracy"] - metrics["accuracy"]) * 100 <= max_drop
    return bool(ok)


def quantize_with_fallback(
    model: ModelSource,
    calibration: DataSource | Dataset,
    config: QuantizeConfig | None = None,
    *,
    fidelity_target: float | None = None,
    max_drop: float | None = None,
    eval_data: DataSource | Dataset | None = None,
    labels: np.ndarray | None = None,
    latency_aware: bool = False,
    executor: concurrent.futures.Executor | None = None,
    max_eval_feeds: int | None = None,
    progress: Callable[[int, int], object] | None = None,
    allow_upgrade: bool = True,
    in_place: bool = False,
    threads: int | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Quantize, then move the fewest, most helpful nodes back to float until the target is met.

    Args:
        fidelity_target: minimum output SQNR in dB on the evaluation data.
        max_drop: maximum accuracy drop in points (needs ``labels`` and ``eval_data``).
        latency_aware: also keep float the op types whose int8 form is measured slower, and keep
            the whole model float when the float model is measurably faster than what is left in int8
            (int8 would cost accuracy for nothing; ``latency["int8_pays"]`` says so); with a
            target, what the target's fallback leaves in int8 is measured again.
        max_eval_feeds: judge the budget on at most this many evaluation feeds (default: all of
            them; the report's ``eval_samples`` says how many samples were used).
        allow_upgrade: upgrade a model older than opset 13 instead of refusing it.
        in_place: ``model`` is a working copy, rewritten in place and returned (see
            :meth:`QuantStudy.prepare`).
        threads: intra-op threads of the latency measurements (None: onnxruntime's default, one
            per physical core): whether int8 pays depends on it.

    Raises:
        ConfigError: neither target given, or ``max_drop`` without labels.
    """
    if fidelity_target is None and max_drop is None and not latency_aware:
        raise ConfigError("give fidelity_target (dB), max_drop (points, with labels) or latency_aware")
    if max_drop is not None and labels is None:
        raise ConfigError("quantize: max_drop is an accuracy budget and needs labels of the evaluation data (--labels, --eval)")
    study = QuantStudy.prepare(model, calibration, config, eval_data=eval_data, labels=labels,
                               max_eval_feeds=max_eval_feeds, allow_upgrade=allow_upgrade, in_place=in_place)
    base = study.float_metrics()
    fallback: list[str] = []
    moved: list[list[str]] = []  # what went float together: the slow op types, then each block
    history = []
    current = study.evaluate([study.build()], executor)[0]
    history.append({"float_nodes": [], **current})
    latency: dict[str, Any] = {}
    if latency_aware:
        slow_types, latency = _slow_op_types(study, threads)
        fallback += [n for n in study.nodes if study.op_type(n) in slow_types]
        latency["slow_nodes"] = {n: study.op_type(n) for n in fallback}  # a branch's type is 'If subgraph'
        moved.append(list(fallback))
        if fallback:
            current = study.evaluate([study.build(frozenset(fallback))], executor)[0]
            history.append({"float_nodes": list(fallback), **current})
        if not study.nodes:
            pass  # nothing to quantize: nothing to weigh against float
        elif len(fallback) == len(study.nodes):  # every op type is slower in int8
            latency["float_to_int8_ci95"] = latency["float_to_all_int8_ci95"]
            latency["int8_pays"] = False
        elif not _int8_pays(study, fallback, latency):
            current = _all_float(study, fallback, moved, history, executor)
    targets = fidelity_target is not None or max_drop is not None
    if targets and not _meets(current, base, fidelity_target, max_drop) and len(fallback) < len(study.nodes):
        # Rank blocks of consecutive nodes once by the noise their nodes add (isolated damage,
        # one run, damage.ranked_blocks), find the fewest top-ranked blocks that meet the
        # target by bisection, then keep float only the most damaging nodes of the last block the
        # target needs, by bisection too: about log2(B) + log2(block size) evaluations.
        from onnxcomp.quant.damage import ranked_blocks

        before = list(fallback)
        candidates = [n for n in study.nodes if n not in fallback]
        measured: dict[tuple[int, int], dict[str, float]] = {}
        if len(candidates) < SMALL_STUDY:
            # few candidates: rank each by what leaving it alone in float buys back (exact, and
            # it tells apart the branches of one If, which the per-layer comparison cannot)
            trials = study.evaluate_variants([frozenset(before + [n]) for n in candidates], executor)
            key = (lambda r: (r["accuracy"], r["sqnr_db"])) if max_drop is not None else (lambda r: (r["sqnr_db"],))
            order = sorted(range(len(candidates)), key=lambda i: key(trials[i]), reverse=True)
            blocks, damage = [[candidates[i]] for i in order], {}
            measured[(1, 1)] = trials[order[0]]
        else:
            blocks, damage = ranked_blocks(study, candidates, frozenset(before))

        def chosen(k: int, j: int | None = None) -> list[str]:
            """The first ``k`` blocks in float, of the ``k``-th only its ``j`` most damaging nodes."""
            last = sorted(blocks[k - 1], key=lambda n: -damage.get(n, 0.0))[:j] if k and j is not None else []
            full = blocks[:k] if j is None else blocks[:k - 1]
            return before + [n for b in full for n in b] + last

        def meets_with(k: int, j: int | None = None) -> bool:
            at = (k, len(blocks[k - 1]) if j is None else j)
            if at not in measured:
                nodes = chosen(k, j)
                measured[at] = study.evaluate([study.build(frozenset(nodes))], executor)[0]
                history.append({"float_nodes": nodes, **measured[at]})
                if progress is not None:
                    progress(len(nodes), len(study.nodes))
            return _meets(measured[at], base, fidelity_target, max_drop)

        # none of the blocks (``current``) misses; every block is taken to meet
        hi = fewest_passing(0, len(blocks), meets_with)
        meets_with(hi)
        size = len(blocks[hi - 1])
        j = size
        if size > 1 and _meets(measured[(hi, size)], base, fidelity_target, max_drop):
            # ``hi - 1`` blocks miss: keep float the fewest of the last block's worst nodes
            j = fewest_passing(0, size, lambda m: meets_with(hi, m))
        fallback = chosen(hi, j)
        moved.extend(list(b) for b in blocks[:hi - 1])
        moved.append(fallback[len(fallback) - j:])
        current = measured[(hi, j)]
        if j < size:
            history.append({"float_nodes": list(fallback), "refined": True, **current})
        if latency_aware and len(fallback) < len(study.nodes) and not _int8_pays(study, fallback, latency):
            # what the target leaves in int8 is not faster than float either
            current = _all_float(study, fallback, moved, history, executor)
    final = study.build(frozenset(fallback), into=model if in_place else None)
    recovery = dict(study.prepared.recovery)
    corrected = static.correct_biases(final, study.prepared)
    if corrected is not None:
        # the fallback decisions were taken without it; the final metrics include it
        recovery["bias_correction"] = corrected
        current = study.evaluate([final], executor)[0]
        history.append({"float_nodes": list(fallback), "bias_corrected": True, **current})
    int8_tensors = int8_tensors_added(study.float_reference, final)
    report = {
        "float": base,
        "final": current,
        "target": {"fidelity_db": fidelity_target, "max_drop_points": max_drop},
        "eval_feeds": len(study.feeds),
        "eval_samples": study.samples,
        "eval_data": "the evaluation data" if eval_data is not None else "the calibration data",
        # A model with nothing left in int8 meets no budget: there is nothing to meet it with.
        # What is left counts every int8 tensor written too: recurrent weights and embedding
        # tables, which a model without int8 nodes may still carry.
        "met": bool(len(fallback) < len(study.nodes) or int8_tensors > 0) and (_meets(current, base, fidelity_target, max_drop) if targets else True),
        "int8_tensors": int8_tensors,
        "float_nodes": fallback,
        "int8_nodes": [n for n in study.nodes if n not in fallback],
        # candidates int8 by the steps after the Q/DQ rewrite (recurrent weights, embedding tables)
        "finish_nodes": dict(study.finish_nodes),
        "history": history,
        "latency": latency,
        "notes": study.notes,
    }
    if study.branches:
        report["branches"] = branches_after(study.branches, fallback)
    if recovery:
        report["recovery"] = recovery
    if fallback and targets and len(fallback) < len(study.nodes):
        kept = set(fallback)
        report["fallback_latency"] = _fallback_latency(study, [[n for n in g if n in kept] for g in moved], threads)
    return final, report


def branches_after(branches: dict[str, Any], float_nodes: Sequence[str]) -> dict[str, Any]:
    """The subgraphs' report (``node/attribute`` -> entry) of a model in which a fallback kept
    ``float_nodes`` float: a unit among them (a calibrated subgraph) says it went back to float and
    what its int8 form was; the others (int8 units, uncalibrated subgraphs) are as they were."""
    chosen = set(float_nodes)
    return {where: (f"kept float by the fallback (in int8: {entry.get('int8_nodes', 0)} int8 node(s), "
                    f"calibrated on {entry['feeds']} feed(s))"
                    if where in chosen and isinstance(entry, dict) and entry.get("feeds") else entry)
            for where, entry in branches.items()}


#: Below this many candidate nodes the fallback ranks them by one trial each (exact); above, by
#: one per-layer comparison (the noise each node adds), in blocks.
SMALL_STUDY = 16


def fewest_passing(lo: int, hi: int, passes: Callable[[int], bool]) -> int:
    """The smallest ``k`` in ``(lo, hi]`` for which ``passes(k)``, by bisection: ``lo`` is known to
    fail, ``hi`` is taken to pass (and is returned untested when nothing below it passes)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


#: The interleaved comparisons that decide what latency-aware int8 keeps (op types, whole model).
_VERDICT_BENCH = {"runs": 60, "warmup_seconds": 0.3, "time_budget": 8.0}


def _slow_op_types(study: QuantStudy, threads: int | None = None) -> tuple[set[str], dict[str, Any]]:
    """Op types whose int8 nodes make the model slower (interleaved latency, 95% interval > 1),
    at ``threads`` intra-op threads (None: onnxruntime's default)."""
    from onnxcomp.measure.bench import default_threads

    threads = threads or default_threads()

    types = sorted({study.op_type(n) for n in study.nodes})
    variants = [("all int8", study.build())]
    variants += [(f"{t} float", study.build(frozenset(n for n in study.nodes if study.op_type(n) == t))) for t in types]
    variants.append(("float", study.float_reference))
    rows = _bench_capped(variants, study.feeds[:8], threads=threads, **_VERDICT_BENCH)
    slow = set()
    for t, row in zip(types, rows[1:-1]):
        lo, hi = row["ratio_ci95"]
        if hi < 1.0:  # leaving this type in float is faster
            slow.add(t)
    float_row = rows[-1]
    return slow, {
        "ratios_to_all_int8": {r["name"]: r["ratio_to_first"] for r in rows[1:]},
        "op_types_kept_float": sorted(slow),
        "int8_slower_than_float": bool(float_row["ratio_ci95"][1] < 1.0),
        "float_to_all_int8_ci95": list(float_row["ratio_ci95"]),
        "threads": threads,
    }


def _int8_pays(study: QuantStudy, fallback: Sequence[str], latency: dict[str, Any]) -> bool:
    """Whether the int8 model that keeps ``fallback`` float is worth keeping: the float model is not
    measurably faster than it (the float model's latency ratio to it, 95% interval, not all below
    1; the op types' rule, applied to the whole model); recorded in ``latency`` (``int8_pays``,
    ``float_to_int8_ci95``). With nothing in ``fallback`` the op-type comparison
    already measured it; otherwise one more interleaved comparison of the two, at the threads the
    op-type comparison used."""
    if not fallback:
        interval = latency["float_to_all_int8_ci95"]
    else:
        variants = [("int8", study.build(frozenset(fallback))), ("float", study.float_reference)]
        rows = _bench_capped(variants, study.feeds[:8], threads=latency["threads"], **_VERDICT_BENCH)
        interval = list(rows[1]["ratio_ci95"])
    latency["float_to_int8_ci95"] = interval
    latency["int8_pays"] = not bool(interval[1] < 1.0)
    return latency["int8_pays"]


def _all_float(study: QuantStudy, fallback: list[str], moved: list[list[str]], history: list[dict[str, Any]],
               executor: concurrent.futures.Executor | None) -> dict[str, float]:
    """Int8 costs accuracy and buys no speed here: every node joins ``fallback`` (in place), and
    the metrics of the float model that makes."""
    rest = [n for n in study.nodes if n not in fallback]
    fallback += rest
    moved.append(rest)
    current = study.evaluate([study.build(frozenset(fallback))], executor)[0]
    history.append({"float_nodes": list(fallback), "int8_does_not_pay": True, **current})
    return current


def _fallback_latency(study: QuantStudy, groups: Sequence[Sequence[str]], threads: int | None = None) -> dict[str, float]:
    """Latency ratio, relative to all int8, of leaving each group of fallback nodes (what went
    float together: one block, or the op types slower in int8) float alone.

    One comparison of at most :data:`MAX_LIVE_SESSIONS` sessions: beyond that many groups, the
    last ones are measured together.
    """
    groups = [list(g) for g in groups if g]
    most = MAX_LIVE_SESSIONS - 1
    if len(groups) > most:
        groups = groups[:most - 1] + [[n for g in groups[most - 1:] for n in g]]
    variants = [("all int8", study.build())]
    variants += [(_group_name(g), study.build(frozenset(g))) for g in groups]
    rows = _bench_capped(variants, study.feeds[:8], runs=40, warmup_seconds=0.2, threads=threads, time_budget=8.0)
    return {r["name"]: r["ratio_to_first"] for r in rows[1:]}


def _group_name(nodes: Sequence[str]) -> str:
    return nodes[0] if len(nodes) == 1 else f"{nodes[0]} .. {nodes[-1]} ({len(nodes)} nodes)"


#: Most onnxruntime sessions alive at once in a latency comparison (each holds a model's weights
#: and its thread pool).
MAX_LIVE_SESSIONS = 6


def _bench_capped(variants: list[tuple[str, ir.Model]], feeds, **kw) -> list[dict[str, Any]]:
    """:func:`~onnxcomp.measure.bench.bench_models` of ``variants`` against the first, at most
    :data:`MAX_LIVE_SESSIONS` sessions at a time (the first is measured again beside each group)."""
    from onnxcomp.measure.bench import bench_models

    first, rest = variants[0], variants[1:]
    step = MAX_LIVE_SESSIONS - 1
    rows: list[dict[str, Any]] = []
    for start in range(0, max(len(rest), 1), step):
        group = bench_models([first, *rest[start:start + step]], feeds, **kw)
        rows.extend(group if not rows else group[1:])
    return rows
