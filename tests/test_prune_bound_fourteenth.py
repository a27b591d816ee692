"""A prune target backs off to the held-out check's own rule (fourteenth session).

The combined cut of a target is measured on the fitting data each round (onnxcomp.prune.targets,
``DamageProbe.judge``): its damage against ``max_damage`` and every output's figure against the
rule the held-out check applies afterwards (onnxcomp.check: cosine >= min_cosine for values, top-1
agreement >= min_agreement for class scores), with the run's CheckConfig. A cut within
``max_damage`` that fails the rule is backed off until the rule holds; with ``reconstruct`` the
refitted model is measured and backed off the same way, each try refitted again.

The chain of residual blocks (tests/test_prune_combined.py) compounds its blocks' errors in step,
so that a plan predicted far within the bound is measured above the check's cosine there.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto
from test_prune_combined import _chain, _feeds

from onnxcomp import io
from onnxcomp.check import CheckConfig, check_model, split_data
from onnxcomp.data import Dataset
from onnxcomp.prune import targets
from onnxcomp.prune.api import prune
from onnxcomp.prune.budget import GroupCurve, Measured, back_off, greedy_path, meet_target
from onnxcomp.prune.config import PruneConfig
from onnxcomp.testing import run_model


def _cosine(model, pruned, feeds, output: int = 0) -> float:
    """The check's cosine of one output over ``feeds``, recomputed in onnxruntime."""
    ref = np.concatenate([r[output].ravel() for r in run_model(model, feeds)]).astype(np.float64)
    got = np.concatenate([r[output].ravel() for r in run_model(pruned, feeds)]).astype(np.float64)
    return float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))


def _split(model, n: int = 15):
    """15 seeded feeds: every 5th held out for the check (3), 12 to fit on."""
    feeds = _feeds(1, n)
    split = split_data(Dataset(feeds, model), CheckConfig())
    fit = [f for i, f in enumerate(feeds) if i % 5 != 4]
    return split, fit


def test_a_cut_within_max_damage_that_fails_the_rule_is_backed_off_and_passes_the_check():
    model = io.load_model(_chain())
    split, fit = _split(model)
    cfg = CheckConfig()
    config = PruneConfig(criterion="obs", target_params=0.8, max_damage=0.1)

    # the damage bound alone: the plan is within max_damage, and fails the check's rule, on the
    # fitting data and held out
    alone, alone_report = prune(model, PruneConfig(**{**config.to_dict(), "check_rule": False}),
                                calibration=split.fit)
    combined = alone_report["target"]["combined_damage"]
    assert not combined["backed_off"] and combined["final"] <= 0.1 and combined["rule"] is None
    assert _cosine(model, alone, fit) < cfg.min_cosine
    assert not check_model(model, alone, split, cfg)["met"]

    pruned, report = prune(model, config, calibration=split.fit, check=cfg)
    combined = report["target"]["combined_damage"]
    # backed off because of the rule, not the damage bound
    assert combined["backed_off"]
    first = combined["first_failed"]
    assert first["measured_damage"] <= 0.1 and "cosine" in first["why"] and "max_damage" not in first["why"]
    assert first["outputs"][0]["kind"] == "values" and not first["outputs"][0]["ok"]
    assert first["outputs"][0]["cosine"] < cfg.min_cosine
    # the written model meets the rule on the fitting feeds the probe read (recomputed) ...
    assert combined["rule"] == {"min_cosine": 0.985, "min_agreement": 0.99, "min_detection_agreement": 0.98,
                               "min_r2": 0.99, "feeds": 12}
    fitting = _cosine(model, pruned, fit)
    assert fitting >= cfg.min_cosine
    assert combined["final_rule"]["within"]
    assert combined["final_rule"]["outputs"][0]["cosine"] == pytest.approx(fitting, abs=1e-5)
    # ... still cuts something, less than the plan alone ...
    assert alone_report["after"]["parameters"] < report["after"]["parameters"] < report["before"]["parameters"]
    # ... and passes the held-out check
    check = check_model(model, pruned, split, cfg)
    assert check["met"], check["problems"]
    # the note says what was backed off and why
    note = next(n for n in report["notes"] if "backed off" in n)
    assert "rule cosine >= 0.985" in note and "target 0.8 not reached" in note


