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

The damages of the groups are measured one by one and summed along the path; cut together they
compound (on madmom's beat TCN, 11 residual blocks, a plan predicted at 0.0085 measured 0.70). So
each round also measures the combined cut whole where it is cheap and exact (the cut as written,
without the streamed refit): an allocation above ``max_damage``, or failing the held-out check's
own rule on the fitting data (:class:`Measured`, judged by :mod:`onnxcomp.prune.targets`), caps the
path: the rounds back off below it (:func:`meet_target`'s ``damage``), and the target is then
reported as not reached. With the streamed refit the refitted model is measured and backed off
the same way, each try refitted again (:func:`back_off`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.channels import ChannelGroup
from onnxcomp.ops import linear_spec, weight_axes

__all__ = ["GroupCurve", "Measured", "allocate", "greedy_path", "steps_for", "latency_curves", "meet_target",
           "back_off", "MacCost", "concrete_shapes"]

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


@dataclasses.dataclass(frozen=True)
class Measured:
    """One cut measured whole on the fitting data: its output ``damage`` (the curves' unit),
    whether it is ``within`` every bound (the damage bound and the check's rule, as the caller
    judges them), and its ``severity``, a number above 1 exactly where it is not within (the worst
    bound's measured figure over its limit, see :func:`onnxcomp.prune.targets.DamageProbe.judge`)
    that the back-off interpolates on a log scale; ``why``: what failed, one line (None: within)."""

    damage: float
    within: bool
    severity: float
    why: str | None = None
    #: per output figures, for the report (optional)
    outputs: tuple = ()


def _measured(value: Measured | float, max_damage: float | None) -> Measured:
    """A ``damage`` callable's answer as :class:`Measured` (a plain number: the damage, judged by
    ``max_damage`` alone)."""
    if isinstance(value, Measured):
        return value
    d = float(value)
    if max_damage is None:
        return Measured(d, True, 0.0)
    return Measured(d, d <= max_damage, d / max_damage,
                    None if d <= max_damage else f"damage {d:.3g} above max_damage={max_damage:g}")


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


def greedy_path(curves: Sequence[GroupCurve], max_damage: float | None = None) -> list[tuple[int, int, float, float]]:
    """The steps :func:`allocate` takes, in order: (group id, step index, cumulative predicted
    saving, cumulative damage). Every allocation is a prefix of this path; with ``max_damage``
    the path stops before the summed damage would exceed it."""
    pos = {c.group: 0 for c in curves}
    total = damage = 0.0
    path = []
    while True:
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
                    best = (rate, c.group, j, ds, dd)
        if best is None:
            break
        _, gid, j, ds, dd = best
        if max_damage is not None and damage + dd > max_damage:
            break
        pos[gid] = j
        total += ds
        damage += dd
        path.append((gid, j, total, damage))
    return path


def _prefix(curves: Sequence[GroupCurve], path, k: int) -> dict[int, int]:
    by_id = {c.group: c for c in curves}
    pos: dict[int, int] = {}
    for gid, j, _, _ in path[:k]:
        pos[gid] = j
    return {gid: int(by_id[gid].steps[i]) for gid, i in pos.items() if i > 0}


def _steps_for_goal(path, goal: float) -> int:
    """The shortest prefix of ``path`` whose predicted saving reaches ``goal`` (all of it if none)."""
    for k, (_, _, total, _) in enumerate(path, start=1):
        if total >= goal:
            return k
    return len(path)


def allocate(curves: Sequence[GroupCurve], goal: float) -> dict[int, int]:
    """Group id -> channels to remove, reaching a predicted saving >= ``goal`` with the least damage."""
    if goal <= 0:
        return {}
    path = greedy_path(curves)
    return _prefix(curves, path, _steps_for_goal(path, goal))


#: Cost of one element of an activation that carries a group's channels, in multiply-accumulates:
#: the normalizations, activations and adds between a producer and its consumers stream memory,
#: a few MACs' worth of time per element on this kind of CPU (a proxy; the whole-model
#: measurement corrects the scale).
ELEMENT_COST = 8.0


def _macs(node: ir.Node, x_shape: Sequence[int], w_shape: Sequence[int], group: int | None) -> float:
    """Multiply-accumulates of a linear node at concrete shapes (``group`` None: the node's)."""
    spec = linear_spec(node)
    if spec is not None and spec.grouped and spec.per_group == "in":  # Conv: weight [out, in/group, k...]
        from onnxcomp.prune.reconstruct import ConvGeometry

        geometry = ConvGeometry.from_node(node, w_shape)
        out = geometry.output_spatial(x_shape[2:])
        return float(x_shape[0] * math.prod(out) * math.prod(w_shape))
    return float(math.prod(x_shape[:-1]) * math.prod(w_shape))


class MacCost:
    """A cost model with the interface of :class:`onnxcomp.analysis.node_latency.NodeLatency`:
    a variant's cost is its MACs, and each element of a channel-carrying activation costs
    :data:`ELEMENT_COST` (nothing is timed)."""

    per_element = ELEMENT_COST
    measured = 0

    def measure(self, node: ir.Node, variants) -> dict[str, float]:
        return {name: _macs(node, xs, ws, group) for name, (xs, ws, group) in variants.items()}

    def total(self, model: ir.Model, shapes: Mapping[str, tuple]) -> float:
        """Cost of the whole model: every linear node's MACs plus every node output's elements."""
        total = 0.0
        for node in model.graph:
            spec = linear_spec(node)
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if spec is not None and weight is not None and weight.const_value is not None:
                x = node.inputs[spec.data_input]
                if x is not None and x.name in shapes:
                    total += _macs(node, shapes[x.name], weight.const_value.shape, None)
                    continue
            for v in node.outputs:
                if v.name in shapes:
                    total += self.per_element * math.prod(shapes[v.name])
        return total


def concrete_shapes(model: ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    """Shapes of the model's tensors for ``feed`` (static inference with the feed's input shapes;
    tensors it cannot size are left out)."""
    from onnxcomp.graph import infer_types
    from onnxcomp.io import clone_model

    clone = clone_model(model)
    for v in clone.graph.inputs:
        if v.name in feed:
            v.shape = ir.Shape(list(np.shape(feed[v.name])))
    try:
        infer_types(clone)
    except Exception:  # noqa: BLE001 - a model static inference cannot size: ask onnxruntime
        return {}
    shapes = {}
    for v in [*clone.graph.inputs, *(o for n in clone.graph for o in n.outputs)]:
        if v.name and v.shape is not None and all(isinstance(d, int) for d in v.shape):
            shapes[v.name] = tuple(int(d) for d in v.shape)
    return shapes


def _concrete_shapes(model: ir.Model, names: Sequence[str], feed: Mapping[str, np.ndarray],
                     known: Mapping[str, tuple] | None = None) -> dict[str, tuple]:
    from onnxcomp.graph import stream_values

    known = dict(known or {})
    missing = [n for n in names if n not in known]
    if missing:
        values = next(iter(stream_values(model, missing, [feed])))
        known.update({k: tuple(v.shape) for k, v in values.items()})
    return {n: known[n] for n in names}


def latency_curves(
    model: ir.Model,
    groups: Sequence[ChannelGroup],
    steps: Mapping[int, np.ndarray],
    feed: Mapping[str, np.ndarray],
    timer,
    known: Mapping[str, tuple] | None = None,
) -> dict[int, np.ndarray]:
    """Group id -> predicted cost saved (``timer``'s unit) at each of ``steps[gid]`` channels removed.

    ``timer``: :class:`~onnxcomp.analysis.node_latency.NodeLatency` (seconds) or :class:`MacCost`
    (which also counts the group's activations). ``known``: tensor shapes already known.
    """
    from onnxcomp.prune.fold import _data_input

    per_element = getattr(timer, "per_element", 0.0)
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
        if per_element:
            names.update(a.value.name for a in g.activations if a.value.name)
    shapes = _concrete_shapes(model, sorted(names), feed, known)
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
        if per_element:
            per_channel = sum(math.prod(shapes[a.value.name]) / shapes[a.value.name][a.axis] * a.block
                              for a in g.activations if a.value.name in shapes)
            for i, f in enumerate(LATENCY_GRID):
                grid_saving[i + 1] += per_element * per_channel * int(round(f * g.size))
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
    rounds: int = 6,
    max_damage: float | None = None,
    outcome: dict | None = None,
    damage: Callable[[dict[int, int]], Measured | float] | None = None,
    backoff_rounds: int = 6,
) -> tuple[dict[int, int], float, list[dict]]:
    """Search the allocation whose *realized* saving meets ``goal``, correcting round by round.

    The allocations are the prefixes of :func:`greedy_path`, ordered by predicted saving. Each
    round cuts one, measures its real saving (``realized(allocation)``, in the goal's unit: for
    latency the cut model against the unpruned one, interleaved medians) and picks the next
    predicted saving: between the closest measured allocations below and above the goal by
    linear interpolation (the predicted and the real saving need only rise together; bisection
    when two rounds in a row fell on the same side), or, with
    none above yet, scaled from the last one (the origin is a measured point: no cut, no saving;
    at most x2 a round). Stops within ``tolerance``, after ``rounds``, or when the whole path
    (everything the damage bound ``max_damage`` allows) has been measured short of the goal.

    The damage bound first holds on the *predicted* damage (summed along the path, each group
    alone). With ``damage`` each round's allocation is also measured whole (the combined cut): a
    :class:`Measured` (the caller's verdict: the damage bound and the check's rule), or a plain
    number, the damage in the curves' unit, judged by ``max_damage``. One not within caps the path
    below it (the groups' damages compound), and while the saving search asks for more than the cap
    allows the rounds back off between the longest prefix measured within and the shortest measured
    outside (:func:`_backoff_step`: interpolating the log of the measured severity, bisecting when
    two rounds in a row fall on the same side), until the two are adjacent or within ``tolerance``
    of saving, up to ``backoff_rounds`` more rounds. An allocation measured outside is never returned.

    Returns (allocation closest to the goal, its realized saving, the rounds). ``outcome``, when
    given, receives ``reachable`` (False: the whole path falls short by more than ``tolerance``),
    ``path_steps``, ``max_predicted``, ``path_realized`` (the whole path's realized saving, None
    when not measured), ``backed_off`` (the measured damage capped the allocation
    short of the goal), ``cap_steps`` (the shortest prefix measured above the bound, or None),
    ``steps``, and ``damage`` (measured, None without ``damage``) / ``predicted_damage`` of the
    returned allocation.
    """
    path = greedy_path(curves, max_damage)
    history: list[dict] = []
    best: tuple[dict[int, int], float, int] | None = None
    points: list[tuple[float, float]] = [(0.0, 0.0)]
    measured: set[int] = {0}
    top = path[-1][2] if path else 0.0
    asked = goal
    reachable = True
    bounded = damage is not None
    lo_ok, hi_bad = 0, None  # longest prefix measured within the damage bound, shortest above it
    whole = None  # the whole path's realized saving, once measured
    dmg: dict[int, float] = {0: 0.0}  # measured damage by prefix length
    sev: dict[int, float] = {0: 0.0}  # measured severity (> 1: outside a bound)
    backing = False
    limit = rounds
    done = 0
    while done < limit:
        done += 1
        k = _steps_for_goal(path, asked) if asked > 0 else 0
        backing = hi_bad is not None and k >= hi_bad
        if backing:  # the saving asked for lies beyond what the measured damage allows
            if hi_bad - lo_ok <= 1 or path[hi_bad - 1][2] - (path[lo_ok - 1][2] if lo_ok else 0.0) <= tolerance:
                break
            k = _backoff_step(path, lo_ok, hi_bad, sev, history)
        if k in measured:  # the asked saving falls on a measured allocation: move one step
            free = [i for i in (k + 1, k - 1) if 0 < i <= len(path) and i not in measured
                    and (hi_bad is None or i < hi_bad)]
            if not free:
                break
            k = free[0]
        alloc = _prefix(curves, path, k)
        predicted = path[k - 1][2] if k else 0.0
        got = realized(alloc)
        measured.add(k)
        entry = {"asked": asked, "predicted": predicted, "realized": got, "steps": k,
                 "damage": float(path[k - 1][3]) if k else 0.0}
        within = True
        if damage is not None:
            m = _measured(damage(alloc), max_damage) if k else Measured(0.0, True, 0.0)
            dmg[k] = entry["measured_damage"] = m.damage
            sev[k] = m.severity
            within = m.within
            entry["within_bound"] = within
            if m.why is not None:
                entry["why"] = m.why
            if m.outputs:
                entry["outputs"] = list(m.outputs)
            if backing:
                entry["backoff"] = True
        history.append(entry)
        if k >= len(path):
            whole = got
        if not within:
            if k >= len(path) and got < goal - tolerance:
                reachable = False  # the whole path falls short even above the bound: back off, then say so
            if hi_bad is None:
                limit = max(limit, done + backoff_rounds)
            hi_bad = k if hi_bad is None else min(hi_bad, k)
            asked = goal  # the saving search resumes; the cap sends it back into the bracket
            continue
        if bounded and k > lo_ok:
            lo_ok = k
        points.append((predicted, got))
        if best is None or abs(got - goal) < abs(best[1] - goal):
            best = (alloc, got, k)
        if k >= len(path) and got < goal - tolerance:
            reachable = False  # everything the path allows falls short
            break
        if abs(got - goal) <= tolerance:
            break
        below = [p for p in points if p[1] < goal]
        above = [p for p in points if p[1] > goal]
        if above:
            lo = max(below, key=lambda p: p[0])
            hi = min(above, key=lambda p: p[0])
            ok_rounds = [h for h in history if h.get("within_bound", True)]
            same_side = len(ok_rounds) >= 2 and (ok_rounds[-1]["realized"] < goal) == (ok_rounds[-2]["realized"] < goal)
            if hi[0] <= lo[0] or same_side:
                # noise (not monotone), or interpolation creeping in from one side: bisect
                asked = 0.5 * (lo[0] + hi[0])
            else:
                asked = lo[0] + (goal - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
        else:
            scale = goal / got if got > 0 else 2.0
            asked = min(predicted * min(max(scale, 1.0), 2.0), top)
    if best is None:
        best = ({}, 0.0, 0)
    if outcome is not None:
        outcome.update({"reachable": reachable, "path_steps": len(path), "max_predicted": top, "path_realized": whole})
        k = best[2]
        outcome.update({"backed_off": hi_bad is not None and best[1] < goal - tolerance,
                        "cap_steps": hi_bad, "steps": k, "damage": dmg.get(k) if damage is not None else None,
                        "predicted_damage": float(path[k - 1][3]) if k else 0.0})
    return best[0], best[1], history


def _backoff_step(path, lo: int, hi: int, sev: Mapping[int, float], history: list[dict]) -> int:
    """The next prefix length strictly between ``lo`` (measured within every bound) and ``hi``
    (measured outside one): where the log of the measured severity (:class:`Measured`: 1 at the
    bound), interpolated between the two, meets 1 (from ``lo == 0`` or a severity of 0 there: the
    predicted damage rescaled by the measured severity / predicted damage ratio at ``hi``),
    bisecting when the last two back-off rounds fell on the same side."""
    tried = [h for h in history if h.get("backoff")]
    if len(tried) >= 2 and tried[-1]["within_bound"] == tried[-2]["within_bound"]:
        return (lo + hi) // 2
    if not math.isfinite(sev[hi]):
        return (lo + hi) // 2
    if lo == 0 or sev[lo] <= 0:
        ratio = sev[hi] / max(path[hi - 1][3], 1e-30)
        fits = [i for i in range(1, hi) if path[i - 1][3] * ratio <= 1.0]
        k = fits[-1] if fits else 1
    else:
        frac = -math.log(sev[lo]) / max(math.log(sev[hi]) - math.log(sev[lo]), 1e-12)
        k = lo + int(math.floor(frac * (hi - lo)))
    return min(max(k, lo + 1), hi - 1)


def back_off(
    path,
    hi: int,
    first: Measured,
    measure: Callable[[int], Measured],
    *,
    rounds: int = 6,
) -> tuple[int, list[dict]]:
    """The longest prefix of ``path`` below ``hi`` found measured within every bound, ``hi``
    itself measured outside (``first``), by :func:`_backoff_step` between the longest prefix
    measured within (first: none, 0) and the shortest outside, up to ``rounds`` measurements
    (``measure(k)``, which leaves the model cut at ``k``). For a cut whose measurement is costly
    (the streamed refit of ``reconstruct``); returns (prefix length, the rounds: ``steps``,
    ``measured_damage``, ``within_bound``, ``why``). 0: no prefix tried was within."""
    lo = 0
    sev = {0: 0.0, hi: first.severity}
    history: list[dict] = []
    for _ in range(rounds):
        if hi - lo <= 1:
            break
        k = _backoff_step(path, lo, hi, sev, history)
        m = measure(k)
        sev[k] = m.severity
        history.append({"steps": k, "damage": float(path[k - 1][3]), "measured_damage": m.damage,
                        "within_bound": m.within, "backoff": True, **({"why": m.why} if m.why else {}),
                        **({"outputs": list(m.outputs)} if m.outputs else {})})
        if m.within:
            lo = k
        else:
            hi = k
    return lo, history
