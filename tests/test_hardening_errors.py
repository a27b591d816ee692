"""Bad input never gives a traceback: one ``onnxcomp: error:`` line naming the culprit, exit 1.

Every case runs the CLI in-process and checks the whole contract: exit status 1, exactly one error
line that names the option, file or node at fault, no traceback, inputs byte-identical, no output
and no temporary file left behind.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from conftest import MODELS, file_digest, make_proto

from onnxcomp import io, runtime
from onnxcomp.bounds import Range
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError, DataError, ModelLoadError
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.recipe import MeasureConfig, load_recipe

CNN = str(MODELS / "digits_cnn.onnx")
CALIB = str(MODELS / "digits_calib.npz")
EVAL = str(MODELS / "digits_eval.npz")
SHIPPED = [MODELS / n for n in ("digits_cnn.onnx", "digits_calib.npz", "digits_eval.npz", "digits_eval_labels.npy")]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of the CLI run in this process (an escaping exception fails the test).

    argparse's errors end in ``SystemExit(1)``; anything else must come back as a return value.
    """
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def assert_refused(argv: list[str], fragments: tuple[str, ...], work: Path, capsys, inputs=()) -> str:
    """The full error contract for one command line; returns the error line."""
    watched = [*SHIPPED, *inputs]
    before = {p: file_digest(p) for p in watched}
    listing = sorted(os.listdir(work))
    status, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 1, err
    assert len(lines) == 1 and lines[0].startswith("onnxcomp: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert {p: file_digest(p) for p in watched} == before
    assert sorted(os.listdir(work)) == listing  # no output, no temporary file
    return lines[0]


# ---------------------------------------------------------------------------------------------
# every numeric option at 0, negative, NaN, infinity and absurdly large

BENCH = ["bench", CNN, "--shape", "image=1x1x32x32", "--quiet"]
QUANT = ["quantize", CNN, "-o", "{out}", "--calibration", CALIB, "--quiet"]
WEIGHT_ONLY = ["quantize", CNN, "-o", "{out}", "--mode", "weight-only", "--quiet"]
PRUNE = ["prune", CNN, "-o", "{out}", "--quiet"]
CLUSTER = ["cluster", CNN, "-o", "{out}", "--quiet"]
SENS = ["sensitivity", CNN, "--calibration", CALIB, "--quiet"]
COMPARE = ["compare", CNN, CNN, "--data", EVAL, "--quiet"]
COMPRESS = ["compress", CNN, "-o", "{out}", "--calibration", CALIB, "--quiet"]

OPTION_CASES = [
    *[(BENCH, ["--runs", v], "--runs") for v in ("0", "-1", "nan", "1e9")],
    *[(BENCH, ["--threads", v], "--threads") for v in ("0", "-2")],
    *[(BENCH, ["--feeds", v], "--feeds") for v in ("0", "-3")],
    *[(BENCH, ["--time-budget", v], "--time-budget") for v in ("-1", "0", "nan", "inf")],
    *[(BENCH, ["--warmup-runs", v], "--warmup-runs") for v in ("-1",)],
    *[(BENCH, ["--warmup-seconds", v], "--warmup-seconds") for v in ("-1", "nan", "inf")],
    (BENCH, ["--seed", "-1"], "--seed"),
    (BENCH[:2] + ["--quiet"], ["--data", EVAL, "--batch-size", "0"], "--batch-size"),  # --shape excludes --data
    *[(SENS, ["--workers", v], "--workers") for v in ("-1", "0")],
    *[(SENS, ["--max-eval-feeds", v], "--max-eval-feeds") for v in ("0", "-5")],
    (SENS, ["--top", "-1"], "--top"),
    (SENS, ["--batch-size", "0"], "--batch-size"),
    *[(COMPARE, ["--channel-axis", v], "--channel-axis") for v in ("99", "-99", "0", "x")],
    (COMPARE, ["--limit", "0"], "--limit"),
    (COMPARE, ["--top", "-1"], "--top"),
    (COMPARE, ["--batch-size", "-1"], "--batch-size"),
    *[(QUANT, ["--percentile", v], "percentile") for v in ("0", "-1", "nan", "inf", "101")],
    *[(QUANT, ["--max-samples", v], "max_samples") for v in ("0", "-1")],
    (QUANT, ["--max-samples", "nan"], "--max-samples"),
    (QUANT, ["--batch-size", "0"], "--batch-size"),
    *[(QUANT, ["--fidelity-target", v, "--eval", EVAL], "fidelity_target") for v in ("nan", "inf", "-1", "1e6")],
    *[(QUANT, ["--max-drop", v], "max_drop") for v in ("nan", "-1", "inf", "101")],
    (QUANT, ["--max-drop", "1"], "--max-drop"),
    (QUANT, ["--max-drop", "1", "--eval", EVAL], "--labels"),
    *[(WEIGHT_ONLY, ["--block-size", v], "block_size") for v in ("0", "-16", "24", str(2**20))],
    *[(PRUNE, ["--ratio", v], "ratio") for v in ("nan", "1", "-0.1", "inf")],
    *[(PRUNE, ["--round-to", v], "round_to") for v in ("0", "-1")],
    *[(PRUNE, ["--ridge", v], "ridge") for v in ("-1", "nan", "inf")],
    (PRUNE, ["--min-channels", "0"], "min_channels"),
    (PRUNE, ["--max-samples", "0"], "max_samples"),
    (PRUNE, ["--batch-size", "0"], "--batch-size"),
    *[(CLUSTER, ["--bits", v], "bits") for v in ("0", "-1", "17")],
    *[(CLUSTER, ["--clusters", v], "clusters") for v in ("0", "1", "70000")],
    (CLUSTER, ["--min-elements", "0"], "min_elements"),
    (CLUSTER, ["--seed", "-1"], "seed"),
    (COMPRESS, ["--batch-size", "0"], "--batch-size"),
    *[(COMPRESS, ["--set", s], key) for s, key in (
        ("measure.time_budget=-1", "time_budget"),
        ("measure.warmup_seconds=inf", "warmup_seconds"),
        ("measure.runs=0", "runs"),
        ("measure.threads=-2", "threads"),
        ("quantize.bins=2000000000", "bins"),
        ("quantize.percentile=nan", "percentile"),
        ("prune.ridge=nan", "ridge"),
        ("quantize.max_drop=1", "max_drop"),
    )],
]


@pytest.mark.parametrize(
    "base, extra, culprit", OPTION_CASES,
    ids=[f"{base[0]} {' '.join(a.split('/')[-1] for a in extra)}" for base, extra, _ in OPTION_CASES],
)
def test_bad_option_value_is_refused(base, extra, culprit, tmp_path, capsys):
    out = str(tmp_path / "out.onnx")
    argv = [a.replace("{out}", out) for a in base] + extra
    assert_refused(argv, (culprit,), tmp_path, capsys)


def test_usage_errors_are_one_line_and_exit_one(tmp_path, capsys):
    assert_refused(["nosuchcommand"], ("nosuchcommand",), tmp_path, capsys)
    assert_refused(["bench"], ("MODEL",), tmp_path, capsys)
    assert_refused(["quantize", CNN, "--calibration", CALIB], ("-o",), tmp_path, capsys)


def test_ranges_are_declared_once_per_config_field():
    """The config classes refuse NaN/inf everywhere, and each declared range both ways."""
    assert Range(float, 0.0, 100.0, min_open=True).problem(math.nan) is not None
    assert Range(int, 1).problem(1) is None and Range(int, 1).problem(0) is not None
    assert Range(int, 1).problem(2.0) is not None  # an int field takes no float
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantizeConfig(smoothquant_alpha=math.inf)
    with pytest.raises(ConfigError, match="max_range_ratio"):
        QuantizeConfig(max_range_ratio=math.nan)
    with pytest.raises(ConfigError, match="time_budget"):
        MeasureConfig.from_dict({"time_budget": -1})
    assert MeasureConfig.from_dict({"time_budget": 2, "warmup_seconds": 0}).time_budget == 2.0
    assert QuantizeConfig(calibration="percentile", percentile=100.0, fidelity_target=0.0,
                          max_drop=0.0).percentile == 100.0


# ---------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize("text, culprit", [
    ("[measure]\ntime_budget = -1\n", "time_budget"),
    ("[measure]\nwarmup_seconds = inf\n", "warmup_seconds"),
    ("[quantize]\nbins = 2000000000\n", "bins"),
    ("[quantize]\nbins = 2e9\n", "bins"),
    ("[prune]\nridge = nan\n", "ridge"),
    ("[cluster]\nbits = 0\n", "bits"),
    ("[cleanup]\niterations = 0\n", "iterations"),
])
def test_bad_recipe_values_are_refused(text, culprit, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "bad"\n{text}')
    with pytest.raises(ConfigError, match=culprit):
        load_recipe(recipe)
    out = str(tmp_path / "out.onnx")
    assert_refused(["compress", CNN, "-o", out, "--calibration", CALIB, "--recipe", str(recipe), "--quiet"],
                   (str(recipe), culprit), tmp_path, capsys, inputs=[recipe])


def test_non_utf8_recipe_is_refused(tmp_path, capsys):
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes('name = "caf\u00e9"\n[quantize]\n'.encode("latin-1"))
    out = str(tmp_path / "out.onnx")
    assert_refused(["compress", CNN, "-o", out, "--calibration", CALIB, "--recipe", str(recipe), "--quiet"],
                   (str(recipe), "UTF-8"), tmp_path, capsys, inputs=[recipe])


# ---------------------------------------------------------------------------------------------
# models onnxruntime would only fail on when running them


def _with_bad_conv(tmp_path: Path, how: str) -> tuple[Path, str]:
    proto = onnx.load(CNN)
    conv = [n for n in proto.graph.node if n.op_type == "Conv"][1]
    weight = next(t for t in proto.graph.initializer if t.name == conv.input[1])
    a = onh.to_array(weight)
    if how == "weight":  # same size, another shape (the case)
        b = a.reshape(a.shape[0], a.shape[1] // 2, a.shape[2] * 2, a.shape[3])
        weight.CopyFrom(onh.from_array(np.ascontiguousarray(b), weight.name))
    else:  # a bias one channel short
        proto.graph.initializer.append(onh.from_array(np.zeros(a.shape[0] - 1, np.float32), "short_bias"))
        conv.input.append("short_bias")
    path = tmp_path / f"bad_{how}.onnx"
    onnx.save(proto, path)
    return path, conv.name


@pytest.mark.parametrize("how", ["weight", "bias"])
@pytest.mark.parametrize("command", [
    ["quantize", "--calibration", CALIB], ["cluster"], ["prune"], ["compress", "--calibration", CALIB],
    ["sensitivity", "--calibration", CALIB],
])
def test_conv_with_wrong_weight_shape_is_refused_naming_the_node(command, how, tmp_path, capsys):
    model, node = _with_bad_conv(tmp_path, how)
    argv = [command[0], str(model), *command[1:], "--quiet"]
    if command[0] != "sensitivity":
        argv += ["-o", str(tmp_path / "out.onnx")]
    line = assert_refused(argv, (str(model), node, how), tmp_path, capsys, inputs=[model])
    assert "channels" in line


def test_shape_inference_failure_names_the_node(tmp_path, capsys):
    proto = make_proto([oh.make_node("MatMul", ["x", "w"], ["y"], name="proj")], [("x", [1, 4])], [("y", [1, 3])],
                       [("w", np.ones((5, 3), np.float32))])
    path = tmp_path / "mm.onnx"
    onnx.save(proto, path)
    with pytest.raises(ModelLoadError, match="proj"):
        io.load_model(path)
    assert_refused(["quantize", str(path), "-o", str(tmp_path / "o.onnx"), "--mode", "dynamic"], ("proj",),
                   tmp_path, capsys, inputs=[path])


# ---------------------------------------------------------------------------------------------
# data files


def test_npy_calibration_for_a_single_input_model(tmp_path, capsys):
    images = np.load(CALIB)["image"][:6]
    npy, npz = tmp_path / "calib.npy", tmp_path / "calib.npz"
    np.save(npy, images)
    np.savez(npz, image=images)
    model = io.load_model(CNN)
    from_npy = list(Dataset(npy, model))
    from_npz = list(Dataset(npz, model))
    assert len(from_npy) == 6 and all(np.array_equal(a["image"], b["image"]) for a, b in zip(from_npy, from_npz))
    out = tmp_path / "q.onnx"
    status, err = run_cli(["quantize", CNN, "-o", str(out), "--calibration", str(npy), "--quiet"], capsys)
    assert status == 0 and err == "" and out.is_file()


def test_npy_for_a_model_with_two_inputs_is_refused(tmp_path):
    proto = make_proto([oh.make_node("Add", ["a", "b"], ["y"])], [("a", [1, 4]), ("b", [1, 4])], [("y", [1, 4])])
    npy = tmp_path / "one.npy"
    np.save(npy, np.ones((3, 1, 4), np.float32))
    with pytest.raises(DataError, match="one unnamed array.*'a', 'b'"):
        Dataset(npy, io.load_model(proto))


@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_scalar_array_is_refused(kind, tmp_path, capsys):
    path = tmp_path / f"scalar.{kind}"
    if kind == "npz":
        np.savez(path, image=np.float32(1.0))
    else:
        np.save(path, np.float32(1.0))
    assert_refused(["quantize", CNN, "-o", str(tmp_path / "o.onnx"), "--calibration", str(path)],
                   (str(path), "scalar"), tmp_path, capsys, inputs=[path])


def _write_big_compressed_npz(path: Path, rows: int, row_shape=(1, 32, 32), *, cut: int | None = None) -> None:
    """An .npz of zeros, streamed into the archive: ``rows`` rows in the header, ``cut`` rows written."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, *row_shape)}
    row = np.zeros(row_shape, np.float32).tobytes()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("image.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            chunk = row * 4096
            left = rows if cut is None else cut
            while left:
                n = min(left, 4096)
                f.write(chunk if n == 4096 else row * n)
                left -= n


def test_compressed_npz_reads_only_the_samples_used(tmp_path):
    """256 MiB of samples in a ~250 KiB file: four samples cost four samples of memory."""
    path = tmp_path / "big.npz"
    _write_big_compressed_npz(path, rows=65536)
    assert path.stat().st_size < 2**20
    model = io.load_model(CNN)
    tracemalloc.start()
    try:
        feeds = list(Dataset(path, model, limit=4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(feeds) == 4 and feeds[0]["image"].shape == (1, 1, 32, 32)
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_truncated_npz_member_is_refused_naming_the_array(tmp_path, capsys):
    path = tmp_path / "short.npz"
    _write_big_compressed_npz(path, rows=10, cut=3)
    assert_refused(["quantize", CNN, "-o", str(tmp_path / "o.onnx"), "--calibration", str(path)],
                   (str(path), "'image'", "truncated"), tmp_path, capsys, inputs=[path])


# ---------------------------------------------------------------------------------------------
# external data next to the model, referenced from a subgraph or a Constant attribute


def _external_tensor(name: str, location: str, array: np.ndarray) -> onnx.TensorProto:
    from onnx.external_data_helper import set_external_data

    t = onh.from_array(array, name)
    set_external_data(t, location=location, offset=0, length=array.nbytes)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    return t


def _models_with_hidden_external_data(folder: Path) -> tuple[Path, Path, np.ndarray]:
    w = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    (folder / "w.bin").write_bytes(w.tobytes())
    const = make_proto(
        [oh.make_node("Constant", [], ["c"], value=_external_tensor("cw", "w.bin", w), name="const"),
         oh.make_node("MatMul", ["x", "c"], ["y"], name="mm")],
        [("x", [1, 8])], [("y", [1, 8])],
    )
    then = oh.make_graph([oh.make_node("MatMul", ["x", "sw"], ["ty"])], "then", [],
                         [oh.make_tensor_value_info("ty", onnx.TensorProto.FLOAT, [1, 8])],
                         [_external_tensor("sw", "w.bin", w)])
    other = oh.make_graph([oh.make_node("Identity", ["x"], ["ey"])], "else", [],
                          [oh.make_tensor_value_info("ey", onnx.TensorProto.FLOAT, [1, 8])])
    sub = make_proto([oh.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if")],
                     [("x", [1, 8]), ("cond", [], onnx.TensorProto.BOOL)], [("y", [1, 8])])
    paths = folder / "const.onnx", folder / "sub.onnx"
    onnx.save(const, paths[0])
    onnx.save(sub, paths[1])
    return *paths, w


def test_external_data_of_constants_and_subgraphs_is_found_next_to_the_model(tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    const_path, sub_path, w = _models_with_hidden_external_data(folder)
    assert Path.cwd() != folder
    x = np.ones((1, 8), np.float32)
    for path, feed in ((const_path, {"x": x}), (sub_path, {"x": x, "cond": np.array(True)})):
        model = io.load_model(path)
        assert io.external_data_files(model) == {str(folder / "w.bin")}
        (y,) = runtime.create_session(model).run(None, feed)
        np.testing.assert_allclose(y, x @ w, rtol=1e-6)
        status, err = run_cli(["inspect", str(path), "--quiet"], capsys)
        assert status == 0 and err == ""
    (folder / "w.bin").unlink()
    with pytest.raises(ModelLoadError, match="w.bin"):
        io.load_model(const_path)


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def _children(pid: int) -> list[str]:
    found: list[str] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to see the worker processes")
def test_ctrl_c_during_sensitivity_with_workers_is_one_line(tmp_path):
    """Ctrl-C reaches the whole process group (as from a terminal): no worker traceback, exit 130."""
    # every evaluation feed, so that the workers' part lasts long enough to be interrupted
    argv = [sys.executable, "-m", "onnxcomp", "sensitivity", CNN, "--calibration", CALIB, "--eval", EVAL,
            "--max-eval-feeds", "450", "--workers", "2", "--quiet"]
    for attempt in range(3):
        # as from a terminal: a test run started in the background by a non-interactive shell has
        # SIGINT ignored, which the child would inherit (and rightly keep)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=tmp_path,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while len(_children(proc.pid)) < 3 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # two workers and multiprocessing's resource tracker
            assert proc.poll() is None, "finished before it could be interrupted"
            time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0 or err.strip():
            break
        # the run ended in the moment between the workers' start and the signal: try again
    assert proc.returncode == 130, err
    assert err.strip() == "onnxcomp: interrupted; no output written", err
    assert os.listdir(tmp_path) == []
