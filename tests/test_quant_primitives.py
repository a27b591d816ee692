"""Tests for onnxcomp.quant.primitives: ranges, scale/zero point, (de)quantization, bias, int4, SQNR."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxcomp.measure.metrics import sqnr_db
from onnxcomp.quant.primitives import (
    MIN_SCALE,
    SUPPORTED_QDTYPES,
    compute_scale_zero_point,
    dequantize,
    pack_int4,
    qdtype_info,
    qrange,
    quantize,
    quantize_bias,
    quantize_weight,
    unpack_int4,
)

SETTINGS = settings(max_examples=60, deadline=None)

finite_f32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


def f32_arrays(min_side: int = 1, max_side: int = 6, max_dims: int = 3, elements=finite_f32):
    return hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=min_side, max_side=max_side),
        elements=elements,
    )


def tolerance(scale: np.ndarray, x: np.ndarray, span: int) -> np.ndarray:
    """s/2 plus float32 rounding slack of the division, the float32 scale and the product."""
    s = scale.astype(np.float64)
    return 0.5 * s + s * span * 2.0**-21 + np.abs(x.astype(np.float64)) * 2.0**-21


# ---------------------------------------------------------------- qrange / types


@pytest.mark.parametrize(
    ("name", "symmetric", "reduce", "expected"),
    [
        ("int8", False, False, (-128, 127)),
        ("int8", True, False, (-127, 127)),
        ("uint8", False, False, (0, 255)),
        ("uint8", True, False, (0, 255)),
        ("int4", False, False, (-8, 7)),
        ("int4", True, False, (-7, 7)),
        ("uint4", False, False, (0, 15)),
        ("int16", False, False, (-32768, 32767)),
        ("int16", True, False, (-32767, 32767)),
        ("uint16", False, False, (0, 65535)),
        ("int8", False, True, (-64, 63)),
        ("int8", True, True, (-63, 63)),
        ("uint8", False, True, (0, 127)),
        ("int4", True, True, (-3, 3)),
    ],
)
def test_qrange_table(name, symmetric, reduce, expected):
    assert qrange(name, symmetric, reduce) == expected


def test_qdtype_info_accepts_names_and_dtypes():
    assert qdtype_info("INT8").storage == np.int8
    assert qdtype_info(np.uint8).name == "uint8"
    assert qdtype_info(ml_dtypes.int4).storage == np.int8
    assert qdtype_info(ml_dtypes.uint4).storage == np.uint8
    assert set(SUPPORTED_QDTYPES) == {"int8", "uint8", "int4", "uint4", "int16", "uint16"}
    for bad in ("int32", "float8e4m3fn", np.float32, 3):
        with pytest.raises(ValueError, match="qdtype"):
            qdtype_info(bad)


# ---------------------------------------------------------------- scale / zero point


def test_scale_zero_point_known_values():
    s, z = compute_scale_zero_point(0.0, 2.55, "uint8", symmetric=False)
    assert s.dtype == np.float32 and z.dtype == np.uint8 and s.shape == () and z.shape == ()
    assert s == np.float32(0.01) and z == 0
    s, z = compute_scale_zero_point(-1.28, 1.27, "int8", symmetric=False)
    assert s == np.float32(0.01) and z == 0
    s, z = compute_scale_zero_point(-1.0, 3.0, "uint8", symmetric=False)
    assert s == np.float32(4.0 / 255) and z == 64
    s, z = compute_scale_zero_point(-1.0, 0.5, "int8", symmetric=True)
    assert s == np.float32(1.0 / 127) and z == 0
    s, z = compute_scale_zero_point(-1.0, 0.5, "uint8", symmetric=True)
    assert s == np.float32(1.0 / 127) and z == 128
    s, z = compute_scale_zero_point(-3.5, 7.0, "int4", symmetric=True)
    assert s == np.float32(1.0) and z == 0 and z.dtype == np.int8


def test_range_is_widened_to_include_zero():
    s1, z1 = compute_scale_zero_point(2.0, 3.0, "uint8", False)
    s2, z2 = compute_scale_zero_point(0.0, 3.0, "uint8", False)
    assert s1 == s2 and z1 == z2 == 0
    s, z = compute_scale_zero_point(-3.0, -2.0, "uint8", False)
    assert z == 255 and s == np.float32(3.0 / 255)


@pytest.mark.parametrize("name", SUPPORTED_QDTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_degenerate_range_gives_unit_scale(name, symmetric):
    s, z = compute_scale_zero_point(0.0, 0.0, name, symmetric)
    assert s == 1.0
    info = qdtype_info(name)
    assert z == (0 if (info.signed or not symmetric) else 2 ** (info.bits - 1))
    q = quantize(np.zeros(3, np.float32), s, z, name)
    assert np.all(dequantize(q, s, z) == 0.0)


def test_tiny_range_scale_is_floored():
    s, z = compute_scale_zero_point(0.0, 1e-30, "int8", False)
    assert s == np.float32(MIN_SCALE) and np.isfinite(s)
    x = np.array([0.0, 1e-30, -1e-30], np.float32)
    q = quantize(x, s, z, "int8")
    assert q[0] == z
    s2, _ = compute_scale_zero_point(-1e-40, 1e-40, "uint8", True)
    assert s2 == np.float32(MIN_SCALE)
    # bias scale of two floored scales stays a normal float32
    assert np.float32(MIN_SCALE) * np.float32(MIN_SCALE) >= np.finfo(np.float32).tiny


def test_per_channel_scale_zero_point_arrays():
    rmin = np.array([-1.0, 0.0, 0.0, -2.0])
    rmax = np.array([1.0, 0.0, 5.0, -1.0])
    s, z = compute_scale_zero_point(rmin, rmax, "uint8", False)
    assert s.shape == z.shape == (4,)
    assert s[1] == 1.0 and z[1] == 0
    assert z[3] == 255
    sym_s, sym_z = compute_scale_zero_point(rmin, rmax, "int8", True)
    assert np.all(sym_z == 0)
    np.testing.assert_array_equal(sym_s, np.float32([1 / 127, 1.0, 5 / 127, 2 / 127]))


@pytest.mark.parametrize(
    ("rmin", "rmax", "match"),
    [
        (1.0, 0.5, "rmin must be <= rmax"),
        (np.nan, 1.0, "rmin must be finite"),
        (0.0, np.inf, "rmax must be finite"),
        (-1e308, 1e308, "too wide"),
        (np.zeros(2), np.zeros(3), "do not broadcast"),
    ],
)
def test_scale_zero_point_refusals(rmin, rmax, match):
    with pytest.raises(ValueError, match=match):
        compute_scale_zero_point(rmin, rmax, "int8", False)


# ---------------------------------------------------------------- quantize / dequantize properties


@SETTINGS
@given(
    x=f32_arrays(),
    name=st.sampled_from(SUPPORTED_QDTYPES),
    symmetric=st.booleans(),
    widen=st.floats(min_value=1.0, max_value=4.0),
)
def test_round_trip_error_within_half_step(x, name, symmetric, widen):
    rmin, rmax = float(x.min()) * widen, float(x.max()) * widen
    s, z = compute_scale_zero_point(rmin, rmax, name, symmetric)
    q = quantize(x, s, z, name)
    qmin, qmax = qrange(name, symmetric)
    assert q.dtype == qdtype_info(name).storage
    assert q.min() >= qdtype_info(name).min and q.max() <= qdtype_info(name).max
    err = np.abs(dequantize(q, s, z).astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= tolerance(s, x, qmax - qmin))


@SETTINGS
@given(
    rmin=st.floats(min_value=-1e6, max_value=0.0),
    rmax=st.floats(min_value=0.0, max_value=1e6),
    name=st.sampled_from(SUPPORTED_QDTYPES),
    symmetric=st.booleans(),
)
def test_zero_round_trips_exactly(rmin, rmax, name, symmetric):
    s, z = compute_scale_zero_point(rmin, rmax, name, symmetric)
    assert qrange(name, symmetric)[0] <= int(z) <= qrange(name, symmetric)[1]
    q = quantize(np.zeros(4, np.float32), s, z, name)
    assert np.all(q == z)
    assert np.all(dequantize(q, s, z) == 0.0)


@SETTINGS
@given(
    rmin=st.floats(min_value=-100.0, max_value=-0.01),
    rmax=st.floats(min_value=0.01, max_value=100.0),
    factor=st.floats(min_value=1.5, max_value=1e6),
    name=st.sampled_from(SUPPORTED_QDTYPES),
)
def test_saturation_outside_range(rmin, rmax, factor, name):
    info = qdtype_info(name)
    s, z = compute_scale_zero_point(rmin, rmax, name, symmetric=False)
    x = np.array([rmax * factor, rmin * factor, np.inf, -np.inf], np.float32)
    q = quantize(x, s, z, name)
    assert q.tolist() == [info.max, info.min, info.max, info.min]
    qs = quantize(x, s, z, name, clip_range=(info.min + 1, info.max - 1))
    assert qs.tolist() == [info.max - 1, info.min + 1, info.max - 1, info.min + 1]


def test_round_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    q = quantize(x, np.float32(1.0), np.int8(0), "int8")
    assert q.tolist() == [0, 2, 2, 0, -2, -2]


@SETTINGS
@given(x=f32_arrays(max_dims=4), data=st.data(), name=st.sampled_from(["int8", "uint8", "int4", "uint16"]))
def test_per_axis_matches_loop(x, data, name):
    axis = data.draw(st.integers(min_value=-x.ndim, max_value=x.ndim - 1))
    n = x.shape[axis]
    rmin = np.array(data.draw(st.lists(st.floats(-50, 0), min_size=n, max_size=n)))
    rmax = np.array(data.draw(st.lists(st.floats(0, 50), min_size=n, max_size=n)))
    s, z = compute_scale_zero_point(rmin, rmax, name, symmetric=False)
    q = quantize(x, s, z, name, axis=axis)
    y = dequantize(q, s, z, axis=axis)
    for c in range(n):
        xc = np.take(x, c, axis=axis)
        qc = quantize(xc, s[c], z[c], name)
        np.testing.assert_array_equal(np.take(q, c, axis=axis), qc)
        np.testing.assert_array_equal(np.take(y, c, axis=axis), dequantize(qc, s[c], z[c]))


@SETTINGS
@given(x=f32_arrays(max_side=9), data=st.data(), name=st.sampled_from(["int8", "uint8", "int4", "uint4"]))
def test_blocked_matches_loop(x, data, name):
    axis = data.draw(st.integers(min_value=0, max_value=x.ndim - 1))
    block = data.draw(st.integers(min_value=1, max_value=5))
    symmetric = data.draw(st.booleans())
    q, s, z = quantize_weight(x, name, axis=axis, symmetric=symmetric, block_size=block)
    nblocks = -(-x.shape[axis] // block)
    assert s.shape == x.shape[:axis] + (nblocks,) + x.shape[axis + 1 :]
    y = dequantize(q, s, z, axis=axis, block_size=block)
    for b in range(nblocks):
        idx = np.arange(b * block, min((b + 1) * block, x.shape[axis]))
        xb = np.take(x, idx, axis=axis)
        sb = np.take(s, [b], axis=axis)
        zb = np.take(z, [b], axis=axis)
        # reference: element-wise with the block's parameters broadcast
        ref_q = np.clip(
            np.rint(xb / sb).astype(np.float64) + zb, qdtype_info(name).min, qdtype_info(name).max
        ).astype(q.dtype)
        np.testing.assert_array_equal(np.take(q, idx, axis=axis), ref_q)
        ref_y = ((ref_q.astype(np.int64) - zb).astype(np.float32) * sb).astype(np.float32)
        np.testing.assert_array_equal(np.take(y, idx, axis=axis), ref_y)
    qmin, qmax = qrange(name, symmetric)
    assert q.min() >= qmin and q.max() <= qmax


def test_blocked_uses_ceil_blocks():
    x = np.arange(10, dtype=np.float32).reshape(2, 5) - 3
    q, s, z = quantize_weight(x, "int8", axis=1, block_size=2)
    assert s.shape == (2, 3)
    np.testing.assert_allclose(dequantize(q, s, z, axis=1, block_size=2), x, atol=float(s.max()) / 2)
    with pytest.raises(ValueError, match="blocked layout"):
        dequantize(q, s[:, :2], z[:, :2], axis=1, block_size=2)


# ---------------------------------------------------------------- quantize_weight


@SETTINGS
@given(w=f32_arrays(max_dims=3), symmetric=st.booleans(), name=st.sampled_from(SUPPORTED_QDTYPES))
def test_quantize_weight_per_channel(w, symmetric, name):
    q, s, z = quantize_weight(w, name, axis=0, symmetric=symmetric)
    assert s.shape == z.shape == (w.shape[0],)
    if symmetric and qdtype_info(name).signed:
        assert np.all(z == 0)
    qmin, qmax = qrange(name, symmetric)
    assert q.min() >= qmin and q.max() <= qmax
    y = dequantize(q, s, z, axis=0)
    bshape = (-1,) + (1,) * (w.ndim - 1)
    assert np.all(np.abs(y.astype(np.float64) - w) <= tolerance(s.reshape(bshape), w, qmax - qmin))


def test_quantize_weight_per_tensor_and_refusals():
    w = np.array([[-1.0, 0.25], [0.5, 2.0]], np.float32)
    q, s, z = quantize_weight(w, "int8")
    assert s.shape == () and z == 0 and s == np.float32(2.0 / 127)
    assert q.tolist() == [[-64, 16], [32, 127]]
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(np.array([1.0, np.nan]), "int8")
    with pytest.raises(ValueError, match="empty"):
        quantize_weight(np.zeros((0, 3)), "int8")
    with pytest.raises(ValueError, match="requires an axis"):
        quantize_weight(w, "int8", block_size=2)
    with pytest.raises(ValueError, match="block_size"):
        quantize_weight(w, "int8", axis=0, block_size=0)
    with pytest.raises(ValueError, match="axis=2"):
        quantize_weight(w, "int8", axis=2)


def test_quantize_dequantize_refusals():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([np.nan], np.float32), 1.0, 0, "int8")
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        quantize(x, 0.0, 0, "int8")
    with pytest.raises(ValueError, match="per-tensor"):
        quantize(x, np.ones(3, np.float32), np.zeros(3, np.int8), "int8")
    with pytest.raises(ValueError, match="length 3"):
        quantize(x, np.ones(2, np.float32), np.zeros(2, np.int8), "int8", axis=1)
    with pytest.raises(ValueError, match="zero_point values"):
        quantize(x, 1.0, np.int16(300), "uint8")
    with pytest.raises(ValueError, match="clip_range"):
        quantize(x, 1.0, 0, "int4", clip_range=(-9, 7))
    with pytest.raises(ValueError, match="integer array"):
        dequantize(x, 1.0, 0)


# ---------------------------------------------------------------- bias


def test_quantize_bias_per_tensor_and_per_channel():
    bias = np.array([0.5, -1.0, 0.0], np.float32)
    r = quantize_bias(bias, np.float32(0.1), np.float32(0.01))
    assert r.q.dtype == np.int32 and r.saturated == 0
    assert r.scale == np.float32(0.1) * np.float32(0.01)
    assert r.q.tolist() == [500, -1000, 0]
    ws = np.array([0.01, 0.02, 0.5], np.float32)
    r = quantize_bias(bias, 0.1, ws)
    assert r.scale.shape == (3,)
    np.testing.assert_array_equal(r.scale, np.float32(0.1) * ws)
    assert r.q.tolist() == [500, -500, 0]
    np.testing.assert_allclose(dequantize(r.q, r.scale, None, axis=0), bias, rtol=1e-6)


def test_quantize_bias_saturation_is_reported():
    bias = np.array([1.0, -1.0, 1e-9], np.float32)
    r = quantize_bias(bias, 1e-6, 1e-6)
    assert r.saturated == 2
    assert r.q.tolist()[:2] == [2**31 - 1, -(2**31 - 1)]
    assert r.q[2] == 1000


def test_quantize_bias_refusals():
    with pytest.raises(ValueError, match="underflows"):
        quantize_bias(np.ones(2), 1e-30, 1e-20)
    with pytest.raises(ValueError, match="per-channel"):
        quantize_bias(np.ones(3), 0.1, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="input_scale"):
        quantize_bias(np.ones(2), np.ones(2), 0.1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_bias(np.array([np.inf]), 0.1, 0.1)
    with pytest.raises(ValueError, match="scale must be"):
        quantize_bias(np.ones(2), -0.1, 0.1)


# ---------------------------------------------------------------- int4 packing


@SETTINGS
@given(
    q=hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7), elements=st.integers(-8, 7)),
)
def test_int4_pack_round_trip_and_onnx_layout(q):
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == (q.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, q.shape), q)
    # onnx's own serialisation of an int4 tensor has the same bytes ...
    ref = onh.from_array(q.astype(ml_dtypes.int4), "t")
    assert ref.data_type == onnx.TensorProto.INT4
    assert ref.raw_data == packed.tobytes()
    # ... and onnx reads our bytes back to the same values
    t = oh.make_tensor("t", onnx.TensorProto.INT4, q.shape, packed.tobytes(), raw=True)
    np.testing.assert_array_equal(onh.to_array(t).astype(np.int8), q)


@SETTINGS
@given(
    q=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=2, max_side=9), elements=st.integers(0, 15)),
)
def test_uint4_pack_round_trip_and_onnx_layout(q):
    packed = pack_int4(q)
    np.testing.assert_array_equal(unpack_int4(packed, q.size, signed=False), q.ravel())
    assert onh.from_array(q.astype(ml_dtypes.uint4), "t").raw_data == packed.tobytes()


def test_int4_layout_low_nibble_first():
    assert pack_int4(np.array([1, 2, 3], np.uint8)).tolist() == [0x21, 0x03]
    assert pack_int4(np.array([-1, 7], np.int8)).tolist() == [0x7F]
    assert unpack_int4(np.array([0x8F], np.uint8), 2).tolist() == [-1, -8]


def test_int4_refusals():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([8], np.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(np.array([16], np.uint8))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(np.array([1.0]))
    with pytest.raises(ValueError, match="needs 2"):
        unpack_int4(np.zeros(3, np.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(np.zeros(2, np.int8), 4)


# ---------------------------------------------------------------- SQNR


def test_sqnr_db_of_quantization():
    """SQNR (from onnxcomp.measure.metrics) on hand-computed arrays and an int8 round trip."""
    assert sqnr_db(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(10 * math.log10(2.0))
    assert sqnr_db(np.array([3.0, -4.0]), np.array([3.0, -4.0])) == math.inf
    assert sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert sqnr_db(np.zeros(3), np.array([0.0, 1e-3, 0.0])) == -math.inf
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    q, s, z = quantize_weight(x, "int8", symmetric=False)
    assert 35.0 < sqnr_db(x, dequantize(q, s, z)) < 50.0
    with pytest.raises(ValueError, match="shape"):
        sqnr_db(np.zeros(3), np.zeros((3, 1)))


# ---------------------------------------------------------------- onnxruntime equivalence

_ONNX_TYPES = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}


def _qdq_session(name: str, axis: int | None) -> ort.InferenceSession:
    """x -> QuantizeLinear -> q, q -> DequantizeLinear -> y, scale/zero point as inputs (opset 21)."""
    attrs = {} if axis is None else {"axis": axis}
    graph = oh.make_graph(
        [
            oh.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
            oh.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
        ],
        "qdq",
        [
            oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None),
            oh.make_tensor_value_info("s", onnx.TensorProto.FLOAT, None),
            oh.make_tensor_value_info("z", _ONNX_TYPES[name], None),
        ],
        [
            oh.make_tensor_value_info("q", _ONNX_TYPES[name], None),
            oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
        ],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def qdq_sessions():
    return {(n, a): _qdq_session(n, a) for n in _ONNX_TYPES for a in (None, 1)}


@pytest.mark.parametrize("name", sorted(_ONNX_TYPES))
@pytest.mark.parametrize("axis", [None, 1])
@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    shrink=st.floats(min_value=0.05, max_value=2.0),
    symmetric=st.booleans(),
)
def test_matches_onnxruntime(qdq_sessions, name, axis, x, shrink, symmetric):
    if axis is None:
        rmin, rmax = x.min() * shrink, x.max() * shrink
    else:
        others = tuple(i for i in range(x.ndim) if i != axis)
        rmin, rmax = x.min(axis=others) * shrink, x.max(axis=others) * shrink
    s, z = compute_scale_zero_point(rmin, rmax, name, symmetric)
    q_ref, y_ref = qdq_sessions[(name, axis)].run(None, {"x": x, "s": s, "z": z})
    q = quantize(x, s, z, name, axis=axis)
    np.testing.assert_array_equal(q, q_ref)
    assert q.dtype == q_ref.dtype
    np.testing.assert_array_equal(dequantize(q, s, z, axis=axis), y_ref)


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "uint4", "int16"])
@pytest.mark.parametrize(("axis", "block"), [(None, None), (1, None), (1, 2), (0, 3)])
def test_matches_onnxruntime_blocked_and_4bit(name, axis, block):
    """Blocked and 4-bit variants (zero point as an initializer, compared through the float output)."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(5, 7)) * 3).astype(np.float32)
    x[0, 0] = 40.0  # saturates
    w = np.where(np.abs(x) > 10, 0, x)  # fit the range without the outlier
    if block is not None:
        _, s, z = quantize_weight(w, name, axis=axis, symmetric=False, block_size=block)
    elif axis is not None:
        _, s, z = quantize_weight(w, name, axis=axis, symmetric=False)
    else:
        _, s, z = quantize_weight(w, name, symmetric=False)
    z_onnx = z.astype(getattr(ml_dtypes, name)) if name.endswith("4") else z
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block is not None:
        attrs["block_size"] = block
    graph = oh.make_graph(
        [
            oh.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
            oh.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
        ],
        "qdq",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, x.shape)],
        [onh.from_array(s, "s"), onh.from_array(z_onnx, "z")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (y_ref,) = sess.run(None, {"x": x})
    q = quantize(x, s, z, name, axis=axis, block_size=block)
    np.testing.assert_array_equal(dequantize(q, s, z, axis=axis, block_size=block), y_ref)
    assert q.max() == qdtype_info(name).max  # the outlier saturated
