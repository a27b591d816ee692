"""Child process that builds one candidate, so its time and memory are its own.

Usage (the runner does this)::

    python -m benchmarks.worker CANDIDATE MODEL.onnx CALIB.npz OUT.onnx RECORD.json

The record holds ``wall_s`` (the build callable alone, after all imports), ``rss_before_mb`` (the
resident set after importing onnxruntime, numpy and the candidate modules, before building) and
``peak_rss_mb`` (the process's peak resident set over its lifetime: ``VmHWM`` from
``/proc/self/status``, or ``getrusage(RUSAGE_SELF).ru_maxrss`` without ``/proc``), the notes the
build returned, and ``error`` (exception type, message and the last traceback lines) on failure.
The exit status is 0 when the record was written, whatever the build's outcome.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0


def main(argv: list[str]) -> int:
    name, model, calib, out, record_path = argv
    record: dict = {"candidate": name, "ok": False}
    try:
        from benchmarks.candidates import load_candidates

        cand = load_candidates()[name]
        record["rss_before_mb"] = _status_mb("VmRSS")
        t0 = time.perf_counter()
        notes = cand.build(Path(model), Path(calib), Path(out))
        record["wall_s"] = time.perf_counter() - t0
        record["notes"] = notes or {}
        if not Path(out).is_file():
            raise RuntimeError(f"the build returned but wrote no model at {out}")
        record["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
        if "wall_s" not in record and "t0" in locals():
            record["wall_s"] = time.perf_counter() - t0
        msg = str(exc).strip() or repr(exc)
        record["error"] = f"{type(exc).__name__}: {msg}"
        record["traceback"] = traceback.format_exc().strip().splitlines()[-6:]
    record["peak_rss_mb"] = peak_rss_mb()
    Path(record_path).write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
