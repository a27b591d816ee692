"""Benchmark runner: every suite model x every candidate, side by side in one process.

For each suite model (``benchmarks.suite.SUITE``):

1. **Build** every candidate (``benchmarks.candidates.CANDIDATES``) in its own child process
   (``python -m benchmarks.worker``) on the model's calibration set; record the build's wall time and
   the child's peak resident set (``VmHWM``).  A failure, a timeout or a crash is a row with the
   error, not the end of the run.
2. **Evaluate**: an onnxruntime session per candidate (CPU, ``--threads`` intra-op threads,
   graph optimization ``all``; a model onnxruntime cannot load is an error row) runs both scored
   splits of the model, ``tune`` (the evaluation set, which settings are chosen on) and ``report``
   (held-out data from another source, ``Task.report_batches``; see ``benchmarks/suite.py``); the
   task metric compares the first output with the ground truth (or with fp32 where the task has
   no ground truth), and ``FidelityAccumulator`` gives SQNR and cosine of the first output against
   fp32.  ``metrics``/``fidelity`` of a row are the tune split's, ``report_metrics``/
   ``report_fidelity`` the report split's.
3. **Latency**: all candidates that evaluated are timed together with
   ``onnxcomp.measure.latency.measure_latency`` (interleaved rounds, batch 1, the same few evaluation
   samples cycled), so a slow drift of the shared machine hits them alike.  ``x fp32`` is
   ``median(candidate) / median(fp32)`` with a paired bootstrap 95% interval (< 1 is faster).
4. **Best ORT baseline** of a model: among the onnxruntime baselines (static and dynamic) whose
   primary task metric is within 1 point (0.01) of fp32's, the one with the lowest median latency; if
   none is that accurate, the most accurate baseline (the faster one on a tie), flagged
   ``(inaccurate)``: comparing speed with a model whose outputs are ruined would mean nothing.  ``x best ORT`` is
   every candidate's median over that baseline's median, with the same kind of interval.

Writes ``benchmarks/RESULTS.md`` and ``benchmarks/results.json`` (``--quick`` writes under
``benchmarks/.cache/quick/`` unless ``--md``/``--json`` say otherwise).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import fetch
from benchmarks.candidates import Candidate, load_candidates
from benchmarks.suite import SUITE, Context, Task

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ACCURACY_SLACK = 0.01  # "within 1 point" of fp32 on the primary metric
BUILD_TIMEOUT_S = 1800


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    model: str
    candidate: str
    kind: str
    status: str = "ok"  # ok | error | skipped
    error: str | None = None
    size_bytes: int | None = None
    build: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)
    report_metrics: dict = field(default_factory=dict)
    report_fidelity: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    model_bytes: bytes | None = field(default=None, repr=False)
    times: tuple[float, ...] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("model_bytes", "times")
        }


def _fail(row: Row, stage: str, message: str) -> None:
    row.status = "error"
    row.error = f"{stage}: {message.strip()}"
    row.model_bytes = None


# --------------------------------------------------------------------------- machine


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    notable = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    versions = {}
    for dist in ("onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy", "scipy", "pillow", "tokenizers",
                 "transformers", "torch", "onnxcomp"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        affinity = os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": {f: (f in flags) for f in notable} if flags else {},
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "memory_gib": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "threads": threads,
        "load_avg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


# --------------------------------------------------------------------------- build


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_size(path: Path) -> int:
    from onnxcomp import io

    model = io.load_model(path, check=False)
    return path.stat().st_size + sum(os.path.getsize(p) for p in io.external_data_files(model))


#: Sources whose content decides what a build writes: onnxcomp itself and the benchmark modules
#: that register and run the builds (folders are read recursively).
BUILD_SOURCES: tuple[Path, ...] = (
    ROOT / "onnxcomp", HERE / "candidates.py", HERE / "baselines.py", HERE / "onnxcomp_candidates.py",
    HERE / "worker.py",
)
#: Libraries whose version decides what a build writes.
BUILD_LIBRARIES: tuple[str, ...] = ("onnxruntime", "onnx", "onnx-ir", "onnxscript", "numpy")


def code_revision(sources: tuple[Path, ...] = BUILD_SOURCES) -> str:
    """SHA-256 over the ``.py`` and ``.toml`` files of ``sources`` (relative names and contents).

    It identifies the code exactly, committed or not (a git HEAD would miss uncommitted edits).
    """
    h = hashlib.sha256()
    for src in sources:
        files = sorted(p for p in src.rglob("*") if p.suffix in (".py", ".toml") and p.is_file()) \
            if src.is_dir() else [src]
        for path in files:
            h.update(str(path.relative_to(src.parent)).encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in BUILD_LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def build_key(task: Task, cand: Candidate) -> dict:
    """What a cached build must match to be reused: its inputs, the candidate's full config, the
    code (:func:`code_revision`) and library versions that built it."""
    return {
        "fp32": _sha256(task.fp32_path),
        "calib": _sha256(task.calib_path),
        "candidate": cand.name,
        "config": json.loads(json.dumps(cand.config, sort_keys=True, default=str)),
        "code": code_revision(),
        "versions": _versions(),
    }


def build_candidate(task: Task, cand: Candidate, cache: Path, reuse: bool) -> Row:
    row = Row(task.name, cand.name, cand.kind)
    out_dir = cache / "builds" / task.name
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{cand.name}.onnx"
    record_path = out_dir / f"{cand.name}.json"
    log_path = out_dir / f"{cand.name}.log"
    key = build_key(task, cand)
    if reuse and out.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key and record.get("ok"):
            row.build = {k: record.get(k) for k in ("wall_s", "peak_rss_mb", "rss_before_mb", "notes")}
            row.build["reused"] = True
            return row
    for stale in out_dir.glob(f"{cand.name}.onnx*"):
        stale.unlink()
    record_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.worker", cand.name, str(task.fp32_path), str(task.calib_path),
           str(out), str(record_path)]
    # The child runs in a scratch folder: onnxruntime's symbolic shape inference, when it fails,
    # leaves "sym_shape_infer_temp.onnx" plus a uuid-named external-data file (90 MB for MiniLM) in
    # the current directory.
    scratch = Path(tempfile.mkdtemp(prefix=f".work-{cand.name}-", dir=out_dir))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as logfh:
            proc = subprocess.run(cmd, cwd=scratch, env=env, stdout=logfh, stderr=subprocess.STDOUT,
                                  timeout=BUILD_TIMEOUT_S)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        row.build = {"wall_s": time.perf_counter() - t0}
        _fail(row, "build", f"timed out after {BUILD_TIMEOUT_S} s")
        return row
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not record_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        row.build = {"wall_s": time.perf_counter() - t0}
        _fail(row, "build", f"worker process died ({how}); log: {' | '.join(tail)}")
        return row
    record = json.loads(record_path.read_text())
    record["key"] = key
    record_path.write_text(json.dumps(record, indent=2, default=str))
    row.build = {k: record.get(k) for k in ("wall_s", "peak_rss_mb", "rss_before_mb", "notes")}
    if not record.get("ok"):
        error = record.get("error", "unknown error")
        if error.startswith("Unavailable: "):  # the tool is not installed (benchmarks.baselines.Unavailable)
            row.status, row.error = "skipped", error.removeprefix("Unavailable: ")
        else:
            _fail(row, "build", error)
    return row


# --------------------------------------------------------------------------- evaluate


def load_bytes(row: Row, path: Path) -> None:
    from onnxcomp import io

    try:
        row.size_bytes = _model_size(path)
        row.model_bytes = io.model_to_bytes(io.load_model(path, check=False))
    except Exception as exc:
        _fail(row, "load", f"{type(exc).__name__}: {exc}")


SPLITS = ("tune", "report")


def evaluate(task: Task, row: Row, threads: int, refs: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """Run both splits; fill ``row.metrics``/``row.fidelity`` (tune) and ``row.report_metrics``/
    ``row.report_fidelity`` (report); return ``{split: output 0 concatenated}``.

    ``refs`` are fp32's outputs (``None`` when ``row`` is fp32 itself)."""
    from onnxcomp.measure.latency import SessionCreationError, SessionSpec
    from onnxcomp.measure.metrics import FidelityAccumulator

    spec = SessionSpec(row.candidate, row.model_bytes, threads=threads, graph_optimization="all")
    try:
        sess = spec.create_session()
    except SessionCreationError as exc:
        _fail(row, "onnxruntime cannot load the model", exc.ort_message.splitlines()[0] if exc.ort_message else str(exc))
        return None
    results: dict[str, np.ndarray] = {}
    try:
        for split in SPLITS:
            batches = task.eval_batches if split == "tune" else task.report_batches
            if not batches:
                continue
            ref = None if refs is None else refs[split]
            outs = []
            acc = FidelityAccumulator(channel_axis=None, name=row.candidate)
            offset = 0
            t0 = time.perf_counter()
            try:
                for feed in batches:
                    out = sess.run(None, feed)[0]
                    outs.append(out)
                    if ref is not None:
                        acc.update(ref[offset : offset + out.shape[0]], out)
                    offset += out.shape[0]
            except Exception as exc:
                _fail(row, "onnxruntime failed to run", f"{split} split: " + str(exc).strip().splitlines()[0])
                return None
            eval_s = time.perf_counter() - t0
            result = np.concatenate(outs, axis=0)
            try:
                scores = task.score(result, result if ref is None else ref, split=split)
            except Exception as exc:
                _fail(row, "metric", f"{split} split: {type(exc).__name__}: {exc}")
                return None
            metrics = {k: float(v) for k, v in scores.items()}
            metrics["eval_s"] = eval_s
            fid = acc.result() if ref is not None else None
            fidelity = {"sqnr_db": fid.sqnr_db, "cosine": fid.cosine} if fid else {"sqnr_db": float("inf"), "cosine": 1.0}
            if split == "tune":
                row.metrics, row.fidelity = metrics, fidelity
            else:
                row.report_metrics, row.report_fidelity = metrics, fidelity
            results[split] = result
    finally:
        del sess
    return results


