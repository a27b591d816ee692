"""The ``onnxcomp`` command line.

One contract for every command: a model path first; ``-o OUT`` where a model is written;
``--calibration FILE`` / ``--data FILE`` for data (an .npz file or a folder of .npz files);
``--json`` prints one machine-readable JSON document on stdout; ``--quiet`` prints nothing but
errors. A user error (bad file, bad data, bad option, a usage error found by argparse) prints one
``onnxcomp: error: ...`` line on stderr and exits with status 1, never a traceback; Ctrl-C exits with
status 130 and leaves no partial file. Commands that write check every destination before any work
(:func:`check_outputs`): no output may be an input or another output, and an existing read-only
output is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from onnxcomp import __version__
from onnxcomp.cli_common import (
    _COMMANDS,
    POSITIVE_INT,
    add_check_flags,
    add_force_flag,
    add_output_flags,
    add_specialize_flags,
    add_threads_flag,
    check_config,
    check_outputs,
    check_status,
    console,
    esc,
    file_bytes,
    print_check,
    print_int8_latency,
    print_json,
    progress_bar,
    register,
    run_check,
    specialize,
    verify_output,
)
from onnxcomp.errors import OnnxcompError

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------
# inspect


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    add_output_flags(p)


def _run_inspect(args: argparse.Namespace) -> int:
    from onnxcomp.io import load_model
    from onnxcomp.summary import summarize_model

    info = summarize_model(load_model(args.model))
    if args.json:
        print_json(info)
        return 0
    _render_summary(console(args), info)
    return 0


register(
    "inspect",
    "describe a model: opset, inputs/outputs, ops, parameters, external data",
    _configure_inspect,
    _run_inspect,
)


def _render_summary(con, info: dict[str, Any]) -> None:
    from rich.table import Table

    con.print(f"[bold]{esc(info['path'] or '<model>')}[/bold]")
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opset_imports"].items())
    con.print(f"IR version {info['ir_version']}, opsets: {esc(opsets)}; producer: {esc(info['producer'] or '-')}")
    io_table = Table(title="inputs / outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io_table.add_row(kind[:-1], esc(v["name"]), v["dtype"], esc(v["shape"]))
    con.print(io_table)
    ops = Table(title=f"{info['nodes']} nodes", title_justify="left")
    ops.add_column("op type")
    ops.add_column("count", justify="right")
    for op, n in info["op_types"].items():
        ops.add_row(esc(op), str(n))
    con.print(ops)
    params = Table(
        title=f"{info['parameters']:,} parameters, {_fmt_bytes(info['parameter_bytes'])}",
        title_justify="left",
    )
    for col in ("consumer op", "tensors", "parameters", "bytes"):
        params.add_column(col, justify="right" if col != "consumer op" else "left")
    for op, row in info["parameters_by_op"].items():
        params.add_row(esc(op), str(row["tensors"]), f"{row['parameters']:,}", _fmt_bytes(row["bytes"]))
    con.print(params)
    weights = info["weights"]
    con.print(f"weights: {weights['weight_elements']:,} elements; quantization parameters (scales, zero points, "
              f"codebooks): {weights['quant_params']:,}")
    in_attributes = info.get("attribute_weights") or {}
    if in_attributes:
        ops = ", ".join(f"{row['nodes']} {op} ({row['values']:,})" for op, row in in_attributes.items())
        con.print(f"weights in attributes: {sum(r['values'] for r in in_attributes.values()):,} values of {esc(ops)}; "
                  "not counted above and not compressed by onnxcomp (it compresses weight tensors)")
    packed = info.get("packed")
    if packed:
        nonzero = packed["sparse_values"]
        sparse = "" if nonzero is None else \
            f"; {nonzero:,} sparse values (nonzero weights, {100.0 * nonzero / max(packed['weights'], 1):.1f}%)"
        con.print(f"bit-packed: {packed['tensors']} tensors, {packed['weights']:,} weights in {packed['bytes']:,} bytes "
                  f"({packed['bits']:,} bits, {packed['bits_per_weight']:.2f} per weight); "
                  f"{packed['codebook_entries']:,} codebook entries{sparse}")
    ext = info["external_data"]
    if ext["files"]:
        con.print(f"external data: {_fmt_bytes(ext['bytes'])} in {esc(', '.join(ext['files']))}")
    else:
        con.print("external data: none")
    sub = info["subgraphs"]
    if sub["count"]:
        flow = ", ".join(f"{k} x{v}" for k, v in sub["control_flow_ops"].items())
        con.print(f"subgraphs: {sub['count']} ({flow})")
    else:
        con.print("subgraphs: none")
    if info["functions"]:
        con.print(f"model-local functions: {info['functions']}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# compress


def _configure_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write the compressed model")
    p.add_argument("--recipe", default="int8", help="shipped recipe name or TOML file (default: int8)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a recipe setting, e.g. quantize.calibration=percentile (repeatable); the value "
                        "is read as TOML, else as text; a list setting takes comma-separated entries "
                        "(quantize.exclude=fc1,re:^/head/; commas inside brackets, as in re:x{1,2}, do not "
                        "separate) or a TOML array (quantize.exclude='[\"a,b\"]' for an entry holding a comma), "
                        "and the same list setting given again adds its entries")
    p.add_argument("--calibration", metavar="FILE", help="calibration data (.npz file or folder)")
    p.add_argument("--eval", metavar="FILE", help="evaluation data for the fidelity report")
    p.add_argument("--labels", metavar="FILE.npy", help="integer labels of the evaluation data")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="samples per feed (dynamic batch dimension)")
    p.add_argument("--max-samples", type=POSITIVE_INT, metavar="N",
                   help="read at most N calibration feeds for fitting, and at most N held out for the check")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D0xD1x...",
                   help="input shape for generated latency inputs when no data is given")
    p.add_argument("--report", metavar="FILE.html", help="also write a self-contained HTML report")
    add_threads_flag(p, "measure latency at this many intra-op threads (turns the measure stage's latency on) "
                        "and take latency decisions there")
    p.add_argument("--no-upgrade", action="store_true", help="refuse instead of upgrading an old opset")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    add_check_flags(p)
    add_specialize_flags(p)
    add_force_flag(p)
    add_output_flags(p)


def _compressed_by_stages(stages: list[dict[str, Any]], model=None, written=None) -> tuple[int | None, str]:
    """What the lossy stages of a compress run changed (None when no stage is lossy): a quantize
    stage's int8 nodes, recurrent ops given int8 weights and quantized embedding lookups. When
    they count nothing (a fidelity fallback's report has no recurrent or embedding section), the
    int8 tensors ``written`` (the output) carries beyond ``model``'s (the input) instead."""
    counts = []
    for entry in stages:
        stats = entry["stats"]
        if entry["stage"] == "quantize":
            from onnxcomp.quant.cli import recurrent_int8

            tables = (stats.get("embeddings") or {}).get("tables") or {}
            counts.append((int(stats.get("int8_nodes") or stats.get("nodes_quantized") or 0) + recurrent_int8(stats)
                           + sum(len(t.get("nodes") or ()) for t in tables.values()), "quantized nodes"))
        elif entry["stage"] == "prune":
            counts.append((int(stats.get("channels_removed") or 0), "channels removed"))
        elif entry["stage"] == "cluster":
            counts.append((len(stats.get("tensors") or {}), "tensors clustered"))
    if not counts:
        return None, ""
    if written is not None and not any(n for n, _ in counts) and any(e["stage"] == "quantize" for e in stages):
        from onnxcomp.quant.verify import int8_tensors_added

        stored = int8_tensors_added(model, written)
        if stored > 0:
            return stored, "int8 tensors"
    return sum(n for n, _ in counts), ", ".join(what for _, what in counts)


def _run_compress(args: argparse.Namespace) -> int:
    from onnxcomp.check import split_data
    from onnxcomp.compress import compress, needs_calibration
    from onnxcomp.data import Dataset, load_labels, parse_shapes
    from onnxcomp.errors import ConfigError
    from onnxcomp.io import load_model, save_model, write_text_atomic
    from onnxcomp.recipe import load_recipe, parse_overrides, shipped_recipes
    from onnxcomp.report import render_html, render_terminal

    con = console(args)
    if args.list_recipes:
        recipes = shipped_recipes()
        if args.json:
            print_json(recipes)
        else:
            for name, description in recipes.items():
                con.print(f"[bold]{esc(name)}[/bold]: {esc(description)}")
        return 0
    if not args.model or not args.output:
        raise ConfigError("compress needs MODEL and -o OUT")
    recipe = load_recipe(args.recipe)
    if args.set:
        recipe = recipe.with_overrides(parse_overrides(args.set))
    if args.threads:
        recipe = recipe.with_overrides({"measure.threads": args.threads, "measure.latency": True})
    if args.shape and (args.calibration or args.eval):  # as bench refuses --shape beside --data
        raise ConfigError("--shape sizes generated latency inputs, made only when no --calibration or --eval data "
                          "is given (latency is then measured on that data): drop it")
    check_cfg = check_config(args)
    model = load_model(args.model)
    check_outputs(args, model)
    specialized, fixed = specialize(args, model, con)
    calibration = Dataset(args.calibration, model, batch_size=args.batch_size, limit=args.max_samples,
                          ignore=fixed) if args.calibration else None
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size, ignore=fixed) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --eval (the evaluation data they label)")
    if needs_calibration(recipe) and calibration is None:
        raise ConfigError(f"recipe {recipe.name!r} quantizes statically and needs calibration data (--calibration)")
    split = split_data(calibration, check_cfg, evaluation=evaluation, labels=labels, model=model)
    if split.fit is not None:
        calibration = split.fit
    shapes = parse_shapes(args.shape)
    with progress_bar(con) as progress:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        compressed, report = compress(
            model, recipe, calibration, eval_data=evaluation, labels=labels,
            allow_upgrade=not args.no_upgrade, shapes=shapes, progress=update, threads=args.threads,
            check=check_cfg,
        )
    out = save_model(compressed, args.output, force=args.force, verify=verify_output(split, model, check_cfg.enabled))
    report["model"] = args.model
    report["output"] = str(out)
    if specialized is not None:
        report["specialize"] = specialized
    # Sizes of the files themselves (model plus external data), not of an in-memory serialization.
    report["before"].update(bytes=file_bytes(args.model, model), file=args.model)
    report["after"].update(bytes=file_bytes(out), file=str(out))
    count, what = _compressed_by_stages(report["stages"], model, compressed)
    from onnxcomp.graph import attribute_weights_note

    why = "" if count else attribute_weights_note(model, "the model's") or "see each stage's statistics (--json)"
    check = run_check(con, model, out, split, check_cfg, report, compressed=count, what=what, why=why)
    status = check_status(args, check)
    if args.report:
        write_text_atomic(args.report, render_html(report), force=args.force)
        report["report"] = args.report
    if args.json:
        print_json(report)
        return status
    render_terminal(con, report)
    con.print(f"wrote {esc(out)}" + (f" and {esc(args.report)}" if args.report else ""))
    print_int8_latency(con, (report.get("measure") or {}).get("int8_latency"))
    print_check(con, check)
    return status


