"""Defects a newcomer's run found (third session, second wave): each test reproduces one of them.

- ``prune --ratio 0 --strict`` blamed a frozen Flatten group for "nothing was compressed" instead of
  the ratio the user chose.
- Bad check data found only while the check read it (a NaN in a later evaluation sample, a later
  malformed file of a data folder) ended as ``CHECK FAILED`` and exit 0 after the output was
  written: now one ``onnxcomp: error:`` line naming the file/sample, exit 1 (since the thirteenth
  session found before any work, nothing written).
- ``bench --shape image=0x1x32x32`` timed an empty batch (a zero dimension); ``--fix-shape`` may
  still give a graph input an empty axis.
- ``prune`` and ``cluster`` had no help text for ``-o``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, REPO, file_digest

from onnxcomp import io
from onnxcomp.check import CheckConfig, check_model, split_data
from onnxcomp.cli import main
from onnxcomp.data import Dataset, parse_shapes
from onnxcomp.errors import ConfigError, DataError

CNN = MODELS / "digits_cnn.onnx"
MLP = MODELS / "digits_mlp.onnx"
CALIB = MODELS / "digits_calib.npz"


@pytest.fixture
def work(tmp_path):
    for path in (MLP, CALIB):
        shutil.copy(path, tmp_path / path.name)
    images = np.load(CALIB)["image"]
    nan = images[:50].copy()
    nan[30, 0, 5, 7] = np.nan  # the first sample is fine: only the check's reading finds it
    np.savez(tmp_path / "eval_nan.npz", image=nan)
    folder = tmp_path / "evalset"
    folder.mkdir()
    for i in range(12):
        np.savez(folder / f"s{i:02d}.npz", image=images[i:i + 1])
    (folder / "s11.npz").write_bytes(b"not an archive")
    return tmp_path


def _cli(argv, cwd: Path):
    # this checkout's onnxcomp, not the one the environment has installed (cwd is elsewhere)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)
    return proc.returncode, proc.stdout, [line for line in proc.stderr.splitlines() if line.strip()]


def _in_process(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# a. the reason for "nothing was compressed" names the ratio the user chose

def test_prune_ratio_zero_names_the_ratio_not_a_frozen_group(work, capsys):
    code, out, err = _in_process(capsys, "prune", work / "digits_mlp.onnx", "-o", work / "p.onnx", "--ratio", "0",
                                 "--strict", "--json")
    assert code == 3, err
    report = json.loads(out)
    assert report["channels_removed"] == 0 and len(report["groups"]) == 2
    assert report["check"]["problems"][0] == ("nothing was compressed (0 channels removed): --ratio 0 removes no "
                                              "channel (it keeps every channel of every group)")
    assert "Flatten" not in " ".join(report["check"]["problems"])
    code, out, err = _in_process(capsys, "prune", work / "digits_mlp.onnx", "-o", work / "p2.onnx", "--ratio",
                                 "0.001", "--strict", "--json")
    assert code == 3, err
    assert json.loads(out)["check"]["problems"][0] == (
        "nothing was compressed (0 channels removed): --ratio 0.001 (layer) cut no channel of the 2 prunable "
        "group(s): raise --ratio")
    # a ratio that cuts: no such problem, and the check passes or fails on its figures alone
    code, out, err = _in_process(capsys, "prune", work / "digits_mlp.onnx", "-o", work / "p3.onnx", "--ratio",
                                 "0.25", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["channels_removed"] > 0
    assert not any(p.startswith("nothing was compressed") for p in report["check"]["problems"])


# b. bad check data found while checking: an error naming it, exit 1, the output said to be unchecked

@pytest.mark.parametrize("command, data, named", [
    (["quantize", "digits_mlp.onnx", "-o", "q.onnx", "--calibration", "digits_calib.npz", "--eval", "eval_nan.npz"],
     "eval_nan.npz", "eval_nan.npz sample 30: input 'image' holds 1 NaN/Inf value(s)"),
    (["cluster", "digits_mlp.onnx", "-o", "q.onnx", "--eval", "evalset"],
     "evalset", os.path.join("evalset", "s11.npz") + ": not a readable .npz file"),
    (["prune", "digits_mlp.onnx", "-o", "q.onnx", "--ratio", "0.25", "--eval", "eval_nan.npz"],
     "eval_nan.npz", "eval_nan.npz sample 30"),
])
def test_bad_check_data_is_refused_before_any_work(work, command, data, named):
    """(thirteenth session) every check feed of a file or folder is now read before any work: the
    error comes first and nothing is written (it was written, then said to be unchecked)."""
    inputs = [work / "digits_mlp.onnx", work / "digits_calib.npz", work / "eval_nan.npz",
              *sorted((work / "evalset").iterdir())]
    before = {p: file_digest(p) for p in inputs}
    code, out, err = _cli(command, work)
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("onnxcomp: error: "), err
    assert named in err[0] and "written" not in err[0], err[0]
    assert out == ""
    assert not (work / "q.onnx").exists()
    assert {p: file_digest(p) for p in inputs} == before


def test_check_model_raises_on_bad_check_data(work):
    model = io.load_model(work / "digits_mlp.onnx")
    with pytest.raises(DataError, match="eval_nan.npz sample 30: input 'image' holds 1 NaN/Inf"):
        split_data(None, CheckConfig(), evaluation=Dataset(str(work / "eval_nan.npz"), model), model=model)
    # data that cannot be read twice (a list here stands for it) is validated as the check reads it
    feeds = [{"image": image[None]} for image in np.load(work / "eval_nan.npz")["image"]]
    split = split_data(None, CheckConfig(), evaluation=Dataset(feeds, model), model=model)
    with pytest.raises(DataError, match=r"<list> feed 30: input 'image' holds 1 NaN/Inf"):
        check_model(model, work / "digits_mlp.onnx", split)
    # the same data without the NaN is checked: the model against itself agrees everywhere
    clean = np.load(work / "eval_nan.npz")["image"]
    clean[30] = 0.0
    np.savez(work / "eval_clean.npz", image=clean)
    split = split_data(None, CheckConfig(), evaluation=Dataset(str(work / "eval_clean.npz"), model), model=model)
    check = check_model(model, work / "digits_mlp.onnx", split)
    assert check["checked"] and check["met"] and check["outputs"][0]["top1_agreement"] == 1.0


# c. a zero dimension for generated inputs is refused; --fix-shape may keep one

@pytest.mark.parametrize("command", [
    ["bench", str(CNN), "--shape", "image=0x1x32x32", "--runs", "3"],
    ["compress", str(CNN), "-o", "c.onnx", "--recipe", "cluster-4bit", "--shape", "image=1x0x32x32"],
])
def test_zero_dimension_of_generated_inputs_is_refused(tmp_path, command):
    code, out, err = _cli(command, tmp_path)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("onnxcomp: error: --shape 'image=") and " is 0: a generated input" in err[0], err[0]
    assert "give every dimension at least 1" in err[0]
    assert os.listdir(tmp_path) == []


def test_parse_shapes_zero_only_where_allowed():
    with pytest.raises(ConfigError, match=r"--shape 'x=2x0': axis 1 is 0"):
        parse_shapes(["x=2x0"])
    assert parse_shapes(["past=1x4x0x16"], flag="--fix-shape", allow_zero=True) == {"past": (1, 4, 0, 16)}
    assert parse_shapes(["x=1x3"]) == {"x": (1, 3)}
    with pytest.raises(ConfigError, match="non-negative integers"):
        parse_shapes(["x=1x-1"], allow_zero=True)


# d. every writing command says what -o is

@pytest.mark.parametrize("command, text", [("prune", "where to write the pruned model"),
                                           ("cluster", "where to write the clustered model")])
def test_output_flag_has_help(capsys, command, text):
    with pytest.raises(SystemExit) as exit_:
        main([command, "-h"])
    assert exit_.value.code == 0
    assert text in " ".join(capsys.readouterr().out.split())
