"""Channel dependency analysis for structured pruning: which channels must be cut together.

Cutting output channel c of a Conv means cutting the same channel everywhere it flows: the
BatchNormalization parameters after it, the input slice of every Conv/Gemm that reads it, the
other branch of a residual Add, a range of a Concat's output, a block of features after a
Flatten. :func:`analyze_channels` finds every such coupled set in an ``onnx_ir`` graph and returns
them as :class:`ChannelGroup` objects. It only *analyses*: no scoring, no cutting, and the model
is not modified. The pruning pass scores and cuts using this output alone.

Model
-----
* A **channel space** is an index range shared by tensor axes: channel c of every member is the
  same channel. Spaces are merged with union-find over refinable atoms
  (:mod:`onnxcomp.analysis.spaces`): a Split/Slice/Concat boundary refines a space into
  sub-spaces, an Add or a shared weight merges spaces, so the final groups are the *finest*
  exact partition: every index of every tracked (tensor, axis) belongs to exactly one group.
* Each tracked (tensor, axis) has a **layout**: the groups it is made of, laid end to end. A
  Concat output is the concatenation of its inputs' layouts (a composite of several groups); a
  Flatten output repeats each channel as a block of ``H*W`` features. Every member therefore
  records ``offset`` and ``block``: channel c of the group is indices
  ``[offset + c*block, offset + (c+1)*block)`` along ``axis`` of ``value``.
* Op knowledge comes from :data:`onnxcomp.ops.CHANNEL_RULES` (opset-aware rows) and
  :data:`onnxcomp.ops.LINEAR_OPS` (weight axes); this module dispatches on the rule kind.
* Anything not understood **freezes** the groups it touches, with a reason naming the node or
  tensor: graph inputs/outputs, unknown ops, Shape/Size readers, subgraph captures, non-constant
  weights, reshapes that split the channel axis, normalizations across channels, layouts that
  cannot be aligned. Every use of a tracked tensor must be understood by its consumer's rule,
  otherwise the group freezes ("never guess").

Grouped convolution: depthwise (one input channel per group, any multiplier m) couples input
channel c with output channels ``[c*m, (c+1)*m)``: cutting it removes a whole group (the pass
lowers the ``group`` attribute, recorded as a :class:`ShapeEdit`). Other grouped convolutions
(g > 1, several input channels per group) keep g: channel i of every group is cut together
("lock-step"), so a group member appears g times at offsets ``j * channels_per_group``.

Weights shared by several nodes couple those nodes' spaces (cutting the weight affects all).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.analysis.spaces import Layout, Spaces, layout_length, repeat, scale_blocks
from onnxcomp.io import load_model
from onnxcomp.ops import (CHANNEL_RULES, LINEAR_OPS, SHAPE_KEEPING_OPS, ChannelRule, is_constant_node, is_default_domain,
                          keep_shapes_through)

__all__ = [
    "Member",
    "Producer",
    "Consumer",
    "Param",
    "Activation",
    "ShapeEdit",
    "TensorCut",
    "ChannelGroup",
    "ChannelAnalysis",
    "analyze_channels",
]


# ------------------------------------------------------------------------------------------
# Result types
# ------------------------------------------------------------------------------------------


def channel_indices(offset: int, block: int, channels: Iterable[int]) -> np.ndarray:
    """Indices ``[offset + c*block, offset + (c+1)*block)`` of each channel c, concatenated."""
    c = np.asarray(list(channels), dtype=np.int64).reshape(-1, 1)
    return (offset + c * block + np.arange(block, dtype=np.int64)).reshape(-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Member:
    """A tensor axis indexed by a group: channel c is ``[offset + c*block, offset + (c+1)*block)``."""

    value: ir.Value
    axis: int
    offset: int
    block: int = 1

    def indices(self, channels: Iterable[int]) -> np.ndarray:
        """Indices along ``axis`` of ``value`` that the group's ``channels`` occupy."""
        return channel_indices(self.offset, self.block, channels)

    def _where(self) -> str:
        block = f", block {self.block}" if self.block != 1 else ""
        return f"'{self.value.name}'[axis {self.axis} @{self.offset}{block}]"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Producer(Member):
    """A linear op whose OUTPUT channels are (part of) the group.

    ``value``/``axis`` is the weight's output-channel axis; ``bias``/``bias_axis``/``bias_offset``/
    ``bias_block`` locate the bias entries (:meth:`bias_indices`). ``depthwise``: the op is a
    depthwise convolution, whose input is the same group (its weight slice is cut once, here; it
    is not listed as a consumer). For a depthwise ConvTranspose the weight is indexed by input
    channel (``block`` 1) and the bias by output channel (``bias_block`` = multiplier).
    """

    node: ir.Node
    bias: ir.Value | None = None
    bias_axis: int | None = None
    bias_offset: int | None = None
    bias_block: int = 1
    depthwise: bool = False

    def bias_indices(self, channels: Iterable[int]) -> np.ndarray:
        return channel_indices(self.bias_offset, self.bias_block, channels)

    def describe(self) -> str:
        kind = " (depthwise)" if self.depthwise else ""
        bias = f" + bias '{self.bias.name}'" if self.bias is not None else ""
        return f"{_node_desc(self.node)}{kind}: weight {self._where()}{bias}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Consumer(Member):
    """A linear op whose INPUT channels are (part of) the group: cut ``value`` along ``axis``.

    ``block > 1`` after Flatten/Reshape into Gemm/MatMul: each channel is a run of features.
    """

    node: ir.Node

    def describe(self) -> str:
        return f"{_node_desc(self.node)}: weight {self._where()}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Param(Member):
    """A per-channel constant input (``node.inputs[input_index]``): BN/InstanceNorm parameters,
    per-channel operands of Add/Mul/Sub/Div/..., constant Concat inputs."""

    node: ir.Node
    input_index: int

    def describe(self) -> str:
        return f"{_node_desc(self.node)} input {self.input_index}: {self._where()}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Activation(Member):
    """A computed tensor (or graph input) carrying the group; it changes shape when cut."""

    def describe(self) -> str:
        return self._where()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShapeEdit(Member):
    """An integer in a node's control input/attribute that depends on the channel count.

    Where: ``node.inputs[input_index]`` element ``position``, or attribute ``attribute`` (element
    ``position`` for a list attribute); both None means implicit sizes (Split without sizes:
    the pass must add explicit sizes if the outputs become unequal).
    ``value``/``axis``/``offset``/``block`` locate the group's indices on the tensor axis the
    number refers to, whose length before cutting is ``axis_length``. ``kind``:

    * ``"size"``: the number is a length (Reshape target, Split size, Resize sizes, Conv
      ``group``): subtract ``block`` per removed channel.
    * ``"bound"``: the number is an index on that axis (Slice starts/ends): after normalising a
      negative index against ``axis_length`` and clamping, subtract the removed indices below it.

    Use :meth:`new_value`; when several groups edit the same number, apply each group's edit to
    the previous result (edits of different groups commute).
    """

    node: ir.Node
    kind: str
    input_index: int | None = None
    attribute: str | None = None
    position: int | None = None
    axis_length: int = 0

    def new_value(self, old: int, removed: Iterable[int]) -> int:
        """The number after removing the group's ``removed`` channels."""
        removed = list(removed)
        if self.kind == "size":
            return old - self.block * len(removed)
        n = self.axis_length
        bound = old + n if old < 0 else old
        bound = min(max(bound, 0), n)
        gone = self.indices(removed)
        return bound - int(np.count_nonzero(gone < bound))

    def describe(self) -> str:
        if self.input_index is not None:
            where = f"input {self.input_index}[{self.position}]"
        elif self.attribute is not None:
            where = f"attribute {self.attribute}" + (
                f"[{self.position}]" if self.position is not None else ""
            )
        else:
            where = f"implicit output size {self.position}"
        return f"{_node_desc(self.node)} {where} ({self.kind}, via {self._where()})"


