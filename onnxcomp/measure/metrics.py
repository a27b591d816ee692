"""Output fidelity metrics: how far a compressed model's outputs are from the reference.

Pure numpy.  All arithmetic is done in float64 whatever the input dtype.
With reference ``r``, candidate ``c`` and error ``e = c - r`` over ``N``
elements:

* ``max_abs = max |e_i|``, ``mean_abs = (1/N) * sum |e_i|``;
* ``sqnr_db = 10 * log10(sum r_i^2 / sum e_i^2)`` (signal-to-quantization-
  noise ratio).  ``+inf`` when ``e`` is all zero (identical outputs, even if
  ``r`` is all zero); ``-inf`` when ``r`` is all zero but ``e`` is not (no
  signal, only noise);
* ``cosine = (r . c) / (|r| |c|)`` on the flattened tensors, clipped to
  [-1, 1]; 1.0 when both are all zero, 0.0 when exactly one is;
* ``top1_agreement``: only for outputs that look like class scores (rank >= 2
  and last dimension > 1): the fraction of positions ``p`` (all indices but
  the last) where ``argmax_k r[p, k] == argmax_k c[p, k]``.  Ties resolve to
  the first maximum, as ``np.argmax`` does.  ``None`` otherwise;
* per channel ``j`` along ``channel_axis``: ``sqnr_db_j`` as above restricted
  to channel ``j``, ``max_abs_j``, and
  ``range_ratio_j = (max c_j - min c_j) / (max r_j - min r_j)`` (1.0 when both
  ranges are 0, ``inf`` when only the reference range is 0).  ``worst_channel``
  is ``(j, sqnr_db_j)`` for the lowest channel SQNR (a NaN SQNR counts as the
  worst; ties pick the lowest index).

Why per channel: a whole-tensor cosine or SQNR is dominated by the channels
with the largest magnitude.  A detector output that concatenates box
coordinates in 0..320 with scores in 0..1 keeps cosine 0.999 when one uint8
scale for the whole tensor rounds every score to 0 or 1.25; only the per-
channel SQNR and range ratio show that the scores were destroyed.

Streaming: :class:`FidelityAccumulator` keeps only running sums (``sum r^2``,
``sum e^2``, ``sum |e|``, ``max |e|``, ``r . c``, ``|r|^2``, ``|c|^2``, the
per-channel sums and min/max, and the top-1 match count), so fidelity over a
whole calibration or test set needs no concatenation.  Batches are stacked
along axis 0, the sample axis; the result equals :func:`compare_outputs` on
the concatenation up to floating-point summation order (exactly equal when the
sums are exact, e.g. for integer-valued data).  :func:`compare_outputs` is the
one-batch case of the accumulator, so both share one code path.

Axis conventions: axis 0 is the sample (batch) axis.  Per-channel error needs
rank >= 2 and a ``channel_axis`` that is not axis 0; for rank-0 and rank-1
outputs there is no channel axis distinct from the sample axis and the
per-channel part is empty.  Rank-0 outputs are treated as shape ``(1,)``.

NaN or inf in the inputs are not refused: they propagate into the metrics
(typically as NaN), which is what a broken candidate should look like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxcomp.errors import DataError

__all__ = [
    "ChannelFidelity",
    "OutputFidelity",
    "FidelityAccumulator",
    "sqnr_db",
    "compare_outputs",
    "accuracy",
    "predicted_class",
    "check_label_range",
]


def _label(name: str | None) -> str:
    return f"output {name!r}" if name is not None else "output"


def _as_numeric(x: object, arg: str, name: str | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        where = f" of {_label(name)}" if name is not None else ""
        raise ValueError(f"{arg}{where} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_same_shape(ref: np.ndarray, cand: np.ndarray, name: str | None) -> None:
    if ref.shape != cand.shape:
        raise ValueError(
            f"shape mismatch for {_label(name)}: ref shape {tuple(ref.shape)} "
            f"!= cand shape {tuple(cand.shape)}"
        )


def _sqnr_from_sums(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` with the documented conventions for 0, inf and NaN."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    ratio = signal / noise
    if math.isnan(ratio):  # inf / inf
        return math.nan
    if ratio == 0.0:
        return -math.inf
    if math.isinf(ratio):
        return math.inf
    return 10.0 * math.log10(ratio)


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (approx - ref)^2)`` in dB.

    ``+inf`` for identical arrays, ``-inf`` for an all-zero ``ref`` with a
    nonzero error.  Refuses (ValueError) non-numeric dtypes and mismatched
    shapes, naming both shapes.
    """
    r = _as_numeric(ref, "ref")
    a = _as_numeric(approx, "approx")
    if r.shape != a.shape:
        raise ValueError(
            f"shape mismatch: ref shape {tuple(r.shape)} != approx shape {tuple(a.shape)}"
        )
    err = a - r
    return _sqnr_from_sums(float(np.sum(r * r)), float(np.sum(err * err)))


