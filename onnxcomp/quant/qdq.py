r"""Static quantization: insert QuantizeLinear/DequantizeLinear where onnxruntime fuses int8 kernels.

Three steps, kept apart:

1. **Plan** (:func:`plan_static`, analysis): which nodes run in int8 and which tensors get a Q/DQ
   pair, from the placement table :data:`~onnxcomp.quant.rules.QUANT_RULES`. A compute node
   (Conv, MatMul, Gemm, Add, Mul, Concat, pooling) is quantized when the selector allows it, its
   activations are float32, its weight (if any) is a constant, and its output can be quantized:
   not a graph output (unless asked) and not feeding an op that is sensitive to input error
   (Softmax, Exp, LayerNormalization, a Div's divisor...). MatMul and Gemm are also quantized
   when their output must stay float: onnxruntime runs them as MatMulIntegerToFloat, or, where
   it fuses a MatMul with its bias Add into a Gemm (``QuantRule.bias_add_fusion``), as QGemm with
   a float output (the bias then int32, below). Add, Mul
   and Concat are quantized where that saves Q/DQ conversions (counted over their neighbours,
   repeated to a fixed point; see ``QuantRule.by_neighbours``). Data-movement ops between
   quantized tensors share their input's parameters; Relu/Clip(0, x) after a quantized producer
   are folded into its output range (asymmetric activations only).
2. **Statistics** (:mod:`onnxcomp.quant.calibrate`): the plan's ``observed`` tensors get ranges.
3. **Rewrite** (:class:`QDQPass`): one Q/DQ pair per quantized tensor, shared by all its int8
   consumers (float consumers keep reading the float tensor, except where an int8 node's output
   must feed nothing but its Q: there a node kept float on request reads a per-axis DQ with equal
   parameters, so that onnxruntime does not fuse it into an int8 kernel of its own); weights
   quantized offline to int8,
   per output channel, symmetric; Conv/Gemm biases, and the bias Add onnxruntime fuses with a
   float-output MatMul, to int32 with

   .. math:: s_b[c] = s_x \, s_w[c], \qquad b_q[c] = \mathrm{round}(b[c] / s_b[c])

   so that onnxruntime's integer accumulation needs no rescaling of the bias. A bias that would
   overflow int32 (tiny scales) keeps its node in float and is reported.

Activation scales and zero points follow :func:`~onnxcomp.quant.primitives.compute_scale_zero_point`
on the calibrated range widened to contain 0 (so zero padding is exact).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxcomp.graph import add_initializer, all_value_names, clip_bounds, unique_name
from onnxcomp.errors import OnnxcompError
from onnxcomp.analysis.excitation import excitation_nodes
from onnxcomp.ops import is_clip_node, is_dequantize_node
from onnxcomp.passes.base import CompressionPass
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.primitives import (compute_scale_zero_point, qrange, quantize, quantize_bias, quantize_weight,
                                       scale_inside)
from onnxcomp.quant.rules import QUANT_RULES, WEIGHT_QUANTIZED_BY_ORT, QuantRule, sensitive_use

__all__ = ["QuantPoint", "StaticPlan", "plan_static", "QDQPass"]

_QTYPES = {"uint8": ir.DataType.UINT8, "int8": ir.DataType.INT8}


@dataclasses.dataclass
class QuantPoint:
    """A Q/DQ pair: placed after ``value``, parameters from the range of tensor ``range_of``.

    ``shared_with`` names the point whose parameters this one reuses (data movement). ``within``:
    the constant bounds of a Clip folded into this point whose producer is not int8; the grid's
    saturation range is kept inside them (:func:`~onnxcomp.quant.primitives.scale_inside`), which
    makes dropping the Clip exact.
    """

    value: str
    range_of: str
    shared_with: str | None = None
    constant: bool = False
    within: tuple[float, float] | None = None


#: Metadata key of a node a pass inserted to stay float (the value says why); the plan keeps it
#: float whatever its op (e.g. onnxcomp.quant.outliers' correction MatMul).
KEEP_FLOAT_KEY = "onnxcomp.keep_float"


@dataclasses.dataclass
class StaticPlan:
    """What the static pass will do (see module docstring)."""

    nodes: list[str]
    points: dict[str, QuantPoint]
    folded: list[str]
    skipped: dict[str, str]
    #: nodes kept float on request (the selection, ``keep_float``): onnxruntime must not fuse them
    kept_float: frozenset[str] = frozenset()

    @property
    def observed(self) -> list[str]:
        """Tensors whose ranges calibration must provide."""
        return sorted({p.range_of for p in self.points.values() if p.shared_with is None and not p.constant})

    @property
    def touched(self) -> list[str]:
        """Every tensor a point sits on or takes its range from (a superset of :attr:`observed`)."""
        return sorted({n for p in self.points.values() if not p.constant for n in (p.value, p.range_of)})


def _rule(node: ir.Node, model: ir.Model) -> QuantRule | None:
    return QUANT_RULES.lookup(node, model)


def _is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def plan_static(
    model: ir.Model,
    config: QuantizeConfig,
    *,
    keep_float: Mapping[str, str] | None = None,
    within: StaticPlan | None = None,
) -> StaticPlan:
    """Decide which nodes and tensors to quantize. ``model`` must carry inferred types.

    ``keep_float`` maps node names to the reason they must stay float (see :func:`mixed_range_nodes`).
    ``within``: a plan this one refines (calibrated already): no node outside its int8 nodes goes
    int8, so every tensor this plan quantizes has a range. Without it, keeping a MatMul float could
    tip its bias Add into int8, whose output was never observed.
    """
    # nodes a pass made to stay float carry their reason (KEEP_FLOAT_KEY)
    marked = {n.name: n.metadata_props[KEEP_FLOAT_KEY] for n in model.graph if KEEP_FLOAT_KEY in n.metadata_props}
    keep_float = {**marked, **(keep_float or {})}
    if config.excitation_float:
        keep_float = {**excitation_nodes(model), **keep_float}
    outputs = {v.name for v in model.graph.outputs}
    skipped: dict[str, str] = {}
    kept_float: set[str] = set()
    nodes = list(model.graph)
    compute, float_out, by_neighbours = _compute_nodes(nodes, model, config, keep_float, within, outputs,
                                                       skipped, kept_float)
    _tip_neighbours(by_neighbours, compute, outputs, model, skipped)
    # An op that can keep a float output keeps it unless an int8 node reads it.
    for node in compute.values():
        rule = _rule(node, model)
        if rule is not None and rule.float_output_ok and not _feeds_int8(node.outputs[0], compute, model):
            float_out.add(node.name)
    points = _activation_points(compute, float_out, model)
    folded = _fold_into_ranges(nodes, model, config, compute, float_out, outputs, points)
    _share_data_movement(nodes, model, config, outputs, points)
    return StaticPlan(nodes=list(compute), points=points, folded=folded, skipped=skipped,
                      kept_float=frozenset(kept_float))


def _compute_nodes(
    nodes: list[ir.Node], model: ir.Model, config: QuantizeConfig, keep_float: Mapping[str, str],
    within: StaticPlan | None, outputs: set[str], skipped: dict[str, str], kept_float: set[str],
) -> tuple[dict[str, ir.Node], set[str], list[ir.Node]]:
    """Step 1: the compute nodes that can go int8 (name -> node), those of them that keep a float
    output, and the Add/Mul decided by their neighbours; the others' reasons go into ``skipped``."""
    selector = config.selector
    compute: dict[str, ir.Node] = {}
    float_out: set[str] = set()
    by_neighbours: list[ir.Node] = []
    for node in nodes:
        rule = _rule(node, model)
        if rule is None or rule.kind != "compute":
            continue
        label = node.name or node.op_type
        if not selector.allows(node.name or "", node.op_type):
            skipped[label] = "excluded by the selection"
            kept_float.add(node.name)
            continue
        if node.name in keep_float:
            skipped[label] = keep_float[node.name]
            kept_float.add(node.name)
            continue
        if within is not None and node.name not in within.nodes:
            skipped[label] = within.skipped.get(label, "left in float by the plan this one refines")
            continue
        reason = _not_int8(node, rule)
        if reason is not None:
            skipped[label] = reason
            continue
        reason = _output_not_quantizable(node.outputs[0], outputs, config)
        if reason is not None:
            if not rule.float_output_ok:
                skipped[label] = f"left in float: {reason}"
                continue
            float_out.add(node.name)
        if rule.by_neighbours:
            by_neighbours.append(node)
            continue
        compute[node.name] = node
    return compute, float_out, by_neighbours


