"""Leftovers of the quantize fallback (issues 13 and 14): seeded models built in code.

* A unit (an If branch) the study keeps float stays float whole, whatever the finish steps do
  to the main graph, and a unit that is not in the model is an error, not skipped.
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


def _feeds(proto, seed: int, n: int = 8, shift: float | None = None) -> list[dict[str, np.ndarray]]:
    """``n`` feeds of the first input; ``shift`` None: every other feed with a positive mean (both
    branches of an If on the mean's sign run), else every feed shifted by it."""
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return [{proto.graph.input[0].name: (rng.standard_normal(shape)
                                         + (shift if shift is not None else (0.3 if i % 2 else -0.3))).astype(np.float32)}
            for i in range(n)]


def _lstm_branch_model(seed: int = 10):
    """If on the sign of the input's mean; then: MatMul -> LSTM (a unit), else: ReduceMean."""
    rng = np.random.default_rng(seed)
    then = oh.make_graph(
        [oh.make_node("MatMul", ["x", "t_w"], ["t_p"], name="then_proj"),
         oh.make_node("LSTM", ["t_p", "W", "R"], ["t_seq", "t_h"], hidden_size=16, name="then_lstm")],
        "then", [], [_vi("t_h", [1, 1, 16])],
        [onh.from_array(_w(rng, 16, 16), "t_w"), onh.from_array(_w(rng, 1, 64, 16), "W"),
         onh.from_array(_w(rng, 1, 64, 16, scale=0.1), "R")])
    els = oh.make_graph([oh.make_node("ReduceMean", ["x"], ["e_h"], axes=[0], keepdims=1)], "else", [],
                        [_vi("e_h", [1, 1, 16])])
    nodes = [oh.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             oh.make_node("Greater", ["mean", "zero"], ["c"]),
             oh.make_node("If", ["c"], ["h"], then_branch=then, else_branch=els, name="if"),
             oh.make_node("Add", ["h", "h"], ["y"], name="double")]
    return make_proto(nodes, [("x", [6, 1, 16])], [("y", [1, 1, 16])], [("zero", np.zeros((), np.float32))])


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
    assert {n.op_type for n in _body(floated)} == {"MatMul", "LSTM"}
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
