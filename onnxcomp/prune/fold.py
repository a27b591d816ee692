r"""Cutting channels out of the graph (the rewrite part of pruning).

For every group and its removed channels :math:`R`, every constant slice the group indexes is
deleted: producer weight rows and biases, per-channel parameters (BatchNorm, broadcast
constants), consumer weight columns (at Concat offsets, in Flatten blocks); integers that depend
on the channel count (Reshape targets, Split sizes, the ``group`` of a depthwise Conv) are
rewritten; intermediate shapes are re-inferred.

**Folding removed channels into the consumers' biases.** A removed input channel :math:`i` of a
consumer contributes :math:`W_{:,i}\,x_i` to its output. When :math:`x_i` is a constant
:math:`v_i` (a channel whose producer weights are all zero still carries its bias, a BatchNorm
shift, or an activation of those), the contribution is moved into the bias:

.. math:: b' = b + \sum_{i \in R} W_{:,i}\, v_i

(for a Conv: :math:`b'_m = b_m + \sum_{i,k_h,k_w} W_{m,i,k_h,k_w} v_i`). This is exact for
Gemm/MatMul and for Conv without padding; a zero-padded Conv sees zeros instead of :math:`v_i` at
the border, so such channels are kept (or, with ``fold_border``, folded with the border error
reported). For lossy criteria the same formula with :math:`v_i = \mathbb{E}[x_i]` over calibration
data compensates the mean of the removed channels (first-order bias correction).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxcomp.analysis.channels import ChannelGroup, Consumer
from onnxcomp.data import Dataset
from onnxcomp.graph import add_initializer, all_value_names, infer_types, stream_values
from onnxcomp.ops import LINEAR_OPS

__all__ = ["InputStats", "consumer_input_stats", "cut_channels", "kept_output_channels"]


class InputStats:
    """Per-index mean, min and max of consumer input tensors along their channel axis."""

    def __init__(self) -> None:
        self.sum: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}
        self.min: dict[str, np.ndarray] = {}
        self.max: dict[str, np.ndarray] = {}

    def update(self, name: str, x: np.ndarray, axis: int) -> None:
        moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).astype(np.float64)
        self.sum[name] = self.sum.get(name, 0.0) + moved.sum(axis=1)
        self.count[name] = self.count.get(name, 0) + moved.shape[1]
        lo, hi = moved.min(axis=1), moved.max(axis=1)
        self.min[name] = np.minimum(self.min[name], lo) if name in self.min else lo
        self.max[name] = np.maximum(self.max[name], hi) if name in self.max else hi

    def mean(self, name: str) -> np.ndarray:
        return self.sum[name] / self.count[name]

    def constant(self, name: str, idx: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        """Which of ``idx`` hold one value everywhere (within ``tol`` relative)."""
        spread = self.max[name][idx] - self.min[name][idx]
        scale = np.maximum(np.abs(self.max[name][idx]), np.abs(self.min[name][idx]))
        return spread <= tol * np.maximum(scale, 1.0)


def _data_input(node: ir.Node, model: ir.Model) -> tuple[ir.Value, int]:
    spec = LINEAR_OPS.lookup(node, model)
    value = node.inputs[spec.data_input]
    rank = len(value.shape) if value.shape is not None else 2
    return value, spec.data_channel_axis % rank


def consumer_input_stats(
    model: ir.Model,
    groups: Iterable[ChannelGroup],
    data: Dataset,
    *,
    max_feeds: int | None = None,
) -> InputStats:
    """Statistics of every consumer's data input (streamed over ``data``)."""
    wanted: dict[str, int] = {}
    for g in groups:
        for c in g.consumers:
            value, axis = _data_input(c.node, model)
            wanted[value.name] = axis
    stats = InputStats()
    if not wanted:
        return stats
    for values in stream_values(model, list(wanted), data, max_feeds=max_feeds):
        for name, axis in wanted.items():
            stats.update(name, values[name], axis)
    return stats


