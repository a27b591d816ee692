"""``onnxcomp quantize``: static (Q/DQ from calibration), weight-only (int8/int4 blocks) or dynamic."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from onnxcomp.cli_common import (
    COUNT,
    POSITIVE_INT,
    add_check_flags,
    add_specialize_flags,
    add_threads_flag,
    add_force_flag,
    add_output_flags,
    check_config,
    check_outputs,
    check_status,
    console,
    esc,
    file_bytes,
    fmt_size,
    print_check,
    print_int8_latency,
    print_json,
    progress_bar,
    register,
    run_check,
    specialize,
    verify_output,
)
from onnxcomp.bounds import Range
from onnxcomp.errors import ConfigError
from onnxcomp.report import kernel_summary

__all__: list[str] = []


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the quantized model")
    p.add_argument("--calibration", metavar="FILE", help="calibration data: .npz file or folder (static mode; weight-only/dynamic: for --rounding gptq)")
    p.add_argument("--mode", choices=("static", "weight-only", "dynamic"), default="static")
    p.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8",
                   help="activation type (default uint8: onnxruntime's fast path on x86)")
    p.add_argument("--symmetric-activations", action="store_true")
    p.add_argument("--activation-range", choices=("full", "reduced"), default="full",
                   help="activation scales fitted to 8 bits (full) or 7 (reduced: exact with 8-bit weights where "
                        "this CPU's int8 kernels saturate)")
    p.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor instead of per channel")
    p.add_argument("--weight-range", choices=("auto", "full", "reduced", "exact"), default="auto",
                   help="int8 weights in 8 bits (full) or 7 (reduced); auto: reduced where this CPU's int8 kernels "
                        "saturate (x86 without VNNI); exact (static): 8 bits stored as uint8, exact on every "
                        "CPU, slower than auto on x86 without VNNI")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy", "mse", "auto", "per-tensor"), default="minmax",
                   help="calibration range method (default minmax); auto: the model built with each of "
                        "minmax, mse, percentile and entropy ranges (one histogram pass) and the one whose "
                        "outputs stay closest to the float model's on fitting feeds kept; per-tensor: each "
                        "tensor the range whose consumers' outputs err least, then judged whole like auto")
    p.add_argument("--percentile", type=float, default=99.999)
    p.add_argument("--exclude", action="append", default=[], metavar="NAME|OP|re:REGEX",
                   help="leave matching nodes in float (repeatable)")
    p.add_argument("--op-types", help="comma-separated op types to quantize (default: all known; "
                                      "dynamic mode: MatMul,Gemm, add Conv to convert convolutions)")
    p.add_argument("--quantize-outputs", action="store_true", help="also quantize tensors that are graph outputs")
    p.add_argument("--no-fold", action="store_true", help="keep Relu/Clip nodes instead of folding them into ranges")
    p.add_argument("--float-excitation", action="store_true",
                   help="keep the convolutions of squeeze-and-excitation paths (pooling -> convs -> gate) float")
    p.add_argument("--no-cleanup", action="store_true", help="skip BatchNorm fusion and constant folding first")
    p.add_argument("--max-samples", type=int, help="calibrate on at most this many feeds")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="samples per calibration feed (dynamic batch dimension)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="weight-only bits (default 4)")
    p.add_argument("--block-size", type=int, default=32, help="weight-only block size (default 32)")
    p.add_argument("--format", choices=("qdq", "ort"), default="qdq",
                   help="weight-only storage: blocked DequantizeLinear (opset 21) or onnxruntime MatMulNBits")
    p.add_argument("--rounding", choices=("auto", "nearest", "gptq"), default="auto",
                   help="weights to integers: nearest, or gptq (error-compensating, needs --calibration); "
                        "auto (default): gptq for 4-bit weight-only when --calibration is given")
    p.add_argument("--scale-search", choices=("none", "mse", "hessian"), default="none",
                   help="weight-only block scales: none (default) each block's range; mse / hessian: the range "
                        "shrunk where that lowers the block's (input-energy weighted) rounding error")
    p.add_argument("--scale-refit", action=argparse.BooleanOptionalAction, default=None,
                   help="weight-only with GPTQ rounding: refit each row's block scales by least squares to the "
                        "integers GPTQ chose (default: on; --no-scale-refit: off)")
    p.add_argument("--no-upgrade", action="store_true", help="refuse instead of upgrading an old opset")
    p.add_argument("--equalize", action="store_true", help="cross-layer equalization first (exact in float)")
    p.add_argument("--transformer", choices=("auto", "on", "off"), default="auto",
                   help="encoders: onnxruntime's transformer fusions first, Attention as int8 QAttention "
                        "(auto: when the graph is an encoder)")
    p.add_argument("--ffn-output", choices=("auto", "float", "int8"), default="auto",
                   help="encoders on the transformer path: the feed-forward output MatMuls (reading a GELU, whose "
                        "outliers grow with the sequence). auto (default): static mode quantizes those whose "
                        "input keeps >= 25 dB on its calibrated 8-bit grid, once a few outlier channels are split "
                        "off (--split-outliers), dynamic mode keeps them float; "
                        "float: always float; int8: always int8 (faster, less accurate on long inputs)")
    p.add_argument("--smoothquant", action=argparse.BooleanOptionalAction, default=None,
                   help="migrate activation outliers into MatMul/Gemm weights (default: on for encoders on the "
                        "transformer path given --calibration, off elsewhere)")
    p.add_argument("--split-outliers", action=argparse.BooleanOptionalAction, default=None,
                   help="static mode: a MatMul input whose 8-bit grid is too coarse because of a few outlier "
                        "channels gets them split off into a small float correction, so the MatMul runs in int8: "
                        "faster, a little less accurate (default: off)")
    p.add_argument("--bias-correction", action="store_true", help="correct each layer's mean output error afterwards")
    p.add_argument("--fidelity-target", type=float, metavar="SQNR_DB",
                   help="move the most sensitive nodes back to float until the output SQNR reaches this")
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="the same with an accuracy budget (needs --eval and --labels)")
    p.add_argument("--latency-aware", action="store_true",
                   help="keep float the op types whose int8 form is measured slower on this CPU, and the whole "
                        "model when the float model is measurably faster than what is left in int8")
    add_threads_flag(p, "intra-op threads at which the int8 model is compared with the float one after writing "
                        "(latency ratio; op types that cost the time when int8 is slower) and of --latency-aware")
    p.add_argument("--no-latency", action="store_true",
                   help="static mode: skip the latency comparison of the written int8 model with the float one "
                        "(made by default, except with --quiet or weights above 256 MiB)")
    p.add_argument("--eval", metavar="FILE", help="evaluation data for the fidelity budget")
    p.add_argument("--labels", metavar="FILE.npy", help="labels of the evaluation data (--max-drop)")
    p.add_argument("--no-fallback", action="store_true",
                   help="static mode: do not move nodes back to float when the check misses its budget")
    add_check_flags(p, max_drop=False)
    add_specialize_flags(p)
    add_force_flag(p)
    add_output_flags(p)


def _latency_ratio(first, second, data, threads: int | None = None) -> dict | None:
    """Interleaved latency of ``second`` over ``first`` (median ratio and 95% interval)."""
    from onnxcomp.measure.bench import bench_models

    feeds = []
    for feed in data:
        feeds.append(feed)
        if len(feeds) == 4:
            break
    rows = bench_models([("all int8", first), ("with fallback", second)], feeds, runs=40, warmup_seconds=0.2,
                        threads=threads, time_budget=10.0)
    return {"ratio": rows[1]["ratio_to_first"], "ci95": rows[1]["ratio_ci95"]}


def branch_int8_nodes(branches: dict) -> int:
    """int8 nodes placed inside If branches (nested branches included)."""
    return sum(int(b.get("int8_nodes") or 0) + branch_int8_nodes(b.get("branches") or {})
               for b in branches.values() if isinstance(b, dict))


def _branch_line(branch: dict | str) -> str:
    if isinstance(branch, str):
        return branch
    stored = branch.get("weight_only_int8")
    weight_only = (f"{stored['weights']} weight(s) stored int8, weight-only ({stored['bytes_before'] / 1024:.0f} -> "
                   f"{stored['bytes_after'] / 1024:.0f} KiB, compute in float)" if stored else "")
    if branch.get("not_calibrated"):
        return f"not calibrated ({branch['not_calibrated']}): {weight_only}"
    recurrent = branch.get("recurrent") or {}
    extra = f", {len(recurrent['lstm_int8'])} LSTM as DynamicQuantizeLSTM" if recurrent.get("lstm_int8") else ""
    return (f"{branch['int8_nodes']} int8 node(s){extra}, calibrated on {branch['feeds']} feed(s)"
            + (f"; {weight_only}" if weight_only else ""))


def _recurrent_sections(report: dict) -> list[dict]:
    """The ``recurrent`` sections of a static report: the main graph's (which covers uncalibrated
    branches) and the calibrated branches' (nested too); a dynamic report is its own section."""
    return [report.get("recurrent") or (report if "lstm_int8" in report else {})] + [
        section for b in (report.get("branches") or {}).values() if isinstance(b, dict)
        for section in _recurrent_sections(b)]


