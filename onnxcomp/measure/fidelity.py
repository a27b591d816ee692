"""Model-level fidelity: run a reference and a candidate model on the same data and compare.

:func:`compare_models` streams a :class:`~onnxcomp.data.Dataset` through both models with
onnxruntime and feeds each output pair into a
:class:`~onnxcomp.measure.metrics.FidelityAccumulator`; nothing but running sums (and, with
labels, one predicted class per sample) is kept, whatever the data set size.

Per-layer mode exposes every intermediate float tensor that both models produce under the same name
as an extra graph output (appended for the second pass and removed again; a tensor without a
type is exposed untyped: onnxruntime infers it, and one that turns out not to be float is left
out) and ranks them by SQNR, worst first. This is what to read when a compressed model breaks: the first tensor where the SQNR drops is
where the damage appears. Exposing intermediates blocks some of onnxruntime's fusions, so the
per-layer numbers describe an unfused run; the per-output numbers always come from the models as
they are. Intermediate tensors that cannot be compared are left out of the ranking and listed with
the reason in ``layers_skipped``: empty on every feed (``Shape`` of a scalar, a ``Slice`` that
selects nothing: paddle2onnx writes such helpers), or resized by pruning. An empty batch of a model
output is left out of its metrics; an output empty on every feed is an error. Feeds of different
sizes (a folder of feeds: images of several widths) are compared whole; an axis whose size differs
is None in the shape, and as the channel axis it gives no per-channel error.

Each output is named with its kind as the held-out check judges it (:class:`onnxcomp.check.KindsSeen`:
from the graph, then from what the reference returns on the first feed where it has data), so that
a table shows top-1 agreement only where the check reads it (class scores), not for box
coordinates or embeddings, although the figure is computed wherever the last axis has classes; and
an output of one value per sample (kind ``regression``) also shows the check's R^2 against the
original (:class:`onnxcomp.check.R2AgainstOriginal`), which its cosine does not see.

Channel axis of an output, unless given: 1 for rank 4 and 5 (NCHW-like), for rank 3 the smaller of
axes 1 and 2 (``[N, 84, 8400]`` detector heads put boxes and scores on axis 1), -1 otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.check import FIGURES, RULES, KindsSeen, check_labels_fit, reads_top1
from onnxcomp.data import DataSource, Dataset, labels_argument, load_data
from onnxcomp.errors import DataError, OnnxcompError
from onnxcomp.graph import FLOAT_TYPES, ORIGINAL_NAMES, exposed, run_feed
from onnxcomp.io import LARGE_MODEL_BYTES, ModelSource, initializer_nbytes, load_model, release_pages
from onnxcomp.measure.metrics import FidelityAccumulator, OutputFidelity, check_label_range, predicted_class
from onnxcomp.runtime import collect_outputs, create_session, session_options

__all__ = ["ModelComparison", "compare_models", "default_channel_axis", "NothingToCompare"]


class NothingToCompare(OnnxcompError):
    """An output of the reference was empty on every feed (or got no data): no figure exists."""

def default_channel_axis(shape: Sequence[int]) -> int | None:
    """The channel axis :func:`compare_models` uses for an output of this shape (module doc)."""
    rank = len(shape)
    if rank < 2:
        return None
    if rank in (4, 5):
        return 1
    if rank == 3:
        return 1 if shape[1] <= shape[2] else 2
    return -1


@dataclasses.dataclass
class ModelComparison:
    """Fidelity of every output (and optionally every shared intermediate tensor).

    ``accuracy`` maps a model role ("reference", "candidate") to its accuracy against the labels
    on ``label_output``; empty without labels. ``layers`` is sorted worst SQNR first. ``kinds``
    maps each output to its kind as the held-out check judges it (:class:`onnxcomp.check.KindsSeen`:
    ``scores`` is the kind read by its top-1 agreement, :func:`onnxcomp.check.reads_top1`).
    """

    outputs: list[OutputFidelity]
    samples: int
    feeds: int
    accuracy: dict[str, float]
    label_output: str | None
    layers: list[OutputFidelity]
    layers_resized: int = 0
    layers_skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    #: R^2 against the original of each output of kind ``regression`` (the check's figure)
    r2: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "feeds": self.feeds,
            "outputs": [self._output_dict(f) for f in self.outputs],
            "accuracy": self.accuracy,
            "label_output": self.label_output,
            "layers": [_fidelity_dict(f, channels=False) for f in self.layers],
            "layers_resized": self.layers_resized,
            "layers_skipped": dict(self.layers_skipped),
        }

    def kind(self, f: OutputFidelity) -> str:
        """The output's kind as the held-out check judges it (``values`` where none was seen)."""
        return self.kinds.get(f.name, "values")

    def top1(self, f: OutputFidelity) -> float | None:
        """Top-1 agreement where the output's kind is read by it (class scores); None elsewhere: for
        box coordinates or embeddings the figure exists but means nothing."""
        return f.top1_agreement if reads_top1(self.kind(f)) else None

    def label_agreement(self, f: OutputFidelity) -> float | None:
        """Share of equal elements where the output holds decided classes (kind ``labels``: an
        arg-max, a classifier's predicted label); None elsewhere."""
        return f.equal_share if self.kind(f) == "labels" else None

    def r2_vs_original(self, f: OutputFidelity) -> float | None:
        """R^2 against the original where the output is a regression (kind ``regression``); None elsewhere."""
        return self.r2.get(f.name) if self.kind(f) == "regression" else None

    def _output_dict(self, f: OutputFidelity) -> dict[str, Any]:
        return {**_fidelity_dict(f), "kind": self.kind(f), "top1_agreement": self.top1(f),
                "label_agreement": self.label_agreement(f), "r2_vs_original": self.r2_vs_original(f)}


