"""Pruning study: data-aware channel choice, per-group ratios to a target, prune + int8 (issue 18).

Each build runs the ``onnxcomp`` command line in a child process on the suite's calibration file
(wall time and the child's peak RSS recorded); each candidate is scored on the suite's evaluation
(report) split and timed against fp32 side by side in one process (interleaved rounds, medians).

    python -m benchmarks.prune_study --models digits_cnn,ppocr_det [--builds NAME,...] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: name -> (models it applies to, onnxcomp command line after MODEL -o OUT --calibration C)
BUILDS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "l1_50_refit": (("digits_cnn",), ["prune", "--criterion", "l1", "--ratio", "0.5", "--reconstruct"]),
    "obs_50_refit": (("digits_cnn",), ["prune", "--criterion", "obs", "--ratio", "0.5", "--reconstruct"]),
    "macs_0.5": (("digits_cnn",), ["prune", "--target-macs", "0.5", "--reconstruct"]),
    "latency_0.5": (("digits_cnn", "ppocr_det"), ["prune", "--target-latency", "0.5", "--reconstruct", "--round-to", "4"]),
    "prune_int8": (("digits_cnn", "ppocr_det"), ["compress", "--recipe", "prune-int8", "--set", "measure.latency=false"]),
    "prune_int8_0.5": (("ppocr_det",), ["compress", "--recipe", "prune-int8", "--set", "prune.target_latency=0.5",
                                        "--set", "prune.max_damage=0.2", "--set", "measure.latency=false"]),
    "prune_int8_0.55": (("ppocr_det",), ["compress", "--recipe", "prune-int8", "--set", "prune.target_latency=0.55",
                                         "--set", "prune.max_damage=0.15", "--set", "measure.latency=false"]),
    "prune_0.55": (("ppocr_det",), ["prune", "--criterion", "obs", "--target-latency", "0.55", "--round-to", "4",
                                    "--reconstruct", "--max-samples", "32", "--max-damage", "0.15"]),
    "int8": (("digits_cnn", "ppocr_det"), ["compress", "--recipe", "int8", "--set", "measure.latency=false"]),
}


def _build(model: Path, calib: Path, out: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "onnxcomp", args[0], str(model), "-o", str(out), "--calibration", str(calib),
           *args[1:], "--json", "--force", "--no-check"]
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB %M CPU_S %U %S", *cmd], capture_output=True, text=True)
    stdout, stderr = proc.stdout, proc.stderr
    wall = time.perf_counter() - started
    load = (load_before, os.getloadavg()[0])
    timing = next((line.split() for line in stderr.splitlines() if line.startswith("PEAK_RSS_KB")), None)
    peak = int(timing[1]) * 1024 if timing else 0
    cpu = float(timing[3]) + float(timing[4]) if timing else None
    if proc.returncode not in (0, 3):
        said = [line for line in stderr.splitlines() if line.startswith("onnxcomp: error:")]
        return {"error": said[-1] if said else stderr.strip().splitlines()[-1] if stderr.strip() else
                f"exit {proc.returncode}", "command": " ".join(cmd[2:]), "seconds": wall, "cpu_seconds": cpu,
                "load_average": load, "peak_rss_mb": peak / 2**20}
    report = json.loads(stdout)
    return {"seconds": wall, "cpu_seconds": cpu, "load_average": load, "peak_rss_mb": peak / 2**20,
            "command": " ".join(cmd[2:]), "report": report}


def _evaluate(task, paths: dict[str, Path], runs: int) -> dict[str, dict]:
    from onnxcomp.io import load_model, model_to_bytes
    from onnxcomp.measure.latency import SessionSpec, measure_latency
    from onnxcomp.runtime import create_session

    def outputs(path: Path) -> np.ndarray:
        sess = create_session(load_model(path))
        name = sess.get_outputs()[0].name
        return np.concatenate([sess.run([name], b)[0] for b in task.eval_batches])

    ref = outputs(task.fp32_path)
    rows = {"fp32": task.score(ref, ref)}
    for name, path in paths.items():
        rows[name] = task.score(outputs(path), ref)
    specs = [SessionSpec("fp32", model_to_bytes(load_model(task.fp32_path)), threads=2)]
    specs += [SessionSpec(n, model_to_bytes(load_model(p)), threads=2) for n, p in paths.items()]
    lat = measure_latency(specs, task.latency_feeds, runs=runs, warmup_runs=5, n_boot=500)
    for r in lat:
        rows[r.name]["latency_ms"] = r.summary.median * 1e3
        rows[r.name]["latency_ratio"] = r.ratio if r.ratio is not None else 1.0
        rows[r.name]["ratio_interval"] = r.ratio_interval
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.suite import SUITE, Context

    p = argparse.ArgumentParser(prog="python -m benchmarks.prune_study", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits_cnn,ppocr_det")
    p.add_argument("--builds", default=",".join(BUILDS))
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", default="benchmarks/.cache/prune_study")
    p.add_argument("--json", dest="json_path", help="write all figures here")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for model_name in args.models.split(","):
        task = SUITE[model_name].prepare(Context())
        built, paths = {}, {}
        for build in args.builds.split(","):
            models, cli = BUILDS[build]
            if model_name not in models:
                continue
            out = out_dir / f"{model_name}.{build}.onnx"
            print(f"[{model_name}] building {build} ...", flush=True)
            built[build] = _build(task.fp32_path, task.calib_path, out, cli)
            if "error" in built[build]:
                print(f"  error: {built[build]['error']}", flush=True)
                continue
            paths[build] = out
            print(f"  {built[build]['seconds']:.0f} s", flush=True)
        scores = _evaluate(task, paths, args.runs)
        results[model_name] = {"metric": task.metric, "scores": scores, "builds": built}
        print(f"\n{model_name} ({task.metric}, eval split, {task.eval_samples} samples; latency vs fp32 side by side)")
        for name, row in scores.items():
            b = built.get(name, {})
            target = (b.get("report") or {}).get("target") or _stage_target(b.get("report"))
            extra = f", target {target['target']} -> build-time {target['final_ratio']:.3f}" if target else ""
            cost = (f", build {b['seconds']:.0f} s (CPU {b['cpu_seconds']:.0f} s, load {b['load_average'][0]:.1f}"
                    f"-{b['load_average'][1]:.1f}), peak RSS {b['peak_rss_mb']:.0f} MB" if "seconds" in b else "")
            print(f"  {name:14s} {task.metric} {row[task.metric]:.4f}  latency {row['latency_ms']:.2f} ms "
                  f"x{row['latency_ratio']:.3f} of fp32{extra}{cost}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1, default=str))
    return 0


def _stage_target(report: dict | None) -> dict | None:
    for stage in (report or {}).get("stages", []):
        if stage.get("stage") == "prune":
            return stage.get("stats", {}).get("target")
    return None


if __name__ == "__main__":
    raise SystemExit(main())
