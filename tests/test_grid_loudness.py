"""The coarse-grid rule judges the median calibration feed too, not only the pooled SQNR.

An activation whose scale follows the input's loudness (an STFT magnitude in a VAD, a spectrogram
before its log) keeps a fine pooled SQNR on its 8-bit grid, since the loud feeds carry nearly all
the power, while the quiet feeds fall between the grid's steps. On silero-vad the STFT magnitude
kept 26.9 dB pooled and 22.0 dB on the median feed; quantizing the first encoder Conv that reads it
flipped windows whose fp32 speech probability sat up to 0.39 from the 0.5 threshold (RESULTS.md,
tenth session). The models here are built in code and run on onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.quant import static
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.testing import run_model, sqnr_db


def test_grid_sqnr_pooled_and_median_feed():
    # one loud feed carries the pooled figure; the two quiet ones are the median
    pooled, median = static.grid_sqnr([100.0, 1.0, 1.0], [0.01, 0.01, 0.01])
    assert pooled == pytest.approx(10 * math.log10(102 / 0.03))  # 35.31 dB
    assert pooled == pytest.approx(35.3148, abs=1e-4)
    assert median == pytest.approx(20.0)
    # an exact feed (no rounding noise) and an all-zero one count as exact, not as 0 dB
    assert static.grid_sqnr([4.0, 0.0, 1.0], [0.0, 0.0, 0.01]) == (pytest.approx(10 * math.log10(5 / 0.01)), math.inf)
    assert static.grid_sqnr([1.0, 2.0], [0.0, 0.0]) == (math.inf, math.inf)


def _log_frontend():
    """x (a magnitude spectrum: 16 bins x 8 frames) -> Conv -> Relu -> log(. + 1e-3) -> Conv -> Relu -> Conv.
    After the log the feature maps no longer follow the input's loudness; before it they do."""
    rng = np.random.default_rng(14)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    return make_proto(
        [oh.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1], name="conv0"),
         oh.make_node("Relu", ["c0"], ["r0"], name="relu0"),
         oh.make_node("Add", ["r0", "eps"], ["a0"], name="floor"),
         oh.make_node("Log", ["a0"], ["l0"], name="log"),
         oh.make_node("Conv", ["l0", "w1", "b1"], ["c1"], pads=[1, 1], name="conv1"),
         oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         oh.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")],
        [("x", [1, 16, 8])], [("y", [1, 4, 8])],
        [("w0", w(16, 16, 3)), ("eps", np.full((1,), 1e-3, np.float32)), ("w1", w(16, 16, 3)), ("b1", w(16)),
         ("w2", w(4, 16, 1))])


def _feeds(seed: int, n: int, loudness_db: float) -> list[dict[str, np.ndarray]]:
    """|Gaussian| magnitudes, each feed at a gain drawn log-uniformly over ``loudness_db`` below 1."""
    r = np.random.default_rng(seed)
    return [{"x": (np.abs(r.standard_normal((1, 16, 8))) * 10 ** (-r.uniform(0, loudness_db / 20))).astype(np.float32)}
            for _ in range(n)]


def _sqnr(ref, out, idx) -> float:
    return sqnr_db(np.concatenate([ref[i][0].ravel() for i in idx]), np.concatenate([out[i][0].ravel() for i in idx]))


def test_loudness_following_input_keeps_its_reader_float(monkeypatch):
    proto = _log_frontend()
    reference = io.load_model(proto)
    calib = _feeds(1, 32, loudness_db=60.0)
    quantized, report = quantize(proto, calib, QuantizeConfig(calibration="minmax"))
    reason = report["skipped"]["conv0"]
    assert "x keeps 23.0 dB on a 8-bit grid on its median calibration feed (40.0 dB pooled" in reason
    assert report["int8_nodes"] == 1 and "conv1" not in report["skipped"]  # after the log: int8
    conv0 = next(n for n in quantized.graph if n.name == "conv0")
    assert conv0.inputs[0].name == "x" and conv0.inputs[1].const_value.numpy().dtype == np.float32

    # the pooled rule alone (the previous default) quantizes conv0 as well
    pooled_only = static.grid_sqnr
    monkeypatch.setattr(static, "grid_sqnr", lambda p, e: (pooled_only(p, e)[0],) * 2)
    before, before_report = quantize(proto, calib, QuantizeConfig(calibration="minmax"))
    assert before_report["int8_nodes"] == 2 and "conv0" not in before_report["skipped"]

    test = _feeds(2, 40, loudness_db=60.0)
    ref, now, then = (run_model(m, test) for m in (reference, quantized, before))
    order = np.argsort([float(np.square(f["x"]).mean()) for f in test])
    quiet, loud = order[:20], order[20:]
    assert _sqnr(ref, now, quiet) > 41.0 and _sqnr(ref, now, loud) > 42.0  # 41.7 / 42.5 dB
    assert _sqnr(ref, then, quiet) < 20.0  # 19.3 dB: the quiet half's input rounds to a few steps
    assert _sqnr(ref, then, loud) < 26.0  # 25.0 dB


def test_steady_loudness_quantizes_the_same_conv():
    _, report = quantize(_log_frontend(), _feeds(1, 32, loudness_db=0.0), QuantizeConfig(calibration="minmax"))
    assert report["int8_nodes"] == 2
    assert "conv0" not in report["skipped"] and "conv1" not in report["skipped"]
