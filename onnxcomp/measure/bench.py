"""Latency of several in-memory models, interleaved, as JSON-ready rows (``onnxcomp bench``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.bounds import Range
from onnxcomp.graph import parameter_nbytes
from onnxcomp.io import ModelSource, load_model, model_to_bytes
from onnxcomp.measure.latency import SessionSpec, explain_int8_latency, measure_latency, op_type_times

__all__ = ["physical_cores", "default_threads", "bench_models", "int8_latency_report", "LATENCY_RANGES"]

#: Accepted latency settings, shared by ``onnxcomp bench`` and the recipes' ``[measure]`` stage.
LATENCY_RANGES = {
    "runs": Range(int, 1, 1_000_000),
    "warmup_runs": Range(int, 0, 1_000_000),
    "warmup_seconds": Range(float, 0.0, 3600.0),
    "time_budget": Range(float, 0.0, 86400.0, min_open=True),
    "threads": Range(int, 1, 4096),
}


def physical_cores() -> int:
    """Physical cores from /proc/cpuinfo (distinct (physical id, core id) pairs), else cpu_count."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            pairs = set()
            phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip():
                    if core is not None:
                        pairs.add((phys, core))
                    phys = core = None
            if core is not None:
                pairs.add((phys, core))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def bench_models(
    models: Sequence[tuple[str, ModelSource]],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    threads: int | None = None,
    optimization: str = "all",
    runs: int = 50,
    time_budget: float | None = None,
    warmup_runs: int = 10,
    warmup_seconds: float = 1.0,
    seed: int = 0,
    progress=None,
) -> list[dict[str, Any]]:
    """Interleaved latency of ``models`` (name, model: anything :func:`onnxcomp.io.load_model`
    reads) on ``feeds``; JSON-ready rows."""
    threads = threads or physical_cores()
    models = [(name, load_model(model)) for name, model in models]
    specs = [
        SessionSpec(name=name, model=model_to_bytes(model), threads=threads, graph_optimization=optimization)
        for name, model in models
    ]
    batch = int(next(iter(feeds[0].values())).shape[0]) if feeds and feeds[0] else 1
    results = measure_latency(
        specs, list(feeds), warmup_runs=warmup_runs, warmup_seconds=warmup_seconds, runs=runs,
        time_budget=time_budget, seed=seed, progress=progress, batch_size=max(batch, 1),
    )
    rows = []
    for (name, model), res in zip(models, results):
        s = res.summary
        rows.append({
            "name": name,
            "runs": s.n,
            "min_ms": s.min * 1e3,
            "median_ms": s.median * 1e3,
            "p90_ms": s.p90 * 1e3,
            "p99_ms": s.p99 * 1e3,
            "mean_ms": s.mean * 1e3,
            "throughput_per_s": s.items_per_s,
            "ratio_to_first": res.ratio,
            "ratio_ci95": list(res.ratio_interval) if res.ratio_interval else None,
            "session_creation_s": res.session_creation_s,
            "peak_memory_bytes": res.peak_rss_delta_bytes,
            "memory_method": res.memory_method,
            "times_ms": [t * 1e3 for t in res.times],
            "parameter_bytes": parameter_nbytes(model),
        })
    return rows


def default_threads() -> int:
    """The intra-op thread count onnxruntime uses here when none is set: one per physical core."""
    return physical_cores()


#: A float run shorter than this (median, ms) is timed in :data:`SESSION_PAIRS` pairs of fresh
#: sessions. Measured on the VNNI machine (2 CPUs, other work beside, 2026-11-29;
#: ``python -m benchmarks.session_pairs``): a P-Net-like fully convolutional model on 12x12
#: inputs ran 0.04 or 0.07 ms at 2 threads depending on the session, for the whole life of the
#: session; one pair's int8/fp32 ratio ranged 0.68-1.75 over 12 measurements of the same files,
#: each with a tight interval, and an A/A run of one model in two sessions gave 1.63 [1.51, 1.80]
#: once in six. At 1 thread the spread is smaller (int8/fp32 1.24 [1.14, 1.32] to 1.47 [1.39,
#: 1.57] over six pairs: the verdict holds, the intervals do not overlap). A session's fixed cost
#: is a large share of a run this short only; runs of milliseconds gave no such spread.
SHORT_RUN_MS = 1.0
SESSION_PAIRS = 3


