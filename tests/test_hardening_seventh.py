"""Hardening, seventh round: output kinds of data-dependent outputs, ``--fix-shape`` sizes, a
written model onnxruntime refuses, constant calibration data on every calibrating path.

Every model is built here in code, seeded.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.check import CheckConfig, OutputFigures, check_model, output_kinds, split_data
from onnxcomp.data import Dataset
from onnxcomp.runtime import run_model

# ---------------------------------------------------------------------------------------------
# 1. the kind of an output whose shape depends on the data


def _steps_model(seed: int = 0):
    """CTC-style logits ``[1, K, 12]`` of the steps of ``x [1, 16, 8]`` whose largest feature is
    positive (``Compress``): K = 0 when every value is negative. Class 0 (the blank) tops most
    steps."""
    rng = np.random.default_rng(seed)
    w = (0.5 * rng.standard_normal((8, 12))).astype(np.float32)
    b = np.zeros(12, np.float32)
    b[0] = 3.0
    nodes = [
        oh.make_node("ReduceMax", ["x"], ["m"], axes=[2], keepdims=0),
        oh.make_node("Greater", ["m", "zero"], ["pos"]),
        oh.make_node("Squeeze", ["pos", "ax0"], ["cond"]),
        oh.make_node("Compress", ["x", "cond"], ["steps"], axis=1),
        oh.make_node("MatMul", ["steps", "w"], ["mm"], name="proj"),
        oh.make_node("Add", ["mm", "b"], ["y"]),
    ]
    inits = [("zero", np.array(0, np.float32)), ("ax0", np.array([0], np.int64)), ("w", w), ("b", b)]
    return io.load_model(make_proto(nodes, [("x", [1, 16, 8])], [("y", [1, "K", 12])], inits))


def _steps_feeds(n: int, empty: set[int], seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        x = rng.standard_normal((1, 16, 8)).astype(np.float32)
        feeds.append({"x": -np.abs(x) if i in empty else x})
    return feeds


def test_kind_is_judged_on_the_first_feed_with_data_whichever_comes_first():
    model = _steps_model()
    feeds = _steps_feeds(4, empty={0})
    refs = run_model(model, feeds)
    assert refs[0][0].shape == (1, 0, 12) and refs[1][0].shape == (1, 16, 12)
    # the written model drops one symbol: a step the original reads as a symbol reads as blank
    cands = [[r.copy() for r in ref] for ref in refs]
    steps = refs[1][0][0].argmax(-1)
    t = int(np.flatnonzero(steps != 0)[0])
    cands[1][0][0, t, 0] = refs[1][0][0, t].max() + 1.0
    kinds = output_kinds(model)
    results = []
    for order in ([0, 1, 2, 3], [1, 2, 3, 0]):  # the empty feed first (a fitting split), or later
        figures = OutputFigures(["y"], kinds)
        for i in order:
            figures.update(refs[i], cands[i], feeds[i])
        results.append((figures.kinds, figures.result()[0], figures.verdicts(CheckConfig())[0], figures.decisions()))
    (kinds_a, row_a, verdict_a, n_a), (kinds_b, row_b, verdict_b, n_b) = results
    assert kinds_a == kinds_b == ["sequence"]  # not "values" because the first array was empty
    assert row_a["cosine"] > 0.985  # the cosine rule would have passed it ...
    assert row_a["sequence_agreement"] == pytest.approx(row_b["sequence_agreement"])
    assert row_a["sequence_agreement"] < 0.99
    assert verdict_a[0] is verdict_b[0] is False  # ... the sequence rule fails it, in both orders
    assert n_a == n_b == [4]  # the empty feed's row counts as a decision in both orders


def test_only_empty_arrays_fall_back_to_the_first_of_them():
    model = _steps_model()
    feeds = _steps_feeds(2, empty={0, 1})
    refs = run_model(model, feeds)
    figures = OutputFigures(["y"], output_kinds(model))
    for feed, ref in zip(feeds, refs):
        figures.update(ref, ref, feed)
    assert figures.kinds == ["values"] and figures.result()[0]["cosine"] == 1.0
    assert figures.decided_kinds() == {}  # judged on no data: nothing for another caller to reuse


def test_fallback_judges_the_output_as_the_check_does(tmp_path):
    """The fitting part starts with an empty feed, the held-out part with one with data: the
    fallback's stopping rule and the check judge the output as the same kind."""
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.autofallback import fallback_to_budget, study_of
    from onnxcomp.quant.config import QuantizeConfig

    model = _steps_model()
    feeds = _steps_feeds(20, empty={0, 10})
    split = split_data(Dataset(feeds, model), CheckConfig())
    fit = list(split.fit)
    assert fit[0]["x"].max() < 0 and next(iter(split.check))["x"].max() > 0
    kept: list = []
    quantized, _ = quantize(model, fit, QuantizeConfig(), keep=kept.append)
    check = check_model(model, quantized, split, CheckConfig(), compressed=1)
    assert [row["kind"] for row in check["outputs"]] == ["sequence"] and check["met"]
    assert split.judged_kinds == {"y": "sequence"} and split.judged_kinds["y"].decided.kind == "sequence"
    budget = CheckConfig(min_agreement=1.0, min_cosine=1.0)
    for kinds in (None, split.judged_kinds):  # on its own fitting feeds, and with the check's kinds
        _, auto = fallback_to_budget(study_of(kept[0], fit), budget, max_float_fraction=1.0, kinds=kinds)
        assert auto["history"] and all(row["kind"] == "sequence" for h in auto["history"] for row in h["outputs"])
        assert auto["met_on_fitting_data"]


