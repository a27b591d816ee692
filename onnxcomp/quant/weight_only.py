r"""Weight-only and dynamic quantization of MatMul / Gemm (and, on request, Conv) weights.

Two modes of :func:`onnxcomp.quant.api.quantize`, neither of which needs calibration data. Given
some, the integers are chosen by error-compensating rounding (GPTQ, :mod:`onnxcomp.quant.gptq`:
``config.rounding``, by default for 4-bit weight-only) on exactly the grids and scales below;
without, by round-to-nearest:

**weight-only** (:func:`quantize_weight_only_mode`): the constant weight of a MatMul or Gemm is
stored as 4- or 8-bit integers with one float32 scale per block of ``block_size`` consecutive
elements along the reduction axis K; activations stay float. Two output formats:

* ``qdq`` (:class:`WeightOnlyQDQPass`, opset 21): the weight becomes
  ``DequantizeLinear(w_q, scale, axis=<K axis>, block_size=B)`` (standard ONNX blocked
  quantization, ``INT4``/``INT8`` initializers, no zero point: it defaults to 0). Every quantized
  weight is stored ``[K, N]`` and blocked along axis 0 (scale ``[ceil(K/B), N]``): a MatMul
  weight ``W[K, N]`` as it is, a Gemm weight with ``transB=1`` (``B[N, K]``, K along axis 1)
  transposed, see below. When K is not a multiple of B the last
  block is shorter (ONNX's rule: element ``i`` uses block ``i // B``, the scale tensor has
  ``ceil(K/B)`` entries along the axis); its scale is fitted to the elements it really holds.
  onnxruntime (``ORT_ENABLE_ALL``) fuses ``DequantizeLinear -> MatMul`` into its
  ``MatMulNBits`` kernel when the quantized initializers feed a single DequantizeLinear, and then
  (by default, session option ``session.qdq_matmulnbits_accuracy_level`` = 4) quantizes the
  *activations* to int8 blockwise inside the kernel; set that option to 0 for float activations.
  A Gemm with ``transB=1`` is rewritten to ``transB=0`` with the transposed quantized weight
  (the same blocks and values as blocking ``B[N, K]`` along axis 1: blocks follow K), because onnxruntime fuses a DequantizeLinear along
  axis 0 into MatMulNBits but not one along axis 1. It still does not fuse a Gemm (or a 2-D
  MatMul + bias Add, which it turns into a Gemm) followed by Relu: its Gemm+activation fusion
  runs first and leaves the DequantizeLinear to run at every inference (the ``ort`` format
  writes MatMulNBits itself, so every layer runs it).
* ``ort`` (:class:`MatMulNBitsPass`, 4 bits): each MatMul (and Gemm with ``alpha = beta = 1``)
  becomes onnxruntime's contrib op ``com.microsoft.MatMulNBits(A, B, scales)`` with
  ``B`` uint8 ``[N, ceil(K/B), B/2]`` (codes ``q + 8`` packed low nibble first along K, the padding
  of a short last block filled with code 8, i.e. the value 0), ``scales`` float32
  ``[N * ceil(K/B)]`` and no zero point (the op's default zero point for 4 bits is 8, which is
  exactly our symmetric grid shifted by 8). A Gemm bias ``C`` becomes an ``Add`` after it.
  ``accuracy_level`` is 0 (activations in float, the same math as the ``qdq`` model).

Integer grids (one scale per block, no zero point, 0.0 exact, nothing clips unless ``scale_search``):

* **int4: full signed range [-8, 7]**, ``scale = max(-min / 8, max / 7)`` over the block (``min``
  and ``max`` taken with 0 included). Compared with the narrow symmetric grid [-7, 7]
  (``absmax / 7``) a block whose largest magnitude is negative gets a 8/7 finer step at no
  storage cost, and the grid is exactly onnxruntime's MatMulNBits default (code = q + 8).
* **int8: symmetric [-127, 127]**, ``scale = absmax / 127`` (the range of
  :func:`~onnxcomp.quant.primitives.qrange` for symmetric int8).

**Conv** weights take part in weight-only mode (``qdq`` format only) when ``"Conv"`` is among
``config.op_types`` (``--op-types Conv,MatMul,Gemm``): one scale per output channel (the whole
filter ``[C/group, *kernel]`` is one block, on the same grids) behind ``DequantizeLinear(axis=0)``;
onnxruntime dequantizes them once at session creation (constant folding), so this is a storage
format: the Conv runs in float.

With ``scale_search`` (``mse`` or ``hessian``) a block's scale may be smaller than its range
asks, clipping its extreme values to the grid's ends when that lowers the block's (weighted)
squared error; with ``scale_refit`` (the default) GPTQ's integers keep refitted scales
(onnxcomp.quant.gptq).
Neither changes the format.

An all-zero block gets scale 1.0 (:func:`~onnxcomp.quant.primitives.compute_scale_zero_point`'s
rule). Weight bytes in the report count int4 at 0.5 byte per element (ONNX packs two per byte)
plus 4 bytes per scale.

**dynamic** (:func:`quantize_dynamic_mode`, :class:`DynamicQuantPass`): int8 weights, uint8
activations quantized at run time. Each MatMul / Gemm becomes the standard-ONNX pattern ::

    x_q, x_scale, x_zp = DynamicQuantizeLinear(x)
    y = Cast<float>(MatMulInteger(x_q, W_q, x_zp)) * (x_scale * w_scale)  [+ bias]

which onnxruntime's CPU provider fuses into ``DynamicQuantizeMatMul`` (or
``MatMulIntegerToFloat``). Weights are symmetric int8 ([-127, 127], zero point 0, so the
optional ``b_zero_point`` input is left out), per output column when ``config.per_channel``
(``w_scale`` is then an ``[N]`` vector broadcast along the last axis; MatMulIntegerToFloat
accepts per-column scales) or per tensor. A Gemm weight with ``transB=1`` is stored transposed
(``[K, N]``), ``alpha`` is folded into ``w_scale`` and ``beta`` into the bias. Each node gets
its own DynamicQuantizeLinear; onnxruntime fuses it into ``DynamicQuantizeMatMul``, or, when
several nodes read the same tensor (q/k/v projections), merges the identical
DynamicQuantizeLinear nodes into one that feeds a ``MatMulIntegerToFloat`` per node.

Conv is converted (to ``ConvInteger`` with the same pattern, per-output-channel scales) only when
``"Conv"`` is among the op types dynamic mode converts (``config.op_types``, i.e. ``--op-types``, when
given, else ``config.dynamic_op_types``): onnxruntime runs ConvInteger several times slower
than its float Conv on the CPU provider, so the default leaves convolutions in float.

The analysis (:func:`plan_weight_sites`: which nodes qualify, and why the others do not) is kept
apart from the rewrites (the passes). A weight shared by several nodes is quantized once and its
initializers are shared (in ``qdq`` format one DequantizeLinear feeds all of them; onnxruntime
then keeps that DequantizeLinear and runs the MatMuls in float, which the report notes).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxcomp.errors import ConfigError
from onnxcomp.graph import add_initializer, all_value_names, infer_types, unique_name, working_copy
from onnxcomp.io import initializer_nbytes
from onnxcomp.ops import is_add_node
from onnxcomp.passes.base import CompressionPass
from onnxcomp.passes.cleanup import CleanupPass
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.gptq import Rounder, make_rounder, rounding_report
from onnxcomp.quant.primitives import (
    MIN_SCALE, blockwise_minmax, compute_scale_zero_point, qrange, quantize, quantize_weight,
)
from onnxcomp.quant.qdq import KEEP_FLOAT_KEY, non_constant_weight

__all__ = [
    "QDQ_MIN_OPSET",
    "DYNAMIC_MIN_OPSET",
    "BlockQuantized",
    "quantize_blockwise",
    "search_block_scales",
    "dequantize_blockwise",
    "pack_matmulnbits",
    "WeightSite",
    "WeightPlan",
    "plan_weight_sites",
    "WeightOnlyQDQPass",
    "MatMulNBitsPass",
    "dynamic_op_types",
    "DynamicQuantPass",
    "quantize_weight_only_mode",
    "quantize_dynamic_mode",
    "quantize_weight_only_in_place",
    "quantize_dynamic_in_place",
]

#: Blocked DequantizeLinear and INT4 tensors need opset 21.
QDQ_MIN_OPSET = 21
#: DynamicQuantizeLinear exists since opset 11 (MatMulInteger since 10); MatMulNBits lives in
#: the com.microsoft domain and needs nothing newer.
DYNAMIC_MIN_OPSET = 11
#: INT4 tensors need IR version 10 (the IR version of opset 21).
_QDQ_IR_VERSION = 10
_MS_DOMAIN = "com.microsoft"

_WEIGHT_ONLY_OPS = ("MatMul", "Gemm")
#: Integer grid (qmin, qmax) of weight-only blocks by bits (module docstring).
_GRIDS = {4: (-8, 7), 8: (-127, 127)}
_DYNAMIC_OPS = ("MatMul", "Gemm", "Conv")


# --------------------------------------------------------------------------------------- numerics


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A weight quantized blockwise along ``axis``.

    ``q``: integer values (int8 storage, int4 values in [-8, 7]) with the weight's shape;
    ``scale``: float32, the weight's shape with ``ceil(dim / block_size)`` along ``axis`` (ONNX
    blocked layout).
    """

    q: np.ndarray
    scale: np.ndarray
    axis: int
    block_size: int
    bits: int

    def dequantize(self) -> np.ndarray:
        return dequantize_blockwise(self.q, self.scale, self.axis, self.block_size)


