"""``onnxcomp.prune``: analysis -> scores -> selection -> cut -> (reconstruction), with a report.

The three concerns stay in their modules: :mod:`onnxcomp.analysis.channels` (what is coupled),
:mod:`onnxcomp.prune.select` (how to score and what to remove), :mod:`onnxcomp.prune.fold` (how
to cut) and :mod:`onnxcomp.prune.reconstruct` (least-squares refit of the consumers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.channels import analyze_channels
from onnxcomp.analysis.cost import count_cost
from onnxcomp.data import DataSource, Dataset, fill_free_dims, load_data, model_inputs, synthetic_feed
from onnxcomp.errors import ConfigError
from onnxcomp.graph import infer_types, working_copy
from onnxcomp.io import ModelSource, clone_model, model_to_bytes
from onnxcomp.passes.base import config_argument
from onnxcomp.prune.config import PruneConfig
from onnxcomp.prune.fold import consumer_input_stats, cut_channels, kept_output_channels
from onnxcomp.prune.importance import group_scores_and_state
from onnxcomp.prune.select import eligible_groups, select_channels
from onnxcomp.prune.subgraphs import prune_subgraphs
from onnxcomp.stage import (
    Context,
    Stage,
    note_constant_calibration,
    selection_for,
)

__all__ = ["prune", "prune_in_place", "PruneStage"]


def _constant_probe(model: ir.Model) -> Dataset:
    """One generated feed to read constant channels when no data is given (dynamic dims: 1, or 32)."""
    shapes = {}
    for spec in model_inputs(model):
        if spec.shape is not None and not all(isinstance(d, int) for d in spec.shape):
            shapes[spec.name] = tuple(d if isinstance(d, int) else (1 if i == 0 else 32) for i, d in enumerate(spec.shape))
    return Dataset([synthetic_feed(model_inputs(model), shapes)], model)


def _fidelity(reference: ir.Model, candidate: ir.Model, data: Dataset) -> float:
    from onnxcomp.measure.fidelity import compare_models

    return min(f.sqnr_db for f in compare_models(reference, candidate, data).outputs)


def prune(
    model: ModelSource,
    config: PruneConfig | None = None,
    *,
    calibration: DataSource | Dataset | None = None,
    progress: Callable[[int, int | None], object] | None = None,
    check=None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Prune ``model`` (never modified); returns the pruned model and a report.

    ``check``: the :class:`onnxcomp.check.CheckConfig` of the held-out check that will judge the
    result; with a target, the combined cut meets its rule on the fitting data
    (``config.check_rule``; None: the default budget).

    Raises:
        ConfigError: the criterion or reconstruction needs calibration data and none was given.
    """
    config = config_argument(config, PruneConfig) or PruneConfig()
    notes: list[str] = []
    work = working_copy(model, 1, allow_upgrade=False, notes=notes)
    config = selection_for(work, config, notes)
    data = load_data(calibration, work) if calibration is not None else None  # one Dataset: what is read
    report = prune_in_place(work, config, calibration=data, progress=progress, check=check)
    report["notes"] = notes + report["notes"]
    note_constant_calibration(data, report, report["notes"])
    return work, report


