"""Sensitivity analysis and automatic float fallback (one calibration, any Executor)."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp.cli import main
from onnxcomp.errors import ConfigError
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.sensitivity import analyze_sensitivity, quantize_with_fallback


def _model_with_a_fragile_layer(rng):
    """Three MatMuls; the middle weight has one huge outlier, so per-tensor int8 ruins it."""
    w1 = rng.standard_normal((16, 16)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((16, 16)).astype(np.float32) * 0.3
    w2[0, 0] = 60.0
    w3 = rng.standard_normal((16, 8)).astype(np.float32) * 0.3
    return make_proto(
        [oh.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"), oh.make_node("Relu", ["a"], ["ra"], name="r1"),
         oh.make_node("MatMul", ["ra", "w2"], ["b"], name="mm2"), oh.make_node("Relu", ["b"], ["rb"], name="r2"),
         oh.make_node("MatMul", ["rb", "w3"], ["y"], name="mm3")],
        [("x", ["N", 16])], [("y", ["N", 8])], [("w1", w1), ("w2", w2), ("w3", w3)],
    )


def _feeds(rng, n=24):
    return [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(n)]


# 7-bit weights whatever the CPU (weight_range auto gives 8 on a VNNI CPU, where the fragile layer
# keeps more than the 30 dB the fallback tests ask for and nothing falls back)
PER_TENSOR = QuantizeConfig(per_channel=False, activation_type="int8", weight_range="reduced")


def test_sensitivity_ranks_the_fragile_layer_first(rng):
    proto = _model_with_a_fragile_layer(rng)
    with concurrent.futures.ThreadPoolExecutor(2) as executor:  # any Executor works
        report = analyze_sensitivity(proto, _feeds(rng), PER_TENSOR, executor=executor)
    assert report["float"]["sqnr_db"] == np.inf
    assert report["candidates_evaluated"] == 1 + 2 * len(report["nodes"])
    worst = report["nodes"][0]
    assert worst["node"] == "mm2", report["nodes"]
    assert worst["gain_db"] == max(r["gain_db"] for r in report["nodes"])
    assert worst["alone_sqnr_db"] < min(r["alone_sqnr_db"] for r in report["nodes"][1:])


def test_default_process_pool(rng):
    report = analyze_sensitivity(_model_with_a_fragile_layer(rng), _feeds(rng, 6), PER_TENSOR)
    assert report["nodes"][0]["node"] == "mm2"


def test_fallback_meets_the_target_with_the_fewest_nodes(rng):
    proto = _model_with_a_fragile_layer(rng)
    feeds = _feeds(rng)
    _, plain = quantize(proto, feeds, PER_TENSOR)
    sens = analyze_sensitivity(proto, feeds, PER_TENSOR, executor=concurrent.futures.ThreadPoolExecutor(1))
    without_mm2 = next(r for r in sens["nodes"] if r["node"] == "mm2")["all_but_sqnr_db"]
    assert without_mm2 > sens["all_int8"]["sqnr_db"] + 3
    target = without_mm2 - 0.5  # reachable by moving mm2 alone to float
    model, report = quantize_with_fallback(proto, feeds, PER_TENSOR, fidelity_target=target,
                                           executor=concurrent.futures.ThreadPoolExecutor(2))
    assert report["met"] and report["final"]["sqnr_db"] >= target
    assert report["float_nodes"] == ["mm2"]
    assert set(report["fallback_latency"]) == {"mm2"}
    ops = [n.op_type for n in model.graph]
    assert ops.count("DequantizeLinear") > 0
    assert plain["int8_nodes"] == 3


def test_fallback_through_quantize_config_and_cli(tmp_path, capsys):
    labels = np.load(MODELS / "digits_eval_labels.npy")
    cfg = QuantizeConfig(max_drop=0.5, activation_type="int8", per_channel=False)
    model, report = quantize(MODELS / "digits_transformer.onnx", MODELS / "digits_calib.npz", cfg,
                             eval_data=MODELS / "digits_eval.npz", labels=labels)
    fb = report["fallback"]
    assert fb["met"] and (fb["float"]["accuracy"] - fb["final"]["accuracy"]) * 100 <= 0.5
    out = tmp_path / "q.onnx"
    argv = ["quantize", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--calibration", str(MODELS / "digits_calib.npz"),
            "--fidelity-target", "30", "--max-samples", "32", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fallback"]["met"] and report["fallback"]["final"]["sqnr_db"] >= 30


def test_latency_aware_reports_measurements(rng):
    model, report = quantize_with_fallback(_model_with_a_fragile_layer(rng), _feeds(rng, 8), QuantizeConfig(),
                                           latency_aware=True, executor=concurrent.futures.ThreadPoolExecutor(1))
    lat = report["latency"]
    assert set(lat["ratios_to_all_int8"]) == {"MatMul float", "float"}
    assert isinstance(lat["int8_slower_than_float"], bool)
    assert set(report["float_nodes"]) | set(report["int8_nodes"]) == {"mm1", "mm2", "mm3"}


def test_sensitivity_cli(capsys):
    argv = ["sensitivity", str(MODELS / "digits_mlp.onnx"), "--calibration", str(MODELS / "digits_calib.npz"),
            "--max-eval-feeds", "16", "--workers", "2", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["nodes"]) == 3 and report["candidates_evaluated"] == 7


def test_fallback_refuses_no_target(rng):
    with pytest.raises(ConfigError, match="fidelity_target"):
        quantize_with_fallback(_model_with_a_fragile_layer(rng), _feeds(rng, 4))
    with pytest.raises(ConfigError, match="labels"):
        quantize_with_fallback(_model_with_a_fragile_layer(rng), _feeds(rng, 4), max_drop=1.0)


def test_variants_only_drop_int8_nodes(rng):
    """Keeping a MatMul float must not tip its bias Add into int8: that Add's output was never
    calibrated (the base plan left it float for onnxruntime's MatMulIntegerToFloat fusion)."""
    from onnxcomp.quant.sensitivity import QuantStudy
    from onnxcomp.testing import run_model

    f32 = np.float32
    proto = make_proto(
        [oh.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), oh.make_node("Add", ["h", "b1"], ["a"], name="bias1"),
         oh.make_node("Relu", ["a"], ["r"], name="relu"), oh.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
        [("x", ["N", 4, 16])], [("y", ["N", 4, 8])],
        [("w1", rng.standard_normal((16, 32)).astype(f32)), ("b1", rng.standard_normal(32).astype(f32)),
         ("w2", rng.standard_normal((32, 8)).astype(f32))])
    calib = [{"x": rng.standard_normal((1, 4, 16)).astype(f32)} for _ in range(8)]
    study = QuantStudy.prepare(proto, calib)
    assert "bias1" not in study.nodes
    variant = study.build({"mm1"})
    out = run_model(variant, calib[:2])
    assert np.isfinite(out[0][0]).all()
    ops = {n.name: n.op_type for n in variant.graph}
    assert "bias1" in ops and not any(n.op_type == "QuantizeLinear" and n.inputs[0].name == "a" for n in variant.graph)


@pytest.mark.parametrize("int8_slower", [True, False])
def test_latency_aware_decision_follows_the_measured_intervals(rng, monkeypatch, int8_slower):
    """With the latency measurement stubbed, the decision is deterministic: an op type goes float
    only when the whole 95% interval of 'that type float' / 'all int8' is below 1; then, when
    the float model is measurably faster than what is left in int8, all of it stays float."""
    import onnxcomp.measure.bench as bench
    from test_quant_static import _hardswish_se_proto

    intervals = {"Mul float": [0.6, 0.8],  # clearly faster in float: kept float
                 "Conv float": [1.1, 1.3],  # slower in float: stays int8
                 "float": [0.5, 0.7] if int8_slower else [1.2, 1.5]}
    measured = []

    def stub_bench(variants, feeds, **kw):
        measured.extend(name for name, _ in variants)
        rows = [{"name": variants[0][0], "ratio_to_first": None, "ratio_ci95": None}]
        for name, _ in variants[1:]:
            lo, hi = intervals.get(name, [0.95, 1.05])  # straddles 1: inconclusive, stays int8
            rows.append({"name": name, "ratio_to_first": (lo + hi) / 2, "ratio_ci95": [lo, hi]})
        return rows

    monkeypatch.setattr(bench, "bench_models", stub_bench)
    proto = _hardswish_se_proto(rng)
    calib = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    model, report = quantize_with_fallback(proto, calib, QuantizeConfig(), latency_aware=True,
                                           executor=concurrent.futures.ThreadPoolExecutor(1))
    ops = {n.name: n.op_type for n in model.graph}
    planned = report["float_nodes"] + report["int8_nodes"]
    lat = report["latency"]
    # the op-type comparison (all int8 first, float last), then int8 with Mul float against float
    assert measured[0] == "all int8" and measured[-3] == "float" and measured[-2:] == ["int8", "float"]
    assert set(measured[1:-3]) == {f"{ops[n]} float" for n in planned} >= {"Mul float", "Conv float", "Add float"}
    assert lat["op_types_kept_float"] == ["Mul"]
    assert lat["int8_pays"] is not int8_slower and lat["float_to_int8_ci95"] == intervals["float"]
    if int8_slower:
        # int8 does not pay: the written model is the float one, and says so
        assert report["int8_nodes"] == [] and sorted(report["float_nodes"]) == sorted(planned)
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)
        assert report["history"][-1]["int8_does_not_pay"] and not report["met"]
        assert "fallback_latency" not in report
        return
    assert sorted(report["float_nodes"]) == sorted(n for n in planned if ops[n] == "Mul") == ["hs_mul", "se_mul"]
    assert {n for n in report["int8_nodes"] if ops[n] == "Conv"} == {"conv0", "se_conv1", "se_conv2", "conv1"}
    assert lat["int8_slower_than_float"] is int8_slower
    assert report["history"][-1]["float_nodes"] == report["float_nodes"]
    # onnxruntime really runs the Muls in float and the Convs in int8
    from onnxcomp import runtime

    optimized = [n.op_type for n in runtime.ort_optimized_model(model).graph]
    assert "QLinearMul" not in optimized and optimized.count("Mul") == 2
    assert optimized.count("QLinearConv") == 4


