"""Pruning to a target: ``target_latency`` / ``target_params`` / ``target_macs`` (see :mod:`onnxcomp.prune.budget`).

The damage curves come from the ``obs`` importance (greedy structured OBS, one per group), the
savings from the cost model or measured node latencies; the allocation is checked against the real
cut and corrected (``params``/``macs``: counted; ``latency``: the cut model against the unpruned one
in onnxruntime, interleaved, medians), and :meth:`TargetPlan.finish` measures the final model
(after the refit) against the unpruned one side by side once more.

The combined cut is judged on the fitting data by :class:`DamageProbe` against two bounds: its
damage against ``max_damage``, and every output against the held-out check's own rule
(:mod:`onnxcomp.check`, with the run's :class:`~onnxcomp.check.CheckConfig`), so that a cut the
rounds keep is one the check would pass on data like the fitting data. Without ``reconstruct``
each round is judged (:func:`onnxcomp.prune.budget.meet_target`); with it the refitted model is,
and backed off with a refit per try (:meth:`TargetPlan.back_off_refitted`). The refit is fitted on
those feeds, so its verdict there is in-sample: a back-off that lands on the rule's edge can miss
it held out (the chain of tests/test_prune_bound_fourteenth.py: 0.9850 fitting, 0.9831 held out).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.channels import ChannelGroup, analyze_channels
from onnxcomp.analysis.cost import count_cost
from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.io import clone_model, model_to_bytes
from onnxcomp.prune.budget import (
    GroupCurve,
    MacCost,
    Measured,
    back_off,
    concrete_shapes,
    greedy_path,
    latency_curves,
    meet_target,
    steps_for,
)
from onnxcomp.prune.config import PruneConfig
from onnxcomp.prune.fold import consumer_input_stats, cut_channels
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
    #: the combined cut's measured damage against its prediction, and the back-off
    combined: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: consumer input statistics of every eligible group (the means folded by the cut)
    stats: Any = None
    #: measures the written model's output damage on the fitting feeds the rounds used
    probe: DamageProbe | None = None
    #: the greedy path the allocations are prefixes of, and the chosen prefix's length
    path: list = dataclasses.field(default_factory=list)
    steps: int = 0
    #: the groups' OBS states (their removal order)
    state: dict = dataclasses.field(default_factory=dict)
    max_damage: float | None = None
    #: the final measurement of the written model (:meth:`judge_written`), None before it
    written: Measured | None = None

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

    def prefix(self, k: int) -> dict[int, int]:
        """Group id -> channels removed by the first ``k`` steps of the path."""
        pos: dict[int, int] = {}
        for gid, j, _, _ in self.path[:k]:
            pos[gid] = j
        return {gid: int(self.curves[gid].steps[j]) for gid, j in pos.items() if j > 0}

    def use_prefix(self, k: int) -> None:
        """Make the first ``k`` steps of the path the plan (allocation and removal)."""
        self.steps = k
        self.allocation = self.prefix(k)
        self.removal = {gid: np.sort(self.state[gid].order[:n]) for gid, n in self.allocation.items() if n > 0}

    def judge_written(self, work: ir.Model) -> Measured | None:
        """The written model (after the refit) measured by the damage bound and the check's rule."""
        if self.probe is None:
            return None
        self.written = self.probe.judge(work, self.max_damage)
        return self.written

    def back_off_refitted(self, work: ir.Model, apply, notes: list[str], rounds: int = 6) -> None:
        """With ``reconstruct``: the refitted model ``work`` measured whole (damage and the check's
        rule, :meth:`DamageProbe.judge`); when it fails, the plan backs off along its path
        (:func:`onnxcomp.prune.budget.back_off`), each try cut and refitted again by ``apply(removal)``
        (which leaves ``work`` so), up to ``rounds`` refits, to the longest prefix measured within;
        ``work`` is left at that prefix. The rounds of the plan itself gate on no measurement: a
        refit from each group's own Gram ignores what the streamed refit recovers of the upstream cuts
        (on the madmom TCN it read 0.093 where the refitted model has 0.010)."""
        first = self.judge_written(work)
        if first is None or first.within or self.steps == 0:
            return
        cap = self.steps
        kept: dict[int, ir.Model] = {}
        seen: dict[int, Measured] = {}

        def measure(k: int) -> Measured:
            self.use_prefix(k)
            apply(self.removal)
            seen[k] = m = self.probe.judge(work, self.max_damage)
            if m.within:
                kept.clear()
                kept[k] = clone_model(work)
            return m

        k, history = back_off(self.path, cap, first, measure, rounds=rounds)
        last = history[-1]["steps"] if history else cap
        if k != last:
            self.use_prefix(k)
            if k in kept:
                from onnxcomp.graph import restore_model

                restore_model(work, kept[k])
            else:  # no prefix was within: nothing is cut
                apply(self.removal)
        self.written = seen[k] if k in seen else self.probe.judge(work, self.max_damage)
        before = {"steps": cap, "predicted_damage": float(self.path[cap - 1][3]), "measured_damage": first.damage,
                  f"{self.kind}_ratio": self.realized, "why": first.why,
                  **({"outputs": list(first.outputs)} if first.outputs else {})}
        self.combined.update(backed_off=True, capped_at=before, first_failed=before, why=first.why,
                             refit_rounds=history, steps=k,
                             measured_damage=self.written.damage,
                             predicted_damage=float(self.path[k - 1][3]) if k else 0.0)
        feeds = self.probe.rule_feeds
        notes.append(
            f"prune: the refitted model (--reconstruct) of the plan for target_{self.kind} {self.target:g} "
            f"failed on {feeds} fitting feed(s): {first.why}; backed off to {k} of {cap} steps of the plan, "
            f"each try cut and refitted again ({len(history)} refit(s)): measured damage {self.written.damage:.3g}"
            + _figures_text(list(self.written.outputs)) + ": target not reached"
            + ("" if k else "; no shorter cut tried was within: nothing cut"))

    def finish(self, work: ir.Model, notes: list[str] | None = None) -> dict[str, Any]:
        """Measure the final model against the unpruned one; the target section of the report.

        The written model is measured once more on the fitting feeds (``combined_damage.final``,
        its damage; ``combined_damage.final_rule``, the check's rule there), unless the refit's
        back-off (:meth:`back_off_refitted`) measured it already; a ``notes`` line when it fails."""
        if self.probe is not None:
            written = self.written if self.written is not None else self.judge_written(work)
            self.combined["final"] = written.damage
            if self.probe.rule is not None:
                self.combined["final_rule"] = {"within": written.within, "outputs": list(written.outputs)}
            if notes is not None and not written.within:
                notes.append(f"prune: the written model fails on {self.probe.rule_feeds} fitting feed(s): "
                             f"{written.why}; predicted damage {self.combined['predicted_damage']:.3g}")
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
            "combined_damage": self.combined,
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
    check=None,
) -> TargetPlan:
    """The allocation for ``config``'s target (module docstring). ``check``: the
    :class:`onnxcomp.check.CheckConfig` of the run's held-out check, whose rule the combined cut
    must also meet on the fitting data (``config.check_rule``; None: the default budget)."""
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
    # the removed channels' means, folded into the consumers' biases as the written model has them
    stats = consumer_input_stats(work, eligible, data)
    rule = None
    if config.check_rule:
        from onnxcomp.check import CheckConfig

        rule = check if check is not None else CheckConfig()
    probe = DamageProbe(work, data, rule)
    lap("input_stats")
    scales = (_measured_scales(work, eligible, state, steps, probe, stats, config.reconstruct)
              if config.sensitivity == "measured" else {})
    lap("sensitivity")
    curves = {
        g.id: GroupCurve(g.id, g.size, steps[g.id], state[g.id].damage[steps[g.id]] * scales.get(g.id, (1.0, 0))[0],
                         savings[g.id])
        for g in eligible
    }

    def removal_of(alloc: dict[int, int]) -> dict[int, np.ndarray]:
        return {gid: np.sort(state[gid].order[:n]) for gid, n in alloc.items() if n > 0}

    last: dict[tuple, ir.Model] = {}

    def cut(alloc: dict[int, int]) -> ir.Model:
        """The allocation cut as written (refit from the Gram with ``reconstruct``); the last one kept."""
        key = tuple(sorted(alloc.items()))
        if key not in last:
            last.clear()
            last[key] = cut_as_written(work, state, removal_of(alloc), stats, refit=config.reconstruct)
        return last[key]

    def realized(alloc: dict[int, int]) -> float:
        clone = cut(alloc)
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
                                      max_damage=config.max_damage, outcome=outcome,
                                      damage=None if config.reconstruct else
                                      lambda a: probe.judge(cut(a), config.max_damage))
    lap("rounds")
    for h in history:
        h["asked_ratio"] = 1.0 - h.pop("asked")
        h["predicted_ratio"] = 1.0 - h.pop("predicted")
        h["realized_ratio"] = 1.0 - h.pop("realized")
    combined = _combined_report(outcome, history, config, kind, target, 1.0 - got, notes, probe)
    # out of reach: the whole path, measured within the bound or above it (then backed off), misses by more
    # than ACCEPT; a path that reaches the target only above the measured bound is backed off and reported
    whole = outcome["path_realized"] if outcome["path_realized"] is not None else got
    if not outcome["reachable"] and abs((1.0 - whole) / target - 1.0) > ACCEPT:
        what = {"latency": "of its measured latency (the pruned model against the unpruned one, side by side)",
                "params": "of its parameters", "macs": "of its MACs"}[kind]
        measured = ("measured on the fitting data" + (" by the check's rule" if probe.rule is not None else "")
                    + ", the combined cut backed off")
        bound = (f" within the damage bound max_damage={config.max_damage:g} (predicted relative output error"
                 + (f"; and {measured}" if outcome["backed_off"] else "") + ")" if config.max_damage is not None
                 else f" ({measured})" if outcome["backed_off"] else "")
        options = (["raise max_damage"] if config.max_damage is not None else []) + (
            ([f"loosen the check's rule ({', '.join(_rule_flags(history))})"] if _rule_flags(history) else [])
            + (["give --reconstruct (refits the consumers)"] if not config.reconstruct else [])
            if outcome["backed_off"] else [])
        raise OnnxcompError(
            f"prune: target_{kind} {target:g} is out of reach: cutting every group as far as allowed{bound} "
            f"keeps {1.0 - got:.3f} {what}; channels cut: {sum(alloc.values())}. "
            + ("The channel-carrying linear nodes are too small a part of the latency; " if kind == "latency" else "")
            + (f"ask for {(1.0 - got) * 1.05:.2f} or more" + "".join(f", or {o}" for o in options)
               if (1.0 - got) * 1.05 < 0.995 else "the bounds allow almost no cut of this model on this data"
               + (": " + ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1] if options else ""))
            + (f" (the cuts backed off from failed: {combined['why']})" if outcome["backed_off"] and combined.get("why")
               else "")
        )
    plan = TargetPlan(kind, target, removal_of(alloc), curves, alloc, 1.0 - got, history, reference, feeds,
                      config.latency_threads, before, ref_s, timings, time.perf_counter() - started,
                      {gid: {"probe_channels": n, "measured_output_damage": m}
                       for gid, (_, n, m) in scales.items()}, phases, combined, stats, probe,
                      greedy_path(list(curves.values()), config.max_damage), outcome["steps"], state,
                      config.max_damage)
    return plan