@dataclasses.dataclass(frozen=True)
class TensorCut:
    """One constant tensor slice to remove: ``value`` along ``axis`` at the member's indices."""

    value: ir.Value
    axis: int
    offset: int
    block: int = 1

    def indices(self, channels: Iterable[int]) -> np.ndarray:
        return channel_indices(self.offset, self.block, channels)


@dataclasses.dataclass
class ChannelGroup:
    """A set of coupled channels: removing channel c (0 <= c < size) removes, in every member,
    the indices ``member.indices([c])``.

    Cut with :meth:`tensor_cuts` (each constant slice once), fix up integers with
    ``shape_edits``; ``producers``/``consumers``/``params`` are for scoring and reporting,
    ``activations`` are the tensors whose shapes change. Never cut a group whose ``reasons``
    is non-empty (``frozen``), and never cut all ``size`` channels.
    """

    id: int
    size: int
    producers: list[Producer] = dataclasses.field(default_factory=list)
    consumers: list[Consumer] = dataclasses.field(default_factory=list)
    params: list[Param] = dataclasses.field(default_factory=list)
    activations: list[Activation] = dataclasses.field(default_factory=list)
    shape_edits: list[ShapeEdit] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)
    #: constant elements removed per channel cut (all tensor cuts).
    params_per_channel: int = 0
    #: multiply-accumulates per sample removed per channel cut in the linear ops (None: unknown
    #: because a spatial/sequence dimension is symbolic).
    macs_per_channel: int | None = 0

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def frozen(self) -> bool:
        return bool(self.reasons)

    @property
    def members(self) -> list[Member]:
        return [*self.producers, *self.consumers, *self.params, *self.activations, *self.shape_edits]

    @property
    def num_producers(self) -> int:
        return len({id(p.node) for p in self.producers})

    def tensor_cuts(self) -> list[TensorCut]:
        """Every constant slice to remove, each once (shared weights appear once)."""
        seen: set[tuple[int, int, int, int]] = set()
        cuts: list[TensorCut] = []

        def add(value: ir.Value, axis: int, offset: int, block: int) -> None:
            key = (id(value), axis, offset, block)
            if key not in seen:
                seen.add(key)
                cuts.append(TensorCut(value, axis, offset, block))

        for p in self.producers:
            add(p.value, p.axis, p.offset, p.block)
            if p.bias is not None:
                add(p.bias, p.bias_axis, p.bias_offset, p.bias_block)
        for m in (*self.consumers, *self.params):
            add(m.value, m.axis, m.offset, m.block)
        return cuts

    def describe(self) -> str:
        state = "prunable" if self.prunable else "FROZEN"
        macs = "?" if self.macs_per_channel is None else f"{self.macs_per_channel:,}"
        lines = [
            f"group {self.id}: {self.size} channels, {state}, {self.num_producers} producer(s), "
            f"{self.params_per_channel:,} params and {macs} MACs per channel"
        ]
        for title, items in (
            ("producers", self.producers),
            ("consumers", self.consumers),
            ("params", self.params),
            ("activations", self.activations),
            ("shape edits", self.shape_edits),
        ):
            if items:
                lines.append(f"  {title}:")
                lines.extend(f"    {m.describe()}" for m in items)
        if self.reasons:
            lines.append("  frozen because:")
            lines.extend(f"    - {r}" for r in self.reasons)
        return "\n".join(lines)


@dataclasses.dataclass
class ChannelAnalysis:
    """The groups of one model (members reference ``model``'s values and nodes)."""

    model: ir.Model
    groups: list[ChannelGroup]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def frozen(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.frozen]

    def groups_of(self, value: ir.Value | str, axis: int | None = None) -> list[tuple[ChannelGroup, Member]]:
        """(group, member) pairs indexing ``value`` (a Value or its name), optionally on ``axis``."""
        out = []
        for g in self.groups:
            for m in g.members:
                if isinstance(m, ShapeEdit):
                    continue
                same = m.value is value if isinstance(value, ir.Value) else m.value.name == value
                if same and (axis is None or m.axis == axis):
                    out.append((g, m))
        return out

    def describe(self) -> str:
        head = f"{len(self.groups)} channel groups, {len(self.prunable)} prunable"
        return "\n".join([head, *(g.describe() for g in self.groups)])


# ------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------


def analyze_channels(model, *, infer_shapes: bool = True) -> ChannelAnalysis:
    """Find every group of coupled channels in ``model``'s main graph.

    Args:
        model: an ``onnx_ir.Model`` (or anything :func:`onnxcomp.io.load_model` accepts; the
            loaded model is then ``result.model``). Not modified.
        infer_shapes: run ONNX shape inference on a copy to learn intermediate shapes (needed
            for Flatten/Reshape blocks, broadcasting and ranks). Without it, only shapes already
            on the values are used.
    """
    if not isinstance(model, ir.Model):
        model = load_model(model)
    return _Analyzer(model, infer_shapes=infer_shapes).run()


# ------------------------------------------------------------------------------------------
# Implementation
# ------------------------------------------------------------------------------------------

Dim = int | str | None  # static size, symbolic name, or unknown


def _node_desc(node: ir.Node) -> str:
    name = node.name or (node.outputs[0].name if node.outputs else "?")
    op = node.op_type if is_default_domain(node.domain) else f"{node.domain}::{node.op_type}"
    return f"{op} '{name}'"


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _sym_product(dims: Sequence[Dim]) -> tuple[int, tuple[str, ...]] | None:
    coef, syms = 1, []
    for d in dims:
        if d is None:
            return None
        if isinstance(d, str):
            syms.append(d)
        else:
            coef *= int(d)
    return coef, tuple(sorted(syms))


def _sym_divide(num, den) -> Dim:
    if num is None or den is None or den[0] == 0 or num[0] % den[0]:
        return None
    rest = collections.Counter(num[1])
    rest.subtract(den[1])
    if any(v < 0 for v in rest.values()):
        return None
    syms = sorted(rest.elements())
    coef = num[0] // den[0]
    if not syms:
        return coef
    if len(syms) == 1 and coef == 1:
        return syms[0]
    return None


