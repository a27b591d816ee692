"""The transformer path: onnxruntime's encoder fusions first, then int8 inside the fused kernels.

BERT-class encoders (MiniLM, BERT, RoBERTa, DistilBERT exports) run fastest on onnxruntime's CPU
provider with some of its fused contrib ops: ``Attention`` (Q/K/V projections, scaled dot product,
mask and softmax in one kernel), ``BiasGelu`` and ``EmbedLayerNormalization`` (the three embedding
lookups, their sum and the first LayerNormalization, and the mask index). onnxruntime's session
optimizer does not form these; its transformer optimizer (``onnxruntime.transformers.optimizer``,
shipped in the onnxruntime package) does, on the float graph, and only when it recognises the
exported pattern. Its ``SkipLayerNormalization`` (residual Add + LayerNormalization) is left out
(:data:`LEFT_OUT`): onnxruntime's CPU kernel for it is several times slower than the pair it replaces.

The path (``QuantizeConfig.transformer``: ``auto`` | ``on`` | ``off``):

1. :func:`detect_encoder` finds the attention geometry an encoder export shows: a Reshape to
   ``[batch, seq, heads, head_size]`` feeding a Transpose ``[0, 2, 1, 3]`` (the head split) next
   to a Softmax. ``auto`` takes the path only when it finds one; ``on`` insists (and errors when
   there is none).
2. :func:`fuse_encoder` runs the transformer optimizer with that geometry (the protobuf round trip
   is :func:`onnxcomp.io.rewrite_as_proto`) and reports, per fusion, how many nodes it formed and,
   for the ones that did not fire, why (:data:`FUSIONS`).
3. The chosen mode then quantizes the MatMuls left outside the fused ops (attention output
   projection, both feed-forward MatMuls) as usual, and :class:`QAttentionPass` turns each float
   ``Attention`` into ``QAttention``: int8 per-column Q/K/V weights (7 bits where the CPU needs
   them, see :mod:`onnxcomp.quant.kernels`), its input quantized to uint8 at run time by a
   ``DynamicQuantizeLinear``. onnxruntime keeps both as int8 kernels: :func:`fused_ops` reads its
   optimized graph and the quantize report's ``onnxruntime`` section counts them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxcomp.errors import ConfigError
from onnxcomp.graph import add_initializer, all_value_names, infer_types, restore_model, unique_name
from onnxcomp.io import rewrite_as_proto
from onnxcomp.ops import is_gelu_node, is_matmul_node
from onnxcomp.quant.primitives import quantize_weight
from onnxcomp.runtime import ort_optimized_model, session_options
from onnxcomp.selection import NodeSelector

__all__ = [
    "FUSIONS",
    "LEFT_OUT",
    "EncoderGeometry",
    "detect_encoder",
    "fuse_encoder",
    "QAttentionPass",
    "quantize_attention",
    "fused_ops",
    "ffn_output_matmuls",
    "ffn_output_notes",
    "keep_coarse_ffn_outputs_float",
    "keep_ffn_output_float",
    "TRANSFORMER_SETTINGS",
]

TRANSFORMER_SETTINGS = ("auto", "on", "off")
MS_DOMAIN = "com.microsoft"

#: The fusions of onnxruntime's transformer optimizer this path reports, with what each one needs
#: and the usual reason it does not fire.
FUSIONS: dict[str, str] = {
    "EmbedLayerNormalization": (
        "word/position/token-type Gather -> Add -> LayerNormalization at the graph inputs: not matched "
        "(embeddings computed another way, or no token-type input)"
    ),
    "Attention": (
        "Q/K/V MatMul+Add -> Reshape -> Transpose -> MatMul -> scale -> mask Add -> Softmax -> MatMul: not "
        "matched (a fused scaled_dot_product_attention export, or a mask computed in a form the optimizer "
        "does not know)"
    ),
    "MultiHeadAttention": "only formed when Q/K/V come from different inputs (not in a self-attention encoder)",
    "SkipLayerNormalization": "residual Add -> LayerNormalization: not matched",
    "BiasGelu": "MatMul bias Add -> Gelu (Erf form): not matched (a tanh-approximated or fused Gelu)",
    "FastGelu": "only formed from the tanh approximation of Gelu",
    "Gelu": "Erf-based Gelu subgraph: not matched",
    "LayerNormalization": "ReduceMean/Sub/Pow/Sqrt/Div subgraph: not matched (already one op)",
}

#: Fusions of onnxruntime's transformer optimizer this path leaves out, with why (measured, not
#: assumed). onnxruntime 1.32's CPU ``SkipLayerNormalization`` kernel normalizes row by row in plain
#: loops (a division per element): on all-MiniLM-L6-v2 at batch 8 x 128 tokens one took 2.07 ms where
#: the residual Add and ``LayerNormalization`` it replaces took 0.44 ms together (onnxruntime's
#: profiler, one intra-op thread), 18 ms of a 98 ms int8 run (benchmarks/RESULTS.md, tenth session).
#: Its bias variant goes with it. onnxruntime's session optimizer still forms it where the residual
#: Add has fully static 3-D shapes; a dynamic-sequence export keeps the faster pair.
LEFT_OUT: dict[str, tuple[tuple[str, ...], str]] = {
    "SkipLayerNormalization": (
        ("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
        "left out: onnxruntime's CPU SkipLayerNormalization kernel is slower than the residual Add and "
        "LayerNormalization it replaces (2.07 ms against 0.44 ms at batch 8 x 128 x 384)",
    ),
}

_HEAD_SPLIT_PERM = (0, 2, 1, 3)

_F, _I = ir.DataType.FLOAT, ir.DataType.INT32
#: Output types of the fused contrib ops (onnx's shape inference does not know them), and which
#: outputs have the shape of input 0.
_FUSED_OUTPUTS: dict[str, tuple[tuple[ir.DataType, ...], tuple[int, ...]]] = {
    "Attention": ((_F, _F), (0,)),
    "QAttention": ((_F, _F), (0,)),
    "SkipLayerNormalization": ((_F, _F, _F, _F), (0, 3)),
    "BiasGelu": ((_F,), (0,)),
    "FastGelu": ((_F,), (0,)),
    "Gelu": ((_F,), (0,)),
    "EmbedLayerNormalization": ((_F, _I, _F), ()),
}


@dataclasses.dataclass(frozen=True)
class EncoderGeometry:
    """Attention geometry found in an encoder graph."""

    num_heads: int
    hidden_size: int
    layers: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A value's constant content: an initializer, a Constant node, or Unsqueeze/Concat of those."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    if node.op_type == "Unsqueeze":
        inner = _constant(node.inputs[0])
        return None if inner is None else inner.reshape(-1)
    if node.op_type == "Concat":
        parts = [_constant(v) for v in node.inputs]
        return None if any(p is None for p in parts) else np.concatenate([p.reshape(-1) for p in parts])
    return None


def _shape_tail(value: ir.Value) -> tuple[int, int] | None:
    """The last two entries of a Reshape target ``[b, s, heads, head_size]`` when they are constant."""
    node = value.producer()
    if node is not None and node.op_type == "Concat" and len(node.inputs) == 4:
        tail = [_constant(v) for v in node.inputs[2:]]
        if all(t is not None and t.size == 1 for t in tail):
            return int(tail[0].reshape(-1)[0]), int(tail[1].reshape(-1)[0])
    full = _constant(value)
    if full is not None and full.size == 4:
        return int(full[2]), int(full[3])
    return None


def _projection_width(value: ir.Value) -> int | None:
    """Output width of the projection (MatMul with a constant weight, then a bias Add) producing ``value``."""
    node = value.producer()
    for _ in range(2):
        if node is None:
            return None
        for v in node.inputs:
            c = v.const_value if v is not None else None
            if c is not None and len(c.shape) in (1, 2) and (node.op_type == "MatMul" or len(c.shape) == 1):
                return int(c.shape[-1])
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return None


def detect_encoder(model: ir.Model) -> tuple[EncoderGeometry | None, str]:
    """The encoder's attention geometry, or None and why it is not an encoder-style graph."""
    found: collections.Counter[tuple[int, int]] = collections.Counter()
    softmax = sum(1 for n in model.graph if n.op_type == "Softmax")
    fused = sum(1 for n in model.graph if n.op_type in ("Attention", "MultiHeadAttention") and n.domain == MS_DOMAIN)
    if fused:
        return None, f"already holds {fused} fused attention node(s)"
    for node in model.graph:
        if node.op_type != "Reshape" or len(node.inputs) < 2:
            continue
        users = [u for u in node.outputs[0].consumers() if u.op_type == "Transpose"]
        perms = [tuple(u.attributes["perm"].as_ints()) for u in users if "perm" in u.attributes]
        if _HEAD_SPLIT_PERM not in perms and (0, 2, 3, 1) not in perms:
            continue
        tail = _shape_tail(node.inputs[1])
        if tail is not None and tail[0] <= 0 < tail[1]:  # [b, s, -1, head_size]: heads from the projection width
            width = _projection_width(node.inputs[0])
            tail = (width // tail[1], tail[1]) if width and width % tail[1] == 0 else None
        if tail is not None and tail[0] > 0 and tail[1] > 0:
            found[tail] += 1
    if not found or not softmax:
        return None, "no attention head split (Reshape to [batch, seq, heads, head_size] -> Transpose) next to a Softmax"
    (heads, head_size), count = found.most_common(1)[0]
    return EncoderGeometry(heads, heads * head_size, max(softmax, count // 3)), "encoder attention found"


@contextlib.contextmanager
def _quiet_optimizer():
    """onnxruntime's transformer optimizer logs every step; keep it to errors."""
    loggers = [logging.getLogger(n) for n in ("onnxruntime.transformers", "onnx_model", "fusion_base",
                                                "onnx_model_bert", "fusion_utils", "fusion_attention",
                                                "fusion_skiplayernorm", "fusion_embedlayer", "optimizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fuse_encoder(work: ir.Model, geometry: EncoderGeometry, *, embed_layer_norm: bool = True) -> dict[str, Any]:
    """Run onnxruntime's transformer optimizer on ``work`` (in place); the fusions it formed.

    ``embed_layer_norm=False`` leaves the embedding lookups as Gathers (EmbedLayerNormalization
    runs in float and hides the word table, which embedding quantization then cannot reach).

    Returns ``{"geometry", "fused": {op: count}, "not_fused": {op: reason}, "nodes_before", "nodes_after"}``.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    stats: dict[str, int] = {}

    def rewrite(proto):
        options = FusionOptions("bert")
        options.enable_gelu_approximation = False  # exact Gelu: the check compares against float
        options.enable_embed_layer_norm = embed_layer_norm
        for switches, _ in LEFT_OUT.values():
            for switch in switches:
                setattr(options, switch, False)
        with _quiet_optimizer():
            optimized = optimize_by_fusion(proto, "bert", geometry.num_heads, geometry.hidden_size, options)
            stats.update(optimized.get_fused_operator_statistics())
        return optimized.model

    before = sum(1 for _ in work.graph)
    norms_before = sum(1 for n in work.graph if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx"))
    fused_model = rewrite_as_proto(work, rewrite)
    restore_model(work, fused_model)
    if any(n.domain == MS_DOMAIN for n in work.graph):
        work.opset_imports.setdefault(MS_DOMAIN, 1)  # the optimizer does not always declare it
    infer_types(work)
    type_fused_ops(work)
    infer_types(work)  # again: values after the fused ops get their types from them
    fused = {op: int(n) for op, n in stats.items() if n and op in FUSIONS}
    # the optimizer counts every LayerNormalization in its output, the exported ones too
    formed = stats.get("LayerNormalization", 0) - norms_before
    fused.pop("LayerNormalization", None)
    if formed > 0:
        fused["LayerNormalization"] = formed
    not_fused = {op: LEFT_OUT[op][1] if op in LEFT_OUT else FUSIONS[op]
                 for op in ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu")
                 if not stats.get(op)}
    if not embed_layer_norm:
        not_fused["EmbedLayerNormalization"] = ("left out: the embedding tables are quantized (GatherBlockQuantized) "
                                                "instead; embedding_bits=0 keeps them float and fuses them")
        fused.pop("EmbedLayerNormalization", None)
    return {"geometry": geometry.to_dict(), "fused": fused, "not_fused": not_fused,
            "nodes_before": before, "nodes_after": sum(1 for _ in work.graph)}


def type_fused_ops(model: ir.Model) -> None:
    """Fill in the output types (and same-as-input shapes) of the fused contrib ops, in place."""
    for node in model.graph.all_nodes():
        if node.domain != MS_DOMAIN or node.op_type not in _FUSED_OUTPUTS:
            continue
        dtypes, same_shape = _FUSED_OUTPUTS[node.op_type]
        for i, out in enumerate(node.outputs):
            if out.dtype is None and i < len(dtypes):
                out.dtype = dtypes[i]
            if i in same_shape and out.shape is None and node.inputs[0] is not None and node.inputs[0].shape is not None:
                out.shape = ir.Shape(node.inputs[0].shape)


class QAttentionPass:
    """Every float ``com.microsoft.Attention`` with a constant ``[H, 3H]`` weight -> ``QAttention``.

    The input is quantized to uint8 at run time (``DynamicQuantizeLinear``), the weight to int8
    per output column (symmetric, zero point 0; 7 bits when ``reduce_range``). Attention nodes with
    ``past``, an attention bias or separate Q/K/V hidden sizes stay float (QAttention has no such
    inputs) and are reported with the reason.
    """

    def __init__(self, *, per_channel: bool = True, reduce_range: bool = True, exclude: tuple[str, ...] = ()) -> None:
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.selector = NodeSelector((), tuple(exclude))

    def __call__(self, model: ir.Model) -> dict[str, Any]:
        graph = model.graph
        taken = all_value_names(graph)
        done: list[str] = []
        skipped: dict[str, str] = {}
        for node in list(graph):
            if node.op_type != "Attention" or node.domain != MS_DOMAIN:
                continue
            reason = self._reason(node)
            if reason is None and self.selector.excluded(node.name or "", node.op_type):
                reason = "excluded"
            if reason is not None:
                skipped[node.name] = reason
                continue
            self._rewrite(graph, node, taken)
            done.append(node.name)
        if done:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            RemoveUnusedNodesPass()(model)  # the float Q/K/V weights
        return {"attention_quantized": done, "attention_float": skipped}

    @staticmethod
    def _reason(node: ir.Node) -> str | None:
        inputs = list(node.inputs)
        if len(inputs) < 3 or inputs[1] is None or inputs[1].const_value is None:
            return "its Q/K/V weight is not a constant"
        if any(v is not None for v in inputs[4:]):
            return "uses past state or an attention bias (QAttention has neither)"
        if "qkv_hidden_sizes" in node.attributes:
            return "separate Q/K/V hidden sizes (QAttention needs equal ones)"
        if inputs[2] is None or inputs[2].const_value is None:
            return "no constant bias"
        return None

    def _rewrite(self, graph: ir.Graph, node: ir.Node, taken: set[str]) -> None:
        x, w_v, bias = node.inputs[0], node.inputs[1], node.inputs[2]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        w = w_v.const_value.numpy().astype(np.float32)
        q, scale, _ = quantize_weight(w, "int8", axis=1 if self.per_channel else None, symmetric=True,
                                      reduce_range=self.reduce_range)
        base = node.name or "Attention"
        q_v = add_initializer(graph, f"{w_v.name}_quantized", q, taken)
        s_v = add_initializer(graph, f"{w_v.name}_scale", np.asarray(scale, np.float32), taken)
        zp_v = add_initializer(graph, f"{w_v.name}_zero_point", np.zeros(np.shape(scale), np.int8), taken)
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=unique_name(graph, f"{base}_DynamicQuantizeLinear", taken))
        x_q, x_s, x_zp = dql.outputs
        for v, suffix, dt, shape in ((x_q, "quantized", ir.DataType.UINT8, x.shape), (x_s, "scale", ir.DataType.FLOAT, []),
                                     (x_zp, "zero_point", ir.DataType.UINT8, [])):
            v.name = unique_name(graph, f"{base}_input_{suffix}", taken)
            v.dtype = dt
            v.shape = ir.Shape(shape) if shape is not None else None
        attrs = [a for name, a in node.attributes.items() if name in ("num_heads", "unidirectional", "mask_filter_value", "scale")]
        qatt = ir.Node(MS_DOMAIN, "QAttention", [x_q, q_v, bias, x_s, s_v, mask, x_zp, zp_v], attributes=attrs,
                       num_outputs=1, name=unique_name(graph, f"{base}_QAttention", taken))
        out = node.outputs[0]
        new_out = qatt.outputs[0]
        new_out.dtype = out.dtype or ir.DataType.FLOAT
        new_out.shape = ir.Shape(out.shape) if out.shape is not None else None
        graph.insert_before(node, [dql, qatt])
        name = out.name
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        new_out.name = name
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            raise ConfigError(f"Attention node {node.name!r}: its present-state output is used")


def quantize_attention(model: ir.Model, *, per_channel: bool, reduce_range: bool, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """:class:`QAttentionPass` on ``model`` in place; the names quantized and those kept float."""
    return QAttentionPass(per_channel=per_channel, reduce_range=reduce_range, exclude=exclude)(model)


def fused_ops(model: ir.Model, *, threads: int | None = 1) -> dict[str, int]:
    """Op counts of onnxruntime's optimized graph of ``model`` (what it really runs)."""
    optimized = ort_optimized_model(model, sess_options=session_options("all", threads=threads))
    return dict(sorted(collections.Counter(n.op_type for n in optimized.graph.all_nodes()).items()))


def _token_input(model: ir.Model) -> bool:
    """Whether the model reads integer token ids (a rank-2 integer input feeding a Gather)."""
    for value in model.graph.inputs:
        if value.dtype in (ir.DataType.INT64, ir.DataType.INT32) and value.shape is not None and len(value.shape) == 2:
            if any(c.op_type == "Gather" for c in value.consumers()):
                return True
    return False


def prepare_encoder(work: ir.Model, setting: str, mode: str = "dynamic", *,
                    embed_layer_norm: bool = True) -> dict[str, Any] | None:
    """The first step of the path on the working copy (in place): detect, then fuse.

    ``setting`` ``off``: nothing (None). ``auto``: fuse when the graph is a text encoder (token-id
    input, attention head split) and the mode is static or dynamic (weight-only kernels cannot go
    inside the fused Attention), else a report saying why not. ``on``: fuse any graph with an
    attention head split, or raise :class:`ConfigError`.
    """
    if setting not in TRANSFORMER_SETTINGS:
        raise ConfigError(f"quantize: transformer must be one of {', '.join(TRANSFORMER_SETTINGS)}, got {setting!r}")
    if setting == "off":
        return None
    if setting == "auto" and mode == "weight-only":
        return {"applied": False, "reason": "weight-only kernels (MatMulNBits) cannot run inside a fused Attention"}
    if setting == "auto" and not _token_input(work):
        return {"applied": False, "reason": "no integer token-id input feeding an embedding Gather (not a text encoder)"}
    geometry, why = detect_encoder(work)
    if geometry is None:
        if setting == "on":
            raise ConfigError(f"quantize: --transformer on, but the model is not an encoder-style graph: {why}")
        return {"applied": False, "reason": why}
    report = fuse_encoder(work, geometry, embed_layer_norm=embed_layer_norm)
    if not report["fused"]:
        if setting == "on":
            raise ConfigError("quantize: --transformer on, but onnxruntime's transformer optimizer fused nothing: "
                              + "; ".join(f"{k}: {v}" for k, v in report["not_fused"].items()))
    return {"applied": True, **report}


def ffn_output_matmuls(model: ir.Model) -> list[str]:
    """The MatMuls of the main graph whose activation input is a GELU's output: an encoder's
    feed-forward output projections."""
    found = []
    for node in model.graph:
        if not is_matmul_node(node) or not node.inputs or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        if producer is not None and is_gelu_node(producer):
            found.append(node.name)
    return found


def keep_ffn_output_float(work: ir.Model, config: Any, encoder: dict[str, Any], notes: list[str], *,
                          calibrated: bool = True) -> Any:
    """The feed-forward output MatMuls of a fused encoder that stay float whatever the data says:
    all of them under ``config.ffn_output`` ``float``, and under ``auto`` in dynamic mode without
    calibration data (or with ``split_outliers`` off). They join ``config.exclude`` (neither the
    mode's pass nor SmoothQuant touches them), listed in ``encoder["ffn_output_float"]``; returns
    the config to go on with. Under ``auto`` in static mode, and in dynamic mode with calibration
    data, their names go to ``encoder["ffn_output_matmuls"]`` and the grids decide once the
    outlier split has run (static: the coarse-grid rule; dynamic:
    :func:`keep_coarse_ffn_outputs_float`; :func:`ffn_output_notes` reports the outcome).

    Why: the GELU output they read holds the encoder's largest activation outliers (a few
    channels, growing with the sequence length). On all-MiniLM-L6-v2 (benchmarks/encoders.py,
    tuning split, mean-pooled cosine of 128-token windows of running text):

    * static, GELU outputs smoothed (before they were excluded from SmoothQuant), all six int8:
      0.934; all six float: 0.981; unsmoothed and left to the grid rule (layers 0-3 float, 4-5
      int8): 0.981, and a file of 28.9 MB instead of 32.2 MB (these window figures were measured
      on windows that were 79% padding tokens, a harness bug fixed in the ninth session; on real
      running text every build here reads 0.997-0.998, report split); with ``split_outliers``
      (onnxcomp.quant.outliers) all six int8, 1.2x faster at batch 1, 1.3 points of
      nearest-neighbour agreement lower;
    * dynamic (a range per call, nothing calibrated to judge them by): int8 0.929 (7-bit
      weights, GELU outputs unsmoothed), float 0.996.
    """
    if not encoder.get("applied") or config.mode == "weight-only" or config.ffn_output == "int8":
        return config
    names = [n for n in ffn_output_matmuls(work) if config.selector.allows(n, "MatMul")]
    if not names:
        return config
    if config.ffn_output == "auto" and (config.mode == "static" or calibrated and config.split_outliers):
        encoder["ffn_output_matmuls"] = names  # the grid decides (dynamic: keep_coarse_ffn_outputs_float)
        return config
    encoder["ffn_output_float"] = names
    why = ("dynamic mode has no calibrated range to judge their input by" if config.ffn_output == "auto"
           else "--ffn-output float")
    notes.append(f"{len(names)} feed-forward output MatMuls (reading a GELU) kept float: {why} "
                 "(--ffn-output int8 to quantize them)")
    return dataclasses.replace(config, exclude=(*config.exclude, *names))


def keep_coarse_ffn_outputs_float(work: ir.Model, config: Any, encoder: dict[str, Any],
                                  split: dict[str, Any] | None) -> Any:
    """Dynamic mode with calibration data, ``ffn_output="auto"``: after the outlier split
    (onnxcomp.quant.outliers), the feed-forward output MatMuls whose input's grid is still too
    coarse (``split["left"]``) stay float; the others go int8. Returns the config to go on with."""
    names = encoder.get("ffn_output_matmuls")
    if not names:
        return config
    left = set((split or {}).get("left", {}))
    by_name = {n.name: n for n in work.graph}
    coarse = [n for n in names if n in by_name and by_name[n].inputs[0] is not None
              and by_name[n].inputs[0].name in left]
    if not coarse:
        return config
    encoder["ffn_output_float"] = coarse
    return dataclasses.replace(config, exclude=(*config.exclude, *coarse))


def ffn_output_notes(encoder: dict[str, Any], report: dict[str, Any], notes: list[str]) -> None:
    """After the mode's pass: the nodes this path excluded itself get their own reason in
    ``report["skipped"]`` (not the selection's, which is the user's); under ``ffn_output="auto"`` in
    static mode, which feed-forward output MatMuls the range rules left float
    (``encoder["ffn_output_float"]``) and one note line."""
    skipped = report.get("skipped", {})
    own = {**dict.fromkeys(encoder.get("smoothing", {}).get("mul_nodes", []),
                           "SmoothQuant's scaling Mul: stays float (int8 would quantize the activation twice)"),
           **dict.fromkeys(encoder.get("ffn_output_float", []),
                           "feed-forward output MatMul kept float (--ffn-output; see the note)")}
    for name, why in own.items():
        if skipped.get(name) == "excluded by the selection":
            skipped[name] = why
    names = encoder.pop("ffn_output_matmuls", None)
    if not names:
        return
    kept = [n for n in names if n in skipped]
    encoder["ffn_output_float"] = kept
    if not kept:
        notes.append(f"{len(names)} of {len(names)} feed-forward output MatMuls (reading a GELU) in int8")
        return
    notes.append(f"{len(names) - len(kept)} of {len(names)} feed-forward output MatMuls (reading a GELU) in int8; "
                 f"{len(kept)} left float, their input's range being set by rare large values (see skipped)")


def finish_encoder(work: ir.Model, config: Any, encoder: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """After the mode's pass on a fused encoder: Attention -> QAttention (static and dynamic modes).

    Returns the ``transformer`` section of the quantize report; ``notes`` gets one line naming the
    fusions (or why the path was not taken).
    """
    if not encoder.get("applied"):
        return encoder
    fused = ", ".join(f"{n} {op}" for op, n in encoder["fused"].items()) or "nothing"
    line = f"onnxruntime's transformer optimizer fused {fused}"
    if encoder["not_fused"]:
        line += "; not fused: " + "; ".join(f"{op} ({why})" for op, why in encoder["not_fused"].items())
    if config.mode != "weight-only":
        encoder.update(quantize_attention(work, per_channel=config.per_channel, reduce_range=config.reduce_weights,
                                          exclude=tuple(config.exclude)))
        if encoder["attention_quantized"]:
            line += f"; {len(encoder['attention_quantized'])} Attention as int8 QAttention"
    notes.append(line)
    return encoder


# ------------------------------------------------------------------------------- smoothing


#: alphas tried per activation by :func:`smooth_encoder`.
SMOOTH_ALPHAS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


def _smoothing_groups(model: ir.Model, selector: NodeSelector | None = None) -> dict[ir.Value, list[ir.Node]]:
    """Activations read as input 0 by MatMuls / Attentions with a constant 2-D weight, by activation;
    with ``selector``, only activations none of whose readers it excludes (a float reader gains
    nothing from the scales, and the Mul they may need costs time).

    A GELU's output (the feed-forward output projection's input) is never smoothed. Its outlier
    channels are not the fixed per-channel pattern SmoothQuant assumes (the LayerNorm outputs'
    are): which channels peak, and how far, changes with the input and grows with the sequence
    length, so scales fitted on calibration sentences move the error into weight rows that longer
    inputs then need. On all-MiniLM-L6-v2 (benchmarks/encoders.py, tuning split, static int8 with
    those MatMuls in int8) smoothing them took the mean-pooled cosine of 128-token windows of running
    text to 0.934 (worst window 0.804); without it, 0.981 (worst 0.974), and the Mul it needs costs
    time. SmoothQuant's authors smooth only the inputs that follow a LayerNorm.
    """
    groups: dict[ir.Value, list[ir.Node]] = collections.defaultdict(list)
    graph_inputs = set(model.graph.inputs)
    excluded: set[ir.Value] = set()
    for node in model.graph:  # never a GELU's output (docstring)
        if is_gelu_node(node):
            excluded.update(v for v in node.outputs if v is not None)
    for node in model.graph:
        is_matmul = is_matmul_node(node)
        is_attention = node.op_type == "Attention" and node.domain == MS_DOMAIN
        if not (is_matmul or is_attention) or len(node.inputs) < 2:
            continue
        if selector is not None and not selector.allows(node.name or "", node.op_type):
            if node.inputs[0] is not None:
                excluded.add(node.inputs[0])
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or x in graph_inputs or w is None or w.const_value is None or len(w.const_value.shape) != 2:
            continue
        groups[x].append(node)
    # only activations every consumer of which is such a node can be rescaled for all of them
    return {x: nodes for x, nodes in groups.items() if x not in excluded
            and all(c in nodes or c.op_type not in ("MatMul", "Attention") for c in x.consumers())}


#: Normalizations whose output 0 is ``normalized * gamma + beta`` (inputs: gamma, beta), by op type
#: and domain; their other outputs (mean, inverse deviation, the pre-norm sum) do not depend on them.
_NORM_AFFINE: dict[tuple[str, str], tuple[int, int]] = {
    ("LayerNormalization", ""): (1, 2),
    ("SkipLayerNormalization", MS_DOMAIN): (2, 3),
    ("SkipSimplifiedLayerNormalization", MS_DOMAIN): (2, -1),
    ("EmbedLayerNormalization", MS_DOMAIN): (5, 6),
}


def _const_input(node: ir.Node, idx: int) -> np.ndarray | None:
    v = node.inputs[idx] if 0 <= idx < len(node.inputs) else None
    return None if v is None or v.const_value is None or v.is_graph_input() else v.const_value.numpy()


def _absorb_division(graph: ir.Graph, x: ir.Value, nodes: list[ir.Node], s: np.ndarray, taken: set[str]) -> str | None:
    """Divide the producer of ``x`` by ``s`` per channel when it can absorb it exactly; its op type, or None.

    Possible when every reader of ``x`` is one of the smoothed ``nodes`` (and ``x`` is no graph
    output) and the producer is an ``Attention`` (the V columns of its weight and bias: the
    output is linear in them) or a normalization of :data:`_NORM_AFFINE` (its gamma and beta). A
    post-LN encoder (BERT, MiniLM) also reads every normalized output as the next residual, so
    there nothing can be folded and a ``Mul`` is needed; a pre-LN one feeds the normalized output
    only to the projections (the residual is SkipLayerNormalization's pre-norm sum output).
    """
    producer = x.producer()
    if producer is None or x in graph.outputs or any(c not in nodes for c in x.consumers()):
        return None
    domain = "" if producer.domain in ("", "ai.onnx") else producer.domain
    if producer.op_type == "Attention" and domain == MS_DOMAIN and "qkv_hidden_sizes" not in producer.attributes:
        w, b = _const_input(producer, 1), _const_input(producer, 2)
        if w is None or b is None or producer.outputs[0] is not x:
            return None
        hidden = w.shape[1] // 3
        w, b = w.astype(np.float32).copy(), b.astype(np.float32).copy()
        w[:, 2 * hidden:] /= s
        b[2 * hidden:] /= s
        updates = {1: w, 2: b}
    elif (producer.op_type, domain) in _NORM_AFFINE and producer.outputs[0] is x:
        g_idx, b_idx = _NORM_AFFINE[producer.op_type, domain]
        gamma = _const_input(producer, g_idx)
        if gamma is None or gamma.shape[-1:] != s.shape or (b_idx >= 0 and b_idx < len(producer.inputs)
                                                             and producer.inputs[b_idx] is not None
                                                             and _const_input(producer, b_idx) is None):
            return None
        updates = {g_idx: gamma.astype(np.float32) / s}
        beta = _const_input(producer, b_idx) if b_idx >= 0 else None
        if beta is not None:
            if beta.shape[-1:] != s.shape:
                return None
            updates[b_idx] = beta.astype(np.float32) / s
    else:
        return None
    for idx, value in updates.items():  # new initializers: a shared constant is never changed under another node
        producer.replace_input_with(idx, add_initializer(graph, f"{producer.inputs[idx].name}_smoothed", value, taken))
    return producer.op_type


def smooth_encoder(model: ir.Model, feeds: Any, *, alpha: float | None = None, per_channel: bool = True,
                   reduce_range: bool = True, max_feeds: int = 32, search_rows: int = 2048,
                   selector: NodeSelector | None = None) -> dict[str, Any]:
    """SmoothQuant on a fused encoder (in place): per input channel ``j`` of each activation ``X``
    read by int8-bound MatMuls/Attention, ``X_j / s_j`` and weight row ``j`` times ``s_j`` with
    ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (calibration maxima over ``feeds``).

    ``alpha`` None: chosen per activation among :data:`SMOOTH_ALPHAS` by the simulated int8 error
    of its consumers (uint8 activations per tensor, int8 weights per channel, as
    :mod:`onnxcomp.quant.smoothquant` simulates it); an activation no alpha improves is left alone.

    Exact in float. The division is folded into the producer when that only feeds these MatMuls
    and is an Attention (its V weight columns and bias) or a LayerNormalization /
    SkipLayerNormalization / EmbedLayerNormalization (gamma and beta), see
    :func:`_absorb_division`; otherwise it is one ``Mul`` by a constant before the consumers (in
    a post-LN encoder every normalized output also feeds the next residual, so it cannot absorb
    the scale).
    """
    from onnxcomp.graph import stream_values
    from onnxcomp.quant.smoothquant import SmoothQuantConfig, _ChannelStats, _db, _simulated_error, smoothing_scales

    groups = _smoothing_groups(model, selector)
    if not groups:
        return {"smoothed": 0, "groups": {}}
    rng = np.random.default_rng(0)
    stats = {x.name: _ChannelStats(x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int)
                                   else groups[x][0].inputs[1].const_value.shape[0], search_rows, rng) for x in groups}
    for values in stream_values(model, list(stats), feeds, max_feeds=max_feeds):
        for name, v in values.items():
            stats[name].update(v)
    sim = SmoothQuantConfig(per_channel=per_channel, reduce_weights=reduce_range)
    chosen: dict[ir.Value, np.ndarray] = {}
    described: dict[str, Any] = {}
    for x, nodes in groups.items():
        st = stats[x.name]
        weights = [n.inputs[1].const_value.numpy().astype(np.float32) for n in nodes]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        baseline = _simulated_error(st, weights, np.ones_like(wmax), sim)
        best, best_error = None, baseline
        for a in ((alpha,) if alpha is not None else SMOOTH_ALPHAS):
            error = _simulated_error(st, weights, smoothing_scales(st.absmax, wmax, a), sim)
            if error < best_error or alpha is not None:
                best, best_error = a, error
        described[x.name] = {"alpha": best, "simulated_sqnr_db": _db(best_error), "unsmoothed_sqnr_db": _db(baseline)}
        if best is not None:
            chosen[x] = smoothing_scales(st.absmax, wmax, best).astype(np.float32)
    graph = model.graph
    taken = all_value_names(graph)
    folded: collections.Counter[str] = collections.Counter()
    muls: list[str] = []
    for x, s in chosen.items():
        nodes = groups[x]
        for n in nodes:
            w = n.inputs[1].const_value.numpy().astype(np.float32)
            n.replace_input_with(1, add_initializer(graph, f"{n.inputs[1].name}_smoothed", w * s[:, None], taken))
        absorbed = _absorb_division(graph, x, nodes, s, taken)
        if absorbed is not None:
            folded[absorbed] += 1
            continue
        inv = add_initializer(graph, f"{x.name}_smooth", (1.0 / s).astype(np.float32), taken)
        mul = ir.node("Mul", [x, inv], name=unique_name(graph, f"{x.name}_smooth_Mul", taken))
        out = mul.outputs[0]
        out.name = unique_name(graph, f"{x.name}_smoothed", taken)
        out.dtype = x.dtype or ir.DataType.FLOAT
        out.shape = ir.Shape(x.shape) if x.shape is not None else None
        graph.insert_before(nodes[0], mul)
        for n in nodes:
            n.replace_input_with(0, out)
        muls.append(mul.name)
    RemoveUnusedNodesPass()(model)
    graph.sort()
    return {"smoothed": sum(folded.values()) + len(muls), "folded_into_attention": folded.pop("Attention", 0),
            "folded_into_norm": dict(folded), "mul_inserted": len(muls), "mul_nodes": muls, "groups": described}


#: SmoothQuant alpha of the dynamic encoder path: chosen on the tuning split of the MiniLM benchmark
#: (benchmarks/encoders.py; 0.7-0.75 best, the per-activation search of SMOOTH_ALPHAS was worse there).
ENCODER_SMOOTH_ALPHA = 0.75


#: Whether the default (``smoothquant`` None) smooths an encoder on the transformer path when
#: calibration data is given: chosen on the tuning split of the MiniLM benchmark (benchmarks/encoders.py,
#: RESULTS.md "Transformer encoders at batch 8", second session).
ENCODER_SMOOTHQUANT_DEFAULT = True


def smooth_dynamic_encoder(work: ir.Model, calibration: Any, config: Any, encoder: dict[str, Any]) -> Any:
    """SmoothQuant on a fused encoder (dynamic or static mode): :func:`smooth_encoder` on the
    calibration data (in place, reported in ``encoder["smoothing"]``); returns the config to go on
    with (static mode: without ``smoothquant``, done here; a model off the transformer path in
    static mode is left to the generic pass).

    ``config.smoothquant`` None (the default) smooths an encoder on the transformer path when
    calibration data is given (:data:`ENCODER_SMOOTHQUANT_DEFAULT`); True insists, False never.
    """
    from onnxcomp.data import Dataset

    if config.smoothquant is None:
        if not (ENCODER_SMOOTHQUANT_DEFAULT and encoder.get("applied") and calibration is not None):
            return config
        encoder["smoothquant_default"] = True
    elif not config.smoothquant:
        return config
    if not encoder.get("applied"):
        if config.mode == "static":
            return config
        raise ConfigError("quantize: smoothquant in dynamic mode needs the transformer path (an encoder graph)")
    if calibration is None:
        raise ConfigError(f"quantize: smoothquant in {config.mode} mode needs calibration data (--calibration FILE)")
    data = calibration if isinstance(calibration, Dataset) else Dataset(calibration, work)
    alpha = config.smoothquant_alpha if config.smoothquant_alpha is not None else ENCODER_SMOOTH_ALPHA
    encoder["smoothing"] = smooth_encoder(work, data, alpha=alpha, per_channel=config.per_channel,
                                          reduce_range=config.reduce_weights, max_feeds=config.max_samples or 32,
                                          selector=config.selector)
    if config.mode != "static":
        return config
    # the inserted Muls stay float (a QLinearMul would quantize the activation twice)
    return dataclasses.replace(config, smoothquant=False, exclude=(*config.exclude, *encoder["smoothing"]["mul_nodes"]))
