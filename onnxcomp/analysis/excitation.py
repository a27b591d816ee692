"""Squeeze-and-excitation paths: which linear nodes compute a gate from the channel means of the
feature map they scale.

Graph analysis shared by the passes that treat those nodes apart: cleanup does not fuse their
bias Add into the Conv (:mod:`onnxcomp.passes.cleanup`), and static quantization keeps them float
on request (``QuantizeConfig.excitation_float``, :mod:`onnxcomp.quant.qdq`). Which ops pool every
spatial axis and which ops apply a gate is op knowledge, in :mod:`onnxcomp.ops`
(``SPATIAL_POOLS``, ``GATE_OPS``).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxcomp.ops import is_gate_node, linear_spec, pools_spatial_axes

__all__ = ["excitation_nodes"]

#: How many nodes a squeeze-and-excitation path may have between the pooling and the gate.
_EXCITATION_MAX_NODES = 16


def excitation_nodes(model: ir.Model) -> dict[str, str]:
    """The Conv/Gemm/MatMul of squeeze-and-excitation paths, with the reason to keep them float.

    Such a path pools a feature map ``x`` over every spatial axis (GlobalAveragePool, ReduceMean
    over H and W: ``onnxcomp.ops.pools_spatial_axes``), maps the channel means through small
    layers reading nothing else but constants, and scales ``x`` by the result (a Mul reading
    ``x``, ``onnxcomp.ops.is_gate_node``). Those layers run on one value per channel: int8 saves
    nothing there, and the error of their 8-bit grids (a channel mean of an 8-bit feature map,
    a gate's pre-activation whose range is set by the channels it saturates) multiplies the
    whole feature map. Static quantization keeps them float under
    ``QuantizeConfig.excitation_float`` (off by default), and cleanup leaves their bias Add apart
    (``onnxcomp.passes.cleanup``: fused, PP-OCR cls lost 7 dB of output SQNR). Measured
    (benchmarks/RESULTS.md, ninth session), keeping them float raised PP-OCRv6 tiny rec's exact
    line agreement with fp32 from 24% to 31% of 80 held-out lines and PP-OCR cls's output SQNR
    from 38 to 50 dB, but broke PP-OCRv4 rec (decoded-sequence agreement 1.00 -> 0.11): there
    the pooled tensor carries a large upstream error (5 dB) whose overshoots the int8 gate
    convolution clamps to its calibrated range, and float lets through.
    """
    found: dict[str, str] = {}
    for node in model.graph:
        if not pools_spatial_axes(node, model):
            continue
        x, pooled = node.inputs[0], node.outputs[0]
        path: list[ir.Node] = []
        on_path = {pooled.name}
        frontier, gate = [pooled], None
        while frontier and len(path) <= _EXCITATION_MAX_NODES:
            value = frontier.pop()
            for use in value.uses():
                user = use.node
                if user.graph is not model.graph:
                    continue
                if is_gate_node(user, model) and any(v is x for v in user.inputs):
                    gate = user
                    continue
                if user in path:
                    continue
                if any(v is not None and v.const_value is None and v.name not in on_path for v in user.inputs):
                    frontier = []  # reads another activation: not a gate path
                    gate = None
                    break
                path.append(user)
                on_path.update(o.name for o in user.outputs)
                frontier.extend(user.outputs)
        if gate is None or len(path) > _EXCITATION_MAX_NODES:
            continue
        for user in path:
            if linear_spec(user) is not None:
                found[user.name] = (f"left in float: squeeze-and-excitation path (reads the channel means of "
                                    f"{x.name!r}, scales it in {gate.op_type} {gate.name!r}): one value per "
                                    f"channel, int8 saves nothing and its error scales the whole feature map")
    return found
