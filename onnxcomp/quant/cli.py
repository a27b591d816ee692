"""``onnxcomp quantize``: static (Q/DQ from calibration), weight-only (int8/int4 blocks) or dynamic."""

from __future__ import annotations

import argparse
import os

from onnxcomp.cli import add_output_flags, console, file_bytes, fmt_size, print_json, progress_bar, register
from onnxcomp.errors import ConfigError

__all__: list[str] = []


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the quantized model")
    p.add_argument("--calibration", metavar="FILE", help="calibration data: .npz file or folder (static mode)")
    p.add_argument("--mode", choices=("static", "weight-only", "dynamic"), default="static")
    p.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8",
                   help="activation type (default uint8: onnxruntime's fast path on x86)")
    p.add_argument("--symmetric-activations", action="store_true")
    p.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor instead of per channel")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy", "mse", "auto"), default="minmax",
                   help="calibration range method (default minmax); auto: per tensor, the candidate range "
                        "whose consumers' outputs err least on the calibration data")
    p.add_argument("--percentile", type=float, default=99.999)
    p.add_argument("--exclude", action="append", default=[], metavar="NAME|OP|re:REGEX",
                   help="leave matching nodes in float (repeatable)")
    p.add_argument("--op-types", help="comma-separated op types to quantize (default: all known)")
    p.add_argument("--quantize-outputs", action="store_true", help="also quantize tensors that are graph outputs")
    p.add_argument("--no-fold", action="store_true", help="keep Relu/Clip nodes instead of folding them into ranges")
    p.add_argument("--no-cleanup", action="store_true", help="skip BatchNorm fusion and constant folding first")
    p.add_argument("--max-samples", type=int, help="calibrate on at most this many feeds")
    p.add_argument("--batch-size", type=int, help="samples per calibration feed (dynamic batch dimension)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="weight-only bits (default 4)")
    p.add_argument("--block-size", type=int, default=32, help="weight-only block size (default 32)")
    p.add_argument("--format", choices=("qdq", "ort"), default="qdq",
                   help="weight-only storage: blocked DequantizeLinear (opset 21) or onnxruntime MatMulNBits")
    p.add_argument("--no-upgrade", action="store_true", help="refuse instead of upgrading an old opset")
    p.add_argument("--equalize", action="store_true", help="cross-layer equalization first (exact in float)")
    p.add_argument("--smoothquant", action="store_true", help="migrate activation outliers into MatMul/Gemm weights")
    p.add_argument("--bias-correction", action="store_true", help="correct each layer's mean output error afterwards")
    p.add_argument("--fidelity-target", type=float, metavar="SQNR_DB",
                   help="move the most sensitive nodes back to float until the output SQNR reaches this")
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="the same with an accuracy budget (needs --eval and --labels)")
    p.add_argument("--latency-aware", action="store_true",
                   help="keep float the op types whose int8 form is measured slower on this CPU")
    p.add_argument("--eval", metavar="FILE", help="evaluation data for the fidelity budget")
    p.add_argument("--labels", metavar="FILE.npy", help="labels of the evaluation data (--max-drop)")
    add_output_flags(p)


