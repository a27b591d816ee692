"""Cleanup: exact graph simplifications run before and after compression.

The work is done by onnxscript's optimizer and rewriter and by onnx_ir's common passes; this
module only chooses which of their rules run and reports what changed.

* Constant folding (``onnxscript.optimizer.fold_constants_ir``): subgraphs whose inputs are all
  constants are evaluated once, within size limits; those that compute the weight of a
  Conv/Gemm/MatMul (a codebook-clustered weight) whatever their size.
* BatchNormalization fusion into the preceding Conv, ConvTranspose or Gemm:
  with ``s = gamma / sqrt(var + eps)``, ``W' = W * s`` (along the output-channel axis) and
  ``b' = (b - mean) * s + beta``. Exact in real arithmetic; in float32 it differs from the unfused
  graph by rounding only (tested to 1e-5).
* No-op removal: ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1``, inference-mode Dropout, Identity,
  Cast to the same type, Expand/Transpose that do nothing, Transpose-Transpose, Reshape-Reshape,
  repeated Relu/Clip.
* Constants lifted to initializers (so later passes find weights as ``const_value``), unused nodes
  removed, nodes sorted topologically.
* Attributes that restate the specification's default (``strides=[1, 1]``, ``group=1``) are
  dropped; nodes that rules created take the name of the node they replace (a Conv that absorbed
  a BatchNormalization keeps the Conv's name), so exclude lists and reports keep working.

Refuses nothing: a rule that does not match leaves the graph as it was. Functions are inlined
first (configurable), because later passes need to see the ops inside them.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import onnx_ir as ir
import onnx_ir.passes
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import onnxscript.rewriter
from onnxscript.rewriter.rules import common as rules

from onnxcomp.errors import ConfigError
from onnxcomp.io import initializer_nbytes
from onnxcomp.ops import ATTRIBUTE_DEFAULTS, LINEAR_OPS
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.stage import Context, Stage

__all__ = ["CleanupConfig", "CleanupPass", "CleanupStage", "op_histogram"]

_GENERATED_NAME = re.compile(r"^node_[A-Za-z]+_\d+$")
_RULE_NAME_TAG = "pkg.onnxscript.rewriter.rule_name"  # onnxscript.rewriter's debugging tag

_BATCHNORM_RULES = (
    rules.fuse_batchnorm_into_conv_rule,
    rules.fuse_batchnorm_into_conv_transpose_rule,
    rules.fuse_batchnorm_into_gemm_rule,
)
_NOOP_RULES = (
    rules.add_0_rule,
    rules.sub_0_rule,
    rules.mul_by_1_rule,
    rules.div_by_1_rule,
    rules.dropout_zero_rule,
    rules.dropout_inference_rule,
    rules.no_op_cast_rule,
    rules.no_op_expand_rule,
    rules.no_op_transpose_rule,
    rules.transpose_transpose_rule,
    rules.reshape_reshape_rule,
    rules.unsqueeze_unsqueeze_rule,
    rules.successive_relu_rule,
    rules.successive_clip_rule,
    rules.successive_clip_relu_rule,
    rules.successive_relu_clip_rule,
)


@dataclasses.dataclass(frozen=True)
class CleanupConfig(PassConfig):
    """What the cleanup does.

    Attributes:
        fold_constants: evaluate constant subgraphs.
        fuse_batchnorm: fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm.
        remove_noops: remove operations that do nothing (see module docstring).
        inline_functions: inline model-local functions first.
        drop_default_attributes: remove attributes that restate the specification's default
            (``strides=[1, 1]``, ``group=1``, ``transA=0``; table :data:`onnxcomp.ops.ATTRIBUTE_DEFAULTS`).
        iterations: how many rounds of folding and rewriting at most (stops early at a fixed point).
        fold_input_size_limit: largest constant input (elements) that folding may read.
        fold_output_size_limit: largest folded constant (elements) that folding may create.
        fold_weights: fold constant subgraphs that compute the weight of a Conv/Gemm/MatMul (a
            clustered codebook, a weight stored transposed or in another dtype) whatever their
            size: the weight exists at run time anyway, and later passes need it as a constant.
    """

    fold_constants: bool = True
    fuse_batchnorm: bool = True
    remove_noops: bool = True
    inline_functions: bool = True
    drop_default_attributes: bool = True
    iterations: int = 2
    fold_input_size_limit: int = 8192
    fold_output_size_limit: int = 1 << 20
    fold_weights: bool = True

    def validate(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"cleanup: iterations must be >= 1, got {self.iterations}")
        for name in ("fold_input_size_limit", "fold_output_size_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cleanup: {name} must be >= 0, got {getattr(self, name)}")


class _FoldConstants(onnx_ir.passes.InPlacePass):
    def __init__(self, input_limit: int, output_limit: int) -> None:
        super().__init__()
        self.input_limit = input_limit
        self.output_limit = output_limit

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        result = onnxscript.optimizer.fold_constants_ir(
            model,
            onnx_shape_inference=True,
            input_size_limit=self.input_limit,
            output_size_limit=self.output_limit,
        )
        return onnx_ir.passes.PassResult(model, bool(result.modified))


class _FoldWeightDecoders(onnx_ir.passes.InPlacePass):
    """Fold the constant subgraphs that compute a linear op's weight, without size limits."""

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        decoders = _weight_decoders(model)
        if not decoders:
            return onnx_ir.passes.PassResult(model, False)
        result = onnxscript.optimizer.fold_constants_ir(
            model, input_size_limit=1 << 62, output_size_limit=1 << 62,
            should_fold=lambda node: node in decoders,
        )
        return onnx_ir.passes.PassResult(model, bool(result.modified))


