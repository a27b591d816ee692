"""``onnxcomp bench`` and ``onnxcomp compare``.

``bench`` measures one or more models interleaved (A B A B ... in rounds) with onnxruntime's CPU
provider and reports each as a ratio to the first model with a bootstrap 95% interval.
``compare`` reports per-output fidelity (and per-layer with ``--per-layer``) of a candidate against a
reference, and accuracy against labels; each output with its kind as the held-out check judges it,
and top-1 agreement only for class scores (:func:`onnxcomp.check.reads_top1`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from onnxcomp.cli_common import COUNT, POSITIVE_INT, add_output_flags, console, esc, print_json, progress_bar, register
from onnxcomp.data import Dataset, describe_free_dims, generated_feeds, load_labels, parse_shapes
from onnxcomp.measure.bench import LATENCY_RANGES, bench_models, physical_cores
from onnxcomp.measure.latency import MeasurementError, SessionCreationError
from onnxcomp.bounds import Range
from onnxcomp.errors import ConfigError, DataError

__all__: list[str] = []


# ---------------------------------------------------------------------------------------------
# bench


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX models; the first is the baseline for ratios")
    feeds = p.add_mutually_exclusive_group()  # --shape sizes generated inputs only: beside --data it did nothing
    feeds.add_argument("--data", help="inputs from an .npz file or folder (default: generated from the input types)")
    feeds.add_argument("--shape", action="append", default=[], metavar="NAME=D0xD1x...",
                       help="shape of a generated input with dynamic dimensions (repeatable)")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="samples per run when feeding --data")
    p.add_argument("--threads", type=LATENCY_RANGES["threads"], default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--optimization", choices=("disable", "basic", "extended", "all"), default="all",
                   help="onnxruntime graph optimization level (default: all)")
    p.add_argument("--runs", type=LATENCY_RANGES["runs"], default=50, help="measured runs per model (default 50); with two models or more, a first model under 1 ms "
                   "is measured this many rounds in each of 3 sets of fresh sessions, pooled")
    p.add_argument("--time-budget", type=LATENCY_RANGES["time_budget"], help="stop measuring after this many seconds (at least one round)")
    p.add_argument("--warmup-runs", type=LATENCY_RANGES["warmup_runs"], default=10)
    p.add_argument("--warmup-seconds", type=LATENCY_RANGES["warmup_seconds"], default=1.0)
    p.add_argument("--feeds", type=Range(int, 1, 100_000), default=8, help="distinct feeds cycled through (default 8)")
    p.add_argument("--seed", type=Range(int, 0, 2**32 - 1), default=0)
    add_output_flags(p)


def _run_bench(args: argparse.Namespace) -> int:
    from onnxcomp.io import load_model

    con = console(args)
    if args.batch_size is not None and not args.data:
        raise ConfigError("--batch-size sets the samples of each --data feed; without --data, size the generated "
                          "inputs with --shape NAME=D0xD1x...")
    free_dims: list = []
    models = [(name, load_model(path)) for name, path in zip(_run_names(args.models), args.models)]
    first = models[0][1]
    if args.data:
        ds = Dataset(args.data, first, batch_size=args.batch_size, limit=args.feeds)
        feeds = list(ds)
    else:
        # Free dimensions default to 1, or to what a weight reads there (said below); --shape overrides.
        feeds, free_dims = generated_feeds(first, parse_shapes(args.shape), count=args.feeds, seed=args.seed)
    for path, model in models[1:]:  # same inputs for every model, or an error naming the model
        try:
            list(Dataset(feeds, model))
        except DataError as exc:
            raise DataError(f"{path}: cannot take the inputs of the first model {args.models[0]}: {exc}") from None
    threads = args.threads or physical_cores()
    with progress_bar(con) as progress:
        task = progress.add_task("measuring (interleaved)", total=args.runs)
        try:
            rows = bench_models(
                models, feeds, threads=threads, optimization=args.optimization, runs=args.runs,
                time_budget=args.time_budget, warmup_runs=args.warmup_runs,
                warmup_seconds=args.warmup_seconds, seed=args.seed,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        except MeasurementError as exc:
            if args.data and not isinstance(exc, SessionCreationError):  # say which feed of the data
                raise MeasurementError(exc.spec_name, f"{exc}{_failing_feed(dict(models), exc.spec_name, feeds, ds)}"
                                       ) from None
            if not free_dims:
                raise
            # the inputs were made up: say how, since sizes of 1 are what a model most often refuses
            raise MeasurementError(exc.spec_name, f"{exc}; the inputs were generated with "
                                   + "; ".join(describe_free_dims(free_dims)) + " (or pass --data)") from None
    if args.json:
        print_json({"threads": threads, "optimization": args.optimization, "free_dims": free_dims, "models": rows})
        return 0
    for line in describe_free_dims(free_dims):
        con.print(f"[yellow]note:[/yellow] {esc(line)}")
    for line in _session_notes(rows):
        con.print(f"[yellow]note:[/yellow] {esc(line)}")
    from rich.table import Table

    shown = _shown_names([r["name"] for r in rows])
    table = Table(title=f"latency, {threads} thread(s), optimization {args.optimization}, interleaved", title_justify="left")
    for col in ("model", "median ms", "min", "p90", "p99", "mean", "per s", "ratio [95% CI]", "session s", "peak mem"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        ratio = "1 (baseline)" if r["ratio_to_first"] is None else (
            f"{r['ratio_to_first']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]"
        )
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f} MiB"
        table.add_row(
            esc(shown[r["name"]]), f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}", f"{r['p90_ms']:.3f}",
            f"{r['p99_ms']:.3f}", f"{r['mean_ms']:.3f}", f"{r['throughput_per_s']:.1f}", ratio,
            f"{r['session_creation_s']:.3f}", mem,
        )
    con.print(table)
    con.print(f"{rows[0]['runs']} runs per model; ratio = median / median of {esc(shown[rows[0]['name']])} (< 1 is faster)")
    return 0


def _failing_feed(models: dict[str, Any], name: str, feeds: list[dict[str, Any]], data: Dataset) -> str:
    """Which feed of ``data`` the model ``name`` cannot run (the first), as a phrase for the error."""
    from onnxcomp.runtime import run_model

    for i, feed in enumerate(feeds):
        try:
            run_model(models[name], [feed])
        except Exception:
            return f" (on feed {i} of the {len(feeds)} read from {data.name})"
    return f" (on the feeds of {data.name})"


def _run_names(paths: list[str]) -> list[str]:
    """One name a model of ``bench``, its path as given; a path given again (an A/A run, which
    shows the noise) is ``PATH #2``, ``PATH #3``..."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        seen[path] = seen.get(path, 0) + 1
        names.append(path if seen[path] == 1 else f"{path} #{seen[path]}")
    return names


