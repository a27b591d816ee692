"""Thread-aware latency decisions: ``--threads N`` reaches every measurement and decision, and the
report says when the int8 model is slower than the float one at that thread count and why.

Speed is never asserted: the decision logic runs on measured numbers injected here (a tiny model
of small MatMuls and Adds, where Q/DQ overhead can outweigh the int8 kernels, is the realistic
case), and the real measurements are only checked to be consistent with their own verdict.
"""

from __future__ import annotations

import json

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.measure import bench
from onnxcomp.measure.latency import explain_int8_latency, op_type_times
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.sensitivity import quantize_with_fallback


def _tiny_chain(rng, width: int = 8, depth: int = 6):
    """x[1,W] -> (MatMul W x W -> Add b) x depth: tiny ops, so each Q/DQ costs about as much as the
    int8 kernel it feeds."""
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        nodes += [oh.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), oh.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        inits += [(f"w{i}", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)),
                  (f"b{i}", (rng.standard_normal(width) * 0.1).astype(np.float32))]
        prev = f"a{i}"
    nodes.append(oh.make_node("Identity", [prev], ["y"]))
    return make_proto(nodes, [("x", [1, width])], [("y", [1, width])], inits)


@pytest.fixture
def tiny(tmp_path, rng):
    model = tmp_path / "tiny.onnx"
    model.write_bytes(_tiny_chain(rng).SerializeToString())
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((40, 1, 8)).astype(np.float32))
    return model, calib


def _rows(ratio: float, interval: tuple[float, float]) -> list[dict]:
    return [{"name": "float", "ratio_to_first": None, "ratio_ci95": None, "median_ms": 1.0},
            {"name": "int8", "ratio_to_first": ratio, "ratio_ci95": list(interval), "median_ms": ratio}]


INT8_OPS = {"QuantizeLinear": 0.0030, "DequantizeLinear": 0.0020, "MatMulIntegerToFloat": 0.0012, "Add": 0.0004}
FLOAT_OPS = {"MatMul": 0.0010, "Add": 0.0004}


@pytest.fixture
def injected(monkeypatch):
    """bench_models and op_type_times return the numbers the test sets; calls are recorded."""
    state = {"ratio": 1.6, "interval": (1.4, 1.8), "bench_threads": [], "profiled": []}

    def fake_bench(models, feeds, *, threads=None, **kw):
        state["bench_threads"].append(threads)
        rows = [dict(r) for r in _rows(state["ratio"], state["interval"])]
        for row, (name, _) in zip(rows, models):
            row["name"] = name
        return rows

    def fake_profile(model, feeds, *, threads, runs=10):
        int8 = any(n.op_type == "QuantizeLinear" for n in model.graph)
        state["profiled"].append((threads, "int8" if int8 else "float"))
        return dict(INT8_OPS if int8 else FLOAT_OPS)

    monkeypatch.setattr(bench, "bench_models", fake_bench)
    monkeypatch.setattr(bench, "op_type_times", fake_profile)
    return state


@pytest.mark.parametrize("threads", [1, 2])
def test_verdict_names_the_qdq_overhead_when_int8_is_slower(threads):
    verdict = explain_int8_latency(1.6, (1.4, 1.8), threads, INT8_OPS, FLOAT_OPS, unfused_dequantize=3)
    assert verdict["int8_slower"] and verdict["significant"] and verdict["threads"] == threads
    causes = [c["op_type"] for c in verdict["causes"]]
    assert causes == ["QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat"]  # most added time first
    by_op = {c["op_type"]: c for c in verdict["causes"]}
    assert by_op["MatMulIntegerToFloat"]["added_ms"] == pytest.approx(0.2)  # against float MatMul's 1.0 ms
    assert "3 unfused Q/DQ pair(s)" in by_op["DequantizeLinear"]["why"]
    assert "Q/DQ conversion" in by_op["QuantizeLinear"]["why"]
    assert f"SLOWER than float at {threads} thread(s)" in verdict["summary"]
    assert "QuantizeLinear" in verdict["summary"]


