"""Pruning to a target: ``target_latency`` / ``target_params`` / ``target_macs`` (see :mod:`onnxcomp.prune.budget`).

The damage curves come from the ``obs`` importance (greedy structured OBS, one per group), the
savings from the cost model or measured node latencies; the allocation is checked against the real
cut and corrected (``params``/``macs``: counted; ``latency``: the cut model against the unpruned one
in onnxruntime, interleaved, medians), and :meth:`TargetPlan.finish` measures the final model
(after the refit) against the unpruned one side by side once more.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.channels import ChannelGroup, analyze_channels
from onnxcomp.analysis.cost import count_cost
from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.io import clone_model, model_to_bytes
from onnxcomp.prune.budget import GroupCurve, MacCost, concrete_shapes, latency_curves, meet_target, steps_for
from onnxcomp.prune.config import PruneConfig
from onnxcomp.prune.fold import cut_channels
from onnxcomp.prune.obs import ObsState

__all__ = ["TargetPlan", "prune_to_target", "NO_PRUNABLE_GROUP"]

#: Allowed relative miss of the realized fraction before the goal is corrected once more.
TOLERANCE = 0.02
#: A target whose whole path (everything the damage bound allows) misses it by more than this
#: (relative) is refused; within it the closest allocation is kept and the miss reported.
ACCEPT = 0.05


@dataclasses.dataclass
class TargetPlan:
    kind: str
    target: float
    removal: dict[int, np.ndarray]
    curves: dict[int, GroupCurve]
    allocation: dict[int, int]
    realized: float
    history: list[dict]
    reference: bytes | None
    feeds: list[dict[str, np.ndarray]]
    threads: int | None
    before: dict[str, Any]
    reference_seconds: float | None
    node_timings: int
    seconds: float
    sensitivity: dict[int, dict] = dataclasses.field(default_factory=dict)
    #: seconds of each step of the allocation
    phases: dict[str, float] = dataclasses.field(default_factory=dict)

    def group_report(self, gid: int) -> dict[str, Any]:
        curve = self.curves.get(gid)
        if curve is None:
            return {"ratio": 0.0, "note": "no damage curve (no consumer the refit supports): kept whole"}
        n = self.allocation.get(gid, 0)
        i = int(np.searchsorted(curve.steps, n))
        out = {
            "ratio": n / curve.size,
            # predicted output damage (greedy OBS curve of the group's consumers, scaled to the
            # end-to-end damage measured at the probe on calibration data)
            "damage": float(curve.damage[i]),
            **({"sensitivity": self.sensitivity[gid]} if gid in self.sensitivity else {}),
            f"{self.kind}_saved_fraction": float(curve.saving[i]),
        }
        if self.kind == "latency" and self.reference_seconds:
            out["latency_saved_ms"] = float(curve.saving[i] * self.reference_seconds * 1e3)
        return out

    def finish(self, work: ir.Model) -> dict[str, Any]:
        """Measure the final model against the unpruned one; the target section of the report."""
        if self.kind == "latency":
            from onnxcomp.analysis.node_latency import model_latency_ratio

            final, ref_s, cand_s = model_latency_ratio(self.reference, model_to_bytes(work), self.feeds,
                                                       threads=self.threads)
            measured = {"latency_ratio": final, "reference_ms": ref_s * 1e3, "pruned_ms": cand_s * 1e3}
        else:
            after = count_cost(work)
            key = "parameters" if self.kind == "params" else "macs"
            final = after[key] / max(self.before[key], 1)
            measured = {f"{self.kind}_ratio": final}
        return {
            "kind": self.kind,
            "target": self.target,
            "final_ratio": final,
            "miss": final / self.target - 1.0,
            "within_5_percent": abs(final / self.target - 1.0) <= 0.05,
            **measured,
            "rounds": self.history,
            "node_timings": self.node_timings,
            "allocation_seconds": self.seconds,
            "allocation_seconds_by_step": self.phases,
        }


#: why a model has nothing to prune (the closing parenthesis is the caller's, who may add a count)
NO_PRUNABLE_GROUP = ("the model has no prunable channel group (no output channel of a Conv, Gemm or MatMul weight "
                     "whose readers can all be cut with it")


def prune_to_target(
    work: ir.Model,
    groups: list[ChannelGroup],
    state: dict[int, ObsState | None],
    config: PruneConfig,
    data: Dataset,
    notes: list[str],
) -> TargetPlan:
    started = time.perf_counter()
    kind, target = config.target
    before = count_cost(work)
    eligible = [g for g in groups if state.get(g.id) is not None]
    if len(eligible) < len(groups):
        notes.append(f"{len(groups) - len(eligible)} group(s) have no consumer the refit supports; kept whole")
    steps = {g.id: steps_for(g, state[g.id].n_greedy, config.round_to, config.min_channels) for g in eligible}
    feeds = [dict(next(iter(data)))]
    reference = None
    ref_s = None
    timings = 0
    from onnxcomp.analysis.node_latency import NodeLatency, model_latency_ratio

    phases: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - tick
        tick = now

    if kind == "latency":
        reference = model_to_bytes(work)
        _, ref_s, _ = model_latency_ratio(reference, reference, feeds, threads=config.latency_threads, runs=10)
        shapes = concrete_shapes(work, feeds[0]) if config.latency_proxy == "macs" else {}
        if shapes:
            # MACs plus activation traffic: a proxy whose scale the measured rounds correct
            cost = MacCost()
            predicted = latency_curves(work, eligible, steps, feeds[0], cost, shapes)
            total = max(cost.total(work, shapes), 1e-30)
            savings = {gid: s / total for gid, s in predicted.items()}
        else:
            timer = NodeLatency(threads=config.latency_threads)
            seconds = latency_curves(work, eligible, steps, feeds[0], timer)
            timings = timer.measured
            savings = {gid: s / ref_s for gid, s in seconds.items()}
    else:
        key = "parameters" if kind == "params" else "macs"
        total = max(before[key], 1)
        savings = {}
        for g in eligible:
            per = g.params_per_channel if kind == "params" else g.macs_per_channel
            if per is None:
                per = g.params_per_channel  # symbolic spatial size: parameters as the proxy
                notes.append(f"group {g.id}: MACs per channel unknown (symbolic shape); parameters used")
            savings[g.id] = steps[g.id] * per / total
    lap("saving_curves")
    scales = _measured_scales(work, eligible, state, steps, data, notes) if config.sensitivity == "measured" else {}
    lap("sensitivity")
    curves = {
        g.id: GroupCurve(g.id, g.size, steps[g.id], state[g.id].damage[steps[g.id]] * scales.get(g.id, (1.0, 0))[0],
                         savings[g.id])
        for g in eligible
    }

    def removal_of(alloc: dict[int, int]) -> dict[int, np.ndarray]:
        return {gid: np.sort(state[gid].order[:n]) for gid, n in alloc.items() if n > 0}

    def realized(alloc: dict[int, int]) -> float:
        clone = clone_model(work)
        by_id = {g.id: g for g in analyze_channels(clone, infer_shapes=False).groups}
        cut_channels(clone, by_id, removal_of(alloc))
        if kind == "latency":
            ratio, _, _ = model_latency_ratio(reference, model_to_bytes(clone), feeds, threads=config.latency_threads)
            return 1.0 - ratio
        key = "parameters" if kind == "params" else "macs"
        return 1.0 - count_cost(clone)[key] / max(before[key], 1)

    goal = 1.0 - target
    if not curves:
        from onnxcomp.graph import attribute_weights_note

        why = (f"{NO_PRUNABLE_GROUP})" if not groups else f"none of its {len(groups)} prunable group(s) has "
               "a consumer the refit supports")
        note = attribute_weights_note(work)
        raise OnnxcompError(f"prune: no group can be pruned toward {kind} {target}: {why}" + (f"; {note}" if note else ""))
    outcome: dict = {}
    alloc, got, history = meet_target(list(curves.values()), goal, realized, tolerance=TOLERANCE * target,
                                      max_damage=config.max_damage, outcome=outcome)
    lap("rounds")
    for h in history:
        h["asked_ratio"] = 1.0 - h.pop("asked")
        h["predicted_ratio"] = 1.0 - h.pop("predicted")
        h["realized_ratio"] = 1.0 - h.pop("realized")
    if not outcome["reachable"] and abs((1.0 - got) / target - 1.0) > ACCEPT:
        what = {"latency": "of its measured latency (the pruned model against the unpruned one, side by side)",
                "params": "of its parameters", "macs": "of its MACs"}[kind]
        bound = (f" within the damage bound max_damage={config.max_damage:g} (predicted relative output error)"
                 if config.max_damage is not None else "")
        raise OnnxcompError(
            f"prune: target_{kind} {target:g} is out of reach: cutting every group as far as allowed{bound} "
            f"keeps {1.0 - got:.3f} {what}; channels cut: {sum(alloc.values())}. "
            + ("The channel-carrying linear nodes are too small a part of the latency; " if kind == "latency" else "")
            + f"ask for {min(1.0, (1.0 - got) * 1.05):.2f} or more"
            + (", or raise max_damage" if config.max_damage is not None else "")
        )
    plan = TargetPlan(kind, target, removal_of(alloc), curves, alloc, 1.0 - got, history, reference, feeds,
                      config.latency_threads, before, ref_s, timings, time.perf_counter() - started,
                      {gid: {"probe_channels": n, "measured_output_damage": m}
                       for gid, (_, n, m) in scales.items()}, phases)
    return plan


#: Calibration feeds used to measure each group's end-to-end damage.
SENSITIVITY_FEEDS = 2


def _measured_scales(
    work: ir.Model,
    groups: list[ChannelGroup],
    state: dict[int, ObsState],
    steps: dict[int, np.ndarray],
    data: Dataset,
    notes: list[str],
) -> dict[int, tuple[float, int, float]]:
    """Group id -> (scale, probe n, measured damage): the end-to-end output damage of cutting about
    half of the group alone (its consumers refitted from the Gram), divided by the curve's damage
    there, so the curves of different groups speak of the same thing: the model's output.

    Output damage: ``sum ||y - y_ref||^2 / sum ||y_ref||^2`` over the float outputs and the first
    :data:`SENSITIVITY_FEEDS` calibration feeds.

    When the group's channels reach nothing but its refitted consumers, the cut is not made:
    the consumers get their refit weights with zeros on the removed channels' inputs (the same
    outputs as the cut model, without a new copy, channel analysis and shape inference per group).
    """
    from onnxcomp.graph import all_value_names
    from onnxcomp.prune import reconstruct as rc
    from onnxcomp.runtime import create_session

    feeds = []
    for feed in data:
        feeds.append(dict(feed))
        if len(feeds) >= SENSITIVITY_FEEDS:
            break
    ref_session = create_session(work)
    names = [o.name for o in ref_session.get_outputs()]
    reference = [ref_session.run(names, f) for f in feeds]
    del ref_session
    shared = clone_model(work)
    taken = all_value_names(shared.graph)
    scales: dict[int, tuple[float, int, float]] = {}
    for g in groups:
        st = state[g.id]
        s = steps[g.id]
        half = s[s <= g.size // 2]
        n = int(half[-1]) if len(half) and half[-1] > 0 else int(s[1]) if len(s) > 1 else 0
        if n == 0:
            continue
        removed = np.sort(st.order[:n])
        restore = _zero_in_consumers(shared, g, st, removed, taken) if _reads_only_by_consumers(g, st) else None
        if restore is not None:
            clone = shared
        else:  # other readers of the channels: cut for real
            clone = clone_model(work)
            by_id = {x.id: x for x in analyze_channels(clone, infer_shapes=False).groups}
            cut_channels(clone, by_id, {g.id: removed})
            nodes = {x.name: x for x in clone.graph if x.name}
            clone_taken = all_value_names(clone.graph)
            for name in st.consumers:
                try:
                    layer = rc._plan(name, nodes, nodes)
                except (rc._Skip, ValueError):
                    continue
                refit = st.refit_weights(name, removed)
                # a consumer that also writes the group (a bottleneck added back to its own input)
                # lost those output channels in the cut: its refit loses their columns
                written = [p.indices(removed) for p in g.producers if p.node.name == name]
                if written:
                    refit = np.delete(refit, np.concatenate(written), axis=1)
                layer.write(refit[None], clone.graph, clone_taken)
        session = create_session(clone)
        if restore is not None:
            restore()
        err = tot = 0.0
        for f, ref in zip(feeds, reference):
            for r, o in zip(ref, session.run(names, f)):
                if np.issubdtype(r.dtype, np.floating):
                    err += float(np.sum((o.astype(np.float64) - r) ** 2))
                    tot += float(np.sum(r.astype(np.float64) ** 2))
        measured = err / max(tot, 1e-30)
        local = float(np.interp(n, s, st.damage[s]))
        scales[g.id] = (measured / local if local > 1e-12 else 1.0, n, measured)
    return scales


def _reads_only_by_consumers(group: ChannelGroup, st: ObsState) -> bool:
    """Whether every reader of the group's channels is a consumer the refit rewrites (so zero
    input weights there stand for the cut) and none of its tensors is a graph output."""
    if any(a.value.is_graph_output() for a in group.activations):
        return False
    if group.shape_edits:
        return False
    return {c.node.name for c in group.consumers} <= set(st.consumers)


def _zero_in_consumers(model: ir.Model, group: ChannelGroup, st: ObsState, removed: np.ndarray,
                       taken: set[str]):
    """Give ``group``'s consumers in ``model`` their refit weights with zero rows for the removed
    channels' features; returns a function that writes the old weights back (None: a consumer
    cannot be planned)."""
    from onnxcomp.prune import reconstruct as rc

    nodes = {x.name: x for x in model.graph if x.name}
    old: list[tuple[str, np.ndarray]] = []
    planned = []
    for name in st.consumers:
        try:
            layer = rc._plan(name, nodes, nodes)
        except (rc._Skip, ValueError):
            return None
        planned.append((name, layer))
    for name, layer in planned:
        params = layer.old_params()
        old.append((name, params))
        full = np.zeros_like(params[0])
        drop = st.features[name][removed].reshape(-1)
        keep = np.setdiff1d(np.arange(full.shape[0]), drop)
        full[keep] = st.refit_weights(name, removed)
        layer.write(full[None], model.graph, taken)

    def restore() -> None:
        current = {x.name: x for x in model.graph if x.name}
        for name, params in old:
            rc._plan(name, current, current).write(params, model.graph, taken)

    return restore
