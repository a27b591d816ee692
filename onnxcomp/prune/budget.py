r"""Per-group pruning ratios allocated to a target (latency, parameters or MACs) with the least damage.

Each eligible group ``g`` has a damage curve :math:`D_g(n)` (the relative refit error of its
consumers with ``n`` channels gone, from the greedy OBS pass, :mod:`onnxcomp.prune.obs`, optionally
rescaled to the end-to-end output damage measured on calibration data) and a saving curve
:math:`S_g(n)`:

* ``params`` / ``macs``: ``n`` times the group's parameters / MACs per channel (exact for one group;
  when two coupled groups cut the same node the cross term is not counted, the outer loop corrects);
* ``latency``: the summed measured saving of every linear node the group cuts (producers' output
  channels, consumers' input channels, depthwise convolutions both), each node timed alone in
  onnxruntime at its real shape (:class:`onnxcomp.analysis.node_latency.NodeLatency`) with 1/4,
  1/2 and 3/4 of the group's channels removed and interpolated linearly in between.

:func:`allocate` spends the saving greedily on the convex hull of each curve: among all groups and
all further steps it takes the one with the least damage per unit saved, until the predicted saving
reaches the goal. The predicted saving is then checked against the real cut (``params``/``macs``:
counted; ``latency``: the cut model against the unpruned one, interleaved, medians) and the goal is
corrected in proportion (by at most a factor 2 a round), a few rounds (:func:`meet_target`); the
allocation whose realized saving came closest is kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.channels import ChannelGroup
from onnxcomp.ops import linear_spec, weight_axes

__all__ = ["GroupCurve", "allocate", "steps_for", "latency_curves", "meet_target"]

#: Fractions of a group's channels at which node latencies are measured.
LATENCY_GRID = (0.25, 0.5, 0.75)


@dataclasses.dataclass
class GroupCurve:
    """Damage and saving of removing ``steps[i]`` channels (``steps[0] == 0``)."""

    group: int
    size: int
    steps: np.ndarray
    damage: np.ndarray
    saving: np.ndarray


def _timed(node: ir.Node, kind: str) -> bool:
    """Whether a single-node timing of ``node`` stands for its saving: a linear op (not a
    transposed one) with a constant weight in input 1, and a grouped one only as depthwise."""
    spec = linear_spec(node)
    if spec is None or spec.per_group == "out":
        return False
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return False
    return kind == "both" or not (spec.grouped and node.attributes.get_int("group", 1) != 1)


def steps_for(group: ChannelGroup, max_remove: int, round_to: int, min_channels: int, points: int = 32) -> np.ndarray:
    """Allowed channel counts to remove: keep counts multiple of ``round_to``, at most ``points``."""
    keep = np.arange(group.size, 0, -1)
    ok = (keep % round_to == 0) | (keep == group.size)
    ok &= keep >= min_channels
    n = group.size - keep[ok]
    n = n[n <= max_remove]
    if len(n) > points:
        idx = np.unique(np.round(np.linspace(0, len(n) - 1, points)).astype(int))
        n = n[idx]
    return np.unique(np.concatenate([[0], n])).astype(np.int64)


def allocate(curves: Sequence[GroupCurve], goal: float) -> dict[int, int]:
    """Group id -> channels to remove, reaching a predicted saving >= ``goal`` with the least damage."""
    pos = {c.group: 0 for c in curves}
    total = 0.0
    by_id = {c.group: c for c in curves}
    while total < goal:
        best = None
        for c in curves:
            i = pos[c.group]
            for j in range(i + 1, len(c.steps)):
                ds = c.saving[j] - c.saving[i]
                if ds <= 0:
                    continue
                dd = max(c.damage[j] - c.damage[i], 0.0)
                rate = dd / ds
                if best is None or rate < best[0] - 1e-15:
                    best = (rate, c.group, j, ds)
        if best is None:
            break
        _, gid, j, ds = best
        pos[gid] = j
        total += ds
    return {gid: int(by_id[gid].steps[i]) for gid, i in pos.items() if i > 0}


def _concrete_shapes(model: ir.Model, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    from onnxcomp.graph import stream_values

    values = next(iter(stream_values(model, list(names), [feed])))
    return {k: tuple(v.shape) for k, v in values.items()}


def latency_curves(
    model: ir.Model,
    groups: Sequence[ChannelGroup],
    steps: Mapping[int, np.ndarray],
    feed: Mapping[str, np.ndarray],
    timer,
) -> dict[int, np.ndarray]:
    """Group id -> predicted latency saved (seconds) at each of ``steps[gid]`` channels removed."""
    from onnxcomp.prune.fold import _data_input

    touched: dict[int, list[tuple[ir.Node, str, int]]] = {}
    names: set[str] = set()
    for g in groups:
        items = []
        for p in g.producers:
            items.append((p.node, "both" if p.depthwise else "out", p.block))
        for c in g.consumers:
            items.append((c.node, "in", c.block))
        items = [(n, k, b) for n, k, b in items if _timed(n, k)]
        touched[g.id] = items
        for n, _, _ in items:
            names.add(_data_input(n, model)[0].name)
    shapes = _concrete_shapes(model, sorted(names), feed)
    result: dict[int, np.ndarray] = {}
    for g in groups:
        grid_saving = np.zeros(len(LATENCY_GRID) + 1)
        for node, kind, block in touched[g.id]:
            x_value, x_axis = _data_input(node, model)
            xs = list(shapes[x_value.name])
            w = list(node.inputs[1].const_value.shape)
            variants = {"base": (xs, w, None)}
            for f in LATENCY_GRID:
                k = int(round(f * g.size)) * block
                vx, vw, group = list(xs), list(w), None
                out_axis, in_axis = weight_axes(node)
                if kind in ("out", "both"):
                    vw[out_axis] -= k
                if kind in ("in", "both"):
                    vx[x_axis] -= k
                if kind == "both" and linear_spec(node).grouped:  # depthwise: one channel per group
                    group = vw[out_axis]
                elif kind in ("in", "both"):
                    vw[in_axis] -= k
                variants[str(f)] = (vx, vw, group)
            times = timer.measure(node, variants)
            for i, f in enumerate(LATENCY_GRID):
                grid_saving[i + 1] += times["base"] - times[str(f)]
        fractions = np.concatenate([[0.0], LATENCY_GRID, [1.0]])
        # beyond 3/4: extrapolate linearly from the last two points
        last = grid_saving[-1] + (grid_saving[-1] - grid_saving[-2])
        values = np.concatenate([grid_saving, [last]])
        values = np.maximum.accumulate(values)  # removing more never predicted slower
        result[g.id] = np.interp(steps[g.id] / g.size, fractions, values)
    return result


def meet_target(
    curves: Sequence[GroupCurve],
    goal: float,
    realized: Callable[[dict[int, int]], float],
    *,
    tolerance: float,
    rounds: int = 4,
) -> tuple[dict[int, int], float, list[dict]]:
    """Allocate, measure the real saving, correct the goal in proportion; the closest allocation.

    ``realized(allocation) -> saving`` in the goal's unit. Returns (allocation, realized saving,
    history of the rounds).
    """
    history: list[dict] = []
    best = None
    asked = goal
    for _ in range(rounds):
        alloc = allocate(curves, asked)
        got = realized(alloc)
        history.append({"asked": asked, "realized": got})
        if best is None or abs(got - goal) < abs(best[1] - goal):
            best = (alloc, got)
        if abs(got - goal) <= tolerance or got <= 0:
            break
        # proportional correction, at most x2 / x0.5 a round (a noisy measurement must not
        # send the next round to cut everything)
        new = asked * min(max(goal / got, 0.5), 2.0)
        if math.isclose(new, asked, rel_tol=1e-3):
            break
        asked = new
    return best[0], best[1], history
