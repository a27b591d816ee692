"""Task metrics of the benchmark suite: pure numpy/python, no onnxruntime, no files.

Every function here is exercised on hand-made arrays in ``tests/test_benchmarks.py``.

Text recognition (PP-OCR rec)
    :func:`ctc_greedy_decode` takes the per-frame class scores ``[N, T, C]`` (or argmax indices
    ``[N, T]``), keeps the best class per frame, merges runs of the same class and drops the CTC
    blank (index 0).  ``charset[i]`` is the text of class ``i``; ``charset[0]`` is the blank and is
    never emitted.
    :func:`char_accuracy` is ``mean_i (1 - ED(pred_i, true_i) / max(len(pred_i), len(true_i), 1))``
    with ``ED`` the Levenshtein distance (unit costs): 1.0 when every line is read exactly, 0.0 when
    nothing matches.  :func:`line_accuracy` is the fraction of lines read exactly.

Text detection (PP-OCR det)
    :func:`prob_map_to_boxes` turns a probability map into axis-aligned boxes: threshold at
    ``thresh``, 8-connected components, drop components smaller than ``min_area`` pixels or whose
    mean probability is below ``box_thresh``, take each component's bounding box and grow every
    side by ``d = area * unclip_ratio / perimeter`` of that box (DB's "unclip" distance; the network
    predicts a shrunk text kernel).  Boxes are ``[x0, y0, x1, y1]`` in pixel-edge coordinates (a
    single pixel at column 3 spans ``x0 = 3, x1 = 4``).
    :func:`match_boxes` matches predictions to ground truth one-to-one, greedily by decreasing IoU,
    counting a pair when its IoU is at least ``iou_thresh``.  :func:`detection_scores` sums true
    positives, predictions and ground truths over all images and reports precision, recall and
    ``F1 = 2 P R / (P + R)`` (0 when P + R = 0; precision 1 and recall 1 when there is nothing to
    find and nothing was found).  :func:`pixel_iou` is the IoU of two boolean masks.

Sentence embeddings (MiniLM)
    :func:`mean_pool` averages the token vectors whose attention mask is 1; :func:`l2_normalize`;
    :func:`row_cosine` is the per-row cosine of two embedding matrices; :func:`nearest_neighbours`
    gives, for each row, the index of the most cosine-similar *other* row (first index on ties);
    :func:`nn_agreement` is the fraction of rows whose nearest neighbour is the same under the
    candidate's embeddings as under the reference's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "ctc_greedy_decode",
    "edit_distance",
    "char_accuracy",
    "line_accuracy",
    "box_iou",
    "match_boxes",
    "detection_scores",
    "prob_map_to_boxes",
    "boxes_to_mask",
    "pixel_iou",
    "mean_pool",
    "l2_normalize",
    "row_cosine",
    "nearest_neighbours",
    "nn_agreement",
]


# --------------------------------------------------------------------------- recognition


def ctc_greedy_decode(scores: np.ndarray, charset: Sequence[str], blank: int = 0) -> list[str]:
    """Greedy CTC decoding of ``[N, T, C]`` scores (or ``[N, T]`` class indices) into strings."""
    arr = np.asarray(scores)
    if arr.ndim == 3:
        idx = arr.argmax(axis=2)
    elif arr.ndim == 2 and arr.dtype.kind in "iu":
        idx = arr
    else:
        raise ValueError(f"expected [N, T, C] scores or [N, T] integer indices, got shape {arr.shape}")
    out = []
    for row in idx:
        keep = np.ones(row.shape[0], dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != blank
        out.append("".join(charset[int(i)] for i in row[keep]))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance with unit insertion, deletion and substitution costs."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _check_pairs(preds: Sequence[str], truths: Sequence[str]) -> None:
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} ground-truth lines")
    if not truths:
        raise ValueError("no lines to score")


def char_accuracy(preds: Sequence[str], truths: Sequence[str]) -> float:
    """``mean(1 - ED / max(len(pred), len(true), 1))`` over lines (see the module docstring)."""
    _check_pairs(preds, truths)
    total = 0.0
    for p, t in zip(preds, truths):
        total += 1.0 - edit_distance(p, t) / max(len(p), len(t), 1)
    return total / len(truths)


def line_accuracy(preds: Sequence[str], truths: Sequence[str]) -> float:
    """Fraction of lines whose prediction equals the ground truth exactly."""
    _check_pairs(preds, truths)
    return sum(p == t for p, t in zip(preds, truths)) / len(truths)


# --------------------------------------------------------------------------- detection


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of axis-aligned boxes ``[x0, y0, x1, y1]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_boxes(pred: np.ndarray, gt: np.ndarray, iou_thresh: float = 0.5) -> tuple[int, int, int]:
    """One-to-one greedy matching by decreasing IoU; returns ``(true_pos, n_pred, n_gt)``."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    iou = box_iou(pred, gt)
    tp = 0
    if iou.size:
        order = np.argsort(-iou, axis=None, kind="stable")
        used_p: set[int] = set()
        used_g: set[int] = set()
        for flat in order:
            i, j = divmod(int(flat), gt.shape[0])
            if iou[i, j] < iou_thresh:
                break
            if i in used_p or j in used_g:
                continue
            used_p.add(i)
            used_g.add(j)
            tp += 1
    return tp, pred.shape[0], gt.shape[0]