def print_recurrent(con, report: dict) -> None:
    """One line on recurrent weights (onnxcomp.quant.recurrent), when the model has recurrent ops."""
    sections = _recurrent_sections(report)
    kernel = sum(len(s.get("lstm_int8") or ()) for s in sections)
    weight_only = sum(len(s.get("recurrent_weight_only") or ()) for s in sections)
    kept = {k: v for s in sections for k, v in (s.get("recurrent_kept_float") or {}).items()}
    why_float = {k: v for s in sections for k, v in (s.get("recurrent_float_compute") or {}).items()}
    if kernel or weight_only or kept:
        con.print(f"recurrent: {kernel} LSTM as DynamicQuantizeLSTM, {weight_only} weight-only int8, {len(kept)} float"
                  + (f" ({'; '.join(f'{esc(k)}: {esc(v)}' for k, v in list(kept.items())[:3])})" if kept else "")
                  + (f"; float compute: {'; '.join(f'{esc(k)}: {esc(v)}' for k, v in list(why_float.items())[:2])}"
                     if why_float else ""))


def recurrent_int8(report: dict) -> int:
    """Recurrent ops given int8 weights: the main graph's and the calibrated branches' (nested too)."""
    return sum(len(s.get("lstm_int8") or ()) + len(s.get("recurrent_weight_only") or ())
               for s in _recurrent_sections(report))


