"""Where the time of an encoder goes: onnxruntime's profiler, kernel time per op type.

    python -m benchmarks.encoder_profile [--batch 8] [--runs 6] MODEL.onnx [MODEL.onnx ...]

Each model runs ``--runs`` times (after 2 warm-up runs) on ``--batch`` windows of 128 real tokens
of the encoder benchmark's tuning text (:func:`benchmarks.encoders.text_windows`), one intra-op
thread, with onnxruntime's profiling on; prints the mean ``model_run`` time and, per op type of
the optimized graph, the mean kernel time per run and the node count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path


def profile(path: Path, feed: dict, runs: int) -> tuple[float, dict[str, tuple[float, int]]]:
    """``(ms per run, {op type: (ms per run, nodes)})`` of ``path`` on ``feed``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"encoder_profile_{path.stem}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(runs + 2):
        sess.run(None, feed)
    trace = sess.end_profiling()
    try:
        events = json.loads(Path(trace).read_text())
    finally:
        os.remove(trace)
    by_op: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    total = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            total += e["dur"]
    n = runs + 2
    return total / n / 1e3, {op: (d / n / 1e3, nodes[op] // n) for op, d in by_op.most_common()}


def main(argv: list[str] | None = None) -> int:
    from benchmarks import encoders, fetch, textdata

    p = argparse.ArgumentParser(prog="python -m benchmarks.encoder_profile", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=6)
    args = p.parse_args(argv)
    windows = encoders.text_windows(fetch.minilm_folder(fetch.CACHE), textdata.encoder_splits()["tune"], args.batch)
    print(f"load average {os.getloadavg()[0]:.1f}")
    for path in args.models:
        ms, ops = profile(path, windows, args.runs)
        print(f"== {path.name}: model_run {ms:.2f} ms/run")
        for op, (t, count) in ops.items():
            print(f"   {op:28s} {t:8.2f} ms  x{count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