@dataclass(frozen=True)
class ChannelFidelity:
    """Error of one channel along the channel axis (see the module docstring)."""

    index: int
    sqnr_db: float
    max_abs: float
    range_ratio: float


@dataclass(frozen=True)
class OutputFidelity:
    """Fidelity of one output, over one tensor or a stream of batches.

    ``shape`` is the shape of the (virtual) concatenation along axis 0 (None on
    an axis whose size differed between batches);
    ``channel_axis`` is normalized to a non-negative axis, or ``None`` when no
    per-channel error was computed (then ``channels`` is empty and
    ``worst_channel`` is ``None``).
    """

    name: str | None
    shape: tuple[int | None, ...]
    n_elements: int
    max_abs: float
    mean_abs: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None
    channel_axis: int | None
    channels: tuple[ChannelFidelity, ...]
    worst_channel: tuple[int, float] | None
    #: share of elements equal to the reference's (what decided classes keep: ``onnxcomp.check``'s
    #: label agreement)
    equal_share: float | None = None


class FidelityAccumulator:
    """Streaming fidelity of one output: ``update(ref, cand)`` per batch, then ``result()``.

    Batches are stacked along axis 0: every update must have the same rank
    and the same shape apart from axis 0, unless ``varying`` (feeds of
    different sizes, such as images of several widths from a folder of
    feeds): then other axes may differ too, are ``None`` in the result's
    ``shape``, and an axis that differs drops the per-channel error when it is
    the channel axis.  ``channel_axis`` (default -1, may be ``None`` to skip
    per-channel error) must not resolve to axis 0 for outputs of rank >= 2;
    for rank < 2 it is ignored.

    Refuses (ValueError naming the output): ``ref``/``cand`` shape mismatch
    (naming both shapes), empty or non-numeric tensors, a shape that changes
    between updates, an out-of-range ``channel_axis`` or one that is the
    sample axis, and ``result()`` before any update.
    """

    def __init__(self, *, channel_axis: int | None = -1, name: str | None = None, varying: bool = False) -> None:
        if channel_axis is not None and (
            isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer))
        ):
            raise ValueError(f"channel_axis must be an int or None, got {channel_axis!r}")
        self._channel_axis_arg = None if channel_axis is None else int(channel_axis)
        self.name = name
        self._varying = varying
        self._rank: int | None = None
        self._tail: tuple[int | None, ...] = ()
        self._axis: int | None = None
        self._batches = 0
        self._rows = 0
        self._n = 0
        self._sum_ref2 = 0.0
        self._sum_cand2 = 0.0
        self._sum_err2 = 0.0
        self._sum_abs = 0.0
        self._max_abs = 0.0
        self._dot = 0.0
        self._top1_match = 0
        self._top1_total = 0
        self._equal = 0
        self._ch_ref2: np.ndarray | None = None
        self._ch_err2: np.ndarray | None = None
        self._ch_max_abs: np.ndarray | None = None
        self._ch_ref_min: np.ndarray | None = None
        self._ch_ref_max: np.ndarray | None = None
        self._ch_cand_min: np.ndarray | None = None
        self._ch_cand_max: np.ndarray | None = None

    @property
    def n_batches(self) -> int:
        """Number of ``update`` calls so far."""
        return self._batches

    @property
    def n_rows(self) -> int:
        """Total size along axis 0 accumulated so far."""
        return self._rows

    def _first_update(self, shape: tuple[int, ...]) -> None:
        """Fix rank, trailing shape and channel axis from the first batch (validate first)."""
        rank = len(shape)
        axis: int | None = None
        if rank >= 2 and self._channel_axis_arg is not None:
            ax = self._channel_axis_arg
            if not -rank <= ax < rank:
                raise ValueError(
                    f"channel_axis={ax} is out of range for {_label(self.name)} of rank {rank}"
                )
            axis = ax % rank
            if axis == 0:
                raise ValueError(
                    f"channel_axis={ax} is axis 0, the sample axis along which batches "
                    f"of {_label(self.name)} are stacked; add a leading batch axis or "
                    "pick another channel_axis"
                )
        self._rank = rank
        self._tail = shape[1:]
        self._axis = axis
        if axis is not None:
            c = shape[axis]
            self._ch_ref2 = np.zeros(c)
            self._ch_err2 = np.zeros(c)
            self._ch_max_abs = np.zeros(c)
            self._ch_ref_min = np.full(c, np.inf)
            self._ch_ref_max = np.full(c, -np.inf)
            self._ch_cand_min = np.full(c, np.inf)
            self._ch_cand_max = np.full(c, -np.inf)

    @np.errstate(invalid="ignore", over="ignore")  # an inf or NaN in a batch gives NaN figures, no warning
    def update(self, ref: np.ndarray, cand: np.ndarray) -> FidelityAccumulator:
        """Add one batch (same shape for ``ref`` and ``cand``); returns ``self``."""
        r = _as_numeric(ref, "ref", self.name)
        c = _as_numeric(cand, "cand", self.name)
        _check_same_shape(r, c, self.name)
        if r.ndim == 0:
            r = r.reshape(1)
            c = c.reshape(1)
        if r.size == 0:
            raise ValueError(f"{_label(self.name)} is empty (shape {tuple(r.shape)})")
        if self._rank is None:
            self._first_update(tuple(r.shape))
        elif r.ndim == self._rank and self._varying and tuple(r.shape[1:]) != self._tail:
            self._vary(tuple(r.shape[1:]))
        elif r.ndim != self._rank or tuple(r.shape[1:]) != self._tail:
            raise ValueError(
                f"{_label(self.name)} changed shape between batches: expected "
                f"(*, {', '.join(map(str, self._tail))}) of rank {self._rank}, "
                f"got {tuple(r.shape)}"
            )

        err = c - r
        abs_err = np.abs(err)
        self._batches += 1
        self._rows += int(r.shape[0])
        self._n += int(r.size)
        self._sum_ref2 += float(np.sum(r * r))
        self._sum_cand2 += float(np.sum(c * c))
        self._sum_err2 += float(np.sum(err * err))
        self._sum_abs += float(np.sum(abs_err))
        self._max_abs = float(np.max([self._max_abs, float(np.max(abs_err))]))
        self._dot += float(np.sum(r * c))
        self._equal += int(np.count_nonzero(abs_err == 0))

        if r.ndim >= 2 and r.shape[-1] > 1:
            same = np.argmax(r, axis=-1) == np.argmax(c, axis=-1)
            self._top1_match += int(np.count_nonzero(same))
            self._top1_total += int(same.size)

        if self._axis is not None:
            nch = r.shape[self._axis]
            r2 = np.moveaxis(r, self._axis, -1).reshape(-1, nch)
            c2 = np.moveaxis(c, self._axis, -1).reshape(-1, nch)
            e2 = c2 - r2
            self._ch_ref2 += np.sum(r2 * r2, axis=0)
            self._ch_err2 += np.sum(e2 * e2, axis=0)
            self._ch_max_abs = np.maximum(self._ch_max_abs, np.max(np.abs(e2), axis=0))
            self._ch_ref_min = np.minimum(self._ch_ref_min, r2.min(axis=0))
            self._ch_ref_max = np.maximum(self._ch_ref_max, r2.max(axis=0))
            self._ch_cand_min = np.minimum(self._ch_cand_min, c2.min(axis=0))
            self._ch_cand_max = np.maximum(self._ch_cand_max, c2.max(axis=0))
        return self

    def _vary(self, tail: tuple[int, ...]) -> None:
        """A batch whose axes past 0 differ from the batches before (``varying``): those axes
        become None; a channel axis among them ends the per-channel error (channels differ)."""
        self._tail = tuple(t if t == u else None for t, u in zip(self._tail, tail))
        if self._axis is not None and self._tail[self._axis - 1] is None:
            self._axis = None
            self._ch_ref2 = self._ch_err2 = self._ch_max_abs = None
            self._ch_ref_min = self._ch_ref_max = self._ch_cand_min = self._ch_cand_max = None

    @np.errstate(invalid="ignore", over="ignore")
    def result(self) -> OutputFidelity:
        """Return the fidelity over everything seen so far."""
        if self._rank is None:
            raise ValueError(f"no batches were added for {_label(self.name)}")
        norm_r = math.sqrt(self._sum_ref2)
        norm_c = math.sqrt(self._sum_cand2)
        if norm_r == 0.0 and norm_c == 0.0:
            cosine = 1.0
        elif norm_r == 0.0 or norm_c == 0.0:
            cosine = 0.0
        else:
            cosine = self._dot / (norm_r * norm_c)
            if not math.isnan(cosine):
                cosine = min(1.0, max(-1.0, cosine))

        top1 = self._top1_match / self._top1_total if self._top1_total else None

        channels: tuple[ChannelFidelity, ...] = ()
        worst: tuple[int, float] | None = None
        if self._axis is not None:
            assert self._ch_ref2 is not None and self._ch_err2 is not None
            assert self._ch_max_abs is not None
            assert self._ch_ref_min is not None and self._ch_ref_max is not None
            assert self._ch_cand_min is not None and self._ch_cand_max is not None
            ref_range = self._ch_ref_max - self._ch_ref_min
            cand_range = self._ch_cand_max - self._ch_cand_min
            chans = []
            for j in range(ref_range.size):
                rr, cr = float(ref_range[j]), float(cand_range[j])
                if rr == 0.0:
                    ratio = 1.0 if cr == 0.0 else math.inf
                else:
                    ratio = cr / rr
                chans.append(
                    ChannelFidelity(
                        index=j,
                        sqnr_db=_sqnr_from_sums(float(self._ch_ref2[j]), float(self._ch_err2[j])),
                        max_abs=float(self._ch_max_abs[j]),
                        range_ratio=ratio,
                    )
                )
            channels = tuple(chans)
            sq = np.array([ch.sqnr_db for ch in channels])
            j = int(np.argmin(sq))  # first NaN if any, else first minimum
            worst = (j, float(sq[j]))

        shape = (self._rows, *self._tail)
        return OutputFidelity(
            name=self.name,
            shape=shape,
            n_elements=self._n,
            max_abs=self._max_abs,
            mean_abs=self._sum_abs / self._n,
            cosine=cosine,
            sqnr_db=_sqnr_from_sums(self._sum_ref2, self._sum_err2),
            top1_agreement=top1,
            channel_axis=self._axis,
            channels=channels,
            worst_channel=worst,
            equal_share=self._equal / self._n,
        )


