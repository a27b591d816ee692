"""Leave-one-model-out validation of the check's default budget (onnxcomp.check).

For every suite model M, the thresholds of the budget rule are chosen on the builds of the *other*
models only, then judged on M's builds:

* a build is **good** when its task metric is within one point (0.01) of fp32's;
* the rule passes a build when its top-1 agreement with fp32 (outputs of class scores: the digits
  models, PP-OCR cls, and PP-OCR rec, whose per-character agreement stands in for per-position
  agreement) or its output cosine (other outputs: PP-OCR det's probability map, MiniLM's hidden
  states) reaches the threshold;
* on the training models, each threshold is the most permissive value that passes no bad build
  (a false pass is what the check exists to prevent; a false alarm costs a look).

The table shows, for each left-out model, the thresholds chosen without it, its false passes (bad
builds the rule would let through: the number that must be 0) and false alarms (good builds it
would flag). Input: a ``results.json`` written by ``python -m benchmarks`` (its task metrics and
fidelity columns); no model is run.

    python benchmarks/budget_lomo.py [benchmarks/results.json] [--md]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLACK = 0.01  # one point of the task metric
DEFAULTS = {"agreement": 0.99, "cosine": 0.985}  # onnxcomp.check.CheckConfig


@dataclass(frozen=True)
class Build:
    model: str
    candidate: str
    good: bool
    kind: str  # "agreement" or "cosine"
    value: float


def builds(results: dict) -> list[Build]:
    rows = []
    for name, model in results["models"].items():
        if model.get("status") != "ok":
            continue
        fp32 = model["fp32_metric"]
        key = model["metric"]
        for r in model["rows"]:
            if r["status"] != "ok" or r["candidate"] == "fp32" or key not in (r.get("metrics") or {}):
                continue
            agree = r["metrics"].get("agree_fp32", r["metrics"].get("char_agree_fp32"))
            kind, value = ("agreement", agree) if agree is not None else ("cosine", r["fidelity"]["cosine"])
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            rows.append(Build(name, r["candidate"], fp32 - r["metrics"][key] <= SLACK + 1e-12, kind, float(value)))
    return rows


def threshold(train: list[Build], kind: str) -> float | None:
    """The most permissive threshold passing no bad training build (None: no bad build seen)."""
    bad = [b.value for b in train if b.kind == kind and not b.good]
    return max(bad) if bad else None


def passes(b: Build, thresholds: dict[str, float | None]) -> bool:
    t = thresholds[b.kind]
    limit = DEFAULTS[b.kind] if t is None else t
    return b.value > limit if t is not None else b.value >= limit


def lomo(rows: list[Build]) -> list[dict]:
    out = []
    for model in sorted({b.model for b in rows}):
        train = [b for b in rows if b.model != model]
        test = [b for b in rows if b.model == model]
        th = {k: threshold(train, k) for k in ("agreement", "cosine")}
        false_pass = [b.candidate for b in test if passes(b, th) and not b.good]
        false_alarm = [b.candidate for b in test if not passes(b, th) and b.good]
        default_fp = [b.candidate for b in test if b.value >= DEFAULTS[b.kind] and not b.good]
        default_fa = [b.candidate for b in test if b.value < DEFAULTS[b.kind] and b.good]
        out.append({"model": model, "kind": test[0].kind if test else "-", "builds": len(test),
                    "good": sum(b.good for b in test), "thresholds": th, "false_pass": false_pass,
                    "false_alarm": false_alarm, "default_false_pass": default_fp, "default_false_alarm": default_fa})
    return out


def render(table: list[dict], source: str) -> str:
    lines = [
        f"Leave-one-model-out validation of the check's budget, from `{source}` "
        f"(`python benchmarks/budget_lomo.py --md`). Good = task metric within 1 point of fp32. "
        f"Thresholds chosen without the model; defaults agreement >= {DEFAULTS['agreement']}, "
        f"cosine >= {DEFAULTS['cosine']}.",
        "",
        "| left-out model | judged by | builds (good) | agreement > (chosen) | cosine > (chosen) | false passes | false alarms | defaults: false passes / alarms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        fmt = lambda t: "-" if t is None else f"{t:.4f}"  # noqa: E731
        fp = ", ".join(r["false_pass"]) or "0"
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['builds']} ({r['good']}) | {fmt(r['thresholds']['agreement'])} | "
            f"{fmt(r['thresholds']['cosine'])} | {fp} | {len(r['false_alarm'])} | "
            f"{len(r['default_false_pass'])} / {len(r['default_false_alarm'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=str(HERE / "results.json"))
    parser.add_argument("--md", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    table = lomo(builds(results))
    if args.md:
        print(render(table, Path(args.results).name), end="")
    else:
        print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
