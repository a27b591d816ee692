"""Encoder SmoothQuant folded into the normalizations, and SmoothQuant in static mode on the transformer path.

The seeded tiny encoders of tests/test_transformer.py, in BERT's post-LN form and in the pre-LN
form (``x + f(LN(x))``). In the pre-LN form onnxruntime's optimizer feeds each normalized output
only to the projections (the residual is the sum before it), so the smoothing
division goes into gamma and beta; in the post-LN form every normalized output is also the next
residual and a ``Mul`` stays. Either way the smoothed float model matches the original to 1e-5
with onnxruntime's optimizations off and on.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_transformer import LAYERS, bert_like, cosines, feeds, pooled

from onnxcomp import io
from onnxcomp.graph import working_copy
from onnxcomp.quant import transformer as T
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.runtime import create_session, session_options


@pytest.fixture(scope="module")
def encoders():
    return {pre: io.load_model(bert_like(pre_ln=pre)) for pre in (False, True)}


def _smoothed(model):
    work = working_copy(model, 13, allow_upgrade=True, notes=[])
    T.prepare_encoder(work, "on")
    before = io.clone_model(work)
    return before, work, T.smooth_encoder(work, feeds(4, seed=9), alpha=0.75)


@pytest.mark.parametrize("optimization", ["disable", "all"])
@pytest.mark.parametrize("pre_ln", [True, False], ids=["pre_ln", "post_ln"])
def test_smoothing_folds_where_it_can_and_is_exact(encoders, pre_ln, optimization):
    before, work, report = _smoothed(encoders[pre_ln])
    assert report["folded_into_attention"] == LAYERS  # out-projection inputs: Attention's V columns
    if pre_ln:
        # Attention and FFN1 inputs: the LayerNorms (the residual ones stay LayerNormalization after
        # their Add: SkipLayerNormalization is left out); a GELU's output is never smoothed, so nothing
        # needs a Mul
        assert report["folded_into_norm"] == {"LayerNormalization": 2 * LAYERS}
        assert report["mul_nodes"] == []
    else:
        assert report["folded_into_norm"] == {}  # each normalized output is also the next residual
        assert report["mul_inserted"] == 2 * LAYERS
    assert sum(1 for n in work.graph if n.op_type == "Mul") == report["mul_inserted"]
    ref = create_session(before, sess_options=session_options(optimization))
    got = create_session(work, sess_options=session_options(optimization))
    for f in feeds(3, seed=11):
        np.testing.assert_allclose(got.run(None, f)[0], ref.run(None, f)[0], atol=1e-5)


def test_folding_writes_new_constants(encoders):
    """gamma/beta are replaced by new initializers: the original constants (which another node may read) keep their values."""
    work = working_copy(encoders[True], 13, allow_upgrade=True, notes=[])
    T.prepare_encoder(work, "on")
    norm = next(n for n in work.graph if n.op_type == "LayerNormalization" and n.inputs[0].producer() is not None
                and "/res" in n.inputs[0].producer().name)  # after a residual Add (not the embeddings' sum)
    gamma, beta = norm.inputs[1], norm.inputs[2]
    values = gamma.const_value.numpy().copy(), beta.const_value.numpy().copy()
    T.smooth_encoder(work, feeds(4, seed=9), alpha=0.75)
    assert norm.inputs[1] is not gamma and norm.inputs[2] is not beta
    np.testing.assert_array_equal(gamma.const_value.numpy(), values[0])
    np.testing.assert_array_equal(beta.const_value.numpy(), values[1])


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("pre_ln", [True, False], ids=["pre_ln", "post_ln"])
def test_int8_smoothquant_keeps_fused_kernels_and_accuracy(encoders, pre_ln, mode):
    model = encoders[pre_ln]
    calib = feeds(8, seed=3)
    q, report = quantize(model, calib, QuantizeConfig(mode=mode, smoothquant=True, embedding_bits=0, ffn_output="int8"))
    smoothing = report["transformer"]["smoothing"]
    assert smoothing["smoothed"] == 3 * LAYERS  # Attention, out-projection and FFN1 inputs; not a GELU's output
    ops = T.fused_ops(q)
    assert ops.get("QAttention") == LAYERS
    matmul = "MatMulIntegerToFloat" if mode == "static" else "DynamicQuantizeMatMul"
    assert ops.get(matmul) == 3 * LAYERS  # out-projection, FFN1, FFN2
    assert "QLinearMul" not in ops and "MatMul" not in ops  # the smoothing Muls stay float and unquantized
    assert ops.get("Mul", 0) == smoothing["mul_inserted"]
    data = feeds(6, seed=5)
    cos = cosines(pooled(model, data), pooled(q, data))
    assert cos.min() > 0.99, cos.min()


def test_default_smooths_encoders_given_calibration(encoders):
    model = encoders[False]
    calib = feeds(8, seed=3)
    _, default = quantize(model, calib, QuantizeConfig(mode="static", embedding_bits=0))
    assert default["transformer"]["smoothquant_default"] is True
    # every int8 MatMul's input but the FFN2s' (a GELU's output is never smoothed)
    assert default["transformer"]["smoothing"]["smoothed"] == 3 * LAYERS
    _, off = quantize(model, calib, QuantizeConfig(mode="static", smoothquant=False, embedding_bits=0))
    assert "smoothing" not in off["transformer"]
    _, no_data = quantize(model, None, QuantizeConfig(mode="dynamic", embedding_bits=0))  # dynamic needs no data
    assert "smoothing" not in no_data["transformer"]
    _, off_path = quantize(model, calib, QuantizeConfig(mode="static", transformer="off", embedding_bits=0))
    assert "transformer" not in off_path and "smoothquant" not in off_path.get("recovery", {})
