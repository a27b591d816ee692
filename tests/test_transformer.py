"""The transformer path (onnxcomp.quant.transformer) and the embedding check (onnxcomp.measure.embedding).

A small seeded BERT-like encoder (embeddings + LayerNorm, two layers of eager self-attention with
the additive mask, Erf Gelu feed-forward, residual LayerNorms) is built in code in the form a torch
eager export has; onnxruntime's transformer optimizer must fuse it, the fused float model must
match the original, and the quantized model must keep the fused ops with int8 inside them in the
graph onnxruntime runs.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from conftest import make_proto
from onnxcomp import io
from onnxcomp.errors import ConfigError
from onnxcomp.graph import working_copy
from onnxcomp.measure.embedding import embedding_fidelity, encoder_outputs, mean_pool, nn_agreement
from onnxcomp.quant import transformer as T
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.runtime import create_session, session_options

VOCAB, SEQ, HIDDEN, HEADS, FFN, LAYERS = 50, 16, 32, 4, 64, 2
INT64 = onnx.TensorProto.INT64


def bert_like(seed: int = 0, *, pre_ln: bool = False) -> onnx.ModelProto:
    """The encoder; ``pre_ln``: each block normalizes its input (``x + f(LN(x))``, final LayerNorm)
    instead of its output (``LN(x + f(x))``, BERT's form)."""
    rng = np.random.default_rng(seed)
    d = HIDDEN // HEADS
    inits: list[tuple[str, np.ndarray]] = []
    nodes = []

    def w(name, *shape, scale=0.2):
        inits.append((name, (rng.standard_normal(shape) * scale).astype(np.float32)))
        return name

    def c(name, value, dtype=np.float32):
        inits.append((name, np.asarray(value, dtype)))
        return name

    def n(op, ins, out, **attrs):
        nodes.append(oh.make_node(op, ins, [out], name=out, **attrs))
        return out

    def layernorm(x, name):
        return n("LayerNormalization", [x, c(f"{name}.g", 1 + 0.1 * rng.standard_normal(HIDDEN)),
                                        c(f"{name}.b", 0.1 * rng.standard_normal(HIDDEN))], name, axis=-1, epsilon=1e-12)

    def linear(x, name, k, m):
        return n("Add", [n("MatMul", [x, w(f"{name}.w", k, m)], f"{name}/MatMul"), w(f"{name}.b", m, scale=0.05)],
                 f"{name}/Add")

    # embeddings
    words = n("Gather", [w("word_emb", VOCAB, HIDDEN, scale=0.5), "input_ids"], "emb/word")
    types = n("Gather", [w("type_emb", 2, HIDDEN), "token_type_ids"], "emb/type")
    seq = n("Unsqueeze", [n("Gather", [n("Shape", ["input_ids"], "emb/shape"), c("one_i", 1, np.int64)], "emb/seq"),
                          c("ax0", [0], np.int64)], "emb/seq1")
    pos_ids = n("Slice", [c("position_ids", np.arange(64)[None], np.int64), c("zero1", [0], np.int64), seq, c("axis1", [1], np.int64)],
                "emb/pos_ids")
    pos = n("Gather", [w("pos_emb", 64, HIDDEN), pos_ids], "emb/pos")
    x = layernorm(n("Add", [n("Add", [words, types], "emb/add1"), pos], "emb/add2"), "emb/ln")
    # additive mask [B, 1, 1, S]
    m = n("Unsqueeze", [n("Unsqueeze", ["attention_mask", c("ax1", [1], np.int64)], "mask/unsq1"), c("ax2", [2], np.int64)],
          "mask/unsq2")
    m = n("Cast", [m], "mask/cast", to=onnx.TensorProto.FLOAT)
    m = n("Mul", [n("Sub", [c("one_f", 1.0), m], "mask/sub"), c("neg", -10000.0)], "mask/mul")
    split_shape = c("split_shape", [0, 0, HEADS, d], np.int64)
    merge_shape = c("merge_shape", [0, 0, HIDDEN], np.int64)
    for i in range(LAYERS):
        p = f"l{i}"
        a = layernorm(x, f"{p}/ln0") if pre_ln else x
        q = n("Transpose", [n("Reshape", [linear(a, f"{p}/q", HIDDEN, HIDDEN), split_shape], f"{p}/q/r")], f"{p}/q/t",
              perm=[0, 2, 1, 3])
        k = n("Transpose", [n("Reshape", [linear(a, f"{p}/k", HIDDEN, HIDDEN), split_shape], f"{p}/k/r")], f"{p}/k/t",
              perm=[0, 2, 3, 1])
        v = n("Transpose", [n("Reshape", [linear(a, f"{p}/v", HIDDEN, HIDDEN), split_shape], f"{p}/v/r")], f"{p}/v/t",
              perm=[0, 2, 1, 3])
        s = n("Div", [n("MatMul", [q, k], f"{p}/qk"), c(f"{p}/sqrt_d", np.sqrt(d))], f"{p}/scaled")
        probs = n("Softmax", [n("Add", [s, m], f"{p}/masked")], f"{p}/softmax", axis=-1)
        ctx = n("Transpose", [n("MatMul", [probs, v], f"{p}/ctx")], f"{p}/ctx/t", perm=[0, 2, 1, 3])
        ctx = n("Reshape", [ctx, merge_shape], f"{p}/ctx/r")
        x = n("Add", [linear(ctx, f"{p}/o", HIDDEN, HIDDEN), x], f"{p}/res1")
        x = x if pre_ln else layernorm(x, f"{p}/ln1")
        h = linear(layernorm(x, f"{p}/ln1") if pre_ln else x, f"{p}/ffn1", HIDDEN, FFN)
        erf = n("Erf", [n("Div", [h, c(f"{p}/sqrt2", np.sqrt(2.0))], f"{p}/gelu/div")], f"{p}/gelu/erf")
        g = n("Mul", [n("Mul", [h, n("Add", [erf, c(f"{p}/one", 1.0)], f"{p}/gelu/add")], f"{p}/gelu/mul"),
                      c(f"{p}/half", 0.5)], f"{p}/gelu")
        x = n("Add", [linear(g, f"{p}/ffn2", FFN, HIDDEN), x], f"{p}/res2")
        x = x if pre_ln else layernorm(x, f"{p}/ln2")
    if pre_ln:
        x = layernorm(x, "final_ln")
    nodes.append(oh.make_node("Identity", [x], ["last_hidden_state"], name="out"))
    ints = [(name, ["batch", "seq"], INT64) for name in ("input_ids", "attention_mask", "token_type_ids")]
    return make_proto(nodes, ints, [("last_hidden_state", ["batch", "seq", HIDDEN])], inits, opset=17)


def feeds(n: int, batch: int = 2, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, VOCAB, (batch, SEQ), dtype=np.int64)
        mask = np.ones((batch, SEQ), np.int64)
        for b in range(batch):
            mask[b, rng.integers(SEQ // 2, SEQ + 1):] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return out


def pooled(model, data, optimization="all"):
    sess = create_session(model, sess_options=session_options(optimization))
    return np.concatenate([mean_pool(sess.run(None, f)[0], f["attention_mask"]) for f in data])


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def encoder():
    return io.load_model(bert_like())


def test_detects_geometry(encoder):
    geometry, why = T.detect_encoder(encoder)
    assert geometry == T.EncoderGeometry(HEADS, HIDDEN, LAYERS), why
    not_encoder = io.load_model(make_proto([oh.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])]))
    geometry, why = T.detect_encoder(not_encoder)
    assert geometry is None and "head split" in why


@pytest.mark.parametrize("optimization", ["disable", "all"])
def test_fusion_fires_and_matches_float(encoder, optimization):
    work = working_copy(encoder, 13, allow_upgrade=True, notes=[])
    report = T.prepare_encoder(work, "on")
    assert report["applied"]
    assert report["fused"]["Attention"] == LAYERS
    assert "SkipLayerNormalization" not in report["fused"]
    assert report["fused"]["BiasGelu"] == LAYERS
    assert report["fused"]["EmbedLayerNormalization"] == 1
    # left out on purpose (onnxruntime's CPU kernel is slower than Add + LayerNormalization), and said so
    assert report["not_fused"] == {"SkipLayerNormalization": T.LEFT_OUT["SkipLayerNormalization"][1]}
    ops = collections.Counter(n.op_type for n in work.graph)
    assert {"Attention", "BiasGelu", "EmbedLayerNormalization"} <= set(ops) and "SkipLayerNormalization" not in ops
    assert ops["LayerNormalization"] == 2 * LAYERS  # the residual norms stay one op each, after their Add
    assert "Softmax" not in ops and "Erf" not in ops
    data = feeds(3)
    ref = create_session(encoder, sess_options=session_options(optimization))
    got = create_session(work, sess_options=session_options(optimization))
    for f in data:
        r, g = ref.run(None, f)[0], got.run(None, f)[0]
        keep = f["attention_mask"].astype(bool)  # padded positions are never read
        np.testing.assert_allclose(g[keep], r[keep], atol=1e-4)
    assert encoder.graph.num_nodes() > work.graph.num_nodes()  # the input is untouched


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantized_keeps_fused_kernels(encoder, mode):
    calib = feeds(8, seed=3)
    model, report = quantize(encoder, calib if mode == "static" else None, QuantizeConfig(mode=mode, ffn_output="int8"))
    assert report["transformer"]["applied"]
    assert len(report["transformer"]["attention_quantized"]) == LAYERS
    ops = T.fused_ops(model)  # the graph onnxruntime runs
    assert ops.get("QAttention") == LAYERS and "Attention" not in ops
    # the file keeps each residual Add + LayerNormalization (onnxruntime's session optimizer may still
    # fuse a pair whose shapes it knows fully, as here; a dynamic-sequence export keeps them)
    assert sum(1 for n in model.graph if n.op_type == "LayerNormalization") == 2 * LAYERS
    assert not any(n.op_type == "SkipLayerNormalization" for n in model.graph)
    assert ops.get("BiasGelu") == LAYERS and ops.get("EmbedLayerNormalization") == 1
    int8_matmuls = ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0)
    assert int8_matmuls == 3 * LAYERS and "MatMul" not in ops
    assert report["onnxruntime"]["float_compute"] <= 1  # only the embedding lookup
    data = feeds(4, seed=5)
    cos = cosines(pooled(encoder, data), pooled(model, data))
    assert cos.min() > 0.99, cos


