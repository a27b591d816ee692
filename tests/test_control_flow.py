"""Control flow and recurrent models: every pass keeps If/Loop/Scan subgraphs valid and outputs in budget.

A generated corpus (seeded, built in code): If with both branches taken depending on the input,
nested If, Loop with carried state, Scan, LSTM and GRU, outer-scope initializers read inside
subgraphs, branches that return outer-scope values (the shape that broke cleanup on silero-vad),
Conv and BatchNormalization inside If branches. Each model goes through every pass; cleanup must
match to 1e-5, lossy passes must stay above the SQNR floors below, always with onnxruntime's
graph optimizations off and on, and every output must pass onnx.checker (full) and load.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.graph import all_value_names, fix_subgraph_outputs, unique_name
from onnxcomp.passes.base import CompressionPass, InvalidModelError, PassConfig, model_problems
from onnxcomp.passes.cleanup import CleanupPass, op_histogram
from onnxcomp.testing import assert_equivalent, run_model, sqnr_db

F = onnx.TensorProto.FLOAT
B = onnx.TensorProto.BOOL
I64 = onnx.TensorProto.INT64

# SQNR floors (dB) of the lossy passes on this corpus, (onnxruntime optimizations off, on): per
# output over all feeds, the worst output of the worst model. Measured minima when written (off /
# on): static 29.3 / 13.2 (with optimizations on, onnxruntime's u8s8 int8 MatMul/Conv kernels
# saturate pairs of products on AVX2 CPUs without VNNI; not a control-flow effect: the same
# graph without subgraphs loses as much), dynamic 13.0 (per-tensor uint8 activations through a
# recurrence; onnxruntime's own quantize_dynamic does as badly on these models), weight-only
# int8 39.3, 4-bit clusters 15.3 (11.8 once LSTM/GRU W and R are clustered too), pruning 25% of the channels by L1 without refit 11.0. A
# subgraph that reads the wrong tensor lands far below (-4.4 dB before a fix of the Relu fold).
SQNR_FLOOR = {
    "quantize-static": (25.0, 10.0),
    "quantize-dynamic": (10.0, 10.0),
    "quantize-weight-only": (35.0, 35.0),
    "cluster": (10.0, 10.0),
    "prune": (8.0, 8.0),
}


def _vi(name, shape, dtype=F):
    return oh.make_tensor_value_info(name, dtype, shape)


def _graph(nodes, name, outputs, inputs=(), inits=()):
    return oh.make_graph(nodes, name, list(inputs), list(outputs), [onh.from_array(a, n) for n, a in inits])


def _w(rng, *shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _bn_inits(rng, c, prefix):
    return [
        (f"{prefix}_g", rng.uniform(0.5, 2.0, c).astype(np.float32)),
        (f"{prefix}_b", _w(rng, c)),
        (f"{prefix}_m", _w(rng, c)),
        (f"{prefix}_v", rng.uniform(0.5, 2.0, c).astype(np.float32)),
    ]


def _positive_mean(x: str, out: str, prefix: str) -> list:
    """``out = ReduceMean(x) > 0`` as a bool scalar (the branch taken depends on the input)."""
    return [
        oh.make_node("ReduceMean", [x], [f"{prefix}_mean"], keepdims=0),
        oh.make_node("Greater", [f"{prefix}_mean", "zero"], [out]),
    ]


def model_if_conv(rng):
    """If on the input's sign; Conv (+BatchNorm, + no-ops) inside both branches; outer weights."""
    then = _graph(
        [
            oh.make_node("Conv", ["x", "w1", "b1"], ["t_c"], pads=[1, 1, 1, 1], name="then_conv"),
            oh.make_node("BatchNormalization", ["t_c", "bn_g", "bn_b", "bn_m", "bn_v"], ["t_n"], name="then_bn"),
            oh.make_node("Relu", ["t_n"], ["t_y"], name="then_relu"),
        ],
        "then", [_vi("t_y", [1, 4, 8, 8])],
    )
    els = _graph(
        [
            oh.make_node("Conv", ["x", "w2"], ["e_c"], pads=[1, 1, 1, 1], name="else_conv"),
            oh.make_node("Mul", ["e_c", "one"], ["e_m"], name="else_mul1"),
            oh.make_node("Sigmoid", ["e_m"], ["e_y"], name="else_sigmoid"),
        ],
        "else", [_vi("e_y", [1, 4, 8, 8])],
    )
    nodes = [
        *_positive_mean("x", "c", "c"),
        oh.make_node("If", ["c"], ["h"], then_branch=then, else_branch=els, name="if"),
        oh.make_node("Conv", ["h", "w3", "b3"], ["y"], name="head"),
    ]
    inits = [
        ("zero", np.zeros((), np.float32)), ("one", np.ones((), np.float32)),
        ("w1", _w(rng, 4, 3, 3, 3)), ("b1", _w(rng, 4)), ("w2", _w(rng, 4, 3, 3, 3)),
        ("w3", _w(rng, 5, 4, 1, 1)), ("b3", _w(rng, 5)), *_bn_inits(rng, 4, "bn"),
    ]
    return make_proto(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 5, 8, 8])], inits)


