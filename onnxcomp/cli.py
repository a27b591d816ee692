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
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from onnxcomp import __version__
from onnxcomp.bounds import Range
from onnxcomp.errors import OnnxcompError

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

_COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


def register(
    name: str,
    help_text: str,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add a subcommand: ``configure(parser)`` adds its flags, ``run(args)`` returns the exit code."""
    _COMMANDS[name] = (help_text, configure, run)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def add_force_flag(parser: argparse.ArgumentParser) -> None:
    """``--force`` for commands that write files (see :func:`check_outputs`)."""
    parser.add_argument("--force", action="store_true", help="replace existing read-only output files")


def check_outputs(args: argparse.Namespace, model) -> None:
    """Refuse the command's destinations before any work starts.

    The outputs are ``-o`` (a model: its external data counts too) and ``--report``; the inputs are
    MODEL (with its external data), ``--calibration``, ``--eval``, ``--labels`` and a ``--recipe``
    file. See :func:`onnxcomp.io.check_destinations` for what is refused.
    """
    from onnxcomp.io import check_destinations

    inputs = {"the input model": args.model}
    for flag in ("calibration", "eval", "labels", "recipe"):
        value = getattr(args, flag, None)
        if value and (flag != "recipe" or os.path.isfile(value)):
            inputs[f"--{flag}"] = value
    outputs = {"-o": args.output, "--report": getattr(args, "report", None)}
    check_destinations(outputs, inputs, models=("-o",), source=model, force=args.force)


def add_specialize_flags(parser: argparse.ArgumentParser) -> None:
    """``--fix-input`` / ``--fix-shape`` (see :mod:`onnxcomp.passes.specialize`)."""
    g = parser.add_argument_group("input specialisation (exact for the values given)")
    g.add_argument("--fix-input", action="append", default=[], metavar="NAME=VALUE",
                   help="make graph input NAME a constant and fold what follows (If conditions on it, shapes); "
                        "VALUE: a number, true/false, comma-separated numbers, or @FILE.npy; repeatable. "
                        "Data files may keep the input: it is dropped from each feed")
    g.add_argument("--fix-shape", action="append", default=[], metavar="NAME=D0xD1...",
                   help="give graph input NAME this static shape; repeatable")


def _fixed_value(item: str) -> tuple[str, Any]:
    import numpy as np

    from onnxcomp.errors import ConfigError

    name, sep, text = item.partition("=")
    text = text.strip()
    if not sep or not name or not text:
        raise ConfigError(f"--fix-input {item!r}: expected NAME=VALUE")
    if text.startswith("@"):
        try:
            return name, np.load(text[1:], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--fix-input {name}: cannot read {text[1:]}: {exc}") from None
    words = [w.strip().lower() for w in text.split(",")]
    try:
        values = [w == "true" if w in ("true", "false") else (int(w) if w.lstrip("+-").isdigit() else float(w))
                  for w in words]
    except ValueError:
        raise ConfigError(f"--fix-input {item!r}: {text!r} is not a number, true/false, a list or @FILE.npy") from None
    return name, values[0] if len(values) == 1 else values


def specialize(args: argparse.Namespace, model, con=None) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """Apply ``--fix-input`` / ``--fix-shape`` to the loaded ``model`` in place (said on ``con``).

    Returns the pass's statistics (None when no flag was given) and the names of the inputs that
    became constants (data files may still hold them: pass them as ``Dataset(..., ignore=)``).
    The check's reference is then this specialised float model (exact for the fixed values).
    """
    if not getattr(args, "fix_input", None) and not getattr(args, "fix_shape", None):
        return None, ()
    from onnxcomp.data import parse_shapes
    from onnxcomp.passes.specialize import SpecializeConfig, SpecializePass

    values = dict(_fixed_value(item) for item in args.fix_input)
    shapes = parse_shapes(args.fix_shape, flag="--fix-shape")
    stats = SpecializePass(SpecializeConfig(values=values, shapes=shapes))(model).stats
    if con is not None:
        what = [f"{n} = {v['value']}" for n, v in stats["fixed"].items()]
        what += [f"{n}: {'x'.join(map(str, shape))}" for n, shape in stats["shaped"].items()]
        flow, nodes = stats["control_flow"], stats["nodes"]
        con.print(f"specialised {esc('; '.join(what))}: nodes {nodes['before']} -> {nodes['after']}, "
                  f"If/Loop/Scan {flow['before']} -> {flow['after']}")
    return stats, tuple(stats["fixed"])


def console(args: argparse.Namespace):
    """A rich console for human output; silent with --quiet or --json."""
    from rich.console import Console

    quiet = bool(getattr(args, "quiet", False) or getattr(args, "json", False))
    # Wide tables stay readable when piped into a file or a CI log (rich assumes 80 columns there).
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(quiet=quiet, width=width)


def esc(text: Any) -> str:
    """User text (model, node, tensor names, paths, shapes) made safe for rich markup: ``[batch,1]``
    would otherwise be read as a style tag and vanish."""
    from rich.markup import escape

    return escape(str(text))


def progress_bar(con):
    """A transient rich progress bar (silent when the console is quiet)."""
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


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


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


def file_bytes(path, model=None) -> int:
    """Size of a model file plus its external data: the files ``model`` (loaded from ``path``)
    reads its tensors from, or without ``model`` the data files onnxcomp saves beside it
    (``<name>.data``, ``<name>.<id>.data``), found by name without parsing the model."""
    total = os.path.getsize(path)
    if model is not None:
        from onnxcomp.io import external_data_files

        return total + sum(os.path.getsize(f) for f in external_data_files(model))
    from onnxcomp.io import saved_data_files

    return total + sum(os.path.getsize(f) for f in saved_data_files(path))


def fmt_size(n: int) -> str:
    """Bytes as KiB (one decimal) or, from 1 MiB, MiB (two decimals)."""
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# the held-out check (onnxcomp.check), shared by every lossy command

EXIT_BELOW_BUDGET = 3


def add_threads_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--threads N``: intra-op threads of latency measurements and decisions (default: what
    onnxruntime uses here, one per physical core)."""
    from onnxcomp.measure.bench import LATENCY_RANGES

    parser.add_argument("--threads", type=LATENCY_RANGES["threads"], metavar="N",
                        help=f"{what} (default: onnxruntime's own, one per physical core)")


def print_int8_latency(con, verdict: dict[str, Any] | None) -> None:
    """The one line saying whether int8 pays at the measured thread count (and why not)."""
    if verdict:
        style = "bold yellow" if verdict["int8_slower"] else "green"
        con.print(f"[{style}]{esc(verdict['summary'])}[/{style}]")


def add_check_flags(parser: argparse.ArgumentParser, *, max_drop: bool = True) -> None:
    """``--strict``, ``--no-check`` and the check's budget (see :mod:`onnxcomp.check`)."""
    g = parser.add_argument_group("held-out check of the written model")
    g.add_argument("--strict", action="store_true",
                   help="exit with status 3 when the check misses its budget or nothing was compressed")
    g.add_argument("--no-check", action="store_true", help="skip the check of the written model")
    g.add_argument("--check-fraction", type=float, default=0.2, metavar="F",
                   help="share of the calibration feeds held out for the check when no --eval is given (default 0.2)")
    g.add_argument("--min-agreement", type=float, default=0.99, metavar="A",
                   help="top-1 agreement an output of class scores must keep (default 0.99)")
    g.add_argument("--min-cosine", type=float, default=0.985, metavar="C",
                   help="cosine similarity any other output must keep (default 0.985)")
    if max_drop:
        g.add_argument("--max-drop", type=float, metavar="POINTS",
                       help="accuracy points the first output may lose, with --eval and --labels (default 1)")


def check_config(args: argparse.Namespace):
    """The :class:`~onnxcomp.check.CheckConfig` the flags describe (validated)."""
    from onnxcomp.check import CheckConfig
    from onnxcomp.errors import ConfigError

    if args.strict and args.no_check:
        raise ConfigError("--strict needs the check: drop --no-check")
    max_drop = getattr(args, "max_drop", None)
    try:
        return CheckConfig(enabled=not args.no_check, fraction=args.check_fraction,
                           min_agreement=args.min_agreement, min_cosine=args.min_cosine,
                           max_drop=1.0 if max_drop is None else max_drop)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (--check-fraction, --min-agreement, --min-cosine, --max-drop)") from None


def run_check(con, reference, written_path, split, config, report: dict[str, Any], *, compressed: int | None,
              what: str, why: str = "", reference_file=None, written=None) -> dict[str, Any] | None:
    """Load the written file back and check it against ``reference``; the result goes into
    ``report["check"]`` and is returned (None when the check is disabled). ``reference_file`` /
    ``written``: see :func:`onnxcomp.check.check_model`."""
    from onnxcomp.check import check_model

    if not config.enabled:
        return None
    with progress_bar(con) as progress:
        task = progress.add_task("checking", total=split.check_feeds)
        # onnxruntime reads the written file itself: it is not parsed or serialized again here
        check = check_model(reference, os.fspath(written_path), split, config, compressed=compressed, what=what,
                            nothing_why=why, reference_file=reference_file, written_model=written,
                            progress=lambda n: progress.update(task, completed=n))
    report["check"] = check
    return check


def print_check(con, check: dict[str, Any] | None) -> None:
    """The check's one unmissable line (and the blamed tensors)."""
    from onnxcomp.check import verdict_line

    if check is None:
        return
    style = "bold green" if check["met"] else "bold red"
    con.print(f"[{style}]{esc(verdict_line(check))}[/{style}]")


def check_status(args: argparse.Namespace, check: dict[str, Any] | None) -> int:
    """0, or 3 under --strict when the check missed its budget (or nothing was compressed)."""
    if args.strict and check is not None and not check["met"]:
        return EXIT_BELOW_BUDGET
    return 0


# ---------------------------------------------------------------------------------------------
# compress


def _configure_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write the compressed model")
    p.add_argument("--recipe", default="int8", help="shipped recipe name or TOML file (default: int8)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a recipe setting, e.g. quantize.calibration=percentile (repeatable)")
    p.add_argument("--calibration", metavar="FILE", help="calibration data (.npz file or folder)")
    p.add_argument("--eval", metavar="FILE", help="evaluation data for the fidelity report")
    p.add_argument("--labels", metavar="FILE.npy", help="integer labels of the evaluation data")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="samples per feed (dynamic batch dimension)")
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


