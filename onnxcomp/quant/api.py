"""``onnxcomp.quantize``: one entry point for every quantization mode.

``quantize(model, calibration, config)`` never modifies its input: it works on a clone, upgrades
an opset older than the mode needs when allowed (and says so in the report), plans, calibrates,
rewrites and finally checks which int8 kernels onnxruntime actually fuses.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from onnxcomp.data import DataSource, Dataset, eval_labels, load_data
from onnxcomp.errors import ConfigError
from onnxcomp.graph import working_copy
from onnxcomp.passes.base import config_argument
from onnxcomp.io import ModelSource
from onnxcomp.quant.config import (
    MODE_CONFIGS, STATIC_MIN_OPSET, DynamicConfig, ModeConfig, QuantizeConfig, StaticConfig, WeightOnlyConfig,
)
from onnxcomp.quant.static import observer_kwargs, quantize_static
from onnxcomp.quant.verify import fusion_report
from onnxcomp.stage import (
    Context,
    Stage,
    note_constant_calibration,
    selection_for,
)

__all__ = ["quantize", "quantize_in_place", "QuantizeStage", "MODES", "observer_kwargs", "required_opset", "STATIC_MIN_OPSET"]


def required_opset(config: QuantizeConfig) -> int:
    """The lowest default-domain opset the config's mode writes."""
    if config.mode == "static":
        return STATIC_MIN_OPSET
    from onnxcomp.quant.weight_only import DYNAMIC_MIN_OPSET, QDQ_MIN_OPSET

    if config.mode == "dynamic":
        return DYNAMIC_MIN_OPSET
    return QDQ_MIN_OPSET if config.weight_only_format == "qdq" else DYNAMIC_MIN_OPSET