def compare_outputs(
    ref: np.ndarray,
    cand: np.ndarray,
    *,
    channel_axis: int | None = -1,
    name: str | None = None,
) -> OutputFidelity:
    """Compare one reference output with one candidate output.

    Equivalent to ``FidelityAccumulator(channel_axis=..., name=...).update(ref, cand).result()``;
    see :class:`FidelityAccumulator` for what is refused.  ``name`` only
    labels the result and error messages.
    """
    return FidelityAccumulator(channel_axis=channel_axis, name=name).update(ref, cand).result()


def _integral_labels(x: np.ndarray, arg: str) -> np.ndarray:
    if x.dtype.kind in "iub":
        return x.astype(np.int64)
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or not np.all(x == np.round(x)):
            raise ValueError(f"{arg} must hold integer class labels, got non-integer values")
        return x.astype(np.int64)
    raise ValueError(f"{arg} must be numeric, got dtype {x.dtype}")


def accuracy(logits_or_preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose predicted class equals the label.

    ``logits_or_preds`` is either class scores of shape ``[N, C]`` with
    ``C > 1`` (the prediction is the argmax over ``C``, first maximum on ties)
    or predicted labels of shape ``[N]``.  ``labels`` has shape ``[N]``.

    Refuses (ValueError naming the argument): other ranks, ``C == 1`` (a single
    score column has no argmax; threshold it yourself), non-integer labels or
    predictions, ``N == 0``, and a length mismatch (naming both lengths).
    """
    p = np.asarray(logits_or_preds)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape [N], got shape {tuple(y.shape)}")
    if p.ndim == 2:
        if p.dtype.kind not in "biuf":
            raise ValueError(f"logits_or_preds must be numeric, got dtype {p.dtype}")
        if p.shape[1] < 2:
            raise ValueError(
                f"logits_or_preds has shape {tuple(p.shape)}: class scores need at "
                "least 2 columns"
            )
        pred = np.argmax(p, axis=1)
    elif p.ndim == 1:
        pred = _integral_labels(p, "logits_or_preds")
    else:
        raise ValueError(
            f"logits_or_preds must have shape [N, C] or [N], got shape {tuple(p.shape)}"
        )
    if pred.shape[0] != y.shape[0]:
        raise ValueError(
            f"length mismatch: logits_or_preds has {pred.shape[0]} samples, "
            f"labels has {y.shape[0]}"
        )
    if y.shape[0] == 0:
        raise ValueError("labels is empty; accuracy of zero samples is undefined")
    y = _integral_labels(y, "labels")
    return float(np.count_nonzero(pred == y)) / float(y.shape[0])


def check_label_range(labels: np.ndarray, shape: tuple[int, ...], output: str) -> None:
    """Refuse (DataError) labels that no prediction from scores of ``shape`` (``[N, ..., C]``) can
    equal: a label >= C (labels counted from 1, or of another task) reads as accuracy lost,
    silently. Scores ``[N]`` / ``[N, 1]`` (predicted labels) bound nothing."""
    classes = shape[-1] if len(shape) >= 2 else 1
    if classes <= 1 or labels.size == 0 or int(labels.max()) < classes:
        return
    index = int(np.argmax(labels >= classes))
    raise DataError(f"--labels: label {index} is {int(labels[index])}, but output {output!r} scores {classes} "
                    f"classes (0 to {classes - 1}); labels count classes from 0")


def predicted_class(scores: np.ndarray) -> np.ndarray:
    """One class per sample of a model output: the arg-max over the last axis at the first
    position (scores ``[N, ..., C]``), or the value itself at the first position (``[N]``, ``[N, 1]``:
    predicted labels)."""
    scores = np.asarray(scores)
    if scores.ndim >= 2 and scores.shape[-1] > 1:
        return scores.reshape(scores.shape[0], -1, scores.shape[-1])[:, 0].argmax(-1)
    return scores.reshape(scores.shape[0], -1)[:, 0].astype(np.int64)