def _compressed_by_stages(stages: list[dict[str, Any]]) -> tuple[int | None, str]:
    """What the lossy stages of a compress run changed (None when no stage is lossy)."""
    counts = []
    for entry in stages:
        stats = entry["stats"]
        if entry["stage"] == "quantize":
            counts.append((int(stats.get("int8_nodes") or stats.get("nodes_quantized") or 0), "quantized nodes"))
        elif entry["stage"] == "prune":
            counts.append((int(stats.get("channels_removed") or 0), "channels removed"))
        elif entry["stage"] == "cluster":
            counts.append((len(stats.get("tensors") or {}), "tensors clustered"))
    if not counts:
        return None, ""
    return sum(n for n, _ in counts), ", ".join(what for _, what in counts)


def _run_compress(args: argparse.Namespace) -> int:
    from onnxcomp.check import split_data
    from onnxcomp.compress import compress, needs_calibration
    from onnxcomp.data import Dataset, load_labels, model_inputs
    from onnxcomp.errors import ConfigError
    from onnxcomp.io import load_model, save_model, write_text_atomic
    from onnxcomp.data import describe_free_dims, fill_free_dims, parse_shapes, synthetic_feed
    from onnxcomp.recipe import load_recipe, parse_override, shipped_recipes
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
        recipe = recipe.with_overrides(dict(parse_override(item) for item in args.set))
    if args.threads:
        recipe = recipe.with_overrides({"measure.threads": args.threads, "measure.latency": True})
    check_cfg = check_config(args)
    model = load_model(args.model)
    check_outputs(args, model)
    specialized, fixed = specialize(args, model, con)
    calibration = Dataset(args.calibration, model, batch_size=args.batch_size, ignore=fixed) if args.calibration else None
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size, ignore=fixed) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --eval (the evaluation data they label)")
    if needs_calibration(recipe) and calibration is None:
        raise ConfigError(f"recipe {recipe.name!r} quantizes statically and needs calibration data (--calibration)")
    split = split_data(calibration, check_cfg, evaluation=evaluation, labels=labels, model=model)
    if split.fit is not None:
        calibration = split.fit
    latency_feeds = None
    free_dims: list[dict[str, Any]] = []
    if calibration is None and evaluation is None and "measure" in recipe.stages:
        shapes, free_dims = fill_free_dims(model_inputs(model), parse_shapes(args.shape))
        latency_feeds = [synthetic_feed(model_inputs(model), shapes, seed=i) for i in range(4)]
    with progress_bar(con) as progress:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        compressed, report = compress(
            model, recipe, calibration, eval_data=evaluation, labels=labels,
            allow_upgrade=not args.no_upgrade, feeds_for_latency=latency_feeds, progress=update,
            threads=args.threads,
        )
    out = save_model(compressed, args.output, force=args.force)
    report["model"] = args.model
    report["output"] = str(out)
    if specialized is not None:
        report["specialize"] = specialized
    # Sizes of the files themselves (model plus external data), not of an in-memory serialization.
    report["before"].update(bytes=file_bytes(args.model, model), file=args.model)
    report["after"].update(bytes=file_bytes(out), file=str(out))
    if free_dims:
        report["free_dims"] = free_dims
        report["notes"] = [f"latency inputs: {line}" for line in describe_free_dims(free_dims)] + report["notes"]
    count, what = _compressed_by_stages(report["stages"])
    check = run_check(con, model, out, split, check_cfg, report, compressed=count, what=what,
                      why="" if count else "see each stage's statistics (--json)")
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


#: Accepted values of the numeric options shared by several commands.
POSITIVE_INT = Range(int, 1)
COUNT = Range(int, 0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxcomp",
        description="Post-training compression for ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"onnxcomp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, configure, _run) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 bad input, bad option or failure, 130 interrupted).

    argparse's own errors (an unknown option, a bad choice) exit with status 1 via ``SystemExit``.
    """
    _load_commands()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _help, _configure, run = _COMMANDS[args.command]
        return run(args)
    except OnnxcompError as exc:
        sys.stderr.write(f"onnxcomp: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("onnxcomp: interrupted; no output written\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `onnxcomp inspect m.onnx --json | head`
        return 0
    except Exception as exc:  # onnxruntime refusing to run a model is a bad model, not a bug here
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
        sys.stderr.write(f"onnxcomp: error: onnxruntime cannot run the model: {reason}\n")
        return EXIT_ERROR


def _load_commands() -> None:
    """Import the modules that register further commands (kept lazy for a fast --help)."""
    import importlib

    for module in ("onnxcomp.measure.cli", "onnxcomp.quant.cli", "onnxcomp.cluster.cli", "onnxcomp.prune.cli"):
        importlib.import_module(module)  # a broken command module is an error, not a missing command
