"""Calibration data that holds one value per input (all ones, all zeros) is said to be useless."""

from __future__ import annotations

import json

import numpy as np
import onnx.helper as oh
from conftest import make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig

F32 = np.float32


def _model(rng, state: bool = False):
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), oh.make_node("Relu", ["h"], ["r"], name="relu")]
    inputs = [("x", ["N", 8])]
    inits = [("w1", (rng.standard_normal((8, 16)) * 0.5).astype(F32)), ("w2", (rng.standard_normal((16, 4)) * 0.5).astype(F32))]
    if state:  # a second input that is zeros in every feed, as a recurrent state is
        nodes.append(oh.make_node("Add", ["r", "s"], ["rs"], name="add_state"))
        nodes.append(oh.make_node("MatMul", ["rs", "w2"], ["y"], name="mm2"))
        inputs.append(("s", ["N", 16]))
    else:
        nodes.append(oh.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"))
    return make_proto(nodes, inputs, [("y", ["N", 4])], inits)


def test_constant_calibration_data_is_flagged(rng, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    io.save_model(io.load_model(_model(rng)), model)
    np.savez(tmp_path / "ones.npz", x=np.ones((20, 1, 8), F32))
    args = ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "ones.npz"),
            "--no-latency"]
    main(args + ["--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["constant_inputs"] == {"x": 1.0}
    assert any(n.startswith("the calibration data holds one value per input in every feed ('x' = 1)")
               for n in report["notes"])
    main(args + ["--force"])
    assert "calibrate on real samples" in " ".join(capsys.readouterr().out.split())
    # the warning is earned: on real inputs the model calibrated on ones is far from the float one
    q = io.load_model(tmp_path / "q.onnx")
    x = rng.standard_normal((64, 8)).astype(F32) * 2
    from onnxcomp.testing import run_model

    ref = run_model(io.load_model(model), [{"x": x}])[0][0]
    out = run_model(q, [{"x": x}])[0][0]
    assert float(np.max(np.abs(out - ref))) > 0.5


def test_varying_data_and_a_constant_state_are_not_flagged(rng):
    proto = _model(rng, state=True)
    feeds = [{"x": rng.standard_normal((1, 8)).astype(F32), "s": np.zeros((1, 16), F32)} for _ in range(12)]
    _, report = quantize(io.load_model(proto), feeds, QuantizeConfig())
    assert "constant_inputs" not in report["calibration"]
    assert not any("one value per input" in n for n in report["notes"])


def test_a_subset_keeps_its_own_spans(rng):
    proto = io.load_model(_model(rng))
    feeds = [{"x": np.full((1, 8), float(i), F32)} for i in range(6)]
    data = Dataset(feeds, proto)
    only_first = data.subset(lambda i: i == 0)
    list(only_first)
    assert only_first.constant_inputs() == {"x": 0.0}
    assert data.constant_inputs() is None  # nothing read through the source itself yet
    list(data)
    assert data.constant_inputs() is None and only_first.constant_inputs() == {"x": 0.0}
