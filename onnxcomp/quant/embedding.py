r"""Quantized embedding tables: ``Gather`` on a constant float table becomes ``GatherBlockQuantized``.

A word-embedding table is often the largest tensor of a transformer (all-MiniLM-L6-v2: 30522 x 384,
47 MB of its 90 MB) and no MatMul reads it, so the MatMul/Gemm passes leave it float. Here each
``Gather(table, indices)`` (``axis = 0``, a constant float32 rank-2 table that is not a graph
input) becomes onnxruntime's contrib op ::

    com.microsoft.GatherBlockQuantized(data, indices, scales; gather_axis=0, quantize_axis=1,
                                       block_size=B, bits=4|8)

(tables of fewer than :data:`MIN_ELEMENTS` elements stay float) which gathers the quantized rows and dequantizes only them: a lookup stays a lookup (no
dequantized copy of the table at run time). The table is quantized blockwise along the embedding
axis (a scale per row and block of ``B`` consecutive elements) on the weight-only grids of
:mod:`onnxcomp.quant.weight_only` (:func:`~onnxcomp.quant.weight_only.quantize_blockwise`):

* 8 bits: symmetric [-127, 127], stored as uint8 ``q + 128`` (the op's default zero point for
  uint8 data is 128, so no zero-point input);
* 4 bits: [-8, 7], stored as codes ``q + 8`` packed two per byte along the embedding axis, low
  nibble first (default zero point 8), i.e. :func:`~onnxcomp.quant.weight_only.pack_matmulnbits`'s
  layout.

``B``: 4 bits use ``config.block_size``; 8 bits the largest power of two dividing the width, at
most 128 (scales then cost at most 1/32 of the int8 bytes; 384 -> 128). The width must be a
multiple of ``B`` (GatherBlockQuantized has no short last block), else the table is left float.

Tied tables: a table read by anything besides such Gathers (an output projection ``x @ E^T`` not
quantized by the mode) keeps its float copy for that reader, so quantizing its Gathers would only
add bytes; it is then left alone and reported (``skipped``). When the other reader was quantized
first (weight-only and dynamic modes rewrite MatMul/Gemm before this pass), only Gathers remain
and the table is quantized.

Bits per mode (``config.embedding_bits``; ``None`` = automatic): weight-only uses its own
``bits``, dynamic and static 8; ``0`` leaves tables float.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.quant.config import QuantizeConfig

__all__ = ["embedding_bits", "embedding_block", "quantize_embeddings"]

_MS_DOMAIN = "com.microsoft"
#: Ops that look rows up in a table (input 0) by index (input 1).
_LOOKUP_OPS = ("Gather",)
#: The widest block 8-bit tables use.
_MAX_INT8_BLOCK = 128
#: Tables smaller than this (elements) stay float: nothing to gain (a BERT token-type table is 2 x 384).
MIN_ELEMENTS = 1 << 14


def embedding_bits(config: QuantizeConfig) -> int:
    """Bits of embedding tables for ``config`` (0: left float)."""
    if config.embedding_bits is not None:
        return config.embedding_bits
    return config.bits if config.mode == "weight-only" else 8


def embedding_block(width: int, bits: int, block_size: int) -> int | None:
    """Block size for a table of ``width`` columns, or None when no valid block divides it."""
    if bits == 4:
        return block_size if width % block_size == 0 else None
    block = 1
    while width % (block * 2) == 0 and block * 2 <= _MAX_INT8_BLOCK:
        block *= 2
    return block if block >= 16 else None


def _gather_sites(model: ir.Model, config: QuantizeConfig) -> tuple[dict[str, list[ir.Node]], dict[str, str]]:
    tables: dict[str, list[ir.Node]] = {}
    skipped: dict[str, str] = {}
    selector = config.selector
    for node in model.graph:
        if node.op_type not in _LOOKUP_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        label = node.name or node.op_type
        if selector.excluded(node.name, node.op_type):
            continue
        table = node.inputs[0]
        if table is None or table.const_value is None or table.is_graph_input():
            continue  # a Gather on activations: not an embedding
        attr = node.attributes.get("axis")
        if attr is not None and attr.value not in (0, -len(table.const_value.shape)):
            skipped[label] = "it gathers along an axis other than 0"
            continue
        if table.const_value.dtype != ir.DataType.FLOAT or len(table.const_value.shape) != 2:
            skipped[label] = "its table is not a float32 matrix"
            continue
        if table.const_value.size < MIN_ELEMENTS:
            skipped[label] = f"its table has {table.const_value.size} elements (< {MIN_ELEMENTS}): kept float"
            continue
        tables.setdefault(table.name, []).append(node)
    return tables, skipped


def quantizable_tables(model: ir.Model, config: QuantizeConfig) -> list[str]:
    """Names of the embedding tables :func:`quantize_embeddings` would take up (none with bits 0)."""
    if embedding_bits(config) == 0:
        return []
    return sorted(_gather_sites(model, config)[0])


def quantize_embeddings(model: ir.Model, config: QuantizeConfig) -> dict[str, Any]:
    """Rewrite the embedding Gathers of ``model`` in place (module doc); returns the report section."""
    from onnxcomp.graph import add_initializer, all_value_names, unique_name
    from onnxcomp.quant.weight_only import pack_matmulnbits, quantize_blockwise

    bits = embedding_bits(config)
    if bits == 0:
        return {"bits": 0, "tables": {}, "skipped": {}}
    tables, skipped = _gather_sites(model, config)
    taken = all_value_names(model.graph)
    done: dict[str, dict[str, Any]] = {}
    for name, gathers in tables.items():
        table = gathers[0].inputs[0]
        others = sorted({u.node.name or u.node.op_type for u in table.uses() if u.node not in gathers})
        if others:
            for g in gathers:
                skipped[g.name or g.op_type] = (
                    f"its table {name!r} is also read in float by {', '.join(others)} (quantizing the lookup "
                    "would add a copy)")
            continue
        w = table.const_value.numpy()
        vocab, width = w.shape
        block = embedding_block(width, bits, config.block_size)
        if block is None:
            for g in gathers:
                skipped[g.name or g.op_type] = f"its table width {width} is not a multiple of a block size >= 16"
            continue
        bq = quantize_blockwise(w, 1, bits, block)
        scales = np.ascontiguousarray(bq.scale, dtype=np.float32)  # [V, width / block]
        if bits == 8:
            data = (bq.q.astype(np.int16) + 128).astype(np.uint8)
        else:
            packed, _ = pack_matmulnbits(bq.q, scales, block)
            data = packed.reshape(vocab, width // 2)
        d_v = add_initializer(model.graph, f"{name}_q{bits}", data, taken)
        s_v = add_initializer(model.graph, f"{name}_scales", scales, taken)
        for g in gathers:
            old = g.outputs[0]
            new = ir.node(
                "GatherBlockQuantized", [d_v, g.inputs[1], s_v],
                attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
                domain=_MS_DOMAIN, name=g.name or unique_name(model.graph, "GatherBlockQuantized", taken),
            )
            out = new.outputs[0]
            out.dtype = ir.DataType.FLOAT
            if old.shape is not None:
                out.shape = ir.Shape(old.shape)
            ir.convenience.replace_nodes_and_values(model.graph, g, [g], [new], [old], [out])
        if not list(table.uses()) and name in model.graph.initializers:
            del model.graph.initializers[name]
        err = bq.dequantize() - w
        done[name] = {
            "nodes": [g.name for g in gathers], "shape": [vocab, width], "bits": bits, "block_size": block,
            "bytes_before": int(w.nbytes), "bytes_after": int(data.nbytes + scales.nbytes),
            "sqnr_db": float(10 * np.log10(np.sum(w.astype(np.float64) ** 2) / max(np.sum(err.astype(np.float64) ** 2), 1e-30))),
        }
    if done:
        model.opset_imports.setdefault(_MS_DOMAIN, 1)
    return {"bits": bits, "tables": done, "skipped": skipped,
            "bytes_before": sum(t["bytes_before"] for t in done.values()),
            "bytes_after": sum(t["bytes_after"] for t in done.values())}
