r"""Per-tensor choice of the clipping range by measured error (calibration method ``per-tensor``).

No single range method suits every tensor: clipping the outliers of a heavy-tailed activation
buys resolution for the bulk, while clipping the rare large values a layer relies on (an always-on
channel, a sparse feature) destroys it. ``per-tensor`` measures instead of guessing, in two streamed
passes over the calibration data:

1. **Candidates.** One :class:`CandidateObserver` per tensor keeps a histogram of ``x`` (the
   lattice histogram of :mod:`onnxcomp.quant.observers`) and proposes ranges from it: min/max,
   percentiles (the configured one and 99.99), the MSE-optimal range and the entropy (KL)
   threshold, the latter on the histogram of ``|x|`` folded from that of ``x``. Ranges equal
   after the widening to 0 that quantization applies are proposed once.
2. **Scoring.** A scoring model computes, for every candidate ``k`` of tensor ``t`` and every
   consumer ``c`` of ``t``, the consumer's output with ``t`` replaced by its fake-quantized value
   ``DQ(Q(t; k))`` (all other inputs float), and returns only the sums

   .. math:: E_{t,k,c} = \sum (c(\ldots, q_k(t), \ldots) - c(\ldots, t, \ldots))^2, \qquad
             S_c = \sum c(\ldots, t, \ldots)^2

   per feed (scalars), over the first :data:`SCORE_FEEDS` feeds (each costs about one forward
   pass per candidate). A Conv consumer thus compares ``W * x`` with ``W * q(x)``: an error the
   consumer's weights amplify counts more than one they average away. Consumers with subgraphs,
   several outputs or a non-float output are not replicated; a tensor with no other consumer is
   scored on itself (``E = sum (q_k(t) - t)^2``).

Each tensor keeps the MSE-optimal range unless another candidate's relative error
``sum_c E_{t,k,c} / S_c`` (summed over feeds) is at most half of it (:data:`SWITCH_GAIN`): the
scores come from a few feeds and one tensor quantized at a time, so leaving the statistically
sound default needs clear evidence (a plain argmin follows differences within the noise). Among the candidates that clear the bar, the least
error wins, ties to the earlier one in :data:`CANDIDATE_ORDER`. Memory stays bounded by one feed's
activations plus ``O(bins)`` per tensor; the choices are independent per tensor.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import DataError
from onnxcomp.graph import all_value_names, stream_values, unique_name
from onnxcomp.quant.observers import MSEObserver, Observer, _cell, best_threshold, entropy_threshold
from onnxcomp.quant.primitives import QDType, compute_scale_zero_point, qdtype_info

__all__ = ["CandidateObserver", "SplitCandidateObserver", "HOLD_EVERY", "RangeChoice", "choose_ranges", "observe", "CANDIDATE_ORDER"]

#: Candidate names in tie-break order (the first of equal errors wins).
CANDIDATE_ORDER = ("minmax", "mse", "percentile", "percentile99.99", "entropy")
_EXTRA_PERCENTILES = {"percentile99.99": 99.99}
#: Factor by which a candidate must beat the default range's error to replace it.
SWITCH_GAIN = 2.0
#: Feeds the scoring pass runs (it costs about one forward pass per candidate).
SCORE_FEEDS = 16


class CandidateObserver(MSEObserver):
    """Histogram of ``x`` that proposes one range per method (see the module docstring).

    Refuses what :class:`~onnxcomp.quant.observers.MSEObserver` refuses and a ``percentile``
    outside ``(50, 100]`` (ValueError).
    """

    def __init__(
        self,
        bins: int = 2048,
        qdtype: str | QDType | Any = "uint8",
        symmetric: bool = False,
        percentile: float = 99.999,
    ) -> None:
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)
        super().__init__(bins=bins, qdtype=qdtype, symmetric=symmetric)
        info = qdtype_info(qdtype)
        self.target_bins = 2 ** (info.bits - 1) if info.signed else 2**info.bits

    def _config(self) -> tuple[Any, ...]:
        return (*super()._config(), self.percentile)

    def _percentile_range(self, p: float) -> tuple[float, float]:
        frac = p / 100.0
        lo, hi = self._hist.quantile(1.0 - frac), self._hist.quantile(frac)
        if self.symmetric:
            t = max(-lo, hi)
            lo, hi = -t, t
        return self._clip_to_data(lo, hi)

    def _entropy_range(self) -> tuple[float, float]:
        maxabs = max(-self._min, self._max)
        hist = self._hist
        if maxabs == 0.0 or hist.exp is None:
            return self._min, self._max
        last = _cell(maxabs, hist.exp)
        pos = hist.cells(0, last)
        neg = hist.cells(-last - 1, -1)[::-1]  # x in [-(k+1)w, -kw) -> |x| cell k
        thresholds, kl = entropy_threshold(pos + neg, hist.width, self.target_bins)
        if thresholds.size == 0:
            return self._min, self._max
        t = best_threshold(thresholds, kl)
        return self._clip_to_data(-t, t)

    def candidates(self) -> dict[str, tuple[float, float]]:
        """``{method: (rmin, rmax)}`` in :data:`CANDIDATE_ORDER`, ranges within ``[min, max]``."""
        self._require_data()
        out = {"minmax": (self._min, self._max), "mse": self.compute_range(),
               "percentile": self._percentile_range(self.percentile)}
        for name, p in _EXTRA_PERCENTILES.items():
            out[name] = self._percentile_range(p)
        out["entropy"] = self._entropy_range()
        return {k: (float(out[k][0]), float(out[k][1])) for k in CANDIDATE_ORDER}


#: ``auto`` holds every ``HOLD_EVERY``-th calibration feed out of the ranges its variants are scored with.
HOLD_EVERY = 4


class SplitCandidateObserver(CandidateObserver):
    """A :class:`CandidateObserver` of every feed with a second one, :attr:`fit`, that skips every
    :data:`HOLD_EVERY`-th feed: ranges from :attr:`fit` can be judged on the feeds it skipped
    (:mod:`onnxcomp.quant.select`), while the ranges kept come from every feed. One update is one feed.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fit = CandidateObserver(**kwargs)
        self.updates = 0

    def update(self, x: Any) -> None:
        super().update(x)
        if self.updates % HOLD_EVERY != HOLD_EVERY - 1:
            self.fit.update(x)
        self.updates += 1