def model_nested_if(rng):
    """If inside an If branch; the inner condition is computed inside the outer branch."""
    inner_then = _graph([oh.make_node("Conv", ["x", "w1"], ["it_y"], pads=[1, 1, 1, 1])], "it",
                        [_vi("it_y", [1, 4, 8, 8])])
    inner_else = _graph([oh.make_node("Conv", ["x", "w2"], ["ie_c"], pads=[1, 1, 1, 1]),
                         oh.make_node("Relu", ["ie_c"], ["ie_y"])], "ie", [_vi("ie_y", [1, 4, 8, 8])])
    outer_then = _graph(
        [
            oh.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
            oh.make_node("Greater", ["mx", "two"], ["c2"]),
            oh.make_node("If", ["c2"], ["ot_h"], then_branch=inner_then, else_branch=inner_else, name="inner_if"),
            oh.make_node("Add", ["ot_h", "zero"], ["ot_y"]),
        ],
        "ot", [_vi("ot_y", [1, 4, 8, 8])],
    )
    outer_else = _graph([oh.make_node("Conv", ["x", "w3", "b3"], ["oe_c"], pads=[1, 1, 1, 1]),
                         oh.make_node("Tanh", ["oe_c"], ["oe_y"])], "oe", [_vi("oe_y", [1, 4, 8, 8])])
    nodes = [
        *_positive_mean("x", "c", "c"),
        oh.make_node("If", ["c"], ["y"], then_branch=outer_then, else_branch=outer_else, name="outer_if"),
    ]
    inits = [
        ("zero", np.zeros((), np.float32)), ("two", np.full((), 2.0, np.float32)),
        ("w1", _w(rng, 4, 3, 3, 3)), ("w2", _w(rng, 4, 3, 3, 3)), ("w3", _w(rng, 4, 3, 3, 3)), ("b3", _w(rng, 4)),
    ]
    return make_proto(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def model_if_returns_outer(rng):
    """Both branches return a main-graph value through no-ops (Identity, ``+ 0``, ``* 1``).

    Removing them naively makes the branches return the outer value directly (invalid), and
    onnx_ir's identity elimination fails half-way when both branches return the same value.
    """
    then = _graph([oh.make_node("Identity", ["h"], ["t_y"])], "then", [_vi("t_y", [1, 4, 8, 8])])
    els = _graph(
        [oh.make_node("Identity", ["h"], ["e_i"]), oh.make_node("Add", ["e_i", "zero"], ["e_a"]),
         oh.make_node("Mul", ["e_a", "one"], ["e_y"])],
        "else", [_vi("e_y", [1, 4, 8, 8])],
    )
    then2 = _graph([oh.make_node("Identity", ["w_out"], ["t2_y"])], "then2", [_vi("t2_y", [4])])
    else2 = _graph([oh.make_node("Identity", ["x_bias"], ["e2_y"])], "else2", [_vi("e2_y", [4])])
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
        oh.make_node("Relu", ["c1"], ["h"], name="relu"),
        *_positive_mean("x", "c", "c"),
        oh.make_node("If", ["c"], ["g"], then_branch=then, else_branch=els, name="if_outer"),
        oh.make_node("If", ["c"], ["bias"], then_branch=then2, else_branch=else2, name="if_initializer"),
        oh.make_node("Unsqueeze", ["bias", "axes"], ["bias4"]),
        oh.make_node("Add", ["g", "bias4"], ["y"]),
    ]
    inits = [
        ("zero", np.zeros((), np.float32)), ("one", np.ones((), np.float32)),
        ("w1", _w(rng, 4, 3, 3, 3)), ("b1", _w(rng, 4)), ("w_out", _w(rng, 4)),
        ("axes", np.array([0, 2, 3], np.int64)),
    ]
    return make_proto(nodes, [("x", [1, 3, 8, 8]), ("x_bias", [4])], [("y", [1, 4, 8, 8]), ("h", [1, 4, 8, 8])], inits)


def _conv_relu_conv(rng, out: str) -> tuple[list, list]:
    """Nodes and initializers of ``r = Relu(Conv(x))`` (8 channels), ``out = Conv(r)`` (4 channels)."""
    nodes = [
        oh.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        oh.make_node("Relu", ["a"], ["r"], name="relu_a"),
        oh.make_node("Conv", ["r", "wb", "bb"], [out], pads=[1, 1, 1, 1], name="conv_b"),
    ]
    inits = [("zero", np.zeros((), np.float32)),
             ("wa", _w(rng, 8, 3, 3, 3)), ("ba", _w(rng, 8)), ("wb", _w(rng, 4, 8, 3, 3)), ("bb", _w(rng, 4))]
    return nodes, inits


