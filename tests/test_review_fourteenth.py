"""Fresh-eyes review of the fourteenth session's work (the check's regression and detection
thresholds, a prune target backing off to the check's rule): what it found, pinned."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.check import CheckConfig
from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.prune.api import prune
from onnxcomp.prune.config import PruneConfig


def _regressor():
    """``x [N, 8] -> Relu(x @ w1) @ w2 + 150 -> y [N, 1]``: an MLP regressor with a large offset (seeded)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 1)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("MatMul", ["r", "w2"], ["m"]), oh.make_node("Add", ["m", "b"], ["y"])]
    return io.load_model(make_proto(nodes, [("x", ["N", 8])], [("y", ["N", 1])],
                                    [("w1", w1), ("w2", w2), ("b", np.array([150.0], np.float32))]))


def _fit(model, n: int = 20):
    rng = np.random.default_rng(1)
    return Dataset([{"x": rng.standard_normal((8, 8)).astype(np.float32)} for _ in range(n)], model)


def test_a_target_refused_on_a_regression_names_the_flag_of_the_rule_that_failed():
    # the refusal advised "loosen the check's rule (--min-cosine, --min-agreement)" whatever output
    # failed: a regression is judged by --min-r2, which neither flag moves
    model = _regressor()
    with pytest.raises(OnnxcompError) as err:
        prune(model, PruneConfig(criterion="obs", target_params=0.1), calibration=_fit(model))
    text = str(err.value)
    assert "R^2 against the original" in text  # what failed: the regression's rule
    assert "loosen the check's rule (--min-r2)" in text and "--min-cosine" not in text


def test_the_report_names_every_threshold_the_rule_judges_by():
    # combined_damage.rule listed min_cosine and min_agreement only: a run judged by --min-r2 (or
    # --min-detection-agreement) did not say which threshold its back-off used
    model = _regressor()
    cfg = CheckConfig(min_r2=0.5, min_detection_agreement=0.9)
    _, report = prune(model, PruneConfig(criterion="obs", target_params=0.8), calibration=_fit(model), check=cfg)
    rule = report["target"]["combined_damage"]["rule"]
    assert rule["min_r2"] == 0.5 and rule["min_detection_agreement"] == 0.9
    assert rule["min_cosine"] == cfg.min_cosine and rule["min_agreement"] == cfg.min_agreement and rule["feeds"] == 20


def test_no_check_rule_help_names_every_threshold_of_the_rule():
    # its help named --min-cosine and --min-agreement only; the rule judges by all four
    import argparse

    from onnxcomp.prune.cli import _configure

    parser = argparse.ArgumentParser()
    _configure(parser)
    text = next(a.help for a in parser._actions if "--no-check-rule" in a.option_strings)
    flags = {a.option_strings[0] for a in parser._actions
             if a.option_strings and a.option_strings[0].startswith("--min-") and a.option_strings[0] != "--min-channels"}
    assert flags == {"--min-agreement", "--min-detection-agreement", "--min-cosine", "--min-r2"}
    assert all(flag in text for flag in flags)


def test_a_decided_class_cast_to_float_is_no_regression():
    # ArgMax(keepdims) -> Cast(float) -> y [N, 1]: class indices, not a regressor's prediction; the
    # regression detector took it (R^2 of class indices), where it was values before
    from onnxcomp.check import output_kinds

    proto = make_proto([oh.make_node("ArgMax", ["x"], ["a"], axis=1, keepdims=1),
                        oh.make_node("Cast", ["a"], ["y"], to=1)], [("x", ["N", 10])], [("y", ["N", 1])])
    assert output_kinds(io.load_model(proto)) == {"y": "values"}
    assert output_kinds(_regressor()) == {"y": "regression"}


def test_a_target_backed_off_to_nothing_says_so_when_nothing_was_pruned(tmp_path, capsys):
    # every cut the back-off tried failed the check's rule: nothing was cut, and the check's
    # "nothing was compressed" named the first frozen group ("frozen: graph input 'x'") instead
    import json

    from test_review_eleventh import _cli

    src, out, calib = tmp_path / "reg.onnx", tmp_path / "out.onnx", tmp_path / "x.npy"
    io.save_model(_regressor(), src)
    np.save(calib, np.random.default_rng(1).standard_normal((100, 8)).astype(np.float32))
    code, stdout, err = _cli(capsys, "prune", src, "-o", out, "--calibration", calib, "--target-params", "0.5",
                             "--min-r2", "0.99999999", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["channels_removed"] == 0 and report["target"]["combined_damage"]["backed_off"]
    why = report["check"]["problems"][0]
    assert why.startswith("nothing was compressed (0 channels removed): ")
    assert "backed off" in why and "R^2 against the original" in why and "frozen" not in why


def test_a_regressor_is_backed_off_to_its_r2_on_the_fitting_data():
    # (coverage: no test pruned a model with a regression output) the rounds judge the [N, 1] output
    # by its R^2 against the original, streamed over the fitting feeds: recomputed here in one shot
    from onnxcomp.testing import run_model

    model = _regressor()
    fit = _fit(model)
    pruned, report = prune(model, PruneConfig(criterion="obs", target_params=0.5), calibration=fit)
    combined = report["target"]["combined_damage"]
    assert combined["backed_off"] and "R^2 against the original" in combined["why"]
    feeds = list(fit)
    r = np.concatenate([o[0] for o in run_model(model, feeds)]).astype(np.float64)
    c = np.concatenate([o[0] for o in run_model(pruned, feeds)]).astype(np.float64)
    r2 = 1 - ((c - r) ** 2).sum() / (((r - r.mean()) ** 2).sum() + 1e-4 * (r ** 2).sum())  # the spread floor
    row = combined["final_rule"]["outputs"][0]
    assert row["kind"] == "regression" and row["r2_vs_original"] == pytest.approx(r2, abs=1e-6)
    assert r2 >= 0.99 > combined["first_failed"]["outputs"][0]["r2_vs_original"]
    assert report["after"]["parameters"] < report["before"]["parameters"]


def test_the_combined_cut_says_how_many_feeds_it_was_measured_on():
    # with one fitting feed the report (and the CLI line) said "measured on 2 fitting feed(s)":
    # SENSITIVITY_FEEDS, not the feeds read
    model = _regressor()
    _, report = prune(model, PruneConfig(criterion="obs", target_params=0.8, check_rule=False),
                      calibration=_fit(model, n=1))
    assert report["target"]["combined_damage"]["feeds"] == 1
