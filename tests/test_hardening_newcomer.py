"""What a newcomer trips over: names that look like rich markup, dynamic batch dimensions, sizes that
differ from the files written, a recipe that cannot be pasted back, a fidelity budget judged on a
silent subset, and kernel counts that name the wrong thing."""

from __future__ import annotations

import html
import json
import os
import re
import sys

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from conftest import MODELS, make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.recipe import Recipe, load_recipe, parse_override, recipe_toml, shipped_recipes
from onnxcomp.summary import weight_counts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    # terminal text: lines wrapped by rich joined again with one space
    out = captured.out if "--json" in argv else " ".join(captured.out.split())
    return code, out, captured.err


def _on_disk(path) -> int:
    data = f"{path}.data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)


def _bracket_conv(rng, path):
    """Conv whose input, weight and node names look like rich markup; dynamic batch."""
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    proto = make_proto(
        [oh.make_node("Conv", ["in[0]", "w[conv]"], ["y[out]"], name="conv[main]", pads=[1, 1, 1, 1])],
        [("in[0]", ["batch", 1, 8, 8])], [("y[out]", ["batch", 4, 8, 8])], [("w[conv]", w)],
    )
    onnx.save(proto, path)
    return path


# ------------------------------------------------------------------------------ markup escaping


def test_inspect_shows_symbolic_shapes_and_bracketed_names(tmp_path, rng, capsys):
    model = _bracket_conv(rng, tmp_path / "m[1].onnx")
    code, out, err = _cli(capsys, "inspect", model)
    assert code == 0, err
    assert "[batch,1,8,8]" in out and "[batch,4,8,8]" in out
    assert "in[0]" in out and "y[out]" in out and "m[1].onnx" in out
    assert "weights: 36 elements; quantization parameters (scales, zero points, codebooks): 0" in out


def test_compare_and_bench_keep_bracketed_names(tmp_path, rng, capsys):
    model = _bracket_conv(rng, tmp_path / "net[a].onnx")
    np.savez(tmp_path / "d.npz", **{"in[0]": rng.standard_normal((3, 1, 8, 8)).astype(np.float32)})
    code, out, err = _cli(capsys, "compare", model, model, "--data", tmp_path / "d.npz", "--per-layer")
    assert code == 0, err
    assert "net[a].onnx vs net[a].onnx" in out and "y[out]" in out
    code, out, err = _cli(capsys, "bench", model, "--runs", 2, "--warmup-runs", 0, "--warmup-seconds", 0)
    assert code == 0, err
    assert "net[a].onnx" in out


# ------------------------------------------------------------------------------ free dimensions


def test_bench_dynamic_batch_defaults_to_one_and_says_so(tmp_path, rng, capsys):
    model = _bracket_conv(rng, tmp_path / "dyn.onnx")
    code, out, err = _cli(capsys, "bench", model, "--runs", 2, "--warmup-runs", 0, "--warmup-seconds", 0)
    assert code == 0, err
    assert "input 'in[0]'" in out and "batch=1 (axis 0)" in out and "--shape" in out
    code, out, err = _cli(capsys, "bench", model, "--runs", 2, "--warmup-runs", 0, "--warmup-seconds", 0, "--json")
    assert code == 0, err
    assert json.loads(out)["free_dims"] == [{"input": "in[0]", "axis": 0, "dim": "batch", "value": 1}]
    # --shape overrides: nothing is defaulted
    code, out, err = _cli(capsys, "bench", model, "--shape", "in[0]=2x1x8x8", "--runs", 2, "--warmup-runs", 0,
                          "--warmup-seconds", 0, "--json")
    assert code == 0, err
    assert json.loads(out)["free_dims"] == []


