"""The held-out check of every lossy command (onnxcomp.check)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.check import CheckConfig, check_model, output_kinds, split_data, verdict_line
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError


@pytest.fixture
def work(tmp_path):
    for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_eval.npz", "digits_eval_labels.npy"):
        shutil.copy(MODELS / name, tmp_path / name)
    return tmp_path


def _feeds(n):
    return [{"x": np.full((1, 2, 4), float(i), np.float32)} for i in range(n)]


def _identity_model():
    return io.load_model(make_proto([oh.make_node("Relu", ["x"], ["y"])], [("x", [1, 2, 4])], [("y", [1, 2, 4])]))


def test_split_holds_out_every_fifth_feed():
    model = _identity_model()
    split = split_data(Dataset(_feeds(23), model), CheckConfig())
    fit = [int(f["x"][0, 0, 0]) for f in split.fit]
    check = [int(f["x"][0, 0, 0]) for f in split.check]
    assert check == [4, 9, 14, 19]
    assert fit == [i for i in range(23) if i not in check]
    assert split.held_out and (split.fit_feeds, split.check_feeds) == (19, 4)
    capped = split_data(Dataset(_feeds(40), model), CheckConfig(fraction=0.25, max_feeds=3))
    assert [int(f["x"][0, 0, 0]) for f in capped.check] == [3, 7, 11]
    assert capped.fit_feeds == 37 and len(list(capped.fit)) == 37


def test_too_few_feeds_are_checked_in_sample_and_said_so():
    model = _identity_model()
    split = split_data(Dataset(_feeds(6), model), CheckConfig())
    assert not split.held_out and split.check_feeds == 6 and "not held out" in split.rule
    report = check_model(model, model, split)
    assert report["met"] and "NOT held out" in verdict_line(report)


def test_eval_data_is_the_check_and_no_data_is_random_inputs():
    model = _identity_model()
    ev = Dataset(_feeds(5), model)
    split = split_data(Dataset(_feeds(30), model), CheckConfig(), evaluation=ev)
    assert [f["x"][0, 0, 0] for f in split.check] == [0, 1, 2, 3, 4]
    assert len(list(split.fit)) == 30 and split.held_out
    synthetic = split_data(None, CheckConfig(), model=model)
    assert synthetic.check_feeds == 8 and "sanity check" in synthetic.source


def test_output_kinds():
    proto = make_proto(
        [oh.make_node("Softmax", ["x"], ["s3"]), oh.make_node("Gemm", ["v", "w"], ["logits"]),
         oh.make_node("Sigmoid", ["x"], ["map"]), oh.make_node("ArgMax", ["x"], ["idx"], axis=-1)],
        [("x", [1, 5, 7]), ("v", [1, 3])],
        [("s3", [1, 5, 7]), ("logits", [1, 4]), ("map", [1, 5, 7]), ("idx", [1, 5, 1], 7)],
        [("w", np.ones((3, 4), np.float32))],
    )
    # an ArgMax's indices are decided classes, judged by agreement as scores' top-1 is (thirteenth session)
    assert output_kinds(io.load_model(proto)) == {"s3": "sequence", "logits": "scores", "map": "values", "idx": "labels"}


def test_budget_rules_and_nothing_compressed():
    model = _identity_model()
    split = split_data(Dataset(_feeds(20), model), CheckConfig())
    same = check_model(model, model, split, compressed=0, what="int8 nodes", nothing_why="no MatMul")
    assert not same["met"] and same["problems"] == ["nothing was compressed (0 int8 nodes): no MatMul"]
    assert same["outputs"][0]["ok"] and same["outputs"][0]["rule"] == "cosine >= 0.985"
    neg = io.load_model(make_proto([oh.make_node("Neg", ["x"], ["y"])], [("x", [1, 2, 4])], [("y", [1, 2, 4])]))
    bad = check_model(model, neg, split, compressed=3)
    assert not bad["met"] and bad["outputs"][0]["cosine"] == pytest.approx(-1.0)
    assert bad["problems"][0].startswith("output 'y': cosine -1.0000")
    with pytest.raises(ConfigError, match="fraction"):
        CheckConfig(fraction=0.9)
    with pytest.raises(ConfigError, match="min_cosine"):
        CheckConfig(min_cosine=float("nan"))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, " ".join(out.split()) if not out.lstrip().startswith("{") else out, err


def test_quantize_checks_the_written_file(work, capsys):
    code, out, err = _run(capsys, "quantize", work / "digits_cnn.onnx", "-o", work / "q.onnx", "--calibration",
                          work / "digits_calib.npz", "--strict", "--json")
    assert code == 0, err
    check = json.loads(out)["check"]
    assert check["met"] and check["data"]["held_out"] and check["data"]["check_feeds"] == 40
    assert check["data"]["fit_feeds"] == 160 and check["outputs"][0]["kind"] == "scores"
    assert check["outputs"][0]["top1_agreement"] >= 0.99
    code, out, err = _run(capsys, "quantize", work / "digits_cnn.onnx", "-o", work / "q2.onnx", "--calibration",
                          work / "digits_calib.npz", "--eval", work / "digits_eval.npz", "--labels",
                          work / "digits_eval_labels.npy")
    assert code == 0, err
    assert "check passed on evaluation data" in out and "accuracy 99.33% (original 99.33%)" in out


def test_broken_cluster_is_flagged_and_strict_exits_3(work, capsys):
    args = ["cluster", work / "digits_cnn.onnx", "-o", work / "c1.onnx", "--bits", "1", "--min-elements", "16",
            "--data", work / "digits_eval.npz", "--labels", work / "digits_eval_labels.npy"]
    code, out, err = _run(capsys, *args)
    assert code == 0 and "CHECK FAILED" in out and "accuracy" in out
    code, out, err = _run(capsys, *args, "--strict", "--json")
    assert code == 3
    report = json.loads(out)
    assert not report["check"]["met"] and report["check"]["accuracy"]["drop_points"] > 1.0
    assert report["check"]["blame"]  # the tensors most likely to blame are named
    # --json keeps stdout one JSON document; the missed check is still one warning line on stderr
    assert err.startswith("onnxcomp: warning: CHECK FAILED on evaluation data") and err.count("\n") == 1
    code, out, err = _run(capsys, *args, "--json", "--quiet")
    assert code == 0 and not json.loads(out)["check"]["met"] and err == ""
    code, out, err = _run(capsys, "quantize", work / "digits_cnn.onnx", "-o", work / "q.onnx", "--calibration",
                          work / "digits_calib.npz", "--json")
    assert code == 0 and json.loads(out)["check"]["met"] and "warning" not in err


@pytest.mark.parametrize("argv, what", [
    (["quantize", "--calibration", "digits_calib.npz", "--op-types", "LSTM"], "int8 nodes"),
    (["prune", "--criterion", "zeros"], "channels removed"),
    (["cluster", "--min-elements", "100000000"], "tensors clustered"),
])
def test_nothing_compressed_is_said_and_strict_exits_3(work, capsys, argv, what):
    command, *rest = argv
    rest = [str(work / a) if a.endswith(".npz") else a for a in rest]
    code, out, err = _run(capsys, command, work / "digits_cnn.onnx", "-o", work / "o.onnx", *rest, "--strict")
    assert code == 3, err
    assert f"nothing was compressed (0 {what})" in out


def test_fallback_never_meets_a_budget_with_nothing_int8(work, capsys):
    code, out, err = _run(capsys, "quantize", work / "digits_cnn.onnx", "-o", work / "f.onnx", "--calibration",
                          work / "digits_calib.npz", "--fidelity-target", "200", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["fallback"]["met"] is False and report["check"]["met"] is False


def test_strict_and_no_check_conflict(work, capsys):
    code, _, err = _run(capsys, "quantize", work / "digits_cnn.onnx", "-o", work / "x.onnx", "--calibration",
                        work / "digits_calib.npz", "--strict", "--no-check")
    assert code == 1 and "--strict needs the check" in err


def _outlier_chain(rng):
    """x @ W1 -> y1 (one column 300x larger) @ W2 -> y2 @ W3 -> out: int8 y1 crushes its other columns."""
    w1 = rng.standard_normal((16, 16)).astype(np.float32)
    w1[:, 3] *= 300.0
    w2 = rng.standard_normal((16, 16)).astype(np.float32)
    w2[3, :] /= 300.0
    w3 = rng.standard_normal((16, 8)).astype(np.float32)
    return make_proto(
        [oh.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"), oh.make_node("MatMul", ["y1", "w2"], ["y2"], name="mm2"),
         oh.make_node("MatMul", ["y2", "w3"], ["out"], name="mm3")],
        [("x", [1, 2, 16])], [("out", [1, 2, 8])], [("w1", w1), ("w2", w2), ("w3", w3)])


def test_automatic_fallback_floats_the_damaging_node_first(rng):
    from onnxcomp.quant.autofallback import fallback_to_budget
    from onnxcomp.quant.config import QuantizeConfig
    from onnxcomp.quant.sensitivity import QuantStudy

    proto = _outlier_chain(rng)
    fit = [{"x": rng.standard_normal((1, 2, 16)).astype(np.float32)} for _ in range(16)]
    study = QuantStudy.prepare(proto, fit, QuantizeConfig())
    model, report = fallback_to_budget(study, CheckConfig(min_cosine=0.999), max_float_fraction=0.5)
    assert report["met_on_fitting_data"] and report["float_nodes"] == ["mm2"]
    assert report["damage"]["mm2"] > 0.1 and sorted(report["int8_nodes"]) == ["mm1", "mm3"]
    held = [{"x": rng.standard_normal((1, 2, 16)).astype(np.float32)} for _ in range(8)]
    ref = io.load_model(proto)
    split = split_data(None, CheckConfig(), evaluation=Dataset(held, ref))
    assert check_model(ref, model, split, CheckConfig(min_cosine=0.999), compressed=2)["met"]
    # a budget only all-float could meet is refused beyond the fraction: the all-int8 model comes back
    model, report = fallback_to_budget(study, CheckConfig(min_cosine=1.0), max_float_fraction=0.34)
    assert not report["met_on_fitting_data"] and report["float_nodes"] == [] and "all-int8 model is kept" in report["gave_up"]


def _reflect_padded(rng) -> object:
    """A MatMul on a frame of samples reflect-padded by 2: a free length of 1 (what generated
    feeds get) is too short for onnxruntime's reflect Pad."""
    return make_proto(
        [oh.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
         oh.make_node("ReduceMean", ["p"], ["m"], axes=[1], keepdims=1),
         oh.make_node("MatMul", ["m", "w"], ["y"])],
        [("x", [1, "n"])], [("y", [1, 4])],
        [("pads", np.array([0, 2, 0, 2], np.int64)), ("w", rng.standard_normal((1, 4)).astype(np.float32))],
        opset=17,
    )


def test_original_failing_on_generated_inputs_is_not_checked_not_an_error(rng):
    reference = io.load_model(_reflect_padded(rng))
    split = split_data(None, CheckConfig(), model=reference)
    assert split.generated and split.check is not None
    report = check_model(reference, io.load_model(_reflect_padded(rng)), split, compressed=1)
    assert report["checked"] is False and report["met"] is False
    assert len(report["problems"]) == 1
    assert report["problems"][0].startswith("not checked: the original model does not run on the generated inputs (")
    assert "reflect" in report["problems"][0] and "give data" in report["problems"][0]


def test_original_failing_on_given_data_is_still_an_error(rng):
    """With real data the same failure is the data's or the model's problem, not a skipped check."""
    reference = io.load_model(_reflect_padded(rng))
    data = Dataset([{"x": np.ones((1, 1), np.float32)}], reference)
    split = split_data(data, CheckConfig(), evaluation=data, model=reference)
    assert not split.generated
    with pytest.raises(Exception) as info:
        check_model(reference, io.load_model(_reflect_padded(rng)), split, compressed=1)
    assert "OriginalFailsOnGenerated" not in type(info.value).__name__
