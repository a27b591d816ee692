"""Review of the isolated-damage ranking (onnxcomp.quant.damage) and the latency-aware int8
decision (onnxcomp.quant.sensitivity): cases the first tests did not build."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.damage import isolated_damage, isolated_model, ranked_blocks
from onnxcomp.quant.sensitivity import QuantStudy


def _mlp(rng, *, weights_as_inputs: bool = False, hidden: str = "h") -> onnx.ModelProto:
    """x [4,8] -> mm1 -> Relu -> mm2 -> mm3 -> y; mm2 reads the hidden tensor's narrow channels (fragile).
    ``weights_as_inputs``: the weights are graph inputs with initializers (defaults), as exporters
    of IR < 4 wrote them. ``hidden``: the name of the Relu's output."""
    w1 = (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
    w1[:, 0] *= 300.0  # channel 0 of the hidden tensor is wide: the others get a few steps of its int8 grid
    w2[0] *= 1e-3  # and mm2 hardly reads it: its output is mostly that rounding noise
    w3 = (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             oh.make_node("Relu", ["a"], [hidden], name="relu"),
             oh.make_node("MatMul", [hidden, "w2"], ["b"], name="mm2"),
             oh.make_node("MatMul", ["b", "w3"], ["y"], name="mm3")]
    inputs = [("x", [4, 8])] + ([("w1", [8, 8]), ("w2", [8, 8]), ("w3", [8, 8])] if weights_as_inputs else [])
    return make_proto(nodes, inputs, [("y", [4, 8])], [("w1", w1), ("w2", w2), ("w3", w3)], opset=13)


def _feeds(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(n)]


def _damage(proto: onnx.ModelProto) -> tuple[QuantStudy, dict[str, float]]:
    study = QuantStudy.prepare(proto, _feeds(1, 6), QuantizeConfig())
    damage = isolated_damage(study.work, study.build(frozenset()), study.nodes, _feeds(2, 3))
    return study, damage


def test_weights_that_are_also_graph_inputs():
    """Initializers listed as graph inputs (IR < 4 exports) used to crash isolated_model (the
    int8 copy's weight was still an input of the copy's graph when it moved). The damage is the
    one of the same model written without them."""
    study, damage = _damage(_mlp(np.random.default_rng(0), weights_as_inputs=True))
    _, plain = _damage(_mlp(np.random.default_rng(0)))
    assert damage is not None and set(damage) == set(plain) == {"mm1", "mm2", "mm3"}
    for node in plain:
        assert damage[node] == pytest.approx(plain[node], rel=1e-4, abs=1e-9), (node, damage, plain)
    assert damage["mm2"] > 4 * max(damage["mm1"], damage["mm3"]), damage  # the fragile one is seen
    merged = isolated_model(study.work, study.build(frozenset()))
    assert [v.name for v in merged.graph.inputs] == [v.name for v in study.work.graph.inputs]
    assert not any(name.startswith("int8::int8::") for name in merged.graph.initializers)
    blocks, _ = ranked_blocks(study, study.nodes)
    assert blocks[0] == ["mm2"], blocks


def test_a_model_that_already_names_a_value_with_the_prefix():
    """A value already named ``int8::...`` used to make the merged model define a name twice
    (onnxruntime refused it and the ranking crashed); the chained measure ranks such a model."""
    study = QuantStudy.prepare(_mlp(np.random.default_rng(0), hidden="int8::h"), _feeds(1, 6), QuantizeConfig())
    assert isolated_model(study.work, study.build(frozenset())) is None
    blocks, damage = ranked_blocks(study, study.nodes)
    assert blocks[0] == ["mm2"] and set(damage) == {"mm1", "mm2", "mm3"}, (blocks, damage)


def _quantize_nodes(model) -> int:
    import onnx_ir as ir

    return sum(n.op_type == "QuantizeLinear" for n in ir.traversal.RecursiveGraphIterator(model.graph))


def test_latency_aware_compares_with_the_float_model_where_branches_are_quantized(monkeypatch):
    """With quantized If branches (``units``), the study's ``work`` holds the branches in int8:
    the 'float' side of the latency comparisons used to be that model, so whether int8 pays was
    judged against a model with int8 branches. Latency stubbed; what is compared is checked."""
    import concurrent.futures

    import onnxcomp.measure.bench as bench
    from test_subgraph_compress import _feeds as branch_feeds, model_if_weights

    from onnxcomp.quant.sensitivity import quantize_with_fallback

    compared = []

    def stub_bench(variants, feeds, **kw):
        compared.extend((name, _quantize_nodes(model)) for name, model in variants)
        rows = [{"name": variants[0][0], "ratio_to_first": None, "ratio_ci95": None}]
        rows += [{"name": name, "ratio_to_first": 1.0, "ratio_ci95": [0.95, 1.05]} for name, _ in variants[1:]]
        return rows

    monkeypatch.setattr(bench, "bench_models", stub_bench)
    proto = model_if_weights(np.random.default_rng(7))
    feeds = branch_feeds(proto, 21, 8)
    _, report = quantize_with_fallback(proto, feeds, QuantizeConfig(), latency_aware=True,
                                       executor=concurrent.futures.ThreadPoolExecutor(1))
    floats = [n for name, n in compared if name == "float"]
    assert floats and all(n == 0 for n in floats), compared
    assert any(n > 0 for name, n in compared if name == "all int8"), compared
    assert report["latency"]["int8_pays"] is True  # [0.95, 1.05]: float not measurably faster


def test_latency_aware_with_a_target_checks_what_the_target_leaves_in_int8(monkeypatch):
    """latency_aware with a fidelity target: all int8 is faster than float, but with the fragile
    node moved float for the target, the float model is measurably faster than what is left in
    int8 (latency stubbed by how many tensors a model quantizes). That model used to be written int8, slower than float for the
    accuracy it costs; it is written float, and the report says int8 does not pay."""
    import concurrent.futures

    import onnxcomp.measure.bench as bench
    from test_quant_sensitivity import PER_TENSOR, _feeds as mlp_feeds, _model_with_a_fragile_layer

    from onnxcomp.quant.sensitivity import analyze_sensitivity, quantize_with_fallback

    compared = []

    def stub_bench(variants, feeds, **kw):
        compared.append([(name, _quantize_nodes(m)) for name, m in variants])
        all_int8 = _quantize_nodes(variants[0][1]) >= 3  # x, ra, rb
        rows = [{"name": variants[0][0], "ratio_to_first": None, "ratio_ci95": None}]
        for name, _ in variants[1:]:
            ci = ([1.2, 1.4] if all_int8 else [0.85, 0.98]) if name == "float" else [0.95, 1.05]
            rows.append({"name": name, "ratio_to_first": sum(ci) / 2, "ratio_ci95": ci})
        return rows

    rng = np.random.default_rng(1234)
    proto = _model_with_a_fragile_layer(rng)
    feeds = mlp_feeds(rng)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    sens = analyze_sensitivity(proto, feeds, PER_TENSOR, executor=pool)
    target = next(r for r in sens["nodes"] if r["node"] == "mm2")["all_but_sqnr_db"] - 0.5
    monkeypatch.setattr(bench, "bench_models", stub_bench)
    model, report = quantize_with_fallback(proto, feeds, PER_TENSOR, fidelity_target=target, latency_aware=True,
                                           executor=pool)
    lat = report["latency"]
    assert [("int8", 2), ("float", 0)] in compared, compared  # mm2 float for the target: the rest against float
    assert lat["int8_pays"] is False and lat["float_to_int8_ci95"] == [0.85, 0.98], lat
    assert report["int8_nodes"] == [] and not report["met"] and report["history"][-1]["int8_does_not_pay"]
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)


