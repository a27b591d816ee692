"""Interleaved latency measurement of in-memory ONNX models with onnxruntime.

Design: a :class:`SessionSpec` is plain data (a name, the serialized
``ModelProto`` bytes and a few session options); this module owns session
creation so that it can time it and watch memory while it happens.  There is
no factory-callable variant: a callable could do arbitrary work outside the
measured window, and plain data is trivially comparable and printable.

Procedure of :func:`measure_latency`, for specs ``S_0 .. S_{m-1}``:

1. For each spec in order: ``gc.collect()``, reset the process's peak-RSS
   mark, read RSS, create the ``InferenceSession`` (wall time with
   ``time.perf_counter_ns`` = ``session_creation_s``), check that the feeds
   match the session's inputs, then warm up: keep running until at least
   ``warmup_runs`` runs AND at least ``warmup_seconds`` have passed, cycling
   through the feeds.  Then read the peak RSS again.
2. Measure in ``runs`` rounds.  Each round runs every model once, in the order
   given by :func:`~onnxcomp.measure.stats.interleaved_schedule` (a random
   permutation per round when ``seed`` is not None), all on the same feed
   ``feeds[round % len(feeds)]``.  Each run is timed alone with
   ``perf_counter_ns`` around ``session.run``.  Slow drift of a shared
   machine thus hits every model alike, and round ``i`` of two models forms a
   pair for the paired bootstrap in :func:`~onnxcomp.measure.stats.ratio_ci`.
   The cyclic garbage collector is disabled during the rounds (as ``timeit``
   does) so collections do not land inside one model's runs.
3. ``time_budget`` (seconds, optional) bounds the measurement phase only: it is
   checked after each complete round, so every model always has the same
   number of runs, between 1 and ``runs``.
4. Per model: :class:`~onnxcomp.measure.stats.LatencySummary` and, for every
   model but the first, ``ratio = median(model) / median(first)`` with a
   bootstrap interval (``< 1`` means faster than the first spec).

Memory (``peak_rss_delta_bytes``): the growth of the process's resident set
during session creation plus warm-up, ``peak_RSS_after - RSS_before``.  On
Linux the kernel's high-water mark ``VmHWM`` is reset first by writing ``5``
to ``/proc/self/clear_refs``, so the peak is that of this window
(``memory_method="vmhwm"``).  If the reset is refused, the retained growth
``VmRSS_after - VmRSS_before`` is reported, a lower bound of the peak
(``"vmrss"``).  Without ``/proc`` the growth of ``getrusage`` ``ru_maxrss``
(a lifetime peak, so again only a lower bound) is used (``"maxrss"``); if
nothing works the value is ``None`` (``"none"``).  Limits: RSS is a whole-
process number, so anything else the process does meanwhile (other threads,
Python allocations) is included; allocators keep freed memory, so a session
created after another may reuse its pages and look smaller; sessions are
created one after another and all kept alive, so each delta is incremental;
memory that is mapped but never touched (e.g. an mmapped file) is not
resident and not counted.  Treat it as a rough, order-dependent proxy.

Thread-pool spinning: onnxruntime's intra-op threads busy-wait for a while
after each run.  With several sessions interleaved, an idle session's
spinning threads would steal CPU from the session being timed, so
``SessionSpec.allow_spinning`` defaults to False.  This makes the numbers
slightly pessimistic compared with a single hot session, but equally so for
every model.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from onnxcomp.errors import OnnxcompError
from onnxcomp.measure.stats import LatencySummary, check_int, interleaved_schedule, ratio_ci, summarize
from onnxcomp.runtime import GRAPH_OPTIMIZATION_LEVELS

__all__ = [
    "GRAPH_OPTIMIZATION_LEVELS",
    "SessionSpec",
    "LatencyResult",
    "MeasurementError",
    "SessionCreationError",
    "measure_latency",
    "latency_session_options",
    "op_type_times",
    "explain_int8_latency",
]


ProgressCallback = Callable[[int, int], object]


class MeasurementError(OnnxcompError, RuntimeError):
    """A model could not be measured; ``spec_name`` names the spec."""

    def __init__(self, spec_name: str, message: str) -> None:
        super().__init__(message)
        self.spec_name = spec_name


class SessionCreationError(MeasurementError):
    """onnxruntime refused to create a session; ``ort_message`` is its message."""

    def __init__(self, spec_name: str, ort_message: str) -> None:
        super().__init__(
            spec_name,
            f"could not create an onnxruntime session for spec {spec_name!r}: {ort_message}",
        )
        self.ort_message = ort_message


@dataclass(frozen=True)
class SessionSpec:
    """One model to measure: a name, serialized ``ModelProto`` bytes and session options.

    * ``threads``: ``intra_op_num_threads`` (None = onnxruntime's default,
      one per physical core);
    * ``graph_optimization``: one of ``"disable"``, ``"basic"``,
      ``"extended"``, ``"all"``;
    * ``providers``: execution providers, CPU by default;
    * ``allow_spinning``: let idle intra-op threads busy-wait (see the module
      docstring for why the default is False).

    Refuses (ValueError naming the field): an empty or non-string ``name``,
    ``model`` that is not non-empty bytes, ``threads < 1``, an unknown
    ``graph_optimization``, and empty ``providers``.  Whether the bytes are a
    valid model is only known when the session is created.
    """

    name: str
    model: bytes = field(repr=False)
    threads: int | None = None
    graph_optimization: str = "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    allow_spinning: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"SessionSpec.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.model, (bytearray, memoryview)):
            object.__setattr__(self, "model", bytes(self.model))
        if not isinstance(self.model, bytes) or not self.model:
            raise ValueError(
                f"SessionSpec.model of spec {self.name!r} must be non-empty bytes "
                f"(a serialized ModelProto), got {type(self.model).__name__}"
            )
        if self.threads is not None:
            bad = isinstance(self.threads, bool) or not isinstance(self.threads, int)
            if bad or self.threads < 1:
                raise ValueError(
                    f"SessionSpec.threads of spec {self.name!r} must be None or an int >= 1, "
                    f"got {self.threads!r}"
                )
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(
                f"SessionSpec.graph_optimization of spec {self.name!r} must be one of "
                f"{sorted(GRAPH_OPTIMIZATION_LEVELS)}, got {self.graph_optimization!r}"
            )
        providers = tuple(self.providers)
        if not providers:
            raise ValueError(f"SessionSpec.providers of spec {self.name!r} is empty")
        object.__setattr__(self, "providers", providers)

    def session_options(self) -> ort.SessionOptions:
        """Build the ``onnxruntime.SessionOptions`` this spec describes."""
        return latency_session_options(self.threads, self.graph_optimization, self.allow_spinning)

    def create_session(self) -> ort.InferenceSession:
        """Create the session; raises :class:`SessionCreationError` on failure."""
        try:
            return ort.InferenceSession(
                self.model, sess_options=self.session_options(), providers=list(self.providers)
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise SessionCreationError(self.name, str(exc).strip()) from exc


def latency_session_options(threads: int | None, optimization: str = "all",
                            allow_spinning: bool = False) -> ort.SessionOptions:
    """SessionOptions of timed sessions: an optimization level, ``threads`` intra-op threads
    (None: onnxruntime's default, one per physical core), spinning as asked (module docstring)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[optimization]
    if threads is not None:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.log_severity_level = 4  # a failed run raises, said in onnxcomp's one error line: no log of its own
    return so


@dataclass(frozen=True)
class LatencyResult:
    """Measurement of one spec; times in seconds.

    ``ratio`` is ``median(this) / median(first spec)`` and ``ratio_interval``
    its bootstrap interval; both are None for the first spec.
    ``peak_rss_delta_bytes`` and ``memory_method`` are described in the
    module docstring.
    """

    name: str
    summary: LatencySummary
    times: tuple[float, ...] = field(repr=False)
    session_creation_s: float
    warmup_runs: int
    warmup_s: float
    peak_rss_delta_bytes: int | None
    memory_method: str
    ratio: float | None
    ratio_interval: tuple[float, float] | None

    @property
    def speedup(self) -> float | None:
        """``1 / ratio`` (> 1 means faster than the first spec); None for the first spec."""
        if self.ratio is None:
            return None
        return math.inf if self.ratio == 0 else 1.0 / self.ratio


# --------------------------------------------------------------------------- memory


def _proc_status_bytes() -> dict[str, int] | None:
    """VmRSS and VmHWM of this process in bytes, or None without /proc."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            out: dict[str, int] = {}
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    parts = value.split()
                    unit = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
                    out[key] = int(parts[0]) * unit
    except (OSError, ValueError, IndexError):
        return None
    return out if "VmRSS" in out else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM for this process (Linux >= 4.0); True on success."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


class _MemoryProbe:
    """Measure RSS growth over a window (see the module docstring)."""

    def __init__(self) -> None:
        self.before: int | None = None
        self.method = "none"

    def start(self) -> None:
        reset = _reset_peak_rss()
        status = _proc_status_bytes()
        if status is not None:
            self.method = "vmhwm" if reset and "VmHWM" in status else "vmrss"
            self.before = status["VmRSS"]
        else:
            self.before = _maxrss_bytes()
            self.method = "maxrss" if self.before is not None else "none"

    def stop(self) -> tuple[int | None, str]:
        if self.before is None:
            return None, "none"
        if self.method in ("vmhwm", "vmrss"):
            status = _proc_status_bytes()
            if status is None:
                return None, "none"
            after = status["VmHWM"] if self.method == "vmhwm" else status["VmRSS"]
        else:
            after = _maxrss_bytes()
            if after is None:
                return None, "none"
        return max(0, after - self.before), self.method


# --------------------------------------------------------------------------- checks


def _nonneg_float(value: object, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{arg} must be finite and >= 0, got {value!r}")
    return out


def _check_feeds_for_session(
    spec_name: str, sess: ort.InferenceSession, feeds: Sequence[Mapping[str, np.ndarray]]
) -> None:
    """Every feed must provide all graph inputs and nothing onnxruntime would reject."""
    required = {i.name for i in sess.get_inputs()}
    known = required | {i.name for i in sess.get_overridable_initializers()}
    for k, feed in enumerate(feeds):
        missing = sorted(required - set(feed))
        unknown = sorted(set(feed) - known)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing inputs {missing}")
            if unknown:
                parts.append(f"unknown inputs {unknown}")
            raise ValueError(
                f"feeds[{k}] does not match the inputs of spec {spec_name!r}: " + "; ".join(parts)
            )


def _run(spec_name: str, sess: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> None:
    try:
        sess.run(None, feed)
    except Exception as exc:
        raise MeasurementError(
            spec_name, f"onnxruntime failed to run {spec_name!r}: {str(exc).strip()}"
        ) from exc


# --------------------------------------------------------------------------- runner


def measure_latency(
    specs: Sequence[SessionSpec],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    warmup_runs: int = 10,
    warmup_seconds: float = 1.0,
    runs: int = 50,
    time_budget: float | None = None,
    seed: int | None = 0,
    progress: ProgressCallback | None = None,
    batch_size: int = 1,
    n_boot: int = 2000,
    confidence: float = 0.95,
) -> list[LatencyResult]:
    """Measure the specs interleaved in rounds; one :class:`LatencyResult` per spec, in order.

    See the module docstring for the procedure.  ``progress(done, total)`` is
    called with ``done = 0`` before the first round and after every round,
    counting measured runs over all models (``total = runs * len(specs)``; if
    ``time_budget`` ends the measurement early the last ``done`` is smaller).
    ``seed`` drives the per-round order (None: fixed order) and the bootstrap
    (None: seed 0).  ``batch_size`` only scales ``items_per_s``.

    Raises :class:`SessionCreationError` (naming the spec and carrying
    onnxruntime's message) when a session cannot be created and
    :class:`MeasurementError` when a run fails; nothing is returned for the
    other specs, the caller decides whether to retry without the failing one.
    Refuses (ValueError naming the argument): empty ``specs`` or ``feeds``,
    duplicate spec names, feeds that are not mappings or do not match a
    model's inputs, ``warmup_runs < 0``, negative ``warmup_seconds``,
    ``runs < 1``, a non-positive ``time_budget``, a non-callable ``progress``.
    """
    specs = list(specs)
    feeds = list(feeds)
    _check_specs_and_feeds(specs, feeds)
    warmup_runs = check_int(warmup_runs, "warmup_runs", 0)
    warmup_seconds = _nonneg_float(warmup_seconds, "warmup_seconds")
    runs = check_int(runs, "runs", 1)
    budget_ns: int | None = None
    if time_budget is not None:
        tb = _nonneg_float(time_budget, "time_budget")
        if tb == 0:
            raise ValueError("time_budget must be > 0 seconds or None")
        budget_ns = int(tb * 1e9)
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable or None, got {type(progress).__name__}")
    batch_size = check_int(batch_size, "batch_size", 1)
    n_boot = check_int(n_boot, "n_boot", 1)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
        0.0 < float(confidence) < 1.0
    ):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")

    warmed = [_create_and_warm(spec, feeds, warmup_runs, int(warmup_seconds * 1e9)) for spec in specs]
    times_ns = _interleaved_rounds(specs, [w.session for w in warmed], feeds, runs, seed, progress, budget_ns)
    return _results(specs, warmed, times_ns, seed=seed, batch_size=batch_size, n_boot=n_boot, confidence=confidence)


def _check_specs_and_feeds(specs: list[SessionSpec], feeds: list[Mapping[str, np.ndarray]]) -> None:
    if not specs:
        raise ValueError("specs is empty; at least one SessionSpec is required")
    for k, spec in enumerate(specs):
        if not isinstance(spec, SessionSpec):
            raise ValueError(f"specs[{k}] must be a SessionSpec, got {type(spec).__name__}")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"specs has duplicate names {dupes}")
    if not feeds:
        raise ValueError("feeds is empty; at least one input feed is required")
    for k, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise ValueError(
                f"feeds[{k}] must be a dict of input name -> array, got {type(feed).__name__}"
            )


@dataclass
class _Warmed:
    """A spec's session after warm-up, with what creating and warming it cost."""

    session: ort.InferenceSession
    creation_s: float
    warmup_runs: int
    warmup_s: float
    memory: tuple[int | None, str]


def _create_and_warm(spec: SessionSpec, feeds: list[Mapping[str, np.ndarray]], warmup_runs: int,
                     warm_ns: int) -> _Warmed:
    """Step 1, one spec at a time: create the session, check the feeds, warm up."""
    gc.collect()
    probe = _MemoryProbe()
    probe.start()
    t0 = time.perf_counter_ns()
    sess = spec.create_session()
    creation_s = (time.perf_counter_ns() - t0) / 1e9
    _check_feeds_for_session(spec.name, sess, feeds)
    done = 0
    w0 = time.perf_counter_ns()
    while done < warmup_runs or time.perf_counter_ns() - w0 < warm_ns:
        _run(spec.name, sess, feeds[done % len(feeds)])
        done += 1
    warm_s = (time.perf_counter_ns() - w0) / 1e9
    return _Warmed(sess, creation_s, done, warm_s, probe.stop())


def _interleaved_rounds(
    specs: list[SessionSpec], sessions: list[ort.InferenceSession], feeds: list[Mapping[str, np.ndarray]],
    runs: int, seed: int | None, progress: ProgressCallback | None, budget_ns: int | None,
) -> list[list[int]]:
    """Step 2: ``runs`` rounds, each spec once per round in a shuffled order, garbage collection
    off; the times of each spec in nanoseconds."""
    m = len(specs)
    schedule = interleaved_schedule(m, runs, seed=seed)
    times_ns: list[list[int]] = [[] for _ in specs]
    total = runs * m
    if progress is not None:
        progress(0, total)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for r in range(runs):
            feed = feeds[r % len(feeds)]
            for i in schedule[r * m : (r + 1) * m]:
                sess = sessions[i]
                t0 = time.perf_counter_ns()
                try:
                    sess.run(None, feed)
                except Exception as exc:
                    raise MeasurementError(
                        specs[i].name,
                        f"onnxruntime failed to run {specs[i].name!r}: {str(exc).strip()}",
                    ) from exc
                t1 = time.perf_counter_ns()
                times_ns[i].append(t1 - t0)
            if progress is not None:
                progress((r + 1) * m, total)
            if budget_ns is not None and time.perf_counter_ns() - start >= budget_ns:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times_ns


def _results(
    specs: list[SessionSpec], warmed: list[_Warmed], times_ns: list[list[int]], *, seed: int | None,
    batch_size: int, n_boot: int, confidence: float,
) -> list[LatencyResult]:
    """Step 3: summaries, and each spec's ratio to the first with its bootstrap interval."""
    boot_seed = 0 if seed is None else seed
    times_s = [np.asarray(t, dtype=np.float64) / 1e9 for t in times_ns]
    results: list[LatencyResult] = []
    for i, spec in enumerate(specs):
        ratio: float | None = None
        interval: tuple[float, float] | None = None
        if i > 0:
            ratio, lo, hi = ratio_ci(
                times_s[0], times_s[i], n_boot=n_boot, confidence=confidence, seed=boot_seed
            )
            interval = (lo, hi)
        rss, method = warmed[i].memory
        results.append(
            LatencyResult(
                name=spec.name,
                summary=summarize(times_s[i], batch_size=batch_size),
                times=tuple(float(t) for t in times_s[i]),
                session_creation_s=warmed[i].creation_s,
                warmup_runs=warmed[i].warmup_runs,
                warmup_s=warmed[i].warmup_s,
                peak_rss_delta_bytes=rss,
                memory_method=method,
                ratio=ratio,
                ratio_interval=interval,
            )
        )
    return results


# ---------------------------------------------------------------------------------------------
# Where the time goes, by op type, and why an int8 model can be slower than its float original


def op_type_times(model, feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int | None,
                  runs: int = 10) -> dict[str, float]:
    """Seconds per run spent in each op type of onnxruntime's optimized graph of ``model``
    (an ``onnx_ir.Model``), at ``threads`` intra-op threads, from onnxruntime's profiler.

    One warm-up run over the first feed is left out; then ``runs`` runs cycle through ``feeds``.
    """
    import json

    from onnxcomp.io import scratch_folder, session_source

    check_int(runs, "runs", 1)
    with scratch_folder() as folder, session_source(model) as src:
        so = latency_session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(folder / "profile")
        session = ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
        for i in range(runs + 1):
            session.run(None, dict(feeds[max(0, i - 1) % len(feeds)]))
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    model_runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first_measured = model_runs[1] if len(model_runs) > 1 else 0
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if event.get("ts", 0) < first_measured:
            continue
        op = event.get("args", {}).get("op_name", "?")
        totals[op] = totals.get(op, 0.0) + event.get("dur", 0) * 1e-6 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def explain_int8_latency(
    ratio: float | None,
    interval: Sequence[float] | None,
    threads: int,
    int8_ops: Mapping[str, float],
    float_ops: Mapping[str, float],
    *,
    unfused_dequantize: int = 0,
) -> dict[str, object]:
    """Whether the int8 model is slower than the float one at ``threads`` threads, and why.

    Args:
        ratio / interval: median latency ratio int8 / float and its 95% interval (measured
            interleaved, :func:`measure_latency`).
        int8_ops / float_ops: seconds per run by op type of each model (:func:`op_type_times`).
        unfused_dequantize: DequantizeLinear nodes left in onnxruntime's int8 graph (each one an
            unfused Q/DQ pair feeding float compute).

    Returns ``int8_slower`` (the median ratio is above 1), ``significant`` (its interval lies
    above 1), ``causes`` (op types that take more time in the int8 model than their float
    counterparts, most first: Q/DQ conversions, int8 kernels slower than the float op they
    replace, float ops that got slower) and ``summary`` (one line).
    """
    from onnxcomp.ops import FLOAT_OP_FUSIONS, INT8_KERNEL_FLOAT_OPS, QDQ_CONVERSION_OPS

    def family(float_op: str) -> tuple[str, ...]:
        return FLOAT_OP_FUSIONS.get(float_op, (float_op,))

    slower = ratio is not None and ratio > 1.0
    significant = bool(slower and interval is not None and interval[0] > 1.0)
    total = sum(int8_ops.values()) or 1.0
    replaced = {f for op in int8_ops if op in INT8_KERNEL_FLOAT_OPS for f in family(INT8_KERNEL_FLOAT_OPS[op])}
    kernels_of: dict[str, list[str]] = {}
    for op in int8_ops:
        if op in INT8_KERNEL_FLOAT_OPS:
            kernels_of.setdefault(INT8_KERNEL_FLOAT_OPS[op], []).append(op)
    causes = []
    for op, seconds in int8_ops.items():
        if op in QDQ_CONVERSION_OPS:
            before, why = 0.0, "Q/DQ conversion: memory-bound, added around the int8 kernels, gains little from threads"
            if op == "DequantizeLinear" and unfused_dequantize:
                why = f"{unfused_dequantize} unfused Q/DQ pair(s): DequantizeLinear feeding float compute"
        elif op in INT8_KERNEL_FLOAT_OPS:
            # the float time of the op (and its fusions), shared among the kernels replacing it
            float_op = INT8_KERNEL_FLOAT_OPS[op]
            kernels = kernels_of[float_op]
            share = seconds / (sum(int8_ops[k] for k in kernels) or 1.0)
            before = share * sum(float_ops.get(f, 0.0) for f in family(float_op))
            why = f"int8 kernel slower than float {float_op}"
        elif op in replaced:
            continue  # what is left float of a partly replaced op type: not comparable
        else:
            before, why = float_ops.get(op, 0.0), "float op slower in the int8 model"
        added = seconds - before
        if added > 0:
            causes.append({"op_type": op, "int8_ms": seconds * 1e3, "float_ms": before * 1e3,
                           "added_ms": added * 1e3, "share": seconds / total, "why": why})
    causes.sort(key=lambda c: -c["added_ms"])
    if ratio is None:
        summary = f"int8 vs float latency at {threads} thread(s): not measured"
    elif slower:
        span = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval is not None else ""
        blame = ", ".join(f"{c['op_type']} (+{c['added_ms']:.2f} ms profiled, {c['why']})" for c in causes[:3])
        # "SLOWER" only where the interval says so: a ratio of 1.03 [0.96, 1.10] is a tie
        verdict = "is SLOWER than" if significant else "is not measurably faster than"
        summary = (f"int8 {verdict} float at {threads} thread(s): latency ratio {ratio:.2f}{span}"
                   + ("" if significant else ", within noise") + (f"; where: {blame}" if blame else ""))
    else:
        span = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval is not None else ""
        tie = interval is not None and interval[1] >= 1.0
        summary = (f"int8 is {'not measurably ' if tie else ''}faster than float at {threads} thread(s): "
                   f"latency ratio {ratio:.2f}{span}" + (", within noise" if tie else ""))
    return {"threads": threads, "ratio": ratio, "ratio_ci95": list(interval) if interval is not None else None,
            "int8_slower": slower, "significant": significant, "causes": causes, "summary": summary}
