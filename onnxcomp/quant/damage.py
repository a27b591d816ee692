r"""Which int8 nodes do the damage: one per-layer comparison of the float and the int8 model.

Both models run once with every shared intermediate tensor (and the graph outputs) exposed, on a
few feeds (:func:`onnxcomp.check.layer_sqnr`). For an int8 node *u*, the damage it adds is the
relative noise power it adds, :math:`d_u = \rho(\mathrm{out}(u)) - \min_{x \in \mathrm{in}(u)}
\rho(x)` with :math:`\rho = 10^{-\mathrm{SQNR}/10}` (graph inputs count as exact, constants are not
activations). In linear power, not dB: a drop from 12 to 9 dB deep in the network adds far more
noise than one from 60 to 40 dB at the first layer, and noise powers add up along the network.
Where an int8 model no longer computes a tensor under its float name (a Relu/Clip folded into
the int8 producer's range), the tensor before it is read: on the output side the folded
activation's consumer, on the input side the folded activation's own input.

That chained measure saturates on a network whose int8 output is already far from float: once a
tensor keeps 3 dB, every node after it "adds" nothing, and the node that broke it may itself be
ranked low. So the ranking uses the **isolated** damage instead (:func:`isolated_damage`): one
model holds the float graph and, beside it, a copy of the int8 graph whose every float activation
is read from the float graph (each QuantizeLinear quantizes the float tensor, a float node reads
float inputs). Each int8 node then computes from exact inputs, with its own input rounding, weight
rounding and arithmetic, and :math:`d_u = \rho(\mathrm{out}(u))` on that copy is the noise it adds
by itself, whatever happened upstream; one run of the merged model measures every node. The
rounding of a tensor is charged to the nodes that read it (the QuantizeLinear before them), so a
node whose output goes to float consumers only is not charged for that last rounding.

Nodes are cut into runs of about :math:`\sqrt{N}/2` consecutive nodes (one each below 16 nodes),
ranked by the sum of the positive damages of their nodes (:func:`damage_blocks`). Both fallbacks
(the check's, :mod:`onnxcomp.quant.autofallback`, and the one to a dB or accuracy target,
:func:`onnxcomp.quant.sensitivity.quantize_with_fallback`) move blocks in that order.

The int8 that the steps after the Q/DQ rewrite write (a recurrent op's int8 weights, an
embedding table as GatherBlockQuantized: :class:`onnxcomp.quant.static.FinishStep`) is measured
the same way: the int8 copy's recurrent op or lookup reads the float graph's inputs, and its
output against the float op's is the noise its int8 weights add. Each is a block of its own.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.check import layer_sqnr, power_sums
from onnxcomp.graph import all_value_names, produced_values
from onnxcomp.ops import is_constant_node, is_dequantize_node

__all__ = ["isolated_damage", "isolated_model", "local_damage", "damage_blocks", "ranked_blocks", "noise_ratio"]


def local_damage(float_model: ir.Model, int8_model: ir.Model, nodes: Sequence[str],
                 feeds: Sequence[dict[str, np.ndarray]], units: dict[str, tuple[str, str]] | None = None
                 ) -> dict[str, float]:
    """Relative noise power added at each int8 node (module docstring); nodes not measured get 0.
    A quantized subgraph (``units``: name -> (control-flow node, attribute)) is measured at its
    node's outputs (both branches of an If get the If's damage)."""
    sqnr = layer_sqnr(float_model, int8_model, list(feeds), with_outputs=True)  # a last node's output is one
    by_name = {n.name: n for n in float_model.graph}
    units = units or {}
    damage = {}
    for name in nodes:
        node = by_name.get(units[name][0] if name in units else name)
        out = _measured_output(node, sqnr) if node is not None and node.outputs else None
        if out is None:
            damage[name] = 0.0
            continue
        ins = []
        for v in node.inputs:
            if v is None or v.const_value is not None:
                continue
            v = _measured_input(v, sqnr, float_model)
            producer = v.producer()
            if producer is None:
                ins.append(0.0)  # a graph input: exact
            elif not is_constant_node(producer) and v.name in sqnr:
                ins.append(noise_ratio(sqnr[v.name]))
        damage[name] = noise_ratio(sqnr[out]) - (min(ins) if ins else 0.0)
    return damage


#: Prefix of the int8 copy's values and nodes in :func:`isolated_model`.
INT8_PREFIX = "int8::"


def isolated_model(float_model: ir.Model, int8_model: ir.Model) -> ir.Model | None:
    """One model computing the float graph and, beside it, a copy of ``int8_model``'s graph whose
    float activations are read from the float graph (module docstring); the copy's values are
    named with :data:`INT8_PREFIX`. Neither input is changed. None where the two cannot share one
    graph (different default opsets, model-local functions, a name that has the prefix already)."""
    from onnxcomp.io import clone_model

    if (float_model.opset_imports.get("", None) != int8_model.opset_imports.get("", None)
            or len(int8_model.functions) or len(float_model.functions)
            or any(n.startswith(INT8_PREFIX) for m in (float_model, int8_model) for n in all_value_names(m.graph))):
        return None
    merged, q = clone_model(float_model), clone_model(int8_model)
    float_values = {v.name: v for v in merged.graph.inputs} | produced_values(merged)
    top = {v.name: v for v in q.graph.inputs}
    for node in q.graph:
        if not is_dequantize_node(node) and not is_constant_node(node):
            top.update({v.name: v for v in node.outputs if v.name})
    # every read of a float activation of the int8 graph (Q inputs, float nodes' inputs, reads
    # from inside control-flow bodies) goes to the float graph's tensor of that name
    for node in list(ir.traversal.RecursiveGraphIterator(q.graph)):
        for i, v in enumerate(node.inputs):
            if v is not None and v.name in top and top[v.name] is v and v.name in float_values:
                node.replace_input_with(i, float_values[v.name])
    # the copy's names get a prefix (a body's own inputs and initializers live in their own
    # scope and keep theirs; values are shared by reference, not by name)
    for v in q.graph.inputs:
        v.name = INT8_PREFIX + v.name
    inputs = {id(v) for v in q.graph.inputs}
    q.graph.inputs.clear()  # read from the float graph's inputs; an input with an initializer moves as one below
    for node in ir.traversal.RecursiveGraphIterator(q.graph):
        node.name = INT8_PREFIX + (node.name or "")
        for v in node.outputs:
            if v.name:
                v.name = INT8_PREFIX + v.name
    q.graph.outputs.clear()  # the merged graph exposes what it measures
    nodes = list(q.graph)
    q.graph.remove(nodes)
    merged.graph.extend(nodes)
    for name in list(q.graph.initializers):
        value = q.graph.initializers.pop(name)
        if id(value) not in inputs:  # an input's is renamed already
            value.name = INT8_PREFIX + name
        merged.graph.register_initializer(value)
    for domain, version in q.opset_imports.items():
        merged.opset_imports.setdefault(domain, version)
    return merged


def isolated_damage(float_model: ir.Model, int8_model: ir.Model, nodes: Sequence[str],
                    feeds: Sequence[dict[str, np.ndarray]], units: dict[str, tuple[str, str]] | None = None
                    ) -> dict[str, float] | None:
    r"""Relative noise power each node of ``nodes`` adds by itself, from float inputs (module
    docstring): :math:`\rho` of its output in the int8 copy of :func:`isolated_model`. A quantized
    subgraph (``units``) is measured at its control-flow node's outputs; a node whose output
    neither model names alike gets 0. None where :func:`isolated_model` is None."""
    from onnxcomp.check import _exposed_runs

    merged = isolated_model(float_model, int8_model)
    if merged is None:
        return None
    produced = produced_values(merged)
    both = {n for n in produced if not n.startswith(INT8_PREFIX) and INT8_PREFIX + n in produced}
    by_name = {n.name: n for n in float_model.graph}
    units = units or {}
    measured: dict[str, str | None] = {}
    for name in nodes:
        node = by_name.get(units[name][0] if name in units else name)
        measured[name] = _measured_output(node, both) if node is not None and node.outputs else None
    names = sorted({m for m in measured.values() if m is not None})
    if not names:
        return dict.fromkeys(nodes, 0.0)
    exposed_names = [x for n in names for x in (n, INT8_PREFIX + n)]
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for run in _exposed_runs(merged, exposed_names, list(feeds)):
        for k, name in enumerate(names):
            sums = power_sums(run[2 * k], run[2 * k + 1])
            if sums is None:  # not comparable on this feed
                continue
            signal[name] += sums[0]
            noise[name] += sums[1]
    ratio = {n: (0.0 if noise[n] == 0 else (noise[n] / signal[n] if signal[n] > 0 else 1.0)) for n in names}
    return {name: (min(1.0, ratio[m]) if m is not None else 0.0) for name, m in measured.items()}


def _measured_output(node: ir.Node, sqnr: dict[str, float], steps: int = 3) -> str | None:
    """The first tensor from ``node``'s output on that both models compute: an activation folded
    into an int8 node (Relu, Clip) hides the node's own output, so its sole consumer's is taken.
    Failing that, another output of ``node`` both compute (an LSTM whose sequence output is
    omitted and only the last state read)."""
    value = node.outputs[0]
    for _ in range(steps):
        if value.name in sqnr:
            return value.name
        consumers = value.consumers()
        if len(consumers) != 1 or not consumers[0].outputs:
            break
        value = consumers[0].outputs[0]
    return next((v.name for v in node.outputs[1:] if v.name and v.name in sqnr), None)


def _measured_input(value: ir.Value, sqnr: dict[str, float], model: ir.Model, steps: int = 3) -> ir.Value:
    """``value``, or the tensor before it that both models compute: a Relu/Clip folded into the
    int8 producer (and data movement, which adds no noise of its own) hides ``value`` in the int8
    model, so the input of the op that made it is taken. Without this, the noise a node receives
    through a folded Relu counted as noise it adds."""
    from onnxcomp.quant.rules import QUANT_RULES

    for _ in range(steps):
        producer = value.producer()
        if value.name in sqnr or producer is None or not producer.inputs or producer.inputs[0] is None:
            return value
        rule = QUANT_RULES.lookup(producer, model)
        if rule is None or rule.kind not in ("fold", "shared"):
            return value
        value = producer.inputs[0]
    return value


def noise_ratio(db: float) -> float:
    """Noise-to-signal power of an SQNR in dB, at most 1 (NaN: 1)."""
    return 1.0 if math.isnan(db) else min(1.0, 10.0 ** (-db / 10.0))


def damage_blocks(nodes: Sequence[str], damage: dict[str, float], size: int | None = None,
                  alone: Collection[str] = ()) -> list[list[str]]:
    """``nodes`` (in graph order) cut into runs of ``size`` consecutive nodes (default about
    sqrt(N)/2, one node each below 16 nodes), worst first: by the noise their nodes add
    (the sum of the positive damages: noise powers add). The nodes of ``alone`` are blocks of
    their own, ranked among the runs by their own damage: a recurrent op or an embedding lookup
    (the finish steps' candidates) goes float with no Q/DQ boundary to share with its neighbours."""
    runs = [n for n in nodes if n not in alone]
    if size is None:
        size = 1 if len(runs) < 16 else max(2, round(math.sqrt(len(runs)) / 2))
    blocks = [list(runs[i:i + size]) for i in range(0, len(runs), size)]
    blocks += [[n] for n in nodes if n in alone]
    return sorted(blocks, key=lambda b: -sum(max(damage.get(n, 0.0), 0.0) for n in b))


def ranked_blocks(study, nodes: Sequence[str], float_nodes: frozenset[str] = frozenset(), *, damage_feeds: int = 2,
                  block_size: int | None = None) -> tuple[list[list[str]], dict[str, float]]:
    """``nodes`` of ``study`` (a :class:`~onnxcomp.quant.sensitivity.QuantStudy`) in blocks, worst
    first (:func:`damage_blocks`), and each node's damage (:func:`isolated_damage`; the chained
    :func:`local_damage` where the two models cannot share a graph), from one run of the float
    model beside the variant that keeps ``float_nodes`` float, on the first ``damage_feeds`` of
    the study's feeds."""
    quantized = study.build(frozenset(float_nodes))
    reference = study.float_reference
    feeds = study.feeds[:damage_feeds]
    damage = isolated_damage(reference, quantized, list(nodes), feeds, study.units)
    if damage is None:
        damage = local_damage(reference, quantized, list(nodes), feeds, study.units)
    return damage_blocks(nodes, damage, block_size, alone=getattr(study, "finish_nodes", {})), damage