def test_off_and_auto_on_other_models(encoder):
    model, report = quantize(encoder, None, QuantizeConfig(mode="dynamic", transformer="off"))
    assert "transformer" not in report
    assert not any(n.op_type in ("Attention", "QAttention") for n in model.graph)
    mlp = make_proto([oh.make_node("MatMul", ["x", "w"], ["y"])], [("x", [1, 8])], [("y", [1, 4])],
                     [("w", np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))])
    _, report = quantize(io.load_model(mlp), None, QuantizeConfig(mode="dynamic"))
    assert report["transformer"]["applied"] is False and "token-id" in report["transformer"]["reason"]
    _, report = quantize(encoder, None, QuantizeConfig(mode="weight-only", bits=8, block_size=16))
    assert report["transformer"]["applied"] is False and "weight-only" in report["transformer"]["reason"]
    with pytest.raises(ConfigError, match="not an encoder"):
        quantize(io.load_model(mlp), None, QuantizeConfig(mode="dynamic", transformer="on"))


def test_attention_with_past_stays_float(encoder):
    work = working_copy(encoder, 13, allow_upgrade=True, notes=[])
    T.prepare_encoder(work, "on")
    att = next(n for n in work.graph if n.op_type == "Attention")
    report = T.QAttentionPass(exclude=(att.name,))(work)
    assert report["attention_float"] == {att.name: "excluded"}
    assert len(report["attention_quantized"]) == LAYERS - 1


