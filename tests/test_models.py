"""The shipped models reach their stated accuracy on digits_eval.npz through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS

from onnxcomp import io
from onnxcomp.data import Dataset, load_labels
from onnxcomp.testing import run_model

# (file, minimum accuracy promised by the issue, accuracy measured when the file was made)
SHIPPED = [
    ("digits_cnn.onnx", 0.97, 0.9933),
    ("digits_mlp.onnx", 0.95, 0.9822),
    ("digits_transformer.onnx", 0.95, 0.9800),
]


def test_data_files_are_disjoint_and_valid():
    calib = np.load(MODELS / "digits_calib.npz")
    evaluation = np.load(MODELS / "digits_eval.npz")
    assert calib.files == ["image"] and evaluation.files == ["image"]
    c, e = calib["image"], evaluation["image"]
    assert c.dtype == e.dtype == np.float32 and c.shape[1:] == e.shape[1:] == (1, 32, 32)
    labels = load_labels(MODELS / "digits_eval_labels.npy", expected=e.shape[0])
    assert set(labels.tolist()) == set(range(10))
    eval_rows = {row.tobytes() for row in e}
    assert not any(row.tobytes() in eval_rows for row in c), "calibration and eval must be disjoint"


@pytest.mark.parametrize("name, floor, measured", SHIPPED)
def test_shipped_model_accuracy(name, floor, measured):
    model = io.load_model(MODELS / name)
    assert io.initializer_nbytes(model) < 2 * 2**20 and (MODELS / name).stat().st_size < 2 * 2**20
    ds = Dataset(MODELS / "digits_eval.npz", model, batch_size=64)
    logits = np.concatenate([out[0] for out in run_model(model, ds)])
    labels = load_labels(MODELS / "digits_eval_labels.npy", expected=logits.shape[0])
    acc = float(np.mean(logits.argmax(axis=1) == labels))
    assert acc >= floor, f"{name}: accuracy {acc:.4f} below {floor}"
    assert acc == pytest.approx(measured, abs=1e-4), f"{name}: models/README.md states {measured}, got {acc:.4f}"
