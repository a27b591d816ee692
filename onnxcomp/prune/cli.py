"""``onnxcomp prune``: structured pruning with channels folded out of the graph."""

from __future__ import annotations

import argparse
import os

from onnxcomp.cli_common import (
    POSITIVE_INT,
    add_check_flags,
    add_specialize_flags,
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
    print_json,
    progress_bar,
    register,
    run_check,
    specialize,
    verify_output,
)

__all__: list[str] = []


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the pruned model")
    p.add_argument("--criterion", choices=("zeros", "l1", "l2", "bn", "activation", "obs"), default=None,
                   help="obs: channels whose removal the least-squares refit compensates best (needs --calibration); "
                        "default l1, obs with a --target-*")
    for what, desc in (("latency", "its measured latency (onnxruntime on this CPU, side by side)"),
                       ("params", "its parameters"), ("macs", "its MACs")):
        p.add_argument(f"--target-{what}", type=float, metavar="FRACTION",
                       help=f"per-group ratios with the least damage so the model keeps FRACTION of {desc}; "
                            "needs --calibration")
    p.add_argument("--sensitivity", choices=("measured", "local"), default="measured",
                   help="with a --target-*: scale each group's damage curve to the output damage measured on "
                        "calibration data (default), or use the consumers' refit error (local)")
    p.add_argument("--latency-threads", type=POSITIVE_INT, help="onnxruntime threads for --target-latency timings")
    p.add_argument("--latency-proxy", choices=("macs", "nodes"), default="macs",
                   help="--target-latency: predict each group's saving from MACs and activation sizes (default) "
                        "or from single-node timings; measured whole-model rounds correct either")
    p.add_argument("--max-damage", type=float, default=0.1, metavar="E",
                   help="with a --target-*: never cut beyond this predicted relative output error (default 0.1); "
                        "a target out of reach within it is refused; a cut measured above it on the fitting data "
                        "(with --reconstruct: after the refit) is backed off (the target is then not reached, said so)")
    p.add_argument("--no-check-rule", action="store_true",
                   help="with a --target-*: back off on --max-damage alone, not also while the check's own rule "
                        "(per output by its kind: --min-cosine, --min-agreement, --min-detection-agreement, --min-r2) "
                        "fails on the fitting data")
    p.add_argument("--ratio", type=float, help="fraction of channels to remove (default 0.3; a --target-* "
                                                "chooses each group's ratio instead)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="ratio per coupled group (layer) or over all groups together (global)")
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of N")
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--exclude", action="append", default=[], metavar="NAME|OP|re:REGEX",
                   help="keep the groups touching matching nodes whole (repeatable)")
    p.add_argument("--calibration", metavar="FILE", help="calibration data (activation criterion, --reconstruct)")
    p.add_argument("--reconstruct", action="store_true", help="refit consumers by least squares on calibration data")
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--fold-border", action="store_true",
                   help="fold constant channels into zero-padded convs too (border pixels change; reported)")
    p.add_argument("--max-samples", type=int)
    p.add_argument("--batch-size", type=POSITIVE_INT)
    p.add_argument("--eval", metavar="FILE", help="data for the held-out check (default: part of the calibration data)")
    p.add_argument("--labels", metavar="FILE.npy", help="labels of the --eval data: the check compares accuracy")
    add_check_flags(p)
    add_specialize_flags(p)
    add_force_flag(p)
    add_output_flags(p)


