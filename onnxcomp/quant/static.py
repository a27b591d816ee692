"""Static int8 quantization, the one pipeline: prepare -> plan -> calibrate -> rewrite -> correct.

Both :func:`onnxcomp.quant.api.quantize` and the sensitivity / fallback study
(:mod:`onnxcomp.quant.sensitivity`) go through these steps, so a setting means the same in both:

1. :func:`prepare` (in place on a working copy): cleanup when the config asks for it, a
   topological sort, the float-exact recovery rewrites (cross-layer equalization, SmoothQuant),
   a float copy kept for bias correction, and type inference.
2. :func:`calibrate_plan`: plan the Q/DQ points, observe their ranges on the calibration data
   once, and re-plan with the nodes those ranges cannot serve kept float (mixed-range Concats,
   coarse 8-bit grids; under ``auto`` / ``per-tensor`` decided on the min/max extent).
3. :func:`rewrite`: the Q/DQ rewrite of a plan with the calibrated ranges.
4. :func:`correct_biases`: empirical bias correction against the float copy, when asked for.

:func:`quantize_static` chains them on one working copy and returns the report section.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from onnxcomp.data import DataSource, Dataset, load_data
from onnxcomp.graph import infer_types, working_copy
from onnxcomp.io import clone_model, holds_external_data, release_pages, spill_tensors
from onnxcomp.passes.cleanup import CleanupPass
from onnxcomp.quant.calibrate import CalibrationResult, calibrate
from onnxcomp.quant.config import STATIC_MIN_OPSET, QuantizeConfig
from onnxcomp.quant.embedding import quantize_embeddings
from onnxcomp.quant.gptq import make_rounder, rounding_report
from onnxcomp.quant.qdq import QDQPass, StaticPlan, mixed_range_nodes, plan_static
from onnxcomp.quant.ranges import CandidateObserver

__all__ = [
    "STATIC_MIN_OPSET",
    "Prepared",
    "Calibrated",
    "observer_kwargs",
    "prepare",
    "calibrate_plan",
    "planning_ranges",
    "narrow_silu_ranges",
    "silu_narrowed",
    "rewrite",
    "correct_biases",
    "quantize_static",
    "quantize_bodies",
]


def observer_kwargs(config: QuantizeConfig) -> dict[str, Any]:
    """Constructor arguments of the observer the config's calibration method uses."""
    if config.calibration == "percentile":
        return {"percentile": config.percentile, "bins": config.bins, "symmetric": config.activation_symmetric}
    if config.calibration in ("entropy", "mse"):
        return {"bins": config.bins, "qdtype": config.activation_type, "symmetric": config.activation_symmetric}
    if config.calibration in ("auto", "per-tensor"):
        return {"bins": config.bins, "qdtype": config.activation_type, "symmetric": config.activation_symmetric,
                "percentile": config.percentile}
    return {}


