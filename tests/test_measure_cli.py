"""`onnxcomp bench` / `onnxcomp compare` mechanics and model-level fidelity (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import MODELS

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.data import Dataset, model_inputs
from onnxcomp.errors import ConfigError, DataError, OnnxcompError
from onnxcomp.data import parse_shapes, synthetic_feed
from onnxcomp.measure.bench import physical_cores
from onnxcomp.measure.fidelity import compare_models, default_channel_axis


def test_physical_cores_and_shapes():
    assert physical_cores() >= 1
    assert parse_shapes(["x=1x3x8x8", "y=4"]) == {"x": (1, 3, 8, 8), "y": (4,)}
    for bad in ("x", "x=1xa", "=3", "x=-1"):
        with pytest.raises(ConfigError, match="NAME=D0xD1"):
            parse_shapes([bad])


def test_synthetic_feed_needs_shapes_for_dynamic_dims(matmul_proto):
    inputs = model_inputs(io.load_model(matmul_proto))
    with pytest.raises(DataError, match=r"input 'x' has dynamic dimension 'N' \(axis 0\)"):
        synthetic_feed(inputs, {})
    with pytest.raises(DataError, match="axis 1 is 15, the model fixes it at 16"):
        synthetic_feed(inputs, {"x": (2, 15)})
    with pytest.raises(DataError, match="'z', not an input"):
        synthetic_feed(inputs, {"z": (1,)})
    feed = synthetic_feed(inputs, {"x": (3, 16)})
    assert feed["x"].shape == (3, 16) and feed["x"].dtype == np.float32


def test_bench_json_two_models(capsys):
    argv = ["bench", str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_mlp.onnx"),
            "--data", str(MODELS / "digits_calib.npz"), "--feeds", "3", "--runs", "7",
            "--warmup-runs", "1", "--warmup-seconds", "0", "--threads", "1", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["models"]
    assert [r["runs"] for r in rows] == [7, 7]
    assert rows[0]["ratio_to_first"] is None and rows[1]["ratio_to_first"] > 0
    lo, hi = rows[1]["ratio_ci95"]
    assert lo <= rows[1]["ratio_to_first"] <= hi
    assert rows[0]["min_ms"] <= rows[0]["median_ms"] <= rows[0]["p99_ms"]


def test_bench_dynamic_dim_defaults_to_one(capsys):
    assert main(["bench", str(MODELS / "digits_cnn.onnx"), "--runs", "1"]) == 0
    assert "batch=1" in capsys.readouterr().out


def _scaled(model: ir.Model, name_part: str, factor: float) -> ir.Model:
    clone = io.clone_model(model)
    for value in clone.graph.initializers.values():
        if name_part in value.name:
            value.const_value = ir.tensor(value.const_value.numpy() * np.float32(factor), name=value.name)
    return clone


def test_compare_models_identical_and_perturbed():
    reference = io.load_model(MODELS / "digits_cnn.onnx")
    labels = np.load(MODELS / "digits_eval_labels.npy")
    ds = Dataset(MODELS / "digits_eval.npz", reference, batch_size=90)
    same = compare_models(reference, reference, ds, labels=labels)
    (out,) = same.outputs
    assert out.sqnr_db == np.inf and out.top1_agreement == 1.0
    assert same.samples == 450 and same.feeds == 5
    assert same.accuracy["reference"] == same.accuracy["candidate"] == pytest.approx(0.9933, abs=1e-4)

    # Perturb one layer in the middle: the per-layer ranking starts at or after that layer.
    weights = [v.name for v in reference.graph.initializers.values() if v.const_value.numpy().ndim == 4]
    target = weights[len(weights) // 2]
    candidate = _scaled(reference, target, 1.05)
    cmp = compare_models(reference, candidate, ds, labels=labels, per_layer=True)
    assert np.isfinite(cmp.outputs[0].sqnr_db) and cmp.outputs[0].sqnr_db > 10
    sqnrs = [f.sqnr_db for f in cmp.layers]
    assert sqnrs == sorted(sqnrs), "layers worst first"
    assert any(np.isinf(s) for s in sqnrs), "layers before the perturbed one are untouched"
    assert cmp.layers[0].sqnr_db < 40


def test_compare_refuses_mismatches(matmul_proto):
    reference = io.load_model(MODELS / "digits_cnn.onnx")
    ds = Dataset(MODELS / "digits_eval.npz", reference, batch_size=150)
    with pytest.raises(DataError, match="450 labels for"):
        compare_models(reference, reference, Dataset(MODELS / "digits_eval.npz", reference, batch_size=150, limit=1),
                       labels=np.load(MODELS / "digits_eval_labels.npy"))
    with pytest.raises(OnnxcompError, match="outputs differ"):
        compare_models(reference, io.load_model(matmul_proto), ds)


def test_compare_cli_json(capsys):
    argv = ["compare", str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_mlp.onnx"),
            "--data", str(MODELS / "digits_eval.npz"), "--labels", str(MODELS / "digits_eval_labels.npy"),
            "--batch-size", "150", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"][0]["name"] == "logits"
    assert report["outputs"][0]["cosine"] == pytest.approx(1.0)
    assert report["accuracy"]["candidate"] == report["accuracy"]["reference"]


def test_default_channel_axis():
    assert default_channel_axis((1, 64, 8, 8)) == 1
    assert default_channel_axis((1, 84, 8400)) == 1
    assert default_channel_axis((1, 8400, 84)) == 2
    assert default_channel_axis((4, 10)) == -1
    assert default_channel_axis((4,)) is None
