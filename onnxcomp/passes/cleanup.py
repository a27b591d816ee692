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
* A bias added after a Conv (``Add(Conv(x, W), c)`` with ``c`` a constant of one value per output
  channel, as exporters that keep the bias apart write it) moves into the Conv's bias input:
  ``Conv(x, W, b + c)``. The same sum in float32; quantized, the Conv's output then gets one
  8-bit grid (after its bias) instead of one before the bias and one after, and a Conv whose
  output feeds a sensitive reader (a ReduceMean) is the node the placement keeps float. Not in
  squeeze-and-excitation paths (see ``_FuseConvBiasAdd``).
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

Never breaks a valid model, subgraphs included (If branches, Loop and Scan bodies): identity
removal keeps a branch from returning an outer-scope value directly, a branch that ends up doing
so gets an Identity back (:func:`onnxcomp.graph.fix_subgraph_outputs`), each step that raises is
undone, and the result must pass ``onnx.checker`` (full check) and load in onnxruntime wherever
the input did; when it does not, the steps are replayed with that check after each one and the
ones that broke the model are undone. ``stats["rolled_back"]`` says which and why.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import onnxscript.rewriter
import onnxscript.rewriter.pattern
from onnxscript.rewriter.rules import common as rules

from onnxcomp.analysis.excitation import excitation_nodes
from onnxcomp.bounds import Range
from onnxcomp.graph import add_initializer, all_value_names, fix_subgraph_outputs, restore_model
from onnxcomp.io import clone_model, initializer_nbytes
from onnxcomp.ops import ATTRIBUTE_DEFAULTS, LINEAR_OPS, RECURRENT_WEIGHT_INPUTS, is_add_node, is_conv_node
from onnxcomp.passes.base import MODEL_CHECKS, CompressionPass, PassConfig, model_problems
from onnxcomp.stage import Context, Stage

__all__ = ["CleanupConfig", "CleanupPass", "CleanupStage", "op_histogram"]

_GENERATED_NAME = re.compile(r"^node_[A-Za-z]+_\d+$")
_RULE_NAME_TAG = "pkg.onnxscript.rewriter.rule_name"  # onnxscript.rewriter's debugging tag

_BATCHNORM_RULES = (
    rules.fuse_batchnorm_into_conv_rule,
    rules.fuse_batchnorm_into_conv_transpose_rule,
    rules.fuse_batchnorm_into_gemm_rule,
)


class _FuseConvBiasAdd(onnx_ir.passes.InPlacePass):
    """``Add(Conv(x, W[, b]), c)`` (either operand order) -> ``Conv(x, W, b + c)`` where ``c`` is a
    float32 constant holding one value per output channel (:func:`_per_channel_bias`) and the
    Conv's output has no other reader. The fused Conv writes the Add's output tensor (its name
    kept). Not for the convolutions of squeeze-and-excitation paths
    (onnxcomp.analysis.excitation.excitation_nodes): quantized, a gate convolution whose bias Add stays
    apart keeps an 8-bit grid on its pre-bias output, narrower than the biased pre-activation
    (whose range the saturated channels set); fused, PP-OCR cls lost 7 dB of output SQNR
    (benchmarks/RESULTS.md, ninth session)."""

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        excitation = excitation_nodes(model)
        modified = False
        for add in list(model.graph):
            if not is_add_node(add) or len(add.inputs) != 2:
                continue
            for i in (0, 1):
                conv_out, c = add.inputs[i], add.inputs[1 - i]
                conv = conv_out.producer() if conv_out is not None else None
                if conv is None or not is_conv_node(conv) or c is None:
                    continue
                if conv.name in excitation or len(conv_out.uses()) != 1 or conv_out.is_graph_output():
                    continue
                bias = _per_channel_bias(conv, c)
                if bias is None:
                    continue
                old = conv.inputs[2] if len(conv.inputs) > 2 else None
                if old is not None:
                    bias = old.const_value.numpy().astype(np.float32) + bias
                base = old.name if old is not None else conv.inputs[1].name
                new_bias = add_initializer(model.graph, f"{base}_bias", bias.astype(np.float32), all_value_names(model.graph))
                if old is None:
                    conv.resize_inputs(3)
                conv.replace_input_with(2, new_bias)
                out = add.outputs[0]
                if conv_out.type is None:
                    conv_out.type = out.type
                if conv_out.shape is None:
                    conv_out.shape = out.shape
                ir.convenience.replace_all_uses_with(out, conv_out, replace_graph_outputs=True)
                name, out.name = out.name, None
                model.graph.remove(add, safe=True)
                conv_out.name = name
                modified = True
                break
        return onnx_ir.passes.PassResult(model, modified)


