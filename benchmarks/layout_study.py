"""The layout YOLO's two metrics on more pages, with page-bootstrap intervals and the agreement metric's floor.

The suite's ``layout_yolo`` scores a candidate by ``f1_fp32`` (box F1 at IoU 0.5 with the same class
against fp32's own detections, conf 0.25, class-wise NMS 0.45) and ``f1_labels`` (the same F1 against the
rendered blocks, the task metric proper), on 24 pages per split.  This script renders ``--pages`` pages
per split with the suite's own generator (``benchmarks.suite_extra.layout_samples``, same pools, fonts,
columns and seeds: the first 24 pages are the suite's, byte for byte, checked against the suite's cached
split when it is there), runs each candidate, and prints per split:

* ``f1_fp32`` with its 95% page-bootstrap interval (fp32 against itself is 1 by construction, so its
  difference to fp32 is ``f1_fp32 - 1``);
* ``f1_labels``, precision and recall against the rendered blocks, each with its 95% interval, and the
  paired difference candidate - fp32 with its own paired interval (the same resampled pages for both);
* the figures on the first 24 pages only (what the suite sees).

Candidates are ONNX paths or ``fp32``, with modifiers after ``:`` that make perturbations of the
model or input which are not int8 at all (the floor of ``f1_fp32``)::

    fp32:opt=basic       the fp32 model with onnxruntime's basic graph optimizations (reference: all)
    fp32:opt=disable     ... with none
    fp32:fp16w           every float initializer round-tripped through float16 (the model stays float32)
    fp32:noise=1         input + uniform noise in [-1/255, +1/255] (one grey level), clipped to [0, 1]
    fp32:noise=1:seed=2  another draw of that noise (default seed 0)
    fp32:shift=1         every pixel one grey level darker (clipped at 0)
    fp32:dx=1            the same page 1 pixel to the right (``dy=``: down), boxes moved back before
                         scoring: the page is rolled inside its letterbox, whose grey sides (and the page's
                         white top and bottom margins) wrap onto themselves, so it is the same document
    PATH.onnx            a candidate as it is (modifiers apply to it too)

The reference is always the fp32 model (``fetch.wheel_member`` of the suite's wheel) with all graph
optimizations on clean input, as in the suite (``benchmarks.run``: ``graph_optimization="all"``).

Usage::

    nice -n 10 python -m benchmarks.layout_study --pages 72 fp32:noise=1 benchmarks/.cache/builds/layout_yolo/oc_quantize_cli.onnx
    python -m benchmarks.layout_study --pages 72 --json /tmp/layout.json ...

Detections are cached per (model bytes, modifiers, split, page count) in ``--cache`` (default
``/tmp/layout_study``), so adding a candidate does not rerun the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.metrics import box_iou
from benchmarks.suite_extra import LAYOUT_MEMBER, LAYOUT_SPEC, class_f1, yolo_decode

CACHE = Path(__file__).parent / ".cache"
SUITE_PAGES = 24
# (sentence pool, seed, fonts, columns): the suite's tune and report splits (suite_extra._layout_yolo)
SPLIT_STYLE = {"tune": ("calib", 402, "sans", 1), "report": ("eval", 403, "serif", 2)}
# the suite's cached 24-page splits, to check the first pages byte for byte
# how far a page may be moved and stay the same document: the letterbox's grey sides are 150 px wide, and
# render_layout_page draws the running header at row 28 and the footer at row 979 on every page (the suite's
# 48 cached pages have ink in rows 30-990 only)
MAX_MOVE = {"dx": 150, "dy": 30}
SUITE_FILES = {"tune": "layout-tune-bef6fe219c23", "report": "layout-report-992dd398be0a"}


# --------------------------------------------------------------------------- statistics


def page_counts(preds, truths, iou_thresh: float = 0.5) -> np.ndarray:
    """``[n_pages, 3]`` int: (true positives, predictions, truths) per page, class-matched as ``class_f1``.

    ``preds`` and ``truths`` are per page ``(boxes [n, 4], classes [n])``.  Summing rows over pages and
    taking :func:`f1_of` gives exactly ``class_f1`` over those pages (matching never crosses pages)."""
    rows = []
    for p, t in zip(preds, truths, strict=True):
        r = class_f1([p], [t], iou_thresh)
        rows.append((r["tp"], r["n_pred"], r["n_gt"]))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def matched(pred: np.ndarray, gt: np.ndarray, iou_thresh: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(pred matched, gt matched)`` of ``metrics.match_boxes``' one-to-one greedy matching."""
    iou = box_iou(pred, gt)
    mp, mg = np.zeros(iou.shape[0], bool), np.zeros(iou.shape[1], bool)
    if iou.size:
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            i, j = divmod(int(flat), iou.shape[1])
            if iou[i, j] < iou_thresh:
                break
            if not (mp[i] or mg[j]):
                mp[i] = mg[j] = True
    return mp, mg