# --------------------------------------------------------------------------- latency


def measure(task: Task, rows: list[Row], args, progress_cb) -> None:
    from onnxcomp.measure.latency import MeasurementError, SessionSpec, measure_latency

    live = [r for r in rows if r.status == "ok" and r.model_bytes is not None]
    while live:
        specs = [SessionSpec(r.candidate, r.model_bytes, threads=args.threads, graph_optimization="all") for r in live]
        try:
            results = measure_latency(
                specs,
                task.latency_feeds,
                warmup_runs=args.warmup_runs,
                warmup_seconds=args.warmup_seconds,
                runs=args.runs or task.runs,
                time_budget=args.time_budget,
                seed=0,
                progress=progress_cb,
            )
        except MeasurementError as exc:
            bad = next((r for r in live if r.candidate == exc.spec_name), None)
            if bad is None:
                for r in live:
                    _fail(r, "latency", str(exc))
                return
            _fail(bad, "latency", str(exc))
            live = [r for r in live if r is not bad]
            continue
        for r, res in zip(live, results):
            s = res.summary
            r.times = res.times
            r.latency = {
                "median_ms": s.median * 1e3,
                "p90_ms": s.p90 * 1e3,
                "min_ms": s.min * 1e3,
                "runs": s.n,
                "session_creation_s": res.session_creation_s,
                "ratio_fp32": 1.0 if res.ratio is None else res.ratio,
                "ratio_fp32_ci": None if res.ratio_interval is None else list(res.ratio_interval),
            }
        if live[0].candidate != "fp32":  # fp32 failed to time: no ratios to it
            for r in live:
                r.latency.pop("ratio_fp32", None)
                r.latency.pop("ratio_fp32_ci", None)
        return


