"""The automatic fallback of ``quantize`` from its own calibration (onnxcomp.quant.autofallback).

One calibration per run, blocks of consecutive nodes ranked by the noise they add, and a stopping
rule that is the held-out check's own verdict (the same figures, the same rule); the latency
report of a fidelity fallback per block, not per node.
"""

from __future__ import annotations

import json

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.check import CheckConfig, OutputFigures, check_model, pooled_outputs, split_data
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.measure.embedding import embedding_fidelity
from onnxcomp.quant.autofallback import fallback_to_budget, study_of
from onnxcomp.quant.damage import damage_blocks, noise_ratio
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.runtime import run_model


def _chain(rng, depth: int = 20, fragile: int = 11):
    """``depth`` MatMul+Relu layers; layer ``fragile`` writes one channel much larger than the
    others (1000x), which uint8 activations then crush (the next layer reads them all)."""
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((16, 16)).astype(np.float32) * 0.35
        if i == fragile:
            w[:, 0] *= 1000.0
        if i == fragile + 1:
            w[0, :] /= 1000.0
        nodes += [oh.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  oh.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        inits.append((f"w{i}", w))
        prev = f"r{i}"
    # [N, 1, 16]: judged by cosine (a rank-2 output would read as class scores)
    nodes.append(oh.make_node("Unsqueeze", [prev, "axes"], ["y"], name="out"))
    inits.append(("axes", np.array([1], np.int64)))
    return make_proto(nodes, [("x", ["N", 16])], [("y", ["N", 1, 16])], inits)


@pytest.fixture
def chain(rng, tmp_path):
    proto = _chain(rng)
    io.save_model(io.load_model(proto), tmp_path / "chain.onnx")
    np.savez(tmp_path / "calib.npz", x=np.abs(rng.standard_normal((50, 1, 16))).astype(np.float32))
    return tmp_path


def test_quantize_falls_back_from_its_one_calibration(chain, capsys, monkeypatch):
    import onnxcomp.quant.static as static

    calls = []
    real = static.calibrate

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(static, "calibrate", counting)
    code = main(["quantize", str(chain / "chain.onnx"), "-o", str(chain / "q.onnx"), "--calibration",
                 str(chain / "calib.npz"), "--min-cosine", "0.998", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    auto = report["auto_fallback"]
    assert not auto["check_before"]["met"]  # all int8 misses the budget: the fallback ran ...
    assert len(calls) == 1  # ... without calibrating again
    assert auto["met_on_fitting_data"] and report["check"]["met"]
    assert "mm12" in auto["float_nodes"]  # the layer reading the crushed activation
    assert auto["eval_feeds"] == 32 and report["check"]["data"]["check_feeds"] == 10  # 40 fitting feeds, 32 used
    assert len(auto["float_nodes"]) <= 0.25 * (len(auto["float_nodes"]) + len(auto["int8_nodes"]))


def _study(proto, feeds):
    kept = []
    from onnxcomp.quant.api import quantize

    quantized, _ = quantize(proto, feeds, QuantizeConfig(), keep=kept.append)
    return quantized, study_of(kept[0], feeds)


def test_the_kept_calibration_rebuilds_the_quantized_model(rng):
    proto = _chain(rng)
    feeds = [{"x": np.abs(rng.standard_normal((2, 16))).astype(np.float32)} for _ in range(12)]
    quantized, study = _study(proto, feeds)
    first = run_model(quantized, feeds)
    again = run_model(study.build(), feeds)
    for a, b in zip(first, again):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    # a variant with the folded Relu's node in float has the unfolded range it needs
    variant = run_model(study.build(frozenset({"mm11", "mm12"})), feeds)
    assert all(np.all(np.isfinite(v[0])) for v in variant)


def _feeds(rng, n: int = 40):
    return [{"x": np.abs(rng.standard_normal((1, 16))).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("budget, met", [(CheckConfig(min_cosine=0.995), True), (CheckConfig(min_cosine=1.0), False)])
def test_the_stop_rule_is_the_checks_verdict(rng, budget, met):
    proto = _chain(rng)
    feeds = _feeds(rng)
    _, study = _study(proto, feeds)
    model, report = fallback_to_budget(study, budget)
    assert report["met_on_fitting_data"] is met
    # the check on the same feeds reaches the same verdict from the same figures
    ref = io.load_model(proto)
    split = split_data(None, budget, evaluation=Dataset(study.feeds, ref))
    check = check_model(ref, model, split, budget, compressed=len(report["int8_nodes"]))
    assert check["met"] is met
    if met:
        fitted = report["fitting_outputs"][0]
        assert fitted["cosine"] == pytest.approx(check["outputs"][0]["cosine"], abs=1e-6)
        assert fitted["cosine"] >= 0.995
    else:
        assert "all-int8 model is kept" in report["gave_up"] and report["float_nodes"] == []


def test_blocks_move_whole_worst_first(rng):
    _, study = _study(_chain(rng), _feeds(rng))
    budget = CheckConfig(min_cosine=0.995)
    assert study.evaluate([study.build()])[0]["outputs"][0]["cosine"] < 0.99  # all int8 misses it
    model, report = fallback_to_budget(study, budget)
    assert report["met_on_fitting_data"]
    size = round(np.sqrt(len(study.nodes)) / 2)
    assert size >= 2 and report["blocks"]
    position = {n: i for i, n in enumerate(study.nodes)}
    for block in report["blocks"]:  # runs of consecutive planned nodes, cut at multiples of the size
        index = [position[n] for n in block]
        assert index == list(range(index[0], index[0] + len(block))) and index[0] % size == 0
    assert report["float_nodes"] == [n for b in report["blocks"] for n in b]
    assert report["fitting_outputs"][0]["cosine"] >= budget.min_cosine
    assert "mm12" in report["float_nodes"]  # the layer that reads the crushed activation
    # bisection over blocks: at most ceil(log2(limit + 1)) evaluations
    limit = int(0.25 * len(study.nodes)) // size
    assert report["evaluations"] <= int(np.ceil(np.log2(limit + 2)))


def test_damage_blocks_rank_by_the_noise_their_nodes_add():
    nodes = [f"n{i}" for i in range(36)]
    damage = dict.fromkeys(nodes, 0.0) | {"n4": 0.05, "n20": 0.03, "n21": 0.03, "n30": -0.5}
    blocks = damage_blocks(nodes, damage)
    assert [len(b) for b in blocks] == [3] * 12
    assert blocks[0] == ["n18", "n19", "n20"] or blocks[0] == ["n21", "n22", "n23"] or blocks[0] == ["n3", "n4", "n5"]
    assert damage_blocks(nodes, damage, size=6)[0] == ["n18", "n19", "n20", "n21", "n22", "n23"]  # 0.06 > 0.05
    assert noise_ratio(10.0) == pytest.approx(0.1) and noise_ratio(float("nan")) == 1.0 and noise_ratio(-5.0) == 1.0


def test_an_encoders_pooled_figure_comes_from_the_checks_own_pass(rng):
    w = rng.standard_normal((8, 8)).astype(np.float32)
    proto = make_proto([oh.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                        oh.make_node("Cast", ["attention_mask"], ["m"], to=1, name="cast"),
                        oh.make_node("Unsqueeze", ["m", "axes"], ["m3"], name="unsq"),
                        oh.make_node("Mul", ["h", "m3"], ["last_hidden_state"], name="mul")],
                       [("x", [2, 5, 8]), ("attention_mask", [2, 5], 7)], [("last_hidden_state", [2, 5, 8])],
                       [("w", w), ("axes", np.array([2], np.int64))])
    ref = io.load_model(proto)
    noisy = io.load_model(make_proto(
        [oh.make_node("MatMul", ["x", "w"], ["last_hidden_state"], name="mm")],
        [("x", [2, 5, 8]), ("attention_mask", [2, 5], 7)], [("last_hidden_state", [2, 5, 8])],
        [("w", w + 0.3 * rng.standard_normal(w.shape).astype(np.float32))]))
    feeds = []
    for _ in range(3):
        mask = np.ones((2, 5), np.int64)
        mask[:, 3:] = 0
        feeds.append({"x": rng.standard_normal((2, 5, 8)).astype(np.float32), "attention_mask": mask})
    assert pooled_outputs(ref) == {"last_hidden_state": "attention_mask"}
    figures = OutputFigures(["last_hidden_state"], {"last_hidden_state": "values"}, pooled_outputs(ref))
    for feed, r, c in zip(feeds, run_model(ref, feeds), run_model(noisy, feeds)):
        figures.update(r, c, feed)
    expected = embedding_fidelity(ref, noisy, feeds)["last_hidden_state"]
    assert figures.embedding("last_hidden_state") == pytest.approx(expected)
    row = figures.result()[0]
    assert row["pooled_cosine"] == pytest.approx(expected["pooled_cosine"]) and row["pooled_cosine"] < 0.999
    # judged on the pooled cosine, not the flattened tensor's
    assert figures.meets(CheckConfig(min_cosine=row["pooled_cosine"] - 1e-6))
    assert not figures.meets(CheckConfig(min_cosine=row["pooled_cosine"] + 1e-6))


def test_fallback_latency_is_reported_per_block_in_one_comparison(rng, monkeypatch):
    import onnxcomp.measure.bench as bench_module
    from onnxcomp.quant.sensitivity import QuantStudy, _fallback_latency

    compared = []

    def fake(models, feeds, **kw):
        compared.append([name for name, _ in models])
        return [{"name": name, "ratio_to_first": 1.0 + i / 100, "ratio_ci95": None} for i, (name, _) in enumerate(models)]

    monkeypatch.setattr(bench_module, "bench_models", fake)
    proto = _chain(rng, depth=20)
    feeds = [{"x": np.abs(rng.standard_normal((2, 16))).astype(np.float32)} for _ in range(4)]
    study = QuantStudy.prepare(proto, feeds)
    groups = [study.nodes[i:i + 3] for i in range(0, 20, 3)]  # 7 blocks of 20 nodes
    ratios = _fallback_latency(study, groups)
    assert len(compared) == 1 and len(compared[0]) == 6  # all int8 + 5 groups: one comparison
    names = list(ratios)
    assert names[0] == f"{groups[0][0]} .. {groups[0][-1]} (3 nodes)"
    assert names[-1] == f"{groups[4][0]} .. {groups[6][-1]} (8 nodes)"  # the last three blocks together
    assert _fallback_latency(study, [[study.nodes[0]]]) == {study.nodes[0]: pytest.approx(1.01)}