@dataclasses.dataclass
class RangeChoice:
    """What ``per-tensor`` chose for one tensor: the method, its range, and every candidate's error."""

    method: str
    range: tuple[float, float]
    errors: dict[str, float]  # relative error sum_c E/S per distinct candidate
    consumers: int  # consumers scored (0: the tensor itself)


def observe(
    model: ir.Model,
    observers: dict[str, Observer],
    data: Dataset,
    *,
    max_feeds: int | None = None,
    threads: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> int:
    """Stream ``data`` through ``model`` and update ``observers[tensor]`` per feed; return the feeds.

    Raises:
        DataError: a tensor becomes non-finite (named with the feed's index).
    """
    feeds = 0
    for values in stream_values(model, list(observers), data, max_feeds=max_feeds, threads=threads):
        for name, obs in observers.items():
            try:
                obs.update(values[name])
            except ValueError as exc:
                raise DataError(f"calibration: tensor {name!r} on feed {feeds}: {exc}") from None
        feeds += 1
        if progress is not None:
            progress(feeds)
    return feeds


def _params(rng: tuple[float, float], qtype: str, symmetric: bool) -> tuple[float, int]:
    s, z = compute_scale_zero_point(rng[0], rng[1], qtype, symmetric)
    return float(s), int(z)


def _distinct(cands: dict[str, tuple[float, float]], qtype: str, symmetric: bool) -> dict[str, tuple[float, float]]:
    """Candidates with distinct quantization parameters (the first name of equal ones kept)."""
    seen: dict[tuple[float, int], str] = {}
    out = {}
    for name, (lo, hi) in cands.items():
        key = _params((lo, hi), qtype, symmetric)
        if key not in seen:
            seen[key] = name
            out[name] = (lo, hi)
    return out


def _scorable(node: ir.Node) -> bool:
    if len(node.outputs) != 1 or node.outputs[0].dtype != ir.DataType.FLOAT:
        return False
    return not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _scoring_model(
    model: ir.Model, cands: dict[str, dict[str, tuple[float, float]]], qtype: str, symmetric: bool
) -> tuple[ir.Model, dict[str, list[tuple[str, str | None, str]]], dict[str, str]]:
    """A clone of ``model`` whose outputs are the sums ``E`` and ``S`` (module docstring).

    Returns the model, ``{tensor: [(candidate, consumer name or None, E output), ...]}`` and
    ``{consumer name: S output}``.
    """
    from onnxcomp.io import clone_model

    work = clone_model(model)
    graph = work.graph
    taken = all_value_names(graph)
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        values.update((v.name, v) for v in node.outputs)
    storage = ir.DataType.UINT8 if qtype == "uint8" else ir.DataType.INT8
    outputs: list[ir.Value] = []
    energy: dict[str, str] = {}
    errors: dict[str, list[tuple[str, str | None, str]]] = {}

    def emit(op: str, inputs: list[ir.Value], base: str, dtype: ir.DataType, **attrs: Any) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs or None, name=unique_name(graph, f"{base}_{op}", taken))
        out = node.outputs[0]
        out.name = unique_name(graph, f"{base}_{op.lower()}", taken)
        out.dtype = dtype
        graph.append(node)
        return out

    def sum_sq(diff_of: ir.Value, ref: ir.Value | None, base: str) -> str:
        x = emit("Sub", [diff_of, ref], base, ir.DataType.FLOAT) if ref is not None else diff_of
        out = emit("ReduceSumSquare", [x], base, ir.DataType.FLOAT, keepdims=0)
        outputs.append(out)
        return out.name

    for tensor, ranges in cands.items():
        value = values[tensor]
        consumers = [u.node for u in value.uses() if _scorable(u.node)]
        consumers = list({id(n): n for n in consumers}.values())
        rows: list[tuple[str, str | None, str]] = []
        for method, (lo, hi) in ranges.items():
            scale, zp = compute_scale_zero_point(lo, hi, qtype, symmetric)
            base = f"{tensor}_auto_{method}"
            s_val = ir.Value(name=unique_name(graph, f"{base}_scale", taken), const_value=ir.tensor(np.asarray(scale, np.float32)))
            z_val = ir.Value(name=unique_name(graph, f"{base}_zp", taken), const_value=ir.tensor(np.asarray(zp)))
            z_val.dtype = storage
            s_val.dtype = ir.DataType.FLOAT
            graph.register_initializer(s_val)
            graph.register_initializer(z_val)
            q = emit("QuantizeLinear", [value, s_val, z_val], base, storage)
            dq = emit("DequantizeLinear", [q, s_val, z_val], base, ir.DataType.FLOAT)
            if not consumers:
                rows.append((method, None, sum_sq(dq, value, base)))
                continue
            for node in consumers:
                inputs = [dq if v is value else v for v in node.inputs]
                attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
                clone = ir.Node(node.domain, node.op_type, inputs, attrs, overload=node.overload, num_outputs=1,
                                version=node.version, name=unique_name(graph, f"{base}_{node.name}", taken))
                clone.outputs[0].name = unique_name(graph, f"{base}_{node.name}_out", taken)
                clone.outputs[0].dtype = ir.DataType.FLOAT
                graph.append(clone)
                ref = node.outputs[0]
                rows.append((method, node.name, sum_sq(clone.outputs[0], ref, f"{base}_{node.name}")))
                if node.name not in energy:
                    energy[node.name] = sum_sq(ref, None, f"{node.name}_auto_energy")
        if not consumers:
            energy.setdefault(f"\0{tensor}", sum_sq(value, None, f"{tensor}_auto_energy"))
        errors[tensor] = rows
    graph.outputs.extend(outputs)
    return work, errors, energy


