r"""Unstructured sparsity: zero individual weights, layer by layer (Deep Compression's pruning).

Every eligible weight (the tensors weight clustering takes: Conv/ConvTranspose/Gemm/MatMul
weights and Gather tables, at least ``min_elements`` values, not excluded) loses a fraction
``ratio`` of its entries (``conv_ratio`` for convolutions), the smallest by saliency, set to
exactly 0.0. Zeros already present count towards the ratio. The graph is unchanged: the file
only shrinks once the zeros are stored compactly (``[cluster] format = "sparse"``,
:mod:`onnxcomp.sparsity.storage`), which is why a recipe chains the two.

Saliency (``criterion``):

* ``magnitude``: :math:`|w|`, the paper's threshold pruning (per layer; ``std_quality = q``
  instead prunes every :math:`|w| < q\,\sigma_{\text{layer}}`, the paper's rule, and ignores the
  ratios).
* ``activation``: :math:`|w_{ij}|\,\lVert X_j \rVert` with :math:`X_j` the layer's input feature
  :math:`j` on calibration data (the diagonal of the layer Hessian :math:`X^\top X`): a small
  weight on a large input is kept. Needs data.

``refit = true`` (needs data) then fixes the surviving weights of each output by least squares
on calibration data, :math:`\min_{w_S} \lVert X_S w_S + b - y \rVert^2` with :math:`y` the
**unpruned** model's output of the same node and :math:`X` the layer input in the partly pruned
model (earlier layers already pruned and refitted, so errors do not pile up). The statistics
:math:`X^\top X` and :math:`X^\top y` are streamed as in the structured pruning refit
(:mod:`onnxcomp.prune.reconstruct`: Conv via im2col patches, Gemm, MatMul with its bias Add); a
refit that is not better than plain zeroing on those rows is dropped. Tensors outside those
layouts (Gather tables, ConvTranspose) and layers of more than ``max_features`` inputs are pruned
by magnitude.

``share_bits = b`` (needs ``refit``) also does the weight sharing inside that loop, layer by
layer: right after its fix, a layer's weights are clustered to :math:`2^b` shared values (an exact
zero among them; 1-D k-means weighted by each input's energy :math:`\lVert X_j \rVert^2`, the
codebook rounded to int8 times one float scale), each weight's entry chosen by GPTQ-style
compensation on the layer's own :math:`X^\top X` with the bias as a last, free column that
absorbs the mean error (or nearest entries and a re-solved bias, whichever errs less on the
rows). The next layers are then fitted on the outputs of the clustered ones, so they compensate
what sharing left. ``[cluster]`` later stores those tensors as they are (at most :math:`2^b`
values each).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.blas import blas_threads
from onnxcomp.bounds import Range
from onnxcomp.cluster.passes import find_cluster_targets
from onnxcomp.data import Dataset, load_data
from onnxcomp.errors import ConfigError
from onnxcomp.graph import all_value_names, name_nodes
from onnxcomp.io import clone_model
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.selection import NodeSelector
from onnxcomp.stage import Context, Stage

__all__ = ["SparsityConfig", "SparsityPass", "SparsityStage", "sparsify", "magnitude_mask"]

CONV_OPS = ("Conv", "ConvTranspose")


@dataclasses.dataclass(frozen=True)
class SparsityConfig(PassConfig):
    """How to zero weights (module docstring).

    Attributes:
        ratio: fraction of each layer's weights set to zero.
        conv_ratio: the fraction for Conv/ConvTranspose weights (default: ``ratio``); the paper
            prunes convolutions less than fully connected layers.
        std_quality: when set, zero ``|w| < std_quality * std(w)`` per layer instead of ratios.
        criterion: ``magnitude`` or ``activation`` (needs data).
        refit: least-squares fix of the surviving weights on calibration data.
        min_elements / exclude: as for clustering (tensor or node names, op types, ``re:``).
        max_samples: calibration feeds used by ``activation`` / ``refit``.
        max_rows: rows (output positions) per layer for the statistics.
        ridge: relative ridge of the refit.
        max_features: layers whose output depends on more inputs than this (``c_in/g * kernel``
            for a Conv) skip the data-aware path and are pruned by magnitude: their statistics
            cost ``rows * features^2`` and the fix ``features^3`` per output.
        min_inputs_kept: a layer whose outputs each read ``F`` inputs (``c_in/g * kernel`` for a
            Conv) is pruned at most ``1 - min_inputs_kept / F``, so every output keeps about that
            many inputs: a depthwise or first conv (9 inputs) is not starved by a ratio meant
            for layers of hundreds, at a few bytes (its weights are few).
        share_bits: cluster each refitted layer to ``2**share_bits`` values in the same loop
            (module docstring); needs ``refit``.
        share_bits_max / share_tolerance: for an output layer (one whose output reaches a graph
            output without passing another fixed layer: no later fit can compensate its error),
            the narrowest width from ``share_bits`` to ``share_bits_max`` whose output error on
            the calibration rows is at most ``1 + share_tolerance`` times the fixed layer's
            (unshared) error; the widest when none is. Earlier layers keep ``share_bits``: the
            layers fitted after them absorb what sharing costs them. ``[cluster]`` stores
            mixed widths as groups of one bit stream (its ``bits`` must be ``share_bits_max``).
    """

    ratio: float = 0.8
    conv_ratio: float | None = None
    std_quality: float | None = None
    criterion: Literal["magnitude", "activation"] = "magnitude"
    refit: bool = False
    min_elements: int = 256
    exclude: tuple[str, ...] = ()
    max_samples: int = 64
    max_rows: int = 20_000
    ridge: float = 1e-3
    max_features: int = 2048
    share_bits: int | None = None
    share_bits_max: int | None = None
    share_tolerance: float = 1.0
    min_inputs_kept: int = 0

    stage: ClassVar[str] = "sparsity"
    ranges: ClassVar[dict[str, Range]] = {
        "ratio": Range(float, 0.0, 1.0, max_open=True),
        "conv_ratio": Range(float, 0.0, 1.0, max_open=True),
        "std_quality": Range(float, 0.0),
        "min_elements": Range(int, 1),
        "max_samples": Range(int, 1),
        "max_rows": Range(int, 1),
        "ridge": Range(float, 0.0),
        "max_features": Range(int, 1),
        "share_bits": Range(int, 1, 8),
        "share_bits_max": Range(int, 1, 8),
        "share_tolerance": Range(float, 0.0),
        "min_inputs_kept": Range(int, 0),
    }

    def validate(self) -> None:
        NodeSelector((), self.exclude)
        if self.share_bits is not None and not self.refit:
            raise ConfigError("sparsity: share_bits needs refit = true")
        if self.share_bits_max is not None and (self.share_bits is None or self.share_bits_max < self.share_bits):
            raise ConfigError("sparsity: share_bits_max needs share_bits and must not be below it")

    @property
    def needs_data(self) -> bool:
        return self.criterion == "activation" or self.refit

    def ratio_for(self, op_type: str, fan_in: int | None = None) -> float:
        """The fraction to zero in a layer of ``op_type`` whose outputs read ``fan_in`` inputs each."""
        ratio = self.conv_ratio if self.conv_ratio is not None and op_type in CONV_OPS else self.ratio
        if fan_in and self.min_inputs_kept:
            ratio = min(ratio, max(0.0, 1.0 - self.min_inputs_kept / fan_in))
        return ratio


def magnitude_mask(saliency: np.ndarray, ratio: float) -> np.ndarray:
    """Keep-mask zeroing exactly ``round(ratio * size)`` entries of smallest ``saliency``.

    Ties are broken by position (stable sort), so the result is deterministic.
    """
    flat = np.abs(np.asarray(saliency, np.float64)).reshape(-1)
    drop = int(round(ratio * flat.size))
    keep = np.ones(flat.size, bool)
    if drop:
        keep[np.argsort(flat, kind="stable")[:drop]] = False
    return keep.reshape(np.shape(saliency))


def _threshold_mask(w: np.ndarray, config: SparsityConfig, op_type: str, fan_in: int | None = None) -> np.ndarray:
    if config.std_quality is not None:
        return np.abs(w) >= config.std_quality * float(np.std(w.astype(np.float64)))
    return magnitude_mask(w, config.ratio_for(op_type, fan_in))


def _tensor_record(w: np.ndarray, pruned: np.ndarray, how: str) -> dict[str, Any]:
    energy = float(np.sum(w.astype(np.float64) ** 2))
    err = float(np.sum((pruned.astype(np.float64) - w) ** 2))
    return {"shape": list(w.shape), "elements": int(w.size), "zeros_before": int(np.count_nonzero(w == 0)),
            "zeros": int(np.count_nonzero(pruned == 0)), "sparsity": float(np.mean(pruned == 0)),
            "relative_error": err / energy if energy > 0 else 0.0, "how": how}


class SparsityPass(CompressionPass[SparsityConfig]):
    """Data-free unstructured sparsity (``magnitude``, no refit) on every eligible weight."""

    config_class = SparsityConfig

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        if self.config.needs_data:
            raise ConfigError("sparsity: criterion 'activation' and refit need calibration data; "
                              "use onnxcomp.sparsity.passes.sparsify with data")
        return _magnitude(model, self.config, set())


def _first_consumer_op(value: ir.Value) -> str:
    return next((u.node.op_type for u in value.uses()), "")


def _magnitude(model: ir.Model, config: SparsityConfig, done: set[str]) -> tuple[bool, dict[str, Any]]:
    """Magnitude-prune the eligible tensors not in ``done`` (names); the pass's statistics."""
    targets, skipped = find_cluster_targets(model, config)
    tensors: dict[str, dict[str, Any]] = {}
    for target in targets:
        if target.name in done:
            continue
        w = target.value.const_value.numpy()
        fan_in = w.size // max(w.shape[target.channel_axis], 1)
        pruned = np.where(_threshold_mask(w, config, _first_consumer_op(target.value), fan_in), w,
                          np.float32(0)).astype(np.float32)
        tensors[target.name] = _tensor_record(w, pruned, "magnitude")
        target.value.const_value = ir.tensor(pruned, name=target.name)
    return bool(tensors), _summary(config, tensors, skipped)


