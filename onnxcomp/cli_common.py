"""What every ``onnxcomp`` command shares: the command registry, the output/force/check flags,
input specialisation, the console and JSON output, file sizes and the held-out check.

The command modules (``onnxcomp.cli`` for inspect and compress, ``onnxcomp.<stage>.cli`` for the
others) import from here; :mod:`onnxcomp.cli` imports the command modules and runs one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from onnxcomp.bounds import Range

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
    from onnxcomp.data import SHAPE_FIXED_BY, parse_shapes
    from onnxcomp.passes.specialize import SpecializeConfig, SpecializePass

    values = dict(_fixed_value(item) for item in args.fix_input)
    shapes = parse_shapes(args.fix_shape, flag="--fix-shape", allow_zero=True)
    stats = SpecializePass(SpecializeConfig(values=values, shapes=shapes))(model).stats
    for value in model.graph.inputs:  # a size the data contradicts is then said to be the option's
        if value.name in stats["shaped"] and SHAPE_FIXED_BY in value.meta:
            value.meta[SHAPE_FIXED_BY] = (f"--fix-shape {value.name}={'x'.join(map(str, stats['shaped'][value.name]))}",
                                          value.meta[SHAPE_FIXED_BY][1])
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
    """A transient rich progress bar, shown on a terminal only: silent when the console is quiet,
    and when the output is piped or redirected (a transient bar there leaves only blank lines)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=con,
        transient=True,
        disable=con.quiet or not con.is_terminal,
    )


def print_json(obj: Any) -> None:
    """One JSON document on stdout. JSON has no infinities nor NaN (strict parsers refuse
    Python's ``Infinity``): such a figure (the SQNR of an exact output) is the string "inf",
    "-inf" or "nan"."""
    sys.stdout.write(json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else ("nan" if obj != obj else f"{obj}")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return _finite(obj.item())
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)



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


def add_check_flags(parser: argparse.ArgumentParser, *, max_drop: bool = True, nothing_held_out: str = "") -> None:
    """``--strict``, ``--no-check`` and the check's budget (see :mod:`onnxcomp.check`).
    ``nothing_held_out``: why the command holds no data out (it fits nothing on data): a
    ``--check-fraction`` given is then refused by :func:`check_config`, saying so, instead of
    being ignored."""
    if nothing_held_out:
        parser.set_defaults(nothing_held_out=nothing_held_out)
    g = parser.add_argument_group("held-out check of the written model")
    g.add_argument("--strict", action="store_true",
                   help="exit with status 3 when the check misses its budget or nothing was compressed")
    g.add_argument("--no-check", action="store_true", help="skip the check of the written model")
    g.add_argument("--check-fraction", type=float, default=None, metavar="F",
                   help=f"refused (exit 1): {nothing_held_out}" if nothing_held_out else
                   "share of the calibration feeds held out for the check when no --eval is given (default 0.2)")
    g.add_argument("--min-agreement", type=float, default=0.99, metavar="A",
                   help="share of decisions class scores, sequences, maps and labels must keep: top-1, "
                        "decoded-sequence, region, label agreement (default 0.99)")
    g.add_argument("--min-detection-agreement", type=float, default=0.98, metavar="A",
                   help="detection agreement (F1 against the original's detections) a detector head must keep "
                        "(default 0.98)")
    g.add_argument("--min-cosine", type=float, default=0.985, metavar="C",
                   help="cosine similarity any other float output must keep (default 0.985)")
    g.add_argument("--min-r2", type=float, default=0.99, metavar="R",
                   help="R^2 against the original an output of one value per sample ([N, 1], a regression) must "
                        "keep (default 0.99: a task R^2 within about 1 point)")
    if max_drop:
        g.add_argument("--max-drop", type=float, metavar="POINTS",
                       help="accuracy points the first output may lose, with --eval and --labels (default 1)")


def check_config(args: argparse.Namespace):
    """The :class:`~onnxcomp.check.CheckConfig` the flags describe (validated)."""
    from onnxcomp.check import CheckConfig
    from onnxcomp.errors import ConfigError

    if args.strict and args.no_check:
        raise ConfigError("--strict needs the check: drop --no-check")
    fraction = args.check_fraction
    if fraction is not None and getattr(args, "nothing_held_out", ""):
        raise ConfigError(f"--check-fraction: {args.nothing_held_out}; drop --check-fraction")
    if fraction is not None and getattr(args, "eval", None):
        raise ConfigError("--check-fraction: the check runs on the --eval data, so no calibration feed is held out; "
                          "drop --check-fraction or --eval")
    if fraction is None:
        fraction = CheckConfig.fraction
    max_drop = getattr(args, "max_drop", None)
    try:
        return CheckConfig(enabled=not args.no_check, fraction=fraction,
                           min_agreement=args.min_agreement, min_cosine=args.min_cosine,
                           min_detection_agreement=args.min_detection_agreement,
                           min_r2=args.min_r2,
                           max_drop=1.0 if max_drop is None else max_drop)
    except ConfigError as exc:
        flags = {"fraction": "--check-fraction", "min_agreement": "--min-agreement",
                 "min_detection_agreement": "--min-detection-agreement", "min_cosine": "--min-cosine",
                 "min_r2": "--min-r2", "max_drop": "--max-drop"}
        named = [flag for field, flag in flags.items() if field in str(exc)]
        if len(named) == 1:
            raise ConfigError(f"{named[0]}: {exc}") from None
        raise ConfigError(f"{exc} ({', '.join(flags.values())})") from None


