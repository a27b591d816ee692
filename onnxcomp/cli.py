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
from collections.abc import Callable, Sequence
from typing import Any

from onnxcomp import __version__
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


def console(args: argparse.Namespace):
    """A rich console for human output; silent with --quiet or --json."""
    from rich.console import Console

    quiet = bool(getattr(args, "quiet", False) or getattr(args, "json", False))
    # Wide tables stay readable when piped into a file or a CI log (rich assumes 80 columns there).
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(quiet=quiet, width=width)


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


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxcomp",
        description="Post-training compression for ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"onnxcomp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, configure, _run) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    _load_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    _help, _configure, run = _COMMANDS[args.command]
    try:
        return run(args)
    except OnnxcompError as exc:
        sys.stderr.write(f"onnxcomp: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("onnxcomp: interrupted; no output written\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `onnxcomp inspect m.onnx --json | head`
        return 0


def _load_commands() -> None:
    """Import the modules that register further commands (kept lazy for a fast --help)."""
    import importlib

    for module in ("onnxcomp.measure.cli", "onnxcomp.quant.cli", "onnxcomp.cluster.cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