def non_constant_weight(weight: ir.Value | None) -> str:
    """Why a weight that is not a constant cannot be quantized: a model quantized before says so."""
    producer = weight.producer() if weight is not None else None
    if producer is not None and is_dequantize_node(producer):
        return "its weight is already quantized (a DequantizeLinear's output); quantize the float original"
    return "its weight is not a constant"


def _not_int8(node: ir.Node, rule: QuantRule) -> str | None:
    """Why a compute node cannot have an int8 form (its types, a non-constant weight), or None."""
    act_idx = range(len(node.inputs)) if rule.activations is None else rule.activations
    acts = [node.inputs[i] for i in act_idx if i < len(node.inputs)]
    if not acts or not all(_is_float32(v) for v in acts):
        return "an input is not float32"
    if node.op_type == "Gemm":
        trans_a = node.attributes.get("transA")
        if trans_a is not None and trans_a.as_int():
            return "Gemm with transA=1 has no int8 kernel"
    if rule.weight is not None:
        weight = node.inputs[rule.weight] if rule.weight < len(node.inputs) else None
        if not _is_const(weight) and not (rule.weight_may_be_activation and _is_float32(weight)):
            return non_constant_weight(weight)
        if _is_const(weight) and weight.dtype != ir.DataType.FLOAT:
            return "its weight is not float32"
    if len(node.outputs) != 1 or not _is_float32(node.outputs[0]):
        return "its output is not a single float32 tensor"
    return None


def _output_not_quantizable(value: ir.Value, outputs: set[str], config: QuantizeConfig) -> str | None:
    if value.name in outputs and not config.quantize_outputs:
        return "its output is a graph output"
    for use in value.uses():
        if sensitive_use(use.node, use.idx):
            return f"its output feeds {use.node.op_type} {use.node.name!r}"
    return None


