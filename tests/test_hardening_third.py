"""Defects a newcomer's run found (third session): each test reproduces one of them.

- Ctrl-C that reaches the process while a process pool starts its workers was dropped (the run
  went on to the end and exited 0).
- An output that exists but is not a regular file (``-o /dev/null``, a FIFO) was replaced by the
  atomic rename (as root: the device node itself); ``-o ''`` was reported as the folder ``.``.
- Evaluation data or labels that cannot match the model were found only by the check, after the
  output was written: ``CHECK FAILED`` and exit 0 (``compress``: an error after the whole run).
  ``sensitivity --labels`` with the wrong count gave a traceback from a worker.
- Ctrl-C in the first seconds (numpy, onnx, onnxruntime being imported) printed a traceback.
- Ctrl-C during the check, after the output was written, said "no output written".
- A malformed ``--fix-shape`` was reported as ``--shape``.
- A bad ``--check-fraction`` / ``--min-cosine`` named a dataclass field and listed four flags.
- ``bench A B`` with models of different inputs failed naming neither (``<list> feed 0: ...``).
- The README's first command ended with "int8 is SLOWER than float ... 1.03 [0.96, 1.10], within
  noise": a tie called slower (and a tie below 1 called faster).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, file_digest, make_proto


CNN = str(MODELS / "digits_cnn.onnx")
MLP = str(MODELS / "digits_mlp.onnx")
CALIB = str(MODELS / "digits_calib.npz")
EVAL = str(MODELS / "digits_eval.npz")
LABELS = str(MODELS / "digits_eval_labels.npy")
SHIPPED = [Path(p) for p in (CNN, MLP, CALIB, EVAL, LABELS)]


def refused(argv: list[str], cwd: Path, *fragments: str, inputs=()) -> str:
    """Run ``python -m onnxcomp ARGV`` in ``cwd``: exit 1, one ``onnxcomp: error:`` line holding
    every fragment, no traceback, inputs byte-identical, nothing new in ``cwd``; returns the line."""
    watched = [*SHIPPED, *inputs]
    before = {p: file_digest(p) for p in watched}
    listing = sorted(os.listdir(cwd))
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("onnxcomp: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert {p: file_digest(p) for p in watched} == before
    assert sorted(os.listdir(cwd)) == listing
    return lines[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("command", [
    ["quantize", CNN, "-o", "fifo", "--calibration", CALIB],
    ["cluster", MLP, "-o", "fifo"],
    ["compress", CNN, "-o", "out.onnx", "--calibration", CALIB, "--report", "fifo"],
], ids=["quantize-o", "cluster-o", "compress-report"])
def test_output_that_is_not_a_regular_file_is_refused(tmp_path, command):
    os.mkfifo(tmp_path / "fifo")
    flag = "--report" if "--report" in command else "-o"
    refused(command, tmp_path, f"{flag} fifo: is not a regular file")
    assert (tmp_path / "fifo").is_fifo()


def test_empty_output_path_is_named_as_such(tmp_path):
    line = refused(["quantize", CNN, "-o", "", "--calibration", CALIB], tmp_path, "-o: the output path is empty")
    assert "directory" not in line


def test_labels_that_do_not_match_the_evaluation_data_are_refused_before_work(tmp_path):
    np.save(tmp_path / "few.npy", np.zeros(3, np.int64))
    for command in (["quantize", CNN, "-o", "out.onnx", "--calibration", CALIB],
                    ["prune", CNN, "-o", "out.onnx"],
                    ["compress", CNN, "-o", "out.onnx", "--calibration", CALIB],
                    ["sensitivity", CNN, "--calibration", CALIB, "--workers", "1", "--json"]):  # was a traceback
        refused([*command, "--eval", EVAL, "--labels", "few.npy"], tmp_path,
                "--labels: 3 label(s) for the 450 sample(s)", "digits_eval.npz",
                inputs=[tmp_path / "few.npy"])


def test_evaluation_data_that_cannot_match_the_model_is_refused_before_work(tmp_path):
    images = np.load(EVAL)["image"][:20]
    np.savez(tmp_path / "f64.npz", image=images.astype(np.float64))
    np.savez(tmp_path / "small.npz", image=np.ascontiguousarray(images[:, :, :4]))
    refused(["cluster", CNN, "-o", "out.onnx", "--data", "f64.npz"], tmp_path,
            "f64.npz sample 0: input 'image' has dtype float64", inputs=[tmp_path / "f64.npz"])
    refused(["prune", CNN, "-o", "out.onnx", "--eval", "small.npz"], tmp_path,
            "small.npz sample 0: input 'image' has size 4 on axis 2", inputs=[tmp_path / "small.npz"])
    refused(["quantize", CNN, "-o", "out.onnx", "--calibration", CALIB, "--eval", "f64.npz"], tmp_path,
            "f64.npz sample 0: input 'image' has dtype float64", inputs=[tmp_path / "f64.npz"])


def test_ctrl_c_while_the_commands_are_imported_is_one_line(monkeypatch, capsys):
    import onnxcomp.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_commands", interrupted)
    assert cli.main(["inspect", CNN]) == 130
    assert capsys.readouterr().err == "onnxcomp: interrupted; no output written\n"


def test_ctrl_c_after_the_output_is_written_says_so(tmp_path, monkeypatch, capsys):
    import onnx

    import onnxcomp.check
    from onnxcomp.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxcomp.check, "check_model", interrupted)
    out = tmp_path / "out.onnx"
    assert main(["cluster", MLP, "-o", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err == f"onnxcomp: interrupted after writing {out}; its check and summary did not finish\n"
    onnx.checker.check_model(onnx.load(str(out)))  # complete: written atomically before the check
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    # a later interrupted command in the same process does not name the earlier file
    monkeypatch.setattr("onnxcomp.io.load_model", interrupted)
    assert main(["cluster", MLP, "-o", str(tmp_path / "other.onnx")]) == 130
    assert capsys.readouterr().err == "onnxcomp: interrupted; no output written\n"


def test_bad_fix_shape_names_its_own_flag(tmp_path):
    line = refused(["quantize", CNN, "-o", "out.onnx", "--calibration", CALIB, "--fix-shape", "image=1xax32x32"],
                   tmp_path, "--fix-shape 'image=1xax32x32': expected NAME=D0xD1x...")
    assert "--shape" not in line.replace("--fix-shape", "")


def test_int8_latency_tie_is_not_called_slower_or_faster():
    from onnxcomp.measure.latency import explain_int8_latency

    slower_tie = explain_int8_latency(1.03, (0.96, 1.10), 2, {}, {})["summary"]
    assert slower_tie.startswith("int8 is not measurably faster than float at 2 thread(s): latency ratio 1.03 "
                                 "[0.96, 1.10], within noise"), slower_tie
    faster_tie = explain_int8_latency(0.97, (0.90, 1.05), 2, {}, {})["summary"]
    assert faster_tie == "int8 is not measurably faster than float at 2 thread(s): latency ratio 0.97 [0.90, 1.05], within noise"
    slower = explain_int8_latency(1.3, (1.2, 1.4), 2, {}, {})["summary"]
    assert slower.startswith("int8 is SLOWER than float at 2 thread(s): latency ratio 1.30 [1.20, 1.40]"), slower
    faster = explain_int8_latency(0.7, (0.6, 0.8), 2, {}, {})["summary"]
    assert faster == "int8 is faster than float at 2 thread(s): latency ratio 0.70 [0.60, 0.80]"


@pytest.mark.parametrize("flag,value,field", [("--check-fraction", "nan", "fraction"), ("--check-fraction", "0.7", "fraction"),
                                              ("--min-cosine", "inf", "min_cosine"), ("--min-agreement", "2", "min_agreement")])
def test_bad_check_budget_names_its_flag(tmp_path, capsys, flag, value, field):
    from onnxcomp.cli import main

    out = tmp_path / "never-written.onnx"
    assert main(["cluster", MLP, "-o", str(out), flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"onnxcomp: error: {flag}: ") and field in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_bench_of_models_with_different_inputs_names_the_model(tmp_path):
    import onnx
    import onnx.helper as oh

    tiny = make_proto([oh.make_node("Relu", ["x"], ["y"], name="relu")], [("x", [1, 4])], [("y", [1, 4])])
    onnx.save(tiny, tmp_path / "tiny.onnx")
    refused(["bench", CNN, "tiny.onnx", "--runs", "3"], tmp_path,
            f"tiny.onnx: cannot take the inputs of the first model {CNN}", "missing model input(s) 'x'",
            inputs=[tmp_path / "tiny.onnx"])
