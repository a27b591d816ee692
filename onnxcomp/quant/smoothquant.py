r"""SmoothQuant: move activation outliers into the weights before static int8 quantization.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models". A MatMul/Gemm :math:`Y = X W` (``W`` constant, ``X`` of shape ``[..., C]``) is
unchanged when input channel :math:`j` of :math:`X` is divided by :math:`s_j` and row :math:`j`
of :math:`W` is multiplied by it:

.. math:: Y = (X\,\mathrm{diag}(s)^{-1})\,(\mathrm{diag}(s)\,W)

Per-tensor activation quantization suffers when a few channels of :math:`X` are much larger
than the rest (LayerNorm outputs of transformers); per-channel weight quantization absorbs a
per-row scale cheaply. With calibration statistics :math:`\max|X_j|` and the weights'
:math:`\max|W_j|` (row :math:`j`, maximum over every consumer of :math:`X`),

.. math:: s_j = \frac{\max|X_j|^{\alpha}}{\max|W_j|^{1-\alpha}}

(:math:`s_j = 1` where either maximum is 0). The division by :math:`s` is folded into the op
that produces :math:`X`, so nothing is added to the graph. That op must be able to absorb a
per-output-channel scale exactly:

* LayerNormalization / RMSNormalization: ``scale`` (and ``bias``) divided along the last axis;
* Mul by a constant: the constant divided along the last axis;
* MatMul/Gemm with a constant weight: weight columns (output channels) and bias divided, the
  bias being Gemm's ``C`` or the constant of an Add right after the MatMul.

Exact in real arithmetic; in float32 the outputs differ by rounding only (tested to 1e-5 with
onnxruntime's optimizations off and on).

When one tensor feeds several MatMuls (a LayerNorm feeding q, k and v), they share one
:math:`s` (with :math:`\max|W_j|` over all of them) and all are rescaled.

**Alpha search** (``search=True``): for each group, every :math:`\alpha` in ``alphas`` is tried on
a sample of calibration rows of :math:`X`: :math:`X/s` is quantized per tensor (``uint8``
asymmetric by default, range from the full calibration min/max), :math:`sW` per output channel
(int8 symmetric), with :mod:`onnxcomp.quant.primitives`; the :math:`\alpha` with the smallest
relative squared error of the consumers' outputs against the float :math:`XW` wins (mean over
the consumers). With ``require_improvement`` a group whose best simulated error is no better than
leaving it alone is skipped. The chosen :math:`\alpha` and the simulated SQNR with and without
smoothing are reported per group.

Refused (skipped, with the reason in the statistics): a tensor that is a graph input or output,
that has a consumer other than a MatMul/Gemm with a constant float32 weight reading it as its
first input (Gemm with ``transA=0``), or whose producer is not one of the ops above (Reshape,
Transpose, Gelu, a residual Add...); producer or consumer constants that are not float32, or are
graph inputs (a feed could replace them). Constants shared with other nodes are copied, never
changed under another node.

Statistics are collected by streaming the calibration data through onnxruntime in memory (the
observed tensors exposed as outputs of a clone, as in :mod:`onnxcomp.quant.calibrate`): per-channel
min/max plus a fixed-size uniform sample of rows (``search_rows``) for the search.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.data import DataSource, Dataset, load_data
from onnxcomp.errors import ConfigError, DataError
from onnxcomp.graph import stream_values
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.quant.config import NodeSelector
from onnxcomp.quant.equalize import (
    ConstantEditor,
    broadcasts_on_last_axis,
    const_problem,
    consumer_in_absmax,
    expand_last_axis,
    node_label,
    producer_out_axis,
    producer_problem,
    scale_along,
    scale_consumer_inputs,
)
from onnxcomp.quant.primitives import compute_scale_zero_point, dequantize, quantize, quantize_weight

__all__ = [
    "SmoothQuantConfig",
    "SmoothQuantPass",
    "SmoothingGroup",
    "find_smoothing_groups",
    "smoothing_scales",
]

_DEFAULT_ALPHAS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
_NORMS = ("LayerNormalization", "RMSNormalization")


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(PassConfig):
    """SmoothQuant settings.

    Attributes:
        alpha: migration strength used when ``search`` is off (0: nothing moves, 1: all of the
            activation range moves into the weights).
        search: pick alpha per group from ``alphas`` by simulated int8 error (module docstring).
        alphas: candidates for the search.
        require_improvement: with ``search``, skip a group whose best simulated error is no better
            than without smoothing.
        activation_type / activation_symmetric / per_channel / reduce_weights: the quantization the search
            simulates (match the QuantizeConfig that follows; defaults match its defaults).
        max_samples: read at most this many calibration feeds.
        search_rows: rows (tokens) of each tensor kept, uniformly sampled, for the search.
        seed: seed of that sampling.
        exclude: node names, op types or ``re:PATTERN`` regexes; a group whose producer or a
            consumer matches is left alone.
    """

    alpha: float = 0.5
    search: bool = True
    alphas: tuple[float, ...] = _DEFAULT_ALPHAS
    require_improvement: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    activation_symmetric: bool = False
    per_channel: bool = True
    reduce_weights: bool = False
    max_samples: int | None = None
    search_rows: int = 512
    seed: int = 0
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")
        if self.search and not self.alphas:
            raise ConfigError("smoothquant: alphas must not be empty when search is on")
        for a in self.alphas:
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"smoothquant: every alpha in alphas must be in [0, 1], got {a}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"smoothquant: max_samples must be >= 1, got {self.max_samples}")
        if self.search_rows < 1:
            raise ConfigError(f"smoothquant: search_rows must be >= 1, got {self.search_rows}")


@dataclasses.dataclass
class SmoothingGroup:
    """A tensor ``X`` [..., C], the op producing it, and every MatMul/Gemm consuming it.

    ``divide`` lists the producer's constants divided by ``s`` along their last axis, as
    ``(node, input index)``; ``weight`` is a linear producer whose weight columns are divided.
    """

    tensor: ir.Value
    producer: ir.Node
    consumers: list[ir.Node]
    channels: int
    divide: list[tuple[ir.Node, int]]
    weight: ir.Node | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor.name,
            "producer": node_label(self.producer),
            "producer_op": self.producer.op_type,
            "consumers": [node_label(n) for n in self.consumers],
            "channels": self.channels,
        }


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``; 1 where either maximum is 0."""
    x = np.asarray(x_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    s = np.ones_like(x)
    ok = (x > 0) & (w > 0) & np.isfinite(x) & np.isfinite(w)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return s


# ----------------------------------------------------------------------------------------------
# Finding groups
# ----------------------------------------------------------------------------------------------


def _consumer_channels(node: ir.Node) -> int | None:
    w = node.inputs[1].const_value
    if node.op_type == "Gemm":
        axis = 1 if node.attributes.get("transB") is not None and node.attributes["transB"].as_int() else 0
        return int(w.shape[axis])
    return int(w.shape[-2]) if len(w.shape) >= 2 else None


def _consumer_problem(node: ir.Node, idx: int, tensor: ir.Value) -> str | None:
    what = f"{node.op_type} {node_label(node)!r}"
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return (f"tensor {tensor.name!r} also feeds {what}; every consumer must be a MatMul/Gemm "
                "with a constant weight (they share one scale)")
    if idx != 0:
        return f"tensor {tensor.name!r} is input {idx} of {what}, not its data input"
    if (p := const_problem(node.inputs[1] if len(node.inputs) > 1 else None, f"{what}'s weight")) is not None:
        return p
    if node.op_type == "Gemm":
        trans_a = node.attributes.get("transA")
        if trans_a is not None and trans_a.as_int():
            return f"{what} has transA=1 (its input channels are not on the last axis)"
    elif len(node.inputs[1].const_value.shape) < 2:
        return f"{what}'s weight {node.inputs[1].name!r} is 1-D"
    return None


def _constant_operand(node: ir.Node) -> int | None:
    """Index of the single float32 constant operand of a binary node (None if not exactly one)."""
    if len(node.inputs) != 2:
        return None
    consts = [i for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None]
    return consts[0] if len(consts) == 1 else None


def _linear_producer(node: ir.Node, channels: int) -> tuple[ir.Node, list[tuple[ir.Node, int]]] | str:
    if (p := producer_problem(node)) is not None:
        return f"producer {node.op_type} {node_label(node)!r}: {p}"
    w = node.inputs[1].const_value
    out_ch = int(w.shape[producer_out_axis(node) % len(w.shape)])
    if out_ch != channels:
        return f"producer {node_label(node)!r} makes {out_ch} channels, the consumers read {channels}"
    divide: list[tuple[ir.Node, int]] = []
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        if not broadcasts_on_last_axis(node.inputs[2].const_value.shape, channels):
            return f"bias {node.inputs[2].name!r} of {node_label(node)!r} is not per output channel"
        divide.append((node, 2))
    return node, divide


def _producer(tensor: ir.Value, channels: int) -> tuple[ir.Node, list[tuple[ir.Node, int]], ir.Node | None] | str:
    """How the producer of ``tensor`` absorbs ``1/s``: (producer, constants to divide, linear node)."""
    node = tensor.producer()
    if node is None:
        return f"tensor {tensor.name!r} is a graph input: no op before it can absorb the scale"
    what = f"{node.op_type} {node_label(node)!r}"
    default_domain = node.domain in ("", "ai.onnx")
    if default_domain and node.op_type in _NORMS:
        if node.outputs[0] is not tensor:
            return f"tensor {tensor.name!r} is not the normalized output of {what}"
        divide = []
        for idx, role in ((1, "scale"), (2, "bias")):
            if idx >= len(node.inputs) or node.inputs[idx] is None:
                continue
            if (p := const_problem(node.inputs[idx], f"{what}'s {role}")) is not None:
                return p
            if not broadcasts_on_last_axis(node.inputs[idx].const_value.shape, channels):
                return f"{what}'s {role} {node.inputs[idx].name!r} does not run along the last axis"
            divide.append((node, idx))
        if not divide:
            return f"{what} has no scale input"
        return node, divide, None
    if default_domain and node.op_type == "Mul":
        k = _constant_operand(node)
        if k is None:
            return f"tensor {tensor.name!r} comes from {what} without exactly one constant operand"
        if (p := const_problem(node.inputs[k], f"{what}'s constant")) is not None:
            return p
        if not broadcasts_on_last_axis(node.inputs[k].const_value.shape, channels):
            return f"{what}'s constant {node.inputs[k].name!r} is not per channel (last axis)"
        return node, [(node, k)], None
    if default_domain and node.op_type in ("MatMul", "Gemm"):
        found = _linear_producer(node, channels)
        if isinstance(found, str):
            return found
        return node, found[1], node
    if default_domain and node.op_type == "Add":
        k = _constant_operand(node)
        linear = node.inputs[1 - k].producer() if k is not None else None
        if linear is not None and linear.op_type in ("MatMul", "Gemm") and linear.domain in ("", "ai.onnx"):
            hidden = node.inputs[1 - k]
            if len(list(hidden.uses())) != 1 or hidden.is_graph_output():
                return f"the output {hidden.name!r} of {linear.op_type} {node_label(linear)!r} has other uses"
            if (p := const_problem(node.inputs[k], f"{what}'s bias")) is not None:
                return p
            if not broadcasts_on_last_axis(node.inputs[k].const_value.shape, channels):
                return f"{what}'s constant {node.inputs[k].name!r} is not per channel (last axis)"
            found = _linear_producer(linear, channels)
            if isinstance(found, str):
                return found
            return linear, [*found[1], (node, k)], linear
    return (f"tensor {tensor.name!r} comes from {what}, which cannot absorb a per-channel scale "
            "exactly (supported: LayerNormalization, RMSNormalization, Mul by a constant, "
            "MatMul/Gemm with a constant weight and bias)")


def find_smoothing_groups(
    model: ir.Model, config: SmoothQuantConfig | None = None
) -> tuple[list[SmoothingGroup], dict[str, str]]:
    """Every smoothable tensor with its producer and consumers, and why others were refused.

    Candidates are the first inputs of MatMul/Gemm nodes with a constant weight; ``skipped`` is
    keyed by tensor name.
    """
    config = config or SmoothQuantConfig()
    selector = NodeSelector((), config.exclude)
    groups: list[SmoothingGroup] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or w.const_value is None or node.inputs[0] is None:
            continue
        tensor = node.inputs[0]
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        found = _build_group(tensor, selector)
        if isinstance(found, str):
            skipped[tensor.name] = found
        else:
            groups.append(found)
    return groups, skipped


def _build_group(tensor: ir.Value, selector: NodeSelector) -> SmoothingGroup | str:
    if tensor.producer() is None:
        return f"tensor {tensor.name!r} is a graph input: no op before it can absorb the scale"
    if tensor.is_graph_output():
        return f"tensor {tensor.name!r} is a graph output"
    if tensor.dtype is not None and tensor.dtype != ir.DataType.FLOAT:
        return f"tensor {tensor.name!r} is not float32"
    consumers: list[ir.Node] = []
    channels: int | None = None
    for use in tensor.uses():
        if (p := _consumer_problem(use.node, use.idx, tensor)) is not None:
            return p
        if selector.excluded(use.node.name or "", use.node.op_type):
            return f"consumer {node_label(use.node)!r} is excluded by the selection"
        n = _consumer_channels(use.node)
        if channels is not None and n != channels:
            return f"the consumers of {tensor.name!r} disagree on its channel count ({channels} vs {n})"
        channels = n
        if use.node not in consumers:
            consumers.append(use.node)
    assert channels is not None
    found = _producer(tensor, channels)
    if isinstance(found, str):
        return found
    producer, divide, weight = found
    if selector.excluded(producer.name or "", producer.op_type):
        return f"producer {node_label(producer)!r} is excluded by the selection"
    return SmoothingGroup(tensor, producer, consumers, channels, divide, weight)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


class _ChannelStats:
    """Streaming per-channel min/max of a [..., C] tensor plus a uniform sample of its rows."""

    def __init__(self, channels: int, rows: int, rng: np.random.Generator) -> None:
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.rows = rows
        self.rng = rng
        self.keys = np.empty(0)
        self.sample = np.empty((0, channels), np.float32)

    def update(self, array: np.ndarray) -> None:
        rows = np.asarray(array, np.float32).reshape(-1, self.min.shape[0])
        if not np.isfinite(rows).all():
            raise ValueError("holds NaN or Inf")
        self.min = np.minimum(self.min, rows.min(axis=0))
        self.max = np.maximum(self.max, rows.max(axis=0))
        keys = np.concatenate([self.keys, self.rng.random(rows.shape[0])])
        sample = np.concatenate([self.sample, rows])
        if keys.shape[0] > self.rows:  # keep the rows with the largest random keys: a uniform sample
            keep = np.argpartition(-keys, self.rows - 1)[: self.rows]
            keys, sample = keys[keep], sample[keep]
        self.keys, self.sample = keys, sample

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.min), np.abs(self.max))


