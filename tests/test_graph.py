"""The working copy every pass starts from: Constant nodes holding weights become initializers.

Paddle and tf2onnx exports (PP-OCR among them) keep their weights in ``Constant`` nodes. These
tests turn the initializers of small models into Constant nodes and check that every pass sees
the same weights as on the original: the lifting is exact (onnxruntime, optimizations off and on),
works inside subgraphs without breaking scoping, and prune/quantize/cluster find the same work.
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
from conftest import MODELS, file_digest, make_proto

from onnxcomp import io
from onnxcomp.cluster.api import cluster
from onnxcomp.cluster.passes import ClusterConfig
from onnxcomp.data import Dataset
from onnxcomp.graph import lift_constants, working_copy
from onnxcomp.prune.api import prune
from onnxcomp.prune.config import PruneConfig
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.testing import assert_equivalent


def constants_as_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose main-graph initializers are Constant nodes (as paddle2onnx writes)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    consts = [oh.make_node("Constant", [], [t.name], name=f"const/{t.name}", value=t) for t in graph.initializer]
    nodes = consts + list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _op_count(model, op_type: str) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == op_type)


def _subgraph_model(rng) -> onnx.ModelProto:
    """Conv with a Constant weight, then an If whose branches hold Constant weights of their own.

    The then-branch also reads a main-graph Constant (outer scope); one Constant is a graph output.
    """
    w = onh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    m_then = onh.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "m_then")
    m_else = onh.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "m_else")
    shift = onh.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "shift")
    out_const = onh.from_array(np.arange(6, dtype=np.float32), "k")

    def branch(name, tensor, use_outer):
        nodes = [
            oh.make_node("Constant", [], [tensor.name], name=f"{name}/const", value=tensor),
            oh.make_node("Mul", ["y", tensor.name], [f"{name}_m"], name=f"{name}/mul"),
        ]
        last = f"{name}_m"
        if use_outer:
            nodes.append(oh.make_node("Add", [last, "shift"], [f"{name}_a"], name=f"{name}/add"))
            last = f"{name}_a"
        nodes.append(oh.make_node("Identity", [last], [f"{name}_out"], name=f"{name}/id"))
        return oh.make_graph(nodes, name, [], [oh.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])])

    nodes = [
        oh.make_node("Constant", [], ["w"], name="const_w", value=w),
        oh.make_node("Constant", [], ["shift"], name="const_shift", value=shift),
        oh.make_node("Constant", [], ["k"], name="const_k", value=out_const),
        oh.make_node("Constant", [], ["axes"], name="const_axes", value_ints=[1, 2, 3]),
        oh.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        oh.make_node("ReduceSum", ["x", "axes"], ["s"], name="sum", keepdims=0),
        oh.make_node("Greater", ["s", "zero"], ["c0"], name="gt"),
        oh.make_node("Squeeze", ["c0"], ["c"], name="squeeze"),
        oh.make_node("If", ["c"], ["z"], name="if",
                     then_branch=branch("then", m_then, True), else_branch=branch("else", m_else, False)),
    ]
    return make_proto(
        nodes, [("x", [1, 3, 8, 8])], [("z", [1, 4, 8, 8]), ("k", [6])],
        [("zero", np.zeros(1, np.float32))],
    )


def test_working_copy_lifts_constants_exactly_inside_subgraphs_too(rng):
    proto = _subgraph_model(rng)
    onnx.checker.check_model(proto)
    model = io.load_model(proto)
    work = working_copy(model, 1, allow_upgrade=False, notes=[])
    graph = work.graph
    assert {"w", "shift"} <= set(graph.initializers)
    then_graph = next(n for n in graph if n.op_type == "If").attributes["then_branch"].as_graph()
    else_graph = next(n for n in graph if n.op_type == "If").attributes["else_branch"].as_graph()
    # each branch's weight is an initializer of its own branch, not of the main graph
    assert set(then_graph.initializers) == {"m_then"} and set(else_graph.initializers) == {"m_else"}
    assert "m_then" not in graph.initializers
    # left as nodes: the graph output 'k' and the value_ints Constant (not a tensor attribute)
    left = sorted(n.name for n in graph.all_nodes() if n.op_type == "Constant")
    assert left == ["const_axes", "const_k"]
    assert graph.node("conv").inputs[1].const_value is not None
    # the input model is untouched
    assert _op_count(model, "Constant") == 6
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32) * s} for s in (1.0, -1.0)]
    assert_equivalent(model, work, feeds, atol=1e-5)
    # and it survives a save/load round trip (onnx checker, onnxruntime)
    again = io.load_model(io.model_to_bytes(work))
    assert_equivalent(model, again, feeds, atol=1e-5)


def test_old_ir_versions_keep_constant_nodes(rng):
    """Before IR version 4 an initializer must also be a graph input: nothing is lifted."""
    proto = _subgraph_model(rng)
    proto.ir_version = 3
    model = io.load_model(proto, check=False)
    assert lift_constants(model) == 0
    assert _op_count(model, "Constant") == 6


@pytest.fixture(scope="module")
def cnn_pair():
    proto = onnx.load(str(MODELS / "digits_cnn.onnx"))
    return io.load_model(proto), io.load_model(constants_as_nodes(proto))


def test_constant_weights_are_weights_for_prune(cnn_pair):
    plain, consts = cnn_pair
    assert not consts.graph.initializers and _op_count(consts, "Constant") > 8
    config = PruneConfig(criterion="l1", ratio=0.3)
    a, ra = prune(plain, config)
    b, rb = prune(consts, config)
    assert len(rb["groups"]) == len(ra["groups"]) > 0
    assert rb["channels_removed"] == ra["channels_removed"] > 0
    assert rb["before"]["parameters"] == ra["before"]["parameters"]
    feeds = list(Dataset(MODELS / "digits_eval.npz", a, limit=4))
    assert_equivalent(a, b, feeds, atol=1e-5)


def test_constant_weights_are_weights_for_quantize_and_cluster(cnn_pair):
    plain, consts = cnn_pair
    calib = MODELS / "digits_calib.npz"
    config = QuantizeConfig(calibration="minmax")
    qa, ra = quantize(plain, Dataset(calib, plain, limit=16), config)
    qb, rb = quantize(consts, Dataset(calib, consts, limit=16), config)
    assert rb["onnxruntime"]["int8_kernels"] == ra["onnxruntime"]["int8_kernels"]
    assert _op_count(qb, "QuantizeLinear") == _op_count(qa, "QuantizeLinear") > 0
    ca, sa = cluster(plain, ClusterConfig(bits=4, format="float"), cleanup=False)
    cb, sb = cluster(consts, ClusterConfig(bits=4, format="float"), cleanup=False)
    assert sorted(sb["tensors"]) == sorted(sa["tensors"]) != []


def test_prune_cli_without_groups_writes_the_model_and_says_why(tmp_path, rng):
    """No prunable channels (no weights at all): as quantize and cluster (twelfth session), the
    model is written unchanged, exit 0 (3 under --strict), and the check says why; no traceback."""
    src = tmp_path / "relu.onnx"
    io.save_model(io.load_model(make_proto([oh.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])), src)
    digest = file_digest(src)
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", "prune", str(src), "-o", str(out), "--strict"],
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "nothing was compressed (0 channels removed): the model has no prunable channel group" in " ".join(proc.stdout.split())
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    assert out.exists() and file_digest(src) == digest


def test_prune_cli_on_constant_weights_matches_the_api(tmp_path, cnn_pair):
    """The CLI route (no cleanup stage) finds the groups the API finds on the initializer form."""
    plain, consts = cnn_pair
    src = tmp_path / "consts.onnx"
    io.save_model(consts, src)
    out = tmp_path / "pruned.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", "prune", str(src), "-o", str(out), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    _, api = prune(plain, PruneConfig())
    assert len(report["groups"]) == len(api["groups"]) > 0
    assert report["channels_removed"] == api["channels_removed"] > 0


def test_report_counts_constant_node_weights_as_parameters(cnn_pair):
    """compress's before/after facts: a paddle2onnx-style input does not start from 0 parameters."""
    from onnxcomp.compress import model_facts

    plain, consts = cnn_pair
    a, b = model_facts(plain), model_facts(consts)
    assert b["parameters"] == a["parameters"] > 0
    assert b["parameter_bytes"] == a["parameter_bytes"]


def test_inspect_and_quantize_count_constant_node_weights(cnn_pair, tmp_path, capsys):
    from onnxcomp.cli import main
    from onnxcomp.graph import parameter_nbytes
    from onnxcomp.summary import summarize_model

    plain, consts = cnn_pair
    assert parameter_nbytes(consts) == parameter_nbytes(plain) > 0
    a, b = summarize_model(plain), summarize_model(consts)
    assert b["parameters"] == a["parameters"] and b["parameter_bytes"] == a["parameter_bytes"]
    src = tmp_path / "consts.onnx"
    io.save_model(consts, src)
    argv = ["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calibration", str(MODELS / "digits_calib.npz"),
            "--max-samples", "8", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input"]["parameter_bytes"] == parameter_nbytes(plain)
    assert 0 < report["output"]["parameter_bytes"] < report["input"]["parameter_bytes"]
