"""Weights at 4 and 8 bits: round-to-nearest vs GPTQ, and quantized embedding tables (issue 19).

One build per run (so the peak RSS is that build's): ``quantize`` on the suite model with the
suite's calibration file and the given QuantizeConfig fields, then the task metric on the suite's
evaluation set (``tuning``) and on the report split (``report``: text the calibration and
tuning sets never saw, ``benchmarks/.cache/data/{minilm,rec}-report-*.npz``).

    python -m benchmarks.gptq_study minilm '{"mode": "weight-only", "weight_only_format": "ort"}'
    python -m benchmarks.gptq_study ppocr_rec '{"mode": "weight-only", "op_types": ["Conv", "MatMul", "Gemm"]}'

With ``--recipe R`` the build is ``onnxcomp.compress`` with recipe R instead (the size route), and
CONFIG holds ``{"stage.key": value}`` overrides of the recipe:

    python -m benchmarks.gptq_study ppocr_rec '{"cluster.bits": 4}' --recipe benchmarks/rec_size_route.toml

``--fresh-fonts DIR`` (ppocr_rec) also scores a third split that no choice saw (``fresh``: 200 lines
of the report split's generator, :func:`fresh_rec_split`, in the typefaces found under DIR, which
neither tune nor report uses, from another text source and seed).

``--calib-lines N`` (ppocr_rec) calibrates on N lines of the suite's own calibration generator
instead of its 32; ``--augment N`` adds N augmented copies of each calibration line.

Prints one JSON line: build seconds, peak RSS of the build (MiB), file bytes, metric per split.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import fetch, metrics, suite

CACHE = Path(__file__).resolve().parent / ".cache"


def _report_file(prefix: str) -> Path:
    found = sorted((CACHE / "data").glob(f"{prefix}-report-*.npz"))
    if not found:
        raise SystemExit(f"no report split {prefix}-report-*.npz in {CACHE / 'data'}")
    return found[0]


def _run(path: str, arrays: dict[str, np.ndarray], batch: int) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    n = len(next(iter(arrays.values())))
    return np.concatenate([sess.run(None, {k: v[i : i + batch] for k, v in arrays.items()})[0]
                           for i in range(0, n, batch)])


def _splits(name: str, task, limit: int | None = None, fresh: tuple[str, ...] = ()
            ) -> dict[str, tuple[dict[str, np.ndarray], object, int]]:
    """Per split: arrays, scorer and batch; ``limit``: the first ``limit`` samples only."""
    full = _all_splits(name, task, fresh)
    if not limit:
        return full
    return {split: ({k: v[:limit] for k, v in arrays.items()}, score.limited(limit), batch)
            for split, (arrays, score, batch) in full.items()}


#: The fresh split's typefaces: families neither the tune split (DejaVu) nor the report split
#: (Liberation, FreeFont, other DejaVu faces) uses; read from ``--fresh-fonts DIR`` (Debian's
#: fonts-crosextra-carlito, fonts-crosextra-caladea and fonts-urw-base35, unpacked with
#: ``apt-get download`` + ``dpkg -x``: nothing is installed).
FRESH_FONT_PREFIXES = ("Carlito", "Caladea", "URWBookman", "URWGothic", "C059", "P052", "NimbusSansNarrow")
FRESH_SEED = 104


def fresh_fonts(folder: str) -> tuple[str, ...]:
    found = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix in (".ttf", ".otf")
                   and p.name.startswith(FRESH_FONT_PREFIXES))
    if not found:
        raise SystemExit(f"--fresh-fonts: no {', '.join(FRESH_FONT_PREFIXES)} faces under {folder}")
    return tuple(found)


def fresh_rec_split(fonts: tuple[str, ...], n: int = 200, seed: int = FRESH_SEED) -> tuple[np.ndarray, list[str]]:
    """A third rec split for a clean held-out figure: the report split's generator (sizes 14-63 px,
    any contrasting colours, pixel noise up to sigma 12) with other typefaces (``fonts``), another
    seed, and another text: the docstrings of the encoder benchmark's packages
    (:data:`benchmarks.textdata.PACKAGE_MODULES`) that are in no rec split's pool. Cached under
    ``.cache/data`` by the fonts' names, ``n`` and ``seed``."""
    import contextlib
    import hashlib

    from benchmarks import textdata

    key = hashlib.sha256(json.dumps([[Path(f).name for f in fonts], n, seed, 1]).encode()).hexdigest()[:12]
    npz = CACHE / "data" / f"rec-fresh-{key}.npz"
    if npz.is_file():
        with np.load(npz) as z:
            return z["x"], json.loads(npz.with_suffix(".json").read_text())["texts"]
    taken = set(textdata.corpus()[0]) | set(textdata.report_sentences()[0])
    with contextlib.redirect_stdout(io.StringIO()):
        pool = [s for s in textdata.sentences_from_text(textdata._package_text()) if s not in taken]

    def render(rng, sentences, max_aspect):
        text, img = textdata._draw_line(rng, sentences, max_aspect, fonts, (14, 64), (14, 10),
                                        textdata._contrasting_colors)
        return textdata.LineImage(text, textdata._add_noise(rng, img, 12.0))

    x, texts = textdata.rec_samples(pool, n, seed, render=render)
    np.savez(npz, x=x)
    npz.with_suffix(".json").write_text(json.dumps({"texts": texts, "fonts": [Path(f).name for f in fonts],
                                                    "seed": seed, "text": "docstrings of " + ", ".join(textdata.PACKAGE_MODULES)}))
    return x, texts


