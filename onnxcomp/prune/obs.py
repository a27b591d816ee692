r"""Data-aware channel choice: greedy structured OBS on the consumers' input Gram :math:`X^\top X`.

Removing input channel set :math:`S` of a linear consumer :math:`y = W^\top \tilde x` (weights in
``[k+1, m]`` layout with the bias as the last row, :math:`\tilde x = [x, 1]`) and refitting the
remaining rows by least squares on calibration inputs :math:`\tilde X` costs

.. math:: \Delta E(S) = \operatorname{tr}\big(W_S^\top (H^{-1}_{SS})^{-1} W_S\big),\qquad
          H = \tilde X^\top \tilde X + \lambda\,\mathrm{diag}(\tilde X^\top \tilde X)

(the Optimal Brain Surgeon error of a block; the damping is per feature and spares the bias, so a
dead input channel costs nothing).
One channel of a coupled group is a block of features in every consumer (``prod(kernel)`` taps of
a Conv input channel, ``block`` features after a Flatten). The channels are removed **greedily**:
at each step the channel whose removal the refit compensates best, summed over the group's
consumers as relative output errors :math:`\Delta E / \lVert Y \rVert^2`, goes first; then each
consumer's weights and inverse Gram are updated exactly,

.. math:: W \leftarrow W - H^{-1}_{:,B} (H^{-1}_{BB})^{-1} W_B,\qquad
          H^{-1} \leftarrow H^{-1} - H^{-1}_{:,B} (H^{-1}_{BB})^{-1} H^{-1}_{B,:},

so the sum of the chosen costs after ``n`` steps is the relative refit error of the consumers with
those ``n`` channels gone (their inputs taken as unchanged). That sum is the group's **damage curve**
(:attr:`ObsState.damage`), the sensitivity the ratio allocation (:mod:`onnxcomp.prune.budget`)
spends. The channel's score is its position in the removal order (removed first = least important).

The Gram matrices are accumulated streaming over the calibration feeds with at most ``max_rows``
rows (output positions) per consumer, the same row sampling and im2col as the least-squares refit
(:mod:`onnxcomp.prune.reconstruct`): float32 products per chunk, summed in float64. Consumers whose layout the refit does not support
(grouped convolutions, ConvTranspose, ...) do not contribute; a group without any supported
consumer is scored by ``l2`` weight magnitude and has no damage curve.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxcomp.analysis.channels import ChannelGroup, Consumer
from onnxcomp.data import Dataset
from onnxcomp.graph import stream_values
from onnxcomp.prune import reconstruct as rc

__all__ = ["ObsState", "consumer_grams", "greedy_order", "obs_prepare", "OBS_MAX_ROWS"]

#: Rows (output positions) per consumer used for the Gram matrices.
OBS_MAX_ROWS = 8_192
#: Relative ridge of the inverse Gram (as the refit's ``ridge``; the bias is not damped).
OBS_RIDGE = 1e-3
#: The greedy order covers at most this fraction of a group's channels (the rest keep their
#: weight-magnitude order above them).
MAX_FRACTION = 0.9


@dataclasses.dataclass
class ObsState:
    """Result of the greedy removal for one group.

    ``order``: channels in removal order (first = least important; ``n_greedy`` of them chosen
    greedily, the rest by ``l2`` magnitude). ``damage[n]``: summed relative refit error of the
    consumers with the first ``n`` channels of ``order`` removed (``damage[0] == 0``), for
    ``n <= n_greedy``. ``consumers``: the consumers that contributed.
    """

    order: np.ndarray
    damage: np.ndarray
    n_greedy: int
    consumers: list[str]
    #: consumer name -> (layer, Gram) and -> ``[size, K]`` feature indices of each channel
    grams: dict = dataclasses.field(default_factory=dict, repr=False)
    features: dict = dataclasses.field(default_factory=dict, repr=False)

    def refit_weights(self, consumer: str, removed: np.ndarray, ridge: float = OBS_RIDGE) -> np.ndarray:
        """Least-squares weights ``[k_kept+1, m]`` of ``consumer`` with the ``removed`` channels gone."""
        layer, gram = self.grams[consumer]
        drop = self.features[consumer][removed].reshape(-1)
        keep = np.setdiff1d(np.arange(gram.shape[0]), drop)
        w = layer.old_params()[0]
        h = gram[np.ix_(keep, keep)].copy()
        k = len(keep) - 1
        diag = np.diag(h)[:k]
        h[np.arange(k), np.arange(k)] += ridge * diag + max(1e-9 * float(diag.mean()) if k else 0.0, 1e-30)
        return np.linalg.lstsq(h, gram[keep] @ w, rcond=None)[0]


def _supported(model: ir.Model, consumer: Consumer) -> rc._Layer | None:
    nodes = {n.name: n for n in model.graph if n.name}
    try:
        layer = rc._plan(consumer.node.name, nodes, nodes)
    except (rc._Skip, ValueError):
        return None
    if layer.groups != 1:
        return None
    return layer


def consumer_grams(
    model: ir.Model,
    groups: Iterable[ChannelGroup],
    data: Dataset,
    *,
    max_rows: int = OBS_MAX_ROWS,
) -> dict[str, tuple[rc._Layer, np.ndarray]]:
    """Consumer node name -> (its layer, Gram ``[k+1, k+1]`` of its features with a ones column).

    One streamed pass over ``data`` for all consumers together.
    """
    layers: dict[str, rc._Layer] = {}
    for g in groups:
        for c in g.consumers:
            if c.node.name and c.node.name not in layers:
                layer = _supported(model, c)
                if layer is not None:
                    layers[c.node.name] = layer
    if not layers:
        return {}
    feeds = rc._count_feeds(data)
    grams: dict[str, np.ndarray] = {}
    remaining = {name: max_rows for name in layers}
    names = sorted({layer.x_name for layer in layers.values()})
    for f, values in enumerate(stream_values(model, names, data)):
        for name, layer in layers.items():
            x = values[layer.x_name]
            positions = layer.positions(x)
            quota = rc._row_quota(positions, remaining[name], feeds - f)
            if quota <= 0:
                continue
            remaining[name] -= quota
            rows = rc._choose_rows(positions, quota, f)
            chunk = max(1, rc.CHUNK_ELEMENTS // max(1, layer.row_size(x)))
            for start in range(0, len(rows), chunk):
                feats = layer.features(x, rows[start : start + chunk])[:, 0, :].astype(np.float32)
                aug = np.concatenate([feats, np.ones((len(feats), 1), np.float32)], axis=1)
                # float32 products per chunk (at most CHUNK_ELEMENTS values), summed in float64
                grams[name] = grams.get(name, 0.0) + (aug.T @ aug).astype(np.float64)
    return {name: (layers[name], grams[name]) for name in layers if name in grams}


def _feature_indices(layer: rc._Layer, consumer: Consumer, size: int) -> np.ndarray:
    """``[size, K]`` feature indices of each group channel in the consumer's im2col layout."""
    per = consumer.indices(range(size)).reshape(size, -1)  # weight input-axis indices
    taps = math.prod(layer.geometry.kernel) if isinstance(layer, rc._ConvLayer) else 1
    return (per[:, :, None] * taps + np.arange(taps)).reshape(size, -1)