def _compressed(report: dict, mode: str, model=None, written=None) -> tuple[int, str, str]:
    """How much was quantized, what that counts, and (when nothing) why (``model``: the input, to
    tell an already quantized one). When the report's sections count nothing (a fallback's
    report has no recurrent or embedding section; embedding tables are no nodes), the int8
    tensors ``written`` (the output) carries beyond the input's count instead."""
    from onnxcomp.quant.verify import int8_kernels, int8_tensors_added

    if mode == "static":
        count = int(report.get("int8_nodes") or 0) + branch_int8_nodes(report.get("branches") or {}) + recurrent_int8(report)
        what = "int8 nodes"
    else:
        count = int(report.get("nodes_quantized") or 0) + recurrent_int8(report)
        what = "quantized weights" if mode == "weight-only" else "dynamically quantized nodes"
    if count == 0 and written is not None:
        stored = int8_tensors_added(model, written)
        if stored > 0:
            count, what = stored, "int8 tensors"
    why = ""
    if count == 0:
        skipped = report.get("skipped") or {}
        kernels = int8_kernels(model) if model is not None else ""
        if kernels:  # what is left float there is the quantized model's own plumbing
            why = f"the model is already quantized ({kernels}): quantize its float original"
        elif skipped:
            first, reason = next(iter(skipped.items()))
            why = f"{len(skipped)} candidate(s) left float, e.g. {first!r}: {reason}"
        else:
            why = "the model has no node this mode quantizes in its main graph"
            if model is not None:
                from onnxcomp.graph import attribute_weights_note

                note = attribute_weights_note(model)
                why += f": {note}" if note else ""
    return count, what, why


