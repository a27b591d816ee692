"""Declarative knowledge about ONNX operators, keyed by (domain, op type, opset range).

Passes ask this module what an op *is* instead of testing op types in if-chains:

* :class:`OpTable` is a generic registry: ``table.register("Conv", fact, since=1)`` and
  ``table.lookup(node, model)`` picks the entry whose opset range covers the node's domain opset.
  Every pass family keeps its own table of its own fact type (quantization placement, pruning
  channel rules, ...) built on this class, so a new op or a new opset is one table row.
* :data:`LINEAR_OPS` is the shared core table: which inputs of Conv, ConvTranspose, Gemm and
  MatMul are weights or biases, and along which axis their output and input channels run (some
  axes depend on attributes, e.g. Gemm's ``transB``; those are small functions of the node).
* :data:`ATTRIBUTE_DEFAULTS` holds the ONNX specification's default values of common
  attributes, so a cleanup can drop attributes that merely restate them.
* :data:`CHANNELWISE_OPS` lists ops that map channel c of their input to channel c of their
  output (element-wise unary ops, normalizations with per-channel parameters, pooling).

Conventions: ``out_axis`` is the weight axis indexed by output channel, ``in_axis`` the axis
indexed by input channel (per group for grouped convolution). Data tensors are NCHW-like: channel
axis 1 for Conv-family ops, the last axis for Gemm/MatMul.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import onnx_ir as ir

__all__ = [
    "OpTable",
    "WeightRole",
    "LinearOpSpec",
    "LINEAR_OPS",
    "linear_spec",
    "weight_axes",
    "bias_input",
    "CHANNELWISE_OPS",
    "node_opset",
    "is_default_domain",
    "is_constant_node",
    "is_dequantize_node",
    "GELU_OPS",
    "is_gelu_node",
    "is_matmul_node",
    "is_conv_node",
    "is_transpose_node",
    "is_add_node",
    "is_clip_node",
    "is_sigmoid_node",
    "is_mul_node",
    "silu_input",
    "CLASS_DECISION_OPS",
    "DECISION_CARRIERS",
    "class_decision_source",
    "is_zipmap",
    "SHAPE_KEEPING_OPS",
    "keep_shapes_through",
]

T = TypeVar("T")

_DEFAULT_DOMAINS = ("", "ai.onnx")


def is_default_domain(domain: str) -> bool:
    return domain in _DEFAULT_DOMAINS


def is_constant_node(node: ir.Node) -> bool:
    """A ``Constant`` node of the default domain: what it outputs is a constant, not an activation."""
    return node.op_type == "Constant" and is_default_domain(node.domain)


#: (domain, op type) of the ops whose output is a GELU activation: onnxruntime's fused forms and ai.onnx Gelu.
GELU_OPS = frozenset({("com.microsoft", "BiasGelu"), ("com.microsoft", "FastGelu"), ("com.microsoft", "Gelu"),
                      ("", "Gelu")})


def is_gelu_node(node: ir.Node) -> bool:
    """Whether ``node`` computes a GELU (:data:`GELU_OPS`)."""
    return ("" if is_default_domain(node.domain) else node.domain, node.op_type) in GELU_OPS


def is_matmul_node(node: ir.Node) -> bool:
    """Whether ``node`` is an ai.onnx MatMul."""
    return is_default_domain(node.domain) and node.op_type == "MatMul"


def is_conv_node(node: ir.Node) -> bool:
    """Whether ``node`` is an ai.onnx Conv."""
    return is_default_domain(node.domain) and node.op_type == "Conv"


def is_transpose_node(node: ir.Node) -> bool:
    """Whether ``node`` is an ai.onnx Transpose."""
    return is_default_domain(node.domain) and node.op_type == "Transpose"


def is_add_node(node: ir.Node) -> bool:
    """Whether ``node`` is an ai.onnx Add."""
    return is_default_domain(node.domain) and node.op_type == "Add"


def is_clip_node(node: ir.Node) -> bool:
    """Whether ``node`` is an ai.onnx Clip."""
    return is_default_domain(node.domain) and node.op_type == "Clip"


def is_sigmoid_node(node: ir.Node) -> bool:
    """Whether ``node`` is an ai.onnx Sigmoid."""
    return is_default_domain(node.domain) and node.op_type == "Sigmoid"


def is_mul_node(node: ir.Node) -> bool:
    """Whether ``node`` is an ai.onnx Mul."""
    return is_default_domain(node.domain) and node.op_type == "Mul"


def silu_input(value: ir.Value) -> ir.Node | None:
    """The Mul of a SiLU (swish) ``x * Sigmoid(x)`` when ``value`` is its ``x`` and nothing else
    reads ``value``; otherwise None. (A squeeze-excitation gate ``x * Sigmoid(f(x))`` is not one.)"""
    readers = value.consumers()
    if len(readers) != 2 or value.is_graph_output():
        return None
    sigmoid = next((n for n in readers if is_sigmoid_node(n)), None)
    mul = next((n for n in readers if is_mul_node(n)), None)
    if sigmoid is None or mul is None or len(mul.inputs) != 2:
        return None
    ins = list(mul.inputs)
    return mul if value in ins and sigmoid.outputs[0] in ins else None


def is_dequantize_node(node: ir.Node) -> bool:
    """A ``DequantizeLinear`` (default or ``com.microsoft`` domain): its output is the float image of
    an integer tensor, the int8 side of a Q/DQ pair."""
    return node.op_type == "DequantizeLinear" and (is_default_domain(node.domain) or node.domain == "com.microsoft")


#: (domain, op type) of the ops whose first output is one decided class per sample (or position): the
#: arg-max of scores, or the predicted label of an ai.onnx.ml classifier (scikit-learn exports).
CLASS_DECISION_OPS = frozenset({("", "ArgMax"), ("", "ArgMin"), ("ai.onnx.ml", "LinearClassifier"),
                                ("ai.onnx.ml", "TreeEnsembleClassifier"), ("ai.onnx.ml", "SVMClassifier")})
#: (domain, op type) -> the input that carries the decision through ops that only relabel it: a class
#: index looked up in a table of class labels (skl2onnx's ``ArrayFeatureExtractor(classes, argmax)``),
#: encoded (``LabelEncoder``), reshaped or cast.
DECISION_CARRIERS = {("ai.onnx.ml", "ArrayFeatureExtractor"): 1, ("ai.onnx.ml", "LabelEncoder"): 0,
                     **{("", op): 0 for op in ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast")}}


def class_decision_source(value: ir.Value) -> ir.Node | None:
    """The node that decides the class ``value`` holds (:data:`CLASS_DECISION_OPS`), behind ops that
    only relabel it (:data:`DECISION_CARRIERS`); None when ``value`` is no such decision (another
    output of a classifier, its scores, or anything else)."""
    seen: set[int] = set()
    while value is not None and id(value) not in seen:
        seen.add(id(value))
        node = value.producer()
        if node is None:
            return None
        key = ("" if is_default_domain(node.domain) else node.domain, node.op_type)
        if key in CLASS_DECISION_OPS:
            return node if node.outputs and node.outputs[0] is value else None
        index = DECISION_CARRIERS.get(key)
        if index is None or len(node.inputs) <= index:
            return None
        value = node.inputs[index]
    return None


#: (domain, op type) -> the element type of the output, of ops outside the default domain whose one
#: output has the shape of their first input (elementwise), which ONNX's shape inference leaves
#: unknown: scikit-learn's preprocessing (skl2onnx puts a ``Scaler`` or ``Normalizer`` first, and
#: every shape after it was unknown, so that ``prune`` found no channel group in an MLP). ``None``:
#: the input's element type.
SHAPE_KEEPING_OPS: dict[tuple[str, str], ir.DataType | None] = {
    ("ai.onnx.ml", "Scaler"): ir.DataType.FLOAT, ("ai.onnx.ml", "Normalizer"): ir.DataType.FLOAT,
    ("ai.onnx.ml", "Binarizer"): None, ("ai.onnx.ml", "Imputer"): None,
}


def keep_shapes_through(model: ir.Model) -> bool:
    """Give the output of each main-graph node of :data:`SHAPE_KEEPING_OPS` whose input shape is
    known and output shape is not its input's shape and element type; whether any changed (shape
    inference then has more to go on: run it again)."""
    changed = False
    for node in model.graph:
        key = ("" if is_default_domain(node.domain) else node.domain, node.op_type)
        if key not in SHAPE_KEEPING_OPS or not node.inputs or node.inputs[0] is None or len(node.outputs) != 1:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x.shape is None or y.shape is not None:
            continue
        y.shape = ir.Shape(list(x.shape))
        if y.dtype is None:
            y.dtype = SHAPE_KEEPING_OPS[key] or x.dtype
        changed = True
    return changed


def is_zipmap(domain: str, op_type: str) -> bool:
    """Whether (``domain``, ``op_type``) is scikit-learn's ``ZipMap`` (ai.onnx.ml): class scores turned
    into one dictionary per sample, a map type (strings: :mod:`onnxcomp.io` asks before onnx_ir,
    which cannot read maps, has a node)."""
    return domain == "ai.onnx.ml" and op_type == "ZipMap"


def node_opset(node: ir.Node, model: ir.Model) -> int:
    """Opset version of ``node``'s domain as imported by the model (graph imports first)."""
    domain = "" if is_default_domain(node.domain) else node.domain
    imports = dict(model.opset_imports)
    if node.graph is not None:
        imports.update(node.graph.opset_imports)
    if domain == "" and "" not in imports and "ai.onnx" in imports:
        return imports["ai.onnx"]
    return imports.get(domain, 0)


