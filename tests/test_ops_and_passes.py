"""Op table lookups and the pass framework (configs, opset requirements, pipeline statistics)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.errors import ConfigError, OpsetError
from onnxcomp.ops import CHANNELWISE_OPS, LINEAR_OPS, OpTable, node_opset
from onnxcomp.passes.base import CompressionPass, PassConfig, run_pipeline


def test_op_table_ranges():
    table: OpTable[str] = OpTable("t")
    table.register("Foo", "old", since=1, until=12)
    table.register("Foo", "new", since=13)
    assert table.get("", "Foo", 11) == "old"
    assert table.get("ai.onnx", "Foo", 13) == "new"
    assert table.get("", "Foo", 99) == "new"
    assert table.get("com.microsoft", "Foo", 13) is None
    assert ("", "Foo") in table and ("", "Bar") not in table
    with pytest.raises(ValueError, match="overlap"):
        table.register("Foo", "clash", since=10, until=14)


def test_linear_op_axes_follow_attributes():
    proto = make_proto(
        [
            oh.make_node("Gemm", ["x", "w0", "b"], ["y0"]),
            oh.make_node("Gemm", ["x", "w1", "b"], ["y1"], transB=1),
            oh.make_node("Conv", ["img", "wc"], ["c"]),
        ],
        [("x", [1, 4]), ("img", [1, 2, 3, 3])],
        [("y0", [1, 3]), ("y1", [1, 3]), ("c", [1, 5, 1, 1])],
        [
            ("w0", np.zeros((4, 3), np.float32)),
            ("w1", np.zeros((3, 4), np.float32)),
            ("b", np.zeros(3, np.float32)),
            ("wc", np.zeros((5, 2, 3, 3), np.float32)),
        ],
        opset=13,
    )
    model = io.load_model(proto)
    g0, g1, conv = list(model.graph)
    spec = LINEAR_OPS.lookup(g0, model)
    assert spec.role("weight").axes(g0) == (1, 0)
    assert spec.role("weight").axes(g1) == (0, 1)
    assert LINEAR_OPS.lookup(conv, model).role("weight").axes(conv) == (0, 1)
    assert node_opset(conv, model) == 13
    assert CHANNELWISE_OPS.get("", "Relu", 13) == ()
    assert CHANNELWISE_OPS.get("", "BatchNormalization", 15) == (1, 2, 3, 4)


@dataclasses.dataclass(frozen=True)
class _ScaleConfig(PassConfig):
    factor: float = 2.0

    def validate(self) -> None:
        if self.factor <= 0:
            raise ConfigError(f"factor must be > 0, got {self.factor}")


class _ScaleWeights(CompressionPass[_ScaleConfig]):
    """Test pass: multiplies every float initializer by a factor."""

    config_class = _ScaleConfig
    min_opset = 13

    def apply(self, model):
        count = 0
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            value.const_value = ir.tensor(array * np.float32(self.config.factor), name=value.name)
            count += 1
        return count > 0, {"scaled": count}


def test_pass_result_and_pipeline_stats(matmul_proto):
    model = io.load_model(matmul_proto)
    w = model.graph.initializers["w"].const_value.numpy().copy()
    p = _ScaleWeights(_ScaleConfig(factor=3.0))
    result = run_pipeline(model, [p, _ScaleWeights()])
    assert result.modified
    assert result.stages == [
        ("_ScaleWeights", {"modified": True, "scaled": 2}),
        ("_ScaleWeights", {"modified": True, "scaled": 2}),
    ]
    np.testing.assert_allclose(model.graph.initializers["w"].const_value.numpy(), w * 6)
    assert p.result is not None and p.result.stats == {"scaled": 2}


def test_pass_refuses_old_opset_and_bad_config(matmul_proto):
    old = make_proto([oh.make_node("Relu", ["x"], ["y"])], [("x", [1])], [("y", [1])], opset=11)
    with pytest.raises(OpsetError, match="needs default-domain opset 13"):
        _ScaleWeights()(io.load_model(old))
    with pytest.raises(ConfigError, match="factor must be > 0"):
        _ScaleConfig(factor=0)
    assert _ScaleConfig.from_dict({"factor": 4}).factor == 4.0
