r"""Dense detector heads judged by the boxes a detector would report.

Single-stage detectors of the YOLO family (v8 and later, and many exports in their layout) end in one
tensor ``[N, 4 + C, A]``: for each of ``A`` anchors, a box ``(cx, cy, w, h)`` in pixels and ``C``
class scores in ``[0, 1]`` (a Concat of the decoded boxes and a Sigmoid). Cosine or SQNR of that
tensor is dominated by the box coordinates (hundreds of pixels against scores below 1), so a model
whose scores moved enough to lose a tenth of its detections still reads cosine 0.999. What matters
is what post-processing keeps; :func:`detections` runs the usual one:

1. per anchor the best class and its score; anchors scoring at most ``conf`` (0.25) are dropped;
2. greedy non-maximum suppression per class (IoU above ``iou`` = 0.45 suppresses; boxes of other
   classes never suppress each other), at most ``max_det`` boxes, best first.

:func:`match_count` pairs the detections of two models greedily, highest IoU first, a pair needing
the same class and :math:`\mathrm{IoU} \ge 0.5`; the agreement of the two sets of detections is the
F1 :math:`2\,\mathrm{TP} / (n_\mathrm{ref} + n_\mathrm{cand})` (1 when neither finds anything).

Layout read from the data, not assumed per model: the attribute axis is the shorter of the last two
axes (``[N, A, 4 + C]`` is transposed first); the class rows are the rows after the four box rows
whose values all lie in ``[0, 1]`` in the original's output, in one run (rows that follow it, such
as the mask coefficients of a segmentation head, are not classes). Layouts with an objectness
column (YOLOv5) or boxes as corners are read the same way: both models are decoded alike, so the
figure still measures how much the written model's detections differ from the original's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONF", "NMS_IOU", "MATCH_IOU", "box_iou", "nms", "class_rows", "attributes_first", "detections",
           "match_count"]

#: Score above which an anchor is a detection.
CONF = 0.25
#: IoU above which a box suppresses a lower-scoring one of its class.
NMS_IOU = 0.45
#: IoU at which two detections of the same class are the same detection.
MATCH_IOU = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of corner boxes ``a`` [n, 4] and ``b`` [m, 4] (``x1, y1, x2, y2``): [n, m]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if rest.size:
            rest = rest[box_iou(boxes[i : i + 1], boxes[rest])[0] <= iou]
        order = rest
    return np.asarray(keep, dtype=np.int64)


def attributes_first(out: np.ndarray) -> np.ndarray:
    """``out`` [N, K, A] or [N, A, K] as ``[N, K, A]`` with ``K`` the shorter axis.

    Raises:
        ValueError: not of rank 3, or fewer than 5 attributes (4 box values and a score).
    """
    out = np.asarray(out)
    if out.ndim != 3:
        raise ValueError(f"a detector head must be [N, 4 + C, anchors], got shape {list(out.shape)}")
    if out.shape[2] < out.shape[1]:
        out = out.transpose(0, 2, 1)
    if out.shape[1] < 5:
        raise ValueError(f"a detector head needs 4 box values and at least one score, got shape {list(out.shape)}")
    return out


def class_rows(ref: np.ndarray) -> slice:
    """The class-score rows of ``ref`` [N, K, A]: the run of rows from 4 on whose values lie in [0, 1]."""
    rows = ref[:, 4:, :]
    inside = np.all((rows >= 0.0) & (rows <= 1.0), axis=(0, 2))
    stop = int(np.argmin(inside)) if not inside.all() else len(inside)
    return slice(4, 4 + max(stop, 1))


def detections(pred: np.ndarray, classes: slice, conf: float = CONF, iou: float = NMS_IOU,
               max_det: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's head ``[K, A]`` -> ``(boxes [n, 4] as corners, classes [n], scores [n])``, best first."""
    pred = np.asarray(pred, np.float64)
    scores = pred[classes]
    cls = scores.argmax(0)
    best = scores.max(0)
    sel = np.nonzero(best > conf)[0]
    cx, cy, w, h = pred[:4, sel]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    cls, best = cls[sel], best[sel]
    keep: list[int] = []
    for c in np.unique(cls):
        idx = np.nonzero(cls == c)[0]
        keep.extend(idx[nms(boxes[idx], best[idx], iou)].tolist())
    order = np.asarray(keep, dtype=np.int64)
    order = order[np.argsort(-best[order], kind="stable")][:max_det]
    return boxes[order], cls[order], best[order]


def match_count(a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray],
                iou: float = MATCH_IOU) -> int:
    """How many detections of ``a`` and ``b`` pair up (same class, IoU >= ``iou``; greedy, highest first)."""
    (ba, ca, _), (bb, cb, _) = a, b
    if len(ba) == 0 or len(bb) == 0:
        return 0
    overlap = box_iou(ba, bb)
    overlap[ca[:, None] != cb[None, :]] = 0.0
    used_a = np.zeros(len(ba), bool)
    used_b = np.zeros(len(bb), bool)
    matched = 0
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        i, j = divmod(int(flat), len(bb))
        if overlap[i, j] < iou:
            break
        if used_a[i] or used_b[j]:
            continue
        used_a[i] = used_b[j] = True
        matched += 1
    return matched