# ---------------------------------------------------------------------------------------------
# 2. --fix-shape and data of another spatial size (same rank)


def _conv_model(path, shape):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["c"], ["y"], name="relu")]
    out = [shape[0], 4, *shape[2:]]
    io.save_model(io.load_model(make_proto(nodes, [("x", shape)], [("y", out)], [("w", w)])), path)
    return path


def _cli(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "onnxcomp", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("mode", [
    ["--mode", "dynamic"],  # reads its calibration data only in the check, after writing
    ["--mode", "weight-only", "--bits", "8", "--rounding", "nearest", "--op-types", "Conv"],
    [],  # static: calibrates on it
])
def test_fix_shape_against_data_of_another_size_names_input_axis_and_sizes(tmp_path, mode):
    model = _conv_model(tmp_path / "m.onnx", ["N", 3, "H", "W"])
    calib = tmp_path / "c28.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((12, 3, 28, 28)).astype(np.float32))
    out = tmp_path / "out.onnx"
    r = _cli("quantize", model, "-o", out, "--calibration", calib, "--fix-shape", "x=1x3x32x32", *mode)
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("onnxcomp: error: ") and "Traceback" not in r.stderr
    assert "input 'x' has size 28 on axis 2" in line and "fixes it at 32" in line and "rank" not in line
    assert "written" not in line and not out.exists() and not list(tmp_path.glob("out*"))


def test_fixed_model_and_data_of_another_size(tmp_path):
    model = _conv_model(tmp_path / "m.onnx", [1, 3, 32, 32])
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((12, 3, 32, 28)).astype(np.float32))
    out = tmp_path / "out.onnx"
    r = _cli("quantize", model, "-o", out, "--calibration", calib, "--mode", "dynamic")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "input 'x' has size 28 on axis 3" in line and "fixes it at 32" in line and not out.exists()
    # a --fix-shape that contradicts the declared size is refused before any data is read
    r = _cli("quantize", model, "-o", out, "--calibration", calib, "--fix-shape", "x=1x3x28x32")
    assert r.returncode == 1 and "Traceback" not in r.stderr and not out.exists()
    assert r.stderr.strip().splitlines()[-1] == "onnxcomp: error: input 'x' is declared 1x3x32x32; cannot make it 1x3x28x32"


# ---------------------------------------------------------------------------------------------
# 3. a written model onnxruntime refuses never stands at the output path


def _with_extra_output(monkeypatch, op_type, domain, *attrs):
    """``quantize`` (the API the CLI calls) returns its model with one more output made by
    ``op_type``: an op onnxruntime has no kernel for, or one that fails when run."""
    import onnx_ir as ir

    import onnxcomp.quant.api as api

    real = api.quantize

    def quantize(*args, **kwargs):
        model, report = real(*args, **kwargs)
        inputs = [model.graph.outputs[0], *attrs]
        for value in attrs:
            model.graph.register_initializer(value)
        node = ir.Node(domain, op_type, inputs, num_outputs=1, name="extra")
        node.outputs[0].name = "extra"
        model.graph.append(node)
        if domain:
            model.opset_imports[domain] = 1
        model.graph.outputs.append(node.outputs[0])
        return model, report

    monkeypatch.setattr(api, "quantize", quantize)


