"""Graph compaction: the same computation in fewer file bytes (the size route's last step).

For a small model whose weights are already compressed the graph itself dominates the file:
node and tensor names, the ``value_info`` (type and shape) of every intermediate tensor, doc
strings. This pass rewrites only those; the nodes, their inputs, attributes and initializer
data stay as they are, so the model computes exactly what it computed before.

* Every tensor that is not a graph input or output gets a short name (``a``, ``b``, ... ``Z``,
  ``ba``, ... in graph order, initializers first; graph inputs and outputs keep theirs, as
  callers feed and read them by name).
* Nodes lose their names (an optional field in ONNX); ``name_nodes`` gives them back when a later
  pass needs them.
* Intermediate tensors and initializers lose their type and shape annotations (``value_info``:
  shape inference or onnxruntime recomputes them; an initializer's tensor holds its own); graph
  inputs and outputs keep theirs.
* Doc strings of the model, the graph and the nodes are dropped, and attributes that restate the
  specification's default (:data:`onnxcomp.ops.ATTRIBUTE_DEFAULTS`) or what the op infers from
  the static shape of an input (:data:`onnxcomp.ops.INFERABLE_ATTRIBUTES`: a Conv's
  ``kernel_shape`` equal to its weight's spatial dims, the weight's shape known in the graph).

* Small int64 initializers (shapes, split sizes) are stored as varints (``int64_data``) where
  that is shorter than 8 bytes a value (:func:`onnxcomp.io.varint_int64_tensor`; same values).

Metadata properties, the producer and opset imports are kept. Subgraphs (If, Loop, Scan) are left
as they are: names there may refer to the outer scope.

The size route runs it as the cluster stage's last step (``[cluster] compact_graph = true``, the
recipe ``deep-compression``): it belongs after the last transforming stage, since later passes
and the per-layer reports look tensors up by name.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, ClassVar

import onnx_ir as ir

from onnxcomp.passes.base import CompressionPass, PassConfig

__all__ = ["CompactConfig", "CompactGraphPass", "short_names"]

_ALPHABET = string.ascii_lowercase + string.ascii_uppercase


def short_names(taken: set[str]):
    """Endless short names over ``[a-zA-Z]`` (``a``..``Z``, ``ba``, ...) that are not in ``taken``."""
    i = 0
    while True:
        n, s = i, ""
        while True:
            s = _ALPHABET[n % len(_ALPHABET)] + s
            n //= len(_ALPHABET)
            if n == 0:
                break
        i += 1
        if s not in taken:
            yield s


@dataclasses.dataclass(frozen=True)
class CompactConfig(PassConfig):
    """What graph compaction drops (module docstring); all on by default."""

    rename: bool = True
    drop_value_info: bool = True
    drop_doc_strings: bool = True
    drop_default_attributes: bool = True
    drop_inferable_attributes: bool = True
    varint_int64: bool = True

    stage: ClassVar[str] = "compact"  # the config's name in messages


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _static_shape(value: ir.Value | None) -> list[int] | None:
    """The dims of ``value`` when all are known integers (its tensor's, or its annotation)."""
    if value is None:
        return None
    shape = value.const_value.shape if value.const_value is not None else value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


def _drop_inferable_attributes(model: ir.Model) -> int:
    """Remove attributes equal to what their op infers from an input's static shape; how many."""
    from onnxcomp.ops import INFERABLE_ATTRIBUTES

    dropped = 0
    for node in model.graph:
        for name, rule in (INFERABLE_ATTRIBUTES.lookup(node, model) or {}).items():
            attr = node.attributes.get(name)
            inputs = node.inputs
            shape = _static_shape(inputs[rule.input_index]) if len(inputs) > rule.input_index else None
            if attr is not None and shape is not None and list(attr.value) == shape[rule.start:]:
                del node.attributes[name]
                dropped += 1
    return dropped


#: Larger int64 initializers keep their raw bytes (decoding varints costs load time).
_VARINT_MAX_VALUES = 4096


def _varint_int64(graph: ir.Graph) -> int:
    """Store the graph's small int64 initializers as varints where shorter; how many."""
    from onnxcomp.io import varint_int64_tensor

    done = 0
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.INT64 or tensor.size > _VARINT_MAX_VALUES \
                or isinstance(tensor, ir.serde.TensorProtoTensor):
            continue
        packed = varint_int64_tensor(tensor.numpy(), name)
        if packed is not None:
            value.const_value = packed
            done += 1
    return done


class CompactGraphPass(CompressionPass[CompactConfig]):
    """Shorter names, no intermediate ``value_info``, no doc strings (module docstring)."""

    config_class = CompactConfig

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        graph = model.graph
        stats: dict[str, Any] = {"renamed": 0, "value_info_dropped": 0, "doc_strings_dropped": 0,
                                 "default_attributes_dropped": 0, "inferable_attributes_dropped": 0,
                                 "varint_int64": 0}
        if cfg.drop_inferable_attributes:  # before value_info goes: it reads the inputs' shapes
            stats["inferable_attributes_dropped"] = _drop_inferable_attributes(model)
        if any(_has_subgraph(n) for n in graph):
            # names inside a subgraph may refer to this graph's tensors: keep them all
            cfg = dataclasses.replace(cfg, rename=False)
            stats["note"] = "the graph has subgraphs: names kept"
        interface = {v.name for v in (*graph.inputs, *graph.outputs)}
        if cfg.rename:
            from onnxcomp.graph import ORIGINAL_NAMES

            original = model.meta.setdefault(ORIGINAL_NAMES, {})  # in memory only: never written
            names = short_names(set(interface))
            values = list(graph.initializers.values())
            values += [out for node in graph for out in node.outputs]
            renamed = []  # initializers registered again under their new names once all have one
            pairs = []  # (old, new): a new name may be the old name of a tensor renamed later
            for value in values:
                if value.name and value.name not in interface and not value.is_graph_input() \
                        and not value.is_graph_output():
                    new = next(names)
                    pairs.append((value.name, new))
                    if value.is_initializer():
                        graph.initializers.pop(value.name)
                        value.name = new
                        if value.const_value is not None:
                            value.const_value.name = new
                        renamed.append(value)
                    else:
                        value.name = new
                    stats["renamed"] += 1
            for value in renamed:
                graph.register_initializer(value)
            first = {old: original.pop(old, old) for old, _ in pairs}
            original.update((new, first[old]) for old, new in pairs)
            for node in graph:
                node.name = None
        if cfg.drop_value_info:  # initializers carry their type and shape in the tensor itself
            for value in [*graph.initializers.values(), *(out for node in graph for out in node.outputs)]:
                if value.is_graph_input() or value.is_graph_output() or (value.shape is None and value.type is None):
                    continue
                value.shape = None
                value.type = None
                stats["value_info_dropped"] += 1
        if cfg.drop_doc_strings:
            for owner in (model, graph, *graph):
                if owner.doc_string:
                    owner.doc_string = None
                    stats["doc_strings_dropped"] += 1
        if cfg.drop_default_attributes:
            from onnxcomp.passes.cleanup import _drop_default_attributes

            stats["default_attributes_dropped"] = _drop_default_attributes(model)
        if cfg.varint_int64:
            stats["varint_int64"] = _varint_int64(graph)
        changed = any(v for k, v in stats.items() if k != "note")
        return changed, stats

