r"""Numeric core of linear (affine) quantization, in plain numpy.

Everything here is a pure function of its arguments: no global state, no
randomness, no onnx/onnxruntime import.  The conventions are those of the ONNX
``QuantizeLinear`` / ``DequantizeLinear`` operators (opset 21), so a tensor
quantized here and dequantized by onnxruntime (or the other way round) gives the
same integers and the same floats.

Quantized types
---------------
``int8``, ``uint8``, ``int4``, ``uint4``, ``int16``, ``uint16``.  4-bit values
are *stored* one per byte in ``int8`` / ``uint8`` arrays (use :func:`pack_int4`
to get ONNX's two-per-byte layout).  For a ``b``-bit type the integer range used
to *choose* a scale (:func:`qrange`) is

=============  ==============================  ==============================
type           asymmetric                      symmetric
=============  ==============================  ==============================
signed         ``[-2^(b-1), 2^(b-1) - 1]``     ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
unsigned       ``[0, 2^b - 1]``                ``[0, 2^b - 1]`` (zero point at
                                               the midpoint ``2^(b-1)``)
=============  ==============================  ==============================

so symmetric int8 uses ``[-127, 127]``: zero is exact and the grid is
symmetric.  ``reduce_range=True`` uses one bit less (``b - 1`` bits, e.g.
int8 -> ``[-64, 63]``, uint8 -> ``[0, 127]``), for kernels whose int16
accumulators would otherwise overflow.

Scale and zero point
--------------------
Given a real range ``[rmin, rmax]`` (per tensor, or arrays per channel/block),
the range is first widened to contain zero,
``rmin' = min(rmin, 0)``, ``rmax' = max(rmax, 0)``, so that the real value 0.0
is represented exactly by the integer ``zero_point`` (padding, ReLU zeros and
zero-initialised biases then survive quantization unchanged).

* asymmetric: ``scale = (rmax' - rmin') / (qmax - qmin)``,
  ``zero_point = clip(round(qmin - rmin' / scale), qmin, qmax)``.
* symmetric: ``zero_point = ceil((qmin + qmax) / 2)`` (0 for signed types,
  ``2^(b-1)`` for unsigned), ``L = min(qmax - zero_point, zero_point - qmin)``,
  ``scale = max(|rmin'|, |rmax'|) / L``.

Degenerate and tiny ranges:

* ``rmin' == rmax' == 0`` (an all-zero tensor): ``scale = 1.0`` and
  ``zero_point = 0`` (asymmetric, clipped into ``[qmin, qmax]``, i.e. 0 for
  every supported type) or the symmetric midpoint.  Any scale represents zero
  exactly; 1.0 keeps later arithmetic (bias scales, requantization) ordinary.
* otherwise ``scale`` is floored at :data:`MIN_SCALE` ``= 2^-63``.  The floor
  guarantees that ``x / scale`` stays finite for every in-range float32 ``x``
  and that the bias scale ``input_scale * weight_scale`` of two floored
  scales, ``2^-126``, is still a *normal* float32 (no flush-to-zero).  Ranges
  narrower than about ``255 * 2^-63 ~ 2.8e-17`` are therefore represented with
  a coarser grid than they could be; such tensors are numerically zero.

Scales are returned as float32 (the ONNX scale type) and zero points in the
storage dtype of the quantized type.  The zero point is computed from the
float32 scale actually stored.

Quantize / dequantize
---------------------
``q = saturate(round_half_to_even(x / scale) + zero_point)`` with ``x / scale``
computed in float32 (as onnxruntime does) and saturation to the full range of
the quantized type (``[-128, 127]`` for int8, ``[-8, 7]`` for int4, ...), or to
a narrower ``clip_range``.  ``x = (q - zero_point) * scale``, the difference in
integers and the product in float32.

For ``x`` inside the representable range ``[(qmin - zp) * s, (qmax - zp) * s]``
the round-trip error is at most ``s / 2`` (plus float32 rounding); outside it
the value saturates to the end of the range.

Granularity: per tensor (``axis=None``, scalar scale), per axis (``scale`` is
1-D with ``x.shape[axis]`` entries, broadcast along ``axis``), or blocked
(``block_size=B`` along ``axis``: ``scale`` has the rank of ``x`` and the shape
of ``x`` except ``ceil(x.shape[axis] / B)`` along ``axis``; element ``i`` along
``axis`` uses block ``i // B``), exactly as ONNX opset-21 blocked
``DequantizeLinear``.

Bias
----
A bias added to an int32 accumulator of ``(x_q - zp_x) * (w_q - zp_w)`` must be
quantized with ``scale_b = scale_x * scale_w`` (per channel when the weight is),
zero point 0, to int32: ``b_q = round(b / scale_b)``.  When ``|b / scale_b|``
exceeds ``2^31 - 1`` the value is saturated to ``+-(2^31 - 1)`` and the number
of saturated elements is *reported* in the result (:class:`BiasQuantization`)
rather than raised, so that the caller can decide (e.g. widen the weight scale
of the offending channels and retry).

4-bit packing
-------------
ONNX stores int4/uint4 tensors two elements per byte in flattened (C) order:
element ``2k`` in the low nibble of byte ``k`` and element ``2k + 1`` in the
high nibble; an odd element count leaves the last high nibble 0.  Signed
values are stored in two's complement, so the nibble of ``-1`` is ``0xF``.

The SQNR used to judge quantization error is :func:`onnxcomp.measure.metrics.sqnr_db`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from onnxcomp.io import release_pages

__all__ = [
    "MIN_SCALE",
    "SUPPORTED_QDTYPES",
    "QDType",
    "qdtype_info",
    "qrange",
    "compute_scale_zero_point",
    "scale_inside",
    "quantize",
    "dequantize",
    "quantize_weight",
    "blockwise_minmax",
    "BiasQuantization",
    "quantize_bias",
    "pack_int4",
    "unpack_int4",
]

#: Smallest scale :func:`compute_scale_zero_point` returns for a non-degenerate
#: range (see the module docstring for why 2**-63).
MIN_SCALE: float = 2.0**-63

#: Names of the quantized types this module supports.
SUPPORTED_QDTYPES: tuple[str, ...] = ("int8", "uint8", "int4", "uint4", "int16", "uint16")

_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class QDType:
    """Description of a quantized integer type.

    ``name`` is one of :data:`SUPPORTED_QDTYPES`, ``bits`` its width,
    ``signed`` its signedness and ``storage`` the numpy dtype holding one value
    per element (int8/uint8 for the 4-bit types).
    """

    name: str
    bits: int
    signed: bool
    storage: np.dtype

    @property
    def min(self) -> int:
        """Smallest value of the type (saturation bound)."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        """Largest value of the type (saturation bound)."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