@pytest.mark.parametrize("strict", [False, True])
def test_cli_says_int8_does_not_pay_and_writes_the_float_model(tmp_path, capsys, monkeypatch, strict):
    """--latency-aware on a CPU where int8 buys nothing (stubbed: every float variant measured
    faster): the written model is float, the terminal says why, and --strict calls that a run that
    compressed nothing (exit 3)."""
    import onnxcomp.measure.bench as bench
    from onnxcomp import io

    def stub_bench(variants, feeds, **kw):
        rows = [{"name": variants[0][0], "ratio_to_first": None, "ratio_ci95": None}]
        rows += [{"name": name, "ratio_to_first": 0.7, "ratio_ci95": [0.6, 0.8]} for name, _ in variants[1:]]
        return rows

    monkeypatch.setattr(bench, "bench_models", stub_bench)
    out = tmp_path / "out.onnx"
    argv = ["quantize", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--calibration",
            str(MODELS / "digits_calib.npz"), "--latency-aware", "--no-latency", "--max-samples", "32"]
    code = main(argv + (["--strict"] if strict else []))
    said = capsys.readouterr()
    assert code == (3 if strict else 0), said.err
    text = " ".join((said.out + said.err).split())
    assert "int8 does not pay on this model on this CPU" in text and "the model is written float" in text
    assert "fidelity budget NOT met" not in text
    written = io.load_model(out)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in written.graph)


def test_compress_stage_line_says_int8_does_not_pay():
    from onnxcomp.report import _stage_line

    stats = {"mode": "static", "int8_nodes": 0, "skipped": {"c1": "kept float: ..."},
             "fallback": {"eval_samples": 13, "eval_data": "the calibration data",
                          "latency": {"int8_pays": False, "float_to_int8_ci95": [0.95, 0.99]}}}
    line = _stage_line({"stage": "quantize", "stats": stats})
    assert "int8 does not pay on this CPU" in line and "[0.95, 0.99]" in line and "budget judged" not in line
    stats["fallback"]["latency"] = {"int8_pays": True, "float_to_int8_ci95": [1.1, 1.2]}
    assert "budget judged on 13 sample(s)" in _stage_line({"stage": "quantize", "stats": stats})
