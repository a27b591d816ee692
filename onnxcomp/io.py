"""Model input/output: the only module that touches protobuf and file paths.

Everything else in onnxcomp works on :class:`onnx_ir.Model`. This module turns the things a user
has (a path, bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``) into one, checks it, and writes
results back safely.

Guarantees
----------
* **Never modify the input.** Loading from a path reads it; loading from a ``ModelProto`` copies it;
  an ``onnx_ir.Model`` is returned as is (callers that transform in place clone it first, see
  :func:`clone_model`). Saving refuses a target that is the source model file or one of its
  external-data files.
* **Atomic writes.** A model is written into a temporary folder inside the target folder and renamed
  into place (external data first, under a name the previous model does not read, then the model
  file; the previous data is removed last), so an interrupted save (error, Ctrl-C) leaves either
  the previous model with its data or nothing, never a half-written file or a mixed pair.
* **Safe destinations.** :func:`check_destinations` refuses, before any work, an output that is an
  input or another output (by path, symlink or hard link, external data included), a folder, a
  file in a missing or unwritable folder, or an existing read-only file (unless forced).
* **Compact files.** Shapes and types of intermediate values (``value_info``), which the passes'
  shape inference fills in and onnxruntime infers again at session creation anyway, are not written
  unless asked for (``keep_value_info=True``); graph inputs and outputs keep theirs.
* **Big models.** External data is memory-mapped by onnx_ir, never read into a protobuf just to
  inspect it. Models whose initializers exceed the 2 GB protobuf limit are saved with external data
  and handed to onnxruntime through a temporary file instead of bytes.
* **Clear errors.** A missing file, a folder, an empty file, a file that is not ONNX or is truncated,
  an IR version or opset newer than the installed ``onnx`` understands, missing or short external
  data, and a graph that fails ``onnx.checker`` each raise :class:`~onnxcomp.errors.ModelLoadError`
  naming the file.

Tensors are shared, not copied, between a model and its clones: passes must never write into a
tensor's array in place, they replace a value's ``const_value`` with a new tensor.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import external_data as ir_external_data

from onnxcomp.errors import ModelLoadError, ModelSaveError, OpsetError, RefusedOutputError

__all__ = [
    "ModelSource",
    "PROTOBUF_LIMIT",
    "load_model",
    "save_model",
    "clone_model",
    "model_to_bytes",
    "session_source",
    "upgrade_opset",
    "exported_model",
    "rewrite_as_proto",
    "first_line",
    "check_model",
    "check_target",
    "check_destinations",
    "model_files",
    "saved_data_files",
    "write_text_atomic",
    "onnx_opset",
    "initializer_nbytes",
    "external_data_files",
    "source_path",
    "unique_node_names",
    "renamed_nodes",
    "LARGE_MODEL_BYTES",
    "release_pages",
    "spill_tensors",
    "holds_external_data",
    "scratch_folder",
]

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto, ir.Model]

#: Protobuf refuses messages of 2 GiB; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20

_SOURCE_KEY = "onnxcomp.source_path"
_EXTERNAL_KEY = "onnxcomp.source_external_data"
_RENAMED_KEY = "onnxcomp.renamed_nodes"
#: external-data files a model given in memory (an ``onnx_ir.Model``) read its tensors from, kept
#: by its copies: a rewritten copy may read none of them, and still may not be saved over them
_SOURCE_DATA_KEY = "onnxcomp.source_data_files"
_DEFAULT_DOMAINS = ("", "ai.onnx")


def load_model(source: ModelSource, *, check: bool = True) -> ir.Model:
    """Load a model from a path, bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.

    Args:
        source: where the model comes from. An ``onnx_ir.Model`` is returned unchanged (same object).
        check: run ``onnx.checker`` (structure only, no full shape check) and the version checks.

    Raises:
        ModelLoadError: the file is missing, a folder, empty, not ONNX or truncated, too new for the
            installed onnx, has missing or short external data, or fails the checker. The message
            names the file (or "<bytes>" / "<ModelProto>").
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        return _from_proto(proto, "<ModelProto>", base_dir=None, check=check)
    if isinstance(source, (bytes, bytearray, memoryview)):
        what = "<bytes>"
        if len(source) == 0:
            raise ModelLoadError(f"{what}: empty input (0 bytes), not an ONNX model")
        try:
            proto = onnx.load_model_from_string(bytes(source))
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise ModelLoadError(f"{what}: not an ONNX model or truncated ({_first_line(exc)})") from None
        return _from_proto(proto, what, base_dir=None, check=check)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), check=check)
    raise TypeError(
        f"cannot load a model from {type(source).__name__}; "
        "pass a path, bytes, onnx.ModelProto or onnx_ir.Model"
    )


def _load_path(path: Path, *, check: bool) -> ir.Model:
    if not path.exists():
        raise ModelLoadError(f"{path}: model file not found")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty (0 bytes), not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except PermissionError:
        raise ModelLoadError(f"{path}: permission denied") from None
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: not an ONNX model or truncated (protobuf decode failed: {_first_line(exc)})"
        ) from None
    model = _from_proto(proto, str(path), base_dir=path.parent, check=check)
    model.meta[_SOURCE_KEY] = str(path.resolve())
    if external_data_files(model):
        model.meta[_EXTERNAL_KEY] = True
    return model


