r"""Weight clustering (k-means weight sharing, as in Deep Compression) for any ONNX model.

Every eligible weight tensor :math:`W` is replaced by :math:`\hat W = c[\ell]`, where the codebook
:math:`c \in \mathbb{R}^K` and the labels :math:`\ell` come from exact 1-D k-means
(:func:`onnxcomp.cluster.kmeans.kmeans_1d`), per tensor or per output channel.

Storage formats:

* ``float``: the initializer is overwritten with :math:`\hat W`; the graph is unchanged. The file
  is as large as before but compresses well with any general-purpose compressor (at most K
  distinct values), and a later quantization pass sees at most K distinct values per tensor.
* ``codebook``: the initializer is replaced by the label tensor (``UINT4``, two labels per byte,
  when K <= 16, which needs opset 21; ``uint8`` up to K = 256; ``uint16`` beyond) and a float
  codebook, rebuilt in the graph as ``Cast -> [Add channel offsets] -> Gather(codebook) ->
  Reshape``. All of it has constant inputs, so onnxruntime folds it once at session creation:
  inference latency is unchanged; session creation does the decoding.

Eligible tensors: float32 initializers with at least ``min_elements`` values that are the weight
of a Conv/ConvTranspose/Gemm/MatMul (per the op table) or the data of a Gather (embeddings), not
excluded by name (of the tensor or of a consuming node) or consumer op type. Tensors that already
have at most K distinct values are left alone, so running the pass twice changes nothing.

Statistics per tensor: bytes before/after, zlib-compressed bytes, an entropy-coding estimate
(optimal Huffman code length of the label histogram, plus the codebook), distinct values, and
the mean squared weight error.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxcomp.cluster.kmeans import (
    cluster_per_channel,
    huffman_bits_per_symbol,
    kmeans_1d,
    pack_indices,
)
from onnxcomp.errors import ConfigError
from onnxcomp.graph import add_initializer, all_value_names, unique_name
from onnxcomp.ops import LINEAR_OPS
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.quant.config import NodeSelector

__all__ = ["ClusterConfig", "ClusterTarget", "find_cluster_targets", "ClusterPass", "CODEBOOK_UINT4_OPSET"]

#: Opset that introduced UINT4 tensors (Cast from uint4 included).
CODEBOOK_UINT4_OPSET = 21


@dataclasses.dataclass(frozen=True)
class ClusterConfig(PassConfig):
    """How to cluster.

    Attributes:
        bits: K = 2**bits clusters (ignored when ``clusters`` is set).
        clusters: K directly (2..65536).
        per_channel: one codebook per output channel instead of per tensor.
        init: centroid initialization: ``kmeans++``, ``linear`` (evenly spaced), ``density``
            (quantiles of the weight distribution).
        preserve_zeros: ``auto`` reserves an exact 0 centroid when a tensor has exact zeros (as
            pruning leaves them); ``always`` / ``never`` force it.
        min_elements: smaller tensors are left alone.
        exclude: tensor names, consumer node names, consumer op types, or ``re:PATTERN``.
        format: ``float`` or ``codebook`` (see module docstring).
        seed / max_iter: k-means determinism and iteration cap.
    """

    bits: int = 4
    clusters: int | None = None
    per_channel: bool = False
    init: Literal["kmeans++", "linear", "density"] = "kmeans++"
    preserve_zeros: Literal["auto", "always", "never"] = "auto"
    min_elements: int = 1024
    exclude: tuple[str, ...] = ()
    format: Literal["float", "codebook"] = "float"
    seed: int = 0
    max_iter: int = 100

    def validate(self) -> None:
        if self.clusters is None and not 1 <= self.bits <= 16:
            raise ConfigError(f"cluster: bits must be in 1..16, got {self.bits}")
        if self.clusters is not None and not 2 <= self.clusters <= 65536:
            raise ConfigError(f"cluster: clusters must be in 2..65536, got {self.clusters}")
        if self.min_elements < 1:
            raise ConfigError(f"cluster: min_elements must be >= 1, got {self.min_elements}")
        if self.max_iter < 0 or self.seed < 0:
            raise ConfigError("cluster: seed and max_iter must be >= 0")
        NodeSelector((), self.exclude)  # validates patterns

    @property
    def k(self) -> int:
        return self.clusters if self.clusters is not None else 2**self.bits


@dataclasses.dataclass(frozen=True)
class ClusterTarget:
    """An eligible tensor: the initializer and the channel axis of its first consumer."""

    name: str
    value: ir.Value
    channel_axis: int


def find_cluster_targets(model: ir.Model, config: ClusterConfig) -> tuple[list[ClusterTarget], dict[str, str]]:
    """Eligible weight tensors and, for the others considered, why they were skipped."""
    selector = NodeSelector((), config.exclude)
    targets: list[ClusterTarget] = []
    skipped: dict[str, str] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT:
            continue
        axis = None
        for use in value.uses():
            node = use.node
            spec = LINEAR_OPS.lookup(node, model)
            role = None
            if spec is not None:
                role = next((r for r in spec.roles if r.input_index == use.idx and r.kind == "weight"), None)
            if role is not None:
                axis = role.axes(node)[0]
            elif node.op_type == "Gather" and use.idx == 0:
                axis = 0
            else:
                continue
            break
        if axis is None:
            continue
        if tensor.size < config.min_elements:
            skipped[name] = f"{tensor.size} elements, fewer than min_elements={config.min_elements}"
            continue
        consumers = [u.node for u in value.uses()]
        if selector.excluded(name, "") or any(selector.excluded(n.name or "", n.op_type) for n in consumers):
            skipped[name] = "excluded"
            continue
        targets.append(ClusterTarget(name, value, axis % len(tensor.shape)))
    return targets, skipped


class ClusterPass(CompressionPass[ClusterConfig]):
    """Cluster eligible weights in place (see module docstring); ``progress(done, total)``."""

    config_class = ClusterConfig

    def check_opset(self, model: ir.Model) -> None:
        """The codebook format with K <= 16 stores UINT4 labels, which need opset 21."""
        if self.config.format == "codebook" and self.config.k <= 16:
            self.min_opset = CODEBOOK_UINT4_OPSET
        super().check_opset(model)

    def __init__(self, config: ClusterConfig | None = None, *, progress: Callable[[int, int], object] | None = None):
        super().__init__(config)
        self.progress = progress

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        targets, skipped = find_cluster_targets(model, cfg)
        graph = model.graph
        taken = all_value_names(graph)
        per_tensor: dict[str, dict[str, Any]] = {}
        total = len(targets)
        for done, target in enumerate(targets, 1):
            w = target.value.const_value.numpy()
            if np.unique(w).size <= cfg.k:
                skipped[target.name] = f"already has at most {cfg.k} distinct values"
                if self.progress:
                    self.progress(done, total)
                continue
            preserve = cfg.preserve_zeros == "always" or (cfg.preserve_zeros == "auto" and bool(np.any(w == 0)))
            kw = {"init": cfg.init, "seed": cfg.seed, "max_iter": cfg.max_iter, "preserve_zero": preserve}
            if cfg.per_channel:
                centroids, labels = cluster_per_channel(w, cfg.k, axis=target.channel_axis, **kw)
                moved = np.moveaxis(labels, target.channel_axis, 0)
                snapped = np.moveaxis(np.take_along_axis(centroids, moved.reshape(moved.shape[0], -1), axis=1)
                                      .reshape(moved.shape), 0, target.channel_axis)
            else:
                result = kmeans_1d(w, cfg.k, **kw)
                centroids, labels = result.centroids, result.labels
                snapped = result.reconstruct()
            snapped = snapped.astype(np.float32).reshape(w.shape)
            stats = _tensor_stats(w, snapped, centroids, labels, cfg.k, cfg.format)
            if cfg.format == "float":
                target.value.const_value = ir.tensor(snapped, name=target.name)
            else:
                self._store_codebook(graph, taken, target, centroids, labels, stats)
            per_tensor[target.name] = stats
            if self.progress:
                self.progress(done, total)
        if cfg.format == "codebook" and per_tensor:
            RemoveUnusedNodesPass()(model)
            TopologicalSortPass()(model)
        totals = {
            key: sum(s[key] for s in per_tensor.values())
            for key in ("elements", "bytes_before", "bytes_after", "zlib_bytes_before", "zlib_bytes_after", "entropy_bytes")
        }
        return bool(per_tensor), {
            "clusters": cfg.k,
            "format": cfg.format,
            "tensors": per_tensor,
            "totals": totals,
            "skipped": skipped,
        }

    def _store_codebook(
        self,
        graph: ir.Graph,
        taken: set[str],
        target: ClusterTarget,
        centroids: np.ndarray,
        labels: np.ndarray,
        stats: dict[str, Any],
    ) -> None:
        k = self.config.k
        name = target.name
        shape = list(labels.shape)
        n = int(labels.size)
        nodes: list[ir.Node] = []

        def add(op: str, inputs: list[ir.Value], **attrs: Any) -> ir.Value:
            node = ir.node(op, inputs, attributes=attrs, name=unique_name(graph, f"{name}/{op}", taken))
            node.outputs[0].name = unique_name(graph, f"{name}/{op.lower()}", taken)
            nodes.append(node)
            return node.outputs[0]

        flat_labels = labels.reshape(-1)
        if k <= 16:
            # 4-bit labels as a native UINT4 tensor (two per byte on disk; opset 21).
            packed = ir.PackedTensor(pack_indices(flat_labels, 4), ir.DataType.UINT4, shape=ir.Shape([n]), name=f"{name}_labels")
            label_values = _register(graph, unique_name(graph, f"{name}_labels", taken), packed)
            stored = (n + 1) // 2
        else:
            dtype = np.uint8 if k <= 256 else np.uint16
            arr = flat_labels.astype(dtype)
            label_values = add_initializer(graph, f"{name}_labels", arr, taken)
            stored = arr.nbytes
        index = add("Cast", [label_values], to=ir.DataType.INT64)
        codebook = np.asarray(centroids, np.float32)
        if self.config.per_channel:
            axis = target.channel_axis
            channels = labels.shape[axis]
            offset_shape = [1] * labels.ndim
            offset_shape[axis] = channels
            offsets = (np.arange(channels, dtype=np.int64) * k).reshape(offset_shape)
            full_shape = add_initializer(graph, f"{name}_shape", np.array(shape, np.int64), taken)
            index = add("Add", [add("Reshape", [index, full_shape]),
                                add_initializer(graph, f"{name}_offsets", offsets, taken)])
            codebook = codebook.reshape(-1)
        cb = add_initializer(graph, f"{name}_codebook", codebook, taken)
        gathered = add("Gather", [cb, index], axis=0)
        out_shape = add_initializer(graph, f"{name}_weight_shape", np.array(shape, np.int64), taken)
        weight = add("Reshape", [gathered, out_shape])
        weight.dtype = ir.DataType.FLOAT
        weight.shape = ir.Shape(shape)
        for node in nodes:
            graph.append(node)
        target.value.replace_all_uses_with(weight)
        graph.initializers.pop(target.name, None)
        stats["bytes_after"] = int(stored + codebook.nbytes)


def _register(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _tensor_stats(
    w: np.ndarray, snapped: np.ndarray, centroids: np.ndarray, labels: np.ndarray, k: int, storage: str
) -> dict[str, Any]:
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=1)
    label_bits = 4 if k <= 16 else (8 if k <= 256 else 16)
    packed_labels = pack_indices(labels.reshape(-1), 4) if k <= 16 else labels.reshape(-1).astype(
        np.uint8 if k <= 256 else np.uint16)
    codebook_bytes = int(np.asarray(centroids, np.float32).nbytes)
    huffman = huffman_bits_per_symbol(counts[counts > 0])
    edges = np.linspace(float(w.min()), float(w.max()), 65) if w.max() > w.min() else np.array([w.min() - 0.5, w.min() + 0.5])
    return {
        "histogram": {
            "edges": edges.tolist(),
            "before": np.histogram(w, bins=edges)[0].tolist(),
            "after": np.histogram(snapped, bins=edges)[0].tolist(),
        },
        "shape": list(w.shape),
        "elements": int(w.size),
        "distinct_values": int(np.unique(snapped).size),
        "mse": float(np.mean((snapped.astype(np.float64) - w) ** 2)),
        "relative_mse": float(np.mean((snapped.astype(np.float64) - w) ** 2) / max(float(np.mean(w.astype(np.float64) ** 2)), 1e-30)),
        "bytes_before": int(w.nbytes),
        "bytes_after": int(snapped.nbytes),
        "label_bits": label_bits,
        "zlib_bytes_before": len(zlib.compress(np.ascontiguousarray(w).tobytes(), 9)),
        "zlib_bytes_after": (
            len(zlib.compress(packed_labels.tobytes(), 9)) + codebook_bytes
            if storage == "codebook"
            else len(zlib.compress(np.ascontiguousarray(snapped).tobytes(), 9))
        ),
        "huffman_bits_per_weight": float(huffman),
        "entropy_bytes": int(np.ceil(w.size * huffman / 8)) + codebook_bytes,
    }
