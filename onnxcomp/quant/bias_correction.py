r"""Empirical bias correction of a static-QDQ model (Nagel et al. 2019, section 4.2).

Quantizing weights and inputs shifts the *mean* of a layer's output: with :math:`\tilde y` the
output of the quantized layer (fed by the quantized model) and :math:`y` the float model's,

.. math:: \varepsilon_c = \mathbb{E}[\tilde y_c - y_c]

is usually not zero per output channel :math:`c` (rounding errors of a weight row times a
non-zero-mean input, e.g. after ReLU). The bias absorbs it exactly: :math:`b'_c = b_c -
\varepsilon_c` removes the mean error at no run-time cost. :math:`\varepsilon` is measured on
calibration data, **layer by layer in topological order**: layer :math:`i` is corrected, then
layer :math:`i+1` is measured on the corrected model, so each correction also compensates what
the previous corrections left.

Inputs: the float model and the quantized model :func:`onnxcomp.quant.api.quantize` made from it.
The float model is prepared exactly as ``quantize`` prepared it (a working copy at opset 13 or
newer, :class:`~onnxcomp.passes.cleanup.CleanupPass` unless ``cleanup=False`` -- set it to what
the QuantizeConfig had -- and a topological sort), so the output tensor of each quantized node has
the same name in both models; that tensor is the float tensor feeding the node's output
QuantizeLinear, or the graph output.

How it is measured, in one onnxruntime session for the quantized side:

1. The float reference's per-channel means :math:`\mathbb{E}[y_c]` of every target, in one pass
   over the feeds (the tensors exposed a few at a time, so memory is one feed's worth of them).
2. A *measuring model*: the quantized model with ``Add(y, c)`` after every target, :math:`c` a new
   graph input broadcast along the channel axis. Feeding :math:`c = -\varepsilon` is the
   correction, so the corrections found so far are inputs, not rewrites, and one session serves
   every step (a session per corrected model costs a graph optimization each, which on PP-OCRv4 rec
   made the pass about 4x slower). The target itself then runs as float arithmetic on its
   dequantized inputs instead of a fused int8 kernel: the same values up to float rounding.
3. Layer by layer in topological order, :math:`\varepsilon_i` is the mean of the measuring
   model's output *i* over the feeds, with the corrections of layers :math:`1..i-1` fed, minus the
   reference mean. The layers are measured strictly one after another: correcting several at once
   from one run over-corrects downstream layers (a mean shift of one layer reaches the next one
   amplified by its weights); on PP-OCRv4 rec, groups of 4 layers destroyed the model (output SQNR
   below 0 dB) where one at a time gives +2.5 dB.
4. The corrections are then folded into the biases as below.

Cost: one run of the quantized model per target and feed (onnxruntime runs the whole graph for any
fetch); ``max_samples`` bounds the feeds.

Where the correction goes, per node (Conv, Gemm, MatMul whose weight comes from a
DequantizeLinear of a constant):

* int32 bias behind ``DequantizeLinear(b_q, s_b, z)`` (:math:`z = 0` as the static pass writes
  it): requantized with the same scale,
  :math:`b_q' = \mathrm{round}((s_b (b_q - z) - \varepsilon / \beta) / s_b) + z` (``beta`` of Gemm,
  else 1),
  stored as a new int32 initializer; onnxruntime's fused int8 kernel is kept;
* float bias constant: :math:`b - \varepsilon/\beta`;
* Conv/Gemm without bias: a new int32 bias input ``DequantizeLinear(round(-ε/s_b), s_b, 0)``
  with :math:`s_b = s_x s_w` (the input's and the weight's scales, as the static pass lays out
  biases);
* MatMul: the constant of the bias Add right after it (requantized like an int32 bias where the
  static pass wrote it int32, ``bias-add-int32``: the Add onnxruntime fuses with the MatMul into
  a Gemm); without one, an ``Add`` of
  :math:`-\varepsilon` is inserted after the MatMul, its constant an int32
  ``DequantizeLinear`` with scale :math:`s_x s_w` like a static bias (onnxruntime then fuses
  MatMul + Add into QGemm or MatMulIntegerToFloat with a bias, keeping the layer in int8; a plain
  float constant would leave a float Gemm), or a float constant when the scales are unknown.

Refused (skipped, with the reason in the statistics): nodes whose weight is not quantized
(float, or an activation as in attention), whose output tensor does not exist in the prepared
float model or is made there by another op type or from a weight of another shape (a different
cleanup, another model: tensors are matched by name, and this guards the match), whose bias is
computed or has an unexpected layout, or where adding a bias is switched off (``add_bias=False``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from onnxcomp.data import DataSource, Dataset, load_data
from onnxcomp.errors import ConfigError, OnnxcompError
from onnxcomp.graph import (
    add_initializer,
    all_value_names,
    produced_values,
    unique_name,
    with_outputs,
    working_copy,
)
from onnxcomp.io import ModelSource, clone_model
from onnxcomp.ops import bias_input, linear_spec, weight_axes
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.passes.cleanup import CleanupPass
from onnxcomp.quant.config import STATIC_MIN_OPSET, NodeSelector
from onnxcomp.quant.primitives import quantize_bias
from onnxcomp.runtime import create_session, session_options

__all__ = ["BiasCorrectionConfig", "BiasCorrectionPass", "correct_biases", "prepare_reference"]

_INT32_LIMIT = 2**31 - 1
_OPS = ("Conv", "Gemm", "MatMul")
_EXPOSED = 16  # reference tensors fetched per float run


@dataclasses.dataclass(frozen=True)
class BiasCorrectionConfig(PassConfig):
    """Bias correction settings.

    Attributes:
        op_types: node types to correct (subset of Conv, Gemm, MatMul).
        exclude: node names, op types or ``re:PATTERN`` regexes left alone.
        cleanup: prepare the float reference with CleanupPass, as ``quantize`` does when its
            config has ``cleanup=True`` (keep the two equal so tensor names match).
        add_bias: give nodes without a bias one (an int32 bias input for Conv/Gemm, an Add after
            a MatMul without a bias Add).
        max_samples: measure each layer on at most this many feeds.
    """

    op_types: tuple[str, ...] = _OPS
    exclude: tuple[str, ...] = ()
    cleanup: bool = True
    add_bias: bool = True
    max_samples: int | None = None

    def validate(self) -> None:
        unknown = sorted(set(self.op_types) - set(_OPS))
        if unknown:
            raise ConfigError(f"bias_correction: op_types {unknown} not supported; choose from {list(_OPS)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"bias_correction: max_samples must be >= 1, got {self.max_samples}")


def prepare_reference(reference: ModelSource, *, cleanup: bool = True) -> ir.Model:
    """The float model as ``quantize`` saw it: working copy (opset >= 13), cleanup, sorted."""
    work = working_copy(reference, STATIC_MIN_OPSET, allow_upgrade=True, notes=[])
    if cleanup:
        CleanupPass()(work)
    TopologicalSortPass()(work)
    return work


@dataclasses.dataclass
class _Target:
    node: ir.Node
    tensor: str
    axis: int
    channels: int
    method: str  # int32 | float | add-int32 | bias-add | bias-add-int32 | insert-add
    bias_add: tuple[ir.Node, int] | None = None


def _label(node: ir.Node) -> str:
    return node.name or node.op_type


def _beta(node: ir.Node) -> float:
    if node.op_type != "Gemm":
        return 1.0
    attr = node.attributes.get("beta")
    return 1.0 if attr is None else attr.as_float()


def _dq_of_constant(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear producing ``value`` from a constant with constant scale, or None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    if node.inputs[0] is None or node.inputs[0].const_value is None:
        return None
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    return node


def _channels(node: ir.Node, w_dq: ir.Node) -> tuple[int, int]:
    """(channel axis of the output, number of output channels) from the quantized weight."""
    w_shape = w_dq.inputs[0].const_value.shape
    return linear_spec(node).data_channel_axis, int(w_shape[weight_axes(node)[0]])


def _plan(node: ir.Node, reference_values: dict[str, ir.Value], cfg: BiasCorrectionConfig) -> _Target | str:
    w_dq = _dq_of_constant(node.inputs[1] if len(node.inputs) > 1 else None)
    if w_dq is None:
        return "its weight is not quantized (no DequantizeLinear of a constant)"
    if len(w_dq.inputs[0].const_value.shape) < 2:
        return "its weight is a vector: its output has no channel axis"
    if _beta(node) == 0.0:
        return "its beta is 0: the bias input is ignored"
    out = node.outputs[0]
    ref = reference_values.get(out.name)
    if ref is None:
        return (f"its output {out.name!r} is not a tensor of the float reference (was it prepared "
                "with the same cleanup?)")
    ref_node = ref.producer()
    if ref_node is None or ref_node.op_type != node.op_type:
        source = f"{ref_node.op_type} {_label(ref_node)!r}" if ref_node is not None else "a graph input"
        return (f"in the float reference, {out.name!r} comes from {source}, not a {node.op_type} (was it "
                "prepared with the same cleanup?)")
    ref_w = ref_node.inputs[1] if len(ref_node.inputs) > 1 else None
    q_shape = tuple(w_dq.inputs[0].const_value.shape)
    if ref_w is None or ref_w.const_value is None or tuple(ref_w.const_value.shape) != q_shape:
        return f"its weight differs in shape from the float reference's {node.op_type} making {out.name!r}"
    axis, channels = _channels(node, w_dq)
    slot = bias_input(node)
    bias = node.inputs[slot] if slot is not None and len(node.inputs) > slot else None
    if bias is not None:
        b_dq = _dq_of_constant(bias)
        if b_dq is not None:
            arr = b_dq.inputs[0].const_value
            if arr.dtype != ir.DataType.INT32 or tuple(arr.shape) != (channels,):
                return f"its bias {bias.name!r} is not an int32 vector of {channels} values"
            return _Target(node, out.name, axis, channels, "int32")
        if bias.const_value is not None and bias.dtype == ir.DataType.FLOAT:
            shape = tuple(bias.const_value.shape)
            channel_first = axis == 1  # a Conv bias is exactly [C]; a Gemm bias broadcasts
            if not (len(shape) == 0 or shape[-1] in (1, channels)) or (channel_first and shape != (channels,)):
                return f"its bias {bias.name!r} of shape {list(shape)} is not per output channel"
            return _Target(node, out.name, axis, channels, "float")
        return f"its bias {bias.name!r} is computed, not a constant"
    if slot is None:  # MatMul: the bias is a following Add, or a new one
        uses = list(out.uses())
        if len(uses) == 1 and not out.is_graph_output() and uses[0].node.op_type == "Add":
            add = uses[0].node
            k = 1 - uses[0].idx
            const = add.inputs[k] if len(add.inputs) == 2 else None
            b_dq = _dq_of_constant(const)
            if b_dq is not None and b_dq.inputs[0].const_value.dtype == ir.DataType.INT32 \
                    and tuple(b_dq.inputs[0].const_value.shape) == (channels,):
                # int32 as the static pass writes the bias onnxruntime fuses with the MatMul into a Gemm
                return _Target(node, out.name, axis, channels, "bias-add-int32", (add, k))
            if (const is not None and const.const_value is not None and const.dtype == ir.DataType.FLOAT
                    and not const.is_graph_input()
                    and (len(const.const_value.shape) == 0 or const.const_value.shape[-1] in (1, channels))):
                return _Target(node, out.name, axis, channels, "bias-add", (add, k))
        if not cfg.add_bias:
            return "it has no bias and add_bias is off"
        return _Target(node, out.name, axis, channels, "insert-add")
    if not cfg.add_bias:
        return "it has no bias and add_bias is off"
    if _input_scale(node) is None:
        return "it has no bias and its input scale is unknown (input not from a per-tensor DequantizeLinear)"
    return _Target(node, out.name, axis, channels, "add-int32")


def _find_targets(
    model: ir.Model, reference: ir.Model, cfg: BiasCorrectionConfig
) -> tuple[list[_Target], dict[str, str]]:
    selector = NodeSelector(cfg.op_types, cfg.exclude)
    reference_values = {
        name: v for name, v in produced_values(reference).items() if v.dtype in (None, ir.DataType.FLOAT)
    }
    targets: list[_Target] = []
    skipped: dict[str, str] = {}
    for node in model.graph:
        if node.op_type not in _OPS or node.domain not in ("", "ai.onnx"):
            continue
        if not selector.allows(node.name or "", node.op_type):
            w_dq = _dq_of_constant(node.inputs[1] if len(node.inputs) > 1 else None)
            if w_dq is not None:
                skipped[_label(node)] = "excluded by the selection"
            continue
        found = _plan(node, reference_values, cfg)
        if isinstance(found, str):
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if bias_input(node) is not None or (weight is not None and weight.const_value is not None):
                skipped[_label(node)] = found  # (MatMuls of two activations are not listed)
        else:
            targets.append(found)
    return targets, skipped


class BiasCorrectionPass(CompressionPass[BiasCorrectionConfig]):
    """Correct the biases of a static-QDQ model in place, layer by layer (module docstring).

    Args:
        config: a :class:`BiasCorrectionConfig`.
        reference: the float model the quantized one was made from (path, bytes, ModelProto or
            onnx_ir.Model; never modified): it is prepared with :func:`prepare_reference`.
        data: calibration data (anything :func:`onnxcomp.data.load_data` reads, or a Dataset).
        progress: ``progress(done, total)`` after each corrected layer.

    The pass is applied to the *quantized* model. Statistics: ``corrected``, ``layers`` (node,
    tensor, method, channels, mean and max |error| before correction, output RMS, saturated
    int32 values), ``skipped`` (reason per node), ``feeds`` (per layer).
    """

    config_class = BiasCorrectionConfig
    min_opset = 13

    def __init__(
        self,
        config: BiasCorrectionConfig | None,
        reference: ModelSource,
        data: DataSource | Dataset,
        *,
        progress: Callable[[int, int], object] | None = None,
    ) -> None:
        super().__init__(config)
        if reference is None:
            raise ConfigError("BiasCorrectionPass needs the float reference model")
        if data is None:
            raise ConfigError("BiasCorrectionPass needs calibration data")
        self.reference = reference
        self.data = data
        self.progress = progress

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        reference = prepare_reference(self.reference, cleanup=cfg.cleanup)
        targets, skipped = _find_targets(model, reference, cfg)
        if not targets:
            return False, {"corrected": 0, "layers": [], "skipped": skipped, "feeds": 0}
        data = load_data(self.data, model)
        means, rms, ranks, feeds = _reference_means(reference, targets, data, cfg.max_samples)
        measuring, fetches, corrections = _measuring_model(model, targets, ranks)
        session = create_session(measuring, sess_options=session_options("all", threads=None))
        fed = {name: np.zeros(shape, np.float32) for name, shape in corrections}
        errors = []
        for done, (target, fetch, (name, shape)) in enumerate(zip(targets, fetches, corrections), 1):
            # the earlier layers' corrections are fed: each layer is measured on the corrected model
            error = _mean_of(session, fetch, target, data, cfg.max_samples, fed) - means[target.tensor]
            fed[name] = (-error).reshape(shape).astype(np.float32)
            errors.append(error)
            if self.progress is not None:
                self.progress(done, len(targets))
        del session
        layers = []
        for target, error in zip(targets, errors):
            saturated = self._correct(model, target, error)
            layers.append({
                "node": _label(target.node),
                "tensor": target.tensor,
                "method": target.method,
                "channels": target.channels,
                "mean_abs_error": float(np.mean(np.abs(error))),
                "max_abs_error": float(np.max(np.abs(error))),
                "output_rms": rms[target.tensor],
                "saturated": saturated,
            })
        TopologicalSortPass()(model)
        return True, {"corrected": len(layers), "layers": layers, "skipped": skipped, "feeds": feeds}

    # -- corrections ---------------------------------------------------------------------------
    def _correct(self, model: ir.Model, target: _Target, error: np.ndarray) -> int:
        graph = model.graph
        node = target.node
        delta = -error / _beta(node)  # what to add to the bias
        taken = all_value_names(graph)
        if target.method in ("int32", "bias-add-int32"):
            reader, index = target.bias_add if target.method == "bias-add-int32" else (node, 2)
            dq = reader.inputs[index].producer()
            q = dq.inputs[0].const_value.numpy().astype(np.float64)
            scale = np.broadcast_to(dq.inputs[1].const_value.numpy().astype(np.float64), q.shape)
            zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
            zp = np.zeros(q.shape) if zp_value is None or zp_value.const_value is None else np.broadcast_to(
                zp_value.const_value.numpy().astype(np.float64), q.shape)
            r = np.rint(((q - zp) * scale + delta) / scale) + zp
            saturated = int(np.count_nonzero(np.abs(r) > _INT32_LIMIT))
            new_q = np.clip(r, -_INT32_LIMIT, _INT32_LIMIT).astype(np.int32)
            old = dq.inputs[0]
            fresh = add_initializer(graph, f"{old.name}_corrected", new_q, taken)
            if len(list(dq.outputs[0].uses())) > 1:  # the bias is shared: give this node its own DQ
                dq = _dequantize(graph, reader, taken, fresh, dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 else None)
                reader.replace_input_with(index, dq.outputs[0])
            else:
                dq.replace_input_with(0, fresh)
            _drop_if_unused(graph, old)
            return saturated
        if target.method == "float":
            bias = node.inputs[2]
            b = bias.const_value.numpy().astype(np.float64)
            b = b.reshape(1) if b.ndim == 0 else b
            b = np.broadcast_to(b, b.shape[:-1] + (target.channels,))
            fresh = add_initializer(graph, f"{bias.name}_corrected", (b + delta).astype(np.float32), taken)
            node.replace_input_with(2, fresh)
            _drop_if_unused(graph, bias)
            return 0
        if target.method == "bias-add":
            add, k = target.bias_add
            const = add.inputs[k]
            c = const.const_value.numpy().astype(np.float64)
            c = c.reshape(1) if c.ndim == 0 else c
            c = np.broadcast_to(c, c.shape[:-1] + (target.channels,))
            fresh = add_initializer(graph, f"{const.name}_corrected", (c + delta).astype(np.float32), taken)
            add.replace_input_with(k, fresh)
            _drop_if_unused(graph, const)
            return 0
        if target.method == "add-int32":
            found = _int32_bias(graph, node, taken, delta, target.channels, f"{node.outputs[0].name}_bias")
            assert found is not None  # _plan checked the input scale
            value, saturated = found
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, value)
            return saturated
        # insert-add (MatMul): y -> Add(y, delta) -> the former consumers of y. The correction is an
        # int32 DequantizeLinear like a static bias when the scales are known, so onnxruntime still
        # fuses MatMul + Add into an int8 kernel (QGemm / MatMulIntegerToFloat); a float constant
        # otherwise.
        out = node.outputs[0]
        found = _int32_bias(graph, node, taken, delta, target.channels, f"{out.name}_correction")
        saturated = 0
        if found is not None:
            c_v, saturated = found
        else:
            c_v = add_initializer(graph, f"{out.name}_correction", delta.astype(np.float32), taken)
        add = ir.node("Add", [out, c_v], name=unique_name(graph, f"{_label(node)}_bias_correction", taken))
        corrected = add.outputs[0]
        corrected.dtype = out.dtype
        corrected.shape = out.shape
        uses = [(u.node, u.idx) for u in out.uses() if u.node is not add]
        for user, idx in uses:
            user.replace_input_with(idx, corrected)
        if out.is_graph_output():
            name = out.name
            out.name = unique_name(graph, f"{name}_uncorrected", taken)
            corrected.name = name
            for i, v in enumerate(graph.outputs):
                if v is out:
                    graph.outputs[i] = corrected
        else:
            corrected.name = unique_name(graph, f"{out.name}_corrected", taken)
        graph.insert_after(node, add)
        return saturated


def _input_scale(node: ir.Node) -> np.float32 | None:
    """The per-tensor scale of the DequantizeLinear feeding ``node``'s data input, if any."""
    x_dq = node.inputs[0].producer() if node.inputs[0] is not None else None
    if (x_dq is None or x_dq.op_type != "DequantizeLinear" or len(x_dq.inputs) < 2 or x_dq.inputs[1] is None
            or x_dq.inputs[1].const_value is None or x_dq.inputs[1].const_value.size != 1):
        return None
    return np.float32(x_dq.inputs[1].const_value.numpy().reshape(()))


