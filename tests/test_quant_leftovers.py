"""Leftovers of the quantize fallback (issues 13 and 14): seeded models built in code.

* A unit (an If branch) the study keeps float stays float whole, whatever the finish steps do
  to the main graph, and a unit that is not in the model is an error, not skipped.
* A branch no calibration feed takes is weight-only int8 (no activation ranges) and no fallback
  candidate; every report says so, the fallbacks' too, and which units went back to float.
* "Nothing compressed" counts every int8 tensor written (recurrent weights, embedding tables),
  and a fallback that keeps every candidate float writes the float model (no finish steps).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from conftest import make_proto

F = onnx.TensorProto.FLOAT


def _vi(name, shape, dtype=F):
    return oh.make_tensor_value_info(name, dtype, shape)


def _w(rng, *shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _feeds(proto, seed: int, n: int = 8) -> list[dict[str, np.ndarray]]:
    """``n`` feeds of the first input, every other one with a positive mean (both branches of an
    If on the mean's sign run)."""
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return [{proto.graph.input[0].name: (rng.standard_normal(shape) + (0.3 if i % 2 else -0.3)).astype(np.float32)}
            for i in range(n)]


def _lstm_branch_model(seed: int = 10):
    """If on the sign of the input's mean; then: LSTM -> MatMul (a unit), else: the mean over time,
    scaled; then both doubled."""
    rng = np.random.default_rng(seed)
    then = oh.make_graph(
        [oh.make_node("LSTM", ["x", "W", "R"], ["t_seq", "t_h"], hidden_size=16, name="then_lstm"),
         oh.make_node("MatMul", ["t_h", "t_w"], ["t_y"], name="then_out")],
        "then", [], [_vi("t_y", [1, 1, 16])],
        [onh.from_array(_w(rng, 1, 64, 16), "W"), onh.from_array(_w(rng, 1, 64, 16, scale=0.1), "R"),
         onh.from_array(_w(rng, 16, 16), "t_w")])
    els = oh.make_graph([oh.make_node("ReduceMean", ["x"], ["e_m"], axes=[0], keepdims=1),
                         oh.make_node("Mul", ["e_m", "half"], ["e_y"])], "else", [], [_vi("e_y", [1, 1, 16])])
    nodes = [oh.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             oh.make_node("Greater", ["mean", "zero"], ["c"]),
             oh.make_node("If", ["c"], ["h"], then_branch=then, else_branch=els, name="if"),
             oh.make_node("Add", ["h", "h"], ["y"], name="double")]
    return make_proto(nodes, [("x", [6, 1, 16])], [("y", [1, 1, 16])],
                      [("zero", np.zeros((), np.float32)), ("half", np.full((), 0.5, np.float32))])


def _body(model, attr="then_branch"):
    return next(n for n in model.graph if n.op_type == "If").attributes[attr].value


def test_float_unit_stays_float_whatever_the_finish_steps_rename():
    """A finish step that renames a main-graph value the float branch reads (here the model's
    input) used to make the second graft of the float body fail with a KeyError that was
    swallowed: the recurrent step had already converted the branch's LSTM, and the "float" unit
    went out with an int8 LSTM. The float body is now grafted once and the finish steps do not
    reach into it."""
    from onnxcomp.executors import Inline
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import QuantStudy

    proto = _lstm_branch_model()
    study = QuantStudy.prepare(proto, _feeds(proto, 25), QuantizeConfig())

    def rename_input(model):
        model.graph.inputs[0].name = "x_renamed"

    study.finish.insert(0, rename_input)
    floated = study.build(frozenset({"if/then_branch"}))
    assert {n.op_type for n in _body(floated)} == {"LSTM", "MatMul"}
    assert "DynamicQuantizeLSTM" in {n.op_type for n in _body(study.build())}
    floated.graph.inputs[0].name = "x"  # the evaluation feeds name it x
    assert study.evaluate([floated], Inline())[0]["sqnr_db"] > 100.0  # the float model up to rounding


def test_a_unit_not_in_the_model_is_an_error():
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import QuantStudy

    proto = _lstm_branch_model()
    study = QuantStudy.prepare(proto, _feeds(proto, 25), QuantizeConfig())
    study.units["gone/then_branch"] = ("gone", "then_branch")
    with pytest.raises(ValueError, match="has no node 'gone'"):
        study.build(frozenset({"gone/then_branch"}))
    study.units["if/no_branch"] = ("if", "no_branch")
    with pytest.raises(ValueError, match="'if' has no subgraph 'no_branch'"):
        study.build(frozenset({"if/no_branch"}))


# --------------------------------------------------------------------------- uncalibrated branches


def _else_never_taken_model(seed: int = 3):
    """x -> MatMul -> m; If flag > 0: then MatMul(m), else MatMul -> Relu -> MatMul (m); the If's
    output is the model's. Calibration feeds with flag 1 take only the then-branch."""
    rng = np.random.default_rng(seed)
    then = oh.make_graph([oh.make_node("MatMul", ["m", "t_w"], ["t_y"], name="then_matmul")], "then", [],
                         [_vi("t_y", [8, 16])], [onh.from_array(_w(rng, 16, 16), "t_w")])
    els = oh.make_graph(
        [oh.make_node("MatMul", ["m", "e_w1"], ["e_m"], name="else_matmul1"),
         oh.make_node("Relu", ["e_m"], ["e_r"], name="else_relu"),
         oh.make_node("MatMul", ["e_r", "e_w2"], ["e_y"], name="else_matmul2")],
        "else", [], [_vi("e_y", [8, 16])], [onh.from_array(_w(rng, 16, 16), "e_w1"), onh.from_array(_w(rng, 16, 16), "e_w2")])
    nodes = [oh.make_node("MatMul", ["x", "w_in"], ["m"], name="in_matmul"),
             oh.make_node("ReduceMax", ["flag"], ["f"], keepdims=0),
             oh.make_node("Greater", ["f", "zero"], ["c"]),
             oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els, name="if")]
    return make_proto(nodes, [("x", [8, 16]), ("flag", [1])], [("y", [8, 16])],
                      [("w_in", _w(rng, 16, 16)), ("zero", np.zeros((), np.float32))])


