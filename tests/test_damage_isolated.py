"""Isolated damage: the noise an int8 node adds by itself, measured from float inputs in one run
of the float graph beside a rewired copy of the int8 graph (onnxcomp.quant.damage)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from onnxcomp import io
from onnxcomp.check import layer_sqnr
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.damage import (
    INT8_PREFIX, isolated_damage, isolated_model, local_damage, noise_ratio, ranked_blocks,
)
from onnxcomp.quant.sensitivity import QuantStudy
from conftest import make_proto


def _two_fragile_convs(rng) -> onnx.ModelProto:
    """x [N,4,8,8] -> dw_a (depthwise) -> pw_b (1x1) -> Relu -> dw_c (depthwise) -> pw_d -> pw_e -> y.

    Channel 0 of x is 1000x wider than the others, and dw_a multiplies the narrow channels by 100:
    on a per-tensor 8-bit grid of x they are a few steps wide, so dw_a's output is mostly
    rounding noise. pw_b passes that noise on (its wide output channel 0 reads a noisy channel),
    and dw_c repeats the trick on its own input, so it breaks the signal a second time, downstream
    of the first break: the chained measure, capped at a noise ratio of 1, sees little of it."""
    c = 4
    dw_a = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    dw_a[1:] *= 100.0
    dw_a[0] *= 0.1
    pw_b = (rng.standard_normal((c, c, 1, 1)) * 0.05).astype(np.float32)
    pw_b[0, 0], pw_b[0, 1] = 0.0, 200.0  # wide, and carrying dw_a's noise
    dw_c = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    dw_c[1:] *= 100.0
    dw_c[0] *= 0.1
    pw_d = (rng.standard_normal((c, c, 1, 1)) * 0.5).astype(np.float32)
    nodes = [
        oh.make_node("Conv", ["x", "wa"], ["a"], name="dw_a", group=c, pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["a", "wb"], ["b"], name="pw_b"),
        oh.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        oh.make_node("Conv", ["rb", "wc"], ["cc"], name="dw_c", group=c, pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["cc", "wd"], ["d"], name="pw_d"),
        oh.make_node("Conv", ["d", "wd"], ["y"], name="pw_e"),  # writes the graph output: stays float
    ]
    inits = [("wa", dw_a), ("wb", pw_b), ("wc", dw_c), ("wd", pw_d)]
    return make_proto(nodes, [("x", ["N", c, 8, 8])], [("y", ["N", c, 8, 8])], inits, opset=13)


def _feeds(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * 0.01
        x[:, 0] *= 1000.0
        out.append({"x": x})
    return out


@pytest.fixture()
def study():
    proto = _two_fragile_convs(np.random.default_rng(0))
    return QuantStudy.prepare(proto, _feeds(1, 8), QuantizeConfig())


def _alone(study, node: str, feeds) -> float:
    """Noise ratio at ``node``'s output when it is the model's only int8 node."""
    only = study.build(frozenset(n for n in study.nodes if n != node))
    out = next(n for n in study.work.graph if n.name == node).outputs[0].name
    return noise_ratio(layer_sqnr(study.work, only, feeds, with_outputs=True)[out])


def test_isolated_damage_is_the_damage_of_the_node_alone(study):
    """Every node's isolated damage (measured in the all-int8 model, where dw_a has already broken
    the signal) equals what the node does when it is the only int8 node, within 1.5 dB; the
    chained measure sees nothing of dw_c, whose input is already noise."""
    assert set(study.nodes) >= {"dw_a", "pw_b", "dw_c", "pw_d"}, study.nodes
    feeds = _feeds(2, 3)
    everything = study.build(frozenset())
    isolated = isolated_damage(study.work, everything, study.nodes, feeds)
    chained = local_damage(study.work, everything, study.nodes, feeds)
    for node in ("dw_a", "pw_b", "dw_c", "pw_d"):
        alone = _alone(study, node, feeds)
        assert abs(10 * np.log10(isolated[node] / alone)) < 1.5, (node, isolated[node], alone)
    assert isolated["dw_a"] > 0.2 and isolated["dw_c"] > 0.2, isolated  # both break the signal alone
    assert isolated["pw_b"] < 0.01 and isolated["pw_d"] < 0.01, isolated
    assert chained["dw_c"] < isolated["dw_c"] / 4, (chained, isolated)  # masked by dw_a's noise upstream


def test_ranking_puts_both_fragile_nodes_first(study):
    blocks, damage = ranked_blocks(study, study.nodes)
    assert {blocks[0][0], blocks[1][0]} == {"dw_a", "dw_c"}, blocks


def test_damage_does_not_depend_on_the_other_nodes_and_the_inputs_are_unchanged(study):
    """Isolated, a node's damage is the same whether the nodes around it are int8 or float."""
    feeds = _feeds(3, 2)
    everything = isolated_damage(study.work, study.build(frozenset()), study.nodes, feeds)
    variant = study.build(frozenset({"dw_a"}))
    before = (io.model_to_bytes(study.work), io.model_to_bytes(variant))
    merged = isolated_model(study.work, variant)
    assert merged is not None and any(n.name.startswith(INT8_PREFIX) for n in merged.graph)
    damage = isolated_damage(study.work, variant, study.nodes, feeds)
    for node in ("pw_b", "dw_c", "pw_d"):
        assert damage[node] == pytest.approx(everything[node], rel=1e-3), (node, damage, everything)
    assert damage["dw_c"] > 0.2  # still fragile with the first break gone
    assert before == (io.model_to_bytes(study.work), io.model_to_bytes(variant))  # neither model touched


def test_isolated_damage_of_quantized_branches():
    """An If whose branches are quantized (units) is measured at the If's output, with the
    branches reading the float graph's tensors."""
    from test_subgraph_compress import _feeds as branch_feeds, model_if_weights

    proto = model_if_weights(np.random.default_rng(7))
    feeds = branch_feeds(proto, 21, 8)
    study = QuantStudy.prepare(proto, feeds, QuantizeConfig())
    assert study.units
    everything = study.build(frozenset())
    damage = isolated_damage(study.float_work, everything, study.nodes, feeds[:4], study.units)
    assert set(damage) == set(study.nodes)
    assert all(0.0 < d < 0.1 for d in damage.values()), damage  # each branch's int8 costs a little
    blocks, _ = ranked_blocks(study, study.nodes)
    assert sorted(n for b in blocks for n in b) == sorted(study.nodes)