class OpTable(Generic[T]):
    """Facts of type ``T`` keyed by (domain, op type, inclusive opset range).

    Ranges of one op must not overlap: registering an overlapping range raises ``ValueError``, so
    a table never silently answers with the wrong row.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._rows: dict[tuple[str, str], list[tuple[int, int | None, T]]] = {}

    def register(
        self,
        op_types: str | Iterable[str],
        fact: T,
        *,
        domain: str = "",
        since: int = 1,
        until: int | None = None,
    ) -> None:
        """Add ``fact`` for each op type in ``op_types`` over opsets ``since..until`` (inclusive)."""
        if isinstance(op_types, str):
            op_types = (op_types,)
        domain = "" if is_default_domain(domain) else domain
        for op_type in op_types:
            rows = self._rows.setdefault((domain, op_type), [])
            for lo, hi, _ in rows:
                if (until is None or until >= lo) and (hi is None or hi >= since):
                    raise ValueError(
                        f"{self.name}: {domain or 'ai.onnx'}::{op_type} opsets {since}..{until} "
                        f"overlap an existing row {lo}..{hi}"
                    )
            rows.append((since, until, fact))

    def get(self, domain: str, op_type: str, opset: int) -> T | None:
        domain = "" if is_default_domain(domain) else domain
        for lo, hi, fact in self._rows.get((domain, op_type), ()):
            if opset >= lo and (hi is None or opset <= hi):
                return fact
        return None

    def lookup(self, node: ir.Node, model: ir.Model) -> T | None:
        """The fact for ``node`` at the opset the model imports, or None if the op is unknown."""
        return self.get(node.domain, node.op_type, node_opset(node, model))

    def op_types(self, domain: str = "") -> set[str]:
        return {op for (d, op) in self._rows if d == domain}

    def __contains__(self, key: tuple[str, str]) -> bool:
        domain, op_type = key
        return (("" if is_default_domain(domain) else domain), op_type) in self._rows


@dataclasses.dataclass(frozen=True)
class WeightRole:
    """One constant input of a linear op.

    ``out_axis`` / ``in_axis`` are ints or functions of the node (attribute-dependent layouts);
    ``None`` where the tensor has no such axis (a bias has no input axis).
    """

    input_index: int
    kind: str  # "weight" or "bias"
    out_axis: int | Callable[[ir.Node], int] | None
    in_axis: int | Callable[[ir.Node], int] | None = None

    def axes(self, node: ir.Node) -> tuple[int | None, int | None]:
        """(out_axis, in_axis) resolved for ``node``."""
        return _resolve(self.out_axis, node), _resolve(self.in_axis, node)


def _resolve(rule: int | Callable[[ir.Node], int] | None, node: ir.Node) -> int | None:
    if rule is None or isinstance(rule, int):
        return rule
    return rule(node)


@dataclasses.dataclass(frozen=True)
class LinearOpSpec:
    """A linear op: which input is data, which are weight/bias, where the channel axes are.

    ``data_channel_axis`` is the channel axis of the data input and output (1 for Conv-family,
    -1 for Gemm/MatMul). ``grouped`` ops read the ``group`` attribute; ``per_group`` says which
    weight axis counts channels of one group only (``"in"``: Conv's ``C / group``, ``"out"``:
    ConvTranspose's ``M / group``).
    """

    data_input: int
    roles: tuple[WeightRole, ...]
    data_channel_axis: int
    grouped: bool = False
    per_group: str | None = None

    def channels(self, node: ir.Node, weight_shape: tuple[int, ...]) -> tuple[int, int]:
        """(input channels, output channels) a weight of this shape implies for ``node``."""
        w = self.role("weight")
        out_axis, in_axis = w.axes(node) if w else (None, None)
        group = node.attributes.get_int("group", 1) if self.grouped else 1
        c_in = weight_shape[in_axis] * (group if self.per_group == "in" else 1)
        c_out = weight_shape[out_axis] * (group if self.per_group == "out" else 1)
        return c_in, c_out

    def role(self, kind: str) -> WeightRole | None:
        for r in self.roles:
            if r.kind == kind:
                return r
        return None


def _gemm_b_out(node: ir.Node) -> int:
    return 0 if node.attributes.get_int("transB", 0) else 1


def _gemm_b_in(node: ir.Node) -> int:
    return 1 if node.attributes.get_int("transB", 0) else 0


LINEAR_OPS: OpTable[LinearOpSpec] = OpTable("linear ops")
LINEAR_OPS.register(
    "Conv",
    LinearOpSpec(
        data_input=0,
        roles=(WeightRole(1, "weight", out_axis=0, in_axis=1), WeightRole(2, "bias", out_axis=0)),
        data_channel_axis=1,
        grouped=True,
        per_group="in",
    ),
)
LINEAR_OPS.register(
    "ConvTranspose",
    LinearOpSpec(
        data_input=0,
        roles=(WeightRole(1, "weight", out_axis=1, in_axis=0), WeightRole(2, "bias", out_axis=0)),
        data_channel_axis=1,
        grouped=True,
        per_group="out",
    ),
)
LINEAR_OPS.register(
    "Gemm",
    LinearOpSpec(
        data_input=0,
        roles=(
            WeightRole(1, "weight", out_axis=_gemm_b_out, in_axis=_gemm_b_in),
            WeightRole(2, "bias", out_axis=-1),
        ),
        data_channel_axis=-1,
    ),
)
LINEAR_OPS.register(
    "MatMul",
    LinearOpSpec(
        data_input=0,
        roles=(WeightRole(1, "weight", out_axis=-1, in_axis=-2),),
        data_channel_axis=-1,
    ),
)

def linear_spec(node: ir.Node) -> LinearOpSpec | None:
    """The :data:`LINEAR_OPS` row of a default-domain node (its rows hold for every opset), or None."""
    if not is_default_domain(node.domain):
        return None
    return LINEAR_OPS.get("", node.op_type, _ANY_OPSET)


def weight_axes(node: ir.Node) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of a linear node's weight (input 1).

    Axes may be negative (MatMul: -1 and -2); Gemm's follow ``transB``. Raises KeyError for an op
    that is not in :data:`LINEAR_OPS`.
    """
    spec = linear_spec(node)
    role = spec.role("weight") if spec is not None else None
    if role is None:
        raise KeyError(f"{node.op_type} is not a linear op with a weight")
    out_axis, in_axis = role.axes(node)
    return int(out_axis), int(in_axis)


def bias_input(node: ir.Node) -> int | None:
    """Input index of a linear node's bias, or None when the op has no bias input (MatMul)."""
    spec = linear_spec(node)
    role = spec.role("bias") if spec is not None else None
    return role.input_index if role is not None else None


#: any opset: rows of LINEAR_OPS have no upper bound
_ANY_OPSET = 10**6


#: Ops mapping channel c of input 0 to channel c of output 0 (channel axis 1 for NCHW data).
#: Per-channel parameters (BatchNormalization's scale/bias/mean/var, PRelu's slope) are inputs
#: 1.. and are indexed by channel along their only non-unit axis.
CHANNELWISE_OPS: OpTable[tuple[int, ...]] = OpTable("channel-wise ops")
CHANNELWISE_OPS.register(
    (
        "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
        "Softplus", "Softsign", "Gelu", "Erf", "Mish", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt",
        "Identity", "Dropout", "Cast", "ThresholdedRelu",
    ),
    (),
)
CHANNELWISE_OPS.register("BatchNormalization", (1, 2, 3, 4))
CHANNELWISE_OPS.register("InstanceNormalization", (1, 2))
CHANNELWISE_OPS.register("PRelu", (1,))
CHANNELWISE_OPS.register(
    ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"), ()
)


# --------------------------------------------------------------------------------------------
# Channel rules: how channel indices flow through an op (structured-pruning dependency analysis,
# see onnxcomp.analysis.channels). One row per op and opset range; the analysis dispatches on
# ``ChannelRule.kind`` and never tests op types itself.
# --------------------------------------------------------------------------------------------

#: Rule kinds understood by onnxcomp.analysis.channels.
CHANNEL_RULE_KINDS = (
    "linear",  # Conv/ConvTranspose/Gemm/MatMul (layouts from LINEAR_OPS): produces a new space
    "passthrough",  # output channel c of input 0's axes = input channel c (unary, BN, pools, ...)
    "elementwise",  # n-ary with multidirectional broadcasting: couples every non-broadcast input
    "concat",  # output = concatenation of the inputs along ``axis``
    "split",  # each output = a contiguous segment of the input along ``axis``
    "slice",  # output = [start, end) of the input along the sliced axes (step 1 only)
    "transpose",  # axes follow ``perm``
    "flatten",  # [d0..d(a-1)] x [da..] -> 2-D: a channel becomes a contiguous block of features
    "reshape",  # channel axis kept, or merged as the outermost factor of an output axis
    "squeeze",  # removes size-1 axes
    "unsqueeze",  # inserts size-1 axes
    "reduce",  # Reduce*: freezes a reduced channel axis, shifts the others (keepdims=0)
    "pad",  # channel axis must not be padded
    "resize",  # channel axis must keep its size (scale 1 / same size)
    "shape",  # Shape/Size: reading the channel dimension freezes it
)


@dataclasses.dataclass(frozen=True)
class ChannelRule:
    """How one op moves channel indices from its inputs to its outputs.

    Attributes:
        kind: one of :data:`CHANNEL_RULE_KINDS`.
        params: ("passthrough") inputs holding one entry per channel of the data's axis 1 along
            their axis 0 (BatchNormalization scale/bias/mean/var, InstanceNormalization scale/bias).
        broadcast_params: ("passthrough") inputs broadcast against the data input (numpy rules),
            e.g. LayerNormalization scale/bias.
        leading_axes: ("passthrough") only the first ``leading_axes`` axes keep their indices
            (pools keep N and C, the spatial axes change size); ``None``: every axis.
        mixes: ("passthrough") function ``(node, rank) -> axes`` over which the op combines
            values (Softmax, LayerNormalization, LRN): a channel axis among them is frozen.
        outputs: outputs that carry input 0's channels; other outputs must be unused.
        inputs_from: where the control values (axes, split sizes, shape, pads, starts, scales)
            come from: the index of the first such input, or ``None`` for attributes.
        always_freeze: ("shape") freeze every channel axis read (Size reads all of them).
    """

    kind: str
    params: tuple[int, ...] = ()
    broadcast_params: tuple[int, ...] = ()
    leading_axes: int | None = None
    mixes: Callable[[ir.Node, int], Iterable[int]] | None = None
    outputs: tuple[int, ...] = (0,)
    inputs_from: int | None = None
    always_freeze: bool = False

    def __post_init__(self) -> None:
        if self.kind not in CHANNEL_RULE_KINDS:
            raise ValueError(f"unknown channel rule kind {self.kind!r}")


def _axis_attr(node: ir.Node, default: int, rank: int) -> int:
    axis = node.attributes.get_int("axis", default)
    return axis + rank if axis < 0 else axis


def _mixes_axis(default: int) -> Callable[[ir.Node, int], Iterable[int]]:
    """The op combines values along its ``axis`` attribute only (Softmax since opset 13)."""
    return lambda node, rank: (_axis_attr(node, default, rank),)


def _mixes_axis_to_end(default: int) -> Callable[[ir.Node, int], Iterable[int]]:
    """The op combines values over axes ``axis..rank-1`` (Softmax < 13, LayerNormalization)."""
    return lambda node, rank: range(_axis_attr(node, default, rank), rank)


def _mixes_axes_attr(default: tuple[int, ...]) -> Callable[[ir.Node, int], Iterable[int]]:
    """The op combines values over its ``axes`` attribute (MeanVarianceNormalization)."""

    def mixes(node: ir.Node, rank: int) -> Iterable[int]:
        attr = node.attributes.get("axes")
        axes = default if attr is None else tuple(attr.as_ints())
        return tuple(a + rank if a < 0 else a for a in axes)

    return mixes


CHANNEL_RULES: OpTable[ChannelRule] = OpTable("channel rules")
CHANNEL_RULES.register(("Conv", "ConvTranspose", "Gemm", "MatMul"), ChannelRule("linear"))
CHANNEL_RULES.register(
    (
        "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
        "Softplus", "Softsign", "Gelu", "Erf", "Mish", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt",
        "Identity", "Cast", "ThresholdedRelu", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
        "Sin", "Cos", "Not", "IsNaN", "IsInf", "Shrink",
    ),
    ChannelRule("passthrough"),
)
CHANNEL_RULES.register("Dropout", ChannelRule("passthrough", outputs=(0, 1)))
CHANNEL_RULES.register("BatchNormalization", ChannelRule("passthrough", params=(1, 2, 3, 4)), since=9)
CHANNEL_RULES.register("InstanceNormalization", ChannelRule("passthrough", params=(1, 2)))
CHANNEL_RULES.register(
    ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"),
    ChannelRule("passthrough", leading_axes=2),
)
CHANNEL_RULES.register(
    ("Softmax", "LogSoftmax", "Hardmax"),
    ChannelRule("passthrough", mixes=_mixes_axis_to_end(1)),
    until=12,
)
CHANNEL_RULES.register(
    ("Softmax", "LogSoftmax", "Hardmax"), ChannelRule("passthrough", mixes=_mixes_axis(-1)), since=13
)
CHANNEL_RULES.register(
    "LayerNormalization",
    ChannelRule("passthrough", broadcast_params=(1, 2), mixes=_mixes_axis_to_end(-1)),
    since=17,
)
CHANNEL_RULES.register("LRN", ChannelRule("passthrough", mixes=lambda node, rank: (1,)))
CHANNEL_RULES.register(
    "GroupNormalization", ChannelRule("passthrough", mixes=lambda node, rank: (1,)), since=18
)
CHANNEL_RULES.register(
    "MeanVarianceNormalization", ChannelRule("passthrough", mixes=_mixes_axes_attr((0, 2, 3)))
)
CHANNEL_RULES.register(
    (
        "Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Equal", "Less", "Greater", "And", "Or",
        "Xor",
    ),
    ChannelRule("elementwise"),
    since=7,
)
CHANNEL_RULES.register(("Max", "Min", "Sum", "Mean"), ChannelRule("elementwise"), since=8)
CHANNEL_RULES.register("Where", ChannelRule("elementwise"), since=9)
CHANNEL_RULES.register("Mod", ChannelRule("elementwise"), since=10)
CHANNEL_RULES.register(("LessOrEqual", "GreaterOrEqual"), ChannelRule("elementwise"), since=12)
CHANNEL_RULES.register("Concat", ChannelRule("concat"), since=4)
CHANNEL_RULES.register("Split", ChannelRule("split"), since=2, until=12)
CHANNEL_RULES.register("Split", ChannelRule("split", inputs_from=1), since=13)
CHANNEL_RULES.register("Slice", ChannelRule("slice"), until=9)
CHANNEL_RULES.register("Slice", ChannelRule("slice", inputs_from=1), since=10)
CHANNEL_RULES.register("Transpose", ChannelRule("transpose"))
CHANNEL_RULES.register("Flatten", ChannelRule("flatten"))
CHANNEL_RULES.register("Reshape", ChannelRule("reshape", inputs_from=1), since=5)
CHANNEL_RULES.register("Squeeze", ChannelRule("squeeze"), until=12)
CHANNEL_RULES.register("Squeeze", ChannelRule("squeeze", inputs_from=1), since=13)
CHANNEL_RULES.register("Unsqueeze", ChannelRule("unsqueeze"), until=12)
CHANNEL_RULES.register("Unsqueeze", ChannelRule("unsqueeze", inputs_from=1), since=13)
_REDUCE_OPS = (
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)
CHANNEL_RULES.register(_REDUCE_OPS, ChannelRule("reduce"), until=17)
CHANNEL_RULES.register(_REDUCE_OPS, ChannelRule("reduce", inputs_from=1), since=18)
CHANNEL_RULES.register("ReduceSum", ChannelRule("reduce"), until=12)
CHANNEL_RULES.register("ReduceSum", ChannelRule("reduce", inputs_from=1), since=13)
CHANNEL_RULES.register("Pad", ChannelRule("pad"), since=2, until=10)
CHANNEL_RULES.register("Pad", ChannelRule("pad", inputs_from=1), since=11)
CHANNEL_RULES.register("Resize", ChannelRule("resize", inputs_from=1), since=10, until=10)
CHANNEL_RULES.register("Resize", ChannelRule("resize", inputs_from=2), since=11)
CHANNEL_RULES.register("Shape", ChannelRule("shape"))
CHANNEL_RULES.register("Size", ChannelRule("shape", always_freeze=True))

__all__ += ["ChannelRule", "CHANNEL_RULES", "CHANNEL_RULE_KINDS"]


@dataclasses.dataclass(frozen=True)
class AttributeDefault:
    """The value an attribute takes when it is absent, per the ONNX specification.

    ``per_axis``: a list attribute (strides, pads, dilations) whose default is ``value`` on every
    axis, whatever the number of axes.
    """

    value: int | float | str
    per_axis: bool = False

    def matches(self, value: object) -> bool:
        if self.per_axis:
            return isinstance(value, (list, tuple)) and all(v == self.value for v in value)
        return not isinstance(value, (list, tuple)) and type(value) is type(self.value) and value == self.value


_ONES, _ZEROS = AttributeDefault(1, per_axis=True), AttributeDefault(0, per_axis=True)
_WINDOW = {"auto_pad": AttributeDefault("NOTSET"), "strides": _ONES, "pads": _ZEROS, "dilations": _ONES}

#: Attribute defaults per op (only attributes whose default is a plain value; required attributes
#: and defaults that depend on the input, such as Transpose's ``perm``, are not listed).
ATTRIBUTE_DEFAULTS: OpTable[dict[str, AttributeDefault]] = OpTable("attribute defaults")
ATTRIBUTE_DEFAULTS.register("Conv", {**_WINDOW, "group": AttributeDefault(1)})
ATTRIBUTE_DEFAULTS.register("ConvTranspose", {**_WINDOW, "group": AttributeDefault(1), "output_padding": _ZEROS})
ATTRIBUTE_DEFAULTS.register("MaxPool", {**_WINDOW, "ceil_mode": AttributeDefault(0), "storage_order": AttributeDefault(0)})
ATTRIBUTE_DEFAULTS.register("AveragePool", {**_WINDOW, "ceil_mode": AttributeDefault(0),
                                            "count_include_pad": AttributeDefault(0)})
ATTRIBUTE_DEFAULTS.register("Gemm", {"alpha": AttributeDefault(1.0), "beta": AttributeDefault(1.0),
                                     "transA": AttributeDefault(0), "transB": AttributeDefault(0)})
ATTRIBUTE_DEFAULTS.register("Gather", {"axis": AttributeDefault(0)})
ATTRIBUTE_DEFAULTS.register("Flatten", {"axis": AttributeDefault(1)})
ATTRIBUTE_DEFAULTS.register(("Softmax", "LogSoftmax"), {"axis": AttributeDefault(1)}, until=12)
ATTRIBUTE_DEFAULTS.register(("Softmax", "LogSoftmax"), {"axis": AttributeDefault(-1)}, since=13)

__all__ += ["AttributeDefault", "ATTRIBUTE_DEFAULTS"]


@dataclasses.dataclass(frozen=True)
class ShapeDerived:
    """An attribute the specification infers, when absent, from the static shape of an input:
    ``shape(inputs[input_index])[start:]`` (a Conv's ``kernel_shape`` is its weight's spatial dims)."""

    input_index: int
    start: int


#: Attributes that may be dropped when they equal what their op infers from an input's shape.
INFERABLE_ATTRIBUTES: OpTable[dict[str, ShapeDerived]] = OpTable("attributes inferred from input shapes")
INFERABLE_ATTRIBUTES.register(("Conv", "ConvTranspose"), {"kernel_shape": ShapeDerived(1, 2)})

__all__ += ["ShapeDerived", "INFERABLE_ATTRIBUTES"]


# --------------------------------------------------------------------------------------------
# Compute ops: what counts as "float compute left" after quantization (onnxcomp.quant.verify reads
# onnxruntime's optimized graph with this table). An op whose row has ``constant_input`` is
# compute only when that input is a constant (Gather from an embedding table is a weight lookup;
# Gather from an activation is data movement).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ComputeOp:
    """A compute op (it reads weights or does the model's arithmetic); see the table below."""

    constant_input: int | None = None


COMPUTE_OPS: OpTable[ComputeOp] = OpTable("compute ops")
COMPUTE_OPS.register(("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Einsum"), ComputeOp())
COMPUTE_OPS.register("Attention", ComputeOp(), since=23)
COMPUTE_OPS.register(("Gather", "GatherElements", "GatherND"), ComputeOp(constant_input=0))
COMPUTE_OPS.register(
    ("FusedConv", "FusedMatMul", "FusedGemm", "NhwcFusedConv", "Attention", "MultiHeadAttention",
     "GroupQueryAttention", "EmbedLayerNormalization"),
    ComputeOp(),
    domain="com.microsoft",
)
# onnxruntime's layout transformers move convolutions into their own domains (NCHWc blocked layout
# on x86 CPUs, NHWC for some providers).
COMPUTE_OPS.register("Conv", ComputeOp(), domain="com.microsoft.nchwc")
COMPUTE_OPS.register(("Conv", "ConvTranspose"), ComputeOp(), domain="com.ms.internal.nhwc")

# --------------------------------------------------------------------------------------------
# Weights apart from quantization parameters (onnxcomp.summary.weight_counts): which constant
# inputs of quantized ops are scales / zero points, and which hold a weight in a packed layout
# whose element count is not the tensor's (MatMulNBits packs two int4 codes per uint8).
# --------------------------------------------------------------------------------------------

#: Input indices that hold quantization parameters (scales, zero points, group indices).
QUANT_PARAM_INPUTS: OpTable[tuple[int, ...]] = OpTable("quantization parameter inputs")
QUANT_PARAM_INPUTS.register(("QuantizeLinear", "DequantizeLinear"), (1, 2))
QUANT_PARAM_INPUTS.register(("MatMulInteger", "ConvInteger"), (2, 3))
QUANT_PARAM_INPUTS.register(("QLinearConv", "QLinearMatMul"), (1, 2, 4, 5, 6, 7))
QUANT_PARAM_INPUTS.register("MatMulNBits", (2, 3, 4), domain="com.microsoft")
QUANT_PARAM_INPUTS.register("MatMulIntegerToFloat", (2, 3, 4, 5), domain="com.microsoft")
QUANT_PARAM_INPUTS.register("DynamicQuantizeMatMul", (2, 3), domain="com.microsoft")


def _nbits_weight_elements(node: ir.Node) -> int:
    return node.attributes.get_int("N", 0) * node.attributes.get_int("K", 0)


#: Integer weight inputs of quantized ops: input index -> its element count as a function of the
#: node (None: the tensor's own size).
QUANTIZED_WEIGHT_INPUTS: OpTable[dict[int, Callable[[ir.Node], int] | None]] = OpTable("quantized weight inputs")
QUANTIZED_WEIGHT_INPUTS.register(("MatMulInteger", "ConvInteger"), {1: None})
QUANTIZED_WEIGHT_INPUTS.register(("QLinearConv", "QLinearMatMul"), {3: None})
QUANTIZED_WEIGHT_INPUTS.register("MatMulNBits", {1: _nbits_weight_elements}, domain="com.microsoft")

#: Outputs that are quantization scales computed at run time; a constant multiplied with one
#: (dynamic quantization's ``x_scale * w_scale``) is a quantization parameter too.
QUANT_SCALE_OUTPUTS: OpTable[tuple[int, ...]] = OpTable("quantization scale outputs")
QUANT_SCALE_OUTPUTS.register("DynamicQuantizeLinear", (1,), since=11)

__all__ += ["ComputeOp", "COMPUTE_OPS", "QUANT_PARAM_INPUTS", "QUANTIZED_WEIGHT_INPUTS", "QUANT_SCALE_OUTPUTS"]
#: Elements of a node's output known from its constant inputs when no shape is annotated (a model
#: loaded from a file: a decoded weight's size, onnxcomp.summary): ``rule(node, output_index,
#: constant, elements)``, ``constant(i)`` the array of input i (None if not constant) and
#: ``elements(i)`` its element count; None where it cannot tell.
OUTPUT_ELEMENTS: OpTable[Callable[..., int | None]] = OpTable("output elements from constant inputs")


def _reshape_elements(node: ir.Node, index: int, constant, elements) -> int | None:
    shape = constant(1)
    if shape is None or shape.size == 0 or (shape <= 0).any():  # 0 copies and -1 infers a dimension
        return None
    return int(shape.astype("int64").prod())


def _split_elements(node: ir.Node, index: int, constant, elements) -> int | None:
    total = elements(0)
    if total is None:
        return None
    sizes = constant(1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is None and "split" in node.attributes:  # opset < 13
        sizes = node.attributes["split"].as_ints()
    if sizes is None:  # equal parts
        return total // len(node.outputs)
    sizes = [int(v) for v in sizes]
    return total * sizes[index] // sum(sizes) if sum(sizes) else None


OUTPUT_ELEMENTS.register("Reshape", _reshape_elements, since=5)
OUTPUT_ELEMENTS.register("Split", _split_elements)

__all__ += ["OUTPUT_ELEMENTS"]

#: Inputs of the ops that decode a stored weight inside an all-constant chain (onnxcomp.summary):
#: ``codebook``, a Gather's table (codebook entries: quantization parameters, like what scales
#: them); ``index``, the labels that pick the entries (stored weight data, and their plumbing);
#: ``packed``, a bit stream the labels are unpacked from by shifting (clustering's sparse format).
DECODE_INPUT_ROLES: OpTable[dict[int, str]] = OpTable("weight decoding inputs")
DECODE_INPUT_ROLES.register("Gather", {0: "codebook", 1: "index"})
DECODE_INPUT_ROLES.register("BitShift", {0: "packed"}, since=11)

__all__ += ["DECODE_INPUT_ROLES"]
#: Inputs of recurrent ops that hold weights (W, R, B; constant in a trained model): cleanup folds
#: the constant subgraphs that compute them whatever their size, and onnxcomp.quant.recurrent
#: quantizes W and R.
RECURRENT_WEIGHT_INPUTS: OpTable[tuple[int, ...]] = OpTable("recurrent weight inputs")
RECURRENT_WEIGHT_INPUTS.register(("LSTM", "GRU", "RNN"), (1, 2, 3), since=7)



@dataclasses.dataclass(frozen=True)
class RecurrentInt8:
    """How int8 reaches a recurrent op's weights ``W [dirs, gates*H, I]`` and ``R [dirs, gates*H, H]``
    (onnxcomp.quant.recurrent).

    ``kernel``: an onnxruntime contrib op (``com.microsoft``) taking the op's own inputs with W and
    R as int8, transposed (``[dirs, I, gates*H]``, ``[dirs, H, gates*H]``), and their scales and zero
    points appended after the op's last input (``kernel_params_at``); it quantizes the activations at
    run time. ``kernel_layouts``: the ``layout`` attribute values the kernel accepts. Where there is
    no kernel, or it cannot take the node, W and R are stored int8 (one scale per gate row and
    direction) behind a DequantizeLinear and the op runs in float (weight-only).
    """

    weights: tuple[tuple[int, str], ...] = ((1, "W"), (2, "R"))
    kernel: str | None = None
    kernel_params_at: int = 8
    kernel_layouts: tuple[int, ...] = (0,)


RECURRENT_INT8: OpTable[RecurrentInt8] = OpTable("recurrent int8")
RECURRENT_INT8.register("LSTM", RecurrentInt8(kernel="DynamicQuantizeLSTM"), since=7)
RECURRENT_INT8.register(("GRU", "RNN"), RecurrentInt8(), since=7)

# onnxruntime's int8 LSTM: W and R int8 (inputs 1, 2), their scales and zero points 8..11.
QUANT_PARAM_INPUTS.register("DynamicQuantizeLSTM", (8, 9, 10, 11), domain="com.microsoft")
QUANTIZED_WEIGHT_INPUTS.register("DynamicQuantizeLSTM", {1: None, 2: None}, domain="com.microsoft")

__all__ += ["RECURRENT_WEIGHT_INPUTS", "RecurrentInt8", "RECURRENT_INT8"]


def _weight_shape(node: ir.Node, index: int) -> tuple[int, ...] | None:
    value = node.inputs[index] if len(node.inputs) > index else None
    tensor = value.const_value if value is not None else None
    return None if tensor is None else tuple(int(d) for d in tensor.shape)


def _matmul_depth(node: ir.Node) -> int | None:
    shape = _weight_shape(node, 1)
    return shape[-2] if shape is not None and len(shape) >= 2 else None


def _gemm_depth(node: ir.Node) -> int | None:
    shape = _weight_shape(node, 1)
    if shape is None or len(shape) != 2 or node.attributes.get_int("transA", 0):
        return None
    return shape[1] if node.attributes.get_int("transB", 0) else shape[0]


def _recurrent_depth(node: ir.Node) -> int | None:
    shape = _weight_shape(node, 1)  # W: [num_directions, gates * hidden, input_size]
    return shape[2] if shape is not None and len(shape) == 3 else None


#: The size the last axis of an op's data input (input 0) must have, read from its constant weight
#: (None: not constant, or another layout): what generated inputs give a free feature axis that
#: the model reads directly (madmom's ``[T, F]`` into a GRU, ``data.weight_fixed_dims``).
FEATURE_DEPTH: OpTable[Callable[[ir.Node], int | None]] = OpTable("feature depth")
FEATURE_DEPTH.register("MatMul", _matmul_depth)
FEATURE_DEPTH.register("Gemm", _gemm_depth)
FEATURE_DEPTH.register(("LSTM", "GRU", "RNN"), _recurrent_depth, since=7)
#: Ops that only add (+1) or drop (-1) axes of size 1 (``axes``: attribute, or input 1 from opset
#: 13): the last axis of what they read stays the last of what they write unless ``axes`` names it.
AXIS_EDITS = {"Unsqueeze": 1, "Squeeze": -1}


def axis_edit(node: ir.Node) -> int | None:
    """+1 for an ai.onnx Unsqueeze, -1 for a Squeeze (:data:`AXIS_EDITS`), None for any other node."""
    return AXIS_EDITS.get(node.op_type) if is_default_domain(node.domain) else None


__all__ += ["FEATURE_DEPTH", "AXIS_EDITS", "axis_edit"]

#: Op types of onnxruntime's optimized graph that convert between float and integers: the
#: overhead static quantization adds around each int8 kernel (memory-bound, little to split
#: between threads), and, where a DequantizeLinear feeds float compute, an unfused Q/DQ pair.
QDQ_CONVERSION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})

