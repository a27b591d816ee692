"""``onnxcomp cluster``: k-means weight sharing, stored as snapped floats or as a codebook."""

from __future__ import annotations

import argparse

from onnxcomp.cli_common import (
    COUNT,
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


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths in bits separated by commas, e.g. 2,3,4; got {text!r}") from None


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the clustered model")
    size = p.add_mutually_exclusive_group()
    # no argparse default: argparse lets an option whose value *is* its default (``--bits 4``) pass
    # beside another of its exclusive group; ClusterConfig's default applies
    size.add_argument("--bits", type=int, help="K = 2**bits clusters (default 4 bits)")
    size.add_argument("--clusters", type=int, help="number of clusters K")
    size.add_argument("--bits-per-weight", type=float, metavar="B",
                      help="mixed widths: each tensor's codebook width from --bits-choices so that labels, codebooks "
                           "and scales average at most B bits per weight, least weight error first (needs --format "
                           "sparse; the compress stage measures the model's output error on calibration data instead)")
    p.add_argument("--bits-choices", type=_widths, default=(2, 3, 4, 5, 6),
                   metavar="B,B,...", help="candidate widths for --bits-per-weight (default 2,3,4,5,6)")
    p.add_argument("--vector-dim", type=POSITIVE_INT, default=1, metavar="D",
                   help="vector codebooks: groups of D consecutive weights along the input axis share a codebook of "
                        "2^(bits x D) entries per tensor (GPTVQ; needs --format sparse; default 1: scalar)")
    p.add_argument("--wide-below", type=COUNT, default=0, metavar="N",
                   help="with --bits-per-weight: tensors of fewer than N weights take an 8-bit codebook, paid for "
                        "from the same budget (a stem or depthwise filter cut to a few values can carry much of "
                        "the error; default 0: off)")
    p.add_argument("--per-channel", action="store_true", help="one codebook per output channel")
    p.add_argument("--channel-scales", choices=("auto", "always", "never"), default="auto",
                   help="one codebook per tensor plus a scale per output channel: always, never, or auto (default: "
                        "where a single codebook would wipe out a channel, e.g. BatchNorm folded in)")
    p.add_argument("--format", choices=("float", "codebook", "sparse"), default="float",
                   help="float: snapped weights, same graph; codebook: labels + codebook rebuilt by Gather; "
                        "sparse: bit-packed labels, zeros as a bitmask or relative indices (pruned weights)")
    p.add_argument("--init", choices=("kmeans++", "linear", "density"), default="kmeans++")
    p.add_argument("--preserve-zeros", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--min-elements", type=int, default=256, help="leave smaller tensors alone (default 256)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME|OP|re:REGEX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cleanup", action="store_true", help="skip BatchNorm fusion and constant folding first")
    p.add_argument("--no-upgrade", action="store_true", help="refuse instead of upgrading to opset 21 (4-bit codebook)")
    p.add_argument("--data", "--eval", dest="eval", metavar="FILE",
                   help="data to check the written model on (default: generated inputs, a sanity check only)")
    p.add_argument("--labels", metavar="FILE.npy", help="labels of the --data: the check compares accuracy")
    p.add_argument("--batch-size", type=POSITIVE_INT)
    add_check_flags(p, nothing_held_out="cluster fits nothing on data, so nothing is held out: the check runs on "
                    "every --data feed (the first 64 without --labels), or on generated inputs without --data")
    add_specialize_flags(p)
    add_force_flag(p)
    add_output_flags(p)


def _run(args: argparse.Namespace) -> int:
    from onnxcomp.cluster.api import cluster, session_creation_seconds
    from onnxcomp.check import split_data
    from onnxcomp.cluster.passes import ClusterConfig
    from onnxcomp.data import Dataset, load_labels
    from onnxcomp.errors import ConfigError
    from onnxcomp.graph import attribute_weights_note
    from onnxcomp.io import load_model, save_model
    from onnxcomp.quant.verify import int8_kernels

    con = console(args)
    config = ClusterConfig(
        **({} if args.bits is None else {"bits": args.bits}), clusters=args.clusters, per_channel=args.per_channel,
        bits_per_weight=args.bits_per_weight, bits_choices=args.bits_choices, sensitivity="layer",
        channel_scales=args.channel_scales, init=args.init,
        preserve_zeros=args.preserve_zeros, min_elements=args.min_elements, exclude=tuple(args.exclude),
        format=args.format, seed=args.seed, vector_dim=args.vector_dim, wide_below=args.wide_below,
    )
    check_cfg = check_config(args)
    model = load_model(args.model)
    check_outputs(args, model)
    specialized, fixed = specialize(args, model, con)
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size, ignore=fixed) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --data (the data they label)")
    split = split_data(None, check_cfg, evaluation=evaluation, labels=labels, model=model)
    # before any work: a model onnxruntime refuses is bad input, not an error once the output is written
    input_session_s = session_creation_seconds(model, what=f"the model {args.model}")
    with progress_bar(con) as progress:
        task = progress.add_task("clustering", total=None)
        clustered, report = cluster(
            model, config, cleanup=not args.no_cleanup, allow_upgrade=not args.no_upgrade,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    out = save_model(clustered, args.output, force=args.force, verify=verify_output(split, model, check_cfg.enabled))
    report["input"] = {"path": args.model, "bytes": file_bytes(args.model, model),
                       "session_creation_s": input_session_s}
    report["output"] = {"path": str(out), "bytes": file_bytes(out),
                        "session_creation_s": session_creation_seconds(clustered)}
    if specialized is not None:
        report["specialize"] = specialized
    count = len(report["tensors"])
    kernels = "" if count or report["skipped"] else int8_kernels(model)
    why = "" if count else (f"{len(report['skipped'])} tensor(s) left alone, e.g. "
                            + "; ".join(f"{n!r}: {r}" for n, r in list(report["skipped"].items())[:1])
                            if report["skipped"] else
                            f"the model is already quantized ({kernels}): its weights are integers; cluster its float original"
                            if kernels else f"no float weight tensor with at least {args.min_elements} elements"
                            + (f"; {note}" if (note := attribute_weights_note(model)) else ""))
    check = run_check(con, model, out, split, check_cfg, report, compressed=count, what="tensors clustered", why=why)
    status = check_status(args, check)
    if args.json:
        print_json(report)
        return status
    from rich.table import Table

    for note in report["notes"]:
        con.print(f"[yellow]note:[/yellow] {esc(note)}")
    alloc = report.get("allocation")
    from onnxcomp.report import width_counts

    clusters = (f"widths {width_counts(alloc)} ({alloc['bits_per_weight']:.2f} bits per weight)" if alloc
                else f"{config.k} clusters")
    table = Table(title=f"{clusters} per {report['granularity']}, {args.format} format", title_justify="left")
    for col in ("tensor", "shape", "codebook per", "bits", "distinct", "rel. MSE", "bytes", "after", "zipped",
                "entropy est."):
        table.add_column(col, justify="left" if col in ("tensor", "shape", "codebook per") else "right")
    for name, t in report["tensors"].items():
        table.add_row(esc(name), "x".join(map(str, t["shape"])), esc(t["granularity"]),
                      str(t.get("bits", (config.k - 1).bit_length())), str(t["distinct_values"]),
                      f"{t['relative_mse']:.2e}",
                      fmt_size(t["bytes_before"]), fmt_size(t["bytes_after"]), fmt_size(t["zlib_bytes_after"]),
                      fmt_size(t["entropy_bytes"]))
    con.print(table)
    tot = report["totals"]
    if tot["bytes_before"]:
        con.print(
            f"clustered weights: {fmt_size(tot['bytes_before'])} -> {fmt_size(tot['bytes_after'])} stored, "
            f"{fmt_size(tot['zlib_bytes_after'])} zipped, {fmt_size(tot['entropy_bytes'])} with entropy coding "
            f"({tot['bytes_before'] / max(tot['entropy_bytes'], 1):.1f}x)"
        )
    con.print(
        f"file: {fmt_size(report['input']['bytes'])} -> {fmt_size(report['output']['bytes'])} "
        f"({report['output']['bytes'] / report['input']['bytes']:.2f}x); session creation "
        f"{report['input']['session_creation_s'] * 1e3:.1f} ms -> {report['output']['session_creation_s'] * 1e3:.1f} ms"
    )
    for where, row in report.get("subgraphs", {}).items():
        con.print(f"inside subgraph {esc(where)}: {row['tensors']} tensor(s), "
                  f"{fmt_size(row['bytes_before'])} -> {fmt_size(row['bytes_after'])} stored")
    if report["skipped"]:
        con.print(f"left alone: {len(report['skipped'])} tensor(s) (--json lists why)")
    print_check(con, check)
    return status


register("cluster", "k-means weight sharing (Deep Compression style), float or codebook storage", _configure, _run)