def choose_ranges(
    model: ir.Model,
    tensors: Sequence[str],
    data: Any,
    *,
    bins: int = 2048,
    qdtype: str = "uint8",
    symmetric: bool = False,
    percentile: float = 99.999,
    methods: Sequence[str] = CANDIDATE_ORDER,
    default: str = "mse",
    switch_gain: float = SWITCH_GAIN,
    max_feeds: int | None = None,
    score_feeds: int = SCORE_FEEDS,
    threads: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[dict[str, RangeChoice], dict[str, CandidateObserver], int, float]:
    """Pick each tensor's range by the error of its consumers' outputs (module docstring).

    ``model`` must carry inferred types; ``tensors`` are graph inputs or main-graph values;
    ``methods``: the candidates to choose from (a subset of :data:`CANDIDATE_ORDER`);
    ``default``: the one kept unless another's error is ``switch_gain`` times smaller.
    Returns ``(choices, observers, feeds, seconds)``.

    Raises:
        DataError: a tensor becomes non-finite during calibration (named), or the data is empty.
    """
    start = time.perf_counter()
    names = list(dict.fromkeys(tensors))
    kwargs = {"bins": bins, "qdtype": qdtype, "symmetric": symmetric, "percentile": percentile}
    observers = {name: CandidateObserver(**kwargs) for name in names}
    if not names:
        return {}, {}, 0, 0.0
    feeds = observe(model, observers, data, max_feeds=max_feeds, threads=threads, progress=progress)
    unknown = sorted(set(methods) - set(CANDIDATE_ORDER))
    if unknown or not methods or default not in methods:
        raise ValueError(f"methods must be a non-empty subset of {CANDIDATE_ORDER} holding {default!r}, "
                         f"got {tuple(methods)}")
    cands, defaults = {}, {}
    for name, obs in observers.items():
        full = {k: v for k, v in obs.candidates().items() if k in methods}
        cands[name] = _distinct(full, qdtype, symmetric)
        key = _params(full[default], qdtype, symmetric)
        defaults[name] = next(k for k, r in cands[name].items() if _params(r, qdtype, symmetric) == key)
    choices = {
        name: RangeChoice(defaults[name], c[defaults[name]], {k: 0.0 for k in c}, 0) for name, c in cands.items()
    }
    contested = {name: c for name, c in cands.items() if len(c) > 1}
    if contested:
        scoring, rows, energy = _scoring_model(model, contested, qdtype, symmetric)
        wanted = sorted({r[2] for rs in rows.values() for r in rs} | set(energy.values()))
        sums = dict.fromkeys(wanted, 0.0)
        seen = 0
        limit = score_feeds if max_feeds is None else min(score_feeds, max_feeds)
        for values in stream_values(scoring, wanted, data, max_feeds=limit, threads=threads):
            for key in wanted:
                sums[key] += float(values[key])
            seen += 1
            if progress is not None:
                progress(feeds + seen)
        for name, c in contested.items():
            err = dict.fromkeys(c, 0.0)
            scored = set()
            for method, consumer, out in rows[name]:
                s = sums[energy[consumer if consumer is not None else f"\0{name}"]]
                err[method] += sums[out] / max(s, np.finfo(np.float64).tiny)
                if consumer is not None:
                    scored.add(consumer)
            best = defaults[name]
            better = [k for k in err if err[k] * switch_gain < err[best]]
            if better:
                best = min(better, key=lambda k: (err[k], CANDIDATE_ORDER.index(k)))
            choices[name] = RangeChoice(best, c[best], err, len(scored))
    return choices, observers, feeds, time.perf_counter() - start