#: onnxruntime's int8 kernels -> the float op type each replaces (to compare their time).
INT8_KERNEL_FLOAT_OPS: dict[str, str] = {
    "QLinearConv": "Conv", "NhwcQLinearConv": "Conv", "ConvInteger": "Conv", "QLinearConvTranspose": "ConvTranspose",
    "QLinearMatMul": "MatMul", "MatMulInteger": "MatMul", "MatMulIntegerToFloat": "MatMul",
    "DynamicQuantizeMatMul": "MatMul", "MatMulNBits": "MatMul", "QGemm": "Gemm", "QAttention": "Attention",
    "QLinearAdd": "Add", "QLinearMul": "Mul", "QLinearConcat": "Concat", "QLinearSigmoid": "Sigmoid",
    "QLinearLeakyRelu": "LeakyRelu", "QLinearSoftmax": "Softmax", "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearAveragePool": "AveragePool", "DynamicQuantizeLSTM": "LSTM",
}

#: A float op type -> the op types onnxruntime's optimized float graph runs it as (its fusions).
FLOAT_OP_FUSIONS: dict[str, tuple[str, ...]] = {
    "Conv": ("Conv", "FusedConv"), "MatMul": ("MatMul", "FusedMatMul"), "Gemm": ("Gemm", "FusedGemm"),
}

