"""Candidates built where they are evaluated (issue 21): a worker builds from the study's recipe.

The study's build inputs (the prepared model as bytes, config, ranges, plans, finish steps) travel
once per worker; each task carries only its set of float nodes. A candidate built in a worker must
be the parent's build byte for byte, and the sensitivity study must give the same rows in process,
through a process pool and through a Dask ``LocalCluster``.
"""

from __future__ import annotations

import pickle

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto
from test_subgraph_compress import _feeds as _branch_feeds
from test_subgraph_compress import model_if_weights

from onnxcomp.executors import Inline, process_pool, stop_pool
from onnxcomp.io import model_to_bytes
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.quant.sensitivity import QuantStudy, analyze_sensitivity, recipe_study
from onnxcomp.runtime import run_model


def _conv_model(rng):
    """Conv -> Relu -> Conv (+ residual) -> GlobalAveragePool -> Flatten -> MatMul -> Add -> Relu
    -> MatMul: six quantizable nodes, one weight with an outlier (a node that hurts alone)."""
    w1 = (0.3 * rng.standard_normal((8, 4, 3, 3))).astype(np.float32)
    w2 = (0.2 * rng.standard_normal((4, 8, 3, 3))).astype(np.float32)
    w2[0, 0, 1, 1] = 25.0
    m1 = (0.3 * rng.standard_normal((4, 16))).astype(np.float32)
    m2 = (0.3 * rng.standard_normal((16, 5))).astype(np.float32)
    return make_proto(
        [oh.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         oh.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
         oh.make_node("Add", ["c2", "x"], ["s"], name="residual"),
         oh.make_node("GlobalAveragePool", ["s"], ["g"], name="pool"),
         oh.make_node("Flatten", ["g"], ["f"], name="flatten"),
         oh.make_node("MatMul", ["f", "m1"], ["h"], name="fc1"),
         oh.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
         oh.make_node("Relu", ["hb"], ["rh"], name="relu2"),
         oh.make_node("MatMul", ["rh", "m2"], ["y"], name="fc2")],
        [("x", ["N", 4, 6, 6])], [("y", ["N", 5])],
        [("w1", w1), ("w2", w2), ("m1", m1), ("b1", (0.1 * rng.standard_normal(16)).astype(np.float32)), ("m2", m2)],
    )


def _conv_feeds(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)} for _ in range(n)]


CONFIG = QuantizeConfig(per_channel=False, activation_type="int8")


def _candidate_sets(study: QuantStudy) -> list[frozenset[str]]:
    nodes = study.nodes
    sets = [frozenset(), frozenset(nodes)]
    sets += [frozenset(set(nodes) - {n}) for n in nodes]  # alone
    sets += [frozenset({n}) for n in nodes]  # all but n
    return sets


def _worker_builds_match(study: QuantStudy, feeds) -> None:
    """Every candidate built from a recipe that went through pickle is the parent's, byte for byte."""
    recipe = pickle.loads(pickle.dumps(study.recipe()))
    built = recipe_study(recipe)
    assert built is not study and built.feeds == []  # it builds only: no feeds travel with it
    seen = []
    for float_nodes in _candidate_sets(study):
        here, there = study.build(float_nodes), built.build(float_nodes)
        payload = model_to_bytes(there)
        assert payload == model_to_bytes(here), sorted(float_nodes)
        seen.append(payload)
        for a, b in zip(run_model(here, feeds[:2]), run_model(there, feeds[:2])):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    assert seen[0] != seen[1]  # all int8, all float
    assert len(set(seen)) > len(seen) // 2  # distinct models (a lone int8 Add is the all-float model)


def test_worker_build_is_the_parents_build():
    proto, feeds = _conv_model(np.random.default_rng(3)), _conv_feeds(4, 8)
    study = QuantStudy.prepare(proto, feeds, CONFIG)
    assert len(study.nodes) >= 4, study.nodes
    _worker_builds_match(study, feeds)


def test_worker_build_of_quantized_branches_is_the_parents_build():
    """Units (If branches) restored from the float copy, which travels in the recipe too."""
    proto = model_if_weights(np.random.default_rng(7))
    feeds = _branch_feeds(proto, 21, 8)
    study = QuantStudy.prepare(proto, feeds, QuantizeConfig())
    assert study.units and study.float_work is not None
    _worker_builds_match(study, feeds)


