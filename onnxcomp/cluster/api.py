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

from onnxcomp.cluster.passes import ClusterConfig, ClusterPass
from onnxcomp.io import ModelSource
from onnxcomp.passes.cleanup import CleanupPass
from onnxcomp.graph import working_copy
from onnxcomp.passes.base import config_argument
from onnxcomp.runtime import create_session
from onnxcomp.stage import Context, Stage, selection_for

__all__ = ["cluster", "ClusterStage", "session_creation_seconds"]


def session_creation_seconds(model: ir.Model, repeats: int = 3, *, what: str = "the model") -> float:
    """Fastest of ``repeats`` onnxruntime session creations on ``model`` (default options).

    The minimum, because the first session of a process also pays onnxruntime's one-time setup.
    ``what`` names the model in the ModelLoadError raised when onnxruntime refuses it.
    """
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        create_session(model, what=what)
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
    config = config_argument(config, ClusterConfig) or ClusterConfig()
    notes: list[str] = []
    work = working_copy(model, ClusterStage.required_opset(config), allow_upgrade=allow_upgrade, notes=notes)
    config = selection_for(work, config, notes)
    report: dict[str, Any] = {"config": config.to_dict(), "notes": notes}
    if cleanup:
        report["cleanup"] = CleanupPass()(work).stats
    report.update(ClusterPass(config, progress=progress)(work).stats)
    return work, report


class ClusterStage(Stage):
    """Weight clustering of the working copy (``[cluster]`` in a recipe)."""

    name = "cluster"
    config_class = ClusterConfig

    @classmethod
    def required_opset(cls, config: ClusterConfig) -> int:
        return ClusterPass.required_opset(config)

    @classmethod
    def needs_data(cls, config: ClusterConfig) -> bool:
        return config.compensate or (config.bits_per_weight is not None and config.sensitivity != "layer")

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:
        hessians = None
        if self.config.compensate:
            from onnxcomp.cluster.passes import cluster_hessians

            hessians = cluster_hessians(work, self.config, ctx.fit_data)
        probe = None
        if self.config.bits_per_weight is not None and self.config.sensitivity != "layer":
            from onnxcomp.cluster.passes import output_probe

            probe = output_probe(work, self.config, ctx.fit_data)
        return ClusterPass(self.config, progress=ctx.progress_for(self.name), hessians=hessians,
                           probe=probe)(work).stats