__all__ += ["QDQ_CONVERSION_OPS", "INT8_KERNEL_FLOAT_OPS", "FLOAT_OP_FUSIONS"]


# --------------------------------------------------------------------------------------------
# Global spatial pooling and gates (squeeze-and-excitation blocks, see
# onnxcomp.analysis.excitation): which ops reduce every spatial axis of NCHW-like data to one value per
# channel, and where a Reduce op reads its axes.
# --------------------------------------------------------------------------------------------

#: How an op pools its input 0 over the spatial axes: ``global`` (always every axis after the
#: channel axis), ``axes_attribute`` / ``axes_input`` (a Reduce op: over its ``axes``, given as an
#: attribute, or as input 1 from opset 18 on; pooled when they are every axis from 2 on and
#: ``keepdims`` is 1).
SPATIAL_POOLS: OpTable[str] = OpTable("global spatial pooling")
SPATIAL_POOLS.register(("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"), "global")
SPATIAL_POOLS.register(("ReduceMean", "ReduceMax"), "axes_attribute", until=17)
SPATIAL_POOLS.register(("ReduceMean", "ReduceMax"), "axes_input", since=18)

#: Ops that scale a feature map by a gate computed from it (``x * sigmoid(f(pool(x)))``).
GATE_OPS: OpTable[bool] = OpTable("gates")
GATE_OPS.register("Mul", True)


