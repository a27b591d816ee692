r"""Error-compensating rounding of linear-layer weights (GPTQ / OBQ) from the layer-input Gram.

For a layer :math:`y = W x` (``W`` as ``[n, k]``: one row per output, columns in the order of the
input features) the squared output error of quantized weights :math:`\hat W` over the calibration
rows is :math:`\operatorname{tr}((W-\hat W) H (W-\hat W)^\top)` with :math:`H = X^\top X`
(:mod:`onnxcomp.analysis.gram`). Round-to-nearest minimizes each weight's own error; GPTQ rounds
the columns one at a time and moves each column's rounding error onto the columns not yet rounded,
weighted by the inverse Hessian, so the *output* error is what gets minimized:

.. math:: \delta = (w_j - \hat w_j) / U_{jj},\qquad W_{:, j+1:} \mathrel{-}= \delta\, U_{j, j+1:}

where :math:`U` is the upper Cholesky factor of :math:`(H + \lambda I)^{-1}` (:math:`\lambda` =
``damp`` x the mean diagonal of ``H``; raised tenfold, up to three times, if ``H`` is still not
positive definite). The updates are applied lazily: within a block of ``block`` columns, and once
per block to the columns after it (the same arithmetic, in matrix products). ``act_order`` rounds
the columns by decreasing :math:`H_{jj}` (the inputs with the most energy first).

The integer grid is the caller's and is kept as it is: the scales (one per row, or one per row
and group of ``group_size`` consecutive columns, ONNX's blocked layout) are fitted by the caller's
round-to-nearest quantizer to the original weights and passed in; GPTQ chooses only the integers,
within ``[qmin, qmax]`` (a compensated value beyond the grid saturates). So every format, storage
and kernel stays exactly what round-to-nearest writes, and both can be compared on the same
:math:`H`: :func:`compensated_round` returns the integers of whichever of the two has the smaller
output error on the calibration rows (GPTQ nearly always; a layer whose inputs are all zero on the
data keeps round-to-nearest).

Two options of weight-only mode move the grid itself, on the same Hessian and in the same format:
``scale_search`` (in :mod:`onnxcomp.quant.weight_only`: each block's scale shrunk before GPTQ to
the one with the smallest Hessian-diagonal-weighted rounding error) and ``scale_refit``
(:func:`refit_scales`, on by default: once GPTQ has chosen the integers, each row's block scales are
the least-squares solution of the output error for those integers). ``gptq_bias`` rounds on the input
covariance :math:`H - \mu\mu^\top` and hands the mean error :math:`(W - \hat W)\mu` to the
layer's bias (:meth:`Rounder.bias_shift`).

Rounding: half to even (numpy's ``rint``, as ONNX QuantizeLinear).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxcomp.blas import blas_threads

__all__ = ["ROUNDINGS", "RoundingResult", "gptq_round", "gptq_snap", "gptq_snap_blocks", "output_error", "compensated_round", "refit_scales"]

#: Values of QuantizeConfig.rounding.
ROUNDINGS = ("auto", "nearest", "gptq")
#: Columns per lazy update block.
BLOCK = 128


def _column_scales(scale: np.ndarray, n: int, k: int, group_size: int) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float64).reshape(n, -1)
    groups = -(-k // group_size)
    if s.shape[1] != groups:
        raise ValueError(f"gptq: scale has {s.shape[1]} groups per row, expected ceil({k}/{group_size}) = {groups}")
    return np.repeat(s, group_size, axis=1)[:, :k]


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray | None:
    """Upper Cholesky factor ``U`` of ``(H + damp*mean(diag) I)^-1`` (``U^T U``), or None."""
    k = h.shape[0]
    mean_diag = float(np.mean(np.diag(h)))
    if not np.isfinite(mean_diag) or mean_diag <= 0.0:
        return None
    lam = max(damp, 1e-8) * mean_diag
    eye = np.eye(k)
    for _ in range(4):
        try:
            low = np.linalg.cholesky(h + lam * eye)
            inv_low = np.linalg.solve(low, eye)  # L^-1
            hinv = inv_low.T @ inv_low
            u = np.linalg.cholesky(hinv).T
            if np.all(np.isfinite(u)):
                return u
        except np.linalg.LinAlgError:
            pass
        lam *= 10.0
    return None


def gptq_round(
    w: np.ndarray,
    h: np.ndarray,
    scale: np.ndarray,
    qmin: int,
    qmax: int,
    *,
    group_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = BLOCK,
) -> np.ndarray | None:
    """Integers ``q`` (int32, ``[n, k]``) for ``W ~ q * scale`` by GPTQ (module doc).

    Args:
        w: ``[n, k]`` weights, columns in the order of ``h``'s features.
        h: ``[k, k]`` input Gram (any positive multiple: only its shape matters).
        scale: ``[n]`` / ``[n, 1]`` (per row) or ``[n, ceil(k / group_size)]`` (per row and group).
        qmin, qmax: the integer grid.
        group_size: columns per scale group (None: all ``k``).
        damp: relative dampening of ``h``'s diagonal.
        act_order: round the columns by decreasing ``h`` diagonal.

    Returns None when ``h`` cannot be factored even with a raised dampening.
    """
    wd = np.asarray(w, dtype=np.float64)
    n, k = wd.shape
    s = _column_scales(scale, n, k, group_size or k)

    def snap(col: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(col / s[:, j]), qmin, qmax)

    q = gptq_snap(wd, h, lambda col, j: snap(col, j) * s[:, j], damp=damp, act_order=act_order, block=block)
    if q is None:
        return None
    return np.clip(np.rint(q / s), qmin, qmax).astype(np.int32)


def gptq_snap(
    w: np.ndarray,
    h: np.ndarray,
    snap,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = BLOCK,
) -> np.ndarray | None:
    """GPTQ with any per-column projection: ``snap(column [n], j)`` returns the representable values
    nearest to (or chosen for) the compensated column ``j`` (original column index), e.g. the
    nearest entries of a k-means codebook (GPTVQ-style assignment in one dimension), a uniform
    grid (:func:`gptq_round`), or zeros for pruned weights (SparseGPT-style). Returns the snapped
    weights ``[n, k]`` (float64), or None when ``h`` cannot be factored."""
    wd, hd = _prepared(w, h)
    perm = np.argsort(-np.diag(hd), kind="stable") if act_order else np.arange(wd.shape[1])
    out = _gptq_blocks(wd[:, perm], hd[np.ix_(perm, perm)],
                       lambda cols, j, metric: snap(cols[:, 0], perm[j])[:, None], 1, damp, block)
    if out is None:
        return None
    result = np.empty_like(out)
    result[:, perm] = out
    return result


def gptq_snap_blocks(
    w: np.ndarray,
    h: np.ndarray,
    snap,
    d: int,
    *,
    damp: float = 0.01,
    block: int = BLOCK,
) -> np.ndarray | None:
    """GPTQ over blocks of ``d`` consecutive columns chosen jointly (GPTVQ's assignment of
    ``d``-dimensional codebook entries): ``snap(columns [n, d], j, metric [d, d])`` returns the
    values chosen for the compensated columns ``j .. j + d - 1``, where ``metric`` ``T`` makes
    ``||(x - q) T||^2`` (per row) the output-error increase of choosing ``q`` for ``x``
    (``T = U_bb^-1``, ``U_bb`` the block's part of the upper Cholesky factor of the inverse Hessian:
    the increase is ``(x - q) (U_bb^T U_bb)^-1 (x - q)^T``). Each block's error is then pushed onto
    the columns not yet chosen, column by column as :func:`gptq_snap` does. ``k`` must be a
    multiple of ``d``. Returns the chosen weights ``[n, k]`` (float64), or None when ``h`` cannot
    be factored."""
    wd, hd = _prepared(w, h)
    k = wd.shape[1]
    if d < 1 or k % d:
        raise ValueError(f"gptq: {k} columns are not a multiple of the block of {d}")
    return _gptq_blocks(wd, hd, snap, d, damp, block)


def _prepared(w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 copies of ``w`` ``[n, k]`` and of ``h`` ``[k, k]`` (its shape checked), a dead
    input's zero diagonal set to 1 so that the Hessian can be factored."""
    wd = np.array(w, dtype=np.float64)
    k = wd.shape[1]
    if np.shape(h) != (k, k):
        raise ValueError(f"gptq: Hessian shape {np.shape(h)} does not match the weight's {k} columns")
    hd = np.array(h, dtype=np.float64)
    dead = np.diag(hd) <= 0.0
    hd[dead, dead] = 1.0
    return wd, hd