def _from_proto(
    proto: onnx.ModelProto, what: str, *, base_dir: Path | None, check: bool
) -> ir.Model:
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelLoadError(f"{what}: not an ONNX model (no graph or no IR version)")
    sparse = proto.graph.sparse_initializer
    if sparse:  # onnx_ir drops them: their readers would lose an input
        names = ", ".join(repr(t.values.name) for t in sparse[:3]) + (", ..." if len(sparse) > 3 else "")
        raise ModelLoadError(f"{what}: holds sparse initializers ({names}), which onnxcomp does not read; "
                             "store them as dense initializers")
    if check:
        _check_versions(proto, what)
        try:
            # The checker resolves external-data locations against the model's folder only when
            # given the path; the graph itself is small when tensors are external.
            if base_dir is not None and _uses_external_data(proto):
                onnx.checker.check_model(what)
            else:
                onnx.checker.check_model(proto)
        except Exception as exc:  # ValidationError, or a damaged string the checker cannot decode
            if base_dir is not None and _uses_external_data(proto):  # a missing data file, said plainly
                try:
                    external = ir.serde.deserialize_model(proto)
                except Exception:
                    external = None
                if external is not None:
                    ir_external_data.set_base_dir(external.graph, str(base_dir))
                    _check_external_data(external, what)
            raise ModelLoadError(f"{what}: fails onnx.checker: {_first_line(exc)}") from None
    _refuse_map_types(proto, what)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{what}: cannot be read: {_first_line(exc)}") from None
    if base_dir is not None:
        ir_external_data.set_base_dir(model.graph, str(base_dir))
    unique_node_names(model)
    _check_external_data(model, what)
    if check:
        _check_shapes(proto, model, what)
    return model


def _type_text(t: onnx.TypeProto) -> str:
    """An ONNX type as ONNX writes it: ``seq(map(int64,tensor(float)))``."""
    which = t.WhichOneof("value")
    if which == "tensor_type":
        return f"tensor({onnx.TensorProto.DataType.Name(t.tensor_type.elem_type).lower()})" \
            if t.tensor_type.elem_type else "tensor"
    if which == "sequence_type":
        return f"seq({_type_text(t.sequence_type.elem_type)})"
    if which == "optional_type":
        return f"optional({_type_text(t.optional_type.elem_type)})"
    if which == "map_type":
        key = onnx.TensorProto.DataType.Name(t.map_type.key_type).lower() if t.map_type.key_type else "?"
        return f"map({key},{_type_text(t.map_type.value_type)})"
    return which or "no type"


def _holds_map(t: onnx.TypeProto) -> bool:
    which = t.WhichOneof("value")
    if which == "map_type":
        return True
    if which == "sequence_type":
        return _holds_map(t.sequence_type.elem_type)
    if which == "optional_type":
        return _holds_map(t.optional_type.elem_type)
    return False


def _refuse_map_types(proto: onnx.ModelProto, what: str) -> None:
    """Refuse, naming it, a graph input, output or intermediate value of a map type (onnx_ir, which
    every pass works on, represents tensors, sequences and optionals only; its own error named an
    internal function). The usual one is scikit-learn's ``ZipMap`` (skl2onnx's default for
    classifiers: the probabilities as one dictionary per sample), which has a plain way out."""
    from onnxcomp.ops import is_zipmap

    graph = proto.graph
    places = [("input", vi) for vi in graph.input] + [("output", vi) for vi in graph.output] + \
        [("value", vi) for vi in graph.value_info]
    for where, vi in places:
        if not _holds_map(vi.type):
            continue
        producer = next((n for n in graph.node if vi.name in n.output), None)
        by = f", made by {producer.op_type} node {producer.name!r}" if producer is not None else ""
        hint = ""
        if producer is not None and is_zipmap(producer.domain, producer.op_type):
            hint = ("; that is scikit-learn's ZipMap (the probabilities as one dictionary per sample): convert "
                    "the model without it (skl2onnx: to_onnx(model, X, options={'zipmap': False})), whose "
                    "output is the probabilities as a tensor [N, classes]")
        raise ModelLoadError(f"{what}: {where} {vi.name!r} is of type {_type_text(vi.type)}{by}, which onnxcomp "
                             f"cannot read (it reads tensors, sequences and optionals, not maps){hint}")


def _check_shapes(proto: onnx.ModelProto, model: ir.Model, what: str) -> None:
    """Refuse a graph whose shapes disagree (what onnxruntime would only find when running it).

    ONNX shape inference in strict mode names the node it fails on; it does not compare a Conv's
    input channels with its weight, so linear ops (``onnxcomp.ops.LINEAR_OPS``) are checked here:
    the data input's channels, and the bias length, against what the weight's shape implies.
    """
    from onnxcomp.ops import LINEAR_OPS

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ModelLoadError(f"{what}: shapes or types do not agree: {_inference_message(exc)}") from None
    except Exception:  # inference unavailable (e.g. an op it does not know): onnxruntime decides
        return
    dims: dict[str, tuple[int | None, ...]] = {t.name: tuple(t.dims) for t in inferred.graph.initializer}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    for node in model.graph:
        spec = LINEAR_OPS.lookup(node, model)
        if spec is None or not spec.grouped or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        x, w = node.inputs[spec.data_input], node.inputs[1]
        xs, ws = dims.get(x.name) if x is not None else None, dims.get(w.name)
        if not ws or None in ws or len(ws) < 3:
            continue
        group = node.attributes.get("group")
        if group is not None and (group.as_int() < 1 or ws[0] % group.as_int()):
            raise ModelLoadError(f"{what}: node {node.name!r} ({node.op_type}): group {group.as_int()} "
                                 f"does not divide the {ws[0]} channels of weight {w.name!r}")
        c_in, c_out = spec.channels(node, ws)
        if xs and len(xs) == len(ws) and xs[spec.data_channel_axis] not in (None, c_in):
            raise ModelLoadError(
                f"{what}: node {node.name!r} ({node.op_type}): input {x.name!r} has "
                f"{xs[spec.data_channel_axis]} channels but weight {w.name!r} of shape {list(ws)} takes {c_in}"
            )
        b = node.inputs[2] if len(node.inputs) > 2 else None
        bs = dims.get(b.name) if b is not None else None
        if bs is not None and bs != (c_out,):
            raise ModelLoadError(
                f"{what}: node {node.name!r} ({node.op_type}): bias {b.name!r} of shape {list(bs)} "
                f"does not match the {c_out} output channels of weight {w.name!r}"
            )


