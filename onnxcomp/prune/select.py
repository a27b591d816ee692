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

The scores come from the importance registry (:mod:`onnxcomp.prune.importance`). Selection removes ``floor(ratio * size)`` lowest-scoring channels of each group (``layer``
scope) or thresholds the group-normalized scores :math:`s_c / \bar s_g` of all groups together
(``global`` scope); the number kept is rounded up to a multiple of ``round_to`` and never below
``min_channels``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from onnxcomp.analysis.channels import ChannelAnalysis, ChannelGroup
from onnxcomp.prune.config import PruneConfig
from onnxcomp.prune.importance import activation_means, channel_scores, zero_channels
from onnxcomp.selection import NodeSelector

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