def _run(args: argparse.Namespace) -> int:
    from onnxcomp.check import split_data, verdict_line
    from onnxcomp.data import Dataset, load_labels
    from onnxcomp.graph import parameter_nbytes
    from onnxcomp.io import load_model, renamed_nodes, save_model
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    con = console(args)
    config = QuantizeConfig(
        mode=args.mode,
        activation_type=args.activation_type,
        activation_symmetric=args.symmetric_activations,
        activation_range=args.activation_range,
        per_channel=not args.per_tensor,
        weight_range=args.weight_range,
        calibration=args.method,
        percentile=args.percentile,
        op_types=tuple(t.strip() for t in args.op_types.split(",") if t.strip()) if args.op_types else (),
        exclude=tuple(args.exclude),
        quantize_outputs=args.quantize_outputs,
        fold_activations=not args.no_fold,
        excitation_float=args.float_excitation,
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
        rounding=args.rounding,
        scale_search=args.scale_search,
        **({} if args.scale_refit is None else {"scale_refit": args.scale_refit}),
        **({} if args.split_outliers is None else {"split_outliers": args.split_outliers}),
        transformer=args.transformer,
        ffn_output=args.ffn_output,
    )
    if args.mode == "static" and not args.calibration:
        raise ConfigError("static quantization needs --calibration FILE (or use --mode weight-only/dynamic)")
    check_cfg = check_config(args)
    model = load_model(args.model)
    check_outputs(args, model)
    specialized, fixed = specialize(args, model, con)
    calibration = None
    if args.calibration:
        calibration = Dataset(args.calibration, model, batch_size=args.batch_size, limit=args.max_samples,
                              ignore=fixed)
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size, ignore=fixed) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --eval (the evaluation data they label)")
    if config.max_drop is not None and labels is None:
        raise ConfigError("--max-drop is an accuracy budget: it needs --eval and --labels")
    split = split_data(calibration, check_cfg, evaluation=evaluation, labels=labels, model=model)
    fit = split.fit if split.fit is not None else calibration
    # a fallback may follow: the calibration is kept for it (no second one)
    calibrated: list = []
    may_fall_back = args.mode == "static" and not args.no_fallback and not config.uses_fallback \
        and split.held_out and check_cfg.enabled
    with progress_bar(con) as progress:
        task = progress.add_task("calibrating", total=fit.num_feeds if fit else None)
        quantized, report = quantize(
            model, fit, config, allow_upgrade=not args.no_upgrade, eval_data=evaluation, labels=labels,
            progress=lambda stage, done, total: progress.update(task, completed=done, total=total),
            threads=args.threads, keep=calibrated.append if may_fall_back else None,
        )
    verify = verify_output(split, model, check_cfg.enabled)
    out = save_model(quantized, args.output, force=args.force, verify=verify)
    report["input"] = {"path": args.model, "bytes": file_bytes(args.model, model), "parameter_bytes": parameter_nbytes(model)}
    if specialized is not None:
        report["specialize"] = specialized
    report["output"] = {"path": str(out), "bytes": file_bytes(out), "parameter_bytes": parameter_nbytes(quantized)}
    count, what, why = _compressed(report, args.mode, model, quantized)
    can_fall_back = bool(count) and may_fall_back and bool(calibrated)
    # onnxruntime reads the original's file itself (unless --fix-* or the load's renaming of
    # duplicate node names, which onnxruntime refuses, changed the model in memory)
    original = args.model if specialized is None and not renamed_nodes(model) else None
    # when a fallback may follow, the blamed tensors would be measured twice: the final check names them
    check = run_check(con, model, out, split, dataclasses.replace(check_cfg, blame=0) if can_fall_back else check_cfg,
                      report, compressed=count, what=what, why=why, reference_file=original, written=quantized)
    if check is not None and not check["met"] and check.get("checked") and can_fall_back:
        from onnxcomp.quant.autofallback import fallback_to_budget, study_of

        con.print(f"[yellow]{esc(verdict_line(check))}[/yellow]")
        con.print("moving the most damaging blocks back to float until the budget holds on the fitting data "
                  "(--no-fallback to keep the all-int8 model)")
        first = quantized
        fallback_started = time.perf_counter()
        with progress_bar(con) as progress:
            task = progress.add_task("fallback", total=None)
            quantized, auto = fallback_to_budget(
                study_of(calibrated.pop(), fit), check_cfg, kinds=split.judged_kinds,
                progress=lambda done, total: progress.update(task, completed=done, total=total))
        auto["check_before"] = check
        report["auto_fallback"] = auto
        if not auto["met_on_fitting_data"]:  # gave up: the written all-int8 model and its check stand
            quantized = first
            auto["latency_ratio_to_all_int8"] = None
            if check_cfg.blame and check.get("checked"):  # its check ran without the blame: name it now
                from onnxcomp.check import blame, check_dataset

                check["blame"] = blame(model, first, check_dataset(split, model), check_cfg.blame)
        else:
            auto["latency_ratio_to_all_int8"] = _latency_ratio(first, quantized, fit, args.threads)
            if "branches" in report:  # the units the fallback moved to float say so
                from onnxcomp.quant.sensitivity import branches_after

                report["branches"] = branches_after(report["branches"], auto["float_nodes"])
            # main-graph nodes: the int8 units' nodes are counted in their branches' sections, the
            # recurrent ops and embedding lookups in their own (those of the model written now)
            for section in ("recurrent", "embeddings"):
                if section in auto:
                    report[section] = auto.pop(section)
            report["int8_nodes"] = len([n for n in auto["int8_nodes"]
                                        if n not in report.get("branches", {}) and n not in auto["finish_nodes"]])
            if "onnxruntime" in report:  # the kernels of the model written now
                from onnxcomp.quant.verify import fusion_report

                report["onnxruntime"] = fusion_report(quantized)
            out = save_model(quantized, args.output, force=True, verify=verify)
            report["output"] = {"path": str(out), "bytes": file_bytes(out),
                                "parameter_bytes": parameter_nbytes(quantized)}
            count, what, _ = _compressed(report, args.mode, model, quantized)
            check = run_check(con, model, out, split, check_cfg, report, compressed=count, what=what,
                              reference_file=original, written=quantized)
        auto["extra_seconds"] = time.perf_counter() - fallback_started  # fallback, latency, save, check
        if check is not None and auto["met_on_fitting_data"] and not check["met"]:
            auto["held_out_missed"] = True
            report["notes"].append("the fallback met the budget on the fitting data but the held-out check "
                                   "missed it: the fitting data does not represent the held-out data well "
                                   "enough (more calibration data, or --eval)")
    status = check_status(args, check)
    if args.mode == "static" and count and _compare_latency(args, model, report):
        report["int8_latency"] = _int8_latency(model, quantized, split.check if split.check is not None else fit,
                                               args.threads, report, time_budget=30.0 if args.threads else 10.0)
        lat = report["int8_latency"]
        if lat.get("int8_slower") and lat.get("significant") and not config.latency_aware:
            lat["hint"] = (
                "--latency-aware keeps the op types that are slower in int8 float, and writes the float "
                "model when what is left in int8 is still slower")
            if check is not None and not check["met"]:  # worse and slower: say that int8 does not pay here
                lat["misses_budget_and_slower"] = True
                lat["hint"] = ("int8 does not pay on this model: the written model misses the check's budget "
                               "and runs slower than the float model, which is both exact and faster; " + lat["hint"])
    if args.json:
        print_json(report)
        return status
    for note in report.get("notes", []):
        con.print(f"[yellow]note:[/yellow] {esc(note)}")
    ort = report.get("onnxruntime", {})
    con.print(
        f"[bold]{esc(os.path.basename(args.model))}[/bold] -> {esc(out)} ({args.mode}): "
        f"{fmt_size(report['input']['bytes'])} -> {fmt_size(report['output']['bytes'])}"
    )
    auto = report.get("auto_fallback")
    if auto:
        lat = auto["latency_ratio_to_all_int8"]
        con.print(f"automatic fallback ({auto['seconds']:.1f} s, {auto['evaluations']} evaluations on "
                  f"{auto['eval_feeds']} fitting feeds): {len(auto['float_nodes'])} node(s) back in float, "
                  f"{len(auto['int8_nodes'])} int8"
                  + (f"; latency {lat['ratio']:.3f}x of the all-int8 model [{lat['ci95'][0]:.3f}, {lat['ci95'][1]:.3f}]"
                     if lat else "")
                  + ("" if auto["met_on_fitting_data"] else f"; {auto['gave_up']}"))
        if auto.get("blocks"):
            con.print(f"  {len(auto['blocks'])} block(s) of consecutive nodes moved, worst damage first")
        for name in auto["float_nodes"][:10]:
            con.print(f"  float: {esc(name)} (adds {100 * auto['damage'].get(name, 0):.2g}% noise power in int8)")
        if len(auto["float_nodes"]) > 10:
            con.print(f"  ... and {len(auto['float_nodes']) - 10} more (--json lists all)")
    fallback = report.get("fallback")
    if fallback:
        final = fallback["final"]
        acc = f", accuracy {100 * final['accuracy']:.2f}% (float {100 * fallback['float']['accuracy']:.2f}%)" if "accuracy" in final else ""
        met = fallback["met"]  # false with nothing left in int8 (int8 nodes, recurrent weights, tables)
        lat = fallback.get("latency") or {}
        if lat.get("int8_pays") is False:
            lo, hi = lat["float_to_int8_ci95"]
            con.print(f"[yellow]int8 does not pay on this model on this CPU: the float model is measurably faster "
                      f"than what int8 could keep (float's latency ratio to it [{lo:.2f}, {hi:.2f}] at {lat['threads']} "
                      f"thread(s)); the model is written float, {len(fallback['float_nodes'])} node(s)[/yellow]")
        elif not any(v is not None for v in (fallback.get("target") or {}).values()):  # --latency-aware alone
            con.print(f"no fidelity budget (--latency-aware alone): output SQNR {final['sqnr_db']:.2f} dB{acc} on "
                      f"{fallback['eval_samples']} sample(s) of {fallback['eval_data']}; "
                      f"{len(fallback['int8_nodes'])} node(s) int8, {len(fallback['float_nodes'])} kept float")
        else:
            con.print(f"fidelity budget judged on {fallback['eval_samples']} sample(s) of {fallback['eval_data']} "
                      f"({fallback['eval_feeds']} feed(s), all given)")
            con.print(f"fidelity budget {'met' if met else 'NOT met'}: output SQNR {final['sqnr_db']:.2f} dB{acc}; "
                      f"{len(fallback['int8_nodes'])} node(s) int8, {len(fallback['float_nodes'])} kept float")
        for name, ratio in (fallback.get("fallback_latency") or {}).items():
            con.print(f"  {esc(name)}: float costs {100 * (1 / ratio - 1):+.1f}% speed (latency ratio {ratio:.3f} vs all int8)")
        if lat.get("op_types_kept_float"):
            con.print(f"  op types kept float because int8 was slower here: {', '.join(lat['op_types_kept_float'])}")
        if lat.get("int8_slower_than_float") and lat.get("int8_pays") is not False:
            con.print("  [yellow]all-int8 is slower than float on this CPU: the float model is faster[/yellow]")
    rounding = report.get("rounding") or {}
    if rounding.get("method") == "gptq" and rounding.get("weights"):
        con.print(f"rounding: GPTQ on {rounding['weights']} weight(s) ({rounding['weights_kept_nearest']} kept "
                  f"round-to-nearest), layer output SQNR median {rounding['layer_sqnr_db_nearest_median']:.1f} -> "
                  f"{rounding['layer_sqnr_db_median']:.1f} dB on the calibration data, {rounding['seconds']:.1f} s")
    tables = (report.get("embeddings") or {}).get("tables") or {}
    if tables:
        con.print(f"embedding tables: {len(tables)} as GatherBlockQuantized ({report['embeddings']['bits']}-bit), "
                  f"{report['embeddings']['bytes_before'] / 2**20:.1f} -> {report['embeddings']['bytes_after'] / 2**20:.1f} MiB")
    line = calibration_line(report, split, args)
    if line:
        con.print(line)
    if args.mode == "static" and "method" in report.get("calibration", {}):  # not on the fidelity fallback
        con.print(
            f"int8 nodes planned: {report['int8_nodes']}, Relu/Clip folded: {report['folded_activations']}, "
            f"weights quantized: {report['quantized_weights']}, int32 biases: {report['quantized_biases']}"
        )
    for where, branch in report.get("branches", {}).items():  # the fallbacks' reports have them too
        kind = "If branch" if where.endswith(("/then_branch", "/else_branch")) else "loop body"
        con.print(f"{kind} {where}: " + _branch_line(branch))
    if args.mode in ("static", "dynamic"):
        print_recurrent(con, report)
    if ort:
        con.print(f"onnxruntime runs {kernel_summary(ort)}")
    skipped = report.get("skipped") or {}
    if skipped:
        con.print(f"left in float ({len(skipped)}):")
        for name, reason in list(skipped.items())[:20]:
            con.print(f"  {esc(name)}: {esc(reason)}")
        if len(skipped) > 20:
            con.print(f"  ... and {len(skipped) - 20} more (--json lists all)")
    print_int8_latency(con, report.get("int8_latency"))
    if (report.get("int8_latency") or {}).get("hint"):
        con.print(f"  [yellow]{esc(report['int8_latency']['hint'])}[/yellow]")
    print_check(con, check)
    return status


