"""Input specialisation (``--fix-input`` / ``--fix-shape``): exact folding of what a fixed input decides.

The model has the silero-vad shape: an int64 ``sr`` input selects one of two If branches, each with
its own Conv. Fixing ``sr`` must inline the branch taken, drop the other with its weights, remove
the input, and compute exactly what the original computes with that ``sr`` (1e-5, onnxruntime
graph optimizations off and on).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.errors import ConfigError
from onnxcomp.passes.specialize import SpecializeConfig, SpecializePass, control_flow_count
from onnxcomp.summary import op_histogram
from onnxcomp.testing import run_model

F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


def _branch(name: str, weight: np.ndarray) -> onnx.GraphProto:
    return oh.make_graph(
        [oh.make_node("Conv", ["x", f"{name}_w"], [f"{name}_c"], pads=[1, 1, 1, 1]),
         oh.make_node("Relu", [f"{name}_c"], [f"{name}_y"])],
        name, [], [oh.make_tensor_value_info(f"{name}_y", F, [1, 4, 8, 8])],
        [onh.from_array(weight, f"{name}_w")],
    )


def model_sample_rate(rng) -> onnx.ModelProto:
    """``y = If(sr == 16000, Conv_a(x), Conv_b(x)) * 2``; ``sr`` an int64 of shape [1]."""
    w_a = (0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32)
    w_b = (0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32)
    nodes = [
        oh.make_node("Equal", ["sr", "sixteen_k"], ["is16"]),
        oh.make_node("Squeeze", ["is16"], ["cond"]),
        oh.make_node("If", ["cond"], ["z"], then_branch=_branch("a", w_a), else_branch=_branch("b", w_b), name="rate"),
        oh.make_node("Mul", ["z", "two"], ["y"]),
    ]
    inits = [("sixteen_k", np.array([16000], np.int64)), ("two", np.array(2.0, np.float32))]
    proto = make_proto(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)
    proto.graph.input.append(oh.make_tensor_value_info("sr", I64, [1]))
    return proto


def _feeds(rng, n, sr=None):
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]
    if sr is not None:
        for f in feeds:
            f["sr"] = np.array([sr], np.int64)
    return feeds


@pytest.mark.parametrize("rate, kept", [(16000, "a_w"), (8000, "b_w")])
def test_fixing_the_condition_inlines_the_branch_taken(rng, rate, kept):
    proto = model_sample_rate(rng)
    original = io.load_model(proto)
    model = io.load_model(proto)
    stats = SpecializePass(SpecializeConfig(values={"sr": rate}))(model).stats
    assert stats["fixed"] == {"sr": {"shape": [1], "dtype": "INT64", "value": [rate]}}
    assert stats["control_flow"] == {"before": 1, "after": 0}
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert control_flow_count(model) == 0 and op_histogram(model)["Conv"] == 1
    weights = {n for n in model.graph.initializers if n.endswith("_w")}
    assert weights == {kept}  # the other branch's weights are gone
    feeds = _feeds(rng, 4)
    for level in ("disable", "all"):
        want = run_model(original, [{**f, "sr": np.array([rate], np.int64)} for f in feeds], optimization=level)
        got = run_model(model, feeds, optimization=level)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g[0], w[0], rtol=1e-5, atol=1e-5)


def test_fixed_shape_becomes_static(rng):
    proto = model_sample_rate(rng)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model = io.load_model(proto)
    stats = SpecializePass(SpecializeConfig(shapes={"x": (1, 3, 8, 8)}))(model).stats
    assert stats["shaped"] == {"x": [1, 3, 8, 8]}
    assert list(model.graph.inputs[0].shape) == [1, 3, 8, 8]


@pytest.mark.parametrize("values, shapes, message", [
    ({"rate": 16000}, {}, "'rate' not an input of the model; model inputs: 'x', 'sr'"),
    ({"sr": 1.5}, {}, "input 'sr' is INT64: 1.5 is not exactly representable"),
    ({"sr": [16000, 8000]}, {}, "input 'sr' is declared 1; the value has shape [2]"),
    ({}, {"x": (1, 3, 9, 8)}, "input 'x' is declared 1x3x8x8; cannot make it 1x3x9x8"),
    ({"sr": 1}, {"sr": (1,)}, "given both a value and a shape"),
])
def test_refuses_what_does_not_fit(rng, values, shapes, message):
    model = io.load_model(model_sample_rate(rng))
    with pytest.raises(ConfigError) as exc:
        SpecializePass(SpecializeConfig(values=values, shapes=shapes))(model)
    assert message in str(exc.value)
    assert [v.name for v in model.graph.inputs] == ["x", "sr"]  # nothing changed


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxcomp", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_quantizes_the_specialised_model(tmp_path, rng):
    """``quantize --fix-input sr=16000``: the written model has no If and no ``sr`` input; the
    calibration file may still hold ``sr`` (dropped); the int8 Conv of the branch taken runs."""
    src, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(model_sample_rate(rng), src)
    feeds = _feeds(rng, 20, sr=16000)
    np.savez(calib, x=np.concatenate([f["x"] for f in feeds]), sr=np.full((20, 1), 16000, np.int64))
    proc = _cli("quantize", src, "-o", out, "--calibration", calib, "--fix-input", "sr=16000", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["specialize"]["control_flow"] == {"before": 1, "after": 0}
    assert report["onnxruntime"]["int8_by_op"] == {"QLinearConv": 1}
    assert report["check"]["met"], report["check"]
    written = io.load_model(out)
    assert [v.name for v in written.graph.inputs] == ["x"] and control_flow_count(written) == 0


def test_cli_names_a_bad_fixed_input(tmp_path, rng):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model_sample_rate(rng), src)
    proc = _cli("quantize", src, "-o", out, "--mode", "dynamic", "--fix-input", "sr=fast")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--fix-input 'sr=fast'" in proc.stderr and not out.exists()