def _weight_decoders(model: ir.Model) -> set[ir.Node]:
    """Nodes of constant subgraphs (every leaf an initializer) that end in a weight of a linear op."""
    found: set[ir.Node] = set()

    def constant_subgraph(value: ir.Value, nodes: set[ir.Node], depth: int) -> bool:
        if value.const_value is not None:
            return True
        producer = value.producer()
        if producer is None or depth > 32 or value.is_graph_input():
            return False
        if producer in nodes:
            return True
        nodes.add(producer)
        return all(v is None or constant_subgraph(v, nodes, depth + 1) for v in producer.inputs)

    for node in model.graph.all_nodes():
        spec = LINEAR_OPS.lookup(node, model)
        if spec is None:
            continue
        for role in spec.roles:
            if role.kind != "weight" or role.input_index >= len(node.inputs):
                continue
            weight = node.inputs[role.input_index]
            if weight is None or weight.const_value is not None:
                continue
            nodes: set[ir.Node] = set()
            if constant_subgraph(weight, nodes, 0):
                found |= nodes
    return found


def _producers(model: ir.Model) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Output value name -> (name, op type, input value names) of the node producing it."""
    return {
        out.name: (node.name or "", node.op_type, tuple(v.name or "" if v is not None else "" for v in node.inputs))
        for node in model.graph.all_nodes()
        for out in node.outputs
        if out.name
    }


def _tidy_rewritten_nodes(model: ir.Model, producers: dict[str, tuple[str, str, tuple[str, ...]]]) -> None:
    """Name the nodes rewrites created (onnxscript's "node_Conv_3", or none) and drop the rule tag.

    onnxscript tags every node a rule creates with the rule's name in its metadata, which would
    be written into the output model (60 bytes a node); it is debugging information, dropped.

    Passes, exclude lists and reports refer to nodes by name, so a fused node takes the name of
    the removed node of its op type it stands for: walking back from the tensor it produces
    through removed nodes (at most 4 steps), a Conv that absorbed a BatchNormalization gets the
    old Conv's name. Nodes with no such ancestor are named after the tensor they produce.
    """
    from onnxcomp.graph import name_nodes

    nodes = list(model.graph.all_nodes())
    taken = {node.name for node in nodes if node.name and not _GENERATED_NAME.match(node.name)}
    for node in nodes:
        if (node.name and not _GENERATED_NAME.match(node.name)) or not node.outputs:
            continue  # named by the model, not by a rewrite
        node.name = ""
        node.metadata_props.pop(_RULE_NAME_TAG, None)
        frontier, steps = [node.outputs[0].name or ""], 0
        while frontier and steps < 4 and not node.name:
            nxt: list[str] = []
            for value_name in frontier:
                old = producers.get(value_name)
                if old is None or not old[0] or old[0] in taken:
                    continue  # a graph input, an unnamed node, or a node still present
                if old[1] == node.op_type:
                    node.name = old[0]
                    taken.add(old[0])
                    break
                nxt.extend(old[2])
            frontier, steps = nxt, steps + 1
    name_nodes(model)


def _drop_default_attributes(model: ir.Model) -> int:
    """Remove attributes equal to their specification default; returns how many."""
    dropped = 0
    for node in model.graph.all_nodes():
        defaults = ATTRIBUTE_DEFAULTS.lookup(node, model)
        for name, default in (defaults or {}).items():
            attr = node.attributes.get(name)
            if attr is not None and default.matches(attr.value):
                del node.attributes[name]
                dropped += 1
    return dropped


def op_histogram(model: ir.Model) -> collections.Counter[str]:
    """Count of nodes per op type over the main graph and all subgraphs."""
    return collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in model.graph.all_nodes()
    )


class CleanupPass(CompressionPass[CleanupConfig]):
    """Exact simplifications: constant folding, BatchNorm fusion, no-op removal (see module doc)."""

    config_class = CleanupConfig

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        before_ops = op_histogram(model)
        before_bytes = initializer_nbytes(model)
        producers = _producers(model)
        passes: list[onnx_ir.passes.PassBase] = []
        if cfg.inline_functions and model.functions:
            passes.append(common_passes.InlinePass())
        rule_list = [*(_BATCHNORM_RULES if cfg.fuse_batchnorm else ()), *(_NOOP_RULES if cfg.remove_noops else ())]
        loop: list[onnx_ir.passes.PassBase] = []
        if cfg.fold_weights:
            passes.append(_FoldWeightDecoders())
        if cfg.fold_constants:
            loop.append(_FoldConstants(cfg.fold_input_size_limit, cfg.fold_output_size_limit))
        if rule_list:
            loop.append(onnxscript.rewriter.RewritePass(rule_list))
        if cfg.remove_noops:
            loop.append(common_passes.IdentityEliminationPass())
        loop.append(common_passes.RemoveUnusedNodesPass())
        passes.append(onnx_ir.passes.PassManager(loop, steps=cfg.iterations, early_stop=True))
        passes += [
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedOpsetsPass(),
            common_passes.TopologicalSortPass(),
        ]
        modified = False
        for p in passes:
            modified = p(model).modified or modified
        _tidy_rewritten_nodes(model, producers)
        defaults_dropped = _drop_default_attributes(model) if cfg.drop_default_attributes else 0
        after_ops = op_histogram(model)
        removed = {k: before_ops[k] - after_ops.get(k, 0) for k in before_ops if after_ops.get(k, 0) < before_ops[k]}
        added = {k: after_ops[k] - before_ops.get(k, 0) for k in after_ops if after_ops[k] > before_ops.get(k, 0)}
        changed = bool(removed or added) or initializer_nbytes(model) != before_bytes or defaults_dropped > 0
        return changed or modified, {
            "default_attributes_dropped": defaults_dropped,
            "nodes_before": sum(before_ops.values()),
            "nodes_after": sum(after_ops.values()),
            "batchnorm_fused": before_ops.get("BatchNormalization", 0)
            - after_ops.get("BatchNormalization", 0),
            "ops_removed": removed,
            "ops_added": added,
            "initializer_bytes_before": before_bytes,
            "initializer_bytes_after": initializer_nbytes(model),
        }


class CleanupStage(Stage):
    """Cleanup of the working copy (``[cleanup]`` in a recipe); later stages skip their own."""

    name = "cleanup"
    config_class = CleanupConfig

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:
        return CleanupPass(self.config)(work).stats
