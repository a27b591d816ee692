"""Leave-one-model-out validation of the check's default budget (onnxcomp.check).

The check judges each output of a compressed model by one figure, chosen by the kind of the output
(``onnxcomp.check.RULES``): top-1 agreement for class scores, decoded-sequence agreement for
``[N, T, C]`` sequence scores (PP-OCR rec), region agreement for probability maps (PP-OCR det),
detection agreement for detector heads (layout YOLO), R^2 against the original for a regression
``[N, 1]``, cosine for other values. For every suite model M, the thresholds are chosen on the builds of the
*other* models only, then judged on M's builds:

* a build is **good** when its task metric is within one point (0.01) of fp32's;
* the agreement figures (top-1, sequence, region: each a share of the model's decisions that
  stay the same) share one threshold, ``min_agreement``; cosine has its own, ``min_cosine``, and
  so has detection agreement, ``min_detection_agreement`` (pairing boxes flips knife-edge
  detections: see ``onnxcomp.check``);
* on the training models, each threshold is the most permissive value that passes no bad build
  (a false pass is what the check exists to prevent; a false alarm costs a look).

The table shows, for each left-out model, the thresholds chosen without it, its false passes (bad
builds the rule would let through: the number that must be 0) and false alarms (good builds it
would flag), and the same for the defaults of ``CheckConfig``.

Figures. ``--measure MODEL,...`` runs the check's own figure code (``onnxcomp.check.OutputFigures``)
and the suite's task metric on the same builds and evaluation split, and stores them in
``--figures`` (default ``benchmarks/budget_figures.json``): every build in
``benchmarks/.cache/builds/MODEL`` plus the candidates named by ``--build`` (built through the
benchmark runner into ``--cache``). Models not measured take their figures from a ``results.json``
written by ``python -m benchmarks``: ``agree_fp32`` there is the check's top-1 agreement, the
fidelity cosine its cosine, and PP-OCR rec's ``char_agree_fp32`` (greedy CTC text, blank 0, spaces
stripped at the ends) its decoded-sequence agreement (the check finds the same blank and separator
in the data).

    python benchmarks/budget_lomo.py --measure ppocr_det,ppocr_rec --build oc_cluster4,...
    python benchmarks/budget_lomo.py [benchmarks/results.json] --md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLACK = 0.01  # one point of the task metric
FIGURES_JSON = HERE / "budget_figures.json"
#: which threshold judges each rule figure (onnxcomp.check.RULES)
THRESHOLD_OF = {"top1_agreement": "agreement", "sequence_agreement": "agreement",
                "region_agreement": "agreement", "label_agreement": "agreement", "detection_agreement": "detection",
                "cosine": "cosine", "r2_vs_original": "r2"}
KINDS = ("agreement", "detection", "cosine", "r2")
#: suite metrics that are the check's own figure on a results.json row (the rest: the fidelity cosine)
FIGURE_OF_METRIC = {"agree_fp32": "top1_agreement", "char_agree_fp32": "sequence_agreement",
                    "f1_fp32": "detection_agreement"}


def defaults() -> dict[str, float]:
    from onnxcomp.check import CheckConfig

    c = CheckConfig()
    return {"agreement": c.min_agreement, "detection": c.min_detection_agreement, "cosine": c.min_cosine,
            "r2": c.min_r2}


@dataclass(frozen=True)
class Build:
    model: str
    candidate: str
    good: bool
    figure: str  # the rule's figure (onnxcomp.check.RULES)
    value: float

    @property
    def kind(self) -> str:
        return THRESHOLD_OF[self.figure]


def builds_from_results(results: dict, skip: set[str]) -> list[Build]:
    """Builds of ``results.json`` (models in ``skip`` left out: their figures were measured)."""
    rows = []
    for name, model in results["models"].items():
        if model.get("status") != "ok" or name in skip:
            continue
        fp32 = model["fp32_metric"]
        key = model["metric"]
        for r in model["rows"]:
            if r["status"] != "ok" or r["candidate"] == "fp32" or key not in (r.get("metrics") or {}):
                continue
            # PP-OCR rec's text agreement is the check's decoded-sequence agreement, the layout
            # detector's F1 against fp32 its detection agreement
            found = [(f, r["metrics"][m]) for m, f in FIGURE_OF_METRIC.items() if r["metrics"].get(m) is not None]
            figure, value = found[0] if found else ("cosine", r["fidelity"]["cosine"])
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            rows.append(Build(name, r["candidate"], fp32 - r["metrics"][key] <= SLACK + 1e-12, figure, float(value)))
    return rows


def builds_from_figures(figures: dict) -> list[Build]:
    rows = []
    for name, model in figures.items():
        for cand, r in model["builds"].items():
            good = model["fp32_metric"] - r["metric"] <= SLACK + 1e-12
            rows.append(Build(name, cand, good, r["figure"], float(r["value"])))
    return rows


def rows(results: dict, figures: dict) -> list[Build]:
    """Every build: measured figures where ``figures`` has the model, ``results.json``'s otherwise."""
    return builds_from_figures(figures) + builds_from_results(results, set(figures))