def disagreements(det: list, ref: list, near: float = 0.35) -> dict[str, int]:
    """Why the candidate's detections ``det`` and fp32's ``ref`` (per page ``(boxes, classes, scores)``)
    disagree, under ``class_f1``'s class-wise matching.

    fp32 boxes left unmatched: ``missed_class`` (an unmatched candidate box of another class at IoU >= 0.5:
    a class flip), ``missed_shifted`` (a same-class candidate box at IoU in [0.3, 0.5)), ``missed_gone`` (neither);
    ``missed_near`` counts those whose fp32 score is below ``near`` (at the 0.25 threshold's edge).
    Candidate boxes left unmatched: ``extra`` and ``extra_near`` (own score below ``near``)."""
    out = dict.fromkeys(("missed", "missed_near", "missed_class", "missed_shifted", "missed_gone", "extra",
                         "extra_near"), 0)
    for (pb, pc, ps), (rb, rc, rs) in zip(det, ref, strict=True):
        mp, mr = np.zeros(len(pb), bool), np.zeros(len(rb), bool)
        for c in np.union1d(pc, rc):
            ip, ir = np.nonzero(pc == c)[0], np.nonzero(rc == c)[0]
            a, b = matched(pb[ip], rb[ir])
            mp[ip], mr[ir] = a, b
        iou = box_iou(rb, pb)
        for j in np.nonzero(~mr)[0]:
            out["missed"] += 1
            out["missed_near"] += int(rs[j] < near)
            other = iou[j][(pc != rc[j]) & ~mp] if len(pb) else np.zeros(0)
            same = iou[j][pc == rc[j]] if len(pb) else np.zeros(0)
            if other.size and other.max() >= 0.5:
                out["missed_class"] += 1
            elif same.size and same.max() >= 0.3:
                out["missed_shifted"] += 1
            else:
                out["missed_gone"] += 1
        out["extra"] += int((~mp).sum())
        out["extra_near"] += int((ps[~mp] < near).sum())
    return out