def _all_splits(name: str, task, fresh: tuple[str, ...] = ()) -> dict[str, tuple[dict[str, np.ndarray], object, int]]:
    if name == "minilm":
        tune = {k: np.concatenate([b[k] for b in task.eval_batches]) for k in task.eval_batches[0]}
        with np.load(_report_file("minilm")) as z:
            rep = {k: z[k] for k in z.files}

        def scorer(mask):
            def score(out, ref):
                c = metrics.row_cosine(metrics.mean_pool(out, mask[: len(out)]), metrics.mean_pool(ref, mask[: len(out)]))
                return {"cosine": float(c.mean()), "cosine_min": float(c.min())}
            score.limited = lambda n: scorer(mask[:n])
            return score

        return {"tuning": (tune, scorer(tune["attention_mask"]), 1), "report": (rep, scorer(rep["attention_mask"]), 1)}
    if name == "ppocr_rec":
        charset = fetch.rec_charset(task.fp32_path)
        tune = {"x": np.concatenate([b["x"] for b in task.eval_batches])}
        path = _report_file("rec")
        with np.load(path) as z:
            rep = {"x": z["x"]}
        texts = json.loads(path.with_suffix(".json").read_text())["texts"]
        tune_texts = json.loads(next((CACHE / "data").glob("rec-eval-*.json")).read_text())["texts"]

        def scorer(truth):
            def score(out, ref):
                pred = [s.strip() for s in metrics.ctc_greedy_decode(out, charset)]
                ref_text = [s.strip() for s in metrics.ctc_greedy_decode(ref, charset)]
                # finer than char_acc (one line is ~0.5 point): agreement with fp32 per frame and
                # in text, and the mean KL(fp32 || quantized) per frame of the softmax outputs
                p, q = np.clip(ref.astype(np.float64), 1e-12, 1), np.clip(out.astype(np.float64), 1e-12, 1)
                return {"char_acc": metrics.char_accuracy(pred, truth[: len(pred)]),
                        "char_agree_fp32": metrics.char_accuracy(pred, ref_text),
                        "frame_agree": float(np.mean(out.argmax(-1) == ref.argmax(-1))),
                        "kl": float(np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)))}
            score.limited = lambda n: scorer(truth[:n])
            return score

        splits = {"tuning": (tune, scorer(tune_texts), 10), "report": (rep, scorer(texts), 10)}
        if fresh:
            x, fresh_texts = fresh_rec_split(fresh)
            splits["fresh"] = ({"x": x}, scorer(fresh_texts), 10)
        return splits
    if name in ("digits_cnn", "digits_mlp", "digits_transformer"):
        # the suite's own scorer (top-1 accuracy against the labels, agreement with fp32) plus the
        # logits' SQNR against fp32, finer than one image (~0.44 point of the 225 tune images)
        def scorer(split):
            def score(out, ref):
                row = task.score(out, ref, split="report" if split == "report" else "tune")
                err = float(np.sum((out.astype(np.float64) - ref) ** 2))
                row["sqnr_db"] = float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(err, 1e-30)))
                return row
            def limited(n):
                raise SystemExit("--limit: minilm and ppocr_rec only")
            score.limited = limited
            return score

        tune = {"image": np.concatenate([b["image"] for b in task.eval_batches])}
        rep = {"image": np.concatenate([b["image"] for b in task.report_batches])}
        return {"tuning": (tune, scorer("tuning"), 1), "report": (rep, scorer("report"), 1)}
    raise SystemExit(f"unknown model {name!r} (minilm, ppocr_rec, digits_cnn, digits_mlp, digits_transformer)")


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a ``[C, H, W]`` float image (PIL, per channel)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
                     for c in img])


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[C, H, W]`` (edges replicated)."""
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((0, 0), (r, r), (r, r)), mode="edge")
    rows = sum(k[i] * pad[:, i:i + img.shape[1], :] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, :, i:i + img.shape[2]] for i in range(2 * r + 1))


def photometric(content: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One generic photometric variant of a normalised crop's content ``[C, H, w]`` (values in
    [-1, 1]), each step with probability 1/2: polarity inverted (light text on a dark ground),
    contrast scaled by 0.4-1 and brightness shifted by up to 0.2, Gaussian blur (sigma 0.5-1.2 px),
    Gaussian pixel noise (sigma up to 8 of 255 levels)."""
    out = content.astype(np.float64)
    if rng.random() < 0.5:
        out = -out
    if rng.random() < 0.5:
        m = out.mean()
        out = m + (out - m) * rng.uniform(0.4, 1.0) + rng.uniform(-0.2, 0.2)
    if rng.random() < 0.5:
        out = _blur(out, rng.uniform(0.5, 1.2))
    if rng.random() < 0.5:
        out = out + rng.normal(0.0, rng.uniform(0.0, 8 * 2 / 255), out.shape)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def augment_lines(x: np.ndarray, copies: int, seed: int = 0, photometric_too: bool = False) -> np.ndarray:
    """``x`` (rec crops ``[N, 3, 48, W]``, text left-aligned, zero padding on the right) followed by
    ``copies`` augmented versions of each line: the text scaled horizontally by 0.8-1.25 and
    vertically by 0.8-1.0 (re-centred on its background colour), shifted right by 0-12 pixels;
    ``photometric_too``: then also :func:`photometric` (its draws follow the geometric ones', so the
    geometry is the same either way)."""
    rng = np.random.default_rng(seed)
    prng = np.random.default_rng(seed + 1)
    n, c, h, w = x.shape
    out = [x]
    for _ in range(copies):
        batch = np.zeros_like(x)
        for i in range(n):
            cols = np.flatnonzero(np.any(x[i] != 0.0, axis=(0, 1)))
            width = int(cols[-1]) + 1 if cols.size else w
            content = x[i, :, :, :width]
            bg = np.median(np.concatenate([content[:, 0, :], content[:, -1, :]], axis=1), axis=1)
            new_w = max(8, min(w, int(round(width * rng.uniform(0.8, 1.25)))))
            new_h = max(8, int(round(h * rng.uniform(0.8, 1.0))))
            scaled = _resize(content, new_h, new_w)
            shift = int(rng.integers(0, 13))
            new_w = min(new_w, w - shift)
            top = (h - new_h) // 2
            canvas = np.broadcast_to(bg[:, None, None], (c, h, shift + new_w)).copy()
            canvas[:, top:top + new_h, shift:] = scaled[:, :, :new_w]
            batch[i, :, :, :shift + new_w] = photometric(canvas, prng) if photometric_too else canvas
        out.append(batch)
    return np.concatenate(out).astype(np.float32)


