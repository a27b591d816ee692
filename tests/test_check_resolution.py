"""The check states its resolution: an agreement figure measured on n decisions cannot see a change
below 1/n, and when that step is larger than the loss the budget allows, the check says so in one
line (terminal, --json, HTML report) without changing its verdict."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.check import (
    CheckConfig,
    DetectionAgreement,
    Equal,
    RegionAgreement,
    SequenceAgreement,
    TopOneAgreement,
    check_model,
    resolution_note,
    split_data,
)
from onnxcomp.cli import main
from onnxcomp.data import Dataset

NOTE_26 = ("the check saw 26 decisions (top-1 agreement of output 'y'): it cannot resolve a change below 3.8 points "
           "where the budget allows 1 point; pass --eval with more data")


def test_figures_count_their_decisions():
    rng = np.random.default_rng(0)
    top1 = TopOneAgreement()
    scores = rng.standard_normal((3, 2, 5))
    top1.update(scores, scores)
    assert top1.decisions() == 6  # 3 x 2 positions, one class pick each
    seq = SequenceAgreement()
    seq.update(rng.standard_normal((4, 7, 3)), rng.standard_normal((4, 7, 3)))
    assert seq.decisions() == 4  # decoded rows
    region = RegionAgreement()
    maps = np.zeros((1, 1, 8, 8), np.float32)
    maps[..., 0:2, 0:2] = 0.9
    maps[..., 5:7, 5:7] = 0.9
    region.update(maps, maps)
    assert region.value() == 1.0 and region.decisions() == 2  # two regions each side: 2 pairs
    assert DetectionAgreement.per_decision == 2.0
    equal = Equal()
    equal.update(np.arange(4), np.arange(4))
    assert equal.decisions() is None


def _rows(n, kind="scores"):
    return [{"name": "y", "kind": kind, "decisions": n}]


def test_resolution_note_appears_only_when_one_flip_exceeds_the_budget():
    config = CheckConfig()
    assert resolution_note(_rows(26), config) == NOTE_26
    assert resolution_note(_rows(99), config).startswith("the check saw 99 decisions")
    assert resolution_note(_rows(100), config) is None  # one flip is exactly the 1 point allowed
    assert resolution_note(_rows(450), config) is None
    assert resolution_note(_rows(26), CheckConfig(min_agreement=0.95)) is None  # 3.8 < 5 points
    assert resolution_note(_rows(26), CheckConfig(min_agreement=1.0)) is None  # no loss allowed: seen exactly
    assert resolution_note(_rows(0), config) == ("the check saw no decision (top-1 agreement of output 'y'): "
                                                 "it cannot resolve any change; pass --eval with more data")
    assert resolution_note([{"name": "v", "kind": "values", "cosine": 1.0}], config) is None
    two = [{"name": "a", "kind": "sequence", "decisions": 8}, {"name": "b", "kind": "scores", "decisions": 30}]
    assert resolution_note(two, config).startswith(
        "the check saw 8 decisions (decoded-sequence agreement of output 'a'; also 'b'): "
        "it cannot resolve a change below 12.5 points")


def _scores_model(bias):
    """y = Softmax(x + bias) over 10 classes."""
    return make_proto([oh.make_node("Add", ["x", "b"], ["z"]), oh.make_node("Softmax", ["z"], ["y"], axis=-1)],
                      [("x", [1, 10])], [("y", [1, 10])], [("b", np.asarray(bias, np.float32).reshape(10))])


def _check(tmp_path, feeds, flips, config=None):
    """Check a candidate that changes the decision of exactly ``flips`` of ``feeds``."""
    reference = io.load_model(_scores_model(np.zeros(10)))
    rng = np.random.default_rng(7)
    data = [{"x": rng.standard_normal((1, 10)).astype(np.float32)} for _ in range(feeds)]
    for feed in data:  # class 0 never wins, class 1 wins by at least 1 ...
        feed["x"][0, 0] = -5.0
        feed["x"][0, 1] = feed["x"][0, 2:].max() + 1.0 + rng.random()
    for feed in data[:flips]:  # ... except in the first ``flips`` feeds, where class 0 is 2 behind
        feed["x"][0, 0] = feed["x"][0, 1] - 2.0
    candidate = tmp_path / f"cand_{feeds}_{flips}.onnx"
    onnx.save(_scores_model([2.5] + [0.0] * 9), candidate)  # class 0 gains 2.5: overtakes only there
    split = split_data(None, config or CheckConfig(), evaluation=Dataset(data, reference))
    return check_model(reference, candidate, split, config or CheckConfig())


def test_check_reports_decisions_and_the_line_without_changing_the_verdict(tmp_path):
    clean = _check(tmp_path, 26, 0)
    row = clean["outputs"][0]
    assert row["kind"] == "scores" and row["top1_agreement"] == 1.0
    assert row["decisions"] == 26 and row["resolution"] == pytest.approx(1 / 26)
    assert clean["met"] and clean["resolution_note"] == NOTE_26
    flipped = _check(tmp_path, 26, 1)
    assert flipped["outputs"][0]["top1_agreement"] == pytest.approx(25 / 26)
    assert not flipped["met"] and flipped["resolution_note"] == NOTE_26
    fine = _check(tmp_path, 60, 0, CheckConfig(min_agreement=0.98))
    assert fine["outputs"][0]["decisions"] == 60 and fine["met"] and fine["resolution_note"] is None
    one_in_sixty = _check(tmp_path, 60, 1, CheckConfig(min_agreement=0.98))
    assert one_in_sixty["outputs"][0]["top1_agreement"] == pytest.approx(59 / 60)
    assert one_in_sixty["met"] and one_in_sixty["resolution_note"] is None


@pytest.fixture
def work(tmp_path):
    for name in ("digits_mlp.onnx", "digits_calib.npz", "digits_eval.npz", "digits_eval_labels.npy"):
        shutil.copy(MODELS / name, tmp_path / name)
    return tmp_path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_states_the_resolution_in_terminal_json_and_html(work, capsys):
    base = ("quantize", work / "digits_mlp.onnx", "--calibration", work / "digits_calib.npz")
    code, out, err = _run(capsys, *base, "-o", work / "q.onnx", "--json")
    assert code == 0, err
    check = json.loads(out)["check"]
    assert check["data"]["check_feeds"] == 40 and check["outputs"][0]["decisions"] == 40
    assert check["outputs"][0]["resolution"] == pytest.approx(0.025)
    assert check["resolution_note"] == ("the check saw 40 decisions (top-1 agreement of output 'logits'): it cannot "
                                        "resolve a change below 2.5 points where the budget allows 1 point; "
                                        "pass --eval with more data")
    code, out, err = _run(capsys, *base, "-o", work / "q2.onnx")
    assert code == 0, err
    assert check["resolution_note"] in " ".join(out.split())
    # labelled evaluation data: all 450 samples are checked, fine enough for the budget
    labelled = ("--eval", work / "digits_eval.npz", "--labels", work / "digits_eval_labels.npy")
    code, out, err = _run(capsys, *base, *labelled, "-o", work / "q3.onnx", "--json")
    assert code == 0, err
    check = json.loads(out)["check"]
    assert check["outputs"][0]["decisions"] == 450 and check["resolution_note"] is None
    code, out, err = _run(capsys, *base, *labelled, "-o", work / "q4.onnx")
    assert code == 0, err
    assert "check passed" in out and "the check saw" not in out
    # the HTML report of compress carries the check and its line
    code, out, err = _run(capsys, "compress", work / "digits_mlp.onnx", "-o", work / "c.onnx", "--recipe", "int8",
                          "--calibration", work / "digits_calib.npz", "--report", work / "r.html")
    assert code == 0, err
    page = (work / "r.html").read_text()
    assert "Held-out check" in page and "the check saw 40 decisions" in page
    code, out, err = _run(capsys, "compress", work / "digits_mlp.onnx", "-o", work / "c2.onnx", "--recipe", "int8",
                          "--calibration", work / "digits_calib.npz", *labelled, "--report", work / "r2.html")
    assert code == 0, err
    page = (work / "r2.html").read_text()
    assert "Held-out check" in page and "check passed" in page and "the check saw" not in page
