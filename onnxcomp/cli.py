"""The ``onnxcomp`` command line.

One contract for every command: a model path first; ``-o OUT`` where a model is written;
``--calibration FILE`` / ``--data FILE`` for data (an .npz file or a folder of .npz files);
``--json`` prints one machine-readable JSON document on stdout; ``--quiet`` prints nothing but
errors. A user error (bad file, bad data, bad option) prints ``onnxcomp: error: ...`` on stderr and
exits with status 1, never a traceback; Ctrl-C exits with status 130 and leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from onnxcomp import __version__
from onnxcomp.bounds import Range
from onnxcomp.errors import ConfigError, OnnxcompError

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


def console(args: argparse.Namespace):
    """A rich console for human output; silent with --quiet or --json."""
    from rich.console import Console

    quiet = bool(getattr(args, "quiet", False) or getattr(args, "json", False))
    # Wide tables stay readable when piped into a file or a CI log (rich assumes 80 columns there).
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(quiet=quiet, width=width)


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

    con.print(f"[bold]{info['path'] or '<model>'}[/bold]")
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opset_imports"].items())
    con.print(f"IR version {info['ir_version']}, opsets: {opsets}; producer: {info['producer'] or '-'}")
    io_table = Table(title="inputs / outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io_table.add_row(kind[:-1], v["name"], v["dtype"], v["shape"])
    con.print(io_table)
    ops = Table(title=f"{info['nodes']} nodes", title_justify="left")
    ops.add_column("op type")
    ops.add_column("count", justify="right")
    for op, n in info["op_types"].items():
        ops.add_row(op, str(n))
    con.print(ops)
    params = Table(
        title=f"{info['parameters']:,} parameters, {_fmt_bytes(info['parameter_bytes'])}",
        title_justify="left",
    )
    for col in ("consumer op", "tensors", "parameters", "bytes"):
        params.add_column(col, justify="right" if col != "consumer op" else "left")
    for op, row in info["parameters_by_op"].items():
        params.add_row(op, str(row["tensors"]), f"{row['parameters']:,}", _fmt_bytes(row["bytes"]))
    con.print(params)
    ext = info["external_data"]
    if ext["files"]:
        con.print(f"external data: {_fmt_bytes(ext['bytes'])} in {', '.join(ext['files'])}")
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


def file_bytes(path) -> int:
    """Size of a model file plus its ``<name>.data`` external data, if any."""
    total = os.path.getsize(path)
    data = f"{path}.data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)


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
    p.add_argument("--no-upgrade", action="store_true", help="refuse instead of upgrading an old opset")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    add_output_flags(p)


def _run_compress(args: argparse.Namespace) -> int:
    from onnxcomp.compress import compress, needs_calibration
    from onnxcomp.data import Dataset, load_labels, model_inputs
    from onnxcomp.errors import ConfigError
    from onnxcomp.io import check_target, load_model, save_model, write_text_atomic
    from onnxcomp.data import parse_shapes, synthetic_feed
    from onnxcomp.recipe import load_recipe, parse_override, shipped_recipes
    from onnxcomp.report import render_html, render_terminal

    con = console(args)
    if args.list_recipes:
        recipes = shipped_recipes()
        if args.json:
            print_json(recipes)
        else:
            for name, description in recipes.items():
                con.print(f"[bold]{name}[/bold]: {description}")
        return 0
    if not args.model or not args.output:
        raise ConfigError("compress needs MODEL and -o OUT")
    recipe = load_recipe(args.recipe)
    if args.set:
        recipe = recipe.with_overrides(dict(parse_override(item) for item in args.set))
    model = load_model(args.model)
    check_target(model, args.output)
    if args.report and not os.path.isdir(os.path.dirname(os.path.abspath(args.report))):
        raise ConfigError(f"--report {args.report}: folder does not exist")
    calibration = Dataset(args.calibration, model, batch_size=args.batch_size) if args.calibration else None
    evaluation = Dataset(args.eval, model, batch_size=args.batch_size) if args.eval else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and evaluation is None:
        raise ConfigError("--labels needs --eval (the evaluation data they label)")
    if needs_calibration(recipe) and calibration is None:
        raise ConfigError(f"recipe {recipe.name!r} quantizes statically and needs calibration data (--calibration)")
    latency_feeds = None
    if calibration is None and evaluation is None and "measure" in recipe.stages:
        shapes = parse_shapes(args.shape)
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
        )
    out = save_model(compressed, args.output)
    report["model"] = args.model
    report["output"] = str(out)
    if args.report:
        write_text_atomic(args.report, render_html(report))
        report["report"] = args.report
    if args.json:
        print_json(report)
        return 0
    render_terminal(con, report)
    con.print(f"wrote {out}" + (f" and {args.report}" if args.report else ""))
    return 0


register(
    "compress",
    "compress a model with a recipe (cleanup, prune, cluster, quantize, verify, measure) and report",
    _configure_compress,
    _run_compress,
)


# ---------------------------------------------------------------------------------------------


class UsageError(ConfigError):
    """A command line argparse refuses (unknown command or option, missing or bad value)."""


class _Parser(argparse.ArgumentParser):
    """argparse under the one error contract: an ``onnxcomp: error:`` line and exit status 1."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (usage: {self.prog} --help)")


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
    """Run the CLI; returns the exit status (0 ok, 1 user or usage error, 130 interrupted)."""
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
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