def test_embedding_fidelity(encoder):
    mask, outs = encoder_outputs(encoder)
    assert mask == "attention_mask" and outs == ["last_hidden_state"]
    data = feeds(3)
    same = embedding_fidelity(encoder, encoder, data)["last_hidden_state"]
    assert same["pooled_cosine"] == pytest.approx(1.0, abs=1e-6) and same["nn_agreement"] == 1.0
    assert same["sentences"] == 6
    quant, _ = quantize(encoder, None, QuantizeConfig(mode="dynamic"))
    got = embedding_fidelity(encoder, quant, data)["last_hidden_state"]
    want = cosines(pooled(encoder, data), pooled(quant, data))
    assert got["pooled_cosine"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert got["pooled_cosine_min"] == pytest.approx(float(want.min()), abs=1e-5)
    ref = np.eye(4)
    assert nn_agreement(ref, ref) == 1.0 and nn_agreement(ref[:2], ref[:2]) is None
    assert nn_agreement(np.array([[1, 0], [0.9, 0.1], [0, 1.0]]), np.array([[1, 0], [0, 1.0], [0.1, 0.9]])) == pytest.approx(1 / 3)


def test_cli_reports_fusions_and_pooled_check(tmp_path):
    src = tmp_path / "enc.onnx"
    src.write_bytes(bert_like().SerializeToString())
    calib = tmp_path / "calib.npz"
    data = feeds(20, batch=1, seed=7)  # every 5th held out: 4 sentences checked
    np.savez(calib, **{k: np.concatenate([f[k] for f in data]) for k in data[0]})
    out = tmp_path / "enc.int8.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", "quantize", str(src), "-o", str(out), "--mode", "dynamic",
                           "--calibration", str(calib)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = " ".join((proc.stdout + proc.stderr).split())  # the console wraps lines
    assert "fused 1 EmbedLayerNormalization, 2 Attention, 2 BiasGelu; not fused: SkipLayerNormalization (left out:" in text
    assert "QAttention" in text and "pooled-embedding cosine" in text and "nearest-neighbour agreement" in text
    bad = subprocess.run([sys.executable, "-m", "onnxcomp", "quantize", str(src), "-o", str(tmp_path / "x.onnx"),
                          "--mode", "dynamic", "--transformer", "maybe"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--transformer" in bad.stderr


@pytest.mark.parametrize("optimization", ["disable", "all"])
def test_smoothing_is_exact_in_float(encoder, optimization):
    work = working_copy(encoder, 13, allow_upgrade=True, notes=[])
    T.prepare_encoder(work, "on")
    before = io.clone_model(work)
    report = T.smooth_encoder(work, feeds(4, seed=9), alpha=0.75)
    assert report["folded_into_attention"] == LAYERS  # out-projection inputs: V columns of the Attention
    assert report["mul_inserted"] == 2 * LAYERS  # per layer: the Attention and FFN1 inputs (never a GELU's output)
    assert not any("gelu" in name for name in report["groups"])
    ref = create_session(before, sess_options=session_options(optimization))
    got = create_session(work, sess_options=session_options(optimization))
    for f in feeds(3, seed=11):
        np.testing.assert_allclose(got.run(None, f)[0], ref.run(None, f)[0], atol=1e-5)


def test_dynamic_smoothquant_on_encoder(encoder):
    calib = feeds(8, seed=3)
    model, report = quantize(encoder, calib, QuantizeConfig(mode="dynamic", smoothquant=True, ffn_output="int8"))
    assert report["transformer"]["smoothing"]["smoothed"] == 3 * LAYERS  # not the FFN2 inputs (GELU outputs)
    assert T.fused_ops(model).get("QAttention") == LAYERS
    data = feeds(4, seed=5)
    assert cosines(pooled(encoder, data), pooled(model, data)).min() > 0.99
    with pytest.raises(ConfigError, match="calibration"):
        quantize(encoder, None, QuantizeConfig(mode="dynamic", smoothquant=True))


@pytest.mark.parametrize("setting", ["auto", "float"])
def test_ffn_output_matmuls_stay_float_in_dynamic_mode_and_on_request(encoder, setting):
    """Dynamic mode by default (nothing calibrated to judge them by) and ``float`` in either mode keep the
    MatMuls reading a GELU float, unsmoothed; the rest keeps its int8 kernels."""
    calib = feeds(8, seed=3)
    mode = "dynamic" if setting == "auto" else "static"
    model, report = quantize(encoder, calib, QuantizeConfig(mode=mode, ffn_output=setting))
    kept = report["transformer"]["ffn_output_float"]
    assert len(kept) == LAYERS and all(name.startswith(f"l{i}/ffn2") for i, name in enumerate(kept))
    assert any("feed-forward output MatMuls" in note and "kept float" in note for note in report["notes"])
    assert report["transformer"]["smoothing"]["smoothed"] == 3 * LAYERS  # not the FFN2 inputs
    # the path's own exclusions say why, not "excluded by the selection" (the user's)
    assert all("--ffn-output" in report["skipped"][name] for name in kept)
    assert all("SmoothQuant's scaling Mul" in report["skipped"][name]
               for name in report["transformer"]["smoothing"]["mul_nodes"] if name in report["skipped"])
    assert "excluded by the selection" not in report["skipped"].values()
    ops = T.fused_ops(model)
    assert ops.get("QAttention") == LAYERS and ops.get("BiasGelu") == LAYERS
    int8_matmuls = ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0)
    assert int8_matmuls == 2 * LAYERS
    assert ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) == LAYERS  # the float FFN2s, nothing smoothed before them
    by_name = {n.name: n for n in model.graph}
    for name in kept:
        node = by_name[name]
        assert node.op_type == "MatMul" and node.inputs[1].const_value is not None  # float weight, no Q/DQ
        assert node.inputs[0].producer().op_type == "BiasGelu"  # no smoothing Mul in between
    data = feeds(4, seed=5)
    assert cosines(pooled(encoder, data), pooled(model, data)).min() > 0.99


def test_static_default_lets_the_grid_rule_decide_the_ffn_outputs(encoder, monkeypatch):
    """Static ``auto``: the FFN2s are int8 where their (unsmoothed) input keeps its grid, float where the grid
    rule says its range is set by rare large values; ``int8`` forces them past that rule."""
    from onnxcomp.quant import static

    calib = feeds(8, seed=3)
    model, report = quantize(encoder, calib, QuantizeConfig(mode="static"))
    assert report["transformer"]["ffn_output_float"] == []
    assert any(f"{LAYERS} of {LAYERS} feed-forward output MatMuls" in note for note in report["notes"])
    assert T.fused_ops(model).get("MatMulIntegerToFloat", 0) == 3 * LAYERS and "MatMul" not in T.fused_ops(model)
    assert report["transformer"]["smoothing"]["smoothed"] == 3 * LAYERS
    data = feeds(4, seed=5)
    assert cosines(pooled(encoder, data), pooled(model, data)).min() > 0.99
    # every grid below the bar: the rule keeps every int8 node float, FFN2s included, unless forced
    monkeypatch.setattr(static, "MIN_GRID_SQNR_DB", 99.0)
    _, coarse = quantize(encoder, calib, QuantizeConfig(mode="static"))
    ffn2 = sorted(n for n in coarse["skipped"] if "/ffn2/MatMul" in n)
    assert len(ffn2) == LAYERS and all("rare large values" in coarse["skipped"][n] for n in ffn2)
    assert coarse["transformer"]["ffn_output_float"] == ffn2
    assert any(f"0 of {LAYERS} feed-forward output MatMuls" in note for note in coarse["notes"])
    forced, report = quantize(encoder, calib, QuantizeConfig(mode="static", ffn_output="int8"))
    assert not any("/ffn2/MatMul" in n for n in report["skipped"])
    assert T.fused_ops(forced).get("MatMulIntegerToFloat", 0) == LAYERS  # only the forced FFN2s


def test_ffn_output_int8_on_request(encoder, tmp_path):
    """``--ffn-output int8`` quantizes them (the CLI passes the setting through)."""
    src, out = tmp_path / "enc.onnx", tmp_path / "out.onnx"
    io.save_model(encoder, src)
    run = subprocess.run([sys.executable, "-m", "onnxcomp", "quantize", str(src), "-o", str(out), "--mode", "dynamic",
                          "--ffn-output", "int8", "--no-check", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ffn_output_float" not in json.loads(run.stdout)["transformer"]
    ops = T.fused_ops(io.load_model(out))
    assert ops.get("DynamicQuantizeMatMul", 0) == 3 * LAYERS and "MatMul" not in ops
    assert T.ffn_output_matmuls(io.load_model(src)) == []  # unfused: the GELU is an Erf subgraph, not matched
