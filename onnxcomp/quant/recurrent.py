"""Recurrent layers in int8: the weights ``W`` and ``R`` of LSTM, GRU and RNN.

How each op gets there is the table :data:`onnxcomp.ops.RECURRENT_INT8`:

* **kernel** (LSTM -> onnxruntime's ``com.microsoft.DynamicQuantizeLSTM``): ``W [dirs, 4H, I]`` and
  ``R [dirs, 4H, H]`` are quantized to int8, symmetric, one scale per direction, and stored
  transposed (``[dirs, I, 4H]``, ``[dirs, H, 4H]``), as the contrib op reads them; the kernel
  quantizes the activations at run time, so no calibration is needed. One scale per gate row is
  possible (``per_channel``) but onnxruntime's kernel then loses far more than the finer weight
  scales gain. Bias, sequence lengths, initial states, peepholes and
  attributes carry over.
* **weight-only** (GRU and RNN, which onnxruntime has no int8 kernel for: its contrib ops,
  checked on onnxruntime 1.32's registered schemas, quantize LSTM only; and an LSTM the kernel
  cannot take: ``layout=1``), in static and dynamic mode alike: W and R are stored int8, symmetric over the full range [-127, 127]
  (the op computes in float, so the int8 kernels' saturation on CPUs without VNNI does not
  apply), one scale per gate row and direction, behind a ``DequantizeLinear`` placed in the graph
  that owns the weight (an outer weight of a Loop body is dequantized once per run, not per
  iteration). Needs opset 13 (per-axis DequantizeLinear).

The report names every op whose compute stays float on int8 weights and why
(``recurrent_float_compute``). What stays float entirely, said in the report
(``recurrent_kept_float``, with the reason): excluded nodes,
weights that are not constant float32 3-D tensors, weight-only below opset 13. Ops inside If
branches and Loop/Scan bodies are converted too (their weights are read from wherever they live).
:func:`dequantized_weight` is the weight-only storage shared with the uncalibrated If branches of
static quantization (onnxcomp.quant.subgraphs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import add_initializer, all_value_names, unique_name
from onnxcomp.ops import RECURRENT_INT8, RecurrentInt8
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.selection import NodeSelector

__all__ = ["RecurrentInt8Config", "RecurrentInt8Pass", "quantize_rows_int8", "dequantized_weight",
           "WEIGHT_ONLY_MIN_OPSET"]

MS_DOMAIN = "com.microsoft"

#: per-axis DequantizeLinear (one scale per gate row)
WEIGHT_ONLY_MIN_OPSET = 13


@dataclasses.dataclass(frozen=True)
class RecurrentInt8Config(PassConfig):
    """Attributes:
        exclude: node names, op types or ``re:PATTERN`` left float.
        op_types: only these op types (empty: every op of :data:`~onnxcomp.ops.RECURRENT_INT8`).
        per_channel: the kernel gets one weight scale per gate row instead of one per direction.
        reduce_weights: the kernel's weights in 7 bits, for CPUs whose int8 kernels saturate
            (QuantizeConfig.weight_range).
        weight_only: ops without a kernel get weight-only int8 (False: they stay float).
    """

    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()
    per_channel: bool = False
    reduce_weights: bool = False
    weight_only: bool = True


def quantize_rows_int8(w: np.ndarray, per_row: bool = True, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``w`` ``[dirs, rows, cols]``: ``(q, scale)``, one scale per row
    (``[dirs, rows]``) or per direction (``[dirs]``); ``reduce_range``: 7 bits ([-63, 63]) for CPUs
    whose int8 kernels saturate (onnxcomp.quant.kernels)."""
    levels = 63.0 if reduce_range else 127.0
    amax = np.abs(w).max(axis=-1) if per_row else np.abs(w).reshape(w.shape[0], -1).max(axis=-1)
    scale = np.where(amax > 0, amax / levels, 1.0).astype(np.float32)
    full = scale[..., None] if per_row else scale[:, None, None]
    q = np.clip(np.rint(w / full), -levels, levels).astype(np.int8)
    return q, scale