def model_if_reads_main(rng):
    """Branches read a main-graph activation whose channels pruning could cut (Conv -> Relu -> Conv)."""
    then = _graph([oh.make_node("Mul", ["r", "two"], ["t_y"])], "then", [_vi("t_y", [1, 8, 8, 8])])
    els = _graph([oh.make_node("Neg", ["r"], ["e_y"])], "else", [_vi("e_y", [1, 8, 8, 8])])
    chain, inits = _conv_relu_conv(rng, "y")
    nodes = [*chain, *_positive_mean("x", "c", "c"),
             oh.make_node("If", ["c"], ["z"], then_branch=then, else_branch=els, name="if")]
    inits.append(("two", np.full((), 2.0, np.float32)))
    return make_proto(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8]), ("z", [1, 8, 8, 8])], inits)


def model_conv_then_if(rng):
    """A prunable Conv -> Relu -> Conv chain in the main graph, its result consumed by an If."""
    then = _graph([oh.make_node("Relu", ["b"], ["t_y"])], "then", [_vi("t_y", [1, 4, 8, 8])])
    els = _graph([oh.make_node("Sigmoid", ["b"], ["e_y"])], "else", [_vi("e_y", [1, 4, 8, 8])])
    chain, inits = _conv_relu_conv(rng, "b")
    nodes = [*chain, *_positive_mean("x", "c", "c"),
             oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els, name="if")]
    return make_proto(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def model_loop(rng):
    """Loop with carried state and a scan output; the body reads outer initializers."""
    body = _graph(
        [
            oh.make_node("Identity", ["cond_in"], ["cond_out"]),
            oh.make_node("MatMul", ["h_in", "w"], ["mm"]),
            oh.make_node("Add", ["mm", "b"], ["pre"]),
            oh.make_node("Tanh", ["pre"], ["h_out"]),
            oh.make_node("Mul", ["h_out", "one"], ["h_scaled"]),
            oh.make_node("Relu", ["h_scaled"], ["scan_out"]),
        ],
        "body",
        [_vi("cond_out", [], B), _vi("h_out", [1, 16]), _vi("scan_out", [1, 16])],
        inputs=[_vi("iter", [], I64), _vi("cond_in", [], B), _vi("h_in", [1, 16])],
    )
    nodes = [
        oh.make_node("MatMul", ["x", "w_in"], ["h0"], name="embed"),
        oh.make_node("Loop", ["trips", "true", "h0"], ["h_final", "hs"], body=body, name="loop"),
        oh.make_node("MatMul", ["h_final", "w_out"], ["y"], name="head"),
    ]
    inits = [
        ("trips", np.array(3, np.int64)), ("true", np.array(True)), ("one", np.ones((), np.float32)),
        ("w_in", _w(rng, 16, 16)), ("w", _w(rng, 16, 16, scale=0.1)), ("b", _w(rng, 16)),
        ("w_out", _w(rng, 16, 8)),
    ]
    return make_proto(nodes, [("x", [1, 16])], [("y", [1, 8]), ("hs", [3, 1, 16])], inits)


def model_scan(rng):
    """Scan over a sequence with a carried state; the body's weights are outer initializers."""
    body = _graph(
        [
            oh.make_node("MatMul", ["s_in", "w"], ["sw"]),
            oh.make_node("Add", ["sw", "x_t"], ["pre"]),
            oh.make_node("Tanh", ["pre"], ["s_out"]),
            oh.make_node("Sigmoid", ["s_out"], ["y_t"]),
        ],
        "body", [_vi("s_out", [1, 16]), _vi("y_t", [1, 16])],
        inputs=[_vi("s_in", [1, 16]), _vi("x_t", [1, 16])],
    )
    nodes = [
        oh.make_node("MatMul", ["xs", "w_in"], ["proj"], name="proj"),
        oh.make_node("Scan", ["s0", "proj"], ["s_final", "ys"], body=body, num_scan_inputs=1, name="scan"),
        oh.make_node("MatMul", ["s_final", "w_out"], ["y"], name="head"),
    ]
    inits = [("s0", np.zeros((1, 16), np.float32)), ("w_in", _w(rng, 16, 16)),
             ("w", _w(rng, 16, 16, scale=0.1)), ("w_out", _w(rng, 16, 8))]
    return make_proto(nodes, [("xs", [5, 1, 16])], [("y", [1, 8]), ("ys", [5, 1, 16])], inits)


def _recurrent(rng, op: str):
    hidden, gates = 16, 4 if op == "LSTM" else 3
    nodes = [
        oh.make_node("MatMul", ["xs", "w_in"], ["proj"], name="proj"),
        oh.make_node(op, ["proj", "W", "R", "B", "", "h0"], ["Y", "Y_h"], hidden_size=hidden, name=op.lower()),
        oh.make_node("Squeeze", ["Y_h", "axes0"], ["h_last"]),
        oh.make_node("MatMul", ["h_last", "w_out"], ["y"], name="head"),
    ]
    inits = [
        ("w_in", _w(rng, 16, 16)), ("W", _w(rng, 1, gates * hidden, 16)), ("R", _w(rng, 1, gates * hidden, hidden, scale=0.1)),
        ("B", _w(rng, 1, 2 * gates * hidden, scale=0.1)), ("axes0", np.array([0], np.int64)),
        ("w_out", _w(rng, hidden, 8)),
    ]
    return make_proto(nodes, [("xs", [6, 1, 16]), ("h0", [1, 1, hidden])], [("y", [1, 8]), ("Y", [6, 1, 1, hidden])],
                      inits)


def model_lstm(rng):
    return _recurrent(rng, "LSTM")


def model_gru(rng):
    return _recurrent(rng, "GRU")


CORPUS = {
    "if_conv": model_if_conv,
    "nested_if": model_nested_if,
    "if_returns_outer": model_if_returns_outer,
    "if_reads_main": model_if_reads_main,
    "conv_then_if": model_conv_then_if,
    "loop": model_loop,
    "scan": model_scan,
    "lstm": model_lstm,
    "gru": model_gru,
}


def _feeds(proto: onnx.ModelProto, seed: int, n: int = 6) -> list[dict[str, np.ndarray]]:
    """Feeds whose sign alternates (so that both branches of every If are taken)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        feed = {}
        for vi in proto.graph.input:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            offset = (1.0 if i % 2 == 0 else -1.0) * (1.5 if i % 3 == 0 else 0.3)
            feed[vi.name] = (rng.standard_normal(shape) + offset).astype(np.float32)
        feeds.append(feed)
    return feeds


@pytest.fixture(params=sorted(CORPUS))
def case(request):
    proto = CORPUS[request.param](np.random.default_rng(7))
    onnx.checker.check_model(proto, full_check=True)
    return request.param, proto


def _branches_taken(proto, feeds) -> None:
    """The feeds take both branches of the top-level If nodes (their outputs differ by sign)."""
    conds = [n for n in proto.graph.node if n.op_type == "Greater"]
    if not conds:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(oh.make_tensor_value_info(conds[0].output[0], B, []))
    model = io.load_model(probe)
    taken = {bool(out[-1]) for out in run_model(model, feeds, optimization="disable")}
    assert taken == {True, False}


def _assert_valid(model: ir.Model) -> None:
    assert model_problems(model) == {}


def _assert_sqnr(reference: ir.Model, candidate: ir.Model, feeds, floors: tuple[float, float]) -> None:
    for level, floor in zip(("disable", "all"), floors):
        worst = float("inf")
        ref = run_model(reference, feeds, optimization=level)
        out = run_model(candidate, feeds, optimization=level)
        for j in range(len(ref[0])):
            assert all(r[j].shape == c[j].shape for r, c in zip(ref, out))
            pooled = sqnr_db(np.concatenate([r[j].ravel() for r in ref]), np.concatenate([c[j].ravel() for c in out]))
            worst = min(worst, pooled)
        assert worst >= floor, f"[optimization={level}] SQNR {worst:.1f} dB below the floor {floor} dB"


def test_corpus_takes_both_branches(case):
    name, proto = case
    _branches_taken(proto, _feeds(proto, 0))


def test_cleanup_is_exact_and_valid(case):
    name, proto = case
    reference = io.load_model(proto)
    model = io.load_model(proto)
    result = CleanupPass()(model)
    assert result.stats["rolled_back"] == {}
    _assert_valid(model)
    assert_equivalent(reference, model, _feeds(proto, 1), atol=1e-5, rtol=1e-5)
    again = io.load_model(io.model_to_bytes(model))  # what was written reads back
    assert_equivalent(reference, again, _feeds(proto, 2), atol=1e-5, rtol=1e-5)


def test_cleanup_simplifies_inside_subgraphs(rng):
    """BatchNorm fuses into the Conv of an If branch and ``* 1`` disappears from the other one."""
    model = io.load_model(model_if_conv(rng))
    CleanupPass()(model)
    hist = op_histogram(model)
    assert "BatchNormalization" not in hist and "Mul" not in hist
    assert hist["Conv"] == 3 and hist["If"] == 1


def test_cleanup_keeps_branches_returning_outer_values(rng):
    """The silero-vad shape: no-ops at the end of branches that return a main-graph value."""
    proto = model_if_returns_outer(rng)
    reference = io.load_model(proto)
    model = io.load_model(proto)
    CleanupPass()(model)
    _assert_valid(model)
    for node in model.graph:
        if node.op_type == "If":
            for attr in ("then_branch", "else_branch"):
                branch = node.attributes[attr].value
                for out in branch.outputs:  # computed in the branch or a constant of its own
                    assert (out.producer() is not None and out.producer().graph is branch) or (
                        branch.initializers.get(out.name) is out)
    assert_equivalent(reference, model, _feeds(proto, 3))


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_quantize_keeps_control_flow_valid(case, mode):
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    name, proto = case
    reference = io.load_model(proto)
    config = QuantizeConfig(mode=mode, bits=8, block_size=16) if mode == "weight-only" else QuantizeConfig(mode=mode)
    calib = _feeds(proto, 4, n=8) if mode == "static" else None
    quantized, report = quantize(proto, calib, config)
    _assert_valid(quantized)
    _assert_sqnr(reference, quantized, _feeds(proto, 5), SQNR_FLOOR[f"quantize-{mode}"])


def test_cluster_keeps_control_flow_valid(case):
    from onnxcomp.cluster.api import cluster
    from onnxcomp.cluster.passes import ClusterConfig

    name, proto = case
    reference = io.load_model(proto)
    clustered, report = cluster(proto, ClusterConfig(bits=4, min_elements=16))
    _assert_valid(clustered)
    _assert_sqnr(reference, clustered, _feeds(proto, 6), SQNR_FLOOR["cluster"])


def test_prune_keeps_control_flow_valid(case):
    from onnxcomp.prune.api import prune
    from onnxcomp.prune.config import PruneConfig

    name, proto = case
    reference = io.load_model(proto)
    pruned, report = prune(proto, PruneConfig(criterion="l1", ratio=0.25))
    _assert_valid(pruned)
    _assert_sqnr(reference, pruned, _feeds(proto, 7), SQNR_FLOOR["prune"])


def test_cleanup_undoes_a_step_that_breaks_the_model(rng, monkeypatch):
    """A rewrite whose result fails the checks is undone alone; the rest of the cleanup stays."""
    from onnxcomp.passes import cleanup

    original = cleanup._IdentityElimination.call

    def breaking(self, model):
        result = original(self, model)
        _read_the_condition(model)
        return result

    monkeypatch.setattr(cleanup._IdentityElimination, "call", breaking)
    proto = model_if_conv(rng)
    reference = io.load_model(proto)
    model = io.load_model(proto)
    stats = CleanupPass()(model).stats
    assert set(stats["rolled_back"]) == {"remove identities"}
    assert "onnx" in stats["rolled_back"]["remove identities"]  # names the check that failed
    assert stats["batchnorm_fused"] == 1  # the other steps still ran
    _assert_valid(model)
    assert_equivalent(reference, model, _feeds(proto, 8))


def test_cleanup_undoes_a_step_that_raises(rng, monkeypatch):
    from onnxcomp.passes import cleanup

    def failing(self, model):
        raise RuntimeError("rule failed half-way")

    monkeypatch.setattr(cleanup._FoldConstants, "call", failing)
    proto = model_nested_if(rng)
    reference = io.load_model(proto)
    model = io.load_model(proto)
    stats = CleanupPass()(model).stats
    assert stats["rolled_back"] == {"fold constants": "raised RuntimeError: rule failed half-way"}
    assert stats["ops_removed"].get("Add") == 1  # ``+ 0`` in the outer branch still went
    _assert_valid(model)
    assert_equivalent(reference, model, _feeds(proto, 9))


def _read_the_condition(model: ir.Model) -> None:
    """Break the model: the head Conv reads the If's bool condition (a type error)."""
    head = next(n for n in model.graph if n.name == "head")
    cond = next(n for n in model.graph if n.op_type == "If").inputs[0]
    head.replace_input_with(0, cond)


class _Rewrite(CompressionPass[PassConfig]):
    """A test pass applying ``fn`` to the model, its output judged by the checker and onnxruntime."""

    output_checks = ("checker", "onnxruntime")

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def apply(self, model):
        self.fn(model)
        return True, {}


def _branch(model: ir.Model, node_name: str, attr: str) -> ir.Graph:
    node = next(n for n in model.graph.all_nodes() if n.name == node_name)
    return node.attributes[attr].value


def test_pass_output_returning_outer_value_is_repaired(rng):
    """A pass that makes a branch return a main-graph value gets an Identity put back."""
    then = _graph([oh.make_node("Identity", ["r"], ["t_y"])], "then", [_vi("t_y", [2, 3])])
    els = _graph([oh.make_node("Neg", ["r"], ["e_y"])], "else", [_vi("e_y", [2, 3])])
    proto = make_proto(
        [oh.make_node("Relu", ["x"], ["r"]), *_positive_mean("x", "c", "c"),
         oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els, name="if")],
        [("x", [2, 3])], [("y", [2, 3])], [("zero", np.zeros((), np.float32))],
    )
    reference = io.load_model(proto)
    model = io.load_model(proto)

    def drop_identity(m):
        branch = _branch(m, "if", "then_branch")
        node = next(iter(branch))
        branch.outputs[0] = node.inputs[0]  # returns ``r`` of the main graph directly
        branch.remove(node, safe=True)

    result = _Rewrite(drop_identity)(model)
    assert result.stats["subgraph_outputs_fixed"] == 1
    _assert_valid(model)
    assert_equivalent(reference, model, _feeds(proto, 10))


