"""Embedding tables (Gather on a constant float matrix) as GatherBlockQuantized in every mode.

Small seeded models built in code; the quantized lookup is checked exactly against numpy's
blockwise dequantization of the table, with onnxruntime's graph optimizations off and on.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.errors import ConfigError
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.embedding import embedding_block
from onnxcomp.quant.weight_only import quantize_blockwise
from onnxcomp.testing import run_model, sqnr_db

V, D = 300, 64


def _table(rng):
    # rows of very different norms, as trained embeddings have
    return (rng.standard_normal((V, D)) * rng.uniform(0.05, 2.0, (V, 1))).astype(np.float32)


def _lookup_model(table):
    return io.load_model(make_proto(
        [oh.make_node("Gather", ["E", "ids"], ["y"], name="embed")],
        [("ids", ["B", "S"], onnx.TensorProto.INT64)], [("y", ["B", "S", D])], [("E", table)],
    ))


def _encoder(rng, table, tied=False):
    """ids -> Gather(E) + pos -> MatMul W -> Relu -> y ; tied: also Gemm(h, E, transB=1) -> logits."""
    inits = {
        "E": table,
        "pos": (rng.standard_normal((1, 8, D)) * 0.1).astype(np.float32),
        "W": (rng.standard_normal((D, 48)) / np.sqrt(D)).astype(np.float32),
        "shape": np.array([-1, D], dtype=np.int64),
    }
    nodes = [
        oh.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
        oh.make_node("Add", ["e", "pos"], ["h"], name="add_pos"),
        oh.make_node("MatMul", ["h", "W"], ["m"], name="proj"),
        oh.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    outputs = [("y", [2, 8, 48])]
    if tied:
        nodes += [oh.make_node("Reshape", ["h", "shape"], ["h2"], name="flat"),
                  oh.make_node("Gemm", ["h2", "E"], ["logits"], transB=1, name="lm_head")]
        outputs.append(("logits", [16, V]))
    return io.load_model(make_proto(nodes, [("ids", [2, 8], onnx.TensorProto.INT64)], outputs, list(inits.items()),
                                    opset=17))


def _ids(rng, n, shape=(2, 8)):
    return [{"ids": rng.integers(0, V, size=shape).astype(np.int64)} for _ in range(n)]


def _ops(model):
    return [(n.domain, n.op_type) for n in model.graph]


@pytest.mark.parametrize("bits,block", [(4, 16), (4, 32), (8, None)])
@pytest.mark.parametrize("optimization", ["disable", "all"])
def test_lookup_matches_blockwise_dequantization_exactly(rng, bits, block, optimization):
    table = _table(rng)
    model = _lookup_model(table)
    cfg = QuantizeConfig(mode="weight-only", bits=bits, block_size=block or 32,
                         weight_only_format="ort" if bits == 4 else "qdq")
    quantized, report = quantize(model, None, cfg)
    assert ("com.microsoft", "GatherBlockQuantized") in _ops(quantized)
    assert "E" not in quantized.graph.initializers  # the float table is gone
    info = report["embeddings"]["tables"]["E"]
    used_block = info["block_size"]
    assert used_block == (block if bits == 4 else embedding_block(D, 8, 32)) and info["bits"] == bits
    expected_bytes = V * D * bits // 8 + V * (D // used_block) * 4
    assert info["bytes_after"] == expected_bytes < table.nbytes / (3 if bits == 8 else 5)
    feeds = _ids(rng, 3, (3, 5))
    want = quantize_blockwise(table, 1, bits, used_block).dequantize()
    for feed, out in zip(feeds, run_model(quantized, feeds, optimization=optimization)):
        np.testing.assert_allclose(out[0], want[feed["ids"]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,kw,min_db", [
    ("weight-only", {"bits": 4, "weight_only_format": "ort"}, 15.0),
    ("weight-only", {"bits": 4, "weight_only_format": "qdq"}, 15.0),
    ("weight-only", {"bits": 8, "weight_only_format": "qdq"}, 35.0),
    ("dynamic", {}, 30.0),
    ("static", {}, 25.0),
])
def test_modes_quantize_the_table_and_keep_fidelity(rng, mode, kw, min_db):
    table = _table(rng)
    model = _encoder(rng, table)
    calib = _ids(rng, 8)
    quantized, report = quantize(model, calib if mode == "static" else None, QuantizeConfig(mode=mode, **kw))
    emb = report["embeddings"]
    assert list(emb["tables"]) == ["E"]
    assert emb["tables"]["E"]["bits"] == (kw.get("bits", 8) if mode == "weight-only" else 8)
    assert io.initializer_nbytes(quantized) < io.initializer_nbytes(model) / 3
    feeds = _ids(np.random.default_rng(3), 6)
    for opt in ("disable", "all"):
        ref = np.concatenate([o[0] for o in run_model(model, feeds, optimization=opt)])
        got = np.concatenate([o[0] for o in run_model(quantized, feeds, optimization=opt)])
        assert sqnr_db(ref, got) > min_db


def test_tied_table_quantized_when_its_other_reader_is(rng):
    table = _table(rng)
    model = _encoder(rng, table, tied=True)
    # weight-only quantizes the Gemm first: only the Gather reads the float table, so it goes too.
    quantized, report = quantize(model, None, QuantizeConfig(mode="weight-only", bits=8, weight_only_format="qdq"))
    assert "E" in report["embeddings"]["tables"]
    assert "E" not in quantized.graph.initializers
    feeds = _ids(np.random.default_rng(4), 4)
    ref = run_model(model, feeds, optimization="all")
    got = run_model(quantized, feeds, optimization="all")
    for r, g in zip(ref, got):
        assert sqnr_db(r[1], g[1]) > 30.0
    # the Gemm excluded: the table must stay float for it, so the lookup is left alone and said why
    kept, report = quantize(model, None, QuantizeConfig(mode="weight-only", bits=8, weight_only_format="qdq",
                                                        exclude=("lm_head",)))
    assert not report["embeddings"]["tables"]
    assert "also read in float by lm_head" in report["embeddings"]["skipped"]["embed"]
    assert ("", "Gather") in _ops(kept)


def test_embedding_bits_zero_keeps_tables_float_and_bad_bits_refused(rng):
    model = _lookup_model(_table(rng))
    _, report = quantize(model, None, QuantizeConfig(mode="dynamic", embedding_bits=0))
    assert report["embeddings"]["tables"] == {}
    with pytest.raises(ConfigError, match="embedding_bits"):
        QuantizeConfig(embedding_bits=3)


def test_width_without_a_valid_block_is_left_float(rng):
    table = (rng.standard_normal((500, 40))).astype(np.float32)  # 40: no power-of-two block >= 16 divides it
    model = io.load_model(make_proto(
        [oh.make_node("Gather", ["E", "ids"], ["y"], name="embed")],
        [("ids", [4], onnx.TensorProto.INT64)], [("y", [4, 40])], [("E", table)],
    ))
    _, report = quantize(model, None, QuantizeConfig(mode="dynamic"))
    assert not report["embeddings"]["tables"]
    assert "not a multiple" in report["embeddings"]["skipped"]["embed"]
    small = io.load_model(make_proto(
        [oh.make_node("Gather", ["E", "ids"], ["y"], name="embed")],
        [("ids", [4], onnx.TensorProto.INT64)], [("y", [4, 64])], [("E", table[:100, :32].repeat(2, 1))],
    ))
    _, report = quantize(small, None, QuantizeConfig(mode="dynamic"))
    assert not report["embeddings"]["tables"] and "kept float" in report["embeddings"]["skipped"]["embed"]
