r"""Cross-layer equalization (CLE): balance per-channel weight ranges of consecutive layers.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
section 4.1. Two linear layers joined by a positively homogeneous function :math:`f`
(:math:`f(x / s) = f(x) / s` for :math:`s > 0`, element-wise per channel)

.. math:: y = W_2\, f(W_1 x + b_1) + b_2

compute the same function after rescaling channel :math:`c` of the first layer's output by
:math:`1/s_c` and the second layer's input channel :math:`c` by :math:`s_c`:

.. math:: W_1' = S^{-1} W_1, \quad b_1' = S^{-1} b_1, \quad W_2' = W_2 S, \qquad S = \mathrm{diag}(s)

Exact in real arithmetic; in float32 the outputs differ by rounding only (tested to 1e-5 with
onnxruntime's optimizations off and on). With :math:`r^{(1)}_c` the range (max :math:`|w|`) of
output channel :math:`c` of :math:`W_1` and :math:`r^{(2)}_c` the range of input channel
:math:`c` of :math:`W_2`,

.. math:: s_c = \sqrt{r^{(1)}_c / r^{(2)}_c}

makes both ranges :math:`\sqrt{r^{(1)}_c r^{(2)}_c}`: no channel is left with a tiny part of a
per-tensor quantization grid. Chains (Conv -> depthwise Conv -> pointwise Conv) share a middle
layer between two pairs, so all pairs are equalized in rounds until every scale of a round is
within ``tolerance`` of 1 (or ``iterations`` rounds). When one producer's output reaches several
linear consumers (a fan-out through Relu/MaxPool), :math:`r^{(2)}_c` is the maximum over all of
them and all are rescaled.

What may sit between the two layers (all with the scaled tensor as input 0):

* both kinds: Relu, LeakyRelu, PRelu (any slope: :math:`s > 0` keeps the sign), Abs, Neg,
  Identity, Clip with min 0 (or none) and no max, Mul by a constant and Div by a constant (linear);
* after a Conv only (channel axis 1): MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool;
* after a MatMul/Gemm only: the producer's own bias Add (``MatMul -> Add(constant)``) directly
  after it, whose constant is rescaled like a bias.

A pair is refused (skipped, with the reason in the statistics) when a scaled tensor is a graph
output or has any other consumer (a residual Add, a Concat, a Flatten, a MatMul reading it as
its second operand...), when it passes through an op that is not positively homogeneous
(Sigmoid, Tanh, Clip with a max, Add/Sub with a constant... since :math:`f(x/s) \ne f(x)/s`),
when a weight or bias is not a float32 constant or is a graph input (a feed could replace it),
when a Gemm consumer has ``transA=1``, or when channel counts do not line up. Constants shared
with nodes outside the rewrite are copied, never changed under another node.

The module also holds :class:`ConstantEditor`, the copy-on-write editor of constant node inputs
that the SmoothQuant pass uses too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import ConfigError
from onnxcomp.graph import add_initializer, all_value_names, clip_bounds
from onnxcomp.ops import is_clip_node, linear_spec, weight_axes
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.quant.config import NodeSelector

__all__ = [
    "CLEConfig",
    "CrossLayerEqualizationPass",
    "EqualizationGroup",
    "find_equalization_groups",
    "ConstantEditor",
    "node_label",
    "const_problem",
    "producer_problem",
    "producer_out_axis",
    "consumer_in_absmax",
    "scale_consumer_inputs",
    "scale_along",
    "expand_last_axis",
    "broadcasts_on_last_axis",
]

#: Ops between the layers that commute with a positive per-channel scale, for either kind.
_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity", "Clip", "Neg", "Abs"})
#: Pooling: channel axis 1 only (they act on axes 2.. of NCHW data).
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
#: Channel-wise ops known NOT to commute with scaling (for clearer refusal messages).
_NOT_HOMOGENEOUS = frozenset({
    "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "Gelu", "Erf", "Mish", "Exp", "Log", "Sqrt", "ThresholdedRelu", "Add", "Sub",
    "Mul", "Div", "Pow", "Clip", "BatchNormalization", "InstanceNormalization",
})


def node_label(node: ir.Node) -> str:
    """The node's name, or its op type when it has none."""
    return node.name or node.op_type


def _float32_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.dtype == ir.DataType.FLOAT