def calibration_line(report: dict, split, args: argparse.Namespace) -> str | None:
    """The one line on the calibration data, whichever path built the model (static: the plain
    pipeline, ``--method auto`` / ``per-tensor``, the fidelity or latency-aware fallback, whose
    report has no calibration section; weight-only or dynamic: GPTQ rounding, or nothing fitted):
    what was fitted on how many feeds and where the check's feeds come from (``split``:
    :class:`onnxcomp.check.DataSplit`). None without calibration data."""
    calibration = report.get("calibration") or {}
    fitted = calibration.get("feeds", split.fit_feeds)
    if args.mode == "static":
        line = f"calibration: {calibration.get('method', args.method)} on {fitted} feed(s)"
    elif not args.calibration:
        return None
    elif (report.get("rounding") or {}).get("method") == "gptq":
        line = f"calibration: GPTQ rounding on {fitted} feed(s)"
    else:
        line = f"calibration: nothing fitted in {args.mode} mode ({fitted} feed(s) unused)"
    if split.check is None:
        line += ", nothing to check on"
    elif not split.held_out:
        line += f"; the check runs on the same {split.check_feeds} feed(s) (too few to hold any out)"
    elif split.source.startswith("calibration"):
        line += f", {split.check_feeds} more held out for the check"
    else:
        line += f"; the check runs on {split.check_feeds} feed(s) of the {split.source}"
    if "tensors" in calibration:
        line += f"; {calibration['tensors']} tensors, {calibration['seconds']:.2f} s"
    if calibration.get("chosen"):
        line += f" (ranges chosen: {', '.join(f'{k} {v}' for k, v in calibration['chosen'].items())})"
    return line