def prune_in_place(
    work: ir.Model,
    config: PruneConfig,
    *,
    calibration: DataSource | Dataset | None = None,
    progress: Callable[[int, int | None], object] | None = None,
    serialized_sizes: bool = True,
    check=None,
) -> dict[str, Any]:
    """Prune the working copy ``work`` (named nodes) in place; returns the report.

    ``serialized_sizes``: report the serialized size before and after (two serializations;
    ``compress`` measures sizes once at the end instead). ``check``: see :func:`prune`.
    """
    from onnxcomp.passes.base import ensure_valid, known_problems

    started = time.perf_counter()
    notes: list[str] = []
    tolerated = known_problems(work, ("onnxruntime",))
    infer_types(work)
    data = load_data(calibration, work, limit=config.max_samples) if calibration is not None else None
    if config.needs_data and data is None:
        raise ConfigError(
            f"prune: criterion {config.criterion!r}{' with reconstruction' if config.reconstruct else ''} "
            "needs calibration data (--calibration)"
        )
    before = count_cost(work)
    if serialized_sizes:
        before["bytes"] = len(model_to_bytes(work))
    analysis = analyze_channels(work, infer_shapes=False)
    groups, skipped = eligible_groups(analysis, config)
    by_id = {g.id: g for g in analysis.groups}
    scoring_started = time.perf_counter()
    scores, state = group_scores_and_state(work, groups, config.criterion, data)
    timing = {"scoring": time.perf_counter() - scoring_started}
    targeted = None
    if config.target is not None:
        from onnxcomp.prune.targets import prune_to_target

        targeted = prune_to_target(work, groups, state, config, data, notes, check)
        removal = targeted.removal
    else:
        removal = select_channels(groups, config, scores)
    # Constant channels (zeros) fold exactly; lossy criteria fold the removed channels' means.
    stats = None
    cut_groups = [by_id[gid] for gid in removal]
    if cut_groups and (config.criterion == "zeros" or data is not None):
        if targeted is not None and targeted.stats is not None:
            stats = targeted.stats  # read by the planner for every group it could cut
        else:
            probe = data if data is not None else _constant_probe(work)
            stats_started = time.perf_counter()
            stats = consumer_input_stats(work, cut_groups, probe)
            timing["input_stats"] = time.perf_counter() - stats_started
    reference = clone_model(work) if config.reconstruct else None
    report: dict[str, Any] = {"config": config.to_dict(), "notes": notes}
    applied: dict[tuple, tuple] = {}

    def apply(removal: dict[int, np.ndarray], fidelity: bool = True) -> None:
        """Cut ``removal`` out of ``work`` as written (the removed channels' means folded), zero
        channels inside subgraphs, and with ``reconstruct`` refit the consumers; ``work`` is put
        back to the unpruned model first when it was cut before (the refit's back-off, whose tries
        keep the cut before the refit and measure the in-sample fidelity of the one kept only:
        ``fidelity`` False)."""
        groups_of = by_id
        if applied:  # the groups are read again from the restored graph (the same ids: the same model)
            from onnxcomp.graph import restore_model

            restore_model(work, clone_model(reference))
            groups_of = {g.id: g for g in analyze_channels(work, infer_shapes=False).groups}
        kept_outputs = kept_output_channels(groups_of, removal)
        cut = cut_channels(work, groups_of, removal, stats=stats, constant=config.criterion == "zeros",
                           fold_border=config.fold_border)
        done = {gid: removal[gid] for gid in cut["removed"]}
        inside = prune_subgraphs(work, config, prune_in_place)  # zero channels inside If/Loop/Scan bodies (exact)
        rec = None
        if config.reconstruct and done:
            from onnxcomp.prune.reconstruct import reconstruct

            nodes = sorted({c.node.name for gid in done for c in groups_of[gid].consumers})
            fidelity_started = time.perf_counter()
            before_fit = _fidelity(reference, work, data) if fidelity else clone_model(work)
            refit_started = time.perf_counter()
            fits = reconstruct(reference, work, nodes, data, ridge=config.ridge, kept_outputs=kept_outputs,
                               progress=progress)
            refit = time.perf_counter() - refit_started
            after_fit = _fidelity(reference, work, data) if fidelity else None
            timing["refit"] = timing.get("refit", 0.0) + refit
            timing["fidelity"] = timing.get("fidelity", 0.0) + time.perf_counter() - fidelity_started - refit
            rec = {
                "layers": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in f.__dict__.items()}
                           for f in fits],
                # in-sample: measured on the calibration data the refit saw (the measure stage of
                # `compress` reports held-out fidelity); a back-off's try keeps its cut model instead
                "calibration_output_sqnr_db_before": before_fit,
                "calibration_output_sqnr_db_after": after_fit,
            }
        applied[_removal_key(removal)] = (done, cut, inside, rec)

    apply(removal)
    if targeted is not None and config.reconstruct:
        # the refitted model measured whole (damage and the check's rule), backed off while it fails
        targeted.back_off_refitted(work, lambda r: apply(r, fidelity=False), notes)
        removal = targeted.removal
    removal, cut, inside, rec = applied[_removal_key(removal)]
    applied.clear()
    if rec is not None:
        if rec["calibration_output_sqnr_db_after"] is None:  # a try of the back-off: measured now, once
            fidelity_started = time.perf_counter()
            rec["calibration_output_sqnr_db_before"] = _fidelity(reference, rec["calibration_output_sqnr_db_before"], data)
            rec["calibration_output_sqnr_db_after"] = _fidelity(reference, work, data)
            timing["fidelity"] = timing.get("fidelity", 0.0) + time.perf_counter() - fidelity_started
        report["reconstruction"] = rec
    if inside:
        report["subgraphs"] = inside
    in_bodies = _removed_inside(inside)
    if removal or in_bodies:
        ensure_valid(work, None, "prune", report, tuple(c for c in ("checker", "onnxruntime") if c not in tolerated))
    if targeted is not None:
        timing["allocation"] = targeted.seconds
        report["target"] = targeted.finish(work, notes)
    after = count_cost(work)
    if serialized_sizes:
        after["bytes"] = len(model_to_bytes(work))
    report.update({
        "groups": [
            {
                "id": g.id,
                "where": _where(g),
                "channels_before": g.size,
                "channels_after": g.size - len(removal.get(g.id, ())),
                **(targeted.group_report(g.id) if targeted is not None else {}),
            }
            for g in analysis.groups if g.prunable
        ],
        "skipped_groups": {str(k): v for k, v in skipped.items()},
        "channels_removed": int(sum(len(r) for r in removal.values())) + in_bodies,
        "channels_removed_in_subgraphs": in_bodies,
        "kept_back": {str(k): v for k, v in cut["kept_back"].items()},
        "bias_folds": cut["bias_folds"],
        "border_error_folds": cut["border_error_folds"],
        "before": before,
        "after": after,
        # MACs per sample count a free dimension past the first (an image's height and width) as 1
        "macs_free_dimensions": [f"{c['input']}[{c['axis']}]" for c in fill_free_dims(model_inputs(work), {})[1]
                                 if c["axis"] > 0],
        "seconds": time.perf_counter() - started,
        "seconds_by_step": timing,
    })
    return report


class PruneStage(Stage):
    """Structured pruning of the working copy (``[prune]`` in a recipe), fitted on ``ctx.fit_data``."""

    name = "prune"
    config_class = PruneConfig

    @classmethod
    def needs_data(cls, config: PruneConfig) -> bool:
        return config.needs_data

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:
        return prune_in_place(work, self.config, calibration=ctx.fit_data, progress=ctx.progress_for(self.name),
                              serialized_sizes=False, check=ctx.check)


def _removal_key(removal: dict[int, np.ndarray]) -> tuple:
    return tuple(sorted((int(gid), tuple(int(c) for c in r)) for gid, r in removal.items()))


def _removed_inside(subgraphs: dict[str, Any]) -> int:
    """Channels removed inside subgraphs (nested ones too), from :func:`prune_subgraphs`' report."""
    return sum(int(e.get("channels_removed", 0)) + _removed_inside(e.get("subgraphs") or {})
               for e in subgraphs.values() if isinstance(e, dict))


def _where(group) -> str:
    names = [p.node.name for p in group.producers][:3]
    return ", ".join(names) if names else f"group {group.id}"