def best_ort(rows: list[Row], metric: str, fp32_metric: float | None) -> tuple[Row | None, bool]:
    """The best ORT baseline (see the module docstring) and whether it is within 1 point of fp32."""
    timed = [r for r in rows if r.kind.startswith("ort") and r.status == "ok" and r.times and metric in r.metrics]
    if not timed:
        return None, False
    if fp32_metric is not None:
        good = [r for r in timed if r.metrics[metric] >= fp32_metric - ACCURACY_SLACK]
        if good:
            return min(good, key=lambda r: r.latency["median_ms"]), True
    return min(timed, key=lambda r: (-r.metrics[metric], r.latency["median_ms"])), False


def ratios_to_best(rows: list[Row], best: Row) -> None:
    from onnxcomp.measure.stats import ratio_ci

    for r in rows:
        if r.times is None:
            continue
        if r is best:
            r.latency["ratio_best"], r.latency["ratio_best_ci"] = 1.0, [1.0, 1.0]
            continue
        ratio, lo, hi = ratio_ci(best.times, r.times, seed=0)
        r.latency["ratio_best"], r.latency["ratio_best_ci"] = ratio, [lo, hi]


# --------------------------------------------------------------------------- formatting


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MB"
    return f"{n / 1024:.0f} KB"


def _fmt_ratio(value, ci) -> str:
    if value is None:
        return "-"
    if ci is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _fmt_num(v, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):  # "inf" / "nan" as stored in results.json
        return v
    if isinstance(v, float) and np.isinf(v):
        return "inf"
    return format(v, fmt)