def f1_of(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled precision, recall and F1 of summed counts ``[..., 3]`` (same conventions as
    ``metrics.detection_scores``: no predictions and no truths is precision 1; no truths is recall 1)."""
    c = np.asarray(counts, dtype=np.float64)
    tp, n_pred, n_gt = c[..., 0], c[..., 1], c[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_pred > 0, tp / np.where(n_pred > 0, n_pred, 1), np.where(n_gt == 0, 1.0, 0.0))
        recall = np.where(n_gt > 0, tp / np.where(n_gt > 0, n_gt, 1), 1.0)
        s = precision + recall
        f1 = np.where(s > 0, 2 * precision * recall / np.where(s > 0, s, 1), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def resample(n_pages: int, draws: int, seed: int) -> np.ndarray:
    """``[draws, n_pages]`` page indices drawn with replacement (one seeded set shared by all candidates,
    so that differences are paired by page)."""
    return np.random.default_rng(seed).integers(0, n_pages, size=(draws, n_pages))


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summary(counts: np.ndarray, idx: np.ndarray, base: np.ndarray | None = None) -> dict[str, dict]:
    """Per figure (precision, recall, f1): the pooled value and its page-bootstrap interval over the
    resamples ``idx``; with ``base`` (fp32's counts on the same pages) the paired difference
    ``counts - base`` and its interval, each resample scoring both on the same pages."""
    point = f1_of(counts.sum(0))
    boot = f1_of(counts[idx].sum(1))
    out: dict[str, dict] = {}
    if base is not None:
        bpoint = f1_of(base.sum(0))
        bboot = f1_of(base[idx].sum(1))
    for k in ("precision", "recall", "f1"):
        out[k] = {"value": float(point[k]), "ci": interval(boot[k])}
        if base is not None:
            out[k]["diff"] = float(point[k] - bpoint[k])
            out[k]["diff_ci"] = interval(boot[k] - bboot[k])
    return out


# --------------------------------------------------------------------------- data and models


def render(split: str, n: int):
    """``(images [n, 3, 1024, 1024] float32, truths per page)``: the suite's generator, ``n`` pages."""
    from benchmarks import textdata
    from benchmarks.suite_extra import _layout_truth, layout_samples

    pool, seed, fonts, columns = SPLIT_STYLE[split]
    x, labels = layout_samples(textdata.split_sentences()[pool], n, seed, fonts, columns)
    return x, labels, _layout_truth(labels)


def check_suite_pages(split: str, x: np.ndarray, labels: list) -> str:
    """Whether the first pages equal the suite's cached split (images byte for byte, labels equal)."""
    stem = CACHE / "data" / SUITE_FILES[split]
    if not stem.with_suffix(".npz").exists():
        return f"suite's cached {split} split not found ({stem}.npz): not compared"
    with np.load(stem.with_suffix(".npz")) as z:
        ref = z["images"]
    k = min(len(ref), len(x))
    same = ref.shape[1:] == x.shape[1:] and np.array_equal(ref[:k], x[:k])
    meta = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else None
    ref_labels = None if meta is None else meta.get("meta", meta).get("labels")
    lab = "labels not compared" if ref_labels is None else (
        "labels equal" if json.loads(json.dumps(labels[:k], default=int)) == ref_labels[:k] else "LABELS DIFFER")
    return f"first {k} pages {'identical to' if same else 'DIFFER FROM'} the suite's {split} split ({lab})"


@dataclass
class Spec:
    """A candidate: a model file (or the fp32 reference) and the perturbations applied to it."""

    text: str
    path: Path
    opt: str = "all"
    fp16w: bool = False
    noise: float = 0.0
    shift: float = 0.0
    dx: int = 0
    dy: int = 0
    seed: int = 0

    @property
    def is_reference(self) -> bool:
        return self.text == "fp32"


def fp32_path() -> Path:
    from benchmarks import fetch

    return Path(fetch.wheel_member(LAYOUT_SPEC, LAYOUT_MEMBER, CACHE))


def parse_spec(text: str, fp32: Path | None = None) -> Spec:
    head, *mods = text.split(":")
    path = (fp32 or fp32_path()) if head == "fp32" else Path(head)
    spec = Spec(text, path)
    for m in mods:
        key, _, val = m.partition("=")
        if key == "opt" and val in ("all", "extended", "basic", "disable"):
            spec.opt = val
        elif key == "fp16w" and not val:
            spec.fp16w = True
        elif key == "noise" and val:
            spec.noise = float(val)
        elif key == "shift" and val:
            spec.shift = float(val)
        elif key in ("dx", "dy") and val.lstrip("-").isdigit():
            if abs(int(val)) > MAX_MOVE[key]:
                raise ValueError(f"modifier {m!r} in {text!r}: beyond {MAX_MOVE[key]} pixels the page no longer "
                                 "rolls onto its own margins (it would be another document)")
            setattr(spec, key, int(val))
        elif key == "seed" and val:
            spec.seed = int(val)
        else:
            raise ValueError(f"unknown modifier {m!r} in {text!r} (opt=all|extended|basic|disable, fp16w, "
                             "noise=GREY_LEVELS, shift=GREY_LEVELS, dx=PIXELS, dy=PIXELS, seed=N)")
    return spec


def fp16_roundtrip(model_bytes: bytes) -> bytes:
    """The model with every float32 initializer (and float32 ``Constant`` tensor) rounded to float16 and back."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(model_bytes)

    def fix(t):
        if t.data_type == onnx.TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))

    for t in m.graph.initializer:
        fix(t)
    for node in m.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    fix(a.t)
    return m.SerializeToString()


def perturb(x: np.ndarray, grey_levels: float, seed: int, page: int) -> np.ndarray:
    """``x + U(-g/255, g/255)`` clipped to [0, 1], one seeded draw per page (independent of the page count)."""
    rng = np.random.default_rng([seed, page])
    noise = rng.uniform(-grey_levels / 255, grey_levels / 255, size=x.shape).astype(np.float32)
    return np.clip(x + noise, 0.0, 1.0)


def detections(spec: Spec, split: str, x: np.ndarray, cache: Path, threads: int) -> list:
    """Decoded detections per page ``(boxes, classes, scores)``, cached by model bytes + modifiers."""
    import onnxruntime as ort

    raw = spec.path.read_bytes()
    mods = [spec.opt, spec.fp16w, spec.noise, spec.seed] + ([spec.shift] if spec.shift else [])
    mods += [("dx", spec.dx), ("dy", spec.dy)] if spec.dx or spec.dy else []
    key = hashlib.sha256(raw + json.dumps(mods).encode()).hexdigest()[:16]
    f = cache / f"{key}-{split}-{len(x)}.npz"
    if f.exists():
        with np.load(f) as z:
            return [(z[f"b{i}"], z[f"c{i}"], z[f"s{i}"]) for i in range(len(x))]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[spec.opt]
    sess = ort.InferenceSession(fp16_roundtrip(raw) if spec.fp16w else raw, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = []
    for i in range(len(x)):
        page = x[i : i + 1]
        if spec.noise:
            page = perturb(page, spec.noise, spec.seed, i)
        if spec.shift:
            page = np.clip(page - np.float32(spec.shift / 255), 0.0, 1.0)
        if spec.dx or spec.dy:
            page = np.roll(page, (spec.dy, spec.dx), axis=(2, 3))
        for b, c, sc in yolo_decode(sess.run(None, {name: page})[0]):
            out.append((b - np.array([spec.dx, spec.dy, spec.dx, spec.dy], dtype=b.dtype), c, sc))
    cache.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, (b, c, s) in enumerate(out):
        arrays.update({f"b{i}": b, f"c{i}": c, f"s{i}": s})
    np.savez(f, **arrays)
    return out


# --------------------------------------------------------------------------- report


def _pt(v: float) -> str:
    return f"{100 * v:.2f}"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def _diff(d: dict) -> str:
    return f"{100 * d['diff']:+.2f} [{100 * d['diff_ci'][0]:+.2f}, {100 * d['diff_ci'][1]:+.2f}]"


def study(specs: list[Spec], splits: list[str], pages: int, cache: Path, threads: int, draws: int, seed: int,
          fp32: Path | None = None, log=print) -> dict:
    ref_spec = parse_spec("fp32", fp32)
    result: dict = {"pages": pages, "draws": draws, "seed": seed, "splits": {}}
    for split in splits:
        t0 = time.perf_counter()
        x, labels, truth = render(split, pages)
        log(f"{split}: rendered {pages} pages in {time.perf_counter() - t0:.0f} s; {check_suite_pages(split, x, labels)}")
        idx = resample(pages, draws, seed)
        ref = detections(ref_spec, split, x, cache, threads)
        ref_bc = [(b, c) for b, c, _ in ref]
        ref_labels = page_counts(ref_bc, truth)
        rows = {}
        for spec in [ref_spec] + [s for s in specs if not s.is_reference]:
            t0 = time.perf_counter()
            det = ref if spec.is_reference else detections(spec, split, x, cache, threads)
            bc = [(b, c) for b, c, _ in det]
            vs_fp32, vs_labels = page_counts(bc, ref_bc), page_counts(bc, truth)
            row = {
                "f1_fp32": summary(vs_fp32, idx)["f1"],
                "labels": summary(vs_labels, idx, base=ref_labels),
                "first24": {"f1_fp32": float(f1_of(vs_fp32[:SUITE_PAGES].sum(0))["f1"]),
                            "f1_labels": float(f1_of(vs_labels[:SUITE_PAGES].sum(0))["f1"])},
                "boxes": int(vs_fp32[:, 1].sum()), "fp32_boxes": int(vs_fp32[:, 2].sum()),
                "fp32_boxes_below_0.35": int(sum(int((s < 0.35).sum()) for _, _, s in ref)),
                "truth_boxes": int(vs_labels[:, 2].sum()),
                "disagreements": disagreements(det, ref),
            }
            row["f1_fp32"]["diff"] = row["f1_fp32"]["value"] - 1.0
            row["f1_fp32"]["diff_ci"] = (row["f1_fp32"]["ci"][0] - 1.0, row["f1_fp32"]["ci"][1] - 1.0)
            rows[spec.text] = row
            log(f"  {split} {spec.text}: f1_fp32 {_pt(row['f1_fp32']['value'])} {_ci(row['f1_fp32']['ci'])}  "
                f"f1_labels {_pt(row['labels']['f1']['value'])} diff {_diff(row['labels']['f1'])}  "
                f"({time.perf_counter() - t0:.0f} s)")
        result["splits"][split] = rows
    return result


def markdown(result: dict) -> str:
    lines = []
    for split, rows in result["splits"].items():
        lines += [f"{split}, {result['pages']} pages ({result['draws']} page resamples, seed {result['seed']}); "
                  "figures x 100, [95% interval]; differences paired by page:", "",
                  "| candidate | f1_fp32 (first 24) | f1_fp32 - fp32 | f1_labels (first 24) | f1_labels - fp32 | "
                  "precision - fp32 | recall - fp32 | precision | recall |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lab = r["labels"]
            lines.append(
                f"| {name} | {_pt(r['f1_fp32']['value'])} {_ci(r['f1_fp32']['ci'])} ({_pt(r['first24']['f1_fp32'])}) "
                f"| {_diff(r['f1_fp32'])} | {_pt(lab['f1']['value'])} {_ci(lab['f1']['ci'])} ({_pt(r['first24']['f1_labels'])}) "
                f"| {_diff(lab['f1'])} | {_diff(lab['precision'])} | {_diff(lab['recall'])} "
                f"| {_pt(lab['precision']['value'])} {_ci(lab['precision']['ci'])} | {_pt(lab['recall']['value'])} {_ci(lab['recall']['ci'])} |")
        lines += ["", "| candidate | fp32 boxes missed (score < 0.35) | as another class | same class, IoU 0.3-0.5 | gone "
                  "| extra boxes (score < 0.35) |", "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            d = r["disagreements"]
            lines.append(f"| {name} | {d['missed']} ({d['missed_near']}) | {d['missed_class']} | {d['missed_shifted']} "
                         f"| {d['missed_gone']} | {d['extra']} ({d['extra_near']}) |")
        first = next(iter(rows.values()))
        lines += ["", f"fp32 boxes {first['fp32_boxes']} ({first['fp32_boxes_below_0.35']} with a score below 0.35), "
                  f"rendered blocks {first['truth_boxes']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.layout_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("candidates", nargs="*", help="ONNX paths or fp32, with :opt=, :fp16w, :noise=, :seed= modifiers")
    ap.add_argument("--pages", type=int, default=72, help="pages per split (the first 24 are the suite's)")
    ap.add_argument("--splits", default="tune,report")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draws", type=int, default=2000, help="page-bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="seed of the page resamples")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/layout_study"))
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    try:
        fp32 = fp32_path()
        specs = [parse_spec(c, fp32) for c in args.candidates]
        for s in specs:
            if not s.path.is_file():
                raise ValueError(f"no such model file: {s.path}")
        splits = [s for s in args.splits.split(",") if s]
        bad = [s for s in splits if s not in SPLIT_STYLE]
        if bad or args.pages < 1:
            raise ValueError(f"splits are tune and/or report and --pages >= 1 (got {args.splits!r}, {args.pages})")
    except ValueError as exc:
        print(f"layout_study: error: {exc}", file=sys.stderr)
        return 1
    res = study(specs, splits, args.pages, args.cache, args.threads, args.draws, args.seed, fp32,
                log=lambda s: print(s, file=sys.stderr, flush=True))
    print(markdown(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