def test_reasons_of_branches_kept_float_because_int8_is_slower(monkeypatch):
    """A quantized If branch is a candidate whose 'op type' is 'If subgraph'; when that type is
    measured slower in int8 (stubbed), the reason used to say 'int8 is not measurably faster' (or
    'kept float to meet the budget'), as if no node of the graph were named like the branch."""
    import onnxcomp.measure.bench as bench
    from test_subgraph_compress import _feeds as branch_feeds, model_if_weights

    from onnxcomp.quant.api import quantize

    def stub_bench(variants, feeds, **kw):
        rows = [{"name": variants[0][0], "ratio_to_first": None, "ratio_ci95": None}]
        for name, _ in variants[1:]:
            ci = [0.6, 0.8] if name == "If subgraph float" else [1.2, 1.4]
            rows.append({"name": name, "ratio_to_first": sum(ci) / 2, "ratio_ci95": ci})
        return rows

    monkeypatch.setattr(bench, "bench_models", stub_bench)
    proto = model_if_weights(np.random.default_rng(7))
    _, report = quantize(proto, branch_feeds(proto, 21, 8), QuantizeConfig(latency_aware=True))
    assert report["fallback"]["latency"]["op_types_kept_float"] == ["If subgraph"]
    assert set(report["skipped"]) == {"if/then_branch", "if/else_branch"}
    for reason in report["skipped"].values():
        assert reason == "kept float: If subgraph is measured slower in int8 on this CPU", report["skipped"]


