"""Range methods side by side: static int8 with minmax, mse, percentile, entropy and auto ranges.

For every suite model (``benchmarks.suite``) and every method, the model is quantized the way
``onnxcomp quantize --method M --no-fallback`` does it: the calibration file is split as the
command splits it (every 5th feed held out for the check, :func:`onnxcomp.check.split_data`),
``quantize`` calibrates on the fitting part, and :func:`onnxcomp.check.check_model` judges the
result on the held-out part with the command's default budget.  Each model is then scored on the
suite's two splits:

``tune``    the suite's evaluation data: the default method is chosen on these numbers only;
``report``  the suite's report split (other text, typefaces, sizes, colours, page layouts,
            sentences; the other half of the digits eval set): these say whether the choice
            generalises and are the ones to quote.

The default is chosen by :func:`choose_default` on the tune split: a method qualifies when, on every
model, it is within 1 point of fp32 and no more than 0.3 points below the best single method
(``auto`` is not a single method); among qualifying methods (or, when none qualifies, all of them)
the one with the smallest worst shortfall wins.  Every method must also either stay within 3 points
of fp32 on every model and split or have its check fail (:func:`unflagged_damage` lists the
exceptions).

Builds are cached in ``benchmarks/.cache/builds/<model>/range_<method>.onnx`` under the runner's
build key (fp32 and calibration file hashes, the method, a hash of onnxcomp's code, library
versions, :data:`STUDY_VERSION`), so a second run only evaluates.  Usage::

    python -m benchmarks.ranges_study                              # every model, every method
    python -m benchmarks.ranges_study --models ppocr_rec --methods minmax,auto --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import fetch, run, suite
from benchmarks.candidates import Candidate

METHODS = ("minmax", "mse", "percentile", "entropy", "auto")  # per-tensor on request (slow)
SINGLE = ("minmax", "mse", "percentile", "entropy")
FP32_SLACK = 0.01  # the default must stay within 1 point of fp32
BEST_SLACK = 0.003  # ... and within 0.3 points of the best single method
FLAG_DROP = 0.03  # a method losing more than 3 points must fail its check
SPLITS = ("tune", "report")
STUDY_VERSION = 1  # bump when build() changes what it writes


def other_rec(n: int, seed: int, height: int = 48, width: int = 320):
    """``(x, texts)``: ``n`` rec lines drawn like the suite's report split, from another seed."""
    from benchmarks import textdata

    return textdata.rec_samples(list(textdata.report_sentences()[0]), n, seed, height, width,
                                render=textdata.render_report_line)


def _candidate(method: str) -> Candidate:
    return Candidate(f"range_{method}", build=lambda *a: None, kind="study",
                     config={"api": "quantize(fit part, verify=False) + check_model(held-out part)",
                             "quantize": {"calibration": method}})


def build(task: suite.Task, method: str, cache: Path, reuse: bool = True) -> tuple[bytes, dict]:
    """``(model bytes, record)`` of ``task``'s model quantized with ``method`` (cached)."""
    from onnxcomp import io
    from onnxcomp.check import CheckConfig, check_model, split_data
    from onnxcomp.data import Dataset
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    cand = _candidate(method)
    # What decides the build: the inputs, the method, onnxcomp's code and the library versions
    # (not the benchmark modules, which do not take part; STUDY_VERSION marks a change of procedure).
    key = {**run.build_key(task, cand), "code": run.code_revision((run.ROOT / "onnxcomp",)), "study": STUDY_VERSION}
    folder = cache / "builds" / task.name
    folder.mkdir(parents=True, exist_ok=True)
    out, record_path = folder / f"{cand.name}.onnx", folder / f"{cand.name}.json"
    if reuse and out.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            return out.read_bytes(), {**record, "reused": True}
    model = io.load_model(task.fp32_path)
    cfg = CheckConfig()
    split = split_data(Dataset(task.calib_path, model), cfg, model=model)
    t0 = time.perf_counter()
    q, rep = quantize(model, split.fit, QuantizeConfig(calibration=method), verify=False)
    seconds = time.perf_counter() - t0
    check = check_model(model, q, split, cfg, compressed=int(rep.get("int8_nodes") or 0), what="int8 nodes")
    chosen = rep.get("calibration", {}).get("chosen")
    selected = rep.get("calibration", {}).get("selected")
    record = {"key": key, "seconds": round(seconds, 1), "int8_nodes": rep.get("int8_nodes"),
              "check_met": bool(check["met"]), "check_problems": check["problems"][:3],
              "check_outputs": [{k: o.get(k) for k in ("name", "kind", "cosine", "agreement", "verdict")}
                                for o in check["outputs"]],
              "chosen": chosen, "selected": selected}
    data = io.model_to_bytes(q)
    io.save_model(q, out, force=True)
    record_path.write_text(json.dumps(record, indent=1, default=str))
    return data, record


def _evaluate(task: suite.Task, name: str, data: bytes, refs, threads: int):
    row = run.Row(task.name, name, "study", model_bytes=data)
    outs = run.evaluate(task, row, threads, refs)
    if outs is None:
        raise RuntimeError(f"{task.name} / {name}: {row.error}")
    return row, outs


