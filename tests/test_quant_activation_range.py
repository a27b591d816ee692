"""Activation range (``activation_range``): 7-bit activations make 8-bit weights exact on this CPU."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.kernels import int8_gemm_saturates
from onnxcomp.quant.primitives import dequantize, quantize as quantize_array
from onnxcomp.testing import run_model


def _wide_matmul(rng, k=256):
    """x[N,k] @ W with weights near +-1 in every row: per-column int8 weights near 127 meet
    activations near the top of their range, the pairs a saturating u8 x s8 kernel clips."""
    w = (rng.standard_normal((k, 16)) * 0.1 + np.where(np.arange(16) % 2, 1.0, -1.0)).astype(np.float32)
    return make_proto([oh.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["n", k])], [("y", ["n", 16])],
                      [("w", w)])


def _init(model, name):
    return model.graph.initializers[name].const_value.numpy()


def _exact(model, x):
    """The quantized MatMul in float64 from its own integers: dequant(quant(x)) @ dequant(W)."""
    s, z = _init(model, "x_scale"), _init(model, "x_zero_point")
    q = quantize_array(x, s, z, "uint8")
    w = dequantize(_init(model, "w_quantized"), _init(model, "w_scale"), _init(model, "w_zero_point"), axis=1)
    return (dequantize(q, s, z).astype(np.float64) @ w.astype(np.float64)), q


@pytest.mark.parametrize("level", ["disable", "all"])
def test_reduced_activations_with_full_weights_are_exact(rng, level):
    proto = _wide_matmul(rng)
    calib = [{"x": rng.uniform(2.0, 3.0, (4, 256)).astype(np.float32)} for _ in range(8)]
    model, report = quantize(proto, calib, QuantizeConfig(weight_range="full", activation_range="reduced"))
    assert report["onnxruntime"]["int8_kernels"] == 1
    assert np.abs(_init(model, "w_quantized").astype(np.int32)).max() == 127
    # inputs inside the calibrated range (values beyond it still quantize up to 255)
    held = np.concatenate([f["x"] for f in calib])
    ref, q = _exact(model, held)
    assert q.max() <= 127 and q.max() >= 120
    got = run_model(model, [{"x": held}], optimization=level)[0][0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_full_activations_with_full_weights_are_not_exact_where_kernels_saturate(rng):
    """The same reference catches the saturation the reduced activation range avoids."""
    proto = _wide_matmul(rng)
    calib = [{"x": rng.uniform(2.0, 3.0, (4, 256)).astype(np.float32)} for _ in range(8)]
    model, _ = quantize(proto, calib, QuantizeConfig(weight_range="full", activation_range="full"))
    held = np.concatenate([f["x"] for f in calib])
    ref, q = _exact(model, held)
    assert q.max() == 255
    got = run_model(model, [{"x": held}], optimization="all")[0][0]
    error = np.abs(got - ref).max() / np.abs(ref).max()
    if int8_gemm_saturates():
        assert error > 1e-2
    else:
        assert error < 1e-5


def test_cli_accepts_activation_range(tmp_path):
    out = subprocess.run([sys.executable, "-m", "onnxcomp", "quantize", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--activation-range" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "onnxcomp", "quantize", "m.onnx", "-o", str(tmp_path / "o.onnx"),
                          "--activation-range", "half"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


def test_reduced_activations_keep_clip(rng):
    """Clip(0, 1) is not folded into a 7-bit range: its Q still passes values up to 255 steps."""
    w = rng.standard_normal((32, 8)).astype(np.float32)
    lo, hi = np.array(0.0, np.float32), np.array(1.0, np.float32)
    proto = make_proto([oh.make_node("MatMul", ["x", "w"], ["m"]), oh.make_node("Clip", ["m", "lo", "hi"], ["c"]),
                        oh.make_node("MatMul", ["c", "w2"], ["y"])],
                       [("x", ["n", 32])], [("y", ["n", 4])],
                       [("w", w), ("lo", lo), ("hi", hi), ("w2", rng.standard_normal((8, 4)).astype(np.float32))])
    calib = [{"x": rng.standard_normal((16, 32)).astype(np.float32)} for _ in range(4)]
    held = [{"x": rng.standard_normal((64, 32)).astype(np.float32)}]
    from onnxcomp import io
    from onnxcomp.measure.metrics import sqnr_db

    ref = run_model(io.load_model(proto), held)[0][0]
    full, report = quantize(proto, calib, QuantizeConfig(weight_range="full", activation_range="reduced"))
    assert report["onnxruntime"]["int8_kernels"] == 2
    # measured here: 28 dB; folding the Clip into the 7-bit range gives 1 dB
    for level in ("disable", "all"):
        assert sqnr_db(ref, run_model(full, held, optimization=level)[0][0]) >= 24.0
    assert any(n.op_type == "Clip" for n in full.graph)


def test_reduced_range_is_refused_for_int8_activations(rng):
    from onnxcomp.errors import ConfigError

    with pytest.raises(ConfigError, match="uint8"):
        QuantizeConfig(activation_type="int8", activation_range="reduced").validate()