def _compensation(node: ir.Node, model: ir.Model, consumer: Consumer, idx: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """Output-channel vector ``sum_i W[:, idx_i] * v_i`` for the consumer, or None if unsupported."""
    w = consumer.value.const_value.numpy().astype(np.float64)
    if node.op_type == "Conv":
        group = node.attributes.get("group")
        if group is not None and group.as_int() != 1:
            return None
        sel = np.take(w, idx, axis=1).reshape(w.shape[0], len(idx), -1)  # [M, |idx|, taps]: 1-D, 2-D, 3-D
        return np.einsum("mik,i->m", sel, v)
    if node.op_type in ("Gemm", "MatMul") and w.ndim == 2:
        sel = np.take(w, idx, axis=consumer.axis)
        out = v @ sel if consumer.axis == 0 else sel @ v
        if node.op_type == "Gemm":
            alpha = node.attributes.get("alpha")
            out = out * (alpha.as_float() if alpha is not None else 1.0)
        return out
    return None


def _has_padding(node: ir.Node) -> bool:
    if node.op_type != "Conv":
        return False
    pads = node.attributes.get("pads")
    auto = node.attributes.get("auto_pad")
    if auto is not None and auto.as_string() not in ("NOTSET", "VALID"):
        return True
    return pads is not None and any(p != 0 for p in pads.as_ints())


def _add_to_bias(graph: ir.Graph, node: ir.Node, model: ir.Model, delta: np.ndarray, taken: set[str]) -> None:
    spec = LINEAR_OPS.lookup(node, model)
    bias_role = spec.role("bias")
    if bias_role is not None:
        idx = bias_role.input_index
        if node.op_type == "Gemm":
            beta = node.attributes.get("beta")
            delta = delta / (beta.as_float() if beta is not None else 1.0)
        if idx < len(node.inputs) and node.inputs[idx] is not None and node.inputs[idx].const_value is not None:
            old = node.inputs[idx].const_value.numpy()
            new = (np.broadcast_to(old, delta.shape) + delta).astype(old.dtype) if old.size > 1 or old.ndim else (old + delta).astype(np.float32)
            fresh = add_initializer(graph, f"{node.name}_bias", np.asarray(new, np.float32), taken)
            node.replace_input_with(idx, fresh)
            return
        if idx >= len(node.inputs) or node.inputs[idx] is None:
            fresh = add_initializer(graph, f"{node.name}_bias", delta.astype(np.float32), taken)
            if idx >= len(node.inputs):
                node.resize_inputs(idx + 1)
            node.replace_input_with(idx, fresh)
            if node.op_type == "Gemm" and node.attributes.get("beta") is not None:
                node.attributes.pop("beta")
            return
    # MatMul (or a bias that is not a constant): add the constant after the node.
    out = node.outputs[0]
    uses = list(out.uses())
    const = add_initializer(graph, f"{node.name}_bias", delta.astype(np.float32), taken)
    add = ir.node("Add", [out, const], name=f"{node.name}_bias_add")
    graph.insert_after(node, add)
    result = add.outputs[0]
    result.dtype = out.dtype
    for use in uses:
        use.node.replace_input_with(use.idx, result)
    if out.is_graph_output():
        outputs = graph.outputs
        pos = [i for i, v in enumerate(outputs) if v is out]
        name = out.name
        out.name = f"{name}_before_bias"
        result.name = name
        for i in pos:
            outputs[i] = result
    else:
        result.name = f"{out.name}_biased"


def cut_channels(
    model: ir.Model,
    groups: Mapping[int, ChannelGroup],
    removal: Mapping[int, np.ndarray],
    *,
    stats: InputStats | None = None,
    constant: bool = False,
    fold_border: bool = False,
) -> dict[str, Any]:
    """Remove ``removal[g]`` channels of each group from ``model`` in place (see module doc).

    Args:
        groups: group id -> group (from an analysis of ``model``).
        stats: consumer input statistics; without them nothing is folded into biases.
        constant: the removed channels are constants (``zeros`` criterion): fold exactly, keep
            channels that cannot be folded exactly; otherwise fold means (compensation).
        fold_border: with ``constant``, fold into zero-padded Conv consumers anyway.

    Returns statistics: channels removed per group, channels kept back and why, border folds.
    """
    graph = model.graph
    taken = all_value_names(graph)
    removal = {gid: np.asarray(r, dtype=np.int64) for gid, r in removal.items() if len(r)}
    kept_back: dict[int, str] = {}
    border: list[str] = []
    deltas: dict[str, tuple[ir.Node, np.ndarray]] = {}
    unsupported: set[str] = set()
    if stats is not None:
        _keep_unfoldable(model, groups, removal, stats, constant, fold_border, kept_back, border)
        deltas, unsupported = _compensations(model, groups, removal, stats)
    _cut_slices(groups, removal)
    _fold_into_biases(model, groups, removal, deltas, taken)
    _edit_channel_counts(graph, groups, removal, taken)
    _reinfer(model)
    return {
        "removed": {gid: len(r) for gid, r in removal.items()},
        "kept_back": kept_back,
        "bias_folds": sorted(deltas),
        "border_error_folds": border,
        "no_compensation": sorted(unsupported),
    }


def _keep_unfoldable(
    model: ir.Model, groups: Mapping[int, ChannelGroup], removal: dict[int, np.ndarray], stats: InputStats,
    constant: bool, fold_border: bool, kept_back: dict[int, str], border: list[str],
) -> None:
    """Step 1: decide what folds (constant channels that reach a padded Conv are kept unless
    allowed); the channels kept leave ``removal`` and say why in ``kept_back``."""
    for gid, channels in list(removal.items()):
        g = groups[gid]
        refuse = np.zeros(len(channels), dtype=bool)
        for c in g.consumers:
            value, _ = _data_input(c.node, model)
            if value.name not in stats.sum:
                continue
            idx = c.indices(channels).reshape(len(channels), c.block)
            if constant:
                not_constant = ~stats.constant(value.name, idx.reshape(-1)).reshape(idx.shape).all(axis=1)
                refuse |= not_constant
                nonzero = np.abs(stats.mean(value.name)[idx]).max(axis=1) > 0
                if nonzero.any() and _compensation(c.node, model, c, idx.reshape(-1), stats.mean(value.name)[idx.reshape(-1)]) is None:
                    refuse |= nonzero  # a constant this consumer cannot absorb (grouped conv...)
                if _has_padding(c.node):
                    if fold_border:
                        if nonzero.any():
                            border.append(c.node.name)
                    else:
                        refuse |= nonzero
        if refuse.any():
            kept_back[gid] = (
                f"{int(refuse.sum())} constant channel(s) kept: not constant, read by a consumer that "
                "cannot absorb a constant (grouped Conv, ConvTranspose), or folding them into a "
                "zero-padded Conv would change its border (fold_border allows that)"
            )
            removal[gid] = channels[~refuse]
            if not len(removal[gid]):
                del removal[gid]


def _compensations(
    model: ir.Model, groups: Mapping[int, ChannelGroup], removal: Mapping[int, np.ndarray], stats: InputStats,
) -> tuple[dict[str, tuple[ir.Node, np.ndarray]], set[str]]:
    """Step 2: compensation into consumer biases, computed on the original weights (consumer name
    -> (node, bias delta)), and the consumers that cannot take one."""
    deltas: dict[str, tuple[ir.Node, np.ndarray]] = {}
    unsupported: set[str] = set()
    for gid, channels in removal.items():
        for c in groups[gid].consumers:
            value, _ = _data_input(c.node, model)
            if value.name not in stats.sum:
                continue
            idx = c.indices(channels)
            v = stats.mean(value.name)[idx]
            if not np.any(v):
                continue
            delta = _compensation(c.node, model, c, idx, v)
            if delta is None:
                unsupported.add(c.node.name)
                continue
            prev = deltas.get(c.node.name)
            deltas[c.node.name] = (c.node, delta if prev is None else prev[1] + delta)
    return deltas, unsupported


def _cut_slices(groups: Mapping[int, ChannelGroup], removal: Mapping[int, np.ndarray]) -> None:
    """Step 3: cut every constant slice (indices are relative to the original tensors: gather first)."""
    cuts: dict[tuple[int, int], tuple[ir.Value, int, list[np.ndarray]]] = {}
    for gid, channels in removal.items():
        for cut in groups[gid].tensor_cuts():
            key = (id(cut.value), cut.axis)
            cuts.setdefault(key, (cut.value, cut.axis, []))[2].append(cut.indices(channels))
    for value, axis, parts in cuts.values():
        arr = value.const_value.numpy()
        new = np.delete(arr, np.unique(np.concatenate(parts)), axis=axis)
        value.const_value = ir.tensor(np.ascontiguousarray(new), name=value.name)
        value.shape = ir.Shape(new.shape)


def _fold_into_biases(
    model: ir.Model, groups: Mapping[int, ChannelGroup], removal: Mapping[int, np.ndarray],
    deltas: Mapping[str, tuple[ir.Node, np.ndarray]], taken: set[str],
) -> None:
    """The bias deltas go into the consumers' biases; a consumer can also be a producer whose own
    output channels were just cut."""
    out_removed: dict[str, set[int]] = collections.defaultdict(set)
    for gid, channels in removal.items():
        for p in groups[gid].producers:
            out_removed[p.node.name].update(p.indices(channels).tolist())
    for name, (node, delta) in deltas.items():
        if out_removed.get(name):
            delta = np.delete(delta, sorted(out_removed[name]))
        _add_to_bias(model.graph, node, model, delta, taken)


def _edit_channel_counts(graph: ir.Graph, groups: Mapping[int, ChannelGroup], removal: Mapping[int, np.ndarray],
                         taken: set[str]) -> None:
    """Step 4: integers that depend on channel counts (each group's edit applied to the previous result)."""
    edits: dict[tuple[int, Any, Any, Any], list[tuple[Any, np.ndarray]]] = collections.defaultdict(list)
    for gid, channels in removal.items():
        for e in groups[gid].shape_edits:
            edits[(id(e.node), e.input_index, e.attribute, e.position)].append((e, channels))
    for items in edits.values():
        _apply_edit(graph, items, taken)


def _reinfer(model: ir.Model) -> None:
    """Step 5: shapes of intermediate values are re-inferred (after sorting and dropping dead nodes)."""
    outputs = {id(v) for v in model.graph.outputs}
    for node in model.graph:
        for v in node.outputs:
            if id(v) not in outputs:
                v.shape = None
    TopologicalSortPass()(model)
    RemoveUnusedNodesPass()(model)
    infer_types(model)


def _apply_edit(graph: ir.Graph, items: list[tuple[Any, np.ndarray]], taken: set[str]) -> None:
    edit = items[0][0]
    node = edit.node
    if edit.attribute is not None:
        attr = node.attributes[edit.attribute]
        if edit.position is None:
            value = attr.as_int()
            for e, channels in items:
                value = e.new_value(value, channels)
            node.attributes[edit.attribute] = ir.AttrInt64(edit.attribute, value)
        else:
            values = list(attr.as_ints())
            for e, channels in items:
                values[e.position] = e.new_value(values[e.position], channels)
            node.attributes[edit.attribute] = ir.AttrInt64s(edit.attribute, values)
        return
    if edit.input_index is not None:
        source = node.inputs[edit.input_index]
        arr = np.array(source.const_value.numpy(), copy=True)
        flat = arr.reshape(-1)
        for e, channels in items:
            flat[e.position] = e.new_value(int(flat[e.position]), channels)
        fresh = add_initializer(graph, f"{source.name}_pruned", arr, taken)
        node.replace_input_with(edit.input_index, fresh)
        return
    # Split with implicit sizes: write them explicitly.
    raise NotImplementedError(f"implicit Split sizes on {node.name!r} are not rewritten yet")


def kept_output_channels(groups: Mapping[int, ChannelGroup], removal: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
    """For nodes whose output channels ``removal`` cuts: the original output indices that remain
    (read from the producers' weights before the cut; depthwise producers pass channels through)."""
    removed: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    for gid, channels in removal.items():
        for p in groups[gid].producers:
            if p.depthwise:
                continue
            w = p.value.const_value.numpy()
            sizes[p.node.name] = w.shape[p.axis]
            removed.setdefault(p.node.name, set()).update(p.indices(channels).tolist())
    return {name: np.setdiff1d(np.arange(sizes[name]), sorted(idx)) for name, idx in removed.items()}

