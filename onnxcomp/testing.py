"""Numeric checks against onnxruntime, used by onnxcomp's tests and usable for your own passes.

``assert_equivalent`` runs two models on the same feeds with onnxruntime's graph optimizations
both off (``ORT_DISABLE_ALL``: isolates the rewrite under test) and on (``ORT_ENABLE_ALL``: catches
surprises in onnxruntime's own fusions) and compares every output.

Nothing in the ``onnxcomp`` package imports this module; the session helpers live in
:mod:`onnxcomp.runtime` (re-exported here for tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.io import load_model
from onnxcomp.measure.metrics import sqnr_db
from onnxcomp.runtime import OPT_LEVELS, run_model, session_options

__all__ = ["OPT_LEVELS", "session_options", "run_model", "assert_equivalent", "sqnr_db"]


def assert_equivalent(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    optimizations: Sequence[str] = ("disable", "all"),
) -> None:
    """Assert both models give the same outputs (``atol``/``rtol``) at each optimization level.

    The models are anything :func:`onnxcomp.io.load_model` reads (path, bytes, ModelProto, onnx_ir.Model)."""
    reference, candidate = load_model(reference), load_model(candidate)
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