def _compress(model, recipe: str, overrides: dict, data):
    """``compress`` with ``recipe`` and ``{"stage.key": value}`` overrides; the report's rounding
    and eight_bit entries (which the quantize path prints) are absent."""
    from onnxcomp.compress import compress
    from onnxcomp.recipe import load_recipe

    built, report = compress(model, load_recipe(recipe).with_overrides(overrides), data)
    return built, {"stages": report.get("stages")}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads: onnxruntime's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _zipped_bytes(path: str) -> int:
    """Bytes of a zip archive holding ``path`` as its one entry (deflate, level 9)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(path, os.path.basename(path))
    return buf.getbuffer().nbytes


def _allocation(report: dict) -> dict:
    """The cluster stage's width per tensor (``bits_per_weight``): the allocation summary and
    ``{tensor: bits}``, or nothing."""
    for stage in report.get("stages") or ():
        stats = stage.get("stats") or {}
        if stage.get("stage") == "cluster" and stats.get("allocation"):
            alloc = dict(stats["allocation"])
            return {"allocation": {k: alloc[k] for k in ("bits_per_weight_target", "bits_per_weight", "budget_bytes",
                                                         "estimated_bytes", "over_budget", "tensors_per_width", "rounds", "head_min_bits",
                                                         "elements_per_width") if k in alloc},
                    "widths": {n: [b, round(stats["tensors"][n]["candidates"][b]["error"], 7)]
                               for n, b in (alloc.get("widths") or {}).items()}}
    return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gptq_study", description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=("minilm", "ppocr_rec", "digits_cnn", "digits_mlp", "digits_transformer"))
    p.add_argument("config", help="QuantizeConfig fields as a JSON object")
    p.add_argument("--keep", metavar="OUT.onnx", help="keep the built model here")
    p.add_argument("--limit", type=int, help="score only the first N samples of each split")
    p.add_argument("--fresh-fonts", metavar="DIR", help="ppocr_rec: also score the fresh split (fresh_rec_split) "
                   "rendered in the typefaces under DIR")
    p.add_argument("--split", choices=("tuning", "report", "fresh"), action="append",
                   help="score only this split (repeatable; default both): choose on tuning, confirm on report")
    p.add_argument("--augment", type=int, default=0, metavar="N",
                   help="ppocr_rec: calibrate on the suite's lines plus N augmented copies of each (augment_lines)")
    p.add_argument("--photometric", action="store_true",
                   help="ppocr_rec: the --augment copies also get generic photometric changes (polarity, "
                        "contrast, blur, noise: augment_lines' photometric)")
    p.add_argument("--calib-lines", type=int, default=0, metavar="N",
                   help="ppocr_rec: calibrate on N lines of the suite's calibration generator (calib pool, "
                        "seed 101; its first 32 are the suite's lines; cached under .cache/data) instead of 32")
    p.add_argument("--ref-cache", metavar="DIR", help="keep/reuse the fp32 outputs of each split here")
    p.add_argument("--recipe", metavar="RECIPE",
                   help="build with onnxcomp.compress and this recipe (name or TOML; CONFIG then holds "
                        "--set-style overrides {\"stage.key\": value}) instead of quantize")
    args = p.parse_args(argv)

    from onnxcomp.data import Dataset
    from onnxcomp.io import load_model, save_model
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    task = suite.SUITE[args.model].prepare(suite.Context(cache=CACHE))
    fields = json.loads(args.config)
    for key in ("op_types", "eight_bit", "exclude"):
        if key in fields:
            fields[key] = tuple(fields[key])
    config = None if args.recipe else QuantizeConfig(**fields)
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    model = load_model(task.fp32_path)
    calib_path = task.calib_path
    if args.calib_lines:
        if args.model != "ppocr_rec":
            raise SystemExit("--calib-lines: ppocr_rec only")
        calib_path = suite.rec_calib_path(suite.Context(cache=CACHE), args.calib_lines)
    if args.augment:
        with np.load(calib_path) as z:
            calib_path = os.path.join(tempfile.mkdtemp(), "calib-augmented.npz")
            np.savez(calib_path, x=augment_lines(z["x"], args.augment, photometric_too=args.photometric))
    if args.recipe:
        quantized, report = _compress(model, args.recipe, fields, Dataset(calib_path, model))
    else:
        quantized, report = quantize(model, Dataset(calib_path, model), config, verify=False)
    out = args.keep or os.path.join(tempfile.mkdtemp(), "model.onnx")
    save_model(quantized, out, force=True)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del quantized, model
    row = {"model": args.model, "config": fields, "augment": args.augment, "photometric": args.photometric,
           "calib_lines": args.calib_lines or task.calib_samples, "build_seconds": round(seconds, 1),
           "build_cpu_seconds": round(cpu, 1), "build_peak_rss_mib": round(peak),
           "file_bytes": os.path.getsize(out), "fp32_bytes": os.path.getsize(task.fp32_path)}
    if args.recipe:
        row["zipped_bytes"], row["fp32_zipped_bytes"] = _zipped_bytes(out), _zipped_bytes(str(task.fp32_path))
        row.update(_allocation(report))
    rounding = report.get("rounding") or {}
    if rounding.get("method") == "gptq":
        row["rounding"] = {k: rounding[k] for k in ("layer_sqnr_db_nearest_median", "layer_sqnr_db_median",
                                                    "weights", "weights_kept_nearest", "seconds", "stages") if k in rounding}
        layers = rounding.get("layers") or {}
        worst = sorted(layers, key=lambda n: -float(layers[n]["output_error"]))[:8]
        row["rounding"]["worst_layers"] = {n: round(float(layers[n]["output_error"]), 5) for n in worst}
    wide = report.get("eight_bit")
    if wide:
        row["eight_bit"] = {"weights": len(wide["weights"]), "share_of_elements": round(wide["share_of_elements"], 4)}
    emb = (report.get("embeddings") or {}).get("tables") or {}
    row["embeddings"] = {k: {"bits": v["bits"], "sqnr_db": round(v["sqnr_db"], 2)} for k, v in emb.items()}
    for split, (arrays, score, batch) in _splits(args.model, task, args.limit,
                                                       fresh_fonts(args.fresh_fonts) if args.fresh_fonts else ()).items():
        if args.split and split not in args.split:
            continue
        tag = f"-{args.limit}" if args.limit else ""
        cached = Path(args.ref_cache) / f"{args.model}-{split}{tag}.npy" if args.ref_cache else None
        if cached is not None and cached.is_file():
            ref = np.load(cached)
        else:
            ref = _run(str(task.fp32_path), arrays, batch)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.save(cached, ref)
        got = _run(out, arrays, batch)
        row[split] = {"fp32": score(ref, ref), "quantized": score(got, ref)}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