def _int32_bias(
    graph: ir.Graph, node: ir.Node, taken: set[str], values: np.ndarray, channels: int, base: str
) -> tuple[ir.Value, int] | None:
    """``DequantizeLinear(round(values / s_b), s_b, 0, axis=0)`` with ``s_b = s_x * s_w``, inserted
    before ``node``; None when a scale is unknown or the product underflows."""
    x_scale = _input_scale(node)
    w_dq = node.inputs[1].producer()
    if x_scale is None or w_dq is None:
        return None
    w_scale = w_dq.inputs[1].const_value.numpy().astype(np.float32).reshape(-1)
    if w_scale.size not in (1, channels):
        return None
    w_scale = np.ascontiguousarray(np.broadcast_to(w_scale, (channels,)))
    try:
        bq = quantize_bias(values, x_scale, w_scale)
    except ValueError:
        return None
    q_v = add_initializer(graph, f"{base}_quantized", bq.q, taken)
    s_v = add_initializer(graph, f"{base}_scale", np.asarray(bq.scale, np.float32), taken)
    z_v = add_initializer(graph, f"{base}_zero_point", np.zeros(channels, np.int32), taken)
    return _dequantize(graph, node, taken, q_v, s_v, z_v, base=base).outputs[0], bq.saturated


def _dequantize(
    graph: ir.Graph, before: ir.Node, taken: set[str], q: ir.Value, scale: ir.Value, zero_point: ir.Value | None,
    *, base: str | None = None,
) -> ir.Node:
    """A per-channel (axis 0) bias DequantizeLinear inserted before ``before``."""
    base = base or q.name
    inputs = [q, scale] + ([zero_point] if zero_point is not None else [])
    node = ir.node("DequantizeLinear", inputs, attributes={"axis": 0},
                   name=unique_name(graph, f"{base}_DequantizeLinear", taken))
    node.outputs[0].name = unique_name(graph, f"{base}_dq", taken)
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(q.const_value.shape)
    graph.insert_before(before, node)
    return node


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and value.is_initializer() and not value.is_graph_input() and not value.is_graph_output():
        graph.initializers.pop(value.name, None)