def test_recipe_is_read_once_per_process():
    proto, feeds = _conv_model(np.random.default_rng(3)), _conv_feeds(4, 4)
    study = QuantStudy.prepare(proto, feeds, CONFIG)
    recipe = study.recipe()
    first = recipe_study(recipe)
    assert recipe_study(pickle.loads(pickle.dumps(recipe))) is first  # a task's copy finds the one read
    assert recipe_study(study.recipe()) is not first  # another recipe (a new key) is read again


def _study_id(recipe) -> tuple[int, int]:
    """(process, study) ids of the recipe's study in the worker that runs this."""
    import os

    return os.getpid(), id(recipe_study(recipe))


def test_pool_workers_read_the_recipe_once():
    proto, feeds = _conv_model(np.random.default_rng(3)), _conv_feeds(4, 4)
    recipe = QuantStudy.prepare(proto, feeds, CONFIG).recipe()
    pool = process_pool(1)
    try:
        ids = [pool.submit(_study_id, recipe).result(timeout=120) for _ in range(3)]
    finally:
        stop_pool(pool, cancel=False)
    assert len(set(ids)) == 1  # one worker, one study read from the three tasks' copies


def _rows(report):
    return report["nodes"], report["all_int8"], report["float"], report["candidates_evaluated"]


@pytest.fixture(scope="module")
def in_process():
    proto, feeds = _conv_model(np.random.default_rng(3)), _conv_feeds(4, 10)
    return proto, feeds, analyze_sensitivity(proto, feeds, CONFIG, executor=Inline())


def test_in_process_ranking_finds_the_outlier(in_process):
    _, _, report = in_process
    assert report["nodes"][0]["node"] == "conv2", report["nodes"]
    assert report["candidates_evaluated"] == 1 + 2 * len(report["nodes"])


def test_process_pool_gives_the_in_process_rows(in_process):
    proto, feeds, local = in_process
    pool = process_pool(2)
    try:
        pooled = analyze_sensitivity(proto, feeds, CONFIG, executor=pool)
    finally:
        stop_pool(pool, cancel=False)
    assert _rows(pooled) == _rows(local)  # same ranking, same figures, bit for bit


def test_dask_cluster_gives_the_in_process_rows(in_process):
    pytest.importorskip("distributed")
    from onnxcomp.executors import DaskExecutor

    proto, feeds, local = in_process
    executor = DaskExecutor(workers=2)
    try:
        remote = analyze_sensitivity(proto, feeds, CONFIG, executor=executor)
        assert executor.workers == 2
        handle = executor.share(QuantStudy.prepare(proto, feeds, CONFIG).recipe())
        ids = {executor.submit(_study_id, handle).result() for _ in range(6)}
    finally:
        executor.shutdown()
    assert _rows(remote) == _rows(local)
    assert len({pid for pid, _ in ids}) == len(ids)  # one study per worker process, whatever the tasks


def test_unpicklable_finish_steps_build_in_the_parent(in_process):
    """A finish step that cannot be pickled (a lambda) keeps the candidates built here first."""
    proto, feeds, _ = in_process
    study = QuantStudy.prepare(proto, feeds, CONFIG)
    calls = []
    study.finish.append(lambda model: calls.append(model))
    sets = _candidate_sets(study)[:3]
    pool = process_pool(2)
    try:
        pooled = study.evaluate_variants(sets, pool)
    finally:
        stop_pool(pool, cancel=False)
    # built here (an all-float candidate takes no finish step: it is the float model)
    assert len(calls) == sum(1 for s in sets if set(study.nodes) - s) == len(sets) - 1
    assert pooled == study.evaluate_variants(sets, Inline())
    assert pooled == study.evaluate([study.build(s) for s in sets], Inline())


def test_progress_counts_every_candidate(in_process):
    proto, feeds, _ = in_process
    study = QuantStudy.prepare(proto, feeds, CONFIG)
    seen = []
    pool = process_pool(2)
    try:
        study.evaluate_variants(_candidate_sets(study), pool, lambda done, total: seen.append((done, total)))
    finally:
        stop_pool(pool, cancel=False)
    n = len(_candidate_sets(study))
    assert seen == [(i, n) for i in range(1, n + 1)]