def sources(figures_name: str, figures: dict, results_name: str) -> str:
    """Where the table's figures come from, for :func:`render`."""
    if not figures:
        return f"`{results_name}`"
    return f"`{figures_name}` ({', '.join(sorted(figures))}) and `{results_name}` (the others)"


def threshold(train: list[Build], kind: str) -> float | None:
    """The most permissive threshold passing no bad training build (None: no bad build seen)."""
    bad = [b.value for b in train if b.kind == kind and not b.good]
    return max(bad) if bad else None


def passes(b: Build, thresholds: dict[str, float | None], default: dict[str, float]) -> bool:
    t = thresholds[b.kind]
    return b.value > t if t is not None else b.value >= default[b.kind]


def judged(test: list[Build], thresholds: dict[str, float | None], default: dict[str, float]) -> dict:
    """How ``test``'s builds fare under the chosen ``thresholds`` (:func:`passes`) and under the
    defaults: counts, the lowest good and highest bad figure, false passes and false alarms."""
    good = [b.value for b in test if b.good]
    bad = [b.value for b in test if not b.good]
    chosen = [passes(b, thresholds, default) for b in test]
    by_default = [b.value >= default[b.kind] for b in test]
    return {"builds": len(test), "good": len(good), "lowest_good": min(good) if good else None,
            "highest_bad": max(bad) if bad else None,
            "false_pass": [b.candidate for b, ok in zip(test, chosen) if ok and not b.good],
            "false_alarm": [b.candidate for b, ok in zip(test, chosen) if not ok and b.good],
            "default_false_pass": [b.candidate for b, ok in zip(test, by_default) if ok and not b.good],
            "default_false_alarm": [b.candidate for b, ok in zip(test, by_default) if not ok and b.good]}


def lomo(rows: list[Build]) -> list[dict]:
    default = defaults()
    out = []
    for model in sorted({b.model for b in rows}):
        train = [b for b in rows if b.model != model]
        test = [b for b in rows if b.model == model]
        th = {k: threshold(train, k) for k in KINDS}
        out.append({"model": model, "figure": test[0].figure if test else "-", "thresholds": th,
                    **judged(test, th, default)})
    return out