def table_rows(model_result: dict) -> list[list[str]]:
    metric = model_result["metric"]
    fp32 = model_result.get("fp32_metric")
    fp32_size = next((r["size_bytes"] for r in model_result["rows"] if r["candidate"] == "fp32"), None)
    best = model_result.get("best_ort")
    out = []
    fp32_report = model_result.get("fp32_report_metric")
    for r in model_result["rows"]:
        m = r["metrics"].get(metric)
        delta = None if (m is None or fp32 is None or r["candidate"] == "fp32") else (m - fp32) * 100
        rm = (r.get("report_metrics") or {}).get(metric)
        rdelta = None if (rm is None or fp32_report is None or r["candidate"] == "fp32") else (rm - fp32_report) * 100
        lat = r["latency"]
        name = r["candidate"] + (" *" if best and r["candidate"] == best else "")
        size_ratio = (r["size_bytes"] / fp32_size) if (r["size_bytes"] and fp32_size) else None
        build = r.get("build") or {}
        note = ""
        if r["status"] != "ok":
            note = (r["error"] or "")[:110]
        elif "zipped_kb" in (build.get("notes") or {}):
            bn = build["notes"]
            note = (f"clustered weights {bn['weights_kb']:g} KB: zipped {bn['zipped_kb']:g} KB, "
                    f"entropy-coded {bn['entropy_kb']:g} KB")
        out.append([
            name,
            r["status"],
            _fmt_size(r["size_bytes"]),
            _fmt_num(size_ratio, ".3f"),
            _fmt_num(m, ".4f"),
            "-" if delta is None else f"{delta:+.2f}",
            _fmt_num(rm, ".4f"),
            "-" if rdelta is None else f"{rdelta:+.2f}",
            _fmt_num(r["fidelity"].get("sqnr_db"), ".1f"),
            _fmt_num(lat.get("median_ms"), ".3f"),
            _fmt_ratio(lat.get("ratio_fp32"), lat.get("ratio_fp32_ci")),
            _fmt_ratio(lat.get("ratio_best"), lat.get("ratio_best_ci")),
            _fmt_num(build.get("wall_s"), ".1f"),
            _fmt_num(build.get("peak_rss_mb"), ".0f"),
            note,
        ])
    return out


HEADERS = ["candidate", "status", "size", "x size", "tune metric", "tune Δ pts", "report metric", "report Δ pts",
           "tune SQNR dB", "median ms",
           "x fp32 [95% CI]", "x best ORT [95% CI]", "tool s", "tool peak RSS MB", "note"]


TERMINAL_COLUMNS = ["candidate", "size", "tune metric", "tune Δ pts", "report metric", "report Δ pts", "median ms",
                    "x fp32 [95% CI]",
                    "x best ORT [95% CI]", "tool s", "tool peak RSS MB"]


