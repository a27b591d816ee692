"""`onnxcomp bench` / `onnxcomp compare` mechanics and model-level fidelity (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import MODELS

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.data import Dataset, model_inputs
from onnxcomp.errors import ConfigError, DataError, OnnxcompError
from onnxcomp.data import parse_shapes, synthetic_feed
from onnxcomp.measure.bench import physical_cores
from onnxcomp.measure.fidelity import compare_models, default_channel_axis


def test_physical_cores_and_shapes():
    assert physical_cores() >= 1
    assert parse_shapes(["x=1x3x8x8", "y=4"]) == {"x": (1, 3, 8, 8), "y": (4,)}
    for bad in ("x", "x=1xa", "=3", "x=-1"):
        with pytest.raises(ConfigError, match="NAME=D0xD1"):
            parse_shapes([bad])


def test_synthetic_feed_needs_shapes_for_dynamic_dims(matmul_proto):
    inputs = model_inputs(io.load_model(matmul_proto))
    with pytest.raises(DataError, match=r"input 'x' has dynamic dimension 'N' \(axis 0\)"):
        synthetic_feed(inputs, {})
    with pytest.raises(DataError, match="axis 1 is 15, the model fixes it at 16"):
        synthetic_feed(inputs, {"x": (2, 15)})
    with pytest.raises(DataError, match="'z', not an input"):
        synthetic_feed(inputs, {"z": (1,)})
    feed = synthetic_feed(inputs, {"x": (3, 16)})
    assert feed["x"].shape == (3, 16) and feed["x"].dtype == np.float32


def test_bench_json_two_models(capsys):
    argv = ["bench", str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_mlp.onnx"),
            "--data", str(MODELS / "digits_calib.npz"), "--feeds", "3", "--runs", "7",
            "--warmup-runs", "1", "--warmup-seconds", "0", "--threads", "1", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["models"]
    # a first model under 1 ms is measured in 3 sets of fresh sessions of 7 rounds each, pooled
    sets = rows[0].get("session_sets", 1)
    assert sets == 3 or (sets == 1 and rows[0]["median_ms"] >= 1.0 and "session_ratios" not in rows[1])
    assert [r["runs"] for r in rows] == [7 * sets, 7 * sets]
    assert rows[0]["ratio_to_first"] is None and rows[1]["ratio_to_first"] > 0
    lo, hi = rows[1]["ratio_ci95"]
    assert lo <= rows[1]["ratio_to_first"] <= hi
    assert rows[0]["min_ms"] <= rows[0]["median_ms"] <= rows[0]["p99_ms"]


def test_bench_dynamic_dim_defaults_to_one(capsys):
    assert main(["bench", str(MODELS / "digits_cnn.onnx"), "--runs", "1"]) == 0
    assert "batch=1" in capsys.readouterr().out


def _scaled(model: ir.Model, name_part: str, factor: float) -> ir.Model:
    clone = io.clone_model(model)
    for value in clone.graph.initializers.values():
        if name_part in value.name:
            value.const_value = ir.tensor(value.const_value.numpy() * np.float32(factor), name=value.name)
    return clone


def test_compare_models_identical_and_perturbed():
    reference = io.load_model(MODELS / "digits_cnn.onnx")
    labels = np.load(MODELS / "digits_eval_labels.npy")
    ds = Dataset(MODELS / "digits_eval.npz", reference, batch_size=90)
    same = compare_models(reference, reference, ds, labels=labels)
    (out,) = same.outputs
    assert out.sqnr_db == np.inf and out.top1_agreement == 1.0
    assert same.samples == 450 and same.feeds == 5
    assert same.accuracy["reference"] == same.accuracy["candidate"] == pytest.approx(0.9933, abs=1e-4)

    # Perturb one layer in the middle: the per-layer ranking starts at or after that layer.
    weights = [v.name for v in reference.graph.initializers.values() if v.const_value.numpy().ndim == 4]
    target = weights[len(weights) // 2]
    candidate = _scaled(reference, target, 1.05)
    cmp = compare_models(reference, candidate, ds, labels=labels, per_layer=True)
    assert np.isfinite(cmp.outputs[0].sqnr_db) and cmp.outputs[0].sqnr_db > 10
    sqnrs = [f.sqnr_db for f in cmp.layers]
    assert sqnrs == sorted(sqnrs), "layers worst first"
    assert any(np.isinf(s) for s in sqnrs), "layers before the perturbed one are untouched"
    assert cmp.layers[0].sqnr_db < 40


def test_compare_refuses_mismatches(matmul_proto):
    reference = io.load_model(MODELS / "digits_cnn.onnx")
    ds = Dataset(MODELS / "digits_eval.npz", reference, batch_size=150)
    with pytest.raises(DataError, match="450 labels for"):
        compare_models(reference, reference, Dataset(MODELS / "digits_eval.npz", reference, batch_size=150, limit=1),
                       labels=np.load(MODELS / "digits_eval_labels.npy"))
    with pytest.raises(OnnxcompError, match="outputs differ"):
        compare_models(reference, io.load_model(matmul_proto), ds)


def test_compare_cli_json(capsys):
    argv = ["compare", str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_mlp.onnx"),
            "--data", str(MODELS / "digits_eval.npz"), "--labels", str(MODELS / "digits_eval_labels.npy"),
            "--batch-size", "150", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"][0]["name"] == "logits"
    assert report["outputs"][0]["cosine"] == pytest.approx(1.0)
    assert report["accuracy"]["candidate"] == report["accuracy"]["reference"]


def test_default_channel_axis():
    assert default_channel_axis((1, 64, 8, 8)) == 1
    assert default_channel_axis((1, 84, 8400)) == 1
    assert default_channel_axis((1, 8400, 84)) == 2
    assert default_channel_axis((4, 10)) == -1
    assert default_channel_axis((4,)) is None


def _scores_and_boxes(rng, wb_noise: float = 0.0, wc_noise: float = 0.0):
    """Class scores ``[N, 5]`` (Softmax of a projection) beside boxes ``[N, 3, 4]`` (Sigmoid of a
    reshaped projection): the held-out check reads the scores by top-1 agreement, the boxes by
    cosine. The noise perturbs one head's weights (a candidate)."""
    import onnx.helper as oh
    from conftest import make_proto

    f32 = np.float32
    w1 = rng.standard_normal((8, 16)).astype(f32)
    wc = rng.standard_normal((16, 5)).astype(f32)
    wb = rng.standard_normal((16, 12)).astype(f32)
    noise = np.random.default_rng(7)
    wc = wc + f32(wc_noise) * noise.standard_normal(wc.shape).astype(f32)
    wb = wb + f32(wb_noise) * noise.standard_normal(wb.shape).astype(f32)
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["hr"]),
             oh.make_node("MatMul", ["hr", "wc"], ["logits"]), oh.make_node("Softmax", ["logits"], ["scores"], axis=-1),
             oh.make_node("MatMul", ["hr", "wb"], ["b"]), oh.make_node("Reshape", ["b", "box_shape"], ["b3"]),
             oh.make_node("Sigmoid", ["b3"], ["boxes"])]
    inits = [("w1", w1), ("wc", wc), ("wb", wb), ("box_shape", np.array([-1, 3, 4], np.int64))]
    return make_proto(nodes, [("x", ["N", 8])], [("scores", ["N", 5]), ("boxes", ["N", 3, 4])], inits)