def _tip_neighbours(by_neighbours: list[ir.Node], compute: dict[str, ir.Node], outputs: set[str],
                    model: ir.Model, skipped: dict[str, str]) -> None:
    """Add/Mul go int8 where that saves conversions, decided for each chain of directly connected
    Add/Mul at once (an affine x * a + b after a float op only pays as a whole); a chain that goes
    int8 can tip its neighbours, so repeat until nothing changes (only ever adds nodes)."""
    undecided = _chains(by_neighbours, model)
    while True:
        tipped = [chain for chain in undecided if _int8_pays(chain, compute, outputs, model)]
        if not tipped:
            break
        for chain in tipped:
            compute.update((n.name, n) for n in chain)
        undecided = [chain for chain in undecided if chain[0].name not in compute]
    for node in (n for chain in undecided for n in chain):
        skipped[node.name or node.op_type] = "left in float: int8 would add more Q/DQ conversions than it removes"


def _activation_points(compute: Mapping[str, ir.Node], float_out: set[str], model: ir.Model) -> dict[str, QuantPoint]:
    """The tensors to quantize: the int8 nodes' activation inputs and (unless kept float) outputs."""
    points: dict[str, QuantPoint] = {}

    def add_point(value: ir.Value) -> None:
        if value.name not in points:
            points[value.name] = QuantPoint(value.name, value.name, constant=_is_const(value))

    for node in compute.values():
        rule = _rule(node, model)
        assert rule is not None
        act_idx = list(range(len(node.inputs)) if rule.activations is None else rule.activations)
        if rule.weight is not None and rule.weight_may_be_activation and not _is_const(node.inputs[rule.weight]):
            act_idx.append(rule.weight)
        for i in act_idx:
            if i < len(node.inputs) and node.inputs[i] is not None:
                add_point(node.inputs[i])
        if node.name not in float_out:
            add_point(node.outputs[0])
    return points


def _fold_into_ranges(
    nodes: list[ir.Node], model: ir.Model, config: QuantizeConfig, compute: Mapping[str, ir.Node],
    float_out: set[str], outputs: set[str], points: dict[str, QuantPoint],
) -> list[str]:
    """Step 2: Relu / Clip(0, x) folded into the producer's output range, and a constant Clip read
    only by int8 nodes folded into its input's Q/DQ (:func:`_clip_before_int8`); the folded nodes."""
    folded: list[str] = []
    if not config.fold_activations or config.activation_symmetric:
        return folded
    selector, graph = config.selector, model.graph
    for node in nodes:
        rule = _rule(node, model)
        if rule is None or rule.kind != "fold" or not selector.allows(node.name or "", node.op_type):
            continue
        src = node.inputs[0]
        producer = src.producer() if src is not None else None
        out = node.outputs[0]
        if producer is None or producer.name not in compute or producer.name in float_out:
            bounds = _clip_before_int8(node, compute, outputs, points, config)
            if bounds is not None:
                points[out.name] = QuantPoint(src.name, out.name, within=bounds)
                folded.append(node.name)
            continue
        if len(src.uses()) != 1 or src.name in outputs or out.name in outputs:
            continue
        if is_clip_node(node) and (not _clip_starts_at_zero(node) or config.reduce_activations):
            continue  # (a 7-bit activation grid still quantizes up to 255: it cannot clamp the top)
        # The producer's output is quantized anyway: reading the Q/DQ of the Relu/Clip range
        # instead of Relu/Clip of the Q/DQ is exact and narrower, unless a reader is sensitive.
        uses = list(out.uses())
        if not uses or any(sensitive_use(u.node, u.idx) for u in uses):
            continue
        if any(u.node.graph is not graph for u in uses):
            continue  # an If branch or a Loop body reads it: it would read the unclamped input
        points.pop(src.name, None)
        points[out.name] = QuantPoint(src.name, out.name)
        folded.append(node.name)
    return folded


def _clip_before_int8(node: ir.Node, compute: Mapping[str, ir.Node], outputs: set[str],
                      points: Mapping[str, QuantPoint], config: QuantizeConfig) -> tuple[float, float] | None:
    """Bounds of a Clip whose only readers are int8 nodes and whose producer is not int8 (e.g. the
    outlier split's clamp, onnxcomp.quant.outliers): the Q/DQ moves to the Clip's input with a
    grid kept inside the bounds, so the Clip goes (onnxruntime itself drops such a Clip only when
    the grid happens to lie inside it). The input's other readers must be float and read it as it
    is; None where any condition fails."""
    if not is_clip_node(node) or config.reduce_activations:
        return None
    lo, hi = clip_bounds(node)
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi) and lo <= 0.0 <= hi):
        return None
    src, out = node.inputs[0], node.outputs[0]
    if src is None or not _is_float32(src) or out.name not in points:
        return None
    if points[out.name].shared_with is not None or src.name in points or src.name in outputs or out.name in outputs:
        return None
    graph = node.graph
    uses = list(out.uses())
    if not uses or any(u.node.graph is not graph or u.node.name not in compute or sensitive_use(u.node, u.idx)
                       for u in uses):
        return None
    for use in src.uses():
        other = use.node
        if other is node:
            continue
        if other.name in compute or any(v.name in points for v in other.outputs):
            return None
    return lo, hi