register(
    "compress",
    "compress a model with a recipe (cleanup, prune, cluster, quantize, verify, measure) and report",
    _configure_compress,
    _run_compress,
)


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one ``onnxcomp: error:`` line and status 1."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"onnxcomp: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxcomp",
        description="Post-training compression for ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"onnxcomp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, configure, _run) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    parser.set_defaults(commands=sub.choices)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown argument is reported by its command's parser (its help lists
    the options), not by the top-level one."""
    args, extra = build_parser().parse_known_args(argv)
    commands = args.commands
    del args.commands
    if extra:
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 bad input, bad option or failure, 130 interrupted).

    argparse's own errors (an unknown option, a bad choice) exit with status 1 via ``SystemExit``.
    """
    try:  # numpy, onnx, onnxruntime: seconds in which Ctrl-C is likely; an import error propagates
        _load_commands()
        from onnxcomp.io import written_files
    except KeyboardInterrupt:
        sys.stderr.write("onnxcomp: interrupted; no output written\n")
        return EXIT_INTERRUPTED
    written = len(written_files())
    try:
        args = _parse(argv)
        _help, _configure, run = _COMMANDS[args.command]
        return run(args)
    except OnnxcompError as exc:
        sys.stderr.write(f"onnxcomp: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        done = written_files()[written:]
        if done:  # complete files (each written atomically); what came after them did not run
            sys.stderr.write(f"onnxcomp: interrupted after writing {', '.join(done)}; its check and "
                             "summary did not finish\n")
        else:
            sys.stderr.write("onnxcomp: interrupted; no output written\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `onnxcomp inspect m.onnx --json | head`
        return 0
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:500]
        if os.environ.get("ONNXCOMP_DEBUG"):  # onnxruntime's refusals too: the model may be one onnxcomp built
            raise
        if type(exc).__module__.startswith("onnxruntime"):  # a bad model, not a bug here
            done = written_files()[written:]  # e.g. the check of a written output failed to run it
            wrote = f"; written before it: {', '.join(done)}" if done else ""
            sys.stderr.write(f"onnxcomp: error: onnxruntime cannot run the model: {reason or type(exc).__name__}"
                             f"{wrote}\n")
            return EXIT_ERROR
        done = written_files()[written:]
        wrote = f"; written before it: {', '.join(done)}" if done else "; no output written"
        sys.stderr.write(f"onnxcomp: internal error: {type(exc).__name__}: {reason}{wrote}. This is a bug in "
                         "onnxcomp, not in the model or data; ONNXCOMP_DEBUG=1 shows the traceback\n")
        return EXIT_ERROR


def _load_commands() -> None:
    """Import the modules that register the further commands (in :mod:`onnxcomp.cli_common`'s
    registry; they import nothing from this module). An import error propagates: a broken command
    module is an error, not a missing command."""
    import onnxcomp.measure.cli  # noqa: F401
    import onnxcomp.quant.cli  # noqa: F401
    import onnxcomp.cluster.cli  # noqa: F401
    import onnxcomp.prune.cli  # noqa: F401