def const_problem(value: ir.Value | None, what: str) -> str | None:
    """Why a constant input cannot be rescaled (None if it can)."""
    if value is None:
        return f"{what} is missing"
    if not _float32_const(value):
        return f"{what} {value.name!r} is not a float32 constant"
    if value.is_graph_input():
        return f"{what} {value.name!r} is a graph input (a feed could replace it)"
    if value.is_graph_output():
        return f"{what} {value.name!r} is a graph output"
    return None


class ConstantEditor:
    """Float64 working copies of constant node inputs, written back once with :meth:`commit`.

    A slot is ``(node, input index)``. On commit, a constant used by nothing but its slot is
    replaced in place (same name); a constant also used elsewhere (another node, another slot, a
    Constant node output) is copied to a new initializer for this slot, so nodes outside the
    rewrite never see a change. Values keep their original dtype (float32).
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._slots: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}

    def array(self, node: ir.Node, index: int) -> np.ndarray:
        """The working copy of ``node.inputs[index]`` (created on first access)."""
        key = (id(node), index)
        if key not in self._slots:
            value = node.inputs[index]
            assert value is not None and value.const_value is not None
            self._slots[key] = (node, index, value.const_value.numpy().astype(np.float64))
        return self._slots[key][2]

    def set(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Replace the working copy (e.g. a bias broadcast to one entry per channel)."""
        self.array(node, index)
        self._slots[(id(node), index)] = (node, index, np.asarray(array, dtype=np.float64))

    def __len__(self) -> int:
        return len(self._slots)

    def commit(self, suffix: str = "scaled") -> list[str]:
        """Write every working copy back; returns the names of the written initializers."""
        written: list[str] = []
        taken: set[str] | None = None
        for node, index, array in self._slots.values():
            value = node.inputs[index]
            assert value is not None and value.const_value is not None
            dtype = value.const_value.numpy().dtype
            new = array.astype(dtype)
            in_place = (
                value.is_initializer()
                and self.graph.initializers.get(value.name) is value
                and all(u.node is node and u.idx == index for u in value.uses())
            )
            if in_place:
                value.const_value = ir.tensor(new, name=value.name)
                value.shape = ir.Shape(new.shape)
                written.append(value.name)
                continue
            if taken is None:
                taken = all_value_names(self.graph)
            fresh = add_initializer(self.graph, f"{value.name}_{suffix}", new, taken)
            node.replace_input_with(index, fresh)
            written.append(fresh.name)
            if not value.uses() and value.is_initializer() and not value.is_graph_input():
                self.graph.initializers.pop(value.name, None)
        self._slots.clear()
        return written


# ----------------------------------------------------------------------------------------------
# Channel views of weights
# ----------------------------------------------------------------------------------------------


def scale_along(array: np.ndarray, axis: int, s: np.ndarray) -> np.ndarray:
    """``array`` multiplied by ``s`` along ``axis`` (``s`` has ``array.shape[axis]`` entries)."""
    shape = [1] * array.ndim
    shape[axis] = -1
    return array * s.reshape(shape)


