r"""Streaming layer-input Gram matrices :math:`H = X^\top X` of linear layers over calibration data.

The second-order statistics that error-compensating rounding (GPTQ, OBQ, GPTVQ, SparseGPT) and
least-squares refits need: for a linear layer :math:`y = W x` the squared output error of a weight
change :math:`\Delta W` summed over the calibration rows is :math:`\operatorname{tr}(\Delta W\, H\,
\Delta W^\top)`, so :math:`H` is all that is needed of the data.

Layouts (features in the order of the flattened weight, so that ``W_rows @ H @ W_rows.T`` is the
output energy):

* **Conv** (any ``pads``/``auto_pad``, ``strides``, ``dilations``, ``group`` incl. depthwise): a row
  is one (image, output position) pair; group ``g`` has its own ``[k, k]`` matrix over the
  ``c_in/group * prod(kernel)`` patch values of that group, in the order of
  ``W[g*m_g:(g+1)*m_g].reshape(m_g, -1)`` (patches from :func:`onnxcomp.prune.reconstruct.conv_patches`).
* **Gemm** (``transA=0``, any ``transB``) and **MatMul** with a constant 2-D weight as input 1:
  rows are all leading positions of the input flattened; one group, ``k`` = the reduction size.

Layers reading the same tensor with the same layout share one matrix (q/k/v projections of an
attention block, the branches of an Inception block): it is computed once.

Streaming: one onnxruntime session exposes every layer input at once and the data is read in one
pass; per feed at most a share of ``max_rows`` rows per matrix is kept (the budget spread evenly
over the feeds, rows drawn uniformly with a generator seeded by the feed index, as in
:mod:`onnxcomp.prune.reconstruct`), gathered in bounded chunks and accumulated in float64. Memory is
one feed's layer inputs plus the matrices, never the number of rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import stream_values
from onnxcomp.prune.reconstruct import CHUNK_ELEMENTS, ConvGeometry, _choose_rows, _row_quota, conv_patches

__all__ = ["LayerGram", "GramLayout", "gram_layout", "collect_grams"]

#: Rows per matrix over the whole data set, by default.
DEFAULT_MAX_ROWS = 32_768


@dataclasses.dataclass(frozen=True)
class GramLayout:
    """How one node's input becomes rows of features.

    ``geometry`` is set for Conv (``None``: dense, features along the last axis). ``key`` identifies
    layouts that give the same matrix (same tensor, same features).
    """

    x_name: str
    k: int
    groups: int = 1
    geometry: ConvGeometry | None = None

    @property
    def key(self) -> tuple:
        return (self.x_name, self.k, self.groups, self.geometry)

    def positions(self, x: np.ndarray) -> int:
        if self.geometry is None:
            return x.size // self.k if x.ndim else 0
        return x.shape[0] * math.prod(self.geometry.output_spatial(x.shape[2:]))

    def features(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``[rows, groups, k]`` float64."""
        if self.geometry is None:
            if x.ndim == 0 or x.shape[-1] != self.k:
                raise OnnxcompError(
                    f"gram: tensor {self.x_name!r} has shape {list(x.shape)}, its consumer expects "
                    f"{self.k} features on the last axis"
                )
            return np.asarray(x.reshape(-1, self.k)[rows], dtype=np.float64)[:, None, :]
        return conv_patches(x, self.geometry, rows)


@dataclasses.dataclass
class LayerGram:
    """``gram[g]`` = :math:`\\sum_{rows} x x^\\top` (float64, ``[groups, k, k]``) over ``rows`` rows."""

    gram: np.ndarray
    rows: int
    layout: GramLayout
    #: :math:`\sum_{rows} x` (float64, ``[groups, k]``): the input mean's numerator
    total: np.ndarray | None = None

    @property
    def groups(self) -> int:
        return self.gram.shape[0]

    @property
    def k(self) -> int:
        return self.gram.shape[1]

    def mean(self) -> np.ndarray:
        """:math:`X^\\top X / n` (the scale-free form; zeros when no rows)."""
        return self.gram / max(self.rows, 1)

    def input_mean(self) -> np.ndarray | None:
        """:math:`\\sum x / n` per group (``[groups, k]``), None when not collected."""
        return None if self.total is None else self.total / max(self.rows, 1)