def _shown_names(names: list[str]) -> dict[str, str]:
    """The table's name of each model: its file name, or its path where file names repeat."""
    short = {name: os.path.basename(name) for name in names}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {name: s if counts[s] == 1 else name for name, s in short.items()}


register("bench", "measure onnxruntime CPU latency of one or more models, interleaved", _configure_bench, _run_bench)


# ---------------------------------------------------------------------------------------------
# compare


def _configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("candidate", metavar="CANDIDATE")
    p.add_argument("--data", required=True, help="inputs: an .npz file or a folder of .npz feeds")
    p.add_argument("--labels", help="integer labels (.npy) for accuracy of both models")
    p.add_argument("--label-output", help="output holding class scores (default: the first)")
    p.add_argument("--per-layer", action="store_true", help="SQNR of every intermediate tensor both models share")
    p.add_argument("--top", type=COUNT, default=15, help="layers shown with --per-layer (default 15; --json has all)")
    p.add_argument("--channel-axis", default="auto", help="per-channel error axis: auto, none, or an integer")
    p.add_argument("--batch-size", type=POSITIVE_INT)
    p.add_argument("--limit", type=POSITIVE_INT, help="use at most this many feeds")
    p.add_argument("--optimization", choices=("disable", "basic", "extended", "all"), default="all")
    add_output_flags(p)