def test_a_model_with_external_data_goes_through_the_big_model_session_path(tmp_path):
    """The merged model keeps the float model's external tensors (shared, not copied) and runs
    through the same session path as the models (a temporary folder with linked data): the
    damage is the in-memory model's."""
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(np.random.default_rng(0)), str(path), save_as_external_data=True, size_threshold=0,
              location="mlp.data")
    study = QuantStudy.prepare(io.load_model(str(path)), _feeds(1, 6), QuantizeConfig())
    variant = study.build(frozenset({"mm3"}))
    merged = isolated_model(study.work, variant)
    assert io.holds_external_data(merged)
    damage = isolated_damage(study.work, variant, study.nodes, _feeds(2, 3))
    in_memory = QuantStudy.prepare(_mlp(np.random.default_rng(0)), _feeds(1, 6), QuantizeConfig())
    expected = isolated_damage(in_memory.work, in_memory.build(frozenset({"mm3"})), in_memory.nodes, _feeds(2, 3))
    assert damage["mm3"] == 0.0 and damage["mm2"] > 0.05
    for node in expected:
        assert damage[node] == pytest.approx(expected[node], rel=1e-5, abs=1e-12), (node, damage, expected)


def test_latency_aware_on_a_model_with_nothing_to_quantize_does_not_say_int8_does_not_pay(monkeypatch):
    """No node to quantize: nothing is weighed against float, so no int8-does-not-pay verdict."""
    import onnxcomp.measure.bench as bench
    from onnxcomp.quant.sensitivity import quantize_with_fallback

    def stub_bench(variants, feeds, **kw):
        rows = [{"name": variants[0][0], "ratio_to_first": None, "ratio_ci95": None}]
        rows += [{"name": n, "ratio_to_first": 0.7, "ratio_ci95": [0.6, 0.8]} for n, _ in variants[1:]]
        return rows

    monkeypatch.setattr(bench, "bench_models", stub_bench)
    proto = make_proto([oh.make_node("Transpose", ["x"], ["y"], name="t", perm=[1, 0])], [("x", [4, 3])], [("y", [3, 4])])
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 3)).astype(np.float32)} for i in range(4)]
    _, report = quantize_with_fallback(proto, feeds, QuantizeConfig(), latency_aware=True)
    assert report["int8_nodes"] == [] and report["float_nodes"] == []
    assert "int8_pays" not in report["latency"]
