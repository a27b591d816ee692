"""onnxruntime in one place: session options, sessions on in-memory models, optimized graphs.

Every part of onnxcomp that runs a model goes through here: :func:`session_options` (an
optimization level by name and a thread count), :func:`create_session` (a session on an
``onnx_ir.Model``, built from bytes, or from a temporary file when the model is over the protobuf
limit, see :func:`onnxcomp.io.session_source`), :func:`run_model`, :func:`collect_outputs` (a
model's outputs kept up to a memory bound) and :func:`ort_optimized_model`
(the graph onnxruntime actually runs after its own fusions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.errors import ModelLoadError, RefusedOutputError
from onnxcomp.io import exported_model, first_line, session_source

__all__ = [
    "GRAPH_OPTIMIZATION_LEVELS",
    "OPT_LEVELS",
    "session_options",
    "create_session",
    "open_session",
    "verify_written",
    "run_model",
    "KeptOutputs",
    "collect_outputs",
    "ort_optimized_model",
]

#: onnxruntime graph optimization levels by the names onnxcomp uses.
GRAPH_OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
OPT_LEVELS = tuple(GRAPH_OPTIMIZATION_LEVELS)


def session_options(optimization: str = "all", threads: int | None = 1) -> ort.SessionOptions:
    """onnxruntime SessionOptions for a graph optimization level name and a thread count.

    ``threads=None`` leaves onnxruntime's default (all physical cores).
    """
    if optimization not in GRAPH_OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(OPT_LEVELS)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[optimization]
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 4  # a failed run raises, said in onnxcomp's one error line: no log of its own
    # These sessions compute (calibration, fidelity, checks), they are not timed: without
    # prepacking onnxruntime keeps one copy of each weight instead of two (a 2.25 GiB MatMul weight
    # took 4.6 GiB in a calibration session). Latency sessions (onnxcomp.measure.latency) keep it.
    so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def create_session(
    model: ir.Model,
    *,
    sess_options: ort.SessionOptions | None = None,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    what: str = "the model",
) -> ort.InferenceSession:
    """An ``onnxruntime.InferenceSession`` on ``model``, built in memory when it fits.

    Without ``sess_options``, onnxruntime's defaults, its warnings left out (an initializer also
    listed as a graph input, say, which the commands' notes tell in their own words).

    Raises:
        ModelLoadError: onnxruntime refuses the model (called ``what`` in the message); the message
            carries onnxruntime's reason.
    """
    if sess_options is None:
        sess_options = ort.SessionOptions()
        sess_options.log_severity_level = 3
    with session_source(model) as src:
        try:
            return ort.InferenceSession(src, sess_options=sess_options, providers=list(providers))
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {what}: {first_line(exc)}") from None


def open_session(
    model: ir.Model | str | os.PathLike,
    *,
    sess_options: ort.SessionOptions | None = None,
    what: str = "the model",
) -> ort.InferenceSession:
    """A session on an in-memory model (:func:`create_session`) or on a model file as it is
    (onnxruntime reads the file and its external data itself: nothing is parsed or serialized)."""
    if isinstance(model, ir.Model):
        return create_session(model, sess_options=sess_options, what=what)
    try:
        return ort.InferenceSession(os.fspath(model), sess_options=sess_options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load {what}: {first_line(exc)}") from None


def verify_written(
    path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None,
    *,
    names: list[str] | None = None,
    limit: int | None = 0,
    excused: Callable[[Mapping[str, np.ndarray]], bool] | None = None,
) -> list[list[np.ndarray]] | None:
    """Refuse (:class:`~onnxcomp.errors.RefusedOutputError`) a written model file that onnxruntime
    cannot load as the check loads it, or cannot run on one of ``feeds`` (one feed, or every feed
    in turn; None: only loaded).

    Returns the outputs on every feed (per feed, in the model's order) while they take at most
    ``limit`` bytes (:class:`KeptOutputs`; the default 0 keeps nothing) and the model's outputs
    are ``names`` (when given), else None: the check then need not run the file again.
    ``excused(feed)``: a failed run on a feed for which it is true is no refusal: the runs stop
    there and None is returned (the original itself cannot run a generated feed, say).
    """
    try:
        session = open_session(path, sess_options=session_options("all", threads=None), what="the written model")
    except ModelLoadError as exc:
        raise RefusedOutputError(str(exc)) from None
    if feeds is None:
        return None
    same = names is None or [o.name for o in session.get_outputs()] == list(names)
    kept = KeptOutputs(limit) if same and limit != 0 else None
    for feed in [feeds] if isinstance(feeds, Mapping) else feeds:  # reading a feed may raise DataError
        try:
            values = session.run(None, dict(feed))
        except Exception as exc:
            if excused is not None and excused(feed):
                return None
            raise RefusedOutputError(f"onnxruntime cannot run the written model: {first_line(exc)}") from None
        if kept is not None:
            kept.add(values)
    return kept.values if kept is not None else None


def run_model(
    model: ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    optimization: str = "all",
) -> list[list[np.ndarray]]:
    """Outputs of ``model`` for each feed: ``result[feed_index][output_index]`` (one session)."""
    session = create_session(model, sess_options=session_options(optimization))
    return [session.run(None, dict(feed)) for feed in feeds]


class KeptOutputs:
    """A model's outputs on successive feeds, kept while they take at most ``limit`` bytes (None:
    no limit); :attr:`values` is None once they would take more."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.values: list[list[np.ndarray]] | None = []
        self.nbytes = 0

    def add(self, values: list[np.ndarray]) -> bool:
        """Keep one feed's ``values``; False (and nothing kept any more) once over the limit."""
        if self.values is None:
            return False
        self.nbytes += sum(v.nbytes for v in values)
        if self.limit is not None and self.nbytes > self.limit:
            self.values = None
            return False
        self.values.append(values)
        return True


def collect_outputs(
    session: ort.InferenceSession,
    names: list[str],
    data: Iterable[Mapping[str, np.ndarray]],
    limit: int | None = None,
) -> list[list[np.ndarray]] | None:
    """The outputs ``names`` of ``session`` on every feed of ``data`` (per feed, in order), or None
    as soon as they would take more than ``limit`` bytes (see :class:`KeptOutputs`)."""
    kept = KeptOutputs(limit)
    for feed in data:
        if not kept.add(session.run(names, feed)):
            return None
    return kept.values


def ort_optimized_model(model: ir.Model, *, sess_options: ort.SessionOptions | None = None) -> ir.Model:
    """The graph onnxruntime actually runs: ``model`` after its graph optimizations.

    onnxruntime writes it through ``SessionOptions.optimized_model_filepath`` into a temporary
    folder (see :func:`onnxcomp.io.exported_model`). Use it to check which fused kernels a rewrite
    produced.
    """
    options = sess_options or ort.SessionOptions()

    def export(path: str, data_name: str) -> None:
        options.optimized_model_filepath = path
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        create_session(model, sess_options=options)

    return exported_model(export)