def _share_data_movement(nodes: list[ir.Node], model: ir.Model, config: QuantizeConfig, outputs: set[str],
                         points: dict[str, QuantPoint]) -> None:
    """Step 3: data movement between quantized tensors shares its input's parameters."""
    selector = config.selector
    for node in nodes:
        rule = _rule(node, model)
        if rule is None or rule.kind != "shared" or not node.inputs or not node.outputs:
            continue
        src, out = node.inputs[0], node.outputs[0]
        if src is None or not _is_float32(out) or not selector.allows(node.name or "", node.op_type):
            continue
        src_point = _point_for(points, src.name)
        if src_point is None or out.name not in points or out.name in outputs:
            continue
        if node.op_type == "Split" or len(node.outputs) != 1:
            continue
        points[out.name] = QuantPoint(out.name, src_point.range_of, shared_with=src_point.value)


def mixed_range_nodes(
    model: ir.Model, plan: StaticPlan, ranges: Mapping[str, tuple[float, float]], max_ratio: float
) -> dict[str, str]:
    """Concat nodes whose inputs' calibrated ranges differ by more than ``max_ratio``.

    One scale for such a tensor destroys the narrow part: a detector head concatenating boxes
    (0..320) and scores (0..1) keeps cosine 0.999 while every score rounds to 0 or 1.25. These
    nodes stay float (re-plan with them in ``keep_float``).
    """
    found: dict[str, str] = {}
    by_name = {n.name: n for n in model.graph}
    for name in plan.nodes:
        node = by_name.get(name)
        if node is None or node.op_type != "Concat":
            continue
        widths = []
        for value in node.inputs:
            point = _point_for(plan.points, value.name) if value is not None else None
            if point is None:
                continue
            if point.constant:
                arr = value.const_value.numpy()
                lo, hi = float(arr.min()), float(arr.max())
            elif point.range_of in ranges:
                lo, hi = ranges[point.range_of]
            else:
                continue
            widths.append(max(hi, 0.0) - min(lo, 0.0))
        if len(widths) >= 2 and max(widths) > max_ratio * max(min(widths), 1e-12):
            found[name] = (
                f"left in float: its inputs' ranges differ {max(widths) / max(min(widths), 1e-12):.0f}x "
                f"(more than {max_ratio:g}x); one scale would erase the narrow input"
            )
    return found


def _producer_through_movement(value: ir.Value, model: ir.Model) -> ir.Node | None:
    """The node that computes ``value``, looking through data movement and Relu/Clip."""
    for _ in range(64):
        producer = value.producer()
        if producer is None:
            return None
        rule = _rule(producer, model)
        if rule is None or rule.kind not in ("shared", "fold") or not producer.inputs or producer.inputs[0] is None:
            return producer
        value = producer.inputs[0]
    return None


def _activation_inputs(node: ir.Node, model: ir.Model) -> list[ir.Value]:
    rule = _rule(node, model)
    assert rule is not None
    idx = range(len(node.inputs)) if rule.activations is None else rule.activations
    return [node.inputs[i] for i in idx if i < len(node.inputs) and node.inputs[i] is not None]


def _chains(nodes: list[ir.Node], model: ir.Model) -> list[list[ir.Node]]:
    """Group ``nodes`` into chains: connected where one reads another (through data movement)."""
    names = {n.name: n for n in nodes}
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in nodes:
        for value in _activation_inputs(node, model):
            source = _producer_through_movement(value, model)
            if source is not None and source.name in names:
                parent[root(node.name)] = root(source.name)
    chains: dict[str, list[ir.Node]] = {}
    for node in nodes:
        chains.setdefault(root(node.name), []).append(node)
    return list(chains.values())


def _int8_pays(chain: list[ir.Node], compute: Mapping[str, ir.Node], outputs: set[str], model: ir.Model) -> bool:
    """The ``by_neighbours`` test of :class:`~onnxcomp.quant.rules.QuantRule` for a chain of nodes.

    Counts the conversions at the chain's border: an input from outside needs a Q if the chain is
    int8 and its source is not, a DQ if the chain is float and its source is int8 (constants are
    free); an output read outside needs a DQ (int8 chain, float reader) or a Q (float chain, int8
    reader). Int8 wins ties (int8 element-wise kernels move a quarter of the bytes) but needs at
    least one int8 neighbour. A chain holding the bias Add of a MatMul/Gemm (a constant added to
    its output) stays float: onnxruntime fuses that Add into MatMulIntegerToFloat, or with the
    MatMul into a Gemm that runs int8 with a float output (``QuantRule.bias_add_fusion``).
    """
    if any(_is_bias_add(node, compute, model) for node in chain):
        return False
    members = {n.name for n in chain}
    as_int8 = {**compute, **{n.name: n for n in chain}}
    int8_in = float_in = int8_out = float_out = 0
    seen: set[str] = set()
    for node in chain:
        for value in _activation_inputs(node, model):
            if _is_const(value) or value.name in seen:
                continue
            seen.add(value.name)
            source = _producer_through_movement(value, model)
            if source is not None and source.name in members:
                continue
            source_rule = _rule(source, model) if source is not None and source.name in compute else None
            if source_rule is not None and not source_rule.float_output_ok:
                int8_in += 1
            else:
                float_in += 1  # float compute, a graph input, or a MatMul/Gemm keeping its bias fusion
    for node in chain:
        out = node.outputs[0]
        int8_reader, float_reader = False, out.name in outputs
        for use in out.uses():
            reader = use.node
            if reader.name in members:
                continue
            rule_r = _rule(reader, model)
            if reader.name in compute:
                int8_reader = True
            elif rule_r is not None and rule_r.kind in ("shared", "fold") and use.idx == 0 and reader.outputs:
                if _feeds_int8(reader.outputs[0], as_int8, model):
                    int8_reader = True
                elif not _feeds_only(reader.outputs[0], members, model):
                    float_reader = True
            else:
                float_reader = True
        int8_out += int8_reader
        float_out += float_reader
    if not (int8_in or int8_out):
        return False
    return float_in + float_out <= int8_in + int8_out