def _compare_latency(args: argparse.Namespace, model, report: dict) -> bool:
    """Whether to compare the written int8 model's latency with the float one: always with
    --threads; by default too (an int8 model slower than float is said so), except with
    --no-latency, --quiet (nothing would show it) or a large model (both sessions side by side
    would hold two copies of its weights: the report says so)."""
    from onnxcomp.io import LARGE_MODEL_BYTES, initializer_nbytes

    if args.threads:
        return True
    if args.no_latency or (args.quiet and not args.json):
        return False
    if initializer_nbytes(model) >= LARGE_MODEL_BYTES:
        report.setdefault("notes", []).append(f"latency not compared with the float model (its weights take more than "
                               f"{LARGE_MODEL_BYTES // 2**20} MiB; --threads N compares them)")
        return False
    return True


def _int8_latency(model, written, data, threads: int | None, report: dict, time_budget: float = 30.0) -> dict:
    """The written int8 model against the input at ``threads`` threads (None: onnxruntime's default;
    see int8_latency_report), for at most ``time_budget`` seconds of rounds (10 s when nobody asked
    for the comparison with --threads: it runs after every default static quantize).

    ``written``: the model in memory that was just saved (the fallback's when it replaced the
    file). The file is not read back: the comparison serializes the model for onnxruntime either
    way, so loading the file would only parse the same bytes a second time.
    """
    from onnxcomp.measure.bench import int8_latency_report

    feeds = []
    for feed in data:
        feeds.append(feed)
        if len(feeds) == 8:
            break
    unfused = (report.get("onnxruntime") or {}).get("dequantize_linear", 0)
    return int8_latency_report(model, written, feeds, threads=threads, unfused_dequantize=unfused,
                               time_budget=time_budget)