def gram_layout(node: ir.Node) -> GramLayout | None:
    """The layout of ``node``'s input rows, or None when the node is not a supported linear layer
    (Conv, Gemm with transA=0, MatMul with a constant 2-D weight as input 1)."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None or w.const_value is None or not x.name:
        return None
    shape = tuple(int(d) for d in w.const_value.shape)
    layout = _LAYOUTS.get(node.op_type)
    return layout(node, x.name, shape) if layout is not None else None


def _conv_layout(node: ir.Node, x_name: str, shape: tuple[int, ...]) -> GramLayout | None:
    if len(shape) < 3:
        return None
    geometry = ConvGeometry.from_node(node, shape)
    if shape[0] % geometry.group:
        return None
    return GramLayout(x_name, math.prod(shape[1:]), geometry.group, geometry)


def _gemm_layout(node: ir.Node, x_name: str, shape: tuple[int, ...]) -> GramLayout | None:
    if len(shape) != 2:
        return None
    attr = node.attributes.get("transA")
    if attr is not None and attr.value:
        return None
    attr = node.attributes.get("transB")
    return GramLayout(x_name, shape[1] if attr is not None and attr.value else shape[0])


def _matmul_layout(node: ir.Node, x_name: str, shape: tuple[int, ...]) -> GramLayout | None:
    return GramLayout(x_name, shape[0]) if len(shape) == 2 else None


#: The layers this module reads: op type -> how its input becomes rows.
_LAYOUTS = {"Conv": _conv_layout, "Gemm": _gemm_layout, "MatMul": _matmul_layout}


def _count(data: Iterable) -> int:
    n = getattr(data, "num_feeds", None)
    if n is not None:
        return n
    return sum(1 for _ in data)


def collect_grams(
    model: ir.Model,
    nodes: Sequence[ir.Node],
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    threads: int | None = None,
    progress: Callable[[int, int | None], object] | None = None,
) -> dict[str, LayerGram]:
    """Input Gram matrices of ``nodes`` (module doc), keyed by node name, in one pass over ``data``.

    ``model`` is not modified (its tensors are exposed for the session only). Nodes that are not a
    supported linear layer are left out of the result. Nodes sharing a layout share one
    :class:`LayerGram` object. ``data`` is iterated twice when it does not know its length (once to
    count the feeds). ``progress(feeds done, feeds total)`` after each feed.

    Raises:
        ValueError: ``max_rows`` < 1. OnnxcompError: a tensor does not match its consumer's weight,
        or the data gave no rows.
    """
    if max_rows < 1:
        raise ValueError(f"gram: max_rows must be >= 1, got {max_rows}")
    layouts: dict[str, GramLayout] = {}
    for node in nodes:
        layout = gram_layout(node)
        if layout is not None:
            layouts[node.name] = layout
    unique = list(dict.fromkeys(layouts.values()))
    if not unique:
        return {}
    feeds = _count(data)
    grams = {lay.key: np.zeros((lay.groups, lay.k, lay.k)) for lay in unique}
    totals = {lay.key: np.zeros((lay.groups, lay.k)) for lay in unique}
    rows = {lay.key: 0 for lay in unique}
    remaining = {lay.key: max_rows for lay in unique}
    names = list(dict.fromkeys(lay.x_name for lay in unique))
    # Rows wait in a buffer until a chunk is full: one large product instead of one per feed.
    pending: dict[tuple, list[np.ndarray]] = {lay.key: [] for lay in unique}
    pending_rows = {lay.key: 0 for lay in unique}

    def flush(lay: GramLayout) -> None:
        if not pending[lay.key]:
            return
        feats = np.concatenate(pending[lay.key])  # [r, g, k]
        pending[lay.key].clear()
        pending_rows[lay.key] = 0
        acc = grams[lay.key]
        totals[lay.key] += feats.sum(axis=0)
        if lay.groups == 1:  # one BLAS product (a stacked matmul on strided views is not)
            rows2d = np.ascontiguousarray(feats[:, 0, :])
            acc[0] += rows2d.T @ rows2d
        else:
            acc += np.einsum("rgi,rgj->gij", feats, feats, optimize=True)

    for f, values in enumerate(stream_values(model, names, data, threads=threads)):
        for lay in unique:
            x = np.asarray(values[lay.x_name])
            positions = lay.positions(x)
            quota = _row_quota(positions, remaining[lay.key], feeds - f)
            if quota <= 0:
                continue
            remaining[lay.key] -= quota
            chosen = _choose_rows(positions, quota, f)
            chunk = max(1, CHUNK_ELEMENTS // max(1, lay.k * lay.groups))
            for start in range(0, len(chosen), chunk):
                part = chosen[start : start + chunk]
                pending[lay.key].append(lay.features(x, part))
                pending_rows[lay.key] += len(part)
                if pending_rows[lay.key] >= chunk:
                    flush(lay)
            rows[lay.key] += len(chosen)
        if progress is not None:
            progress(f + 1, feeds)
    for lay in unique:
        flush(lay)
    if any(r == 0 for r in rows.values()):
        raise OnnxcompError("gram: the calibration data gave no rows")
    shared = {lay.key: LayerGram(grams[lay.key], rows[lay.key], lay, totals[lay.key]) for lay in unique}
    return {name: shared[lay.key] for name, lay in layouts.items()}