def test_pass_output_check_refuses_an_invalid_model(rng):
    model = io.load_model(model_if_conv(rng))
    with pytest.raises(InvalidModelError, match=r"_Rewrite produced an invalid model \(\w+\)"):
        _Rewrite(_read_the_condition)(model)


def test_pass_output_check_tolerates_what_the_input_already_failed(rng):
    """An input onnxruntime cannot load (an op of an unknown domain) is not the pass's fault."""
    proto = make_proto(
        [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Frobnicate", ["r"], ["y"], domain="example.custom")],
        [("x", [2, 3])], [("y", [2, 3])],
    )
    proto.opset_import.append(oh.make_opsetid("example.custom", 1))
    model = io.load_model(proto)
    assert "onnxruntime" in model_problems(model, ("onnxruntime",))

    def rename(m):
        next(iter(m.graph)).name = "relu_renamed"

    assert _Rewrite(rename)(model).modified


def test_fix_subgraph_outputs_leaves_valid_graphs_alone(case):
    name, proto = case
    model = io.load_model(proto)
    assert fix_subgraph_outputs(model) == 0


def test_new_names_avoid_subgraph_names(rng):
    """A new value may not take the name of a subgraph's input (Loop body) or local value."""
    model = io.load_model(model_loop(rng))
    taken = all_value_names(model.graph)
    assert {"iter", "cond_in", "h_in", "h_scaled"} <= taken
    assert unique_name(model.graph, "h_in", taken) == "h_in_1"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxcomp", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", ["compress-cleanup", "cluster", "quantize-dynamic"])