def pools_spatial_axes(node: ir.Node, model: ir.Model) -> bool:
    """Whether ``node`` reduces every spatial axis of its NCHW-like input 0 to size 1, keeping the
    rank (:data:`SPATIAL_POOLS`): its output holds one value per channel (and sample)."""
    how = SPATIAL_POOLS.lookup(node, model)
    if how is None or not node.inputs or node.inputs[0] is None:
        return False
    if how == "global":
        return True
    keepdims = node.attributes.get("keepdims")
    if keepdims is not None and keepdims.as_int() != 1:
        return False
    if how == "axes_attribute":
        attr = node.attributes.get("axes")
        axes = list(attr.as_ints()) if attr is not None else None
    else:
        given = node.inputs[1] if len(node.inputs) > 1 else None
        axes = [int(a) for a in given.const_value.numpy().reshape(-1)] if given is not None and \
            given.const_value is not None else None
    shape = node.inputs[0].shape
    rank = len(shape) if shape is not None else 4  # unknown: taken as NCHW, the only layout pooled so
    if not axes or rank < 3:
        return False
    return sorted(a % rank for a in axes) == list(range(2, rank))


def is_gate_node(node: ir.Node, model: ir.Model) -> bool:
    """Whether ``node`` can apply a gate to a feature map (:data:`GATE_OPS`)."""
    return bool(GATE_OPS.lookup(node, model))


__all__ += ["SPATIAL_POOLS", "GATE_OPS", "pools_spatial_axes", "is_gate_node"]
