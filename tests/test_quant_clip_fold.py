"""A constant Clip read only by int8 nodes folds into its input's Q/DQ (the outlier split's clamp).

onnxruntime drops a Clip before a QuantizeLinear only when the grid's saturation range lies inside
the Clip's bounds (to float epsilon); a zero point rounded to an integer puts it half a step outside
on one side about half of the time, and the Clip then runs as a separate float op. The static plan
keeps the grid inside the bounds and drops the Clip itself, which is exact.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto
from test_quant_outliers import _feeds, _ffn

from onnxcomp import io
from onnxcomp.io import clone_model
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.primitives import compute_scale_zero_point, scale_inside
from onnxcomp.testing import assert_equivalent

F32 = np.float32


def _saturation(scale, zp, lo_type=0, hi_type=255):
    s = np.float32(scale)
    return float(np.float32(s * np.float32(lo_type - int(zp)))), float(np.float32(s * np.float32(hi_type - int(zp))))


def test_scale_inside_keeps_the_grid_inside_and_gives_up_at_most_half_a_step():
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(2000):
        lo, hi = -rng.uniform(0.0, 2.0), rng.uniform(0.1, 30.0)
        scale, zp = compute_scale_zero_point(lo, hi, "uint8", False)
        low, high = _saturation(scale, zp)
        tight = scale_inside(scale, zp, lo, hi, "uint8")
        t_low, t_high = _saturation(tight, zp)
        assert t_low >= np.float32(lo) and t_high <= np.float32(hi)
        # half a step over on one side, spread over the steps on that side of the zero point
        steps = min(k for k in (int(zp), 255 - int(zp)) if k > 0)
        assert tight <= scale and tight >= scale * (1 - 0.5 / steps - 1e-6)
        moved += low < np.float32(lo) or high > np.float32(hi)
    assert moved > 200  # the rounded zero point pushes the grid outside often: the case is real
    with pytest.raises(ValueError, match="contain 0"):
        scale_inside(np.float32(0.1), np.uint8(0), 0.5, 3.0, "uint8")
    s, z = compute_scale_zero_point(-3.0, 2.0, "int8", False)
    lo_s, hi_s = _saturation(scale_inside(s, z, -3.0, 2.0, "int8"), z, -128, 127)
    assert lo_s >= -3.0 and hi_s <= 2.0


def _clip_bounds(quantized_split_report):
    entry = next(iter(quantized_split_report["recovery"]["outliers"]["split"].values()))
    return entry["range"]


def _with_clip_back(model: ir.Model, src: str, lo: float, hi: float) -> ir.Model:
    """The quantized model with Clip(src, lo, hi) put back in front of src's QuantizeLinear."""
    work = clone_model(model)
    q = next(n for n in work.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == src)
    lo_v = ir.Value(name="back_lo", const_value=ir.tensor(np.asarray(lo, F32)))
    hi_v = ir.Value(name="back_hi", const_value=ir.tensor(np.asarray(hi, F32)))
    for v in (lo_v, hi_v):
        work.graph.register_initializer(v)
    clip = ir.node("Clip", [q.inputs[0], lo_v, hi_v], name="back_clip")
    clip.outputs[0].name = "back_clip_out"
    clip.outputs[0].dtype = ir.DataType.FLOAT
    work.graph.insert_before(q, clip)
    q.replace_input_with(0, clip.outputs[0])
    return work


def test_the_split_clamp_goes_into_the_quantize_and_the_result_is_unchanged(rng):
    model = _ffn(rng)
    calib = _feeds(rng, 24)
    quantized, report = quantize(model, calib, QuantizeConfig(split_outliers=True))
    lo, hi = _clip_bounds(report)
    assert lo < 0.0 < hi
    assert not any(n.op_type == "Clip" for n in quantized.graph)  # folded, not left to onnxruntime
    q = next(n for n in quantized.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "h")
    scale, zp = q.inputs[1].const_value.numpy(), q.inputs[2].const_value.numpy()
    low, high = _saturation(scale, zp)
    assert lo <= low and high <= hi
    # the float correction still reads the unclamped input
    gather = next(n for n in quantized.graph if n.op_type == "Gather")
    assert gather.inputs[0].name == "h"
    # exact against the same int8 graph with the Clip put back, on feeds that leave the range: an
    # ordinary channel far above the top, another far below the bottom
    held_out = _feeds(rng, 6)
    for f in held_out:
        f["h"][..., 3] = 4 * hi
        f["h"][..., 11] = 4 * lo - 1.0
    assert_equivalent(_with_clip_back(quantized, "h", lo, hi), quantized, held_out, atol=1e-5)
    ops = report["onnxruntime"]
    assert ops["int8_by_op"] == {"MatMulIntegerToFloat": 1} and "Clip" not in ops["float_by_op"]


def test_dynamic_mode_keeps_the_clamp(rng):
    """Dynamic quantization takes its range from the data at run time: the Clip is what bounds it."""
    model = _ffn(rng)
    quantized, _ = quantize(model, _feeds(rng, 24), QuantizeConfig(mode="dynamic", split_outliers=True))
    assert sum(n.op_type == "Clip" for n in quantized.graph) == 1


def _clip_then(rng, lo, hi, second_reader):
    """x -> Clip(lo, hi) -> MatMul; optionally a second MatMul reads x directly."""
    nodes = [oh.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clamp"),
             oh.make_node("MatMul", ["c", "w"], ["y"], name="mm")]
    outs = [("y", ["N", 8])]
    if second_reader:
        nodes.append(oh.make_node("MatMul", ["x", "w2"], ["y2"], name="mm_raw"))
        outs.append(("y2", ["N", 8]))
    inits = [("lo", np.asarray(lo, F32)), ("hi", np.asarray(hi, F32)),
             ("w", (rng.standard_normal((32, 8)) * 0.3).astype(F32)),
             ("w2", (rng.standard_normal((32, 8)) * 0.3).astype(F32))]
    return io.load_model(make_proto(nodes, [("x", ["N", 32])], outs, inits))


@pytest.mark.parametrize("lo,hi,second_reader,folds", [
    (-1.0, 2.0, False, True),   # the clamp alone before an int8 MatMul
    (-1.0, 2.0, True, False),   # an int8 reader of the unclamped input would read the clamped grid
    (0.5, 2.0, False, False),   # a range without 0: an asymmetric grid always holds 0
])
def test_which_clips_fold(rng, lo, hi, second_reader, folds):
    model = _clip_then(rng, lo, hi, second_reader)
    feeds = [{"x": (rng.standard_normal((4, 32)) * 2).astype(F32)} for _ in range(16)]
    quantized, report = quantize(model, feeds, QuantizeConfig())
    assert report["onnxruntime"]["int8_by_op"].get("MatMulIntegerToFloat", 0) >= 1
    assert any(n.op_type == "Clip" for n in quantized.graph) is not folds
    if folds:
        q = next(n for n in quantized.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x")
        low, high = _saturation(q.inputs[1].const_value.numpy(), q.inputs[2].const_value.numpy())
        assert lo <= low and high <= hi
        out_of_range = [{"x": (rng.standard_normal((4, 32)) * 6).astype(F32)} for _ in range(4)]
        assert_equivalent(_with_clip_back(quantized, "x", lo, hi), quantized, out_of_range, atol=1e-5)
