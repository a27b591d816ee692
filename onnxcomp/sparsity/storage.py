r"""Compact storage of codebook labels with many zeros, decoded by a constant ONNX subgraph.

A clustered weight is a label tensor :math:`\ell` (indices into a codebook). After unstructured
pruning most labels are the label of the exact-zero centroid (``zero_label``). Three encodings
of the flattened (C order) labels, all bit-packed at ``b = ceil(log2 K)`` bits per label:

* ``dense``: every label, ``n b`` bits.
* ``bitmask``: one bit per weight (nonzero or not) and the labels of the nonzeros:
  ``n + nnz b`` bits. Decoded by ``idx = cumsum(mask) * mask`` and a Gather from
  ``[zero_label, labels...]``.
* ``relative``: the paper's relative index coding: each stored entry has a gap (zeros skipped
  since the previous entry, ``g`` bits, at most ``2^g - 1``) and a label; a longer run of zeros
  gets filler entries that carry ``zero_label``. ``entries (g + b)`` bits, ``g`` chosen per tensor
  (1..8) to minimise the size. Decoded by ``positions = cumsum(gap + 1) - 1`` and a
  ScatterElements into a tensor filled with ``zero_label``.

:func:`encode_labels` picks the smallest, :func:`decode_labels` is the numpy reference and
:func:`build_label_decoder` writes the decoding subgraph (BitShift, BitwiseAnd, CumSum, Gather,
ScatterElements...; default domain, opset 18). Every input of that subgraph is an initializer, so
onnxruntime's constant folding (graph optimizations basic or higher) decodes it once at session
creation; with optimizations off it runs at every inference (same result, slower).

Bit packing (:func:`pack_bits`): value ``i``'s bit ``j`` is stream bit ``i b + j``, and stream bit
``t`` is bit ``t mod 8`` (least significant first) of byte ``t // 8``.

Biases (:func:`bias_tensors`: the bias of a Conv/Gemm per the op table, or of a MatMul via its
Add) can be stored as per-tensor symmetric int8, ``Cast(q) * scale`` (:func:`store_int8`), also
folded at session creation: a quarter of their bytes, a relative error of at most
``1/254`` of the tensor's largest magnitude.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.cluster.kmeans import huffman_bits_per_symbol

__all__ = ["SPARSE_STORAGE_OPSET", "LabelEncoding", "bits_for", "pack_bits", "unpack_bits", "encode_labels",
           "encode_bitmask_groups", "encode_dense_groups",
           "decode_labels", "build_label_decoder", "bias_tensors", "int8_symmetric", "store_int8"]

#: BitwiseAnd (the bit unpacking) needs opset 18.
SPARSE_STORAGE_OPSET = 18

Kind = Literal["dense", "bitmask", "relative"]
KINDS: tuple[Kind, ...] = ("dense", "bitmask", "relative")


def bits_for(k: int) -> int:
    """Bits per label for a codebook of ``k`` entries (at least 1)."""
    return max(1, int(k - 1).bit_length())


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers below ``2**bits`` (1..16 bits) into uint8 (module docstring)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    stream = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first ``n`` values of ``bits`` bits each from :func:`pack_bits` output, as int64."""
    stream = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: n * bits]
    if stream.size != n * bits:
        raise ValueError(f"{packed.size} bytes hold fewer than {n} values of {bits} bits")
    return (stream.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class LabelEncoding:
    """One label tensor in one encoding (see the module docstring)."""

    kind: Kind
    shape: tuple[int, ...]
    label_bits: int
    labels: np.ndarray  # packed labels (dense: all; bitmask: nonzeros; relative: entries)
    count: int  # labels stored
    zero_label: int = 0
    mask: np.ndarray | None = None  # bitmask: packed mask, 1 bit per weight
    gaps: np.ndarray | None = None  # relative: packed gaps
    gap_bits: int = 0
    #: label histogram of the stored labels and gap histogram (for the entropy-coding estimate)
    label_counts: np.ndarray | None = dataclasses.field(default=None, repr=False)
    gap_counts: np.ndarray | None = dataclasses.field(default=None, repr=False)
    #: bitmask with mixed widths (:func:`encode_bitmask_groups`): ``(bits, stored labels)`` per
    #: group, in stream order; ``labels`` then holds the groups' packed streams one after another
    groups: tuple[tuple[int, int], ...] | None = None

    @property
    def n(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays (what the file holds, apart from names and headers)."""
        return sum(int(a.nbytes) for a in (self.labels, self.mask, self.gaps) if a is not None)

    def zlib_bytes(self) -> int:
        """zlib level-9 size of the packed arrays, compressed one by one."""
        return sum(len(zlib.compress(a.tobytes(), 9)) for a in (self.labels, self.mask, self.gaps) if a is not None)

    def entropy_bytes(self) -> int:
        """Optimal Huffman code size of the streams: labels and gaps by symbol, the mask by byte."""
        bits = 0.0
        if self.count and self.label_counts is not None:
            bits += self.count * huffman_bits_per_symbol(self.label_counts)
        if self.count and self.gap_counts is not None:
            bits += self.count * huffman_bits_per_symbol(self.gap_counts)
        if self.mask is not None and self.mask.size:
            counts = np.bincount(self.mask, minlength=256)
            bits += self.mask.size * huffman_bits_per_symbol(counts)
        return int(np.ceil(bits / 8))


def _dense(labels: np.ndarray, shape: tuple[int, ...], b: int) -> LabelEncoding:
    return LabelEncoding("dense", shape, b, pack_bits(labels, b), labels.size,
                         label_counts=np.bincount(labels, minlength=1))


def _bitmask(labels: np.ndarray, shape: tuple[int, ...], b: int, zero: int) -> LabelEncoding:
    nz = labels != zero
    kept = labels[nz]
    return LabelEncoding("bitmask", shape, b, pack_bits(kept, b), kept.size, zero,
                         mask=np.packbits(nz.astype(np.uint8), bitorder="little"),
                         label_counts=np.bincount(kept, minlength=1))


def _relative_entries(positions: np.ndarray, gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps of the entries (nonzeros and fillers) and which entries are real nonzeros."""
    step = 1 << gap_bits  # a filler advances by 2^g positions (gap 2^g - 1)
    prev = np.concatenate([[-1], positions[:-1]])
    gap = positions - prev - 1
    fillers = gap // step
    entries = fillers + 1
    real = np.zeros(int(entries.sum()), bool)
    ends = np.cumsum(entries) - 1
    real[ends] = True
    gaps = np.full(real.size, step - 1, np.int64)
    gaps[ends] = gap - fillers * step
    return gaps, real


def _relative(labels: np.ndarray, shape: tuple[int, ...], b: int, zero: int, gap_bits: int) -> LabelEncoding:
    positions = np.flatnonzero(labels != zero)
    gaps, real = _relative_entries(positions, gap_bits)
    entry_labels = np.full(real.size, zero, np.int64)
    entry_labels[real] = labels[positions]
    return LabelEncoding("relative", shape, b, pack_bits(entry_labels, b), real.size, zero,
                         gaps=pack_bits(gaps, gap_bits), gap_bits=gap_bits,
                         label_counts=np.bincount(entry_labels, minlength=1),
                         gap_counts=np.bincount(gaps, minlength=1))


def _relative_size(positions: np.ndarray, b: int, gap_bits: int) -> int:
    prev = np.concatenate([[-1], positions[:-1]])
    entries = int(((positions - prev - 1) >> gap_bits).sum()) + positions.size
    return -(-entries * b // 8) + -(-entries * gap_bits // 8)


def encode_labels(labels: np.ndarray, k: int, zero_label: int | None = None,
                  kinds: tuple[Kind, ...] = KINDS) -> LabelEncoding:
    """The smallest of ``kinds`` for integer ``labels`` in ``[0, k)``.

    Without a ``zero_label`` (no exact-zero centroid) only ``dense`` applies. Ties go to the
    earlier kind in ``kinds`` (dense first: the cheapest to decode).
    """
    flat = np.asarray(labels).reshape(-1).astype(np.int64)
    shape = tuple(int(d) for d in np.shape(labels))
    b = bits_for(k)
    if flat.size and (flat.min() < 0 or flat.max() >= k):
        raise ValueError(f"labels must lie in [0, {k - 1}]")
    options: list[tuple[int, Callable[[], LabelEncoding]]] = []
    if "dense" in kinds or zero_label is None:
        options.append((-(-flat.size * b // 8), lambda: _dense(flat, shape, b)))
    if zero_label is not None:
        nnz = int(np.count_nonzero(flat != zero_label))
        if "bitmask" in kinds:
            options.append((-(-flat.size // 8) + -(-nnz * b // 8), lambda: _bitmask(flat, shape, b, zero_label)))
        if "relative" in kinds:
            positions = np.flatnonzero(flat != zero_label)
            for g in range(1, 9):
                options.append((_relative_size(positions, b, g),
                                lambda g=g: _relative(flat, shape, b, zero_label, g)))
    best = min(range(len(options)), key=lambda i: (options[i][0], i))
    return options[best][1]()


def encode_bitmask_groups(labels: list[np.ndarray], bits: list[int], zero_label: int = 0) -> LabelEncoding:
    """A bitmask encoding of the concatenation of ``labels`` where group ``i``'s nonzero labels
    are packed at ``bits[i]`` bits (tensors clustered to codebooks of different sizes)."""
    flats = [np.asarray(a).reshape(-1).astype(np.int64) for a in labels]
    for flat, b in zip(flats, bits):
        if flat.size and (flat.min() < 0 or flat.max() >= 1 << b):
            raise ValueError(f"labels must lie in [0, {(1 << b) - 1}] for {b} bits")
    flat = np.concatenate(flats)
    nz = flat != zero_label
    kept = [f[f != zero_label] for f in flats]
    streams = [pack_bits(k, b) for k, b in zip(kept, bits)]
    return LabelEncoding("bitmask", (flat.size,), max(bits), np.concatenate(streams), int(nz.sum()), zero_label,
                         mask=np.packbits(nz.astype(np.uint8), bitorder="little"),
                         label_counts=np.bincount(flat[nz], minlength=1),
                         groups=tuple((int(b), int(k.size)) for b, k in zip(bits, kept)))


def encode_dense_groups(labels: list[np.ndarray], bits: list[int]) -> LabelEncoding:
    """A dense encoding of the concatenation of ``labels`` where group ``i``'s labels are packed at
    ``bits[i]`` bits (tensors given codebooks of different sizes, without zeros worth a mask)."""
    flats = [np.asarray(a).reshape(-1).astype(np.int64) for a in labels]
    for flat, b in zip(flats, bits):
        if flat.size and (flat.min() < 0 or flat.max() >= 1 << b):
            raise ValueError(f"labels must lie in [0, {(1 << b) - 1}] for {b} bits")
    flat = np.concatenate(flats)
    return LabelEncoding("dense", (flat.size,), max(bits), np.concatenate([pack_bits(f, b) for f, b in zip(flats, bits)]),
                         int(flat.size), label_counts=np.bincount(flat, minlength=1),
                         groups=tuple((int(b), int(f.size)) for b, f in zip(bits, flats)))


def _group_streams(enc: LabelEncoding) -> list[tuple[int, int, np.ndarray]]:
    """``(bits, count, packed)`` per group of a grouped bitmask encoding."""
    out, offset = [], 0
    for b, count in enc.groups or ():
        size = -(-count * b // 8)
        out.append((b, count, enc.labels[offset: offset + size]))
        offset += size
    return out


def decode_labels(enc: LabelEncoding) -> np.ndarray:
    """The labels (int64, the weight's shape) that ``enc`` stores: the numpy reference decoder."""
    n = enc.n
    if enc.groups is not None and enc.kind == "dense":
        flat = np.concatenate([unpack_bits(packed, b, count) for b, count, packed in _group_streams(enc)])
    elif enc.groups is not None:
        mask = np.unpackbits(enc.mask, bitorder="little")[:n].astype(np.int64)
        kept = [unpack_bits(packed, b, count) for b, count, packed in _group_streams(enc)]
        ext = np.concatenate([[enc.zero_label], *kept])
        flat = ext[np.cumsum(mask) * mask]
    elif enc.kind == "dense":
        flat = unpack_bits(enc.labels, enc.label_bits, n)
    elif enc.kind == "bitmask":
        mask = np.unpackbits(enc.mask, bitorder="little")[:n].astype(np.int64)
        ext = np.concatenate([[enc.zero_label], unpack_bits(enc.labels, enc.label_bits, enc.count)])
        flat = ext[np.cumsum(mask) * mask]
    else:
        positions = np.cumsum(unpack_bits(enc.gaps, enc.gap_bits, enc.count) + 1) - 1
        flat = np.full(n, enc.zero_label, np.int64)
        flat[positions] = unpack_bits(enc.labels, enc.label_bits, enc.count)
    return flat.reshape(enc.shape)


def build_label_decoder(
    add: Callable[..., ir.Value], const: Callable[[str, np.ndarray], ir.Value], enc: LabelEncoding,
    shape: bool = True,
) -> ir.Value:
    """Nodes that rebuild :func:`decode_labels` (int64, the weight's shape; flat with ``shape=False``)
    from initializers.

    All packed arrays of the encoding are stored as ONE uint8 initializer of shape ``[bytes, 1]``
    (mask or gaps first, then the labels; with a bitmask the labels stream starts with
    ``zero_label``, so the gather by rank needs no Concat), unpacked to bits once
    (``BitShift -> BitwiseAnd -> Reshape -> Cast``); each field is a Slice of that bit stream,
    and a field of ``b > 1`` bits per value is ``Reshape [-1, b] -> MatMul [1, 2, 4, ...]``.

    ``add(op_type, inputs, **attributes)`` appends a node and returns its output;
    ``const(suffix, array)`` registers an initializer and returns its value.
    """
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    made: dict[str, ir.Value] = {}

    def const(suffix: str, array: np.ndarray, _register=const) -> ir.Value:  # one initializer per suffix
        if suffix not in made:
            made[suffix] = _register(suffix, array)
        return made[suffix]

    fields = _stream_fields(enc)
    packed = np.concatenate([array for _, array, _, _ in fields]).reshape(-1, 1)
    stream = add("BitwiseAnd", [add("BitShift", [const("packed", packed), const("shifts", np.arange(8, dtype=np.uint8))],
                                    direction="RIGHT"), const("one", np.array([1], np.uint8))])
    bits_all = add("Cast", [add("Reshape", [stream, const("flat", i64(-1))])], to=ir.DataType.INT64)
    values: dict[str, ir.Value] = {}
    offset = 0
    for name, array, bits, count in fields:
        start = const(f"{name}_start", i64(8 * offset)) if offset else const("zero64", i64(0))
        field = add("Slice", [bits_all, start, const(f"{name}_end", i64(8 * offset + count * bits))])
        if bits > 1:
            field = add("MatMul", [add("Reshape", [field, const(f"rows{bits}", i64(-1, bits))]),
                                   const(f"pow{bits}", (np.int64(1) << np.arange(bits)).astype(np.int64))])
        values[name] = field
        offset += array.size
    if enc.kind == "dense":
        groups = [values[name] for name, _, _, _ in fields]
        flat = groups[0] if len(groups) == 1 else add("Concat", groups, axis=0)
    elif enc.kind == "bitmask":
        mask = values["mask"]
        rank = add("Mul", [add("CumSum", [mask, const("zero64", i64(0))]), mask])
        groups = [values[name] for name, _, _, _ in fields if name.startswith("labels")]
        labels = groups[0] if len(groups) == 1 else add("Concat", groups, axis=0)
        flat = add("Gather", [labels, rank])
    else:
        ends = add("CumSum", [add("Add", [values["gaps"], const("one64", i64(1))]), const("zero64", i64(0))])
        positions = add("Sub", [ends, const("one64", i64(1))])
        base = add("ConstantOfShape", [const("size", i64(enc.n))],
                   value=ir.tensor(np.array([enc.zero_label], np.int64)))
        flat = add("ScatterElements", [base, positions, values["labels"]])
    return add("Reshape", [flat, const("shape", np.array(enc.shape, np.int64))]) if shape else flat


def _stream_fields(enc: LabelEncoding) -> list[tuple[str, np.ndarray, int, int]]:
    """The packed arrays of ``enc`` in stream order: (name, uint8 bytes, bits per value, values)."""
    if enc.kind == "dense" and enc.groups is not None:
        return [(f"labels{i}" if i else "labels", packed, b, count)
                for i, (b, count, packed) in enumerate(_group_streams(enc))]
    if enc.kind == "dense":
        return [("labels", enc.labels, enc.label_bits, enc.n)]
    if enc.groups is not None:  # the first group's stream starts with zero_label
        fields = [("mask", enc.mask, 1, enc.n)]
        for i, (b, count, packed) in enumerate(_group_streams(enc)):
            if i == 0:
                packed = pack_bits(np.concatenate([[enc.zero_label], unpack_bits(packed, b, count)]), b)
            fields.append((f"labels{i}" if i else "labels", packed, b, count + (i == 0)))
        return fields
    if enc.kind == "bitmask":
        kept = unpack_bits(enc.labels, enc.label_bits, enc.count)
        labels = pack_bits(np.concatenate([[enc.zero_label], kept]), enc.label_bits)
        return [("mask", enc.mask, 1, enc.n), ("labels", labels, enc.label_bits, enc.count + 1)]
    return [("gaps", enc.gaps, enc.gap_bits, enc.count), ("labels", enc.labels, enc.label_bits, enc.count)]


def encoding_stats(enc: LabelEncoding) -> dict[str, Any]:
    """What the report says about one encoding."""
    return {"storage": enc.kind, "label_bits": enc.label_bits, "stored_labels": enc.count,
            "gap_bits": enc.gap_bits if enc.kind == "relative" else None}


def bias_tensors(graph: ir.Graph, model: ir.Model, min_elements: int) -> list[ir.Value]:
    """Float initializers every use of which is a bias: the bias role of a linear op (op table), or
    the constant operand of an Add right after a MatMul.

    Graph inputs and outputs and tensors under ``min_elements`` values are left out.
    """
    from onnxcomp.ops import LINEAR_OPS, is_matmul_node

    found = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if (tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size < min_elements
                or value.is_graph_input() or value.is_graph_output() or not list(value.uses())):
            continue

        def is_bias(node: ir.Node, idx: int) -> bool:
            spec = LINEAR_OPS.lookup(node, model)
            if spec is not None:
                return any(r.input_index == idx and r.kind == "bias" for r in spec.roles)
            if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                return False
            producer = node.inputs[1 - idx].producer() if node.inputs[1 - idx] is not None else None
            return producer is not None and is_matmul_node(producer)

        if all(is_bias(use.node, use.idx) for use in value.uses()):
            found.append(value)
    return found


def int8_symmetric(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Per-tensor symmetric int8: ``q`` in [-127, 127] and ``scale`` with ``values ~ q * scale``."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = np.float32(peak / 127.0 if peak > 0 else 1.0)
    q = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
    return q, scale


def store_int8(
    add: Callable[..., ir.Value], const: Callable[[str, np.ndarray], ir.Value], value: ir.Value
) -> tuple[ir.Value, np.ndarray]:
    """``Cast(q) * scale`` (folded at session creation) for the float initializer ``value``.

    Returns the output (the caller gives it the tensor's name) and the float values it decodes to.
    """
    values = value.const_value.numpy()
    q, scale = int8_symmetric(values)
    out = add("Mul", [add("Cast", [const("q", q)], to=ir.DataType.FLOAT), const("scale", np.array(scale, np.float32))])
    return out, (q.astype(np.float32) * scale).astype(np.float32)