@dataclasses.dataclass
class _Role:
    kind: str  # producer / consumer / param / shape
    value: ir.Value
    axis: int
    node: ir.Node
    extra: dict


class _Analyzer:
    def __init__(self, model: ir.Model, *, infer_shapes: bool) -> None:
        self.model = model
        self.graph = model.graph
        self.spaces = Spaces()
        self.tracks: dict[tuple[int, int], Layout] = {}
        self.values: dict[int, ir.Value] = {}
        self.axes: dict[int, list[int]] = collections.defaultdict(list)
        self.claims: set[tuple[int, int, int]] = set()
        self.roles: list[_Role] = []
        self.inferred = _infer_dims(model) if infer_shapes else {}
        self.main_nodes = {id(n) for n in self.graph}
        self.owner: dict[int, ir.Node] = {}
        for node in self.graph:
            for sub in _subgraphs(node):
                for inner in sub.all_nodes():
                    self.owner[id(inner)] = node

    # ---- shapes and constants -------------------------------------------------------------
    def dims(self, value: ir.Value | None) -> list[Dim] | None:
        if value is None:
            return None
        tensor = self.const_tensor(value)
        if tensor is not None:
            return [int(d) for d in tensor.shape]
        found = self.inferred.get(value.name)
        own = None
        if value.shape is not None:
            own = [
                d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
                for d in value.shape.dims
            ]
        if found is None:
            return own
        if own is not None and len(own) == len(found):
            return [f if f is not None else o for f, o in zip(found, own)]
        return list(found)

    def rank(self, value: ir.Value | None) -> int | None:
        d = self.dims(value)
        return None if d is None else len(d)

    def const_tensor(self, value: ir.Value | None):
        if value is None:
            return None
        try:
            return ir.convenience.get_const_tensor(value)
        except ValueError:
            return None

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The data of a constant control input (None if absent, computed or overridable)."""
        if value is None or value.is_graph_input():
            return None
        tensor = self.const_tensor(value)
        return None if tensor is None else np.asarray(tensor.numpy())

    def const_ints(self, value: ir.Value | None) -> list[int] | None:
        array = self.const(value)
        return None if array is None else [int(v) for v in array.reshape(-1)]

    def not_cuttable(self, value: ir.Value) -> str | None:
        """None if ``value`` is a constant the pass can slice, else why not."""
        if value.is_initializer() and value.const_value is not None:
            if value.is_graph_input():
                return "is an initializer that is also a graph input (can be overridden at run time)"
            if value.graph is not self.graph:
                return "is an initializer of a subgraph"
            return None
        if value.is_graph_input():
            return "is a graph input"
        producer = value.producer()
        if producer is not None and is_constant_node(producer):
            return f"is the output of Constant node '{producer.name}' (lift constants to initializers first)"
        if producer is not None:
            return f"is computed by {_node_desc(producer)}, not a constant"
        return "is not a constant initializer"

    def fixed_reason(self, value: ir.Value, axis: int) -> str:
        if value.is_graph_input() and not value.is_initializer():
            return f"graph input '{value.name}'"
        if self.const_tensor(value) is not None or value.is_initializer():
            return f"'{value.name}' {self.not_cuttable(value)}"
        producer = value.producer()
        if producer is not None:
            return (
                f"channels of '{value.name}' (axis {axis}) do not come from a prunable producer "
                f"(made by {_node_desc(producer)})"
            )
        return f"'{value.name}' (axis {axis}) is not a tracked channel space"

    # ---- tracks ---------------------------------------------------------------------------
    def track(self, value: ir.Value | None, axis: int) -> Layout | None:
        if value is None:
            return None
        return self.tracks.get((id(value), axis))

    def tracked_axes(self, value: ir.Value | None) -> list[int]:
        return [] if value is None else list(self.axes.get(id(value), ()))

    def _set(self, value: ir.Value, axis: int, layout: Layout) -> None:
        key = (id(value), axis)
        self.tracks[key] = layout
        self.values[id(value)] = value
        self.axes[id(value)].append(axis)

    def claim(self, node: ir.Node, value: ir.Value, axis: int) -> None:
        self.claims.add((id(node), id(value), axis))

    def unify(self, node: ir.Node, first: Layout, second: Layout, what: str) -> bool:
        if self.spaces.unify(first, second):
            return True
        reason = f"{_node_desc(node)} couples {what} whose channel layouts do not align"
        self.spaces.freeze_layout(first, reason)
        self.spaces.freeze_layout(second, reason)
        return False

    def bind_output(self, node: ir.Node, value: ir.Value | None, axis: int, layout: Layout) -> None:
        if value is None:
            return
        existing = self.track(value, axis)
        if existing is None:
            self._set(value, axis, layout)
        else:  # pragma: no cover - outputs are bound once in topological order
            self.unify(node, existing, layout, f"'{value.name}' axis {axis}")

    def input_layout(self, node: ir.Node, value: ir.Value, axis: int, size: int | None = None) -> Layout | None:
        """The layout of an input axis, creating a space for an untracked one (claimed).

        A cuttable constant gets a free space (cutting it is fine); anything else gets a frozen
        one. None if the axis length is unknown.
        """
        self.claim(node, value, axis)
        layout = self.track(value, axis)
        if layout is not None:
            return layout
        dims = self.dims(value)
        n = dims[axis] if dims is not None and 0 <= axis < len(dims) else None
        if not isinstance(n, int):
            n = size
        if not isinstance(n, int) or n <= 0:
            return None
        reason = None if self.not_cuttable(value) is None else self.fixed_reason(value, axis)
        layout = ((self.spaces.new(n, reason), 1),)
        self._set(value, axis, layout)
        return layout

    def attach(self, node: ir.Node, value: ir.Value, axis: int, layout: Layout) -> bool:
        """Make an input axis (weight, parameter, other operand) follow ``layout`` (claimed)."""
        self.claim(node, value, axis)
        existing = self.track(value, axis)
        if existing is not None:
            return self.unify(
                node, existing, layout, f"'{value.name}' axis {axis} with another channel space"
            )
        dims = self.dims(value)
        n = dims[axis] if dims is not None and 0 <= axis < len(dims) else None
        if isinstance(n, int) and n != layout_length(self.spaces, layout):
            self.spaces.freeze_layout(
                layout,
                f"{_node_desc(node)}: '{value.name}' has {n} entries on axis {axis}, "
                f"expected {layout_length(self.spaces, layout)}",
            )
            return False
        self._set(value, axis, layout)
        if self.not_cuttable(value) is not None:
            self.spaces.freeze_layout(layout, self.fixed_reason(value, axis))
        return True

    def freeze_axis(self, node: ir.Node, value: ir.Value, axis: int, reason: str) -> None:
        self.claim(node, value, axis)
        layout = self.track(value, axis)
        if layout is not None:
            self.spaces.freeze_layout(layout, reason)

    def freeze_inputs(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            for axis in self.tracked_axes(value):
                self.freeze_axis(node, value, axis, reason)

    def role(self, role_kind: str, value: ir.Value, axis: int, node: ir.Node, **extra) -> None:
        self.roles.append(_Role(role_kind, value, axis, node, extra))

    def param(self, node: ir.Node, index: int, value: ir.Value, axis: int, layout: Layout) -> None:
        if self.attach(node, value, axis, layout) and self.not_cuttable(value) is None:
            self.role("param", value, axis, node, input_index=index)

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        for node in _topological(self.graph):
            rule = None if any(True for _ in _subgraphs(node)) else CHANNEL_RULES.lookup(node, self.model)
            if rule is None:
                continue  # uses of tracked values are frozen by _check_uses
            handler = _HANDLERS[rule.kind]
            try:
                handler(self, node, rule)
            except Exception as exc:  # never guess: a rule that cannot read the node freezes
                self.freeze_inputs(node, f"{_node_desc(node)} could not be analysed ({exc})")
        self._check_uses()
        return ChannelAnalysis(self.model, self._groups())

    def _check_uses(self) -> None:
        outputs = {id(v) for v in self.graph.outputs}
        for (vid, axis), layout in list(self.tracks.items()):
            value = self.values[vid]
            if vid in outputs:
                self.spaces.freeze_layout(layout, f"graph output '{value.name}'")
            for usage in value.uses():
                node = usage.node
                if (id(node), vid, axis) in self.claims:
                    continue
                if id(node) not in self.main_nodes:
                    owner = self.owner.get(id(node))
                    where = _node_desc(owner) if owner is not None else "a subgraph"
                    reason = f"'{value.name}' is captured by a subgraph of {where}"
                elif any(True for _ in _subgraphs(node)):
                    reason = f"'{value.name}' is used by control-flow node {_node_desc(node)}"
                elif CHANNEL_RULES.lookup(node, self.model) is None:
                    op = node.op_type if is_default_domain(node.domain) else f"{node.domain}::{node.op_type}"
                    reason = f"'{value.name}' is consumed by unknown op {op} (node '{node.name}')"
                else:
                    reason = (
                        f"channels of '{value.name}' (axis {axis}) reach {_node_desc(node)}, "
                        "which does not keep them separable"
                    )
                self.spaces.freeze_layout(layout, reason)

    def _groups(self) -> list[ChannelGroup]:
        spaces = self.spaces
        groups: dict[int, ChannelGroup] = {}

        def group(atom: int) -> ChannelGroup:
            root = spaces.find(atom)
            if root not in groups:
                groups[root] = ChannelGroup(id=len(groups), size=spaces.size[root])
            return groups[root]

        def pieces(value: ir.Value, axis: int):
            return spaces.pieces(self.tracks[(id(value), axis)])

        role_keys = {(id(r.value), r.axis) for r in self.roles if r.kind != "shape"}
        role_keys |= {
            (id(r.extra["bias"]), r.extra["bias_axis"]) for r in self.roles if r.extra.get("bias") is not None
        }
        for (vid, axis), layout in self.tracks.items():
            value = self.values[vid]
            if self.not_cuttable(value) is None:
                if (vid, axis) not in role_keys:  # safety net: a constant cut without a role
                    spaces.freeze_layout(
                        layout, f"constant '{value.name}' is indexed by channels in an unrecorded way"
                    )
                continue
            for atom, start, block in spaces.pieces(layout):
                group(atom).activations.append(
                    Activation(value=value, axis=axis, offset=start, block=block)
                )
        for r in self.roles:
            ps = pieces(r.value, r.axis)
            bias_ps = None
            if r.kind == "producer" and r.extra.get("bias") is not None:
                bias_ps = pieces(r.extra["bias"], r.extra["bias_axis"])
                if len(bias_ps) != len(ps):  # pragma: no cover - unified layouts align
                    spaces.freeze_layout(self.tracks[(id(r.value), r.axis)], "bias layout mismatch")
                    bias_ps = None
            for i, (atom, start, block) in enumerate(ps):
                g = group(atom)
                common = dict(value=r.value, axis=r.axis, offset=start, block=block, node=r.node)
                if r.kind == "producer":
                    has_bias = bias_ps is not None
                    g.producers.append(
                        Producer(
                            **common,
                            bias=r.extra["bias"] if has_bias else None,
                            bias_axis=r.extra["bias_axis"] if has_bias else None,
                            bias_offset=bias_ps[i][1] if has_bias else None,
                            bias_block=bias_ps[i][2] if has_bias else 1,
                            depthwise=r.extra.get("depthwise", False),
                        )
                    )
                elif r.kind == "consumer":
                    g.consumers.append(Consumer(**common))
                elif r.kind == "param":
                    g.params.append(Param(**common, input_index=r.extra["input_index"]))
                else:
                    g.shape_edits.append(
                        ShapeEdit(
                            **common,
                            kind=r.extra["kind"],
                            input_index=r.extra.get("input_index"),
                            attribute=r.extra.get("attribute"),
                            position=r.extra.get("position"),
                            axis_length=layout_length(spaces, self.tracks[(id(r.value), r.axis)]),
                        )
                    )
        for root, g in groups.items():
            g.reasons = list(spaces.reasons(root))
            self._costs(g)
        ordered = sorted(groups.values(), key=lambda g: g.id)
        return ordered

    def _costs(self, g: ChannelGroup) -> None:
        total = 0
        for cut in g.tensor_cuts():
            shape = self.dims(cut.value)
            if shape and shape[cut.axis]:
                total += math.prod(shape) // shape[cut.axis] * cut.block
        g.params_per_channel = total
        macs: int | None = 0
        for m in (*g.producers, *g.consumers):
            out_dims = self.dims(m.node.outputs[0])
            w = self.dims(m.value)
            spec = LINEAR_OPS.lookup(m.node, self.model)
            if out_dims is None or w is None or spec is None:
                macs = None
                break
            channel_axis = _norm(spec.data_channel_axis, len(out_dims))
            rest = [d for i, d in enumerate(out_dims) if i not in (0, channel_axis)]
            if any(not isinstance(d, int) for d in rest):
                macs = None
                break
            macs += math.prod(rest) * (math.prod(w) // w[m.axis]) * m.block
        g.macs_per_channel = macs


# ------------------------------------------------------------------------------------------
# Rule handlers (one per ChannelRule.kind)
# ------------------------------------------------------------------------------------------


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _output_used(graph_outputs: set[int], value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or id(value) in graph_outputs)


def _linear(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    spec = LINEAR_OPS.lookup(node, a.model)
    d = _node_desc(node)
    if spec is None:
        a.freeze_inputs(node, f"{d} has no weight layout at this opset")
        return
    x = node.inputs[spec.data_input]
    w = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    out = node.outputs[0]
    if w is None:
        a.freeze_inputs(node, f"{d} has no weight")
        return
    why = a.not_cuttable(w)
    if why is not None:
        a.freeze_inputs(node, f"weight '{w.name}' of {d} {why}")
        return
    if int(_attr(node, "transA", 0)):
        a.freeze_inputs(node, f"{d} has transA=1")
        return
    ws = [int(s) for s in w.const_value.shape]
    if not spec.grouped and len(ws) != 2:
        a.freeze_inputs(node, f"{d}: weight '{w.name}' is {len(ws)}-D, only 2-D weights are handled")
        return
    xr = a.rank(x)
    if xr is None:
        a.freeze_inputs(node, f"{d}: rank of input '{x.name}' is unknown")
        return
    ch = _norm(spec.data_channel_axis, xr)
    out_ax, in_ax = (_norm(ax, len(ws)) for ax in spec.role("weight").axes(node))
    # Axes before the channel axis (batch, MatMul's leading axes) keep their indices.
    for axis in a.tracked_axes(x):
        if axis < ch:
            a.claim(node, x, axis)
            a.bind_output(node, out, axis, a.track(x, axis))
    groups = int(_attr(node, "group", 1)) if spec.grouped else 1

    def bias_axis(n_out: int) -> int | None:
        role = spec.role("bias")
        bd = a.dims(bias)
        if bias is None or role is None or not bd:  # no bias, or a scalar one
            return None
        k = _norm(role.axes(node)[0], len(bd))
        if not 0 <= k < len(bd) or (bd[k] == 1 and n_out != 1):  # broadcast (Gemm's C)
            return None
        return k

    def bind_bias(layout: Layout) -> tuple[ir.Value | None, int | None]:
        k = bias_axis(layout_length(a.spaces, layout))
        if bias is None or k is None:
            return None, None
        a.attach(node, bias, k, layout)
        return (bias, k) if a.not_cuttable(bias) is None else (None, None)

    if groups == 1:
        layout_in = a.input_layout(node, x, ch, size=ws[in_ax])
        if layout_in is None or layout_length(a.spaces, layout_in) != ws[in_ax]:
            a.freeze_inputs(node, f"{d}: input '{x.name}' does not match weight '{w.name}'")
            return
        a.attach(node, w, in_ax, layout_in)
        layout_out = a.input_layout(node, w, out_ax)
        b, bk = bind_bias(layout_out)
        a.bind_output(node, out, ch, layout_out)
        a.role("producer", w, out_ax, node, bias=b, bias_axis=bk)
        a.role("consumer", w, in_ax, node)
        return

    # Grouped convolution.
    c_in = layout_length(a.spaces, a.track(x, ch)) if a.track(x, ch) else (a.dims(x) or [None] * xr)[ch]
    if not isinstance(c_in, int) or c_in % groups:
        a.freeze_inputs(node, f"{d}: input channel count unknown or not divisible by group={groups}")
        return
    in_is_total = ws[in_ax] == c_in  # ConvTranspose: weight axis 0 runs over all input channels
    per_in = c_in // groups
    per_out = ws[out_ax] if in_is_total else ws[out_ax] // groups
    layout_in = a.input_layout(node, x, ch, size=c_in)
    if per_in == 1:  # depthwise (channel multiplier per_out): whole groups are cut
        layout_out = scale_blocks(layout_in, per_out)
        key_axis, key_layout = (in_ax, layout_in) if in_is_total else (out_ax, layout_out)
        a.attach(node, w, key_axis, key_layout)
        b, bk = bind_bias(layout_out)
        a.bind_output(node, out, ch, layout_out)
        a.role("producer", w, key_axis, node, bias=b, bias_axis=bk, depthwise=True)
        a.role("shape", x, ch, node, kind="size", attribute="group")
        return
    # General grouped convolution: channel i of every group is cut together (lock-step).
    base_in = ((a.spaces.new(per_in), 1),)
    # (if the input cannot be split into equal groups, unify() freezes both sides; go on so the
    # op's weights and output still appear, frozen)
    a.unify(node, layout_in, repeat(base_in, groups), f"the {groups} input groups of '{x.name}'")
    a.attach(node, w, in_ax, repeat(base_in, groups) if in_is_total else base_in)
    base_out = ((a.spaces.new(per_out), 1),)
    layout_out = repeat(base_out, groups)
    a.attach(node, w, out_ax, base_out if in_is_total else layout_out)
    b, bk = bind_bias(layout_out)
    a.bind_output(node, out, ch, layout_out)
    a.role("producer", w, out_ax, node, bias=b, bias_axis=bk)
    a.role("consumer", w, in_ax, node)


def _passthrough(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0] if node.inputs else None
    axes = a.tracked_axes(x)
    if not axes:
        return
    d = _node_desc(node)
    outputs = {id(v) for v in a.graph.outputs}
    for i, extra in enumerate(node.outputs):
        if i not in rule.outputs and _output_used(outputs, extra):
            a.freeze_inputs(node, f"{d}: its output {i} '{extra.name}' is used")
            return
    xr = a.rank(x)
    mixed = set()
    if rule.mixes is not None:
        if xr is None:
            a.freeze_inputs(node, f"{d}: rank of '{x.name}' is unknown")
            return
        mixed = set(rule.mixes(node, xr))
    for axis in axes:
        a.claim(node, x, axis)
        layout = a.track(x, axis)
        if rule.leading_axes is not None and axis >= rule.leading_axes:
            a.freeze_axis(node, x, axis, f"{d} changes axis {axis} of '{x.name}'")
            continue
        for i in rule.outputs:
            if i < len(node.outputs):
                a.bind_output(node, node.outputs[i], axis, layout)
        if axis in mixed:
            a.spaces.freeze_layout(layout, f"{d} mixes values across the channel axis {axis} of '{x.name}'")
        if axis == 1:
            for i in rule.params:
                if i < len(node.inputs) and node.inputs[i] is not None:
                    a.param(node, i, node.inputs[i], 0, layout)
        for i in rule.broadcast_params:
            p = node.inputs[i] if i < len(node.inputs) else None
            if p is None or xr is None:
                continue
            pd = a.dims(p)
            k = axis - (xr - len(pd)) if pd is not None else -1
            if pd is not None and k >= 0 and pd[k] == layout_length(a.spaces, layout):
                a.param(node, i, p, k, layout)
            elif pd is None or (k >= 0 and pd[k] != 1):
                a.spaces.freeze_layout(layout, f"{d}: cannot align parameter '{p.name}' with the channels")


def _elementwise(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    if not any(a.tracked_axes(v) for _, v in inputs):
        return
    d = _node_desc(node)
    ranks = {i: a.rank(v) for i, v in inputs}
    if any(r is None for r in ranks.values()):
        a.freeze_inputs(node, f"{d}: an input rank is unknown, broadcasting cannot be checked")
        return
    r = max(ranks.values())
    out = node.outputs[0]
    out_axes = sorted({ax + r - ranks[i] for i, v in inputs for ax in a.tracked_axes(v)})
    for k in out_axes:
        parts = []  # (input index, value, axis, tracked layout or None, static length)
        for i, v in inputs:
            ax = k - (r - ranks[i])
            if ax < 0:
                continue
            layout = a.track(v, ax)
            n = layout_length(a.spaces, layout) if layout else a.dims(v)[ax]
            parts.append((i, v, ax, layout, n))
        full = max((n for *_, n in parts if isinstance(n, int)), default=1)
        # an untracked size-1 axis broadcasts: not coupled (unless the space itself has 1 channel)
        parts = [p for p in parts if not (p[3] is None and p[4] == 1 and full > 1)]
        base = None
        for i, v, ax, layout, n in parts:
            if layout is not None and n == 1 and full > 1:
                a.freeze_axis(node, v, ax, f"{d} broadcasts the single channel of '{v.name}'")
                continue
            if layout is not None and base is None:
                base = layout
        if base is None:
            continue
        for i, v, ax, layout, n in parts:
            if layout is not None and n == 1 and full > 1:
                continue
            if layout is None and not isinstance(n, int):
                a.claim(node, v, ax)
                a.spaces.freeze_layout(base, f"{d}: cannot tell whether '{v.name}' broadcasts on axis {ax}")
                continue
            if layout is base:
                a.claim(node, v, ax)
                continue
            if layout is None:
                a.param(node, i, v, ax, base)
            else:
                a.attach(node, v, ax, base)
        a.bind_output(node, out, k, base)


def _concat(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    tracked = sorted({ax for _, v in inputs for ax in a.tracked_axes(v)})
    if not tracked:
        return
    d = _node_desc(node)
    r = next((a.rank(v) for _, v in inputs if a.rank(v) is not None), None)
    if r is None:
        a.freeze_inputs(node, f"{d}: input ranks are unknown")
        return
    axis = _norm(int(_attr(node, "axis", 0)), r)
    out = node.outputs[0]
    for k in tracked:
        if k != axis:
            base = next(a.track(v, k) for _, v in inputs if a.track(v, k) is not None)
            for i, v in inputs:
                if a.track(v, k) is base:
                    a.claim(node, v, k)
                elif a.track(v, k) is None:
                    a.param(node, i, v, k, base)
                else:
                    a.attach(node, v, k, base)
            a.bind_output(node, out, k, base)
            continue
        layouts: list[Layout] = []
        for i, v in inputs:
            dims = a.dims(v)
            if a.track(v, k) is None and dims is not None and dims[k] == 0:
                continue  # empty input
            layout = a.input_layout(node, v, k)
            if layout is None:
                for _, u in inputs:
                    a.freeze_axis(node, u, k, f"{d}: length of '{v.name}' on the concat axis is unknown")
                break
            if a.not_cuttable(v) is None:
                a.role("param", v, k, node, input_index=i)
            layouts.append(layout)
        else:
            a.bind_output(node, out, k, tuple(p for layout in layouts for p in layout))


def _split_sizes(a: _Analyzer, node: ir.Node, rule: ChannelRule, total: int):
    """(sizes, where) or (None, reason)."""
    n_out = len(node.outputs)
    if rule.inputs_from is not None and len(node.inputs) > rule.inputs_from and node.inputs[rule.inputs_from] is not None:
        sizes = a.const_ints(node.inputs[rule.inputs_from])
        if sizes is None:
            return None, "has non-constant split sizes"
        return sizes, {"input_index": rule.inputs_from}
    attr = _attr(node, "split")
    if attr is not None:
        return [int(s) for s in attr], {"attribute": "split"}
    n = int(_attr(node, "num_outputs", n_out))
    chunk = -(-total // n)
    sizes = [chunk] * (n - 1) + [total - chunk * (n - 1)]
    return sizes, {}


def _split(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    axes = a.tracked_axes(x)
    if not axes:
        return
    d = _node_desc(node)
    xr = a.rank(x)
    if xr is None:
        a.freeze_inputs(node, f"{d}: rank of '{x.name}' is unknown")
        return
    split_axis = _norm(int(_attr(node, "axis", 0)), xr)
    for k in axes:
        a.claim(node, x, k)
        layout = a.track(x, k)
        if k != split_axis:
            for out in node.outputs:
                a.bind_output(node, out, k, layout)
            continue
        total = layout_length(a.spaces, layout)
        sizes, where = _split_sizes(a, node, rule, total)
        if sizes is None or sum(sizes) != total or len(sizes) != len(node.outputs):
            a.spaces.freeze_layout(layout, f"{d} {where if sizes is None else 'has split sizes that do not match'}")
            continue
        start = 0
        for j, (out, size) in enumerate(zip(node.outputs, sizes)):
            if size > 0:
                part = a.spaces.sub(layout, start, start + size)
                if part is None:
                    a.spaces.freeze_layout(layout, f"{d} splits inside a channel's feature block")
                    break
                a.bind_output(node, out, k, part)
                a.role("shape", out, k, node, kind="size", position=j, **where)
            start += size


def _slice(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    axes_tracked = a.tracked_axes(x)
    if not axes_tracked:
        return
    d = _node_desc(node)
    xr = a.rank(x)
    if xr is None:
        a.freeze_inputs(node, f"{d}: rank of '{x.name}' is unknown")
        return
    if rule.inputs_from is not None:
        f = rule.inputs_from

        def get(i):
            return node.inputs[i] if len(node.inputs) > i and node.inputs[i] is not None else None

        starts, ends = a.const_ints(get(f)), a.const_ints(get(f + 1))
        axes = a.const_ints(get(f + 2)) if get(f + 2) is not None else None
        steps = a.const_ints(get(f + 3)) if get(f + 3) is not None else None
        axes_known = get(f + 2) is None or axes is not None
        steps_known = get(f + 3) is None or steps is not None
        where_s, where_e = {"input_index": f}, {"input_index": f + 1}
    else:
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        axes, steps, axes_known, steps_known = _attr(node, "axes"), None, True, True
        where_s, where_e = {"attribute": "starts"}, {"attribute": "ends"}
    if axes_known and axes is None and starts is not None:
        axes = list(range(len(starts)))
    out = node.outputs[0]
    for k in axes_tracked:
        a.claim(node, x, k)
        layout = a.track(x, k)
        if axes_known and axes is not None and k not in [_norm(int(v), xr) for v in axes]:
            a.bind_output(node, out, k, layout)
            continue
        if starts is None or ends is None or axes is None or not steps_known:
            a.spaces.freeze_layout(layout, f"{d} has non-constant bounds on the channel axis of '{x.name}'")
            continue
        p = [_norm(int(v), xr) for v in axes].index(k)
        step = 1 if steps is None else steps[p]
        if step != 1:
            a.spaces.freeze_layout(layout, f"{d} slices the channel axis of '{x.name}' with step {step}")
            continue
        n = layout_length(a.spaces, layout)
        s, e = (min(max(v + n if v < 0 else v, 0), n) for v in (int(starts[p]), int(ends[p])))
        if s >= e:
            a.spaces.freeze_layout(layout, f"{d} selects no channel of '{x.name}'")
            continue
        part = a.spaces.sub(layout, s, e)
        if part is None:
            a.spaces.freeze_layout(layout, f"{d} slices inside a channel's feature block")
            continue
        a.bind_output(node, out, k, part)
        a.role("shape", x, k, node, kind="bound", position=p, **where_s)
        a.role("shape", x, k, node, kind="bound", position=p, **where_e)


def _transpose(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    axes = a.tracked_axes(x)
    if not axes:
        return
    xr = a.rank(x)
    perm = _attr(node, "perm")
    if perm is None:
        if xr is None:
            a.freeze_inputs(node, f"{_node_desc(node)}: rank of '{x.name}' is unknown")
            return
        perm = list(reversed(range(xr)))
    perm = [int(p) for p in perm]
    for k in axes:
        a.claim(node, x, k)
        a.bind_output(node, node.outputs[0], perm.index(k), a.track(x, k))


def _flatten(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    axes = a.tracked_axes(x)
    if not axes:
        return
    d = _node_desc(node)
    dims = a.dims(x)
    if dims is None:
        a.freeze_inputs(node, f"{d}: shape of '{x.name}' is unknown")
        return
    r = len(dims)
    split = _norm(int(_attr(node, "axis", 1)), r)
    for k in axes:
        a.claim(node, x, k)
        layout = a.track(x, k)
        lo, hi, out_axis = (0, split, 0) if k < split else (split, r, 1)
        if any(dim != 1 for dim in dims[lo:k]):
            a.spaces.freeze_layout(layout, f"{d} merges the channel axis {k} of '{x.name}' with the axes before it")
            continue
        inner = dims[k + 1 : hi]
        if any(not isinstance(dim, int) for dim in inner):
            a.spaces.freeze_layout(
                layout, f"{d}: the axes after channel axis {k} of '{x.name}' have no static size"
            )
            continue
        a.bind_output(node, node.outputs[0], out_axis, scale_blocks(layout, math.prod(inner)))


def _reshape(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    axes = a.tracked_axes(x)
    if not axes:
        return
    d = _node_desc(node)
    target_value = node.inputs[rule.inputs_from] if len(node.inputs) > rule.inputs_from else None
    target = a.const_ints(target_value)
    dims = a.dims(x)
    if target is None or dims is None:
        a.freeze_inputs(node, f"{d} has a non-constant target shape or an input of unknown shape")
        return
    allowzero = int(_attr(node, "allowzero", 0))
    out_dims: list[Dim] = []
    for j, t in enumerate(target):
        if t == 0 and not allowzero:
            out_dims.append(dims[j] if j < len(dims) else None)
        elif t == -1:
            out_dims.append(None)
        else:
            out_dims.append(t)
    if -1 in target:
        j = target.index(-1)
        others = _sym_product([v for i, v in enumerate(out_dims) if i != j])
        out_dims[j] = _sym_divide(_sym_product(dims), others)
    out = node.outputs[0]
    for k in axes:
        a.claim(node, x, k)
        layout = a.track(x, k)
        din = list(dims)
        din[k] = layout_length(a.spaces, layout)
        found = None
        for j in range(len(out_dims)):
            tail = _sym_product(out_dims[j + 1 :])
            if tail is None or out_dims[j] is None:
                continue
            for m in range(1, len(din) - k + 1):
                head = _sym_product(din[k : k + m])
                if head is not None and _sym_product([out_dims[j]]) == head and tail == _sym_product(din[k + m :]):
                    found = (j, _sym_product(din[k + 1 : k + m]))
                    break
            if found:
                break
        if found is None or found[1][1]:
            a.spaces.freeze_layout(layout, f"{d} changes the channel axis {k} of '{x.name}' (to {target})")
            continue
        j, (block, _) = found
        t = target[j]
        if t == 0 and not allowzero and not (j == k and block == 1):
            a.spaces.freeze_layout(layout, f"{d} copies an unrelated input dimension into the channel axis")
            continue
        a.bind_output(node, out, j, scale_blocks(layout, block))
        if t > 0:
            a.role("shape", out, j, node, kind="size", input_index=rule.inputs_from, position=j)


def _axes_of(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> tuple[bool, list[int] | None]:
    """(known, axes): axes from the input at ``rule.inputs_from`` or the ``axes`` attribute."""
    if rule.inputs_from is not None:
        v = node.inputs[rule.inputs_from] if len(node.inputs) > rule.inputs_from else None
        if v is None:
            return True, None
        ints = a.const_ints(v)
        return ints is not None, ints
    attr = _attr(node, "axes")
    return True, None if attr is None else [int(v) for v in attr]


def _squeeze(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    tracked = a.tracked_axes(x)
    if not tracked:
        return
    d = _node_desc(node)
    dims = a.dims(x)
    known, axes = _axes_of(a, node, rule)
    if not known or dims is None:
        a.freeze_inputs(node, f"{d}: axes or input shape unknown")
        return
    r = len(dims)
    removed = [i for i, dim in enumerate(dims) if dim == 1] if axes is None else [_norm(v, r) for v in axes]
    if axes is None and any(not isinstance(dim, int) for dim in dims):
        a.freeze_inputs(node, f"{d}: squeezes unknown axes")
        return
    for k in tracked:
        if k in removed:
            a.freeze_axis(node, x, k, f"{d} removes the channel axis {k} of '{x.name}'")
            continue
        a.claim(node, x, k)
        a.bind_output(node, node.outputs[0], k - sum(1 for v in removed if v < k), a.track(x, k))


def _unsqueeze(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    tracked = a.tracked_axes(x)
    if not tracked:
        return
    d = _node_desc(node)
    xr = a.rank(x)
    known, axes = _axes_of(a, node, rule)
    if not known or axes is None or xr is None:
        a.freeze_inputs(node, f"{d}: axes or input rank unknown")
        return
    r = xr + len(axes)
    inserted = {_norm(v, r) for v in axes}
    kept = [i for i in range(r) if i not in inserted]
    for k in tracked:
        a.claim(node, x, k)
        a.bind_output(node, node.outputs[0], kept[k], a.track(x, k))


def _reduce(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    tracked = a.tracked_axes(x)
    if not tracked:
        return
    d = _node_desc(node)
    xr = a.rank(x)
    known, axes = _axes_of(a, node, rule)
    if not known or xr is None:
        a.freeze_inputs(node, f"{d}: reduction axes or input rank unknown")
        return
    keepdims = int(_attr(node, "keepdims", 1))
    if not axes:
        if int(_attr(node, "noop_with_empty_axes", 0)):
            axes = []
        else:
            axes = list(range(xr))
    reduced = {_norm(v, xr) for v in axes}
    for k in tracked:
        if k in reduced:
            a.freeze_axis(node, x, k, f"{d} reduces over the channel axis {k} of '{x.name}'")
            continue
        a.claim(node, x, k)
        out_axis = k if keepdims else k - sum(1 for v in reduced if v < k)
        a.bind_output(node, node.outputs[0], out_axis, a.track(x, k))


def _pad(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    tracked = a.tracked_axes(x)
    if not tracked:
        return
    d = _node_desc(node)
    xr = a.rank(x)
    if rule.inputs_from is not None:
        f = rule.inputs_from
        pads = a.const_ints(node.inputs[f]) if len(node.inputs) > f and node.inputs[f] is not None else None
        axes_v = node.inputs[f + 2] if len(node.inputs) > f + 2 else None
        axes = a.const_ints(axes_v) if axes_v is not None else None
        axes_known = axes_v is None or axes is not None
    else:
        pads, axes, axes_known = _attr(node, "pads"), None, True
    if pads is None or not axes_known or xr is None:
        a.freeze_inputs(node, f"{d} has non-constant pads")
        return
    axes = list(range(xr)) if axes is None else [_norm(v, xr) for v in axes]
    for k in tracked:
        a.claim(node, x, k)
        if k in axes:
            p = axes.index(k)
            if pads[p] != 0 or pads[p + len(axes)] != 0:
                a.freeze_axis(node, x, k, f"{d} pads the channel axis {k} of '{x.name}'")
                continue
        a.bind_output(node, node.outputs[0], k, a.track(x, k))


def _resize(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    tracked = a.tracked_axes(x)
    if not tracked:
        return
    d = _node_desc(node)
    xr = a.rank(x)
    f = rule.inputs_from

    def get(i):
        return node.inputs[i] if len(node.inputs) > i and node.inputs[i] is not None else None

    scales_v, sizes_v = get(f), (get(f + 1) if f >= 2 else None)
    scales = a.const(scales_v) if scales_v is not None else None
    sizes = a.const_ints(sizes_v) if sizes_v is not None else None
    if (scales_v is not None and scales is None) or (sizes_v is not None and sizes is None) or xr is None:
        a.freeze_inputs(node, f"{d} has non-constant scales or sizes")
        return
    attr_axes = _attr(node, "axes")
    axes = list(range(xr)) if attr_axes is None else [_norm(int(v), xr) for v in attr_axes]
    for k in tracked:
        a.claim(node, x, k)
        layout = a.track(x, k)
        if k in axes:
            p = axes.index(k)
            if scales is not None and scales.size:
                if float(scales.reshape(-1)[p]) != 1.0:
                    a.freeze_axis(node, x, k, f"{d} rescales the channel axis {k} of '{x.name}'")
                    continue
            elif sizes is not None and sizes[p] == layout_length(a.spaces, layout):
                a.role("shape", node.outputs[0], k, node, kind="size", input_index=f + 1, position=p)
            else:
                a.freeze_axis(node, x, k, f"{d} resizes the channel axis {k} of '{x.name}'")
                continue
        a.bind_output(node, node.outputs[0], k, layout)


def _shape(a: _Analyzer, node: ir.Node, rule: ChannelRule) -> None:
    x = node.inputs[0]
    tracked = a.tracked_axes(x)
    if not tracked:
        return
    xr = a.rank(x)
    reason = f"read by {node.op_type} node '{node.name}'"
    if rule.always_freeze or xr is None:
        a.freeze_inputs(node, reason)
        return
    start = min(max(_norm(int(_attr(node, "start", 0)), xr), 0), xr)
    end = min(max(_norm(int(_attr(node, "end", xr)), xr), 0), xr)
    for k in tracked:
        if start <= k < end:
            a.freeze_axis(node, x, k, reason)
        else:
            a.claim(node, x, k)


_HANDLERS: dict[str, Callable[[_Analyzer, ir.Node, ChannelRule], None]] = {
    "linear": _linear,
    "passthrough": _passthrough,
    "elementwise": _elementwise,
    "concat": _concat,
    "split": _split,
    "slice": _slice,
    "transpose": _transpose,
    "flatten": _flatten,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "unsqueeze": _unsqueeze,
    "reduce": _reduce,
    "pad": _pad,
    "resize": _resize,
    "shape": _shape,
}


# ------------------------------------------------------------------------------------------
# Graph helpers
# ------------------------------------------------------------------------------------------


def _subgraphs(node: ir.Node) -> Iterable[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.value


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """Nodes of ``graph`` in a topological order (ONNX requires one; be robust anyway)."""
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    pending = {id(n): 0 for n in nodes}
    users: dict[int, list[ir.Node]] = collections.defaultdict(list)
    for n in nodes:
        preds = {id(v.producer()) for v in n.inputs if v is not None and v.producer() is not None}
        preds &= set(index)
        pending[id(n)] = len(preds)
        for p in preds:
            users[p].append(n)
    ready = [n for n in nodes if pending[id(n)] == 0]
    order: list[ir.Node] = []
    while ready:
        ready.sort(key=lambda n: -index[id(n)])
        n = ready.pop()
        order.append(n)
        for u in users[id(n)]:
            pending[id(u)] -= 1
            if pending[id(u)] == 0:
                ready.append(u)
    if len(order) != len(nodes):  # a cycle: keep the stored order
        return nodes
    return order


def _infer_dims(model: ir.Model) -> dict[str, list[Dim]]:
    """Shapes of the main graph's values by name, from ONNX shape inference on a light copy."""
    clone = model.clone()
    graph = clone.graph
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is not None:
            if value.shape is None:
                value.shape = ir.Shape(tensor.shape)
            if value.dtype is None:
                value.dtype = tensor.dtype
        if tensor is None or tensor.nbytes > 4096:  # keep small constants (shapes) as data
            if not value.is_graph_input():
                graph.inputs.append(value)
            value.const_value = None
            graph.initializers.pop(value.name)
    try:
        proto = ir.serde.serialize_model(clone)
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        # ops that keep their input's shape outside the default domain (ai.onnx.ml's Scaler): ONNX
        # infers nothing after them; each round gives their outputs a shape, then infers again
        for _ in range(sum(1 for n in graph if (n.domain, n.op_type) in SHAPE_KEEPING_OPS)):
            known = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input)}
            for value in (v for n in graph for v in n.inputs if v is not None and v.shape is None):
                vi = known.get(value.name)
                if vi is not None and vi.type.tensor_type.HasField("shape"):
                    value.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                            for d in vi.type.tensor_type.shape.dim])
                    if value.dtype is None and vi.type.tensor_type.elem_type:
                        value.dtype = ir.DataType(vi.type.tensor_type.elem_type)
            if not keep_shapes_through(clone):
                break
            proto = ir.serde.serialize_model(clone)
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        return {}
    out: dict[str, list[Dim]] = {}
    g = inferred.graph
    for vi in (*g.input, *g.value_info, *g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims: list[Dim] = []
        for dim in t.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and not dim.dim_param.startswith("unk__"):
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        out[vi.name] = dims
    return out