def _combined_report(outcome: dict, history: list[dict], config: PruneConfig, kind: str, target: float,
                     reached: float, notes: list[str], probe: DamageProbe) -> dict[str, Any]:
    """The combined cut's measured damage (and the check's rule) against its prediction, and the
    back-off: what the plan asked for, why it failed, what it was backed off to (a note when a
    measurement capped the allocation short of the target)."""
    over = [h for h in history if h.get("within_bound") is False]
    rule = probe.rule
    out = {
        "predicted_damage": outcome["predicted_damage"],
        "measured_damage": outcome["damage"],
        "max_damage": config.max_damage,
        "feeds": len(probe.feeds),
        # the check's rule judged on the fitting feeds (None: config.check_rule off): its thresholds
        # (CheckConfig.budget, every one a kind of output is judged by; not max_drop, which needs labels)
        "rule": None if rule is None else {**{k: v for k, v in rule.budget().items() if k != "max_drop_points"},
                                           "feeds": probe.rule_feeds},
        "refit": "streamed" if config.reconstruct else "none",
        "backed_off": bool(outcome["backed_off"]),
        "rounds_above_bound": len(over),
    }
    chosen = next((h for h in history if h["steps"] == outcome["steps"] and h.get("within_bound", True)), None)
    if chosen is not None and chosen.get("outputs"):
        out["outputs"] = chosen["outputs"]
    if over:
        worst = min(over, key=lambda h: h["steps"])  # the shortest prefix measured outside: the cap
        out["capped_at"] = {"steps": worst["steps"], "predicted_damage": worst["damage"],
                            "measured_damage": worst["measured_damage"], f"{kind}_ratio": worst["realized_ratio"],
                            "why": worst.get("why"), **({"outputs": worst["outputs"]} if worst.get("outputs") else {})}
        first = over[0]  # the first allocation the saving search asked for that failed
        out["first_failed"] = {"steps": first["steps"], "predicted_damage": first["damage"],
                               "measured_damage": first["measured_damage"], f"{kind}_ratio": first["realized_ratio"],
                               "why": first.get("why"),
                               **({"outputs": first["outputs"]} if first.get("outputs") else {})}
    if outcome["backed_off"]:
        cap, first = out["capped_at"], out["first_failed"]
        out["why"] = first["why"]
        feeds = probe.rule_feeds
        notes.append(
            f"prune: the combined cut damages the output more than its groups do one by one: the allocation "
            f"for target_{kind} {target:g} ({first['steps']} steps of the plan, {kind} {first[f'{kind}_ratio']:.3f}, "
            f"predicted damage {first['predicted_damage']:.3g}) failed on {feeds} fitting feed(s): {first['why']}; "
            f"backed off to {outcome['steps']} steps"
            + (f" ({cap['steps']} failed: {cap['why']})" if cap["steps"] != first["steps"] else "")
            + f": measured damage {out['measured_damage']:.3g} (predicted {out['predicted_damage']:.3g})"
            + _figures_text(out.get("outputs"))
            + f", {kind} {reached:.3f} of the original: target {target:g} not reached"
            + ("" if config.reconstruct else " (--reconstruct refits the consumers on the calibration data)")
        )
    return out