def _is_bias_add(node: ir.Node, compute: Mapping[str, ir.Node], model: ir.Model) -> bool:
    if node.op_type != "Add" or len(node.inputs) != 2 or not any(_is_const(v) for v in node.inputs):
        return False
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        rule = _rule(producer, model) if producer is not None and producer.name in compute else None
        if rule is not None and rule.float_output_ok:
            return True
    return False


def _feeds_only(value: ir.Value, members: set[str], model: ir.Model, depth: int = 0) -> bool:
    """Whether every reader of ``value`` (through data movement and Relu/Clip) is in ``members``."""
    if depth > 64:
        return False
    for use in value.uses():
        node = use.node
        if node.name in members:
            continue
        rule = _rule(node, model)
        if rule is None or rule.kind not in ("shared", "fold") or use.idx != 0 or not node.outputs:
            return False
        if not _feeds_only(node.outputs[0], members, model, depth + 1):
            return False
    return bool(value.uses())


def _feeds_int8(value: ir.Value, compute: Mapping[str, ir.Node], model: ir.Model, depth: int = 0) -> bool:
    """Whether an int8 node reads ``value``, directly or through data movement and Relu/Clip."""
    if depth > 64:
        return False
    for use in value.uses():
        node = use.node
        if node.name in compute:
            return True
        rule = _rule(node, model)
        if rule is not None and rule.kind in ("shared", "fold") and use.idx == 0 and node.outputs:
            if _feeds_int8(node.outputs[0], compute, model, depth + 1):
                return True
    return False


def _point_for(points: Mapping[str, QuantPoint], name: str) -> QuantPoint | None:
    if name in points:
        return points[name]
    for p in points.values():
        if p.value == name:
            return p
    return None


def _clip_starts_at_zero(node: ir.Node) -> bool:
    return clip_bounds(node)[0] == 0.0


class QDQPass(CompressionPass[QuantizeConfig]):
    """Insert Q/DQ for a :class:`StaticPlan` with calibrated ``ranges`` (see module docstring).

    Refuses a model below opset 13 (per-axis DequantizeLinear needs it) and a plan whose observed
    tensors have no range.
    """

    config_class = QuantizeConfig
    min_opset = 13

    def __init__(
        self, config: QuantizeConfig, plan: StaticPlan, ranges: Mapping[str, tuple[float, float]],
        rounder: Any = None,
    ) -> None:
        super().__init__(config)
        self.rounder = rounder  # onnxcomp.quant.gptq.Rounder: error-compensating weight rounding
        missing = [t for t in plan.observed if t not in ranges]
        if missing:
            raise OnnxcompError(f"no calibration range for tensor(s) {missing[:5]}")
        self.plan = plan
        self.ranges = dict(ranges)

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        rewrite = _QDQRewrite(model, self.config, self.plan, self.ranges, self.rounder)
        rewrite.fold_activations()
        rewrite.insert_activation_qdq()
        rewrite.rewire_consumers()
        rewrite.quantize_weights_and_biases()
        TopologicalSortPass()(model)
        RemoveUnusedNodesPass()(model)
        return bool(self.plan.points or rewrite.weights), rewrite.stats()


