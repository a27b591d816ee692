"""A SiLU's input range stops where SiLU is flat on its output's grid (quant.static.narrow_silu_ranges).

A convolution before a SiLU ``x * sigmoid(x)`` writes a long negative tail (YOLOv8n: ``[-187, 181]``
after its second convolution) where SiLU is flat: below about -6 its value is within half a step of
0 on the output's 8-bit grid. The calibrated minimum spent most of the input's 256 levels there.
Its lower bound is now raised to where |SiLU| reaches half an output step: the clamp changes no
value the output grid represents, and the input grid is finer by the share of the range the tail
took (on the layout YOLO of the suite: output SQNR 26.9 -> 29.0 dB on the check's pages).
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
from conftest import make_proto

from onnxcomp import io
from onnxcomp.ops import silu_input
from onnxcomp.quant import static
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.primitives import compute_scale_zero_point, dequantize, quantize as fake_quantize
from onnxcomp.testing import run_model

H = W = 12
CH = 8


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _proto(rng, third_reader: bool = False):
    """Conv -> SiLU -> Conv -> SiLU -> Conv; the first convolution's bias puts half its channels
    deep into SiLU's flat side (a tail to about -60 against about +12 on the positive side), and
    beside it a squeeze-excitation-style gate ``a0 * sigmoid(conv(a0))`` that is no SiLU.
    ``third_reader``: the first convolution's output is also a graph output (not a SiLU's alone)."""
    bias = np.where(np.arange(CH) % 2 == 0, -40.0, 1.0).astype(np.float32)
    nodes = [
        oh.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        oh.make_node("Sigmoid", ["c0"], ["s0"], name="sig0"),
        oh.make_node("Mul", ["c0", "s0"], ["a0"], name="silu0"),
        oh.make_node("Conv", ["a0", "wg"], ["g"], name="gate_conv"),
        oh.make_node("Sigmoid", ["g"], ["sg"], name="gate_sig"),
        oh.make_node("Mul", ["a0", "sg"], ["gated"], name="gate_mul"),
        oh.make_node("Conv", ["gated", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
        oh.make_node("Mul", ["s1", "c1"], ["a1"], name="silu1"),  # x second: the order does not matter
        oh.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2"),
        oh.make_node("Sigmoid", ["c2"], ["y"], name="head"),  # so that conv2 runs int8 (its output is no graph output)
    ]
    outputs = [("y", [1, 4, H, W])] + ([("c0", [1, CH, H, W])] if third_reader else [])
    inits = [
        ("w0", rng.standard_normal((CH, 3, 3, 3)).astype(np.float32) * 2.0),
        ("b0", bias),
        ("wg", rng.standard_normal((CH, CH, 1, 1)).astype(np.float32) * 0.2),
        ("w1", rng.standard_normal((CH, CH, 3, 3)).astype(np.float32) * 0.2),
        ("b1", np.where(np.arange(CH) % 3 == 0, -12.0, 0.5).astype(np.float32)),
        ("w2", rng.standard_normal((4, CH, 1, 1)).astype(np.float32) * 0.3),
    ]
    return make_proto(nodes, [("x", [1, 3, H, W])], outputs, inits, opset=17)


def _feeds(rng, n):
    return [{"x": rng.standard_normal((1, 3, H, W)).astype(np.float32)} for _ in range(n)]


def _sqnr(ref, out):
    return float(10 * np.log10(np.square(ref, dtype=np.float64).sum() / np.square(out - ref, dtype=np.float64).sum()))


def test_silu_inputs_are_found_and_gates_are_not(rng):
    model = io.load_model(_proto(rng))
    found = {v.name: silu_input(v).name for n in model.graph for v in n.outputs if silu_input(v) is not None}
    assert found == {"c0": "silu0", "c1": "silu1"}
    model = io.load_model(_proto(rng, third_reader=True))
    found = {v.name for n in model.graph for v in n.outputs if silu_input(v) is not None}
    assert found == {"c1"}  # c0 is read by the graph output too: not a SiLU's alone


def test_narrowed_floor_is_half_an_output_step_and_exact_on_the_output_grid():
    model = io.load_model(_proto(np.random.default_rng(0)))
    config = QuantizeConfig()
    ranges = {"c0": (-60.0, 12.0), "a0": (-0.28, 12.0), "c1": (-1.0, 5.0), "a1": (-0.28, 5.0)}
    narrowed = static.narrow_silu_ranges(model, ranges, config)
    scale = float(compute_scale_zero_point(-0.28, 12.0, "uint8", False)[0])
    assert abs(scale - 12.28 / 255) < 1e-6
    lo = ranges["c0"][0]
    # SiLU(lo) is half an output step: -0.02408 at lo = -5.410 (bisection to 1e-9)
    assert abs(abs(_silu(lo)) - scale / 2) < 1e-9
    assert abs(lo - -5.4103) < 1e-3, lo
    assert narrowed == {"c0": [-60.0, lo]}
    assert ranges["c0"][1] == 12.0 and ranges["c1"] == (-1.0, 5.0)  # above the floor already: unchanged
    # exact on the output's grid: every x below the floor gives the SiLU output the clamped x gives
    a_scale, a_zp = compute_scale_zero_point(-0.28, 12.0, "uint8", False)
    x = np.linspace(-60.0, lo, 20001, dtype=np.float32)
    on_grid = lambda v: dequantize(fake_quantize(v, a_scale, a_zp, "uint8"), a_scale, a_zp)  # noqa: E731
    assert np.array_equal(on_grid(_silu(x)), on_grid(_silu(np.maximum(x, np.float32(lo)))))
    assert np.all(on_grid(_silu(x)) == 0.0)
    # the input's grid is finer by the share of the range the tail took: 72 / 17.41 = 4.14x
    old = float(compute_scale_zero_point(-60.0, 12.0, "uint8", False)[0])
    new = float(compute_scale_zero_point(lo, 12.0, "uint8", False)[0])
    assert abs(old / new - 72.0 / (12.0 - lo)) < 1e-3 and old / new > 4.0


def test_int8_silu_model_gains_and_the_report_counts_it(rng, monkeypatch):
    """onnxruntime, fused int8: the default against the same quantization without the rule."""
    proto = _proto(rng)
    reference = io.load_model(proto)
    calib, held_out = _feeds(rng, 16), _feeds(rng, 8)
    ref = np.concatenate([o[0] for o in run_model(reference, held_out)])
    narrowed_model, report = quantize(proto, calib, verify=False)
    assert report["calibration"]["silu_narrowed"] == 2, report["calibration"]
    with_rule = _sqnr(ref, np.concatenate([o[0] for o in run_model(narrowed_model, held_out)]))
    monkeypatch.setattr(static, "narrow_silu_ranges", lambda work, ranges, config: {})
    plain_model, plain = quantize(proto, calib, verify=False)
    assert "silu_narrowed" not in plain["calibration"]
    assert plain["int8_nodes"] == report["int8_nodes"]  # the same plan: only two ranges differ
    without = _sqnr(ref, np.concatenate([o[0] for o in run_model(plain_model, held_out)]))
    # measured 31.81 dB against 30.39 (the weights' and the other tensors' noise stay as they were)
    assert with_rule > without + 1.0, (with_rule, without)
    assert with_rule > 31.0, with_rule



def test_auto_judges_every_range_variant_with_the_silu_inputs_narrowed(rng, monkeypatch):
    """``--method auto`` builds the model once per range method and keeps the closest; each build it
    judges has the SiLU inputs narrowed, as the build it writes has (they used to be judged on the
    calibrated tails and narrowed only after the choice)."""
    proto = _proto(rng)
    calib = _feeds(rng, 16)
    seen: list[dict] = []
    original = static.rewrite

    def recording(work, config, plan, ranges, *args, **kwargs):
        seen.append({"c0": ranges["c0"], "c1": ranges["c1"], "a0": ranges["a0"], "a1": ranges["a1"]})
        return original(work, config, plan, ranges, *args, **kwargs)

    monkeypatch.setattr(static, "rewrite", recording)
    quantize(proto, calib, QuantizeConfig(calibration="auto"), verify=False)
    assert len(seen) >= 3, seen  # several variants judged, then the chosen one built
    model, config = io.load_model(proto), QuantizeConfig()
    for ranges in seen:
        # already narrowed: narrowing again changes nothing, and the first convolution's tail
        # (its bias puts half the channels near -40) is gone from every build
        assert static.silu_narrowed(model, ranges, config) == ranges, ranges
        assert -6.5 < ranges["c0"][0] < -3.0, ranges
    assert len({r["c0"] for r in seen}) >= 2  # the floors follow each variant's output grid