def _inference_message(exc: BaseException) -> str:
    """ONNX's inference error without its repeated prefixes: '(op_type:..., node name: ...): why'."""
    text = _first_line(exc).replace("[ShapeInferenceError] Inference error(s): ", "")
    return text.replace("[ShapeInferenceError] ", "").replace("[TypeInferenceError] ", "")


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    """Whether any tensor (initializers, subgraphs, ``Constant``-like attributes) is external."""
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in _tensor_protos(proto.graph))


def _tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensor_protos(sub)


def _check_versions(proto: onnx.ModelProto, what: str) -> None:
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{what}: IR version {proto.ir_version} is newer than the installed onnx "
            f"{onnx.__version__} supports ({onnx.IR_VERSION}); upgrade onnx"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in _DEFAULT_DOMAINS and opset.version > newest:
            raise ModelLoadError(
                f"{what}: opset {opset.version} is newer than the installed onnx "
                f"{onnx.__version__} supports ({newest}); upgrade onnx"
            )


def _iter_external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    """External tensors of initializers (every graph) and of node attributes (``Constant``)."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                yield name, tensor
    for node, attr in _external_attributes(model):
        tensors = [attr.value] if attr.type == ir.AttributeType.TENSOR else list(attr.value)
        for tensor in tensors:
            if isinstance(tensor, ir.ExternalTensor):
                yield tensor.name or f"{node.name or node.op_type}.{attr.name}", tensor


def _external_attributes(model: ir.Model) -> Iterator[tuple[ir.Node, ir.Attr]]:
    """Tensor attributes holding external data, in every graph."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                external = isinstance(attr.value, ir.ExternalTensor)
            elif attr.type == ir.AttributeType.TENSORS:
                external = any(isinstance(t, ir.ExternalTensor) for t in attr.value)
            else:
                continue
            if external:
                yield node, attr


def _check_external_data(model: ir.Model, what: str) -> None:
    sizes: dict[str, int] = {}
    for name, tensor in _iter_external_tensors(model):
        path = tensor.path
        if path not in sizes:
            if not os.path.isfile(path):
                raise ModelLoadError(
                    f"{what}: tensor {name!r} refers to external data file {path}, which does not exist"
                )
            sizes[path] = os.path.getsize(path)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[path]:
            raise ModelLoadError(
                f"{what}: tensor {name!r} needs bytes up to {end} of {path}, "
                f"which has only {sizes[path]} (truncated external data)"
            )


def external_data_files(model: ir.Model) -> set[str]:
    """Absolute paths of the external-data files the model's tensors are read from."""
    return {os.path.abspath(t.path) for _, t in _iter_external_tensors(model)}


def source_path(model: ir.Model) -> Path | None:
    """The file the model was loaded from, if it came from a file."""
    src = model.meta.get(_SOURCE_KEY)
    return Path(src) if src else None


def unique_node_names(model: ir.Model) -> dict[str, list[str]]:
    """Give the second and later nodes of one name in a graph unique names, in place (``a`` ->
    ``a_1``, ``a_2``, ... in graph order, skipping names the model already uses); returns
    :func:`renamed_nodes` (every rename since the model was loaded).

    Two nodes of one name are legal ONNX (onnx.checker takes them) but onnxruntime refuses the
    graph, and passes, selections and reports refer to nodes by name. Every command loads its
    model through here, so the original runs in onnxruntime as the compressed model does. Empty
    names are left alone (onnxruntime takes any number of them).
    """
    graphs = [model.graph, *model.graph.subgraphs()]
    taken = {node.name for graph in graphs for node in graph if node.name}
    renamed = {name: list(new) for name, new in (model.meta.get(_RENAMED_KEY) or {}).items()}
    for graph in graphs:
        seen: set[str] = set()
        for node in graph:
            name = node.name
            if not name:
                continue
            if name not in seen:
                seen.add(name)
                continue
            k = 1
            while f"{name}_{k}" in taken:
                k += 1
            node.name = f"{name}_{k}"
            taken.add(node.name)
            seen.add(node.name)
            renamed.setdefault(name, []).append(node.name)
    if renamed:
        model.meta[_RENAMED_KEY] = renamed
    return renamed


def renamed_nodes(model: ir.Model) -> dict[str, list[str]]:
    """Per node name that several nodes of one graph had, the new names of the copies
    (:func:`unique_node_names`; the first node keeps the name); empty when none was renamed."""
    return dict(model.meta.get(_RENAMED_KEY) or {})


def clone_model(model: ir.Model) -> ir.Model:
    """A structural copy of ``model`` that passes can change in place.

    Tensors are shared, not copied (cheap for big models): passes replace ``const_value`` with new
    tensors and never write into an existing tensor.
    """
    model = _model_argument(model, "clone_model")
    clone = model.clone()
    _carry_source(model, clone)
    return clone


