"""Property test: a damaged model never crashes the command line.

A shipped model's protobuf is mutated (bytes flipped, truncated, dims, dtypes, op types,
attributes and initializer sizes changed) and run through a command with drawn options, in this
process. Whatever the damage: exit status 0 or 1, at most one ``onnxcomp: error:`` line, no
exception escaping ``main``, the inputs byte-identical, and on failure no output and no temporary
file left. Deterministic in CI (the ``deterministic`` hypothesis profile of conftest.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper as onh
from conftest import MODELS, file_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcomp.cli import main

SOURCE = (MODELS / "digits_cnn.onnx").read_bytes()
CALIB = MODELS / "digits_calib.npz"
OP_TYPES = ["Relu", "Conv", "MatMul", "Add", "Gemm", "MaxPool", "Identity", "Concat", "Flatten", "NoSuchOp"]
DTYPES = [onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE,
          onnx.TensorProto.STRING, onnx.TensorProto.BOOL, 0, 99]


def _mutate_structure(proto: onnx.ModelProto, kind: str, pick: int, value: int) -> None:
    graph = proto.graph
    node = graph.node[pick % len(graph.node)]
    init = graph.initializer[pick % len(graph.initializer)]
    if kind == "dim":
        if init.dims:
            init.dims[pick % len(init.dims)] = value
    elif kind == "reshape":  # same bytes, another shape
        a = onh.to_array(init).reshape(-1)
        if a.size % max(1, abs(value)) == 0 and value:
            init.CopyFrom(onh.from_array(a.reshape(abs(value), -1), init.name))
    elif kind == "dtype":
        init.data_type = DTYPES[value % len(DTYPES)]
    elif kind == "truncate_data":
        init.raw_data = init.raw_data[: len(init.raw_data) * (value % 4) // 4]
    elif kind == "op_type":
        node.op_type = OP_TYPES[value % len(OP_TYPES)]
    elif kind == "attribute":
        if node.attribute:
            attr = node.attribute[value % len(node.attribute)]
            if attr.ints:
                attr.ints[pick % len(attr.ints)] = value - 3
            elif attr.type == onnx.AttributeProto.INT:
                attr.i = value - 3
            else:
                node.attribute.remove(attr)
    elif kind == "drop_input":
        if node.input:
            del node.input[value % len(node.input)]
    elif kind == "rename_input":
        if node.input:
            node.input[value % len(node.input)] = f"missing_{value}"
    elif kind == "input_dims":
        dims = graph.input[0].type.tensor_type.shape.dim
        dims[pick % len(dims)].dim_value = value
    elif kind == "input_dtype":
        graph.input[0].type.tensor_type.elem_type = DTYPES[value % len(DTYPES)]
    elif kind == "drop_initializer":
        graph.initializer.remove(init)
    elif kind == "opset":
        proto.opset_import[0].version = value


STRUCTURE = st.tuples(
    st.sampled_from(["dim", "reshape", "dtype", "truncate_data", "op_type", "attribute", "drop_input",
                     "rename_input", "input_dims", "input_dtype", "drop_initializer", "opset"]),
    st.integers(0, 200), st.integers(-2, 40),
)


#: A damage plan, small enough to read in a failure report; :func:`damage` applies it.
DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, len(SOURCE) - 1), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, len(SOURCE) - 1)),
    st.tuples(st.just("structure"), st.lists(STRUCTURE, min_size=1, max_size=2)),
    st.tuples(st.just("structure"), st.lists(STRUCTURE, min_size=1, max_size=2)),
)


def damage(plan) -> bytes:
    how, what = plan
    if how == "flip":
        data = bytearray(SOURCE)
        for pos, mask in what:
            data[pos] ^= mask
        return bytes(data)
    if how == "truncate":
        return SOURCE[:what]
    proto = onnx.load_from_string(SOURCE)
    for kind, pick, value in what:
        _mutate_structure(proto, kind, pick, value)
    return proto.SerializeToString()


COMMANDS = st.sampled_from([
    ["inspect", "{model}", "--json"],
    ["quantize", "{model}", "-o", "{out}", "--calibration", str(CALIB), "--max-samples", "2"],
    ["quantize", "{model}", "-o", "{out}", "--mode", "dynamic"],
    ["cluster", "{model}", "-o", "{out}", "--bits", "2"],
    ["prune", "{model}", "-o", "{out}", "--ratio", "0.5"],
    ["bench", "{model}", "--shape", "image=1x1x32x32", "--runs", "2", "--warmup-runs", "0",
     "--warmup-seconds", "0", "--feeds", "1"],
])
EXTRA_OPTIONS = st.sampled_from([[], [], ["--quiet"], ["--json"], ["--batch-size", "0"], ["--max-samples", "-1"],
                                 ["--ratio", "nan"], ["--bits", "0"], ["--runs", "inf"]])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=DAMAGE, command=COMMANDS, extra=EXTRA_OPTIONS)
def test_damaged_model_gives_one_clean_error_or_works(plan, command, extra):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "model.onnx"
        path.write_bytes(damage(plan))
        out = work / "out.onnx"
        argv = [a.replace("{model}", str(path)).replace("{out}", str(out)) for a in command] + extra
        watched = {p: file_digest(p) for p in (path, CALIB)}
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main(argv)  # any other exception escaping is the traceback the contract forbids
            except SystemExit as exc:  # argparse's errors
                status = exc.code
        err = stderr.getvalue()
        errors = [line for line in err.splitlines() if line.startswith("onnxcomp: error:")]
        assert status in (0, 1), (status, err)
        assert "Traceback" not in err
        assert len(errors) <= 1, err
        assert (status == 1) == bool(errors), err
        assert {p: file_digest(p) for p in watched} == watched
        left = sorted(os.listdir(work))
        if status == 1:
            assert left == ["model.onnx"], left
        else:
            assert not [name for name in left if name.startswith(".onnxcomp")], left


def test_mutations_change_the_model():
    """The structural mutations really damage the protobuf (the fuzz test is not vacuous)."""
    for kind in ("dim", "dtype", "op_type", "attribute", "drop_input", "input_dims", "drop_initializer"):
        proto = onnx.load_from_string(SOURCE)
        _mutate_structure(proto, kind, 1, 5)
        assert proto.SerializeToString() != SOURCE, kind
    assert np.frombuffer(SOURCE, np.uint8).size > 1000
