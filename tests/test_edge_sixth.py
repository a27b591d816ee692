"""Sixth-session edge cases of quantize (and its --bias-correction) on odd but valid models, run
from the command line: each test here failed before its fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import make_proto, replace_inspect_run

from onnxcomp import io
from onnxcomp.cluster.passes import ClusterConfig, ClusterPass
from onnxcomp.report import _stage_line
from onnxcomp.runtime import run_model


def _cli(argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxcomp", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum((reference - other) ** 2), 1e-30)))


def _quantize_ok(tmp_path: Path, proto: onnx.ModelProto, x: np.ndarray, extra: list[str]) -> float:
    """Quantize from the CLI (exit 0, no traceback), run the output; its SQNR against the float model."""
    model, data, out = tmp_path / "m.onnx", tmp_path / "cal.npz", tmp_path / "q.onnx"
    onnx.save(proto, model)
    np.savez(data, x=x)
    proc = _cli(["quantize", model, "-o", out, "--calibration", data, "--no-fallback", "--quiet", *extra], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    feeds = [{"x": s} for s in x]
    ref = np.concatenate([r[0] for r in run_model(io.load_model(proto), feeds)])
    got = np.concatenate([r[0] for r in run_model(io.load_model(out), feeds)])
    return _sqnr_db(ref, got)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("weight_shape", [(8,), (2, 8, 6)])
def test_matmul_with_vector_or_batched_weight_quantizes(tmp_path, rng, weight_shape, bias_correction):
    """A MatMul whose weight is a vector ([K]: one output) or batched ([B, K, N]) is valid ONNX.
    Before the fix its weight was quantized per column, which onnxruntime's integer MatMul kernel
    refuses at run time ('b zero point is not valid'): quantize exited 1 after writing an output
    that does not run. With --bias-correction the vector weight was also refused ('8 channels')."""
    w = rng.standard_normal(weight_shape).astype(np.float32)
    x_shape = [1, 8] if len(weight_shape) == 1 else [2, 1, 8]
    y_shape = [1] if len(weight_shape) == 1 else [2, 1, 6]
    proto = make_proto([oh.make_node("Relu", ["x"], ["r"]), oh.make_node("MatMul", ["r", "w"], ["y"])],
                       [("x", x_shape)], [("y", y_shape)], [("w", w)])
    x = rng.standard_normal((16, *x_shape)).astype(np.float32)
    sqnr = _quantize_ok(tmp_path, proto, x, ["--bias-correction"] if bias_correction else [])
    assert sqnr > 25.0, sqnr


@pytest.mark.parametrize("bias_correction", [False, True])
def test_gemm_with_one_broadcast_bias_value_quantizes(tmp_path, rng, bias_correction):
    """A Gemm bias of shape [1] broadcast over the 6 outputs (valid ONNX): the int32 bias of a
    per-channel weight scale raised an internal ValueError (broadcast (6,) to (1,)) before the
    fix; the bias now stays float, and bias correction widens it to one value per channel."""
    proto = make_proto(
        [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Gemm", ["r", "w", "b"], ["y"])],
        [("x", [1, 8])], [("y", [1, 6])],
        [("w", rng.standard_normal((8, 6)).astype(np.float32)), ("b", np.asarray([0.7], np.float32))],
    )
    x = rng.standard_normal((16, 1, 8)).astype(np.float32)
    sqnr = _quantize_ok(tmp_path, proto, x, ["--bias-correction"] if bias_correction else [])
    assert sqnr > 25.0, sqnr


def test_cluster_vector_weight_is_not_scaled_per_weight(tmp_path, rng):
    """A MatMul with a vector weight [256] (one output): each "channel" is one weight, so the
    automatic channel scales gave every weight its own float scale: exact, but the clustered
    tensor was larger than the float one (deep-compression wrote a 1.35x larger file and the
    check passed). Now one codebook per tensor: 16 values, stored smaller."""
    w = rng.standard_normal(256).astype(np.float32)
    proto = make_proto([oh.make_node("MatMul", ["x", "w"], ["y"])], [("x", [1, 256])], [("y", [1])], [("w", w)], opset=18)
    model = io.load_model(proto)
    stats = ClusterPass(ClusterConfig(format="sparse", bits=4, min_elements=128))(model).stats
    assert stats["tensors"]["w"]["granularity"] == "tensor", stats["tensors"]["w"]
    assert stats["totals"]["bytes_after"] < stats["totals"]["bytes_before"] / 4, stats["totals"]
    feeds = [{"x": rng.standard_normal((1, 256)).astype(np.float32)} for _ in range(8)]
    ref = np.concatenate([r[0] for r in run_model(io.load_model(proto), feeds)])
    got = np.concatenate([r[0] for r in run_model(model, feeds)])
    assert _sqnr_db(ref, got) > 15.0


def test_compress_terminal_line_of_the_sparsity_stage(tmp_path, rng):
    """deep-compression's sparsity stage printed an empty line ('sparsity (0.08 s): '): it now
    says how many weights are zero and how many layers were refit, from its statistics."""
    proto = make_proto(
        [oh.make_node("Gemm", ["x", "w1", "b1"], ["a"], transB=1), oh.make_node("Relu", ["a"], ["r"]),
         oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)],
        [("x", [1, 32])], [("y", [1, 10])],
        [("w1", rng.standard_normal((64, 32)).astype(np.float32)), ("b1", rng.standard_normal(64).astype(np.float32)),
         ("w2", rng.standard_normal((10, 64)).astype(np.float32)), ("b2", rng.standard_normal(10).astype(np.float32))],
    )
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((32, 1, 32)).astype(np.float32))
    proc = _cli(["compress", "m.onnx", "-o", "c.onnx", "--recipe", "deep-compression", "--calibration", "cal.npz",
                 "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (stage,) = [s for s in json.loads(proc.stdout)["stages"] if s["stage"] == "sparsity"]
    totals = stage["stats"]["totals"]
    line = _stage_line(stage)
    assert line.startswith(f"2 tensors, {totals['zeros']:,} of 2,688 weights zero"), line
    assert "2 layer(s) refit by least squares" in line, line


def test_onnxruntime_failure_after_writing_names_the_written_file(monkeypatch, capsys, tmp_path, rng):
    """When onnxruntime fails after the output was written (the check running a written model that
    does not run, as a per-column MatMul vector weight did), the one-line error said nothing of the
    file left on disk; it now names it, as an internal error does."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from onnxcomp import cli

    proto = make_proto([oh.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])
    out = tmp_path / "written.onnx"

    def _writes_then_fails(args):
        io.save_model(io.load_model(proto), out)
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code\nsecond line")

    replace_inspect_run(monkeypatch, _writes_then_fails)
    onnx.save(proto, tmp_path / "m.onnx")
    assert cli.main(["inspect", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("onnxcomp: error: onnxruntime cannot run the model: [ONNXRuntimeError]"), err
    assert err.rstrip().endswith(f"written before it: {out}"), err


def test_bias_correction_skips_a_gemm_whose_beta_is_zero(tmp_path, rng):
    """Gemm with beta = 0 ignores its bias: the correction -error / beta divided by zero (a
    RuntimeWarning on the terminal, an int32 bias saturated to +-2^31-1 in the file, the stats
    saying 'corrected'). The node is now skipped with the reason."""
    proto = make_proto(
        [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Gemm", ["r", "w", "b"], ["y"], beta=0.0)],
        [("x", [1, 8])], [("y", [1, 6])],
        [("w", rng.standard_normal((8, 6)).astype(np.float32)), ("b", rng.standard_normal(6).astype(np.float32))],
    )
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((16, 1, 8)).astype(np.float32))
    proc = _cli(["quantize", "m.onnx", "-o", "q.onnx", "--calibration", "cal.npz", "--bias-correction",
                 "--no-fallback", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    stats = json.loads(proc.stdout)["recovery"]["bias_correction"]
    assert stats["corrected"] == 0 and "beta is 0" in next(iter(stats["skipped"].values())), stats
    written = io.load_model(tmp_path / "q.onnx")
    for value in written.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype == np.int32:
            assert np.abs(array.astype(np.int64)).max() < 2**31 - 1, value.name