def _model_argument(model: Any, what: str) -> ir.Model:
    """``model`` as an ``onnx_ir.Model``: an ``onnx.ModelProto`` is read as :func:`load_model`
    reads it; anything else (a path: load it first) is a TypeError naming what was given."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return load_model(model)
    raise TypeError(f"{what} takes an onnx_ir.Model or onnx.ModelProto, got {type(model).__name__}"
                    + (" (load the model first: io.load_model(path))" if isinstance(model, (str, os.PathLike)) else ""))


def _carry_source(model: ir.Model, copy: ir.Model) -> None:
    """Give ``copy`` (of ``model``) what :func:`check_destinations` knows of ``model``'s files: the
    file it was loaded from, whether it had external data, and, for a model given in memory, the
    external-data files its tensors read now (``copy`` may come to read none of them)."""
    for key in (_SOURCE_KEY, _EXTERNAL_KEY, _SOURCE_DATA_KEY, _RENAMED_KEY):
        if key in model.meta:
            copy.meta[key] = model.meta[key]
    if _SOURCE_KEY not in model.meta:
        files = external_data_files(model) | set(model.meta.get(_SOURCE_DATA_KEY, ()))
        if files:
            copy.meta[_SOURCE_DATA_KEY] = sorted(files)
            copy.meta[_EXTERNAL_KEY] = True


def initializer_nbytes(model: ir.Model) -> int:
    """Bytes held by the initializers of the main graph and all subgraphs."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def onnx_opset(model: ir.Model) -> int:
    """The default-domain opset version the model imports (0 when it imports none)."""
    for domain in _DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return 0


def _inlined(model: ir.Model) -> ir.Model:
    """A clone whose external tensors are read into memory (the original is untouched).

    The clone shares its tensors with the original, so they are not converted with
    ``onnx_ir.external_data.load_to_model``: that releases each external tensor after reading it,
    closing the original's memory map under any array still viewing it ('BufferError: cannot
    close exported pointers exist': prune of khmersm, whose weights are external data).
    """
    if not any(True for _ in _iter_external_tensors(model)):
        return model
    clone = model.clone()
    _initializers_in_memory(clone)
    for node, attr in list(_external_attributes(clone)):
        if attr.type == ir.AttributeType.TENSOR:
            node.attributes[attr.name] = ir.AttrTensor(attr.name, _in_memory(attr.value))
        else:
            node.attributes[attr.name] = ir.AttrTensors(attr.name, [_in_memory(t) for t in attr.value])
    return clone