def _fidelity_dict(f: OutputFidelity, *, channels: bool = True) -> dict[str, Any]:
    d = {
        "name": f.name,
        "shape": list(f.shape),
        "max_abs": f.max_abs,
        "mean_abs": f.mean_abs,
        "cosine": f.cosine,
        "sqnr_db": f.sqnr_db,
        "top1_agreement": f.top1_agreement,
        "worst_channel": None
        if f.worst_channel is None
        else {"index": f.worst_channel[0], "sqnr_db": f.worst_channel[1]},
    }
    if channels and f.channels:
        d["channel_axis"] = f.channel_axis
        d["channels"] = [
            {"index": c.index, "sqnr_db": c.sqnr_db, "max_abs": c.max_abs, "range_ratio": c.range_ratio}
            for c in f.channels
        ]
    return d


def _shared_intermediates(reference: ir.Model, candidate: ir.Model) -> list[tuple[str, str]]:
    """``(reference name, candidate name)`` of float tensors computed by nodes in both models (not
    graph inputs/outputs; renamed ones paired through :data:`ORIGINAL_NAMES`); a tensor without a
    type is among them (its values tell)."""

    def float_values(model: ir.Model) -> dict[str, ir.Value]:
        outputs = {v.name for v in model.graph.outputs}
        found = {}
        for node in model.graph:
            for value in node.outputs:
                if value.name and value.name not in outputs and (value.dtype is None or value.dtype in FLOAT_TYPES):
                    found[value.name] = value
        return found

    ref_values = float_values(reference)
    original = candidate.meta.get(ORIGINAL_NAMES) or {}
    cand_values = {original.get(name, name): name for name in float_values(candidate)}
    return [(name, cand_values[name]) for name in ref_values if name in cand_values]