register("quantize", "quantize a model: static int8 Q/DQ, weight-only int8/int4, or dynamic", _configure, _run)


def _configure_sensitivity(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--calibration", required=True, metavar="FILE")
    p.add_argument("--eval", metavar="FILE", help="evaluation data (default: the calibration data)")
    p.add_argument("--labels", metavar="FILE.npy", help="labels of the evaluation data: accuracy per candidate")
    p.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy", "mse", "auto", "per-tensor"), default="minmax")
    p.add_argument("--per-tensor", action="store_true")
    p.add_argument("--max-eval-feeds", type=POSITIVE_INT, default=64)
    engine = p.add_mutually_exclusive_group()
    engine.add_argument("--workers", type=Range(int, 1, 1024),
                        help="processes evaluating candidates (default: physical cores)")
    engine.add_argument("--executor", metavar="ADDRESS",
                        help="where candidates are evaluated: process[:N], dask://HOST:PORT (a running Dask "
                             "scheduler) or dask-local[:N] (a Dask cluster on this machine)")
    p.add_argument("--batch-size", type=POSITIVE_INT)
    p.add_argument("--top", type=COUNT, default=20)
    add_output_flags(p)


def _run_sensitivity(args: argparse.Namespace) -> int:
    from onnxcomp.data import Dataset, load_labels
    from onnxcomp.io import load_model
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.executors import open_executor, process_pool, stop_pool
    from onnxcomp.quant.sensitivity import analyze_sensitivity

    con = console(args)
    model = load_model(args.model)
    config = QuantizeConfig(activation_type=args.activation_type, calibration=args.method, per_channel=not args.per_tensor)
    calibration = Dataset(args.calibration, model, batch_size=args.batch_size)
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --eval (the evaluation data they label)")
    if evaluation is not None:
        evaluation.check_labels(labels)
    executor = process_pool(args.workers) if args.workers else open_executor(args.executor)
    started = time.perf_counter()
    cancel = True
    try:
        with progress_bar(con) as progress:
            task = progress.add_task("candidates", total=None)
            report = analyze_sensitivity(
                model, calibration, config, eval_data=evaluation, labels=labels, executor=executor,
                max_eval_feeds=args.max_eval_feeds,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        cancel = False
    finally:
        if executor is not None:
            stop_pool(executor, cancel=cancel)
    report["executor"] = {"address": args.executor or (f"process:{args.workers}" if args.workers else "default"),
                          "seconds": round(time.perf_counter() - started, 3)}
    if not report["nodes"]:  # an empty table and "all int8 inf dB" would read as a lossless int8 model
        report["notes"].append("nothing to rank: static int8 quantizes no node of this model (all int8 is the "
                               "float model)")
    if args.json:
        print_json(report)
        return 0
    if not report["nodes"]:
        con.print(f"sensitivity of {esc(os.path.basename(args.model))}: {report['notes'][-1]}")
        return 0
    from rich.table import Table

    full = report["all_int8"]
    acc = "accuracy" in full
    table = Table(title=f"sensitivity of {esc(os.path.basename(args.model))}: all int8 {full['sqnr_db']:.2f} dB"
                        + (f", accuracy {100 * full['accuracy']:.2f}% (float {100 * report['float']['accuracy']:.2f}%)" if acc else ""),
                  title_justify="left")
    cols = ["node", "op", "alone dB", "all-but dB", "gain dB"] + (["alone acc", "all-but acc"] if acc else [])
    for col in cols:
        table.add_column(col, justify="left" if col in ("node", "op") else "right")
    for r in report["nodes"][: args.top]:
        row = [esc(r["node"][-60:]), esc(r["op_type"]), f"{r['alone_sqnr_db']:.2f}", f"{r['all_but_sqnr_db']:.2f}", f"{r['gain_db']:+.2f}"]
        if acc:
            row += [f"{100 * r['alone_accuracy']:.2f}%", f"{100 * r['all_but_accuracy']:.2f}%"]
        table.add_row(*row)
    con.print(table)
    con.print(f"{report['candidates_evaluated']} candidate models from one calibration, {report['eval_feeds']} evaluation feeds; "
              "alone = only this node int8, all-but = every node int8 but this one")
    return 0


register("sensitivity", "per-node quantization sensitivity (alone / all but one), worst first",
         _configure_sensitivity, _run_sensitivity)
