"""Range methods side by side: static int8 with minmax, percentile, mse, entropy and auto ranges.

Every model is calibrated on the suite's calibration data and scored on two disjoint splits:

``tuning``  data like the suite's evaluation data (same renderer, the suite's ``eval`` sentence
            pool, other seeds; the first half of ``models/digits_eval.npz`` for the digits models).
``report``  data the suite never renders: sentences from Python standard-library docstrings, font
            sizes 14-63 px, any foreground/background colours with enough contrast (light on dark
            too), Gaussian pixel noise; det pages get a random colour inversion / channel swap and
            noise; the second half of ``models/digits_eval.npz`` for the digits models.

Decisions (which method to make the default) are meant to be taken on ``tuning`` only; ``report``
says whether they generalise.  Usage (a few minutes per OCR model on 2 cores)::

    python -m benchmarks.ranges_study                       # every model, every method
    python -m benchmarks.ranges_study --models ppocr_rec --methods minmax,auto --json out.json

Figures in the branch's report came from
``--models ppocr_rec,ppocr_cls,ppocr_det --samples 30 --max-calib 16`` (30 lines a split, 7 det
pages) and ``--models digits_cnn,digits_mlp,digits_transformer`` (225 images a split, all 200
calibration images).  With 30 samples one line or image is 3.3 points: read small gaps as noise.
"""

from __future__ import annotations

import argparse
import contextlib
import io as _io
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import fetch, metrics, suite, textdata

METHODS = ("minmax", "percentile", "mse", "entropy", "auto")
MODELS = ("digits_cnn", "digits_mlp", "digits_transformer", "ppocr_rec", "ppocr_cls", "ppocr_det")


# --------------------------------------------------------------------------- held-out rendering


def _other_sentences() -> list[str]:
    with contextlib.redirect_stdout(_io.StringIO()):  # importing ``this`` prints the Zen of Python
        return textdata.sentences_from_text(textdata._stdlib_text())


def _other_line(rng: np.random.Generator, pool: list[str], max_aspect: float) -> textdata.LineImage:
    from PIL import Image, ImageDraw

    font = textdata._font(textdata.FONT_NAMES[int(rng.integers(len(textdata.FONT_NAMES)))], int(rng.integers(14, 64)))
    margin = (int(rng.integers(2, 14)), int(rng.integers(2, 10)))
    text = textdata.sample_line_text(rng, pool, font, max_aspect, margin)
    width, height = textdata._line_size(text, font, margin)
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    while abs(np.mean(bg) - np.mean(fg)) < 90:
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (width, height), bg)
    ImageDraw.Draw(img).text(margin, text, font=font, fill=fg)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, rng.uniform(0.0, 12.0), (height, width, 3))
    return textdata.LineImage(text, np.clip(noisy, 0, 255).astype(np.uint8))


def other_rec(n: int, seed: int, height: int = 48, width: int = 320):
    rng, pool = np.random.default_rng(seed), _other_sentences()
    lines = [_other_line(rng, pool, width / height) for _ in range(n)]
    return np.stack([textdata.normalize_crop(li.image, height, width) for li in lines]), [li.text for li in lines]


def other_cls(n: int, seed: int, height: int = 48, width: int = 192):
    rng, pool = np.random.default_rng(seed), _other_sentences()
    labels = np.array([i % 2 for i in range(n)], dtype=np.int64)
    rng.shuffle(labels)
    xs = []
    for lab in labels:
        img = _other_line(rng, pool, 1.25 * width / height).image
        xs.append(textdata.normalize_crop(np.ascontiguousarray(img[::-1, ::-1] if lab else img), height, width))
    return np.stack(xs), labels


def other_det(n: int, seed: int, size: int = 480):
    x, boxes = textdata.det_samples(_other_sentences(), n, seed, size=size)
    rng = np.random.default_rng(seed + 1)
    for i in range(n):
        img = x[i]
        if rng.random() < 0.5:
            img = -img  # light text on a dark page
        img = img[rng.permutation(3)]
        x[i] = np.clip(img + rng.normal(0.0, rng.uniform(0.0, 0.1), img.shape), -1.0, 1.0)
    return x, boxes


# --------------------------------------------------------------------------- tasks