def _axis_absmax(array: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(array), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def expand_last_axis(array: np.ndarray, channels: int) -> np.ndarray:
    """A constant broadcast against ``[..., channels]`` data, expanded to one entry per channel."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.shape[-1] == channels:
        return a
    return np.broadcast_to(a, a.shape[:-1] + (channels,)).copy()


def broadcasts_on_last_axis(shape: Iterable[int], channels: int) -> bool:
    """Whether a constant of ``shape`` broadcast against ``[..., channels]`` data can take a
    per-channel factor on its last axis (last dimension ``channels``, or 1 and then expanded)."""
    shape = tuple(shape)
    return len(shape) == 0 or shape[-1] in (1, channels)


def producer_out_axis(node: ir.Node) -> int:
    """The weight axis of a Conv/Gemm/MatMul indexed by output channel (negative for MatMul)."""
    return weight_axes(node)[0]


def _consumer_in_axis(node: ir.Node) -> int:
    return weight_axes(node)[1]


def _groups(node: ir.Node) -> int | None:
    """The group count of a grouped op (Conv), None for ops without groups."""
    spec = linear_spec(node)
    return node.attributes.get_int("group", 1) if spec is not None and spec.grouped else None


def consumer_in_absmax(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """Max |w| per input channel of a Conv (any group count), Gemm or MatMul weight."""
    group = _groups(node)
    if group is not None:
        out_ch, cpg = w.shape[0], w.shape[1]
        r = np.abs(w).reshape(group, out_ch // group, cpg, -1).max(axis=(1, 3))
        return r.reshape(group * cpg)
    return _axis_absmax(w, _consumer_in_axis(node) % w.ndim)


def scale_consumer_inputs(node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``w`` with input channel ``c`` multiplied by ``s[c]``."""
    group = _groups(node)
    if group is not None:
        out_ch, cpg = w.shape[0], w.shape[1]
        view = w.reshape(group, out_ch // group, cpg, -1) * s.reshape(group, 1, cpg, 1)
        return view.reshape(w.shape)
    return scale_along(w, _consumer_in_axis(node) % w.ndim, s)


# ----------------------------------------------------------------------------------------------
# Finding pairs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLEConfig(PassConfig):
    """Cross-layer equalization settings.

    Attributes:
        iterations: most rounds over all pairs (chains need several; stops at convergence).
        tolerance: converged when every scale of a round is within ``1 +- tolerance``.
        min_range: channels whose range (max |w|) is below this, in either layer, keep scale 1
            (dead channels: nothing to balance).
        exclude: node names, op types or ``re:PATTERN`` regexes on node names; a pair whose
            producer or consumer matches is left alone.
    """

    iterations: int = 20
    tolerance: float = 1e-4
    min_range: float = 1e-12
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"equalize: iterations must be >= 1, got {self.iterations}")
        if not self.tolerance > 0:
            raise ConfigError(f"equalize: tolerance must be > 0, got {self.tolerance}")
        if self.min_range < 0:
            raise ConfigError(f"equalize: min_range must be >= 0, got {self.min_range}")


@dataclasses.dataclass
class EqualizationGroup:
    """One producer, the homogeneous ops after it, and every linear consumer of its channels.

    ``bias_add`` is a MatMul/Gemm producer's separate bias Add (its constant is at input
    ``bias_add_index``).
    """

    producer: ir.Node
    consumers: list[ir.Node]
    path: list[ir.Node]
    channels: int
    bias_add: ir.Node | None = None
    bias_add_index: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "producer": node_label(self.producer),
            "consumers": [node_label(n) for n in self.consumers],
            "through": [n.op_type for n in ([self.bias_add] if self.bias_add else []) + self.path],
            "channels": self.channels,
        }


_LINEAR = ("Conv", "Gemm", "MatMul")


def producer_problem(node: ir.Node) -> str | None:
    """Why a Conv/Gemm/MatMul cannot have its output channels rescaled (None if it can)."""
    if node.op_type == "Conv":
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if (p := const_problem(w, "weight")) is not None:
            return p
        if len(w.const_value.shape) < 3:
            return f"weight {w.name!r} has rank {len(w.const_value.shape)}"
    elif node.op_type == "Gemm":
        if (p := const_problem(node.inputs[1], "weight")) is not None:
            return p
    else:
        w = node.inputs[1]
        if (p := const_problem(w, "weight")) is not None:
            return p
        if len(w.const_value.shape) < 2:
            return f"weight {w.name!r} is 1-D"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if (p := const_problem(node.inputs[2], "bias")) is not None:
            return p
    if len(node.outputs) != 1:
        return "it has several outputs"
    return None


def _producer_channels(node: ir.Node) -> int:
    w = node.inputs[1].const_value
    return int(w.shape[producer_out_axis(node) % len(w.shape)])


def _bias_problem(node: ir.Node, channels: int) -> str | None:
    """Gemm's C must broadcast along the output channels (last axis)."""
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        shape = node.inputs[2].const_value.shape
        if not broadcasts_on_last_axis(shape, channels):
            return f"bias {node.inputs[2].name!r} of shape {list(shape)} is not per output channel"
    if node.op_type == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None:
        shape = node.inputs[2].const_value.shape
        if tuple(shape) != (channels,):
            return f"bias {node.inputs[2].name!r} has shape {list(shape)}, expected [{channels}]"
    return None


