"""A target's combined cut is measured and backed off when its damage exceeds the bound
(onnxcomp.prune.budget.meet_target with ``damage``, onnxcomp.prune.targets).

The groups' damages are measured one by one; cut together they compound. The model here is a chain
of residual blocks with the same weights in every block, so that the blocks' errors add up in step
(on madmom's beat TCN, 11 residual blocks, the plan for ``--target-params 0.7`` measured 0.70
relative output error for a predicted 0.0085).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.prune import targets
from onnxcomp.prune.api import prune
from onnxcomp.prune.budget import GroupCurve, greedy_path, meet_target
from onnxcomp.prune.config import PruneConfig
from onnxcomp.testing import run_model


def _chain(blocks: int = 6, c: int = 8, inner: int = 16, t: int = 64, seed: int = 0):
    """x[1,c,t] -> blocks x (h + Conv1x1(Relu(Conv3(h)))) -> y: the inner channels of each block are
    one prunable group; every block has the same weights."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((inner, c, 3)) / np.sqrt(3 * c)).astype(np.float32)
    b1 = (rng.standard_normal(inner) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((c, inner, 1)) * 0.3 / np.sqrt(inner)).astype(np.float32)
    nodes, inits, h = [], [], "x"
    for i in range(blocks):
        out = "y" if i == blocks - 1 else f"h{i}"
        inits += [(f"w1_{i}", w1), (f"b1_{i}", b1), (f"w2_{i}", w2)]
        nodes += [oh.make_node("Conv", [h, f"w1_{i}", f"b1_{i}"], [f"a{i}"], pads=[1, 1], name=f"c1_{i}"),
                  oh.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"),
                  oh.make_node("Conv", [f"r{i}", f"w2_{i}"], [f"d{i}"], name=f"c2_{i}"),
                  oh.make_node("Add", [h, f"d{i}"], [out], name=f"add{i}")]
        h = out
    return make_proto(nodes, [("x", [1, c, t])], [("y", [1, c, t])], inits)


def _feeds(seed: int, n: int, c: int = 8, t: int = 64):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, c, t)).astype(np.float32)} for _ in range(n)]


def _damage(model, pruned, feeds) -> float:
    """Relative output error of ``pruned`` against ``model`` in onnxruntime."""
    ref, got = run_model(model, feeds), run_model(pruned, feeds)
    err = sum(float(((a[0] - b[0]) ** 2).sum()) for a, b in zip(ref, got))
    return err / sum(float((a[0] ** 2).sum()) for a in ref)


def _without_backoff(monkeypatch):
    """The planner before the combined cut was measured: the rounds see the saving only."""
    plain = targets.meet_target
    monkeypatch.setattr(targets, "meet_target", lambda *a, **k: plain(*a, **{**k, "damage": None}))


def test_the_combined_cut_backs_off_to_the_damage_bound(monkeypatch):
    model = io.load_model(_chain())
    calib = _feeds(1, 8)
    fitting = calib[: targets.SENSITIVITY_FEEDS]  # the feeds the planner measures on
    config = PruneConfig(criterion="obs", target_params=0.6, max_damage=0.02)
    pruned, report = prune(model, config, calibration=Dataset(calib, model))
    target = report["target"]
    combined = target["combined_damage"]
    measured = _damage(model, pruned, fitting)
    # the written model is the one measured, and it meets the bound
    assert combined["final"] == pytest.approx(measured, rel=1e-3)
    assert combined["measured_damage"] == pytest.approx(measured, rel=1e-3)
    assert measured <= 0.02
    assert combined["backed_off"] and combined["refit"] == "none"
    cap = combined["capped_at"]
    # the plan the target asked for: above the bound, though predicted well within it
    assert cap["measured_damage"] > 0.02 > cap["predicted_damage"]
    assert cap["measured_damage"] > 3 * cap["predicted_damage"]  # compounding, not noise
    assert report["after"]["parameters"] < report["before"]["parameters"]  # backed off, not to nothing
    assert target["final_ratio"] > 0.6 * 1.05  # the target is not reached, and it says so
    assert any("backed off" in n and "target 0.6 not reached" in n for n in report["notes"])
    assert len(target["rounds"]) <= 8
    assert all(r["measured_damage"] > 0.02 for r in target["rounds"] if not r.get("within_bound", True))

    _without_backoff(monkeypatch)
    old, old_report = prune(model, config, calibration=Dataset(calib, model))
    old_measured = _damage(model, old, fitting)
    assert old_report["target"]["within_5_percent"]  # the target met ...
    assert old_report["target"]["combined_damage"]["predicted_damage"] <= 0.02  # ... within the predicted bound ...
    assert old_measured > 2 * 0.02  # ... and far above it measured
    assert old_report["target"]["combined_damage"]["final"] == pytest.approx(old_measured, rel=1e-3)


def test_a_combined_cut_within_the_bound_is_not_backed_off(monkeypatch):
    """Where the combined damage meets the bound the plan is the one the saving search finds alone."""
    model = io.load_model(_chain())
    calib = _feeds(1, 8)
    # the damage bound alone (the check's rule would back this plan off: tests/test_prune_bound_fourteenth.py)
    config = PruneConfig(criterion="obs", target_params=0.8, max_damage=0.1, check_rule=False)
    pruned, report = prune(model, config, calibration=Dataset(calib, model))
    combined = report["target"]["combined_damage"]
    assert not combined["backed_off"] and combined["rounds_above_bound"] == 0
    assert combined["final"] <= 0.1 and report["target"]["within_5_percent"]
    _without_backoff(monkeypatch)
    old, _ = prune(model, config, calibration=Dataset(calib, model))
    for a, b in zip(run_model(pruned, calib), run_model(old, calib)):
        np.testing.assert_array_equal(a[0], b[0])