@pytest.mark.parametrize("threads", [1, 2])
def test_verdict_when_int8_is_faster_or_within_noise(threads):
    faster = explain_int8_latency(0.7, (0.6, 0.8), threads, {}, {})
    assert not faster["int8_slower"] and faster["causes"] == [] and "faster" in faster["summary"]
    noisy = explain_int8_latency(1.05, (0.95, 1.15), threads, INT8_OPS, FLOAT_OPS)
    assert noisy["int8_slower"] and not noisy["significant"] and "within noise" in noisy["summary"]
    # an op type the int8 kernels replaced only in part is not blamed for its float remainder
    partial = explain_int8_latency(1.2, (1.1, 1.3), threads, {"QLinearAdd": 0.001, "Add": 0.002}, {"Add": 0.001})
    assert [c["op_type"] for c in partial["causes"]] == []


def test_int8_kernels_are_compared_with_the_fused_float_ops_they_replace():
    # onnxruntime runs most float Convs as FusedConv (Conv + activation): both count as float Conv time
    verdict = explain_int8_latency(1.3, (1.2, 1.4), 2, {"QLinearConv": 0.0020, "QuantizeLinear": 0.0004},
                                   {"Conv": 0.0005, "FusedConv": 0.0012})
    by_op = {c["op_type"]: c for c in verdict["causes"]}
    assert by_op["QLinearConv"]["added_ms"] == pytest.approx(0.3)
    assert by_op["QLinearConv"]["float_ms"] == pytest.approx(1.7)
    # two kernels replacing MatMul share its float time in proportion to their own
    shared = explain_int8_latency(1.3, (1.2, 1.4), 1, {"MatMulIntegerToFloat": 0.003, "QLinearMatMul": 0.001},
                                  {"FusedMatMul": 0.002})
    by_op = {c["op_type"]: c for c in shared["causes"]}
    assert by_op["MatMulIntegerToFloat"]["added_ms"] == pytest.approx(1.5)
    assert by_op["QLinearMatMul"]["added_ms"] == pytest.approx(0.5)


@pytest.mark.parametrize("threads", [1, 2])
def test_quantize_with_threads_reports_int8_slower(tiny, tmp_path, capsys, injected, threads):
    model, calib = tiny
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--threads", str(threads),
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    verdict = report["int8_latency"]
    assert verdict["threads"] == threads and verdict["int8_slower"] and verdict["ratio"] == 1.6
    assert verdict["causes"][0]["op_type"] == "QuantizeLinear"
    assert set(injected["bench_threads"]) == {threads}
    assert sorted(injected["profiled"]) == [(threads, "float"), (threads, "int8")]
    # the terminal says it in one line next to the check
    code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--threads", str(threads),
                 "--force"])
    text = capsys.readouterr().out
    assert code == 0 and f"int8 is SLOWER than float at {threads} thread(s)" in " ".join(text.split())


def test_quantize_with_threads_when_int8_is_faster_profiles_nothing(tiny, tmp_path, capsys, injected):
    injected["ratio"], injected["interval"] = 0.8, (0.7, 0.9)
    model, calib = tiny
    code = main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(calib),
                 "--threads", "2", "--json"])
    verdict = json.loads(capsys.readouterr().out)["int8_latency"]
    assert code == 0 and not verdict["int8_slower"] and verdict["causes"] == []
    assert injected["profiled"] == []


def test_quantize_with_no_latency_measures_nothing(tiny, tmp_path, capsys, injected):
    model, calib = tiny
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(calib), "--json",
                 "--no-latency"]) == 0
    assert "int8_latency" not in json.loads(capsys.readouterr().out)
    assert injected["bench_threads"] == []