def test_cli_writes_loadable_control_flow_models(tmp_path, rng, command):
    proto = model_if_returns_outer(rng)
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    out = tmp_path / "out.onnx"
    if command == "compress-cleanup":
        recipe = tmp_path / "cleanup.toml"
        recipe.write_text('name = "cleanup-only"\n[cleanup]\n')
        proc = _cli("compress", src, "-o", out, "--recipe", recipe, "--quiet")
    elif command == "cluster":
        proc = _cli("cluster", src, "-o", out, "--min-elements", 16, "--quiet")
    else:
        proc = _cli("quantize", src, "-o", out, "--mode", "dynamic", "--quiet")
    assert proc.returncode == 0, proc.stderr
    written = io.load_model(out)
    _assert_valid(written)
    feeds = _feeds(proto, 11)
    if command == "compress-cleanup":
        assert_equivalent(io.load_model(proto), written, feeds)
    else:
        _assert_sqnr(io.load_model(proto), written, feeds, SQNR_FLOOR[command])


def test_static_quantizes_inside_if_branches(rng):
    """Each branch is calibrated on the feeds that take it and gets its own Q/DQ: the Convs of
    both branches run as int8 kernels in onnxruntime."""
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    proto = model_if_conv(rng)
    quantized, report = quantize(proto, _feeds(proto, 12, n=8), QuantizeConfig())
    branches = report["branches"]
    assert branches["if/then_branch"]["feeds"] == 4 and branches["if/else_branch"]["feeds"] == 4
    assert branches["if/then_branch"]["int8_nodes"] >= 1 and branches["if/else_branch"]["int8_nodes"] >= 1
    assert report["onnxruntime"]["int8_by_op"].get("QLinearConv", 0) >= 2
    _assert_valid(quantized)
    _assert_sqnr(io.load_model(proto), quantized, _feeds(proto, 13), SQNR_FLOOR["quantize-static"])


