"""Prune importances come from a registry: a new scoring rule is one function and one call."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.analysis.channels import analyze_channels
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError
from onnxcomp.prune.api import prune
from onnxcomp.prune.config import PruneConfig
from onnxcomp.prune.importance import IMPORTANCES, Importance, group_scores, register_importance
from onnxcomp.prune.select import channel_scores, eligible_groups
from onnxcomp.testing import run_model


def _proto(w0, w1, b1):
    return make_proto(
        [oh.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
         oh.make_node("Relu", ["c0"], ["r0"], name="relu0"),
         oh.make_node("Conv", ["r0", "w1", "b1"], ["y"], name="conv1")],
        [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], [("w0", w0), ("w1", w1), ("b1", b1)],
    )


def _two_convs(rng):
    w0 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    b1 = rng.standard_normal(4).astype(np.float32)
    return _proto(w0, w1, b1), w0, w1, b1


def test_registered_importance_decides_the_cut(rng, monkeypatch):
    """An importance scoring channel c as c removes the lowest-numbered channels, exactly those."""
    monkeypatch.setitem(IMPORTANCES, "index", IMPORTANCES["l1"])  # restored after the test
    register_importance(Importance("index", lambda group, _state: np.arange(group.size, dtype=float)))
    proto, w0, w1, b1 = _two_convs(rng)
    pruned, report = prune(proto, PruneConfig(criterion="index", ratio=0.25))
    assert report["channels_removed"] == 2
    inits = {v.name: v.const_value.numpy() for v in pruned.graph.initializers.values()}
    weights = sorted((a for a in inits.values() if a.ndim == 4), key=lambda a: a.shape[1])
    np.testing.assert_array_equal(weights[0], w0[2:])
    np.testing.assert_array_equal(weights[1], w1[:, 2:])
    # the kept channels compute what they did: the original with conv1 blind to channels 0 and 1
    w1_cut = w1.copy()
    w1_cut[:, :2] = 0
    feeds = [{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(2)]
    expected = run_model(io.load_model(_proto(w0, w1_cut, b1)), feeds)
    for got, want in zip(run_model(pruned, feeds), expected):
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)


def test_unknown_criterion_is_refused_with_the_registered_names():
    with pytest.raises(ConfigError, match="criterion must be one of .*'l1'"):
        PruneConfig(criterion="taylor")


def test_shipped_importances_through_the_registry(rng):
    proto, *_ = _two_convs(rng)
    model = io.load_model(proto)
    analysis = analyze_channels(model)
    groups, _ = eligible_groups(analysis, PruneConfig())
    assert groups
    for name in ("l1", "l2", "bn", "zeros"):
        scores = group_scores(model, groups, name)
        for g in groups:
            np.testing.assert_allclose(scores[g.id], channel_scores(g, name))
    data = Dataset([{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)], model)
    act = group_scores(model, groups, "activation", data)
    assert all(s.shape == (g.size,) and np.all(s >= 0) for g, s in zip(groups, act.values()))
    assert PruneConfig(criterion="activation").needs_data and not PruneConfig(criterion="l2").needs_data