def test_the_checks_thresholds_move_the_bound():
    """The CheckConfig the run uses (--min-cosine, compress's check) is the rule the rounds judge by."""
    model = io.load_model(_chain())
    calib = Dataset(_feeds(1, 8), model)
    config = PruneConfig(criterion="obs", target_params=0.8, max_damage=0.1)
    strict, strict_report = prune(model, config, calibration=calib, check=CheckConfig(min_cosine=0.985))
    loose, loose_report = prune(model, config, calibration=calib, check=CheckConfig(min_cosine=0.95))
    assert strict_report["target"]["combined_damage"]["backed_off"]
    assert not loose_report["target"]["combined_damage"]["backed_off"]
    assert loose_report["target"]["combined_damage"]["rule"]["min_cosine"] == 0.95
    assert loose_report["after"]["parameters"] < strict_report["after"]["parameters"]
    feeds = _feeds(1, 8)
    assert 0.95 <= _cosine(model, loose, feeds) < 0.985 <= _cosine(model, strict, feeds)

    from onnxcomp.compress import compress
    from onnxcomp.recipe import Recipe

    recipe = Recipe.from_dict({"name": "t", "prune": {"criterion": "obs", "target_params": 0.8}})
    for cfg, pruned in ((CheckConfig(min_cosine=0.985), strict), (CheckConfig(min_cosine=0.95), loose)):
        written, report = compress(model, recipe, calibration=calib, check=cfg)
        stage = next(st for st in report["stages"] if st["stage"] == "prune")
        assert stage["stats"]["target"]["combined_damage"]["rule"]["min_cosine"] == cfg.min_cosine
        for a, b in zip(run_model(written, feeds), run_model(pruned, feeds)):
            np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)


def _classifier(seed: int = 0, d: int = 24, hidden: int = 48, classes: int = 6, layers: int = 4):
    """x[1,d] -> layers x (h + Gemm(Relu(Gemm(h)))) -> Gemm -> Softmax: class scores, judged by top-1
    agreement; each block's hidden units are a prunable group."""
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        w1 = (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)
        w2 = (rng.standard_normal((hidden, d)) * 0.5 / np.sqrt(hidden)).astype(np.float32)
        inits += [(f"w1_{i}", w1), (f"w2_{i}", w2)]
        nodes += [oh.make_node("Gemm", [h, f"w1_{i}"], [f"a{i}"], name=f"g1_{i}"),
                  oh.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"),
                  oh.make_node("Gemm", [f"r{i}", f"w2_{i}"], [f"d{i}"], name=f"g2_{i}"),
                  oh.make_node("Add", [h, f"d{i}"], [f"h{i}"], name=f"add{i}")]
        h = f"h{i}"
    inits.append(("wo", (rng.standard_normal((d, classes)) / np.sqrt(d)).astype(np.float32)))
    nodes += [oh.make_node("Gemm", [h, "wo"], ["logits"], name="head"),
              oh.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax")]
    return make_proto(nodes, [("x", [1, d])], [("probs", [1, classes])], inits)


def test_class_scores_are_judged_by_top1_agreement():
    """A classifier's scores: the rounds judge top-1 agreement on the fitting feeds, as the check does."""
    model = io.load_model(_classifier())
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 24)).astype(np.float32)} for _ in range(40)]
    config = PruneConfig(criterion="obs", target_params=0.35, max_damage=1.0)  # only the rule binds
    pruned, report = prune(model, config, calibration=Dataset(feeds, model))
    combined = report["target"]["combined_damage"]
    assert combined["rule"]["feeds"] == 40
    first = combined["first_failed"]
    assert first["outputs"][0]["kind"] == "scores" and "top-1 agreement" in first["why"]
    agree = np.mean([a[0].argmax() == b[0].argmax() for a, b in zip(run_model(model, feeds), run_model(pruned, feeds))])
    assert agree >= 0.99 > first["outputs"][0]["top1_agreement"]
    assert combined["final_rule"]["outputs"][0]["top1_agreement"] == pytest.approx(agree)
    assert report["after"]["parameters"] < report["before"]["parameters"]


