"""Measured latency of single linear nodes at their real shapes, and of whole models side by side.

:class:`NodeLatency` times one Conv / Gemm / MatMul alone in onnxruntime (a one-node model with
random weights at the node's concrete input shape) together with variants whose input and/or
output channels are reduced, interleaved in rounds (:func:`onnxcomp.measure.latency.measure_latency`),
and keeps the median of each. Results are cached per shape signature (op, attributes, input shape,
weight shape), so repeated blocks of a network are measured once per process. Latency on a shared
machine is noisy: only ratios of interleaved medians are used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcomp.ops import linear_spec, weight_axes

__all__ = ["NodeLatency", "shape_signature", "model_latency_ratio"]


def shape_signature(node: ir.Node, x_shape: Sequence[int], w_shape: Sequence[int]) -> tuple:
    attrs = tuple(sorted((k, repr(v.value)) for k, v in node.attributes.items()))
    return (node.op_type, attrs, tuple(int(d) for d in x_shape), tuple(int(d) for d in w_shape))


def _one_node_model(node: ir.Node, x_shape: Sequence[int], w_shape: Sequence[int], group: int | None,
                    opset: int, rng: np.random.Generator) -> bytes:
    from onnxcomp.io import model_to_bytes

    x = ir.Value(name="x", shape=ir.Shape(list(x_shape)), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal(w_shape).astype(np.float32), name="w"))
    w.shape = ir.Shape(list(w_shape))
    w.type = ir.TensorType(ir.DataType.FLOAT)
    inputs = [x, w]
    attrs = {k: v for k, v in node.attributes.items()}
    spec = linear_spec(node)
    if spec is not None and spec.grouped:  # a convolution: with its bias, and its group when changed
        m = w_shape[weight_axes(node)[0]]
        b = ir.Value(name="b", const_value=ir.tensor(np.zeros(m, np.float32), name="b"))
        b.shape, b.type = ir.Shape([m]), ir.TensorType(ir.DataType.FLOAT)
        inputs.append(b)
        if group is not None:
            attrs["group"] = ir.AttrInt64("group", group)
    out = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT))
    op = ir.Node("", node.op_type, inputs, attributes=list(attrs.values()), outputs=[out], name="n")
    graph = ir.Graph([x], [out], nodes=[op], initializers=[i for i in inputs[1:]], opset_imports={"": opset})
    return model_to_bytes(ir.Model(graph, ir_version=8))


class NodeLatency:
    """Per-shape cache of measured single-node latencies (seconds, medians)."""

    def __init__(self, *, threads: int | None = None, runs: int = 15, time_budget: float = 0.4,
                 opset: int = 13) -> None:
        self.threads = threads
        self.runs = runs
        self.time_budget = time_budget
        self.opset = max(opset, 11)
        self.cache: dict[tuple, float] = {}
        self.measured = 0

    def measure(self, node: ir.Node, variants: Mapping[str, tuple[Sequence[int], Sequence[int], int | None]]
                ) -> dict[str, float]:
        """Median seconds of each variant ``name -> (x_shape, w_shape, group)`` (group None: as the node)."""
        from onnxcomp.measure.latency import SessionSpec, measure_latency

        result: dict[str, float] = {}
        todo: dict[str, tuple] = {}
        for name, (xs, ws, group) in variants.items():
            key = (*shape_signature(node, xs, ws), group)
            if key in self.cache:
                result[name] = self.cache[key]
            elif any(int(d) <= 0 for d in (*xs, *ws)):
                result[name] = 0.0
            else:
                todo[name] = (key, xs, ws, group)
        if todo:
            rng = np.random.default_rng(0)
            specs = []
            first_x = None
            for name, (key, xs, ws, group) in todo.items():
                specs.append(SessionSpec(name, _one_node_model(node, xs, ws, group, self.opset, rng),
                                         threads=self.threads))
                first_x = first_x or xs
            # each variant has its own input shape: measure them in one interleaved call per shape
            by_shape: dict[tuple, list] = {}
            for spec, (name, (key, xs, ws, group)) in zip(specs, todo.items()):
                by_shape.setdefault(tuple(xs), []).append((spec, name, key))
            for xs, items in by_shape.items():
                feed = {"x": rng.standard_normal(xs).astype(np.float32)}
                res = measure_latency([s for s, _, _ in items], [feed], warmup_runs=2, warmup_seconds=0.02,
                                      runs=self.runs, time_budget=self.time_budget, n_boot=10)
                for (spec, name, key), r in zip(items, res):
                    self.cache[key] = float(r.summary.median)
                    result[name] = self.cache[key]
                    self.measured += 1
        return result


def model_latency_ratio(reference: bytes, candidate: bytes, feeds: Sequence[Mapping[str, np.ndarray]], *,
                        threads: int | None = None, runs: int = 30, time_budget: float = 30.0
                        ) -> tuple[float, float, float]:
    """(median ratio candidate / reference, reference median s, candidate median s), interleaved."""
    from onnxcomp.measure.latency import SessionSpec, measure_latency

    res = measure_latency([SessionSpec("reference", reference, threads=threads),
                           SessionSpec("candidate", candidate, threads=threads)],
                          [dict(f) for f in feeds], warmup_runs=3, warmup_seconds=0.2, runs=runs,
                          time_budget=time_budget, n_boot=200)
    return float(res[1].ratio), float(res[0].summary.median), float(res[1].summary.median)