def print_model_table(console, model_result: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{model_result['name']}: {model_result['metric_label']} ({model_result['metric']})",
              title_justify="left")
    short = {"tool peak RSS MB": "RSS MB", "x best ORT [95% CI]": "x best ORT", "x fp32 [95% CI]": "x fp32",
             "tune metric": "tune", "tune Δ pts": "tune Δ", "report metric": "report", "report Δ pts": "report Δ"}
    keep = [HEADERS.index(h) for h in TERMINAL_COLUMNS]
    for h in TERMINAL_COLUMNS:
        t.add_column(short.get(h, h), no_wrap=True, justify="left" if h == "candidate" else "right")
    errors = []
    for cells in table_rows(model_result):
        if cells[1] == "error":
            errors.append(cells[0])
        t.add_row(*[cells[i] for i in keep], style="red" if cells[1] == "error" else None)
    console.print(t)
    best = model_result.get("best_ort")
    if best:
        flag = "" if model_result.get("best_ort_accurate") else " (inaccurate: no baseline within 1 point of fp32; the most accurate one is used)"
        console.print(f"  * best ORT baseline: {best}{flag}")
    for r in model_result["rows"]:
        if r["status"] == "error":
            console.print(f"  [red]{r['candidate']}: {escape(r['error'] or '')}[/]")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, results: dict) -> None:
    meta = results["meta"]
    m = meta["machine"]
    lines = ["# onnxcomp benchmark results", ""]
    lines += [
        f"Generated {meta['date']} by `{meta['command']}` (git {m.get('git_commit') or '?'}; "
        f"{meta['elapsed_s'] / 60:.1f} min).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}; {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
        f"{m['memory_gib']} GiB RAM; {m['platform']}",
        "- Flags of note: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["cpu_flags"].items()),
        f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"- Load average (1/5/15 min) at start {m.get('load_avg_start')}, at end {m.get('load_avg_end')}: "
        "the machine is shared, so absolute times carry noise; the interleaved ratios are the numbers to trust.",
        f"- onnxruntime sessions: CPUExecutionProvider, intra-op threads {m['threads']}, graph optimization "
        f"`all`, no spinning (onnxcomp.measure.latency defaults).",
        "",
        "## How to read the tables",
        "",
        "- **tune metric**: the model's primary task metric on its evaluation set, the `tune` split that "
        "settings and defaults are chosen on (fractions, higher is better); **report metric**: the same on "
        "the `report` split, held-out data from another source that nothing was chosen on (see each "
        "model's `Report split` line); **Δ pts** = (candidate - fp32) x 100 on that split. **tune SQNR dB**: "
        "of the model's first output against fp32's over the tune split.",
        "- **median ms**: batch-1 latency, all candidates of a model timed together in interleaved rounds "
        f"(`onnxcomp.measure.latency.measure_latency`: "
        f"{meta['settings']['runs'] or '500 (digits), 300 (ppocr_cls) or 100 (others)'} rounds at most, "
        f"{meta['settings']['time_budget']} s budget, warm-up {meta['settings']['warmup_runs']} runs / "
        f"{meta['settings']['warmup_seconds']} s). **x fp32** = median / fp32's median with a paired "
        "bootstrap 95% interval (< 1 is faster).",
        "- **x best ORT**: the same against the *best ORT baseline* (marked `*`): among onnxruntime "
        "baselines whose primary metric is within 1 point (0.01) of fp32, the one with the lowest median; "
        "if none is that accurate, the most accurate baseline (flagged `inaccurate`).",
        "- **size**: model file plus external data. **tool s / tool peak RSS MB**: wall time of the build "
        "call (pre-processing + calibration + quantization) and the peak resident set (VmHWM) of the child "
        "process that ran it; it includes the interpreter, numpy and onnxruntime (`rss_before_mb` in "
        "results.json, about 70 MB) and whatever the tool imports.",
        "- ORT baselines run `quant_pre_process` first (recommended by the onnxruntime quantization guide), "
        "then `quantize_static` (QDQ, per-channel, QInt8 weights, QUInt8 `_u8` or QInt8 `_s8` activations, "
        "MinMax or Percentile calibration on the suite's calibration set) or `quantize_dynamic` (QInt8 "
        "weights). Everything else is at onnxruntime's defaults.",
        "",
        "## Summary",
        "",
        "| model | metric | fp32 tune | fp32 report | fp32 median ms | best ORT baseline (by tune) | its tune metric "
        "| its report metric | its x fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results["models"].values():
        if res["status"] != "ok":
            lines.append(f"| {res['name']} | - | {res['status']}: {_md_escape(res.get('error') or '')} | | | | | | |")
            continue
        fp32_row = next(r for r in res["rows"] if r["candidate"] == "fp32")
        best = next((r for r in res["rows"] if r["candidate"] == res.get("best_ort")), None)
        lines.append(
            f"| {res['name']} | {res['metric']} | {_fmt_num(res.get('fp32_metric'), '.4f')} | "
            f"{_fmt_num(res.get('fp32_report_metric'), '.4f')} | "
            f"{_fmt_num(fp32_row['latency'].get('median_ms'), '.3f')} | "
            f"{(best['candidate'] + ('' if res.get('best_ort_accurate') else ' (inaccurate)')) if best else '-'} | "
            f"{_fmt_num(best['metrics'].get(res['metric']), '.4f') if best else '-'} | "
            f"{_fmt_num((best.get('report_metrics') or {}).get(res['metric']), '.4f') if best else '-'} | "
            f"{_fmt_ratio(best['latency'].get('ratio_fp32'), best['latency'].get('ratio_fp32_ci')) if best else '-'} |"
        )
    lines.append("")
    for res in results["models"].values():
        lines += [f"## {res['name']}", ""]
        if res.get("run"):
            run = res["run"]
            lines += [f"Re-run alone {run['date']} by `{run['command']}` (git {run.get('git_commit') or '?'}; "
                      f"{(run.get('elapsed_s') or 0) / 60:.1f} min; load at start {run.get('load_avg_start')}, at end "
                      f"{run.get('load_avg_end')}), merged into the run above: its times are comparable only "
                      f"among its own rows.", ""]
        if res["status"] != "ok":
            lines += [f"**{res['status']}**: {res.get('error')}", ""]
            continue
        info = res["info"]
        lines.append(
            f"{res['description']}. Metric: {res['metric_label']} (`{res['metric']}`). "
            f"Calibration {res['calib_samples']} samples, evaluation (tune split) {res['eval_samples']} samples. "
            f"Input {info.get('input', '?')}. Latency rounds: "
            f"{next((r['latency'].get('runs') for r in res['rows'] if r['latency'].get('runs')), '-')}."
        )
        data = {k: v for k, v in info.items() if k not in ("input", "export")}
        if data:
            lines.append("")
            lines.append("Data: " + "; ".join(f"{k} {v}" for k, v in data.items()) + ".")
        if res.get("report_source"):
            lines.append("")
            lines.append(f"Report split: {res['report_samples']} samples, {res['report_source']}.")
        if info.get("export"):
            ex = info["export"]
            lines.append("")
            lines.append(
                f"Export: {ex.get('exporter')}, torch {ex.get('torch')}, transformers {ex.get('transformers')}, "
                f"attention {ex.get('attn_implementation')}; max |ONNX - torch| "
                f"{ex.get('check', {}).get('max_abs_diff_vs_torch', float('nan')):.2e} at batch 3, sequence 40."
            )
        notes: dict[str, list[str]] = {}
        for r in res["rows"]:
            bn = (r.get("build") or {}).get("notes") or {}
            text = "; ".join(str(bn[k]) for k in ("pre_process", "opset") if k in bn)
            if text:
                notes.setdefault(text, []).append(r["candidate"])
        if notes:
            lines.append("")
            lines.append("Build notes: " + " ".join(f"{', '.join(c)}: {t}." for t, c in notes.items()))
        lines.append("")
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "|".join("---" for _ in HEADERS) + "|")
        for cells in table_rows(res):
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
        lines.append("")
        extra = sorted({k for r in res["rows"] for k in r["metrics"] if k not in (res["metric"], "eval_s")})
        if extra:
            lines.append("Other metrics (tune split): " + "; ".join(
                f"{r['candidate']}: " + ", ".join(f"{k} {r['metrics'][k]:.4f}" for k in extra if k in r["metrics"])
                for r in res["rows"] if r["status"] == "ok"
            ) + ".")
            lines.append("")
    lines += ["## The check's budget, leave one model out", "", _lomo_table(results), ""]
    failures = [r for res in results["models"].values() for r in res.get("rows", []) if r["status"] == "error"]
    if failures:
        lines += ["## Failures", ""]
        for r in failures:
            lines.append(f"- **{r['model']} / {r['candidate']}**: {_md_escape(r['error'] or '')}")
        lines.append("")
    lines.append(KEEP_MARKER)
    path.write_text("\n".join(lines) + _kept_sections(path))