def int8_latency_report(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    threads: int | None = None,
    runs: int = 30,
    time_budget: float | None = 30.0,
    unfused_dequantize: int = 0,
) -> dict[str, Any]:
    """Is ``candidate`` (int8) slower than ``reference`` (float) at ``threads`` threads, and why?

    Latency is measured interleaved (at most ``runs`` rounds, ``time_budget`` seconds; short runs
    in :data:`SESSION_PAIRS` pairs of fresh sessions, pooled, see
    :data:`SHORT_RUN_MS`: the report's ``session_ratios``); when the int8 model is slower, both
    models are profiled by op type at the same thread count and
    :func:`onnxcomp.measure.latency.explain_int8_latency` names the op types that cost the time.
    """
    threads = threads or default_threads()
    feeds = list(feeds)[:8]

    def measured(seed: int) -> list[dict[str, Any]]:  # the further pairs' runs are short: 50 ms warm them
        return bench_models([("float", reference), ("int8", candidate)], feeds, threads=threads, runs=runs,
                            time_budget=time_budget, warmup_runs=3, warmup_seconds=0.05 if seed else 0.2, seed=seed)

    pairs = [measured(0)]
    if pairs[0][0]["median_ms"] < SHORT_RUN_MS:
        pairs += [measured(seed) for seed in range(1, SESSION_PAIRS)]
    rows = pairs[0] if len(pairs) == 1 else _pooled(pairs)
    report = explain_rows(reference, candidate, rows, feeds, threads, unfused_dequantize=unfused_dequantize)
    if len(pairs) > 1:
        report["session_ratios"] = [p[1]["ratio_to_first"] for p in pairs]
        each = ", ".join(f"{r:.2f}" for r in report["session_ratios"])
        # two pairs whose intervals do not overlap: the sessions, not the runs, made the spread
        intervals = [p[1]["ratio_ci95"] for p in pairs]
        spread = max(lo for lo, _ in intervals) > min(hi for _, hi in intervals)
        report["session_spread"] = spread
        report["summary"] += f"; pooled over {len(pairs)} pairs of fresh sessions (ratios {each})" + (
            f": a float run of {rows[0]['median_ms']:.3f} ms at {threads} thread(s) varies from one session to the "
            "next more than one pair's interval shows" + ("; --threads 1 times the kernels alone" if threads > 1 else "")
            if spread else "")
    return report


def _pooled(pairs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Two :func:`bench_models` rows (float, int8) pooling several measurements, each of its own
    sessions: medians over every run, the ratio's interval from
    :func:`~onnxcomp.measure.stats.sessions_ratio_ci` (measurements and rounds resampled)."""
    from onnxcomp.measure.stats import sessions_ratio_ci

    times = [[np.asarray(p[i]["times_ms"]) for p in pairs] for i in (0, 1)]
    ratio, lo, hi = sessions_ratio_ci(list(zip(*times)))
    rows = [{**pairs[0][i], "runs": sum(t.size for t in times[i]), "times_ms": np.concatenate(times[i]).tolist(),
             "median_ms": float(np.median(np.concatenate(times[i])))} for i in (0, 1)]
    rows[1].update(ratio_to_first=ratio, ratio_ci95=[lo, hi])
    return rows


def explain_rows(reference: ir.Model, candidate: ir.Model, rows: Sequence[dict[str, Any]],
                 feeds: Sequence[dict[str, np.ndarray]], threads: int, *, unfused_dequantize: int = 0) -> dict[str, Any]:
    """:func:`~onnxcomp.measure.latency.explain_int8_latency` of two :func:`bench_models` rows
    (float first, int8 second) measured at ``threads`` threads; both models are profiled by op
    type only when the int8 one is slower."""
    ratio, interval = rows[1]["ratio_to_first"], rows[1]["ratio_ci95"]
    int8_ops: dict[str, float] = {}
    float_ops: dict[str, float] = {}
    if ratio is not None and ratio > 1.0:
        int8_ops = op_type_times(candidate, feeds, threads=threads)
        float_ops = op_type_times(reference, feeds, threads=threads)
    report = explain_int8_latency(ratio, interval, threads, int8_ops, float_ops, unfused_dequantize=unfused_dequantize)
    report["float_median_ms"] = rows[0]["median_ms"]
    report["int8_median_ms"] = rows[1]["median_ms"]
    return report
