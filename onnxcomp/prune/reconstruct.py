r"""Reconstruction after structured pruning: refit consumer layers by ridge least squares.

After channels are cut, each consumer layer sees fewer input channels. Reconstruction (a.k.a.
post-training feature distillation) refits the remaining weights and bias of each consumer so that
its output on calibration data matches the *unpruned* model's output of the same node.

Layer by layer, in topological order, for a linear layer :math:`y = W x + b`:

* :math:`X` (:math:`n \times k`) holds the layer's inputs in the **current pruned model** (with the
  earlier layers already refitted, so errors do not accumulate along the chain);
* :math:`Y` (:math:`n \times m`) holds the **reference** (unpruned) model's output of the same node,
  restricted to the output channels that remain (``kept_outputs``, for a consumer whose own output
  channels were cut as the producer of another group).

With :math:`\tilde X = [X, \mathbf 1]` (a ones column for the bias) the refit solves

.. math:: (\tilde X^\top \tilde X + \lambda D)\,\tilde W^\top = \tilde X^\top Y,\qquad
          \tilde W = [W, b],\quad D = \mathrm{diag}(1, \dots, 1, 0),\quad
          \lambda = \texttt{ridge}\cdot\operatorname{tr}(X^\top X)/k

(relative ridge: scale-free; the bias is not regularized). Only :math:`G = \tilde X^\top\tilde X`
(:math:`(k+1)^2`), :math:`C = \tilde X^\top Y` (:math:`(k+1) \times m`) and :math:`\|Y\|^2` are
accumulated, streaming over the calibration feeds in float64: memory is bounded by one feed's
activations plus these matrices, never by the number of rows. The error of any weights on the rows
used follows from the same sums, :math:`\|\tilde X \tilde W^\top - Y\|^2 = \operatorname{tr}(\tilde W G
\tilde W^\top) - 2\operatorname{tr}(\tilde W C) + \|Y\|^2`, so ``error_before`` (the current weights)
and ``error_after`` (the refit) need no second pass. They are relative MSEs
:math:`\|\hat Y - Y\|^2 / \|Y\|^2`. A refit that is not better on those rows (possible only with a
large ridge) is discarded and the layer keeps its weights.

Layouts
-------
* **Conv** (1-D/2-D/3-D, explicit ``pads`` or ``auto_pad``, ``strides``, ``dilations``, ``group``
  incl. depthwise): the input is zero-padded and cut into patches with numpy stride tricks
  (:func:`conv_patches`); a row is one (image, output position) pair and its features are the
  ``c_in/g * prod(kernel)`` values of one group, in the order of the flattened weight
  ``W[m, c_in/g, *kernel]``. Each group is an independent least-squares problem (batched).
  A Conv without bias gets one.
* **Gemm** (``transA=0``; any ``transB``, ``alpha``, ``beta``; ``C`` absent or constant and
  per-output): the effective weight is ``alpha * B`` in ``[m, k]`` layout and the bias
  ``beta * C``; the refit is written back in the node's own layout (``C`` as ``[m]``, ``beta=1``).
* **MatMul** with a constant 2-D weight ``[k, m]``: rows are all leading positions flattened. A
  MatMul has no bias slot; when its only consumer is an ``Add`` of a per-output constant, that
  constant is its bias: an ``Add`` that the reference lacks (the one the cut pass inserts to fold
  removed channels' means) is fitted with the MatMul's reference output as the target; an ``Add``
  the reference also has is fitted with the reference ``Add``'s output as the target. Otherwise the
  weight is fitted without bias.

Row sampling
------------
At most ``max_rows`` rows per layer are used over the whole data set: the budget is spread over
the feeds (feed ``f`` of ``F`` gets ``remaining // (F - f)``), and a feed with more positions
than its share keeps a uniformly drawn subset from a generator seeded by the feed index, so the
choice is deterministic. Patches are gathered in chunks of bounded size.

The reference model is never modified; the pruned model is modified in place: each refitted
layer gets new initializers (existing tensors are never written into; an initializer left unused
is removed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import add_initializer, all_value_names, exposed
from onnxcomp.ops import weight_axes
from onnxcomp.runtime import create_session, session_options

__all__ = ["LayerFit", "ConvGeometry", "conv_patches", "reconstruct"]

#: Seed of the row subsampling (combined with the feed index).
ROW_SEED = 20240611
#: Features x rows gathered at once (float64 elements) when building patches.
CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass
class LayerFit:
    """What the refit did to one layer.

    ``error_before`` / ``error_after``: relative MSE ``||Y_hat - Y||^2 / ||Y||^2`` of the node's
    output against the reference on the calibration rows used (``samples`` rows), with the weights
    before and after. ``status``: ``refit`` (new weights written), ``kept`` (the refit was not
    better; old weights kept, ``error_after == error_before``) or ``skipped`` (unsupported layout,
    see ``reason``; errors are NaN, ``samples`` 0).
    """

    node: str
    op_type: str
    samples: int
    error_before: float
    error_after: float
    status: str = "refit"
    reason: str = ""


# ------------------------------------------------------------------------------------------------
# Convolution geometry and im2col
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Where each output position of a convolution reads its input (after padding).

    ``auto_pad`` is kept as given; explicit pads are ``pads_begin``/``pads_end``. Use
    :meth:`padding` to resolve ``SAME_*`` for an input's spatial size.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    group: int = 1
    auto_pad: str = "NOTSET"

    @classmethod
    def from_node(cls, node: ir.Node, weight_shape: Sequence[int]) -> ConvGeometry:
        kernel = tuple(int(d) for d in weight_shape[2:])
        d = len(kernel)
        pads = tuple(node.attributes.get_ints("pads", (0,) * (2 * d)))
        if len(pads) != 2 * d:
            raise OnnxcompError(f"reconstruct: Conv {node.name!r} has {len(pads)} pads for {d} spatial axes")
        return cls(
            kernel=kernel,
            strides=tuple(node.attributes.get_ints("strides", (1,) * d)),
            dilations=tuple(node.attributes.get_ints("dilations", (1,) * d)),
            pads_begin=pads[:d],
            pads_end=pads[d:],
            group=node.attributes.get_int("group", 1),
            auto_pad=node.attributes.get_string("auto_pad", "NOTSET"),
        )

    @property
    def extent(self) -> tuple[int, ...]:
        """Span of the dilated kernel along each spatial axis."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))

    def padding(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(begin, end) pads for an input of spatial size ``spatial`` (resolves ``SAME_*``)."""
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, s, e in zip(spatial, self.strides, self.extent):
                out = -(-size // s)
                total = max(0, (out - 1) * s + e - size)
                small = total // 2
                head = small if self.auto_pad == "SAME_UPPER" else total - small
                begin.append(head)
                end.append(total - head)
            return tuple(begin), tuple(end)
        if self.auto_pad == "VALID":
            zeros = (0,) * len(self.kernel)
            return zeros, zeros
        return self.pads_begin, self.pads_end

    def output_spatial(self, spatial: Sequence[int]) -> tuple[int, ...]:
        begin, end = self.padding(spatial)
        return tuple(
            (size + b + e - ext) // s + 1
            for size, b, e, ext, s in zip(spatial, begin, end, self.extent, self.strides)
        )


def conv_patches(
    x: np.ndarray, geometry: ConvGeometry, rows: np.ndarray | None = None, dtype=np.float64
) -> np.ndarray:
    """im2col: the input patches of a convolution, ``[rows, group, c_in/group * prod(kernel)]``.

    Args:
        x: the Conv input ``[N, C, *spatial]``.
        geometry: kernel, strides, dilations, pads and group of the Conv.
        rows: flat indices into the ``(N, *output_spatial)`` positions (row-major); ``None``: all.

    Row ``r``'s features for group ``g`` dotted with the flattened weight rows of that group
    (``W[g*m_g:(g+1)*m_g].reshape(m_g, -1)``) give the Conv output (without bias) at that position.
    """
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    d = len(geometry.kernel)
    if len(spatial) != d:
        raise ValueError(f"input has {len(spatial)} spatial axes, the kernel {d}")
    if c % geometry.group:
        raise ValueError(f"{c} input channels are not divisible by group {geometry.group}")
    begin, end = geometry.padding(spatial)
    if any(begin) or any(end):
        x = np.pad(x, [(0, 0), (0, 0), *zip(begin, end)])
    out = geometry.output_spatial(spatial)
    if any(o <= 0 for o in out):
        raise ValueError(f"convolution output would be empty (input {list(spatial)}, output {list(out)})")
    view = np.lib.stride_tricks.sliding_window_view(x, geometry.extent, axis=tuple(range(2, 2 + d)))
    # view: [N, C, *full_positions, *extent] -> keep strided positions and dilated taps.
    index = (
        slice(None),
        slice(None),
        *(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, geometry.strides)),
        *(slice(None, None, dl) for dl in geometry.dilations),
    )
    view = view[index]
    if rows is None:
        rows = np.arange(n * math.prod(out))
    idx = np.unravel_index(np.asarray(rows, dtype=np.int64), (n, *out))
    patches = view[(idx[0], slice(None), *idx[1:])]  # [rows, C, *kernel]
    per_group = (c // geometry.group) * math.prod(geometry.kernel)
    return np.asarray(patches, dtype=dtype).reshape(len(rows), geometry.group, per_group)


# ------------------------------------------------------------------------------------------------
# Layers: how to read rows, targets and weights of one node
# ------------------------------------------------------------------------------------------------


class _Skip(Exception):
    """The layer's layout is not supported: it is reported and left as is."""


class _Layer:
    """One node to refit: its input/target tensor names and its weights as ``[g, k+1, m_g]``."""

    node: ir.Node
    x_name: str  # input of the node in the pruned model
    y_name: str  # target tensor in the reference model
    groups: int
    fit_bias: bool

    def positions(self, x: np.ndarray) -> int:
        raise NotImplementedError

    def row_size(self, x: np.ndarray) -> int:
        """Input values gathered per row (bounds the chunk of rows built at once)."""
        raise NotImplementedError

    def check_target(self, x: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def features(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``[r, g, k]`` float64."""
        raise NotImplementedError

    def targets(self, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``[r, M_ref]`` float64 (all reference channels; selection is done by the caller)."""
        raise NotImplementedError

    def old_params(self) -> np.ndarray:
        """Current weights (and bias) as ``[g, k+1, m_g]``: ``x @ P[:, :k] + P[:, k]``."""
        raise NotImplementedError

    def write(self, params: np.ndarray, graph: ir.Graph, taken: set[str]) -> None:
        raise NotImplementedError

    @property
    def out_channels(self) -> int:
        raise NotImplementedError


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _replace_input(
    graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, base: str, taken: set[str]
) -> None:
    """Point ``node.inputs[index]`` at a new initializer holding ``array``; drop the old one if unused."""
    old = node.inputs[index] if index < len(node.inputs) else None
    fresh = add_initializer(graph, base, array, taken)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, fresh)
    if (
        old is not None
        and old.name in graph.initializers
        and graph.initializers[old.name] is old
        and not list(old.uses())
        and not old.is_graph_output()
        and not old.is_graph_input()
    ):
        del graph.initializers[old.name]


class _ConvLayer(_Layer):
    def __init__(self, node: ir.Node, ref_out: str) -> None:
        self.node = node
        self.x_name = node.inputs[0].name
        self.y_name = ref_out
        w = _const(node.inputs[1])
        self.weight = w
        self.geometry = ConvGeometry.from_node(node, w.shape)
        self.groups = self.geometry.group
        if w.shape[0] % self.groups:
            raise _Skip(f"{w.shape[0]} output channels are not divisible by group {self.groups}")
        self.fit_bias = True
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is None:
            raise _Skip("its bias is not a constant")
        self.bias = _const(bias)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def positions(self, x: np.ndarray) -> int:
        return x.shape[0] * math.prod(self.geometry.output_spatial(x.shape[2:]))

    def row_size(self, x: np.ndarray) -> int:
        return x.shape[1] * math.prod(self.geometry.kernel)

    def features(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if x.shape[1] != self.weight.shape[1] * self.groups:
            raise OnnxcompError(
                f"reconstruct: Conv {self.node.name!r} input has {x.shape[1]} channels, its weight "
                f"expects {self.weight.shape[1] * self.groups}"
            )
        return conv_patches(x, self.geometry, rows)

    def check_target(self, x: np.ndarray, y: np.ndarray) -> None:
        out = self.geometry.output_spatial(x.shape[2:])
        if tuple(y.shape[2:]) != out or y.shape[0] != x.shape[0]:
            raise OnnxcompError(
                f"reconstruct: Conv {self.node.name!r}: reference output shape {list(y.shape)} does "
                f"not match the pruned layer's positions {[x.shape[0], '*', *out]}"
            )

    def targets(self, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
        idx = np.unravel_index(rows, (y.shape[0], *y.shape[2:]))
        return np.asarray(y[(idx[0], slice(None), *idx[1:])], dtype=np.float64)

    def old_params(self) -> np.ndarray:
        g = self.groups
        m = self.weight.shape[0]
        w = self.weight.astype(np.float64).reshape(g, m // g, -1).transpose(0, 2, 1)  # [g, k, m_g]
        b = np.zeros(m) if self.bias is None else np.broadcast_to(self.bias.astype(np.float64), (m,))
        return np.concatenate([w, b.reshape(g, 1, m // g)], axis=1)

    def write(self, params: np.ndarray, graph: ir.Graph, taken: set[str]) -> None:
        g, _, mg = params.shape
        w = params[:, :-1, :].transpose(0, 2, 1).reshape(self.weight.shape).astype(self.weight.dtype)
        dtype = self.bias.dtype if self.bias is not None else self.weight.dtype
        b = params[:, -1, :].reshape(g * mg).astype(dtype)
        _replace_input(graph, self.node, 1, w, f"{self.node.inputs[1].name}_refit", taken)
        base = f"{self.node.inputs[2].name}_refit" if self.bias is not None else f"{self.node.name}_bias"
        _replace_input(graph, self.node, 2, b, base, taken)


class _DenseLayer(_Layer):
    """Gemm (transA=0) or MatMul with a constant 2-D weight; rows = leading positions."""

    def __init__(self, node: ir.Node, ref_out: str, bias_add: tuple[ir.Node, int] | None = None) -> None:
        self.node = node
        self.x_name = node.inputs[0].name
        self.y_name = ref_out
        self.groups = 1
        w = _const(node.inputs[1])
        if w.ndim != 2:
            raise _Skip(f"its weight has rank {w.ndim}, not 2")
        self.weight = w
        self.bias_add = bias_add
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                raise _Skip("Gemm with transA=1 is not supported")
            self.trans_b = bool(node.attributes.get_int("transB", 0))
            self.alpha = node.attributes.get_float("alpha", 1.0)
            self.beta = node.attributes.get_float("beta", 1.0)
            if self.alpha == 0.0:
                raise _Skip("Gemm with alpha=0")
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None and c.const_value is None:
                raise _Skip("its bias C is not a constant")
            self.bias = _const(c)
            m = self.out_channels
            if self.bias is not None and not (
                self.bias.size == 1 or (self.bias.size == m and self.bias.shape[-1] == m)
            ):
                raise _Skip(f"its bias C of shape {list(self.bias.shape)} is not one value per output")
            self.fit_bias = True
        else:
            self.trans_b = False
            self.alpha = 1.0
            self.beta = 1.0
            self.bias = None
            self.fit_bias = bias_add is not None
            if bias_add is not None:
                add, idx = bias_add
                self.bias = _const(add.inputs[idx])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] if self.trans_b else self.weight.shape[1]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] if self.trans_b else self.weight.shape[0]

    def positions(self, x: np.ndarray) -> int:
        return x.size // self.in_channels if x.ndim else 0

    def row_size(self, x: np.ndarray) -> int:
        return self.in_channels

    def features(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        k = self.in_channels
        if x.shape[-1] != k:
            raise OnnxcompError(
                f"reconstruct: {self.node.op_type} {self.node.name!r} input has {x.shape[-1]} features, "
                f"its weight expects {k}"
            )
        return np.asarray(x.reshape(-1, k)[rows], dtype=np.float64)[:, None, :]

    def check_target(self, x: np.ndarray, y: np.ndarray) -> None:
        if y.size // max(y.shape[-1], 1) != x.size // self.in_channels:
            raise OnnxcompError(
                f"reconstruct: {self.node.op_type} {self.node.name!r}: reference output shape "
                f"{list(y.shape)} does not match the pruned input shape {list(x.shape)}"
            )

    def targets(self, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.asarray(y.reshape(-1, y.shape[-1])[rows], dtype=np.float64)

    def old_params(self) -> np.ndarray:
        w = self.weight.astype(np.float64)
        w = (w.T if self.trans_b else w) * self.alpha  # [k, m]
        m = self.out_channels
        b = np.zeros(m) if self.bias is None else np.broadcast_to(
            self.bias.astype(np.float64).reshape(-1), (m,)
        ) * self.beta
        return np.concatenate([w, b[None, :]], axis=0)[None]

    def write(self, params: np.ndarray, graph: ir.Graph, taken: set[str]) -> None:
        p = params[0]
        w = p[:-1] / self.alpha  # [k, m]
        w = (w.T if self.trans_b else w).astype(self.weight.dtype)
        b = p[-1]
        name = self.node.name
        _replace_input(graph, self.node, 1, w, f"{self.node.inputs[1].name}_refit", taken)
        if self.node.op_type == "Gemm":
            dtype = self.bias.dtype if self.bias is not None else self.weight.dtype
            base = f"{self.node.inputs[2].name}_refit" if self.bias is not None else f"{name}_bias"
            _replace_input(graph, self.node, 2, b.astype(dtype), base, taken)
            self.node.attributes.pop("beta", None)  # C now holds the whole bias: beta = 1
        elif self.bias_add is not None:
            add, idx = self.bias_add
            old = add.inputs[idx]
            shape = self.bias.shape if self.bias is not None and self.bias.size == b.size else b.shape
            new_bias = b.astype(self.bias.dtype).reshape(shape)
            _replace_input(graph, add, idx, new_bias, f"{old.name}_refit", taken)


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------


def _nodes_by_name(model: ir.Model) -> dict[str, ir.Node]:
    return {n.name: n for n in model.graph if n.name}


def _per_output_constant(value: ir.Value | None, m: int) -> bool:
    arr = _const(value)
    if arr is None:
        return False
    return arr.size == 1 or (arr.size == m and arr.ndim >= 1 and arr.shape[-1] == m)


def _matmul_bias(
    node: ir.Node, m: int, reference: dict[str, ir.Node]
) -> tuple[tuple[ir.Node, int] | None, bool]:
    """The Add holding a MatMul's bias (node, constant input index), and whether the reference has it."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None, False
    add, idx = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, False
    other = 1 - idx
    if not _per_output_constant(add.inputs[other], m):
        return None, False
    ref_add = reference.get(add.name) if add.name else None
    if ref_add is None:
        return (add, other), False
    # The reference Add must consume the reference MatMul's output with the same constant role.
    ref_mm = reference[node.name]
    if (
        ref_add.op_type == "Add"
        and len(ref_add.inputs) == 2
        and ref_add.inputs[idx] is ref_mm.outputs[0]
        and _per_output_constant(ref_add.inputs[other], m)
    ):
        return (add, other), True
    return None, False


def _plan(node_name: str, pruned: dict[str, ir.Node], reference: dict[str, ir.Node]) -> _Layer:
    """The layer for ``node_name``; ValueError for refusals, _Skip for unsupported layouts."""
    node = pruned.get(node_name)
    if node is None:
        raise ValueError(f"reconstruct: node {node_name!r} is not in the pruned model")
    ref = reference.get(node_name)
    if ref is None:
        raise ValueError(f"reconstruct: node {node_name!r} is not in the reference model")
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        raise ValueError(
            f"reconstruct: node {node_name!r} is a {node.op_type}, not a linear layer (Conv, Gemm, MatMul)"
        )
    if ref.op_type != node.op_type:
        raise ValueError(
            f"reconstruct: node {node_name!r} is a {node.op_type} in the pruned model but a "
            f"{ref.op_type} in the reference"
        )
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        raise ValueError(f"reconstruct: node {node_name!r} lacks its data or weight input")
    if node.inputs[1].const_value is None:
        raise ValueError(
            f"reconstruct: node {node_name!r}: its weight {node.inputs[1].name!r} is not a constant "
            "(initializer), so it cannot be refitted"
        )
    if node.inputs[0].const_value is not None and not node.inputs[0].is_graph_input():
        raise ValueError(f"reconstruct: node {node_name!r}: its data input is a constant")
    if node.op_type == "ConvTranspose":
        raise _Skip("ConvTranspose is not supported")
    ref_out = ref.outputs[0].name
    if node.op_type == "Conv":
        return _ConvLayer(node, ref_out)
    if node.op_type == "Gemm":
        return _DenseLayer(node, ref_out)
    w = _const(node.inputs[1])
    if w.ndim != 2:
        raise _Skip(f"its weight has rank {w.ndim}, not 2")
    bias_add, in_reference = _matmul_bias(node, w.shape[1], reference)
    if in_reference:
        ref_out = reference[bias_add[0].name].outputs[0].name
    return _DenseLayer(node, ref_out, bias_add)


def _kept(
    layer: _Layer, name: str, ref_channels: int, kept_outputs: Mapping[str, np.ndarray]
) -> np.ndarray:
    m = layer.out_channels
    if name in kept_outputs:
        kept = np.asarray(kept_outputs[name], dtype=np.int64).reshape(-1)
        if kept.size != m:
            raise ValueError(
                f"reconstruct: kept_outputs[{name!r}] lists {kept.size} channels, the pruned node has {m}"
            )
        if kept.size and (kept.min() < 0 or kept.max() >= ref_channels):
            raise ValueError(
                f"reconstruct: kept_outputs[{name!r}] holds indices outside the reference's "
                f"{ref_channels} output channels"
            )
        return kept
    if m != ref_channels:
        raise _Skip(
            f"its output has {m} channels, the reference {ref_channels}, and kept_outputs does not "
            "say which remain"
        )
    return np.arange(m)


# ------------------------------------------------------------------------------------------------
# Streaming accumulation and solve
# ------------------------------------------------------------------------------------------------


def _row_quota(positions: int, remaining: int, feeds_left: int) -> int:
    return min(positions, remaining // max(feeds_left, 1))


def _choose_rows(positions: int, quota: int, feed_index: int) -> np.ndarray:
    """``quota`` sorted distinct row indices out of ``positions``, deterministic per feed."""
    if quota >= positions:
        return np.arange(positions)
    rng = np.random.default_rng([ROW_SEED, feed_index])
    return np.sort(rng.choice(positions, size=quota, replace=False))


class _Accumulator:
    def __init__(self, groups: int, k: int, mg: int) -> None:
        self.gram = np.zeros((groups, k + 1, k + 1))
        self.cross = np.zeros((groups, k + 1, mg))
        self.yy = 0.0
        self.rows = 0

    def update(self, feats: np.ndarray, targets: np.ndarray) -> None:
        """feats ``[r, g, k]``, targets ``[r, g, m_g]``."""
        r, g, _ = feats.shape
        aug = np.concatenate([feats, np.ones((r, g, 1))], axis=2).transpose(1, 0, 2)  # [g, r, k+1]
        t = targets.transpose(1, 0, 2)  # [g, r, m_g]
        self.gram += aug.transpose(0, 2, 1) @ aug
        self.cross += aug.transpose(0, 2, 1) @ t
        self.yy += float(np.sum(t * t))

    def error(self, params: np.ndarray) -> float:
        """Relative squared error of ``x @ P`` (P ``[g, k+1, m_g]``) on the accumulated rows."""
        quad = float(np.einsum("gim,gij,gjm->", params, self.gram, params))
        lin = float(np.einsum("gim,gim->", params, self.cross))
        err = max(quad - 2.0 * lin + self.yy, 0.0)
        if self.yy <= 0.0:
            return 0.0 if err <= 0.0 else math.inf
        return err / self.yy

    def solve(self, ridge: float, fit_bias: bool) -> np.ndarray:
        g, k1, mg = self.cross.shape
        k = k1 - 1
        n = k1 if fit_bias else k
        a = self.gram[:, :n, :n].copy()
        c = self.cross[:, :n, :]
        for i in range(g):
            trace = float(np.trace(self.gram[i, :k, :k]))
            lam = ridge * trace / max(k, 1)
            a[i, np.arange(k), np.arange(k)] += lam
        params = np.zeros((g, k1, mg))
        for i in range(g):
            try:
                sol = np.linalg.solve(a[i], c[i])
                if not np.all(np.isfinite(sol)):
                    raise np.linalg.LinAlgError("non-finite solution")
            except np.linalg.LinAlgError:
                sol = np.linalg.lstsq(a[i], c[i], rcond=None)[0]
            params[i, :n] = sol
        return params


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _count_feeds(data: Dataset) -> int:
    n = data.num_feeds
    if n is not None:
        return n
    return sum(1 for _ in data)


def _session(model: ir.Model, names: Sequence[str], threads: int | None):
    if not names:
        return None
    options = session_options("basic", threads=threads)
    with exposed(model, list(names)) as exposing:
        return create_session(exposing, sess_options=options)


def _accumulate(
    layer: _Layer, kept: np.ndarray, acc: _Accumulator | None, x: np.ndarray, y: np.ndarray,
    f: int, remaining: int, feeds: int,
) -> tuple[_Accumulator | None, int]:
    """Add feed ``f``'s rows of one layer (input ``x`` in the pruned model, target ``y`` in the
    reference) to ``acc``; returns the accumulator and the rows still allowed."""
    layer.check_target(x, y)
    g = layer.groups
    mg = layer.out_channels // g
    positions = layer.positions(x)
    quota = _row_quota(positions, remaining, feeds - f)
    if quota <= 0:
        return acc, remaining
    rows = _choose_rows(positions, quota, f)
    chunk = max(1, CHUNK_ELEMENTS // max(1, layer.row_size(x)))
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        feats = layer.features(x, part)
        targets = layer.targets(y, part)[:, kept].reshape(len(part), g, mg)
        if acc is None:
            acc = _Accumulator(g, feats.shape[2], mg)
        acc.update(feats, targets)
    acc.rows += len(rows)
    return acc, remaining - quota


def _no_rows(layer: _Layer, max_rows: int) -> OnnxcompError:
    return OnnxcompError(f"reconstruct: node {layer.node.name!r}: no calibration rows (max_rows={max_rows})")


def _fit_layer(
    layer: _Layer,
    kept: np.ndarray,
    pruned: ir.Model,
    ref_session,
    data: Dataset,
    feeds: int,
    max_rows: int,
    threads: int | None,
) -> _Accumulator:
    """One layer's sums, running both whole models over every feed (the per-layer refit)."""
    graph_inputs = {v.name for v in pruned.graph.inputs}
    x_from_feed = layer.x_name in graph_inputs
    session = None if x_from_feed else _session(pruned, [layer.x_name], threads)
    acc: _Accumulator | None = None
    remaining = max_rows
    for f, feed in enumerate(data):
        x = feed[layer.x_name] if x_from_feed else session.run([layer.x_name], feed)[0]
        y = ref_session.run([layer.y_name], feed)[0]
        acc, remaining = _accumulate(layer, kept, acc, x, y, f, remaining, feeds)
        del x, y
    if acc is None:
        raise _no_rows(layer, max_rows)
    return acc


def refit_stages(pruned: ir.Model, names: Sequence[str]) -> list[list[str]]:
    """The nodes ``names`` grouped into stages: a node's stage is one after the latest stage of
    the listed nodes upstream of it, so the nodes of one stage never feed each other and can be
    refitted from one pass over the data once the earlier stages are written."""
    wanted = set(names)
    bit = {name: 1 << i for i, name in enumerate(sorted(wanted))}
    upstream: dict[str, int] = {}  # value name -> listed nodes upstream (bit set)
    stage_of: dict[str, int] = {}
    for node in pruned.graph:
        above = 0
        for v in node.inputs:
            if v is not None and v.name:
                above |= upstream.get(v.name, 0)
        if node.name in wanted:
            data_in = node.inputs[0]
            before = upstream.get(data_in.name, 0) if data_in is not None else 0
            stage_of[node.name] = 1 + max((stage_of[n] for n in wanted if bit[n] & before and n in stage_of),
                                          default=-1)
            above |= bit[node.name]
        for v in node.outputs:
            if v.name:
                upstream[v.name] = above
    stages: list[list[str]] = []
    for name in names:
        s = stage_of[name]
        while len(stages) <= s:
            stages.append([])
        stages[s].append(name)
    return [s for s in stages if s]


def reconstruct(
    reference: ir.Model,
    pruned: ir.Model,
    nodes: Sequence[str],
    data: Dataset,
    *,
    ridge: float = 1e-3,
    max_rows: int = 200_000,
    kept_outputs: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[int, int | None], object] | None = None,
    threads: int | None = None,
    streamed: bool = True,
) -> list[LayerFit]:
    """Refit ``nodes`` of ``pruned`` (in place) to match ``reference`` layer by layer (module doc).

    Args:
        reference: the unpruned model (not modified); holds nodes of the same names.
        pruned: the model after the cut; the listed nodes get new weights and biases.
        nodes: names of Conv / Gemm (transA=0) / MatMul (constant 2-D weight) nodes; they are
            processed in the pruned graph's topological order whatever the order given.
        data: calibration feeds (read once per layer, streamed).
        ridge: relative ridge ``lambda = ridge * trace(X^T X) / k`` (bias not regularized).
        max_rows: rows (output positions) used per layer over the whole data set, at most.
        kept_outputs: node name -> indices of the reference output channels that remain, for
            nodes whose own output channels were cut; absent: all remain.
        progress: called with (layers done, layers total) after each layer.
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        streamed: refit stage by stage (:func:`refit_stages`), the inputs of a stage's layers
            computed from the nodes not yet run (:class:`onnxcomp.prune.frontier.Frontier`: every
            node once per feed over the whole refit, the feeds held in memory); ``False``: layer
            by layer, both models run whole over every feed for each layer (same result).

    Returns:
        One :class:`LayerFit` per node, in the order processed.

    Raises:
        ValueError: a node is unknown (in either model), not a linear layer, has a non-constant
            weight, or ``kept_outputs`` does not fit it; ``ridge`` or ``max_rows`` is invalid.
    """
    if ridge < 0:
        raise ValueError(f"reconstruct: ridge must be >= 0, got {ridge}")
    if max_rows < 1:
        raise ValueError(f"reconstruct: max_rows must be >= 1, got {max_rows}")
    kept_outputs = dict(kept_outputs or {})
    names = list(dict.fromkeys(nodes))
    pruned_nodes = _nodes_by_name(pruned)
    ref_nodes = _nodes_by_name(reference)
    order = {n.name: i for i, n in enumerate(pruned.graph) if n.name}
    plans: dict[str, _Layer | str] = {}
    for name in names:  # validate everything before touching the model
        try:
            plans[name] = _plan(name, pruned_nodes, ref_nodes)
        except _Skip as skip:
            plans[name] = str(skip)
    names.sort(key=lambda n: order[n])
    targets = [p.y_name for p in plans.values() if isinstance(p, _Layer)]
    ref_session = _session(reference, list(dict.fromkeys(targets)), threads) if targets and not streamed else None
    ref_channels = _reference_channels(reference, plans)
    feeds = _count_feeds(data) if targets and not streamed else 0
    graph = pruned.graph
    taken = all_value_names(graph)
    fits: dict[str, LayerFit] = {}
    ready: dict[str, tuple[_Layer, np.ndarray]] = {}
    for name in names:
        plan = plans[name]
        if isinstance(plan, _Layer):
            try:
                ready[name] = (plan, _kept(plan, name, ref_channels[name], kept_outputs))
                continue
            except _Skip as skip:
                plan = str(skip)
        fits[name] = LayerFit(name, pruned_nodes[name].op_type, 0, math.nan, math.nan, "skipped", plan)
    done = 0

    def finish(name: str, acc: _Accumulator) -> None:
        nonlocal done
        plan = ready[name][0]
        old = plan.old_params()
        before = acc.error(old)
        new = acc.solve(ridge, plan.fit_bias)
        after = acc.error(new)
        op_type = pruned_nodes[name].op_type
        if after < before and np.all(np.isfinite(new)):
            plan.write(new, graph, taken)
            fits[name] = LayerFit(name, op_type, acc.rows, before, after)
        else:
            fits[name] = LayerFit(
                name, op_type, acc.rows, before, before, "kept",
                f"the refit was not better on the calibration rows ({after:.3g} vs {before:.3g})",
            )
        done += 1
        if progress is not None:
            progress(done + sum(1 for f in fits.values() if f.status == "skipped"), len(names))

    if not streamed:
        for name in [n for n in names if n in ready]:
            layer, kept = ready[name]
            finish(name, _fit_layer(layer, kept, pruned, ref_session, data, feeds, max_rows, threads))
    elif ready:
        from onnxcomp.prune.frontier import Frontier

        feed_list = [dict(f) for f in data]
        mine, theirs = Frontier(pruned, feed_list, threads=threads), Frontier(reference, feed_list, threads=threads)
        for stage in refit_stages(pruned, [n for n in names if n in ready]):
            layers = [ready[n] for n in stage]
            xs = mine.compute([layer.x_name for layer, _ in layers])
            ys = theirs.compute([layer.y_name for layer, _ in layers])
            for name, (layer, kept) in zip(stage, layers):
                acc, remaining = None, max_rows
                for f in range(len(feed_list)):
                    acc, remaining = _accumulate(layer, kept, acc, xs[f][layer.x_name], ys[f][layer.y_name], f,
                                                 remaining, len(feed_list))
                if acc is None:
                    raise _no_rows(layer, max_rows)
                finish(name, acc)
            del xs, ys
    return [fits[n] for n in names]


def _reference_channels(
    reference: ir.Model, plans: Mapping[str, _Layer | str]
) -> dict[str, int]:
    """Output channels of each planned node's target in the reference (from its weights)."""
    ref_nodes = _nodes_by_name(reference)
    out: dict[str, int] = {}
    for name, plan in plans.items():
        if not isinstance(plan, _Layer):
            continue
        ref = ref_nodes[name]
        w = _const(ref.inputs[1])
        if w is None:
            raise ValueError(f"reconstruct: node {name!r}: its weight is not a constant in the reference")
        out[name] = w.shape[weight_axes(ref)[0]]
    return out