def _bias_add(value: ir.Value, channels: int) -> tuple[ir.Node, int] | None:
    """``value``'s only consumer, if it is an Add of a per-channel constant (a separate bias)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    other = 1 - uses[0].idx
    const = node.inputs[other]
    if const_problem(const, "bias") is not None:
        return None
    if not broadcasts_on_last_axis(const.const_value.shape, channels):
        return None
    return node, other


def _clip_is_relu_like(node: ir.Node) -> bool:
    """Clip with min 0 (or none) and no max: positively homogeneous."""
    lo, hi = clip_bounds(node)
    return lo in (0.0, -math.inf) and hi == math.inf


def _scales_by_constant(node: ir.Node, idx: int, conv: ir.Node | None) -> bool:
    """Mul by a constant (either side) or Div by a constant: linear, so homogeneous.

    After a Conv the constant must not have more axes than the data (numpy broadcasting would
    move the channel axis).
    """
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2 or (node.op_type == "Div" and idx != 0):
        return False
    const = node.inputs[1 - idx]
    if const is None or const.const_value is None:
        return False
    if conv is not None:
        rank = len(conv.inputs[1].const_value.shape)
        if len(const.const_value.shape) > rank:
            return False
    return True


def _consumer_problem(node: ir.Node, channels: int) -> str | None:
    label = f"{node.op_type} {node_label(node)!r}"
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if (p := const_problem(w, f"{label}'s weight")) is not None:
        return p
    arr_shape = w.const_value.shape
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return f"{label} has transA=1 (its input channels are not on the last axis)"
    if node.op_type == "MatMul" and len(arr_shape) < 2:
        return f"{label}'s weight {w.name!r} is 1-D"
    if node.op_type == "Conv":
        n_in = int(arr_shape[1]) * node.attributes.get_int("group", 1)
    else:
        n_in = int(arr_shape[_consumer_in_axis(node) % len(arr_shape)])
    if n_in != channels:
        return f"{label} reads {n_in} input channels, the producer makes {channels}"
    return None


_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


def _explain_use(node: ir.Node, idx: int, tensor: ir.Value) -> str:
    what = f"{node.op_type} {node_label(node)!r}"
    if node.op_type in _BINARY:
        others = [v for i, v in enumerate(node.inputs) if i != idx and v is not None]
        if others and all(v.const_value is not None for v in others):
            return (f"tensor {tensor.name!r} passes through {what} with a constant, which is not "
                    "positively homogeneous (f(x/s) != f(x)/s)")
        return (f"tensor {tensor.name!r} also feeds {what}, which joins it with another tensor "
                "(a residual connection cannot absorb a per-channel scale)")
    if node.op_type in _NOT_HOMOGENEOUS and idx == 0:
        return (f"tensor {tensor.name!r} passes through {what}, which is not positively "
                "homogeneous (f(x/s) != f(x)/s)")
    if node.op_type in _LINEAR and idx != 0:
        return f"tensor {tensor.name!r} is input {idx} of {what}, not its data input"
    return f"tensor {tensor.name!r} also feeds {what}, which cannot absorb a per-channel scale"


def find_equalization_groups(
    model: ir.Model, config: CLEConfig | None = None
) -> tuple[list[EqualizationGroup], dict[str, str]]:
    """Every equalizable producer with its consumers, and why the other producers were refused.

    Candidate producers are Conv, Gemm and MatMul nodes with a constant weight; MatMul/Gemm nodes
    whose weight is computed (attention) are not candidates and are not listed.
    """
    config = config or CLEConfig()
    selector = NodeSelector((), config.exclude)
    groups: list[EqualizationGroup] = []
    skipped: dict[str, str] = {}
    for node in model.graph:
        if node.op_type not in _LINEAR or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul" and (len(node.inputs) < 2 or node.inputs[1] is None
                                         or node.inputs[1].const_value is None):
            continue
        label = node_label(node)
        if selector.excluded(node.name or "", node.op_type):
            skipped[label] = "excluded by the selection"
            continue
        group_or_reason = _build_group(node, selector)
        if isinstance(group_or_reason, str):
            skipped[label] = group_or_reason
        else:
            groups.append(group_or_reason)
    return groups, skipped


def _build_group(node: ir.Node, selector: NodeSelector) -> EqualizationGroup | str:
    if (p := producer_problem(node)) is not None:
        return p
    channels = _producer_channels(node)
    if (p := _bias_problem(node, channels)) is not None:
        return p
    conv = node.op_type == "Conv"
    out = node.outputs[0]
    bias_add = bias_index = None
    start = out
    if not conv:
        found = _bias_add(out, channels)
        if found is not None:
            bias_add, bias_index = found
            start = bias_add.outputs[0]
    consumers: list[ir.Node] = []
    path: list[ir.Node] = []
    stack = [start]
    seen: set[int] = set()
    while stack:
        tensor = stack.pop()
        if tensor.is_graph_output():
            return f"tensor {tensor.name!r} is a graph output"
        uses = list(tensor.uses())
        if not uses:
            return f"tensor {tensor.name!r} has no consumer"
        for use in uses:
            user, idx = use.node, use.idx
            if id(user) in seen:
                return f"tensor {tensor.name!r} reaches {user.op_type} {node_label(user)!r} twice"
            if user.op_type in _LINEAR and idx == 0 and user.domain in ("", "ai.onnx"):
                if conv != (user.op_type == "Conv"):
                    return (f"tensor {tensor.name!r} feeds {user.op_type} {node_label(user)!r}, "
                            f"whose channel axis differs from the {node.op_type} producer's")
                if selector.excluded(user.name or "", user.op_type):
                    return f"consumer {node_label(user)!r} is excluded by the selection"
                if (p := _consumer_problem(user, channels)) is not None:
                    return p
                consumers.append(user)
                seen.add(id(user))
                continue
            homogeneous = (idx == 0 and (
                (user.op_type in _HOMOGENEOUS and (not is_clip_node(user) or _clip_is_relu_like(user)))
                or (conv and user.op_type in _POOLS)
            )) or _scales_by_constant(user, idx, node if conv else None)
            if not homogeneous:
                if user.op_type in _POOLS and idx == 0:
                    return (f"tensor {tensor.name!r} feeds {user.op_type} {node_label(user)!r}, "
                            "which pools over the channel axis of MatMul/Gemm data")
                return _explain_use(user, idx, tensor)
            if user.op_type == "PRelu" and len(user.inputs) > 1 and user.inputs[1] is tensor:
                return _explain_use(user, 1, tensor)
            path.append(user)
            seen.add(id(user))
            stack.append(user.outputs[0])
    if not consumers:
        return f"output {out.name!r} reaches no Conv/Gemm/MatMul"
    return EqualizationGroup(node, consumers, path, channels, bias_add, bias_index)


# ----------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------


class CrossLayerEqualizationPass(CompressionPass[CLEConfig]):
    """Equalize per-channel weight ranges of consecutive linear layers (see module docstring).

    Exact in float: the model computes the same function (to float32 rounding). Refuses (skips,
    with the reason under ``skipped`` in the statistics) every pair listed in the module
    docstring. Statistics: ``groups`` (producer, consumers, ops in between, channels, scale
    range), ``iterations``, ``converged``, ``skipped``, ``initializers_written``.
    """

    config_class = CLEConfig

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        groups, skipped = find_equalization_groups(model, cfg)
        editor = ConstantEditor(model.graph)
        total = [np.ones(g.channels) for g in groups]
        rounds = 0
        converged = not groups
        limit = math.log1p(cfg.tolerance)
        for rounds in range(1, cfg.iterations + 1):
            worst = 0.0
            for k, group in enumerate(groups):
                s = self._equalize(group, editor)
                total[k] *= s
                worst = max(worst, float(np.max(np.abs(np.log(s)))) if s.size else 0.0)
            if worst <= limit:
                converged = True
                break
        written = editor.commit("equalized") if groups else []
        described = []
        for group, s in zip(groups, total):
            entry = group.describe()
            entry["scale_min"] = float(s.min())
            entry["scale_max"] = float(s.max())
            described.append(entry)
        return bool(written), {
            "equalized": len(groups),
            "groups": described,
            "iterations": rounds if groups else 0,
            "converged": converged,
            "skipped": skipped,
            "initializers_written": written,
        }

    def _equalize(self, group: EqualizationGroup, editor: ConstantEditor) -> np.ndarray:
        """One equalization step of ``group``; returns the scales applied (1 = unchanged)."""
        producer = group.producer
        w1 = editor.array(producer, 1)
        out_axis = producer_out_axis(producer) % w1.ndim
        r1 = _axis_absmax(w1, out_axis)
        r2 = np.zeros(group.channels)
        for consumer in group.consumers:
            r2 = np.maximum(r2, consumer_in_absmax(consumer, editor.array(consumer, 1)))
        ok = (r1 > self.config.min_range) & (r2 > self.config.min_range)
        s = np.ones(group.channels)
        s[ok] = np.sqrt(r1[ok] / r2[ok])
        if np.all(s == 1.0):
            return s
        editor.set(producer, 1, scale_along(w1, out_axis, 1.0 / s))
        if len(producer.inputs) > 2 and producer.inputs[2] is not None:
            b = editor.array(producer, 2)
            if producer.op_type == "Gemm":
                b = expand_last_axis(b, group.channels)
                editor.set(producer, 2, b / s)
            else:
                editor.set(producer, 2, b / s)
        if group.bias_add is not None:
            c = expand_last_axis(editor.array(group.bias_add, group.bias_add_index), group.channels)
            editor.set(group.bias_add, group.bias_add_index, c / s)
        for consumer in group.consumers:
            editor.set(consumer, 1, scale_consumer_inputs(consumer, editor.array(consumer, 1), s))
        return s
