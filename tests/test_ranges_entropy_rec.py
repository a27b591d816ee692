"""Entropy (KL) ranges on the real PP-OCRv4 recognizer, read on text lines no suite split renders.

The lines are drawn here: sentences written for this test (not the license texts of the suite's
tune split nor the standard-library docstrings of its report split), in DejaVu faces at small
sizes (16-24 px, upscaled by the model's preprocessing), light on coloured backgrounds and dark on
light, with pixel noise.  Calibration uses the suite's calibration lines, as a user would calibrate
on the data at hand and then meet other text.

Plain KL thresholds clip the rare large values of PP-OCRv4's squeeze-and-excitation outputs by up
to 4x and the recognizer reads nothing; ``entropy`` keeps a KL threshold only where its consumers'
outputs do not err more than with min/max (onnxcomp.quant.ranges).  The test asserts both: the plain
thresholds ruin these lines, the guarded method reads them about as well as fp32.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.quant import calibrate as calibrate_mod
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.testing import run_model

SENTENCES = (
    "Walnut trees shade the old mill by the river",
    "Invoice 4471 was paid on the 3rd of March",
    "Keep the lid closed while the kettle boils",
    "Gate B17 opens at 06:45 for the night train",
    "A quiet harbour town with seven blue boats",
    "Return the ladder to shed number 12 please",
    "Pumpkin soup, fresh bread and cold cider",
    "The orchestra tuned up before the overture",
    "Turn left after the bakery on Elm Street",
    "Sample QX-208 must stay below 4 degrees",
    "Wind farms hum along the northern ridge",
    "Borrowed books are due back on Friday",
)
FACES = ("DejaVuSans.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansCondensed.ttf")


def _lines(seed: int = 7):
    from PIL import Image, ImageDraw

    from benchmarks import textdata

    rng = np.random.default_rng(seed)
    xs, texts = [], []
    for i, sentence in enumerate(SENTENCES):
        words = sentence.split()
        text = " ".join(words[: 3 + i % 3])  # 3-5 words: fits 320 px at height 48 unsqueezed
        font = textdata._font(FACES[i % len(FACES)], 16 + 2 * (i % 5))
        ascent, descent = font.getmetrics()
        w, h = int(np.ceil(font.getlength(text))) + 8, ascent + descent + 6
        if i % 2:  # light text on a saturated colour
            bg = tuple(int(v) for v in rng.integers(0, 120, 3))
            fg = (235, 235, 225)
        else:
            bg = tuple(int(v) for v in rng.integers(170, 256, 3))
            fg = tuple(int(v) for v in rng.integers(0, 60, 3))
        img = Image.new("RGB", (w, h), bg)
        ImageDraw.Draw(img).text((4, 3), text, font=font, fill=fg)
        noisy = np.clip(np.asarray(img, np.float32) + rng.normal(0, 6.0, (h, w, 3)), 0, 255).astype(np.uint8)
        xs.append(textdata.normalize_crop(noisy, 48, 320))
        texts.append(text)
    return np.stack(xs), texts


@pytest.fixture(scope="module")
def rec(ppocr_models):
    pytest.importorskip("PIL")
    from benchmarks import fetch, metrics, textdata

    path = ppocr_models / "ch_PP-OCRv4_rec_infer.onnx"
    if not textdata.fonts_available():
        pytest.skip("no DejaVu fonts (Debian: fonts-dejavu-core)")
    charset = fetch.rec_charset(path)
    calib, _ = textdata.rec_samples(textdata.split_sentences()["calib"], 8, 101)
    feeds = [{"x": calib[i : i + 1]} for i in range(len(calib))]
    x, texts = _lines()

    def char_acc(model) -> float:
        out = run_model(model, [{"x": x}])[0][0]
        return metrics.char_accuracy([s.strip() for s in metrics.ctc_greedy_decode(out, charset)], texts)

    return {"path": path, "feeds": feeds, "char_acc": char_acc}


def test_fp32_reads_the_lines(rec):
    from onnxcomp.io import load_model

    assert rec["char_acc"](load_model(rec["path"])) >= 0.95


def test_plain_kl_thresholds_ruin_rec_and_the_guarded_entropy_does_not(rec, monkeypatch):
    from onnxcomp.io import load_model

    fp32 = rec["char_acc"](load_model(rec["path"]))
    guarded, report = quantize(rec["path"], rec["feeds"], QuantizeConfig(calibration="entropy"), verify=False)
    chosen = report["calibration"]["chosen"]
    assert chosen.get("minmax", 0) > 0 and chosen.get("entropy", 0) > 0  # both kinds of range were kept
    acc_guarded = rec["char_acc"](guarded)
    assert acc_guarded >= fp32 - 0.03

    # The same calibration with every KL threshold taken as is (the method before the guard).
    original = calibrate_mod.choose_ranges

    def plain_kl(model, names, data, **kwargs):
        kwargs.update(methods=("entropy",), default="entropy", switch_gain=1.0)
        return original(model, names, data, **kwargs)

    monkeypatch.setattr(calibrate_mod, "choose_ranges", plain_kl)
    # without the coarse-grid rule, which would keep the nodes of the worst-clipped tensors float
    monkeypatch.setattr("onnxcomp.quant.static.MIN_GRID_SQNR_DB", float("-inf"))
    plain, _ = quantize(rec["path"], rec["feeds"], QuantizeConfig(calibration="entropy"), verify=False)
    acc_plain = rec["char_acc"](plain)
    assert acc_plain < 0.5
    assert acc_guarded - acc_plain > 0.4