def run_check(con, reference, written_path, split, config, report: dict[str, Any], *, compressed: int | None,
              what: str, why: str = "", reference_file=None, written=None) -> dict[str, Any] | None:
    """Load the written file back and check it against ``reference``; the result goes into
    ``report["check"]`` and is returned (None when the check is disabled). ``reference_file`` /
    ``written``: see :func:`onnxcomp.check.check_model`."""
    from onnxcomp.check import check_model
    from onnxcomp.errors import DataError, RefusedOutputError
    from onnxcomp.io import set_aside

    if not config.enabled:
        return None
    if split.written_file is not None and split.written_file != _file_identity(written_path):
        split.written_outputs = split.written_file = None  # not the file the verification ran
    with progress_bar(con) as progress:
        task = progress.add_task("checking", total=split.check_feeds)
        # onnxruntime reads the written file itself: it is not parsed or serialized again here
        try:
            check = check_model(reference, os.fspath(written_path), split, config, compressed=compressed, what=what,
                                nothing_why=why, reference_file=reference_file, written_model=written,
                                progress=lambda n: progress.update(task, completed=n))
        except DataError as exc:  # found only while reading the check data, after the output was written
            raise DataError(f"{exc}; {os.fspath(written_path)} was written but not checked") from None
        except RefusedOutputError as exc:  # loaded before the rename (verify_output), fails on a later feed
            raise RefusedOutputError(f"{exc}{set_aside(written_path)}") from None
    report["check"] = check
    return check


def verify_output(split, reference, every: bool = True):
    """The ``verify`` of :func:`onnxcomp.io.save_model` for a command's output: onnxruntime loads
    the written file and runs it on every check feed before it is renamed into place, so that the
    output path never holds a model onnxruntime refuses and a previous output stays untouched when
    it does, whichever feed it fails on. The outputs are kept on ``split`` for the check (within
    :data:`onnxcomp.check.KEEP_REFERENCE_BYTES`), which then does not run the file again. On
    generated feeds (no data given) a failure is no refusal where the original itself cannot run
    that feed (the check then says so). Check data that turns out bad while it is read here is left
    to the check to report. ``every=False`` (no check follows) runs the first given feed only."""
    from onnxcomp.check import KEEP_REFERENCE_BYTES, check_dataset
    from onnxcomp.errors import DataError
    from onnxcomp.io import first_line
    from onnxcomp.runtime import run_model, verify_written

    names = [v.name for v in reference.graph.outputs]

    def original_error(feed) -> str | None:
        try:
            run_model(reference, [feed])
        except Exception as exc:  # onnxruntime's own errors: the feed is at fault, not the written model
            return first_line(exc)
        return None

    def verify(path):
        split.written_outputs = split.written_file = None
        if split.check is None or (split.generated and not every):
            verify_written(path)
            return
        data = check_dataset(split, reference)
        feeds = data if every else next(iter(data), None)
        at_fault: list[str] = []

        def excused(feed) -> bool:  # the original cannot run the feed either
            error = original_error(feed)
            if error is not None:
                at_fault.append(f"{getattr(data, 'reading', None) or 'a check feed'}: onnxruntime cannot run the "
                                f"model on this feed: {error}")
            return error is not None

        try:
            outputs = verify_written(path, feeds, names=names, limit=KEEP_REFERENCE_BYTES if every else 0,
                                     excused=excused)
        except DataError:  # data not read up front (a generator, a reader): the check names it
            return
        if at_fault and not split.generated:  # bad data (an index out of a table's range), no bug here
            raise DataError(f"{at_fault[0]} (the input model fails on it too); nothing written")
        if outputs is not None:
            split.written_outputs, split.written_file = outputs, _file_identity(path)

    return verify


def _file_identity(path) -> tuple[int, ...]:
    """What stays the same when a file is renamed, and changes when another file takes its name."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def print_check(con, check: dict[str, Any] | None) -> None:
    """The check's one unmissable line (and the blamed tensors)."""
    from onnxcomp.check import verdict_line

    if check is None:
        return
    style = "bold green" if check["met"] else "bold red" if check.get("checked", True) else "bold yellow"
    con.print(f"[{style}]{esc(verdict_line(check))}[/{style}]")
    for note in ("empty_note", "kind_note", "resolution_note"):
        if check.get(note):
            con.print(f"[bold yellow]{esc(check[note])}[/bold yellow]")


def check_status(args: argparse.Namespace, check: dict[str, Any] | None) -> int:
    """0, or 3 under --strict when the check missed its budget (or nothing was compressed, or it
    compared nothing: a check that did not check meets no budget).

    With ``--json`` (and not ``--quiet``) a missed check is also one ``onnxcomp: warning:`` line on
    stderr: the terminal output is silent then, and a pipeline that only parses stdout should still
    leave the verdict in its log."""
    if check is not None and not check["met"] and getattr(args, "json", False) and not getattr(args, "quiet", False):
        from onnxcomp.check import verdict_line

        sys.stderr.write(f"onnxcomp: warning: {verdict_line(check)}\n")
    if args.strict and check is not None and not check["met"]:
        return EXIT_BELOW_BUDGET
    return 0



#: Accepted values of the numeric options shared by several commands.
POSITIVE_INT = Range(int, 1)
COUNT = Range(int, 0)
