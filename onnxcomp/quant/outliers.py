r"""Outlier channels split off a MatMul's input before static int8 (a static LLM.int8() decomposition).

Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale": a few
input channels of a transformer's MatMuls hold values far larger than the rest, and one 8-bit grid
over the whole tensor spends its range on them. On all-MiniLM-L6-v2 the feed-forward output
projection of layers 0-3 reads a GELU output in which one or two channels reach 14-25 while the
other 1535 stay under about 6: the tensor keeps 20-25 dB on its calibrated 8-bit grid, below the
static plan's coarse-grid floor (onnxcomp.quant.static.MIN_GRID_SQNR_DB), so those MatMuls stayed
float.

For a MatMul :math:`Y = X W` (``X`` of shape ``[..., K]``, ``W`` a constant ``[K, N]``) and a set
:math:`O` of outlier channels, with :math:`[l, h]` the calibrated range of the other channels and
:math:`W'` the weight with the rows :math:`O` set to zero,

.. math:: Y = \mathrm{clip}(X, l, h)\,W' + X_O\,W_O

(:math:`X_O` = Gather of the channels :math:`O` on the last axis, :math:`W_O` the rows :math:`O`
of ``W``). This is exact wherever the ordinary channels stay inside :math:`[l, h]`, which is
where the int8 grid of the first term saturates them anyway. The first term is what static
quantization sees: its input's range is the ordinary channels', so its grid is as fine as theirs
(+6 to +12 dB on MiniLM), and onnxruntime folds the Clip into the QuantizeLinear that follows it.
Zeroing the rows matters as much: an outlier channel meets a large weight (7.9 in layer 0's row,
where a column's largest weight is typically 0.19), and that one entry would set its column's
per-channel weight scale. The second term is float work of size ``[..., |O|] x [|O|, N]``
(|O| <= ``max_channels``) and an Add on the output; its nodes carry
:data:`onnxcomp.quant.qdq.KEEP_FLOAT_KEY`, which the static plan honours.

**Statistics.** The candidates' per-channel minima and maxima are streamed over the calibration
feeds; channels are taken in order of their largest magnitude. On the first ``sample_feeds``
feeds, the 8-bit grid's SQNR of the split (error: the grid's rounding of the clipped ordinary
channels, their clipping included; the split channels are exact) is measured for 0 to
``max_channels`` channels split, and at most one per :data:`CHANNELS_PER_SPLIT` input channels (a
narrow MatMul is not split at all). A tensor is split only where the whole-range grid keeps less
than ``min_db`` (the plan would keep its readers float), or less than ``below_db`` when that is
set (higher: tensors the plan would quantize on their whole range), with the fewest channels reaching
``target_db``, or the best count if that still reaches ``min_db``; otherwise it is left alone,
with the reason.

**Off by default** (``QuantizeConfig.split_outliers``): on an AVX-512 VNNI CPU it takes static
int8 on all-MiniLM-L6-v2 from 1.61x to 2.60x fp32 at batch 8 x 128 tokens (1.98x to 3.10x at
batch 1, 28.9 to 22.2 MB) and on all-mpnet-base-v2 from 2.06x to 3.77x, but it costs nearest-
neighbour agreement on every tuning-split configuration measured (0.3 to 2.1 points; 4.5 on an
AVX2 CPU with 7-bit weights), so it is a speed option, not a default (benchmarks/RESULTS.md,
ninth and tenth sessions). Where that cost lies (eleventh session, MiniLM tune split): four fifths is
the uint8 rounding of the ordinary channels on their 30-31 dB grid (the clip costs nothing, the
zeroed-row weights a sixth), spread over the four layers. A long tail of channels at 4-6 caps
what more split channels buy: ``max_channels=64`` at the best count (QuantizeConfig's
``split_outliers_channels`` / ``split_outliers_target_db``) gains 4-5 dB and halves the cost in
cosine, without bringing nearest-neighbour agreement back.

**Eligible** (analysis): a float32 tensor of the main graph, not a graph output, every reader a
main-graph MatMul reading it as its first input with a 2-D constant float32 weight, allowed by the
selection. A reader whose output is a graph output is refused (the correction Add would rename
it). The correction is added after the reader's bias Add when it has one (a constant operand), so
that MatMul + bias still fuse into one int8 kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxcomp.bounds import Range
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError
from onnxcomp.graph import add_initializer, all_value_names, stream_values, unique_name
from onnxcomp.ops import is_add_node, is_matmul_node
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.quant.primitives import compute_scale_zero_point, dequantize, quantize
from onnxcomp.quant.qdq import KEEP_FLOAT_KEY
from onnxcomp.selection import NodeSelector

__all__ = ["OutlierSplitConfig", "OutlierSplitPass", "split_candidates", "split_outliers", "split_note"]

_RANGES = {
    "max_channels": Range(int, 1, 64),
    "min_db": Range(float, 0.0, 200.0),
    "target_db": Range(float, 0.0, 200.0),
    "below_db": Range(float, 0.0, 200.0),
    "sample_feeds": Range(int, 1),
}


@dataclasses.dataclass(frozen=True)
class OutlierSplitConfig(PassConfig):
    """Attributes:
        max_channels: most channels split off one tensor.
        min_db: split only a tensor whose whole-range 8-bit grid keeps less than this (the static
            plan's coarse-grid floor), and only if the split reaches it.
        target_db: the fewest channels whose split reaches this are taken.
        below_db: split only a tensor whose whole-range 8-bit grid keeps less than this (None:
            ``min_db``): above ``min_db``, a tensor the plan would quantize anyway gets the finer
            grid of its ordinary channels too.
        sample_feeds: calibration feeds the grids' SQNR is measured on.
        activation_type / activation_symmetric / reduce_activations: the grid, as the static pass
            will build it.
        exclude / op_types: the static pass's node selection.
    """

    stage: ClassVar[str] = "outlier split"
    ranges: ClassVar[Mapping[str, Range]] = _RANGES

    max_channels: int = 8
    min_db: float = 25.0
    target_db: float = 30.0
    below_db: float | None = None
    sample_feeds: int = 32
    activation_type: str = "uint8"
    activation_symmetric: bool = False
    reduce_activations: bool = False
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.target_db < self.min_db:
            raise ConfigError(f"outlier split: target_db ({self.target_db}) is below min_db ({self.min_db})")
        if self.below_db is not None and self.below_db < self.min_db:
            raise ConfigError(f"outlier split: below_db ({self.below_db}) is below min_db ({self.min_db})")


def split_candidates(model: ir.Model, selector: NodeSelector) -> dict[ir.Value, list[ir.Node]]:
    """Eligible tensors (module docstring) -> the MatMuls reading them."""
    outputs = {v.name for v in model.graph.outputs}
    found: dict[ir.Value, list[ir.Node]] = {}
    seen: set[int] = set()
    for node in model.graph:
        if not is_matmul_node(node) or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        if id(x) in seen:
            continue
        seen.add(id(x))
        readers = [use.node for use in x.uses()]
        if x.name in outputs or x.dtype not in (ir.DataType.FLOAT, None):
            continue
        if all(r.graph is model.graph and _eligible_reader(r, x, outputs, selector) for r in readers):
            found[x] = readers
    return found


def _eligible_reader(node: ir.Node, x: ir.Value, outputs: set[str], selector: NodeSelector) -> bool:
    if not is_matmul_node(node) or len(node.inputs) != 2 or node.inputs[0] is not x or node.inputs[1] is x:
        return False
    w = node.inputs[1]
    if w is None or w.const_value is None or w.dtype != ir.DataType.FLOAT or len(w.const_value.shape) != 2:
        return False
    if x.shape is not None and x.shape.dims and x.shape[-1] != w.const_value.shape[0]:
        return False
    if not selector.allows(node.name or "", node.op_type):
        return False
    return _output_end(node).name not in outputs


def _channels(readers: list[ir.Node]) -> int:
    """The input's last dimension, read off the first reader's weight."""
    return int(readers[0].inputs[1].const_value.shape[0])


def _output_end(node: ir.Node) -> ir.Value:
    """The value the correction is added to: the MatMul's output, or its bias Add's."""
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) == 1 and is_add_node(uses[0].node):
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx] if len(add.inputs) == 2 else None
        if other is not None and other.const_value is not None:
            return add.outputs[0]
    return y


#: At least this many input channels per channel split off (a MatMul over 8 channels splits none).
CHANNELS_PER_SPLIT = 16


class _Extents:
    """Per-channel min / max of one tensor over the feeds (last axis)."""

    def __init__(self, channels: int) -> None:
        self.lo = np.full(channels, np.inf)
        self.hi = np.full(channels, -np.inf)

    def update(self, x: np.ndarray) -> None:
        flat = np.asarray(x, np.float32).reshape(-1, self.lo.size)
        if flat.size:
            self.lo = np.minimum(self.lo, flat.min(axis=0))
            self.hi = np.maximum(self.hi, flat.max(axis=0))


def _grid_error(x: np.ndarray, lo: float, hi: float, split: np.ndarray, config: OutlierSplitConfig) -> float:
    """Squared error of ``x`` through the split: the grid over [lo, hi] on the clipped tensor, the
    channels in ``split`` exact (the float correction)."""
    scale, zp = compute_scale_zero_point(lo, hi, config.activation_type, config.activation_symmetric,
                                         config.reduce_activations)
    clipped = np.clip(x, lo, hi)
    approx = dequantize(quantize(clipped, scale, zp, config.activation_type), scale, zp).astype(np.float64)
    if split.size:
        approx[..., split] = x[..., split]
    return float(np.square(approx - x).sum())


class OutlierSplitPass(CompressionPass[OutlierSplitConfig]):
    """Split the outlier channels of eligible MatMul inputs off into a float correction (module
    docstring). Exact in float on data whose ordinary channels stay inside their calibrated range
    (tested to 1e-5 against onnxruntime). Leaves alone tensors whose whole-range grid is already
    fine (nothing to gain) and, with the reason in ``stats["left"]``, tensors no split of up to
    ``max_channels`` channels brings to ``min_db`` (too many outliers: the static plan then keeps
    their readers float, as without this pass)."""

    config_class = OutlierSplitConfig
    min_opset = 13

    def __init__(self, config: OutlierSplitConfig | None, data: Dataset) -> None:
        super().__init__(config)
        self.data = data

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        candidates = split_candidates(model, NodeSelector(cfg.op_types, cfg.exclude))
        limits = {x.name: min(cfg.max_channels, _channels(readers) // CHANNELS_PER_SPLIT)
                  for x, readers in candidates.items()}
        candidates = {x: readers for x, readers in candidates.items() if limits[x.name] > 0}
        if not candidates:
            return False, {"split": {}, "left": {}}
        extents = {x.name: _Extents(_channels(candidates[x])) for x in candidates}
        for values in stream_values(model, list(extents), self.data):
            for name, v in values.items():
                extents[name].update(v)
        orders = {name: np.argsort(-np.maximum(np.abs(e.lo), np.abs(e.hi)), kind="stable")
                  for name, e in extents.items()}
        power = dict.fromkeys(extents, 0.0)
        noise = {name: np.zeros(limits[name] + 1) for name in extents}
        for values in stream_values(model, list(extents), self.data, max_feeds=cfg.sample_feeds):
            for name, v in values.items():
                x = np.asarray(v, np.float32)
                power[name] += float(np.square(x, dtype=np.float64).sum())
                for n in range(limits[name] + 1):
                    lo, hi = self._rest_range(extents[name], orders[name][:n])
                    noise[name][n] += _grid_error(x, lo, hi, orders[name][:n], cfg)
        split: dict[str, Any] = {}
        left: dict[str, str] = {}
        chosen: dict[ir.Value, tuple[np.ndarray, float, float]] = {}
        for x in candidates:
            db = [10 * np.log10(power[x.name] / e) if e > 0 else np.inf for e in noise[x.name]]
            if db[0] >= (cfg.min_db if cfg.below_db is None else cfg.below_db):
                continue  # the whole-range grid is fine: nothing to do (not worth a line)
            reaching = [n for n in range(1, len(db)) if db[n] >= cfg.target_db]
            n = reaching[0] if reaching else int(np.argmax(db[1:])) + 1
            if db[n] < cfg.min_db:
                left[x.name] = (f"{db[0]:.1f} dB on its 8-bit grid; splitting up to {len(db) - 1} channels "
                                f"reaches only {max(db[1:]):.1f} dB")
                continue
            channels = np.sort(orders[x.name][:n])
            lo, hi = self._rest_range(extents[x.name], orders[x.name][:n])
            chosen[x] = (channels, lo, hi)
            split[x.name] = {"channels": [int(c) for c in channels], "of": _channels(candidates[x]),
                             "range": [lo, hi], "grid_db_before": round(float(db[0]), 2), "grid_db_after": round(float(db[n]), 2),
                             "readers": [r.name for r in candidates[x]]}
        for x, (channels, lo, hi) in chosen.items():
            split[x.name]["nodes"] = _rewrite(model.graph, x, candidates[x], channels, lo, hi)
        if chosen:
            model.graph.sort()
        return bool(chosen), {"split": split, "left": left}

    @staticmethod
    def _rest_range(extent: _Extents, split: np.ndarray) -> tuple[float, float]:
        keep = np.ones(extent.lo.size, bool)
        keep[split] = False
        lo, hi = float(min(extent.lo[keep].min(), 0.0)), float(max(extent.hi[keep].max(), 0.0))
        return lo, hi


def split_outliers(model: ir.Model, data: Dataset, config: Any, min_db: float) -> dict[str, Any] | None:
    """The pass as a :class:`~onnxcomp.quant.config.QuantizeConfig` asks for it (``split_outliers``,
    its activation grid and selection), in place, with ``min_db`` the static plan's coarse-grid
    floor (onnxcomp.quant.static.MIN_GRID_SQNR_DB); its statistics, or None when it found nothing
    to split and nothing it had to leave."""
    if not config.split_outliers:
        return None
    floor = min(max(min_db, 0.0), 200.0)  # tests move the floor out of range to turn the rule off
    below = config.split_outliers_below_db
    split = OutlierSplitConfig(min_db=floor, max_channels=config.split_outliers_channels,
                               target_db=max(floor, config.split_outliers_target_db),
                               below_db=None if below is None else max(floor, below),
                               activation_type=config.activation_type,
                               activation_symmetric=config.activation_symmetric,
                               reduce_activations=config.mode == "static" and config.reduce_activations,
                               exclude=config.exclude, op_types=config.op_types)
    stats = OutlierSplitPass(split, data)(model).stats
    return stats if stats["split"] or stats["left"] else None


def split_note(split: Mapping[str, Any]) -> str:
    """One note line for the report's ``split`` section."""
    counts = [len(e["channels"]) for e in split.values()]
    before = [e["grid_db_before"] for e in split.values()]
    after = [e["grid_db_after"] for e in split.values()]
    return (f"{len(split)} MatMul input(s) had {_span(counts, '{}')} outlier channel(s) split off into a float "
            f"correction ({_span(before, '{:.1f}')} -> {_span(after, '{:.1f}')} dB on their 8-bit grids), so their "
            "readers run in int8 (split_outliers)")


def _span(values: list, fmt: str) -> str:
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def _mark(node: ir.Node, why: str) -> ir.Node:
    node.metadata_props[KEEP_FLOAT_KEY] = why
    return node


def _rewrite(graph: ir.Graph, x: ir.Value, readers: list[ir.Node], channels: np.ndarray, lo: float, hi: float
             ) -> list[str]:
    """Insert the clip and the correction for ``x`` (module docstring); the new nodes' names."""
    taken = all_value_names(graph)
    why = "outlier-channel correction: stays float (onnxcomp.quant.outliers)"
    base = x.name or "x"
    lo_v = add_initializer(graph, f"{base}_split_lo", np.array(lo, np.float32), taken)
    hi_v = add_initializer(graph, f"{base}_split_hi", np.array(hi, np.float32), taken)
    idx_v = add_initializer(graph, f"{base}_split_channels", channels.astype(np.int64), taken)
    shape = list(x.shape) if x.shape is not None and x.shape.dims else None

    def node(op: str, inputs: list[ir.Value], name: str, dims: list | None, attributes: dict | None = None,
             mark: bool = True) -> ir.Value:
        made = ir.node(op, inputs, attributes=attributes or {}, name=unique_name(graph, name, taken))
        out = made.outputs[0]
        out.name = unique_name(graph, f"{name}_out", taken)
        out.dtype = ir.DataType.FLOAT
        out.shape = ir.Shape(dims) if dims is not None else None
        graph.append(_mark(made, why) if mark else made)
        created.append(made.name)
        return out

    created: list[str] = []
    clipped = node("Clip", [x, lo_v, hi_v], f"{base}_split_clip", shape, mark=False)
    part = None if shape is None else [*shape[:-1], int(channels.size)]
    picked = node("Gather", [x, idx_v], f"{base}_split_gather", part, {"axis": -1})
    for reader in readers:
        w_value = reader.inputs[1]
        w = w_value.const_value.numpy()
        rest = w.copy()
        rest[channels] = 0
        end = _output_end(reader)
        uses = list(end.uses())
        out_dims = list(end.shape) if end.shape is not None else None
        w_o = add_initializer(graph, f"{w_value.name}_split_rows", np.ascontiguousarray(w[channels]), taken)
        correction = node("MatMul", [picked, w_o], f"{reader.name}_split_correction", out_dims)
        total = node("Add", [end, correction], f"{reader.name}_split_add", out_dims)
        for use in uses:
            use.node.replace_input_with(use.idx, total)
        reader.replace_input_with(0, clipped)
        reader.replace_input_with(1, add_initializer(graph, f"{w_value.name}_split_rest", rest, taken))
        if not w_value.uses() and graph.initializers.get(w_value.name or "") is w_value:
            del graph.initializers[w_value.name]
    return created