def test_reconstruct_backs_off_the_refitted_model():
    model = io.load_model(_chain())
    split, fit = _split(model)
    cfg = CheckConfig()
    config = PruneConfig(criterion="obs", target_params=0.6, max_damage=0.1, reconstruct=True)
    alone, alone_report = prune(model, PruneConfig(**{**config.to_dict(), "check_rule": False}),
                                calibration=split.fit)
    assert not alone_report["target"]["combined_damage"]["backed_off"]
    assert alone_report["target"]["combined_damage"]["final"] <= 0.1
    assert _cosine(model, alone, fit) < cfg.min_cosine  # within max_damage after the refit, below the rule

    pruned, report = prune(model, config, calibration=split.fit, check=cfg)
    combined = report["target"]["combined_damage"]
    assert combined["refit"] == "streamed" and combined["backed_off"]
    assert "cosine" in combined["why"] and combined["capped_at"]["measured_damage"] <= 0.1
    rounds = combined["refit_rounds"]
    assert 1 <= len(rounds) <= 6 and all(r["backoff"] for r in rounds)
    assert combined["steps"] < combined["capped_at"]["steps"]
    assert combined["steps"] == max(r["steps"] for r in rounds if r["within_bound"])
    # measured after the refit, as written
    fitting = _cosine(model, pruned, fit)
    assert fitting >= cfg.min_cosine
    assert combined["final_rule"]["outputs"][0]["cosine"] == pytest.approx(fitting, abs=1e-5)
    assert combined["final"] == pytest.approx(
        _damage(model, pruned, fit[: targets.SENSITIVITY_FEEDS]), rel=1e-3)
    rec = report["reconstruction"]  # the written model is refitted; its in-sample fidelity measured once
    assert rec["layers"] and rec["calibration_output_sqnr_db_after"] > rec["calibration_output_sqnr_db_before"]
    ref = np.concatenate([r[0].ravel() for r in run_model(model, fit)])
    got = np.concatenate([r[0].ravel() for r in run_model(pruned, fit)])
    assert rec["calibration_output_sqnr_db_after"] == pytest.approx(
        10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()), abs=0.05)
    assert alone_report["after"]["parameters"] < report["after"]["parameters"] < report["before"]["parameters"]
    # held out, the refit is not in-sample: the back-off lands at the rule's edge on the fitting feeds
    # (0.9850 here) and the check reads 0.9831 (the plan alone: 0.974, fitting 0.975)
    held = [f for i, f in enumerate(_feeds(1, 15)) if i % 5 == 4]
    assert _cosine(model, pruned, held) > _cosine(model, alone, held) + 0.005
    assert _cosine(model, pruned, held) > fitting - 0.005
    assert any("refitted again" in n for n in report["notes"])
    # groups in the report are the backed-off plan's
    removed = sum(g["channels_before"] - g["channels_after"] for g in report["groups"])
    assert removed == report["channels_removed"] > 0


def _damage(model, pruned, feeds) -> float:
    ref, got = run_model(model, feeds), run_model(pruned, feeds)
    return (sum(float(((a[0] - b[0]) ** 2).sum()) for a, b in zip(ref, got))
            / sum(float((a[0] ** 2).sum()) for a in ref))