def _per_channel_bias(conv: ir.Node | None, c: ir.Value) -> np.ndarray | None:
    """The ``[C]`` bias that adding ``c`` after ``conv`` amounts to, or None when it is not one
    (not a float32 constant, values along other axes, a shape that broadcasts the output bigger,
    a Conv whose weight or bias is not a float32 constant, an If/Loop body)."""
    if conv is None or len(conv.outputs) != 1 or len(conv.inputs) < 2 or c.const_value is None:
        return None
    w = conv.inputs[1]
    old = conv.inputs[2] if len(conv.inputs) > 2 else None
    if w is None or w.const_value is None or w.dtype != ir.DataType.FLOAT or c.dtype != ir.DataType.FLOAT:
        return None
    if old is not None and (old.const_value is None or old.dtype != ir.DataType.FLOAT):
        return None
    out_channels, rank = w.const_value.shape[0], len(w.const_value.shape)  # the output has the weight's rank
    shape = tuple(c.const_value.shape)
    if len(shape) > rank:
        return None
    aligned = (1,) * (rank - len(shape)) + shape  # numpy broadcasting aligns on the right
    if any(d != 1 for i, d in enumerate(aligned) if i != 1) or aligned[1] not in (1, out_channels):
        return None
    values = c.const_value.numpy().astype(np.float32).reshape(-1)
    return np.broadcast_to(values, (out_channels,)).copy()


def _exactly(expected: float):
    """Condition of an exact arithmetic no-op: ``c`` is a scalar initializer equal to ``expected``
    exactly (onnxscript's own ``x + 0`` rules match within a tolerance and so remove
    ``x + 1e-10`` before a Log, which then reads 0 as -inf); a scalar keeps x's shape."""

    def condition(context, x: ir.Value, c: ir.Value, **_) -> bool:
        tensor = c.const_value
        if tensor is None or len(tensor.shape) != 0:
            return False
        return bool(tensor.numpy() == expected)

    return condition


def _identity(op, x: ir.Value, **_):
    return op.Identity(x)


def _exact_noop_rules() -> tuple:
    add_0, sub_0 = _exactly(0.0), _exactly(0.0)
    mul_1, div_1 = _exactly(1.0), _exactly(1.0)
    return (
        onnxscript.rewriter.pattern.RewriteRule(lambda op, x, c: op.Add(x, c), _identity, add_0, name="add_0"),
        onnxscript.rewriter.pattern.RewriteRule(lambda op, x, c: op.Add(c, x), _identity, add_0, name="0_add"),
        onnxscript.rewriter.pattern.RewriteRule(lambda op, x, c: op.Sub(x, c), _identity, sub_0, name="sub_0"),
        onnxscript.rewriter.pattern.RewriteRule(lambda op, x, c: op.Mul(x, c), _identity, mul_1, name="mul_by_1"),
        onnxscript.rewriter.pattern.RewriteRule(lambda op, x, c: op.Mul(c, x), _identity, mul_1, name="1_mul"),
        onnxscript.rewriter.pattern.RewriteRule(lambda op, x, c: op.Div(x, c), _identity, div_1, name="div_by_1"),
    )