_QDTYPES: dict[str, QDType] = {
    "int8": QDType("int8", 8, True, np.dtype(np.int8)),
    "uint8": QDType("uint8", 8, False, np.dtype(np.uint8)),
    "int4": QDType("int4", 4, True, np.dtype(np.int8)),
    "uint4": QDType("uint4", 4, False, np.dtype(np.uint8)),
    "int16": QDType("int16", 16, True, np.dtype(np.int16)),
    "uint16": QDType("uint16", 16, False, np.dtype(np.uint16)),
}


def qdtype_info(qdtype: str | QDType | Any) -> QDType:
    """Return the :class:`QDType` for a type name, numpy dtype or ``QDType``.

    Accepts the names in :data:`SUPPORTED_QDTYPES` (case-insensitive), numpy
    dtypes/types with those names (``np.int8``, ``ml_dtypes.int4``, ...) and
    ``QDType`` instances.  Refuses anything else (e.g. ``"int32"``,
    ``"float8e4m3fn"``) with ValueError.
    """
    if isinstance(qdtype, QDType):
        return qdtype
    if isinstance(qdtype, str):
        name = qdtype.lower()
    else:
        try:
            name = np.dtype(qdtype).name
        except TypeError:
            raise ValueError(
                f"qdtype={qdtype!r} is not a quantized type; expected one of {SUPPORTED_QDTYPES}"
            ) from None
    if name not in _QDTYPES:
        raise ValueError(f"qdtype={qdtype!r} is not supported; expected one of {SUPPORTED_QDTYPES}")
    return _QDTYPES[name]


