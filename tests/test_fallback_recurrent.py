"""Recurrent int8 weights and int8 embedding tables are candidates of both fallbacks (issue 13).

The steps after the Q/DQ rewrite (an LSTM's weights as DynamicQuantizeLSTM, an embedding table
as GatherBlockQuantized: onnxcomp.quant.static.FinishStep) used to stay int8 whatever the
fallback did; where one of them is what breaks the budget, the fallback now puts it back in
float, ranked by its own isolated damage. Seeded models built in code.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.check import CheckConfig
from onnxcomp.quant.autofallback import fallback_to_budget, study_of
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.runtime import run_model

H = 16  # LSTM hidden size


def _conv_lstm(seed: int = 7):
    """x [1, 4, 1, 12] -> Conv (1x3) -> Relu -> Conv (1x3) -> Relu -> [12, 1, 8] (time-major) ->
    LSTM -> its hidden sequence [12, 1, 1, H]. The LSTM's W has one outlier (40 among weights of
    about 0.3): one scale per direction in 7 bits (this CPU, onnxcomp.quant.kernels) rounds most of
    its weights to 0 or one step, where the Convs' per-channel int8 weights are exact enough."""
    rng = np.random.default_rng(seed)
    w = (0.3 * rng.standard_normal((1, 4 * H, 8))).astype(np.float32)
    w[0, 3, 2] = 40.0
    inits = [("c1", (0.4 * rng.standard_normal((8, 4, 1, 3))).astype(np.float32)),
             ("c2", (0.3 * rng.standard_normal((8, 8, 1, 3))).astype(np.float32)),
             ("shape", np.array([1, 8, 12], np.int64)), ("W", w),
             ("R", (0.2 * rng.standard_normal((1, 4 * H, H))).astype(np.float32))]
    nodes = [oh.make_node("Conv", ["x", "c1"], ["a1"], pads=[0, 1, 0, 1], name="conv1"),
             oh.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "c2"], ["a2"], pads=[0, 1, 0, 1], name="conv2"),
             oh.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             oh.make_node("Reshape", ["r2", "shape"], ["s"], name="flat"),
             oh.make_node("Transpose", ["s"], ["t"], perm=[2, 0, 1], name="time_major"),
             oh.make_node("LSTM", ["t", "W", "R"], ["y"], hidden_size=H, name="lstm")]
    return make_proto(nodes, [("x", [1, 4, 1, 12])], [("y", [12, 1, 1, H])], inits)


def _x_feeds(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 1, 12)).astype(np.float32)} for _ in range(n)]


def _study(proto, feeds):
    from onnxcomp.quant.api import quantize

    kept = []
    quantized, report = quantize(proto, feeds, QuantizeConfig(), keep=kept.append)
    return quantized, report, study_of(kept[0], feeds)


def _op_types(model) -> set[str]:
    return {n.op_type for n in model.graph}


def _cosine(study, model) -> float:
    return study.evaluate([model])[0]["outputs"][0]["cosine"]


def test_the_int8_lstm_is_a_candidate_ranked_by_its_own_damage():
    from onnxcomp.quant.damage import ranked_blocks

    quantized, report, study = _study(_conv_lstm(), _x_feeds(1, 24))
    assert report["recurrent"]["lstm_int8"] == ["lstm"] and "DynamicQuantizeLSTM" in _op_types(quantized)
    assert study.finish_nodes == {"lstm": "recurrent"}
    assert study.nodes[-1] == "lstm" and {"conv1", "conv2"} <= set(study.nodes)
    blocks, damage = ranked_blocks(study, study.nodes)
    assert blocks[0] == ["lstm"]  # worst first, a block of its own
    assert damage["lstm"] > 10 * max(damage["conv1"], damage["conv2"])
    assert damage["lstm"] > 0.01  # its int8 weights alone cost more than 1% noise power (< 20 dB)
    # what it is: the int8 LSTM's output against the float one on the same float inputs (the
    # variant with both Convs float), on the feeds the ranking ran on
    feeds = study.feeds[:2]
    ref = run_model(study.float_reference, feeds)
    alone = run_model(study.build(frozenset({"conv1", "conv2"})), feeds)
    noise = sum(float(np.sum((a[0].astype(np.float64) - r[0]) ** 2)) for a, r in zip(alone, ref))
    signal = sum(float(np.sum(r[0].astype(np.float64) ** 2)) for r in ref)
    assert damage["lstm"] == pytest.approx(noise / signal, rel=1e-3)
    # the variant with the LSTM float: float LSTM, int8 Convs, the float weights back
    floated = study.build(frozenset({"lstm"}))
    assert "LSTM" in _op_types(floated) and "DynamicQuantizeLSTM" not in _op_types(floated)
    assert "QuantizeLinear" in _op_types(floated)
    assert _cosine(study, floated) > 0.999 > 0.99 > _cosine(study, study.build())


