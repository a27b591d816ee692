"""The verify and measure stages: is the result a valid model, and how does it compare?

* **verify** checks the result with ``onnx.checker``, loads it in onnxruntime and compares its
  outputs' names, dtypes and fixed dimensions with the input model's.
* **measure** reports latency before and after (interleaved, with a bootstrap interval on the
  ratio) and fidelity on the held-out data (``ctx.check_data``; or, said so, on the data the stages
  fitted on when there is none): per-output SQNR/cosine/top-1 agreement, per-layer SQNR, and
  accuracy of both models when labels are given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxcomp.bounds import Range
from onnxcomp.data import Dataset
from onnxcomp.errors import DataError, OnnxcompError
from onnxcomp.io import check_model
from onnxcomp.measure.bench import LATENCY_RANGES
from onnxcomp.passes.base import PassConfig
from onnxcomp.runtime import create_session
from onnxcomp.stage import Context, Progress, Stage

__all__ = ["VerifyConfig", "MeasureConfig", "verify_model", "measure_models", "VerifyStage", "MeasureStage"]


@dataclasses.dataclass(frozen=True)
class VerifyConfig(PassConfig):
    """Checks on the compressed model: ``onnx.checker``, onnxruntime loads it, outputs unchanged.

    Attributes:
        check_outputs: the output names, dtypes and fixed dimensions must equal the input model's.
    """

    check_outputs: bool = True

    stage: ClassVar[str] = "verify"


@dataclasses.dataclass(frozen=True)
class MeasureConfig(PassConfig):
    """Before/after measurement.

    Attributes:
        latency: measure latency (interleaved, onnxruntime CPU).
        runs / warmup_runs / warmup_seconds / time_budget: latency settings (see ``onnxcomp bench``).
        threads: intra-op threads (None: physical cores).
        per_layer: rank shared intermediate tensors by SQNR in the fidelity report.
        max_feeds: evaluate fidelity on at most this many feeds (None: all).
    """

    latency: bool = True
    runs: int = 50
    warmup_runs: int = 10
    warmup_seconds: float = 0.5
    time_budget: float | None = None
    threads: int | None = None
    per_layer: bool = True
    max_feeds: int | None = None

    stage: ClassVar[str] = "measure"
    ranges: ClassVar[dict[str, Range]] = {**LATENCY_RANGES, "max_feeds": Range(int, 1)}


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


def measure_models(
    reference: ir.Model,
    candidate: ir.Model,
    cfg: MeasureConfig,
    eval_ds: Dataset | None,
    calib_ds: Dataset | None,
    labels: np.ndarray | None,
    latency_feeds: list[dict[str, np.ndarray]] | None,
    progress: Progress | None,
) -> dict[str, Any]:
    """Fidelity on the evaluation data (else the calibration data, said so) and latency."""
    from onnxcomp.measure.bench import bench_models, default_threads, explain_rows
    from onnxcomp.measure.fidelity import NothingToCompare, compare_models

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
        try:
            cmp = compare_models(
                reference, candidate, data, labels=labels, per_layer=cfg.per_layer,
                progress=(lambda n: progress("fidelity", n, data.num_feeds)) if progress else None,
            )
        except NothingToCompare as exc:  # the check says it compared nothing: a verdict, not an error
            result["fidelity"] = None
            result["fidelity_not_measured"] = str(exc)
        else:
            result["fidelity"] = cmp.to_dict()  # each output with its kind, judged as the check judges it
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
        result["threads"] = cfg.threads or default_threads()
        if _has_qdq(candidate):
            result["int8_latency"] = explain_rows(reference, candidate, rows, feeds, result["threads"])
    return result


def _has_qdq(model: ir.Model) -> bool:
    from onnxcomp.ops import QDQ_CONVERSION_OPS

    return any(node.op_type in QDQ_CONVERSION_OPS for node in model.graph.all_nodes())


def _take(data, n: int):
    for i, feed in enumerate(data):
        if i >= n:
            break
        yield feed


class VerifyStage(Stage):
    """``[verify]``: checker, onnxruntime load and output signature of the working copy."""

    name = "verify"
    config_class = VerifyConfig

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:
        return verify_model(ctx.reference, work, self.config)


class MeasureStage(Stage):
    """``[measure]``: fidelity and latency of the working copy against the input model.

    Its result is the report's ``measure`` section.
    """

    name = "measure"
    config_class = MeasureConfig
    section = "measure"

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:
        cfg = self.config
        if cfg.threads is None and ctx.threads is not None:
            cfg = dataclasses.replace(cfg, threads=ctx.threads)
        return measure_models(ctx.reference, work, cfg, ctx.check_data, ctx.fit_data, ctx.labels,
                              ctx.latency_feeds, ctx.progress)