def test_cli_json_says_what_was_backed_off_and_why(tmp_path):
    src = tmp_path / "chain.onnx"
    io.save_model(io.load_model(_chain()), src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(1, 15)]))
    out = tmp_path / "pruned.onnx"
    base = [sys.executable, "-m", "onnxcomp", "prune", str(src), "-o", str(out), "--target-params", "0.8",
            "--calibration", str(calib), "--force"]
    run = subprocess.run([*base, "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    combined = report["target"]["combined_damage"]
    assert combined["backed_off"] and "rule cosine >= 0.985" in combined["why"]
    assert combined["rule"]["min_cosine"] == 0.985 and combined["final_rule"]["within"]
    assert report["check"]["met"]  # the held-out check passes
    run = subprocess.run([*base, "--json", "--min-cosine", "0.95"], capture_output=True, text=True)
    loose = json.loads(run.stdout)
    assert loose["target"]["combined_damage"]["rule"]["min_cosine"] == 0.95
    assert loose["after"]["parameters"] < report["after"]["parameters"]
    run = subprocess.run([*base, "--json", "--no-check-rule"], capture_output=True, text=True)
    alone = json.loads(run.stdout)
    assert alone["target"]["combined_damage"]["rule"] is None and not alone["target"]["combined_damage"]["backed_off"]
    assert not alone["check"]["met"]  # within max_damage, failed held out
    run = subprocess.run(base, capture_output=True, text=True)
    text = " ".join(run.stdout.split())
    assert "the check's rule on 12 fitting feed(s): cosine" in text and ", met;" in text
    assert "backed off from the plan the target asked for, which failed: output 'y': cosine" in text


def test_meet_target_backs_off_on_the_rule():
    """A Measured verdict: the rounds back off on its severity to the longest prefix within."""
    steps = np.arange(0, 11)
    curves = [GroupCurve(g, 10, steps, steps * 1e-3, steps * 0.02) for g in range(5)]
    path = greedy_path(curves)
    prefix_of = {tuple(sorted({gid: int(curves[gid].steps[j]) for gid, j, _, _ in path[:k]}.items())): k
                 for k in range(1, len(path) + 1)}
    k_of = lambda a: prefix_of[tuple(sorted(a.items()))] if a else 0  # noqa: E731
    cosine = {k: 1.0 - 4e-4 * k for k in range(len(path) + 1)}  # falls below 0.985 past 37 steps
    damage = {k: path[k - 1][3] if k else 0.0 for k in range(len(path) + 1)}  # 0.05 at most: within 0.1

    def judge(alloc):
        k = k_of(alloc)
        ok = cosine[k] >= 0.985
        return Measured(damage[k], ok, (1 - cosine[k]) / 0.015, None if ok else f"cosine {cosine[k]:.4f}")

    outcome = {}
    alloc, got, history = meet_target(curves, 0.9, lambda a: 0.02 * sum(a.values()), tolerance=0.01,
                                      max_damage=0.1, outcome=outcome, damage=judge)
    best = max(k for k, c in cosine.items() if c >= 0.985)
    assert k_of(alloc) == best and outcome["backed_off"] and len(history) <= 8
    assert [h["why"] for h in history if not h["within_bound"]][0].startswith("cosine")


def test_back_off_finds_the_longest_prefix_within():
    path = [(0, 1, 0.01 * k, 0.001 * k) for k in range(1, 41)]
    truth = {k: 0.002 * k * k / 40 for k in range(41)}  # the measured damage (reported, not judged)
    sev = {k: (k / 25.0) ** 2 for k in range(41)}  # within up to 25
    tried = []

    def measure(k):
        tried.append(k)
        return Measured(truth[k], sev[k] <= 1.0, sev[k])

    k, history = back_off(path, 40, Measured(truth[40], False, sev[40]), measure, rounds=6)
    assert k == 25 and len(history) == len(tried) <= 6
    assert all(h["within_bound"] == (h["steps"] <= 25) for h in history)
    # a severity that is not finite (a figure not measured) bisects
    k, _ = back_off(path, 40, Measured(0.0, False, math.inf), measure, rounds=8)
    assert k == 25


def test_the_rule_reads_more_fitting_feeds_within_a_byte_bound(monkeypatch):
    model = io.load_model(_chain())
    feeds = Dataset(_feeds(1, 30), model)
    probe = targets.DamageProbe(model, feeds, CheckConfig())
    assert probe.rule_feeds == 30 and len(probe.feeds) == targets.SENSITIVITY_FEEDS  # every fitting feed
    monkeypatch.setattr(targets, "RULE_FEEDS", 20)
    assert targets.DamageProbe(model, feeds, CheckConfig()).rule_feeds == 20
    per_feed = 2 * 8 * 64 * 4  # input and output, float32
    monkeypatch.setattr(targets, "RULE_BYTES", 5 * per_feed)
    assert targets.DamageProbe(model, feeds, CheckConfig()).rule_feeds == 5
    monkeypatch.setattr(targets, "RULE_BYTES", 1)
    assert targets.DamageProbe(model, feeds, CheckConfig()).rule_feeds == targets.SENSITIVITY_FEEDS
    assert targets.DamageProbe(model, feeds).rule_feeds == targets.SENSITIVITY_FEEDS  # no rule


def test_a_target_refused_after_the_back_off_says_what_failed():
    from onnxcomp.errors import OnnxcompError

    model = io.load_model(_chain())
    config = PruneConfig(criterion="obs", target_params=0.2, max_damage=0.02)
    with pytest.raises(OnnxcompError) as err:
        prune(model, config, calibration=Dataset(_feeds(1, 8), model))
    text = str(err.value)
    assert "measured on the fitting data by the check's rule, the combined cut backed off" in text
    assert "or loosen the check's rule (--min-cosine), or give --reconstruct" in text
    assert "(the cuts backed off from failed: damage " in text and "rule cosine >= 0.985)" in text