def test_meet_target_backs_off_a_compounding_damage():
    """A damage that grows faster than its sum along the path: the rounds land on the longest
    prefix whose measured damage meets the bound, in a few rounds."""
    steps = np.arange(0, 11)
    curves = [GroupCurve(g, 10, steps, steps * 1e-3, steps * 0.02) for g in range(5)]  # 50 steps, 1.0 saved
    path = greedy_path(curves)
    truth = {k: path[k - 1][3] * (1 + 0.5 * k) for k in range(1, len(path) + 1)}  # measured / predicted grows
    prefix_of = {}
    for k in range(1, len(path) + 1):
        prefix_of[tuple(sorted({gid: j for gid, j, _, _ in path[:k]}.items()))] = k

    def k_of(alloc):
        return prefix_of[tuple(sorted(alloc.items()))] if alloc else 0

    saved = lambda a: 0.02 * sum(a.values())  # noqa: E731
    damage = lambda a: truth[k_of(a)] if a else 0.0  # noqa: E731
    outcome = {}
    alloc, got, history = meet_target(curves, 0.9, saved, tolerance=0.01, max_damage=0.1, outcome=outcome,
                                      damage=damage)
    best = max(k for k, d in truth.items() if d <= 0.1)
    assert k_of(alloc) == best and truth[best] <= 0.1 < truth[best + 1]
    assert got == pytest.approx(0.02 * best)
    assert outcome["backed_off"] and outcome["damage"] == pytest.approx(truth[best])
    assert len(history) <= 8
    # without the measurement: the whole goal, far above the bound
    plain, _, _ = meet_target(curves, 0.9, saved, tolerance=0.01, max_damage=0.1)
    assert truth[k_of(plain)] > 0.1 >= path[k_of(plain) - 1][3]
    # a goal beyond the whole path stays out of reach (refused by the caller) after the back-off
    outcome = {}
    alloc, _, _ = meet_target(curves, 1.5, saved, tolerance=0.01, max_damage=0.1, outcome=outcome, damage=damage)
    assert not outcome["reachable"] and outcome["backed_off"] and k_of(alloc) == best


def test_a_target_out_of_reach_is_refused_after_the_back_off(tmp_path):
    """The whole path short of the target (even above the bound): refused, naming what the
    backed-off cut keeps, as a target out of reach of the predicted bound is."""
    model = io.load_model(_chain())
    config = PruneConfig(criterion="obs", target_params=0.2, max_damage=0.02)
    with pytest.raises(OnnxcompError, match=r"target_params 0.2 is out of reach: .*combined cut backed off\) keeps 0\.8"):
        prune(model, config, calibration=Dataset(_feeds(1, 8), model))


def test_reconstruct_measures_the_refitted_damage():
    """With the refit the rounds measure no combined damage (a Gram refit per group ignores what the
    streamed refit recovers of the upstream cuts); the refitted model is measured whole, reported,
    and backed off while it fails (each try refitted again: tests/test_prune_bound_fourteenth.py)."""
    model = io.load_model(_chain())
    calib = _feeds(1, 8)
    config = PruneConfig(criterion="obs", target_params=0.6, max_damage=0.02, reconstruct=True)
    pruned, report = prune(model, config, calibration=Dataset(calib, model))
    combined = report["target"]["combined_damage"]
    assert combined["refit"] == "streamed"
    assert all("measured_damage" not in r for r in report["target"]["rounds"])  # the rounds: saving only
    final = _damage(model, pruned, calib[: targets.SENSITIVITY_FEEDS])
    assert combined["final"] == pytest.approx(final, rel=1e-3) and final <= 0.02
    assert combined["backed_off"] and combined["capped_at"]["measured_damage"] > 0.02


def test_cli_reports_the_back_off(tmp_path):
    src = tmp_path / "chain.onnx"
    io.save_model(io.load_model(_chain()), src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(1, 8)]))  # fewer than 10: nothing held out
    out = tmp_path / "pruned.onnx"
    base = [sys.executable, "-m", "onnxcomp", "prune", str(src), "-o", str(out), "--target-params", "0.6",
            "--max-damage", "0.02", "--calibration", str(calib)]
    run = subprocess.run([*base, "--no-check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())  # the console wraps long notes
    assert "backed off" in text and "target 0.6 not reached" in text
    assert "combined cut: output damage" in text
    run = subprocess.run([*base, "--json", "--force", "--no-check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    combined = json.loads(run.stdout)["target"]["combined_damage"]
    assert combined["backed_off"] and combined["final"] <= 0.02 < combined["capped_at"]["measured_damage"]


def test_compress_stage_line_says_the_target_was_backed_off():
    """compress's prune stage line names the target and the back-off (the stage's notes are in --json only)."""
    from onnxcomp.compress import compress
    from onnxcomp.recipe import Recipe
    from onnxcomp.report import _stage_line

    model = io.load_model(_chain())
    recipe = Recipe.from_dict({"name": "t", "prune": {"criterion": "obs", "target_params": 0.6, "max_damage": 0.02}})
    _, report = compress(model, recipe, calibration=Dataset(_feeds(1, 8), model))
    stage = next(st for st in report["stages"] if st["stage"] == "prune")
    line = _stage_line(stage)
    assert "params 0.8" in line and "(target 0.6)" in line and "backed off" in line and "target not reached" in line