#: Factors :func:`search_block_scales` tries on each block's range scale (1.0 first: kept on a tie).
SCALE_SHRINKS = tuple(1.0 - 0.025 * i for i in range(21))


def search_block_scales(w: np.ndarray, scale: np.ndarray, axis: int, block_size: int, qmin: int, qmax: int,
                        importance: np.ndarray | None = None,
                        shrinks: tuple[float, ...] = SCALE_SHRINKS) -> np.ndarray:
    """Per block, the scale among ``scale * f`` (``f`` in ``shrinks``) whose round-to-nearest error
    ``sum(importance * (w - clip(rint(w / s)) * s)^2)`` over the block is smallest (``importance``:
    ``w``'s shape, e.g. the layer Hessian's diagonal per input feature; None: plain squared error).
    A smaller scale clips the block's extreme values but rounds the others on a finer grid.
    ``scale``: ONNX blocked layout along ``axis`` (as :func:`quantize_blockwise` returns it)."""
    moved = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    imp = np.ones_like(moved) if importance is None else np.moveaxis(np.asarray(importance, np.float64), axis, -1)
    dim = moved.shape[-1]
    nblocks = -(-dim // block_size)
    pad = [(0, 0)] * (moved.ndim - 1) + [(0, nblocks * block_size - dim)]
    blocks = np.pad(moved, pad).reshape(moved.shape[:-1] + (nblocks, block_size))
    weights = np.pad(imp, pad).reshape(blocks.shape)
    base = np.moveaxis(np.asarray(scale, np.float32), axis, -1)
    best, best_err = base.copy(), None
    for f in shrinks:
        s = np.maximum(base * np.float32(f), np.float32(MIN_SCALE)).astype(np.float32)
        sd = s.astype(np.float64)[..., None]
        err = np.sum(weights * (blocks - np.clip(np.rint(blocks / sd), qmin, qmax) * sd) ** 2, axis=-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = np.where(better, s, best)
        best_err = np.where(better, err, best_err)
    return np.ascontiguousarray(np.moveaxis(best, -1, axis), dtype=np.float32)


def quantize_blockwise(w: np.ndarray, axis: int, bits: int, block_size: int, *, scale_search: bool = False,
                       importance: np.ndarray | None = None) -> BlockQuantized:
    """Quantize ``w`` blockwise along ``axis`` on the grids of the module docstring.

    int4: ``scale = max(-min/8, max/7)`` per block, values in [-8, 7]; int8: ``scale =
    absmax/127``, values in [-127, 127]. Rounding and saturation follow ONNX QuantizeLinear
    (:func:`~onnxcomp.quant.primitives.quantize`). Refuses (ValueError) other bit widths and
    non-finite weights. ``scale_search``: each block's scale is then shrunk to the one of
    :func:`search_block_scales` (weighted by ``importance``), clipping the block's extremes when
    that lowers its squared error.
    """
    wa = np.asarray(w, dtype=np.float32)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if wa.size == 0 or not np.isfinite(wa).all():
        raise ValueError("the weight is empty or holds NaN/Inf; it cannot be quantized")
    axis = axis % wa.ndim
    lo, hi = blockwise_minmax(wa, axis, block_size)
    lo = np.minimum(lo, 0.0).astype(np.float64)
    hi = np.maximum(hi, 0.0).astype(np.float64)
    if bits == 4:
        # An all-zero block gets scale 1.0, a tiny one the floor MIN_SCALE (as
        # compute_scale_zero_point does). The float32 rounding of the scale moves the extreme
        # value by far less than half a step, so it still rounds onto -8 or 7: nothing clips.
        raw = np.maximum(-lo / 8.0, hi / 7.0)
        scale = np.where(raw == 0.0, 1.0, np.maximum(raw, MIN_SCALE)).astype(np.float32)
        if scale_search:
            scale = search_block_scales(wa, scale, axis, block_size, *_GRIDS[4], importance)
        q = quantize(wa, scale, None, "int4", axis=axis, block_size=block_size)
    else:
        scale, _ = compute_scale_zero_point(lo, hi, "int8", symmetric=True)
        if scale_search:
            scale = search_block_scales(wa, scale, axis, block_size, *_GRIDS[8], importance)
        q = quantize(wa, scale, None, "int8", axis=axis, block_size=block_size, clip_range=(-127, 127))
    return BlockQuantized(q=q, scale=np.asarray(scale, np.float32), axis=axis, block_size=block_size, bits=bits)


def dequantize_blockwise(q: np.ndarray, scale: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """``q * scale`` with ``scale`` repeated over each block (ONNX blocked DequantizeLinear)."""
    s = np.repeat(np.asarray(scale, np.float32), block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
    return (q.astype(np.float32) * s).astype(np.float32)


def pack_matmulnbits(q_nk: np.ndarray, scale_nb: np.ndarray, block_size: int,
                     bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits inputs ``B`` and ``scales`` from a ``[N, K]`` int4 (or int8) weight blocked along K.

    ``q_nk`` holds values in [-8, 7] ([-128, 127] for ``bits=8``); ``scale_nb`` is ``[N,
    ceil(K / block_size)]``. Returns ``B`` uint8 ``[N, n_blocks, block_size * bits / 8]`` (code
    ``q + 2^(bits-1)``, the op's default zero point; 4 bits: element ``2j`` of a block in the low
    nibble of byte ``j``; the padding of a short last block set to the code of the value 0) and
    ``scales`` float32 ``[N * n_blocks]`` (row-major over ``[N, n_blocks]``).
    """
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits bits must be 4 or 8, got {bits}")
    zero = 1 << (bits - 1)
    q = np.asarray(q_nk)
    n, k = q.shape
    nblocks = -(-k // block_size)
    if scale_nb.shape != (n, nblocks):
        raise ValueError(f"scale shape {scale_nb.shape} does not match [N, n_blocks] = {(n, nblocks)}")
    if q.size and (q.min() < -zero or q.max() > zero - 1):
        raise ValueError(f"MatMulNBits codes must hold int{bits} values in [{-zero}, {zero - 1}]")
    codes = np.full((n, nblocks * block_size), zero, dtype=np.uint8)
    codes[:, :k] = (q.astype(np.int16) + zero).astype(np.uint8)
    codes = codes.reshape(n, nblocks, block_size)
    packed = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale_nb, dtype=np.float32).reshape(-1)


def _quantize_site(config: QuantizeConfig, rounder: Rounder | None, name: str, w: np.ndarray, axis: int, bits: int,
                   block: int) -> BlockQuantized:
    """:func:`quantize_blockwise` of a 2-D weight blocked along ``axis`` (1: ``[n, k]``, 0: ``[k, n]``) with
    ``config.scale_search`` (``hessian``: weighted by the rounder's Hessian diagonal where known)."""
    search = getattr(config, "scale_search", "none")
    importance = None
    if search == "hessian" and rounder is not None:
        n, k = (w.shape[0], w.shape[1]) if axis == 1 else (w.shape[1], w.shape[0])
        imp = rounder.importance(name, n, k)
        importance = None if imp is None else (imp if axis == 1 else imp.T)
    return quantize_blockwise(w, axis, bits, block, scale_search=search != "none", importance=importance)


def _absorb_mean_error(rounder: Rounder | None, rw: "_Rewriter", site: WeightSite, w_nk: np.ndarray,
                       w_hat_nk: np.ndarray, shared: dict[str, int]) -> bool:
    """With ``config.gptq_bias`` (a centred rounder): add the mean output error ``(W - W_hat) mu`` to
    the layer's bias, so that the bias absorbs what the integers miss on average: a Conv's bias
    (added when there is none), a Gemm's constant ``C`` of ``[N]`` values, or the constant ``[N]``
    operand of the one Add reading a MatMul's output. A new initializer each time (the old one may
    be shared); a weight read by several nodes is left as it is. True when a bias moved."""
    if rounder is None or site.weight.name in shared:
        return False
    shift = rounder.bias_shift(site.weight.name, w_nk, w_hat_nk)
    if shift is None:
        return False
    node = site.node
    if site.conv:
        old = node.inputs[2] if len(node.inputs) > 2 else None
        if old is not None and old.const_value is None:
            return False
        b = np.zeros(site.n, np.float64) if old is None else old.const_value.numpy().astype(np.float64).reshape(-1)
        value = rw.init(f"{old.name if old is not None else site.weight.name + '_bias'}_mean_error",
                        (b + shift).astype(np.float32))
        if old is None:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
        return True
    if site.bias is not None:  # a Gemm's C (MatMul sites have none)
        c = site.bias
        if c.const_value is None or c.const_value.size != site.n or site.beta == 0.0:
            return False
        b = c.const_value.numpy().astype(np.float64)
        value = rw.init(f"{c.name}_mean_error", (b + site.alpha * shift.reshape(b.shape) / site.beta).astype(np.float32))
        node.replace_input_with(2, value)
        site.bias = value
        return True
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or not is_add_node(uses[0].node):
        return False
    add = uses[0].node
    other_index = 1 - uses[0].idx
    other = add.inputs[other_index]
    if other is None or other.const_value is None or other.const_value.size != site.n:
        return False
    b = other.const_value.numpy().astype(np.float64)
    if b.shape[-1:] != (site.n,):
        return False
    add.replace_input_with(other_index, rw.init(f"{other.name}_mean_error", (b + shift.reshape(b.shape)).astype(np.float32)))
    return True


def _int4_tensor_array(q: np.ndarray) -> np.ndarray:
    """int8-stored int4 values as an ``ml_dtypes.int4`` array (onnx_ir stores it as INT4, packed)."""
    return np.asarray(q).astype(ml_dtypes.int4)


# --------------------------------------------------------------------------------------- analysis


@dataclasses.dataclass
class WeightSite:
    """A node whose constant weight will be quantized.

    ``transposed``: the weight is stored ``[N, K]`` (Gemm with ``transB=1``), else ``[K, N]``
    (for Conv: ``[M, C/group, *kernel]``, ``k`` = C/group x kernel size, ``n`` = M).
    """

    node: ir.Node
    weight: ir.Value
    k: int
    n: int
    transposed: bool = False
    bias: ir.Value | None = None
    alpha: float = 1.0
    beta: float = 1.0
    conv: bool = False
    #: weight-only bits of this site (None: ``config.bits``; 8 for ``config.eight_bit`` nodes)
    bits: int | None = None

    @property
    def label(self) -> str:
        return self.node.name or self.node.op_type

    @property
    def k_axis(self) -> int:
        return 1 if self.transposed else 0


@dataclasses.dataclass
class WeightPlan:
    """Nodes to rewrite and the nodes left alone, with a reason each."""

    sites: list[WeightSite]
    skipped: dict[str, str]

    @property
    def shared_weights(self) -> dict[str, int]:
        """Weights read by more than one site: name -> number of sites."""
        counts: dict[str, int] = {}
        for site in self.sites:
            counts[site.weight.name] = counts.get(site.weight.name, 0) + 1
        return {k: v for k, v in counts.items() if v > 1}


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _is_float32(value: ir.Value | None) -> bool:
    # An untyped value (shape inference could not type it) is given the benefit of the doubt.
    return value is not None and value.dtype in (None, ir.DataType.FLOAT)


def dynamic_op_types(config: QuantizeConfig) -> tuple[str, ...]:
    """Op types dynamic mode converts: ``config.op_types`` (``--op-types``) when given, else
    ``config.dynamic_op_types`` (MatMul, Gemm)."""
    return config.op_types or config.dynamic_op_types


def plan_weight_sites(model: ir.Model, config: QuantizeConfig, *, mode: str | None = None) -> WeightPlan:
    """Which nodes of the main graph ``mode`` (default: ``config.mode``) quantizes.

    weight-only: MatMul with a constant float32 2-D weight as input 1, Gemm with a constant
    float32 2-D ``B`` and ``transA = 0``; K >= ``block_size``; for the ``ort`` format also Gemm
    ``alpha = beta = 1`` and a MatMul input of rank >= 2. dynamic: the op types of
    :func:`dynamic_op_types` (MatMul, Gemm, Conv) with constant float32 weights. Every node
    must be allowed by ``config.selector``. ``model`` should carry inferred types.
    """
    mode = mode or config.mode
    if mode not in ("weight-only", "dynamic"):
        raise ConfigError(f"plan_weight_sites: mode must be 'weight-only' or 'dynamic', got {mode!r}")
    if mode == "dynamic":
        candidates = set(dynamic_op_types(config))
        unknown = sorted(candidates - set(_DYNAMIC_OPS) - {"LSTM"})
        if unknown:
            key = "op_types (--op-types)" if config.op_types else "dynamic_op_types"
            raise ConfigError(
                f"quantize: {key} {unknown} are not supported in dynamic mode; choose among {', '.join(_DYNAMIC_OPS)}, LSTM"
            )
        candidates -= {"LSTM"}  # LSTM: onnxcomp.quant.recurrent
    else:
        candidates = set(_WEIGHT_ONLY_OPS) | ({"Conv"} & set(config.op_types))
    ort_format = mode == "weight-only" and config.weight_only_format == "ort"
    selector = config.selector
    sites: list[WeightSite] = []
    skipped: dict[str, str] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in candidates:
            continue
        label = node.name or node.op_type
        reason = None
        site = None
        if not selector.allows(node.name or "", node.op_type):
            reason = "excluded by the selection"
        elif KEEP_FLOAT_KEY in node.metadata_props:  # a pass made it to stay float
            reason = node.metadata_props[KEEP_FLOAT_KEY]
        elif len(node.outputs) != 1 or not _is_float32(node.outputs[0]):
            reason = "its output is not a single float32 tensor"
        elif not node.inputs or not _is_float32(node.inputs[0]) or node.inputs[0].const_value is not None:
            reason = "its input is not a float32 activation"
        else:
            site, reason = _site(node, mode, config, ort_format)
        if reason is not None:
            skipped[label] = reason
        elif site is not None:
            sites.append(site)
    if mode == "weight-only" and config.eight_bit:
        _mark_eight_bit(sites, config.eight_bit)
    return WeightPlan(sites=sites, skipped=skipped)


#: Keywords of ``QuantizeConfig.eight_bit`` besides names, op types and ``re:`` patterns.
EIGHT_BIT_KEYWORDS = (":first", ":last", ":depthwise")


def _is_depthwise(site: WeightSite) -> bool:
    if not site.conv:
        return False
    shape = site.weight.const_value.shape
    group = int(_attr(site.node, "group", 1))
    return group > 1 and int(shape[1]) == 1


def _mark_eight_bit(sites: list[WeightSite], items: tuple[str, ...]) -> None:
    """Give 8 bits to the sites ``items`` (``QuantizeConfig.eight_bit``) name (by node name, op type,
    weight name or keyword); a weight shared by several sites gets 8 bits at all of them when one
    is named."""
    from onnxcomp.selection import NodeSelector

    chosen = NodeSelector((), tuple(i for i in items if i not in EIGHT_BIT_KEYWORDS))
    names = set()
    for i, site in enumerate(sites):
        if (chosen.excluded(site.node.name or "", site.node.op_type) or chosen.excluded(site.weight.name or "", "")
                or (":first" in items and i == 0) or (":last" in items and i == len(sites) - 1)
                or (":depthwise" in items and _is_depthwise(site))):
            names.add(site.weight.name)
    for site in sites:
        if site.weight.name in names:
            site.bits = 8


def _site(node: ir.Node, mode: str, config: QuantizeConfig, ort_format: bool) -> tuple[WeightSite | None, str | None]:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return None, non_constant_weight(weight)
    if weight.is_graph_input():
        return None, "its weight is also a graph input (it can be replaced at run time)"
    if weight.const_value.dtype != ir.DataType.FLOAT:
        return None, f"its weight is {weight.const_value.dtype.name}, not float32"
    shape = tuple(weight.const_value.shape.numpy())
    if node.op_type == "Conv":
        if ort_format:
            return None, "MatMulNBits is for MatMul/Gemm; Conv weights need weight_only_format 'qdq'"
        if len(shape) < 3:
            return None, f"its weight has rank {len(shape)}"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is None:
            return None, "its bias is not a constant"
        if node.inputs[0].shape is not None and len(node.inputs[0].shape) != len(shape):
            return None, "its input rank does not match the weight"
        return WeightSite(node, weight, k=math.prod(shape[1:]), n=shape[0], bias=bias, conv=True), None
    if len(shape) != 2:
        return None, f"its weight is not 2-D (shape {list(shape)})"
    transposed = False
    bias = None
    alpha = beta = 1.0
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return None, "Gemm with transA=1"
        transposed = bool(_attr(node, "transB", 0))
        alpha = float(_attr(node, "alpha", 1.0))
        beta = float(_attr(node, "beta", 1.0))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not _is_float32(bias):
            return None, "its bias C is not float32"
        if bias is not None and beta != 1.0 and bias.const_value is None and mode == "dynamic":
            return None, "beta != 1 with a computed bias C"
        if ort_format and (alpha != 1.0 or (bias is not None and beta != 1.0)):
            return None, f"MatMulNBits needs Gemm alpha = beta = 1 (alpha={alpha}, beta={beta})"
    k, n = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    if mode == "weight-only" and k < config.block_size:
        return None, f"K={k} is smaller than block_size={config.block_size}"
    a_shape = node.inputs[0].shape
    if a_shape is not None and len(a_shape) < 2 and (ort_format or mode == "dynamic"):
        return None, "its input is 1-D"
    return WeightSite(node, weight, k=k, n=n, transposed=transposed, bias=bias, alpha=alpha, beta=beta), None


# --------------------------------------------------------------------------------------- rewrites


class _Rewriter:
    """Shared bookkeeping: unique names, new initializers and their bytes."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.taken = all_value_names(model.graph)
        self.bytes_after = 0

    def init(self, name: str, array: np.ndarray) -> ir.Value:
        value = add_initializer(self.graph, name, array, self.taken)
        self.bytes_after += value.const_value.nbytes
        return value

    def name(self, base: str) -> str:
        return unique_name(self.graph, base, self.taken)

    def output(self, node: ir.Node, base: str, dtype: ir.DataType | None, shape: ir.Shape | None = None) -> ir.Value:
        value = node.outputs[0]
        value.name = self.name(base)
        if dtype is not None:
            value.dtype = dtype
        if shape is not None:
            value.shape = ir.Shape(shape)  # a copy: values must not share one Shape object
        return value


def _finish(model: ir.Model) -> None:
    TopologicalSortPass()(model)
    RemoveUnusedNodesPass()(model)


def _kept_float(plan: WeightPlan) -> list[str]:
    """Float weights still read by a node after the rewrite (e.g. by an excluded node)."""
    return sorted({s.weight.name for s in plan.sites if s.weight.uses()})


def _stats(plan: WeightPlan, rw: _Rewriter, unique: int, extra: dict[str, Any]) -> dict[str, Any]:
    weights = {id(s.weight): s.weight for s in plan.sites}
    before = sum(w.const_value.nbytes for w in weights.values())
    after = rw.bytes_after
    wide = {s.weight.name: int(s.weight.const_value.size) for s in plan.sites if s.bits == 8}
    if wide:
        elements = sum(int(w.const_value.size) for w in weights.values())
        extra = {**extra, "eight_bit": {"weights": sorted(wide), "elements": sum(wide.values()),
                                        "share_of_elements": sum(wide.values()) / max(elements, 1)}}
    return {
        "nodes_quantized": len(plan.sites),
        "quantized_nodes": [s.label for s in plan.sites],
        "weights_quantized": unique,
        "shared_weights": plan.shared_weights,
        "weight_bytes_before": before,
        "weight_bytes_after": after,
        "weight_compression": (before / after) if after else None,
        "float_weights_kept": _kept_float(plan),
        **extra,
        "skipped": dict(plan.skipped),
    }


class WeightOnlyQDQPass(CompressionPass[QuantizeConfig]):
    """Blocked ``DequantizeLinear`` weights (``weight_only_format="qdq"``), see module docstring.

    ``rounder`` (onnxcomp.quant.gptq): error-compensating rounding on the same grid; None: nearest.
    """

    config_class = QuantizeConfig
    min_opset = QDQ_MIN_OPSET

    def __init__(self, config: QuantizeConfig, plan: WeightPlan | None = None, rounder: Rounder | None = None) -> None:
        super().__init__(config)
        self.plan = plan
        self.rounder = rounder

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        plan = self.plan or plan_weight_sites(model, cfg, mode="weight-only")
        self._shared = plan.shared_weights
        rw = _Rewriter(model)
        cache: dict[str, ir.Value] = {}
        retransposed = 0
        for site in plan.sites:
            if site.conv:
                if site.weight.name not in cache:
                    cache[site.weight.name] = self._conv_weight(model, site, rw)
                site.node.replace_input_with(1, cache[site.weight.name])
                continue
            # Every weight is stored [K, N] and blocked along axis 0: a Gemm with transB=1 gets the
            # transposed weight and transB=0 (the same blocks, since blocks follow K either way).
            # onnxruntime fuses DequantizeLinear(axis=0) -> MatMul/Gemm into MatMulNBits, but
            # not a DequantizeLinear along axis 1 feeding a Gemm with transB=1.
            key = site.weight.name
            if key not in cache:
                bits = site.bits or cfg.bits
                w = site.weight.const_value.numpy()
                w_kn = np.ascontiguousarray(w.T) if site.transposed else w
                bq = _quantize_site(cfg, self.rounder, key, w_kn, 0, bits, cfg.block_size)
                if self.rounder is not None:
                    q_nk = self.rounder.round(key, w_kn.T, bq.scale.T, bq.q.T, *_GRIDS[bits], cfg.block_size)
                    bq = dataclasses.replace(bq, q=np.ascontiguousarray(q_nk.T).astype(bq.q.dtype))
                    if cfg.scale_refit:
                        s_nk = self.rounder.refit(key, w_kn.T, q_nk, bq.scale.T, cfg.block_size)
                        bq = dataclasses.replace(bq, scale=np.ascontiguousarray(s_nk.T))
                    _absorb_mean_error(self.rounder, rw, site, w_kn.T, bq.dequantize().T, plan.shared_weights)
                data = _int4_tensor_array(bq.q) if bits == 4 else bq.q
                q_v = rw.init(f"{site.weight.name}_q{bits}", data)
                s_v = rw.init(f"{site.weight.name}_scale", bq.scale)
                dq = ir.node(
                    "DequantizeLinear", [q_v, s_v],
                    attributes={"axis": 0, "block_size": cfg.block_size},
                    name=rw.name(f"{site.weight.name}_DequantizeLinear"),
                )
                cache[key] = rw.output(dq, f"{site.weight.name}_dq", ir.DataType.FLOAT, ir.Shape(w_kn.shape))
                model.graph.insert_before(site.node, dq)
            site.node.replace_input_with(1, cache[key])
            if site.transposed:
                site.node.attributes["transB"] = ir.AttrInt64("transB", 0)
                retransposed += 1
        if plan.sites:  # INT4 tensors (and opset 21 in general) need IR version 10
            model.ir_version = max(model.ir_version or 0, _QDQ_IR_VERSION)
        _finish(model)
        return bool(plan.sites), _stats(plan, rw, len(cache), {
            "format": "qdq", "bits": cfg.bits, "block_size": cfg.block_size,
            "conv_block_size": cfg.conv_block_size,
            "grid": _grid(cfg.bits), "gemm_transB_folded": retransposed,
        })


    def _conv_weight(self, model: ir.Model, site: WeightSite, rw: _Rewriter) -> ir.Value:
        """A Conv weight ``[M, C/g, *kernel]`` with one scale per output channel (the whole filter is
        one block, same grids), behind ``DequantizeLinear(axis=0)``; with ``conv_block_size`` B
        smaller than the filter, the filters flattened to ``[M, K]`` are blocked along K as a
        MatMul weight, ``DequantizeLinear(axis=1, block_size=B) -> Reshape`` (folded at session
        creation like the rest)."""
        cfg = self.config
        bits = site.bits or cfg.bits
        w = site.weight.const_value.numpy()
        w_nk = w.reshape(w.shape[0], -1)
        k = w_nk.shape[1]
        block = cfg.conv_block_size if cfg.conv_block_size and cfg.conv_block_size < k else k
        bq = _quantize_site(cfg, self.rounder, site.weight.name, w_nk, 1, bits, block)
        q_nk = bq.q
        if self.rounder is not None:
            q_nk = self.rounder.round(site.weight.name, w_nk, bq.scale, q_nk, *_GRIDS[bits],
                                      block).astype(bq.q.dtype)
            if cfg.scale_refit:
                bq = dataclasses.replace(bq, scale=self.rounder.refit(site.weight.name, w_nk, q_nk, bq.scale, block))
            bq = dataclasses.replace(bq, q=q_nk)
            _absorb_mean_error(self.rounder, rw, site, w_nk, bq.dequantize(), self._shared)
        name = site.weight.name
        if block == k:
            q = q_nk.reshape(w.shape)
            q_v = rw.init(f"{name}_q{bits}", _int4_tensor_array(q) if bits == 4 else q)
            s_v = rw.init(f"{name}_scale", np.ascontiguousarray(bq.scale.reshape(-1), dtype=np.float32))
            dq = ir.node("DequantizeLinear", [q_v, s_v], attributes={"axis": 0},
                         name=rw.name(f"{name}_DequantizeLinear"))
            model.graph.insert_before(site.node, dq)
            return rw.output(dq, f"{name}_dq", ir.DataType.FLOAT, ir.Shape(w.shape))
        q_v = rw.init(f"{name}_q{bits}", _int4_tensor_array(q_nk) if bits == 4 else q_nk)
        s_v = rw.init(f"{name}_scale", np.ascontiguousarray(bq.scale, dtype=np.float32))
        shape_v = rw.init(f"{name}_shape", np.array(w.shape, np.int64))
        dq = ir.node("DequantizeLinear", [q_v, s_v], attributes={"axis": 1, "block_size": block},
                     name=rw.name(f"{name}_DequantizeLinear"))
        rw.output(dq, f"{name}_dq_flat", ir.DataType.FLOAT, ir.Shape(w_nk.shape))
        reshape = ir.node("Reshape", [dq.outputs[0], shape_v], name=rw.name(f"{name}_Reshape"))
        model.graph.insert_before(site.node, dq)
        model.graph.insert_before(site.node, reshape)
        return rw.output(reshape, f"{name}_dq", ir.DataType.FLOAT, ir.Shape(w.shape))


class MatMulNBitsPass(CompressionPass[QuantizeConfig]):
    """``com.microsoft.MatMulNBits`` (``weight_only_format="ort"``, 4 bits), see module docstring.

    ``accuracy_level`` is the op's attribute: 0 keeps the activations in float (default); 4 lets
    onnxruntime quantize them to int8 blockwise inside the kernel (faster, less exact).
    """

    config_class = QuantizeConfig
    min_opset = 1

    def __init__(self, config: QuantizeConfig, plan: WeightPlan | None = None, *, accuracy_level: int = 0,
                 rounder: Rounder | None = None) -> None:
        super().__init__(config)
        self.rounder = rounder
        if config.bits != 4:
            raise ConfigError("MatMulNBits (weight_only_format 'ort') is for bits = 4")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"MatMulNBits accuracy_level must be 0..4, got {accuracy_level}")
        self.plan = plan
        self.accuracy_level = accuracy_level

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        plan = self.plan or plan_weight_sites(model, cfg, mode="weight-only")
        rw = _Rewriter(model)
        bs = cfg.block_size
        cache: dict[tuple[str, bool], tuple[ir.Value, ir.Value]] = {}
        for site in plan.sites:
            key = (site.weight.name, site.transposed)
            bits = site.bits or 4
            if key not in cache:
                w = site.weight.const_value.numpy()
                w_nk = w if site.transposed else w.T
                bq = _quantize_site(cfg, self.rounder, site.weight.name, w_nk, 1, bits, bs)
                if self.rounder is not None:
                    q_nk = self.rounder.round(site.weight.name, w_nk, bq.scale, bq.q, *_GRIDS[bits], bs)
                    bq = dataclasses.replace(bq, q=q_nk.astype(bq.q.dtype))
                    if cfg.scale_refit:
                        bq = dataclasses.replace(bq, scale=self.rounder.refit(site.weight.name, w_nk, bq.q, bq.scale, bs))
                    _absorb_mean_error(self.rounder, rw, site, w_nk, bq.dequantize(), plan.shared_weights)
                packed, scales = pack_matmulnbits(bq.q, bq.scale, bs, bits)
                cache[key] = (rw.init(f"{site.weight.name}_nbits", packed), rw.init(f"{site.weight.name}_scales", scales))
            b_v, s_v = cache[key]
            node = site.node
            old_out = node.outputs[0]
            mm = ir.node(
                "MatMulNBits", [node.inputs[0], b_v, s_v],
                attributes={"K": site.k, "N": site.n, "bits": bits, "block_size": bs,
                            "accuracy_level": self.accuracy_level},
                domain=_MS_DOMAIN, name=node.name or rw.name("MatMulNBits"),
            )
            new_nodes = [mm]
            result = mm.outputs[0]
            if site.bias is not None:
                rw.output(mm, f"{old_out.name}_nobias", ir.DataType.FLOAT)
                add = ir.node("Add", [result, site.bias], name=rw.name(f"{node.name or 'Gemm'}_bias"))
                new_nodes.append(add)
                result = add.outputs[0]
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], new_nodes, [old_out], [result])
        if plan.sites:
            model.opset_imports.setdefault(_MS_DOMAIN, 1)
        _finish(model)
        return bool(plan.sites), _stats(plan, rw, len(cache), {
            "format": "ort", "bits": 4, "block_size": bs, "accuracy_level": self.accuracy_level,
            "grid": _grid(4),
        })


class DynamicQuantPass(CompressionPass[QuantizeConfig]):
    """DynamicQuantizeLinear + MatMulInteger/ConvInteger + rescale (``mode="dynamic"``)."""

    config_class = QuantizeConfig
    min_opset = DYNAMIC_MIN_OPSET

    def __init__(self, config: QuantizeConfig, plan: WeightPlan | None = None, rounder: Rounder | None = None) -> None:
        super().__init__(config)
        self.plan = plan
        self.rounder = rounder

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        plan = self.plan or plan_weight_sites(model, cfg, mode="dynamic")
        rw = _Rewriter(model)
        cache: dict[tuple[str, str, bool, float], tuple[ir.Value, ir.Value]] = {}
        for site in plan.sites:
            key = (site.weight.name, site.node.op_type, site.transposed, site.alpha)
            if key not in cache:
                cache[key] = self._weight(site, rw)
            self._rewrite(site, rw, *cache[key])
        _finish(model)
        return bool(plan.sites), _stats(plan, rw, len({(k[0], k[2]) for k in cache}), {
            "weight_type": "int8", "activation_type": "uint8",
            "per_channel": cfg.per_channel, "op_types": list(dynamic_op_types(cfg)),
        })

    def _weight(self, site: WeightSite, rw: _Rewriter) -> tuple[ir.Value, ir.Value]:
        """int8 weight (``[K, N]`` for MatMul/Gemm) and its scale shaped to broadcast on the output."""
        w = site.weight.const_value.numpy()
        if site.node.op_type == "Conv":
            axis = 0 if self.config.per_channel else None
        else:
            if site.transposed:
                w = np.ascontiguousarray(w.T)
            axis = 1 if self.config.per_channel else None
        q, scale, _ = quantize_weight(w, "int8", axis=axis, symmetric=True, reduce_range=self.config.reduce_weights)
        if self.rounder is not None:
            qmin, qmax = qrange("int8", True, self.config.reduce_weights)
            q = self.rounder.round_along(site.weight.name, w, q, scale, 0 if site.conv else 1, qmin, qmax)
        q_v = rw.init(f"{site.weight.name}_quantized", q)
        scale = (np.asarray(scale, np.float32) * np.float32(site.alpha)).astype(np.float32)
        if site.node.op_type == "Conv" and scale.ndim:
            scale = scale.reshape((1, -1) + (1,) * (w.ndim - 2))
        return q_v, rw.init(f"{site.weight.name}_scale", scale)

    def _rewrite(self, site: WeightSite, rw: _Rewriter, w_q: ir.Value, ws_v: ir.Value) -> None:
        node, x, out = site.node, site.node.inputs[0], site.node.outputs[0]
        base = node.name or node.op_type
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=rw.name(f"{base}_DynamicQuantizeLinear"))
        x_q, x_s, x_zp = dql.outputs
        for v, suffix, dt in ((x_q, "quantized", ir.DataType.UINT8), (x_s, "scale", ir.DataType.FLOAT),
                              (x_zp, "zero_point", ir.DataType.UINT8)):
            v.name = rw.name(f"{x.name}_{suffix}" if x.name else f"{base}_{suffix}")
            v.dtype = dt
        x_q.shape = ir.Shape(x.shape) if x.shape is not None else None
        x_s.shape = ir.Shape([])
        x_zp.shape = ir.Shape([])
        if node.op_type == "Conv":
            attrs = {k: v.value for k, v in node.attributes.items()}
            integer = ir.node("ConvInteger", [x_q, w_q, x_zp], attributes=attrs, name=rw.name(f"{base}_ConvInteger"))
        else:
            integer = ir.node("MatMulInteger", [x_q, w_q, x_zp], name=rw.name(f"{base}_MatMulInteger"))
        rw.output(integer, f"{out.name}_int32", ir.DataType.INT32, out.shape)
        cast = ir.node("Cast", [integer.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=rw.name(f"{base}_Cast"))
        rw.output(cast, f"{out.name}_float", ir.DataType.FLOAT, out.shape)
        scale_mul = ir.node("Mul", [x_s, ws_v], name=rw.name(f"{base}_scale_Mul"))
        rw.output(scale_mul, f"{out.name}_scale", ir.DataType.FLOAT, ws_v.shape)
        rescale = ir.node("Mul", [cast.outputs[0], scale_mul.outputs[0]], name=rw.name(f"{base}_rescale"))
        new_nodes = [dql, integer, cast, scale_mul, rescale]
        result = rescale.outputs[0]
        bias = self._bias(site, rw)
        if bias is not None:
            rw.output(rescale, f"{out.name}_nobias", ir.DataType.FLOAT, out.shape)
            add = ir.node("Add", [result, bias], name=rw.name(f"{base}_bias"))
            new_nodes.append(add)
            result = add.outputs[0]
        ir.convenience.replace_nodes_and_values(rw.graph, node, [node], new_nodes, [out], [result])

    def _bias(self, site: WeightSite, rw: _Rewriter) -> ir.Value | None:
        bias = site.bias
        if bias is None:
            return None
        if site.node.op_type == "Conv":
            b = bias.const_value.numpy().astype(np.float32)
            rank = len(site.weight.const_value.shape)
            return add_initializer(rw.graph, f"{bias.name}_broadcast", b.reshape((1, -1) + (1,) * (rank - 2)), rw.taken)
        if site.beta == 1.0:
            return bias
        b = bias.const_value.numpy().astype(np.float32) * np.float32(site.beta)
        return add_initializer(rw.graph, f"{bias.name}_beta", b.astype(np.float32), rw.taken)


def _grid(bits: int) -> str:
    return ("int4 [-8, 7], scale = max(-min/8, max/7) per block, no zero point" if bits == 4
            else "int8 [-127, 127], scale = absmax/127 per block, no zero point")


# ---------------------------------------------------------------------------------- mode handlers


def _prepare(work: ir.Model, config: QuantizeConfig, cleanup: bool | None) -> dict[str, Any] | None:
    """In place: cleanup (``cleanup`` overrides ``config.cleanup``), topological sort, types."""
    stats = CleanupPass()(work).stats if (config.cleanup if cleanup is None else cleanup) else None
    TopologicalSortPass()(work)
    infer_types(work)
    return stats


def _base_report(config: QuantizeConfig, before: int, work: ir.Model, stats: dict[str, Any],
                 cleanup: dict[str, Any] | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "mode": config.mode,
        "config": config.to_dict(),
        **stats,
        "model_weight_bytes_before": before,
        "model_weight_bytes_after": initializer_nbytes(work),
    }
    if cleanup is not None:
        report["cleanup"] = cleanup
    return report


def quantize_weight_only_mode(
    model: Any, config: QuantizeConfig, *, allow_upgrade: bool = True, notes: list[str] | None = None
) -> tuple[ir.Model, dict[str, Any]]:
    """Weight-only quantization (see module docstring); returns the new model and a report.

    ``qdq`` needs opset 21 (upgraded when ``allow_upgrade``); ``ort`` keeps the model's opset
    (>= 11) and adds the ``com.microsoft`` opset import.
    """
    notes = notes if notes is not None else []
    min_opset = QDQ_MIN_OPSET if config.weight_only_format == "qdq" else DYNAMIC_MIN_OPSET
    work = working_copy(model, min_opset, allow_upgrade=allow_upgrade, notes=notes)
    return work, quantize_weight_only_in_place(work, config, notes=notes)


def quantize_weight_only_in_place(
    work: ir.Model, config: QuantizeConfig, *, notes: list[str], cleanup: bool | None = None,
    calibration: Any = None,
) -> dict[str, Any]:
    """Weight-only quantization of a working copy at the format's opset, in place; the report.

    ``calibration`` (optional) gives the layer Hessians for error-compensating rounding
    (``config.rounding``, onnxcomp.quant.gptq)."""
    if config.weight_only_format == "ort" and config.bits != 4:
        raise ConfigError("quantize: weight_only_format 'ort' (MatMulNBits) is for bits = 4")
    before = initializer_nbytes(work)
    cleanup_stats = _prepare(work, config, cleanup)
    plan = plan_weight_sites(work, config, mode="weight-only")
    started = time.perf_counter()
    rounder = make_rounder(work, [s.node for s in plan.sites], calibration, config)
    if config.weight_only_format == "qdq":
        result = WeightOnlyQDQPass(config, plan, rounder)(work)
        if plan.shared_weights:
            notes.append(
                f"{len(plan.shared_weights)} weight(s) feed several nodes and are quantized once behind one "
                "DequantizeLinear; onnxruntime does not fuse those into MatMulNBits (it dequantizes them and runs "
                "the MatMuls in float). weight_only_format='ort' fuses every node"
            )
        if plan.sites:
            notes.append(
                "onnxruntime fuses DequantizeLinear->MatMul into MatMulNBits and, by default, quantizes the "
                "activations to int8 inside it (session option session.qdq_matmulnbits_accuracy_level, "
                "default 4); set it to 0 to keep activations in float"
            )
    else:
        result = MatMulNBitsPass(config, plan, rounder=rounder)(work)
    report = _base_report(config, before, work, result.stats, cleanup_stats)
    report["rounding"] = rounding_report(rounder, started)
    return report


def quantize_dynamic_mode(
    model: Any, config: QuantizeConfig, *, allow_upgrade: bool = True, notes: list[str] | None = None
) -> tuple[ir.Model, dict[str, Any]]:
    """Dynamic quantization (see module docstring); returns the new model and a report."""
    notes = notes if notes is not None else []
    work = working_copy(model, DYNAMIC_MIN_OPSET, allow_upgrade=allow_upgrade, notes=notes)
    return work, quantize_dynamic_in_place(work, config, notes=notes)


def quantize_dynamic_in_place(
    work: ir.Model, config: QuantizeConfig, *, notes: list[str], cleanup: bool | None = None,
    calibration: Any = None,
) -> dict[str, Any]:
    """Dynamic quantization of a working copy (opset >= 11), in place; the report (``calibration``:
    as for weight-only)."""
    before = initializer_nbytes(work)
    cleanup_stats = _prepare(work, config, cleanup)
    plan = plan_weight_sites(work, config, mode="dynamic")
    op_types = dynamic_op_types(config)
    if "Conv" not in op_types:
        convs = sum(1 for n in work.graph if n.op_type == "Conv")
        if convs:
            wanted = sorted(set(op_types) | {"Conv"})
            toml_list = ", ".join(f'"{t}"' for t in wanted)
            notes.append(
                f"{convs} Conv node(s) left in float: ConvInteger runs several times slower than float Conv on "
                f"onnxruntime's CPU provider; to convert them anyway pass --op-types {','.join(wanted)} "
                f"(in a recipe: quantize.op_types = [{toml_list}])"
            )
    started = time.perf_counter()
    rounder = make_rounder(work, [s.node for s in plan.sites], calibration, config)
    result = DynamicQuantPass(config, plan, rounder)(work)
    report = _base_report(config, before, work, result.stats, cleanup_stats)
    report["rounding"] = rounding_report(rounder, started)
    if "LSTM" in op_types:
        from onnxcomp.quant.recurrent import RecurrentInt8Config, RecurrentInt8Pass

        # GRU/RNN: no int8 kernel in onnxruntime, so weight-only int8 (float compute), as in static mode
        recurrent = RecurrentInt8Config(exclude=config.exclude, reduce_weights=config.reduce_weights)
        report.update(RecurrentInt8Pass(recurrent)(work).stats)
        report["model_weight_bytes_after"] = initializer_nbytes(work)
    return report