def test_an_lstm_read_by_its_last_state_only_is_measured_there():
    """An LSTM whose sequence output is omitted (only Y_h read) was measured nowhere: damage 0,
    ranked last."""
    from onnxcomp.quant.damage import ranked_blocks

    proto = _conv_lstm()
    lstm = proto.graph.node[-1]
    del lstm.output[:]
    lstm.output.extend(["", "h"])
    proto.graph.output[0].CopyFrom(oh.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [1, 1, H]))
    _, _, study = _study(proto, _x_feeds(1, 24))
    blocks, damage = ranked_blocks(study, study.nodes)
    assert blocks[0] == ["lstm"] and damage["lstm"] > 10 * max(damage["conv1"], damage["conv2"]) > 0


def test_the_checks_fallback_puts_the_lstm_float_and_meets_the_budget():
    _, _, study = _study(_conv_lstm(), _x_feeds(1, 24))
    budget = CheckConfig(min_cosine=0.998)
    assert _cosine(study, study.build()) < 0.998  # all int8 misses it
    model, report = fallback_to_budget(study, budget)
    assert report["met_on_fitting_data"]
    assert report["float_nodes"] == ["lstm"] and report["blocks"] == [["lstm"]]
    assert report["finish_nodes"] == {"lstm": "recurrent"}
    assert set(report["int8_nodes"]) == set(study.nodes) - {"lstm"}
    assert report["fitting_outputs"][0]["cosine"] >= 0.998
    assert report["damage"]["lstm"] > 0.01
    # the chosen model's recurrent section says what was written
    assert report["recurrent"]["lstm_int8"] == [] and report["recurrent"]["recurrent_kept_float"] == {
        "lstm": "kept float by the fallback"}
    assert "LSTM" in _op_types(model) and "QuantizeLinear" in _op_types(model)