def _run(args: argparse.Namespace) -> int:
    from onnxcomp.check import split_data
    from onnxcomp.data import Dataset, load_labels
    from onnxcomp.errors import ConfigError
    from onnxcomp.io import load_model, save_model
    from onnxcomp.prune.api import prune
    from onnxcomp.prune.config import PruneConfig

    con = console(args)
    targeted = any(v is not None for v in (args.target_latency, args.target_params, args.target_macs))
    if args.criterion is None:
        args.criterion = "obs" if targeted else "l1"
    if targeted and args.ratio is not None:  # the target sets each group's ratio: --ratio was ignored
        raise ConfigError("--ratio and --target-latency/--target-params/--target-macs exclude each other: a "
                          "target chooses each group's ratio; drop one")
    if args.ratio is None:
        args.ratio = 0.3
    config = PruneConfig(
        target_latency=args.target_latency, target_params=args.target_params, target_macs=args.target_macs,
        latency_threads=args.latency_threads, latency_proxy=args.latency_proxy, max_damage=args.max_damage,
        sensitivity=args.sensitivity, check_rule=not args.no_check_rule, criterion=args.criterion, ratio=args.ratio, scope=args.scope, round_to=args.round_to,
        min_channels=args.min_channels, exclude=tuple(args.exclude), reconstruct=args.reconstruct,
        ridge=args.ridge, fold_border=args.fold_border, max_samples=args.max_samples,
    )
    check_cfg = check_config(args)
    model = load_model(args.model)
    check_outputs(args, model)
    specialized, fixed = specialize(args, model, con)
    data = Dataset(args.calibration, model, batch_size=args.batch_size, limit=args.max_samples,
                   ignore=fixed) if args.calibration else None
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size, ignore=fixed) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --eval (the evaluation data they label)")
    split = split_data(data, check_cfg, evaluation=evaluation, labels=labels, model=model)
    with progress_bar(con) as progress:
        task = progress.add_task("pruning", total=None)
        pruned, report = prune(model, config, calibration=split.fit if split.fit is not None else data,
                               progress=lambda done, total: progress.update(task, completed=done, total=total),
                               check=check_cfg)
    out = save_model(pruned, args.output, force=args.force, verify=verify_output(split, model, check_cfg.enabled))
    report["output"] = str(out)
    if specialized is not None:
        report["specialize"] = specialized
    report["before"]["bytes"] = file_bytes(args.model, model)  # on disk, with external data
    report["after"]["bytes"] = file_bytes(out)
    removed = int(report.get("channels_removed") or 0)
    why = ""
    if removed == 0:
        why = _why_nothing_pruned(args, model, report, targeted)
        report["notes"].append(f"nothing was pruned (0 channels removed): {why}")
    check = run_check(con, model, out, split, check_cfg, report, compressed=removed, what="channels removed", why=why)
    status = check_status(args, check)
    if args.json:
        print_json(report)
        return status
    for note in report.get("notes", []):
        con.print(f"[yellow]note:[/yellow] {esc(note)}")
    from rich.table import Table

    target = report.get("target")
    how = f"{target['kind']} target {target['target']}" if target else (
        "all-zero channels" if args.criterion == "zeros" else f"ratio {args.ratio} ({args.scope})")
    table = Table(title=f"{esc(os.path.basename(args.model))}: {args.criterion}, {how}", title_justify="left")
    cols = ["group", "producers", "channels before", "after"]
    if target:
        cols += ["ratio", "damage", "saved ms" if target["kind"] == "latency" else f"{target['kind']} saved"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("group", "producers") else "right")
    for g in report["groups"]:
        row = [str(g["id"]), esc(g["where"][:60]), str(g["channels_before"]), str(g["channels_after"])]
        if target:
            saved = g.get("latency_saved_ms") if target["kind"] == "latency" else g.get(f"{target['kind']}_saved_fraction")
            row += [f"{g.get('ratio', 0):.2f}", f"{g['damage']:.3g}" if "damage" in g else "-",
                    "-" if saved is None else (f"{saved:.2f}" if target["kind"] == "latency" else f"{saved:.1%}")]
        table.add_row(*row)
    if report["groups"]:
        con.print(table)
    if target:
        measured = (f"measured side by side: {target['reference_ms']:.1f} ms -> {target['pruned_ms']:.1f} ms"
                    if target["kind"] == "latency" else "counted")
        con.print(f"{target['kind']} {target['final_ratio']:.3f} of the original (target {target['target']}, "
                  f"{target['miss']:+.1%}; {measured}; {len(target['rounds'])} allocation round(s))")
        combined = target.get("combined_damage") or {}
        if combined.get("final") is not None:
            from onnxcomp.prune.targets import _figures_text

            rule, final_rule = combined.get("rule"), combined.get("final_rule") or {}
            con.print(f"combined cut: output damage {combined['final']:.3g} measured on {combined['feeds']} fitting "
                      f"feed(s) (predicted {combined['predicted_damage']:.3g} from the groups one by one, bound "
                      f"{combined['max_damage']})"
                      + (f"; the check's rule on {rule['feeds']} fitting feed(s): "
                         + (_figures_text(final_rule.get("outputs")).removeprefix(", ") or "-")
                         + (", met" if final_rule.get("within") else ", NOT met") if rule else "")
                      + (f"; backed off from the plan the target asked for, which failed: {esc(combined.get('why') or '')}"
                         if combined["backed_off"] else ""))
    b, a = report["before"], report["after"]
    con.print(
        f"parameters {b['parameters']:,} -> {a['parameters']:,} ({_ratio(a['parameters'], b['parameters'])}), "
        f"MACs/sample {b['macs']:,} -> {a['macs']:,} ({_ratio(a['macs'], b['macs'])}"
        + (f"; free dimensions {', '.join(report['macs_free_dimensions'])} counted as 1, --fix-shape sizes them"
           if report.get("macs_free_dimensions") else "") + "), "
        f"file {fmt_size(b['bytes'])} -> {fmt_size(a['bytes'])}"
    )
    rec = report.get("reconstruction")
    if rec:
        con.print(f"reconstruction: output SQNR on the calibration data (in-sample) "
                  f"{rec['calibration_output_sqnr_db_before']:.2f} dB -> {rec['calibration_output_sqnr_db_after']:.2f} dB "
                  f"over {len(rec['layers'])} layer(s)")
    for gid, why in report["kept_back"].items():
        con.print(f"[yellow]group {esc(gid)}:[/yellow] {esc(why)}")
    if report["skipped_groups"]:
        con.print(f"{len(report['skipped_groups'])} group(s) not pruned (--json lists why)")
    for where, entry in report.get("subgraphs", {}).items():
        text = entry if isinstance(entry, str) else (
            f"{entry['channels_removed']} zero channel(s) folded" + (f" ({entry['why_none']})" if entry.get("why_none") else "")
            + (f"; {entry['note']}" if entry.get("note") else ""))
        con.print(f"subgraph {esc(where)}: {esc(text)}")
    con.print(f"wrote {esc(out)}")
    print_check(con, check)
    return status