def _rule_flags(history: list[dict]) -> list[str]:
    """The flags of the check's thresholds that an output failed by in some round measured outside
    (``--min-r2`` for a regression, ``--min-cosine`` for values, ...), in the order first seen."""
    from onnxcomp.check import RULES

    flags: list[str] = []
    for h in history:
        for row in (h.get("outputs") or ()) if h.get("within_bound") is False else ():
            rule = RULES.get(row.get("kind")) if row.get("ok") is False else None
            flag = f"--{rule.threshold.replace('_', '-')}" if rule is not None and isinstance(rule.threshold, str) else None
            if flag is not None and flag not in flags:
                flags.append(flag)
    return flags


def _figures_text(outputs: list[dict] | None) -> str:
    """``, cosine 0.991 (beat), top-1 agreement 1.0000 (tempo)``: the rule's figure of each output."""
    from onnxcomp.check import RULES

    parts = []
    for row in outputs or ():
        rule = RULES.get(row.get("kind"))
        value = row.get(rule.figure) if rule is not None else None
        if value is not None:
            parts.append(f"{rule.reads} {value:.4f} ({row['name']})")
    return (", " + ", ".join(parts)) if parts else ""


#: Calibration feeds used to measure each group's end-to-end damage, and the combined cut's.
SENSITIVITY_FEEDS = 2
#: The check's rule judges a combined cut on the first fitting feeds, at most this many ...
RULE_FEEDS = 256
#: ... while their inputs and the original's outputs on them take at most this many bytes (a
#: deterministic bound on the cost of each round: a detector at 960x960 gets a few feeds, a digit
#: classifier all 160 of its fitting feeds), and at least :data:`SENSITIVITY_FEEDS`. An agreement
#: figure on n decisions fails the rule 0.99 on a single flip while n < 100: the digits MLP cut to
#: half its MACs reads 64 of 64 on its first 64 fitting feeds and 155 of 160 on all of them (eval:
#: 0.953), so the rule reads as many as the bound allows, not the check's 64.
RULE_BYTES = 64 * 2**20


