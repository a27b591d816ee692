"""Declarative knowledge about ONNX operators, keyed by (domain, op type, opset range).

Passes ask this module what an op *is* instead of testing op types in if-chains:

* :class:`OpTable` is a generic registry: ``table.register("Conv", fact, since=1)`` and
  ``table.lookup(node, model)`` picks the entry whose opset range covers the node's domain opset.
  Every pass family keeps its own table of its own fact type (quantization placement, pruning
  channel rules, ...) built on this class, so a new op or a new opset is one table row.
* :data:`LINEAR_OPS` is the shared core table: which inputs of Conv, ConvTranspose, Gemm and
  MatMul are weights or biases, and along which axis their output and input channels run (some
  axes depend on attributes, e.g. Gemm's ``transB``; those are small functions of the node).
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
    "CHANNELWISE_OPS",
    "node_opset",
    "is_default_domain",
]

T = TypeVar("T")

_DEFAULT_DOMAINS = ("", "ai.onnx")


def is_default_domain(domain: str) -> bool:
    return domain in _DEFAULT_DOMAINS


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
    -1 for Gemm/MatMul). ``grouped`` ops read the ``group`` attribute.
    """

    data_input: int
    roles: tuple[WeightRole, ...]
    data_channel_axis: int
    grouped: bool = False

    def role(self, kind: str) -> WeightRole | None:
        for r in self.roles:
            if r.kind == kind:
                return r
        return None


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _gemm_b_out(node: ir.Node) -> int:
    return 0 if _attr_int(node, "transB", 0) else 1


def _gemm_b_in(node: ir.Node) -> int:
    return 1 if _attr_int(node, "transB", 0) else 0


LINEAR_OPS: OpTable[LinearOpSpec] = OpTable("linear ops")
LINEAR_OPS.register(
    "Conv",
    LinearOpSpec(
        data_input=0,
        roles=(WeightRole(1, "weight", out_axis=0, in_axis=1), WeightRole(2, "bias", out_axis=0)),
        data_channel_axis=1,
        grouped=True,
    ),
)
LINEAR_OPS.register(
    "ConvTranspose",
    LinearOpSpec(
        data_input=0,
        roles=(WeightRole(1, "weight", out_axis=1, in_axis=0), WeightRole(2, "bias", out_axis=0)),
        data_channel_axis=1,
        grouped=True,
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