def compare_models(
    reference: ModelSource,
    candidate: ModelSource,
    data: DataSource | Dataset,
    *,
    labels: Any = None,
    label_output: str | None = None,
    per_layer: bool = False,
    channel_axis: int | None | str = "auto",
    optimization: str = "all",
    threads: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> ModelComparison:
    """Compare ``candidate`` against ``reference`` on ``data`` (see module docstring).

    Args:
        labels: one integer class per sample; accuracy of both models is computed on
            ``label_output`` (default: the first output).
        per_layer: also compare intermediate tensors shared by name.
        channel_axis: ``"auto"`` (module doc), an int for every output, or None for no per-channel
            error.
        progress: called with the number of feeds done after each feed.

    Raises:
        OnnxcompError: the models' outputs differ in names or shapes, or labels don't match the
            sample count.
    """
    reference, candidate = load_model(reference), load_model(candidate)  # a path, bytes or proto too
    data = load_data(data, reference)  # an .npz path, a list of feeds... too
    labels = labels_argument(labels)  # a list or a labels file's path too
    ref_outputs = [v.name for v in reference.graph.outputs]
    cand_outputs = [v.name for v in candidate.graph.outputs]
    if ref_outputs != cand_outputs:
        raise OnnxcompError(
            f"the models' outputs differ: reference {ref_outputs}, candidate {cand_outputs}"
        )
    if label_output is not None and label_output not in ref_outputs:
        raise OnnxcompError(f"--label-output {label_output!r} is not an output; outputs: {ref_outputs}")
    layer_names: list[str] = []
    cand_layer_names: list[str] = []
    options = session_options(optimization, threads=threads)
    # The outputs always come from the models as they are: exposing intermediates blocks
    # onnxruntime's fusions (int8 kernels among them), which can hide what the fused kernels do.
    # Per-layer tensors come from a second pass with exposed copies, once the first sessions are
    # gone (two sessions of a model alive at once would hold its weights twice).
    if per_layer:
        pairs = _shared_intermediates(reference, candidate)
        layer_names = [r for r, _ in pairs]
        cand_layer_names = [c for _, c in pairs]
    names = ref_outputs + layer_names
    accumulators: dict[str, FidelityAccumulator] = {}
    label_index = ref_outputs.index(label_output) if label_output else 0
    predictions: dict[str, list[np.ndarray]] = {"reference": [], "candidate": []}
    samples = feeds = 0
    resized: set[str] = set()
    empty: dict[str, list[int]] = {}
    kinds = KindsSeen(reference)
    regression = RULES["regression"].figure
    r2: dict[str, Any] = {}  # output -> the check's R^2 accumulator, for outputs judged as regressions

    def consume(which: list[str], ref_values, cand_values, layer: bool) -> None:
        for i, (name, r, c) in enumerate(zip(which, ref_values, cand_values)):
            if layer and (r.dtype.kind != "f" or c.dtype.kind != "f"):
                continue  # an untyped intermediate that is not float
            if r.shape != c.shape:
                if layer:  # an intermediate pruning resized: not comparable
                    resized.add(name)
                    continue
                raise OnnxcompError(
                    f"output {name!r}: reference shape {list(r.shape)} vs candidate {list(c.shape)}"
                )
            if r.size == 0:  # nothing to compare in this feed (see module docstring)
                empty[name] = list(r.shape)
                continue
            if name not in accumulators:
                axis = default_channel_axis(r.shape) if channel_axis == "auto" else channel_axis
                if axis is not None and r.ndim >= 2 and axis % r.ndim == 0:
                    axis = None
                accumulators[name] = FidelityAccumulator(channel_axis=axis if r.ndim >= 2 else None, name=name,
                                                         varying=True)  # a folder of feeds may vary in size
            accumulators[name].update(np.atleast_1d(r), np.atleast_1d(c))
            if not layer and kinds.kinds.get(name) == "regression":
                r2.setdefault(name, FIGURES[regression]()).update(r, c)
            if labels is not None and not layer and i == label_index:
                if not predictions["reference"]:
                    check_labels_fit(kinds.kinds[name], r.shape, name)
                    check_label_range(labels, r.shape, name)
                predictions["reference"].append(predicted_class(r))
                predictions["candidate"].append(predicted_class(c))

    # Big models (weights over LARGE_MODEL_BYTES) run one session at a time: the reference's
    # values are kept, then its session is gone before the candidate's exists.
    one_at_a_time = max(initializer_nbytes(reference), initializer_nbytes(candidate)) >= LARGE_MODEL_BYTES
    for feed, ref_values, cand_values in _paired_runs(reference, candidate, ref_outputs, data, options, one_at_a_time):
        kinds.see(feed, ref_values)  # first: labels are checked against the kind the original returned
        consume(ref_outputs, ref_values, cand_values, layer=False)
        # axis 0 of the data indexes samples (an output's axis 0 may be time: a CTC recognizer's [T, N, C])
        first = next((np.asarray(v) for v in feed.values()), None)
        samples += int(first.shape[0]) if first is not None and first.ndim else 1
        feeds += 1
        if progress is not None:
            progress(feeds)
    if layer_names:
        with exposed(reference, layer_names) as ref_exposed, exposed(candidate, cand_layer_names) as cand_exposed:
            for _, ref_values, cand_values in _paired_runs(ref_exposed, cand_exposed, layer_names, data, options,
                                                        one_at_a_time, cand_layer_names):
                consume(layer_names, ref_values, cand_values, layer=True)
    accuracy: dict[str, float] = {}
    if labels is not None:
        for role, preds in predictions.items():
            pred = np.concatenate(preds)
            if pred.shape[0] != labels.shape[0]:
                raise DataError(
                    f"{labels.shape[0]} labels for {pred.shape[0]} predictions of output "
                    f"{names[label_index]!r}"
                )
            accuracy[role] = float(np.mean(pred == labels))
    never = [n for n in ref_outputs if n not in accumulators]
    if never:
        why = f"is empty (shape {empty[never[0]]}) on every feed" if never[0] in empty else "got no data"
        raise NothingToCompare(f"output {never[0]!r} {why}: nothing to compare")
    outputs = [accumulators[n].result() for n in ref_outputs]
    skipped = {n: "resized (pruned channels)" for n in layer_names if n in resized}
    skipped.update(
        (n, f"empty on every feed (shape {empty[n]})")
        for n in layer_names
        if n not in accumulators and n not in resized and n in empty
    )
    layers = sorted(
        (accumulators[n].result() for n in layer_names if n in accumulators and n not in resized),
        key=lambda f: _sort_key(f.sqnr_db),
    )
    return ModelComparison(
        outputs=outputs,
        samples=samples,
        feeds=feeds,
        accuracy=accuracy,
        label_output=names[label_index] if labels is not None else None,
        layers=layers,
        layers_resized=len(resized),
        layers_skipped=skipped,
        kinds=kinds.kinds,
        r2={n: fig.value() for n, fig in r2.items()},
    )


#: what an error calls the two models compared (onnxruntime refusing one of them)
REFERENCE, CANDIDATE = "the reference model", "the candidate model"


def _paired_runs(reference: ir.Model, candidate: ir.Model, names: list[str], data, options,
                 one_at_a_time: bool, cand_names: list[str] | None = None):
    """``(feed, reference values, candidate values)`` of ``names`` (the candidate's ``cand_names``,
    when it named them otherwise) per feed: both sessions side by side, or (``one_at_a_time``)
    every feed through the reference first, its session dropped, then the candidate's."""
    cand_names = names if cand_names is None else cand_names
    if not one_at_a_time:
        ref_session = create_session(reference, sess_options=options, what=REFERENCE)
        cand_session = create_session(candidate, sess_options=options, what=CANDIDATE)
        for feed in data:
            yield feed, run_feed(ref_session, names, feed, data), run_feed(cand_session, cand_names, feed, data)
        return
    ref_values = collect_outputs(create_session(reference, sess_options=options, what=REFERENCE), names, data)
    release_pages(reference)
    session = create_session(candidate, sess_options=options, what=CANDIDATE)
    for feed, values in zip(data, ref_values):
        yield feed, values, session.run(cand_names, feed)


def _sort_key(sqnr: float) -> float:
    return -np.inf if np.isnan(sqnr) else sqnr