def _run(args: argparse.Namespace) -> int:
    from onnxcomp.data import Dataset, load_labels
    from onnxcomp.io import check_target, initializer_nbytes, load_model, save_model
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    con = console(args)
    config = QuantizeConfig(
        mode=args.mode,
        activation_type=args.activation_type,
        activation_symmetric=args.symmetric_activations,
        per_channel=not args.per_tensor,
        calibration=args.method,
        percentile=args.percentile,
        op_types=tuple(t.strip() for t in args.op_types.split(",") if t.strip()) if args.op_types else (),
        exclude=tuple(args.exclude),
        quantize_outputs=args.quantize_outputs,
        fold_activations=not args.no_fold,
        cleanup=not args.no_cleanup,
        max_samples=args.max_samples,
        bits=args.bits,
        block_size=args.block_size,
        weight_only_format=args.format,
        equalize=args.equalize,
        smoothquant=args.smoothquant,
        bias_correction=args.bias_correction,
        fidelity_target=args.fidelity_target,
        max_drop=args.max_drop,
        latency_aware=args.latency_aware,
    )
    if args.mode == "static" and not args.calibration:
        raise ConfigError("static quantization needs --calibration FILE (or use --mode weight-only/dynamic)")
    model = load_model(args.model)
    check_target(model, args.output)
    calibration = None
    if args.calibration:
        calibration = Dataset(args.calibration, model, batch_size=args.batch_size, limit=args.max_samples)
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --eval (the evaluation data they label)")
    with progress_bar(con) as progress:
        task = progress.add_task("calibrating", total=calibration.num_feeds if calibration else None)
        quantized, report = quantize(
            model, calibration, config, allow_upgrade=not args.no_upgrade, eval_data=evaluation, labels=labels,
            progress=lambda stage, done, total: progress.update(task, completed=done, total=total),
        )
    out = save_model(quantized, args.output)
    report["input"] = {"path": args.model, "bytes": file_bytes(args.model), "parameter_bytes": initializer_nbytes(model)}
    report["output"] = {"path": str(out), "bytes": file_bytes(out), "parameter_bytes": initializer_nbytes(quantized)}
    if args.json:
        print_json(report)
        return 0
    for note in report.get("notes", []):
        con.print(f"[yellow]note:[/yellow] {note}")
    ort = report.get("onnxruntime", {})
    con.print(
        f"[bold]{os.path.basename(args.model)}[/bold] -> {out} ({args.mode}): "
        f"{fmt_size(report['input']['bytes'])} -> {fmt_size(report['output']['bytes'])}"
    )
    fallback = report.get("fallback")
    if fallback:
        final = fallback["final"]
        acc = f", accuracy {100 * final['accuracy']:.2f}% (float {100 * fallback['float']['accuracy']:.2f}%)" if "accuracy" in final else ""
        con.print(f"fidelity budget {'met' if fallback['met'] else 'NOT met'}: output SQNR {final['sqnr_db']:.2f} dB{acc}; "
                  f"{len(fallback['int8_nodes'])} node(s) int8, {len(fallback['float_nodes'])} kept float")
        for name, ratio in (fallback.get("fallback_latency") or {}).items():
            con.print(f"  {name}: float costs {100 * (1 / ratio - 1):+.1f}% speed (latency ratio {ratio:.3f} vs all int8)")
        lat = fallback.get("latency") or {}
        if lat.get("op_types_kept_float"):
            con.print(f"  op types kept float because int8 was slower here: {', '.join(lat['op_types_kept_float'])}")
        if lat.get("int8_slower_than_float"):
            con.print("  [yellow]int8 does not pay on this model on this CPU: the float model is faster[/yellow]")
    if args.mode == "static" and "calibration" in report:
        con.print(
            f"calibration: {report['calibration']['method']} on {report['calibration']['feeds']} feed(s), "
            f"{report['calibration']['tensors']} tensors, {report['calibration']['seconds']:.2f} s"
            + (f" (ranges chosen: {', '.join(f'{k} {v}' for k, v in report['calibration']['chosen'].items())})"
               if report["calibration"].get("chosen") else "")
        )
        con.print(
            f"int8 nodes planned: {report['int8_nodes']}, Relu/Clip folded: {report['folded_activations']}, "
            f"weights quantized: {report['quantized_weights']}, int32 biases: {report['quantized_biases']}"
        )
    if ort:
        by_op = ", ".join(f"{op} x{n}" for op, n in ort["int8_by_op"].items()) or "none"
        left = ", ".join(f"{op} x{n}" for op, n in ort["float_by_op"].items()) or "none"
        con.print(f"onnxruntime runs {ort['int8_kernels']} int8 kernel(s): {by_op}; float compute left: {left}")
    skipped = report.get("skipped") or {}
    if skipped:
        con.print(f"left in float ({len(skipped)}):")
        for name, reason in list(skipped.items())[:20]:
            con.print(f"  {name}: {reason}")
        if len(skipped) > 20:
            con.print(f"  ... and {len(skipped) - 20} more (--json lists all)")
    return 0


register("quantize", "quantize a model: static int8 Q/DQ, weight-only int8/int4, or dynamic", _configure, _run)


def _configure_sensitivity(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--calibration", required=True, metavar="FILE")
    p.add_argument("--eval", metavar="FILE", help="evaluation data (default: the calibration data)")
    p.add_argument("--labels", metavar="FILE.npy", help="labels of the evaluation data: accuracy per candidate")
    p.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy", "mse", "auto"), default="minmax")
    p.add_argument("--per-tensor", action="store_true")
    p.add_argument("--max-eval-feeds", type=int, default=64)
    p.add_argument("--workers", type=int, help="processes evaluating candidates (default: physical cores)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--top", type=int, default=20)
    add_output_flags(p)


def _run_sensitivity(args: argparse.Namespace) -> int:
    import concurrent.futures
    import multiprocessing

    from onnxcomp.data import Dataset, load_labels
    from onnxcomp.io import load_model
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import analyze_sensitivity

    con = console(args)
    model = load_model(args.model)
    config = QuantizeConfig(activation_type=args.activation_type, calibration=args.method, per_channel=not args.per_tensor)
    calibration = Dataset(args.calibration, model, batch_size=args.batch_size)
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --eval (the evaluation data they label)")
    executor = None
    if args.workers:
        executor = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        with progress_bar(con) as progress:
            task = progress.add_task("candidates", total=None)
            report = analyze_sensitivity(
                model, calibration, config, eval_data=evaluation, labels=labels, executor=executor,
                max_eval_feeds=args.max_eval_feeds,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    finally:
        if executor is not None:
            executor.shutdown()
    if args.json:
        print_json(report)
        return 0
    from rich.table import Table

    full = report["all_int8"]
    acc = "accuracy" in full
    table = Table(title=f"sensitivity of {os.path.basename(args.model)}: all int8 {full['sqnr_db']:.2f} dB"
                        + (f", accuracy {100 * full['accuracy']:.2f}% (float {100 * report['float']['accuracy']:.2f}%)" if acc else ""),
                  title_justify="left")
    cols = ["node", "op", "alone dB", "all-but dB", "gain dB"] + (["alone acc", "all-but acc"] if acc else [])
    for col in cols:
        table.add_column(col, justify="left" if col in ("node", "op") else "right")
    for r in report["nodes"][: args.top]:
        row = [r["node"][-60:], r["op_type"], f"{r['alone_sqnr_db']:.2f}", f"{r['all_but_sqnr_db']:.2f}", f"{r['gain_db']:+.2f}"]
        if acc:
            row += [f"{100 * r['alone_accuracy']:.2f}%", f"{100 * r['all_but_accuracy']:.2f}%"]
        table.add_row(*row)
    con.print(table)
    con.print(f"{report['candidates_evaluated']} candidate models from one calibration, {report['eval_feeds']} evaluation feeds; "
              "alone = only this node int8, all-but = every node int8 but this one")
    return 0


register("sensitivity", "per-node quantization sensitivity (alone / all but one), worst first",
         _configure_sensitivity, _run_sensitivity)