def _run_compare(args: argparse.Namespace) -> int:
    from onnxcomp.io import load_model
    from onnxcomp.measure.fidelity import compare_models

    con = console(args)
    reference = load_model(args.reference)
    candidate = load_model(args.candidate)
    ds = Dataset(args.data, reference, batch_size=args.batch_size, limit=args.limit)
    labels = None
    if args.labels:
        labels = load_labels(args.labels)
        ds.check_labels(labels)  # one label per sample of the data file, refused before any run
        if args.limit is not None and ds.num_samples is not None:  # the first feeds' samples only
            labels = labels[: min(ds.num_samples, args.limit * (args.batch_size or 1))]
    axis: int | None | str
    if args.channel_axis == "auto":
        axis = "auto"
    elif args.channel_axis == "none":
        axis = None
    else:
        try:
            axis = int(args.channel_axis)
        except ValueError:
            raise ConfigError(f"--channel-axis must be auto, none or an integer, got {args.channel_axis!r}") from None
        for out in reference.graph.outputs:
            rank = len(out.shape) if out.shape is not None else None
            if rank is not None and rank >= 2 and not (-rank <= axis < rank and axis % rank != 0):
                raise ConfigError(f"--channel-axis {axis}: output {out.name!r} has rank {rank}; "
                                  f"give an axis in 1..{rank - 1} (axis 0 indexes samples), auto or none")
    with progress_bar(con) as progress:
        task = progress.add_task("comparing", total=ds.num_feeds)
        result = compare_models(
            reference, candidate, ds, labels=labels, label_output=args.label_output,
            per_layer=args.per_layer, channel_axis=axis, optimization=args.optimization,
            progress=lambda n: progress.update(task, completed=n),
        )
    # top-1 agreement only where the held-out check reads an output by it (class scores), in the
    # table and the JSON alike (ModelComparison.top1); label agreement for decided classes
    if args.json:
        document = result.to_dict()
        print_json({"reference": args.reference, "candidate": args.candidate, **document})
        return 0
    from rich.table import Table

    table = Table(title=f"{esc(os.path.basename(args.candidate))} vs {esc(os.path.basename(args.reference))}: "
                        f"{result.samples} samples", title_justify="left")
    regressions = any(result.r2_vs_original(f) is not None for f in result.outputs)
    columns = ("output", "shape", "kind", "SQNR dB", "cosine", "max abs", "mean abs", "top-1 agree",
               *(("R^2 vs original",) if regressions else ()), "worst channel")
    for col in columns:
        table.add_column(col, justify="left" if col in ("output", "shape", "kind") else "right")
    for f in result.outputs:
        worst = "-" if f.worst_channel is None else f"#{f.worst_channel[0]}: {f.worst_channel[1]:.1f} dB"
        top1 = result.top1(f)
        labels = result.label_agreement(f)  # decided classes: their agreement, no noise figures
        agree = f"{100 * labels:.2f}%" if labels is not None else "-" if top1 is None else f"{100 * top1:.2f}%"
        sqnr, cosine = ("-", "-") if labels is not None else (f"{f.sqnr_db:.2f}", f"{f.cosine:.6f}")
        r2 = result.r2_vs_original(f)
        table.add_row(esc(f.name), "x".join("?" if d is None else str(d) for d in f.shape), result.kind(f),
                      sqnr, cosine, f"{f.max_abs:.4g}", f"{f.mean_abs:.4g}", agree,
                      *(("-" if r2 is None else f"{r2:.4f}",) if regressions else ()), worst)
    con.print(table)
    if result.accuracy:
        con.print(
            f"accuracy on {esc(repr(result.label_output))}: reference {100 * result.accuracy['reference']:.2f}%, "
            f"candidate {100 * result.accuracy['candidate']:.2f}% "
            f"({100 * (result.accuracy['candidate'] - result.accuracy['reference']):+.2f} points)"
        )
    if args.per_layer:
        layers = Table(title=f"per layer, worst first ({len(result.layers)} shared tensors)", title_justify="left")
        for col in ("tensor", "SQNR dB", "cosine", "max abs"):
            layers.add_column(col, justify="left" if col == "tensor" else "right")
        for f in result.layers[: args.top]:
            layers.add_row(esc(f.name), f"{f.sqnr_db:.2f}", f"{f.cosine:.6f}", f"{f.max_abs:.4g}")
        con.print(layers)
        if result.layers_skipped:
            con.print(f"{len(result.layers_skipped)} shared tensor(s) not compared (empty or resized; --json lists why)")
    return 0


register("compare", "compare a candidate model's outputs (and layers) with a reference on data", _configure_compare, _run_compare)


def _session_notes(rows: list[dict]) -> list[str]:
    """What the table cannot show when a short run was pooled over sets of fresh sessions."""
    if len(rows) < 2 or "session_ratios" not in rows[1]:
        return []
    lines = [f"the first model runs {rows[0]['median_ms']:.3f} ms: measured in {rows[0]['session_sets']} sets of "
             "fresh sessions and pooled, since a run this short can vary from one session to the next; "
             "each interval resamples the sets and their rounds"]
    for r in rows[1:]:
        each = ", ".join(f"{x:.2f}" for x in r["session_ratios"])
        lines.append(f"{r['name']}: ratio per set {each}" + (
            ": the sets' intervals do not overlap, the sessions made the spread" if r["session_spread"] else ""))
    return lines
