"""Clustering and pruning inside If branches and Loop bodies (issue 17), against onnxruntime.

Seeded models built in code: an If whose branches hold Conv and MatMul weights (a branch
initializer, a Constant node, and an outer initializer read only inside the branch), and a Loop
whose body multiplies its carried state by a body weight and an outer weight. Clustering must
reach K distinct values in every such weight and keep the outputs above an SQNR floor; exact
folds (codebook storage of clustered weights, zero channels) must match to 1e-5, with
onnxruntime's graph optimizations off and on. The sensitivity study and both fallbacks take
each calibrated branch as one candidate.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.passes.base import model_problems
from onnxcomp.testing import assert_equivalent, run_model, sqnr_db

F = onnx.TensorProto.FLOAT
B = onnx.TensorProto.BOOL
I64 = onnx.TensorProto.INT64

# Output SQNR of 4-bit (K = 16) clusters on these models, measured when written (optimizations
# off and on alike): If 21.5 dB (two layers, then the residual), Loop 11.7 dB (six layers: two
# per trip, three trips, the error carried along); floors a few dB below.
CLUSTER_FLOOR_DB = {"if": 18.0, "loop": 9.0}


def _vi(name, shape, dtype=F):
    return oh.make_tensor_value_info(name, dtype, shape)


def _w(rng, *shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def model_if_weights(rng):
    """If on the sign of the input's mean, then a residual Add. then: Conv (branch initializer) ->
    Relu -> Conv (a Constant node). else: MatMul (an outer initializer read only here) -> Relu ->
    MatMul (branch initializer)."""
    then = oh.make_graph(
        [oh.make_node("Conv", ["x", "t_w1"], ["t_c"], pads=[1, 1, 1, 1], name="then_conv1"),
         oh.make_node("Relu", ["t_c"], ["t_r"], name="then_relu"),
         oh.make_node("Constant", [], ["t_w2"], value=onh.from_array(_w(rng, 8, 16, 1, 1), "t_w2")),
         oh.make_node("Conv", ["t_r", "t_w2"], ["t_y"], name="then_conv2")],
        "then", [], [_vi("t_y", [1, 8, 4, 32])], [onh.from_array(_w(rng, 16, 8, 3, 3, scale=0.1), "t_w1")])
    els = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w_outer"], ["e_m"], name="else_matmul1"),
         oh.make_node("Relu", ["e_m"], ["e_r"], name="else_relu"),
         oh.make_node("MatMul", ["e_r", "e_w2"], ["e_y"], name="else_matmul2")],
        "else", [], [_vi("e_y", [1, 8, 4, 32])], [onh.from_array(_w(rng, 32, 32, scale=0.2), "e_w2")])
    nodes = [oh.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             oh.make_node("Greater", ["mean", "zero"], ["c"]),
             oh.make_node("If", ["c"], ["h"], then_branch=then, else_branch=els, name="if"),
             oh.make_node("Add", ["h", "x"], ["y"], name="residual")]
    inits = [("zero", np.zeros((), np.float32)), ("w_outer", _w(rng, 32, 32, scale=0.2))]
    return make_proto(nodes, [("x", [1, 8, 4, 32])], [("y", [1, 8, 4, 32])], inits)


def model_loop_matmul(rng):
    """Loop (3 trips): ``h = tanh(h @ w_body) @ w_outer`` on the carried state; ``w_body`` is a
    body initializer, ``w_outer`` an outer initializer read only inside the body."""
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("MatMul", ["h_in", "w_body"], ["mm"], name="body_matmul1"),
         oh.make_node("Tanh", ["mm"], ["th"]),
         oh.make_node("MatMul", ["th", "w_outer"], ["h_out"], name="body_matmul2")],
        "body", [_vi("iter", [], I64), _vi("cond_in", [], B), _vi("h_in", [1, 32])],
        [_vi("cond_out", [], B), _vi("h_out", [1, 32])], [onh.from_array(_w(rng, 32, 32, scale=0.25), "w_body")])
    nodes = [oh.make_node("Loop", ["trips", "true", "x"], ["h"], body=body, name="loop")]
    inits = [("trips", np.array(3, np.int64)), ("true", np.array(True)), ("w_outer", _w(rng, 32, 32, scale=0.25))]
    return make_proto(nodes, [("x", [1, 32])], [("h", [1, 32])], inits)


def _feeds(proto, seed: int, n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    # half of the feeds with a positive mean, half negative: both branches run
    return [{proto.graph.input[0].name: (rng.standard_normal(shape) + (0.3 if i % 2 else -0.3)).astype(np.float32)}
            for i in range(n)]


def _sqnr(reference: ir.Model, candidate: ir.Model, feeds, level: str) -> float:
    ref = np.concatenate([o[0].ravel() for o in run_model(reference, feeds, optimization=level)])
    out = np.concatenate([o[0].ravel() for o in run_model(candidate, feeds, optimization=level)])
    return sqnr_db(ref, out)


def _weights_read_in_subgraphs(model: ir.Model) -> dict[str, np.ndarray]:
    """Constant weights (2-D or more) that nodes inside subgraphs read, wherever they live."""
    found = {}
    for graph in model.graph.subgraphs():
        for node in graph:
            for v in node.inputs:
                if v is not None and v.const_value is not None and len(v.const_value.shape) >= 2:
                    found[v.name] = v.const_value.numpy()
    return found


MODELS = {"if": (model_if_weights, {"t_w1", "t_w2", "w_outer", "e_w2"}),
          "loop": (model_loop_matmul, {"w_body", "w_outer"})}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cluster_reaches_k_values_inside_subgraphs(name):
    from onnxcomp.cluster.api import cluster
    from onnxcomp.cluster.passes import ClusterConfig

    build, expected = MODELS[name]
    proto = build(np.random.default_rng(3))
    reference = io.load_model(proto)
    clustered, report = cluster(proto, ClusterConfig(bits=4, min_elements=64, channel_scales="never"))
    assert set(report["tensors"]) == expected
    weights = _weights_read_in_subgraphs(clustered)
    for tensor in expected:
        assert np.unique(weights[tensor]).size <= 16, tensor
        assert np.unique(weights[tensor]).size >= 12, tensor  # real clusters, not a collapsed tensor
    # the report says where each tensor lives; a subgraph's own weights are counted per subgraph
    scopes = {t: s["scope"] for t, s in report["tensors"].items()}
    assert scopes["w_outer"] == "main"
    inner = {t for t, s in scopes.items() if s != "main"}
    assert inner == expected - {"w_outer"}
    assert sum(row["tensors"] for row in report["subgraphs"].values()) == len(inner)
    assert model_problems(clustered) == {}
    feeds = _feeds(proto, 11)
    for level in ("disable", "all"):
        assert _sqnr(reference, clustered, feeds, level) >= CLUSTER_FLOOR_DB[name]


def test_cluster_recurrent_weights_inside_a_branch():
    """An LSTM's W and R inside an If branch are clustered too, one channel per gate row."""
    from onnxcomp.cluster.api import cluster
    from onnxcomp.cluster.passes import ClusterConfig

    rng = np.random.default_rng(8)
    then = oh.make_graph(
        [oh.make_node("LSTM", ["x", "W", "R"], ["t_seq", "t_h"], hidden_size=16, name="then_lstm")],
        "then", [], [_vi("t_h", [1, 1, 16])],
        [onh.from_array(_w(rng, 1, 64, 16), "W"), onh.from_array(_w(rng, 1, 64, 16, scale=0.1), "R")])
    els = oh.make_graph([oh.make_node("ReduceMean", ["x"], ["e_h"], axes=[0], keepdims=1)], "else", [],
                        [_vi("e_h", [1, 1, 16])])
    nodes = [oh.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             oh.make_node("Greater", ["mean", "zero"], ["c"]),
             oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els, name="if")]
    proto = make_proto(nodes, [("x", [6, 1, 16])], [("y", [1, 1, 16])], [("zero", np.zeros((), np.float32))])
    clustered, report = cluster(proto, ClusterConfig(bits=4, min_elements=64, channel_scales="never"))
    assert set(report["tensors"]) == {"W", "R"}
    assert {t["scope"] for t in report["tensors"].values()} == {"then"}
    weights = _weights_read_in_subgraphs(clustered)
    assert all(np.unique(weights[name]).size == 16 for name in ("W", "R"))
    scaled, report = cluster(proto, ClusterConfig(bits=4, min_elements=64, channel_scales="always"))
    assert report["tensors"]["W"]["granularity"] == "scaled channel"
    assert len(report["tensors"]["W"]["shape"]) == 3  # [dirs, 4 * hidden, inputs]: a scale per gate row
    feeds = _feeds(proto, 15)
    for level in ("disable", "all"):  # measured 26.2 dB per tensor
        assert _sqnr(io.load_model(proto), clustered, feeds, level) >= 22.0
        assert _sqnr(io.load_model(proto), scaled, feeds, level) >= 22.0