def _quantize_main(tmp_path, out, capsys):
    from onnxcomp.cli import main

    model = _conv_model(tmp_path / "m.onnx", ["N", 3, "H", "W"])
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(4).standard_normal((12, 3, 16, 16)).astype(np.float32))
    code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--mode", "dynamic"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("previous", [False, True])
def test_a_model_onnxruntime_cannot_load_is_kept_aside_and_the_output_untouched(tmp_path, monkeypatch, capsys,
                                                                              previous):
    _with_extra_output(monkeypatch, "NoSuchOp", "com.example.bad")
    out = tmp_path / "out.onnx"
    if previous:
        out.write_bytes(b"the previous output")
    code, err = _quantize_main(tmp_path, out, capsys)
    rejected = tmp_path / "out.rejected.onnx"
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("onnxcomp: error: onnxruntime cannot load the written model: "), err
    assert "NoSuchOp" in err and f"nothing was written to {out}; it is kept as {rejected}" in err, err
    assert ".onnxcomp-" not in err  # the temporary file is named by the file kept
    assert (out.read_bytes() == b"the previous output") if previous else not out.exists()
    assert rejected.exists() and not list(tmp_path.glob(".onnxcomp-*"))
    import onnx  # the file kept is the refused model, for a bug report
    assert [n.op_type for n in onnx.load(rejected).graph.node][-1] == "NoSuchOp"


def test_a_model_that_loads_but_does_not_run_is_refused_before_the_rename(tmp_path, monkeypatch, capsys):
    import onnx_ir as ir

    # Reshape of the [1, 4, 16, 16] output to [7]: onnxruntime loads it (N, H, W are free) and fails to run it
    shape = ir.Value(name="bad_shape", const_value=ir.tensor(np.array([7], np.int64)))
    _with_extra_output(monkeypatch, "Reshape", "", shape)
    out = tmp_path / "out.onnx"
    code, err = _quantize_main(tmp_path, out, capsys)
    assert code == 1 and "Traceback" not in err, err
    assert err.startswith("onnxcomp: error: onnxruntime cannot run the written model: "), err
    assert not out.exists() and (tmp_path / "out.rejected.onnx").exists()


def test_a_refusal_found_only_by_the_check_moves_the_output_aside(tmp_path, monkeypatch, capsys):
    """The check runs every check feed: a model refused there (past the first feed, which the
    verification ran) is moved aside from the output path."""
    import onnxcomp.runtime as runtime

    _with_extra_output(monkeypatch, "NoSuchOp", "com.example.bad")
    monkeypatch.setattr(runtime, "verify_written", lambda path, *feeds, **kept: None)
    out = tmp_path / "out.onnx"
    code, err = _quantize_main(tmp_path, out, capsys)
    rejected = tmp_path / "out.rejected.onnx"
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("onnxcomp: error: onnxruntime cannot load the written model: "), err
    assert f"{out} was moved aside; it is kept as {rejected}" in err, err
    assert not out.exists() and rejected.exists()


def test_save_model_verify_keeps_external_data_beside_the_refused_model(tmp_path):
    from onnxcomp.errors import RefusedOutputError
    from onnxcomp.runtime import run_model, verify_written

    model = _conv_model(tmp_path / "m.onnx", [1, 3, 8, 8])
    loaded = io.load_model(model)
    out = tmp_path / "out.onnx"

    def refuse(path):
        verify_written(path)  # loads: the file and its external data are complete here
        raise RefusedOutputError(f"refused {path}")

    with pytest.raises(RefusedOutputError, match="nothing was written to"):
        io.save_model(loaded, out, external_data=True, size_threshold_bytes=16, verify=refuse)
    assert not out.exists() and not (tmp_path / "out.onnx.data").exists()
    kept = io.load_model(tmp_path / "out.rejected.onnx")
    feed = {"x": np.ones((1, 3, 8, 8), np.float32)}
    np.testing.assert_array_equal(run_model(kept, [feed])[0][0], run_model(loaded, [feed])[0][0])
    assert io.save_model(loaded, out, external_data=True, size_threshold_bytes=16, verify=verify_written) == out


