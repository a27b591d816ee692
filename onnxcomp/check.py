r"""The held-out check: every lossy command measures what it wrote against the original.

A compressed model is only as good as the data it was fitted on; a default that suits one model can
ruin another. So after writing, every lossy command (``quantize``, ``prune``, ``cluster``,
``compress``) loads the **written file** back and compares it with the original model on data the
compression did not fit on, against a budget, and says in one line whether the budget was met.

Split
    With ``--eval`` data, the check uses it (and its labels) and the calibration data is all used for
    fitting. Otherwise the calibration feeds are split deterministically: feed ``i`` goes to the
    check when ``i mod k = k - 1`` with :math:`k = \mathrm{round}(1/f)` (``fraction`` *f*, default
    0.2, so every 5th feed), at most ``max_feeds`` of them; the rest are fitted on. Interleaving
    rather than a tail keeps both parts alike when the data is ordered (by class, by source). With
    fewer than ``min_feeds`` calibration feeds nothing is held out: the check then runs on the
    fitting data and says so. Without any data (a ``cluster`` or ``prune`` run without it) the check
    runs on seeded uniform random inputs and says that it is only a sanity check.

Budget (per output; all must hold)
    The rule is a table, :data:`RULES`: the *kind* of an output (found by :data:`KIND_DETECTORS`
    from its producer in the graph, behind reshapes and casts, and its rank and type as returned;
    see Kinds) names the figure judged and the threshold it must reach. Figures are streaming
    accumulators (:data:`FIGURES`).

    ==========  ==========================================  ===================================
    kind        which outputs                               figure >= threshold
    ==========  ==========================================  ===================================
    scores      Softmax/LogSoftmax of rank != 3 (or of one   top-1 agreement >= ``min_agreement``
                row per token of an integer input: tags;
                so are a projection's raw tag scores onto
                at most ``TAG_LOGITS`` classes per token),
                or rank 2 with more than one column where
                no other output is a rank-2 Softmax's
                (beside one, box or landmark offsets: values)
    sequence    Softmax/LogSoftmax of rank 3, ``[N, T, C]``  decoded-sequence agreement (greedy
                (CTC recognizers), or rank-3 logits of a     CTC decoding, 1 - normalized edit
                MatMul/Gemm whose top class is the first or  distance) >= ``min_agreement``
                last class (the blank) in at least half of
                the returned steps (not one step per token
                of an integer input: tags); time-major
                ``[T, N, C]`` read as such
    map         Sigmoid of rank >= 4, ``[N, C, H, W]``       region agreement (F1 of the
                (probability maps: detection, masks)        8-connected regions above 0.5,
                                                             specks left out, matched at
                                                             IoU > 0.5) >= ``min_agreement``
    detections  rank-3 Concat of boxes and a Sigmoid's class    detection agreement (F1 of the
                scores, ``[N, 4 + C, A]`` (YOLO-style heads)  boxes after the usual decoding
                                                             and NMS, paired at IoU >= 0.5 with
                                                             the same class) >=
                                                             ``min_detection_agreement``
    regression  a float output of one value per sample,      R^2 against the original (1 -
                ``[N, 1]`` (a regressor; a binary            SSE/SST, SST about the original's
                probability), not a Softmax's, nor a         mean over the checked samples;
                decided class cast to float                  worst column) >= ``min_r2``
    values      any other float output (embeddings,          cosine >= ``min_cosine``
                features, boxes, ``[N]``)
    labels      decided classes: an ArgMax/ArgMin, or an     label agreement (share of equal
                ai.onnx.ml classifier's predicted label,     elements) >= ``min_agreement``
                behind relabelling ops (class tables,
                reshapes, casts)
    exact       other non-float outputs (indices, masks)     every element equal
    ==========  ==========================================  ===================================

    The agreement figures are all a share of the model's decisions that stay the same, so they
    share one threshold (default 0.99), except detection agreement (default 0.98): a detector
    proposes two classes for one block and keeps either by a hair, so pairing boxes flips
    knife-edge detections under changes that cost the task nothing. The suite's layout detector, fp32
    itself run on the same page moved by one pixel, keeps 0.979 of its detections on either split
    while its task F1 does not move; 0.98 is the most permissive threshold that passes none of its
    tune-split builds (int8 builds and input perturbations) whose task F1 fell by more than a point,
    and on the report split it too passes none (``benchmarks/budget_lomo.py --split-study``; no
    second detector in the suite, so this one threshold is validated across splits, not models).
    With labels, the accuracy of the first output may also drop by at most ``max_drop`` points
    (default 1.0). Top-1 agreement per position would judge a
    recognizer by steps its decoder never reads (blanks, repeats), and cosine would judge a
    probability map by values far from its decision threshold; the sequence and map figures read
    the outputs the way their decoders do, without knowing the task (see :class:`SequenceAgreement`
    and :class:`RegionAgreement`).

    A regression is judged centred: the cosine of raw values is dominated by their common offset
    (an MLP regressor of diabetes progression, mean ~150, pruned to 0.7 kept cosine 0.9939 while
    its R^2 on 92 evaluation rows fell from 0.588 to 0.500; its R^2 against the original is 0.904 on
    the 20 held-out calibration rows the check reads, and fails).
    ``min_r2`` (0.99) is derived, not fitted: with labels *y*, a written model ``c = r + e`` whose
    error is uncorrelated with the original's residual ``y - r`` loses
    :math:`\sum e^2 / \mathrm{SST}_y = (1 - R^2_{orig}) \cdot \mathrm{SST}_r / \mathrm{SST}_y`
    of its task R^2, and :math:`\mathrm{SST}_r \le \mathrm{SST}_y` for a fitted regressor (its
    predictions vary less than the targets: the ratio is its own R^2 on least-squares fits), so
    R^2 against the original >= 0.99 keeps the task R^2 within one point, the same point that
    makes a build good in the leave-one-model-out study below. (A centred cosine at
    ``min_cosine`` would allow a relative error of the deviations of 17%, about 3 points of R^2,
    and would not see predictions shrunk or stretched about the mean.) In the suite only
    silero-vad's ``[B, 1]`` speech probability is judged by it: every cached build of both silero
    models is good and passes (R^2 against the original >= 0.9997), so the leave-one-model-out
    study below has no bad build to learn an R^2 threshold from and the derived 0.99 stands.

    The thresholds are validated leave-one-model-out on the benchmark suite
    (``benchmarks/budget_lomo.py``, table in ``benchmarks/RESULTS.md``): for each suite model, the
    most permissive thresholds that admit no build of the *other* models whose task metric fell by
    more than a point, then judged on the left-out model.

    Another kind of output (a pooled embedding, say) is one entry in each table: a detector in
    :data:`KIND_DETECTORS`, a figure in :data:`FIGURES`, a :class:`Rule` in :data:`RULES`.

Kinds
    Declared output shapes may be wrong (an OCR model declaring ``[1, seqlen]`` returns CTC logits
    ``[T, 1, C]``), symbolic or absent, so the check reads the rank and element type from what the
    original returns on the first check feed where that output has data (:func:`returned_kind`,
    inside :class:`OutputFigures`, which the automatic fallback judges through too; an empty
    array, a detector that found nothing, decides nothing unless no feed has data, and the
    fallback reuses the kinds the check judged, :attr:`DataSplit.judged_kinds`); the declared shape
    is the fallback where nothing has run (:func:`output_kinds`) and the cross-check. Every output
    row says its ``kind``, and when the declared shape does not admit the returned one (or reads as
    another kind) the row's ``kind_note`` and the report's ``kind_note`` say so in one line. A
    rank-3 sequence ``[A, B, C]`` is time-major when ``B`` is the feed's batch and ``A`` is not
    (batch unknown: ``B`` is 1 and ``A`` is not).

Resolution
    An agreement figure measured on *n* decisions (positions, decoded sequences) cannot see a
    change smaller than :math:`1/n`: on 26 held-out files one flipped file is 3.8 points, so
    "passed at 0.99" says nothing about a loss below that. An F1 of regions or detections counts
    both sides' (:math:`n = R_{ref} + R_{cand}`), and one pair read differently moves it by
    :math:`2/n`. Each such output reports ``decisions`` (a whole count), ``decision_unit``
    ("decisions", "regions", "detections") and ``resolution`` (the step: :math:`1/n`, or
    :math:`2/n` for an F1), and when the step exceeds the loss the budget allows, the check says
    so in one line, counting whole things ("the check saw 9 detections ...":
    :func:`resolution_note`); the verdict is unchanged.

A run that compressed nothing (0 int8 nodes, 0 channels cut, 0 tensors clustered) never meets its
budget: there is nothing to meet it with, and the check says so and why.

When the budget is missed, the check names the worst outputs and the tensors most likely to blame
(per-layer SQNR on a few check feeds, worst first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset, generated_feeds
from onnxcomp.errors import ConfigError, DataError, ModelLoadError, OnnxcompError, RefusedOutputError
from onnxcomp.io import LARGE_MODEL_BYTES, first_line, initializer_nbytes
from onnxcomp.ops import class_decision_source
from onnxcomp.passes.base import PassConfig

__all__ = ["CheckConfig", "DataSplit", "split_data", "check_model", "judge_output", "output_kinds", "pooled_outputs",
           "judged_figures", "output_verdicts", "resolution_note", "figures_meet", "verdict", "verdict_line", "check_labels_fit", "blame", "OutputFigures", "Rule", "RULES", "FIGURES", "KIND_DETECTORS", "SCORE_PRODUCERS", "MAP_PRODUCERS",
           "OutputView", "output_view", "classify", "Kind", "JudgedKind", "returned_kind", "feed_facts", "KindsSeen",
           "reads_top1"]

#: Ops whose output is a distribution over classes along the last axis.
SCORE_PRODUCERS = frozenset({"Softmax", "LogSoftmax"})
#: Ops whose output is a probability per element (a map, when it has spatial axes).
MAP_PRODUCERS = frozenset({"Sigmoid"})
#: Ops that join a detector head's boxes and class scores along the attribute axis.
HEAD_JOINS = frozenset({"Concat"})
#: Ops that project features onto classes: a rank-3 output behind them may be raw CTC logits.
LOGIT_PRODUCERS = frozenset({"MatMul", "Gemm"})
#: Ops that add a bias to a projection (a projection behind them is still one).
BIAS_ADDS = frozenset({"Add"})
#: What raw logits need to be read as CTC steps (besides a blank; ``check._is_ctc_logits``): this
#: many classes (digits and a blank), this many steps on the first check feed.
CTC_LOGITS = {"min_classes": 10, "min_steps": 8}
#: A rank-3 output of a projection (MatMul/Gemm, or an Add of one) onto a fixed class axis of at most
#: this many holds a token classifier's raw tag scores (``check._tag_projection``), never an
#: encoder's hidden states: it is not pooled (:func:`pooled_outputs`) even where the model has a
#: mask input, and judged per token by top-1 agreement where it returns one row per token of an
#: integer input (``check._is_tags``). Tag sets have a few to a few dozen classes, hidden states and
#: token embeddings 64 or more.
TAG_LOGITS = {"max_classes": 63}
#: Ops that only move or relabel data: an output behind them keeps its producer's kind.
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast"})


@dataclasses.dataclass(frozen=True)
class CheckConfig(PassConfig):
    """How the written model is checked (see the module docstring).

    Attributes:
        enabled: run the check at all.
        fraction: share of the calibration feeds held out when no evaluation data is given.
        max_feeds: at most this many feeds are checked.
        min_feeds: with fewer calibration feeds, nothing is held out (the check says so).
        min_agreement: the share of decisions an output of class scores, sequences, maps or labels
            must keep (top-1, decoded-sequence, region, label agreement).
        min_detection_agreement: the detection agreement (F1) a detector head must keep: lower than
            ``min_agreement`` because pairing boxes flips knife-edge detections under changes that
            are no loss at all (module docstring: Budget).
        min_cosine: cosine similarity any other float output must keep.
        min_r2: R^2 against the original an output of one value per sample (a regression) must
            keep (module docstring: Budget).
        max_drop: accuracy points the first output may lose, when labels are given.
        blame: how many tensors to name when the budget is missed.
    """

    enabled: bool = True
    fraction: float = 0.2
    max_feeds: int = 64
    min_feeds: int = 10
    min_agreement: float = 0.99
    min_detection_agreement: float = 0.98
    min_cosine: float = 0.985
    min_r2: float = 0.99
    max_drop: float = 1.0
    blame: int = 5

    def validate(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 0.5):
            raise ConfigError(f"check fraction must be in (0, 0.5], got {self.fraction!r}")
        if self.max_feeds < 1:
            raise ConfigError(f"check max_feeds must be >= 1, got {self.max_feeds!r}")
        if self.min_feeds < 2:
            raise ConfigError(f"check min_feeds must be >= 2, got {self.min_feeds!r}")
        for name in ("min_agreement", "min_detection_agreement", "min_cosine", "min_r2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -1.0 <= value <= 1.0):
                raise ConfigError(f"check {name} must be a number in [-1, 1], got {value!r}")
        if not (isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop) and 0 <= self.max_drop <= 100):
            raise ConfigError(f"check max_drop must be in [0, 100] points, got {self.max_drop!r}")
        if self.blame < 0:
            raise ConfigError(f"check blame must be >= 0, got {self.blame!r}")

    def budget(self) -> dict[str, float]:
        return {"min_agreement": self.min_agreement, "min_detection_agreement": self.min_detection_agreement,
                "min_cosine": self.min_cosine, "min_r2": self.min_r2, "max_drop_points": self.max_drop}


@dataclasses.dataclass
class DataSplit:
    """Fitting and checking data, and how they were chosen (``describe`` is for reports)."""

    fit: Dataset | None
    check: Dataset | list[dict[str, np.ndarray]] | None
    held_out: bool
    source: str
    labels: np.ndarray | None = None
    fit_feeds: int | None = None
    check_feeds: int | None = None
    rule: str = ""
    #: the check feeds are generated from the input types (no data given)
    generated: bool = False
    #: the original's outputs on the check feeds, kept by the first check that ran on this split
    #: (a second check, after a fallback, then runs only the written model)
    reference_outputs: list[list[np.ndarray]] | None = dataclasses.field(default=None, repr=False)
    #: the kinds the first check on this split judged (:meth:`OutputFigures.decided_kinds`), for the
    #: automatic fallback to stop on the rule the check applies
    judged_kinds: dict[str, str] | None = dataclasses.field(default=None, repr=False)
    #: the written model's outputs on the check feeds, kept by the verification that ran it on
    #: every check feed before the file was put in place (``onnxcomp.cli_common.verify_output``):
    #: the next check takes them instead of running the same file again, then drops them
    written_outputs: list[list[np.ndarray]] | None = dataclasses.field(default=None, repr=False)
    #: the identity of the file they are the outputs of (device, inode, size, mtime: a rename keeps it)
    written_file: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "held_out": self.held_out, "rule": self.rule,
                "fit_feeds": self.fit_feeds, "check_feeds": self.check_feeds,
                "labels": self.labels is not None}


#: what an output of each kind is, for a refusal of labels read from it
_NOT_CLASS_SCORES = {
    "values": "values (a regression, boxes, features: not class scores)",
    "regression": "values (a regression, boxes, features: not class scores)",
    "map": "a probability map (Sigmoid per pixel), not class scores",
    "detections": "a detector head (boxes and class scores per anchor), not class scores per sample",
    "sequence": "a sequence (scores per step), not class scores per sample",
    "exact": "integer values, not one predicted label per sample",
    "labels": "decided classes at more than one position per sample, not one predicted label per sample",
}


def check_labels_fit(kind: str, shape: Sequence[Any] | None, output: str, declared: bool = False) -> None:
    """Refuse (DataError) labels read from ``output`` (the model's first output) when it holds no
    class per sample: labels are class indices, compared with the arg-max of class scores (kind
    ``scores``: a Softmax/LogSoftmax, or ``[N, C]`` with C >= 2) or with predicted labels (an
    integer ``[N]`` or ``[N, 1]`` output). Accuracy read from a regression, box or feature output
    would be a figure of nothing. ``declared``: ``kind`` and ``shape`` are the graph's (before any
    work), else the array the original returned."""
    dims = list(shape) if shape is not None else None
    if kind == "scores" or dims is None:
        return
    if kind in ("exact", "labels") and (len(dims) == 1 or (len(dims) == 2 and dims[1] in (1, None))):
        return  # predicted labels
    what = _NOT_CLASS_SCORES.get(str(kind), str(kind))
    raise DataError(
        f"--labels: output {output!r} {'declares' if declared else 'returned'} {_dims(tuple(dims))}: {what}; labels "
        "are one class index per sample, read from the model's first output when it holds class scores (a "
        "Softmax/LogSoftmax, or [N, C] with C >= 2) or predicted labels (an integer [N]); drop --labels (the "
        "outputs are compared without them)")


def _check_declared_classes(labels: np.ndarray, model: ir.Model) -> None:
    from onnxcomp.measure.metrics import check_label_range

    output = model.graph.outputs[0]
    dims = tuple(output.shape) if output.shape is not None else ()
    if output.shape is not None:
        check_labels_fit(output_kinds(model)[output.name], tuple(d if isinstance(d, int) else None for d in dims),
                         output.name, declared=True)
    if len(dims) >= 2 and isinstance(dims[-1], int):
        check_label_range(labels, (1, dims[-1]), output.name)


def split_data(
    calibration: Dataset | None,
    config: CheckConfig,
    *,
    evaluation: Dataset | None = None,
    labels: np.ndarray | None = None,
    model: ir.Model | None = None,
) -> DataSplit:
    """Choose the fitting and the checking data (module docstring: Split).

    Calibration and evaluation data and labels that cannot match the model are refused here,
    before any work: every feed that the fitting and the checking parts read (from a file or a
    folder) is validated now, NaN/Inf and feeds of 0 rows too (the check would only find them
    after the output is written; a run that does not calibrate, ``--mode dynamic``, reads its
    calibration data only there)."""
    if calibration is not None:
        calibration.check_first()
    if evaluation is not None:
        evaluation.check_first()
        evaluation.check_labels(labels)
        if labels is not None and model is not None:  # the classes the model declares; the check sees the rest
            _check_declared_classes(labels, model)
        check = evaluation if labels is not None else evaluation.subset(lambda i: i < config.max_feeds)
        n = evaluation.num_feeds
        return _read_up_front(DataSplit(
            calibration, check, True, f"evaluation data {evaluation.name}", labels,
            calibration.num_feeds if calibration is not None else None,
            n if labels is not None else (min(n, config.max_feeds) if n is not None else None),
            "all evaluation feeds" if labels is not None else f"the first {config.max_feeds} evaluation feeds"))
    if calibration is None:
        if model is None:
            return DataSplit(None, None, False, "none")
        feeds, why = _synthetic_feeds(model)
        if feeds is None:
            return DataSplit(None, None, False, f"none ({why})")
        return DataSplit(None, feeds, False, "seeded uniform random inputs (no data given): a sanity check only",
                         check_feeds=len(feeds), rule="8 generated feeds", generated=True)
    # the split is made on every feed of the source; a limit (--max-samples) caps what each part reads
    limit = calibration.limit
    every = calibration if limit is None else calibration.with_limit(None)
    total = every.num_feeds
    if total is None:
        total = sum(1 for _ in every)

    def capped(n: int) -> int:
        return n if limit is None else min(n, limit)

    if total < config.min_feeds:
        return _read_up_front(DataSplit(
            calibration, calibration, False, f"calibration data {calibration.name}", None, capped(total), capped(total),
            f"only {total} calibration feed(s) (< {config.min_feeds}): checked on the fitting data, "
            "not held out; give --eval data for a real check"))
    k = max(2, round(1.0 / config.fraction))
    cap = config.max_feeds

    def is_check(i: int) -> bool:
        return i % k == k - 1 and i // k < cap

    check = calibration.subset(is_check, name=f"{calibration.name} (held out)")
    fit = calibration.subset(lambda i: not is_check(i), name=f"{calibration.name} (fitting part)")
    n_check = sum(1 for i in range(total) if is_check(i))
    return _read_up_front(DataSplit(
        fit, check, True, f"calibration data {calibration.name}", None, capped(total - n_check), capped(n_check),
        f"every {_ordinal(k)} calibration feed (index mod {k} = {k - 1}), at most {cap}, held out"))


def _read_up_front(split: DataSplit) -> DataSplit:
    """``split`` once every feed its fitting and its checking parts read is validated
    (:meth:`Dataset.check_all`: files and folders)."""
    for data in (split.fit, split.check if split.check is not split.fit else None):
        if isinstance(data, Dataset):
            data.check_all()
    return split


def _ordinal(k: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def _synthetic_feeds(model: ir.Model) -> tuple[list[dict[str, np.ndarray]] | None, str]:
    try:
        return generated_feeds(model, count=8)[0], ""
    except DataError as exc:
        return None, str(exc)


# ---------------------------------------------------------------------------------------------
# figures: streaming accumulators, one per figure a rule may judge (update per feed, then value)


class Figure:
    """A figure of one output pair, accumulated over feeds: ``update(ref, cand)``, then ``value()``."""

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def value(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def decisions(self) -> float | None:
        """How many decisions an agreement figure was measured on, so that one decision read
        differently moves it by ``1 / decisions`` (None: not a share of decisions). An F1 counts
        each decision once per side, so this may be a half: :meth:`counted` is what a report shows."""
        return None

    def counted(self) -> tuple[int, str] | None:
        """What an agreement figure counted, as a whole number and its unit (``(9, "detections")``:
        both sides' detections of an F1), for reports; None where :meth:`decisions` is None. One
        decision read differently moves the figure by ``1 / decisions()``."""
        n = self.decisions()
        return None if n is None else (int(round(n)), "decisions")


class Cosine(Figure):
    """Cosine similarity of the flattened outputs over every feed."""

    def __init__(self) -> None:
        self.dot = self.rr = self.cc = 0.0

    def update(self, ref, cand):
        r, c = ref.astype(np.float64, copy=False).ravel(), cand.astype(np.float64, copy=False).ravel()
        self.dot += float(r @ c)
        self.rr += float(r @ r)
        self.cc += float(c @ c)

    def value(self):
        if self.rr == 0 or self.cc == 0:
            return 1.0 if self.rr == self.cc else 0.0
        return self.dot / math.sqrt(self.rr * self.cc)


class Sqnr(Figure):
    """Signal-to-quantization-noise ratio in dB: :math:`10\\log_{10}(\\sum r^2 / \\sum (r-c)^2)`."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0

    def update(self, ref, cand):
        r = ref.astype(np.float64, copy=False)
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum((r - cand) ** 2))

    def value(self):
        if self.noise == 0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf


class R2AgainstOriginal(Figure):
    r"""R^2 of the written model against the original, for outputs of one value per sample
    (kind ``regression``): per column, :math:`1 - \mathrm{SSE}/\mathrm{SST}` with
    :math:`\mathrm{SSE} = \sum (c - r)^2` and :math:`\mathrm{SST} = \sum (r - \bar r)^2`, where
    :math:`\bar r` is the original's mean over every checked sample; the figure is the worst column.

    Cosine over the raw values is dominated by their common offset: a regressor of diabetes
    progression (mean ~150) pruned to 0.7 kept cosine 0.9939 while its R^2 on held-out rows fell
    from 0.588 to 0.500. Centred on the original's mean, the offset is gone and a shift, a shrink
    or noise of the predictions all count against the spread the original actually has.

    Streamed: the mean is not known until the end, so each column keeps sums of
    :math:`r - k`, :math:`(r - k)^2` and :math:`(c - r)^2`, with :math:`k` the original's mean on
    the first feed (a shift that keeps the sums exact where the mean is large against the spread):
    :math:`\mathrm{SST} = \sum (r-k)^2 - (\sum (r-k))^2 / n`.

    Spread floor: the spread counted is at least a hundredth of the output's magnitude,
    :math:`1 - \mathrm{SSE} / (\mathrm{SST} + f^2 \sum r^2)` with :math:`f` = ``spread_floor``
    (0.01). A column the original holds (nearly) constant over the checked samples has no spread
    to measure against: one sample, or a confident binary probability (a Sigmoid at logit 18 on
    every sample), where one float32 step of the written model read as an R^2 of -9 million and a
    logit moved by 1, which changes no decision and keeps cosine 0.99999999997, as -3.4. Such a
    column is judged against its magnitude instead: an RMS error within 0.1% of its RMS value for
    0.99. Where the original does vary, the floor adds :math:`f^2 (1 + K^2)` of its spread, *K*
    the ratio of its mean to its spread: 0.08% for the diabetes regressor above (mean 150, spread
    59), 4% at K = 20; so the rule stays blind to no offset it was built to see.
    An original of all zeros has nothing to measure against: 1 when matched exactly, -inf otherwise.
    """

    #: the share of the output's RMS magnitude its spread counts at least (class docstring)
    spread_floor = 0.01

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s = self.ss = self.sse = 0.0

    @staticmethod
    def _columns(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a).astype(np.float64, copy=False)
        return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(-1, 1)

    def update(self, ref, cand):
        r, c = self._columns(ref), self._columns(cand)
        if not r.size:
            return
        if self.shift is None:
            self.shift = r.mean(axis=0)
        d = r - self.shift
        self.n += r.shape[0]
        self.s = self.s + d.sum(axis=0)
        self.ss = self.ss + (d * d).sum(axis=0)
        self.sse = self.sse + ((c - r) ** 2).sum(axis=0)

    def columns(self) -> np.ndarray:
        """R^2 against the original of every column (empty before any sample)."""
        if not self.n:
            return np.ones(0)
        sst = np.maximum(np.asarray(self.ss - self.s * self.s / self.n, dtype=np.float64), 0.0)
        sse = np.asarray(self.sse, dtype=np.float64)
        power = np.asarray(self.ss + 2.0 * self.shift * self.s + self.n * self.shift ** 2, dtype=np.float64)  # sum r^2
        spread = sst + self.spread_floor ** 2 * np.maximum(power, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = 1.0 - sse / spread
        return np.where(spread > 0, r2, np.where(sse == 0, 1.0, -np.inf))

    def value(self):
        cols = self.columns()
        return float(cols.min()) if cols.size else 1.0


class Ratio(Figure):
    """A share: ``hits / total`` summed over feeds (1.0 when nothing was counted)."""

    #: how many counts one decision adds to ``total`` (an F1 counts each side's detection once)
    per_decision = 1.0
    #: what ``total`` counts, for reports (:meth:`Figure.counted`)
    unit = "decisions"

    def __init__(self) -> None:
        self.hits = self.total = 0.0

    def add(self, hits: float, total: float) -> None:
        self.hits += hits
        self.total += total

    def value(self):
        return self.hits / self.total if self.total else 1.0

    def decisions(self):
        return self.total / self.per_decision

    def counted(self):
        return None if self.decisions() is None else (int(round(self.total)), self.unit)


class TopOneAgreement(Ratio):
    """Share of positions (all axes but the last) where both pick the same class on the last axis."""

    def update(self, ref, cand):
        if ref.ndim < 1 or ref.shape[-1] < 2:
            self.add(float(np.sum(np.sign(ref) == np.sign(cand))), ref.size)
            return
        self.add(float(np.sum(ref.argmax(-1) == cand.argmax(-1))), ref.size // ref.shape[-1])


class Equal(Ratio):
    """Share of elements equal to the original's."""

    def update(self, ref, cand):
        self.add(float(np.sum(ref == cand)), ref.size)

    def decisions(self):
        return None  # every element must be equal: any change is seen


class LabelAgreement(Ratio):
    """Share of decided classes (:func:`onnxcomp.ops.class_decision_source`: an arg-max, a
    classifier's predicted label) equal to the original's: one decision per element."""

    def update(self, ref, cand):
        self.add(float(np.sum(ref == cand)), ref.size)


class SequenceAgreement(Figure):
    r"""Agreement of greedily decoded sequences, for ``[N, T, C]`` scores (CTC-style recognizers).

    Each row is decoded the way a CTC decoder reads it: the class of highest score per step, runs
    of one class collapsed to one symbol, and the *blank* dropped. Nothing about the classes is
    assumed; what they are is read from the original's outputs over every check feed:

    * the blank is the class the original predicts most often, when it fills at least half of the
      steps (a blank does: most steps lie between symbols); otherwise no class is dropped;
    * the *separator* is the most frequent decoded symbol that never follows itself in the
      original's sequences (two word separators in a row separate nothing, where letters double:
      "ee", "ll"), when it is at least a tenth of them (a space between words); a separator at
      either end of a sequence carries nothing and is stripped from both sequences. (On six
      PP-OCR rec lines "e" outnumbered the space 10 to 9; a leading space read only by the
      float model then failed the check although the lines read the same.)

    Per row the agreement is :math:`1 - \mathrm{ED}(a, b) / \max(|a|, |b|, 1)` (Levenshtein
    distance of the two decoded sequences), and the figure is its mean over rows.
    """

    #: the most frequent class is the blank when it is the top class of at least this share of steps
    blank_share = 0.5

    def __init__(self) -> None:
        self.ref: list[np.ndarray] = []
        self.cand: list[np.ndarray] = []

    def update(self, ref, cand):
        if ref.ndim != 3:
            raise ValueError(f"sequence scores must be [N, T, C], got shape {list(ref.shape)}")
        self.ref.extend(ref.argmax(-1))
        self.cand.extend(cand.argmax(-1))

    def decisions(self):
        return len(self.ref)  # one decoded sequence read differently moves the mean by 1/rows

    def value(self):
        if not self.ref:
            return 1.0
        steps = np.concatenate(self.ref)
        counts = np.bincount(steps)
        blank = int(counts.argmax()) if counts.max() >= self.blank_share * steps.size else -1
        ref = [decode_sequence(r, blank) for r in self.ref]
        cand = [decode_sequence(c, blank) for c in self.cand]
        symbols = np.concatenate(ref)
        if symbols.size:
            counts = np.bincount(symbols)
            total = symbols.size
            for seq in ref:  # a symbol that follows itself is no separator
                counts[seq[1:][seq[1:] == seq[:-1]]] = 0
            if 10 * counts.max() >= total and counts.max() > 0:
                separator = int(counts.argmax())
                ref = [_strip(s, separator) for s in ref]
                cand = [_strip(s, separator) for s in cand]
        return float(np.mean([1.0 - edit_distance(a, b) / max(len(a), len(b), 1) for a, b in zip(ref, cand)]))


def _strip(seq: np.ndarray, symbol: int) -> np.ndarray:
    keep = np.flatnonzero(seq != symbol)
    return seq[keep[0]:keep[-1] + 1] if keep.size else seq[:0]


def decode_sequence(steps: np.ndarray, separator: int = -1) -> np.ndarray:
    """Greedy decoding of one row of step classes: repeats collapsed, ``separator`` dropped."""
    keep = np.ones(steps.shape[0], bool)
    keep[1:] = steps[1:] != steps[:-1]
    keep &= steps != separator
    return steps[keep]


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance of two integer sequences (unit costs), one numpy row per symbol of ``a``."""
    if len(a) == 0 or len(b) == 0:
        return max(len(a), len(b))
    prev = np.arange(len(b) + 1)
    for i, s in enumerate(a, 1):
        sub = prev[:-1] + (b != s)
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(sub, prev[1:] + 1)
        # insertions run left to right: cur[j] = min(cur[j], cur[j-1] + 1) = min over k<=j of cur[k] + j - k
        idx = np.arange(len(cur))
        cur = np.minimum.accumulate(cur - idx) + idx
        prev = cur
    return int(prev[-1])


class RegionAgreement(Ratio):
    r"""Agreement of the regions of probability maps ``[N, C, H, W]`` (segmentation, text detection).

    Each map is cut at 0.5 (the decision of a sigmoid) and split into 8-connected regions. Regions
    smaller than a quarter of the original map's median region are specks, not decisions, and are
    left out on both sides (the floor is read from the original; a map where the original finds
    nothing keeps every region of the candidate). A region of the original and one of the
    candidate *match* when the IoU of their pixels exceeds 0.5 (so a region matches at most one).
    The figure is the F1 of the matches, :math:`2\,\mathrm{TP} / (R_{ref} + R_{cand})`, over
    every map: what a detector built on the map would find, without knowing its post-processing.
    Maps without any region on either side agree.
    """

    threshold = 0.5
    speck = 0.25
    #: one region unmatched moves the F1 by 2 / (R_ref + R_cand): a decision is a pair of regions
    per_decision = 2.0
    unit = "regions"

    def update(self, ref, cand):
        if ref.ndim < 3:
            raise ValueError(f"probability maps must be [N, (C,) H, W], got shape {list(ref.shape)}")
        h, w = ref.shape[-2:]
        for r, c in zip(ref.reshape(-1, h, w), cand.reshape(-1, h, w)):
            lr, nr = label_regions(r > self.threshold)
            lc, nc = label_regions(c > self.threshold)
            floor = self.speck * float(np.median(np.bincount(lr.ravel())[1:])) if nr else 0.0
            lr, nr = _drop_small(lr, nr, floor)
            lc, nc = _drop_small(lc, nc, floor)
            self.add(2.0 * _matched_regions(lr, nr, lc, nc), nr + nc)


class DetectionAgreement(Ratio):
    r"""Agreement of the detections of dense detector heads ``[N, 4 + C, A]`` (YOLO-style).

    Both outputs are decoded the way a detector's post-processing reads them (best class per anchor
    above 0.25, class-wise NMS at 0.45; :mod:`onnxcomp.measure.detection`, where the layout is read
    from the original's values) and the detections paired at IoU >= 0.5 with the same class: the
    figure is the F1 :math:`2\,\mathrm{TP} / (n_{ref} + n_{cand})` over every image. Images where
    neither finds anything agree.
    """

    #: one detection unmatched moves the F1 by 2 / (n_ref + n_cand): a decision is a pair of detections
    per_decision = 2.0
    unit = "detections"

    def update(self, ref, cand):
        from onnxcomp.measure import detection

        ref, cand = detection.attributes_first(ref), detection.attributes_first(cand)
        classes = detection.class_rows(ref)
        for r, c in zip(ref, cand):
            dr, dc = detection.detections(r, classes), detection.detections(c, classes)
            self.add(2.0 * detection.match_count(dr, dc), len(dr[0]) + len(dc[0]))


def _drop_small(labels: np.ndarray, count: int, floor: float) -> tuple[np.ndarray, int]:
    """``labels`` without the regions of fewer than ``floor`` pixels, renumbered 1..n."""
    if count == 0 or floor <= 1:
        return labels, count
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= floor
    keep[0] = False
    renumber = np.cumsum(keep) * keep
    return renumber[labels], int(keep.sum())


def _matched_regions(lr: np.ndarray, nr: int, lc: np.ndarray, nc: int) -> int:
    if nr == 0 or nc == 0:
        return 0
    area_r = np.bincount(lr.ravel(), minlength=nr + 1)
    area_c = np.bincount(lc.ravel(), minlength=nc + 1)
    both = (lr > 0) & (lc > 0)
    pairs, inter = np.unique(lr[both].astype(np.int64) * (nc + 1) + lc[both], return_counts=True)
    a, b = pairs // (nc + 1), pairs % (nc + 1)
    iou = inter / (area_r[a] + area_c[b] - inter)
    return int(np.sum(iou > 0.5))


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of a 2-D boolean mask: ``(labels, count)``, labels 1..count, 0 outside.

    Works on horizontal runs: runs of adjacent rows that touch (diagonals included) are joined by
    repeated minimum-label propagation with pointer jumping, all in numpy.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # exclusive; row-major order pairs them with the starts
    n = len(rows)
    labels = np.zeros((h, w), np.int32)
    if n == 0:
        return labels, 0
    stride = w + 2
    start_key = rows * stride + starts
    end_key = rows * stride + ends
    # runs of row y-1 touching [s, e): end_prev >= s and start_prev <= e (8-connected)
    above = (rows - 1) * stride
    lo = np.searchsorted(end_key, above + starts, side="left")
    hi = np.searchsorted(start_key, above + ends, side="right")
    count = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(n), count)
    b = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())
    root = np.arange(n)
    while a.size:
        m = np.minimum(root[a], root[b])
        changed = np.any(root[a] != m) or np.any(root[b] != m)
        np.minimum.at(root, a, m)
        np.minimum.at(root, b, m)
        root = root[root]
        if not changed:
            break
    _, comp = np.unique(root, return_inverse=True)
    lengths = ends - starts
    flat = np.repeat(rows * w + starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    labels.ravel()[flat] = np.repeat(comp + 1, lengths)
    return labels, int(comp.max()) + 1


# ---------------------------------------------------------------------------------------------
# the budget rule: which kind of output -> which figure -> which threshold


@dataclasses.dataclass(frozen=True)
class Rule:
    """The budget of one kind of output: ``figure >= threshold``.

    Attributes:
        figure: the figure judged (a key of :data:`FIGURES` and of the output's report row).
        reads: how the figure reads in a report ("top-1 agreement").
        threshold: a :class:`CheckConfig` attribute holding the threshold, or a fixed number.
    """

    figure: str
    reads: str
    threshold: str | float
    #: cosine and SQNR (:data:`REPORTED`) are reported beside the figure: not for integers
    #: (indices, class labels), whose differences are no noise
    reported: bool = True
    #: the figure is a share (printed in percent); an R^2 is not (it is printed as it is)
    share: bool = True

    def limit(self, config: CheckConfig) -> float:
        return float(getattr(config, self.threshold) if isinstance(self.threshold, str) else self.threshold)

    def text(self, value: float) -> str:
        """The figure as a report line shows it: "top-1 agreement 99.75%", "R^2 against the original 0.8612"."""
        return f"{self.reads} {100 * value:.2f}%" if self.share else f"{self.reads} {value:.4f}"


#: The rule of each kind of output (module docstring: Budget). Another kind is one more entry here,
#: a figure in :data:`FIGURES` and a detector in :data:`KIND_DETECTORS`.
RULES: dict[str, Rule] = {
    "scores": Rule("top1_agreement", "top-1 agreement", "min_agreement"),
    "sequence": Rule("sequence_agreement", "decoded-sequence agreement", "min_agreement"),
    "map": Rule("region_agreement", "region agreement (F1)", "min_agreement"),
    "detections": Rule("detection_agreement", "detection agreement (F1)", "min_detection_agreement"),
    "values": Rule("cosine", "cosine", "min_cosine"),
    "regression": Rule("r2_vs_original", "R^2 against the original", "min_r2", share=False),
    "labels": Rule("label_agreement", "label agreement", "min_agreement", reported=False),
    "exact": Rule("equal", "share of equal elements", 1.0, reported=False),
}

#: Figures by name: a factory of a fresh accumulator each.
FIGURES: dict[str, Callable[[], Figure]] = {
    "cosine": Cosine,
    "sqnr_db": Sqnr,
    "top1_agreement": TopOneAgreement,
    "sequence_agreement": SequenceAgreement,
    "region_agreement": RegionAgreement,
    "detection_agreement": DetectionAgreement,
    "equal": Equal,
    "label_agreement": LabelAgreement,
    "r2_vs_original": R2AgainstOriginal,
}
#: Figures reported for every float output besides its rule's.
REPORTED = ("cosine", "sqnr_db")


def _producer(value: ir.Value) -> ir.Node | None:
    producer = value.producer()
    while producer is not None and producer.op_type in _PASS_THROUGH and producer.inputs and producer.inputs[0] is not None:
        producer = producer.inputs[0].producer()
    return producer


def _made_by(value: ir.Value, ops: frozenset[str]) -> bool:
    producer = _producer(value)
    return producer is not None and producer.op_type in ops and producer.domain in ("", "ai.onnx")


Dim = int | str | None


@dataclasses.dataclass(frozen=True)
class OutputView:
    """One graph output as the kind detectors (:data:`KIND_DETECTORS`) see it: what the graph says
    of its producer, and a shape and element type that are the declared ones
    (:func:`output_view`) until the original has run, then those of the array it returned
    (:meth:`seen`).

    Attributes:
        producer: the op behind pass-through ops (default domain only; None: none or another domain).
        head_join: a Concat of which some but not all inputs are Sigmoid scores (boxes beside classes).
        logits: a projection onto classes (MatMul or Gemm, or an Add of one) behind pass-through ops.
        shape: dims (int, a symbol's name, or None when unnamed); None when no shape is declared.
        floating: a float element type (None: not declared).
        top_class, top_share, steps: returned arrays only: the most frequent class of highest
            score (last axis) over the ``steps`` positions (all axes but the last), and the share of
            positions it takes (a CTC blank fills at least half of the steps).
        per_token: returned arrays only: a rank-3 array whose first two dims are those of an
            integer feed ``[N, T]`` (token ids): one row per input token, a token classifier's tags
            (its "outside" tag tops most tokens), not CTC steps.
        beside_scores: another output of the model is a rank-2 Softmax/LogSoftmax's (class scores
            per sample): a rank-2 output that is none is a regression beside them (a face detector's box and
            landmark offsets beside its face scores), not more class scores (set by
            :func:`output_kinds`, which sees the whole model).
        returned: ``shape`` and ``floating`` are the returned array's.
        decision: the output holds decided classes (:func:`onnxcomp.ops.class_decision_source`:
            an ArgMax/ArgMin, an ai.onnx.ml classifier's predicted label, behind class tables,
            reshapes and casts).
    """

    name: str
    producer: str | None
    head_join: bool
    logits: bool
    shape: tuple[Dim, ...] | None
    floating: bool | None
    top_class: int | None = None
    top_share: float | None = None
    steps: int = 0
    per_token: bool = False
    beside_scores: bool = False
    returned: bool = False
    decision: bool = False

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def seen(self, array: np.ndarray, token_shapes: Collection[tuple[int, ...]] = ()) -> OutputView:
        """This output as the original returned it (``array``: its output on one feed;
        ``token_shapes``: the shapes of that feed's rank-2 integer arrays)."""
        a = np.asarray(array)
        per_token = a.ndim == 3 and any(tuple(s) in (a.shape[:2], a.shape[1::-1]) for s in token_shapes)
        floating = a.dtype.kind == "f"
        top = share = None
        if floating and a.ndim >= 2 and a.shape[-1] >= 2 and a.size:
            counts = np.bincount(a.argmax(-1).ravel())
            top, share = int(counts.argmax()), float(counts.max() / counts.sum())
        return dataclasses.replace(self, shape=tuple(int(d) for d in a.shape), floating=floating, top_class=top,
                                   top_share=share, steps=a.size // a.shape[-1] if a.ndim and a.shape[-1] else 0,
                                   per_token=per_token, returned=True)

    def agrees_with(self, other: OutputView) -> bool:
        """Whether this (declared) view admits ``other``'s (returned) shape and element type:
        same rank, every fixed dim equal (symbols and negative dims, which some exporters write
        for "any", admit any), same float-ness where declared."""
        if self.shape is None or other.shape is None or len(self.shape) != len(other.shape):
            return False
        dims = all(not isinstance(d, int) or d < 0 or d == r for d, r in zip(self.shape, other.shape))
        return dims and (self.floating is None or self.floating == other.floating)


def output_view(value: ir.Value) -> OutputView:
    """The declared :class:`OutputView` of a graph output."""
    producer = _producer(value)
    op = producer.op_type if producer is not None and producer.domain in ("", "ai.onnx") else None
    inputs = list(producer.inputs) if op is not None else []
    made = [inp is not None and _made_by(inp, MAP_PRODUCERS) for inp in inputs]
    head = op in HEAD_JOINS and any(made) and not all(made)
    logits = op in LOGIT_PRODUCERS or (
        op in BIAS_ADDS and any(inp is not None and _made_by(inp, LOGIT_PRODUCERS) for inp in inputs))
    shape = None if value.shape is None else tuple(d if isinstance(d, int) else getattr(d, "value", None)
                                                   for d in value.shape)
    floating = None if value.dtype is None else value.dtype.is_floating_point()
    return OutputView(value.name, op, head, logits, shape, floating, decision=class_decision_source(value) is not None)


def _is_exact(view: OutputView) -> bool:
    return view.floating is False


def _is_labels(view: OutputView) -> bool:
    """Decided classes (an arg-max, a classifier's predicted label): each element is one decision,
    which may flip where two classes score alike, as the scores' top-1 does; they are judged by the
    same agreement, not by exact equality (which one flipped sample of 397 failed, beside the scores
    it was decided from at 99.75% top-1 agreement)."""
    return view.decision and view.floating is not True


def _is_sequence(view: OutputView) -> bool:
    """A Softmax/LogSoftmax of rank 3, but not one row per input token (``per_token``: a token
    classifier's tags are judged per token, as scores)."""
    return view.producer in SCORE_PRODUCERS and view.rank == 3 and not view.per_token


def _is_ctc_logits(view: OutputView) -> bool:
    """Rank-3 raw logits of a projection (:data:`CTC_LOGITS`) whose top class, in what the original
    returned, is one class at either end of the class axis (where CTC puts its blank) in at least
    half but not all of the steps: read only from returned arrays. The hidden states of an encoder
    are no projection; the logits of a language model or a regression head have no such blank. A
    token classifier's tags (NER: its "outside" tag is first and tops most tokens) have one step per
    token of an integer input (``per_token``): they are no CTC steps."""
    if not (view.logits and view.rank == 3 and view.top_share is not None) or view.per_token:
        return False
    classes = view.shape[-1]
    return (classes >= CTC_LOGITS["min_classes"] and view.steps >= CTC_LOGITS["min_steps"]
            and view.top_class in (0, classes - 1) and SequenceAgreement.blank_share <= view.top_share < 1.0)


def _tag_projection(view: OutputView) -> bool:
    """A rank-3 projection (MatMul/Gemm, or an Add of one) onto a fixed class axis of at most
    :data:`TAG_LOGITS` ``max_classes``: a token classifier's raw tag scores (khmersm's word-boundary
    emissions ``[1, T, 2]``), never hidden states to pool."""
    shape = view.shape
    return (view.logits and shape is not None and len(shape) == 3 and isinstance(shape[-1], int)
            and shape[-1] <= TAG_LOGITS["max_classes"])


def _is_tags(view: OutputView) -> bool:
    """Raw tag scores of a token classifier: a :func:`_tag_projection` that returned one row per
    token of an integer input (``per_token``). Its decisions are each token's top tag (or a CRF's
    path over them), which cosine does not see: khmersm's emissions kept cosine 0.9968 after
    prune-50 while 3.8% of the characters changed tag and 56% of the sentences were segmented
    differently."""
    return view.per_token and _tag_projection(view)


def _is_scores(view: OutputView) -> bool:
    shape = view.shape
    rank2 = shape is not None and len(shape) == 2 and not (isinstance(shape[1], int) and shape[1] < 2)
    return view.producer in SCORE_PRODUCERS or (rank2 and not view.beside_scores) or _is_tags(view)


def _is_map(view: OutputView) -> bool:
    return view.producer in MAP_PRODUCERS and (view.rank or 0) >= 4


def _is_detections(view: OutputView) -> bool:
    """A rank-3 float Concat of which some input is a Sigmoid: boxes beside class scores."""
    return view.head_join and view.rank == 3 and view.floating is True


def _is_regression(view: OutputView) -> bool:
    """One float value per sample, ``[N, 1]`` (a regressor's prediction: skl2onnx's ``variable``,
    a Keras or PyTorch head of one unit; a binary probability of a Sigmoid too): judged by its
    R^2 against the original (:class:`R2AgainstOriginal`), not by a cosine the common offset of
    its values dominates. Wider outputs (embeddings, features, box coordinates) stay ``values``;
    a rank-1 ``[N]`` output is not told from a vector of one sample by its shape alone, so it
    stays ``values`` too; so does a decided class cast to float (``decision``: an ArgMax behind a
    Cast), whose values are class indices, no prediction to regress."""
    shape = view.shape
    return (view.floating is True and not view.decision and shape is not None and len(shape) == 2
            and shape[1] == 1)


#: ``(kind, detector)`` in order: an output takes the first kind whose detector says yes of its
#: :class:`OutputView`, else ``"values"``. The check judges the view of what the original returned
#: on the first check feed (shape, element type; module docstring: Kinds), a caller without data
#: the declared one.
KIND_DETECTORS: list[tuple[str, Callable[[OutputView], bool]]] = [
    ("labels", _is_labels),
    ("exact", _is_exact),
    ("sequence", _is_sequence),
    ("sequence", _is_ctc_logits),
    ("scores", _is_scores),
    ("map", _is_map),
    ("detections", _is_detections),
    ("regression", _is_regression),
]


def classify(view: OutputView) -> str:
    """The kind of one output view (:data:`KIND_DETECTORS`)."""
    return next((kind for kind, test in KIND_DETECTORS if test(view)), "values")


class Kind(str):
    """A kind (a key of :data:`RULES`) read from the declared graph, carrying the output's
    :class:`OutputView` so that :class:`OutputFigures` judges it again from what the original
    returns (:func:`returned_kind`). It is the plain string everywhere else. ``decided``: how the
    output was already judged on other data (:meth:`OutputFigures.decided_kinds`), which then
    stands as it is."""

    view: OutputView | None
    decided: JudgedKind | None

    def __new__(cls, kind: str, view: OutputView | None = None, decided: JudgedKind | None = None) -> Kind:
        self = super().__new__(cls, kind)
        self.view = view
        self.decided = decided
        return self

    def __reduce__(self):
        return Kind, (str(self), self.view, self.decided)


def output_kinds(model: ir.Model) -> dict[str, str]:
    """The kind of each graph output from its declared shape and type (a :class:`Kind`, a key of
    :data:`RULES`; module docstring: Budget). :class:`OutputFigures` checks it against the arrays the
    original returns."""
    views = [output_view(value) for value in model.graph.outputs]
    scored = [view.name for view in views if view.producer in SCORE_PRODUCERS and view.rank == 2]
    views = [dataclasses.replace(view, beside_scores=any(name != view.name for name in scored)) for view in views]
    return {view.name: Kind(classify(view), view) for view in views}


@dataclasses.dataclass(frozen=True)
class JudgedKind:
    """How an output is judged once the original has returned it: ``kind``; ``axes``, the
    permutation that brings a time-major sequence ``[T, N, C]`` to ``[N, T, C]`` (None: as
    returned); ``note``, one line when the declared shape disagrees with the returned one or reads
    as another kind (None otherwise)."""

    kind: str
    axes: tuple[int, ...] | None = None
    note: str | None = None


def _time_major(shape: tuple[int, ...], batch: int | None) -> bool:
    """Whether a rank-3 sequence ``[A, B, C]`` is time-major: ``B`` is the feed's batch and ``A``
    is not, or (batch unknown or on both axes) ``B`` is 1 where ``A`` is not."""
    a, b = shape[0], shape[1]
    if batch is not None and (a == batch) != (b == batch):
        return b == batch
    return b == 1 and a > 1


def _dims(shape: tuple[Dim, ...] | None) -> str:
    return "no shape" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def returned_kind(declared: str, array: np.ndarray, batch: int | None = None,
                  token_shapes: Collection[tuple[int, ...]] = ()) -> JudgedKind:
    """How an output of declared kind ``declared`` is judged, given ``array``, the original's
    output on one feed (``batch``: that feed's batch size, when known; ``token_shapes``: the
    shapes of its rank-2 integer arrays, token ids, whose steps are no CTC steps).

    The kind is read from the returned shape and element type (:func:`classify` of
    :meth:`OutputView.seen`); the declared shape is the fallback (a plain string ``declared``,
    without a view, stands as it is) and the cross-check: when it does not admit the returned
    shape, or reads as another kind, ``note`` says so.
    """
    if getattr(declared, "decided", None) is not None:
        return declared.decided
    view = getattr(declared, "view", None)
    if view is None:
        return JudgedKind(str(declared))
    seen = view.seen(array, token_shapes)
    kind = classify(seen)
    axes = (1, 0, 2) if kind == "sequence" and seen.rank == 3 and _time_major(seen.shape, batch) else None
    if view.agrees_with(seen) and kind == declared:
        return JudgedKind(kind, axes)
    layout = " (time-major [T, N, C])" if axes else ""
    other = f", not {declared}" if kind != declared else ""
    link = "and" if view.agrees_with(seen) else "but"  # admitted shape, another kind: no "but"
    return JudgedKind(kind, axes, f"output {view.name!r} declares {_dims(view.shape)} {link} returns {_dims(seen.shape)}: "
                                  f"judged as {kind}{layout} from the returned shape{other}")


def feed_facts(feed: Mapping[str, np.ndarray] | None) -> tuple[int | None, set[tuple[int, ...]]]:
    """What one feed tells :func:`returned_kind` of the outputs the original returns on it: its
    batch (axis 0 of its first array that has one; None without) and the shapes of its rank-2
    integer arrays (token ids)."""
    arrays = list((feed or {}).values())
    batch = next((int(np.shape(a)[0]) for a in arrays if np.ndim(a)), None)
    return batch, {tuple(np.shape(a)) for a in arrays if np.ndim(a) == 2 and np.asarray(a).dtype.kind in "iu"}


class KindsSeen:
    """The kind of each output of ``model`` judged as the check judges it, for a caller that runs
    the model itself (``onnxcomp compare`` and the ``[measure]`` stage, through
    :func:`onnxcomp.measure.fidelity.compare_models`): declared (:func:`output_kinds`), then judged
    again (:func:`returned_kind`) on the first array with data the model returns for it
    (:meth:`see`). An output empty on every feed keeps its declared kind."""

    def __init__(self, model: ir.Model) -> None:
        self.names = [v.name for v in model.graph.outputs]
        self.declared = output_kinds(model)
        self.kinds = {n: str(self.declared[n]) for n in self.names}
        self.undecided = set(self.names)

    def see(self, feed: Mapping[str, np.ndarray], values: Sequence[np.ndarray]) -> None:
        """One feed and the model's outputs on it, in graph order."""
        if not self.undecided:
            return
        batch, tokens = feed_facts(feed)
        for name, array in zip(self.names, values):
            if name in self.undecided and np.size(array):
                self.kinds[name] = returned_kind(self.declared[name], np.asarray(array), batch, tokens).kind
                self.undecided.discard(name)


def reads_top1(kind: str) -> bool:
    """Whether an output of this kind is read by its top-1 agreement (class scores, :data:`RULES`):
    a table shows that figure for such outputs only, none for box coordinates or embeddings."""
    rule = RULES.get(str(kind))
    return rule is not None and rule.figure == "top1_agreement"


def pooled_outputs(model: ir.Model) -> dict[str, str]:
    """Encoder outputs judged on their mean-pooled embedding: output name -> attention-mask input
    (:func:`onnxcomp.measure.embedding.encoder_outputs`; empty for other models)."""
    from onnxcomp.measure.embedding import encoder_outputs

    mask, names = encoder_outputs(model)
    if mask is None:
        return {}
    tags = {v.name for v in model.graph.outputs if _tag_projection(output_view(v))}
    return {name: mask for name in names if name not in tags}


def judge_output(kind: str, figures: dict[str, float | None], config: CheckConfig) -> tuple[bool, str, str]:
    """The budget rule for one output: ``(ok, the rule, the figure judged)`` (see :data:`RULES`)."""
    rule = RULES[kind]
    value = figures.get(rule.figure)
    limit = rule.limit(config)
    if value is None or math.isnan(value):
        return False, f"{rule.reads} >= {limit:.10g}", f"{rule.reads} not measured"
    return bool(value >= limit), f"{rule.reads} >= {limit:.10g}", f"{rule.reads} {value:.4f}"


class OutputFigures:
    """Every output's figures (its rule's and :data:`REPORTED`), accumulated feed by feed.

    The outputs of an encoder (``pooled``: output name -> attention-mask input) are also pooled
    over their real tokens (:class:`onnxcomp.measure.embedding.PooledEmbedding`) and judged on the
    pooled embedding's cosine; their update needs the feed. This is the one evaluator of the budget:
    the check and the automatic fallback's stopping rule both judge through it.

    ``kinds`` are read from the declared graph (:func:`output_kinds`); on the first feed each is
    judged again from what the original returned (:func:`returned_kind`), so a model that declares
    ``[1, seqlen]`` and returns CTC logits ``[T, 1, C]`` is judged as a sequence whoever measures
    it. ``kinds`` then holds the kinds judged, ``notes`` a line per output whose declared shape
    disagreed, and every row of :meth:`result` its ``kind``.
    """

    def __init__(self, names: list[str], kinds: dict[str, str], pooled: dict[str, str] | None = None) -> None:
        from onnxcomp.measure.embedding import PooledEmbedding

        self.names = names
        self.declared = [kinds.get(n, "values") for n in names]
        self._kinds = [str(k) for k in self.declared]
        self.axes: list[tuple[int, ...] | None] = [None] * len(names)
        self._notes: list[str | None] = [None] * len(names)
        self.figures = [self._fresh(kind) for kind in self._kinds]
        #: per output: None once its kind is judged, else the empty arrays it returned so far,
        #: with what their feed said (batch, token shapes), replayed once the kind is judged
        self.pending: list[list[tuple] | None] = [[] for _ in names]
        #: per output: its kind was judged on an empty array (no output ever had data)
        self.from_empty = [False] * len(names)
        #: per output: the shape of its first empty array when it was empty on every feed, else None
        self.empty_shapes: list[list[int] | None] = [None] * len(names)
        self.pooled = {n: PooledEmbedding(mask) for n, mask in (pooled or {}).items() if n in names}

    @staticmethod
    def _fresh(kind: str) -> dict[str, Figure]:
        wanted = [RULES[kind].figure] + (list(REPORTED) if RULES[kind].reported else [])
        return {f: FIGURES[f]() for f in dict.fromkeys(wanted)}

    @property
    def kinds(self) -> list[str]:
        """The kind judged of every output (see :meth:`_settle`)."""
        self._settle()
        return self._kinds

    @property
    def notes(self) -> list[str | None]:
        """Per output, one line when its declared shape disagreed with the returned one."""
        self._settle()
        return self._notes

    def _judge(self, i: int, r: np.ndarray, batch: int | None, tokens: Collection[tuple[int, ...]]) -> None:
        """Judge output ``i``'s kind from ``r`` (the original's array) and replay its empty arrays."""
        judged = returned_kind(self.declared[i], r, batch, tokens)
        self.axes[i], self._notes[i] = judged.axes, judged.note
        if judged.kind != self._kinds[i]:
            self._kinds[i], self.figures[i] = judged.kind, self._fresh(judged.kind)
        pending, self.pending[i] = self.pending[i] or [], None
        for r0, c0, _, _ in pending:
            self._add(i, r0, c0)

    def _settle(self) -> None:
        """Outputs that returned only empty arrays are judged on the first of them."""
        for i, pending in enumerate(self.pending):
            if pending:
                self.from_empty[i] = True
                self.empty_shapes[i] = list(np.shape(pending[0][0]))
                self._judge(i, pending[0][0], pending[0][2], pending[0][3])

    def judged(self, index: int) -> str | None:
        """The kind of output ``index`` judged from an array with data the original returned;
        None while it has returned only empty ones."""
        return self._kinds[index] if self.pending[index] is None else None

    def decided_kinds(self) -> dict[str, Kind]:
        """The kinds judged from arrays with data, each fixed (:class:`Kind` ``decided``) so that
        another :class:`OutputFigures` (the fallback's, on other feeds) judges them alike."""
        return {n: Kind(k, getattr(d, "view", None), JudgedKind(k, a, note))
                for n, d, k, a, note, p, e in zip(self.names, self.declared, self._kinds, self.axes, self._notes,
                                                  self.pending, self.from_empty) if p is None and not e}

    def batch_axis(self, index: int) -> int:
        """The batch axis of output ``index`` as returned (1 for a time-major sequence)."""
        axes = self.axes[index]
        return axes.index(0) if axes else 0

    def update(self, ref_values: list[np.ndarray], cand_values: list[np.ndarray],
               feed: dict[str, np.ndarray] | None = None) -> None:
        """Add one feed. An output's kind is judged on the first array with data the original
        returns (module docstring: Kinds); empty ones (a detector finding nothing, a sequence of no
        step) wait for it, so that every caller judges it alike whichever feed comes first."""
        undecided = any(p is not None for p in self.pending)
        batch, tokens = feed_facts(feed) if undecided else (None, set())
        for i, (name, r, c) in enumerate(zip(self.names, ref_values, cand_values)):
            r, c = np.asarray(r), np.asarray(c)
            if r.shape != c.shape:
                raise OnnxcompError(f"output {name!r}: original shape {list(r.shape)} vs written {list(c.shape)}")
            if name in self.pooled and feed is not None:
                self.pooled[name].update(r, c, feed)
            if self.pending[i] is not None:
                if r.size == 0:
                    self.pending[i].append((r, c, batch, tokens))
                    continue
                self._judge(i, r, batch, tokens)
            self._add(i, r, c)

    def _add(self, i: int, r: np.ndarray, c: np.ndarray) -> None:
        axes = self.axes[i]
        if axes is not None:
            r, c = r.transpose(axes), c.transpose(axes)
        for figure in self.figures[i].values():
            figure.update(r, c)

    def result(self) -> list[dict[str, Any]]:
        """Per output, its ``kind`` and figures; an encoder output also has ``pooled_cosine``."""
        rows: list[dict[str, Any]] = [{"kind": kind, **{k: f.value() for k, f in figures.items()}}
                                      for kind, figures in zip(self.kinds, self.figures)]
        for name, row in zip(self.names, rows):
            if name in self.pooled and (emb := self.pooled[name].result()) is not None:
                row["pooled_cosine"] = emb["pooled_cosine"]
        return rows

    def embedding(self, name: str) -> dict[str, Any] | None:
        """The pooled-embedding figures of an encoder output (None for other outputs)."""
        return self.pooled[name].result() if name in self.pooled else None

    def decisions(self) -> list[float | None]:
        """Per output, how many decisions its rule's figure was measured on (None when it is not
        a share of decisions: cosine, equality, a pooled embedding)."""
        counts = [None if name in self.pooled else figures[RULES[kind].figure].decisions()
                  for name, kind, figures in zip(self.names, self.kinds, self.figures)]
        return [int(n) if n is not None and float(n).is_integer() else n for n in counts]

    def counted(self) -> list[tuple[int, str, float | None] | None]:
        """Per output, what its rule's agreement figure counted, as a whole number, its unit and the
        resolution (the step one decision read differently moves the figure: ``1 / decisions``;
        None with nothing counted); None where :meth:`decisions` is None. An F1 counts both sides'
        detections (or regions): 9 detections, resolution 2/9."""
        rows: list[tuple[int, str, float | None] | None] = []
        for name, kind, figures, n in zip(self.names, self.kinds, self.figures, self.decisions()):
            counted = None if n is None else figures[RULES[kind].figure].counted()
            rows.append(None if counted is None else (*counted, 1.0 / n if n else None))
        return rows

    def verdicts(self, config: CheckConfig) -> list[tuple[bool, str, str]]:
        """:func:`output_verdicts` of these figures."""
        return output_verdicts(self.kinds, self.result(), config)

    def meets(self, config: CheckConfig) -> bool:
        return figures_meet(self.kinds, self.result(), config)


def judged_figures(values: dict[str, float]) -> dict[str, float]:
    """The figures an output is judged on: an encoder output's cosine is its pooled embedding's."""
    return {**values, "cosine": values["pooled_cosine"]} if "pooled_cosine" in values else values


def output_verdicts(kinds: list[str], rows: list[dict[str, Any]], config: CheckConfig) -> list[tuple[bool, str, str]]:
    """:func:`judge_output` of every output (``rows``: :meth:`OutputFigures.result`), on the
    figures the check judges (an encoder output on its pooled embedding's cosine). A row's own
    ``kind`` (the kind judged from what the original returned) goes before ``kinds``."""
    return [judge_output(values.get("kind", kind), judged_figures(values), config) for kind, values in zip(kinds, rows)]


def figures_meet(kinds: list[str], rows: list[dict[str, float]], config: CheckConfig) -> bool:
    """Whether every output's figures (``rows``) meet the budget: the check's verdict."""
    return all(ok for ok, _, _ in output_verdicts(kinds, rows, config))


def check_model(
    reference: ir.Model,
    candidate: ir.Model | str | os.PathLike,
    split: DataSplit,
    config: CheckConfig | None = None,
    *,
    compressed: int | None = None,
    what: str = "",
    nothing_why: str = "",
    progress: Callable[[int], object] | None = None,
    reference_file: str | os.PathLike | None = None,
    written_model: ir.Model | None = None,
) -> dict[str, Any]:
    """Compare ``candidate`` (the model as written) with ``reference`` on the check data.

    Args:
        candidate: the written model, or the path of the written file (onnxruntime reads it as
            is: nothing is parsed or serialized again).
        reference_file: the file ``reference`` was loaded from, unchanged: onnxruntime reads it
            itself instead of a serialized copy.
        written_model: the model written to ``candidate`` when it is still in memory (the blame then
            does not load the file back).
        compressed: how many things were compressed (int8 nodes, channels cut, tensors clustered);
            0 means nothing was, and the budget is then not met.
        what: what ``compressed`` counts, for the report ("int8 nodes").
        nothing_why: why nothing was compressed, when known.

    Returns:
        A JSON-able dict: ``data`` (the split), ``budget``, ``outputs`` (per output: kind, cosine,
        SQNR, the rule's figure, the rule, verdict; an agreement figure also ``decisions``, the
        number of decisions it was measured on, and ``resolution``, ``1 / decisions``),
        ``accuracy`` (with labels), ``met``, ``problems`` (one line each), ``blame`` (worst
        tensors, when missed), ``resolution_note`` (:func:`resolution_note`: one line when the
        check is too coarse for its budget, else None) and ``kind_note`` (one line when an
        output's declared shape disagrees with the returned one and the kind was read from the
        returned shape, else None; module docstring: Kinds).

    Raises:
        DataError: the check data is bad where only reading it finds it (a NaN in a later
            sample, a malformed file of a folder): bad input, not a verdict on the model.
    """
    config = config or CheckConfig()
    started = time.perf_counter()
    report: dict[str, Any] = {"data": split.describe(), "budget": config.budget(), "outputs": [], "problems": [],
                              "blame": [], "resolution_note": None, "kind_note": None, "empty_note": None}
    if compressed is not None:
        report["compressed"] = {"count": int(compressed), "what": what}
    if compressed == 0:
        report["problems"].append(
            f"nothing was compressed (0 {what or 'changes'})" + (f": {nothing_why}" if nothing_why else "")
        )

    def stop(problem: str) -> dict[str, Any]:
        report["problems"].append(problem)
        report["met"] = False
        report["checked"] = False
        report["verdict"] = verdict(report)
        report["seconds"] = time.perf_counter() - started
        return report

    if split.check is None:
        return stop(f"not checked: no data to check on ({split.source})")
    data = check_dataset(split, reference)
    try:
        run = _compare(reference, candidate, data, split.labels, progress, split, reference_file)
    except OriginalFailsOnGenerated as exc:
        return stop(f"not checked: {exc}")
    except (DataError, RefusedOutputError):  # bad check data (a NaN in a later sample, a malformed file), a
        raise  # written model onnxruntime cannot run: an error, not a verdict
    except OnnxcompError as exc:
        return stop(f"the written model could not be compared with the original: {exc}")
    report["checked"] = True
    report["data"]["check_feeds"] = run["feeds"]
    report["data"]["check_samples"] = run["samples"]
    figures = run["output_figures"]
    for name, kind, values, (ok, rule, figure), n, note, empty in zip(
            run["names"], run["kinds"], run["figures"], figures.verdicts(config), figures.counted(), figures.notes,
            figures.empty_shapes):
        row: dict[str, Any] = {"name": name, "kind": kind, **{k: values.get(k) for k in REPORTED},
                               RULES[kind].figure: values.get(RULES[kind].figure), "rule": rule, "ok": ok}
        if note is not None:
            row["kind_note"] = note
        if n is not None:  # a whole count and its unit ("9 detections": both sides of an F1)
            row["decisions"], row["decision_unit"], row["resolution"] = n
        embedding = figures.embedding(name)
        if embedding is not None:  # judged on the mean-pooled embedding (attention mask)
            row["embedding"] = embedding
            rule, figure = f"pooled-embedding {rule}", f"pooled-embedding {figure}"
            row["rule"] = rule
        if empty is not None:  # nothing to compare: no verdict
            row.update(compared=False, empty_shape=empty)
        elif not ok:
            report["problems"].append(f"output {name!r}: {figure}, budget {rule}")
        report["outputs"].append(row)
    empty = [row for row in report["outputs"] if row.get("compared") is False]
    if empty:
        listed = ", ".join(f"{row['name']!r} {row['empty_shape']}" for row in empty)
        if len(empty) == len(report["outputs"]):
            report["checked"] = False
            report["problems"].append(
                f"not checked: every output was empty on every check feed ({listed}) in both models: "
                "nothing was compared; give data on which the model outputs something")
        else:
            report["empty_note"] = (f"output{'s' if len(empty) > 1 else ''} {listed} "
                                    f"{'were' if len(empty) > 1 else 'was'} empty on every check feed in both "
                                    "models: not compared (the verdict reads the other outputs)")
    if run["accuracy"]:
        original, written = run["accuracy"]
        drop = 100.0 * (original - written)
        report["accuracy"] = {"original": original, "written": written, "drop_points": drop, "output": run["names"][0]}
        if drop > config.max_drop:
            report["problems"].append(
                f"accuracy {100 * written:.2f}% vs {100 * original:.2f}% (-{drop:.2f} points), "
                f"budget {config.max_drop:g} points"
            )
    report["met"] = not report["problems"]
    # a run that compressed nothing misses its budget for that reason: what more data would resolve is beside it
    report["resolution_note"] = resolution_note([r for r in report["outputs"] if r.get("compared") is not False],
                                                config) if compressed != 0 else None
    report["kind_note"] = "; ".join(note for note in figures.notes if note) or None
    report["verdict"] = verdict(report)
    if not report["met"] and compressed != 0 and config.blame and report["checked"]:
        report["blame"] = blame(reference, candidate if written_model is None else written_model, data,
                                config.blame)
    report["seconds"] = time.perf_counter() - started
    return report


class OriginalFailsOnGenerated(OnnxcompError):
    """The original model itself cannot run on the generated check feeds (their free dimensions
    are set to 1, too short for e.g. a reflect Pad): nothing can be checked without data."""


@contextlib.contextmanager
def _original_runs(split: DataSplit | None) -> Iterator[None]:
    """Turn the original's failure on generated feeds into :class:`OriginalFailsOnGenerated`."""
    try:
        yield
    except OnnxcompError:
        raise
    except Exception as exc:  # onnxruntime's own error types
        if split is None or not split.generated:
            raise
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise OriginalFailsOnGenerated(
            f"the original model does not run on the generated inputs ({first}; their free dimensions are 1); "
            "give data (--data / --calibration / --eval) for a real check") from None


def resolution_note(rows: list[dict[str, Any]], config: CheckConfig) -> str | None:
    """One line when the check cannot see what its budget allows, else None.

    An agreement figure measured on *n* decisions moves by ``1 / n`` when one decision is read
    differently: that is the smallest change it can see (its ``resolution``; an F1 counts both
    sides' detections or regions, and one pair read differently moves it by ``2 / n``). When that
    step is larger than the loss the budget allows (``1 - threshold``), one flipped decision
    already fails the output and any loss below the step is invisible, so "passed" says little. A
    budget that allows no loss at all (threshold 1) is seen exactly. ``rows``: the check's
    ``outputs`` (with ``decisions``, a whole count, and its ``decision_unit`` and ``resolution``;
    a row without them counts decisions, ``resolution`` ``1 / decisions``). The count printed is
    whole, with its unit: "9 detections", never "4.5 decisions".
    """
    coarse = []
    for row in rows:
        n = row.get("decisions")
        if n is None:
            continue
        step = row.get("resolution", 1.0 / n if n else None)
        slack = 1.0 - RULES[row["kind"]].limit(config)
        if 0.0 < slack < 1.0 and (step is None or step > slack + 1e-9):
            coarse.append((math.inf if step is None else step, n, row))
    if not coarse:
        return None
    step, n, row = max(coarse, key=lambda c: c[0])
    also = "".join(f", {r['name']!r}" for _, _, r in coarse if r is not row)
    what = f"{RULES[row['kind']].reads} of output {row['name']!r}" + (f"; also{also[1:]}" if also else "")
    unit = row.get("decision_unit") or "decisions"
    if n == 0:
        seen = f"no {unit[:-1]}"
    elif not float(n).is_integer():  # a hand-made row of half decisions (an F1 before counts were whole)
        seen = f"less than one decision ({n:g})" if n < 1 else f"{n:g} decisions"
    else:
        seen = f"{n:g} {unit[:-1] if n == 1 else unit}"
    if step > 1.0:  # one decision read differently moves the figure by more than its whole range
        return f"the check saw {seen} ({what}): it cannot resolve any change; pass --eval with more data"
    allows = f"{100.0 * slack:.2g}"
    return (f"the check saw {seen} ({what}): it cannot resolve a change below {100.0 * step:.1f} points "
            f"where the budget allows {allows} point{'' if allows == '1' else 's'}; pass --eval with more data")


def _session(model: ir.Model | str | os.PathLike, what: str = "the written model"):
    from onnxcomp.runtime import open_session, session_options

    return open_session(model, sess_options=session_options("all", threads=None), what=what)


#: what an error calls the reference (the float model the written one is compared with)
ORIGINAL = "the original model"

#: reference outputs kept on a split for a second check up to this many bytes
KEEP_REFERENCE_BYTES = 256 * 2**20


def _compare(reference: ir.Model, candidate, data: Dataset, labels: np.ndarray | None,
             progress: Callable[[int], object] | None, split: DataSplit | None = None,
             reference_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """One pass of both models over ``data``: every output's figures (an encoder's pooled
    embedding too), and accuracies with labels. ``reference_file``: the original's file, which
    onnxruntime then reads itself (``reference`` is not serialized again).

    The original's outputs are kept on ``split`` (up to :data:`KEEP_REFERENCE_BYTES`) and taken
    from it when a check already ran there.
    """
    from onnxcomp.measure.metrics import check_label_range, predicted_class
    from onnxcomp.runtime import KeptOutputs, collect_outputs

    names = [v.name for v in reference.graph.outputs]
    figures = OutputFigures(names, output_kinds(reference), pooled_outputs(reference))
    cached = split.reference_outputs if split is not None else None
    if cached is None and initializer_nbytes(reference) >= LARGE_MODEL_BYTES:
        # a big model: the original's session is gone before the written model's opens (both run
        # side by side when its outputs would take more than KEEP_REFERENCE_BYTES)
        with _original_runs(split):
            cached = collect_outputs(_session(reference_file or reference, ORIGINAL), names, data, KEEP_REFERENCE_BYTES)
        if cached is not None and split is not None:
            split.reference_outputs = cached
    ref_session = _session(reference_file or reference, ORIGINAL) if cached is None else None
    verified = (split.written_outputs or []) if split is not None else []
    if split is not None:
        split.written_outputs = None  # one check takes them
    cand_session = None

    def open_written():
        try:
            return _session(candidate)
        except ModelLoadError as exc:
            raise RefusedOutputError(str(exc)) from None

    def written_outputs(index: int, feed) -> list[np.ndarray]:
        nonlocal cand_session
        if index < len(verified):
            return verified[index]
        cand_session = cand_session or open_written()
        return cand_session.run(names, feed)

    if not verified:
        cand_session = open_written()
    written = names if cand_session is None else [o.name for o in cand_session.get_outputs()]
    if written != names:
        raise OnnxcompError(f"the models' outputs differ: original {names}, written {written}")
    predictions: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    feeds = samples = 0
    keep = KeptOutputs(KEEP_REFERENCE_BYTES) if cached is None else None
    for feed in data:
        with _original_runs(split):
            ref_values = ref_session.run(names, feed) if cached is None else cached[feeds]
        if keep is not None:
            keep.add(ref_values)
        try:
            cand_values = written_outputs(feeds, feed)
        except RefusedOutputError:
            raise
        except Exception as exc:  # onnxruntime's own error types
            raise RefusedOutputError(f"onnxruntime cannot run the written model: {first_line(exc)}") from None
        figures.update(ref_values, cand_values, feed)
        if labels is not None:
            if not predictions[0]:
                if figures.judged(0) is not None:  # as the original returned it (not empty)
                    check_labels_fit(figures.judged(0), np.shape(ref_values[0]), names[0])
                check_label_range(labels, np.shape(ref_values[0]), names[0])
            predictions[0].append(predicted_class(ref_values[0]))
            predictions[1].append(predicted_class(cand_values[0]))
        samples += int(ref_values[0].shape[figures.batch_axis(0)]) if ref_values and np.ndim(ref_values[0]) else 1
        feeds += 1
        if progress is not None:
            progress(feeds)
    if feeds == 0:
        raise OnnxcompError("the check data has no feed")
    if keep is not None and keep.values is not None and split is not None:
        split.reference_outputs = keep.values
    if split is not None and split.judged_kinds is None:
        split.judged_kinds = figures.decided_kinds()
    accuracy = None
    if labels is not None:
        pred = [np.concatenate(p) for p in predictions]
        if pred[0].shape[0] != labels.shape[0]:
            raise DataError(f"{labels.shape[0]} labels for {pred[0].shape[0]} predictions of output {names[0]!r}")
        accuracy = (float(np.mean(pred[0] == labels)), float(np.mean(pred[1] == labels)))
    return {"names": names, "kinds": figures.kinds, "figures": figures.result(), "feeds": feeds, "samples": samples,
            "accuracy": accuracy, "output_figures": figures}


def check_dataset(split, reference: ir.Model) -> Dataset:
    """The check data of ``split`` (not None) as a :class:`Dataset` read against ``reference``."""
    return split.check if isinstance(split.check, Dataset) else Dataset(split.check, reference)


def blame(reference: ir.Model, candidate: ir.Model | str | os.PathLike, data: Dataset, top: int,
          feeds: int = 1) -> list[dict[str, Any]]:
    """The ``top`` intermediate tensors with the lowest SQNR on the first ``feeds`` check feeds
    (those computed exactly left out)."""
    from onnxcomp.io import load_model

    try:
        written = candidate if isinstance(candidate, ir.Model) else load_model(candidate)
        sqnr = layer_sqnr(reference, written, [feed for _, feed in zip(range(feeds), data)])
    except OnnxcompError:
        return []
    worst = sorted(sqnr.items(), key=lambda kv: -math.inf if math.isnan(kv[1]) else kv[1])
    # a tensor computed exactly (infinite SQNR) is no damage, even when fewer than ``top`` are damaged
    return [{"tensor": name, "sqnr_db": db} for name, db in worst[:top] if db != math.inf]


def layer_sqnr(reference: ir.Model, candidate: ir.Model, feeds: list[dict[str, np.ndarray]], *,
               with_outputs: bool = False) -> dict[str, float]:
    """SQNR in dB of every float tensor both models compute under the same name, over ``feeds``.

    The tensors are exposed as extra graph outputs, untyped (onnxruntime infers their types, so no
    type inference runs here), one model at a time; the graph outputs themselves are left out
    unless ``with_outputs``. Tensors whose shapes differ (pruned channels) are left out too.
    """
    from onnxcomp.graph import produced_values

    ref_values, cand_values = produced_values(reference), produced_values(candidate)
    outputs = set() if with_outputs else {v.name for v in reference.graph.outputs}
    names = [n for n, v in ref_values.items()
             if n in cand_values and n not in outputs and (v.dtype is None or v.dtype.is_floating_point())]
    ref_runs = _exposed_runs(reference, names, feeds)
    cand_runs = _exposed_runs(candidate, names, feeds)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for ref, cand in zip(ref_runs, cand_runs):
        for name, r, c in zip(names, ref, cand):
            sums = power_sums(r, c) if name in signal else None
            if sums is None:  # not comparable on one feed: left out
                signal.pop(name, None)
                continue
            signal[name] += sums[0]
            noise[name] += sums[1]
    from onnxcomp.measure.metrics import _sqnr_from_sums

    return {n: _sqnr_from_sums(s, noise[n]) for n, s in signal.items()}


def power_sums(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float] | None:
    """Signal and noise power of a reference tensor r and its candidate c, sum(r**2) and
    sum((r - c)**2) in float64 (:func:`layer_sqnr`, onnxcomp.quant.damage.isolated_damage); None
    where the two cannot be compared (not floating point, shapes differ)."""
    if reference.dtype.kind != "f" or reference.shape != candidate.shape:
        return None
    r64 = reference.astype(np.float64, copy=False)
    return float(np.sum(r64 * r64)), float(np.sum((r64 - candidate) ** 2))


def _exposed_runs(model: ir.Model, names: list[str], feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    from onnxcomp.graph import exposed
    from onnxcomp.runtime import create_session, session_options

    with exposed(model, names) as with_names:
        session = create_session(with_names, sess_options=session_options("all", threads=None))
    return [session.run(names, feed) for feed in feeds]


def verdict(check: dict[str, Any]) -> str:
    """The check's verdict in one word: ``passed`` (every compared output met its budget, something
    was compressed), ``not checked`` (nothing was compared: no data, the original cannot run the
    generated inputs, every output empty on every feed; never a met budget) or ``failed``."""
    if not check.get("checked"):
        return "not checked"
    return "passed" if check.get("met") else "failed"


def verdict_line(check: dict[str, Any]) -> str:
    """One line for the terminal: the verdict, the data, and the worst figures."""
    data = check["data"]
    where = data["source"]
    if data.get("check_feeds") is not None:
        where += f", {data['check_feeds']} feed(s)"
    if not data.get("held_out") and check.get("checked"):
        where += ", NOT held out"
    if not check.get("checked", True):
        problems = "; ".join(p.removeprefix("not checked: ") for p in check["problems"][:3])
        return f"NOT CHECKED on {where}: {problems}"
    if check.get("met"):
        figures = "; ".join(_figure(r) for r in check["outputs"][:4])
        acc = check.get("accuracy")
        if acc:
            figures += f"; accuracy {100 * acc['written']:.2f}% (original {100 * acc['original']:.2f}%)"
        return f"check passed on {where}: {figures}"
    problems = "; ".join(check["problems"][:3]) + (f" (+{len(check['problems']) - 3} more)" if len(check["problems"]) > 3 else "")
    blame = ""
    if check.get("blame"):
        blame = "; most damaged tensors " + ", ".join(f"{b['tensor']!r} ({b['sqnr_db']:.1f} dB)" for b in check["blame"][:3])
    return f"CHECK FAILED on {where}: {problems}{blame}"


def _figure(row: dict[str, Any]) -> str:
    if row.get("compared") is False:
        return f"{row['name']}: empty on every feed {row['empty_shape']}, not compared"
    if row.get("embedding"):
        emb = row["embedding"]
        nn = f", nearest-neighbour agreement {100 * emb['nn_agreement']:.1f}%" if emb["nn_agreement"] is not None else ""
        return f"{row['name']}: pooled-embedding cosine {emb['pooled_cosine']:.4f} (min {emb['pooled_cosine_min']:.4f}){nn}"
    if row["kind"] == "exact":
        return f"{row['name']}: {'equal' if row['ok'] else 'differs'}"
    rule = RULES.get(row["kind"])
    name = f"{row['name']} ({row['kind']})"
    if rule is not None and not rule.reported and row.get(rule.figure) is not None:
        return f"{name}: {rule.text(row[rule.figure])}"
    if rule is not None and rule.figure not in REPORTED and row.get(rule.figure) is not None:
        return f"{name}: {rule.text(row[rule.figure])}, cosine {row['cosine']:.4f}"
    return f"{name}: cosine {row['cosine']:.4f}, SQNR {row['sqnr_db']:.1f} dB"