def test_static_branch_no_feed_takes_stays_float(rng):
    """Nested If: the outer branch's own If is handled recursively; a branch that no calibration
    feed reaches computes in float on int8 weights (weight-only) and says so."""
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    proto = model_nested_if(rng)
    feed_rng = np.random.default_rng(14)  # positive mean, max below 2: the inner else branch only
    calib = [f for f in _feeds(proto, 14, n=8) if float(f["x"].mean()) <= 0]
    calib += [{"x": feed_rng.uniform(0.0, 1.0, (1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    quantized, report = quantize(proto, calib, QuantizeConfig())
    outer = report["branches"]["outer_if/then_branch"]
    inner = outer.get("branches", {})
    untaken = inner["inner_if/then_branch"]  # weight-only int8: its weights need no calibration
    assert untaken["not_calibrated"] == "no calibration feed takes this branch"
    assert untaken["weight_only_int8"]["weights"] == 1
    assert report["branches"]["outer_if/else_branch"]["int8_nodes"] >= 1
    _assert_valid(quantized)
    _assert_sqnr(io.load_model(proto), quantized, _feeds(proto, 15), SQNR_FLOOR["quantize-static"])


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_lstm_weights_int8(rng, per_channel):
    """LSTM becomes onnxruntime's DynamicQuantizeLSTM (int8 W and R, transposed); the weights
    dequantized into a float LSTM match the kernel's layout, and the kernel stays in budget."""
    from onnxcomp.quant.recurrent import RecurrentInt8Config, RecurrentInt8Pass, quantize_rows_int8

    proto = model_lstm(rng)
    reference = io.load_model(proto)
    model = io.load_model(proto)
    stats = RecurrentInt8Pass(RecurrentInt8Config(per_channel=per_channel))(model).stats
    assert stats["lstm_int8"] == ["lstm"] and stats["recurrent_kept_float"] == {}
    node = next(n for n in model.graph if n.op_type == "DynamicQuantizeLSTM")
    assert node.domain == "com.microsoft" and node.inputs[1].dtype == ir.DataType.INT8
    # the stored int8 weights, transposed back and scaled, are the float weights to int8 precision
    w = next(v for v in reference.graph.initializers.values() if v.name == "W").const_value.numpy()
    q, scale = node.inputs[1].const_value.numpy().transpose(0, 2, 1), node.inputs[8].const_value.numpy()
    restored = q * (scale[..., None] if per_channel else scale[:, None, None])
    assert np.abs(restored - w).max() <= np.abs(w).max() / 127 * 0.5 + 1e-7
    assert np.array_equal(quantize_rows_int8(w, per_channel)[0], q)
    _assert_valid(model)
    # one scale per direction: measured 37.4 dB; per gate row onnxruntime's kernel loses more (16.2 dB)
    floor = 12.0 if per_channel else 30.0
    _assert_sqnr(reference, model, _feeds(proto, 16), (floor, floor))


def test_dynamic_mode_converts_lstm_and_reports_gru_float_compute(rng):
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    lstm, report = quantize(model_lstm(rng), None, QuantizeConfig(mode="dynamic"))
    assert report["lstm_int8"] == ["lstm"]
    assert report["onnxruntime"]["int8_by_op"]["DynamicQuantizeLSTM"] == 1
    proto = model_gru(rng)
    gru, report = quantize(proto, None, QuantizeConfig(mode="dynamic"))
    # no int8 GRU kernel: weight-only int8 (W and R dequantized once), the GRU computes in float
    assert report["recurrent_weight_only"] == ["gru"] and report["recurrent_kept_float"] == {}
    assert "no int8 kernel for GRU" in report["recurrent_float_compute"]["gru"]
    node = next(n for n in gru.graph if n.op_type == "GRU")
    assert all(node.inputs[i].producer().op_type == "DequantizeLinear" for i in (1, 2))
    _assert_valid(gru)
    # measured 31.0 dB, with the two MatMuls around the GRU dynamically quantized
    _assert_sqnr(io.load_model(proto), gru, _feeds(proto, 18), (25.0, 25.0))


def test_cleanup_folds_large_recurrent_weights(rng):
    """An LSTM weight computed from a constant (as exporters write it: Unsqueeze of a 2-D matrix)
    is folded whatever its size, so that dynamic quantization finds a constant W."""
    hidden, inp = 32, 80  # W has 4 * 32 * 80 = 10240 elements, above the folding size limit
    proto = make_proto(
        [oh.make_node("Unsqueeze", ["W2", "axes0"], ["W"]),
         oh.make_node("LSTM", ["xs", "W", "R"], ["Y"], hidden_size=hidden, name="lstm")],
        [("xs", [3, 1, inp])], [("Y", [3, 1, 1, hidden])],
        [("W2", _w(rng, 4 * hidden, inp, scale=0.1)), ("R", _w(rng, 1, 4 * hidden, hidden, scale=0.1)),
         ("axes0", np.array([0], np.int64))],
    )
    reference = io.load_model(proto)
    model = io.load_model(proto)
    CleanupPass()(model)
    lstm = next(n for n in model.graph if n.op_type == "LSTM")
    assert lstm.inputs[1].const_value is not None and "Unsqueeze" not in op_histogram(model)
    assert_equivalent(reference, model, _feeds(proto, 17))


def _loop_matmul_relu(rng):
    """A Loop whose body is MatMul -> Relu on the carried state (weights an outer initializer):
    onnxruntime fuses that body's Q/DQ into MatMulIntegerToFloat."""
    body = _graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("MatMul", ["h_in", "w"], ["mm"]),
         oh.make_node("Relu", ["mm"], ["h_out"]),
         oh.make_node("Sigmoid", ["h_out"], ["scan_out"])],
        "body", [_vi("cond_out", [], B), _vi("h_out", [1, 16]), _vi("scan_out", [1, 16])],
        inputs=[_vi("iter", [], I64), _vi("cond_in", [], B), _vi("h_in", [1, 16])],
    )
    nodes = [oh.make_node("Loop", ["trips", "true", "x"], ["h_final", "hs"], body=body, name="loop")]
    inits = [("trips", np.array(3, np.int64)), ("true", np.array(True)), ("w", _w(rng, 16, 16, scale=0.3))]
    return make_proto(nodes, [("x", [1, 16])], [("h_final", [1, 16]), ("hs", [3, 1, 16])], inits)


def _scan_reverse(rng):
    """A Scan over axis 1, backwards, whose body is MatMul -> Relu of the state plus the slice."""
    body = _graph(
        [oh.make_node("MatMul", ["s_in", "w"], ["sw"]),
         oh.make_node("Relu", ["sw"], ["r"]),
         oh.make_node("Sub", ["r", "x_t"], ["s_out"]),
         oh.make_node("Identity", ["s_out"], ["y_t"])],
        "body", [_vi("s_out", [1, 16]), _vi("y_t", [1, 16])],
        inputs=[_vi("s_in", [1, 16]), _vi("x_t", [1, 16])],
    )
    nodes = [oh.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], body=body, num_scan_inputs=1,
                          scan_input_axes=[1], scan_input_directions=[1], name="scan")]
    inits = [("s0", np.full((1, 16), 0.5, np.float32)), ("w", _w(rng, 16, 16, scale=0.3))]
    return make_proto(nodes, [("xs", [1, 5, 16])], [("s_final", [1, 16]), ("ys", [5, 1, 16])], inits)