def _flag_feeds(seed: int, n: int, flag: float) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 16)).astype(np.float32), "flag": np.full(1, flag, np.float32)}
            for _ in range(n)]


def _weight_only_in_else(model) -> tuple[set[str], int]:
    """The else-branch's op types and its int8 weight matrices."""
    import onnx_ir as ir

    body = _body(model, "else_branch")
    int8 = sum(1 for v in body.initializers.values() if v.dtype == ir.DataType.INT8 and len(v.shape) == 2)
    return {n.op_type for n in body}, int8


def _output_sqnr(reference, candidate, feeds) -> float:
    from onnxcomp.testing import run_model, sqnr_db

    for level in ("disable", "all"):
        ref = np.concatenate([o[0].ravel() for o in run_model(reference, feeds, optimization=level)])
        out = np.concatenate([o[0].ravel() for o in run_model(candidate, feeds, optimization=level)])
        yield sqnr_db(ref, out)


def test_uncalibrated_branch_is_weight_only_and_reported():
    """The else-branch no calibration feed takes has no activation ranges: its MatMul weights are
    stored int8 behind a DequantizeLinear and the MatMuls compute in float (no Q/DQ on
    activations), the report says so; on feeds that do take it the output stays close to float
    (37.1 dB measured, optimizations off and on)."""
    from onnxcomp import io
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    proto = _else_never_taken_model()
    calib = _flag_feeds(5, 16, 1.0)
    quantized, report = quantize(proto, calib, QuantizeConfig())
    entry = report["branches"]["if/else_branch"]
    assert entry["feeds"] == 0 and entry["int8_nodes"] == 0
    assert entry["not_calibrated"] == "no calibration feed takes this branch"
    assert entry["weight_only_int8"]["nodes"] == ["else_matmul1", "else_matmul2"]
    assert entry["weight_only_int8"]["weights"] == 2
    assert report["branches"]["if/then_branch"]["int8_nodes"] == 1
    types, int8 = _weight_only_in_else(quantized)
    assert "QuantizeLinear" not in types and int8 == 2
    negative = _flag_feeds(6, 8, -1.0)
    assert all(db >= 32.0 for db in _output_sqnr(io.load_model(proto), quantized, negative))


def test_fidelity_fallback_reports_branches_and_what_went_float():
    """Under a fidelity target the report carried no ``branches`` section: nothing said the
    else-branch was never calibrated (weight-only int8), nor that the then-branch, a candidate of
    the fallback, went back to float. The uncalibrated branch is no candidate (moving it float
    would change nothing the evaluation sees)."""
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import QuantStudy

    proto = _else_never_taken_model()
    calib = _flag_feeds(5, 16, 1.0)
    study = QuantStudy.prepare(proto, calib, QuantizeConfig())
    assert "if/then_branch" in study.nodes and "if/else_branch" not in study.nodes
    assert study.branches["if/else_branch"]["not_calibrated"] == "no calibration feed takes this branch"
    # a target only float meets: every candidate goes float
    _, report = quantize(proto, calib, QuantizeConfig(fidelity_target=200.0))
    assert set(report["fallback"]["float_nodes"]) == set(study.nodes)
    branches = report["branches"]
    assert branches["if/else_branch"]["weight_only_int8"]["weights"] == 2
    assert branches["if/then_branch"] == ("kept float by the fallback (in int8: 1 int8 node(s), calibrated on "
                                          "16 feed(s))")


