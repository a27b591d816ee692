"""``onnxcomp.quantize``: one entry point for every quantization mode.

``quantize(model, calibration, config)`` never modifies its input: it works on a clone, upgrades
an opset older than the mode needs when allowed (and says so in the report), plans, calibrates,
rewrites and finally checks which int8 kernels onnxruntime actually fuses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from onnxcomp.data import DataSource, Dataset, load_data
from onnxcomp.errors import ConfigError
from onnxcomp.graph import infer_types, working_copy
from onnxcomp.io import ModelSource, clone_model
from onnxcomp.passes.cleanup import CleanupPass
from onnxcomp.quant.calibrate import calibrate
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.qdq import QDQPass, mixed_range_nodes, plan_static
from onnxcomp.quant.verify import fusion_report

__all__ = ["quantize", "observer_kwargs"]

STATIC_MIN_OPSET = 13


def observer_kwargs(config: QuantizeConfig) -> dict[str, Any]:
    """Constructor arguments of the observer the config's calibration method uses."""
    if config.calibration == "percentile":
        return {"percentile": config.percentile, "bins": config.bins, "symmetric": config.activation_symmetric}
    if config.calibration == "entropy":
        return {"bins": config.bins, "qdtype": config.activation_type, "symmetric": config.activation_symmetric}
    if config.calibration == "mse":
        return {"bins": config.bins, "qdtype": config.activation_type, "symmetric": config.activation_symmetric}
    if config.calibration == "auto":
        return {"bins": config.bins, "qdtype": config.activation_type, "symmetric": config.activation_symmetric,
                "percentile": config.percentile}
    return {}


def _chosen_counts(choices: dict[str, Any]) -> dict[str, int]:
    """How many tensors ``auto`` gave each method's range."""
    counts: dict[str, int] = {}
    for choice in choices.values():
        counts[choice.method] = counts.get(choice.method, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _recover_before(work: ir.Model, config: QuantizeConfig, data: Dataset) -> dict[str, Any]:
    """Float-exact rewrites that make the model easier to quantize (CLE, SmoothQuant)."""
    stats: dict[str, Any] = {}
    if config.equalize:
        from onnxcomp.quant.equalize import CrossLayerEqualizationPass

        stats["equalize"] = CrossLayerEqualizationPass()(work).stats
    if config.smoothquant:
        from onnxcomp.quant.smoothquant import SmoothQuantConfig, SmoothQuantPass

        sq = SmoothQuantConfig(
            alpha=config.smoothquant_alpha if config.smoothquant_alpha is not None else 0.5,
            search=config.smoothquant_alpha is None,
            activation_type=config.activation_type,
            activation_symmetric=config.activation_symmetric,
            per_channel=config.per_channel,
        )
        stats["smoothquant"] = SmoothQuantPass(sq, data)(work).stats
    return stats


def quantize(
    model: ModelSource,
    calibration: DataSource | Dataset | None = None,
    config: QuantizeConfig | None = None,
    *,
    allow_upgrade: bool = True,
    verify: bool = True,
    eval_data: DataSource | Dataset | None = None,
    labels: Any = None,
    progress: Callable[[str, int, int | None], object] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Quantize ``model``; returns the new model and a report.

    Args:
        model: path, bytes, ModelProto or onnx_ir.Model (never modified).
        calibration: data for static mode (see :mod:`onnxcomp.data`); unused by weight-only and
            dynamic modes.
        config: a :class:`QuantizeConfig` (default: static, uint8 activations, per-channel int8
            weights, min/max ranges).
        allow_upgrade: upgrade an opset older than the mode needs instead of refusing.
        verify: count the int8 kernels in onnxruntime's optimized graph.
        eval_data / labels: evaluation data for the fidelity budget (``fidelity_target``,
            ``max_drop``); the calibration data is used when none is given.
        progress: ``progress(stage, done, total)`` while calibrating.

    Raises:
        OpsetError, DataError, ConfigError and other OnnxcompError subclasses with clear messages.
    """
    config = config or QuantizeConfig()
    notes: list[str] = []
    started = time.perf_counter()
    if config.mode == "static" and config.uses_fallback:
        if calibration is None:
            raise ConfigError("static quantization needs calibration data (--calibration)")
        from onnxcomp.quant.sensitivity import quantize_with_fallback

        work, fallback = quantize_with_fallback(
            model, calibration, config, fidelity_target=config.fidelity_target, max_drop=config.max_drop,
            eval_data=eval_data, labels=labels, latency_aware=config.latency_aware,
        )
        notes.extend(fallback.pop("notes", []))
        report = {"mode": "static", "config": config.to_dict(), "fallback": fallback,
                  "int8_nodes": len(fallback["int8_nodes"]), "skipped": {n: "kept float to meet the budget"
                                                                        for n in fallback["float_nodes"]}}
        if fallback["target"]["fidelity_db"] is not None or fallback["target"]["max_drop_points"] is not None:
            if not fallback["met"]:
                notes.append("the fidelity budget was not met even with every node in float")
    elif config.mode == "static":
        if calibration is None:
            raise ConfigError("static quantization needs calibration data (--calibration FILE)")
        work = working_copy(model, STATIC_MIN_OPSET, allow_upgrade=allow_upgrade, notes=notes)
        cleanup = CleanupPass()(work) if config.cleanup else None
        TopologicalSortPass()(work)
        data = load_data(calibration, work, limit=config.max_samples)
        recovery = _recover_before(work, config, data)
        float_model = clone_model(work) if config.bias_correction else None
        infer_types(work)
        plan = plan_static(work, config)
        total = data.num_feeds
        result = calibrate(
            work, plan.observed, data, method=config.calibration, observer_kwargs=observer_kwargs(config),
            progress=(lambda n: progress("calibrating", n, total)) if progress else None,
        )
        mixed = mixed_range_nodes(work, plan, result.ranges, config.max_range_ratio)
        if mixed:
            plan = plan_static(work, config, keep_float=mixed, within=plan)
        qdq = QDQPass(config, plan, result.ranges)
        pass_result = qdq(work)
        report: dict[str, Any] = {
            "mode": "static",
            "config": config.to_dict(),
            "calibration": {"method": config.calibration, "feeds": result.feeds, "tensors": len(result.ranges),
                            "seconds": result.seconds,
                            **({"chosen": _chosen_counts(result.choices)} if result.choices else {})},
            **pass_result.stats,
        }
        if cleanup is not None:
            report["cleanup"] = cleanup.stats
        if float_model is not None:
            from onnxcomp.quant.bias_correction import BiasCorrectionConfig, BiasCorrectionPass

            recovery["bias_correction"] = BiasCorrectionPass(BiasCorrectionConfig(cleanup=False), float_model, data)(work).stats
        if recovery:
            report["recovery"] = recovery
    else:
        from onnxcomp.quant.weight_only import quantize_dynamic_mode, quantize_weight_only_mode

        handler = quantize_weight_only_mode if config.mode == "weight-only" else quantize_dynamic_mode
        work, report = handler(model, config, allow_upgrade=allow_upgrade, notes=notes)
    if verify:
        report["onnxruntime"] = fusion_report(work)
    report["notes"] = notes
    report["seconds"] = time.perf_counter() - started
    return work, report