def _why_nothing_pruned(args: argparse.Namespace, model, report: dict, targeted: bool) -> str:
    """Why a run removed no channel, the cause the user chose first (a ratio that cuts nothing of the
    groups that could be cut, an exclude that covers them). The model is then written unchanged, as
    quantize and cluster write theirs, and the check says why (exit 3 under --strict)."""
    from onnxcomp.graph import attribute_weights_note
    from onnxcomp.prune.targets import NO_PRUNABLE_GROUP
    from onnxcomp.quant.verify import int8_kernels

    skipped = {str(k): v for k, v in report["skipped_groups"].items()}
    cuttable = [g for g in report["groups"] if str(g["id"]) not in skipped]
    kernels = int8_kernels(model) if not cuttable else ""
    if kernels:
        return f"the model is already quantized ({kernels}): prune its float original"
    zero, by_ratio = [], []
    if cuttable and not targeted:
        if args.criterion == "zeros":  # the ratio plays no part: only all-zero channels go
            by_ratio = [f"--criterion zeros found no all-zero channel in the {len(cuttable)} "
                        "prunable group(s) (it removes only those; --criterion l1 --ratio R cuts by magnitude)"]
        elif args.ratio == 0:
            zero = ["--ratio 0 removes no channel (it keeps every channel of every group)"]
        else:
            by_ratio = [f"--ratio {args.ratio} ({args.scope}) cut no channel of the {len(cuttable)} "
                        "prunable group(s): raise --ratio"]
    excluded = [k for k, v in skipped.items() if v == "excluded"]
    covered = ([f"every group that could be cut ({', '.join(excluded)}) touches a node --exclude names"]
               if excluded and not cuttable else [])
    combined = (report.get("target") or {}).get("combined_damage") or {}
    backed = ([f"the target's cut was backed off to nothing: every cut tried failed on the fitting data "
               f"({combined.get('why')}); loosen the bound that failed"
               + ("" if args.reconstruct else ", or give --reconstruct")]
              if targeted and combined.get("backed_off") else [])
    reasons = [*backed, *zero, *report["kept_back"].values(), *by_ratio, *covered, *skipped.values(),
               *(f"{k}: {v if isinstance(v, str) else v.get('why_none', '')}" for k, v in report.get("subgraphs", {}).items())]
    if reasons:
        return str(reasons[0])
    if not report["groups"]:
        return (f"{NO_PRUNABLE_GROUP}; {report['before']['parameters']:,} parameters)"
                + (f"; {note}" if (note := attribute_weights_note(model)) else ""))
    return f"no channel group to cut with {args.criterion!r} at ratio {args.ratio}"


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.2f}x" if before else "-"


register("prune", "structured pruning: remove channels from weights and every coupled consumer", _configure, _run)