def detection_scores(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], iou_thresh: float = 0.5
) -> dict[str, float]:
    """Precision, recall and F1 over images given as ``(pred_boxes, gt_boxes)`` pairs."""
    tp = n_pred = n_gt = 0
    for pred, gt in pairs:
        t, p, g = match_boxes(pred, gt, iou_thresh)
        tp, n_pred, n_gt = tp + t, n_pred + p, n_gt + g
    precision = tp / n_pred if n_pred else (1.0 if n_gt == 0 else 0.0)
    recall = tp / n_gt if n_gt else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "n_pred": n_pred, "n_gt": n_gt}


def _components(mask: np.ndarray, prob: np.ndarray) -> list[tuple[int, float, int, int, int, int]]:
    """8-connected components of ``mask`` as ``(area, prob_sum, y0, y1, x0, x1)`` (exclusive ends).

    Works on horizontal runs of foreground pixels with a union-find, so the cost follows the number
    of runs, not of pixels.
    """
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    runs: list[tuple[int, int, int]] = []  # (row, start, end)
    prev: list[int] = []  # indices into runs of the previous row
    for y in range(mask.shape[0]):
        edges = np.diff(np.concatenate(([0], mask[y].astype(np.int8), [0])))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        cur = []
        j = 0
        for x0, x1 in zip(starts.tolist(), ends.tolist()):
            k = len(runs)
            runs.append((y, x0, x1))
            parent.append(k)
            cur.append(k)
            # previous-row runs touching [x0, x1) with 8-connectivity: start <= x1 and x0 <= end
            while j < len(prev) and runs[prev[j]][2] < x0:
                j += 1
            t = j
            while t < len(prev) and runs[prev[t]][1] <= x1:
                a, b = find(prev[t]), find(k)
                if a != b:
                    parent[b] = a
                t += 1
        prev = cur
    comps: dict[int, list] = {}
    for k, (y, x0, x1) in enumerate(runs):
        c = comps.setdefault(find(k), [0, 0.0, y, y + 1, x0, x1])
        c[0] += x1 - x0
        c[1] += float(prob[y, x0:x1].sum())
        c[2], c[3] = min(c[2], y), max(c[3], y + 1)
        c[4], c[5] = min(c[4], x0), max(c[5], x1)
    return [tuple(c) for c in comps.values()]


def prob_map_to_boxes(
    prob: np.ndarray,
    *,
    thresh: float = 0.3,
    box_thresh: float = 0.5,
    unclip_ratio: float = 1.6,
    min_area: int = 4,
) -> np.ndarray:
    """Boxes ``[K, 4]`` from a ``[H, W]`` text probability map (see the module docstring)."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"expected a [H, W] probability map, got shape {prob.shape}")
    h, w = prob.shape
    boxes = []
    for area, total, y0, y1, x0, x1 in sorted(_components(prob > thresh, prob), key=lambda c: (c[2], c[4])):
        if area < min_area or total / area < box_thresh:
            continue
        bw, bh = x1 - x0, y1 - y0
        d = bw * bh * unclip_ratio / (2.0 * (bw + bh))
        boxes.append([max(0.0, x0 - d), max(0.0, y0 - d), min(float(w), x1 + d), min(float(h), y1 + d)])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def boxes_to_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``[H, W]`` mask covering the (rounded) boxes."""
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        mask[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))] = True
    return mask


def pixel_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape (1.0 when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


# --------------------------------------------------------------------------- embeddings


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden [N, L, D]`` over the tokens where ``mask [N, L]`` is nonzero."""
    hidden = np.asarray(hidden, dtype=np.float64)
    m = (np.asarray(mask) != 0).astype(np.float64)[:, :, None]
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``a[i]`` and ``b[i]`` for every row ``i``."""
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """For each row, the index of the most cosine-similar other row."""
    e = l2_normalize(emb)
    if e.shape[0] < 2:
        raise ValueError("nearest neighbours need at least 2 rows")
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def nn_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Fraction of rows whose nearest other row is the same under ``cand`` as under ``ref``."""
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    if ref.shape != cand.shape:
        raise ValueError(f"embedding shapes differ: {ref.shape} vs {cand.shape}")
    return float(np.mean(nearest_neighbours(ref) == nearest_neighbours(cand)))