class DamageProbe:
    """End-to-end output damage of a cut, measured on the first :data:`SENSITIVITY_FEEDS`
    fitting feeds against the unpruned model: ``sum ||y - y_ref||^2 / sum ||y_ref||^2`` over the
    float outputs (the unit of the damage curves and of ``max_damage``).

    With ``rule`` (a :class:`onnxcomp.check.CheckConfig`, the one the run's held-out check
    uses), :meth:`judge` also judges the cut by the check's own per-output rule
    (:class:`onnxcomp.check.OutputFigures`, :func:`onnxcomp.check.judge_output`: each output by
    its kind, read as the check reads it from what the original returns; cosine >= ``min_cosine``
    for values, top-1 agreement >= ``min_agreement`` for class scores, ...) on more fitting feeds
    (:data:`RULE_FEEDS`, :data:`RULE_BYTES`): never the check's held-out feeds."""

    def __init__(self, work: ir.Model, data: Dataset, rule=None) -> None:
        from onnxcomp.runtime import create_session

        self.rule = rule
        limit = SENSITIVITY_FEEDS if rule is None else max(SENSITIVITY_FEEDS, RULE_FEEDS)
        session = create_session(work)
        self.names = [o.name for o in session.get_outputs()]
        self.all_feeds: list[dict[str, np.ndarray]] = []
        self.all_reference: list[list[np.ndarray]] = []
        used = 0
        for feed in data:
            feed = dict(feed)
            ref = session.run(self.names, feed)
            size = sum(np.asarray(a).nbytes for a in feed.values()) + sum(np.asarray(a).nbytes for a in ref)
            if len(self.all_feeds) >= SENSITIVITY_FEEDS and used + size > RULE_BYTES:
                break
            self.all_feeds.append(feed)
            self.all_reference.append(ref)
            used += size
            if len(self.all_feeds) >= limit:
                break
        self.feeds = self.all_feeds[:SENSITIVITY_FEEDS]
        self.reference = self.all_reference[:SENSITIVITY_FEEDS]
        if rule is not None:
            from onnxcomp.check import output_kinds, pooled_outputs

            self.kinds = output_kinds(work)
            self.pooled = pooled_outputs(work)

    @property
    def rule_feeds(self) -> int:
        """How many fitting feeds :meth:`judge` reads."""
        return len(self.all_feeds) if self.rule is not None else len(self.feeds)

    def damage(self, model: ir.Model) -> float:
        from onnxcomp.runtime import create_session

        session = create_session(model)
        err = tot = 0.0
        for f, ref in zip(self.feeds, self.reference):
            e, t = _damage_terms(ref, session.run(self.names, f))
            err, tot = err + e, tot + t
        return err / max(tot, 1e-30)

    def judge(self, model: ir.Model, max_damage: float | None) -> Measured:
        """The cut ``model`` measured whole: its damage (:meth:`damage`'s feeds) against
        ``max_damage`` and, with a rule, every output's figure against the check's rule on
        :attr:`rule_feeds` feeds. ``severity`` is the worst of ``damage / max_damage`` and, per
        output, ``(1 - figure) / (1 - threshold)`` (each above 1 exactly where its bound fails; a
        threshold of 1, equal elements: 0 or infinite)."""
        from onnxcomp.runtime import create_session

        session = create_session(model)
        figures = None
        if self.rule is not None:
            from onnxcomp.check import OutputFigures

            figures = OutputFigures(self.names, self.kinds, self.pooled)
        err = tot = 0.0
        feeds = self.all_feeds if figures is not None else self.feeds
        for i, (f, ref) in enumerate(zip(feeds, self.all_reference)):
            out = session.run(self.names, f)
            if i < len(self.feeds):
                e, t = _damage_terms(ref, out)
                err, tot = err + e, tot + t
            if figures is not None:
                figures.update(ref, out, f)
        d = err / max(tot, 1e-30)
        failed: list[str] = []
        severity = 0.0
        if max_damage is not None:
            severity = d / max_damage
            if d > max_damage:
                failed.append(f"damage {d:.3g} above max_damage={max_damage:g}")
        rows: list[dict] = []
        if figures is not None:
            from onnxcomp.check import RULES, judged_figures

            results = figures.result()
            for name, kind, values, (ok, rule, figure) in zip(self.names, figures.kinds, results,
                                                               figures.verdicts(self.rule)):
                spec = RULES[kind]
                value = judged_figures(values).get(spec.figure)
                limit = spec.limit(self.rule)
                if value is None or not math.isfinite(value):
                    s = math.inf
                elif limit < 1.0:
                    s = max(1.0 - value, 0.0) / (1.0 - limit)
                else:
                    s = 0.0 if value >= limit else math.inf
                if figures.empty_shapes[len(rows)] is not None:  # empty on every feed: not compared, as the check
                    rows.append({"name": name, "kind": kind, "compared": False})
                    continue
                if not ok:
                    s = max(s, math.nextafter(1.0, 2.0))
                    failed.append(f"output {name!r}: {figure}, rule {rule}")
                severity = max(severity, s)
                rows.append({"name": name, "kind": kind, spec.figure: value, "rule": rule, "ok": bool(ok)})
        within = not failed
        if within:
            severity = min(severity, 1.0)
        return Measured(d, within, severity, "; ".join(failed) or None, tuple(rows))


