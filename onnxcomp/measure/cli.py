"""``onnxcomp bench`` and ``onnxcomp compare``.

``bench`` measures one or more models interleaved (A B A B ... in rounds) with onnxruntime's CPU
provider and reports each as a ratio to the first model with a bootstrap 95% interval.
``compare`` reports per-output fidelity (and per-layer with ``--per-layer``) of a candidate against a
reference, and accuracy against labels.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.cli import add_output_flags, console, print_json, register
from onnxcomp.data import Dataset, InputSpec, load_labels, model_inputs
from onnxcomp.errors import ConfigError, DataError

__all__ = ["physical_cores", "synthetic_feed", "parse_shapes"]


def physical_cores() -> int:
    """Physical cores from /proc/cpuinfo (distinct (physical id, core id) pairs), else cpu_count."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            pairs = set()
            phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip():
                    if core is not None:
                        pairs.add((phys, core))
                    phys = core = None
            if core is not None:
                pairs.add((phys, core))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["x=1x3x224x224", ...]`` -> ``{"x": (1, 3, 224, 224)}``; ConfigError names a bad item."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise ConfigError(f"--shape {item!r}: expected NAME=D0xD1x... with non-negative integers") from None
        shapes[name] = shape
    return shapes


def synthetic_feed(
    inputs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """A feed from the input types: floats uniform in [0, 1), integers 0, booleans False.

    Raises:
        DataError: an input has a dynamic dimension and no ``--shape`` for it (names the dim), a
            ``--shape`` names no input or contradicts a fixed dimension.
    """
    rng = np.random.default_rng(seed)
    known = {s.name for s in inputs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise DataError(f"--shape names {', '.join(map(repr, unknown))}, not an input; inputs: {sorted(known)}")
    feed = {}
    for spec in inputs:
        if spec.optional:
            continue
        if spec.name in shapes:
            shape = shapes[spec.name]
            if spec.shape is not None:
                if len(shape) != len(spec.shape):
                    raise DataError(
                        f"--shape {spec.name}: rank {len(shape)}, the model's input is {spec.describe_shape()}"
                    )
                for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                    if isinstance(want, int) and want != got:
                        raise DataError(
                            f"--shape {spec.name}: axis {axis} is {got}, the model fixes it at {want}"
                        )
        else:
            if spec.shape is None:
                raise DataError(f"input {spec.name!r} has an unknown shape; give --shape {spec.name}=D0xD1x...")
            for axis, dim in enumerate(spec.shape):
                if not isinstance(dim, int):
                    label = f"{dim!r}" if dim else "?"
                    raise DataError(
                        f"input {spec.name!r} has dynamic dimension {label} (axis {axis}) in "
                        f"{spec.describe_shape()}; give --shape {spec.name}=D0xD1x... or input data"
                    )
            shape = tuple(int(d) for d in spec.shape)  # type: ignore[arg-type]
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.random(shape, dtype=np.float64).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feed[spec.name] = np.zeros(shape, dtype=bool)
        else:
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feed


def _progress(con, description: str, total: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=con,
        transient=True,
        disable=con.quiet,
    )


# ---------------------------------------------------------------------------------------------
# bench


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX models; the first is the baseline for ratios")
    p.add_argument("--data", help="inputs from an .npz file or folder (default: generated from the input types)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D0xD1x...",
                   help="shape of a generated input with dynamic dimensions (repeatable)")
    p.add_argument("--batch-size", type=int, help="samples per run when feeding --data")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--optimization", choices=("disable", "basic", "extended", "all"), default="all",
                   help="onnxruntime graph optimization level (default: all)")
    p.add_argument("--runs", type=int, default=50, help="measured runs per model (default 50)")
    p.add_argument("--time-budget", type=float, help="stop measuring after this many seconds (at least one round)")
    p.add_argument("--warmup-runs", type=int, default=10)
    p.add_argument("--warmup-seconds", type=float, default=1.0)
    p.add_argument("--feeds", type=int, default=8, help="distinct feeds cycled through (default 8)")
    p.add_argument("--seed", type=int, default=0)
    add_output_flags(p)


def bench_models(
    models: Sequence[tuple[str, ir.Model]],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    threads: int | None = None,
    optimization: str = "all",
    runs: int = 50,
    time_budget: float | None = None,
    warmup_runs: int = 10,
    warmup_seconds: float = 1.0,
    seed: int = 0,
    progress=None,
) -> list[dict[str, Any]]:
    """Interleaved latency of ``models`` (name, model) on ``feeds``; JSON-ready rows."""
    from onnxcomp.io import initializer_nbytes, model_to_bytes
    from onnxcomp.measure.latency import SessionSpec, measure_latency

    threads = threads or physical_cores()
    specs = [
        SessionSpec(name=name, model=model_to_bytes(model), threads=threads, graph_optimization=optimization)
        for name, model in models
    ]
    batch = int(next(iter(feeds[0].values())).shape[0]) if feeds and feeds[0] else 1
    results = measure_latency(
        specs, list(feeds), warmup_runs=warmup_runs, warmup_seconds=warmup_seconds, runs=runs,
        time_budget=time_budget, seed=seed, progress=progress, batch_size=max(batch, 1),
    )
    rows = []
    for (name, model), res in zip(models, results):
        s = res.summary
        rows.append({
            "name": name,
            "runs": s.n,
            "min_ms": s.min * 1e3,
            "median_ms": s.median * 1e3,
            "p90_ms": s.p90 * 1e3,
            "p99_ms": s.p99 * 1e3,
            "mean_ms": s.mean * 1e3,
            "throughput_per_s": s.items_per_s,
            "ratio_to_first": res.ratio,
            "ratio_ci95": list(res.ratio_interval) if res.ratio_interval else None,
            "session_creation_s": res.session_creation_s,
            "peak_memory_bytes": res.peak_rss_delta_bytes,
            "memory_method": res.memory_method,
            "times_ms": [t * 1e3 for t in res.times],
            "parameter_bytes": initializer_nbytes(model),
        })
    return rows


def _run_bench(args: argparse.Namespace) -> int:
    from onnxcomp.io import load_model

    con = console(args)
    models = [(path, load_model(path)) for path in args.models]
    first = models[0][1]
    if args.data:
        ds = Dataset(args.data, first, batch_size=args.batch_size, limit=args.feeds)
        feeds = list(ds)
        for path, model in models[1:]:
            list(Dataset(feeds, model))  # same inputs for every model, or a clear error
    else:
        shapes = parse_shapes(args.shape)
        feeds = [synthetic_feed(model_inputs(first), shapes, seed=args.seed + i) for i in range(args.feeds)]
        for path, model in models[1:]:
            list(Dataset(feeds, model))
    threads = args.threads or physical_cores()
    with _progress(con, "bench", args.runs) as progress:
        task = progress.add_task("measuring (interleaved)", total=args.runs)
        rows = bench_models(
            models, feeds, threads=threads, optimization=args.optimization, runs=args.runs,
            time_budget=args.time_budget, warmup_runs=args.warmup_runs,
            warmup_seconds=args.warmup_seconds, seed=args.seed,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if args.json:
        print_json({"threads": threads, "optimization": args.optimization, "models": rows})
        return 0
    from rich.table import Table

    table = Table(title=f"latency, {threads} thread(s), optimization {args.optimization}, interleaved", title_justify="left")
    for col in ("model", "median ms", "min", "p90", "p99", "mean", "per s", "ratio [95% CI]", "session s", "peak mem"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        ratio = "1 (baseline)" if r["ratio_to_first"] is None else (
            f"{r['ratio_to_first']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]"
        )
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f} MiB"
        table.add_row(
            os.path.basename(r["name"]), f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}", f"{r['p90_ms']:.3f}",
            f"{r['p99_ms']:.3f}", f"{r['mean_ms']:.3f}", f"{r['throughput_per_s']:.1f}", ratio,
            f"{r['session_creation_s']:.3f}", mem,
        )
    con.print(table)
    con.print(f"{rows[0]['runs']} runs per model; ratio = median / median of {os.path.basename(rows[0]['name'])} (< 1 is faster)")
    return 0


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
    p.add_argument("--top", type=int, default=15, help="layers shown with --per-layer (default 15; --json has all)")
    p.add_argument("--channel-axis", default="auto", help="per-channel error axis: auto, none, or an integer")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--limit", type=int, help="use at most this many feeds")
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
    with _progress(con, "compare", ds.num_feeds) as progress:
        task = progress.add_task("comparing", total=ds.num_feeds)
        result = compare_models(
            reference, candidate, ds, labels=labels, label_output=args.label_output,
            per_layer=args.per_layer, channel_axis=axis, optimization=args.optimization,
            progress=lambda n: progress.update(task, completed=n),
        )
    if args.json:
        print_json({"reference": args.reference, "candidate": args.candidate, **result.to_dict()})
        return 0
    from rich.table import Table

    table = Table(title=f"{os.path.basename(args.candidate)} vs {os.path.basename(args.reference)}: "
                        f"{result.samples} samples", title_justify="left")
    for col in ("output", "shape", "SQNR dB", "cosine", "max abs", "mean abs", "top-1 agree", "worst channel"):
        table.add_column(col, justify="left" if col in ("output", "shape") else "right")
    for f in result.outputs:
        worst = "-" if f.worst_channel is None else f"#{f.worst_channel[0]}: {f.worst_channel[1]:.1f} dB"
        agree = "-" if f.top1_agreement is None else f"{100 * f.top1_agreement:.2f}%"
        table.add_row(f.name, "x".join(map(str, f.shape)), f"{f.sqnr_db:.2f}", f"{f.cosine:.6f}",
                      f"{f.max_abs:.4g}", f"{f.mean_abs:.4g}", agree, worst)
    con.print(table)
    if result.accuracy:
        con.print(
            f"accuracy on {result.label_output!r}: reference {100 * result.accuracy['reference']:.2f}%, "
            f"candidate {100 * result.accuracy['candidate']:.2f}% "
            f"({100 * (result.accuracy['candidate'] - result.accuracy['reference']):+.2f} points)"
        )
    if args.per_layer:
        layers = Table(title=f"per layer, worst first ({len(result.layers)} shared tensors)", title_justify="left")
        for col in ("tensor", "SQNR dB", "cosine", "max abs"):
            layers.add_column(col, justify="left" if col == "tensor" else "right")
        for f in result.layers[: args.top]:
            layers.add_row(f.name, f"{f.sqnr_db:.2f}", f"{f.cosine:.6f}", f"{f.max_abs:.4g}")
        con.print(layers)
    return 0


register("compare", "compare a candidate model's outputs (and layers) with a reference on data", _configure_compare, _run_compare)