def dequantized_weight(value: ir.Value, q: np.ndarray, scale: np.ndarray, axis: int | None,
                       taken: set[str], graph: ir.Graph | None = None) -> ir.Value:
    """``DequantizeLinear(q, scale, axis)`` standing for the constant ``value``, placed first in
    ``graph`` (default: the graph that owns ``value``, whose readers, in it or nested in it, can
    all see it; a graph nested in the owner sees it too).

    ``q`` may be ``value`` flattened to 2-D (one scale per row of several leading axes): a Reshape
    back to ``value``'s shape follows. The caller rewires the readers it means to.
    """
    graph = graph if graph is not None else value.graph
    assert graph is not None, f"{value.name} is not owned by a graph"
    shape = tuple(value.const_value.shape.numpy())
    q_v = add_initializer(graph, f"{value.name}_int8", q, taken)
    s_v = add_initializer(graph, f"{value.name}_scale", np.asarray(scale, np.float32), taken)
    z_v = add_initializer(graph, f"{value.name}_zero_point", np.zeros(np.shape(scale), np.int8), taken)
    nodes = [ir.node("DequantizeLinear", [q_v, s_v, z_v], attributes={} if axis is None else {"axis": axis},
                     name=unique_name(graph, f"{value.name}_DequantizeLinear", taken))]
    if q.shape != shape:
        target = add_initializer(graph, f"{value.name}_shape", np.asarray(shape, np.int64), taken)
        nodes.append(ir.node("Reshape", [nodes[0].outputs[0], target],
                             name=unique_name(graph, f"{value.name}_Reshape", taken)))
    for node in nodes:
        out = node.outputs[0]
        out.name = unique_name(graph, f"{value.name}_dq", taken)
        out.dtype = ir.DataType.FLOAT
        out.shape = ir.Shape(q.shape if node is nodes[0] else shape)
    first = next(iter(graph), None)
    if first is None:
        graph.extend(nodes)
    else:
        graph.insert_before(first, nodes)
    return nodes[-1].outputs[0]


def _no_kernel(node: ir.Node, rule: RecurrentInt8) -> str:
    """Why ``node`` has no int8 kernel (it is weight-only or float)."""
    if rule.kernel is None:
        return (f"onnxruntime has no int8 kernel for {node.op_type} (its contrib ops quantize LSTM only, "
                f"as DynamicQuantizeLSTM; there is no DynamicQuantize{node.op_type})")
    return f"{rule.kernel} does not take layout={node.attributes.get_int('layout', 0)}"


