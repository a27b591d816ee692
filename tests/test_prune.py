"""Structured pruning: exact folding of zero channels (property tests), constant channels, criteria."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import MODELS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_channel_analysis import _BLOCKS, Builder, _random_chain

from onnxcomp import io
from onnxcomp.analysis.channels import analyze_channels
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError
from onnxcomp.measure.fidelity import compare_models
from onnxcomp.prune.api import prune
from onnxcomp.prune.config import PruneConfig
from onnxcomp.runtime import create_session
from onnxcomp.testing import assert_equivalent


def _zero_channels(model: ir.Model, group, channels) -> None:
    """Make ``channels`` of ``group`` exactly zero at their source (weights, biases, BN shift)."""
    def zero(value, axis, idx):
        arr = value.const_value.numpy().copy()
        index = [slice(None)] * arr.ndim
        index[axis] = idx
        arr[tuple(index)] = 0
        value.const_value = ir.tensor(arr, name=value.name)

    for p in group.producers:
        zero(p.value, p.axis, p.indices(channels))
        if p.bias is not None:
            zero(p.bias, p.bias_axis, p.bias_indices(channels))
    for m in group.params:
        if (m.node.op_type == "BatchNormalization" and m.input_index in (2, 3)) or m.node.op_type in ("Add", "Sub"):
            zero(m.value, m.axis, m.indices(channels))


def _feeds(model, rng, n=2):
    feeds = []
    for _ in range(n):
        feed = {}
        for v in model.graph.inputs:
            shape = [d if isinstance(d, int) else 2 for d in v.shape]
            feed[v.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def _out_channels(model: ir.Model) -> dict[str, int]:
    return {n.name: n.inputs[1].const_value.shape[0] for n in model.graph if n.op_type == "Conv"}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(_BLOCKS), min_size=1, max_size=5),
    widths=st.lists(st.integers(2, 5), min_size=5, max_size=5),
    seed=st.integers(0, 1000),
    pick=st.integers(0, 1000),
)
def test_zero_channels_fold_exactly(blocks, widths, seed, pick):
    model = _random_chain(blocks, widths, seed)
    analysis = analyze_channels(model)
    groups = [g for g in analysis.prunable if g.producers and g.size >= 2 and not any(
        e.input_index is None and e.attribute is None for e in g.shape_edits)]
    if not groups:
        return
    group = groups[pick % len(groups)]
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, group.size))
    channels = np.sort(rng.choice(group.size, size=count, replace=False))
    _zero_channels(model, group, channels)
    widths_before = {p.node.name: p.value.const_value.shape[p.axis] for p in group.producers}
    feeds = _feeds(model, rng)
    pruned, report = prune(model, PruneConfig(criterion="zeros"), calibration=feeds)
    assert_equivalent(model, pruned, feeds, atol=1e-5, rtol=1e-5)
    if group.params and any(m.node.op_type == "Concat" for m in group.params):
        return  # a constant Concat segment keeps the channel non-zero: kept back or folded, still exact
    assert report["kept_back"] == {}, report["kept_back"]
    assert report["channels_removed"] == count
    drops: dict[str, int] = {}
    for p in group.producers:  # grouped convs in lock-step list a producer once per group
        drops[p.node.name] = drops.get(p.node.name, 0) + count * p.block
    for p in group.producers:
        node = next(n for n in pruned.graph if n.name == p.node.name)
        assert node.inputs[1].const_value.shape[p.axis] == widths_before[p.node.name] - drops[p.node.name]
    assert_equivalent(model, pruned, feeds, atol=1e-5, rtol=1e-5)


def _mlp_model(seed=0, d=6, h=10):
    b = Builder(seed)
    x = b.op("MatMul", ["x", b.weight("w1", (d, h))], "fc1")
    x = b.op("Add", [x, b.weight("b1", (h,))], "fc1_bias")
    half = b.op("Mul", [x, b.const("half", np.float32(0.5))], "gelu_half")
    erf = b.op("Erf", [b.op("Div", [x, b.const("sqrt2", np.float32(np.sqrt(2)))], "gelu_div")], "gelu_erf")
    x = b.op("Mul", [half, b.op("Add", [erf, b.const("one", np.float32(1))], "gelu_one")], "gelu")
    x = b.op("MatMul", [x, b.weight("w2", (h, d))], "fc2")
    b.op("Add", [x, b.weight("b2", (d,))], "y")
    return b.model([("x", [3, d])], [("y", None)])


def test_transformer_mlp_zero_and_constant_hidden_units():
    model = _mlp_model()
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    w1[:, [2, 7]] = 0.0  # hidden units 2 and 7 become constants GELU(b1[c]) != 0
    model.graph.initializers["w1"].const_value = ir.tensor(w1, name="w1")
    feeds = _feeds(model, np.random.default_rng(1))
    pruned, report = prune(model, PruneConfig(criterion="zeros"), calibration=feeds)
    assert report["channels_removed"] == 2
    assert report["bias_folds"] == ["fc2"], "the constants moved into fc2's output"
    assert pruned.graph.initializers["w2"].const_value.shape == (8, 6)
    assert_equivalent(model, pruned, feeds, atol=1e-5, rtol=1e-5)


def _padded_conv_model(seed=0):
    b = Builder(seed)
    x = b.conv("x", 3, 6, "c1")
    x = b.op("Relu", [x], "r1")
    b.conv(x, 6, 4, "c2")  # 3x3, pads 1: zero padding at the border
    return b.model([("x", [1, 3, 6, 6])], [("c2", None)])


def test_constant_channel_into_padded_conv_kept_or_folded_with_border_error():
    model = _padded_conv_model()
    w = model.graph.initializers["c1.w"].const_value.numpy().copy()
    w[1] = 0.0
    model.graph.initializers["c1.w"].const_value = ir.tensor(w, name="c1.w")
    bias = model.graph.initializers["c1.b"].const_value.numpy().copy()
    bias[1] = 0.75  # channel 1 is relu(0.75) = 0.75 everywhere
    model.graph.initializers["c1.b"].const_value = ir.tensor(bias, name="c1.b")
    feeds = _feeds(model, np.random.default_rng(2))
    kept, report = prune(model, PruneConfig(criterion="zeros"), calibration=feeds)
    assert report["channels_removed"] == 0 and report["kept_back"], "inexact fold refused by default"
    assert_equivalent(model, kept, feeds, atol=1e-5, rtol=1e-5)
    folded, report = prune(model, PruneConfig(criterion="zeros", fold_border=True), calibration=feeds)
    assert report["channels_removed"] == 1 and report["border_error_folds"] == ["c2"]
    ref = compare_models(model, folded, Dataset(feeds, model), channel_axis=None).outputs[0]
    out = create_session(model).run(None, feeds[0])[0]
    got = create_session(folded).run(None, feeds[0])[0]
    # interior pixels are exact, only the border ring differs
    np.testing.assert_allclose(got[..., 1:-1, 1:-1], out[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-5)
    assert np.abs(got - out).max() > 1e-3 and ref.sqnr_db < 80


def test_constant_channel_into_unpadded_consumer_folds_exactly():
    b = Builder(3)
    x = b.op("Relu", [b.conv("x", 3, 5, "c1")], "r1")
    b.conv(x, 5, 4, "c2", k=1)
    model = b.model([("x", [1, 3, 5, 5])], [("c2", None)])
    w = model.graph.initializers["c1.w"].const_value.numpy().copy()
    w[[0, 3]] = 0.0
    model.graph.initializers["c1.w"].const_value = ir.tensor(w, name="c1.w")
    feeds = _feeds(model, np.random.default_rng(3))
    pruned, report = prune(model, PruneConfig(criterion="zeros"), calibration=feeds)
    assert report["channels_removed"] == 2 and report["bias_folds"] == ["c2"]
    assert_equivalent(model, pruned, feeds, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "activation"])
def test_criteria_on_digits_cnn(criterion):
    reference = io.load_model(MODELS / "digits_cnn.onnx")
    pruned, report = prune(reference, PruneConfig(criterion=criterion, ratio=0.5, round_to=4),
                           calibration=MODELS / "digits_calib.npz")
    assert report["after"]["macs"] < 0.45 * report["before"]["macs"]
    assert report["after"]["parameters"] < report["before"]["parameters"]
    for g in report["groups"]:
        assert g["channels_after"] % 4 == 0 or g["channels_after"] == g["channels_before"]
    feeds = list(Dataset(MODELS / "digits_eval.npz", reference, batch_size=7, limit=1))
    assert create_session(pruned).run(None, feeds[0])[0].shape == (7, 10)


def test_global_scope_and_exclusions():
    reference = io.load_model(MODELS / "digits_cnn.onnx")
    pruned, report = prune(reference, PruneConfig(criterion="l1", ratio=0.4, scope="global",
                                                  exclude=("/stem/stem.0/Conv",)))
    where = {g["where"]: g for g in report["groups"]}
    stem = next(g for w, g in where.items() if "/stem/stem.0/Conv" in w)
    assert stem["channels_after"] == stem["channels_before"]
    assert report["channels_removed"] > 0


def test_needs_data_and_config_errors():
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune(MODELS / "digits_cnn.onnx", PruneConfig(criterion="activation"))
    with pytest.raises(ConfigError, match="ratio"):
        PruneConfig(ratio=1.0)


def test_cli_prune(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    argv = ["prune", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--criterion", "l1", "--ratio", "0.5",
            "--calibration", str(MODELS / "digits_calib.npz"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.exists() and report["after"]["parameters"] < report["before"]["parameters"]
    assert [g["channels_after"] for g in report["groups"]] == [128, 64]
