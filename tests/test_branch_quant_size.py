"""Quantization inside If branches leaves no float weight behind, and the CLI counts what it did there."""

from __future__ import annotations

import numpy as np
from test_control_flow import _feeds, model_if_conv

from onnxcomp import io
from onnxcomp.passes.base import model_problems
from onnxcomp.quant.api import quantize
from onnxcomp.quant.cli import branch_int8_nodes, _compressed
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.testing import run_model, sqnr_db


def test_branch_quantization_drops_the_outer_float_weights_it_replaced():
    proto = model_if_conv(np.random.default_rng(7))  # both branch Convs read main-graph weights
    reference = io.load_model(proto)
    quantized, report = quantize(proto, _feeds(proto, 4, n=8), QuantizeConfig())
    assert model_problems(quantized) == {}
    graph = quantized.graph
    read = {id(v) for n in graph.all_nodes() for v in n.inputs if v is not None}
    unread = [name for name, v in graph.initializers.items() if id(v) not in read]
    assert unread == []  # before the fix: the float w1 and w2 stayed in the file beside their int8 copies
    assert "w1" not in graph.initializers and "w2" not in graph.initializers
    assert branch_int8_nodes(report["branches"]) == 2
    feeds = _feeds(proto, 5)
    ref = np.concatenate([o[0].ravel() for o in run_model(reference, feeds, optimization="disable")])
    out = np.concatenate([o[0].ravel() for o in run_model(quantized, feeds, optimization="disable")])
    assert sqnr_db(ref, out) > 25.0


def test_cli_counts_int8_nodes_inside_branches():
    report = {"int8_nodes": 0, "branches": {
        "if/then_branch": {"feeds": 3, "int8_nodes": 6, "branches": {"inner/else_branch": {"feeds": 1, "int8_nodes": 2}}},
        "if/else_branch": "left float: no calibration feed takes this branch",
    }}
    assert _compressed(report, "static") == (8, "int8 nodes", "")
    count, _, why = _compressed({"int8_nodes": 0}, "static")
    assert count == 0 and "main graph" in why
    # dynamic mode: LSTMs turned into DynamicQuantizeLSTM count too (silero-vad has nothing else)
    assert _compressed({"nodes_quantized": 0, "lstm_int8": ["If_0/then_branch/lstm", "If_0/else_branch/lstm"]},
                       "dynamic")[0] == 2
