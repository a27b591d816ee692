"""Tests of the interleaved latency runner.  No timing is asserted: the machine is shared."""

from __future__ import annotations

import gc
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.measure.latency import (
    GRAPH_OPTIMIZATION_LEVELS,
    LatencyResult,
    MeasurementError,
    SessionCreationError,
    SessionSpec,
    measure_latency,
)

N = 64


def _matmul_relu(seed: int = 0, n: int = N) -> bytes:
    w = np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "matmul_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _broken_graph() -> bytes:
    # Valid protobuf, but the node reads a tensor that nothing produces.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["z"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, N])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return _matmul_relu()


@pytest.fixture(scope="module")
def feeds() -> list[dict[str, np.ndarray]]:
    rngs = [np.random.default_rng(i) for i in range(3)]
    return [{"x": rng.standard_normal((1, N)).astype(np.float32)} for rng in rngs]


FAST = {"warmup_runs": 2, "warmup_seconds": 0.0}


def test_runs_per_model_and_ratios(model_bytes: bytes, feeds: list) -> None:
    specs = [
        SessionSpec("fp32", model_bytes),
        SessionSpec("one-thread", model_bytes, threads=1),
        SessionSpec("unoptimized", _matmul_relu(seed=1), graph_optimization="disable"),
    ]
    results = measure_latency(specs, feeds, runs=12, seed=3, n_boot=200, **FAST)
    assert [r.name for r in results] == ["fp32", "one-thread", "unoptimized"]
    for r in results:
        assert isinstance(r, LatencyResult)
        assert len(r.times) == 12 and r.summary.n == 12
        assert all(t > 0 for t in r.times)
        assert r.summary.median == pytest.approx(float(np.median(r.times)))
        assert r.session_creation_s > 0
        assert r.warmup_runs >= 2
        assert r.memory_method in {"vmhwm", "vmrss", "maxrss", "none"}
        assert (r.peak_rss_delta_bytes is None) == (r.memory_method == "none")
        if r.peak_rss_delta_bytes is not None:
            assert r.peak_rss_delta_bytes >= 0
    first, *others = results
    assert first.ratio is None and first.ratio_interval is None and first.speedup is None
    for r in others:
        assert r.ratio == pytest.approx(r.summary.median / first.summary.median)
        assert r.ratio_interval is not None
        lo, hi = r.ratio_interval
        assert 0 < lo <= hi and math.isfinite(hi)
        assert r.speedup == pytest.approx(1.0 / r.ratio)


class _StubClock:
    """Stands in for the ``time`` module of the latency runner: time moves only when a model runs."""

    def __init__(self) -> None:
        self.ns = 0

    def perf_counter_ns(self) -> int:
        return self.ns


class _LoggedSession:
    """A real onnxruntime session whose runs are logged and cost exactly 1 ms on the stub clock."""

    def __init__(self, name, session, log, clock) -> None:
        self._name, self._session, self._log, self._clock = name, session, log, clock

    def __getattr__(self, attr):
        return getattr(self._session, attr)

    def run(self, output_names, feed):
        self._log.append((self._name, id(feed)))
        self._clock.ns += 1_000_000
        return self._session.run(output_names, feed)


@pytest.mark.parametrize("seed", [0, None])
def test_same_model_twice_is_measured_symmetrically(model_bytes: bytes, feeds: list, monkeypatch, seed) -> None:
    """Every round runs each model once on the same feed, each model takes the first place in some
    rounds (with a seed), and equal run costs give exactly equal times: ratio 1, interval [1, 1]."""
    import onnxcomp.measure.latency as latency

    clock, log = _StubClock(), []
    real_create = SessionSpec.create_session
    monkeypatch.setattr(latency, "time", clock)
    monkeypatch.setattr(SessionSpec, "create_session",
                        lambda spec: _LoggedSession(spec.name, real_create(spec), log, clock))
    runs = 8
    results = measure_latency(
        [SessionSpec("a", model_bytes), SessionSpec("b", model_bytes)], feeds, runs=runs, seed=seed, n_boot=100, **FAST
    )
    assert [r.warmup_runs for r in results] == [2, 2]
    rounds = [log[4 + 2 * r : 6 + 2 * r] for r in range(runs)]  # after 2 warm-up runs of each
    assert len(log) == 4 + 2 * runs
    for (first, feed_1), (second, feed_2) in rounds:
        assert {first, second} == {"a", "b"} and feed_1 == feed_2
    firsts = [rnd[0][0] for rnd in rounds]
    if seed is None:
        assert firsts == ["a"] * runs
    else:
        assert 0 < firsts.count("a") < runs, firsts  # the order changes between rounds
    assert [r.times for r in results] == [(0.001,) * runs] * 2
    assert results[1].ratio == 1.0 and results[1].ratio_interval == (1.0, 1.0)


def test_warmup_runs_is_honoured(model_bytes: bytes, feeds: list) -> None:
    spec = SessionSpec("m", model_bytes)
    (r,) = measure_latency([spec], feeds, warmup_runs=7, warmup_seconds=0.0, runs=2)
    assert r.warmup_runs == 7
    (r0,) = measure_latency([spec], feeds, warmup_runs=0, warmup_seconds=0.0, runs=1)
    assert r0.warmup_runs == 0 and len(r0.times) == 1


def test_time_budget_stops_after_a_full_round(model_bytes: bytes, feeds: list) -> None:
    specs = [SessionSpec("a", model_bytes), SessionSpec("b", model_bytes)]
    results = measure_latency(specs, feeds, runs=1000, time_budget=1e-9, n_boot=50, **FAST)
    # The budget is checked after each complete round, so both models ran exactly once.
    assert [len(r.times) for r in results] == [1, 1]
    assert results[1].ratio_interval is not None


