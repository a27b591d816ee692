"""Design questions of the twelfth session: five places where the commands (quantize in static,
dynamic and weight-only modes, prune, cluster, compress, and the Python API) behaved differently
on the same input, each settled once for all of them and checked on a seeded model built here."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import make_proto
from test_review_eleventh import _cli

from onnxcomp import io
from onnxcomp.runtime import run_model




def _json(capsys, *argv):
    code, out, err = _cli(capsys, *argv, "--json")
    return code, (json.loads(out) if out.strip() else None), err


#: every writing command, as (argv after MODEL -o OUT, what its report counts)
COMMANDS = {
    "static": ["quantize", "--calibration", "CALIB", "--no-fallback"],
    "dynamic": ["quantize", "--mode", "dynamic", "--op-types", "Conv,Gemm,MatMul"],
    "weight-only": ["quantize", "--mode", "weight-only", "--bits", "8"],
    "prune": ["prune", "--ratio", "0.5", "--calibration", "CALIB"],
    "cluster": ["cluster", "--min-elements", "16", "--data", "CALIB"],
    "compress": ["compress", "--calibration", "CALIB"],
}


def _argv(name, model, out, calib):
    command, *rest = COMMANDS[name]
    return [command, model, "-o", out, *[calib if a == "CALIB" else a for a in rest]]


# ---------------------------------------------------------------------------------------------
# 1. Initializers also listed as graph inputs (IR < 4; exporters told to keep them there):
#    static mode quantized them but kept their float originals as inputs (the written model was
#    bigger than the input: 2x the weight elements), dynamic and weight-only mode skipped their
#    nodes ("its weight is also a graph input"), cluster left them alone and prune found no group
#    (exit 1). onnxruntime takes them as defaults a caller may replace; a compressor compresses
#    weights: every command now treats them as constants, the written model no longer lists them
#    as inputs (as onnxruntime's remove_initializer_from_input tool does), and a note says so.


def _conv_net(rng, path, ir_version):
    """Conv -> Relu -> Flatten -> Gemm; every initializer also a graph input."""
    weights = [("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
               ("b1", rng.standard_normal(8).astype(np.float32)),
               ("w2", rng.standard_normal((10, 8 * 6 * 6)).astype(np.float32)), ("b2", np.zeros(10, np.float32))]
    proto = make_proto(
        [oh.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv"), oh.make_node("Relu", ["h"], ["r"], name="relu"),
         oh.make_node("Flatten", ["r"], ["f"], name="flat"),
         oh.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc")],
        [("x", [1, 3, 8, 8])] + [(n, list(a.shape)) for n, a in weights], [("y", [1, 10])], weights,
        opset=7 if ir_version < 4 else 13)
    proto.ir_version = ir_version
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return proto


INPUT_WEIGHTS_NOTE = ("4 weight(s) were also listed as graph inputs ('w1', 'b1', 'w2', 'b2'), as IR < 4 models and "
                      "some exporters list them; onnxruntime takes them as defaults a caller may replace: they are "
                      "compressed as constant weights, and the written model no longer lists them as inputs")


def test_working_copy_detaches_initializer_inputs_exactly(rng, tmp_path):
    from onnxcomp.graph import working_copy

    proto = _conv_net(rng, tmp_path / "m.onnx", 3)
    notes: list[str] = []
    work = working_copy(proto, 7, allow_upgrade=False, notes=notes)
    assert [v.name for v in work.graph.inputs] == ["x"] and work.ir_version == 4
    assert sorted(work.graph.initializers) == ["b1", "b2", "w1", "w2"]
    assert notes == [INPUT_WEIGHTS_NOTE]
    onnx.checker.check_model(onnx.load_from_string(io.model_to_bytes(work)))
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    want, got = run_model(io.load_model(proto), feeds), run_model(work, feeds)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b[0], a[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("ir_version", [3, 8])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_compresses_initializer_inputs_as_weights(rng, tmp_path, capsys, command, ir_version):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    _conv_net(rng, model, ir_version)
    np.savez(calib, x=rng.standard_normal((20, 3, 8, 8)).astype(np.float32))
    code, report, err = _json(capsys, *_argv(command, model, out, calib))
    assert code == 0, err
    assert INPUT_WEIGHTS_NOTE in report["notes"]
    assert not report.get("skipped") or not any("graph input" in str(v) for v in report["skipped"].values())
    written = onnx.load(out)
    assert [i.name for i in written.graph.input] == ["x"] and written.ir_version >= 4
    onnx.checker.check_model(written)
    # the weights were compressed, not kept beside their compressed form (static mode kept both:
    # 6,228 float weight elements written for 3,114 read)
    floats = sum(int(np.prod(t.dims)) for t in written.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert floats <= 3114 if command == "cluster" else floats < 3114
    counted = {"static": 2, "dynamic": 2, "weight-only": 1, "prune": None, "cluster": 2, "compress": None}[command]
    if command == "prune":
        assert report["channels_removed"] == 4
    elif command == "compress":
        assert report["check"]["compressed"]["count"] == 2
    else:
        assert report["check"]["compressed"]["count"] == counted
    assert "appears in graph inputs" not in err  # onnxruntime's warning about the original is not shown


def test_data_may_not_feed_a_weight_listed_as_an_input(rng, tmp_path, capsys):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    _conv_net(rng, model, 3)
    np.savez(calib, x=rng.standard_normal((12, 3, 8, 8)).astype(np.float32),
             w2=np.zeros((12, 10, 288), np.float32))
    for argv in (_argv("static", model, out, calib), _argv("prune", model, out, calib)):
        code, text, err = _cli(capsys, *argv)
        assert code == 1 and not out.exists() and text == ""
        assert err == (f"onnxcomp: error: {calib}: 'w2' is a weight of the model (an initializer, also listed as a "
                       "graph input as IR < 4 models list them): onnxcomp compresses it as a constant, which the "
                       "data cannot replace; drop it from the data\n")


# ---------------------------------------------------------------------------------------------
# 5. Duplicate node names (legal ONNX; onnxruntime refuses the graph): static quantize wrote its
#    output and then stopped (its fallback could not open the original: exit 1), dynamic and
#    weight-only mode and prune wrote an output whose check said "could not be compared", cluster
#    and compress refused the input. The copies are now renamed on load (the first node keeps the
#    name; 'a' -> 'a_1', ...), the report says which, and an exclude naming such a name excludes
#    every node the model called so.


def _twins(rng, path=None):
    proto = make_proto(
        [oh.make_node("MatMul", ["x", "w"], ["h"], name="a"), oh.make_node("Relu", ["h"], ["r"], name="a"),
         oh.make_node("MatMul", ["r", "w2"], ["h2"], name="b"), oh.make_node("Relu", ["h2"], ["r2"], name=""),
         oh.make_node("MatMul", ["r2", "w3"], ["y"], name="b")],
        [("x", ["N", 32])], [("y", ["N", 8])],
        [("w", rng.standard_normal((32, 16)).astype(np.float32)), ("w2", rng.standard_normal((16, 16)).astype(np.float32)),
         ("w3", rng.standard_normal((16, 8)).astype(np.float32))],
    )
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, path)
    return proto


TWINS_NOTE = ("2 node(s) had the name of another node of their graph, which onnxruntime refuses: renamed "
              "'a' -> 'a_1', 'b' -> 'b_1'; an exclude naming such a name excludes all its nodes")


def test_duplicate_node_names_are_renamed_on_load_exactly(rng):
    proto = _twins(rng)
    model = io.load_model(proto)
    assert [n.name for n in model.graph] == ["a", "a_1", "b", "", "b_1"]
    assert io.renamed_nodes(model) == {"a": ["a_1"], "b": ["b_1"]}
    assert io.renamed_nodes(io.clone_model(model)) == {"a": ["a_1"], "b": ["b_1"]}
    by_hand = onnx.ModelProto()
    by_hand.CopyFrom(proto)
    by_hand.graph.node[1].name, by_hand.graph.node[4].name = "a_1", "b_1"
    feeds = [{"x": rng.standard_normal((3, 32)).astype(np.float32)}]
    np.testing.assert_allclose(run_model(model, feeds)[0][0], run_model(io.load_model(by_hand), feeds)[0][0],
                               rtol=0, atol=1e-5)
    # a taken suffix is skipped; names in different graphs are no duplicates
    proto.graph.node[3].name = "a_1"
    assert [n.name for n in io.load_model(proto).graph] == ["a", "a_2", "b", "a_1", "b_1"]


TWIN_COMMANDS = {
    "static": ["quantize", "--calibration", "CALIB", "--no-fallback", "--exclude", "b"],
    "dynamic": ["quantize", "--mode", "dynamic", "--exclude", "b"],
    "weight-only": ["quantize", "--mode", "weight-only", "--bits", "8", "--block-size", "16", "--exclude", "b"],
    "prune": ["prune", "--ratio", "0.5", "--calibration", "CALIB", "--exclude", "a"],
    "cluster": ["cluster", "--min-elements", "16", "--data", "CALIB", "--exclude", "b"],
    "compress": ["compress", "--calibration", "CALIB", "--set", "quantize.exclude=b"],
}


@pytest.mark.parametrize("command", list(TWIN_COMMANDS))
def test_every_command_takes_duplicate_node_names_and_excludes_all_copies(rng, tmp_path, capsys, command):
    model, calib, out = tmp_path / "twins.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    proto = _twins(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    name, *rest = TWIN_COMMANDS[command]
    code, report, err = _json(capsys, name, model, "-o", out, *[calib if a == "CALIB" else a for a in rest])
    assert code == 0, err
    assert TWINS_NOTE in report["notes"]
    assert report["check"]["checked"]  # the original runs in onnxruntime: compared
    assert not any("could not be compared" in p for p in report["check"]["problems"])
    if command != "compress":  # compress reports the recipe as given
        assert report["config"]["exclude"] == (["a", "a_1"] if command == "prune" else ["b", "b_1"])
    written = onnx.load(out)
    assert len({n.name for n in written.graph.node}) == len(written.graph.node)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    if command == "prune":
        assert report["channels_removed"] == 8  # b's 16 outputs halved; a's (excluded) kept
        return
    # both nodes the model called 'b' kept their float weights, bit for bit
    for name in ("w2", "w3"):
        np.testing.assert_array_equal(weights[name], onnx.numpy_helper.to_array(
            next(t for t in proto.graph.initializer if t.name == name)))
    assert report["check"]["compressed"]["count"] >= 1  # 'a' was compressed


def test_the_python_api_renames_an_onnx_ir_models_duplicates_too(rng):
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    import onnx_ir as ir

    model = ir.serde.deserialize_model(_twins(rng))
    assert [n.name for n in model.graph] == ["a", "a", "b", "", "b"]
    work, report = quantize(model, None, QuantizeConfig(mode="dynamic", exclude=("b",)), verify=False)
    assert TWINS_NOTE in report["notes"] and report["nodes_quantized"] == 1
    assert [n.name for n in model.graph] == ["a", "a", "b", "", "b"]  # the input is untouched


# ---------------------------------------------------------------------------------------------
# 3. `prune` of a model with nothing to prune stopped with exit 1 ("no prunable channel groups
#    found ... nothing written") while quantize and cluster write the model, say "nothing was
#    compressed" and why, and exit 0 (3 under --strict). prune now follows the same rule; and
#    when an exclude covers every group it says so (it said "raise --ratio").


def _no_weights(path):
    onnx.save(make_proto([oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Neg", ["r"], ["y"])],
                         [("x", ["N", 8])], [("y", ["N", 8])]), path)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("argv", [["prune"], ["quantize", "--mode", "dynamic"], ["cluster"]], ids=lambda a: a[0])
def test_a_run_that_compresses_nothing_is_written_and_said(rng, tmp_path, capsys, argv, strict):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    _no_weights(model)
    np.savez(calib, x=rng.standard_normal((12, 8)).astype(np.float32))
    data = ["--data" if argv[0] == "cluster" else "--calibration", calib]
    code, report, err = _json(capsys, argv[0], model, "-o", out, *argv[1:], *data, *(["--strict"] if strict else []))
    assert code == (3 if strict else 0)
    # --json: the missed check is still one warning line on stderr
    assert err.startswith("onnxcomp: warning: CHECK FAILED") and "nothing was compressed" in err and err.count("\n") == 1
    check = report["check"]
    assert check["checked"] and not check["met"] and check["compressed"]["count"] == 0
    assert check["problems"][0].startswith("nothing was compressed (0 ")
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32)}]
    np.testing.assert_allclose(run_model(io.load_model(out), feeds)[0][0], -np.maximum(feeds[0]["x"], 0), atol=1e-5)
    if argv[0] == "prune":
        why = ("the model has no prunable channel group (no output channel of a Conv, Gemm or MatMul weight whose "
               "readers can all be cut with it; 0 parameters)")
        assert check["problems"] == [f"nothing was compressed (0 channels removed): {why}"]
        assert report["notes"][-1] == f"nothing was pruned (0 channels removed): {why}"


def test_prune_says_when_the_exclude_covers_every_group(rng, tmp_path, capsys):
    model, out = tmp_path / "twins.onnx", tmp_path / "p.onnx"
    _twins(rng, model)
    code, report, _ = _json(capsys, "prune", model, "-o", out, "--exclude", "b", "--strict")
    assert code == 3 and out.exists()
    assert report["check"]["problems"][0] == ("nothing was compressed (0 channels removed): every group that could be "
                                              "cut (1, 2) touches a node --exclude names")


def test_prune_of_an_already_quantized_model_says_so_and_writes_it(rng, tmp_path, capsys):
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    model, out = tmp_path / "q.onnx", tmp_path / "p.onnx"
    quantized, _ = quantize(_twins(rng), None, QuantizeConfig(mode="dynamic"), verify=False)
    io.save_model(quantized, model)
    code, report, err = _json(capsys, "prune", model, "-o", out)
    assert code == 0 and out.exists(), err
    assert report["check"]["problems"][0] == ("nothing was compressed (0 channels removed): the model is already "
                                              "quantized (MatMulInteger x3): prune its float original")
    # a bad input is still an error, and nothing is written
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    code, _, err = _cli(capsys, "prune", tmp_path / "broken.onnx", "-o", tmp_path / "b.onnx")
    assert code == 1 and err.startswith("onnxcomp: error: ") and not (tmp_path / "b.onnx").exists()


# ---------------------------------------------------------------------------------------------
# 2. A check whose outputs were empty on every feed (a Slice that selects nothing, a detector
#    finding nothing in any check image) compared nothing, and read "check passed ... cosine
#    1.0000, SQNR inf dB" (exit 0 under --strict); compress stopped with exit 1 ("output 'y' is
#    empty ... nothing to compare"). The verdict is now "not checked", said why, and meets no
#    budget: exit 3 under --strict, as a run that compressed nothing, in every command.


def _empty_output(rng, path, extra_output=False):
    nodes = [oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             oh.make_node("Relu", ["h"], ["hr"], name="relu"),
             oh.make_node("Gemm", ["hr", "w2", "b2"], ["z"], transB=1, name="fc2"),
             oh.make_node("Slice", ["z", "st", "en", "ax"], ["y"], name="cut")]
    outputs = [("y", ["N", 0])] + ([("z", ["N", 10])] if extra_output else [])
    proto = make_proto(
        nodes, [("x", ["N", 32])], outputs,
        [("w1", rng.standard_normal((64, 32)).astype(np.float32)), ("b1", np.zeros(64, np.float32)),
         ("w2", rng.standard_normal((10, 64)).astype(np.float32)), ("b2", np.zeros(10, np.float32)),
         ("st", np.array([3], np.int64)), ("en", np.array([3], np.int64)), ("ax", np.array([1], np.int64))])
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


NOT_CHECKED = ("not checked: every output was empty on every check feed ('y' [1, 0]) in both models: nothing was "
               "compared; give data on which the model outputs something")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_check_that_compared_nothing_is_not_checked_and_meets_no_budget(rng, tmp_path, capsys, command):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    _empty_output(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    argv = _argv(command, model, out, calib)
    code, report, err = _json(capsys, *argv, "--strict")
    assert code == 3, err
    check = report["check"]
    assert check["verdict"] == "not checked" and check["checked"] is False and check["met"] is False
    assert NOT_CHECKED in check["problems"] and check["blame"] == []
    assert out.exists()  # written (onnxruntime ran it on every check feed), only not checked
    code, text, _ = _cli(capsys, *argv, "--force")
    text = " ".join(text.split())
    assert code == 0 and "check passed" not in text and "budget met" not in text
    assert f"NOT CHECKED on {check['data']['source']}" in text and NOT_CHECKED.removeprefix("not checked: ") in text


def test_an_output_empty_on_every_feed_beside_others_is_named_and_left_out(rng, tmp_path, capsys):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    _empty_output(rng, model, extra_output=True)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    code, report, err = _json(capsys, "quantize", model, "-o", out, "--mode", "dynamic", "--calibration", calib,
                              "--min-agreement", "0.5", "--strict")
    check = report["check"]
    assert code == 0 and check["verdict"] == "passed" and check["checked"], err
    rows = {row["name"]: row for row in check["outputs"]}
    assert rows["y"]["compared"] is False and rows["y"]["empty_shape"] == [1, 0]
    assert "compared" not in rows["z"] and rows["z"]["cosine"] > 0.99
    assert check["empty_note"] == ("output 'y' [1, 0] was empty on every check feed in both models: not compared "
                                   "(the verdict reads the other outputs)")


def test_the_verdict_of_the_check_api(rng, tmp_path):
    from onnxcomp.check import CheckConfig, check_model, split_data, verdict_line
    from onnxcomp.data import Dataset

    _empty_output(rng, tmp_path / "m.onnx")
    reference = io.load_model(tmp_path / "m.onnx")
    data = Dataset([{"x": rng.standard_normal((2, 32)).astype(np.float32)} for _ in range(3)], reference)
    split = split_data(data, CheckConfig(), evaluation=data, model=reference)
    report = check_model(reference, io.load_model(tmp_path / "m.onnx"), split, compressed=1)
    assert report["verdict"] == "not checked" and report["problems"] == [NOT_CHECKED.replace("[1, 0]", "[2, 0]")]
    assert verdict_line(report).startswith("NOT CHECKED on ")
    # no data: not checked either (it read "CHECK FAILED ...: not checked: no data")
    split = split_data(None, CheckConfig(), model=reference)
    split.check = None
    report = check_model(reference, reference, split, compressed=1)
    assert report["verdict"] == "not checked" and verdict_line(report).startswith("NOT CHECKED on ")


# ---------------------------------------------------------------------------------------------
# 4. Labels given for an output that holds no class per sample (a regression [N, 1], a detector
#    head, features) were taken silently: the arg-max of one column is always 0, so "accuracy"
#    was the share of label 0 on both models, and the budget met. They are now refused naming the
#    output and its shape: before any work where the graph declares it, from the array the
#    original returned where it does not (a symbolic class axis: then the output was written, and
#    the error says it was not checked, as for other check data found bad only while read).


def _regression(rng, path, classes_dim=1):
    proto = make_proto(
        [oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"), oh.make_node("Relu", ["h"], ["hr"]),
         oh.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1, name="fc2")],
        [("x", ["N", 32])], [("y", ["N", classes_dim])],
        [("w1", rng.standard_normal((64, 32)).astype(np.float32)), ("b1", np.zeros(64, np.float32)),
         ("w2", rng.standard_normal((1, 64)).astype(np.float32)), ("b2", np.zeros(1, np.float32))])
    onnx.save(proto, path)


def _labels_refused(shape, what, declared=True):
    return (f"onnxcomp: error: --labels: output 'y' {'declares' if declared else 'returned'} {shape}: {what}; labels "
            "are one class index per sample, read from the model's first output when it holds class scores (a "
            "Softmax/LogSoftmax, or [N, C] with C >= 2) or predicted labels (an integer [N]); drop --labels (the "
            "outputs are compared without them)")


@pytest.mark.parametrize("command", [*COMMANDS, "compare"])
def test_labels_for_a_regression_output_are_refused_before_any_work(rng, tmp_path, capsys, command):
    model, calib, labels, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "l.npy", tmp_path / "o.onnx"
    _regression(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    np.save(labels, np.zeros(20, np.int64))  # all label 0: the arg-max of [N, 1] is 0, "100% accuracy"
    if command == "compare":
        argv = ["compare", model, model, "--data", calib, "--labels", labels]
    else:
        argv = _argv(command, model, out, calib) + (["--labels", labels] if command == "cluster" else
                                                     ["--eval", calib, "--labels", labels])
    code, text, err = _cli(capsys, *argv)
    assert code == 1 and text == "" and not out.exists()
    shape = "[1, 1]" if command == "compare" else "[?, 1]"
    assert err == _labels_refused(shape, "values (a regression, boxes, features: not class scores)",
                                  declared=command != "compare") + "\n"


def test_labels_for_an_undeclared_class_axis_are_refused_by_the_check(rng, tmp_path, capsys):
    model, calib, labels, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "l.npy", tmp_path / "o.onnx"
    _regression(rng, model, classes_dim="C")  # [N, C] declares class scores; it returns [N, 1]
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    np.save(labels, np.zeros(20, np.int64))
    code, _, err = _cli(capsys, "quantize", model, "-o", out, "--mode", "dynamic", "--eval", calib, "--labels", labels)
    assert code == 1
    assert err == (_labels_refused("[1, 1]", "values (a regression, boxes, features: not class scores)", declared=False)
                   + f"; {out} was written but not checked\n")


@pytest.mark.parametrize("kind, shape, refused", [
    ("scores", [None, 10], None), ("scores", [None, 7, 5], None),  # Softmax over classes, per token
    ("exact", [None], None), ("exact", [None, 1], None),  # predicted labels (sklearn's label output)
    ("values", [None, 1], "values (a regression, boxes, features: not class scores)"),
    ("detections", [None, 84, 8400], "a detector head (boxes and class scores per anchor), not class scores per sample"),
    ("map", [None, 1, 64, 64], "a probability map (Sigmoid per pixel), not class scores"),
    ("sequence", [None, 40, 97], "a sequence (scores per step), not class scores per sample"),
    ("exact", [None, 16], "integer values, not one predicted label per sample"),
])
def test_which_outputs_labels_can_be_read_from(kind, shape, refused):
    from onnxcomp.check import check_labels_fit
    from onnxcomp.errors import DataError

    if refused is None:
        check_labels_fit(kind, shape, "y", declared=True)
        return
    with pytest.raises(DataError) as info:
        check_labels_fit(kind, shape, "y", declared=True)
    dims = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
    assert f"onnxcomp: error: {info.value}" == _labels_refused(dims, refused)


def test_labels_for_a_detector_head_are_refused_by_name(rng, tmp_path, capsys):
    model, calib, labels = tmp_path / "det.onnx", tmp_path / "c.npz", tmp_path / "l.npy"
    proto = make_proto(
        [oh.make_node("Conv", ["x", "wb"], ["boxes"], name="box_conv"), oh.make_node("Conv", ["x", "wc"], ["cls"]),
         oh.make_node("Sigmoid", ["cls"], ["scores"]), oh.make_node("Concat", ["boxes", "scores"], ["c4"], axis=1),
         oh.make_node("Reshape", ["c4", "to"], ["y"])],
        [("x", ["N", 8, 4, 4])], [("y", ["N", 7, 16])],
        [("wb", rng.standard_normal((4, 8, 1, 1)).astype(np.float32)),
         ("wc", rng.standard_normal((3, 8, 1, 1)).astype(np.float32)), ("to", np.array([0, 7, 16], np.int64))])
    onnx.save(proto, model)
    np.savez(calib, x=rng.standard_normal((12, 8, 4, 4)).astype(np.float32))
    np.save(labels, np.zeros(12, np.int64))
    code, _, err = _cli(capsys, "cluster", model, "-o", tmp_path / "o.onnx", "--data", calib, "--labels", labels)
    assert code == 1 and not (tmp_path / "o.onnx").exists()
    assert err == _labels_refused("[?, 7, 16]", "a detector head (boxes and class scores per anchor), not class "
                                                "scores per sample") + "\n"