class _QDQRewrite:
    """One application of :class:`QDQPass`, in named steps over shared state: fold Relu/Clip,
    insert activation Q/DQ, rewire consumers, quantize weights and biases."""

    def __init__(self, model: ir.Model, config: QuantizeConfig, plan: StaticPlan,
                 ranges: Mapping[str, tuple[float, float]], rounder: Any) -> None:
        self.model, self.cfg, self.plan, self.ranges, self.rounder = model, config, plan, ranges, rounder
        graph = self.graph = model.graph
        self.qtype = config.activation_type
        self.taken = all_value_names(graph)
        self.values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
        for node in graph:
            for v in node.outputs:
                self.values[v.name] = v
        self.values.update({name: v for name, v in graph.initializers.items()})
        self.by_name = {n.name: n for n in graph}
        self.params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.int8_nodes = set(plan.nodes)
        self.dq_of: dict[str, ir.Value] = {}
        self.q_of: dict[str, tuple[ir.Value, np.ndarray, np.ndarray, ir.Value]] = {}
        self.float_dq_of: dict[str, ir.Value] = {}
        self.unguarded: list[str] = []
        self.created: set[ir.Node] = set()
        self.shared_nodes: set[str] = set()
        self.removed = self.weights = self.biases = self.bias_float = self.fused_biases = 0
        self.shared_weights = 0

    def act_params(self, point: QuantPoint) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point of an activation point (shared points take their source's)."""
        key = point.shared_with or point.value
        if key in self.params:
            return self.params[key]
        if point.shared_with is not None and point.shared_with in self.plan.points:
            result = self.act_params(self.plan.points[point.shared_with])
        elif point.constant:
            array = self.values[point.value].const_value.numpy()
            result = compute_scale_zero_point(float(array.min()), float(array.max()), self.qtype,
                                              self.cfg.activation_symmetric, self.cfg.reduce_activations)
        else:
            lo, hi = self.ranges[point.range_of]
            result = compute_scale_zero_point(lo, hi, self.qtype, self.cfg.activation_symmetric,
                                              self.cfg.reduce_activations)
            if point.within is not None:
                result = (scale_inside(result[0], result[1], *point.within, self.qtype), result[1])
        self.params[key] = result
        return result

    def fold_activations(self) -> None:
        """Fold Relu/Clip: their consumers read the producer's output directly."""
        for name in self.plan.folded:
            node = self.by_name[name]
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            self.graph.remove(node, safe=True)
            self.removed += 1

    def insert_activation_qdq(self) -> None:
        """A QuantizeLinear (a quantized initializer for constants) and a DequantizeLinear per point."""
        graph, taken = self.graph, self.taken
        for point in self.plan.points.values():
            value = self.values.get(point.value)
            if value is None:
                continue
            scale, zp = self.act_params(point)
            scale_v = add_initializer(graph, f"{point.value}_scale", np.asarray(scale, np.float32), taken)
            zp_v = add_initializer(graph, f"{point.value}_zero_point", np.asarray(zp), taken)
            if value.const_value is not None:
                q_array = quantize(value.const_value.numpy(), scale, zp, self.qtype)
                q_value = add_initializer(graph, f"{point.value}_quantized", q_array, taken)
            else:
                qnode = ir.node(
                    "QuantizeLinear", [value, scale_v, zp_v],
                    name=unique_name(graph, f"{point.value}_QuantizeLinear", taken),
                )
                q_value = qnode.outputs[0]
                q_value.name = unique_name(graph, f"{point.value}_q", taken)
                q_value.dtype = _QTYPES[self.qtype]
                q_value.shape = value.shape
                graph.append(qnode)
                self.created.add(qnode)
            dqnode = _dequantize_node(graph, taken, point.value, q_value, scale_v, zp_v, like=value)
            self.created.add(dqnode)
            self.dq_of[point.value] = dqnode.outputs[0]
            self.q_of[point.value] = (q_value, np.asarray(scale, np.float32), np.asarray(zp), value)

    def float_reader_dq(self, name: str) -> ir.Value:
        """The DQ a node kept float reads an int8 node's output through: per axis, equal parameters.

        onnxruntime's WeightBiasQuantization turns a float Conv/Gemm whose input comes from a
        per-tensor DQ and whose output path ends in a Q into an int8 kernel (per-tensor
        weights), and its QDQ selectors fuse other ops in that position: a node kept float on
        purpose (excluded, or by the fallback) would silently run in int8. A per-axis DQ with
        the same scale on every channel gives the same values and is not taken for a
        per-tensor one. Only for :data:`~onnxcomp.quant.rules.WEIGHT_QUANTIZED_BY_ORT`: it is
        slower than a per-tensor DQ on large tensors (feature maps), and other
        fusions of onnxruntime take it and fail at run time.
        """
        if name in self.float_dq_of:
            return self.float_dq_of[name]
        q_value, scale, zp, like = self.q_of[name]
        dims = list(like.shape) if like.shape is not None else []
        axis = next((a for a in ([1] if len(dims) > 1 else []) + list(range(len(dims)))
                     if isinstance(dims[a], int) and dims[a] > 1), None)
        if axis is None:
            self.float_dq_of[name] = self.dq_of[name]
            self.unguarded.append(name)
            return self.dq_of[name]
        n = int(dims[axis])
        s_v = add_initializer(self.graph, f"{name}_scale_per_axis", np.full(n, scale, np.float32), self.taken)
        z_v = add_initializer(self.graph, f"{name}_zero_point_per_axis", np.full(n, zp, zp.dtype), self.taken)
        node = _dequantize_node(self.graph, self.taken, f"{name}_float", q_value, s_v, z_v, like=like, axis=axis)
        self.created.add(node)
        self.float_dq_of[name] = node.outputs[0]
        return node.outputs[0]

    def rewire_consumers(self) -> None:
        """Rewire consumers to the dequantized tensors: every consumer of an int8 node's output
        (onnxruntime fuses a node only when its output feeds nothing but the Q), and the int8
        consumers of other tensors (float consumers keep the exact float value)."""
        plan, dq_of = self.plan, self.dq_of
        int8_outputs = {n.outputs[0].name for n in self.graph if n.name in self.int8_nodes and n.outputs}
        for node in list(self.graph):
            if node in self.created:
                continue
            rule = QUANT_RULES.lookup(node, self.model)
            shared = (
                rule is not None
                and rule.kind == "shared"
                and bool(node.outputs)
                and node.outputs[0].name in plan.points
                and plan.points[node.outputs[0].name].shared_with is not None
            )
            if shared:
                self.shared_nodes.add(node.name)
            int8_consumer = node.name in self.int8_nodes or shared
            for i, inp in enumerate(node.inputs):
                if inp is None or inp.name not in dq_of:
                    continue
                if shared and i != 0:
                    continue
                if int8_consumer:
                    node.replace_input_with(i, dq_of[inp.name])
                elif inp.name in int8_outputs:
                    guard = node.name in plan.kept_float and node.op_type in WEIGHT_QUANTIZED_BY_ORT
                    node.replace_input_with(i, self.float_reader_dq(inp.name) if guard else dq_of[inp.name])

    def quantize_weights_and_biases(self) -> None:
        """Per int8 node: its constant weight behind a (per-axis) DQ, shared by nodes reading the
        same weight on the same axis, then its bias as int32 on the input scale x weight scale."""
        weight_cache: dict[tuple[str, int | None], tuple[ir.Value, np.ndarray]] = {}
        for name in self.plan.nodes:
            node = self.by_name.get(name)
            if node is None:
                continue
            rule = QUANT_RULES.lookup(node, self.model)
            if rule is None or rule.weight is None or rule.weight >= len(node.inputs):
                continue
            w_value = node.inputs[rule.weight]
            if w_value is None or w_value.const_value is None:
                continue
            axis = rule.resolve_weight_axis(node) if self.cfg.per_channel else None
            w = w_value.const_value.numpy()
            if axis is not None:
                axis = axis % w.ndim
            key = (w_value.name, axis)
            if key not in weight_cache:
                weight_cache[key] = self._weight_dq(node, rule, w_value, w, axis)
            dq_w, w_scale = weight_cache[key]
            node.replace_input_with(rule.weight, dq_w)
            if rule.bias is not None and rule.bias < len(node.inputs) and node.inputs[rule.bias] is not None:
                self._quantize_bias(node, rule.bias, node.inputs[0], w_scale)
            elif rule.bias_add_fusion is not None and rule.bias_add_fusion(node):
                self._quantize_fused_bias(node, rule, w_scale)
        self._share_weights_with_float_readers(weight_cache)

    def _share_weights_with_float_readers(self, weight_cache: Mapping[tuple[str, int | None],
                                                                      tuple[ir.Value, np.ndarray]]) -> None:
        """A weight read by int8 nodes and by float nodes of the same kind (CQT kernels shared by
        nine Conv, two of them float for their activations' grids) would be stored twice, float
        and int8: the float readers read the int8 copy's DQ instead, on the same axis. Not the
        nodes the user excluded (they keep the exact float weight), nor a node whose activation
        input comes from a per-tensor DQ (onnxruntime would fuse it into an int8 kernel)."""
        selector = self.cfg.selector
        for (w_name, axis), (dq_w, _) in weight_cache.items():
            w_value = self.values.get(w_name)
            if w_value is None:
                continue
            for use in list(w_value.uses()):
                node = use.node
                rule = QUANT_RULES.lookup(node, self.model)
                if node in self.created or node.name in self.int8_nodes or rule is None or use.idx != rule.weight:
                    continue
                if not selector.allows(node.name or "", node.op_type):
                    continue
                own_axis = rule.resolve_weight_axis(node) if self.cfg.per_channel else None
                if (own_axis % len(w_value.shape) if own_axis is not None and w_value.shape is not None
                        else own_axis) != axis:
                    continue
                if any(_from_per_tensor_dq(node.inputs[i]) for i in (rule.activations or range(len(node.inputs)))
                       if i < len(node.inputs) and i != rule.weight):
                    continue
                node.replace_input_with(use.idx, dq_w)
                self.shared_weights += 1

    def _weight_dq(self, node: ir.Node, rule: QuantRule, w_value: ir.Value, w: np.ndarray,
                   axis: int | None) -> tuple[ir.Value, np.ndarray]:
        """Symmetric int8 weight (GPTQ-rounded with a rounder) behind its DequantizeLinear; with
        unsigned weights the same integers + 128 as uint8 around zero point 128."""
        unsigned = self.cfg.unsigned_weights
        graph, taken = self.graph, self.taken
        reduce_weights = self.cfg.reduce_weights and not unsigned
        q, s, z = quantize_weight(w, "int8", axis=axis, symmetric=True, reduce_range=reduce_weights)
        channel_axis = rule.resolve_weight_axis(node)
        if self.rounder is not None and channel_axis is not None:
            q = self.rounder.round_along(w_value.name, w, q, s, channel_axis % w.ndim,
                                         *qrange("int8", True, reduce_weights))
        if unsigned:
            q = (q.astype(np.int16) + 128).astype(np.uint8)
            z = np.full(np.shape(z), 128, np.uint8)
        q_v = add_initializer(graph, f"{w_value.name}_quantized", q, taken)
        s_v = add_initializer(graph, f"{w_value.name}_scale", np.asarray(s, np.float32), taken)
        z_v = add_initializer(graph, f"{w_value.name}_zero_point", np.asarray(z), taken)
        dq_node = _dequantize_node(
            graph, taken, w_value.name, q_v, s_v, z_v, like=w_value,
            axis=axis if axis is not None and np.ndim(s) > 0 else None,
        )
        self.weights += 1
        return dq_node.outputs[0], np.asarray(s, np.float32)

    def _quantize_fused_bias(self, node: ir.Node, rule: QuantRule, w_scale: np.ndarray) -> None:
        """The constant ``[N]`` bias of the Add onnxruntime fuses with ``node`` into a Gemm
        (:attr:`~onnxcomp.quant.rules.QuantRule.bias_add_fusion`), when ``node``'s output stays
        float: int32 behind a DQ, so that the Gemm runs int8 (QGemm) instead of float."""
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) != 1 or out.name in self.q_of:  # an int8 output: QLinearMatMul, no fusion
            return
        add = uses[0].node
        compute = {n: self.by_name[n] for n in self.plan.nodes if n in self.by_name}
        if not _is_bias_add(add, compute, self.model):
            return
        index = 1 - uses[0].idx
        bias = add.inputs[index].const_value
        n = node.inputs[rule.weight].shape[-1] if node.inputs[rule.weight].shape is not None else None
        if bias is None or len(bias.shape) != 1 or bias.shape[0] != n:
            return
        before = self.biases
        self._quantize_bias(add, index, node.inputs[0], w_scale)
        self.fused_biases += self.biases - before

    def _quantize_bias(self, node: ir.Node, index: int, x_value: ir.Value, w_scale: np.ndarray) -> None:
        """int32 bias (input ``index`` of ``node``) on scale x_scale * w_scale, x_scale that of
        ``x_value``; a bias that would saturate stays float."""
        b_value = node.inputs[index]
        x_point = _point_for(self.plan.points, _source_name(x_value, self.dq_of))
        if b_value.const_value is None or x_point is None or b_value.const_value.numpy().ndim != 1:
            return
        x_scale, _ = self.act_params(x_point)
        b = b_value.const_value.numpy().astype(np.float32)
        if np.ndim(w_scale) and np.size(w_scale) != b.size:  # e.g. one bias value broadcast: stays float
            return
        ws = np.broadcast_to(w_scale, b.shape) if np.ndim(w_scale) else np.full(b.shape, float(w_scale), np.float32)
        bq = quantize_bias(b, np.float32(x_scale), ws)
        if bq.saturated:
            self.bias_float += 1
            return
        graph, taken = self.graph, self.taken
        bq_v = add_initializer(graph, f"{b_value.name}_quantized", bq.q, taken)
        bs_v = add_initializer(graph, f"{b_value.name}_scale", np.asarray(bq.scale, np.float32), taken)
        bz_v = add_initializer(graph, f"{b_value.name}_zero_point", np.zeros(bq.q.shape, np.int32), taken)
        b_node = _dequantize_node(graph, taken, b_value.name, bq_v, bs_v, bz_v, like=b_value, axis=0)
        node.replace_input_with(index, b_node.outputs[0])
        self.biases += 1

    def stats(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "int8_nodes": len(plan.nodes),
            "quantized_tensors": sum(1 for p in plan.points.values() if self.values.get(p.value) is not None),
            "shared_parameter_tensors": sum(1 for p in plan.points.values() if p.shared_with),
            "data_movement_nodes": len(self.shared_nodes),
            "folded_activations": self.removed,
            "quantized_weights": self.weights,
            # float nodes reading an int8 node's weight through its DQ instead of a float copy
            "weights_shared_with_float_nodes": self.shared_weights,
            "quantized_biases": self.biases,
            "biases_left_float": self.bias_float,
            # of quantized_biases: bias Adds onnxruntime fuses with a float-output MatMul into a Gemm
            "matmul_bias_adds_int32": self.fused_biases,
            "float_reader_dequantize": len(self.float_dq_of) - len(self.unguarded),
            "float_readers_unguarded": self.unguarded,
            "skipped": dict(plan.skipped),
        }