class RecurrentInt8Pass(CompressionPass[RecurrentInt8Config]):
    """LSTM/GRU/RNN weights to int8 as :data:`~onnxcomp.ops.RECURRENT_INT8` says (module docstring)."""

    config_class = RecurrentInt8Config
    min_opset = 7

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        selector = NodeSelector(self.config.op_types, self.config.exclude)
        kernel: list[str] = []
        weight_only: list[str] = []
        kept: dict[str, str] = {}
        float_compute: dict[str, str] = {}
        before = after = 0
        taken = all_value_names(model.graph)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        for node in list(model.graph.all_nodes()):
            rule = RECURRENT_INT8.lookup(node, model)
            if rule is None:
                continue
            label = node.name or node.op_type
            reason = self._why_float(node, rule, selector)
            if reason is not None:
                kept[label] = reason
                continue
            weights = [node.inputs[i] for i, _ in rule.weights]
            nbytes = sum(v.const_value.nbytes for v in weights)
            if self._kernel_takes(node, rule):
                self._to_kernel(model, node, rule, taken)
                kernel.append(label)
            elif not self.config.weight_only:
                kept[label] = _no_kernel(node, rule)
                continue
            elif opset < WEIGHT_ONLY_MIN_OPSET:
                kept[label] = f"weight-only int8 needs opset {WEIGHT_ONLY_MIN_OPSET} (per-axis DequantizeLinear), the model has {opset}"
                continue
            else:
                self._weight_only(node, rule, taken)
                weight_only.append(label)
                float_compute[label] = _no_kernel(node, rule) + ": W and R stored int8, the op computes in float"
            before += nbytes
            after += sum(v.const_value.nbytes // 4 for v in weights)
            for value in weights:  # the float weights, unless something else reads them
                owner = value.graph
                if not value.uses() and not value.is_graph_output() and owner is not None and value.name:
                    owner.initializers.pop(value.name, None)
        if kernel:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return bool(kernel or weight_only), {
            "lstm_int8": kernel, "recurrent_weight_only": weight_only, "recurrent_kept_float": kept,
            "recurrent_float_compute": float_compute,
            "recurrent_weight_bytes": {"before": before, "after": after},
        }

    @staticmethod
    def _kernel_takes(node: ir.Node, rule: RecurrentInt8) -> bool:
        layout = node.attributes.get_int("layout", 0)
        return rule.kernel is not None and layout in rule.kernel_layouts

    def _to_kernel(self, model: ir.Model, node: ir.Node, rule: RecurrentInt8, taken: set[str]) -> None:
        graph = node.graph
        tensors = []
        for index, _ in rule.weights:
            value = node.inputs[index]
            q, scale = quantize_rows_int8(value.const_value.numpy(), self.config.per_channel,
                                          self.config.reduce_weights)
            tensors.append((
                add_initializer(graph, f"{value.name}_quantized", np.ascontiguousarray(q.transpose(0, 2, 1)), taken),
                add_initializer(graph, f"{value.name}_scale", scale, taken),
                add_initializer(graph, f"{value.name}_zero_point", np.zeros(scale.shape, np.int8), taken),
            ))
        inputs = [node.inputs[i] if i < len(node.inputs) else None for i in range(rule.kernel_params_at)]
        for (i, _), (q_v, _, _) in zip(rule.weights, tensors):
            inputs[i] = q_v
        inputs += [t for _, s_v, z_v in tensors for t in (s_v, z_v)]
        attributes = [a for name, a in node.attributes.items() if name != "layout"]
        new = ir.Node(MS_DOMAIN, rule.kernel, inputs, attributes, num_outputs=len(node.outputs), name=node.name)
        for old, out in zip(node.outputs, new.outputs):
            out.name, out.type, out.shape = old.name, old.type, old.shape
            old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.insert_before(node, new)
        graph.remove(node, safe=True)

    @staticmethod
    def _weight_only(node: ir.Node, rule: RecurrentInt8, taken: set[str]) -> None:
        for index, _ in rule.weights:
            value = node.inputs[index]
            w = value.const_value.numpy()
            if w.shape[0] == 1:  # one direction: one scale per gate row along axis 1
                q, scale = quantize_rows_int8(w, per_row=True)
                dq = dequantized_weight(value, q, scale[0], 1, taken)
            else:  # one scale per gate row of each direction: rows of the flattened weight, reshaped back
                q, scale = quantize_rows_int8(w.reshape(1, -1, w.shape[-1]), per_row=True)
                dq = dequantized_weight(value, q[0], scale[0], 0, taken)
            node.replace_input_with(index, dq)

    @staticmethod
    def _why_float(node: ir.Node, rule: RecurrentInt8, selector: NodeSelector) -> str | None:
        if not selector.allows(node.name or "", node.op_type):
            return "excluded by the selection"
        for index, role in rule.weights:
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None or value.const_value is None or value.dtype != ir.DataType.FLOAT:
                return f"its {role} is not a constant float32 tensor"
            if len(value.const_value.shape) != 3:
                return f"its {role} is not 3-D"
            if value.graph is None:
                return f"its {role} belongs to no graph"
        return None