def _run(model, x: np.ndarray, batch: int) -> np.ndarray:
    from onnxcomp.io import create_session, load_model

    sess = create_session(model if not isinstance(model, (str, Path)) else load_model(model))
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _task(name: str, cache: Path, n: int) -> dict:
    """``{"fp32", "calib", "splits": {split: (x, scorer)}, "batch", "metric"}``."""
    if name.startswith("digits"):
        from onnxcomp.measure.metrics import accuracy

        with np.load(suite.MODELS_DIR / "digits_eval.npz") as z:
            x = z["image"]
        y = np.load(suite.MODELS_DIR / "digits_eval_labels.npy")
        half = x.shape[0] // 2
        return {"fp32": suite.MODELS_DIR / f"{name}.onnx", "calib": suite.MODELS_DIR / "digits_calib.npz",
                "metric": "accuracy", "batch": 50,
                "splits": {"tuning": (x[:half], lambda o, yy=y[:half]: accuracy(o, yy)),
                           "report": (x[half:], lambda o, yy=y[half:]: accuracy(o, yy))}}
    ctx = suite.Context(cache=cache)
    pools = textdata.split_sentences()
    task = suite.SUITE[name].prepare(ctx)
    if name == "ppocr_rec":
        charset = fetch.rec_charset(task.fp32_path)

        def rec_scorer(texts):
            return lambda o: metrics.char_accuracy([s.strip() for s in metrics.ctc_greedy_decode(o, charset)], texts)

        tx, tt = textdata.rec_samples(pools["eval"], n, 9102)
        rx, rt = other_rec(n, 9103)
        splits = {"tuning": (tx, rec_scorer(tt)), "report": (rx, rec_scorer(rt))}
        metric, batch = "char_acc", 10
    elif name == "ppocr_cls":
        from onnxcomp.measure.metrics import accuracy

        tx, ty = textdata.cls_samples(pools["eval"], n, 9302)
        rx, ry = other_cls(n, 9303)
        splits = {"tuning": (tx, lambda o: accuracy(o, ty)), "report": (rx, lambda o: accuracy(o, ry))}
        metric, batch = "accuracy", 20
    else:
        def det_scorer(boxes):
            gt = [suite._pad_boxes(np.asarray(b, dtype=np.float64).reshape(-1, 4), suite.GT_MARGIN, 480) for b in boxes]
            return lambda o: metrics.detection_scores(
                [(metrics.prob_map_to_boxes(o[i, 0]), g) for i, g in enumerate(gt)])["f1"]

        pages = max(4, n // 4)
        tx, tb = textdata.det_samples(pools["eval"], pages, 9202)
        rx, rb = other_det(pages, 9203)
        splits = {"tuning": (tx, det_scorer(tb)), "report": (rx, det_scorer(rb))}
        metric, batch = "f1", 1
    return {"fp32": task.fp32_path, "calib": task.calib_path, "metric": metric, "batch": batch, "splits": splits}


def study(models, methods, cache: Path, n: int, max_samples: int | None, log=print) -> list[dict]:
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    rows = []
    for name in models:
        task = _task(name, cache, n)
        row = {"model": name, "metric": task["metric"], "fp32": {}, "methods": {}}
        for split, (x, scorer) in task["splits"].items():
            row["fp32"][split] = scorer(_run(task["fp32"], x, task["batch"]))
        for method in methods:
            t0 = time.perf_counter()
            q, rep = quantize(task["fp32"], task["calib"], QuantizeConfig(calibration=method, max_samples=max_samples),
                              verify=False)
            entry = {"seconds": round(time.perf_counter() - t0, 1)}
            if rep["calibration"].get("chosen"):
                entry["chosen"] = rep["calibration"]["chosen"]
            for split, (x, scorer) in task["splits"].items():
                entry[split] = scorer(_run(q, x, task["batch"]))
            row["methods"][method] = entry
            log(f"{name:20s} {method:10s} " + " ".join(f"{s} {entry[s]:.4f}" for s in task["splits"])
                + f"  ({entry['seconds']} s)")
        rows.append(row)
    return rows


def table(rows: list[dict], methods) -> str:
    out = []
    for split in ("tuning", "report"):
        out.append(f"\n{split} split (task metric, %; best single method marked *; auto - best)")
        out.append(f"| model | fp32 | {' | '.join(methods)} | auto - best |")
        out.append("|---|---|" + "---|" * (len(methods) + 1))
        for row in rows:
            vals = {m: 100 * row["methods"][m][split] for m in methods if m in row["methods"]}
            single = {m: v for m, v in vals.items() if m != "auto"}
            best = max(single.values()) if single else float("nan")
            cells = [f"{v:.1f}{'*' if m != 'auto' and v == best else ''}" for m, v in vals.items()]
            gap = f"{vals['auto'] - best:+.2f}" if "auto" in vals and single else "-"
            out.append(f"| {row['model']} | {100 * row['fp32'][split]:.1f} | {' | '.join(cells)} | {gap} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ranges_study", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--samples", type=int, default=40, help="lines per split (det: a quarter as many pages)")
    p.add_argument("--max-calib", type=int, default=None, help="calibrate on at most this many samples")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    rows = study(models, methods, fetch.CACHE, args.samples, args.max_calib)
    print(table(rows, methods))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
