"""Weights at 4 bits and below (issue 19): Conv blocks along the inputs, 8-bit nodes in a 4-bit
model, sequential GPTQ, MatMulNBits at 8 bits, codebook assignment with error compensation, and
the OpenBLAS thread bound. Small seeded models built in code, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.blas import blas_threads
from onnxcomp.cluster.passes import ClusterConfig, ClusterPass, cluster_hessians
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.weight_only import pack_matmulnbits, plan_weight_sites
from onnxcomp.testing import run_model


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - got) ** 2), 1e-30)))


def _cnn(rng):
    """x[N,3,12,12] -> Conv 3x3 (16) -> Relu -> depthwise 3x3 -> Relu -> Conv 3x3 (64 <- 16, one
    input channel's weights 10x the others: one scale per output channel wastes the grid on it)
    -> Relu -> GlobalAveragePool -> Flatten -> MatMul [64, 40] -> y. Correlated inputs make
    error compensation matter."""
    mix = rng.standard_normal((64, 64)).astype(np.float32) / 8
    inits = {
        "w0": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) / 4,
        "b0": rng.standard_normal(16).astype(np.float32) / 10,
        "w1": rng.standard_normal((16, 1, 3, 3)).astype(np.float32) / 3,
        "w2": rng.standard_normal((64, 16, 3, 3)).astype(np.float32) / 12,
        "wm": (rng.standard_normal((64, 40)).astype(np.float32) + mix[:, :40]) / 8,
    }
    inits["w2"][:, 0] *= 10.0
    nodes = [
        oh.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        oh.make_node("Relu", ["c0"], ["r0"], name="r0"),
        oh.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1], group=16, name="dw"),
        oh.make_node("Relu", ["c1"], ["r1"], name="r1"),
        oh.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="pw"),
        oh.make_node("Relu", ["c2"], ["r2"], name="r2"),
        oh.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        oh.make_node("Flatten", ["g"], ["f"], name="flat"),
        oh.make_node("MatMul", ["f", "wm"], ["y"], name="fc"),
    ]
    return io.load_model(make_proto(nodes, [("x", ["N", 3, 12, 12])], [("y", ["N", 40])], list(inits.items())))


def _feeds(rng, n, batch=4):
    base = rng.standard_normal((n * batch, 3, 12, 12)).astype(np.float32)
    base[:, 1] = 0.8 * base[:, 0] + 0.2 * base[:, 1]  # correlated channels
    return [{"x": base[i * batch:(i + 1) * batch]} for i in range(n)]


def _outputs(model, feeds, level="all"):
    return np.concatenate([o[0] for o in run_model(model, feeds, optimization=level)])


@pytest.fixture
def cnn(rng):
    return _cnn(rng)


def _wo(**kw):
    return QuantizeConfig(mode="weight-only", op_types=("Conv", "MatMul", "Gemm"), block_size=16, **kw)


def test_conv_blocks_along_inputs_beat_one_scale_per_channel(cnn, rng):
    feeds = _feeds(rng, 4)
    ref = _outputs(cnn, feeds)
    per_channel, _ = quantize(cnn, None, _wo(rounding="nearest"), verify=False)
    blocked, report = quantize(cnn, None, _wo(rounding="nearest", conv_block_size=16), verify=False)
    assert report["conv_block_size"] == 16
    # the stem (K = 27) and the 3x3 conv (K = 144) are blocked; the depthwise (K = 9) keeps one
    # block, the MatMul is blocked along its axis 0 (K) as always
    dq = [n for n in blocked.graph if n.op_type == "DequantizeLinear"]
    blocked_axes = sorted(int(n.attributes["axis"].value) for n in dq)
    assert blocked_axes.count(1) == 2 and blocked_axes.count(0) == 2
    for level in ("disable", "all"):
        got = _outputs(blocked, feeds, level)
        assert _sqnr(ref, got) > _sqnr(ref, _outputs(per_channel, feeds, level)) + 1.0
        assert _sqnr(ref, got) > 17.0


def test_blocked_conv_decodes_to_the_numpy_reference(cnn, rng):
    """The DequantizeLinear(axis=1, block_size) -> Reshape path computes exactly q * scale."""
    from onnxcomp.quant.weight_only import quantize_blockwise

    model, _ = quantize(cnn, None, _wo(rounding="nearest", conv_block_size=16), verify=False)
    w0 = cnn.graph.initializers["w0"].const_value.numpy()
    bq = quantize_blockwise(w0.reshape(16, -1), 1, 4, 16)
    expected = io.clone_model(cnn)
    expected.graph.initializers["w0"].const_value = ir.tensor(bq.dequantize().reshape(w0.shape), name="w0")
    # only the stem differs between `expected` and the float model; compare the stem output alone
    feeds = _feeds(rng, 2)
    for m in (model, expected):
        m.graph.outputs.append(next(n for n in m.graph if n.op_type == "Relu").outputs[0])
    got = run_model(model, feeds, optimization="disable")
    exp = run_model(expected, feeds, optimization="disable")
    for g, e in zip(got, exp):
        np.testing.assert_allclose(g[1], e[1], atol=1e-5, rtol=1e-5)


def test_eight_bit_keywords_and_share(cnn, rng):
    plan = plan_weight_sites(cnn, _wo(eight_bit=(":first", ":depthwise")), mode="weight-only")
    bits = {s.weight.name: s.bits for s in plan.sites}
    assert bits == {"w0": 8, "w1": 8, "w2": None, "wm": None}
    plan = plan_weight_sites(cnn, _wo(eight_bit=(":last", "re:^p")), mode="weight-only")
    assert {s.weight.name for s in plan.sites if s.bits == 8} == {"wm", "w2"}
    plan = plan_weight_sites(cnn, _wo(eight_bit=("w1", "Gemm")), mode="weight-only")  # a weight name
    assert {s.weight.name for s in plan.sites if s.bits == 8} == {"w1"}
    feeds = _feeds(rng, 4)
    ref = _outputs(cnn, feeds)
    four, _ = quantize(cnn, None, _wo(rounding="nearest"), verify=False)
    mixed, report = quantize(cnn, None, _wo(rounding="nearest", eight_bit=(":first", ":depthwise")), verify=False)
    assert report["eight_bit"]["weights"] == ["w0", "w1"]
    assert report["eight_bit"]["share_of_elements"] == pytest.approx((432 + 144) / (432 + 144 + 9216 + 2560))
    int8 = [v for v in mixed.graph.initializers.values() if v.const_value.dtype.name == "INT8"]
    assert len(int8) == 2
    mixed_pw, _ = quantize(cnn, None, _wo(rounding="nearest", eight_bit=("pw",)), verify=False)
    assert _sqnr(ref, _outputs(mixed_pw, feeds)) > _sqnr(ref, _outputs(four, feeds)) + 3.0
    assert _sqnr(ref, _outputs(mixed, feeds)) > _sqnr(ref, _outputs(four, feeds)) - 0.5


def test_matmulnbits_eight_bit_matches_numpy(rng):
    k, n, block = 64, 24, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    model = io.load_model(make_proto([oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                                     [("x", ["N", k])], [("y", ["N", n])], [("w", w)]))
    q, report = quantize(model, None, QuantizeConfig(mode="weight-only", weight_only_format="ort", block_size=block,
                                                     eight_bit=("mm",), rounding="nearest"), verify=False)
    node = next(nd for nd in q.graph if nd.op_type == "MatMulNBits")
    assert node.attributes["bits"].value == 8
    x = rng.standard_normal((5, k)).astype(np.float32)
    from onnxcomp.quant.weight_only import quantize_blockwise

    bq = quantize_blockwise(w.T, 1, 8, block)
    expected = x @ bq.dequantize().T
    for level in ("disable", "all"):
        (got,) = run_model(q, [{"x": x}], optimization=level)[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)
    assert _sqnr(x @ w, expected) > 35.0
    with pytest.raises(ValueError):
        pack_matmulnbits(np.full((2, 32), 200), np.ones((2, 1), np.float32), 32, 8)


def test_sequential_gptq_is_at_least_as_good_and_uses_stages(cnn, rng):
    calib = _feeds(rng, 6)
    feeds = _feeds(rng, 4)
    ref = _outputs(cnn, feeds)
    near, _ = quantize(cnn, None, _wo(rounding="nearest", conv_block_size=16), verify=False)
    one, _ = quantize(cnn, calib, _wo(rounding="gptq", conv_block_size=16), verify=False)
    seq, report = quantize(cnn, calib, _wo(rounding="gptq", conv_block_size=16, gptq_stages=4), verify=False)
    assert report["rounding"]["stages"] == 4
    s_near, s_one, s_seq = (_sqnr(ref, _outputs(m, feeds)) for m in (near, one, seq))
    assert s_one > s_near + 1.0
    assert s_seq > s_near + 1.0
    assert s_seq > s_one - 1.0  # never much worse than one-shot Hessians; usually better


def test_codebook_assignment_with_compensation(cnn, rng):
    from onnxcomp.graph import working_copy

    calib = _feeds(rng, 6)
    feeds = _feeds(rng, 4)
    w2 = rng.standard_normal((64, 16, 3, 3)).astype(np.float32) / 12
    w2[:, :4] = 0.0  # pruned weights must stay exactly zero
    cnn.graph.initializers["w2"].const_value = ir.tensor(w2, name="w2")
    ref = _outputs(cnn, feeds)
    results = {}
    for comp in (False, True):
        work = working_copy(cnn, 18, allow_upgrade=True, notes=[])
        cfg = ClusterConfig(bits=3, format="sparse", min_elements=64, compensate=comp)
        hessians = cluster_hessians(work, cfg, calib) if comp else None
        ClusterPass(cfg, hessians=hessians)(work)
        results[comp] = work
        for level in ("disable", "all"):
            got = _outputs(work, feeds, level)
            results[(comp, level)] = _sqnr(ref, got)
        # the decoded w2 keeps its zeros: read it as a graph output
        decoded = next(n for n in work.graph if n.op_type == "Conv" and n.inputs[0].name == "r1").inputs[1]
        work.graph.outputs.append(decoded)
        sess = ort.InferenceSession(_serialize(work), providers=["CPUExecutionProvider"])
        w2_hat = sess.run([decoded.name], feeds[0])[0]
        assert np.all(w2_hat[:, :4] == 0.0) and np.count_nonzero(w2_hat[:, 4:]) > 0.5 * w2_hat[:, 4:].size
    assert results[(True, "all")] > results[(False, "all")] + 2.0
    assert results[(True, "disable")] == pytest.approx(results[(True, "all")], abs=1e-3)
    assert results[(True, "all")] > 12.0


def _serialize(model):
    return ir.serde.serialize_model(model).SerializeToString()


def test_blas_threads_restores_the_setting():
    from onnxcomp.blas import _set_threads_local

    fn = _set_threads_local()
    with blas_threads(1) as bounded:
        a = np.linalg.solve(np.eye(8) * 2.0, np.ones(8))
    np.testing.assert_allclose(a, 0.5)
    if fn is None:
        assert bounded is False
        return
    assert bounded is True
    before = fn(3)
    fn(before)  # read the setting by setting it
    with blas_threads(1):
        inside = fn(1)
    after = fn(before)
    fn(after)
    assert inside == 1 and after == before
