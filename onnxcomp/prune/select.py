r"""Scoring and selecting channels to prune (the statistics part of pruning).

Scores are computed per channel of a coupled group (:class:`~onnxcomp.analysis.channels.ChannelGroup`),
over every member of the group, so a residual stream or a Concat segment is judged as a whole:

* ``l1`` / ``l2``: :math:`s_c = \sum_{m} \lVert W_m[c] \rVert_1` (or :math:`\lVert\cdot\rVert_2^2`)
  over the producer output slices and consumer input slices of channel c;
* ``bn``: :math:`s_c = \sum |\gamma_c|` over the group's BatchNormalization scales (``l1`` when the
  group has none);
* ``activation``: mean :math:`|x_c|` over calibration data, averaged over the group's activation
  tensors (each normalized to mean 1 first), accumulated streaming;
* ``zeros``: channels whose every producer weight slice is exactly zero. Such a channel carries a
  constant (a bias, a BatchNorm shift, an activation of those), which the cut folds into the
  consumers' biases.

Selection removes ``floor(ratio * size)`` lowest-scoring channels of each group (``layer``
scope) or thresholds the group-normalized scores :math:`s_c / \bar s_g` of all groups together
(``global`` scope); the number kept is rounded up to a multiple of ``round_to`` and never below
``min_channels``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.channels import ChannelAnalysis, ChannelGroup, Member
from onnxcomp.data import Dataset
from onnxcomp.graph import stream_values
from onnxcomp.prune.config import PruneConfig
from onnxcomp.quant.config import NodeSelector

__all__ = ["eligible_groups", "channel_scores", "zero_channels", "activation_means", "select_channels"]


def eligible_groups(analysis: ChannelAnalysis, config: PruneConfig) -> tuple[list[ChannelGroup], dict[int, str]]:
    """Prunable groups not excluded by the config, and why the others are not pruned."""
    selector = NodeSelector((), config.exclude)
    eligible, skipped = [], {}
    for g in analysis.groups:
        if g.frozen:
            skipped[g.id] = "frozen: " + "; ".join(g.reasons[:3])
        elif g.size <= config.min_channels:
            skipped[g.id] = f"only {g.size} channel(s)"
        elif not g.producers and not g.consumers:
            skipped[g.id] = "no weights to cut"
        elif any(selector.excluded(m.node.name or "", m.node.op_type) for m in (*g.producers, *g.consumers)):
            skipped[g.id] = "excluded"
        elif any(e.input_index is None and e.attribute is None for e in g.shape_edits):
            skipped[g.id] = "feeds a Split with implicit sizes (not rewritten)"
        else:
            eligible.append(g)
    return eligible, skipped


def _slices(member: Member, size: int) -> np.ndarray:
    """Member tensor with the group's channels on axis 0: shape [size, -1]."""
    arr = member.value.const_value.numpy()
    moved = np.moveaxis(arr, member.axis, 0)
    part = moved[member.offset : member.offset + size * member.block]
    return part.reshape(size, -1).astype(np.float64)


def zero_channels(group: ChannelGroup) -> np.ndarray:
    """Channels whose weight slices in every producer are exactly zero (constant channels)."""
    if not group.producers:
        return np.zeros(0, dtype=np.int64)
    zero = np.ones(group.size, dtype=bool)
    for p in group.producers:
        zero &= ~np.any(_slices(p, group.size) != 0, axis=1)
    return np.flatnonzero(zero)


def channel_scores(group: ChannelGroup, criterion: str, activation: np.ndarray | None = None) -> np.ndarray:
    """One importance score per channel of ``group`` (higher = more important)."""
    if criterion == "activation":
        if activation is None:
            raise ValueError(f"group {group.id}: the activation criterion needs calibration statistics")
        return activation
    if criterion == "bn":
        gammas = [m for m in group.params if m.node.op_type == "BatchNormalization" and m.input_index == 1]
        if gammas:
            return sum(np.abs(_slices(m, group.size)).sum(axis=1) for m in gammas)
        criterion = "l1"
    power = 1 if criterion in ("l1", "zeros") else 2
    score = np.zeros(group.size)
    for m in (*group.producers, *group.consumers):
        score += (np.abs(_slices(m, group.size)) ** power).sum(axis=1)
    return score


def _activation_members(group: ChannelGroup) -> list[Member]:
    return [m for m in group.activations if m.value.producer() is not None]


def activation_means(
    model: ir.Model,
    groups: Iterable[ChannelGroup],
    data: Dataset,
    *,
    max_feeds: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict[int, np.ndarray]:
    """Mean |activation| per channel for each group, streamed over ``data`` (bounded memory)."""
    groups = list(groups)
    wanted = {m.value.name for g in groups for m in _activation_members(g)}
    if not wanted:
        return {}
    names = sorted(wanted)
    sums: dict[tuple[int, str], np.ndarray] = {}
    counts: dict[tuple[int, str], int] = {}
    for i, values in enumerate(stream_values(model, names, data, max_feeds=max_feeds)):
        for g in groups:
            for m in _activation_members(g):
                x = np.moveaxis(values[m.value.name], m.axis, 0)
                part = np.abs(x[m.offset : m.offset + g.size * m.block].reshape(g.size, -1), dtype=np.float64)
                key = (g.id, m.value.name)
                sums[key] = sums.get(key, 0.0) + part.sum(axis=1)
                counts[key] = counts.get(key, 0) + part.shape[1]
        if progress is not None:
            progress(i + 1)
    result = {}
    for g in groups:
        per_member = [sums[(g.id, m.value.name)] / counts[(g.id, m.value.name)] for m in _activation_members(g)]
        normalized = [v / max(float(v.mean()), 1e-30) for v in per_member]
        if normalized:
            result[g.id] = np.mean(normalized, axis=0)
    return result


def _keep_count(size: int, remove: int, config: PruneConfig) -> int:
    keep = size - remove
    keep = -(-keep // config.round_to) * config.round_to
    return int(min(size, max(keep, config.min_channels)))


def select_channels(
    groups: Iterable[ChannelGroup],
    config: PruneConfig,
    scores: Mapping[int, np.ndarray],
) -> dict[int, np.ndarray]:
    """Group id -> sorted channels to remove (lowest scores first to go), per the config."""
    groups = list(groups)
    removal: dict[int, np.ndarray] = {}
    if config.criterion == "zeros":
        for g in groups:
            zeros = zero_channels(g)
            keep = _keep_count(g.size, len(zeros), config)
            n = g.size - keep
            if n > 0:
                removal[g.id] = np.sort(zeros[:n])
        return removal
    if config.scope == "global":
        normalized = {g.id: scores[g.id] / max(float(np.mean(scores[g.id])), 1e-30) for g in groups}
        everything = np.concatenate([normalized[g.id] for g in groups]) if groups else np.zeros(0)
        if everything.size == 0:
            return removal
        threshold = np.quantile(everything, config.ratio) if config.ratio > 0 else -np.inf
        for g in groups:
            below = int(np.count_nonzero(normalized[g.id] < threshold))
            n = g.size - _keep_count(g.size, below, config)
            if n > 0:
                removal[g.id] = np.sort(np.argsort(normalized[g.id], kind="stable")[:n])
        return removal
    for g in groups:
        n = g.size - _keep_count(g.size, int(np.floor(config.ratio * g.size)), config)
        if n > 0:
            removal[g.id] = np.sort(np.argsort(scores[g.id], kind="stable")[:n])
    return removal