def _lomo_table(results: dict) -> str:
    """The check's leave-one-model-out table: ``budget_figures.json``'s measured figures, these results' otherwise."""
    from benchmarks import budget_lomo

    path = budget_lomo.FIGURES_JSON
    figures = json.loads(path.read_text()) if path.is_file() else {}
    table = budget_lomo.lomo(budget_lomo.rows(results, figures))
    return budget_lomo.render(table, budget_lomo.sources(path.name, figures, "results.json"))


KEEP_MARKER = "<!-- generated tables end here; the runner keeps everything below this line -->"


def _kept_sections(path: Path) -> str:
    """What follows :data:`KEEP_MARKER` in the existing ``path`` (hand-written studies), else nothing."""
    if not path.is_file():
        return "\n"
    text = path.read_text()
    at = text.find(KEEP_MARKER)
    return text[at + len(KEEP_MARKER):] if at >= 0 else "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated suite models (default: all): " + ",".join(SUITE))
    p.add_argument("--candidates", help="comma-separated candidates besides fp32 (default: all registered)")
    p.add_argument("--runs", type=int,
                   help="latency rounds per model (default: 500 digits, 300 ppocr_cls, 100 others; --quick 10)")
    p.add_argument("--time-budget", type=float, help="max seconds of latency rounds per model (default 120)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke test: few runs, small calibration and eval sets")
    p.add_argument("--json", type=Path, help="results JSON path (default benchmarks/results.json)")
    p.add_argument("--md", type=Path, help="results markdown path (default benchmarks/RESULTS.md)")
    p.add_argument("--reuse-builds", action="store_true",
                   help="reuse candidate models built earlier from the same fp32 model, calibration file, "
                        "code, library versions and candidate configuration")
    p.add_argument("--list", action="store_true", help="list suite models and candidates, then exit")
    p.add_argument("--merge", action="store_true",
                   help="keep the other models of the existing results JSON (--json) and replace only those run "
                        "now (--models); each replaced model records its own run (date, command, git)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the markdown (--md) from an existing results JSON (--json) without running")
    args = p.parse_args(argv)
    if args.runs is None and args.quick:
        args.runs = 10
    if args.time_budget is None:
        args.time_budget = 20.0 if args.quick else 120.0
    args.warmup_runs = 2 if args.quick else 10
    args.warmup_seconds = 0.1 if args.quick else 1.0
    out_dir = fetch.CACHE / "quick" if args.quick else HERE
    args.json = args.json or out_dir / "results.json"
    args.md = args.md or out_dir / "RESULTS.md"
    return args