def _chosen_counts(choices: dict[str, Any]) -> dict[str, int]:
    """How many tensors ``auto`` (or guarded entropy) gave each method's range."""
    counts: dict[str, int] = {}
    for choice in choices.values():
        counts[choice.method] = counts.get(choice.method, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


@dataclasses.dataclass
class Prepared:
    """A model made ready for static quantization (see :func:`prepare`)."""

    data: Dataset
    #: statistics of the float-exact rewrites (``equalize``, ``smoothquant``), by name
    recovery: dict[str, Any]
    #: the float model after the rewrites, for bias correction (None when it is off)
    float_model: ir.Model | None
    cleanup: dict[str, Any] | None


@dataclasses.dataclass
class Calibrated:
    """One static quantization's calibration, kept so that variants of it (some nodes in float:
    the automatic fallback, :class:`onnxcomp.quant.sensitivity.QuantStudy`) need no second one.

    ``ranges`` cover the plan without activation folding too (``for_variants``), so that a node
    kept float can expose the Relu/Clip folded into it.
    """

    #: the prepared float model before the Q/DQ rewrite (a clone; tensors shared)
    work: ir.Model
    config: QuantizeConfig
    base: StaticPlan
    plan: StaticPlan
    ranges: dict[str, tuple[float, float]]
    keep_float: dict[str, str]
    prepared: Prepared
    #: steps after the rewrite that every variant needs too (embedding tables, QAttention), in order
    finish: list[Callable[[ir.Model], object]] = dataclasses.field(default_factory=list)
    #: the prepared model with its If/Loop/Scan bodies float (``work`` holds them quantized), and
    #: the quantized bodies a variant may put back in float (onnxcomp.quant.subgraphs.branch_units)
    float_work: ir.Model | None = None
    units: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


def prepare(
    work: ir.Model, config: QuantizeConfig, calibration: DataSource | Dataset, *, cleanup: bool | None = None
) -> Prepared:
    """Step 1, in place: cleanup, sort, equalize / SmoothQuant, keep a float copy, infer types.

    ``cleanup`` overrides ``config.cleanup`` (``compress`` runs its own cleanup stage once).
    """
    run_cleanup = config.cleanup if cleanup is None else cleanup
    cleanup_stats = CleanupPass()(work).stats if run_cleanup else None
    TopologicalSortPass()(work)
    data = load_data(calibration, work, limit=config.max_samples)
    recovery: dict[str, Any] = {}
    if config.equalize:
        from onnxcomp.quant.equalize import CrossLayerEqualizationPass

        recovery["equalize"] = CrossLayerEqualizationPass()(work).stats
    if config.smoothquant:
        from onnxcomp.quant.smoothquant import SmoothQuantConfig, SmoothQuantPass

        sq = SmoothQuantConfig(
            alpha=config.smoothquant_alpha if config.smoothquant_alpha is not None else 0.5,
            search=config.smoothquant_alpha is None,
            activation_type=config.activation_type,
            activation_symmetric=config.activation_symmetric,
            per_channel=config.per_channel,
            reduce_weights=config.reduce_weights,
        )
        recovery["smoothquant"] = SmoothQuantPass(sq, data)(work).stats
    from onnxcomp.quant.outliers import split_outliers

    split = split_outliers(work, data, config, MIN_GRID_SQNR_DB)
    if split is not None:
        recovery["outliers"] = split
    float_model = clone_model(work) if config.bias_correction else None
    infer_types(work)
    return Prepared(data, recovery, float_model, cleanup_stats)


def calibrate_plan(
    work: ir.Model,
    config: QuantizeConfig,
    data: Dataset,
    *,
    for_variants: bool = False,
    progress: Callable[[int], object] | None = None,
) -> tuple[StaticPlan, StaticPlan, CalibrationResult, dict[str, str]]:
    """Step 2: plan, calibrate once, re-plan with the nodes the ranges cannot serve kept float
    (decided on :func:`planning_ranges`: one pass over the data for the coarse-grid rule).

    ``for_variants``: also observe the tensors of the plan without activation folding, so that
    variants keeping some nodes float (the sensitivity study) have every range they need.

    Returns ``(base plan, final plan, calibration, nodes kept float with their reasons)``; the
    final plan refines the base plan (no node outside it goes int8).
    """
    base = plan_static(work, config)
    if for_variants:
        unfolded = plan_static(work, dataclasses.replace(config, fold_activations=False))
        observed = sorted(set(base.touched) | set(unfolded.touched))
    else:
        observed = base.observed
    result = calibrate(work, observed, data, method=config.calibration, observer_kwargs=observer_kwargs(config),
                       progress=progress)
    plan, keep = plan_for_ranges(work, config, base, planning_ranges(config, result), data)
    # after the plan: the coarse-grid rule judges a SiLU input on its whole calibrated range
    result.silu_narrowed = narrow_silu_ranges(work, result.ranges, config)
    return base, plan, result, keep


#: The argument at which SiLU ``x * sigmoid(x)`` has its minimum, -0.2785: below it SiLU rises
#: monotonically towards 0.
_SILU_ARGMIN = -1.2785


def _silu_floor(half_step: float) -> float:
    """The largest ``lo <= _SILU_ARGMIN`` with ``|silu(lo)| <= half_step`` (bisection; SiLU is
    monotone below its argmin)."""
    silu = lambda x: x / (1.0 + np.exp(-x))  # noqa: E731
    if abs(silu(_SILU_ARGMIN)) <= half_step:
        return _SILU_ARGMIN
    lo, hi = -100.0, _SILU_ARGMIN  # |silu(-100)| ~ 4e-42: always small enough
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if abs(silu(mid)) <= half_step else (lo, mid)
    return lo


def narrow_silu_ranges(work: ir.Model, ranges: dict[str, tuple[float, float]], config: QuantizeConfig
                       ) -> dict[str, list[float]]:
    """In place: the lower bound of each SiLU input's range (``x`` of ``x * Sigmoid(x)``, read by
    nothing else) raised to where SiLU is below half a step of its output's grid.

    A convolution before a SiLU writes long negative tails (YOLOv8n: ``[-187, 181]``), where SiLU
    is flat: every ``x`` below ``lo`` gives a SiLU within half an output step of 0, which the
    output's 8-bit grid rounds to 0 whether ``x`` is clamped or not. The clamp so changes no value
    the SiLU's output can represent, and the input's grid gets finer by the share of the range the
    tail took (2-3.5x on YOLOv8n's first blocks; the SiLU Muls carried 61% of the noise the int8
    nodes add there, onnxcomp.quant.damage). Only where both ranges are known; returns
    ``{x: [calibrated lo, new lo]}``.
    """
    from onnxcomp.ops import silu_input
    from onnxcomp.quant.primitives import compute_scale_zero_point

    narrowed: dict[str, list[float]] = {}
    for node in work.graph:
        for value in node.outputs:
            mul = silu_input(value) if value.name in ranges else None
            if mul is None or mul.outputs[0].name not in ranges:
                continue
            scale, _ = compute_scale_zero_point(*ranges[mul.outputs[0].name], config.activation_type,
                                                config.activation_symmetric, config.reduce_activations)
            lo, hi = ranges[value.name]
            floor = _silu_floor(0.5 * float(scale))
            if lo < floor:
                ranges[value.name] = (floor, hi)
                narrowed[value.name] = [float(lo), floor]
    return narrowed


def silu_narrowed(work: ir.Model, ranges: dict[str, tuple[float, float]], config: QuantizeConfig
                  ) -> dict[str, tuple[float, float]]:
    """A copy of ``ranges`` with :func:`narrow_silu_ranges` applied (the argument is left as it is)."""
    out = dict(ranges)
    narrow_silu_ranges(work, out, config)
    return out


def planning_ranges(config: QuantizeConfig, result: CalibrationResult) -> dict[str, tuple[float, float]]:
    """The ranges the plan is decided on: the calibrated ones, or under ``auto`` / ``per-tensor``
    (candidate histograms) the min/max extent, so that every variant those methods compare is
    built on one plan (the nodes min/max ranges cannot serve kept float in all of them; a variant
    with more nodes in float would win on closeness and lose the speed)."""
    if config.calibration in ("auto", "per-tensor") and all(
            isinstance(o, CandidateObserver) for o in result.observers.values()):
        return {t: o.candidates()["minmax"] for t, o in result.observers.items()}
    return result.ranges


def plan_for_ranges(work: ir.Model, config: QuantizeConfig, base: StaticPlan, ranges: dict[str, tuple[float, float]],
                    data: Dataset) -> tuple[StaticPlan, dict[str, str]]:
    """``base`` with the nodes these ranges cannot serve kept float (mixed-range Concats, coarse
    8-bit grids), and those nodes with their reasons."""
    keep = mixed_range_nodes(work, base, ranges, config.max_range_ratio)
    coarse = coarse_grid_nodes(work, base, ranges, data, config)
    if config.ffn_output == "int8":  # forced: the user asked for these in int8 whatever their grid keeps
        from onnxcomp.quant.transformer import ffn_output_matmuls

        for name in ffn_output_matmuls(work):
            coarse.pop(name, None)
    keep.update(coarse)
    plan = plan_static(work, config, keep_float=keep, within=base) if keep else base
    return plan, keep


#: An activation that keeps less than this SQNR on its 8-bit grid over the calibration data (its
#: range is set by rare large values, as in a raw waveform or an STFT) keeps the int8 nodes that
#: read or write it in float. On silero-vad the STFT Conv's output keeps 22.8 dB (its input, the
#: waveform, 30.6 dB); ReLU feature maps keep 38-51 dB there, Gaussian data about 38 dB.
#: The same floor applies to the median feed (:func:`grid_sqnr`): a tensor whose scale follows
#: the input's loudness (silero-vad's STFT magnitude: 26.9 dB pooled, 22.0 dB on the median feed)
#: or whose feeds each bring their own outliers keeps its pooled SQNR from the few loud feeds that
#: set its range, while most feeds fall between the grid's steps.
MIN_GRID_SQNR_DB = 25.0
_GRID_FEEDS = 32  # calibration feeds the grid SQNR is measured on


def coarse_grid_nodes(work: ir.Model, plan: StaticPlan, ranges: dict[str, tuple[float, float]], data: Dataset,
                      config: QuantizeConfig) -> dict[str, str]:
    """int8 nodes of ``plan`` that read or write a tensor whose 8-bit grid (7-bit under
    ``activation_range="reduced"``; its calibrated range)
    keeps less than :data:`MIN_GRID_SQNR_DB` on the first calibration feeds, with the reason."""
    from onnxcomp.graph import stream_values
    from onnxcomp.quant.primitives import compute_scale_zero_point, dequantize, quantize

    qtype = config.activation_type
    params = {n: compute_scale_zero_point(*ranges[n], qtype, config.activation_symmetric, config.reduce_activations)
              for n in plan.observed if n in ranges}
    if not params:
        return {}
    power: dict[str, list[float]] = {n: [] for n in params}
    noise: dict[str, list[float]] = {n: [] for n in params}
    for values in stream_values(work, list(params), data, max_feeds=_GRID_FEEDS):
        for name, (scale, zp) in params.items():
            x = np.asarray(values[name], np.float32)
            err = dequantize(quantize(x, scale, zp, qtype), scale, zp).astype(np.float64) - x
            power[name].append(float(np.square(x, dtype=np.float64).sum()))
            noise[name].append(float(np.square(err).sum()))
    coarse = {}
    for n in params:
        pooled, median = grid_sqnr(power[n], noise[n])
        if pooled < MIN_GRID_SQNR_DB:
            coarse[n] = (f"keeps {pooled:.1f} dB on a {{bits}}-bit grid (< {MIN_GRID_SQNR_DB:g} dB: its range is set by "
                         f"rare large values)")
        elif median < MIN_GRID_SQNR_DB:
            coarse[n] = (f"keeps {median:.1f} dB on a {{bits}}-bit grid on its median calibration feed ({pooled:.1f} dB "
                         f"pooled; < {MIN_GRID_SQNR_DB:g} dB: a few loud feeds set its range, most fall between the "
                         f"grid's steps)")
    if not coarse:
        return {}
    range_of = {p.value: p.range_of for p in plan.points.values()} | {k: p.range_of for k, p in plan.points.items()}
    bits = 7 if config.reduce_activations else 8
    found: dict[str, str] = {}
    for node in work.graph:
        if node.name not in plan.nodes:
            continue
        for value in (*node.inputs, *node.outputs):
            tensor = range_of.get(value.name) if value is not None else None
            if tensor in coarse:
                found[node.name] = f"left in float: {value.name} " + coarse[tensor].format(bits=bits)
                break
    return found


def grid_sqnr(power: Sequence[float], noise: Sequence[float]) -> tuple[float, float]:
    """``(pooled, median feed)`` SQNR in dB of one tensor's grid from its per-feed signal and
    rounding-noise powers (a feed without noise counts as exact, ``inf``)."""
    p, e = np.asarray(power, np.float64), np.asarray(noise, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = 10 * np.log10(p.sum() / e.sum()) if e.sum() > 0 else math.inf
        per_feed = np.where(e > 0, 10 * np.log10(p / np.where(e > 0, e, 1.0)), math.inf)
    per_feed = np.where(p > 0, per_feed, math.inf)  # an all-zero feed has nothing to lose
    return float(pooled), float(np.median(per_feed)) if per_feed.size else math.inf


def rewrite(work: ir.Model, config: QuantizeConfig, plan: StaticPlan, ranges: dict[str, tuple[float, float]],
            rounder: Any = None) -> dict[str, Any]:
    """Step 3, in place: the Q/DQ rewrite (``rounder``: onnxcomp.quant.gptq); returns the pass's statistics.

    On a model with external data (a big one), the new int8 weights go to disk as soon as they
    are made (:func:`onnxcomp.io.spill_tensors`) and the float pages read to make them are
    dropped, so that they are not held in memory beside the float weights onnxruntime maps next.
    """
    stats = QDQPass(config, plan, ranges, rounder)(work).stats
    if holds_external_data(work):
        spill_tensors(work)
        release_pages(work)
    return stats


def correct_biases(work: ir.Model, prepared: Prepared) -> dict[str, Any] | None:
    """Step 4, in place: bias correction against the float copy (None when it is off)."""
    if prepared.float_model is None:
        return None
    from onnxcomp.quant.bias_correction import BiasCorrectionConfig, BiasCorrectionPass

    cfg = BiasCorrectionConfig(cleanup=False)
    return BiasCorrectionPass(cfg, prepared.float_model, prepared.data)(work).stats


def quantize_static(
    work: ir.Model,
    calibration: DataSource | Dataset,
    config: QuantizeConfig,
    *,
    cleanup: bool | None = None,
    progress: Callable[[int, int | None], object] | None = None,
    keep: Callable[[Calibrated], object] | None = None,
) -> dict[str, Any]:
    """The whole pipeline in place on ``work`` (already at opset >= 13); returns the report section.

    ``keep``: called with the :class:`Calibrated` state before the rewrite (the calibration then
    also observes what variants with nodes in float need), for a fallback that follows.
    """
    prepared = prepare(work, config, calibration, cleanup=cleanup)
    branches, float_bodies, units = quantize_bodies(work, prepared.data, config, for_variants=keep is not None)
    total = prepared.data.num_feeds
    base, plan, result, kept_float = calibrate_plan(
        work, config, prepared.data, for_variants=keep is not None or config.calibration in ("auto", "per-tensor"),
        progress=(lambda n: progress(n, total)) if progress else None
    )
    ranges, selected = result.ranges, None
    if config.calibration in ("auto", "per-tensor"):
        from onnxcomp.quant.select import select_ranges

        # ``plan`` is the one plan of every variant (:func:`planning_ranges`); each variant is judged
        # with the SiLU inputs narrowed, as the selected one is built
        _, ranges, selected = select_ranges(
            work, result.ranges, result.observers, prepared.data,
            lambda trial, r: rewrite(trial, config, plan, silu_narrowed(trial, r, config)),
            per_tensor=config.calibration == "per-tensor")
        ranges = silu_narrowed(work, ranges, config)
    if keep is not None:
        kept = Calibrated(clone_model(work), config, base, plan, ranges, kept_float, prepared,
                          float_work=float_bodies, units=units)
        kept.finish.extend(finish_steps(config))
        keep(kept)
    started = time.perf_counter()
    by_name = {n.name: n for n in work.graph}
    rounder = make_rounder(work, [by_name[n] for n in plan.nodes if n in by_name], prepared.data, config)
    report: dict[str, Any] = {
        "mode": "static",
        "config": config.to_dict(),
        "calibration": {"method": config.calibration, "feeds": result.feeds, "tensors": len(result.ranges),
                        "seconds": result.seconds,
                        **({"silu_narrowed": len(result.silu_narrowed)} if result.silu_narrowed else {}),
                        **({"chosen": _chosen_counts(result.choices)} if result.choices else {}),
                        **({"selected": selected} if selected else {})},
        **rewrite(work, config, plan, ranges, rounder),
        "rounding": rounding_report(rounder, started),
    }
    report["embeddings"] = quantize_embeddings(work, config)
    report["recurrent"] = quantize_recurrent(work, config)
    if branches:
        report["branches"] = branches
    if prepared.cleanup is not None:
        report["cleanup"] = prepared.cleanup
    recovery = dict(prepared.recovery)
    corrected = correct_biases(work, prepared)
    if corrected is not None:
        recovery["bias_correction"] = corrected
    if recovery:
        report["recovery"] = recovery
    return report


def quantize_bodies(work: ir.Model, data: Dataset, config: QuantizeConfig, *, for_variants: bool
                    ) -> tuple[dict[str, Any], ir.Model | None, dict[str, tuple[str, str]]]:
    """Quantize ``work``'s If branches and Loop/Scan bodies in place
    (:func:`onnxcomp.quant.subgraphs.quantize_branches`, before the main graph is calibrated).

    Returns the ``branches`` report and, with ``for_variants`` (the sensitivity study, the
    fallbacks) on a model that has subgraphs, a float copy of ``work`` taken first (the source of
    float bodies, and the float reference) and the *units*: each subgraph calibrated and kept
    quantized, named ``node/attribute`` as in the report, a candidate moved to float or kept int8
    whole. Its nodes were quantized by a calibration of their own (the body run as a model on the
    outer values captured from the main graph), so a candidate per inner node would cost one such
    calibration each, where a unit costs a graft. Otherwise ``None`` and no units.
    """
    from onnxcomp.quant.subgraphs import branch_units, quantize_branches

    float_work = clone_model(work) if for_variants and any(True for _ in work.graph.subgraphs()) else None
    branches = quantize_branches(work, data, config, _quantize_branch)
    return branches, float_work, branch_units(branches) if float_work is not None else {}


def finish_steps(config: QuantizeConfig) -> list[Callable[[ir.Model], object]]:
    """The steps :func:`quantize_static` takes after the rewrite (embedding tables, recurrent
    weights), for variants of a calibration: :class:`FinishStep` s, picklable so that a worker
    process can build a variant too."""
    return [FinishStep("embeddings", config), FinishStep("recurrent", config)]


#: Why a finish step left a node float that a variant of the fallbacks keeps float.
KEPT_FLOAT_BY_FALLBACK = "kept float by the fallback"


@dataclasses.dataclass(frozen=True)
class FinishStep:
    """One step :func:`quantize_static` takes after the Q/DQ rewrite, as a picklable function of
    the model that returns its report section: ``embeddings`` (:func:`quantize_embeddings`) or
    ``recurrent`` (:func:`quantize_recurrent`).

    Its nodes (the Gathers of the tables it quantizes, the recurrent ops it gives int8 weights)
    are candidates of the fallbacks like the Q/DQ plan's nodes: ``float_nodes`` keeps those of
    them float (excluded by exact name), and the report says why.
    """

    kind: str
    config: QuantizeConfig

    def __call__(self, model: ir.Model, float_nodes: frozenset[str] = frozenset()) -> dict[str, Any]:
        config = self.config
        if float_nodes:  # by exact name (a name may also be an op type: "LSTM")
            config = dataclasses.replace(config, exclude=(*config.exclude, *(f"re:^{re.escape(n)}$" for n in sorted(float_nodes))))
        step = quantize_embeddings if self.kind == "embeddings" else quantize_recurrent
        report = step(model, config)
        kept = report.get("recurrent_kept_float" if self.kind == "recurrent" else "skipped")
        names = {n.name for n in model.graph}
        for name in sorted(float_nodes):  # an excluded Gather is not reported at all
            if name in names and (self.kind == "embeddings" or name in kept):
                kept[name] = KEPT_FLOAT_BY_FALLBACK
        return report

    def quantized(self, report: dict[str, Any]) -> list[str]:
        """The nodes this step's ``report`` says it quantized."""
        if self.kind == "recurrent":
            return [*report.get("lstm_int8", ()), *report.get("recurrent_weight_only", ())]
        return [n for table in (report.get("tables") or {}).values() for n in table["nodes"]]


def quantize_recurrent(work: ir.Model, config: QuantizeConfig) -> dict[str, Any]:
    """LSTM/GRU/RNN weights to int8 (onnxcomp.quant.recurrent): the Q/DQ plan leaves them float, and
    an LSTM's onnxruntime kernel quantizes its activations itself, so no calibration is needed."""
    from onnxcomp.quant.recurrent import RecurrentInt8Config, RecurrentInt8Pass

    cfg = RecurrentInt8Config(exclude=config.exclude, op_types=config.op_types, reduce_weights=config.reduce_weights)
    return RecurrentInt8Pass(cfg)(work).stats


def _quantize_branch(model: ir.Model, feeds: list, config: QuantizeConfig) -> tuple[ir.Model, dict[str, Any]]:
    """An If branch as a model of its own through the whole pipeline (nested Ifs recurse)."""
    work = working_copy(model, STATIC_MIN_OPSET, allow_upgrade=True, notes=[])
    return work, quantize_static(work, feeds, config)