def study(models, methods, cache: Path, threads: int = 2, log=print) -> list[dict]:
    from onnxcomp import io

    rows = []
    for name in models:
        reason = suite.SUITE[name].missing()
        if reason:
            log(f"{name}: skipped ({reason})")
            continue
        task = suite.SUITE[name].prepare(suite.Context(cache=cache))
        fp32_bytes = io.model_to_bytes(io.load_model(task.fp32_path, check=False))
        fp32, refs = _evaluate(task, "fp32", fp32_bytes, None, threads)
        row = {"model": name, "metric": task.metric, "report_source": task.report_source,
               "fp32": {"tune": fp32.metrics[task.metric], "report": fp32.report_metrics[task.metric]},
               "methods": {}}
        for method in methods:
            data, record = build(task, method, cache)
            r, _ = _evaluate(task, f"range_{method}", data, refs, threads)
            entry = {"tune": r.metrics[task.metric], "report": r.report_metrics[task.metric],
                     "tune_sqnr_db": r.fidelity.get("sqnr_db"), "report_sqnr_db": r.report_fidelity.get("sqnr_db"),
                     **{k: record.get(k) for k in ("seconds", "int8_nodes", "check_met", "check_problems", "reused")}}
            for k in ("chosen", "selected"):
                if record.get(k):
                    entry[k] = record[k]
            row["methods"][method] = entry
            log(f"{name:20s} {method:10s} tune {entry['tune']:.4f} (fp32 {row['fp32']['tune']:.4f})  "
                f"report {entry['report']:.4f} (fp32 {row['fp32']['report']:.4f})  check "
                f"{'passed' if entry['check_met'] else 'FAILED'}  ({record.get('seconds')} s"
                f"{', reused' if record.get('reused') else ''})")
        rows.append(row)
    return rows


def shortfalls(row: dict, method: str, split: str = "tune", cap: bool = False) -> tuple[float, float]:
    """``(below fp32 - 1 pt, below best single - 0.3 pt)`` of ``method`` on one model, in points (> 0: missed).

    ``cap``: the best single method counts at most fp32's value (a quantized model that beats fp32 by
    a sample or two is luck, not a level the others fall short of)."""
    v = row["methods"][method][split]
    best = max((row["methods"][m][split] for m in SINGLE if m in row["methods"]), default=float("nan"))
    if cap:
        best = min(best, row["fp32"][split])
    return (100 * (row["fp32"][split] - FP32_SLACK - v), 100 * (best - BEST_SLACK - v))


def choose_default(rows: list[dict], methods, split: str = "tune", cap: bool = False) -> tuple[str, dict[str, float]]:
    """The method of smallest worst shortfall over all models on ``split`` (0 or less: meets both rules)."""
    worst = {m: max(max(shortfalls(r, m, split, cap)) for r in rows) for m in methods
             if all(m in r["methods"] for r in rows)}
    return min(worst, key=lambda m: (worst[m], methods.index(m))), worst


def unflagged_damage(rows: list[dict]) -> list[str]:
    """Models/methods that lose more than 3 points on a split while their check passed."""
    out = []
    for r in rows:
        for m, e in r["methods"].items():
            for split in SPLITS:
                drop = r["fp32"][split] - e[split]
                if drop > FLAG_DROP and e.get("check_met"):
                    out.append(f"{r['model']} / {m}: {100 * drop:.1f} pts below fp32 on {split}, check passed")
    return out


def table(rows: list[dict], methods) -> str:
    out = []
    for split in SPLITS:
        out.append(f"\n**{split} split** (task metric x 100; best single method *; `!` = check failed)\n")
        out.append(f"| model | fp32 | {' | '.join(methods)} |")
        out.append("|---|---|" + "---|" * len(methods))
        for row in rows:
            best = max((row["methods"][m][split] for m in SINGLE if m in row["methods"]), default=float("nan"))
            cells = []
            for m in methods:
                e = row["methods"].get(m)
                if e is None:
                    cells.append("-")
                    continue
                mark = ("*" if m in SINGLE and e[split] == best else "") + ("" if e.get("check_met") else " !")
                cells.append(f"{100 * e[split]:.2f}{mark}")
            out.append(f"| {row['model']} | {100 * row['fp32'][split]:.2f} | {' | '.join(cells)} |")
    for split in SPLITS:
        for cap in (False, True):
            pick, worst = choose_default(rows, list(methods), split, cap)
            out.append(f"\nWorst shortfall over models on {split} (points; <= 0 meets 'within 1 pt of fp32 and 0.3 pt "
                       f"of the best single method'{', best capped at fp32' if cap else ''}): "
                       + ", ".join(f"{m} {w:+.2f}" for m, w in worst.items()) + f" -> {pick}")
    bad = unflagged_damage(rows)
    out.append("\nMethods losing > 3 points with a passing check: " + ("; ".join(bad) if bad else "none"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ranges_study", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(suite.SUITE))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    rows = study(models, methods, fetch.CACHE, args.threads)
    if args.json:
        args.json.write_text(json.dumps(run._jsonable(rows), indent=1))
    print(table(rows, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
