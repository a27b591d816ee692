"""Hardening, eighth round: a refusal found on a later check feed, ``inspect`` on bit-packed
deep-compression files, ``cluster --check-fraction``, the calibration line on every quantize path,
the wording of a size fixed by ``--fix-shape``, a MatMul + bias onnxruntime would not run in int8.

Every model is built here in code, seeded.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import file_digest, make_proto

from onnxcomp import io

# ---------------------------------------------------------------------------------------------
# 1. a refusal the check finds only on a later feed leaves a previous output untouched


def _conv_model(path, shape=("N", 3, 16, 16)):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["c"], ["y"], name="relu")]
    out = [shape[0], 4, *shape[2:]]
    io.save_model(io.load_model(make_proto(nodes, [("x", list(shape))], [("y", out)], [("w", w)])), path)
    return path


def _fails_on_large_inputs(monkeypatch):
    """``quantize`` (the API the CLI calls) returns a model whose output adds ``table[int(max(x))]``
    (zeros, 100 entries): onnxruntime loads it and runs it on ordinary feeds, and fails on a feed
    whose largest value is 100 or more (a Gather index out of range), as an onnxcomp bug that
    shows only on some data would."""
    import onnx_ir as ir

    import onnxcomp.quant.api as api

    real = api.quantize

    def quantize(*args, **kwargs):
        model, report = real(*args, **kwargs)
        graph = model.graph
        x, y = graph.inputs[0], graph.outputs[0]
        table = ir.Value(name="table", const_value=ir.tensor(np.zeros(100, np.float32)))
        graph.register_initializer(table)
        peak = ir.Node("", "ReduceMax", [x], attributes=[ir.AttrInt64("keepdims", 0)], name="peak")
        index = ir.Node("", "Cast", [peak.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.INT64)],
                        name="index")
        gather = ir.Node("", "Gather", [table, index.outputs[0]], name="lookup")
        y.name = "y_inner"
        add = ir.Node("", "Add", [y, gather.outputs[0]], name="plus_lookup")
        add.outputs[0].name = "y"
        add.outputs[0].dtype, add.outputs[0].shape = y.dtype, y.shape
        for node in (peak, index, gather, add):
            graph.append(node)
        graph.outputs[0] = add.outputs[0]
        return model, report

    monkeypatch.setattr(api, "quantize", quantize)


@pytest.mark.parametrize("mode", [["--mode", "dynamic"], []])
@pytest.mark.parametrize("previous", [True, False])
def test_a_refusal_on_a_later_check_feed_leaves_the_previous_output_untouched(tmp_path, monkeypatch, capsys,
                                                                              previous, mode):
    from onnxcomp.cli import main

    _fails_on_large_inputs(monkeypatch)
    model = _conv_model(tmp_path / "m.onnx")
    x = np.random.default_rng(4).standard_normal((20, 3, 16, 16)).astype(np.float32)
    x[14, 0, 0, 0] = 150.0  # feed 14: the 3rd held-out feed (every 5th: 4, 9, 14, 19)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x)
    out = tmp_path / "out.onnx"
    if previous:
        out.write_bytes(b"the previous output")
    code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--no-fallback", *mode])
    err = capsys.readouterr().err
    rejected = tmp_path / "out.rejected.onnx"
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("onnxcomp: error: onnxruntime cannot run the written model: "), err
    assert "lookup" in err or "indices" in err, err  # onnxruntime's own reason
    assert f"nothing was written to {out}; it is kept as {rejected}" in err, err
    assert (out.read_bytes() == b"the previous output") if previous else not out.exists()
    assert rejected.exists() and not list(tmp_path.glob(".onnxcomp-*"))
    assert not list(tmp_path.glob("out.onnx*.data"))
    import onnx  # the file kept is the refused model

    assert [n.name for n in onnx.load(rejected).graph.node][-1] == "plus_lookup"


def test_the_check_takes_the_outputs_the_verification_ran_and_replaces_the_previous_output(tmp_path, capsys):
    import json

    import onnxcomp.check as check
    from onnxcomp.cli import main

    model = _conv_model(tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(4).standard_normal((20, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the previous output")
    opened = []
    real = check._session
    check._session = lambda m: (opened.append(m), real(m))[1]
    try:
        code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--json"])
    finally:
        check._session = real
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["check"]["met"] and report["check"]["data"]["check_feeds"] == 4
    assert out.read_bytes()[:4] != b"the " and not (tmp_path / "out.rejected.onnx").exists()
    assert str(out) not in map(str, opened)  # the written file ran once, before it was put in place
    assert report["check"]["outputs"][0]["cosine"] > 0.99