def test_quantize_cli_names_the_float_lstm(tmp_path, capsys):
    from onnxcomp.cli import main

    io.save_model(io.load_model(_conv_lstm()), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in _x_feeds(2, 50)])[:, None])
    args = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calibration",
            str(tmp_path / "calib.npz"), "--min-cosine", "0.998", "--no-latency"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    auto = report["auto_fallback"]
    assert not auto["check_before"]["met"] and auto["met_on_fitting_data"] and report["check"]["met"]
    assert auto["float_nodes"] == ["lstm"]
    assert report["recurrent"]["lstm_int8"] == [] and report["recurrent"]["recurrent_kept_float"]["lstm"] == \
        "kept float by the fallback"
    assert report["int8_nodes"] == 2  # the Convs (the LSTM is counted in its own section)
    assert report["check"]["outputs"][0]["cosine"] >= 0.998
    assert {n.op_type for n in io.load_model(tmp_path / "q.onnx").graph} >= {"LSTM", "QuantizeLinear"}
    assert main([*args, "--force"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 node(s) back in float" in out and "float: lstm (adds" in out
    assert "recurrent: 0 LSTM as DynamicQuantizeLSTM, 0 weight-only int8, 1 float (lstm: kept float by the fallback)" in out


def test_the_fidelity_fallback_puts_the_lstm_float():
    from onnxcomp.quant.api import quantize

    feeds = _x_feeds(3, 24)
    quantized, report = quantize(_conv_lstm(), feeds, QuantizeConfig(fidelity_target=25.0))
    fallback = report["fallback"]
    assert fallback["met"] and fallback["final"]["sqnr_db"] >= 25.0
    assert fallback["float_nodes"] == ["lstm"] and fallback["finish_nodes"] == {"lstm": "recurrent"}
    assert report["int8_nodes"] == 2 and report["skipped"] == {"lstm": "kept float to meet the budget"}
    assert "LSTM" in _op_types(quantized) and "QuantizeLinear" in _op_types(quantized)


# --------------------------------------------------------------------------- embedding tables


def _embedding_model(seed: int = 5, vocab: int = 512, width: int = 64):
    """ids [1, 10] -> Gather(table [512, 64]) -> MatMul -> [1, 10, 16]: with 4-bit tables
    (``embedding_bits=4``) the lookup keeps about 20 dB, the int8 MatMul about 35."""
    rng = np.random.default_rng(seed)
    inits = [("table", rng.standard_normal((vocab, width)).astype(np.float32)),
             ("w", (0.2 * rng.standard_normal((width, 16))).astype(np.float32))]
    nodes = [oh.make_node("Gather", ["table", "ids"], ["e"], name="lookup"),
             oh.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    return make_proto(nodes, [("ids", [1, 10], onnx.TensorProto.INT64)], [("y", [1, 10, 16])], inits)


def _id_feeds(seed: int, n: int, vocab: int = 512) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, vocab, (1, 10)).astype(np.int64)} for _ in range(n)]


def test_a_4bit_embedding_table_goes_float_when_it_breaks_the_budget():
    from onnxcomp.quant.api import quantize

    feeds = _id_feeds(4, 24)
    config = QuantizeConfig(embedding_bits=4)
    kept = []
    quantized, report = quantize(_embedding_model(), feeds, config, keep=kept.append)
    assert report["embeddings"]["tables"]["table"]["nodes"] == ["lookup"]
    assert "GatherBlockQuantized" in _op_types(quantized)
    study = study_of(kept[0], feeds)
    assert study.finish_nodes == {"lookup": "embeddings"} and study.nodes == ["proj", "lookup"]
    assert _cosine(study, study.build()) < 0.999  # all int8 misses the budget
    # judged by cosine as declared values: a projection onto 16 columns per token of an integer
    # input would otherwise read as a token classifier's tags (top-1 agreement per token)
    model, auto = fallback_to_budget(study, CheckConfig(min_cosine=0.999), kinds={"y": "values"})
    assert auto["met_on_fitting_data"] and auto["fitting_outputs"][0]["cosine"] >= 0.999
    assert auto["float_nodes"] == ["lookup"] and auto["int8_nodes"] == ["proj"]
    assert auto["damage"]["lookup"] > 0.003  # the 4-bit table alone: below 25 dB
    assert auto["embeddings"]["tables"] == {} and auto["embeddings"]["skipped"] == {"lookup": "kept float by the fallback"}
    assert "QuantizeLinear" in _op_types(model)  # the MatMul stays int8
    assert "Gather" in _op_types(model) and "GatherBlockQuantized" not in _op_types(model)
    assert "table" in model.graph.initializers  # the float table is back
    # the fidelity fallback the same way
    _, report = quantize(_embedding_model(), feeds, dataclasses.replace(config, fidelity_target=30.0))
    assert report["fallback"]["met"] and report["fallback"]["float_nodes"] == ["lookup"]
    assert report["fallback"]["final"]["sqnr_db"] >= 30.0


# --------------------------------------------------------------------------- compress's count


def _lstm_only(seed: int = 4):
    """x [6, 1, 16] -> LSTM -> the last hidden state: nothing for the Q/DQ plan, int8 LSTM weights."""
    rng = np.random.default_rng(seed)
    inits = [("W", (0.3 * rng.standard_normal((1, 64, 16))).astype(np.float32)),
             ("R", (0.1 * rng.standard_normal((1, 64, 16))).astype(np.float32))]
    nodes = [oh.make_node("LSTM", ["x", "W", "R"], ["seq", "y"], hidden_size=16, name="lstm")]
    return make_proto(nodes, [("x", [6, 1, 16])], [("y", [1, 1, 16])], inits)


def test_compress_counts_recurrent_and_embedding_int8(tmp_path, capsys):
    """compress's "nothing compressed" count read the quantize stage's int8 nodes only: a model
    whose only int8 is its LSTM's weights (or an embedding table) was reported as compressing
    nothing."""
    from onnxcomp.cli import _compressed_by_stages, main
    from onnxcomp.quant.api import quantize

    rng = np.random.default_rng(0)
    proto = _lstm_only()
    feeds = [{"x": rng.standard_normal((6, 1, 16)).astype(np.float32)} for _ in range(12)]
    quantized, stats = quantize(proto, feeds, QuantizeConfig())
    assert stats["int8_nodes"] == 0 and stats["recurrent"]["lstm_int8"] == ["lstm"]
    assert _compressed_by_stages([{"stage": "quantize", "stats": stats}]) == (1, "quantized nodes")
    _, emb = quantize(_embedding_model(), _id_feeds(1, 12), QuantizeConfig())
    assert emb["int8_nodes"] == 1 and emb["embeddings"]["tables"]["table"]["nodes"] == ["lookup"]
    assert _compressed_by_stages([{"stage": "quantize", "stats": emb}]) == (2, "quantized nodes")
    # a report without the sections (a fidelity fallback's): the int8 tensors written
    bare = {"stage": "quantize", "stats": {"int8_nodes": 0}}
    assert _compressed_by_stages([bare]) == (0, "quantized nodes")
    assert _compressed_by_stages([bare], io.load_model(proto), quantized) == (2, "int8 tensors")  # W and R
    # end to end: the check does not say "nothing was compressed"
    io.save_model(io.load_model(proto), tmp_path / "lstm.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in feeds + feeds]))
    assert main(["compress", str(tmp_path / "lstm.onnx"), "-o", str(tmp_path / "q.onnx"), "--recipe", "int8",
                 "--calibration", str(tmp_path / "calib.npz"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["check"]["compressed"]["count"] == 1
    assert not any(p.startswith("nothing was compressed") for p in report["check"]["problems"])