def qrange(dtype_name: str | QDType | Any, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` used to choose scales for a quantized type.

    Signed symmetric ranges drop the most negative value (int8 -> ``(-127,
    127)``); unsigned symmetric ranges are the full range (the zero point is
    then the midpoint).  ``reduce_range`` uses one bit less.  This is the range
    the scale is fitted to; :func:`quantize` saturates to the full type range
    unless given ``clip_range``.  Refuses unsupported types (ValueError).
    """
    info = qdtype_info(dtype_name)
    bits = info.bits - 1 if reduce_range else info.bits
    if info.signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if symmetric:
            qmin = -qmax
    else:
        qmin, qmax = 0, 2**bits - 1
    return qmin, qmax


def _symmetric_zero_point(qmin: int, qmax: int) -> int:
    return (qmin + qmax + 1) // 2


def compute_scale_zero_point(
    rmin: float | np.ndarray,
    rmax: float | np.ndarray,
    qdtype: str | QDType | Any,
    symmetric: bool,
    reduce_range: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping ``[rmin, rmax]`` onto the type's integer range.

    ``rmin``/``rmax`` are scalars or broadcastable arrays (per channel or per
    block).  The range is widened to include 0, so 0.0 is exactly
    representable; see the module docstring for the formulas and for the
    handling of all-zero ranges (scale 1.0) and tiny ranges (scale floored at
    :data:`MIN_SCALE`).  Returns ``(scale, zero_point)`` as arrays of the
    broadcast shape (0-d for scalars): float32 scale, zero point in the
    storage dtype of ``qdtype``.

    Refuses (ValueError) non-finite bounds, ``rmin > rmax`` anywhere, ranges so
    wide that the scale overflows float32, and unsupported ``qdtype``.
    """
    info = qdtype_info(qdtype)
    qmin, qmax = qrange(info, symmetric, reduce_range)
    lo = np.asarray(rmin, dtype=np.float64)
    hi = np.asarray(rmax, dtype=np.float64)
    if not np.all(np.isfinite(lo)):
        raise ValueError(f"rmin must be finite, got {rmin!r}")
    if not np.all(np.isfinite(hi)):
        raise ValueError(f"rmax must be finite, got {rmax!r}")
    try:
        lo, hi = np.broadcast_arrays(lo, hi)
    except ValueError:
        raise ValueError(f"rmin shape {lo.shape} and rmax shape {hi.shape} do not broadcast") from None
    if np.any(lo > hi):
        bad = np.argwhere(lo > hi)[0]
        raise ValueError(
            f"rmin must be <= rmax; at index {tuple(int(i) for i in bad)} rmin={lo[tuple(bad)]!r} > rmax={hi[tuple(bad)]!r}"
        )
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)

    with np.errstate(over="ignore"):
        if symmetric:
            zp_sym = _symmetric_zero_point(qmin, qmax)
            levels = min(qmax - zp_sym, zp_sym - qmin)
            scale = np.maximum(-lo, hi) / levels
        else:
            scale = (hi - lo) / (qmax - qmin)
    if not np.all(np.isfinite(scale)) or np.any(scale > np.finfo(np.float32).max):
        raise ValueError(
            f"range [{float(lo.min())!r}, {float(hi.max())!r}] is too wide: its scale overflows float32"
        )
    degenerate = scale == 0.0
    scale = np.where(degenerate, 1.0, np.maximum(scale, MIN_SCALE))
    scale32 = scale.astype(np.float32)

    if symmetric:
        zp = np.full(scale32.shape, zp_sym, dtype=np.float64)
    else:
        zp = np.rint(qmin - lo / scale32.astype(np.float64))
        zp = np.where(degenerate, min(max(0, qmin), qmax), zp)
        zp = np.clip(zp, qmin, qmax)
    return np.asarray(scale32, dtype=np.float32), np.asarray(zp, dtype=np.float64).astype(info.storage)


def scale_inside(scale: np.ndarray, zero_point: np.ndarray, lo: float, hi: float,
                 qdtype: str | QDType | Any) -> np.ndarray:
    """The largest scale not above ``scale`` whose saturation range, with ``zero_point``, lies inside
    ``[lo, hi]`` (``lo <= 0 <= hi``): ``scale * (type_min - zero_point) >= lo`` and
    ``scale * (type_max - zero_point) <= hi``, in float32 as onnxruntime computes them.

    QuantizeLinear saturates to the type's full range, so where that range lies inside a Clip's
    ``[lo, hi]``, ``Q(Clip(x, lo, hi)) == Q(x)`` exactly and the Clip can go. A zero point rounded
    to an integer can push the grid past the range it was fitted to by up to half a step; this
    shrinks the scale by at most that much. Refuses (ValueError) ``lo > 0`` or ``hi < 0``.
    """
    if not (lo <= 0.0 <= hi):
        raise ValueError(f"the range [{lo}, {hi}] must contain 0")
    tmin, tmax = qrange(qdtype, symmetric=False)  # the full range QuantizeLinear saturates to
    zp = int(np.asarray(zero_point).reshape(-1)[0])
    s = float(np.asarray(scale, np.float32).reshape(-1)[0])
    if tmin - zp < 0:
        s = min(s, lo / (tmin - zp))
    if tmax - zp > 0:
        s = min(s, hi / (tmax - zp))
    s32 = np.float32(s)
    while s32 > 0 and (np.float32(s32 * np.float32(tmin - zp)) < np.float32(lo)
                       or np.float32(s32 * np.float32(tmax - zp)) > np.float32(hi)):
        s32 = np.nextafter(s32, np.float32(0))
    if s32 <= 0:  # a degenerate [0, 0] range: nothing fits but zero, keep the scale
        return np.asarray(scale, np.float32)
    return np.asarray(s32, np.float32)


def _normalize_axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise ValueError(f"{what} must be an int or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}={axis} is out of range for an array of rank {ndim}")
    return int(axis) % ndim


def _expand_param(
    param: np.ndarray,
    shape: tuple[int, ...],
    axis: int | None,
    block_size: int | None,
    name: str,
) -> np.ndarray:
    """Reshape/expand a scale or zero point so it broadcasts against ``shape``."""
    if block_size is not None:
        if axis is None:
            raise ValueError("block_size requires an axis (blocked quantization is along one axis)")
        if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        ax = _normalize_axis(axis, len(shape))
        dim = shape[ax]
        nblocks = -(-dim // int(block_size))
        expected = shape[:ax] + (nblocks,) + shape[ax + 1 :]
        if param.shape != expected:
            raise ValueError(
                f"{name} shape {param.shape} does not match blocked layout {expected} "
                f"(shape {shape}, axis={axis}, block_size={block_size})"
            )
        return np.repeat(param, int(block_size), axis=ax).take(np.arange(dim), axis=ax)
    if axis is None:
        if param.size != 1:
            raise ValueError(f"{name} has {param.size} elements but axis=None (per-tensor) needs exactly one")
        return param.reshape(())
    ax = _normalize_axis(axis, len(shape))
    if param.ndim != 1 or param.shape[0] != shape[ax]:
        raise ValueError(
            f"{name} shape {param.shape} must be 1-D of length {shape[ax]} for per-axis quantization "
            f"along axis={axis} of shape {shape}"
        )
    bshape = [1] * len(shape)
    bshape[ax] = shape[ax]
    return param.reshape(bshape)


#: Elements per chunk in :func:`quantize` (bounds its scratch memory to ~64 MB).
_CHUNK_ELEMENTS = 1 << 24


def _check_scale(scale: np.ndarray) -> None:
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")


def quantize(
    x: np.ndarray,
    scale: float | np.ndarray,
    zero_point: int | np.ndarray | None,
    qdtype: str | QDType | Any,
    axis: int | None = None,
    block_size: int | None = None,
    clip_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """Quantize ``x`` like ONNX ``QuantizeLinear`` (round half to even, saturate).

    ``q = clip(rint(float32(x) / scale) + zero_point, lo, hi)`` where ``[lo,
    hi]`` is the full range of ``qdtype`` or ``clip_range`` (which must lie
    inside it).  ``axis``/``block_size`` select per-axis or blocked scales (see
    the module docstring); ``zero_point=None`` means 0.  Infinities saturate.
    Returns an array of the storage dtype (int8/uint8 for 4-bit types).

    Refuses (ValueError): NaN in ``x``; non-positive or non-finite scales;
    zero points outside the type range; parameter shapes that do not match the
    granularity; ``clip_range`` outside the type range; unsupported ``qdtype``.
    """
    info = qdtype_info(qdtype)
    x32 = np.asarray(x, dtype=np.float32)
    for sl in _row_chunks(x32) if x32.ndim else [()]:
        if x32[sl].size and np.isnan(np.min(x32[sl])):
            raise ValueError("x contains NaN; NaN has no quantized representation")
        release_pages(x32[sl])
    s = np.asarray(scale, dtype=np.float32)
    _check_scale(s)
    if zero_point is None:
        zp = np.zeros(s.shape, dtype=np.float64)
    else:
        zp = np.asarray(zero_point)
        if zp.dtype.kind not in "iu":
            raise ValueError(f"zero_point must be an integer array, got dtype {zp.dtype}")
        if zp.shape != s.shape:
            raise ValueError(f"zero_point shape {zp.shape} differs from scale shape {s.shape}")
        if zp.size and (zp.min() < info.min or zp.max() > info.max):
            raise ValueError(f"zero_point values must lie in [{info.min}, {info.max}] for {info.name}")
        zp = zp.astype(np.float64)
    lo, hi = info.min, info.max
    if clip_range is not None:
        lo, hi = int(clip_range[0]), int(clip_range[1])
        if not info.min <= lo <= hi <= info.max:
            raise ValueError(f"clip_range={clip_range!r} must satisfy {info.min} <= lo <= hi <= {info.max}")
    s_b = _expand_param(s, x32.shape, axis, block_size, "scale").astype(np.float32)
    zp_b = _expand_param(zp, x32.shape, axis, block_size, "zero_point").astype(np.float32)
    shape = x32.shape
    if x32.ndim == 0:  # a scalar: compute on a 1-element array (in-place ufuncs need arrays)
        x32, s_b, zp_b = x32.reshape(1), s_b.reshape(-1), zp_b.reshape(-1)
    out = np.empty(x32.shape, dtype=info.storage)
    # Work in float32 chunks along axis 0: a 2 GB weight needs one chunk of scratch, not several
    # full-size float64 copies. Exact: rint() gives integral floats, integral values below 2**24
    # add exactly, and anything larger is far outside [lo, hi] and saturates either way.
    rows = x32.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, x32.size // max(rows, 1)))
    for start in range(0, rows, step):
        sl = slice(start, start + step)
        sc = s_b[sl] if s_b.ndim and s_b.shape[0] != 1 else s_b
        zc = zp_b[sl] if zp_b.ndim and zp_b.shape[0] != 1 else zp_b
        with np.errstate(over="ignore"):
            r = np.divide(x32[sl], sc, dtype=np.float32)
        np.rint(r, out=r)
        r += zc
        np.clip(r, lo, hi, out=r)
        out[sl] = r
        release_pages(x32[sl])  # a memory-mapped weight: its float pages are not needed again
    return out.reshape(shape)


def _row_chunks(x: np.ndarray):
    """Slices of about ``_CHUNK_ELEMENTS`` elements along axis 0."""
    rows = x.shape[0] if x.ndim else 1
    step = max(1, _CHUNK_ELEMENTS // max(1, x.size // max(rows, 1)))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _checked_minmax(wa: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of a finite ``wa`` (per slice along ``axis``), read in chunks along axis 0.

    A memory-mapped weight's pages are dropped after each chunk (:func:`onnxcomp.io.release_pages`):
    a 2 GB weight is never resident as a whole, nor is a full-size boolean scratch array made.
    """
    if wa.ndim == 0:
        if not np.isfinite(wa):
            raise ValueError("w contains NaN or Inf; cannot fit a quantization range")
        return wa.min(), wa.max()
    others = tuple(i for i in range(wa.ndim) if i != axis) if axis is not None else None
    lows, highs = [], []
    for sl in _row_chunks(wa):
        chunk = wa[sl]
        if not np.isfinite(chunk).all():
            raise ValueError("w contains NaN or Inf; cannot fit a quantization range")
        lows.append(chunk.min(axis=others))
        highs.append(chunk.max(axis=others))
        release_pages(chunk)
    if axis == 0:
        return np.concatenate(lows), np.concatenate(highs)
    return np.minimum.reduce(lows), np.maximum.reduce(highs)


def dequantize(
    q: np.ndarray,
    scale: float | np.ndarray,
    zero_point: int | np.ndarray | None = None,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """Dequantize like ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` in float32.

    ``q`` is an integer array (4-bit values unpacked, int32 for biases);
    ``axis``/``block_size`` as in :func:`quantize`; ``zero_point=None`` means 0.
    Returns float32.  Refuses (ValueError) non-integer ``q`` or ``zero_point``,
    non-positive or non-finite scales and mismatching parameter shapes.
    """
    qa = np.asarray(q)
    if qa.dtype.kind not in "iu":
        raise ValueError(f"q must be an integer array, got dtype {qa.dtype}")
    s = np.asarray(scale, dtype=np.float32)
    _check_scale(s)
    if zero_point is None:
        zp = np.zeros(s.shape, dtype=np.int64)
    else:
        zp = np.asarray(zero_point)
        if zp.dtype.kind not in "iu":
            raise ValueError(f"zero_point must be an integer array, got dtype {zp.dtype}")
        if zp.shape != s.shape:
            raise ValueError(f"zero_point shape {zp.shape} differs from scale shape {s.shape}")
    s_b = _expand_param(s, qa.shape, axis, block_size, "scale")
    zp_b = _expand_param(zp.astype(np.int64), qa.shape, axis, block_size, "zero_point")
    diff = (qa.astype(np.int64) - zp_b).astype(np.float32)
    return (diff * s_b).astype(np.float32)


def blockwise_minmax(w: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block min and max along ``axis`` (ONNX blocked layout; a short last block is padded
    with zeros, which is harmless because ranges always include 0)."""
    dim = w.shape[axis]
    nblocks = -(-dim // block_size)
    moved = np.moveaxis(w, axis, -1)
    pad = nblocks * block_size - dim
    if pad:
        # Zero padding does not change the range: ranges always include 0.
        moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    blocks = moved.reshape(moved.shape[:-1] + (nblocks, block_size))
    return np.moveaxis(blocks.min(axis=-1), -1, axis), np.moveaxis(blocks.max(axis=-1), -1, axis)


def quantize_weight(
    w: np.ndarray,
    qdtype: str | QDType | Any,
    axis: int | None = None,
    symmetric: bool = True,
    block_size: int | None = None,
    reduce_range: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a weight tensor with scales fitted to its own min/max.

    ``axis=None``: one scale for the tensor (0-d scale/zero point);
    ``axis=k``: one per slice along ``k`` (1-D of length ``w.shape[k]``);
    ``axis=k, block_size=B``: one per block of ``B`` consecutive elements along
    ``k`` (ONNX blocked layout, last block possibly shorter).  Returns
    ``(q, scale, zero_point)`` ready for :func:`dequantize` with the same
    ``axis``/``block_size``.

    Refuses (ValueError): empty or non-finite ``w``, ``block_size`` without
    ``axis``, invalid ``axis``/``block_size``, unsupported ``qdtype``.
    """
    wa = np.asarray(w, dtype=np.float32)
    if wa.size == 0:
        raise ValueError(f"w is empty (shape {wa.shape}); nothing to quantize")
    if block_size is not None:
        if not np.isfinite(wa).all():
            raise ValueError("w contains NaN or Inf; cannot fit a quantization range")
        if axis is None:
            raise ValueError("block_size requires an axis (blocked quantization is along one axis)")
        if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        ax = _normalize_axis(axis, wa.ndim)
        wmin, wmax = blockwise_minmax(wa, ax, int(block_size))
    else:
        wmin, wmax = _checked_minmax(wa, _normalize_axis(axis, wa.ndim) if axis is not None else None)
    scale, zp = compute_scale_zero_point(wmin, wmax, qdtype, symmetric, reduce_range)
    q = quantize(wa, scale, zp, qdtype, axis=axis, block_size=block_size)
    return q, scale, zp


class BiasQuantization(NamedTuple):
    """Result of :func:`quantize_bias`.

    ``q``: int32 values; ``scale``: float32 bias scale (0-d or per channel);
    ``saturated``: number of elements clipped to ``+-(2^31 - 1)`` (0 normally).
    """

    q: np.ndarray
    scale: np.ndarray
    saturated: int


def quantize_bias(
    bias: np.ndarray,
    input_scale: float | np.ndarray,
    weight_scale: float | np.ndarray,
) -> BiasQuantization:
    """Quantize a bias to int32 with scale ``input_scale * weight_scale``, zero point 0.

    ``input_scale`` must be a single value; ``weight_scale`` a single value or
    a 1-D per-channel array whose length equals ``bias.shape[0]`` (the output
    channels), in which case ``bias`` must be 1-D.  The bias scale is the
    float32 product.  Values whose magnitude exceeds ``2^31 - 1`` steps are
    saturated and counted in ``saturated`` (no exception: the caller decides).

    Refuses (ValueError): non-finite ``bias``; non-positive or non-finite
    scales; a product scale that is not a normal float32 (underflow); shape
    mismatches.
    """
    b = np.asarray(bias, dtype=np.float64)
    if not np.isfinite(b).all():
        raise ValueError("bias contains NaN or Inf")
    s_in = np.asarray(input_scale, dtype=np.float32)
    if s_in.size != 1:
        raise ValueError(f"input_scale must be a single value, got shape {s_in.shape}")
    _check_scale(s_in)
    s_w = np.asarray(weight_scale, dtype=np.float32)
    _check_scale(s_w)
    if s_w.size == 1 and s_w.ndim <= 1:
        s_w = s_w.reshape(())
    elif s_w.ndim == 1:
        if b.ndim != 1 or b.shape[0] != s_w.shape[0]:
            raise ValueError(
                f"per-channel weight_scale of length {s_w.shape[0]} needs a 1-D bias of that length, "
                f"got bias shape {b.shape}"
            )
    else:
        raise ValueError(f"weight_scale must be a scalar or 1-D, got shape {s_w.shape}")
    bias_scale = (s_in.reshape(()) * s_w).astype(np.float32)
    if np.any(bias_scale < np.finfo(np.float32).tiny):
        raise ValueError(
            f"bias scale input_scale*weight_scale underflows float32 (min {float(bias_scale.min())!r})"
        )
    r = np.rint(b / bias_scale.astype(np.float64))
    over = np.abs(r) > _INT32_LIMIT
    q = np.clip(r, -_INT32_LIMIT, _INT32_LIMIT).astype(np.int32)
    return BiasQuantization(q, bias_scale, int(over.sum()))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit values two per byte, ONNX layout (low nibble first).

    ``q`` is an integer array: signed dtypes must hold int4 values in
    ``[-8, 7]``, unsigned dtypes uint4 values in ``[0, 15]``.  The array is
    flattened in C order; the result is a 1-D uint8 array of
    ``ceil(q.size / 2)`` bytes (last high nibble 0 when the count is odd).
    Refuses (ValueError) non-integer arrays and out-of-range values.
    """
    qa = np.asarray(q)
    if qa.dtype.kind not in "iu":
        raise ValueError(f"q must be an integer array, got dtype {qa.dtype}")
    flat = qa.ravel().astype(np.int64)
    lo, hi = (-8, 7) if qa.dtype.kind == "i" else (0, 15)
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ValueError(
            f"q values must lie in [{lo}, {hi}] for {'int4' if lo else 'uint4'} packing, "
            f"got [{int(flat.min())}, {int(flat.max())}]"
        )
    nib = (flat & 0x0F).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, dtype=np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int | Sequence[int], signed: bool = True) -> np.ndarray:
    """Inverse of :func:`pack_int4`.

    ``packed`` is a uint8 array (flattened) of ONNX-packed nibbles; ``n`` is
    the element count or the target shape.  Returns int8 values in ``[-8, 7]``
    (two's-complement sign extension) when ``signed``, else uint8 in
    ``[0, 15]``, reshaped to ``n``.  Refuses (ValueError) non-uint8 input, a
    negative count, and a byte count other than ``ceil(count / 2)``.
    """
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise ValueError(f"packed must be uint8, got dtype {p.dtype}")
    shape: tuple[int, ...] = (int(n),) if np.ndim(n) == 0 else tuple(int(d) for d in n)  # type: ignore[arg-type]
    if any(d < 0 for d in shape):
        raise ValueError(f"n={n!r} must not be negative")
    count = math.prod(shape)
    if p.size != (count + 1) // 2:
        raise ValueError(f"packed has {p.size} bytes but n={n!r} needs {(count + 1) // 2}")
    flat = p.ravel()
    nib = np.empty(2 * flat.size, dtype=np.uint8)
    nib[0::2] = flat & 0x0F
    nib[1::2] = flat >> 4
    nib = nib[:count]
    if signed:
        out = nib.astype(np.int8)
        out[out >= 8] -= 16
    else:
        out = nib
    return out.reshape(shape)