class _ConsumerState:
    def __init__(self, layer: rc._Layer, gram: np.ndarray, feats: np.ndarray, ridge: float) -> None:
        k = gram.shape[0] - 1
        self.w = layer.old_params()[0].copy()  # [k+1, m]
        h = gram.copy()
        diag = np.diag(gram)[:k]
        # damping per feature (a dead input channel keeps a zero cost), plus a floor for invertibility
        h[np.arange(k), np.arange(k)] += ridge * diag + max(1e-9 * float(diag.mean()), 1e-30)
        self.energy = max(float(np.einsum("im,ij,jm->", self.w, gram, self.w)), 1e-30)
        try:
            self.hinv = np.linalg.inv(h)
        except np.linalg.LinAlgError:
            self.hinv = np.linalg.pinv(h)
        self.feats = feats  # [C, K]

    def costs(self, alive: np.ndarray) -> np.ndarray:
        """Relative error of removing each alive channel now (with the refit of the rest)."""
        f = self.feats[alive]  # [A, K]
        blocks = self.hinv[f[:, :, None], f[:, None, :]]  # [A, K, K]
        wb = self.w[f]  # [A, K, m]
        try:
            sol = np.linalg.solve(blocks, wb)
        except np.linalg.LinAlgError:
            sol = np.linalg.pinv(blocks) @ wb
        return np.einsum("akm,akm->a", wb, sol) / self.energy

    def remove(self, channel: int) -> None:
        b = self.feats[channel]
        block = self.hinv[np.ix_(b, b)]
        try:
            inv_block = np.linalg.inv(block)
        except np.linalg.LinAlgError:
            inv_block = np.linalg.pinv(block)
        col = self.hinv[:, b]  # [k+1, K]
        self.w -= col @ (inv_block @ self.w[b])
        self.hinv -= col @ inv_block @ col.T
        self.w[b] = 0.0
        self.hinv[b, :] = 0.0
        self.hinv[:, b] = 0.0
        self.hinv[b, b] = 1.0  # keep removed blocks invertible (never chosen again)


