"""Encoders judged the way their embeddings are used: mean pooling and nearest neighbours.

A sentence encoder's ``last_hidden_state`` ``[batch, seq, hidden]`` is not used as is: the
embedding is its mean over the real tokens (``attention_mask``), and what matters is which other
sentence is most similar. The cosine of the flattened tensor also counts padded positions, whose
values nothing reads. For such outputs :func:`embedding_fidelity` reports, against the original:

* ``pooled_cosine`` (mean over sentences) and ``pooled_cosine_min`` of the mean-pooled embeddings;
* ``nn_agreement``: the fraction of sentences whose most cosine-similar other sentence is the same
  (needs at least 3 sentences; None otherwise).

An output is an encoder output (:func:`encoder_outputs`) when it is a float tensor of rank 3 and
the model has an integer rank-2 input named like an attention mask (``attention_mask``,
``input_mask``, ``mask``). The check pools these outputs but for a projection onto a few classes, a
token classifier's raw tag scores (:func:`onnxcomp.check.pooled_outputs`).
"""

from __future__ import annotations

import os

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import MASK_INPUT_NAMES  # the attention-mask input names (generated feeds too)

__all__ = ["MASK_INPUT_NAMES", "encoder_outputs", "mean_pool", "nn_agreement", "PooledEmbedding", "embedding_fidelity"]


def _mask_input(model: ir.Model) -> str | None:
    for value in model.graph.inputs:
        name = (value.name or "").lower()
        dtype = value.dtype
        rank2 = value.shape is not None and len(value.shape) == 2
        if name in MASK_INPUT_NAMES and rank2 and dtype is not None and not dtype.is_floating_point():
            return value.name
    return None


def encoder_outputs(model: ir.Model) -> tuple[str | None, list[str]]:
    """The attention-mask input and the rank-3 float outputs pooled with it (None, [] if not an encoder)."""
    mask = _mask_input(model)
    if mask is None:
        return None, []
    outs = [v.name for v in model.graph.outputs
            if v.shape is not None and len(v.shape) == 3 and v.dtype is not None and v.dtype.is_floating_point()]
    return (mask, outs) if outs else (None, [])


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden [N, L, D]`` over the positions where ``mask [N, L]`` is nonzero."""
    m = (np.asarray(mask) != 0).astype(np.float64)[:, :, None]
    return (np.asarray(hidden, np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nn_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Fraction of rows whose most cosine-similar other row is the same in both (None below 3 rows)."""
    if len(reference) < 3:
        return None

    def nearest(e: np.ndarray) -> np.ndarray:
        e = _normalize(e)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return float(np.mean(nearest(reference) == nearest(candidate)))


class PooledEmbedding:
    """The pooled-embedding figures of one encoder output, accumulated feed by feed."""

    def __init__(self, mask_input: str) -> None:
        self.mask_input = mask_input
        self.refs: list[np.ndarray] = []
        self.cands: list[np.ndarray] = []

    def update(self, ref: np.ndarray, cand: np.ndarray, feed: Mapping[str, np.ndarray]) -> None:
        mask = feed[self.mask_input]
        self.refs.append(mean_pool(ref, mask))
        self.cands.append(mean_pool(cand, mask))

    def result(self) -> dict[str, Any] | None:
        """``pooled_cosine`` (mean over sentences), ``pooled_cosine_min``, ``nn_agreement``,
        ``sentences`` and ``mask_input`` (None before any feed)."""
        if not self.refs:
            return None
        r, c = np.concatenate(self.refs), np.concatenate(self.cands)
        cos = np.sum(_normalize(r) * _normalize(c), axis=-1)
        return {"pooled_cosine": float(cos.mean()), "pooled_cosine_min": float(cos.min()),
                "nn_agreement": nn_agreement(r, c), "sentences": int(len(r)), "mask_input": self.mask_input}


def embedding_fidelity(
    reference: ir.Model,
    candidate: ir.Model | str | os.PathLike,
    feeds: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, dict[str, Any]]:
    """Per encoder output of ``reference``: pooled cosine (mean, min) and NN agreement on ``feeds``.

    Empty when the model is not an encoder (:func:`encoder_outputs`). The check computes the same
    figures in its own pass over both models (:class:`PooledEmbedding` in
    :class:`onnxcomp.check.OutputFigures`).
    """
    from onnxcomp.runtime import create_session, open_session, session_options

    mask_name, names = encoder_outputs(reference)
    if not names:
        return {}
    ref_sess = create_session(reference, sess_options=session_options("all"))
    cand_sess = open_session(candidate, sess_options=session_options("all"), what="the written model")
    pooled = {n: PooledEmbedding(mask_name) for n in names}
    for feed in feeds:
        feed = dict(feed)
        for n, r, c in zip(names, ref_sess.run(names, feed), cand_sess.run(names, feed)):
            pooled[n].update(r, c, feed)
    return {n: result for n, p in pooled.items() if (result := p.result()) is not None}
