"""Model I/O: round trips, external data, atomic saves, and a clear error for each bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import file_digest, make_proto

from onnxcomp import io
from onnxcomp.errors import ModelLoadError, ModelSaveError, OpsetError
from onnxcomp.runtime import create_session
from onnxcomp.testing import run_model


def _feeds(rng, n=3):
    return [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(n)]


def _outputs(model, feeds):
    return [o[0] for o in run_model(model, feeds)]


def test_load_from_every_source_kind(matmul_proto, tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(matmul_proto, path)
    feeds = _feeds(rng)
    expected = _outputs(io.load_model(path), feeds)
    for source in (str(path), path, path.read_bytes(), matmul_proto):
        model = io.load_model(source)
        assert isinstance(model, ir.Model)
        for got, want in zip(_outputs(model, feeds), expected):
            np.testing.assert_array_equal(got, want)
    model = io.load_model(path)
    assert io.load_model(model) is model
    assert io.source_path(model) == path.resolve()


def test_load_does_not_touch_the_proto(matmul_proto):
    before = matmul_proto.SerializeToString()
    model = io.load_model(matmul_proto)
    model.graph.initializers["w"].const_value = ir.tensor(np.zeros((16, 8), np.float32), name="w")
    assert matmul_proto.SerializeToString() == before


def test_round_trip_inline(matmul_proto, tmp_path, rng):
    model = io.load_model(matmul_proto)
    out = io.save_model(model, tmp_path / "out.onnx")
    assert out.exists() and not (tmp_path / "out.onnx.data").exists()
    feeds = _feeds(rng)
    for a, b in zip(_outputs(io.load_model(out), feeds), _outputs(model, feeds)):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"], "no temporary files left"


@pytest.mark.parametrize("external", [False, True])
def test_intermediate_value_info_is_not_written(matmul_proto, tmp_path, rng, external):
    from onnxcomp.graph import infer_types

    model = io.load_model(matmul_proto)
    infer_types(model)
    typed = {v.name: (v.type, v.shape) for node in model.graph for v in node.outputs}
    assert any(t is not None for t, _ in typed.values())
    out = io.save_model(model, tmp_path / "lean.onnx", external_data=external, size_threshold_bytes=0)
    lean = onnx.load(out, load_external_data=False)
    assert not lean.graph.value_info
    assert [o.type.tensor_type.elem_type for o in lean.graph.output] == [onnx.TensorProto.FLOAT]
    assert {v.name: (v.type, v.shape) for node in model.graph for v in node.outputs} == typed, "model untouched"
    full = io.save_model(model, tmp_path / "full.onnx", external_data=external, size_threshold_bytes=0,
                         keep_value_info=True)
    assert {vi.name for vi in onnx.load(full, load_external_data=False).graph.value_info} >= {
        n for n, (t, _) in typed.items() if t is not None and n not in {o.name for o in model.graph.outputs}}
    feeds = _feeds(rng)
    for a, b in zip(_outputs(io.load_model(out), feeds), _outputs(model, feeds)):
        np.testing.assert_array_equal(a, b)


def test_round_trip_external_data_stays_external(matmul_proto, tmp_path, rng):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save(matmul_proto, src_dir / "m.onnx", save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    before = {p.name: file_digest(p) for p in src_dir.iterdir()}
    model = io.load_model(src_dir / "m.onnx")
    assert io.external_data_files(model) == {str((src_dir / "weights.bin").resolve())}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = io.save_model(model, out_dir / "c.onnx", size_threshold_bytes=0)
    assert (out_dir / "c.onnx.data").exists(), "a model that came with external data keeps it"
    reloaded = io.load_model(out)
    assert io.external_data_files(reloaded) == {str((out_dir / "c.onnx.data").resolve())}
    feeds = _feeds(rng)
    for a, b in zip(_outputs(reloaded, feeds), _outputs(model, feeds)):
        np.testing.assert_array_equal(a, b)
    # inline on request
    inline = io.save_model(model, out_dir / "inline.onnx", external_data=False)
    assert io.external_data_files(io.load_model(inline)) == set()
    assert {p.name: file_digest(p) for p in src_dir.iterdir()} == before


def test_model_to_bytes_inlines_external_data(matmul_proto, tmp_path):
    onnx.save(matmul_proto, tmp_path / "m.onnx", save_as_external_data=True,
              location="m.data", size_threshold=0)
    model = io.load_model(tmp_path / "m.onnx")
    proto = onnx.load_model_from_string(io.model_to_bytes(model))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    # the model itself still refers to its external file
    assert io.external_data_files(model)


def _expect_load_error(path: Path, *fragments: str) -> None:
    digest = file_digest(path) if path.is_file() else None
    with pytest.raises(ModelLoadError) as info:
        io.load_model(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    if digest is not None:
        assert file_digest(path) == digest, "the input file must stay byte-identical"


def test_bad_inputs_give_clear_errors(matmul_proto, tmp_path):
    _expect_load_error(tmp_path / "missing.onnx", "not found")
    _expect_load_error(tmp_path, "directory")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _expect_load_error(empty, "empty")
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n" * 20)
    _expect_load_error(text, "not an ONNX model")
    good = matmul_proto.SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    _expect_load_error(truncated, "truncated")


def test_too_new_ir_version_and_opset(matmul_proto, tmp_path):
    newer_ir = onnx.ModelProto()
    newer_ir.CopyFrom(matmul_proto)
    newer_ir.ir_version = onnx.IR_VERSION + 1
    p = tmp_path / "ir.onnx"
    p.write_bytes(newer_ir.SerializeToString())
    _expect_load_error(p, "IR version", "newer")
    newer_opset = onnx.ModelProto()
    newer_opset.CopyFrom(matmul_proto)
    newer_opset.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    q = tmp_path / "opset.onnx"
    q.write_bytes(newer_opset.SerializeToString())
    _expect_load_error(q, "opset", "newer")


def test_checker_failure_is_reported(tmp_path):
    broken = make_proto([oh.make_node("Relu", ["nowhere"], ["y"])], [("x", [1])], [("y", [1])])
    p = tmp_path / "broken.onnx"
    p.write_bytes(broken.SerializeToString())
    _expect_load_error(p, "onnx.checker")


def test_missing_and_short_external_data(matmul_proto, tmp_path):
    onnx.save(matmul_proto, tmp_path / "m.onnx", save_as_external_data=True,
              location="m.data", size_threshold=0)
    data = tmp_path / "m.data"
    content = data.read_bytes()
    data.write_bytes(content[:10])
    with pytest.raises(ModelLoadError, match="truncated external data"):
        io.load_model(tmp_path / "m.onnx", check=False)
    data.unlink()
    with pytest.raises(ModelLoadError, match="m.data"):
        io.load_model(tmp_path / "m.onnx")


def test_save_refuses_to_overwrite_input(matmul_proto, tmp_path):
    onnx.save(matmul_proto, tmp_path / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    digests = {p.name: file_digest(p) for p in tmp_path.iterdir()}
    model = io.load_model(tmp_path / "m.onnx")
    for target in (tmp_path / "m.onnx", tmp_path / "m.onnx.data", Path(os.path.relpath(tmp_path / "m.onnx"))):
        with pytest.raises(ModelSaveError, match="refusing to overwrite"):
            io.save_model(model, target)
    assert {p.name: file_digest(p) for p in tmp_path.iterdir()} == digests


def test_save_errors_name_the_target(matmul_proto, tmp_path):
    model = io.load_model(matmul_proto)
    with pytest.raises(ModelSaveError, match="does not exist"):
        io.save_model(model, tmp_path / "no" / "such" / "dir" / "m.onnx")
    with pytest.raises(ModelSaveError, match="is a directory"):
        io.save_model(model, tmp_path)
    with pytest.raises(ModelSaveError, match="cannot write|not writable"):
        io.save_model(model, Path("/proc/onnxcomp-test.onnx"))


def test_interrupted_save_leaves_previous_file(matmul_proto, tmp_path, monkeypatch):
    model = io.load_model(matmul_proto)
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def interrupted_save(m, path, **kw):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(io.ir, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_model(model, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"], "temporary folder removed"


def test_upgrade_opset(tmp_path, rng):
    old = make_proto(
        [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Softmax", ["r"], ["y"], axis=1)],
        [("x", [2, 5])], [("y", [2, 5])], opset=11,
    )
    model = io.load_model(old)
    assert io.onnx_opset(model) == 11
    upgraded = io.upgrade_opset(model, 13)
    assert io.onnx_opset(upgraded) == 13 and io.onnx_opset(model) == 11
    feeds = [{"x": rng.standard_normal((2, 5)).astype(np.float32)}]
    np.testing.assert_allclose(_outputs(upgraded, feeds)[0], _outputs(model, feeds)[0], atol=1e-6)
    with pytest.raises(OpsetError, match="cannot upgrade"):
        io.upgrade_opset(model, 999)


@pytest.mark.slow
def test_model_over_2gb_round_trip(tmp_path):
    """Initializers over the protobuf limit: saved external, loaded memory-mapped, run via a file."""
    rows, cols = 1 << 20, 288  # 1.125 GiB per float32 tensor, 2.25 GiB in all
    w1 = np.full((rows, cols), 1.0, np.float32)
    w1[5] = np.arange(cols, dtype=np.float32)
    w2 = np.full((rows, cols), 2.0, np.float32)
    graph = ir.Graph(
        inputs=[idx := ir.val("idx", ir.DataType.INT64, ir.Shape([1]))],
        outputs=[],
        nodes=[],
        opset_imports={"": 17},
        name="big",
    )
    v1 = ir.Value(name="w1", const_value=ir.tensor(w1, name="w1"))
    v2 = ir.Value(name="w2", const_value=ir.tensor(w2, name="w2"))
    graph.register_initializer(v1)
    graph.register_initializer(v2)
    g1 = ir.node("Gather", [v1, idx])
    g2 = ir.node("Gather", [v2, idx])
    add = ir.node("Add", [g1.outputs[0], g2.outputs[0]])
    add.outputs[0].name = "y"
    for n in (g1, g2, add):
        n.outputs[0].dtype = ir.DataType.FLOAT
        n.outputs[0].shape = ir.Shape([1, cols])
    for n in (g1, g2, add):
        graph.append(n)
    graph.outputs.append(add.outputs[0])
    model = ir.Model(graph, ir_version=8)
    assert io.initializer_nbytes(model) > io.PROTOBUF_LIMIT
    with pytest.raises(ModelSaveError, match="2 GB"):
        io.model_to_bytes(model)
    with pytest.raises(ModelSaveError, match="external data"):
        io.save_model(model, tmp_path / "big_inline.onnx", external_data=False)
    out = io.save_model(model, tmp_path / "big.onnx")
    del w1, w2, v1, v2, model, graph
    assert (tmp_path / "big.onnx.data").stat().st_size >= 2 * rows * cols * 4
    assert (tmp_path / "big.onnx").stat().st_size < 1 << 20
    loaded = io.load_model(out)
    assert len(io.external_data_files(loaded)) == 1
    got = create_session(loaded).run(None, {"idx": np.array([5], np.int64)})[0]
    np.testing.assert_array_equal(got[0], np.arange(cols, dtype=np.float32) + 2.0)
