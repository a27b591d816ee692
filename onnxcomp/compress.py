"""``onnxcomp.compress``: run a recipe's stages on one working copy and report before/after.

Stages run in the order of the stage registry (:data:`onnxcomp.recipe.STAGE_CLASSES`: cleanup ->
prune -> cluster -> quantize -> verify -> measure), each in place on **one** working copy of the
input model (see :mod:`onnxcomp.stage`). The input model is never modified; the working copy is
upgraded once to the highest opset a stage needs when the caller allows it (said in the report).
Cleanup runs once: a later stage that would clean up on its own skips it after the cleanup stage.
Sizes come from one serialization of the result at the end (:func:`model_facts`).

The verify and measure stages are described in :mod:`onnxcomp.measure.stages`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import DataSource, Dataset, describe_free_dims, eval_labels, generated_feeds, load_data
from onnxcomp.errors import ConfigError, DataError, OnnxcompError
from onnxcomp.graph import parameter_nbytes, weight_tensors, working_copy
from onnxcomp.io import ModelSource, holds_external_data, load_model, model_to_bytes
from onnxcomp.measure.stages import verify_model
from onnxcomp.recipe import STAGE_CLASSES, Recipe, load_recipe
from onnxcomp.stage import (
    Context,
    Progress,
    Stage,
    note_constant_calibration,
    selection_for,
)

__all__ = ["compress", "verify_model", "model_facts", "needs_calibration"]


def needs_calibration(recipe: Recipe) -> bool:
    """Whether ``recipe`` quantizes statically (which always needs calibration data).

    Pruning says itself which of its criteria need data (``PruneStage.needs_data``).
    """
    quant = recipe.stages.get("quantize")
    return quant is not None and STAGE_CLASSES["quantize"].needs_data(quant)


def model_facts(model: ir.Model) -> dict[str, Any]:
    """Size (serialized bytes when under 2 GB without external data, else initializer bytes; the CLI replaces it with the
    bytes on disk of what it wrote), parameters (every initializer element and the tensors held by
    Constant nodes, paddle2onnx's weights), weight elements apart from quantization parameters
    (:func:`onnxcomp.summary.weight_counts`), node count."""
    from onnxcomp.summary import weight_counts

    params = sum(int(tensor.size) for _, tensor in weight_tensors(model))
    nbytes = parameter_nbytes(model)
    size = nbytes
    if not holds_external_data(model):  # inlining external data to count it would hold it twice
        try:
            size = len(model_to_bytes(model))
        except OnnxcompError:
            pass
    counts = weight_counts(model)
    return {"bytes": size, "parameters": params, "parameter_bytes": nbytes,
            "weight_elements": counts["weight_elements"], "quant_params": counts["quant_params"],
            "nodes": sum(1 for _ in model.graph.all_nodes())}


def compress(
    model: ModelSource,
    recipe: Recipe | str | Mapping[str, Any],
    calibration: DataSource | Dataset | None = None,
    *,
    eval_data: DataSource | Dataset | None = None,
    labels: Any = None,
    allow_upgrade: bool = True,
    feeds_for_latency: list[dict[str, np.ndarray]] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
    threads: int | None = None,
    check=None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Compress ``model`` with ``recipe``; returns the compressed model and the report.

    Args:
        model: path, bytes, ModelProto or onnx_ir.Model (never modified).
        recipe: a :class:`Recipe`, the name of a shipped recipe, a TOML path, or a mapping.
        calibration: data for stages that need it (static quantization).
        eval_data: data for the fidelity measurement (default: the calibration data, said so).
        labels: integer labels of ``eval_data`` for accuracy: an array-like (``[N]`` or ``[N, 1]``) or
            the path of a labels file (.npy, or .npz with a ``labels`` key).
        feeds_for_latency: feeds for the latency measurement (default: from the data; without
            data, seeded generated inputs, :func:`onnxcomp.data.generated_feeds`: free dimensions
            as ``shapes`` sets them, else what a weight reads there or 1, said in the notes and in
            ``free_dims``), checked against the model's inputs before any work.
        shapes: ``{input: shape}`` of generated latency inputs (the CLI's ``--shape``).
        progress: ``progress(stage, done, total)``.
        threads: intra-op threads of latency measurements and latency-driven decisions (the measure
            stage, a latency-aware quantize stage); None: the stage's own setting, else
            onnxruntime's default (one per physical core).
        check: the :class:`onnxcomp.check.CheckConfig` of the held-out check that will judge the
            result (the CLI's): a prune target's combined cut meets its rule on the fitting data
            (None: the default budget).

    Raises:
        ConfigError (recipe, before any work), DataError, OpsetError, OnnxcompError.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    started = time.perf_counter()
    reference = load_model(model)
    stages = [STAGE_CLASSES[name](cfg) for name, cfg in recipe.stages.items()]
    if needs_calibration(recipe) and calibration is None:
        raise ConfigError(f"recipe {recipe.name!r} quantizes statically and needs calibration data (--calibration)")
    labels = eval_labels(labels, eval_data)
    # Validate data against the model before any work.
    calib_ds = load_data(calibration, reference) if calibration is not None else None
    eval_ds = load_data(eval_data, reference) if eval_data is not None else None
    if calib_ds is not None:
        calib_ds.first()
    if eval_ds is not None:
        eval_ds.first()
        eval_ds.check_labels(labels)
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a callable progress(stage, done, total), got {type(progress).__name__}")
    feeds_for_latency, free_dims = _latency_feeds(reference, recipe, feeds_for_latency, shapes,
                                                  has_data=calib_ds is not None or eval_ds is not None)
    ctx = Context(reference, fit_data=calib_ds, check_data=eval_ds, labels=labels, allow_upgrade=allow_upgrade,
                  progress=progress, latency_feeds=feeds_for_latency, threads=threads, check=check)
    opset = max((stage.required_opset(stage.config) for stage in stages), default=1)
    work = working_copy(reference, opset, allow_upgrade=allow_upgrade, notes=ctx.notes)
    for name, stage in zip(recipe.stages, stages):
        stage.config = selection_for(work, stage.config, ctx.notes, name)
    records = run_stages(work, stages, ctx)
    note_constant_calibration(ctx.fit_data, ctx.report, ctx.notes)
    if free_dims:
        ctx.notes[:0] = [f"latency inputs: {line}" for line in describe_free_dims(free_dims)]
    report: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        **({"free_dims": free_dims} if free_dims else {}),
        "notes": ctx.notes,
        "stages": records,
        "before": model_facts(reference),
        "after": model_facts(work),
        **ctx.report,
    }
    report["seconds"] = time.perf_counter() - started
    return work, report


def _latency_feeds(model: ir.Model, recipe: Recipe, feeds: Any, shapes: Mapping[str, tuple[int, ...]] | None,
                   *, has_data: bool) -> tuple[list[dict[str, np.ndarray]] | None, list[dict[str, Any]]]:
    """The measure stage's latency feeds, checked against ``model`` now (names, dtypes, shapes,
    NaN): ``feeds`` as given, else generated ones when no data is given (the free dimensions
    set are returned), else None (the stage takes them from the data)."""
    if feeds is not None:
        try:
            return list(Dataset(feeds, model)), []
        except DataError as exc:
            raise DataError(f"feeds_for_latency: {exc}") from None
    measure = recipe.stages.get("measure")
    if has_data or measure is None or not getattr(measure, "latency", False):
        return None, []
    return generated_feeds(model, shapes)


def run_stages(work: ir.Model, stages: list[Stage], ctx: Context) -> list[dict[str, Any]]:
    """Run ``stages`` in order in place on ``work``; returns the ``stages`` records of the report.

    A stage with a ``section`` puts its statistics (with ``seconds``) into ``ctx.report`` instead.
    """
    records: list[dict[str, Any]] = []
    for stage in stages:
        t0 = time.perf_counter()
        stats = stage.run(work, ctx)
        seconds = time.perf_counter() - t0
        if stage.section is not None:
            ctx.report[stage.section] = {**stats, "seconds": seconds}
        else:
            records.append({"stage": stage.name, "seconds": seconds, "stats": stats})
        ctx.done.append(stage.name)
    return records