# ---------------------------------------------------------------------------------------------
# 4. constant calibration data is said so on every path that calibrates


def _mlp(path, seed: int = 5):
    rng = np.random.default_rng(seed)
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), oh.make_node("Relu", ["h"], ["r"], name="relu"),
             oh.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = [("w1", (rng.standard_normal((32, 32)) * 0.2).astype(np.float32)),
             ("w2", (rng.standard_normal((32, 4)) * 0.5).astype(np.float32))]
    io.save_model(io.load_model(make_proto(nodes, [("x", ["N", 32])], [("y", ["N", 4])], inits)), path)
    return path


def _constant_and_varying(tmp_path):
    ones, varied = tmp_path / "ones.npz", tmp_path / "varied.npz"
    np.savez(ones, x=np.ones((20, 1, 32), np.float32))
    np.savez(varied, x=np.random.default_rng(6).standard_normal((20, 1, 32)).astype(np.float32))
    return ones, varied


CONSTANT_NOTE = "the calibration data holds one value per input in every feed ('x' = 1)"


@pytest.mark.parametrize("command", [
    ["quantize", "--fidelity-target", "30", "--no-latency"],  # the fidelity fallback
    ["quantize", "--mode", "weight-only", "--bits", "4", "--block-size", "16", "--rounding", "gptq"],
    ["quantize", "--mode", "dynamic", "--rounding", "gptq"],
    ["prune", "--criterion", "activation", "--ratio", "0.25", "--reconstruct"],
    ["compress", "--recipe", "int8"],
], ids=["fidelity", "weight-only-gptq", "dynamic-gptq", "prune", "compress"])
def test_constant_calibration_data_is_said_on_every_calibrating_path(tmp_path, capsys, command):
    import json

    from onnxcomp.cli import main

    model = _mlp(tmp_path / "m.onnx")
    ones, varied = _constant_and_varying(tmp_path)
    name, *flags = command
    for data, constant in ((ones, {"x": 1.0}), (varied, None)):
        out = tmp_path / f"{data.stem}.out.onnx"
        code = main([name, str(model), "-o", str(out), "--calibration", str(data), "--json", *flags])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        report = json.loads(captured.out)
        notes = [n for n in report["notes"] if n.startswith("the calibration data holds one value")]
        assert (report.get("calibration") or {}).get("constant_inputs") == constant
        assert len(notes) == (1 if constant else 0), report["notes"]  # once, not once per stage
        if constant:
            assert notes[0].startswith(CONSTANT_NOTE)
    # and in the terminal output
    code = main([name, str(model), "-o", str(tmp_path / "t.onnx"), "--calibration", str(ones), *flags])
    assert code == 0 and "calibrate on real samples" in " ".join(capsys.readouterr().out.split())


def test_constant_calibration_data_in_the_python_api(tmp_path):
    from onnxcomp.compress import compress
    from onnxcomp.prune.api import prune
    from onnxcomp.prune.config import PruneConfig
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    model = io.load_model(_mlp(tmp_path / "m.onnx"))
    ones = [{"x": np.ones((1, 32), np.float32)} for _ in range(12)]
    runs = {
        "quantize static": lambda: quantize(model, ones, QuantizeConfig())[1],
        "quantize fidelity": lambda: quantize(model, ones, QuantizeConfig(fidelity_target=30.0))[1],
        "quantize weight-only": lambda: quantize(model, ones, QuantizeConfig(mode="weight-only", bits=4, block_size=16,
                                                                             rounding="gptq"))[1],
        "prune": lambda: prune(model, PruneConfig(criterion="activation", ratio=0.25), calibration=ones)[1],
        "compress": lambda: compress(model, "int8", ones)[1],
    }
    for what, run in runs.items():
        report = run()
        assert report["calibration"]["constant_inputs"] == {"x": 1.0}, what
        assert sum(n.startswith(CONSTANT_NOTE) for n in report["notes"]) == 1, (what, report["notes"])