def _collect(
    model: ir.Model, groups: Sequence[SmoothingGroup], data: Dataset, config: SmoothQuantConfig,
    progress: Callable[[int], object] | None,
) -> tuple[dict[str, _ChannelStats], int]:
    names = [g.tensor.name for g in groups]
    rng = np.random.default_rng(config.seed)
    stats = {g.tensor.name: _ChannelStats(g.channels, config.search_rows, rng) for g in groups}
    feeds = 0
    for values in stream_values(model, names, data, max_feeds=config.max_samples):
        for name, value in values.items():
            if value.shape[-1] != stats[name].min.shape[0]:
                raise DataError(f"smoothquant: tensor {name!r} has {value.shape[-1]} channels on its last axis, "
                                f"expected {stats[name].min.shape[0]}")
            try:
                stats[name].update(value)
            except ValueError as exc:
                raise DataError(f"smoothquant: tensor {name!r} on feed {feeds}: {exc}") from None
        feeds += 1
        if progress is not None:
            progress(feeds)
    return stats, feeds


# ----------------------------------------------------------------------------------------------
# Simulated quantization error
# ----------------------------------------------------------------------------------------------


def _consumer_matrix(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The weight as ``[C, outputs]``: row j multiplies input channel j."""
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return w.T if trans_b is not None and trans_b.as_int() else w
    return np.moveaxis(w, -2, 0).reshape(w.shape[-2], -1)


def _simulated_error(
    stats: _ChannelStats, weights: Sequence[np.ndarray], s: np.ndarray, config: SmoothQuantConfig
) -> float:
    """Mean over consumers of ||Q(X/s) Q(sW) - XW||^2 / ||XW||^2 on the sampled rows."""
    x = stats.sample.astype(np.float64)
    lo = float(np.min(stats.min / s))
    hi = float(np.max(stats.max / s))
    scale, zp = compute_scale_zero_point(lo, hi, config.activation_type, config.activation_symmetric)
    xq = dequantize(quantize(x / s, scale, zp, config.activation_type), scale, zp).astype(np.float64)
    axis = 1 if config.per_channel else None
    errors = []
    for w in weights:
        q, w_scale, w_zp = quantize_weight(w * s[:, None], "int8", axis=axis, symmetric=True,
                                           reduce_range=config.reduce_weights)
        wq = dequantize(q, w_scale, w_zp, axis=axis).astype(np.float64)
        ref = x @ w
        errors.append(float(np.sum((xq @ wq - ref) ** 2) / max(float(np.sum(ref**2)), 1e-30)))
    return float(np.mean(errors))


def _db(error: float) -> float:
    return -10.0 * math.log10(error) if error > 0 else math.inf


# ----------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------


class SmoothQuantPass(CompressionPass[SmoothQuantConfig]):
    """Fold SmoothQuant scales into producers and MatMul/Gemm weights (see module docstring).

    Args:
        config: a :class:`SmoothQuantConfig`.
        data: calibration data (anything :func:`onnxcomp.data.load_data` reads, or a Dataset).
        progress: called with the number of feeds read while collecting statistics.

    Exact in float. Statistics: ``smoothed``, ``groups`` (tensor, producer, consumers, chosen
    ``alpha``, simulated int8 SQNR with and without smoothing, ``search`` SQNR per alpha, scale
    range, activation outlier ratio max/median of max|X_j| before and after), ``skipped`` (reason
    per tensor), ``feeds``, ``initializers_written``.
    """

    config_class = SmoothQuantConfig

    def __init__(
        self,
        config: SmoothQuantConfig | None = None,
        data: DataSource | Dataset | None = None,
        *,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        super().__init__(config)
        if data is None:
            raise ConfigError("SmoothQuantPass needs calibration data (activation statistics)")
        self.data = data
        self.progress = progress

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        groups, skipped = find_smoothing_groups(model, cfg)
        if not groups:
            return False, {"smoothed": 0, "groups": [], "skipped": skipped, "feeds": 0, "initializers_written": []}
        data = load_data(self.data, model)
        stats, feeds = _collect(model, groups, data, cfg, self.progress)
        editor = ConstantEditor(model.graph)
        # every scale from the original weights first: a MatMul can be a consumer in one group
        # and the producer of another; the two rescalings act on different axes and commute.
        plans = []
        for group in groups:
            weights = [c.inputs[1].const_value.numpy().astype(np.float64) for c in group.consumers]
            w_absmax = np.zeros(group.channels)
            for consumer, w in zip(group.consumers, weights):
                w_absmax = np.maximum(w_absmax, consumer_in_absmax(consumer, w))
            matrices = [_consumer_matrix(c, w) for c, w in zip(group.consumers, weights)]
            plans.append(self._choose(group, stats[group.tensor.name], w_absmax, matrices))
        described = []
        for group, (s, entry) in zip(groups, plans):
            if s is None:
                skipped[group.tensor.name] = entry["reason"]
                continue
            self._rescale(group, s, editor)
            described.append(entry)
        written = editor.commit("smoothed") if described else []
        return bool(written), {
            "smoothed": len(described),
            "groups": described,
            "skipped": skipped,
            "feeds": feeds,
            "initializers_written": written,
        }

    def _choose(
        self, group: SmoothingGroup, stats: _ChannelStats, w_absmax: np.ndarray, matrices: list[np.ndarray]
    ) -> tuple[np.ndarray | None, dict[str, Any]]:
        cfg = self.config
        x_absmax = stats.absmax
        baseline = _simulated_error(stats, matrices, np.ones(group.channels), cfg)
        tried: dict[str, float] = {}
        if cfg.search:
            best_alpha, best_error = None, math.inf
            for alpha in cfg.alphas:
                error = _simulated_error(stats, matrices, smoothing_scales(x_absmax, w_absmax, alpha), cfg)
                tried[f"{alpha:g}"] = _db(error)
                if error < best_error:
                    best_alpha, best_error = alpha, error
            alpha = float(best_alpha)
        else:
            alpha = cfg.alpha
            best_error = _simulated_error(stats, matrices, smoothing_scales(x_absmax, w_absmax, alpha), cfg)
        s = smoothing_scales(x_absmax, w_absmax, alpha)
        after = x_absmax / s
        entry = {
            **group.describe(),
            "alpha": alpha,
            "simulated_sqnr_db": _db(best_error),
            "simulated_sqnr_unsmoothed_db": _db(baseline),
            "search": tried,
            "scale_min": float(s.min()),
            "scale_max": float(s.max()),
            "outlier_ratio_before": _outlier_ratio(x_absmax),
            "outlier_ratio_after": _outlier_ratio(after),
        }
        if cfg.search and cfg.require_improvement and best_error >= baseline:
            entry["reason"] = (
                f"smoothing does not reduce the simulated int8 error (best alpha {alpha:g}: "
                f"{_db(best_error):.1f} dB, without: {_db(baseline):.1f} dB)"
            )
            return None, entry
        return s, entry

    @staticmethod
    def _rescale(group: SmoothingGroup, s: np.ndarray, editor: ConstantEditor) -> None:
        for node, idx in group.divide:
            editor.set(node, idx, expand_last_axis(editor.array(node, idx), group.channels) / s)
        if group.weight is not None:
            w = editor.array(group.weight, 1)
            editor.set(group.weight, 1, scale_along(w, producer_out_axis(group.weight) % w.ndim, 1.0 / s))
        for consumer in group.consumers:
            editor.set(consumer, 1, scale_consumer_inputs(consumer, editor.array(consumer, 1), s))


def _outlier_ratio(absmax: np.ndarray) -> float:
    """max over channels of max|X_j| divided by its median: how far the outliers stick out."""
    median = float(np.median(absmax))
    return float(absmax.max() / median) if median > 0 else math.inf