def _gptq_blocks(wd: np.ndarray, hd: np.ndarray, snap, d: int, damp: float, block: int) -> np.ndarray | None:
    """The GPTQ loop of :func:`gptq_snap` (``d`` = 1) and :func:`gptq_snap_blocks`, columns in order,
    on :func:`_prepared` arrays (``wd`` is updated in place)."""
    n, k = wd.shape
    u = _inverse_cholesky(hd, damp)
    if u is None:
        return None
    block = max(d, block - block % d)
    out = np.zeros((n, k), dtype=np.float64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wd[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(0, i2 - i1, d):
            metric = np.linalg.inv(u1[i:i + d, i:i + d]) if d > 1 else 1.0 / u1[i:i + 1, i:i + 1]
            chosen = snap(w1[:, i:i + d], i1 + i, metric)
            out[:, i1 + i:i1 + i + d] = chosen
            for t in range(d):
                e = (w1[:, i + t] - chosen[:, t]) / u1[i + t, i + t]
                w1[:, i + t:] -= np.outer(e, u1[i + t, i + t:])
                err1[:, i + t] = e
        wd[:, i2:] -= err1 @ u[i1:i2, i2:]
    return out


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """Relative output error ``tr(dW H dW^T) / tr(W H W^T)`` (0 when the layer's output is 0)."""
    wd = np.asarray(w, dtype=np.float64)
    dw = wd - np.asarray(w_hat, dtype=np.float64)
    num = float(np.sum((dw @ h) * dw))
    den = float(np.sum((wd @ h) * wd))
    return max(num, 0.0) / den if den > 0.0 else 0.0


def refit_scales(w: np.ndarray, q: np.ndarray, h: np.ndarray, scale: np.ndarray, group_size: int,
                 *, chunk_elements: int = 1 << 23) -> np.ndarray:
    """Block scales ``[n, groups]`` that minimize the output error ``tr(dW H dW^T)`` of ``W ~ q * s``
    for the integers ``q`` fixed (``[n, k]``, blocks of ``group_size`` along ``k``): per row a small
    least-squares problem ``A s = c`` with ``A[b, c] = q_b^T H q_c`` and ``c[b] = q_b^T H w``
    (``q_b``: the row's integers of block ``b``, zero elsewhere). A row whose solution has a
    non-positive or non-finite scale, or does not lower its error, keeps ``scale``."""
    wd = np.asarray(w, np.float64)
    n, k = wd.shape
    nb = -(-k // group_size)
    kp = nb * group_size
    old = np.asarray(scale, np.float64).reshape(n, nb)
    hp = np.zeros((kp, kp))
    hp[:k, :k] = h
    qp = np.zeros((n, kp))
    qp[:, :k] = q
    wp = np.zeros((n, kp))
    wp[:, :k] = wd
    hw = wp @ hp  # [n, kp]
    h3 = hp.reshape(kp, nb, group_size)
    out = old.copy()
    rows = max(1, chunk_elements // max(kp * nb, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        qb = qp[r0:r1].reshape(-1, nb, group_size)
        hq = np.einsum("jbi,rbi->rjb", h3, qb, optimize=True)  # H q_b, [r, kp, nb]
        a = np.einsum("rbj,rbjc->rbc", qb, hq.reshape(-1, nb, group_size, nb), optimize=True)
        c = np.einsum("rbj,rbj->rb", qb, hw[r0:r1].reshape(-1, nb, group_size))
        empty = ~np.any(qb != 0.0, axis=-1)  # a block of zeros: its scale is free, keep it
        a = a + np.eye(nb) * (1e-9 * np.maximum(np.trace(a, axis1=1, axis2=2) / nb, 1e-30))[:, None, None]
        try:
            new = np.linalg.solve(a, c[..., None])[..., 0]
        except np.linalg.LinAlgError:
            continue
        new = np.where(empty, old[r0:r1], new)
        # error(s) = s^T A s - 2 c^T s + const: keep the new scales only where they lower it
        def err(sv):
            return np.einsum("rb,rbc,rc->r", sv, a, sv) - 2.0 * np.einsum("rb,rb->r", c, sv)
        ok = np.all(np.isfinite(new), axis=1) & np.all(new > 0.0, axis=1) & (err(new) < err(old[r0:r1]))
        out[r0:r1][ok] = new[ok]
    return out


@dataclasses.dataclass
class RoundingResult:
    """The integers chosen and both methods' relative output errors on the calibration rows."""

    q: np.ndarray
    method: str  # "gptq" or "nearest"
    error_nearest: float
    error_gptq: float


def compensated_round(
    w: np.ndarray,
    h: np.ndarray,
    scale: np.ndarray,
    q_nearest: np.ndarray,
    qmin: int,
    qmax: int,
    *,
    group_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
) -> RoundingResult:
    """GPTQ's integers unless round-to-nearest (``q_nearest``, ``[n, k]``) errs less on ``h``."""
    n, k = np.shape(w)
    s = _column_scales(scale, n, k, group_size or k)
    err_n = output_error(w, np.asarray(q_nearest, np.float64) * s, h)
    q = gptq_round(w, h, scale, qmin, qmax, group_size=group_size, damp=damp, act_order=act_order)
    if q is None:
        return RoundingResult(np.asarray(q_nearest), "nearest", err_n, float("nan"))
    err_g = output_error(w, q * s, h)
    if err_g < err_n:
        return RoundingResult(q, "gptq", err_n, err_g)
    return RoundingResult(np.asarray(q_nearest), "nearest", err_n, err_g)


# ------------------------------------------------------------------------------------- integration


def resolve_rounding(config, has_data: bool) -> str:
    """``nearest`` or ``gptq`` for ``config`` (QuantizeConfig): ``auto`` is GPTQ for 4-bit weight-only
    quantization with calibration data, round-to-nearest elsewhere. ``gptq`` without data is refused."""
    from onnxcomp.errors import ConfigError

    if config.rounding == "gptq":
        if not has_data:
            raise ConfigError("quantize: rounding 'gptq' needs calibration data (--calibration FILE)")
        return "gptq"
    if config.rounding == "auto" and has_data and config.mode == "weight-only" and config.bits == 4:
        return "gptq"
    return "nearest"


def weight_hessians(model, nodes, data, *, max_rows: int | None = None, threads: int | None = None,
                    progress=None, means: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per weight initializer name, the ``[groups, k, k]`` mean input Gram of the nodes reading it
    (summed over the nodes when a weight feeds several), from one pass over ``data``; ``means``
    (when given) receives each weight's ``[groups, k]`` input mean (of the first node reading it)."""
    from onnxcomp.analysis.gram import DEFAULT_MAX_ROWS, collect_grams

    grams = collect_grams(model, list(nodes), data, max_rows=max_rows or DEFAULT_MAX_ROWS, threads=threads,
                          progress=progress)
    by_node = {n.name: n for n in nodes}
    out: dict[str, np.ndarray] = {}
    seen: dict[str, set[int]] = {}
    for name, gram in grams.items():
        weight = by_node[name].inputs[1].name
        if id(gram) in seen.setdefault(weight, set()):
            continue
        seen[weight].add(id(gram))
        if weight in out and out[weight].shape != gram.gram.shape:
            continue  # the same tensor read in two layouts: keep the first
        if means is not None and weight not in means and gram.input_mean() is not None:
            means[weight] = gram.input_mean()
        out[weight] = out[weight] + gram.mean() if weight in out else gram.mean()
    return out


class StagedHessians:
    """Sequential GPTQ's Hessians: the weights split into ``stages`` groups in graph order; a
    group's Hessians are collected (one pass over ``data``) when its first weight is rounded, on a
    shadow copy of the model in which every weight rounded so far holds its dequantized values.

    ``get``/``in`` as a dict of Hessians; :meth:`record` takes a rounded weight back.
    """

    def __init__(self, model, nodes, data, stages: int, *, progress=None):
        from onnxcomp.io import clone_model

        self.shadow = clone_model(model)
        by_name = {n.name: n for n in self.shadow.graph}
        self.nodes = [by_name[n.name] for n in nodes if n.name in by_name]
        weights = list(dict.fromkeys(n.inputs[1].name for n in self.nodes))
        per = -(-len(weights) // max(1, min(stages, len(weights) or 1)))
        self.stage_of = {w: i // per for i, w in enumerate(weights)}
        self.data = data
        self.progress = progress
        self.known: dict[str, np.ndarray] = {}
        self.means: dict[str, np.ndarray] = {}
        self.done_stages: set[int] = set()
        self.passes = 0

    def __contains__(self, name: str) -> bool:
        return name in self.stage_of

    def get(self, name: str):
        stage = self.stage_of.get(name)
        if stage is None:
            return None
        if stage not in self.done_stages:
            self.done_stages.add(stage)
            nodes = [n for n in self.nodes if self.stage_of.get(n.inputs[1].name) == stage]
            self.known.update(weight_hessians(self.shadow, nodes, self.data, progress=self.progress, means=self.means))
            self.passes += 1
        return self.known.get(name)

    def record(self, name: str, w_hat_nk: np.ndarray) -> None:
        """Write the dequantized ``[n, k]`` weight (Hessian feature order) into the shadow model."""
        import onnx_ir as ir

        value = self.shadow.graph.initializers.get(name)
        if value is None or value.const_value is None:
            return
        shape = tuple(int(d) for d in value.const_value.shape)
        user = next((u.node for u in value.uses()), None)
        if user is None:
            return
        from onnxcomp.ops import linear_spec, weight_axes

        if linear_spec(user) is None or linear_spec(user).role("weight") is None:
            return
        if weight_axes(user)[0] % len(shape) == 0:  # outputs first: Conv [n, k...], Gemm with transB
            w = w_hat_nk.reshape(shape)
        else:
            w = w_hat_nk.T
        if w.shape != shape:
            return
        value.const_value = ir.tensor(np.ascontiguousarray(w, dtype=np.float32), name=name)


class Rounder:
    """Chooses the integers of each weight on its caller's grid: GPTQ where a Hessian is known
    (keeping round-to-nearest where that errs less), round-to-nearest elsewhere; keeps a report.

    ``hessians``: a dict, or a :class:`StagedHessians` (sequential GPTQ)."""

    def __init__(self, hessians=None, *, damp: float = 0.01, act_order: bool = False,
                 means: dict[str, np.ndarray] | None = None, centered: bool = False):
        self.hessians = hessians if hessians is not None else {}
        self.damp = damp
        self.act_order = act_order
        #: input means per weight (``[groups, k]``); with ``centered`` the rounding works on the
        #: input covariance ``H - mu mu^T`` and :meth:`bias_shift` gives the mean error to the bias
        self.means = means if means is not None else getattr(self.hessians, "means", {})
        self.centered = centered
        self.layers: dict[str, dict[str, object]] = {}
        self.hessian_seconds = 0.0

    def hessian(self, name: str) -> np.ndarray | None:
        """The ``[groups, k, k]`` matrix the rounding minimizes on: the mean input Gram, or with
        ``centered`` the input covariance (the mean's error is the bias's, :meth:`bias_shift`)."""
        h = self.hessians.get(name) if name in self.hessians else None
        mu = self.means.get(name)
        if h is None or not self.centered or mu is None or mu.shape != h.shape[:2]:
            return h
        return h - np.einsum("gi,gj->gij", mu, mu)

    def bias_shift(self, name: str, w_nk: np.ndarray, w_hat_nk: np.ndarray) -> np.ndarray | None:
        """``[n]``: ``(W - W_hat) mu``, the mean output error a bias absorbs (None: not ``centered``
        or no mean known)."""
        h = self.hessians.get(name) if name in self.hessians else None
        mu = self.means.get(name)
        n, k = np.shape(w_nk)
        if not self.centered or h is None or mu is None or mu.shape[-1] != k or n % mu.shape[0]:
            return None
        dw = (np.asarray(w_nk, np.float64) - np.asarray(w_hat_nk, np.float64)).reshape(mu.shape[0], -1, k)
        return np.einsum("grk,gk->gr", dw, mu).reshape(n)

    def importance(self, name: str, n: int, k: int) -> np.ndarray | None:
        """``[n, k]``: the Hessian diagonal (each input feature's energy) of the weight's rows (a
        grouped layer's rows by group), or None when no Hessian of that shape is known."""
        h = self.hessian(name)
        if h is None or h.shape[-1] != k or n % h.shape[0]:
            return None
        diag = np.diagonal(h, axis1=-2, axis2=-1).reshape(h.shape[0], 1, k)
        return np.broadcast_to(diag, (h.shape[0], n // h.shape[0], k)).reshape(n, k)

    def round(self, name: str, w_nk: np.ndarray, scale: np.ndarray, q_nk: np.ndarray, qmin: int, qmax: int,
              group_size: int | None = None) -> np.ndarray:
        """Integers for ``w_nk`` (``[n, k]``, ``k`` in the Hessian's feature order) with ``scale``
        ``[n, groups]`` (or ``[n]``); ``q_nk`` are round-to-nearest's. Grouped layers (a grouped Conv's
        Hessian ``[g, k, k]``) split the rows into ``g`` consecutive parts."""
        h = self.hessian(name)
        n, k = np.shape(w_nk)
        if h is None or h.shape[-1] != k or n % h.shape[0]:
            return q_nk
        g = h.shape[0]
        rows = n // g
        s = np.asarray(scale, np.float64).reshape(n, -1)
        out = np.array(q_nk, copy=True)
        err_n = err_g = 0.0
        chosen = []
        for i in range(g):
            part = slice(i * rows, (i + 1) * rows)
            with blas_threads(1):  # one small update per column: BLAS threads only wait (onnxcomp.blas)
                res = compensated_round(w_nk[part], h[i], s[part], q_nk[part], qmin, qmax, group_size=group_size,
                                        damp=self.damp, act_order=self.act_order)
            out[part] = res.q.astype(out.dtype)
            err_n += res.error_nearest
            err_g += res.error_gptq if res.method == "gptq" else res.error_nearest
            chosen.append(res.method)
        self.layers[name] = {
            "method": "gptq" if "gptq" in chosen else "nearest",
            "output_error_nearest": err_n / g,
            "output_error": err_g / g,
        }
        if isinstance(self.hessians, StagedHessians):
            cols = _column_scales(s, n, k, group_size or k) if s.shape[1] > 1 else s
            self.hessians.record(name, out.astype(np.float64) * cols)
        return out

    def refit(self, name: str, w_nk: np.ndarray, q_nk: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
        """:func:`refit_scales` of a weight rounded by :meth:`round` (same layout; a grouped layer
        by its groups of rows); ``scale`` unchanged (float32 ``[n, groups]``) where no Hessian is known."""
        h = self.hessian(name)
        n, k = np.shape(w_nk)
        s = np.asarray(scale, np.float32).reshape(n, -1)
        if h is None or h.shape[-1] != k or n % h.shape[0]:
            return s
        rows = n // h.shape[0]
        out = np.empty_like(s)
        for i in range(h.shape[0]):
            part = slice(i * rows, (i + 1) * rows)
            with blas_threads(1):
                out[part] = refit_scales(w_nk[part], q_nk[part], h[i], s[part], group_size)
        if name in self.layers:
            cols = _column_scales(out, n, k, group_size)
            err = np.mean([output_error(w_nk[i * rows:(i + 1) * rows], q_nk[i * rows:(i + 1) * rows] * cols[i * rows:(i + 1) * rows], h[i])
                           for i in range(h.shape[0])])
            self.layers[name]["output_error_before_refit"] = self.layers[name]["output_error"]
            self.layers[name]["output_error"] = float(err)
        if isinstance(self.hessians, StagedHessians):
            self.hessians.record(name, np.asarray(q_nk, np.float64) * _column_scales(out, n, k, group_size))
        return out.astype(np.float32)

    def round_along(self, name: str, w: np.ndarray, q: np.ndarray, scale: np.ndarray, axis: int, qmin: int,
                    qmax: int) -> np.ndarray:
        """:meth:`round` for a weight whose output channels lie along ``axis`` (the other axes
        flattened in order are the input features: a Conv's ``[M, C/g, *kernel]`` with axis 0, a
        ``[K, N]`` MatMul weight with axis 1); ``scale`` is per tensor or per channel."""
        if name not in self.hessians:
            return q
        n = w.shape[axis]
        w_nk = np.moveaxis(w, axis, 0).reshape(n, -1)
        q_nk = np.moveaxis(q, axis, 0).reshape(n, -1)
        s = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1, 1), (n, 1))
        out = self.round(name, w_nk, s, q_nk, qmin, qmax)
        moved = np.moveaxis(q, axis, 0).shape
        return np.moveaxis(out.reshape(moved), 0, axis).astype(q.dtype)

    def report(self) -> dict[str, object]:
        if not self.layers:
            return {"method": "nearest"}
        def db(e: float) -> float:
            return float(10.0 * np.log10(1.0 / e)) if e > 0 else float("inf")
        near = [float(v["output_error_nearest"]) for v in self.layers.values()]
        got = [float(v["output_error"]) for v in self.layers.values()]
        return {
            "method": "gptq",
            "damp": self.damp,
            "act_order": self.act_order,
            "weights": len(self.layers),
            "weights_kept_nearest": sum(1 for v in self.layers.values() if v["method"] == "nearest"),
            "layer_sqnr_db_nearest_median": float(np.median([db(e) for e in near])),
            "layer_sqnr_db_median": float(np.median([db(e) for e in got])),
            "layers": self.layers,
        }


def make_rounder(work, nodes, calibration, config, *, progress=None) -> Rounder | None:
    """The :class:`Rounder` for ``config.rounding`` (None: round-to-nearest), with the Hessians of
    ``nodes``' weights from ``calibration`` (a data source or Dataset for ``work``)."""
    import time

    from onnxcomp.data import load_data

    if resolve_rounding(config, calibration is not None) != "gptq":
        return None
    nodes = list(nodes)
    started = time.perf_counter()
    hessians = {}
    means: dict[str, np.ndarray] = {}
    if nodes:
        data = load_data(calibration, work, limit=config.max_samples)
        if config.gptq_stages > 1:
            hessians = StagedHessians(work, nodes, data, config.gptq_stages, progress=progress)
            means = hessians.means
        else:
            hessians = weight_hessians(work, nodes, data, progress=progress, means=means)
    rounder = Rounder(hessians, damp=config.gptq_damp, act_order=config.gptq_act_order, means=means,
                      centered=bool(getattr(config, "gptq_bias", False)))
    rounder.hessian_seconds = time.perf_counter() - started
    return rounder


def rounding_report(rounder: Rounder | None, started: float | None = None) -> dict[str, object]:
    """The report's ``rounding`` section (with the time spent when ``started`` is given)."""
    import time

    if rounder is None:
        return {"method": "nearest"}
    out = rounder.report()
    out["method"] = "gptq"
    out["hessian_seconds"] = rounder.hessian_seconds
    if isinstance(rounder.hessians, StagedHessians):
        out["stages"] = rounder.hessians.passes
    if started is not None:
        out["seconds"] = time.perf_counter() - started
    return out