def _initializers_in_memory(model: ir.Model, up_to: int | None = None) -> None:
    """Read the external initializers of every graph (those of at most ``up_to`` bytes; None: all)
    into memory tensors that view the same data, without releasing the external ones (see
    :func:`_inlined`)."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and (up_to is None or tensor.nbytes <= up_to):
                value.const_value = _in_memory(tensor)


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    return ir.Tensor(tensor.numpy(), name=tensor.name)


def varint_int64_tensor(values: np.ndarray, name: str | None = None) -> ir.TensorProtocol | None:
    """An int64 tensor stored as ``int64_data`` (varints: 1-2 bytes for a small non-negative
    value, 10 for a negative one) instead of ``raw_data`` (8 bytes each), when that is shorter;
    None when it is not. The values are the same; only their encoding in the file changes."""
    flat = np.asarray(values, np.int64).reshape(-1).tolist()
    varint = sum(10 if v < 0 else max(1, -(-v.bit_length() // 7)) for v in flat)
    if varint + 2 >= 8 * len(flat):
        return None
    proto = onnx.helper.make_tensor(name or "", onnx.TensorProto.INT64, list(np.shape(values)), flat)
    return ir.serde.TensorProtoTensor(proto)


def model_to_bytes(model: ir.Model) -> bytes:
    """Serialize ``model`` (external data inlined) for onnxruntime or for hashing.

    Raises:
        ModelSaveError: the model is over the 2 GB protobuf limit; use :func:`session_source`.
    """
    size = initializer_nbytes(model)
    if size > PROTOBUF_LIMIT:
        raise ModelSaveError(
            f"model holds {size / 2**30:.2f} GiB of initializers, over the 2 GB protobuf limit; "
            "it can only be saved with external data"
        )
    return ir.to_proto(_inlined(model)).SerializeToString()


#: Models holding this many bytes of initializers (or any external data) reach onnxruntime through
#: a file, not bytes: serializing to bytes holds the weights two more times.
LARGE_MODEL_BYTES = 256 * 2**20
#: In-memory tensors at least this big are moved to disk by :func:`spill_tensors`.
SPILL_MIN_BYTES = 2**20
_PAGE = mmap.PAGESIZE
_ALIGN = 64 * 1024  # onnxruntime memory-maps external tensors whose offset is aligned like this


@contextlib.contextmanager
def session_source(model: ir.Model, *, link: bool = True) -> Iterator[bytes | str]:
    """What to hand ``onnxruntime.InferenceSession``: bytes, or a temporary file for big models.

    Small models without external data go as bytes (nothing touches the disk). A model with
    external data (or loaded from a file with external data), or over :data:`LARGE_MODEL_BYTES`, is written into a temporary folder that is
    removed when the context exits: its external-data files are hard-linked there (onnxruntime
    memory-maps them, so the weights are in memory once, shared through the page cache; a copy
    is made only where a hard link is impossible) and its in-memory tensors are written to one data
    file next to the model. The process's own resident pages of external data are dropped first
    (:func:`release_pages`), so onnxruntime's mapping does not come on top of them.
    ``link=False`` copies external data instead of linking it (``onnx.checker`` refuses files with
    several hard links).
    """
    size = initializer_nbytes(model)
    if size <= PROTOBUF_LIMIT and size < LARGE_MODEL_BYTES and not holds_external_data(model):
        yield model_to_bytes(model)
        return
    release_pages(model)
    tmp = tempfile.mkdtemp(prefix="onnxcomp-session-")
    try:
        path = os.path.join(tmp, "model.onnx")
        if not _write_session_files(model, tmp, path, link=link):  # tensor attributes with external data
            ir.save(_inlined(model), path, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rewrite_as_proto(model: ir.Model, rewrite: Callable[[onnx.ModelProto], onnx.ModelProto]) -> ir.Model:
    """A new model: ``rewrite`` applied to ``model``'s protobuf form (external data inlined).

    For tools that only take an ``onnx.ModelProto`` (onnxruntime's transformer optimizer); ``model``
    is untouched.
    """
    return ir.serde.deserialize_model(rewrite(ir.to_proto(_inlined(model))))


def _write_session_files(model: ir.Model, folder: str, path: str, *, link: bool = True) -> bool:
    """Write ``model`` for onnxruntime into ``folder`` without copying its external data.

    External tensors point at hard links of their files (a copy of the tensor's bytes, in the
    kernel, where linking fails); in-memory tensors over 1 KiB go to ``model.onnx.data``. The
    model's values get their tensors back before returning. Returns False (nothing usable
    written) when a node attribute holds external data: the caller then saves the plain way.
    """
    if any(True for _ in _external_attributes(model)):
        return False
    data_name = "model.onnx.data"
    links: dict[str, str] = {}
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        with open(os.path.join(folder, data_name), "wb") as data:
            for graph in (model.graph, *model.graph.subgraphs()):
                for value in graph.initializers.values():
                    tensor = value.const_value
                    if tensor is None or tensor.dtype == ir.DataType.STRING or (
                        not isinstance(tensor, ir.ExternalTensor) and tensor.nbytes < 1024
                    ):
                        continue
                    location, offset = None, None
                    # onnxruntime refuses hard-linked data read by a subgraph ("hardlink attack")
                    if link and graph is model.graph and isinstance(tensor, ir.ExternalTensor):
                        location = _linked(os.path.abspath(tensor.path), folder, links)
                        offset = tensor.offset or 0
                    if location is None:  # in memory, or its file cannot be linked here
                        offset = -(-data.seek(0, os.SEEK_END) // _ALIGN) * _ALIGN
                        data.seek(offset)
                        tensor.tofile(data)
                        location = data_name
                    swapped.append((value, tensor))
                    value.const_value = ir.ExternalTensor(
                        location, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                        name=tensor.name or value.name, base_dir=folder,
                    )
        proto = ir.to_proto(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return True


def _linked(source: str, folder: str, links: dict[str, str]) -> str | None:
    """A hard link of ``source`` in ``folder`` (its name there), or None where linking fails."""
    if source not in links:
        name = f"linked{len(links)}.data"
        try:
            os.link(source, os.path.join(folder, name))
        except OSError:
            name = ""
        links[source] = name
    return links[source] or None


def release_pages(model_or_array: ir.Model | Any) -> None:
    """Drop this process's resident pages of memory-mapped external data (nothing is lost: they
    are read again from the file, or the page cache, when next used).

    Given a model: every external tensor's mapping. Given a numpy array that views such a mapping
    (``tensor.numpy()`` of an external tensor, or a slice of it): the pages it spans. Anything
    else is left alone. Use it after a pass has read a big weight once, before onnxruntime maps
    the same file, so that the weights are not counted twice.
    """
    if isinstance(model_or_array, ir.Model):
        for _, tensor in _iter_external_tensors(model_or_array):
            raw = getattr(tensor, "raw", None)
            if raw is not None and not raw.closed:
                with contextlib.suppress(OSError, ValueError):
                    raw.madvise(mmap.MADV_DONTNEED)
        return
    array = model_or_array
    base = getattr(array, "base", None)
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None or base.closed or not getattr(array, "nbytes", 0):
        return
    import numpy as np

    start_address = np.frombuffer(base, np.uint8, count=1).ctypes.data
    lo, hi = np.lib.array_utils.byte_bounds(array)
    start = (lo - start_address) // _PAGE * _PAGE
    end = min(len(base), -(-(hi - start_address) // _PAGE) * _PAGE)
    if 0 <= start < end:
        with contextlib.suppress(OSError, ValueError):
            base.madvise(mmap.MADV_DONTNEED, start, end - start)


_SPILL_DIR: list[str] = []


def spill_tensors(model: ir.Model, *, min_bytes: int = SPILL_MIN_BYTES) -> int:
    """Move the model's in-memory initializers of at least ``min_bytes`` to disk; returns the bytes moved.

    Each goes to a file of its own in a private temporary folder (removed when the process exits)
    and its value then holds an external tensor reading it (memory-mapped on use), so a big
    model's new weights (an int8 copy of a 2 GB model) no longer stay in memory while onnxruntime
    runs it or the original. :func:`save_model` copies them into the output's external data in
    the kernel. The values, names, types and data are unchanged; only where the bytes live.
    """
    moved = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if (tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.dtype == ir.DataType.STRING
                    or tensor.nbytes < min_bytes):
                continue
            folder = _spill_folder()
            name = f"{secrets.token_hex(8)}.data"
            with open(os.path.join(folder, name), "wb") as f:
                tensor.tofile(f)
            value.const_value = ir.ExternalTensor(
                name, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name or value.name,
                base_dir=folder,
            )
            moved += tensor.nbytes
    return moved


def _spill_folder() -> str:
    if not _SPILL_DIR:
        import atexit

        folder = tempfile.mkdtemp(prefix="onnxcomp-spill-")
        atexit.register(shutil.rmtree, folder, True)
        _SPILL_DIR.append(folder)
    return _SPILL_DIR[0]


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A private temporary folder (for files another tool writes, such as a profile), removed on exit."""
    folder = tempfile.mkdtemp(prefix="onnxcomp-scratch-")
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def holds_external_data(model: ir.Model) -> bool:
    """Whether the model came from a file with external data or reads any now (big-model paths)."""
    return bool(model.meta.get(_EXTERNAL_KEY)) or any(True for _ in _iter_external_tensors(model))