def _damage_terms(ref: list[np.ndarray], out: list[np.ndarray]) -> tuple[float, float]:
    """Summed squared error and energy of the float outputs of one feed."""
    err = tot = 0.0
    for r, o in zip(ref, out):
        if np.issubdtype(r.dtype, np.floating):
            err += float(np.sum((o.astype(np.float64) - r) ** 2))
            tot += float(np.sum(r.astype(np.float64) ** 2))
    return err, tot


def cut_as_written(
    work: ir.Model,
    state: dict[int, ObsState | None],
    removal: dict[int, np.ndarray],
    stats,
    *,
    refit: bool,
) -> ir.Model:
    """A copy of ``work`` with ``removal`` cut as :func:`onnxcomp.prune.api.prune_in_place` writes
    it, the removed channels' means folded into the consumers' biases (``stats``), and with
    ``refit`` each group's supported consumers given their least-squares weights from the group's
    Gram (:meth:`ObsState.refit_weights`, inputs taken as unpruned) in place of the streamed refit
    the written model gets (which also sees the upstream cuts). A consumer whose input another
    cut group also narrows keeps its folded weights."""
    from onnxcomp.graph import all_value_names
    from onnxcomp.prune import reconstruct as rc
    from onnxcomp.prune.fold import kept_output_channels

    clone = clone_model(work)
    by_id = {g.id: g for g in analyze_channels(clone, infer_shapes=False).groups}
    kept = kept_output_channels(by_id, removal)
    cut_channels(clone, by_id, removal, stats=stats)
    if not refit:
        return clone
    readers: dict[str, int] = {}
    for gid in removal:
        for c in by_id[gid].consumers:
            readers[c.node.name] = readers.get(c.node.name, 0) + 1
    nodes = {x.name: x for x in clone.graph if x.name}
    taken = all_value_names(clone.graph)
    for gid, removed in removal.items():
        st = state.get(gid)
        if st is None:
            continue
        for name in st.consumers:
            if readers.get(name, 0) != 1:
                continue
            try:
                layer = rc._plan(name, nodes, nodes)
            except (rc._Skip, ValueError):
                continue
            w = st.refit_weights(name, removed)
            if name in kept:
                w = w[:, kept[name]]
            if layer.old_params().shape != (1, *w.shape):
                continue
            layer.write(w[None], clone.graph, taken)
    return clone