def quantize(
    model: ModelSource,
    calibration: DataSource | Dataset | None = None,
    config: QuantizeConfig | ModeConfig | None = None,
    *,
    allow_upgrade: bool = True,
    verify: bool = True,
    eval_data: DataSource | Dataset | None = None,
    labels: Any = None,
    progress: Callable[[str, int, int | None], object] | None = None,
    threads: int | None = None,
    keep: Callable[[Any], object] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Quantize ``model``; returns the new model and a report.

    Args:
        model: path, bytes, ModelProto or onnx_ir.Model (never modified).
        calibration: data for static mode (see :mod:`onnxcomp.data`); optional for weight-only and
            dynamic modes, where it gives the layer Hessians of error-compensating rounding
            (``config.rounding``: by default GPTQ for 4-bit weight-only when data is given).
        config: a :class:`QuantizeConfig` (default: static, uint8 activations, per-channel int8
            weights, min/max ranges) or one mode's config (:class:`StaticConfig`, ...).
        allow_upgrade: upgrade an opset older than the mode needs instead of refusing.
        verify: count the int8 kernels in onnxruntime's optimized graph.
        eval_data / labels: evaluation data for the fidelity budget (``fidelity_target``,
            ``max_drop``); the calibration data is used when none is given.
            ``labels``: integer class labels as an array-like or a labels file's path.
        progress: ``progress(stage, done, total)`` while calibrating.
        threads: intra-op threads of the latency-aware fallback's measurements (None:
            onnxruntime's default, one per physical core).
        keep: static mode: called with the calibration's state
            (:class:`onnxcomp.quant.static.Calibrated`) for a fallback that follows.

    Raises:
        OpsetError, DataError, ConfigError and other OnnxcompError subclasses with clear messages.
    """
    config = config_argument(config, QuantizeConfig, *MODE_CONFIGS.values())
    config = QuantizeConfig.of(config) if isinstance(config, ModeConfig) else config or QuantizeConfig()
    notes: list[str] = []
    started = time.perf_counter()
    if config.mode == "static" and calibration is None:
        raise ConfigError("static quantization needs calibration data (--calibration FILE)")
    labels = eval_labels(labels, eval_data)
    work = working_copy(model, required_opset(config), allow_upgrade=allow_upgrade, notes=notes)
    config = selection_for(work, config, notes)
    data = load_data(calibration, work) if calibration is not None else None  # one Dataset: what is read
    report = quantize_in_place(work, data, config, verify=verify, eval_data=eval_data, labels=labels,
                               progress=progress, threads=threads, keep=keep)
    report["notes"] = notes + report["notes"]
    note_constant_calibration(data, report, report["notes"])
    report["seconds"] = time.perf_counter() - started
    return work, report


def quantize_in_place(
    work: ir.Model,
    calibration: DataSource | Dataset | None,
    config: QuantizeConfig,
    *,
    cleanup: bool | None = None,
    verify: bool = True,
    eval_data: DataSource | Dataset | None = None,
    labels: Any = None,
    progress: Callable[[str, int, int | None], object] | None = None,
    threads: int | None = None,
    keep: Callable[[Any], object] | None = None,
) -> dict[str, Any]:
    """Quantize the working copy ``work`` (named nodes, opset >= :func:`required_opset`) in place.

    ``cleanup`` overrides ``config.cleanup`` (``compress`` runs cleanup as its own stage).
    Returns the report (with ``notes``).
    """
    notes: list[str] = []
    if config.mode == "static" and calibration is None:
        raise ConfigError("static quantization needs calibration data (--calibration FILE)")
    if config.mode != "weight-only" and config.weight_range == "auto" and config.reduce_weights:
        notes.append("int8 weights use 7 bits ([-63, 63]): this CPU's int8 kernels saturate full-range weights "
                     "(x86 without VNNI) and would give wrong results; weight_range='full' (--weight-range full) "
                     "for models deployed only on VNNI or ARM CPUs")
    from onnxcomp.quant.transformer import (
        ffn_output_notes,
        finish_encoder,
        keep_ffn_output_float,
        prepare_encoder,
        smooth_dynamic_encoder,
    )

    from onnxcomp.quant.embedding import quantizable_tables

    # EmbedLayerNormalization would hide the word table from embedding quantization: fuse it only
    # when no table is large enough to be quantized
    encoder = prepare_encoder(work, config.transformer, config.mode,
                              embed_layer_norm=not quantizable_tables(work, config))
    kept: list[Any] = []  # the static calibration's state, for ``keep``
    if encoder is not None and config.mode in ("dynamic", "static"):
        config = keep_ffn_output_float(work, config, encoder, notes, calibrated=calibration is not None)
        config = smooth_dynamic_encoder(work, calibration, config, encoder)
    split = None
    if config.mode == "dynamic" and calibration is not None and config.split_outliers:
        from onnxcomp.quant.outliers import split_outliers
        from onnxcomp.quant.static import MIN_GRID_SQNR_DB
        from onnxcomp.quant.transformer import keep_coarse_ffn_outputs_float

        split = split_outliers(work, load_data(calibration, work), config, MIN_GRID_SQNR_DB)
        if encoder is not None:
            config = keep_coarse_ffn_outputs_float(work, config, encoder, split)
    handler = MODES[MODE_CONFIGS[config.mode]]
    report = handler(work, calibration, config, notes=notes, cleanup=cleanup, eval_data=eval_data, labels=labels,
                     progress=progress, threads=threads, keep=kept.append if keep is not None else None)
    if split is not None:
        report.setdefault("recovery", {})["outliers"] = split
    splits = (report.get("recovery") or {}).get("outliers", {}).get("split")
    if splits:
        from onnxcomp.quant.outliers import split_note

        notes.append(split_note(splits))
    if encoder is not None:
        ffn_output_notes(encoder, report, notes)
        if kept:  # variants finish the same way
            import copy

            fresh = copy.deepcopy(encoder)
            kept[0].finish.append(lambda model: finish_encoder(model, config, copy.deepcopy(fresh), []))
        report["transformer"] = finish_encoder(work, config, encoder, notes)
    if kept:
        keep(kept[0])
    if verify:
        report["onnxruntime"] = fusion_report(work)
    report["notes"] = notes
    return report


def _static_mode(
    work: ir.Model, calibration: DataSource | Dataset | None, config: QuantizeConfig, *, notes: list[str],
    cleanup: bool | None, eval_data: DataSource | Dataset | None, labels: Any,
    progress: Callable[[str, int, int | None], object] | None, threads: int | None,
    keep: Callable[[Any], object] | None = None,
) -> dict[str, Any]:
    """Static mode: the static pipeline, or with a fidelity budget the fallback around it."""
    if not config.uses_fallback:
        return quantize_static(work, calibration, config, cleanup=cleanup,
                               progress=(lambda d, t: progress("calibrating", d, t)) if progress else None,
                               keep=keep)
    from onnxcomp.quant.sensitivity import quantize_with_fallback

    if cleanup is not None and cleanup != config.cleanup:
        config = dataclasses.replace(config, cleanup=cleanup)
    _, fallback = quantize_with_fallback(
        work, calibration, config, fidelity_target=config.fidelity_target, max_drop=config.max_drop,
        eval_data=eval_data, labels=labels, latency_aware=config.latency_aware, in_place=True,
        threads=threads,
    )
    notes.extend(fallback.pop("notes", []))
    # main-graph nodes: the int8 units' nodes are counted in their branches' sections
    main_int8 = [n for n in fallback["int8_nodes"]
                 if n not in fallback.get("branches", {}) and n not in fallback.get("finish_nodes", {})]
    report = {"mode": "static", "config": config.to_dict(), "fallback": fallback,
              "int8_nodes": len(main_int8), "skipped": _fallback_reasons(fallback)}
    for section in ("recovery", "branches"):
        if section in fallback:
            report[section] = fallback.pop(section)
    if fallback["target"]["fidelity_db"] is not None or fallback["target"]["max_drop_points"] is not None:
        if not fallback["met"] and (fallback.get("latency") or {}).get("int8_pays", True):
            notes.append("the fidelity budget was not met even with every node in float")
    return report


def _fallback_reasons(fallback: dict[str, Any]) -> dict[str, str]:
    """Why each node the fallback kept float is float."""
    lat = fallback.get("latency") or {}
    slow = lat.get("slow_nodes") or {}
    reasons = {}
    for name in fallback["float_nodes"]:
        if name in slow:
            reasons[name] = f"kept float: {slow[name]} is measured slower in int8 on this CPU"
        elif lat.get("int8_pays") is False:
            reasons[name] = "kept float: the float model is measurably faster than int8 on this CPU"
        else:
            reasons[name] = "kept float to meet the budget"
    return reasons


def _weight_only_mode(
    work: ir.Model, calibration: DataSource | Dataset | None, config: QuantizeConfig, *, notes: list[str],
    cleanup: bool | None, **_unused: Any,
) -> dict[str, Any]:
    """Weight-only mode: blockwise weights of MatMul/Gemm, then embedding tables."""
    from onnxcomp.quant.weight_only import quantize_weight_only_in_place

    report = quantize_weight_only_in_place(work, config, notes=notes, cleanup=cleanup, calibration=calibration)
    return _with_embeddings(work, config, report)


def _dynamic_mode(
    work: ir.Model, calibration: DataSource | Dataset | None, config: QuantizeConfig, *, notes: list[str],
    cleanup: bool | None, **_unused: Any,
) -> dict[str, Any]:
    """Dynamic mode: int8 weights of MatMul/Gemm (and LSTM), then embedding tables."""
    from onnxcomp.quant.weight_only import quantize_dynamic_in_place

    report = quantize_dynamic_in_place(work, config, notes=notes, cleanup=cleanup, calibration=calibration)
    return _with_embeddings(work, config, report)


def _with_embeddings(work: ir.Model, config: QuantizeConfig, report: dict[str, Any]) -> dict[str, Any]:
    from onnxcomp.io import initializer_nbytes
    from onnxcomp.quant.embedding import quantize_embeddings

    report["embeddings"] = quantize_embeddings(work, config)  # after MatMul/Gemm: tied tables
    report["model_weight_bytes_after"] = initializer_nbytes(work)
    return report


#: Each mode's config class -> its handler ``handler(work, calibration, config, *, notes, cleanup,
#: eval_data, labels, progress, threads) -> report``. The handler gets the QuantizeConfig, whose
#: fields of other modes are at their defaults (QuantizeConfig.validate refuses anything else).
MODES: dict[type[ModeConfig], Callable[..., dict[str, Any]]] = {
    StaticConfig: _static_mode,
    DynamicConfig: _dynamic_mode,
    WeightOnlyConfig: _weight_only_mode,
}


class QuantizeStage(Stage):
    """Quantization of the working copy (``[quantize]`` in a recipe), calibrated on ``ctx.fit_data``.

    The fidelity budget (``fidelity_target`` / ``max_drop``) is measured on ``ctx.check_data``.
    Its own cleanup is skipped when the cleanup stage has run.
    """

    name = "quantize"
    config_class = QuantizeConfig

    @classmethod
    def required_opset(cls, config: QuantizeConfig) -> int:
        return required_opset(config)

    @classmethod
    def needs_data(cls, config: QuantizeConfig) -> bool:
        return config.mode == "static" or config.rounding == "gptq"

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:
        progress = ctx.progress_for(self.name)
        stats = quantize_in_place(
            work, ctx.fit_data, self.config, cleanup=False if ctx.cleaned else None, eval_data=ctx.check_data,
            labels=ctx.labels, progress=(lambda _step, done, total: progress(done, total)) if progress else None,
            threads=ctx.threads,
        )
        ctx.notes.extend(stats.pop("notes", []))
        return stats