def _select(spec: str | None, known: list[str], what: str) -> list[str]:
    if not spec:
        return known
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return [n for n in known if n in names]


def run_model(name: str, cands: list[Candidate], args, console, ctx: Context) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    sm = SUITE[name]
    res: dict = {"name": name, "description": sm.description, "status": "ok", "rows": []}
    reason = sm.missing()
    if reason:
        console.print(f"[yellow]skipping {name}: {escape(reason)}[/]")
        res.update(status="skipped", error=reason)
        return res
    console.rule(f"[bold]{name}")
    t0 = time.perf_counter()
    try:
        with console.status(f"{name}: preparing model and data"):
            task = sm.prepare(ctx)
    except Exception as exc:
        console.print(f"[red]{name}: preparation failed: {type(exc).__name__}: {escape(str(exc))}[/]")
        res.update(status="error", error=f"preparation failed: {type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc().splitlines()[-5:])
        return res
    report_samples = sum(next(iter(b.values())).shape[0] for b in task.report_batches or [])
    res.update(metric=task.metric, metric_label=task.metric_label, calib_samples=task.calib_samples,
               eval_samples=task.eval_samples, report_samples=report_samples, report_source=task.report_source,
               info=task.info, prepare_s=time.perf_counter() - t0)
    console.print(f"  data: calib {task.calib_samples}, tune {task.eval_samples}, report {report_samples} "
                  f"({time.perf_counter() - t0:.1f} s)")

    rows = [Row(name, "fp32", "fp32")]
    applicable = [c for c in cands if name not in c.skip_models]
    for c in applicable:
        with console.status(f"{name}: building {c.name}"):
            row = build_candidate(task, c, ctx.cache, args.reuse_builds)
        b = row.build
        msg = f"  build {c.name:<24} {row.status:<6} {_fmt_num(b.get('wall_s'), '.1f')} s, peak RSS {_fmt_num(b.get('peak_rss_mb'), '.0f')} MB"
        if b.get("reused"):
            msg += " (reused)"
        console.print(msg + (f"  [red]{escape(row.error[:150])}[/]" if row.error else ""))
        rows.append(row)

    load_bytes(rows[0], task.fp32_path)
    for r in rows[1:]:
        if r.status == "ok":
            load_bytes(r, ctx.cache / "builds" / name / f"{r.candidate}.onnx")

    ref = None
    for r in rows:
        if r.status != "ok":
            continue
        with console.status(f"{name}: evaluating {r.candidate}"):
            out = evaluate(task, r, args.threads, ref)
        if r is rows[0]:
            if out is None:
                console.print(f"[red]{name}: fp32 failed to evaluate: {escape(r.error or '')}[/]")
                res.update(status="error", error=f"fp32: {r.error}", rows=[x.to_json() for x in rows])
                return res
            ref = out
        if r.status == "ok":
            rep_m = r.report_metrics.get(task.metric)
            console.print(f"  eval  {r.candidate:<24} {task.metric} tune {r.metrics[task.metric]:.4f}"
                          + ("" if rep_m is None else f" report {rep_m:.4f}") + f"  ({r.metrics['eval_s']:.1f} s)")
        else:
            console.print(f"  eval  {r.candidate:<24} [red]{escape(r.error[:150])}[/]")
    fp32_metric = rows[0].metrics.get(task.metric)
    res["fp32_report_metric"] = rows[0].report_metrics.get(task.metric)
    if fp32_metric is not None and fp32_metric < task.expect_fp32:
        console.print(f"[yellow]  warning: fp32 {task.metric} {fp32_metric:.4f} is below the expected {task.expect_fp32}[/]")

    with Progress(TextColumn(f"  latency {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        tid = prog.add_task("latency", total=None)

        def cb(done: int, total: int) -> None:
            prog.update(tid, completed=done, total=total)

        measure(task, rows, args, cb)
    best, accurate = best_ort(rows, task.metric, fp32_metric)
    if best is not None:
        ratios_to_best(rows, best)
    res.update(
        fp32_metric=fp32_metric,
        best_ort=best.candidate if best else None,
        best_ort_accurate=accurate,
        rows=[r.to_json() for r in rows],
        elapsed_s=time.perf_counter() - t0,
    )
    print_model_table(console, res)
    return res


def merge_results(old: dict | None, new: dict) -> dict:
    """``old`` with the models of ``new`` replaced (``--merge``): the header stays ``old``'s run and
    each replaced model carries its own (``run``: date, command, git commit, load, minutes), which
    :func:`write_markdown` prints under the model's heading. Without ``old``, ``new`` as it is."""
    if old is None:
        return new
    meta = new["meta"]
    run = {"date": meta["date"], "command": meta["command"], "git_commit": meta["machine"].get("git_commit"),
           "load_avg_start": meta["machine"].get("load_avg_start"), "load_avg_end": meta["machine"].get("load_avg_end"),
           "elapsed_s": meta.get("elapsed_s")}
    merged = {**old, "models": dict(old["models"])}
    for name, result in new["models"].items():
        merged["models"][name] = {**result, "run": run}
    return merged


def _jsonable(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    if args.render_only:
        write_markdown(args.md, json.loads(args.json.read_text()))
        console.print(f"wrote {args.md} from {args.json}")
        return 0
    all_cands = load_candidates()
    if args.list:
        console.print("suite models:")
        for n, sm in SUITE.items():
            reason = sm.missing()
            console.print(f"  {n:<20} {sm.description}" + (f"  [yellow](unavailable: {reason})[/]" if reason else ""))
        console.print("candidates (besides fp32):")
        for n, c in all_cands.items():
            console.print(f"  {n:<24} ({c.kind}) {c.description}")
        return 0
    models = _select(args.models, list(SUITE), "models")
    cand_names = _select(args.candidates, list(all_cands), "candidates")
    cands = [all_cands[n] for n in cand_names]
    ctx = Context(quick=args.quick)
    command = "python -m benchmarks" + ("" if not (argv if argv is not None else sys.argv[1:]) else " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine_info(args.threads),
        "settings": {
            "runs": args.runs, "time_budget": args.time_budget, "warmup_runs": args.warmup_runs,
            "warmup_seconds": args.warmup_seconds, "threads": args.threads, "quick": args.quick,
            "accuracy_slack": ACCURACY_SLACK, "latency_batch": 1,
        },
        "candidates": {n: {"kind": c.kind, "description": c.description} for n, c in all_cands.items() if n in cand_names},
    }
    console.print(f"onnxcomp benchmarks: {len(models)} models x {1 + len(cands)} candidates; "
                  f"{meta['machine']['cpu']}, threads {args.threads}")
    t0 = time.perf_counter()
    results = {"meta": meta, "models": {}}
    for name in models:
        results["models"][name] = run_model(name, cands, args, console, ctx)
    meta["elapsed_s"] = time.perf_counter() - t0
    meta["machine"]["load_avg_end"] = _loadavg()
    if args.merge:
        results = merge_results(json.loads(args.json.read_text()) if args.json.is_file() else None, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_jsonable(results), indent=1))
    write_markdown(args.md, results)
    console.print(f"wrote {args.md} and {args.json} ({meta['elapsed_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