@pytest.mark.parametrize("threads", [1, 2])
def test_compress_with_threads_measures_and_explains_at_that_count(tiny, tmp_path, capsys, injected, threads):
    model, calib = tiny
    recipe = tmp_path / "r.toml"
    recipe.write_text("[quantize]\n[measure]\nlatency = false\n")  # --threads turns latency on
    code = main(["compress", str(model), "-o", str(tmp_path / "c.onnx"), "--calibration", str(calib),
                 "--recipe", str(recipe), "--threads", str(threads), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    measure = report["measure"]
    assert measure["threads"] == threads and set(injected["bench_threads"]) == {threads}
    assert measure["int8_latency"]["int8_slower"] and measure["int8_latency"]["threads"] == threads
    assert [c["op_type"] for c in measure["int8_latency"]["causes"]][:2] == ["QuantizeLinear", "DequantizeLinear"]


def test_compress_default_threads_are_onnxruntimes(tiny, tmp_path, capsys, injected):
    model, calib = tiny
    code = main(["compress", str(model), "-o", str(tmp_path / "c.onnx"), "--calibration", str(calib), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["measure"]["threads"] == bench.physical_cores()
    assert set(injected["bench_threads"]) == {None}  # None: onnxruntime's default in the session


def test_latency_aware_fallback_measures_at_the_given_threads(tiny, injected, monkeypatch):
    model, calib = tiny
    import onnxcomp.measure.bench as bench_module

    seen = []
    real = bench_module.bench_models

    def recording(models, feeds, *, threads=None, **kw):
        seen.append(threads)
        rows = real(models, feeds, threads=threads, **kw)
        for row in rows[1:]:
            row["ratio_ci95"] = [0.9, 1.1]  # nothing measurably slower or faster: int8 stays
        return rows

    monkeypatch.setattr(bench_module, "bench_models", recording)
    _, report = quantize_with_fallback(str(model), str(calib), QuantizeConfig(), latency_aware=True, threads=2)
    assert seen and set(seen) == {2}
    assert report["latency"]["threads"] == 2 and report["latency"]["int8_pays"] is True


@pytest.mark.parametrize("threads", [1, 2])
def test_real_measurement_agrees_with_its_own_verdict(rng, tmp_path, threads):
    """No injection: whatever the machine measures, the verdict follows the measured ratio and,
    when int8 is slower, blames op types the int8 model really runs."""
    from onnxcomp.quant.api import quantize

    model = io.load_model(_tiny_chain(rng))
    feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(8)]
    int8, _ = quantize(model, feeds, QuantizeConfig())
    verdict = bench.int8_latency_report(model, int8, feeds, threads=threads, runs=15, time_budget=5.0)
    assert verdict["threads"] == threads
    assert verdict["int8_slower"] == (verdict["ratio"] > 1.0)
    profiled = op_type_times(int8, feeds, threads=threads, runs=3)
    assert profiled and all(t >= 0 for t in profiled.values())
    if verdict["int8_slower"]:
        assert {c["op_type"] for c in verdict["causes"]} <= set(op_type_times(int8, feeds, threads=threads, runs=3))


# --------------------------------------------------------------------------------------------
# The fallback by blocks (fast enough on PP-OCR det), with capped live sessions


def _long_chain_with_a_fragile_layer(rng, depth: int = 20, fragile: int = 11):
    """``depth`` MatMul+Relu layers; layer ``fragile`` has one huge weight outlier (per-tensor int8 ruins it)."""
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((16, 16)).astype(np.float32) * 0.3
        if i == fragile:
            w[0, 0] = 60.0
        nodes += [oh.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  oh.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        inits.append((f"w{i}", w))
        prev = f"r{i}"
    nodes.append(oh.make_node("Identity", [prev], ["y"], name="out"))
    return make_proto(nodes, [("x", ["N", 16])], [("y", ["N", 16])], inits)


def test_damage_is_not_inherited_through_a_folded_relu(rng):
    """The Relu after each MatMul is folded into the int8 MatMul's output range, so its output
    exists only in the float model: the next node's input noise is read before it, and the nodes
    after the fragile one do not count the noise they receive as noise they add."""
    from onnxcomp.quant.damage import ranked_blocks
    from onnxcomp.quant.sensitivity import QuantStudy

    proto = _long_chain_with_a_fragile_layer(rng)
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(16)]
    # 7-bit weights, as on a CPU without VNNI, whatever this one has (with 8 bits the damage is
    # 0.25 on this seed, 0.81 with 7)
    config = QuantizeConfig(per_channel=False, activation_type="int8", weight_range="reduced")
    study = QuantStudy.prepare(proto, feeds, config)
    blocks, damage = ranked_blocks(study, study.nodes)
    assert "mm11" in blocks[0], blocks[:3]
    assert damage["mm11"] > 0.5  # it turns a 20 dB signal into a ~1 dB one
    assert max(damage[f"mm{i}"] for i in range(12, 20)) < damage["mm11"] / 3, damage


def test_damage_of_a_node_that_writes_a_graph_output(rng):
    """The fragile node is the last one, its output the model's: it is measured there (it ranked
    at zero damage, last, when graph outputs were left out of the per-layer comparison)."""
    from onnxcomp.quant.damage import ranked_blocks
    from onnxcomp.quant.sensitivity import QuantStudy

    proto = _long_chain_with_a_fragile_layer(rng, depth=6, fragile=5)
    graph = proto.graph
    last = [n for n in graph.node if n.name == "relu5"][0]
    graph.node.remove(last)
    graph.node.remove([n for n in graph.node if n.name == "out"][0])
    graph.node[-1].output[0] = "y"  # mm5 writes the graph output
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(8)]
    study = QuantStudy.prepare(proto, feeds, QuantizeConfig(per_channel=False, activation_type="int8"))
    assert study.nodes[-1] == "mm5"
    blocks, damage = ranked_blocks(study, study.nodes)
    assert blocks[0] == ["mm5"], blocks
    assert damage["mm5"] > 5 * max(damage[f"mm{i}"] for i in range(5)), damage


def test_fallback_by_blocks_keeps_only_the_fragile_node_float(rng, monkeypatch):
    import concurrent.futures

    import onnxcomp.quant.sensitivity as sensitivity

    proto = _long_chain_with_a_fragile_layer(rng)
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(16)]
    config = QuantizeConfig(per_channel=False, activation_type="int8", weight_range="reduced")  # as on AVX2
    evaluated = []
    real = sensitivity.QuantStudy.evaluate

    def counting(self, models, executor=None, progress=None):
        evaluated.append(len(models))
        return real(self, models, executor, progress)

    monkeypatch.setattr(sensitivity.QuantStudy, "evaluate", counting)
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        model, report = quantize_with_fallback(proto, feeds, config, fidelity_target=13.0, executor=executor)
    assert report["met"] and report["final"]["sqnr_db"] >= 13.0  # all int8: 1.7 dB, mm11 float: 14.4 dB
    assert report["float_nodes"] == ["mm11"], report["float_nodes"]
    assert report["history"][-1]["refined"] and report["history"][-1]["float_nodes"] == ["mm11"]
    # 20 nodes in 10 blocks of 2 ranked by their noise: the first block meets the target, found by
    # bisection (log2 10 + 1 evaluations), and its second node goes back to int8 (one more)
    assert sum(evaluated) <= 7, evaluated


def test_latency_comparisons_keep_at_most_six_sessions_alive(monkeypatch):
    import onnxcomp.measure.bench as bench_module
    from onnxcomp.quant import sensitivity

    groups = []

    def fake(models, feeds, **kw):
        groups.append([name for name, _ in models])
        return [{"name": name, "ratio_to_first": None if i == 0 else 1.0 + i / 100, "ratio_ci95": None}
                for i, (name, _) in enumerate(models)]

    monkeypatch.setattr(bench_module, "bench_models", fake)
    variants = [(f"v{i}", None) for i in range(13)]
    rows = sensitivity._bench_capped(variants, [], threads=2)
    assert [len(g) for g in groups] == [6, 6, 3] and all(g[0] == "v0" for g in groups)
    assert [r["name"] for r in rows] == [f"v{i}" for i in range(13)]