def greedy_order(
    group: ChannelGroup,
    grams: dict[str, tuple[rc._Layer, np.ndarray]],
    *,
    ridge: float = OBS_RIDGE,
    max_fraction: float = MAX_FRACTION,
) -> ObsState | None:
    """Greedy OBS removal order and damage curve of ``group`` (None: no supported consumer)."""
    # A consumer may read the group's channels at several offsets of its input (YOLOv8's C2f:
    # Concat[a, b, b + m(b)] into one Conv, b's and the bottleneck's channels coupled by the residual
    # Add): each of its channels then owns the features of every occurrence, as the cut removes them
    # all (counting one made the refit keep 40 of 48 inputs where the cut kept 32).
    features: dict[str, np.ndarray] = {}
    for c in group.consumers:
        found = grams.get(c.node.name)
        if found is None:
            continue
        indices = _feature_indices(found[0], c, group.size)
        known = features.get(c.node.name)
        features[c.node.name] = indices if known is None else np.concatenate([known, indices], axis=1)
    names = list(features)
    states = [_ConsumerState(grams[name][0], grams[name][1], features[name], ridge) for name in names]
    if not states:
        return None
    size = group.size
    steps = min(size - 1, int(math.floor(max_fraction * size)))
    alive = np.ones(size, dtype=bool)
    order: list[int] = []
    damage = [0.0]
    for _ in range(steps):
        idx = np.flatnonzero(alive)
        cost = sum(s.costs(idx) for s in states)
        best = int(idx[int(np.argmin(cost))])
        for s in states:
            s.remove(best)
        alive[best] = False
        order.append(best)
        damage.append(damage[-1] + max(float(np.min(cost)), 0.0))
    rest = np.flatnonzero(alive)
    norm = np.zeros(size)
    for m in (*group.producers, *group.consumers):
        norm += (np.abs(np.moveaxis(m.value.const_value.numpy(), m.axis, 0)[m.offset : m.offset + size * m.block]
                        .reshape(size, -1).astype(np.float64)) ** 2).sum(axis=1)
    rest = rest[np.argsort(norm[rest], kind="stable")]
    return ObsState(np.array([*order, *rest.tolist()], dtype=np.int64), np.asarray(damage), steps, names,
                    {n: grams[n] for n in names}, features)


def obs_prepare(
    model: ir.Model, groups: list[ChannelGroup], data: Dataset | None
) -> dict[int, ObsState | None]:
    """Greedy OBS state of every group (one pass over ``data`` for the Gram matrices)."""
    if data is None:
        raise ValueError("the obs criterion needs calibration data")
    grams = consumer_grams(model, groups, data)
    return {g.id: greedy_order(g, grams) for g in groups}


def obs_score(group: ChannelGroup, states: dict[int, ObsState | None], fallback=None) -> np.ndarray:
    """Score = position in the removal order (higher = removed later = more important).

    A group without a Gram (no consumer could be read) is scored by ``fallback(group)`` (the
    registry passes the L2 weight norm)."""
    state = states.get(group.id)
    if state is None:
        if fallback is None:
            raise ValueError(f"group {group.id}: no removal order and no fallback score")
        return fallback(group)
    scores = np.empty(group.size)
    scores[state.order] = np.arange(group.size, dtype=np.float64)
    return scores