def check_model(model: ir.Model, *, full_check: bool = False) -> None:
    """Run ``onnx.checker`` on ``model`` (through a temporary file when over 2 GB).

    ``full_check`` also runs strict shape inference (types that contradict each other, subgraph
    outputs of the wrong type).

    Raises:
        ModelLoadError: the checker's first complaint.
    """
    try:
        with session_source(model, link=False) as src:
            onnx.checker.check_model(src if isinstance(src, str) else onnx.load_model_from_string(src),
                                     full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelLoadError(f"the model fails onnx.checker: {_first_line(exc)}") from None


def exported_model(export: Callable[[str, str], None]) -> ir.Model:
    """A model another tool writes to disk, read back into memory; the files are removed.

    ``export(path, data_name)`` writes a model to ``path`` (external data, if any, in ``data_name``
    next to it) inside a temporary folder; the model is loaded with its external data inlined, or,
    over :data:`LARGE_MODEL_BYTES`, moved to the folder of :func:`spill_tensors` and read from there.
    """
    tmp = tempfile.mkdtemp(prefix="onnxcomp-export-")
    try:
        path = os.path.join(tmp, "exported.onnx")
        export(path, "exported.data")
        exported = ir.load(path)
        data = os.path.join(tmp, "exported.data")
        if os.path.isfile(data) and os.path.getsize(data) >= LARGE_MODEL_BYTES:
            folder = tempfile.mkdtemp(dir=_spill_folder())
            os.replace(data, os.path.join(folder, "exported.data"))
            ir_external_data.set_base_dir(exported.graph, folder)
            exported.meta[_EXTERNAL_KEY] = True
            weakref.finalize(exported, shutil.rmtree, folder, True)  # its own tensors only read it
            return exported
        ir_external_data.load_to_model(exported)
        return exported
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_target(model: ir.Model, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an output path early (before any work), with the errors :func:`save_model` gives."""
    check_destinations({"output": path}, models=("output",), source=model, force=force)
    return Path(path)


def check_destinations(
    outputs: Mapping[str, str | os.PathLike | None],
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    *,
    models: Collection[str] = (),
    source: ir.Model | None = None,
    force: bool = False,
) -> None:
    """Refuse bad output paths before any work starts.

    Args:
        outputs: how the user named each output (``"-o"``, ``"--report"``) -> its path; ``None``
            entries are skipped.
        inputs: the same for every file read (model, data, labels, recipe); a folder stands for
            the files directly in it.
        models: the keys of ``outputs`` that are models: the external-data files :func:`save_model`
            writes or removes next to them (``<out>.data``, ``<out>.<id>.data``) are outputs too.
        source: the loaded input model: its file and its external-data files are inputs too.
        force: replace existing read-only output files instead of refusing them.

    Raises:
        ModelSaveError: an output is a folder, its folder is missing, not a folder or not
            writable, it is an existing read-only file (without ``force``), or it is the same file
            (by path, symlink or hard link) as an input or as another output. The message names
            both files.
    """
    written: list[tuple[str, Path, Path]] = []  # (output's name, output path, file written or removed)
    for label, path in outputs.items():
        if path is None:
            continue
        target = _check_destination(label, path, force=force)
        written.append((label, target, target))
        if label in models:
            for data in _owned_data_files(target):
                if not force and _read_only(data):
                    raise ModelSaveError(
                        f"{label} {target}: its external data {data} is a read-only file; "
                        "pass --force (force=True) to replace it"
                    )
                written.append((label, target, data))
    read: list[tuple[str, str]] = [
        (label, str(p)) for label, path in (inputs or {}).items() if path is not None for p in _files_in(path)
    ]
    if source is not None:
        src = source_path(source)
        if src is not None:
            read.append(("the input model", str(src)))
        # the file's own references too: a rewritten model may no longer read them, the file does
        files = external_data_files(source) | set(source.meta.get(_SOURCE_DATA_KEY, ()))
        if src is not None and source.meta.get(_EXTERNAL_KEY):
            files |= {str(f) for f in model_files(src)[1:]}
        read.extend(("external data of the input model", f) for f in sorted(files))
    for i, (label, target, file) in enumerate(written):
        via = " is" if file == target else f": its external data {file} is"
        for in_label, in_path in read:
            if _same_path(file, in_path):
                raise ModelSaveError(
                    f"{label} {target}{via} the same file as {in_label} {in_path}; "
                    "refusing to overwrite the input file, choose another output path"
                )
        for other_label, other_target, other_file in written[i + 1:]:
            if other_label != label and _same_path(file, other_file):
                raise ModelSaveError(
                    f"{label} {target}{via} the same file as {other_label} {other_file}; "
                    "give each output its own path"
                )


def _check_destination(label: str, path: str | os.PathLike, *, force: bool) -> Path:
    """One output file: not a folder, in an existing writable folder, not read-only unless forced."""
    if not os.fspath(path):
        raise ModelSaveError(f"{label}: the output path is empty; give a file name for the output")
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ModelSaveError(f"{label} {target}: is a directory; give a file name for the output")
    if os.fspath(path).endswith(("/", os.sep)):  # Path drops the slash: it would write a file named as the folder
        raise ModelSaveError(f"{label} {os.fspath(path)}: names a folder (it ends in a slash), which does not exist; "
                             "give a file name for the output")
    if target.exists() and not target.is_file():
        # an atomic save renames a new file over it: a device such as /dev/null would be replaced
        raise ModelSaveError(f"{label} {target}: is not a regular file (a device, pipe or socket); "
                             "give a file name for the output")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ModelSaveError(f"{label} {target}: output folder {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelSaveError(f"{label} {target}: output folder {folder} is not writable")
    if not force and _read_only(target):
        raise ModelSaveError(
            f"{label} {target}: is an existing read-only file; pass --force (force=True) to replace it"
        )
    return target


def _read_only(path: Path) -> bool:
    """An existing file nobody may write (root's override of permissions does not count)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return not (st.st_mode & 0o222) or not os.access(path, os.W_OK)


def _files_in(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file())
    return [p]


def _same_path(a: Path | str, b: Path | str) -> bool:
    """Same file by path, through symlinks, or by hard link (same device and inode)."""
    return os.path.realpath(a) == os.path.realpath(b) or _same_file(a, b)


def _owned_data_files(target: Path) -> list[Path]:
    """External-data files of ``target`` that :func:`save_model` owns: ``<out>.data`` (existing or
    about to be written) and the existing ``<out>.<id>.data`` files it wrote on earlier saves."""
    folder = target.parent if str(target.parent) else Path(".")
    pattern = re.compile(re.escape(target.name) + r"\.[0-9a-f]{12}\.data")
    owned = [folder / (target.name + ".data")]
    with contextlib.suppress(OSError):
        owned += sorted(folder / n for n in os.listdir(folder) if pattern.fullmatch(n))
    return owned


def saved_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files :func:`save_model` keeps next to a model saved at ``path``
    (``<name>.data``, ``<name>.<id>.data``) that exist; found by name, without reading the model."""
    return [f for f in _owned_data_files(Path(path)) if f.is_file()]


def model_files(path: str | os.PathLike) -> list[Path]:
    """A saved model file followed by the external-data files it refers to (just the model file
    when it has none, or when it cannot be read as a model). Parses the model file."""
    path = Path(path)
    try:
        refs = external_data_files(ir.load(path))
    except Exception:
        refs = set()
    return [path, *(Path(f) for f in sorted(refs))]


#: Every file :func:`save_model` and :func:`write_text_atomic` put in place in this process, in order.
_WRITTEN: list[str] = []


def written_files() -> list[str]:
    """The files this process has written so far (a command interrupted after writing says which)."""
    return list(_WRITTEN)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold_bytes: int = 1024,
    keep_value_info: bool = False,
    force: bool = False,
    verify: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the model to write (unchanged by the call).
        path: target ``.onnx`` file. Its folder must exist and be writable.
        external_data: ``True`` writes tensors over ``size_threshold_bytes`` to an external-data
            file next to the model; ``False`` keeps them inside the file (refused over 2 GB);
            ``None`` (default) uses external data when the model was loaded from a file with
            external data (even if every tensor has since been rewritten) or when it is needed
            for size.
        size_threshold_bytes: smallest tensor moved to external data.
        keep_value_info: also write the types and shapes of intermediate values and initializers
            (``value_info``). Off by default: they are redundant for onnxruntime, and on small
            compressed models they can take a tenth of the file.
        force: replace an existing read-only target.
        verify: called with the complete temporary file (its external data beside it) before it
            is renamed into place (:func:`onnxcomp.runtime.verify_written`); when it raises
            :class:`~onnxcomp.errors.RefusedOutputError`, ``path`` is left as it was (a previous
            file untouched), the model is written to :func:`rejected_path` instead and the error,
            naming both, is raised.

    The external data goes to ``<name>.data``, or, when that file exists (re-saving over a model
    with external data), to a new ``<name>.<id>.data``: the new data file never replaces one the
    previous model reads, the model file is renamed into place last, and only then are the previous
    ``<name>.data`` / ``<name>.<id>.data`` files removed. An interrupted save leaves the previous
    model with its own data, or the new pair. No data file is written when no tensor goes external.

    Raises:
        ModelSaveError: the target is a folder, its folder is missing or not writable, it is a
            read-only file (without ``force``), the target or its external data is the source model
            or one of its external-data files, or the model needs external data but
            ``external_data=False`` was given.
    """
    model = _model_argument(model, "save_model")
    target = check_target(model, path, force=force)
    folder = target.parent if str(target.parent) else Path(".")
    too_big = initializer_nbytes(model) > PROTOBUF_LIMIT
    if external_data is None:
        external_data = too_big or bool(model.meta.get(_EXTERNAL_KEY)) or bool(external_data_files(model))
    if not external_data and too_big:
        raise ModelSaveError(
            f"{target}: model is over the 2 GB protobuf limit and must be saved with external data"
        )
    previous = _owned_data_files(target)
    data_name = target.name + ".data"
    if os.path.lexists(folder / data_name):
        data_name = f"{target.name}.{secrets.token_hex(6)}.data"
    to_write = model if external_data else _inlined(model)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=folder))
    except OSError as exc:
        raise ModelSaveError(f"{target}: cannot write in {folder}: {exc.strerror or exc}") from None
    placed: Path | None = None
    refused: RefusedOutputError | None = None
    try:
        tmp_model = tmp / target.name
        annotations = contextlib.nullcontext() if keep_value_info else _intermediate_types_hidden(to_write)
        with annotations:
            _write(to_write, tmp_model, data_name if external_data else None, size_threshold_bytes)
        tmp_data = tmp / data_name
        if tmp_data.exists() and tmp_data.stat().st_size == 0 and not external_data_files(ir.load(tmp_model)):
            tmp_data.unlink()  # every tensor stayed inline
        try:
            if verify is not None:
                verify(tmp_model)
        except RefusedOutputError as exc:  # nothing is put in place: the model goes aside below
            refused = exc
        else:
            if tmp_data.exists():
                placed = folder / data_name
                os.replace(tmp_data, placed)  # a new name: the previous model still reads its own data
            os.replace(tmp_model, target)
            _WRITTEN.append(str(target))
            placed = None
    except OSError as exc:
        raise ModelSaveError(f"{target}: cannot write: {exc.strerror or exc}") from None
    finally:
        if placed is not None:  # the model was not renamed: the new data is nobody's
            with contextlib.suppress(OSError):
                placed.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
    if refused is not None:
        aside = save_model(model, rejected_path(target), external_data=external_data, force=True,
                           size_threshold_bytes=size_threshold_bytes, keep_value_info=keep_value_info)
        why = str(refused).replace(str(tmp_model), str(aside))  # onnxruntime names the file it read
        raise RefusedOutputError(f"{why}; nothing was written to {target}{_kept_aside(aside)}")
    protected = external_data_files(model)
    for stale in previous:
        if stale.name != data_name and not any(_same_path(stale, p) for p in protected):
            with contextlib.suppress(OSError):
                stale.unlink()
    return target


def rejected_path(path: str | os.PathLike) -> Path:
    """Where a model onnxruntime refused is kept instead of ``path``: ``OUT.rejected.onnx``."""
    path = Path(path)
    stem = path.name[:-len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.rejected.onnx")


def set_aside(path: str | os.PathLike) -> str:
    """Move a written model file that onnxruntime refused to :func:`rejected_path` (its external
    data stays where it is, under the name the model reads); the phrase that says so, for the error."""
    aside = rejected_path(path)
    try:
        os.replace(path, aside)
    except OSError as exc:
        return f"; {path} could not be moved aside ({exc.strerror or exc}): do not use it"
    return f"; {path} was moved aside{_kept_aside(aside)}"


def _kept_aside(aside: Path) -> str:
    return f"; it is kept as {aside} (a bug in onnxcomp: please report it with that file)"


def _write(model: ir.Model, path: Path, data_name: str | None, size_threshold_bytes: int) -> None:
    if data_name is None:
        ir.save(model, path)
    else:
        # onnx_ir's save reads external tensors below the threshold into memory and releases them,
        # closing a memory map that arrays of the caller may still view (BufferError): read them here
        _initializers_in_memory(model, size_threshold_bytes)
        ir.save(model, path, external_data=data_name, size_threshold_bytes=size_threshold_bytes)


@contextlib.contextmanager
def _intermediate_types_hidden(model: ir.Model) -> Iterator[None]:
    """Clear type and shape of every value that is not a graph input or output, then restore them.

    onnx_ir writes a ``value_info`` entry for every typed value (initializers included); hiding the
    annotations for the time of the write leaves them out of the file without copying the model.
    """
    hidden: list[tuple[ir.Value, ir.TypeProtocol | None, ir.Shape | None]] = []
    graphs = [model.graph, *(g for g in model.graph.subgraphs())]
    try:
        for graph in graphs:
            boundary = {id(v) for v in (*graph.inputs, *graph.outputs)}
            values = [*graph.initializers.values(), *(out for node in graph for out in node.outputs)]
            for value in values:
                if id(value) in boundary or (value.type is None and value.shape is None):
                    continue
                hidden.append((value, value.type, value.shape))
                value.type = None
                value.shape = None
        yield
    finally:
        for value, type_, shape in hidden:
            value.type = type_
            value.shape = shape


def write_text_atomic(path: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    """Write a text file (a report) atomically: temporary file in the same folder, then rename.

    Raises:
        ModelSaveError: the path is a folder, its folder is missing or not writable, it is a
            read-only file (without ``force``), or the file cannot be written.
    """
    target = _check_destination("output", path, force=force)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxcomp-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise ModelSaveError(f"{target}: cannot write in {folder}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, target)
        _WRITTEN.append(str(target))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ModelSaveError(f"{target}: cannot write: {exc.strerror or exc}") from None
        raise
    return target


def upgrade_opset(model: ir.Model, target: int) -> ir.Model:
    """A new model converted to default-domain opset ``target`` with ``onnx.version_converter``.

    Model-local functions are inlined first: the converter drops them (and leaves their calls to
    an op onnxruntime does not know) and converts only the main graph's nodes. The IR version is
    raised to the least that the new opset needs.

    Raises:
        OpsetError: the converter cannot convert this model (its message is passed on).
    """
    from onnx import inliner, version_converter

    proto = ir.to_proto(model)
    try:
        if proto.functions:
            proto = inliner.inline_local_functions(proto)
        converted = version_converter.convert_version(proto, target)
        # the converter keeps the IR version; an IR 3 model (every initializer also a graph input)
        # at the new opset would make each new initializer (a scale, a codebook) fail onnx.checker
        converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(
            [o for o in converted.opset_import if o.domain in ("", "ai.onnx")]))
    except Exception as exc:
        raise OpsetError(
            f"cannot upgrade the model from opset {onnx_opset(model)} to {target}: {_first_line(exc)}"
        ) from None
    result = ir.serde.deserialize_model(converted)
    src = source_path(model)
    # the converted proto keeps each external tensor's location, relative to the model's folder: the
    # folder of the file it came from, or for a model given in memory (ir.load) its tensors' own
    base = str(src.parent) if src is not None else next(
        (t.base_dir for _, t in _iter_external_tensors(model) if t.base_dir), None)
    if base is not None:
        ir_external_data.set_base_dir(result.graph, str(base))
    _carry_source(model, result)
    return result


def _same_file(a: Path | str, b: Path | str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


#: The first line of an exception's message (at most 500 characters), for error messages.
first_line = _first_line