_NOOP_RULES = (
    *_exact_noop_rules(),
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
        fuse_bias_add: move a per-channel constant added after a Conv into its bias.
        remove_noops: remove operations that do nothing (see module docstring).
        inline_functions: inline model-local functions first.
        drop_default_attributes: remove attributes that restate the specification's default
            (``strides=[1, 1]``, ``group=1``, ``transA=0``; table :data:`onnxcomp.ops.ATTRIBUTE_DEFAULTS`).
        iterations: how many rounds of folding and rewriting at most (stops early at a fixed point).
        fold_input_size_limit: largest constant input (elements) that folding may read.
        fold_output_size_limit: largest folded constant (elements) that folding may create.
        fold_weights: fold constant subgraphs that compute the weight of a Conv/Gemm/MatMul/LSTM/GRU (a
            clustered codebook, a weight stored transposed or in another dtype) whatever their
            size: the weight exists at run time anyway, and later passes need it as a constant.
    """

    fold_constants: bool = True
    fuse_batchnorm: bool = True
    fuse_bias_add: bool = True
    remove_noops: bool = True
    inline_functions: bool = True
    drop_default_attributes: bool = True
    iterations: int = 2
    fold_input_size_limit: int = 8192
    fold_output_size_limit: int = 1 << 20
    fold_weights: bool = True

    stage: ClassVar[str] = "cleanup"
    ranges: ClassVar[dict[str, Range]] = {
        "iterations": Range(int, 1, 1000),
        "fold_input_size_limit": Range(int, 0),
        "fold_output_size_limit": Range(int, 0),
    }


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
    """Nodes of constant subgraphs (every leaf an initializer) that end in a weight of a linear op
    or of a recurrent op (LSTM/GRU/RNN W, R, B)."""
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
        indices = [role.input_index for role in spec.roles if role.kind == "weight"] if spec is not None else []
        indices += RECURRENT_WEIGHT_INPUTS.lookup(node, model) or ()
        for index in indices:
            weight = node.inputs[index] if index < len(node.inputs) else None
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


class _Restart(Exception):
    """A cleanup step raised on a run without snapshots: run again with one per step."""


def op_histogram(model: ir.Model) -> collections.Counter[str]:
    """Count of nodes per op type over the main graph and all subgraphs."""
    return collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in model.graph.all_nodes()
    )


class _IdentityElimination(onnx_ir.passes.InPlacePass):
    """Remove ``y = Identity(x)`` wherever that leaves every graph, subgraphs included, valid.

    ``y`` that is not a graph output: its uses read ``x`` instead. ``y`` that is an output of its
    graph: only when ``x`` is computed by a node of that same graph and is no graph's output (then
    ``x`` takes ``y``'s name). An Identity that returns an outer-scope value, a graph input or an
    initializer from a graph stays: an If branch or a Loop body may not return those directly.
    """

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        modified = False
        for node in list(model.graph.all_nodes()):
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or node.graph is None:
                continue
            if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
                continue
            x, y = node.inputs[0], node.outputs[0]
            graph = node.graph
            returned = y.is_graph_output()
            if returned:
                producer = x.producer()
                if producer is None or producer.graph is not graph or x.is_graph_output():
                    continue
            if x.type is None:
                x.type = y.type
            if x.shape is None:
                x.shape = y.shape
            ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
            if returned:
                name, y.name = y.name, None
                x.name = name
            graph.remove(node, safe=True)
            modified = True
        return onnx_ir.passes.PassResult(model, modified)


class _Call(onnx_ir.passes.InPlacePass):
    """A function ``model -> modified`` as a pass (a step of the cleanup that can be rolled back)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        return onnx_ir.passes.PassResult(model, bool(self.fn(model)))


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class CleanupPass(CompressionPass[CleanupConfig]):
    """Exact simplifications: constant folding, BatchNorm fusion, no-op removal (see module doc).

    Never breaks a valid model. Each step (inlining, folding, BatchNorm fusion, no-op removal,
    identity removal, ...) that raises is undone. The result is checked once: it must pass
    ``onnx.checker`` (full check) and load in onnxruntime wherever the input did. If it does not,
    the cleanup starts again from the input with the check after every step, and the steps that
    broke the model are undone. ``stats["rolled_back"]`` names each undone step and why.
    """

    config_class = CleanupConfig
    output_checks = ()  # checks its own output, step by step

    def _plan(self, model: ir.Model, producers) -> tuple[list, list, list]:
        cfg = self.config
        prelude: list[tuple[str, onnx_ir.passes.PassBase]] = []
        if cfg.inline_functions and model.functions:
            prelude.append(("inline functions", common_passes.InlinePass()))
        if cfg.fold_weights:
            prelude.append(("fold weights", _FoldWeightDecoders()))
        rounds: list[tuple[str, onnx_ir.passes.PassBase]] = []
        if cfg.fold_constants:
            rounds.append(("fold constants", _FoldConstants(cfg.fold_input_size_limit, cfg.fold_output_size_limit)))
        if cfg.fuse_batchnorm:
            rounds.append(("fuse batchnorm", onnxscript.rewriter.RewritePass(list(_BATCHNORM_RULES))))
        if cfg.fuse_bias_add:
            rounds.append(("fuse conv bias add", _FuseConvBiasAdd()))
        if cfg.remove_noops:
            rounds.append(("remove no-ops", onnxscript.rewriter.RewritePass(list(_NOOP_RULES))))
            rounds.append(("remove identities", _IdentityElimination()))
        rounds.append(("remove unused nodes", common_passes.RemoveUnusedNodesPass()))
        finish: list[tuple[str, onnx_ir.passes.PassBase]] = [
            ("lift constants", common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)),
            ("remove unused nodes", common_passes.RemoveUnusedNodesPass()),
            ("remove unused opsets", common_passes.RemoveUnusedOpsetsPass()),
            ("sort", common_passes.TopologicalSortPass()),
            ("subgraph outputs", _Call(fix_subgraph_outputs)),
            ("name nodes", _Call(lambda m: _tidy_rewritten_nodes(m, producers))),
        ]
        if cfg.drop_default_attributes:
            finish.append(("drop default attributes", _Call(self._drop_defaults)))
        return prelude, rounds, finish

    def _drop_defaults(self, model: ir.Model) -> int:
        self._defaults_dropped = _drop_default_attributes(model)
        return self._defaults_dropped

    def _run(self, model: ir.Model, producers, checks: tuple[str, ...], rolled_back: dict[str, str],
             careful: bool = True) -> bool:
        """Run every step; undo a step that raises or (with ``checks``) makes a check fail.

        ``careful=False`` keeps no snapshot per step (the common case: nothing fails) and raises
        :class:`_Restart` when a step raises, so that the caller starts again carefully.
        """
        prelude, rounds, finish = self._plan(model, producers)
        self._defaults_dropped = 0

        def step(name: str, p: onnx_ir.passes.PassBase) -> bool:
            if name in rolled_back:
                return False
            snapshot = clone_model(model) if careful else None
            try:
                changed = p(model).modified
            except Exception as exc:  # a rewrite that fails on this graph: undo it, say why
                if snapshot is None:
                    raise _Restart from exc
                restore_model(model, snapshot)
                rolled_back[name] = f"raised {_root_cause(exc)}"
                return False
            if changed and checks:
                fix_subgraph_outputs(model)
                problems = model_problems(model, checks)
                if problems:
                    restore_model(model, snapshot)
                    check, why = next(iter(problems.items()))
                    rolled_back[name] = f"made the model fail {check}: {why}"
                    return False
            return bool(changed)

        modified = False
        for name, p in prelude:
            modified = step(name, p) or modified
        for _ in range(self.config.iterations):
            changed = False
            for name, p in rounds:
                changed = step(name, p) or changed
            modified = modified or changed
            if not changed:
                break
        for name, p in finish:
            modified = step(name, p) or modified
        return modified

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        before_ops = op_histogram(model)
        before_bytes = initializer_nbytes(model)
        producers = _producers(model)
        original = clone_model(model)
        rolled_back: dict[str, str] = {}
        try:
            modified = self._run(model, producers, (), rolled_back, careful=False)
        except _Restart:  # a step raised: start again from the input with a snapshot per step
            restore_model(model, clone_model(original))
            modified = self._run(model, producers, (), rolled_back)
        problems = model_problems(model) if modified else {}
        checks = ()
        if problems:
            tolerated = model_problems(original, tuple(problems))  # the input already failed these
            checks = tuple(c for c in MODEL_CHECKS if c not in tolerated)
        if set(problems) & set(checks):
            # Start again from the input, checking after every step.
            restore_model(model, clone_model(original))
            rolled_back.clear()
            modified = self._run(model, producers, checks, rolled_back)
            problems = model_problems(model, checks) if modified else {}
            if problems:  # no single step is to blame: keep the input as it was
                restore_model(model, clone_model(original))
                check, why = next(iter(problems.items()))
                rolled_back["all"] = f"the steps together made the model fail {check}: {why}"
                modified = False
                self._defaults_dropped = 0
        defaults_dropped = self._defaults_dropped
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
            "rolled_back": rolled_back,
        }


class CleanupStage(Stage):
    """Cleanup of the working copy (``[cleanup]`` in a recipe); later stages skip their own."""

    name = "cleanup"
    config_class = CleanupConfig

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:
        return CleanupPass(self.config)(work).stats