def test_compare_shows_top1_only_for_scores_as_the_check_reads_them(rng, tmp_path, capsys, monkeypatch):
    """``compare`` names each output's kind as the held-out check judges it and shows top-1
    agreement for the class scores only: the box output's is "-" in the table, null in --json."""
    from onnxcomp.runtime import run_model

    monkeypatch.delenv("COLUMNS", raising=False)
    rng_ref, rng_cand = np.random.default_rng(3), np.random.default_rng(3)
    ref, cand, data = tmp_path / "ref.onnx", tmp_path / "cand.onnx", tmp_path / "x.npz"
    io.save_model(io.load_model(_scores_and_boxes(rng_ref)), ref)
    io.save_model(io.load_model(_scores_and_boxes(rng_cand, wb_noise=0.2, wc_noise=0.5)), cand)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    np.savez(data, x=x)
    # the figures, computed here with onnxruntime
    (ref_out,) = run_model(io.load_model(ref), [{"x": x}])
    (cand_out,) = run_model(io.load_model(cand), [{"x": x}])
    agree = float(np.mean(ref_out[0].argmax(-1) == cand_out[0].argmax(-1)))
    box_top1 = float(np.mean(ref_out[1].argmax(-1) == cand_out[1].argmax(-1)))
    assert 0.5 < agree < 1.0 and box_top1 < 1.0  # both heads changed; only one has classes

    assert main(["compare", str(ref), str(cand), "--data", str(data), "--batch-size", "50", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    outputs = {o["name"]: o for o in report["outputs"]}
    assert outputs["scores"]["kind"] == "scores" and outputs["boxes"]["kind"] == "values"
    assert outputs["scores"]["top1_agreement"] == pytest.approx(agree)
    assert outputs["boxes"]["top1_agreement"] is None
    assert outputs["boxes"]["cosine"] < 1.0 and outputs["boxes"]["shape"] == [200, 3, 4]
    # the figure itself is still measured for the boxes (argmax over the last axis); only shown for scores
    cmp = compare_models(io.load_model(ref), io.load_model(cand), Dataset(data, io.load_model(ref), batch_size=50))
    assert cmp.kinds == {"scores": "scores", "boxes": "values"}
    assert cmp.outputs[1].top1_agreement == pytest.approx(box_top1)

    assert main(["compare", str(ref), str(cand), "--data", str(data), "--batch-size", "50"]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if "top-1 agree" in line)
    columns = [c.strip() for c in header.strip("┃│ ").split("┃")]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == len(columns) and cells[0] in ("scores", "boxes"):
            rows[cells[0]] = dict(zip(columns, cells))
    assert rows["scores"]["kind"] == "scores" and rows["scores"]["top-1 agree"] == f"{100 * agree:.2f}%"
    assert rows["boxes"]["kind"] == "values" and rows["boxes"]["top-1 agree"] == "-"
    assert rows["boxes"]["cosine"] == f"{outputs['boxes']['cosine']:.6f}"


def test_compare_judges_kinds_from_what_the_reference_returns(rng):
    """A Softmax output declared ``[1, seqlen]`` reads as class scores from the graph; the arrays
    it returns are ``[T, 1, C]`` (an Unsqueeze whose axis is computed, so shape inference cannot
    see it), a sequence: compare_models says so, as the check does (no top-1 agreement shown)."""
    import onnx.helper as oh
    from conftest import make_proto

    from onnxcomp.check import output_kinds, reads_top1

    t = 9
    nodes = [oh.make_node("Reshape", ["x", "flat"], ["x2"]), oh.make_node("MatMul", ["x2", "w"], ["l"]),
             oh.make_node("Softmax", ["l"], ["p"], axis=-1), oh.make_node("Shape", ["x"], ["axes"], start=0, end=1),
             oh.make_node("Unsqueeze", ["p", "axes"], ["y"])]
    inits = [("flat", np.array([t, 6], np.int64)), ("w", rng.standard_normal((6, 11)).astype(np.float32))]
    model = io.load_model(make_proto(nodes, [("x", ["N", t, 6])], [("y", [1, "seqlen"])], inits))
    assert output_kinds(model) == {"y": "scores"}
    feeds = [{"x": rng.standard_normal((1, t, 6)).astype(np.float32)} for _ in range(2)]
    cmp = compare_models(model, model, feeds)
    assert cmp.outputs[0].shape[1:] == (1, 11)  # [T, 1, C] per feed, time-major
    assert cmp.kinds == {"y": "sequence"} and cmp.to_dict()["outputs"][0]["kind"] == "sequence"
    assert not reads_top1("sequence") and reads_top1("scores") and not reads_top1("values")
    assert cmp.outputs[0].top1_agreement == 1.0  # measured all the same