def test_progress_callback(model_bytes: bytes, feeds: list) -> None:
    calls: list[tuple[int, int]] = []
    measure_latency(
        [SessionSpec("a", model_bytes), SessionSpec("b", model_bytes)],
        feeds,
        runs=5,
        progress=lambda done, total: calls.append((done, total)),
        n_boot=50,
        **FAST,
    )
    assert calls == [(0, 10), (2, 10), (4, 10), (6, 10), (8, 10), (10, 10)]
    assert gc.isenabled()  # disabled only during the rounds


def test_batch_size_scales_items_per_second(model_bytes: bytes, feeds: list) -> None:
    (r,) = measure_latency([SessionSpec("m", model_bytes)], feeds, runs=3, batch_size=16, **FAST)
    assert r.summary.batch_size == 16
    assert r.summary.items_per_s == pytest.approx(16 * r.summary.throughput)


@pytest.mark.parametrize("level", sorted(GRAPH_OPTIMIZATION_LEVELS))
def test_every_optimization_level_runs(model_bytes: bytes, feeds: list, level: str) -> None:
    (r,) = measure_latency(
        [SessionSpec(level, model_bytes, graph_optimization=level, threads=1, allow_spinning=True)],
        feeds,
        runs=2,
        **FAST,
    )
    assert len(r.times) == 2


# ----------------------------------------------------------------------------- failures


def test_session_creation_failure_names_spec_and_ort_message(
    model_bytes: bytes, feeds: list
) -> None:
    specs = [SessionSpec("good", model_bytes), SessionSpec("garbage-int8", b"not a model")]
    with pytest.raises(SessionCreationError, match="'garbage-int8'") as info:
        measure_latency(specs, feeds, runs=2, **FAST)
    err = info.value
    assert err.spec_name == "garbage-int8"
    assert err.ort_message and err.ort_message in str(err)
    assert "protobuf" in err.ort_message.lower()
    assert isinstance(err, MeasurementError) and isinstance(err, RuntimeError)


def test_invalid_graph_failure_names_spec(feeds: list) -> None:
    with pytest.raises(SessionCreationError, match="'pruned-badly'") as info:
        measure_latency([SessionSpec("pruned-badly", _broken_graph())], feeds, runs=1, **FAST)
    assert "nowhere" in info.value.ort_message


def test_run_failure_names_spec(model_bytes: bytes) -> None:
    bad = [{"x": np.zeros((1, N), dtype=np.float64)}]  # wrong dtype
    with pytest.raises(MeasurementError, match="'m'") as info:
        measure_latency([SessionSpec("m", model_bytes)], bad, runs=1, **FAST)
    assert info.value.spec_name == "m"


def test_feed_mismatch_names_spec_and_inputs(model_bytes: bytes) -> None:
    pattern = r"feeds\[1\].*'m'.*missing inputs \['x'\].*unknown inputs \['y'\]"
    with pytest.raises(ValueError, match=pattern):
        measure_latency(
            [SessionSpec("m", model_bytes)],
            [{"x": np.zeros((1, N), np.float32)}, {"y": np.zeros((1, N), np.float32)}],
            runs=1,
            **FAST,
        )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "", "model": b"x"}, "name"),
        ({"name": "m", "model": b""}, "model"),
        ({"name": "m", "model": "text"}, "model"),
        ({"name": "m", "model": b"x", "threads": 0}, "threads"),
        ({"name": "m", "model": b"x", "threads": True}, "threads"),
        ({"name": "m", "model": b"x", "graph_optimization": "max"}, "graph_optimization"),
        ({"name": "m", "model": b"x", "providers": ()}, "providers"),
    ],
)
def test_session_spec_refuses(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SessionSpec(**kwargs)


def test_session_spec_is_frozen_and_repr_hides_bytes(model_bytes: bytes) -> None:
    spec = SessionSpec("m", bytearray(model_bytes))  # type: ignore[arg-type]
    assert isinstance(spec.model, bytes)
    assert "model=" not in repr(spec)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"runs": 0}, "runs"),
        ({"warmup_runs": -1}, "warmup_runs"),
        ({"warmup_seconds": -0.5}, "warmup_seconds"),
        ({"time_budget": 0}, "time_budget"),
        ({"progress": 3}, "progress"),
        ({"n_boot": 0}, "n_boot"),
        ({"confidence": 1.5}, "confidence"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_measure_latency_refuses_arguments(
    model_bytes: bytes, feeds: list, kwargs: dict, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        measure_latency([SessionSpec("m", model_bytes)], feeds, **kwargs)


def test_measure_latency_refuses_bad_specs_and_feeds(model_bytes: bytes, feeds: list) -> None:
    with pytest.raises(ValueError, match="specs is empty"):
        measure_latency([], feeds)
    with pytest.raises(ValueError, match="feeds is empty"):
        measure_latency([SessionSpec("m", model_bytes)], [])
    with pytest.raises(ValueError, match=r"duplicate names \['m'\]"):
        measure_latency([SessionSpec("m", model_bytes), SessionSpec("m", model_bytes)], feeds)
    with pytest.raises(ValueError, match=r"feeds\[0\]"):
        measure_latency([SessionSpec("m", model_bytes)], [np.zeros(3)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"specs\[0\]"):
        measure_latency([model_bytes], feeds)  # type: ignore[list-item]
