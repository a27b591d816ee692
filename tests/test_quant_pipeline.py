"""One static pipeline (quant/static.py): quantize and the fallback study agree on every setting.

Regression tests for two ways the fallback path (``fidelity_target`` / ``max_drop``) used to drift
from plain ``quantize``: it dropped equalization and bias correction without a word, and it
upgraded an old opset although ``allow_upgrade=False``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import MODELS
from test_quant_static import _calib, _cnn_proto

from onnxcomp import io
from onnxcomp.data import Dataset
from onnxcomp.errors import OpsetError
from onnxcomp.measure.fidelity import compare_models
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.testing import run_model


def test_fallback_keeps_equalization_and_bias_correction(rng):
    """With a budget met at once, the fallback result is the plain result, recovery included."""
    proto = _cnn_proto(rng)
    reference = io.load_model(proto)
    calib = _calib(rng, 24)
    config = QuantizeConfig(per_channel=False, equalize=True, bias_correction=True)
    plain, plain_report = quantize(proto, calib, config)
    budget, report = quantize(proto, calib, dataclasses.replace(config, fidelity_target=0.0))
    assert set(plain_report["recovery"]) == {"equalize", "bias_correction"}
    assert set(report.get("recovery", {})) == {"equalize", "bias_correction"}, sorted(report)
    assert report["recovery"]["bias_correction"]["corrected"] == plain_report["recovery"]["bias_correction"]["corrected"] > 0
    assert report["fallback"]["met"] and report["fallback"]["float_nodes"] == []
    feeds = _calib(rng, 8)
    for a, b in zip(run_model(plain, feeds), run_model(budget, feeds)):
        np.testing.assert_allclose(b[0], a[0], atol=1e-6, rtol=0)
    sqnr = compare_models(reference, budget, Dataset(feeds, reference)).outputs[0].sqnr_db
    assert sqnr > 25, f"per-tensor int8 with CLE and bias correction: {sqnr:.1f} dB"


def test_fallback_respects_allow_upgrade(rng):
    """An opset-12 model with allow_upgrade=False is refused by both paths, not upgraded."""
    proto = _cnn_proto(rng, opset=12)
    calib = _calib(rng, 8)
    with pytest.raises(OpsetError, match="opset 12"):
        quantize(proto, calib, QuantizeConfig(), allow_upgrade=False)
    with pytest.raises(OpsetError, match="opset 12"):
        quantize(proto, calib, QuantizeConfig(fidelity_target=10.0), allow_upgrade=False)
    upgraded, report = quantize(proto, calib, QuantizeConfig(fidelity_target=10.0))
    assert io.onnx_opset(upgraded) == 13
    assert any("upgraded the model from opset 12 to 13" in n for n in report["notes"]), report["notes"]


def test_digits_cnn_budget_path_matches_plain_path():
    """The shipped CNN: a met budget gives the plain model's outputs exactly (same pipeline)."""
    reference = io.load_model(MODELS / "digits_cnn.onnx")
    calib = MODELS / "digits_calib.npz"
    config = QuantizeConfig(equalize=True)
    plain, _ = quantize(reference, calib, config)
    budget, report = quantize(reference, calib, dataclasses.replace(config, fidelity_target=0.0))
    assert set(report["recovery"]) == {"equalize"}
    ds = Dataset(MODELS / "digits_eval.npz", reference, batch_size=90)
    feeds = [next(iter(ds))]
    np.testing.assert_allclose(run_model(budget, feeds)[0][0], run_model(plain, feeds)[0][0], atol=1e-6, rtol=0)