def render(table: list[dict], sources: str) -> str:
    d = defaults()
    fmt = lambda t: "-" if t is None else f"{t:.4f}"  # noqa: E731
    lines = [
        f"Leave-one-model-out validation of the check's budget, from {sources}. Good = task metric within "
        f"1 point of fp32. Thresholds chosen without the model (agreement figures share one; detection "
        f"agreement, cosine and R^2 against the original have their own); defaults agreement >= {d['agreement']}, "
        f"detection agreement >= {d['detection']}, cosine >= {d['cosine']}, R^2 >= {d['r2']}.",
        "",
        "| left-out model | judged by | builds (good) | lowest good / highest bad | agreement > (chosen) | "
        "detection > (chosen) | cosine > (chosen) | R^2 > (chosen) | false passes | false alarms | "
        "defaults: false passes / alarms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        fp = ", ".join(r["false_pass"]) or "0"
        fa = ", ".join(r["false_alarm"]) or "0"
        dfp = ", ".join(r["default_false_pass"]) or "0"
        dfa = ", ".join(r["default_false_alarm"]) or "0"
        th = r["thresholds"]
        lines.append(
            f"| {r['model']} | {r['figure']} | {r['builds']} ({r['good']}) | {fmt(r['lowest_good'])} / "
            f"{fmt(r['highest_bad'])} | {fmt(th['agreement'])} | {fmt(th.get('detection'))} | {fmt(th['cosine'])} | "
            f"{fmt(th.get('r2'))} | {fp} | {fa} | {dfp} / {dfa} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- one model, two splits


def split_study(study: dict, tune: str = "tune", report: str = "report") -> dict:
    """A threshold validated across the splits of one model, for a figure no other suite model has.

    ``study`` is a ``benchmarks.layout_study`` JSON: per split, per candidate, the agreement
    figure against fp32 (``f1_fp32``, the check's detection agreement) and the task metric's
    paired difference to fp32 (``labels.f1.diff``). A build is good when that difference is at most
    one point down. On ``tune``, the threshold is the most permissive one passing no bad build
    (as :func:`threshold`; no bad build: the default, as :func:`passes`); it is then judged on
    ``report``, and so is the default (:func:`judged`, as for the leave-one-model-out table).
    """
    default = defaults()
    splits = {}
    for split in (tune, report):
        builds = []
        for cand, row in study["splits"][split].items():
            if cand == "fp32":
                continue
            diff = row["labels"]["f1"]["diff"]
            builds.append(Build("study", cand, diff >= -SLACK - 1e-12, "detection_agreement", float(row["f1_fp32"]["value"])))
        splits[split] = builds
    chosen = threshold(splits[tune], "detection")
    return {"pages": study.get("pages"), "chosen": chosen, "default": default["detection"],
            "splits": {split: judged(builds, {"detection": chosen}, default) for split, builds in splits.items()}}


def render_split_study(result: dict, source: str) -> str:
    fmt = lambda t: "-" if t is None else f"{t:.4f}"  # noqa: E731
    name = lambda c: Path(c).stem if c.endswith(".onnx") else c  # noqa: E731
    lines = [
        f"Detection agreement across the splits of one model, from `{source}` ({result['pages']} pages per split). "
        f"Good = task F1 (`f1_labels`) within 1 point of fp32's, paired. Threshold chosen on tune: > "
        f"{fmt(result['chosen'])}; default >= {result['default']}.",
        "",
        "| split | builds (good) | lowest good / highest bad | false passes (chosen) | false alarms (chosen) | "
        "defaults: false passes / alarms |",
        "|---|---|---|---|---|---|",
    ]
    for split, r in result["splits"].items():
        j = lambda xs: ", ".join(name(x) for x in xs) or "0"  # noqa: E731
        lines.append(f"| {split} | {r['builds']} ({r['good']}) | {fmt(r['lowest_good'])} / {fmt(r['highest_bad'])} | "
                     f"{j(r['false_pass'])} | {j(r['false_alarm'])} | {j(r['default_false_pass'])} / "
                     f"{j(r['default_false_alarm'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- measuring


def measure(model_name: str, build_names: list[str], cache: Path, eval_limit: int | None = None, log=print) -> dict:
    """The check's figure and the task metric of every build of ``model_name`` (module docstring)."""
    import numpy as np
    import onnxruntime as ort

    from benchmarks import run, suite
    from benchmarks.candidates import load_candidates
    from onnxcomp import io
    from onnxcomp.check import RULES, OutputFigures, output_kinds

    task = suite.SUITE[model_name].prepare(suite.Context())
    if eval_limit:
        task.eval_batches = task.eval_batches[:eval_limit]
    fp32 = io.load_model(task.fp32_path)
    names = [v.name for v in fp32.graph.outputs]
    kinds = output_kinds(fp32)
    figure = RULES[kinds[names[0]]].figure

    def outputs(path: Path) -> list[list[np.ndarray]]:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return [session.run(names, feed) for feed in task.eval_batches]

    ref = outputs(task.fp32_path)
    ref0 = np.concatenate([r[0] for r in ref])
    fp32_metric = task.score(ref0, ref0)[task.metric]
    # every build at hand counts, whatever code revision made it: the figure and the metric are
    # measured here on the same build
    paths = {p.stem: p for folder in (suite.fetch.CACHE, cache) for p in sorted((folder / "builds" / model_name).glob("*.onnx"))}
    registry = load_candidates()
    for name in build_names:
        if name in paths or name not in registry:
            continue
        row = run.build_candidate(task, registry[name], cache, reuse=True)
        if row.status == "ok":
            paths[name] = cache / "builds" / model_name / f"{name}.onnx"
        else:
            log(f"  {model_name}/{name}: build failed: {row.error}")
    result = {"metric": task.metric, "fp32_metric": fp32_metric, "figure": figure, "kind": kinds[names[0]],
              "eval_samples": sum(int(r[0].shape[0]) for r in ref), "builds": {}}
    for name, path in paths.items():
        t0 = time.perf_counter()
        out = outputs(path)
        figures = OutputFigures(names, kinds)
        for r, o in zip(ref, out):
            figures.update(r, o)
        values = figures.result()[0]
        metric = task.score(np.concatenate([o[0] for o in out]), ref0)[task.metric]
        result["builds"][name] = {"metric": metric, "figure": figure, "value": values[figure],
                                  "cosine": values.get("cosine")}
        log(f"  {model_name}/{name}: {task.metric} {metric:.4f} (fp32 {fp32_metric:.4f}), {figure} "
            f"{values[figure]:.4f}, cosine {values.get('cosine', float('nan')):.4f} ({time.perf_counter() - t0:.0f} s)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=str(HERE / "results.json"))
    parser.add_argument("--figures", default=str(FIGURES_JSON), help="measured figures (JSON; read and written)")
    parser.add_argument("--measure", help="comma-separated suite models to measure with the check's figure code")
    parser.add_argument("--build", default="", help="comma-separated candidates to build when not cached")
    parser.add_argument("--cache", default=str(HERE / ".cache" / "lomo"), help="folder for builds made here")
    parser.add_argument("--eval-limit", type=int, help="measure on the first N evaluation batches only")
    parser.add_argument("--md", action="store_true", help="print a Markdown table")
    parser.add_argument("--split-study", metavar="JSON",
                        help="validate the detection threshold across the splits of a benchmarks.layout_study JSON "
                             "instead (one detector in the suite: no other model to leave out)")
    args = parser.parse_args(argv)
    if args.split_study:
        result = split_study(json.loads(Path(args.split_study).read_text()))
        print(render_split_study(result, Path(args.split_study).name) if args.md else json.dumps(result, indent=2), end="")
        return 0
    figures_path = Path(args.figures)
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    if args.measure:
        sys.path.insert(0, str(HERE.parent))
        for name in args.measure.split(","):
            figures[name] = measure(name, [b for b in args.build.split(",") if b], Path(args.cache), args.eval_limit,
                                    log=lambda m: print(m, file=sys.stderr, flush=True))
            figures_path.write_text(json.dumps(figures, indent=2) + "\n")
    results = json.loads(Path(args.results).read_text())
    table = lomo(rows(results, figures))
    if args.md:
        print(render(table, sources(figures_path.name, figures, Path(args.results).name)), end="")
    else:
        print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