def _feeds(data: Dataset, max_samples: int | None):
    for i, feed in enumerate(data):
        if max_samples is not None and i >= max_samples:
            return
        yield feed


def _channel_rows(array: np.ndarray, target: _Target) -> np.ndarray:
    if array.ndim == 0 or array.shape[target.axis % array.ndim] != target.channels:
        raise OnnxcompError(
            f"bias correction: tensor {target.tensor!r} has shape {list(array.shape)}, not "
            f"{target.channels} channels on axis {target.axis} as its weight says"
        )
    return np.moveaxis(array.astype(np.float64), target.axis, -1).reshape(-1, target.channels)


def _reference_means(
    reference: ir.Model, targets: list[_Target], data: Dataset, max_samples: int | None
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, int], int]:
    """Per target tensor of the float reference: per-channel mean, RMS and rank over the feeds.

    The tensors are exposed ``_EXPOSED`` at a time (onnxruntime keeps every fetched tensor of a
    run alive at once), so memory is one feed's worth of that many tensors."""
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, float] = {}
    counts: dict[str, int] = {}
    ranks: dict[str, int] = {}
    feeds = 0
    for start in range(0, len(targets), _EXPOSED):
        chunk = targets[start:start + _EXPOSED]
        names = [t.tensor for t in chunk]
        session = create_session(with_outputs(reference, names), sess_options=session_options("basic", threads=None))
        feeds = 0
        for feed in _feeds(data, max_samples):
            for target, out in zip(chunk, session.run(names, feed)):
                rows = _channel_rows(out, target)
                sums[target.tensor] = sums.get(target.tensor, 0.0) + rows.sum(axis=0)
                squares[target.tensor] = squares.get(target.tensor, 0.0) + float(np.sum(np.square(rows)))
                counts[target.tensor] = counts.get(target.tensor, 0) + rows.shape[0]
                ranks[target.tensor] = out.ndim
            feeds += 1
        del session
    means = {t.tensor: sums[t.tensor] / max(counts[t.tensor], 1) for t in targets}
    rms = {t.tensor: float(np.sqrt(squares[t.tensor] / max(counts[t.tensor] * t.channels, 1))) for t in targets}
    return means, rms, ranks, feeds


