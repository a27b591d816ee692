"""How to score channels: a registry of importance functions, one coupled group in, one score per channel out.

An :class:`Importance` scores every channel of a :class:`~onnxcomp.analysis.channels.ChannelGroup`
(higher = more important). Weight-based ones read the group's producer and consumer slices;
data-based ones first gather statistics for all groups in one streamed pass (``prepare``) and then
score each group from them. ``PruneConfig.criterion`` names a registered importance; a new one
is a function and one :func:`register_importance` call.

Shipped: ``l1`` / ``l2`` (weight magnitude over the whole group), ``bn`` (BatchNorm |gamma|, else
``l1``), ``activation`` (mean |activation| on calibration data, else ``l1``), ``obs`` (greedy structured
Optimal Brain Surgeon on the consumers' input Gram, :mod:`onnxcomp.prune.obs`) and ``zeros`` (scores as
``l1``; the selection then removes exactly the constant channels, see
:func:`onnxcomp.prune.select.select_channels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.channels import ChannelGroup, Member
from onnxcomp.data import Dataset
from onnxcomp.graph import stream_values

__all__ = ["Importance", "IMPORTANCES", "register_importance", "get_importance", "group_scores",
           "group_scores_and_state", "channel_scores", "zero_channels", "activation_means"]


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
    """One importance score per channel of ``group`` (higher = more important), for one group.

    A data-based criterion takes its statistics for this group as ``activation``.
    """
    importance = get_importance(criterion)
    if importance.prepare is not None:
        if activation is None:
            raise ValueError(f"group {group.id}: the {criterion} criterion needs calibration statistics")
        return importance.score(group, {group.id: activation})
    return importance.score(group, None)


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


@dataclasses.dataclass(frozen=True)
class Importance:
    """A channel scoring rule.

    Attributes:
        name: the ``criterion`` that selects it.
        score: ``score(group, state) -> array[group.size]``; ``state`` is what ``prepare`` returned
            (None without ``prepare``).
        prepare: ``prepare(model, groups, data) -> state``, statistics for all groups at once.
        needs_data: the importance needs calibration data (``prepare`` gets a Dataset).
    """

    name: str
    score: Callable[[ChannelGroup, Any], np.ndarray]
    prepare: Callable[[ir.Model, list[ChannelGroup], Dataset | None], Any] | None = None
    needs_data: bool = False


#: criterion name -> importance
IMPORTANCES: dict[str, Importance] = {}


def register_importance(importance: Importance) -> Importance:
    """Add (or replace) an importance under its name; returns it."""
    IMPORTANCES[importance.name] = importance
    return importance


def get_importance(name: str) -> Importance:
    """The registered importance ``name`` (KeyError naming the known ones otherwise)."""
    try:
        return IMPORTANCES[name]
    except KeyError:
        raise KeyError(f"no prune importance {name!r}; registered: {', '.join(IMPORTANCES)}") from None


def group_scores(
    model: ir.Model, groups: Iterable[ChannelGroup], criterion: str, data: Dataset | None = None
) -> dict[int, np.ndarray]:
    """Group id -> one score per channel, by the importance ``criterion``."""
    return group_scores_and_state(model, groups, criterion, data)[0]


def group_scores_and_state(
    model: ir.Model, groups: Iterable[ChannelGroup], criterion: str, data: Dataset | None = None
) -> tuple[dict[int, np.ndarray], Any]:
    """:func:`group_scores` and the importance's prepared statistics (``obs``: damage curves)."""
    importance = get_importance(criterion)
    groups = list(groups)
    state = importance.prepare(model, groups, data) if importance.prepare is not None else None
    return {g.id: importance.score(g, state) for g in groups}, state


def _weight_norm(power: int) -> Callable[[ChannelGroup, Any], np.ndarray]:
    def score(group: ChannelGroup, _state: Any = None) -> np.ndarray:
        total = np.zeros(group.size)
        for m in (*group.producers, *group.consumers):
            total += (np.abs(_slices(m, group.size)) ** power).sum(axis=1)
        return total

    return score


def _bn_gamma(group: ChannelGroup, _state: Any = None) -> np.ndarray:
    gammas = [m for m in group.params if m.node.op_type == "BatchNormalization" and m.input_index == 1]
    if not gammas:
        return _weight_norm(1)(group)
    return sum(np.abs(_slices(m, group.size)).sum(axis=1) for m in gammas)


def _activation(group: ChannelGroup, means: dict[int, np.ndarray]) -> np.ndarray:
    found = means.get(group.id)
    return found if found is not None else _weight_norm(1)(group)


def _activation_prepare(model: ir.Model, groups: list[ChannelGroup], data: Dataset | None) -> dict[int, np.ndarray]:
    if data is None:
        raise ValueError("the activation criterion needs calibration statistics (data)")
    return activation_means(model, groups, data)


register_importance(Importance("l1", _weight_norm(1)))
register_importance(Importance("l2", _weight_norm(2)))
register_importance(Importance("bn", _bn_gamma))
register_importance(Importance("zeros", _weight_norm(1)))
register_importance(Importance("activation", _activation, prepare=_activation_prepare, needs_data=True))


def _register_obs() -> None:
    from onnxcomp.prune.obs import obs_prepare, obs_score

    l2 = _weight_norm(2)
    register_importance(Importance("obs", lambda group, states: obs_score(group, states, fallback=l2),
                                   prepare=obs_prepare, needs_data=True))


_register_obs()