@pytest.mark.parametrize("make", [_loop_matmul_relu, _scan_reverse])
def test_emulated_iterations_reproduce_the_op(rng, make):
    """Loop/Scan emulation (the float body run step by step, state fed back) ends on exactly the
    final state onnxruntime computes, and records one body feed per iteration."""
    from onnxcomp import bodies

    proto = make(rng)
    model = io.load_model(proto)
    node = next(n for n in model.graph if n.op_type in ("Loop", "Scan"))
    kind = bodies.body_kind(node, model.opset_imports[""])
    standalone = bodies.body_as_model(model, 0, "body")
    feeds = _feeds(proto, 21, n=2)
    body_feeds = bodies.body_feeds(model, node, kind, "body", standalone, [], feeds)
    assert len(body_feeds) == 2 * (3 if node.op_type == "Loop" else 5)
    state = [n for n in body_feeds[0] if n in ("h_in", "s_in")][0]
    last = body_feeds[len(body_feeds) // 2 - 1]  # the first feed's last iteration
    final = run_model(standalone, [last], optimization="disable")[0]
    expected = run_model(model, feeds[:1], optimization="disable")[0][0]
    np.testing.assert_allclose(final[1 if node.op_type == "Loop" else 0], expected, rtol=1e-6, atol=1e-6)
    if node.op_type == "Scan":  # backwards over axis 1: the first step reads the last slice
        np.testing.assert_array_equal(body_feeds[0]["x_t"], feeds[0]["xs"][:, 4])
        np.testing.assert_array_equal(body_feeds[0][state], np.full((1, 16), 0.5, np.float32))


def test_static_quantizes_inside_loop_bodies(rng):
    """The body is calibrated on its per-iteration inputs and runs as an int8 kernel."""
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    proto = _loop_matmul_relu(rng)
    quantized, report = quantize(proto, _feeds(proto, 22, n=8), QuantizeConfig())
    assert report["branches"]["loop/body"] == {"feeds": 24, "int8_nodes": 1}
    assert report["onnxruntime"]["int8_by_op"] == {"MatMulIntegerToFloat": 1}
    _assert_valid(quantized)
    _assert_sqnr(io.load_model(proto), quantized, _feeds(proto, 23), SQNR_FLOOR["quantize-static"])


def test_static_leaves_loop_body_float_where_onnxruntime_would_not_fuse(rng):
    """Inside a Scan body (onnxruntime 1.2x-1.3x) onnxruntime fuses no Q/DQ at all: a quantized
    body would run DequantizeLinear -> float compute on every iteration, so it is put back as it
    was, and the report says why. Inside a Loop body onnxruntime fuses MatMul + Add into a Gemm
    before its Q/DQ fusions; with the bias stored int32 behind a DequantizeLinear
    (QuantRule.bias_add_fusion) that Gemm runs as an int8 QGemm, so the body stays int8."""
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    proto = model_loop(rng)
    quantized, report = quantize(proto, _feeds(proto, 24, n=8), QuantizeConfig())
    assert report["branches"]["loop/body"]["int8_nodes"] == 1
    assert report["onnxruntime"]["int8_by_op"].get("QGemm") == 1 and report["onnxruntime"]["float_by_op"] == {}
    _assert_valid(quantized)
    _assert_sqnr(io.load_model(proto), quantized, _feeds(proto, 25), SQNR_FLOOR["quantize-static"])
    for make, where in ((model_scan, "scan/body"), (_scan_reverse, "scan/body")):
        proto = make(rng)
        quantized, report = quantize(proto, _feeds(proto, 24, n=8), QuantizeConfig())
        assert "does not fuse its Q/DQ" in report["branches"][where]
        body = next(n for n in quantized.graph if n.op_type in ("Loop", "Scan")).attributes["body"].value
        assert {n.op_type for n in body} & {"QuantizeLinear", "DequantizeLinear"} == set()
        _assert_valid(quantized)
        _assert_sqnr(io.load_model(proto), quantized, _feeds(proto, 25), SQNR_FLOOR["quantize-static"])
