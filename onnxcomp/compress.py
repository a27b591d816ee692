"""``onnxcomp.compress``: run a recipe's stages and report before/after.

Stages run in the fixed order cleanup -> prune -> cluster -> quantize -> verify -> measure (see
:mod:`onnxcomp.recipe`). The input model is never modified: the pipeline works on a clone, and the
model is upgraded to the highest opset a stage needs when the caller allows it (said in the
report).

* **verify** checks the result with ``onnx.checker``, loads it in onnxruntime and compares its
  outputs' names, dtypes and fixed dimensions with the input model's.
* **measure** reports file size, parameters, latency before and after (interleaved, with a
  bootstrap interval on the ratio) and fidelity on the evaluation data (or, said so, on the
  calibration data when there is none): per-output SQNR/cosine/top-1 agreement, per-layer SQNR,
  and accuracy of both models when labels are given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import DataSource, Dataset, load_data
from onnxcomp.errors import ConfigError, DataError, OnnxcompError
from onnxcomp.graph import working_copy
from onnxcomp.io import ModelSource, check_model, create_session, initializer_nbytes, load_model, model_to_bytes
from onnxcomp.recipe import MeasureConfig, Recipe, VerifyConfig, load_recipe

__all__ = ["compress", "verify_model", "model_facts", "needs_calibration"]

Progress = Callable[[str, int, "int | None"], object]


def _min_opset(recipe: Recipe) -> int:
    needed = 1
    quant = recipe.stages.get("quantize")
    if quant is not None:
        from onnxcomp.quant.api import STATIC_MIN_OPSET
        from onnxcomp.quant.weight_only import DYNAMIC_MIN_OPSET, QDQ_MIN_OPSET

        needed = max(needed, {
            "static": STATIC_MIN_OPSET,
            "dynamic": DYNAMIC_MIN_OPSET,
            "weight-only": QDQ_MIN_OPSET if quant.weight_only_format == "qdq" else 1,
        }[quant.mode])
    clus = recipe.stages.get("cluster")
    if clus is not None and clus.format == "codebook" and clus.k <= 16:
        needed = max(needed, 21)
    return needed


def needs_calibration(recipe: Recipe) -> bool:
    """Whether a stage of ``recipe`` needs calibration data (static quantization)."""
    quant = recipe.stages.get("quantize")
    return quant is not None and quant.mode == "static"


def model_facts(model: ir.Model) -> dict[str, Any]:
    """Size (serialized bytes when under 2 GB, else initializer bytes; the CLI replaces it with the
    bytes on disk of what it wrote), parameters (every initializer element), weight elements apart
    from quantization parameters (:func:`onnxcomp.summary.weight_counts`), node count."""
    from onnxcomp.summary import weight_counts

    params = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                params += int(value.const_value.size)
    nbytes = initializer_nbytes(model)
    try:
        size = len(model_to_bytes(model))
    except OnnxcompError:
        size = nbytes
    counts = weight_counts(model)
    return {"bytes": size, "parameters": params, "parameter_bytes": nbytes,
            "weight_elements": counts["weight_elements"], "quant_params": counts["quant_params"],
            "nodes": sum(1 for _ in model.graph.all_nodes())}


def verify_model(reference: ir.Model, candidate: ir.Model, config: VerifyConfig) -> dict[str, Any]:
    """onnx.checker, onnxruntime load, and output signature checks; raises OnnxcompError."""
    check_model(candidate)
    create_session(candidate)
    result: dict[str, Any] = {"checker": "passed", "onnxruntime_loads": True}
    if config.check_outputs:
        ref = [(v.name, v.dtype, _fixed_dims(v)) for v in reference.graph.outputs]
        cand = [(v.name, v.dtype, _fixed_dims(v)) for v in candidate.graph.outputs]
        if [r[:2] for r in ref] != [c[:2] for c in cand]:
            raise OnnxcompError(f"verify: outputs changed: {_describe(ref)} became {_describe(cand)}")
        for (name, _, rdims), (_, _, cdims) in zip(ref, cand):
            if rdims is not None and cdims is not None and any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(rdims, cdims)
            ):
                raise OnnxcompError(f"verify: output {name!r} changed shape from {rdims} to {cdims}")
        result["outputs"] = "unchanged"
    return result


def _fixed_dims(value: ir.Value) -> tuple | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def _describe(sig: list) -> str:
    return ", ".join(f"{n}:{d.name if d is not None else '?'}" for n, d, _ in sig)


def compress(
    model: ModelSource,
    recipe: Recipe | str | Mapping[str, Any],
    calibration: DataSource | Dataset | None = None,
    *,
    eval_data: DataSource | Dataset | None = None,
    labels: np.ndarray | None = None,
    allow_upgrade: bool = True,
    feeds_for_latency: list[dict[str, np.ndarray]] | None = None,
    progress: Progress | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Compress ``model`` with ``recipe``; returns the compressed model and the report.

    Args:
        model: path, bytes, ModelProto or onnx_ir.Model (never modified).
        recipe: a :class:`Recipe`, the name of a shipped recipe, a TOML path, or a mapping.
        calibration: data for stages that need it (static quantization).
        eval_data: data for the fidelity measurement (default: the calibration data, said so).
        labels: integer labels of ``eval_data`` for accuracy.
        feeds_for_latency: feeds for the latency measurement (default: from the data).
        progress: ``progress(stage, done, total)``.

    Raises:
        ConfigError (recipe, before any work), DataError, OpsetError, OnnxcompError.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    started = time.perf_counter()
    reference = load_model(model)
    notes: list[str] = []
    if needs_calibration(recipe) and calibration is None:
        raise ConfigError(f"recipe {recipe.name!r} quantizes statically and needs calibration data (--calibration)")
    # Validate data against the model before any work.
    calib_ds = load_data(calibration, reference) if calibration is not None else None
    eval_ds = load_data(eval_data, reference) if eval_data is not None else None
    if calib_ds is not None:
        calib_ds.first()
    if eval_ds is not None:
        eval_ds.first()
    work = working_copy(reference, _min_opset(recipe), allow_upgrade=allow_upgrade, notes=notes)
    stages: list[dict[str, Any]] = []

    def record(stage: str, t0: float, stats: dict[str, Any]) -> None:
        stages.append({"stage": stage, "seconds": time.perf_counter() - t0, "stats": stats})

    for stage, cfg in recipe.stages.items():
        t0 = time.perf_counter()
        if stage == "cleanup":
            from onnxcomp.passes.cleanup import CleanupPass

            record(stage, t0, CleanupPass(cfg)(work).stats)
        elif stage == "prune":
            from onnxcomp.prune.api import prune

            work, stats = prune(work, cfg, calibration=calib_ds,
                                progress=(lambda d, t: progress("prune", d, t)) if progress else None)
            record(stage, t0, stats)
        elif stage == "cluster":
            from onnxcomp.cluster.passes import ClusterPass

            cb = (lambda d, t: progress("cluster", d, t)) if progress else None
            record(stage, t0, ClusterPass(cfg, progress=cb)(work).stats)
        elif stage == "quantize":
            from onnxcomp.quant.api import quantize

            work, stats = quantize(
                work, calib_ds, cfg, allow_upgrade=allow_upgrade, eval_data=eval_ds, labels=labels,
                progress=(lambda s, d, t: progress("quantize", d, t)) if progress else None,
            )
            notes.extend(stats.pop("notes", []))
            record(stage, t0, stats)
        elif stage == "verify":
            record(stage, t0, verify_model(reference, work, cfg))
    report: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "notes": notes,
        "stages": stages,
        "before": model_facts(reference),
        "after": model_facts(work),
    }
    measure = recipe.stages.get("measure")
    if measure is not None:
        t0 = time.perf_counter()
        report["measure"] = _measure(reference, work, measure, eval_ds, calib_ds, labels, feeds_for_latency, progress)
        report["measure"]["seconds"] = time.perf_counter() - t0
    report["seconds"] = time.perf_counter() - started
    return work, report


def _measure(
    reference: ir.Model,
    candidate: ir.Model,
    cfg: MeasureConfig,
    eval_ds: Dataset | None,
    calib_ds: Dataset | None,
    labels: np.ndarray | None,
    latency_feeds: list[dict[str, np.ndarray]] | None,
    progress: Progress | None,
) -> dict[str, Any]:
    from onnxcomp.measure.bench import bench_models
    from onnxcomp.measure.fidelity import compare_models

    result: dict[str, Any] = {}
    data = eval_ds if eval_ds is not None else calib_ds
    if data is not None:
        result["data"] = (
            "the evaluation data" if eval_ds is not None else "the calibration data (no evaluation data was given)"
        )
        if eval_ds is None and labels is not None:
            raise DataError("labels were given without evaluation data (--eval)")
        if cfg.max_feeds is not None:
            data = Dataset(list(_take(data, cfg.max_feeds)), reference)
        cmp = compare_models(
            reference, candidate, data, labels=labels, per_layer=cfg.per_layer,
            progress=(lambda n: progress("fidelity", n, data.num_feeds)) if progress else None,
        )
        result["fidelity"] = cmp.to_dict()
    else:
        result["data"] = None
    if cfg.latency:
        feeds = latency_feeds
        if feeds is None:
            if data is None:
                raise DataError("latency needs inputs: give --calibration or --eval data, or --shape for generated inputs")
            feeds = list(_take(data, 8))
        rows = bench_models(
            [("before", reference), ("after", candidate)], feeds, threads=cfg.threads, runs=cfg.runs,
            time_budget=cfg.time_budget, warmup_runs=cfg.warmup_runs, warmup_seconds=cfg.warmup_seconds,
            progress=(lambda d, t: progress("latency", d, t)) if progress else None,
        )
        result["latency"] = rows
    return result


def _take(data, n: int):
    for i, feed in enumerate(data):
        if i >= n:
            break
        yield feed