def test_fidelity_cli_prints_the_branches(tmp_path, capsys):
    from onnxcomp import io
    from onnxcomp.cli import main

    model = tmp_path / "branchy.onnx"
    io.save_model(io.load_model(_else_never_taken_model()), model)
    feeds = _flag_feeds(5, 16, 1.0)
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in feeds]), flag=np.stack([f["flag"] for f in feeds]))
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "calib.npz"),
                 "--fidelity-target", "200", "--no-latency", "--no-check"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("If branch if/else_branch: not calibrated (no calibration feed takes this branch): 2 weight(s) stored "
            "int8, weight-only (2 -> 1 KiB, compute in float)") in out
    assert "If branch if/then_branch: kept float by the fallback (in int8: 1 int8 node(s)" in out


# --------------------------------------------------------------------------- nothing compressed


def _lstm_model(with_matmul: bool, seed: int = 4):
    """x [T, 1, 16] (-> MatMul) -> LSTM -> y (the last hidden state)."""
    rng = np.random.default_rng(seed)
    first = "x"
    nodes, inits = [], [("W", _w(rng, 1, 64, 16)), ("R", _w(rng, 1, 64, 16, scale=0.1))]
    if with_matmul:
        nodes.append(oh.make_node("MatMul", ["x", "w_in"], ["p"], name="proj"))
        inits.append(("w_in", _w(rng, 16, 16)))
        first = "p"
    nodes.append(oh.make_node("LSTM", [first, "W", "R"], ["seq", "y"], hidden_size=16, name="lstm"))
    return make_proto(nodes, [("x", [6, 1, 16])], [("y", [1, 1, 16])], inits)


def _seq_feeds(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((6, 1, 16)).astype(np.float32)} for _ in range(n)]


def test_stored_int8_tensors_counts_weights_not_zero_points():
    from onnxcomp import io
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.verify import stored_int8_tensors

    proto = _lstm_model(with_matmul=True)
    assert stored_int8_tensors(io.load_model(proto)) == 0
    quantized, report = quantize(proto, _seq_feeds(1, 8), QuantizeConfig())
    assert report["int8_nodes"] == 1 and report["recurrent"]["lstm_int8"] == ["lstm"]
    # the MatMul's int8 weight, the LSTM's int8 W and R; their zero points are parameters
    assert stored_int8_tensors(quantized) == 3


def test_all_float_build_is_float_and_says_nothing_compressed():
    """Every candidate float (a target only float meets): the finish steps used to convert the
    LSTM anyway, so the "float" model carried int8 LSTM weights; the build is now the float model."""
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    proto = _lstm_model(with_matmul=True)
    quantized, report = quantize(proto, _seq_feeds(1, 8), QuantizeConfig(fidelity_target=200.0))
    # the LSTM is a candidate too (its int8 weights, tests/test_fallback_recurrent.py)
    assert sorted(report["fallback"]["float_nodes"]) == ["lstm", "proj"] and not report["fallback"]["met"]
    assert {n.op_type for n in quantized.graph} == {"MatMul", "LSTM"}
    from onnxcomp.quant.verify import stored_int8_tensors

    assert stored_int8_tensors(quantized) == 0 and report["fallback"]["int8_tensors"] == 0


def test_recurrent_int8_alone_is_compressed_under_a_target(tmp_path, capsys):
    """A model whose only int8 is its LSTM (no static candidate): the fidelity path said "not
    met" and the check "nothing was compressed (0 int8 nodes)" though the LSTM was written int8."""
    import json

    from onnxcomp import io
    from onnxcomp.cli import main

    model = tmp_path / "lstm.onnx"
    io.save_model(io.load_model(_lstm_model(with_matmul=False)), model)
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in _seq_feeds(2, 24)]))
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "calib.npz"),
                 "--fidelity-target", "20", "--no-latency", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fallback"]["met"] and report["fallback"]["final"]["sqnr_db"] >= 20.0
    assert report["check"]["compressed"] == {"count": 2, "what": "int8 tensors"}
    assert not any(p.startswith("nothing was compressed") for p in report["check"]["problems"])
    assert {n.op_type for n in io.load_model(tmp_path / "q.onnx").graph} == {"DynamicQuantizeLSTM"}
