"""Numeric checks against onnxruntime, used by onnxcomp's tests and usable for your own passes.

``assert_equivalent`` runs two models on the same feeds with onnxruntime's graph optimizations
both off (``ORT_DISABLE_ALL``: isolates the rewrite under test) and on (``ORT_ENABLE_ALL``: catches
surprises in onnxruntime's own fusions) and compares every output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.io import create_session
from onnxcomp.measure.metrics import sqnr_db

__all__ = ["OPT_LEVELS", "session_options", "run_model", "assert_equivalent", "sqnr_db"]

OPT_LEVELS = ("disable", "basic", "extended", "all")


def session_options(optimization: str = "all", threads: int | None = 1):
    """onnxruntime SessionOptions for a graph optimization level name and a thread count."""
    import onnxruntime as ort

    from onnxcomp.measure.latency import GRAPH_OPTIMIZATION_LEVELS as levels

    if optimization not in levels:
        raise ValueError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def run_model(
    model: ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    optimization: str = "all",
) -> list[list[np.ndarray]]:
    """Outputs of ``model`` for each feed: ``result[feed_index][output_index]``."""
    session = create_session(model, sess_options=session_options(optimization))
    return [session.run(None, dict(feed)) for feed in feeds]


def assert_equivalent(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    optimizations: Sequence[str] = ("disable", "all"),
) -> None:
    """Assert both models give the same outputs (``atol``/``rtol``) at each optimization level."""
    for level in optimizations:
        ref_out = run_model(reference, feeds, optimization=level)
        cand_out = run_model(candidate, feeds, optimization=level)
        for i, (r_outs, c_outs) in enumerate(zip(ref_out, cand_out)):
            if len(r_outs) != len(c_outs):
                raise AssertionError(f"feed {i}: {len(r_outs)} outputs vs {len(c_outs)}")
            for j, (r, c) in enumerate(zip(r_outs, c_outs)):
                if r.shape != c.shape:
                    raise AssertionError(f"[{level}] feed {i} output {j}: shape {r.shape} vs {c.shape}")
                np.testing.assert_allclose(
                    c, r, atol=atol, rtol=rtol, err_msg=f"[optimization={level}] feed {i} output {j}"
                )