def test_compress_without_data_defaults_free_dims(tmp_path, capsys):
    out = tmp_path / "c.onnx"
    code, text, err = _cli(capsys, "compress", MODELS / "digits_cnn.onnx", "-o", out, "--recipe", "cluster-4bit",
                           "--set", "measure.runs=2", "--set", "measure.warmup_runs=0", "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["free_dims"] == [{"input": "image", "axis": 0, "dim": "batch", "value": 1}]
    assert any("batch=1" in note for note in report["notes"])


# ------------------------------------------------------------------------------ sizes on disk


def test_compress_reports_bytes_on_disk_everywhere(tmp_path, capsys):
    out, page = tmp_path / "out.onnx", tmp_path / "r.html"
    code, text, err = _cli(capsys, "compress", MODELS / "digits_cnn.onnx", "-o", out,
                           "--calibration", MODELS / "digits_calib.npz", "--report", page,
                           "--set", "measure.latency=false", "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["after"]["bytes"] == _on_disk(out)
    assert report["before"]["bytes"] == os.path.getsize(MODELS / "digits_cnn.onnx")
    from onnxcomp.report import _fmt_bytes

    row = re.search(r"<td>file size on disk</td><td class='n'>([^<]*)</td><td class='n'>([^<]*)</td>",
                    page.read_text())
    assert row and row.groups() == (_fmt_bytes(report["before"]["bytes"]), _fmt_bytes(_on_disk(out)))
    # int8 keeps every weight element (the cleanup folded BatchNorm before): scales are counted apart
    from onnxcomp.passes.cleanup import CleanupPass

    folded = io.clone_model(io.load_model(MODELS / "digits_cnn.onnx"))
    CleanupPass()(folded)
    assert report["after"]["quant_params"] > 0
    assert report["after"]["weight_elements"] == weight_counts(folded)["weight_elements"]
    assert weight_counts(io.load_model(out))["weight_elements"] == report["after"]["weight_elements"]


def test_compress_external_data_counts_data_file(tmp_path, capsys):
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(onnx.load(MODELS / "digits_cnn.onnx"), ext / "cnn.onnx", save_as_external_data=True,
              location="cnn.weights", size_threshold=1024)
    out = tmp_path / "out.onnx"
    code, text, err = _cli(capsys, "compress", ext / "cnn.onnx", "-o", out, "--recipe", "cluster-4bit",
                           "--calibration", MODELS / "digits_calib.npz", "--set", "measure.latency=false", "--json")
    assert code == 0, err
    report = json.loads(text)
    assert os.path.exists(f"{out}.data")
    assert report["after"]["bytes"] == _on_disk(out)
    assert report["before"]["bytes"] == os.path.getsize(ext / "cnn.onnx") + os.path.getsize(ext / "cnn.weights")


def test_prune_cluster_quantize_report_bytes_on_disk(tmp_path, capsys):
    model = MODELS / "digits_cnn.onnx"
    for argv in (("prune", model, "-o", tmp_path / "p.onnx", "--ratio", "0.25"),
                 ("cluster", model, "-o", tmp_path / "k.onnx", "--format", "codebook"),
                 ("quantize", model, "-o", tmp_path / "q.onnx", "--calibration", MODELS / "digits_calib.npz")):
        code, text, err = _cli(capsys, *argv, "--json")
        assert code == 0, err
        report = json.loads(text)
        out = argv[3]
        if argv[0] == "prune":
            assert report["after"]["bytes"] == _on_disk(out)
            assert report["before"]["bytes"] == os.path.getsize(model)
        else:
            assert report["output"]["bytes"] == _on_disk(out)
            assert report["input"]["bytes"] == os.path.getsize(model)


def test_weight_elements_apart_from_quant_params(rng, tmp_path):
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    proto = make_proto([oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("MatMul", ["h", "w2"], ["y"])],
                       [("x", [2, 64])], [("y", [2, 16])], [("w1", w1), ("w2", w2)])
    before = weight_counts(io.load_model(proto))
    assert before == {"weight_elements": 64 * 32 + 32 * 16, "quant_params": 0, "other": 0}
    for fmt in ("ort", "qdq"):
        model, _ = quantize(proto, None, QuantizeConfig(mode="weight-only", bits=4, block_size=16,
                                                       weight_only_format=fmt))
        after = weight_counts(model)
        # int4 codes are packed two per byte (MatMulNBits) or stored as INT4: still one element each
        assert after["weight_elements"] == before["weight_elements"], fmt
        assert after["quant_params"] == 64 // 16 * 32 + 32 // 16 * 16, fmt  # one scale per block
    dynamic, _ = quantize(proto, None, QuantizeConfig(mode="dynamic"), verify=False)
    # int8 weights read by MatMulInteger; their per-column scales multiply the run-time x_scale
    assert weight_counts(dynamic) == {"weight_elements": before["weight_elements"], "quant_params": 32 + 16, "other": 0}
    from onnxcomp.cluster.api import cluster
    from onnxcomp.cluster.passes import ClusterConfig

    clustered, _ = cluster(proto, ClusterConfig(bits=4, format="codebook", min_elements=16))
    counts = weight_counts(clustered)
    assert counts["weight_elements"] == before["weight_elements"]
    assert 0 < counts["quant_params"] <= 2 * 16 + 2 * 32  # codebooks (+ channel scales)


# ------------------------------------------------------------------------------ recipe as TOML


def test_html_recipe_is_toml_that_round_trips(tmp_path, capsys):
    page = tmp_path / "r.html"
    sets = ["quantize.exclude=[\"re:^/head[0]\", 'quote\"d']", "measure.latency=false", "measure.max_feeds=3"]
    code, _, err = _cli(capsys, "compress", MODELS / "digits_cnn.onnx", "-o", tmp_path / "o.onnx",
                        "--calibration", MODELS / "digits_calib.npz", "--report", page,
                        *[x for s in sets for x in ("--set", s)])
    assert code == 0, err
    block = re.search(r"<h2>Recipe</h2><pre>(.*?)</pre>", page.read_text(), re.S).group(1)
    used = load_recipe("int8").with_overrides(dict(parse_override(s) for s in sets))
    assert Recipe.from_dict(tomllib.loads(html.unescape(block))) == used
    assert "True" not in block and "None" not in block and "()" not in block


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipes_round_trip_through_toml(name, tmp_path):
    recipe = load_recipe(name)
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(recipe))
    assert load_recipe(str(path)) == recipe


# ------------------------------------------------------------------------------ --max-drop samples


def test_max_drop_uses_every_given_sample_and_says_how_many(tmp_path, rng, capsys):
    w = rng.standard_normal((16, 5)).astype(np.float32)
    proto = make_proto([oh.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [("x", ["N", 16])], [("y", ["N", 5])],
                       [("w", w)], opset=13)
    onnx.save(proto, tmp_path / "m.onnx")
    x = rng.standard_normal((90, 16)).astype(np.float32)  # more than the 64 feeds once used silently
    np.savez(tmp_path / "eval.npz", x=x)
    np.savez(tmp_path / "calib.npz", x=x[:16])
    np.save(tmp_path / "labels.npy", (x @ w).argmax(1))
    argv = ["quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--calibration", tmp_path / "calib.npz",
            "--eval", tmp_path / "eval.npz", "--labels", tmp_path / "labels.npy", "--max-drop", "1"]
    code, text, err = _cli(capsys, *argv, "--json")
    assert code == 0, err
    fallback = json.loads(text)["fallback"]
    assert fallback["eval_samples"] == 90 and fallback["eval_feeds"] == 90
    assert fallback["float"]["accuracy"] == 1.0
    code, text, err = _cli(capsys, *argv)
    assert code == 0, err
    assert "judged on 90 sample(s) of the evaluation data" in text
    code, text, err = _cli(capsys, "compress", tmp_path / "m.onnx", "-o", tmp_path / "c.onnx", "--calibration",
                           tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "--labels", tmp_path / "labels.npy",
                           "--set", "quantize.max_drop=1.0", "--set", "measure.latency=false")
    assert code == 0, err
    assert "budget judged on 90 sample(s) of the evaluation data" in text


# ------------------------------------------------------------------------------ kernel messages


def _lstm_model(rng):
    hidden, feat, steps = 8, 6, 5
    w = rng.standard_normal((feat, feat)).astype(np.float32)
    W = rng.standard_normal((1, 4 * hidden, feat)).astype(np.float32) * 0.3
    R = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.3
    return make_proto(
        [oh.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
         oh.make_node("LSTM", ["h", "W", "R"], ["y"], name="lstm", hidden_size=hidden)],
        [("x", [steps, 1, feat])], [("y", [steps, 1, 1, hidden])], [("w", w), ("W", W), ("R", R)], opset=13,
    )


def test_float_compute_counts_lstm(tmp_path, rng, capsys):
    onnx.save(_lstm_model(rng), tmp_path / "lstm.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 5, 1, 6)).astype(np.float32))
    # static quantize makes an LSTM int8 (DynamicQuantizeLSTM): one kept float must be counted
    code, text, err = _cli(capsys, "quantize", tmp_path / "lstm.onnx", "-o", tmp_path / "q.onnx",
                           "--calibration", tmp_path / "calib.npz", "--exclude", "LSTM", "--json")
    assert code == 0, err
    ort_report = json.loads(text)["onnxruntime"]
    assert ort_report["float_by_op"].get("LSTM") == 1 and ort_report["float_compute"] >= 1
    code, text, err = _cli(capsys, "quantize", tmp_path / "lstm.onnx", "-o", tmp_path / "q2.onnx",
                           "--calibration", tmp_path / "calib.npz", "--exclude", "LSTM")
    assert code == 0, err
    assert "float compute left: none" not in text and "LSTM x1" in text


def test_float_compute_counts_gather_from_constant_table(rng):
    from onnxcomp.quant.verify import fusion_report

    table = rng.standard_normal((10, 4)).astype(np.float32)
    proto = make_proto(
        [oh.make_node("Gather", ["table", "ids"], ["e"]), oh.make_node("Gather", ["e", "pick"], ["y"], axis=1)],
        [("ids", [3], onnx.TensorProto.INT64)], [("y", [3, 2])],
        [("table", table), ("pick", np.array([0, 2], dtype=np.int64))],
    )
    report = fusion_report(io.load_model(proto))
    assert report["float_by_op"] == {"Gather": 1}  # the lookup, not the data movement after it


def test_weight_only_int4_is_not_called_int8(tmp_path, rng, capsys):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    onnx.save(make_proto([oh.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 64])], [("y", [2, 32])],
                         [("w", w)]), tmp_path / "m.onnx")
    code, text, err = _cli(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--mode", "weight-only",
                           "--format", "ort")
    assert code == 0, err
    assert "1 int4-weight kernel: MatMulNBits x1" in text
    assert "int8 kernel(s): MatMulNBits" not in text and "0 int8 kernels" in text
    code, text, err = _cli(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "q2.onnx", "--mode",
                           "weight-only", "--format", "ort", "--json")
    assert json.loads(text)["onnxruntime"]["weight_only_bits"] == {"MatMulNBits": [4]}


def _conv_gemm(rng):
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    g = rng.standard_normal((4 * 6 * 6, 3)).astype(np.float32)
    return make_proto(
        [oh.make_node("Conv", ["x", "w"], ["c"], name="conv"), oh.make_node("Flatten", ["c"], ["f"]),
         oh.make_node("Gemm", ["f", "g"], ["y"], name="fc")],
        [("x", [1, 2, 8, 8])], [("y", [1, 3])], [("w", w), ("g", g)], opset=13,
    )


def test_dynamic_mode_honours_op_types_and_names_the_flag(tmp_path, rng, capsys):
    proto = _conv_gemm(rng)
    onnx.save(proto, tmp_path / "m.onnx")
    code, text, err = _cli(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "d.onnx", "--mode", "dynamic")
    assert code == 0, err
    assert "--op-types Conv,Gemm,LSTM,MatMul" in text and "dynamic_op_types" not in text
    assert "Conv x1" in text  # the float Conv is float compute left
    code, text, err = _cli(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "c.onnx", "--mode", "dynamic",
                           "--op-types", "Conv", "--json")
    assert code == 0, err
    report = json.loads(text)
    ops = [n.op_type for n in onnx.load(tmp_path / "c.onnx").graph.node]
    assert "ConvInteger" in ops and "MatMulInteger" not in ops and "Gemm" in ops
    assert report["nodes_quantized"] == 1 and report["onnxruntime"]["int8_by_op"] == {"ConvInteger": 1}
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "c.onnx")).run(None, {"x": x})[0]
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) > 30
    code, _, err = _cli(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "e.onnx", "--mode", "dynamic",
                        "--op-types", "Relu")
    assert code == 1 and "--op-types" in err and "Relu" in err