def _measuring_model(
    model: ir.Model, targets: list[_Target], ranks: dict[str, int]
) -> tuple[ir.Model, list[str], list[tuple[str, list[int]]]]:
    """A clone of the quantized model in which every target's output passes through
    ``Add(y, c)``, ``c`` a new graph input broadcast along the channel axis, and the Add's output
    is a graph output: one session then measures every layer with the corrections found so far
    fed as inputs, instead of one session per corrected model. (The target itself then runs as
    float arithmetic on dequantized inputs rather than as a fused int8 kernel: the same values up
    to float rounding, since the weights are 7-bit or the kernels exact.)"""
    clone = clone_model(model)
    graph = clone.graph
    values = produced_values(clone)
    taken = all_value_names(graph)
    fetches: list[str] = []
    corrections: list[tuple[str, list[int]]] = []
    for target in targets:
        out = values[target.tensor]
        rank = ranks[target.tensor]
        shape = [1] * rank
        shape[target.axis % rank] = target.channels
        c = ir.Value(name=unique_name(graph, f"{target.tensor}_correction_in", taken),
                     type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
        graph.inputs.append(c)
        add = ir.node("Add", [out, c], name=unique_name(graph, f"{_label(target.node)}_measured", taken))
        measured = add.outputs[0]
        measured.name = unique_name(graph, f"{target.tensor}_measured", taken)
        measured.dtype = ir.DataType.FLOAT
        for use in [u for u in out.uses() if u.node is not add]:
            use.node.replace_input_with(use.idx, measured)
        for i, v in enumerate(graph.outputs):
            if v is out:
                graph.outputs[i] = measured
        graph.insert_after(out.producer(), add)
        if not measured.is_graph_output():
            graph.outputs.append(measured)
        fetches.append(measured.name)
        corrections.append((c.name, shape))
    return clone, fetches, corrections


def _mean_of(session: Any, fetch: str, target: _Target, data: Dataset, max_samples: int | None,
             fed: dict[str, np.ndarray]) -> np.ndarray:
    """Per-channel mean of the measuring model's ``fetch`` over the feeds."""
    total = np.zeros(target.channels)
    count = 0
    for feed in _feeds(data, max_samples):
        (out,) = session.run([fetch], {**feed, **fed})
        rows = _channel_rows(out, target)
        total += rows.sum(axis=0)
        count += rows.shape[0]
    return total / max(count, 1)


def correct_biases(
    reference: ModelSource,
    quantized: ir.Model,
    data: DataSource | Dataset,
    config: BiasCorrectionConfig | None = None,
    *,
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, Any]:
    """Correct ``quantized`` in place against the float ``reference``; returns the statistics.

    Shorthand for ``BiasCorrectionPass(config, reference, data)(quantized).stats``.
    """
    return BiasCorrectionPass(config, reference, data, progress=progress)(quantized).stats