def _summary(config: SparsityConfig, tensors: dict[str, dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    elements = sum(t["elements"] for t in tensors.values())
    zeros = sum(t["zeros"] for t in tensors.values())
    return {"config": config.to_dict(), "tensors": tensors, "skipped": skipped,
            "totals": {"tensors": len(tensors), "elements": elements, "zeros": zeros,
                       "sparsity": zeros / elements if elements else 0.0}}


#: Bytes of the padded systems solved in one batch by the refit.
SOLVE_CHUNK_BYTES = 1 << 27


def _masked_solve(acc: Any, keep: np.ndarray, ridge: float, fit_bias: bool) -> np.ndarray:
    """Least squares per output column over its kept weights (and the bias); zeros elsewhere.

    ``keep``: ``[g, k, m_g]``; returns parameters ``[g, k+1, m_g]``. The columns' systems are
    padded to one size with identity rows and solved in batches.
    """
    g, k1, mg = acc.cross.shape
    k = k1 - 1
    params = np.zeros((g, k1, mg))
    for i in range(g):
        gram = acc.gram[i]
        reg = gram.copy()
        reg[np.arange(k), np.arange(k)] += ridge * float(np.trace(gram[:k, :k])) / max(k, 1)
        rows = [np.append(np.flatnonzero(keep[i, :, j]), [k] if fit_bias else []).astype(np.int64) for j in range(mg)]
        size = max((r.size for r in rows), default=0)
        if size == 0:
            continue
        chunk = max(1, SOLVE_CHUNK_BYTES // (8 * size * size))
        for start in range(0, mg, chunk):
            cols = range(start, min(start + chunk, mg))
            a = np.tile(np.eye(size), (len(cols), 1, 1))
            c = np.zeros((len(cols), size, 1))
            for t, j in enumerate(cols):
                r = rows[j]
                a[t, : r.size, : r.size] = reg[np.ix_(r, r)]
                c[t, : r.size, 0] = acc.cross[i, r, j]
            try:
                sol = np.linalg.solve(a, c)
            except np.linalg.LinAlgError:
                sol = np.stack([np.linalg.lstsq(a[t], c[t], rcond=None)[0] for t in range(len(cols))])
            for t, j in enumerate(cols):
                params[i, rows[j], j] = sol[t, : rows[j].size, 0]
    return params


def _error(acc: Any, params: np.ndarray) -> float:
    """Relative squared output error of ``params`` on the accumulated rows (as the refit's)."""
    quad = float(np.sum(params * (acc.gram @ params)))
    lin = float(np.sum(params * acc.cross))
    err = max(quad - 2.0 * lin + acc.yy, 0.0)
    if acc.yy <= 0.0:
        return 0.0 if err <= 0.0 else math.inf
    return err / acc.yy


def _output_layers(model: ir.Model, fitted: set[str]) -> set[str]:
    """The names of the ``fitted`` nodes from which a graph output is reachable without passing
    another fitted node (their errors reach the output uncompensated)."""
    outputs = {id(v) for v in model.graph.outputs}
    found = set()
    for node in model.graph:
        if node.name not in fitted:
            continue
        stack, seen = list(node.outputs), set()
        while stack:
            value = stack.pop()
            if id(value) in outputs:
                found.add(node.name)
                break
            for use in value.uses():
                user = use.node
                if id(user) not in seen and user.name not in fitted:
                    seen.add(id(user))
                    stack.extend(user.outputs)
    return found


def _shared_weights(acc: Any, params: np.ndarray, keep: np.ndarray, bits: int,
                    fit_bias: bool) -> tuple[np.ndarray, str]:
    """``params`` ``[g, k+1, m_g]`` with the weights clustered to ``2**bits`` values (``share_bits``):
    the compensated assignment or the nearest one with a re-solved bias, whichever errs less."""
    from onnxcomp.cluster.kmeans import kmeans_1d
    from onnxcomp.quant.gptq import gptq_snap
    from onnxcomp.sparsity.storage import int8_symmetric

    g, k1, mg = params.shape
    k = k1 - 1
    weights = params[:, :k, :]
    energy = np.broadcast_to(np.maximum(np.diagonal(acc.gram[:, :k, :k], axis1=1, axis2=2), 0.0)[:, :, None],
                             weights.shape)
    energy = energy + 1e-12 * max(float(energy.max(initial=0.0)), 1.0)
    centroids = kmeans_1d(weights.astype(np.float32), 2**bits, preserve_zero=True, weights=energy).centroids
    q, scale = int8_symmetric(np.asarray(centroids, np.float32))
    table = np.unique((q.astype(np.float32) * scale).astype(np.float32)).astype(np.float64)
    if not np.any(table == 0):
        table = np.unique(np.append(table, 0.0))

    def nearest(values: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(table, values), 1, max(table.size - 1, 1))
        lower, upper = table[pos - 1], table[np.minimum(pos, table.size - 1)]
        return np.where(np.abs(values - lower) <= np.abs(upper - values), lower, upper)

    near = params.copy()
    near[:, :k, :] = np.where(keep, nearest(weights), 0.0)
    if fit_bias:  # the bias that fits the snapped weights best: b = (c_k - G_k,:k W) / G_kk
        diag = acc.gram[:, k, k][:, None]
        solved = (acc.cross[:, k, :] - np.einsum("gi,gim->gm", acc.gram[:, k, :k], near[:, :k, :])) / np.where(
            diag > 0, diag, 1.0)
        near[:, k, :] = np.where(diag > 0, solved, near[:, k, :])
    best, how = near, "nearest"
    compensated = params.copy()
    ok = True
    with blas_threads(1):
        for i in range(g):
            pruned = ~keep[i].T  # [m_g, k]

            def snap(col: np.ndarray, j: int, pruned=pruned) -> np.ndarray:
                if j == k:
                    return col if fit_bias else params[i, k, :]
                return np.where(pruned[:, j], 0.0, nearest(col))

            got = gptq_snap(params[i].T, acc.gram[i], snap)
            if got is None:
                ok = False
                break
            compensated[i] = got.T
    if ok and _error(acc, compensated) < _error(acc, near):
        best, how = compensated, "compensated"
    return best, how


def sparsify(
    model: ir.Model,
    config: SparsityConfig,
    data: Dataset | None = None,
    *,
    progress: Callable[[int, int | None], object] | None = None,
) -> dict[str, Any]:
    """Sparsify ``model`` in place (module docstring); returns the statistics.

    Without ``config.needs_data`` this is :class:`SparsityPass`. With it, the linear layers the
    refit supports are processed in topological order against a clone of the input.
    """
    if not config.needs_data:
        return SparsityPass(config)(model).stats
    if data is None:
        raise ConfigError(f"sparsity: criterion {config.criterion!r}{' with refit' if config.refit else ''} "
                          "needs calibration data (--calibration)")
    from onnxcomp.prune import reconstruct as rc

    data = load_data(data, model, limit=config.max_samples)
    name_nodes(model)
    targets, _ = find_cluster_targets(model, config)
    target_names = {t.name for t in targets}
    reference = clone_model(model)
    ref_nodes = rc._nodes_by_name(reference)
    nodes = rc._nodes_by_name(model)
    plans: dict[str, Any] = {}
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 and node.inputs[1] is not None \
                and node.inputs[1].name in target_names and node.name:
            try:
                plan = rc._plan(node.name, nodes, ref_nodes)
            except (rc._Skip, ValueError):
                continue
            if plan.old_params().shape[1] - 1 <= config.max_features:
                plans[node.name] = plan
    ref_session = rc._session(reference, list(dict.fromkeys(p.y_name for p in plans.values())), None) \
        if plans else None
    feeds = rc._count_feeds(data) if plans else 0
    graph = model.graph
    taken = all_value_names(graph)
    output_layers = _output_layers(model, set(plans))
    tensors: dict[str, dict[str, Any]] = {}
    layers: list[dict[str, Any]] = []
    done: set[str] = set()
    for index, (name, plan) in enumerate(plans.items(), 1):
        weight_name = plan.node.inputs[1].name
        w = plan.node.inputs[1].const_value.numpy()
        acc = rc._fit_layer(plan, np.arange(plan.out_channels), model, ref_session, data, feeds, config.max_rows,
                            None)
        old = plan.old_params()
        k = old.shape[1] - 1
        weights = old[:, :k, :]
        if config.criterion == "activation":
            norms = np.sqrt(np.maximum(np.diagonal(acc.gram[:, :k, :k], axis1=1, axis2=2), 0.0))
            saliency = np.abs(weights) * norms[:, :, None]
        else:
            saliency = np.abs(weights)
        if config.std_quality is not None:
            keep = np.abs(weights) >= config.std_quality * float(np.std(weights))
        else:
            keep = magnitude_mask(saliency, config.ratio_for(plan.node.op_type, k))
        zeroed = old.copy()
        zeroed[:, :k, :] = np.where(keep, weights, 0.0)
        error = _error(acc, zeroed)
        record = {"node": name, "op_type": plan.node.op_type, "rows": acc.rows,
                  "error_dense": _error(acc, old), "error_zeroed": error, "refit": False}
        params = zeroed
        if config.refit:
            with blas_threads(1):  # thousands of small solves: threads only wait (onnxcomp.blas)
                fitted = _masked_solve(acc, keep, config.ridge, plan.fit_bias)
            if not plan.fit_bias:
                fitted[:, k, :] = old[:, k, :]
            fitted_error = _error(acc, fitted)
            record["error_refit"] = fitted_error
            if np.all(np.isfinite(fitted)) and fitted_error < error:
                params, record["refit"] = fitted, True
        params[:, :k, :] = np.where(keep, params[:, :k, :], 0.0)  # exact zeros
        if config.share_bits is not None:
            limit = (1.0 + config.share_tolerance) * _error(acc, params)
            widest = max(config.share_bits_max or 0, config.share_bits) if name in output_layers else config.share_bits
            for bits in range(config.share_bits, widest + 1):
                shared, how = _shared_weights(acc, params, keep, bits, plan.fit_bias)
                record.update(share=how, share_bits=bits, error_shared=_error(acc, shared))
                if record["error_shared"] <= limit:
                    break
            params = shared
        plan.write(params, graph, taken)
        new_weight = plan.node.inputs[1]
        pruned = new_weight.const_value.numpy()
        tensors[new_weight.name] = _tensor_record(w, pruned, f"{config.criterion}{' + refit' if record['refit'] else ''}")
        done.update({weight_name, new_weight.name})
        layers.append(record)
        if progress is not None:
            progress(index, len(plans) + 1)
    _, rest = _magnitude(model, config, done)
    tensors.update(rest["tensors"])
    stats = _summary(config, tensors, rest["skipped"])
    stats["layers"] = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                       for r in layers]
    if progress is not None:
        progress(len(plans) + 1, len(plans) + 1)
    return stats


class SparsityStage(Stage):
    """Unstructured sparsity of the working copy (``[sparsity]`` in a recipe)."""

    name = "sparsity"
    config_class = SparsityConfig

    @classmethod
    def needs_data(cls, config: SparsityConfig) -> bool:
        return config.needs_data

    def run(self, work: ir.Model, ctx: Context) -> dict[str, Any]:
        return sparsify(work, self.config, ctx.fit_data, progress=ctx.progress_for(self.name))