def _from_per_tensor_dq(value: ir.Value | None) -> bool:
    """Whether ``value`` is the output of a DequantizeLinear with one scale (a node unit's input)."""
    producer = value.producer() if value is not None else None
    if producer is None or not is_dequantize_node(producer) or len(producer.inputs) < 2:
        return False
    scale = producer.inputs[1]
    return scale is not None and scale.shape is not None and len(scale.shape) == 0


def _dequantize_node(
    graph: ir.Graph,
    taken: set[str],
    base: str,
    q_value: ir.Value,
    scale: ir.Value,
    zero_point: ir.Value,
    like: ir.Value,
    axis: int | None = None,
) -> ir.Node:
    """Append ``DequantizeLinear(q_value, scale, zero_point)`` producing a float tensor shaped like ``like``."""
    node = ir.node(
        "DequantizeLinear",
        [q_value, scale, zero_point],
        attributes={"axis": axis} if axis is not None else {},
        name=unique_name(graph, f"{base}_DequantizeLinear", taken),
    )
    out = node.outputs[0]
    out.name = unique_name(graph, f"{base}_dq", taken)
    out.dtype = ir.DataType.FLOAT
    out.shape = like.shape
    graph.append(node)
    return node


def _source_name(value: ir.Value, dq_of: Mapping[str, ir.Value]) -> str | None:
    """The float tensor a DQ output stands for (or the value's own name)."""
    for name, dq in dq_of.items():
        if dq is value:
            return name
    return value.name
