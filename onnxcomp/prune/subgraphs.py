"""Structured pruning inside If branches and Loop/Scan bodies: exact folds of zero channels.

The channel analysis (:mod:`onnxcomp.analysis.channels`) works on one graph: a value captured by
a subgraph freezes its group in the main graph. Here each subgraph of a main-graph control-flow
node (:data:`onnxcomp.quant.subgraphs` knows which: If branches, Loop/Scan bodies) is detached
as a model of its own (outer activations its inputs, outer constants its initializers, shared,
not copied), pruned by :func:`onnxcomp.prune.api.prune_in_place` with the ``zeros`` criterion,
and grafted back. The body's outputs are that model's graph outputs, so only channels whose
every consumer lies inside the same body can go: exactly what the analysis proves there. An
outer weight the body sliced becomes a body weight; the outer one goes if nothing else reads it.
Nested subgraphs recurse (the detached body is pruned by the same function).

Only constant (all-zero) channels are folded inside bodies, whatever the criterion: they fold
exactly, with no data. Lossy criteria are not applied there: their ratio and scores are set on
the main graph's groups (``scope=global`` ranks them together), the data-driven ones and the
refit would need each body's own calibration feeds, and the latency/size targets are measured
on the main graph. The report says so per body (``subgraphs``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import onnx_ir as ir

from onnxcomp.prune.config import PruneConfig

__all__ = ["prune_subgraphs"]

#: Why a lossy criterion leaves the bodies alone (said in the report).
LOSSY_INSIDE = ("criterion {criterion!r} is not applied inside subgraphs (its ratio, scores and targets are "
                "set on the main graph's channel groups; data-driven scores and the refit would need the "
                "body's own calibration feeds); only zero channels are folded there")


def prune_subgraphs(model: ir.Model, config: PruneConfig, prune: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Fold the zero channels inside every subgraph of ``model``'s main graph, in place.

    ``prune(model, config, serialized_sizes=False)`` is the main-graph pass (the caller's
    ``prune_in_place``), run on each body as a model of its own.

    Returns per subgraph (``node/attribute``): ``channels_removed`` and the folds, or why it was
    left alone (a string); empty when the model has no subgraph with a prunable op.
    """
    from onnxcomp.ops import linear_spec
    from onnxcomp.bodies import body_as_model, body_kind, detach_graph, drop_unread, graft_body, outer_reads

    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    inner = dataclasses.replace(config, criterion="zeros", reconstruct=False, target_latency=None,
                                target_params=None, target_macs=None)
    note = None if config.criterion == "zeros" else LOSSY_INSIDE.format(criterion=config.criterion)
    report: dict[str, Any] = {}
    replaced: list[ir.Value] = []
    for index, node in enumerate(list(model.graph)):
        kind = body_kind(node, opset)
        if kind is None:
            continue
        for attr in kind.attrs:
            where = f"{node.name or node.op_type}/{attr}"
            body = node.attributes[attr].value
            if not any(linear_spec(n) is not None for n in body.all_nodes()):
                continue  # nothing that holds channels
            standalone = body_as_model(model, index, attr)
            formal = len(body.inputs)
            try:
                stats = prune(standalone, inner, serialized_sizes=False)
            except Exception as exc:  # a body the pass cannot run stays as it was, said so
                report[where] = f"left alone: {type(exc).__name__}: {exc}"
                continue
            removed = int(stats["channels_removed"]) - int(stats.get("channels_removed_in_subgraphs", 0))
            entry: dict[str, Any] = {"channels_removed": removed, "criterion": "zeros",
                                     **({"note": note} if note else {})}
            if stats.get("subgraphs"):
                entry["subgraphs"] = stats["subgraphs"]
            if stats.get("bias_folds"):
                entry["bias_folds"] = stats["bias_folds"]
            if removed == 0 and not stats.get("subgraphs"):
                frozen = [str(v) for v in stats["skipped_groups"].values()][:3]
                prunable = len(stats["groups"])
                entry["why_none"] = (f"no channel of its {prunable} prunable group(s) is all zeros" if prunable
                                     else "no prunable channel group: " + ("; ".join(frozen) or "none found"))
                report[where] = entry
                continue
            if [v.name for v in standalone.graph.inputs][:formal] != [v.name for v in body.inputs] or len(
                    standalone.graph.outputs) != len(body.outputs):
                report[where] = "left alone: pruning changed the subgraph's signature"
                continue
            replaced.extend(v for v in outer_reads(body) if v.is_initializer())
            graft_body(model, node, attr, standalone, formal)
            detach_graph(body)  # the old body no longer reads outer values
            report[where] = entry
    drop_unread(model.graph, replaced)
    return report