@pytest.mark.parametrize("fmt", ["codebook", "sparse"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cluster_codebook_inside_subgraphs_is_the_snapped_model(name, fmt):
    """Stored as labels + codebook (decoded at session creation, in the graph that owns each
    weight), the model computes exactly what the snapped-float model does."""
    from onnxcomp.cluster.api import cluster
    from onnxcomp.cluster.passes import ClusterConfig

    build, expected = MODELS[name]
    proto = build(np.random.default_rng(4))
    cfg = dict(bits=4, min_elements=64, channel_scales="never")
    snapped, _ = cluster(proto, ClusterConfig(**cfg))
    stored, report = cluster(proto, ClusterConfig(**cfg, format=fmt))
    assert set(report["tensors"]) == expected
    assert model_problems(stored) == {}
    assert_equivalent(snapped, stored, _feeds(proto, 12), atol=1e-5)
    # the float weights are gone from the subgraphs (their labels replace them)
    assert not set(_weights_read_in_subgraphs(stored)) & (expected - {"w_outer"}) or fmt == "sparse"


# ------------------------------------------------------------------------------------------
# pruning: zero channels inside bodies fold exactly
# ------------------------------------------------------------------------------------------


def _zero(proto, name: str, axis: int, channels: list[int]) -> None:
    """Zero ``channels`` along ``axis`` of the initializer ``name`` (of any graph), in the proto."""
    def graphs(g):
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(attr.g)

    for g in graphs(proto.graph):
        for t in g.initializer:
            if t.name == name:
                array = onh.to_array(t).copy()
                index = [slice(None)] * array.ndim
                index[axis] = channels
                array[tuple(index)] = 0
                t.CopyFrom(onh.from_array(array, name))
                return
    raise KeyError(name)


def _params_in_subgraphs(model: ir.Model) -> int:
    return sum(int(np.prod(v.const_value.shape)) for g in model.graph.subgraphs()
               for n in g for v in n.inputs if v is not None and v.const_value is not None)


def _zeroed(name: str):
    build = MODELS[name][0]
    proto = build(np.random.default_rng(5))
    if name == "if":
        _zero(proto, "t_w1", 0, [1, 4, 9])  # then: conv1 output channels -> relu(0) = 0 into conv2
        _zero(proto, "w_outer", 1, [0, 7])  # else: matmul1 (outer weight) columns -> relu -> matmul2
    else:
        _zero(proto, "w_body", 1, [2, 3, 30])  # body: matmul1 columns -> tanh(0) = 0 -> matmul2 rows
    return proto


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prune_folds_zero_channels_inside_subgraphs_exactly(name):
    from onnxcomp.prune.api import prune
    from onnxcomp.prune.config import PruneConfig

    proto = _zeroed(name)
    reference = io.load_model(proto)
    pruned, report = prune(proto, PruneConfig(criterion="zeros"))
    expected = {"if": {"if/then_branch": 3, "if/else_branch": 2}, "loop": {"loop/body": 3}}[name]
    assert {k: v["channels_removed"] for k, v in report["subgraphs"].items()} == expected
    assert report["channels_removed"] == report["channels_removed_in_subgraphs"] == sum(expected.values())
    assert _params_in_subgraphs(pruned) < _params_in_subgraphs(reference)
    assert model_problems(pruned) == {}
    assert_equivalent(reference, pruned, _feeds(proto, 13), atol=1e-5)  # optimizations off and on
    if name == "if":  # the outer weight the branch sliced is now the branch's; the outer one is gone
        assert "w_outer" not in pruned.graph.initializers


def test_prune_inside_subgraphs_folds_zeros_only_and_says_why():
    """A lossy criterion is not applied inside bodies (the report says why), zero channels still
    fold; a body with no zero channel is left alone with the reason."""
    from onnxcomp.prune.api import prune
    from onnxcomp.prune.config import PruneConfig

    proto = _zeroed("if")
    reference = io.load_model(proto)
    pruned, report = prune(proto, PruneConfig(criterion="l1", ratio=0.5))
    then = report["subgraphs"]["if/then_branch"]
    assert then["channels_removed"] == 3 and "not applied inside subgraphs" in then["note"]
    assert_equivalent(reference, pruned, _feeds(proto, 14), atol=1e-5)  # the main graph has no channels to cut
    plain = MODELS["loop"][0](np.random.default_rng(6))
    _, report = prune(plain, PruneConfig(criterion="zeros"))
    assert report["subgraphs"]["loop/body"]["channels_removed"] == 0
    assert report["subgraphs"]["loop/body"]["why_none"]


# ------------------------------------------------------------------------------------------
# sensitivity and fallbacks: quantized subgraphs are candidates ("units")
# ------------------------------------------------------------------------------------------


def _quantized_ops(graph: ir.Graph) -> int:
    return sum(1 for n in graph.all_nodes() if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def test_sensitivity_ranks_quantized_branches():
    """Each calibrated branch is one candidate: quantized alone it costs what its own int8 costs,
    left float it buys back; the float reference is the all-float model."""
    from onnxcomp.executors import Inline
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import analyze_sensitivity

    proto = model_if_weights(np.random.default_rng(7))
    report = analyze_sensitivity(proto, _feeds(proto, 21, 16), QuantizeConfig(), executor=Inline())
    rows = {r["node"]: r for r in report["nodes"]}
    assert set(rows) == {"if/then_branch", "if/else_branch"}  # the main graph has nothing to quantize
    assert {r["op_type"] for r in rows.values()} == {"If subgraph"}
    assert report["float"]["sqnr_db"] == float("inf")  # the reference has float branches
    for row in rows.values():
        assert 15.0 < row["alone_sqnr_db"] < 80.0  # each branch's int8 costs something, not everything
        assert row["gain_db"] > 0.0
    # alone, a branch costs about what the all-int8 model costs on the feeds that take it
    assert min(r["alone_sqnr_db"] for r in rows.values()) >= report["all_int8"]["sqnr_db"] - 0.5


def test_fidelity_target_moves_a_branch_to_float():
    from onnxcomp.executors import Inline
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import quantize_with_fallback

    proto = model_if_weights(np.random.default_rng(7))
    calib = _feeds(proto, 21, 16)
    _, everything = quantize_with_fallback(proto, calib, QuantizeConfig(), fidelity_target=1.0, executor=Inline())
    assert everything["float_nodes"] == [] and set(everything["int8_nodes"]) == {"if/then_branch", "if/else_branch"}
    target = everything["final"]["sqnr_db"] + 3.0
    model, report = quantize_with_fallback(proto, calib, QuantizeConfig(), fidelity_target=target, executor=Inline())
    assert report["met"] and report["final"]["sqnr_db"] >= target
    assert len(report["float_nodes"]) == 1 and len(report["int8_nodes"]) == 1
    node = next(n for n in model.graph if n.op_type == "If")
    moved = report["float_nodes"][0].rsplit("/", 1)[1]
    kept = report["int8_nodes"][0].rsplit("/", 1)[1]
    assert _quantized_ops(node.attributes[moved].value) == 0
    assert _quantized_ops(node.attributes[kept].value) > 0
    assert model_problems(model) == {}
    reference = io.load_model(proto)
    for level in ("disable", "all"):
        assert _sqnr(reference, model, _feeds(proto, 22), level) >= target - 6.0  # held-out feeds


def test_check_fallback_study_sees_branches():
    """The quantize run's own fallback (from its calibration) ranks and moves branches too, against
    the all-float reference."""
    from onnxcomp.check import CheckConfig
    from onnxcomp.graph import working_copy
    from onnxcomp.quant import static
    from onnxcomp.quant.autofallback import fallback_to_budget, study_of
    from onnxcomp.quant.config import QuantizeConfig

    proto = model_if_weights(np.random.default_rng(7))
    calib = _feeds(proto, 21, 16)
    work = working_copy(proto, 13, allow_upgrade=True, notes=[])
    kept = []
    static.quantize_static(work, calib, QuantizeConfig(), keep=kept.append)
    study = study_of(kept[0], calib)
    assert set(study.nodes) == {"if/then_branch", "if/else_branch"}
    reference = run_model(io.load_model(proto), study.feeds)
    assert all(np.array_equal(a, b) for r, s in zip(reference, study.reference) for a, b in zip(r, s))
    model, report = fallback_to_budget(study, CheckConfig(min_cosine=0.99999), max_float_fraction=1.0)
    assert report["met_on_fitting_data"] and report["float_nodes"]
    assert all(report["damage"][n] > 0 for n in report["float_nodes"])
    node = next(n for n in model.graph if n.op_type == "If")
    for unit in report["float_nodes"]:
        assert _quantized_ops(node.attributes[unit.rsplit("/", 1)[1]].value) == 0


def test_onnxruntime_has_no_int8_gru_kernel():
    """What the report says about GRU/RNN (compute stays float on int8 weights) holds for the
    installed onnxruntime: among its registered ops the only quantized recurrent one is LSTM's."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    from onnxcomp.ops import RECURRENT_INT8

    recurrent = {(s.domain, s.name) for s in ort_state.get_all_operator_schema()
                 if any(op in s.name for op in ("LSTM", "GRU", "RNN")) and "Quant" in s.name}
    assert recurrent == {("com.microsoft", "DynamicQuantizeLSTM")}
    kernels = {op: RECURRENT_INT8.get("", op, 17).kernel for op in ("LSTM", "GRU", "RNN")}
    assert kernels == {"LSTM": "DynamicQuantizeLSTM", "GRU": None, "RNN": None}


def test_fidelity_target_variants_are_what_quantize_writes():
    """The study's variants take quantize's steps after the rewrite: an LSTM of the main graph
    becomes DynamicQuantizeLSTM under --fidelity-target as under the default quantize."""
    from onnxcomp.executors import Inline
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import quantize_with_fallback

    rng = np.random.default_rng(9)
    nodes = [oh.make_node("MatMul", ["xs", "w_in"], ["proj"], name="proj"),
             oh.make_node("LSTM", ["proj", "W", "R"], ["seq", "h"], hidden_size=16, name="lstm")]
    inits = [("w_in", _w(rng, 16, 16)), ("W", _w(rng, 1, 64, 16)), ("R", _w(rng, 1, 64, 16, scale=0.1))]
    proto = make_proto(nodes, [("xs", [6, 1, 16])], [("h", [1, 1, 16])], inits)
    calib = _feeds(proto, 23, 8)
    default, _ = quantize(proto, calib, QuantizeConfig())
    targeted, report = quantize_with_fallback(proto, calib, QuantizeConfig(), fidelity_target=10.0, executor=Inline())
    assert report["met"]
    for model in (default, targeted):
        assert [n.op_type for n in model.graph if "LSTM" in n.op_type] == ["DynamicQuantizeLSTM"]
    for level in ("disable", "all"):
        assert _sqnr(io.load_model(proto), targeted, _feeds(proto, 24), level) >= 20.0


def test_a_branch_moved_to_float_is_float_whole():
    """A unit in float keeps no int8 inside, not even its LSTM (which quantize's recurrent step,
    run on the whole model after the rewrite, would otherwise convert)."""
    from onnxcomp.executors import Inline
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import QuantStudy

    rng = np.random.default_rng(10)
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
    proto = make_proto(nodes, [("x", [6, 1, 16])], [("y", [1, 1, 16])], [("zero", np.zeros((), np.float32))])
    study = QuantStudy.prepare(proto, _feeds(proto, 25, 8), QuantizeConfig())
    assert "if/then_branch" in study.nodes
    quantized, floated = study.build(), study.build(frozenset({"if/then_branch"}))
    body = lambda m: next(n for n in m.graph if n.op_type == "If").attributes["then_branch"].value  # noqa: E731
    assert "DynamicQuantizeLSTM" in {n.op_type for n in body(quantized)}
    assert {n.op_type for n in body(floated)} == {"MatMul", "LSTM"}
    metrics = study.evaluate([floated], Inline())[0]
    assert metrics["sqnr_db"] > 100.0  # the float branch is the float model (up to float rounding)
