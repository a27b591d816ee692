"""The command line: `inspect` output, --json, and clean errors (exit 1, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import MODELS, file_digest

from onnxcomp.cli import main


@pytest.mark.parametrize("name", ["digits_cnn.onnx", "digits_mlp.onnx", "digits_transformer.onnx"])
def test_inspect_json_on_shipped_models(name, capsys):
    assert main(["inspect", str(MODELS / name), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opset"] == 17
    assert info["inputs"] == [{"name": "image", "dtype": "float", "shape": "[batch,1,32,32]"}]
    assert info["outputs"][0]["name"] == "logits"
    assert info["parameters"] > 0 and info["parameter_bytes"] >= 4 * info["parameters"] - 1024
    assert sum(info["op_types"].values()) == info["nodes"]
    assert info["external_data"] == {"files": [], "bytes": 0}
    if name == "digits_cnn.onnx":
        assert info["op_types"]["BatchNormalization"] == 8
        assert info["parameters_by_op"]["Conv"]["tensors"] == 8


def test_inspect_table(capsys):
    assert main(["inspect", str(MODELS / "digits_cnn.onnx")]) == 0
    out = capsys.readouterr().out
    for fragment in ("IR version", "ai.onnx 17", "image", "logits", "Conv", "parameters", "subgraphs: none"):
        assert fragment in out


def test_quiet_prints_nothing(capsys):
    assert main(["inspect", str(MODELS / "digits_mlp.onnx"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_errors_exit_one_without_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("garbage")
    digest = file_digest(bad)
    for target, fragment in ((tmp_path / "missing.onnx", "not found"), (bad, "not an ONNX model"), (tmp_path, "directory")):
        proc = subprocess.run(
            [sys.executable, "-m", "onnxcomp", "inspect", str(target)], capture_output=True, text=True
        )
        assert proc.returncode == 1
        assert proc.stderr.startswith("onnxcomp: error: ") and fragment in proc.stderr
        assert "Traceback" not in proc.stderr
    assert file_digest(bad) == digest


def test_usage_error_exits_one():
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", "nosuchcommand"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("onnxcomp: error: ")


PPOCR = MODELS.parent / "benchmarks" / ".cache" / "rapidocr" / "rapidocr_onnxruntime" / "models"


@pytest.mark.skipif(not PPOCR.is_dir(), reason="PP-OCR models not fetched (python -m benchmarks fetches them)")
@pytest.mark.parametrize("name", ["ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"])
def test_inspect_real_pretrained_models(name, capsys):
    """paddle2onnx models: weights in Constant nodes, opset 11/12, dynamic dims."""
    assert main(["inspect", str(PPOCR / name), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opset"] in (11, 12) and info["op_types"]["Conv"] > 30
    assert info["parameters"] > 100_000 and info["parameters_by_op"]["Conv"]["parameters"] > 0
