"""Dynamic int8 LSTM: ``LSTM`` with constant weights becomes onnxruntime's ``DynamicQuantizeLSTM``.

The input and recurrence weights ``W`` ``[dirs, 4H, I]`` and ``R`` ``[dirs, 4H, H]`` are quantized
to int8, symmetric, one scale per direction, and stored transposed (``[dirs, I, 4H]``,
``[dirs, H, 4H]``), as the contrib op reads them; the activations are quantized at run time by
the kernel. One scale per gate row is possible (``per_channel``) but onnxruntime's kernel then
loses far more than the weights do (measured on a 16-unit LSTM: 16 dB output SQNR per row, 37 dB
per direction, 42 dB for the per-row weights alone in a float LSTM). Bias, initial states, peepholes and attributes carry over.

What stays float, said in the report: GRU and RNN (onnxruntime has no int8 kernel for them),
LSTMs whose weights are not constant float32 tensors, ``layout=1`` LSTMs, and excluded nodes.
LSTMs inside If branches and Loop/Scan bodies are converted too (their weights are read from
wherever they live).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import add_initializer, all_value_names
from onnxcomp.passes.base import CompressionPass, PassConfig

__all__ = ["DynamicLSTMConfig", "DynamicLSTMPass", "quantize_rows_int8"]

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class DynamicLSTMConfig(PassConfig):
    """Attributes:
        exclude: node names, op types or ``re:PATTERN`` left float.
        per_channel: one weight scale per gate row instead of one per direction.
        reduce_weights: 7-bit weights, for CPUs whose int8 kernels saturate (QuantizeConfig.weight_range).
    """

    exclude: tuple[str, ...] = ()
    per_channel: bool = False
    reduce_weights: bool = False


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


class DynamicLSTMPass(CompressionPass[DynamicLSTMConfig]):
    """Replace LSTMs with constant float32 weights by ``com.microsoft.DynamicQuantizeLSTM``."""

    config_class = DynamicLSTMConfig
    min_opset = 7

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        from onnxcomp.quant.config import NodeSelector

        selector = NodeSelector((), self.config.exclude)
        converted: list[str] = []
        kept: dict[str, str] = {}
        taken = all_value_names(model.graph)
        for node in list(model.graph.all_nodes()):
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("LSTM", "GRU", "RNN"):
                continue
            label = node.name or node.op_type
            reason = self._why_float(node, selector)
            if reason is not None:
                kept[label] = reason
                continue
            graph = node.graph
            w, r = node.inputs[1], node.inputs[2]
            tensors = []
            for value in (w, r):
                q, scale = quantize_rows_int8(value.const_value.numpy(), self.config.per_channel,
                                              self.config.reduce_weights)
                tensors.append((
                    add_initializer(graph, f"{value.name}_quantized", np.ascontiguousarray(q.transpose(0, 2, 1)), taken),
                    add_initializer(graph, f"{value.name}_scale", scale, taken),
                    add_initializer(graph, f"{value.name}_zero_point", np.zeros(scale.shape, np.int8), taken),
                ))
            rest = [node.inputs[i] if i < len(node.inputs) else None for i in range(3, 8)]
            inputs = [node.inputs[0], tensors[0][0], tensors[1][0], *rest,
                      tensors[0][1], tensors[0][2], tensors[1][1], tensors[1][2]]
            attributes = [a for name, a in node.attributes.items() if name != "layout"]
            new = ir.Node(MS_DOMAIN, "DynamicQuantizeLSTM", inputs, attributes, num_outputs=len(node.outputs),
                          name=node.name)
            for old, out in zip(node.outputs, new.outputs):
                out.name, out.type, out.shape = old.name, old.type, old.shape
                old.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.insert_before(node, new)
            graph.remove(node, safe=True)
            for value in (w, r):  # the float weights, unless something else reads them
                owner = value.graph
                if not value.uses() and not value.is_graph_output() and owner is not None and value.name:
                    owner.initializers.pop(value.name, None)
            converted.append(label)
        if converted:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return bool(converted), {"lstm_int8": converted, "recurrent_kept_float": kept}

    @staticmethod
    def _why_float(node: ir.Node, selector) -> str | None:
        if node.op_type != "LSTM":
            return f"onnxruntime has no int8 kernel for {node.op_type}"
        if not selector.allows(node.name or "", node.op_type):
            return "excluded by the selection"
        layout = node.attributes.get("layout")
        if layout is not None and layout.as_int() != 0:
            return "layout=1 (batch first): DynamicQuantizeLSTM takes layout 0 only"
        for index, role in ((1, "W"), (2, "R")):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None or value.const_value is None or value.dtype != ir.DataType.FLOAT:
                return f"its {role} is not a constant float32 tensor"
            if len(value.const_value.shape) != 3:
                return f"its {role} is not 3-D"
        return None
