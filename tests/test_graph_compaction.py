"""Graph compaction (onnxcomp.passes.compact) and its place in the size route: an exact rewrite
that only shortens names and drops annotations, checked against onnxruntime with graph
optimizations off and on. Small seeded models built in code."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.cluster.passes import ClusterConfig, ClusterPass
from onnxcomp.graph import infer_types, working_copy
from onnxcomp.passes.compact import CompactConfig, CompactGraphPass, short_names
from onnxcomp.testing import assert_equivalent


def _proto(rng) -> onnx.ModelProto:
    """x[N,2,8,8] -> Conv(+b) -> Relu -> Conv 1x1 (group 2) -> GlobalAveragePool -> Flatten -> Gemm(transB)
    -> y, with long names, doc strings, default attributes restated, and value_info everywhere."""
    inits = {
        "encoder.block.0.conv.weight": rng.standard_normal((8, 2, 3, 3)).astype(np.float32),
        "encoder.block.0.conv.bias": rng.standard_normal(8).astype(np.float32),
        "encoder.block.1.conv.weight": rng.standard_normal((8, 4, 1, 1)).astype(np.float32),
        "classifier.head.weight": rng.standard_normal((5, 8)).astype(np.float32),
        "classifier.head.bias": rng.standard_normal(5).astype(np.float32),
    }
    nodes = [
        oh.make_node("Conv", ["x", "encoder.block.0.conv.weight", "encoder.block.0.conv.bias"],
                     ["/encoder/block.0/conv/Conv_output_0"], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1],
                     group=1, name="/encoder/block.0/conv/Conv", doc_string="a convolution"),
        oh.make_node("Relu", ["/encoder/block.0/conv/Conv_output_0"], ["/encoder/block.0/act/Relu_output_0"],
                     name="/encoder/block.0/act/Relu"),
        oh.make_node("Conv", ["/encoder/block.0/act/Relu_output_0", "encoder.block.1.conv.weight"],
                     ["/encoder/block.1/conv/Conv_output_0"], group=2, name="/encoder/block.1/conv/Conv"),
        oh.make_node("GlobalAveragePool", ["/encoder/block.1/conv/Conv_output_0"], ["/pool/GlobalAveragePool_output_0"],
                     name="/pool/GlobalAveragePool"),
        oh.make_node("Flatten", ["/pool/GlobalAveragePool_output_0"], ["/flatten/Flatten_output_0"], axis=1,
                     name="/flatten/Flatten"),
        oh.make_node("Gemm", ["/flatten/Flatten_output_0", "classifier.head.weight", "classifier.head.bias"], ["y"],
                     transB=1, alpha=1.0, name="/classifier/head/Gemm"),
    ]
    proto = make_proto(nodes, [("x", ["N", 2, 8, 8])], [("y", ["N", 5])], list(inits.items()), opset=18)
    proto.doc_string = "a model with a story"
    proto.graph.doc_string = "and a graph with one"
    return onnx.shape_inference.infer_shapes(proto)


def _feeds(rng, n=3):
    return [{"x": rng.standard_normal((4, 2, 8, 8)).astype(np.float32)} for _ in range(n)]


def _bytes(model: ir.Model) -> int:
    return ir.serde.serialize_model(model).ByteSize()


def test_short_names_skip_taken_ones():
    gen = short_names({"a", "c"})
    assert [next(gen) for _ in range(3)] == ["b", "d", "e"]
    names = [next(short_names(set())) for _ in range(1)]
    assert names == ["a"]
    gen = short_names(set())
    many = [next(gen) for _ in range(60)]
    assert len(set(many)) == 60 and many[51] == "Z" and many[52] == "ba"


def test_compaction_is_exact_and_shrinks_the_file(rng):
    proto = _proto(rng)
    assert len(proto.graph.value_info) == 5
    reference = io.load_model(proto)
    model = io.load_model(proto)
    before = _bytes(model)
    result = CompactGraphPass()(model)
    after_proto = ir.serde.serialize_model(model)
    assert after_proto.ByteSize() < 0.6 * before
    assert len(after_proto.graph.value_info) == 0
    assert not after_proto.doc_string and not after_proto.graph.doc_string
    assert all(not n.name and not n.doc_string for n in after_proto.graph.node)
    assert [v.name for v in after_proto.graph.input] == ["x"] and [v.name for v in after_proto.graph.output] == ["y"]
    assert max(len(i.name) for i in after_proto.graph.initializer) <= 2
    assert result.stats["renamed"] == 5 + 5  # 5 initializers, 5 intermediate tensors
    assert result.stats["default_attributes_dropped"] >= 4  # strides, dilations, group, axis, alpha
    assert all(a.name not in ("strides", "dilations") for n in after_proto.graph.node for a in n.attribute)
    onnx.checker.check_model(after_proto, full_check=True)
    assert_equivalent(reference, model, _feeds(rng), atol=1e-6, rtol=1e-6)


def test_compaction_options_and_idempotence(rng):
    model = io.load_model(_proto(rng))
    CompactGraphPass(CompactConfig(rename=False, drop_value_info=False))(model)
    proto = ir.serde.serialize_model(model)
    assert "classifier.head.weight" in {i.name for i in proto.graph.initializer}
    assert len(proto.graph.value_info) > 0
    CompactGraphPass()(model)
    once = ir.serde.serialize_model(model).SerializeToString()
    CompactGraphPass()(model)
    assert len(ir.serde.serialize_model(model).SerializeToString()) <= len(once)


def test_compaction_keeps_names_when_the_graph_has_subgraphs(rng):
    then_graph = oh.make_graph([oh.make_node("Add", ["t", "one"], ["o1"])], "then", [],
                               [oh.make_tensor_value_info("o1", onnx.TensorProto.FLOAT, [3])])
    else_graph = oh.make_graph([oh.make_node("Sub", ["t", "one"], ["o2"])], "else", [],
                               [oh.make_tensor_value_info("o2", onnx.TensorProto.FLOAT, [3])])
    nodes = [
        oh.make_node("Mul", ["x", "two"], ["t"], name="double"),
        oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        oh.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
        oh.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph, name="branch"),
    ]
    inits = [("two", np.array(2.0, np.float32)), ("one", np.ones(3, np.float32)), ("zero", np.array(0.0, np.float32))]
    proto = make_proto(nodes, [("x", [3])], [("y", [3])], inits, opset=18)
    reference = io.load_model(proto)
    model = io.load_model(proto)
    result = CompactGraphPass()(model)
    assert result.stats["renamed"] == 0 and "note" in result.stats
    assert "t" in {v.name for n in model.graph for v in n.outputs}
    feeds = [{"x": np.array([1.0, -2.0, 3.0], np.float32)}, {"x": np.array([-5.0, 1.0, 0.5], np.float32)}]
    assert_equivalent(reference, model, feeds)


def test_cluster_stage_can_finish_with_compaction(rng):
    """[cluster] compact_graph: the sparse size route's file shrinks further, outputs unchanged."""
    proto = _proto(rng)
    feeds = _feeds(rng)
    sizes = {}
    models = {}
    for compact in (False, True):
        work = working_copy(io.load_model(proto), 18, allow_upgrade=True, notes=[])
        infer_types(work)
        stats = ClusterPass(ClusterConfig(bits=4, format="sparse", min_elements=32, compact_graph=compact))(work).stats
        assert ("compaction" in stats) == compact
        sizes[compact] = _bytes(work)
        models[compact] = work
    assert sizes[True] < 0.8 * sizes[False]
    assert_equivalent(models[False], models[True], feeds)


@pytest.mark.parametrize("level", ["disable", "all"])
def test_compacted_cluster_model_runs_at_both_levels(rng, level):
    work = working_copy(io.load_model(_proto(rng)), 18, allow_upgrade=True, notes=[])
    ClusterPass(ClusterConfig(bits=5, format="sparse", min_elements=32, compact_graph=True))(work)
    from onnxcomp.testing import run_model

    out = run_model(work, _feeds(rng, 1), optimization=level)[0][0]
    assert out.shape == (4, 5) and np.all(np.isfinite(out))
