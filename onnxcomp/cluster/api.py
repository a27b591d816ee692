"""``onnxcomp.cluster``: weight clustering on a clone of the model, with a report.

The codebook format with K <= 16 stores UINT4 labels, so the model is upgraded to opset 21 when
it is older (allowed by default, said in the report). Cleanup (BatchNorm fusion) runs first so
that the clustered weights are the ones inference uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from onnxcomp.cluster.passes import CODEBOOK_UINT4_OPSET, ClusterConfig, ClusterPass
from onnxcomp.io import ModelSource, create_session
from onnxcomp.passes.cleanup import CleanupPass
from onnxcomp.graph import working_copy

__all__ = ["cluster", "session_creation_seconds"]


def session_creation_seconds(model: ir.Model, repeats: int = 3) -> float:
    """Fastest of ``repeats`` onnxruntime session creations on ``model`` (default options).

    The minimum, because the first session of a process also pays onnxruntime's one-time setup.
    """
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        create_session(model)
        best = min(best, time.perf_counter() - start)
    return best


def cluster(
    model: ModelSource,
    config: ClusterConfig | None = None,
    *,
    cleanup: bool = True,
    allow_upgrade: bool = True,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Cluster ``model``'s weights; returns the new model and a report (the input is untouched)."""
    config = config or ClusterConfig()
    notes: list[str] = []
    min_opset = CODEBOOK_UINT4_OPSET if config.format == "codebook" and config.k <= 16 else 1
    work = working_copy(model, min_opset, allow_upgrade=allow_upgrade, notes=notes)
    report: dict[str, Any] = {"config": config.to_dict(), "notes": notes}
    if cleanup:
        report["cleanup"] = CleanupPass()(work).stats
    result = ClusterPass(config, progress=progress)(work)
    report.update(result.stats)
    return work, report
