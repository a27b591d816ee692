"""``auto`` / ``per-tensor`` plan once, on the min/max extent: one coarse-grid pass over the data,
the same plan for every variant, and the same plan in the sensitivity / fallback study."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import graph
from onnxcomp.quant import static
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.sensitivity import QuantStudy


def _heavy_tailed_concat():
    """A Concat of a heavy-tailed branch (Cauchy input) and a Gaussian one: on the min/max extent
    the inputs' ranges differ thousands of times (mixed-range rule); on the MSE ranges they do not,
    and the coarse-grid rule keeps it float for another reason."""
    rng = np.random.default_rng(5)
    proto = make_proto(
        [oh.make_node("Conv", ["x1", "wa"], ["a"], name="conv_a"),
         oh.make_node("Conv", ["x2", "wb"], ["b"], name="conv_b"),
         oh.make_node("Concat", ["a", "b"], ["c"], axis=1, name="concat"),
         oh.make_node("Conv", ["c", "wc"], ["y"], name="conv_c")],
        [("x1", [1, 8, 16, 16]), ("x2", [1, 8, 16, 16])], [("y", [1, 4, 16, 16])],
        [("wa", (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)),
         ("wb", (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)),
         ("wc", rng.standard_normal((4, 8, 1, 1)).astype(np.float32))])
    feeds = [{"x1": rng.standard_t(1.0, (1, 8, 16, 16)).astype(np.float32),
              "x2": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    return proto, feeds


@pytest.fixture
def passes(monkeypatch):
    """Counts of the coarse-grid rule's calls and of the passes over the data it streams."""
    counts = {"coarse_grid": 0, "streamed": 0}
    rule, stream = static.coarse_grid_nodes, graph.stream_values

    def counted_rule(*args, **kwargs):
        counts["coarse_grid"] += 1
        return rule(*args, **kwargs)

    def counted_stream(*args, **kwargs):
        counts["streamed"] += 1
        return stream(*args, **kwargs)

    monkeypatch.setattr(static, "coarse_grid_nodes", counted_rule)
    monkeypatch.setattr(graph, "stream_values", counted_stream)  # coarse_grid_nodes imports it when called
    return counts


def _structure(model) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in model.graph]


@pytest.mark.parametrize("method", ["auto", "per-tensor"])
def test_candidate_methods_stream_the_coarse_grid_pass_once(passes, method):
    proto, feeds = _heavy_tailed_concat()
    quantized, report = quantize(proto, feeds, QuantizeConfig(calibration=method), verify=False)
    assert passes == {"coarse_grid": 1, "streamed": 1}
    assert report["calibration"]["selected"]["variant"]  # the variants were compared
    # the plan is the min/max extent's: the min/max run keeps the same nodes float, for the same reasons
    passes.update(coarse_grid=0, streamed=0)
    minmax, minmax_report = quantize(proto, feeds, QuantizeConfig(calibration="minmax"), verify=False)
    assert passes == {"coarse_grid": 1, "streamed": 1}
    assert report["skipped"] == minmax_report["skipped"] and "concat" in report["skipped"]
    # conv_a reads the Cauchy input: each feed brings its own outliers, the largest sets the range
    # and the median feed keeps 7.7 dB on that grid (36.7 dB pooled), so it stays float as well
    assert "on its median calibration feed" in report["skipped"]["conv_a"]
    assert report["int8_nodes"] == minmax_report["int8_nodes"] == 1
    assert _structure(quantized) == _structure(minmax)


def test_the_study_plans_as_quantize_does_under_auto(passes):
    """The fidelity-target and fallback paths (QuantStudy) keep the nodes float that quantize does;
    on the MSE ranges the Concat would have been kept float for another reason."""
    proto, feeds = _heavy_tailed_concat()
    quantized, report = quantize(proto, feeds, QuantizeConfig(calibration="auto"), verify=False)
    study = QuantStudy.prepare(proto, feeds, QuantizeConfig(calibration="auto"))
    assert study.keep_float == {"concat": report["skipped"]["concat"], "conv_a": report["skipped"]["conv_a"]}
    assert sorted(study.nodes) == ["conv_b"]
    _, mse_report = quantize(proto, feeds, QuantizeConfig(calibration="mse"), verify=False)
    assert "8-bit grid" in mse_report["skipped"]["concat"]  # the ranges the study used to plan on
    assert passes["coarse_grid"] == 3  # one per calibration
    assert _structure(study.build()) == _structure(quantized)  # the all-int8 candidate is quantize's model
