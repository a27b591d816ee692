r"""Weight clustering (k-means weight sharing, as in Deep Compression) for any ONNX model.

Every eligible weight tensor :math:`W` is replaced by :math:`\hat W = c[\ell]`, where the codebook
:math:`c \in \mathbb{R}^K` and the labels :math:`\ell` come from exact 1-D k-means
(:func:`onnxcomp.cluster.kmeans.kmeans_1d`), per tensor or per output channel, or by
:math:`\hat W_r = s_r\, c[\ell_r]` with one shared codebook and a least-squares scale per output
channel (``channel_scales``, :func:`onnxcomp.cluster.kmeans.cluster_channel_scaled`).

Storage formats:

* ``float``: the initializer is overwritten with :math:`\hat W`; the graph is unchanged. The file
  is as large as before but compresses well with any general-purpose compressor (at most K
  distinct values), and a later quantization pass sees at most K distinct values per tensor.
* ``codebook``: the initializer is replaced by the label tensor (``UINT4``, two labels per byte,
  when K <= 16, which needs opset 21; ``uint8`` up to K = 256; ``uint16`` beyond) and a float
  codebook, rebuilt in the graph as ``Cast -> [Add channel offsets] -> Gather(codebook) ->
  [Mul channel scales]``. The labels keep the weight's shape, so no Reshape is needed, and the
  last output takes the weight's name. All of it has constant inputs, so onnxruntime folds it once at session creation:
  inference latency is unchanged; session creation does the decoding.
* ``sparse``: the labels of all clustered tensors are concatenated, bit-packed at ``ceil(log2 K)``
  bits and, where the codebooks have an exact-zero centroid (pruned weights, ``preserve_zeros``),
  stored as a bitmask or with relative indices, whichever is smallest, in one uint8 stream
  (:mod:`onnxcomp.sparsity.storage`; opset 18); one Split gives each tensor its labels and, with
  per-tensor codebooks, one table holds every codebook as a column (``codebook_int8``: int8 times
  one scale per tensor), so a tensor costs a ``Gather`` and a ``Reshape``. Decoding is again
  folded at session creation. Tensors of different codebook sizes (``bits_per_weight``: a width
  per tensor chosen under a byte budget from measured sensitivity) are grouped by width, each
  group packed at its own width.

Eligible tensors: float32 initializers with at least ``min_elements`` values that are the weight
of a Conv/ConvTranspose/Gemm/MatMul (per the op table) or the data of a Gather (embeddings), not
excluded by name (of the tensor or of a consuming node) or consumer op type, and not a graph input
(an initializer that is also an input is a default the user may override) or graph output.
Tensors that already have at most K distinct values (per channel with ``per_channel`` or
channel scales) are left alone, so running the pass twice changes nothing; with the codebook
format, a tensor of at most K distinct values (clustered before, stored as floats) is stored as
its exact codebook.

Statistics per tensor: bytes before/after, zlib-compressed bytes, an entropy-coding estimate
(optimal Huffman code length of the label histogram, plus the codebook), distinct values, and
the mean squared weight error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxcomp.cluster.kmeans import (
    cluster_channel_scaled,
    cluster_per_channel,
    huffman_bits_per_symbol,
    kmeans_1d,
    pack_indices,
)
from onnxcomp.bounds import Range
from onnxcomp.errors import ConfigError
from onnxcomp.graph import add_initializer, all_value_names, unique_name
from onnxcomp.ops import LINEAR_OPS, RECURRENT_INT8
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.selection import NodeSelector
from onnxcomp.sparsity.storage import (
    SPARSE_STORAGE_OPSET,
    LabelEncoding,
    bias_tensors,
    build_label_decoder,
    encode_labels,
    encoding_stats,
    int8_symmetric,
    store_int8,
)

__all__ = ["ClusterConfig", "ClusterTarget", "find_cluster_targets", "ClusterPass", "CODEBOOK_UINT4_OPSET",
           "allocate_widths", "head_targets"]

#: Opset that introduced UINT4 tensors (Cast from uint4 included).
CODEBOOK_UINT4_OPSET = 21


@dataclasses.dataclass(frozen=True)
class ClusterConfig(PassConfig):
    """How to cluster.

    Attributes:
        bits: K = 2**bits clusters (ignored when ``clusters`` is set).
        clusters: K directly (2..65536).
        per_channel: one codebook per output channel instead of per tensor.
        channel_scales: ``always``: one codebook per tensor and one float scale per output channel,
            fitted on channels normalised to [-1, 1] (see
            :func:`onnxcomp.cluster.kmeans.cluster_channel_scaled`); it keeps every channel's
            relative error bounded where per-tensor clustering snaps a small-scale channel
            (BatchNorm folded in, a dead channel) onto centroids sized for the others, at 4 bytes
            per channel (``per_channel`` costs ``4 K``). ``auto`` (default): per tensor, unless
            that destroys a channel (its error energy reaches its signal energy), then scaled.
            Scaling everything is not better everywhere: on a BERT encoder (MiniLM) the same
            weight error spread evenly over channels costs more after LayerNorm than per-tensor
            clustering does. ``never``: per tensor.
        init: centroid initialization: ``kmeans++``, ``linear`` (evenly spaced), ``density``
            (quantiles of the weight distribution).
        preserve_zeros: ``auto`` reserves an exact 0 centroid when a tensor has exact zeros (as
            pruning leaves them); ``always`` / ``never`` force it.
        min_elements: smaller tensors are left alone.
        exclude: tensor names, consumer node names, consumer op types, or ``re:PATTERN``.
        format: ``float``, ``codebook`` or ``sparse`` (see module docstring).
        int8_biases: also store biases (of Conv/Gemm, or the Add after a MatMul) of at least 16
            values as per-tensor symmetric int8 rebuilt by ``Cast * scale`` (lossy: at most 1/254
            of the tensor's peak; :func:`onnxcomp.sparsity.storage.store_int8`).
        codebook_int8: ``sparse`` format: every per-tensor codebook is rounded to int8 times one
            float scale per tensor (symmetric, the largest centroid at 127) before the labels are
            assigned, and the codebooks are stored as one int8 table (lossy: each centroid moves
            by at most 1/254 of the tensor's largest centroid; the labels and compensation see
            the rounded codebook).
        float16_biases: ``sparse`` format: every bias of the main graph (as for ``int8_biases``,
            any size) is rounded to float16 and stored in one float16 initializer, rebuilt by one
            ``Cast`` and one ``Split`` (error at most 2^-11 of the tensor's largest value); a bias
            float16 cannot hold that closely (a value beyond 65504, or every value far below
            float16's normal range, such as 1e-8) stays float32. Takes precedence over
            ``int8_biases`` there.
        seed / max_iter: k-means determinism and iteration cap.
        compensate: choose each weight's codebook entry by GPTQ-style error compensation on the
            layer-input Hessian from calibration data (:func:`onnxcomp.quant.gptq.gptq_snap`:
            columns in order, each column's assignment error pushed onto the columns not yet
            assigned), instead of the nearest entry; exact zeros (pruned weights) stay zero.
            Needs data; tensors without a Hessian (Gather tables, ConvTranspose) keep the nearest.
        max_samples: calibration feeds for ``compensate``.
        refit_codebook: after the compensated assignment (``compensate``), re-fit a per-tensor
            codebook of at most 16 entries, and the channel scales, to the assigned labels by least
            squares on the layer-input Hessian (``min tr(dW H dW^T)``: first the scales row by row,
            then the entries jointly; an exact-zero entry stays zero; ``codebook_int8`` and
            ``float16_scales`` re-round them), kept only where the output error drops. With
            ``vector_dim`` the vector codebook (any size) is re-fitted the same way, scales fixed
            (:func:`onnxcomp.cluster.vector.refit_vectors`; skipped for tensors with more than
            3e8 Hessian terms ``n k^2``).
        float16_scales: channel scales (``channel_scales``) rounded to float16 before the labels
            are assigned and stored as float16 (a Cast rebuilds them): 2 bytes per channel instead
            of 4. A tensor whose scales float16 cannot hold closely keeps float32 ones.
        bits_per_weight: mixed widths: each tensor's codebook width (bits per label) is chosen
            from ``bits_choices`` so that labels, codebooks and channel scales average at most this
            many bits per clustered weight (densely packed; zeros stored as a bitmask only shrink
            it). Every tensor is shared at every candidate width (k-means, int8 codebook,
            compensated assignment) and its error measured (``sensitivity``);
            :func:`allocate_widths` then picks the widths that minimise the summed error within the
            byte budget. Needs ``format="sparse"`` and per-tensor codebooks.
            ``bits`` is then unused. The report's ``allocation`` gives the widths, and every
            tensor its ``bits`` and the error and bytes of each candidate.
        bits_choices: the candidate widths for ``bits_per_weight`` (1..8 bits).
        sensitivity: what ``bits_per_weight`` minimises. ``output-all`` (needs calibration data):
            the model's own outputs, each candidate tried alone in onnxruntime on the first
            ``sensitivity_samples`` calibration feeds (relative squared error of every float output
            against the unshared model's; the errors of the tensors are taken to add up); layers
            differ in how much of their error reaches the outputs, which a layer's own error does
            not tell. ``output`` (default): the same at the two widths nearest below
            ``bits_per_weight`` only; the other widths take their layer error times the ratio
            (output error / layer error) of the nearest measured width: one inference per tensor
            and measured width instead of one per candidate. ``layer``: each tensor's own relative
            output error on the layer-input Hessian ``X^T X`` (with ``compensate``) or its relative
            weight error, summed; no inference.
        sensitivity_samples: calibration feeds for ``sensitivity="output"``.
        sensitivity_rounds: rounds of exchanges after the allocation (``output`` sensitivities):
            each tensor's output error one width up and one down is measured with every other
            tensor at its chosen width (errors measured alone need not add up to the joint one),
            and upgrades are bought with the downgrades that cost least (:func:`_swap_round`);
            two inferences per tensor and round.
        vector_dim: ``d`` > 1: vector codebooks (GPTVQ, :mod:`onnxcomp.cluster.vector`): each
            tensor's rows (output channels) are cut into vectors of ``d`` consecutive weights along
            the input axis, sharing one codebook of ``2^(bits d)`` entries ``[K, d]`` per tensor
            (``bits`` bits per weight: 64 pairs at 3 bits), chosen by k-means in ``d`` dimensions
            weighted by the layer-input Hessian's diagonal, and assigned block by block with GPTQ
            compensation (``compensate``); channel scales as for scalar codebooks. Decoded by
            ``Gather`` on the ``[K, d]`` codebook and a ``Reshape`` (and a ``Transpose`` for a
            MatMul's ``[in, out]`` weight). A tensor that cannot take vectors (not the weight of a
            Conv/Gemm/MatMul, input width not a multiple of ``d``, fewer than 16 vectors per entry)
            keeps a scalar codebook at the same bits; the report says why per tensor. Needs
            ``format="sparse"`` and per-tensor codebooks; with ``bits_per_weight`` each candidate
            width takes vectors where the tensor can (up to 2^8 entries), scalars elsewhere, and
            the widths between ``bits_choices`` in steps of ``1/d`` are candidates too (2.5 and 3.5
            bits per weight with pairs: 32 and 128 entries).
        wide_below: with ``bits_per_weight``: a tensor of fewer elements than this is shared at
            ``wide_bits`` (a scalar codebook) instead of a width from ``bits_choices``, its bytes
            counted in the budget (0: off). A few hundred weights cost little at any width, and a
            stem or depthwise filter cut to a handful of values can carry much of the model's
            error: on PP-OCRv4 rec at 10x, one 144-weight depthwise 3x3 conv kept float recovers 3.3
            of 8.8 points lost on the report split (benchmarks/RESULTS.md, twelfth session).
        wide_bits: the width of ``wide_below`` tensors (bits per label, 1..8).
        scalar_choices: with ``bits_per_weight`` and ``vector_dim`` > 1: the candidate widths of
            the tensors that cannot take vectors and keep a scalar codebook (the 5x5 depthwise
            convs of PP-OCRv4 rec, whose 25 inputs are no multiple of 2), instead of
            ``bits_choices`` (empty: ``bits_choices``). A scalar codebook errs more than a vector
            one at the same bits per weight, and such tensors are small: wider candidates let the
            allocation buy them precision where it pays.
        restarts: multi-start k-means: each tensor is shared (k-means, int8 codebook, compensated
            assignment, refit) at every candidate width from ``restarts`` k-means starts (seeds
            ``seed``, ``seed + S``, ``seed + 2 S``, ... with S = 1,000,003, so that the starts of
            two seeds do not overlap), and the start whose error is least in the measure the
            allocation uses for ``layer`` (the relative output error on the layer-input Hessian,
            else the relative weight error) is kept (1: one start, as before). The k-means and the
            assignment are the build's dominant cost without output probes: their time grows
            about ``restarts`` times (probes and the rest of the build do not); memory does not
            (one start's result is kept at a time). On PP-OCRv4 rec at 10x the k-means start
            alone moves the report split by 2-6 points; keeping the start of least layer error did
            not narrow that (3 starts: report spread 2.3-4.4 points over seeds 0-2), and the tune
            split did not choose it (benchmarks/RESULTS.md, fourteenth session). Layer-only builds
            took about 2.2x the CPU time with 3 starts.
        head_min_bits: with ``bits_per_weight``: the least width (bits per weight) of the head
            tensors, the weights of the linear ops whose output reaches a graph output without
            passing through another clustered tensor's consumer (the CTC head of an OCR
            recognizer, a classifier's last layer); their narrower candidates are dropped before
            the allocation (a head with no candidate that wide keeps its widest). The measures
            the allocation uses (``layer``, ``output`` on a few clean calibration feeds) can take
            a large head's step down where the model's accuracy pays for it: PP-OCRv4 rec's
            795k-weight head at 2 bits cost 2-6 points on held-out splits at 10x; a floor of 3
            (chosen on the tune split) took that seed from -5.5 to -1.1 points on the report split,
            and over five seeds the report split still reads -2.45 (fourteenth session) (0: off).
        compact_graph: finish with graph compaction (:mod:`onnxcomp.passes.compact`: short tensor
            names, no node names, no intermediate ``value_info`` or doc strings; exact). For the
            size route, where this stage is the last that transforms the model.
    """

    bits: int = 4
    clusters: int | None = None
    per_channel: bool = False
    channel_scales: Literal["auto", "always", "never"] = "auto"
    init: Literal["kmeans++", "linear", "density"] = "kmeans++"
    preserve_zeros: Literal["auto", "always", "never"] = "auto"
    min_elements: int = 256
    exclude: tuple[str, ...] = ()
    format: Literal["float", "codebook", "sparse"] = "float"
    int8_biases: bool = False
    codebook_int8: bool = False
    float16_biases: bool = False
    seed: int = 0
    max_iter: int = 100
    compensate: bool = False
    max_samples: int = 64
    compact_graph: bool = False
    float16_scales: bool = False
    refit_codebook: bool = False
    bits_per_weight: float | None = None
    bits_choices: tuple[int, ...] = (2, 3, 4, 5, 6)
    sensitivity: Literal["output", "output-all", "layer"] = "output"
    sensitivity_samples: int = 16
    sensitivity_rounds: int = 0
    vector_dim: int = 1
    wide_below: int = 0
    wide_bits: int = 8
    scalar_choices: tuple[int, ...] = ()
    restarts: int = 1
    head_min_bits: float = 0.0

    stage: ClassVar[str] = "cluster"
    ranges: ClassVar[dict[str, Range]] = {
        "bits": Range(int, 1, 16),
        "clusters": Range(int, 2, 65536),
        "min_elements": Range(int, 1),
        "seed": Range(int, 0, 2**32 - 1),
        "max_iter": Range(int, 0, 1_000_000),
        "max_samples": Range(int, 1),
        "bits_per_weight": Range(float, 1.0, 16.0),
        "bits_choices": Range(int, 1, 8),
        "sensitivity_samples": Range(int, 1),
        "sensitivity_rounds": Range(int, 0, 10),
        "vector_dim": Range(int, 1, 8),
        "wide_below": Range(int, 0),
        "wide_bits": Range(int, 1, 8),
        "scalar_choices": Range(int, 1, 8),
        "restarts": Range(int, 1, 64),
        "head_min_bits": Range(float, 0.0, 8.0),
    }

    def validate(self) -> None:
        if self.per_channel and self.channel_scales == "always":
            raise ConfigError("cluster: per_channel and channel_scales='always' exclude each other")
        NodeSelector((), self.exclude)  # validates patterns
        if self.vector_dim > 1:
            if self.format != "sparse" or self.per_channel:
                raise ConfigError("cluster: vector_dim > 1 needs format='sparse' with per-tensor codebooks (the "
                                  f"format that stores [K, d] codebooks), got format={self.format!r}"
                                  + (", per_channel" if self.per_channel else ""))
            if self.clusters is not None:
                raise ConfigError("cluster: vector_dim > 1 sizes the codebook from bits (2^(bits x vector_dim) "
                                  "entries); clusters fixes K for scalar codebooks: set bits instead")
            if self.bits_per_weight is None and self.bits * self.vector_dim > _MAX_VECTOR_BITS:
                raise ConfigError(f"cluster: bits={self.bits} with vector_dim={self.vector_dim} needs a codebook of "
                                  f"2^{self.bits * self.vector_dim} entries; at most 2^{_MAX_VECTOR_BITS} are supported "
                                  "(lower bits or vector_dim)")
        if self.scalar_choices and (self.bits_per_weight is None or self.vector_dim < 2):
            raise ConfigError("cluster: scalar_choices are the candidate widths of the tensors that keep a scalar "
                              "codebook beside vector ones: set bits_per_weight and vector_dim > 1 too")
        if self.head_min_bits and self.bits_per_weight is None:
            raise ConfigError("cluster: head_min_bits is a floor on the widths bits_per_weight chooses: set "
                              "bits_per_weight too")
        if self.wide_below and self.bits_per_weight is None:
            raise ConfigError("cluster: wide_below gives small tensors their own width within bits_per_weight's "
                              "budget: set bits_per_weight too")
        if self.bits_per_weight is not None:
            if self.clusters is not None:
                raise ConfigError("cluster: bits_per_weight chooses the width per tensor; clusters fixes one K for "
                                  "all: set one of them")
            if self.format != "sparse" or self.per_channel:
                raise ConfigError("cluster: bits_per_weight needs format='sparse' with per-tensor codebooks (the "
                                  "format that packs each tensor's labels at its own width), got "
                                  f"format={self.format!r}" + (", per_channel" if self.per_channel else ""))
            if not self.bits_choices:
                raise ConfigError("cluster: bits_choices must list at least one width (bits per label, 1..8)")
            if self.bits_per_weight < min(self.bits_choices):
                raise ConfigError(f"cluster: bits_per_weight={self.bits_per_weight} is below the smallest of "
                                  f"bits_choices {list(self.bits_choices)}: no width fits")

    @property
    def k(self) -> int:
        """K, or with ``bits_per_weight`` the largest K a tensor may take."""
        if self.bits_per_weight is not None:
            return 2 ** max(self.bits_choices)
        return self.clusters if self.clusters is not None else 2**self.bits


#: ``vector_dim``: the largest vector codebook, 2^12 entries (labels of at most 12 bits).
_MAX_VECTOR_BITS = 12
#: ``vector_dim`` with ``bits_per_weight``: candidate widths take vectors up to 2^8 entries (k-means
#: and the assignment grow with the entries; wider candidates are scalar codebooks).
_MAX_MIXED_VECTOR_BITS = 8
#: ``vector_dim``: a tensor takes vectors only with at least this many vectors per codebook entry.
_MIN_VECTORS_PER_ENTRY = 16
#: ``restarts``: the k-means seeds of one build are ``seed + r * _RESTART_STRIDE``.
_RESTART_STRIDE = 1_000_003


@dataclasses.dataclass(frozen=True)
class ClusterTarget:
    """An eligible tensor: the initializer and the channel axis of its first consumer."""

    name: str
    value: ir.Value
    channel_axis: int


def _weight_axis(value: ir.Value, model: ir.Model) -> int | None:
    """The channel axis of ``value`` as its first weight-reading consumer sees it, or None: the
    weight of a linear op (op table), the table of a Gather, or W/R of a recurrent op (gate rows,
    :data:`onnxcomp.ops.RECURRENT_INT8`)."""
    for use in value.uses():
        node = use.node
        spec = LINEAR_OPS.lookup(node, model)
        role = None
        if spec is not None:
            role = next((r for r in spec.roles if r.input_index == use.idx and r.kind == "weight"), None)
        if role is not None:
            return role.axes(node)[0]
        if node.op_type == "Gather" and use.idx == 0:
            return 0
        rule = RECURRENT_INT8.lookup(node, model)
        if rule is not None and any(i == use.idx for i, _ in rule.weights):
            return 1  # [dirs, gates * hidden, inputs]: one channel per gate row
    return None


def graph_scope(graph: ir.Graph | None, model: ir.Model) -> str:
    """``main`` for the main graph, else the subgraph's name (an If branch, a Loop/Scan body)."""
    return "main" if graph is None or graph is model.graph else (graph.name or "subgraph")


def find_cluster_targets(model: ir.Model, config: ClusterConfig | Any) -> tuple[list[ClusterTarget], dict[str, str]]:
    """Eligible weight tensors and, for the others considered, why they were skipped.

    Initializers of every graph count: the main graph's (read there or only inside If branches
    and Loop/Scan bodies) and those of the subgraphs themselves (Constant nodes are lifted into
    their own graph's initializers by :func:`onnxcomp.graph.working_copy`).
    """
    selector = NodeSelector((), config.exclude)
    targets: list[ClusterTarget] = []
    skipped: dict[str, str] = {}
    for name, value in ((n, v) for g in (model.graph, *model.graph.subgraphs()) for n, v in g.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT:
            continue
        axis = _weight_axis(value, model)
        if axis is None:
            continue
        if tensor.size < config.min_elements:
            skipped[name] = f"{tensor.size} elements, fewer than min_elements={config.min_elements}"
            continue
        consumers = [u.node for u in value.uses()]
        if value.is_graph_input() or value.is_graph_output():
            skipped[name] = "a graph input or output (its value may be fed or read by the user)"
            continue
        if selector.excluded(name, "") or any(selector.excluded(n.name or "", n.op_type) for n in consumers):
            skipped[name] = "excluded"
            continue
        targets.append(ClusterTarget(name, value, axis % len(tensor.shape)))
    return targets, skipped


def head_targets(model: ir.Model, targets: list[ClusterTarget]) -> set[str]:
    """The names of ``targets`` whose consumers' outputs reach a graph output of the main graph
    without passing through a node that reads another of ``targets`` (``head_min_bits``): the last
    linear layer(s) before each output, and anything after them that no other clustered weight
    feeds. Nodes inside subgraphs are not followed."""
    reads: dict[int, set[str]] = {}
    for t in targets:
        for use in t.value.uses():
            reads.setdefault(id(use.node), set()).add(t.name)
    heads: set[str] = set()
    for t in targets:
        stack = [u.node for u in t.value.uses()]
        seen = {id(n) for n in stack}
        while stack and t.name not in heads:
            node = stack.pop()
            for out in node.outputs:
                if out.is_graph_output() and out.graph is model.graph:
                    heads.add(t.name)
                    break
                for use in out.uses():
                    nxt = use.node
                    if id(nxt) in seen or reads.get(id(nxt), set()) - {t.name}:
                        continue
                    seen.add(id(nxt))
                    stack.append(nxt)
    return heads


class ClusterPass(CompressionPass[ClusterConfig]):
    """Cluster eligible weights in place (see module docstring); ``progress(done, total)``."""

    output_checks = ("checker", "onnxruntime")  # codebook Gathers: onnxruntime is the judge

    config_class = ClusterConfig

    @classmethod
    def required_opset(cls, config: ClusterConfig) -> int:
        """The codebook format with K <= 16 stores UINT4 labels, which need opset 21."""
        if config.format == "sparse":
            return SPARSE_STORAGE_OPSET
        return CODEBOOK_UINT4_OPSET if config.format == "codebook" and config.k <= 16 else cls.min_opset

    def __init__(self, config: ClusterConfig | None = None, *, progress: Callable[[int, int], object] | None = None,
                 hessians: dict[str, np.ndarray] | None = None, probe: OutputProbe | None = None):
        super().__init__(config)
        self.progress = progress
        #: ``sensitivity="output"``: the model's output error with some weights replaced
        self.probe = probe
        #: weight name -> layer-input Hessian ``[groups, k, k]`` (``compensate``; see cluster_hessians)
        self.hessians = hessians or {}
        #: ``vector_dim``: per tensor, how its vectors were assigned
        self.vector_assignment: dict[str, str] = {}
        #: ``vector_dim``: why a tensor (at some width) kept a scalar codebook
        self.vector_skipped: dict[str, str] = {}

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        targets, skipped = find_cluster_targets(model, cfg)
        graph = model.graph
        taken = all_value_names(graph)
        per_tensor: dict[str, dict[str, Any]] = {}
        pending: list[tuple[ClusterTarget, _Clustered]] = []
        total = len(targets)
        chosen: list[tuple[ClusterTarget, np.ndarray, _Clustered]] = []
        options: dict[str, dict[int, _Clustered]] = {}
        heads = head_targets(model, targets) if cfg.head_min_bits and cfg.bits_per_weight is not None else set()
        floored: dict[str, list[float]] = {}
        for done, target in enumerate(targets, 1):
            w = target.value.const_value.numpy()
            done_reason = self._already_clustered(w, target.channel_axis)
            exact = None
            if done_reason and cfg.format != "float" and np.unique(w).size <= cfg.k:
                exact = _exact_codebook(w)  # clustered before, stored as floats: store it as a codebook
            if done_reason and exact is None:
                skipped[target.name] = done_reason
            elif exact is not None or cfg.bits_per_weight is None:
                chosen.append((target, w, self._shared(w, target, cfg.k, exact)))
            elif cfg.wide_below and w.size < cfg.wide_below:  # one width, paid for from the budget
                options[target.name] = {cfg.wide_bits: self._shared(w, target, 1 << cfg.wide_bits)}
                chosen.append((target, w, options[target.name][cfg.wide_bits]))
            else:  # every candidate width, chosen below under the budget
                options[target.name] = self._candidates(w, target)
                if target.name in heads:  # head_min_bits: its narrower candidates dropped
                    row = options[target.name]
                    kept = {b: c for b, c in row.items() if b >= cfg.head_min_bits} or {max(row): row[max(row)]}
                    floored[target.name] = sorted(b for b in row if b not in kept)
                    options[target.name] = kept
                chosen.append((target, w, options[target.name][max(options[target.name])]))
            if self.progress:
                self.progress(done, total)
        allocation = None
        if options:
            allocation = self._allocate(chosen, options)
            if heads:
                allocation["head_min_bits"] = {"floor": cfg.head_min_bits, "heads": sorted(heads & set(options)),
                                               "dropped_widths": floored}
            chosen = [(t, w, options[t.name][allocation["widths"][t.name]] if t.name in options else c)
                      for t, w, c in chosen]
        for target, w, clustered in chosen:
            encoding = None
            k = clustered.entries if options or clustered.vector_dim > 1 else cfg.k
            if cfg.format == "sparse":
                encoding = encode_labels(clustered.labels, k, 0)
            stats = _tensor_stats(w, clustered, k, cfg.format, encoding)
            stats["scope"] = graph_scope(target.value.graph, model)
            if allocation is not None and target.name in options:
                stats["bits"] = allocation["widths"][target.name]
                stats["candidates"] = allocation["candidates"][target.name]
            if clustered.int8_scale is not None:
                stats["codebook_int8_scale"] = float(clustered.int8_scale)
            if clustered.vector_dim > 1 and target.name in self.vector_assignment:
                stats["vector_assignment"] = self.vector_assignment[target.name]
            if target.name in self.vector_skipped and clustered.vector_dim == 1:
                stats["scalar_because"] = self.vector_skipped[target.name]
            if cfg.format == "float":
                target.value.const_value = ir.tensor(clustered.snapped, name=target.name)
            elif cfg.format == "sparse":
                pending.append((target, clustered))
            else:
                self._store_codebook(target.value.graph, taken, target, clustered)
            per_tensor[target.name] = stats
        totals = {
            key: sum(s[key] for s in per_tensor.values())
            for key in ("elements", "bytes_before", "bytes_after", "zlib_bytes_before", "zlib_bytes_after", "entropy_bytes")
        }
        if pending:
            shared = self._store_shared(graph, taken, pending)
            side = _codebook_bytes([c for _, c in pending])
            totals.update(bytes_after=shared.nbytes + side, zlib_bytes_after=shared.zlib_bytes() + side,
                          entropy_bytes=shared.entropy_bytes() + side, storage=encoding_stats(shared),
                          zeros=float(np.mean(np.concatenate([c.snapped.reshape(-1) for _, c in pending]) == 0)))
        if cfg.format == "sparse" and cfg.float16_biases:
            biases = self._float16_biases(model, taken)
        else:
            biases = self._int8_biases(model, taken) if cfg.int8_biases else {}
        if biases:
            totals["bias_bytes_before"] = sum(b["bytes_before"] for b in biases.values())
            totals["bias_bytes_after"] = sum(b["bytes_after"] for b in biases.values())
        if (cfg.format != "float" and per_tensor) or biases:
            RemoveUnusedNodesPass()(model)
            TopologicalSortPass()(model)
        compaction = None
        if cfg.compact_graph:
            from onnxcomp.passes.compact import CompactGraphPass

            compaction = CompactGraphPass()(model).stats
        return bool(per_tensor) or bool(biases) or bool(compaction), {
            **({"compaction": compaction} if compaction is not None else {}),
            **({"allocation": {k: v for k, v in allocation.items() if k != "candidates"}}
               if allocation is not None else {}),
            "int8_biases": biases,
            "clusters": cfg.k,
            "format": cfg.format,
            "granularity": "channel" if cfg.per_channel else {"always": "scaled channel", "never": "tensor",
                                                               "auto": "tensor or scaled channel"}[cfg.channel_scales],
            "tensors": per_tensor,
            "subgraphs": _by_subgraph(per_tensor),
            "totals": totals,
            "skipped": skipped,
        }

    def _already_clustered(self, w: np.ndarray, axis: int) -> str | None:
        """Why ``w`` needs no clustering, or None.

        At most K distinct values in the tensor always qualifies. With ``per_channel`` so do at
        most K per channel; with channel scales too, but only where channels hold more than K
        weights (smaller channels always do, and sharing one codebook still compresses them).
        """
        k = self.config.k
        if np.unique(w).size <= k:
            return f"already has at most {k} distinct values"
        scaled = self.config.channel_scales != "never"
        by_channel = self.config.per_channel or (scaled and w.size // w.shape[axis] > k)
        # the sparse format stores labels only: a tensor of few values per channel still needs them
        if by_channel and self.config.format != "sparse" and _distinct_per_channel(w, axis) <= k:
            return f"already has at most {k} distinct values per channel"
        return None

    def _shared(self, w: np.ndarray, target: ClusterTarget, k: int, exact: _Clustered | None = None) -> _Clustered:
        """``w`` shared at ``k`` clusters as stored: k-means (or its ``exact`` codebook), the int8
        codebook, the compensated assignment, the zero entry first (``sparse``); with ``restarts``
        the start of least :func:`_relative_error` (ties: the earlier start)."""
        cfg = self.config
        if exact is not None:
            return self._shared_once(w, target, k, exact, cfg.seed)
        return self._restarted(w, target, lambda seed: self._shared_once(w, target, k, None, seed))

    def _restarted(self, w: np.ndarray, target: ClusterTarget, share: Callable[[int], Any]) -> Any:
        """``share(seed)`` from each of the ``restarts`` k-means starts, keeping the result of least
        :func:`_relative_error` (ties: the earlier start) and the notes it left in
        ``vector_assignment`` / ``vector_skipped``; a reason (str) why the tensor cannot be shared
        so is returned as it is (it does not depend on the start)."""
        cfg = self.config
        if cfg.restarts <= 1:
            return share(cfg.seed)
        h = self.hessians.get(target.name)
        best: tuple[float, _Clustered, str | None, str | None] | None = None
        for r in range(cfg.restarts):
            got = share((cfg.seed + r * _RESTART_STRIDE) % 2**32)
            if isinstance(got, str):
                return got
            err = _relative_error(w, got, h, target)
            if best is None or err < best[0]:
                best = (err, got, self.vector_assignment.get(target.name), self.vector_skipped.get(target.name))
        _, clustered, assignment, skipped = best
        for notes, note in ((self.vector_assignment, assignment), (self.vector_skipped, skipped)):
            if note is None:
                notes.pop(target.name, None)
            else:
                notes[target.name] = note
        return clustered

    def _shared_once(self, w: np.ndarray, target: ClusterTarget, k: int, exact: _Clustered | None,
                     seed: int) -> _Clustered:
        """:meth:`_shared` from one k-means start (``seed``)."""
        cfg = self.config
        if exact is None and cfg.vector_dim > 1:
            vector = self._vector_shared(w, target, (k - 1).bit_length() * cfg.vector_dim, seed)
            if isinstance(vector, _Clustered):
                return vector
            self.vector_skipped[target.name] = vector
        clustered = exact if exact is not None else self._cluster(w, target.channel_axis, k, seed)
        if cfg.format == "sparse" and cfg.codebook_int8 and clustered.centroids.ndim == 1:
            clustered = _int8_codebook(w, clustered, target.channel_axis)
        if exact is None and target.name in self.hessians:
            clustered = _compensated(w, clustered, self.hessians[target.name], target)
            if cfg.refit_codebook and clustered.centroids.ndim == 1 and clustered.centroids.size <= _REFIT_MAX_K:
                clustered = _refit_codebook(w, clustered, self.hessians[target.name], target)
        return _zero_first(clustered) if cfg.format == "sparse" else clustered

    def _candidates(self, w: np.ndarray, target: ClusterTarget) -> dict[float, _Clustered]:
        """``bits_per_weight``: the tensor shared at every candidate width (bits per weight): each
        of ``bits_choices`` and, with ``vector_dim`` d > 1, the fractions between them in steps of
        1/d that a vector codebook of at most 2^8 entries gives (2.5 and 3.5 bits with pairs); a
        tensor that keeps a scalar codebook at the smallest width takes ``scalar_choices`` instead
        where they are set."""
        cfg = self.config
        widths = sorted(set(cfg.bits_choices))
        first = self._shared(w, target, 1 << widths[0])
        scalar = bool(cfg.scalar_choices) and first.vector_dim == 1  # a scalar codebook at every width
        options: dict[float, _Clustered] = {
            b: first if b == widths[0] else self._shared(w, target, 1 << b)
            for b in (sorted(set(cfg.scalar_choices)) if scalar else widths)}
        if scalar:  # its own candidates, no vector fractions
            return options
        d = cfg.vector_dim
        for label_bits in range(min(cfg.bits_choices) * d + 1, min(max(cfg.bits_choices) * d, _MAX_MIXED_VECTOR_BITS)):
            if label_bits % d:
                vector = self._restarted(w, target, lambda seed, b=label_bits: self._vector_shared(w, target, b, seed))
                if isinstance(vector, _Clustered):
                    options[label_bits / d] = vector
        return dict(sorted(options.items()))

    def _vector_shared(self, w: np.ndarray, target: ClusterTarget, label_bits: int,
                       seed: int | None = None) -> _Clustered | str:
        """``w`` with a vector codebook of ``2^label_bits`` entries (:mod:`onnxcomp.cluster.vector`),
        or why it cannot take one."""
        from onnxcomp.cluster.vector import assign_compensated, kmeans_vectors, nearest_vectors, refit_vectors
        from onnxcomp.quant.gptq import output_error

        cfg = self.config
        d = cfg.vector_dim
        limit = _MAX_VECTOR_BITS if cfg.bits_per_weight is None else _MAX_MIXED_VECTOR_BITS
        if label_bits > limit:
            return f"{label_bits / d:g} bits x {d} would need 2^{label_bits} entries (at most 2^{limit} here)"
        entries = 1 << label_bits
        layout = _rows_layout_transposed(target, w)
        if layout is None:
            return "not the weight of a Conv, Gemm or MatMul"
        w_nk, back, transposed = layout
        n, width = w_nk.shape
        if target.channel_axis != (1 if transposed else 0):
            return "its channel axis is not the layout's rows"
        if width % d:
            return f"input width {width} is not a multiple of vector_dim={d}"
        if n * width // d < _MIN_VECTORS_PER_ENTRY * entries:
            return (f"{n * width // d} vectors, fewer than {_MIN_VECTORS_PER_ENTRY} per entry of a {entries}-entry "
                    "codebook")
        w_nk = np.asarray(w_nk, np.float64)
        h = self.hessians.get(target.name)
        if h is not None and (h.shape[-1] != width or n % h.shape[0]):
            h = None

        def fit(scaled: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            peak = np.abs(w_nk).max(axis=1) if scaled else np.ones(n)
            peak = np.where(peak > 0, peak, 1.0)
            rows = w_nk / peak[:, None]
            # each row's error counts at its own scale (peak^2); weighting by the Hessian's diagonal
            # too, as GPTVQ does, was measured worse on PP-OCR rec (squeeze-excitation convs: layer
            # output error 0.0014 -> 0.55 with nearest entries: a few input channels took the codebook)
            weights = np.broadcast_to(peak[:, None] ** 2, w_nk.shape)
            table = kmeans_vectors(rows.reshape(-1, d), entries, weights=weights.reshape(-1, d),
                                   seed=cfg.seed if seed is None else seed,
                                   max_iter=min(cfg.max_iter, 30))
            labels = nearest_vectors(rows.reshape(-1, d), table, weights.reshape(-1, d))
            q = table[labels].reshape(n, width)
            scales = np.ones(n)
            if scaled:
                energy = np.einsum("ij,ij->i", q, q)
                fitted = np.einsum("ij,ij->i", w_nk, q) / np.where(energy > 0, energy, 1.0)
                scales = np.where(energy > 0, fitted, peak)
            return table, labels, scales

        scaled = cfg.channel_scales == "always"
        table, labels, scales = fit(scaled)
        if cfg.channel_scales == "auto" and n < w_nk.size:
            unscaled = table[labels].reshape(n, width)
            if _worst_channel_error(w_nk, unscaled, 0) >= _DESTROYED:
                scaled = True
                table, labels, scales = fit(True)
        stored_scales = None
        if scaled:
            stored_scales = scales.astype(np.float32)
            if cfg.float16_scales and _float16_close(stored_scales):
                stored_scales = stored_scales.astype(np.float16)
        int8_scale = None
        if cfg.codebook_int8:
            q8, int8_scale = int8_symmetric(table.astype(np.float32))
            table = q8.astype(np.float32) * int8_scale
        table32 = np.asarray(table, np.float32)
        s32 = np.ones(n, np.float32) if stored_scales is None else stored_scales.astype(np.float32)
        safe = np.where(s32 != 0, s32, 1).astype(np.float64)
        labels = nearest_vectors((w_nk / safe[:, None]).reshape(-1, d), table32).reshape(n, width // d)

        def decoded(lab: np.ndarray) -> np.ndarray:
            return table32[lab].reshape(n, width) * s32[:, None]

        chosen = decoded(labels)
        self.vector_assignment[target.name] = "nearest" if h is None else "compensated"
        if h is not None:
            rows_g = n // h.shape[0]

            def error(a: np.ndarray) -> float:
                return sum(output_error(w_nk[g * rows_g:(g + 1) * rows_g], a[g * rows_g:(g + 1) * rows_g], h[g])
                           for g in range(h.shape[0]))

            best = error(chosen)  # the output error of what is chosen so far, measured once
            got = assign_compensated(w_nk, table32, s32, h, d)
            if got is not None:
                candidate = decoded(got[0])
                if (err := error(candidate)) < best:
                    labels, chosen, best = got[0], candidate, err
                else:
                    self.vector_assignment[target.name] = "nearest: the compensated assignment erred more"
            if cfg.refit_codebook:
                refit = refit_vectors(w_nk, table32, labels, s32, h)
                if refit is not None:
                    new_scale = None
                    if cfg.codebook_int8:
                        q8, new_scale = int8_symmetric(refit.astype(np.float32))
                        refit = q8.astype(np.float32) * new_scale
                    previous = table32
                    table32 = np.asarray(refit, np.float32)
                    candidate = decoded(labels)
                    if error(candidate) < best:
                        chosen, int8_scale = candidate, new_scale
                        self.vector_assignment[target.name] += ", codebook refitted"
                    else:
                        table32 = previous
        dtype = np.uint8 if entries <= 256 else np.uint16
        return _Clustered(np.ascontiguousarray(back(chosen).astype(np.float32)), table32,
                          labels.reshape(-1).astype(dtype), stored_scales, int8_scale, vector_dim=d,
                          transposed=transposed)

    def _allocate(self, chosen: list[tuple[ClusterTarget, np.ndarray, _Clustered]],
                  options: dict[str, dict[int, _Clustered]]) -> dict[str, Any]:
        """Widths per tensor for ``bits_per_weight`` (:func:`allocate_widths` on each candidate's
        measured error and stored bytes) and what the report says about them."""
        cfg = self.config
        int8 = cfg.codebook_int8
        candidates: dict[str, dict[int, dict[str, float]]] = {}
        elements = 0
        for target, w, _ in chosen:
            if target.name not in options:
                continue
            elements += w.size
            h = self.hessians.get(target.name)
            candidates[target.name] = {
                b: {"layer_error": _relative_error(w, c, h, target), "bytes": _stored_bytes(c, b, int8)}
                for b, c in options[target.name].items()}
            row = candidates[target.name]
            if self.probe is not None and target.name in self.probe.names:
                probed = _probed_widths(sorted(row), cfg.bits_per_weight, cfg.sensitivity == "output-all")
                for b in probed:
                    row[b]["output_error"] = self.probe({target.name: options[target.name][b].snapped})
                for b in row:  # the others: their layer error times the nearest probed width's gain
                    if b not in probed:
                        near = min(probed, key=lambda p: (abs(p - b), p))
                        layer = row[near]["layer_error"]
                        gain = row[near]["output_error"] / layer if layer > 0 else 0.0
                        row[b]["output_error_estimate"] = gain * row[b]["layer_error"]
            for c in row.values():
                c["error"] = c.get("output_error", c.get("output_error_estimate", c["layer_error"]))
        budget = cfg.bits_per_weight * elements / 8
        widths = allocate_widths({n: {b: (c["error"], c["bytes"]) for b, c in row.items()}
                                  for n, row in candidates.items()}, budget)
        rounds = []
        if self.probe is not None:
            sizes = {n: {b: c["bytes"] for b, c in row.items()} for n, row in candidates.items()}
            for _ in range(cfg.sensitivity_rounds):
                widths, moved = _swap_round(self.probe, options, sizes, widths, budget)
                rounds.append(moved)
                if not moved["moves"]:
                    break
        spent = sum(candidates[n][b]["bytes"] for n, b in widths.items())
        return {**({"rounds": rounds} if rounds else {}),"bits_per_weight_target": cfg.bits_per_weight, "budget_bytes": int(budget),
                "estimated_bytes": int(spent), "bits_per_weight": 8 * spent / max(elements, 1),
                "over_budget": spent > budget, "elements": int(elements),
                "sensitivity": ("model output error, each candidate alone" if self.probe is not None else
                                "layer output error on calibration data (X^T X)" if self.hessians else "weight error"),
                "error": float(sum(candidates[n][b]["error"] for n, b in widths.items())),
                "tensors_per_width": {str(b): sum(1 for v in widths.values() if v == b) for b in sorted(set(widths.values()))},
                "elements_per_width": {str(b): int(sum(next(w.size for t, w, _ in chosen if t.name == n)
                                                       for n, v in widths.items() if v == b))
                                       for b in sorted(set(widths.values()))},
                "widths": widths, "candidates": candidates}

    def _cluster(self, w: np.ndarray, axis: int, k: int | None = None, seed: int | None = None) -> _Clustered:
        cfg = self.config
        k = k or cfg.k
        preserve = cfg.preserve_zeros == "always" or (cfg.preserve_zeros == "auto" and bool(np.any(w == 0)))
        kw = {"init": cfg.init, "seed": cfg.seed if seed is None else seed, "max_iter": cfg.max_iter, "preserve_zero": preserve}
        scales = None
        if cfg.per_channel:
            centroids, labels = cluster_per_channel(w, k, axis=axis, **kw)
            moved = np.moveaxis(labels, axis, 0)
            rows = np.take_along_axis(centroids, moved.reshape(moved.shape[0], -1).astype(np.int64), axis=1)
            snapped = np.moveaxis(rows.reshape(moved.shape), 0, axis)
        else:
            if cfg.channel_scales != "always":
                result = kmeans_1d(w, k, **kw)
                centroids, labels = result.centroids, result.labels
                snapped = result.reconstruct()
            # (auto: not for channels of one weight, e.g. a vector weight: a scale per weight is no saving)
            if cfg.channel_scales == "always" or (cfg.channel_scales == "auto" and w.size > w.shape[axis] and
                                                  _worst_channel_error(w, snapped, axis) >= _DESTROYED):
                centroids, labels, scales = cluster_channel_scaled(w, k, axis=axis, **kw)
                if cfg.float16_scales and _float16_close(scales):
                    scales = scales.astype(np.float16)
                snapped = centroids[labels] * scales.reshape(_channel_shape(w.ndim, axis, scales.size))
        return _Clustered(np.asarray(snapped, np.float32).reshape(w.shape), np.asarray(centroids, np.float32),
                          labels, scales)

    def _int8_biases(self, model: ir.Model, taken: set[str]) -> dict[str, dict[str, Any]]:
        """Store every bias (of every graph) as int8 (``int8_biases``); per tensor: bytes and relative error."""
        done: dict[str, dict[str, Any]] = {}
        for graph, value in ((g, v) for g in (model.graph, *model.graph.subgraphs())
                             for v in bias_tensors(g, model, _INT8_BIAS_MIN_ELEMENTS)):
            name = value.name
            nodes: list[ir.Node] = []
            original = value.const_value.numpy()
            out, decoded = store_int8(_node_adder(graph, taken, name, nodes),
                                      lambda suffix, array: add_initializer(graph, f"{name}_{suffix}", array, taken),
                                      value)
            for node in nodes:
                graph.append(node)
            value.replace_all_uses_with(out)
            graph.initializers.pop(name)
            value.name = None
            out.name, out.dtype, out.shape = name, ir.DataType.FLOAT, ir.Shape(original.shape)
            energy = float(np.sum(original.astype(np.float64) ** 2))
            done[name] = {"elements": int(original.size), "bytes_before": int(original.nbytes),
                          "bytes_after": int(original.size) + 4,
                          "relative_error": float(np.sum((decoded - original.astype(np.float64)) ** 2)) / energy
                          if energy > 0 else 0.0}
        return done

    def _store_shared(
        self, graph: ir.Graph, taken: set[str], pending: list[tuple[ClusterTarget, _Clustered]]
    ) -> LabelEncoding:
        """The ``sparse`` format: the labels of all tensors, concatenated, in one encoding.

        One decoding subgraph (:func:`onnxcomp.sparsity.storage.build_label_decoder`) rebuilds the
        flat concatenation and one Split gives each tensor its part. With per-tensor codebooks
        (the usual case) the codebooks are the columns of one table ``[K, tensors]`` (float32, or
        ``Cast(int8) * scales`` with ``codebook_int8``), split into columns by one Split; each
        tensor is then ``Gather(column, part) -> Reshape`` (``* channel scales`` when it has them).
        Per-channel codebooks are stored as the ``codebook`` format does, from their part. Few
        nodes and initializers keep the graph small, which matters for small models.
        """
        per_tensor = all(c.centroids.ndim == 1 or c.vector_dim > 1 for _, c in pending)
        shared, pending = _shared_encoding(pending, self.config.k, per_tensor)
        nodes: list[ir.Node] = []
        add = _node_adder(graph, taken, _SHARED, nodes)
        const = lambda suffix, array: add_initializer(graph, f"{_SHARED}_{suffix}", array, taken)  # noqa: E731

        labels = build_label_decoder(add, const, shared, shape=not per_tensor)
        parts = [labels]
        if len(pending) > 1:
            sizes = np.array([c.labels.size for _, c in pending], np.int64)
            split = ir.node("Split", [labels, const("sizes", sizes)], num_outputs=len(pending),
                            name=unique_name(graph, f"{_SHARED}/Split", taken))
            nodes.append(split)
            parts = list(split.outputs)
            for part in parts:
                part.name = unique_name(graph, f"{_SHARED}/part", taken)
        columns = None
        if per_tensor:
            scalar = [i for i, (_, c) in enumerate(pending) if c.vector_dim == 1]
            vector = [i for i, (_, c) in enumerate(pending) if c.vector_dim > 1]
            columns = [None] * len(pending)
            if scalar:
                for i, col in zip(scalar, self._codebook_columns(graph, taken, nodes, [pending[i][1] for i in scalar])):
                    columns[i] = col
            if vector:
                for i, book in zip(vector, self._vector_codebooks(graph, taken, nodes, [pending[i][1] for i in vector])):
                    columns[i] = book
        for node in nodes:
            graph.append(node)
        for i, ((target, clustered), part) in enumerate(zip(pending, parts)):
            shape = np.array(clustered.labels.shape, np.int64)
            if clustered.vector_dim > 1:
                self._store_column(target, taken, clustered, part, columns[i],
                                   np.array(target.value.const_value.shape, np.int64))
            elif columns is None:
                index = _node_adder(graph, taken, target.name, tensor_nodes := [])(
                    "Reshape", [part, add_initializer(graph, f"{target.name}_shape", shape, taken)])
                for node in tensor_nodes:
                    graph.append(node)
                self._store_codebook(target.value.graph, taken, target, clustered, index)
            else:
                self._store_column(target, taken, clustered, part, columns[i], shape)
        return shared

    def _codebook_columns(self, graph: ir.Graph, taken: set[str], nodes: list[ir.Node],
                          clustered: list[_Clustered]) -> list[ir.Value]:
        """The per-tensor codebooks as the columns ``[K, 1]`` of one table, one value per tensor."""
        add = _node_adder(graph, taken, _SHARED, nodes)
        const = lambda suffix, array: add_initializer(graph, f"{_SHARED}_{suffix}", array, taken)  # noqa: E731
        k = max(c.centroids.size for c in clustered)
        table = np.zeros((k, len(clustered)), np.float32)
        for j, c in enumerate(clustered):
            table[: c.centroids.size, j] = c.centroids
        if all(c.int8_scale is not None for c in clustered):  # codebook_int8: table = q * scales exactly
            scales = np.array([c.int8_scale for c in clustered], np.float32).reshape(1, -1)
            q = np.round(table.astype(np.float64) / scales).astype(np.int8)
            values = add("Mul", [add("Cast", [const("codebook_q", q)], to=ir.DataType.FLOAT),
                                 const("codebook_scales", scales)])
        else:
            values = const("codebook", table)
        if len(clustered) == 1:
            return [values]
        split = ir.node("Split", [values], attributes={"axis": 1, "num_outputs": len(clustered)},
                        num_outputs=len(clustered), name=unique_name(graph, f"{_SHARED}/columns", taken))
        nodes.append(split)
        for out in split.outputs:
            out.name = unique_name(graph, f"{_SHARED}/codebook", taken)
        return list(split.outputs)

    def _vector_codebooks(self, graph: ir.Graph, taken: set[str], nodes: list[ir.Node],
                          clustered: list[_Clustered]) -> list[ir.Value]:
        """The vector codebooks, one ``[K, d]`` value per tensor, from one flat table of all of them
        (int8 times one float32 scale per tensor with ``codebook_int8``, else float32) split by size."""
        add = _node_adder(graph, taken, _SHARED, nodes)
        const = lambda suffix, array: add_initializer(graph, f"{_SHARED}_{suffix}", array, taken)  # noqa: E731
        int8 = all(c.int8_scale is not None for c in clustered)
        if int8:
            flat = np.concatenate([np.round(c.centroids.reshape(-1).astype(np.float64) / float(c.int8_scale))
                                   for c in clustered]).astype(np.int8)
            values = add("Cast", [const("vectors_q", flat)], to=ir.DataType.FLOAT)
        else:
            values = const("vectors", np.concatenate([c.centroids.reshape(-1) for c in clustered]).astype(np.float32))
        parts = [values]
        if len(clustered) > 1:
            split = ir.node("Split", [values, const("vectors_sizes", np.array([c.centroids.size for c in clustered],
                                                                                   np.int64))],
                            num_outputs=len(clustered), name=unique_name(graph, f"{_SHARED}/vectors", taken))
            nodes.append(split)
            parts = list(split.outputs)
            for out in parts:
                out.name = unique_name(graph, f"{_SHARED}/vector_part", taken)
        scales = [None] * len(clustered)
        if int8:
            table = const("vectors_scales", np.array([c.int8_scale for c in clustered], np.float32))
            scales = [table]
            if len(clustered) > 1:
                split = ir.node("Split", [table], attributes={"num_outputs": len(clustered)}, num_outputs=len(clustered),
                                name=unique_name(graph, f"{_SHARED}/vector_scales", taken))
                nodes.append(split)
                scales = list(split.outputs)
                for out in scales:
                    out.name = unique_name(graph, f"{_SHARED}/vector_scale", taken)
        shapes: dict[tuple[int, int], ir.Value] = {}
        books = []
        for c, part, scale in zip(clustered, parts, scales):
            key = tuple(c.centroids.shape)
            if key not in shapes:
                shapes[key] = const(f"vectors_shape_{key[0]}x{key[1]}", np.array(key, np.int64))
            books.append(add("Reshape", [part if scale is None else add("Mul", [part, scale]), shapes[key]]))
        return books

    def _store_column(self, target: ClusterTarget, taken: set[str], clustered: _Clustered, part: ir.Value,
                      column: ir.Value, shape: np.ndarray) -> None:
        """``Reshape(Gather(column, part)) [-> Transpose] [* scales]`` in the graph that owns the
        weight, under its name: ``column`` is a scalar codebook ``[K, 1]`` or a vector codebook
        ``[K, d]`` (whose ``[n, k]`` layout may be the weight transposed); ``shape`` the weight's."""
        graph = target.value.graph
        nodes: list[ir.Node] = []
        add = _node_adder(graph, taken, target.name, nodes)
        layout = np.array([shape[1], shape[0]] if clustered.transposed else shape, np.int64)
        weight = add("Reshape", [add("Gather", [column, part]),
                                 add_initializer(graph, f"{target.name}_shape", layout, taken)])
        if clustered.transposed:
            weight = add("Transpose", [weight], perm=[1, 0])
        if clustered.scales is not None:
            scales = clustered.scales.reshape(_channel_shape(len(shape), target.channel_axis, clustered.scales.size))
            weight = add("Mul", [weight, _scales_input(add, add_initializer(graph, f"{target.name}_scales", scales, taken))])
        for node in nodes:
            graph.append(node)
        target.value.replace_all_uses_with(weight)
        graph.initializers.pop(target.name)
        target.value.name = None
        weight.name = target.name
        weight.dtype = ir.DataType.FLOAT
        weight.shape = ir.Shape([int(v) for v in shape])

    def _float16_biases(self, model: ir.Model, taken: set[str]) -> dict[str, dict[str, Any]]:
        """Every bias of the main graph rounded to float16, in one initializer: ``Split(Cast(stream))``
        (``float16_biases``); per tensor: bytes and relative error."""
        graph = model.graph
        values = [v for v in bias_tensors(graph, model, 1) if _float16_holds(v.const_value.numpy())]
        if not values:
            return {}
        originals = [v.const_value.numpy() for v in values]
        stream = np.concatenate([o.reshape(-1) for o in originals]).astype(np.float16)
        nodes: list[ir.Node] = []
        add = _node_adder(graph, taken, "biases", nodes)
        decoded = add("Cast", [add_initializer(graph, "biases_f16", stream, taken)], to=ir.DataType.FLOAT)
        outs = [decoded]
        if len(values) > 1:
            sizes = add_initializer(graph, "biases_sizes", np.array([o.size for o in originals], np.int64), taken)
            split = ir.node("Split", [decoded, sizes], num_outputs=len(values), name=unique_name(graph, "biases/Split", taken))
            nodes.append(split)
            outs = list(split.outputs)
        for node in nodes:
            graph.append(node)
        done: dict[str, dict[str, Any]] = {}
        for value, original, out in zip(values, originals, outs):
            name = value.name
            value.replace_all_uses_with(out)
            graph.initializers.pop(name)
            value.name = None
            out.name, out.dtype, out.shape = name, ir.DataType.FLOAT, ir.Shape(original.shape)
            back = original.astype(np.float16).astype(np.float64)
            energy = float(np.sum(original.astype(np.float64) ** 2))
            done[name] = {"elements": int(original.size), "bytes_before": int(original.nbytes),
                          "bytes_after": 2 * int(original.size),
                          "relative_error": float(np.sum((back - original) ** 2)) / energy if energy > 0 else 0.0}
        return done

    def _store_codebook(
        self, graph: ir.Graph, taken: set[str], target: ClusterTarget, clustered: _Clustered,
        index: ir.Value | None = None,
    ) -> None:
        """Replace the weight by ``Cast(labels) [+ offsets] -> Gather(codebook) [* scales]`` in
        ``graph``, the graph that owns the weight (an If branch or a loop body for theirs).

        The labels keep the weight's shape, so the Gather already yields the weight's shape, and
        the last node's output takes the weight's name: consumers read the same name as before.
        """
        k = self.config.k
        name = target.name
        labels = clustered.labels
        shape = list(labels.shape)
        nodes: list[ir.Node] = []
        add = _node_adder(graph, taken, name, nodes)

        if index is not None:  # decoded labels (the sparse format)
            pass
        elif k <= 16:
            # 4-bit labels as a native UINT4 tensor (two per byte on disk; opset 21).
            packed = ir.PackedTensor(pack_indices(labels.reshape(-1), 4), ir.DataType.UINT4, shape=ir.Shape(shape))
            label_values = _register(graph, unique_name(graph, f"{name}_labels", taken), packed)
        else:
            label_values = add_initializer(graph, f"{name}_labels", labels.astype(np.uint8 if k <= 256 else np.uint16),
                                           taken)
        if index is None:
            index = add("Cast", [label_values], to=ir.DataType.INT64)
        codebook = clustered.centroids
        axis = target.channel_axis
        if codebook.ndim == 2:  # one codebook per channel: offset each channel's labels into its row
            channels = shape[axis]
            offsets = (np.arange(channels, dtype=np.int64) * k).reshape(_channel_shape(len(shape), axis, channels))
            index = add("Add", [index, add_initializer(graph, f"{name}_offsets", offsets, taken)])
            codebook = codebook.reshape(-1)
        weight = add("Gather", [add_initializer(graph, f"{name}_codebook", codebook, taken), index])
        if clustered.scales is not None:
            scales = clustered.scales.reshape(_channel_shape(len(shape), axis, clustered.scales.size))
            weight = add("Mul", [weight, _scales_input(add, add_initializer(graph, f"{name}_scales", scales, taken))])
        for node in nodes:
            graph.append(node)
        target.value.replace_all_uses_with(weight)
        graph.initializers.pop(name)
        target.value.name = None
        weight.name = name
        weight.dtype = ir.DataType.FLOAT
        weight.shape = ir.Shape(shape)


@dataclasses.dataclass(frozen=True)
class _Clustered:
    """A clustered tensor: ``snapped`` (float32, the weight's shape) and how it is stored."""

    snapped: np.ndarray
    centroids: np.ndarray  # [K] or, per channel, [C, K]
    labels: np.ndarray  # the weight's shape
    scales: np.ndarray | None  # [C] with channel scales
    #: ``codebook_int8``: the codebook is ``q * int8_scale`` with integer ``q`` in [-127, 127]
    int8_scale: np.float32 | None = None
    #: vector codebooks (``vector_dim``): ``centroids`` is ``[K, d]``, ``labels`` one per vector in
    #: the ``[n, k]`` layout's order (flat), ``scales`` one per row
    vector_dim: int = 1
    #: vector codebooks: the ``[n, k]`` layout is the weight transposed (a MatMul's ``[in, out]``)
    transposed: bool = False

    @property
    def entries(self) -> int:
        """K, the codebook's number of entries."""
        return self.centroids.shape[0] if self.vector_dim > 1 else self.centroids.shape[-1]


def _by_subgraph(per_tensor: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Tensors clustered inside If branches and Loop/Scan bodies, per subgraph: count and bytes."""
    found: dict[str, dict[str, int]] = {}
    for stats in per_tensor.values():
        if stats["scope"] != "main":
            row = found.setdefault(stats["scope"], {"tensors": 0, "elements": 0, "bytes_before": 0, "bytes_after": 0})
            row["tensors"] += 1
            for key in ("elements", "bytes_before", "bytes_after"):
                row[key] += stats[key]
    return found


def _scales_input(add: Callable[..., ir.Value], scales: ir.Value) -> ir.Value:
    """Channel scales as float: stored float16 (``float16_scales``) they take a Cast."""
    return add("Cast", [scales], to=ir.DataType.FLOAT) if scales.dtype == ir.DataType.FLOAT16 else scales


def _channel_shape(ndim: int, axis: int, channels: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = channels
    return shape


def _exact_codebook(w: np.ndarray) -> _Clustered:
    """The lossless codebook of a tensor that already has few distinct values."""
    centroids = np.unique(w).astype(np.float32)
    labels = np.searchsorted(centroids, w).astype(np.uint8 if centroids.size <= 256 else np.uint16)
    return _Clustered(np.asarray(w, np.float32), centroids, labels, None)


#: ``channel_scales="auto"`` switches a tensor to channel scales when per-tensor clustering leaves
#: a channel with error energy at least this fraction of its signal energy (the channel is gone).
_DESTROYED = 1.0


def _worst_channel_error(w: np.ndarray, snapped: np.ndarray, axis: int) -> float:
    """The largest relative squared error ``||w_c - snapped_c||^2 / ||w_c||^2`` over channels."""
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    err = ((np.moveaxis(snapped, axis, 0).reshape(rows.shape) - rows) ** 2).sum(axis=1)
    energy = (rows**2).sum(axis=1)
    worst = np.where(energy > 0, err / np.where(energy > 0, energy, 1.0), 0.0)
    return float(worst.max(initial=0.0))


def _distinct_per_channel(w: np.ndarray, axis: int) -> int:
    """The largest number of distinct values in one channel of ``w`` along ``axis``."""
    rows = np.sort(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), axis=1)
    return int((np.diff(rows, axis=1) != 0).sum(axis=1).max(initial=0)) + 1


def _register(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _node_adder(graph: ir.Graph, taken: set[str], prefix: str, nodes: list[ir.Node]) -> Callable[..., ir.Value]:
    """``add(op_type, inputs, **attributes)``: a new node named after ``prefix`` into ``nodes``; its output."""

    def add(op: str, inputs: list[ir.Value], **attrs: Any) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs, name=unique_name(graph, f"{prefix}/{op}", taken))
        node.outputs[0].name = unique_name(graph, f"{prefix}/{op.lower()}", taken)
        nodes.append(node)
        return node.outputs[0]

    return add


#: Biases with fewer values stay float (``int8_biases``).
_INT8_BIAS_MIN_ELEMENTS = 16

#: Name prefix of the shared label decoder of the sparse format.
_SHARED = "sparse_labels"


def _codebook_bytes(clustered: list[_Clustered]) -> int:
    """The bytes the ``sparse`` format stores for these tensors' codebooks and channel scales
    (:meth:`ClusterPass._store_shared`): per-tensor codebooks as one table of the largest
    codebook's rows, int8 with one float32 scale per tensor (``codebook_int8``) or float32;
    per-channel codebooks each as they are."""
    scales = sum(0 if c.scales is None else c.scales.nbytes for c in clustered)
    vectors = [c for c in clustered if c.vector_dim > 1]
    if vectors:  # vector codebooks: one flat table of their own (int8 + a float32 scale each, or float32)
        rest = [c for c in clustered if c.vector_dim == 1]
        own = sum(c.centroids.size + 4 if c.int8_scale is not None else c.centroids.nbytes for c in vectors)
        return own + sum(0 if c.scales is None else c.scales.nbytes for c in vectors) + (
            _codebook_bytes(rest) if rest else 0)
    if not all(c.centroids.ndim == 1 for c in clustered):
        return sum(c.centroids.nbytes for c in clustered) + scales
    cells = max(c.centroids.size for c in clustered) * len(clustered)
    if all(c.int8_scale is not None for c in clustered):
        return cells + 4 * len(clustered) + scales
    return 4 * cells + scales


def _float16_holds(values: np.ndarray) -> bool:
    """Whether float16 keeps every value of ``values`` (float32) within its relative precision
    (2^-11) of the tensor's largest magnitude: no value beyond float16's range (65504), and not a
    tensor whose values all lie so far below float16's normal range (6.1e-5) that rounding them to
    its subnormals (steps of 6e-8) moves them by more (a bias of 1e-8 would become 0)."""
    v = np.asarray(values, np.float32)
    if v.size == 0:
        return True
    peak = float(np.max(np.abs(v)))
    if not np.isfinite(peak) or peak >= float(np.finfo(np.float16).max):
        return False
    error = float(np.max(np.abs(v.astype(np.float16).astype(np.float64) - v.astype(np.float64))))
    return error <= 2.0**-11 * peak


def _float16_close(values: np.ndarray) -> bool:
    """Whether float16 holds every one of ``values`` within its relative precision (2^-11 of the
    value itself, so no value in float16's subnormal range or beyond 65504)."""
    v = np.asarray(values, np.float64)
    with np.errstate(over="ignore"):
        back = v.astype(np.float16).astype(np.float64)
    return bool(np.all(np.isfinite(back)) and np.all(np.abs(back - v) <= 2.0**-11 * np.abs(v)))


def _int8_codebook(w: np.ndarray, clustered: _Clustered, axis: int) -> _Clustered:
    """``clustered`` with its codebook rounded to its int8 grid (``codebook_int8``) and every
    weight re-assigned to the nearest rounded entry (exact zeros keep the zero entry)."""
    q, scale = int8_symmetric(np.asarray(clustered.centroids, np.float32))
    centroids = (q.astype(np.float32) * scale).astype(np.float32)
    target = np.asarray(w, np.float64)
    if clustered.scales is not None:
        target = target / clustered.scales.reshape(_channel_shape(w.ndim, axis, clustered.scales.size)).astype(np.float64)
    order = np.argsort(centroids, kind="stable")
    ordered = centroids[order].astype(np.float64)
    pos = np.clip(np.searchsorted(ordered, target), 1, max(ordered.size - 1, 1))
    lower = ordered[pos - 1]
    upper = ordered[np.minimum(pos, ordered.size - 1)]
    nearest = np.where(np.abs(target - lower) <= np.abs(upper - target), pos - 1, np.minimum(pos, ordered.size - 1))
    labels = order[nearest]
    zero = np.flatnonzero(centroids == 0)
    if zero.size:
        labels = np.where(w == 0, zero[0], labels)
    snapped = centroids[labels]
    if clustered.scales is not None:
        snapped = snapped * clustered.scales.reshape(_channel_shape(w.ndim, axis, clustered.scales.size))
    return dataclasses.replace(clustered, snapped=np.asarray(snapped, np.float32).reshape(w.shape), centroids=centroids,
                               labels=labels.astype(clustered.labels.dtype).reshape(w.shape), int8_scale=scale)


#: Bytes the decoder of one more label width costs (a Slice, Reshape, MatMul, Concat and their
#: constants): mixed widths are used only when they save more than this.
_WIDTH_GROUP_BYTES = 160


def _shared_encoding(pending: list[tuple[ClusterTarget, _Clustered]], k: int,
                     per_tensor: bool) -> tuple[LabelEncoding, list[tuple[ClusterTarget, _Clustered]]]:
    """The one encoding of all labels and the tensors in its order.

    Per-tensor codebooks of different sizes (layers shared at different widths by the sparsity
    stage, or widths chosen per tensor by ``bits_per_weight``) get one label width per group of
    tensors (the tensors ordered by width), densely packed (:func:`encode_dense_groups`) or, where
    the zero entry is common enough, as a bitmask (:func:`encode_bitmask_groups`), when the
    smaller of the two saves more than the extra decoding nodes cost; otherwise every label takes
    the widest width the codebooks need (``ceil(log2 k)`` with per-channel codebooks), in the best
    of the three encodings."""
    from onnxcomp.sparsity.storage import bits_for, encode_bitmask_groups, encode_dense_groups

    widths = [bits_for(c.entries) for _, c in pending]
    widest = max(widths) if per_tensor else max([bits_for(k), *widths])  # per tensor: what the codebooks need
    flat = np.concatenate([c.labels.reshape(-1).astype(np.int64) for _, c in pending])
    single = encode_labels(flat, 1 << widest, 0)
    if per_tensor and len(set(widths)) > 1:
        order = sorted(range(len(pending)), key=lambda i: widths[i])
        grouped = [pending[i] for i in order]
        groups = sorted(set(widths))
        labels = [np.concatenate([c.labels.reshape(-1) for (_, c), w in zip(grouped, sorted(widths)) if w == g])
                  for g in groups]
        best = min((encode_dense_groups(labels, groups), encode_bitmask_groups(labels, groups, 0)),
                   key=lambda e: e.nbytes)
        if single.nbytes - best.nbytes > _WIDTH_GROUP_BYTES:
            return best, grouped
    return single, pending


def _zero_first(clustered: _Clustered) -> _Clustered:
    """The same clustering with the exact-zero centroid (in every channel's codebook) as label 0."""
    centroids = clustered.centroids
    rows = centroids.reshape(-1, centroids.shape[-1])
    zero = np.flatnonzero(np.all(rows == 0, axis=0))
    if not zero.size or zero[0] == 0:
        return clustered
    z = int(zero[0])
    order = np.arange(centroids.shape[-1])
    order[[0, z]] = [z, 0]
    labels = order[clustered.labels.astype(np.int64)]  # order is its own inverse
    return dataclasses.replace(clustered, centroids=np.ascontiguousarray(centroids[..., order]),
                               labels=labels.astype(clustered.labels.dtype))


def _tensor_stats(w: np.ndarray, clustered: _Clustered, k: int, storage: str,
                  encoding: LabelEncoding | None = None) -> dict[str, Any]:
    snapped, labels = clustered.snapped, clustered.labels
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=1)
    label_bits = 4 if k <= 16 else (8 if k <= 256 else 16)
    packed_labels = pack_indices(labels.reshape(-1), 4) if k <= 16 else labels.reshape(-1).astype(
        np.uint8 if k <= 256 else np.uint16)
    side_bytes = clustered.centroids.nbytes + (0 if clustered.scales is None else clustered.scales.nbytes)
    huffman = huffman_bits_per_symbol(counts[counts > 0])
    if encoding is not None:
        sparse = {**encoding_stats(encoding), "zeros": float(np.mean(snapped == 0)),
                  "bytes_after": encoding.nbytes + side_bytes, "zlib_bytes_after": encoding.zlib_bytes() + side_bytes,
                  "entropy_bytes": encoding.entropy_bytes() + side_bytes,
                  "huffman_bits_per_weight": 8 * encoding.entropy_bytes() / max(w.size, 1)}
    edges = np.linspace(float(w.min()), float(w.max()), 65) if w.max() > w.min() else np.array([w.min() - 0.5, w.min() + 0.5])
    return {
        "histogram": {
            "edges": edges.tolist(),
            "before": np.histogram(w, bins=edges)[0].tolist(),
            "after": np.histogram(snapped, bins=edges)[0].tolist(),
        },
        "shape": list(w.shape),
        "granularity": ("vector, " if clustered.vector_dim > 1 else "") + (
            "channel" if clustered.centroids.ndim == 2 and clustered.vector_dim == 1 else
            "scaled channel" if clustered.scales is not None else "tensor"),
        **({"vector_dim": clustered.vector_dim, "codebook_entries": int(clustered.entries)}
           if clustered.vector_dim > 1 else {}),
        "elements": int(w.size),
        "distinct_values": int(np.unique(snapped).size),
        "mse": float(np.mean((snapped.astype(np.float64) - w) ** 2)),
        "relative_mse": float(np.mean((snapped.astype(np.float64) - w) ** 2) / max(float(np.mean(w.astype(np.float64) ** 2)), 1e-30)),
        "bytes_before": int(w.nbytes),
        "bytes_after": int(packed_labels.nbytes + side_bytes if storage == "codebook" else snapped.nbytes),
        "label_bits": label_bits,
        "zlib_bytes_before": len(zlib.compress(np.ascontiguousarray(w).tobytes(), 9)),
        "zlib_bytes_after": (
            len(zlib.compress(packed_labels.tobytes(), 9)) + side_bytes
            if storage == "codebook"
            else len(zlib.compress(np.ascontiguousarray(snapped).tobytes(), 9))
        ),
        "huffman_bits_per_weight": float(huffman),
        "entropy_bytes": int(np.ceil(w.size * huffman / 8)) + side_bytes,
        **(sparse if encoding is not None else {}),
    }


def _rows_layout(target: ClusterTarget, w: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]] | None:
    """``w`` as ``[outputs, inputs]`` in the Hessian's feature order, and the way back; None for
    a tensor whose consumer is not a Conv, Gemm or MatMul."""
    layout = _rows_layout_transposed(target, w)
    return None if layout is None else layout[:2]


def _rows_layout_transposed(target: ClusterTarget, w: np.ndarray
                            ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], bool] | None:
    """:func:`_rows_layout` and whether the layout is ``w`` transposed (a ``[in, out]`` weight)."""
    user = next((u.node for u in target.value.uses()), None)
    if user is None:
        return None
    from onnxcomp.ops import linear_spec, weight_axes

    spec = linear_spec(user)
    if spec is None or spec.role("weight") is None or w.ndim < 2 or target.value is not user.inputs[1]:
        return None
    out_axis, in_axis = weight_axes(user)
    if out_axis % w.ndim == 0 and in_axis % w.ndim == 1:  # outputs first: Conv [out, in, k...], Gemm with transB
        return w.reshape(w.shape[0], -1), lambda a: a.reshape(w.shape), False
    if w.ndim == 2:  # MatMul, Gemm [in, out]
        return w.T, lambda a: a.T, True
    return None


def _compensated(w: np.ndarray, clustered: _Clustered, h: np.ndarray, target: ClusterTarget) -> _Clustered:
    """``clustered`` with its labels chosen by GPTQ-style compensation (``ClusterConfig.compensate``);
    the codebook and scales stay. Keeps ``clustered`` when the layout or Hessian does not fit or
    the compensated assignment errs more on ``h``."""
    from onnxcomp.blas import blas_threads
    from onnxcomp.quant.gptq import gptq_snap, output_error

    layout = _rows_layout(target, w)
    if layout is None:
        return clustered
    w_nk, back = layout
    layout_of = lambda a: _rows_layout(target, a)[0]  # noqa: E731
    n, k = w_nk.shape
    if h.shape[-1] != k or n % h.shape[0]:
        return clustered
    centroids = np.asarray(clustered.centroids, np.float64)
    table = np.broadcast_to(centroids, (n, centroids.shape[-1])) if centroids.ndim == 1 else centroids
    if clustered.scales is not None:
        table = table * np.asarray(clustered.scales, np.float64).reshape(n, 1)
    zero_col = np.flatnonzero(np.all(table == 0, axis=0))
    pruned = (w_nk == 0) if zero_col.size else np.zeros_like(w_nk, bool)
    labels = np.zeros((n, k), np.int64)
    groups = h.shape[0]
    rows = n // groups
    out = np.zeros((n, k))
    for g in range(groups):
        part = slice(g * rows, (g + 1) * rows)
        tab = table[part]

        def snap(col: np.ndarray, j: int, tab=tab, part=part) -> np.ndarray:
            idx = np.argmin(np.abs(col[:, None] - tab), axis=1)
            if zero_col.size:
                idx = np.where(pruned[part, j], zero_col[0], idx)
            labels[part, j] = idx
            return tab[np.arange(tab.shape[0]), idx]

        with blas_threads(1):
            got = gptq_snap(w_nk[part], h[g], snap)
        if got is None:
            return clustered
        out[part] = got
    w_nk64 = np.asarray(w_nk, np.float64)
    nearest = np.asarray(layout_of(clustered.snapped), np.float64)

    def error(a: np.ndarray) -> float:
        return sum(output_error(w_nk64[g * rows:(g + 1) * rows], a[g * rows:(g + 1) * rows], h[g]) for g in range(groups))

    if not error(out) < error(nearest):
        return clustered
    return dataclasses.replace(clustered, snapped=np.ascontiguousarray(back(out).astype(np.float32)),
                               labels=np.ascontiguousarray(back(labels)).astype(clustered.labels.dtype))


def allocate_widths(options: dict[str, dict[int, tuple[float, float]]], budget: float) -> dict[str, int]:
    """A width per tensor that keeps the summed error low with the summed bytes within ``budget``.

    ``options``: tensor -> width -> (error, bytes). The multiple-choice knapsack solved by dynamic
    programming over the bytes above every tensor's smallest option, counted in units of at most
    1/:data:`_ALLOCATION_UNITS` of the budget: once with each option's bytes rounded up (the
    solution fits) and once rounded down (kept where it fits in bytes: rounding up can cost the
    optimum when it spends the budget to within the rounding's few hundred bytes); the bytes the rounding leaves are then spent by :func:`_fill_widths` (the
    upgrades with the largest error drop per byte that still fit). The greedy solution (:func:`_fill_widths`
    from the smallest options) is kept instead where it errs less. The greedy alone leaves bytes
    unspent when the next upgrade it wants is larger than what is left (PP-OCRv4 rec at 10x: its
    CTC head stayed at 2 bits with 20-40 KB of the budget unused); the dynamic programme trades
    upgrades elsewhere for it. When even the smallest options exceed the budget they are kept
    (the caller reports it)."""
    smallest = {name: min(row, key=lambda b: (row[b][1], row[b][0])) for name, row in options.items()}
    greedy = _fill_widths(options, smallest, budget)
    base = sum(options[n][b][1] for n, b in smallest.items())
    if base > budget or not options:
        return greedy

    def total(w: dict[str, int]) -> tuple[float, float]:
        return (sum(options[n][b][0] for n, b in w.items()), sum(options[n][b][1] for n, b in w.items()))

    found = [greedy]
    for rounding in (np.ceil, np.floor):  # up: always fits; down: often better, kept where it fits
        chosen = _knapsack(options, smallest, budget - base, rounding)
        if total(chosen)[1] <= budget:
            found.append(_fill_widths(options, chosen, budget))
    return min(found, key=lambda w: total(w)[0])


def _knapsack(options: dict[str, dict[int, tuple[float, float]]], smallest: dict[str, int], spare: float,
              rounding: Callable[[float], float]) -> dict[str, int]:
    """The dynamic programme of :func:`allocate_widths`: the widths of least summed error whose
    bytes above ``smallest`` fit ``spare``, each option's extra bytes counted in units of
    ``spare / _ALLOCATION_UNITS`` (at least 1), rounded by ``rounding`` (up: the solution fits;
    down: it may not, the caller checks)."""
    unit = max(1.0, spare / _ALLOCATION_UNITS)
    cap = int(spare // unit)
    names = list(options)

    def units_of(name: str, b: int) -> int:
        return int(rounding(max(options[name][b][1] - options[name][smallest[name]][1], 0) / unit - 1e-9 *
                            (1 if rounding is np.ceil else -1)))

    best = np.zeros(cap + 1)  # least summed error of the tensors so far within c units
    choices: list[tuple[list[int], np.ndarray]] = []
    for name in names:
        widths = list(options[name])
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, np.int16)
        for i, b in enumerate(widths):
            units = units_of(name, b)
            if units > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[units:] = best[:cap + 1 - units] + options[name][b][0]
            better = cand < new
            new = np.where(better, cand, new)
            pick = np.where(better, i, pick)
        best = new
        choices.append((widths, pick))
    chosen: dict[str, int] = {}
    c = cap
    for name, (widths, pick) in zip(reversed(names), reversed(choices)):
        chosen[name] = widths[int(pick[c])]
        c -= units_of(name, chosen[name])
    return {n: chosen[n] for n in names}


#: :func:`allocate_widths`: the dynamic programme counts bytes in at most this many units.
_ALLOCATION_UNITS = 32768


def _fill_widths(options: dict[str, dict[int, tuple[float, float]]], widths: dict[str, int],
                 budget: float) -> dict[str, int]:
    """``widths`` upgraded while the budget allows: each time the one upgrade (a tensor to any
    option that errs less) with the largest error reduction per extra byte that still fits (the
    greedy solution of the knapsack, exact on convex error-size curves)."""
    widths = dict(widths)
    spent = sum(options[n][b][1] for n, b in widths.items())
    while True:
        best: tuple[float, str, int] | None = None
        for name, b in widths.items():
            err, size = options[name][b]
            for nb, (nerr, nsize) in options[name].items():
                extra = nsize - size
                if nerr >= err or spent + extra > budget:
                    continue
                gain = (err - nerr) / max(extra, 1e-9)
                if best is None or gain > best[0]:
                    best = (gain, name, nb)
        if best is None:
            return widths
        _, name, nb = best
        spent += options[name][nb][1] - options[name][widths[name]][1]
        widths[name] = nb


#: ``refit_codebook``: codebooks of more entries are left as k-means and the assignment made them.
_REFIT_MAX_K = 16


def _refit_codebook(w: np.ndarray, clustered: _Clustered, h: np.ndarray, target: ClusterTarget) -> _Clustered:
    """``clustered`` with its channel scales and then its codebook re-fitted to its labels by least
    squares on ``h`` (``ClusterConfig.refit_codebook``); kept only where ``tr(dW H dW^T)`` drops."""
    layout = _rows_layout(target, w)
    if layout is None:
        return clustered
    w_nk = np.asarray(layout[0], np.float64)
    back = layout[1]
    n, k = w_nk.shape
    if h.shape[-1] != k or n % h.shape[0]:
        return clustered
    groups = h.shape[0]
    hg = np.asarray(h, np.float64)
    labels = np.asarray(_rows_layout(target, clustered.labels)[0], np.int64)
    cents = np.asarray(clustered.centroids, np.float64)
    K = cents.size
    half = clustered.scales is not None and clustered.scales.dtype == np.float16
    scales = np.ones(n) if clustered.scales is None else np.asarray(clustered.scales, np.float64)

    def times_h(a: np.ndarray) -> np.ndarray:  # a [n, k] @ h per group
        return np.matmul(a.reshape(groups, n // groups, k), hg).reshape(n, k)

    wh = times_h(w_nk)

    def error(c: np.ndarray, sc: np.ndarray) -> float:
        d = w_nk - sc[:, None] * c[labels]
        return float(np.sum(times_h(d) * d))

    before = error(cents, scales)
    new_scales = scales
    if clustered.scales is not None:
        q = cents[labels]
        qh = times_h(q)
        num, den = np.sum(qh * w_nk, axis=1), np.sum(qh * q, axis=1)
        ok = (den > 0) & (num > 0)
        new_scales = np.where(ok, num / np.where(ok, den, 1.0), scales)
        if half:
            new_scales = np.where(_float16_close(new_scales), new_scales.astype(np.float16), scales)
            new_scales = np.asarray(new_scales, np.float64)
    free = [a for a in range(K) if cents[a] != 0.0]
    a_mat = np.zeros((K, K))
    rhs = np.zeros(K)
    flat = labels.reshape(-1)
    for a in free:
        m_a = new_scales[:, None] * (labels == a)
        rhs[a] = float(np.sum(wh * m_a))
        a_mat[a] = np.bincount(flat, weights=(times_h(m_a) * new_scales[:, None]).reshape(-1), minlength=K)
    sub = np.ix_(free, free)
    new_cents = cents.copy()
    with contextlib.suppress(np.linalg.LinAlgError):
        new_cents[free] = np.linalg.solve(a_mat[sub] + 1e-12 * np.trace(a_mat[sub]) * np.eye(len(free)), rhs[free])
    int8_scale = clustered.int8_scale
    if int8_scale is not None:
        qc, int8_scale = int8_symmetric(new_cents.astype(np.float32))
        new_cents = qc.astype(np.float64) * float(int8_scale)
    new_cents = new_cents.astype(np.float32).astype(np.float64)
    if not error(new_cents, new_scales) < before:
        return clustered
    out_scales = None if clustered.scales is None else new_scales.astype(clustered.scales.dtype)
    snapped = (np.asarray(new_cents, np.float32)[labels] * (1 if out_scales is None else out_scales.astype(np.float32)[:, None]))
    return dataclasses.replace(clustered, snapped=np.ascontiguousarray(back(snapped.astype(np.float32))),
                               centroids=new_cents.astype(np.float32), scales=out_scales, int8_scale=int8_scale)


def _swap_round(probe: OutputProbe, options: dict[str, dict[int, _Clustered]], sizes: dict[str, dict[int, int]],
                widths: dict[str, int], budget: float) -> tuple[dict[str, int], dict[str, Any]]:
    """One round of ``sensitivity_rounds``: with every tensor at its width, each tensor's output
    error one width up and one down is measured in that context (the others shared, not float);
    then the upgrades with the largest error drop per byte are taken, each paid by the downgrades
    that cost least per byte when the budget is short, as long as the drop exceeds what they
    cost. Returns the new widths and what was measured and moved."""
    names = [n for n in widths if n in probe.names]
    current = {n: options[n][widths[n]].snapped for n in names}
    base = probe(current)
    ups: list[tuple[float, str, int, int, float]] = []  # (gain per byte, name, width, extra bytes, gain)
    downs: list[tuple[float, str, int, int, float]] = []  # (loss per byte, name, width, saved bytes, loss)
    for n in names:
        order = sorted(options[n])
        i = order.index(widths[n])
        if i + 1 < len(order):
            b = order[i + 1]
            gain = base - probe({**current, n: options[n][b].snapped})
            extra = sizes[n][b] - sizes[n][widths[n]]
            if gain > 0:
                ups.append((gain / max(extra, 1), n, b, extra, gain))
        if i > 0:
            b = order[i - 1]
            loss = probe({**current, n: options[n][b].snapped}) - base
            saved = sizes[n][widths[n]] - sizes[n][b]
            downs.append((max(loss, 0.0) / max(saved, 1), n, b, saved, max(loss, 0.0)))
    ups.sort(key=lambda u: -u[0])
    downs.sort(key=lambda d: d[0])
    spent = sum(sizes[n][b] for n, b in widths.items())
    new = dict(widths)
    moves: list[str] = []
    touched: set[str] = set()
    for _, name, b, extra, gain in ups:
        if name in touched:
            continue
        paid, loss, chosen = 0, 0.0, []
        for _, dn, db, saved, dloss in downs:
            if spent + extra - paid <= budget:
                break
            if dn in touched or dn == name:
                continue
            paid, loss = paid + saved, loss + dloss
            chosen.append((dn, db))
        if spent + extra - paid > budget or loss >= gain:
            continue
        new[name] = b
        touched.add(name)
        moves.append(f"{name}: {widths[name]} -> {b}")
        for dn, db in chosen:
            new[dn] = db
            touched.add(dn)
            moves.append(f"{dn}: {widths[dn]} -> {db}")
        spent += extra - paid
    return new, {"output_error": base, "moves": moves}


def _probed_widths(widths: list[int], bits_per_weight: float, every: bool) -> list[int]:
    """The candidate widths whose model output error ``sensitivity="output"`` measures: every one
    (``output-all``), else the two nearest below or at ``bits_per_weight`` (where the budget puts
    most tensors; the smallest ones when none is below)."""
    if every or len(widths) <= 2:
        return list(widths)
    below = [b for b in widths if b <= bits_per_weight]
    return below[-2:] if len(below) >= 2 else widths[:2]


def _stored_bytes(clustered: _Clustered, bits: float, codebook_int8: bool) -> int:
    """What the ``sparse`` format stores for one tensor at ``bits`` bits per label, densely packed:
    its labels, its codebook (int8 plus a float32 scale with ``codebook_int8``) and channel scales."""
    book = clustered.centroids.size + 4 if codebook_int8 and (
        clustered.centroids.ndim == 1 or clustered.vector_dim > 1) else clustered.centroids.nbytes
    label_bits = round(bits * clustered.vector_dim)  # a vector's label: bits per weight x d
    return -(-clustered.labels.size * label_bits // 8) + book + (0 if clustered.scales is None else clustered.scales.nbytes)


def _relative_error(w: np.ndarray, clustered: _Clustered, h: np.ndarray | None, target: ClusterTarget) -> float:
    """The tensor's relative output error ``tr(dW H dW^T) / tr(W H W^T)`` on its layer-input
    Hessian ``h`` (all groups together), or its relative weight error ``||dW||^2 / ||W||^2`` where
    there is no Hessian that fits."""
    layout = _rows_layout(target, w) if h is not None else None
    if layout is not None and h.shape[-1] == layout[0].shape[1] and layout[0].shape[0] % h.shape[0] == 0:
        w_nk = np.asarray(layout[0], np.float64)
        dw = w_nk - np.asarray(_rows_layout(target, clustered.snapped)[0], np.float64)
        rows = w_nk.shape[0] // h.shape[0]
        num = den = 0.0
        for g in range(h.shape[0]):
            part = slice(g * rows, (g + 1) * rows)
            num += float(np.sum((dw[part] @ h[g]) * dw[part]))
            den += float(np.sum((w_nk[part] @ h[g]) * w_nk[part]))
        if den > 0:
            return max(num, 0.0) / den
    wd = np.asarray(w, np.float64)
    energy = float(np.sum(wd**2))
    return float(np.sum((wd - clustered.snapped) ** 2)) / energy if energy > 0 else 0.0


class OutputProbe:
    """The relative output error of a model with some of its weights replaced, on a few feeds:
    ``probe({name: array})`` -> ``sum ||y - y0||^2 / sum ||y0||^2`` over every float output and
    feed (``y0``: the outputs with the weights as they are). One onnxruntime session, in which the
    weights ``names`` are inputs with their values as defaults (built on ``model`` with the
    weights listed as graph inputs for the session's creation only; ``model`` is left as it was)."""

    def __init__(self, model: ir.Model, names: list[str], feeds: list[dict[str, np.ndarray]]):
        from onnxcomp.runtime import create_session, session_options

        values = [model.graph.initializers[n] for n in names if n in model.graph.initializers]
        inputs = model.graph.inputs
        inputs.extend(values)
        try:
            self.session = create_session(model, sess_options=session_options("all"))
        finally:
            for _ in values:
                inputs.pop()
        self.names = {v.name for v in values}
        self.floats = [i for i, o in enumerate(self.session.get_outputs()) if o.type == "tensor(float)"]
        self.feeds = feeds
        self.reference = [self._outputs_one(f, {}) for f in feeds]
        batched = _batched(feeds)
        if batched is not None:  # one run on the feeds stacked, where it gives the same outputs
            with contextlib.suppress(Exception):
                joined = [np.concatenate(ys) for ys in zip(*self.reference)]
                got = self._outputs_one(batched, {})
                if all(g.shape == j.shape and np.allclose(g, j, rtol=1e-3, atol=1e-5) for g, j in zip(got, joined)):
                    self.feeds, self.reference = [batched], [got]
        self.energy = sum(float(np.sum(y.astype(np.float64) ** 2)) for ys in self.reference for y in ys)

    def _outputs_one(self, feed: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.session.run(None, {**feed, **weights})
        return [out[i] for i in self.floats]

    def __call__(self, weights: dict[str, np.ndarray]) -> float:
        err = 0.0
        for feed, ref in zip(self.feeds, self.reference):
            for y, y0 in zip(self._outputs_one(feed, weights), ref):
                err += float(np.sum((y.astype(np.float64) - y0) ** 2))
        return err / self.energy if self.energy > 0 else err


def _batched(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """The feeds stacked along their first axis, when there are several of equal shapes."""
    if len(feeds) < 2 or any(f.keys() != feeds[0].keys() for f in feeds):
        return None
    if any(np.ndim(f[k]) == 0 or np.shape(f[k]) != np.shape(feeds[0][k]) for f in feeds for k in f):
        return None
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def output_probe(model: ir.Model, config: ClusterConfig, data: Any) -> OutputProbe | None:
    """The :class:`OutputProbe` of ``sensitivity="output"`` on the main graph's clustered weights."""
    from onnxcomp.data import load_data

    if data is None:
        return None
    targets, _ = find_cluster_targets(model, config)
    names = [t.name for t in targets if t.value.graph is model.graph]
    if not names:
        return None
    feeds = [dict(f) for f in load_data(data, model, limit=config.sensitivity_samples)]
    return OutputProbe(model, names, feeds)


def cluster_hessians(model: ir.Model, config: ClusterConfig, data: Any, *, progress=None) -> dict[str, np.ndarray]:
    """Per clustered weight, the layer-input Hessian of its Conv/Gemm/MatMul consumers from
    ``data`` (``ClusterConfig.compensate``)."""
    from onnxcomp.data import load_data
    from onnxcomp.graph import name_nodes
    from onnxcomp.quant.gptq import weight_hessians

    name_nodes(model)
    targets, _ = find_cluster_targets(model, config)
    # tensors already of at most K values (shared by the sparsity stage) are stored as they are
    names = {t.name for t in targets if np.unique(t.value.const_value.numpy()).size > config.k}
    nodes = [n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1
             and n.inputs[1] is not None and n.inputs[1].name in names]
    if not nodes:
        return {}
    return weight_hessians(model, nodes, load_data(data, model, limit=config.max_samples), progress=progress)
