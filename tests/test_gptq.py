"""Layer-input Gram matrices (onnxcomp.analysis.gram) and error-compensating rounding (GPTQ).

Small seeded models built in code; every Gram is checked against onnxruntime's own layer outputs
(output energy = tr(W H W^T)), and GPTQ against round-to-nearest on the output SQNR.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.analysis.gram import collect_grams
from onnxcomp.testing import run_model


def _model(nodes, inputs, outputs, inits, opset=17):
    return io.load_model(make_proto(nodes, inputs, outputs, list(inits.items()), opset=opset))


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def _conv_dense_model(rng):
    """x[2,4,9,9] -> grouped Conv (no bias) -> c ; t[2,5,8] -> MatMul and Gemm(transB) sharing t."""
    inits = {
        "wc": rng.standard_normal((6, 2, 3, 3)).astype(np.float32),
        "wm": rng.standard_normal((8, 3)).astype(np.float32),
        "wg": rng.standard_normal((7, 8)).astype(np.float32),
    }
    nodes = [
        oh.make_node("Conv", ["x", "wc"], ["c"], group=2, strides=[2, 1], pads=[1, 0, 1, 2], dilations=[1, 2],
                     name="conv"),
        oh.make_node("MatMul", ["t", "wm"], ["m"], name="mm"),
        oh.make_node("Reshape", ["t", "shape"], ["t2"], name="flat"),
        oh.make_node("Gemm", ["t2", "wg"], ["g"], transB=1, name="gemm"),
    ]
    inits["shape"] = np.array([-1, 8], dtype=np.int64)
    model = _model(nodes, [("x", [2, 4, 9, 9]), ("t", [2, 5, 8])],
                   [("c", [2, 6, 5, 7]), ("m", [2, 5, 3]), ("g", [10, 7])], inits)
    return model, inits


def _feeds(rng, n):
    return [{"x": rng.standard_normal((2, 4, 9, 9)).astype(np.float32),
             "t": rng.standard_normal((2, 5, 8)).astype(np.float32)} for _ in range(n)]


def test_gram_output_energy_matches_onnxruntime(rng):
    model, inits = _conv_dense_model(rng)
    feeds = _feeds(rng, 3)
    nodes = [_node(model, n) for n in ("conv", "mm", "gemm")]
    grams = collect_grams(model, nodes, feeds, max_rows=10**6)
    outs = run_model(model, feeds, optimization="disable")
    c = np.concatenate([o[0] for o in outs]).astype(np.float64)  # [N, 6, H, W]
    m = np.concatenate([o[1] for o in outs]).astype(np.float64)
    # Conv: group g's rows of the flattened weight against its matrix.
    hc = grams["conv"]
    assert hc.gram.shape == (2, 18, 18) and hc.rows == c.shape[0] * c.shape[2] * c.shape[3]
    w = inits["wc"].astype(np.float64).reshape(2, 3, 18)
    energy = sum(np.trace(w[g] @ hc.gram[g] @ w[g].T) for g in range(2))
    np.testing.assert_allclose(energy, np.sum(c * c), rtol=1e-5)
    for g in range(2):  # per group: the output channels of that group
        np.testing.assert_allclose(np.trace(w[g] @ hc.gram[g] @ w[g].T), np.sum(c[:, 3 * g : 3 * g + 3] ** 2),
                                   rtol=1e-5)
    # MatMul and Gemm(transB=1) read the same tensor... through a Reshape: different names, own matrices.
    hm = grams["mm"]
    wm = inits["wm"].astype(np.float64)
    np.testing.assert_allclose(np.trace(wm.T @ hm.gram[0] @ wm), np.sum(m * m), rtol=1e-5)
    assert hm.rows == 3 * 2 * 5
    np.testing.assert_allclose(grams["gemm"].gram, hm.gram, rtol=1e-12)


def test_gram_shared_input_computed_once_and_rows_bounded(rng):
    wq = rng.standard_normal((8, 4)).astype(np.float32)
    wk = rng.standard_normal((8, 4)).astype(np.float32)
    model = _model(
        [oh.make_node("MatMul", ["t", "wq"], ["q"], name="q"), oh.make_node("MatMul", ["t", "wk"], ["k"], name="k")],
        [("t", [2, 50, 8])], [("q", [2, 50, 4]), ("k", [2, 50, 4])], {"wq": wq, "wk": wk},
    )
    feeds = [{"t": rng.standard_normal((2, 50, 8)).astype(np.float32)} for _ in range(4)]
    grams = collect_grams(model, [_node(model, "q"), _node(model, "k")], feeds, max_rows=120)
    assert grams["q"] is grams["k"]
    assert grams["q"].rows == 120
    again = collect_grams(model, [_node(model, "q")], feeds, max_rows=120)
    np.testing.assert_array_equal(again["q"].gram, grams["q"].gram)  # deterministic sampling
    full = collect_grams(model, [_node(model, "q")], feeds, max_rows=10**6)["q"]
    # the sampled mean approximates the full mean
    rel = np.linalg.norm(grams["q"].mean() - full.mean()) / np.linalg.norm(full.mean())
    assert rel < 0.35


def test_gram_refuses_bad_max_rows(rng):
    model, _ = _conv_dense_model(rng)
    with pytest.raises(ValueError, match="max_rows"):
        collect_grams(model, [_node(model, "mm")], _feeds(rng, 1), max_rows=0)