def _measured_scales(
    work: ir.Model,
    groups: list[ChannelGroup],
    state: dict[int, ObsState],
    steps: dict[int, np.ndarray],
    probe: DamageProbe,
    stats,
    refit: bool,
) -> dict[int, tuple[float, int, float]]:
    """Group id -> (scale, probe n, measured damage): the end-to-end output damage of cutting about
    half of the group alone, as the written model will have it (``refit``: its consumers refitted
    from the Gram; otherwise the cut with the removed channels' means folded), divided by the
    curve's damage there, so the curves of different groups speak of the same thing: the model's
    output (:class:`DamageProbe`).

    When the group's channels reach nothing but its refitted consumers, the cut is not made: the
    consumers get zeros on the removed channels' inputs and their refit weights (``refit``) or the
    removed inputs' means in their bias (the same outputs as the cut model, without a new copy,
    channel analysis and shape inference per group).
    """
    from onnxcomp.graph import all_value_names

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
        restore = (_zero_in_consumers(shared, g, st, removed, taken, None if refit else stats)
                   if _reads_only_by_consumers(g, st) else None)
        if restore is not None:
            measured = probe.damage(shared)
            restore()
        else:  # other readers of the channels: cut for real
            measured = probe.damage(cut_as_written(work, state, {g.id: removed}, stats, refit=refit))
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
                       taken: set[str], stats=None):
    """Give ``group``'s consumers in ``model`` their refit weights with zero rows for the removed
    channels' features (``stats`` given: their own weights with those rows zeroed and the removed
    inputs' means folded into the bias, as the cut folds them); returns a function that writes the
    old weights back (None: a consumer cannot be planned)."""
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
        drop = st.features[name][removed].reshape(-1)
        if stats is not None:
            full = params[0].astype(np.float64)
            if layer.x_name in stats.sum:
                means = stats.mean(layer.x_name)
                taps = (full.shape[0] - 1) // len(means)  # im2col features are channel-major
                full[-1] += means[drop // taps] @ full[drop]
            full[drop] = 0.0
        else:
            full = np.zeros_like(params[0])
            keep = np.setdiff1d(np.arange(full.shape[0]), drop)
            full[keep] = st.refit_weights(name, removed)
        layer.write(full[None], model.graph, taken)

    def restore() -> None:
        current = {x.name: x for x in model.graph if x.name}
        for name, params in old:
            rc._plan(name, current, current).write(params, model.graph, taken)

    return restore
