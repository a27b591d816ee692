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


#: A first (reference) model running shorter than this (median, ms) is timed in
#: :data:`SESSION_PAIRS` sets of fresh sessions, pooled (:func:`bench_models`: ``onnxcomp bench``,
#: the ``[measure]`` stage and quantize's int8-vs-float line alike). Measured on the VNNI machine (2 CPUs, other work beside, 2026-11-29;
#: ``python -m benchmarks.session_pairs``): a P-Net-like fully convolutional model on 12x12
#: inputs ran 0.04 or 0.07 ms at 2 threads depending on the session, for the whole life of the
#: session; one pair's int8/fp32 ratio ranged 0.68-1.75 over 12 measurements of the same files,
#: each with a tight interval, and an A/A run of one model in two sessions gave 1.63 [1.51, 1.80]
#: once in six. At 1 thread the spread is smaller (int8/fp32 1.24 [1.14, 1.32] to 1.47 [1.39,
#: 1.57] over six pairs: the verdict holds, the intervals do not overlap). A session's fixed cost
#: is a large share of a run this short only; runs of milliseconds gave no such spread.
SHORT_RUN_MS = 1.0
SESSION_PAIRS = 3


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
    pool_short: bool = True,
) -> list[dict[str, Any]]:
    """Interleaved latency of ``models`` (name, model: anything :func:`onnxcomp.io.load_model`
    reads) on ``feeds``; JSON-ready rows.

    When the first model runs shorter than :data:`SHORT_RUN_MS` and there is something to compare
    (``pool_short``, two models or more), it is measured in :data:`SESSION_PAIRS` sets of fresh
    sessions and pooled: medians over every run, each ratio's interval from
    :func:`~onnxcomp.measure.stats.sessions_ratio_ci` (sets and rounds resampled), and each row's
    ``session_ratios`` / ``session_ci95s`` per set. One set's interval resamples rounds only and
    cannot see what a session fixes for its life (see :data:`SHORT_RUN_MS`).
    """
    threads = threads or physical_cores()
    models = [(name, load_model(model)) for name, model in models]
    first = _bench_once(models, feeds, threads=threads, optimization=optimization, runs=runs,
                        time_budget=time_budget, warmup_runs=warmup_runs, warmup_seconds=warmup_seconds,
                        seed=seed, progress=progress)
    if not pool_short or len(models) < 2 or first[0]["median_ms"] >= SHORT_RUN_MS:
        return first
    # the further sets' runs are short too: 50 ms warm them
    sets = [first] + [
        _bench_once(models, feeds, threads=threads, optimization=optimization, runs=runs, time_budget=time_budget,
                    warmup_runs=warmup_runs, warmup_seconds=min(warmup_seconds, 0.05), seed=seed + k, progress=None)
        for k in range(1, SESSION_PAIRS)
    ]
    return _pooled(sets, _batch_size(feeds))


def _batch_size(feeds) -> int:
    """Items per run: the first feed's leading axis (1 without feeds)."""
    return max(int(next(iter(feeds[0].values())).shape[0]) if feeds and feeds[0] else 1, 1)


def _bench_once(models: Sequence[tuple[str, ir.Model]], feeds, *, threads: int, optimization: str, runs: int,
                time_budget: float | None, warmup_runs: int, warmup_seconds: float, seed: int,
                progress) -> list[dict[str, Any]]:
    """One interleaved measurement of ``models``, each in its own fresh session."""
    specs = [
        SessionSpec(name=name, model=model_to_bytes(model), threads=threads, graph_optimization=optimization)
        for name, model in models
    ]
    results = measure_latency(
        specs, list(feeds), warmup_runs=warmup_runs, warmup_seconds=warmup_seconds, runs=runs,
        time_budget=time_budget, seed=seed, progress=progress, batch_size=_batch_size(feeds),
    )
    rows = []
    for (name, model), res in zip(models, results):
        rows.append({
            "name": name,
            **_summary_fields(res.summary),
            "ratio_to_first": res.ratio,
            "ratio_ci95": list(res.ratio_interval) if res.ratio_interval else None,
            "session_creation_s": res.session_creation_s,
            "peak_memory_bytes": res.peak_rss_delta_bytes,
            "memory_method": res.memory_method,
            "times_ms": [t * 1e3 for t in res.times],
            "parameter_bytes": parameter_nbytes(model),
        })
    return rows


def _summary_fields(s) -> dict[str, Any]:
    """A row's run count, times in milliseconds and throughput from a latency summary."""
    return {"runs": s.n, "min_ms": s.min * 1e3, "median_ms": s.median * 1e3, "p90_ms": s.p90 * 1e3,
            "p99_ms": s.p99 * 1e3, "mean_ms": s.mean * 1e3, "throughput_per_s": s.items_per_s}


def default_threads() -> int:
    """The intra-op thread count onnxruntime uses here when none is set: one per physical core."""
    return physical_cores()


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
    rows = bench_models([("float", reference), ("int8", candidate)], feeds, threads=threads, runs=runs,
                        time_budget=time_budget, warmup_runs=3, warmup_seconds=0.2)
    report = explain_rows(reference, candidate, rows, feeds, threads, unfused_dequantize=unfused_dequantize)
    if "session_ratios" in rows[1]:
        report["session_ratios"] = rows[1]["session_ratios"]
        each = ", ".join(f"{r:.2f}" for r in report["session_ratios"])
        spread = rows[1]["session_spread"]
        report["session_spread"] = spread
        report["summary"] += f"; pooled over {len(report['session_ratios'])} pairs of fresh sessions (ratios {each})" + (
            f": a float run of {rows[0]['median_ms']:.3f} ms at {threads} thread(s) varies from one session to the "
            "next more than one pair's interval shows" + ("; --threads 1 times the kernels alone" if threads > 1 else "")
            if spread else "")
    return report


def _pooled(sets: Sequence[Sequence[dict[str, Any]]], batch: int) -> list[dict[str, Any]]:
    """:func:`bench_models` rows pooling several measurements of the same models, each set in its
    own sessions: run counts and medians over every run; each later row's ratio to the first from
    :func:`~onnxcomp.measure.stats.sessions_ratio_ci` (sets and rounds resampled), with each set's
    ratio and interval (``session_ratios``, ``session_ci95s``) and ``session_spread``: two sets
    whose intervals do not overlap, so the sessions, not the runs, made the spread."""
    from onnxcomp.measure.stats import sessions_ratio_ci, summarize

    times = [[np.asarray(one[i]["times_ms"]) for one in sets] for i in range(len(sets[0]))]  # model -> per set
    rows = []
    for i, model_times in enumerate(times):
        pooled = np.concatenate(model_times)
        row = {**sets[0][i], **_summary_fields(summarize(pooled / 1e3, batch_size=batch)),
               "times_ms": pooled.tolist(), "session_sets": len(sets)}
        if i:
            ratio, lo, hi = sessions_ratio_ci(list(zip(times[0], model_times)))
            intervals = [one[i]["ratio_ci95"] for one in sets]
            row.update(ratio_to_first=ratio, ratio_ci95=[lo, hi], session_ratios=[one[i]["ratio_to_first"] for one in sets],
                       session_ci95s=intervals,
                       session_spread=bool(max(a for a, _ in intervals) > min(b for _, b in intervals)))
        rows.append(row)
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
