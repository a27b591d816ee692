"""int8 / fp32 latency ratio at several intra-op thread counts (default 1 and 2, which every
machine this runs on has).

    python -m benchmarks.threads --models digits_cnn,ppocr_cls,ppocr_rec [--threads 1,2] [--runs 60]

For each suite model: onnxcomp's default static int8 model (``quantize`` on the suite's calibration
data), then per thread count an interleaved fp32 / int8 latency ratio with its 95% interval
(``onnxcomp.measure.bench.int8_latency_report``); where int8 is slower, the op types that cost the
time. On a machine with more cores, run the grid further with ``--threads 1,2,4,8,16``: the gain
of int8 shrinks as threads grow (Q/DQ conversions are memory-bound and split poorly), and
``onnxcomp quantize/compress --threads N`` reports the same verdict for one model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.suite import SUITE, Context


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits_cnn,ppocr_cls,ppocr_rec", help="comma-separated suite models")
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts (default 1,2)")
    p.add_argument("--runs", type=int, default=60, help="latency rounds per thread count (default 60)")
    p.add_argument("--time-budget", type=float, default=60.0, help="max seconds of rounds per thread count")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    from onnxcomp.io import load_model
    from onnxcomp.measure.bench import int8_latency_report
    from onnxcomp.quant.api import quantize

    counts = [int(t) for t in args.threads.split(",") if t.strip()]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = SUITE[name]
        why = model.missing()
        if why:
            print(f"{name}: skipped ({why})", file=sys.stderr)
            continue
        task = model.prepare(Context())
        fp32 = load_model(task.fp32_path)
        int8, _ = quantize(fp32, task.calib_path)
        for threads in counts:
            verdict = int8_latency_report(fp32, int8, task.latency_feeds, threads=threads, runs=args.runs,
                                          time_budget=args.time_budget)
            row = {"model": name, "threads": threads, "ratio": verdict["ratio"], "ci95": verdict["ratio_ci95"],
                   "fp32_ms": verdict["float_median_ms"], "int8_ms": verdict["int8_median_ms"],
                   "int8_slower": verdict["int8_slower"],
                   "causes": [c["op_type"] for c in verdict["causes"][:3]]}
            rows.append(row)
            print(f"{name} @ {threads} thread(s): {verdict['summary']}", file=sys.stderr, flush=True)
    print("| model | threads | fp32 ms | int8 ms | int8 / fp32 [95% CI] | int8 slower: where |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ci = f" [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r["ci95"] else ""
        where = ("yes: " + ", ".join(r["causes"])) if r["int8_slower"] else "no"
        print(f"| {r['model']} | {r['threads']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | {r['ratio']:.2f}{ci} | {where} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
