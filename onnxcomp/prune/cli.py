"""``onnxcomp prune``: structured pruning with channels folded out of the graph."""

from __future__ import annotations

import argparse
import os

from onnxcomp.cli import POSITIVE_INT, add_output_flags, console, print_json, progress_bar, register

__all__: list[str] = []


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--criterion", choices=("zeros", "l1", "l2", "bn", "activation"), default="l1")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of channels to remove (default 0.3)")
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
    add_output_flags(p)


def _run(args: argparse.Namespace) -> int:
    from onnxcomp.data import Dataset
    from onnxcomp.io import check_target, load_model, save_model
    from onnxcomp.prune.api import prune
    from onnxcomp.prune.config import PruneConfig

    con = console(args)
    config = PruneConfig(
        criterion=args.criterion, ratio=args.ratio, scope=args.scope, round_to=args.round_to,
        min_channels=args.min_channels, exclude=tuple(args.exclude), reconstruct=args.reconstruct,
        ridge=args.ridge, fold_border=args.fold_border, max_samples=args.max_samples,
    )
    model = load_model(args.model)
    check_target(model, args.output)
    data = Dataset(args.calibration, model, batch_size=args.batch_size) if args.calibration else None
    with progress_bar(con) as progress:
        task = progress.add_task("pruning", total=None)
        pruned, report = prune(model, config, calibration=data,
                               progress=lambda done, total: progress.update(task, completed=done, total=total))
    out = save_model(pruned, args.output)
    report["output"] = str(out)
    if args.json:
        print_json(report)
        return 0
    from rich.table import Table

    table = Table(title=f"{os.path.basename(args.model)}: {args.criterion}, ratio {args.ratio} ({args.scope})",
                  title_justify="left")
    for col in ("group", "producers", "channels before", "after"):
        table.add_column(col, justify="left" if col in ("group", "producers") else "right")
    for g in report["groups"]:
        table.add_row(str(g["id"]), g["where"][:70], str(g["channels_before"]), str(g["channels_after"]))
    con.print(table)
    b, a = report["before"], report["after"]
    con.print(
        f"parameters {b['parameters']:,} -> {a['parameters']:,} ({a['parameters'] / b['parameters']:.2f}x), "
        f"MACs/sample {b['macs']:,} -> {a['macs']:,} ({a['macs'] / max(b['macs'], 1):.2f}x), "
        f"size {b['bytes'] / 1024:.1f} KiB -> {a['bytes'] / 1024:.1f} KiB"
    )
    rec = report.get("reconstruction")
    if rec:
        con.print(f"reconstruction: output SQNR on the calibration data (in-sample) "
                  f"{rec['calibration_output_sqnr_db_before']:.2f} dB -> {rec['calibration_output_sqnr_db_after']:.2f} dB "
                  f"over {len(rec['layers'])} layer(s)")
    for gid, why in report["kept_back"].items():
        con.print(f"[yellow]group {gid}:[/yellow] {why}")
    if report["skipped_groups"]:
        con.print(f"{len(report['skipped_groups'])} group(s) not pruned (--json lists why)")
    con.print(f"wrote {out}")
    return 0


register("prune", "structured pruning: remove channels from weights and every coupled consumer", _configure, _run)
