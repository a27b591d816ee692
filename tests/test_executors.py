"""Where candidate evaluations run: a Dask cluster gives exactly the in-process results.

A real ``distributed.LocalCluster`` (worker processes on this machine) runs the sensitivity study
and the fidelity fallback; the shared feeds and reference outputs are scattered to every worker
once and the tasks carry only their candidate model.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from conftest import MODELS
from test_quant_sensitivity import PER_TENSOR, _feeds, _model_with_a_fragile_layer

from onnxcomp.cli import main
from onnxcomp.errors import ConfigError
from onnxcomp.executors import Inline, open_executor, stop_pool
from onnxcomp.quant.sensitivity import analyze_sensitivity, quantize_with_fallback

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_executor():
    executor = open_executor("dask-local:2")
    yield executor
    executor.shutdown()


def test_dask_sensitivity_equals_in_process(rng, dask_executor):
    proto, feeds = _model_with_a_fragile_layer(rng), _feeds(rng, 12)
    local = analyze_sensitivity(proto, feeds, PER_TENSOR, executor=Inline())
    remote = analyze_sensitivity(proto, feeds, PER_TENSOR, executor=dask_executor)
    assert dask_executor.workers == 2
    assert remote["nodes"] == local["nodes"]  # same ranking, same figures, bit for bit
    assert remote["all_int8"] == local["all_int8"] and remote["nodes"][0]["node"] == "mm2"


def test_dask_fallback_equals_in_process(rng, dask_executor):
    proto, feeds = _model_with_a_fragile_layer(rng), _feeds(rng, 12)
    _, local = quantize_with_fallback(proto, feeds, PER_TENSOR, fidelity_target=30.0, executor=Inline())
    _, remote = quantize_with_fallback(proto, feeds, PER_TENSOR, fidelity_target=30.0, executor=dask_executor)
    assert remote["float_nodes"] == local["float_nodes"] == ["mm2"]
    assert remote["final"] == local["final"]


def test_shared_data_goes_to_every_worker_once(dask_executor):
    """``share`` scatters once (broadcast); tasks then read the workers' copy."""
    data = np.arange(1000, dtype=np.float32)
    handle = dask_executor.share(data)
    holders = dask_executor._client.who_has([handle])[handle.key]
    assert len(holders) == 2
    total = dask_executor.submit(np.sum, handle).result()
    assert float(total) == float(data.sum())


@pytest.mark.parametrize("spec, message", [
    ("ray://head:10001", "expected process[:N], dask://HOST:PORT or dask-local[:N]"),
    ("process:0", "the worker count must be an integer in [1, 1024]"),
    ("dask-local:two", "the worker count must be an integer in [1, 1024]"),
    ("dask://", "expected process[:N]"),
])
def test_bad_executor_addresses_are_refused(spec, message):
    with pytest.raises(ConfigError) as exc:
        open_executor(spec)
    assert message in str(exc.value)


def test_process_executor(rng):
    executor = open_executor("process:2")
    try:
        report = analyze_sensitivity(_model_with_a_fragile_layer(rng), _feeds(rng, 6), PER_TENSOR, executor=executor)
    finally:
        stop_pool(executor, cancel=False)
    assert report["nodes"][0]["node"] == "mm2"


def test_sensitivity_cli_on_a_local_dask_cluster(capsys):
    argv = ["sensitivity", str(MODELS / "digits_mlp.onnx"), "--calibration", str(MODELS / "digits_calib.npz"),
            "--max-eval-feeds", "16", "--executor", "dask-local:2", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["nodes"]) == 3 and report["candidates_evaluated"] == 7
    assert report["executor"]["address"] == "dask-local:2" and report["executor"]["seconds"] > 0


def test_sensitivity_cli_refuses_workers_with_executor(capsys):
    argv = ["sensitivity", str(MODELS / "digits_mlp.onnx"), "--calibration", str(MODELS / "digits_calib.npz"),
            "--workers", "2", "--executor", "process:2"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    assert "argument --executor: not allowed with argument --workers" in capsys.readouterr().err


def _sigint_blocked() -> bool:
    return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs POSIX signal masks")
@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="Ctrl-C is ignored in this process (started in the background)")
def test_ctrl_c_while_workers_start_is_delivered_not_lost():
    """A Ctrl-C that arrives while the pool starts its workers reaches this process when they have
    started (it was ignored outright before, so the run went on to the end); the worker started in
    that window inherited the blocked signal and ignores it from its initializer on."""
    import threading
    import time

    from onnxcomp.executors import process_pool, spawning

    pool = process_pool(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            with spawning(pool):
                worker = pool.submit(_sigint_blocked)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                time.sleep(0.05)  # held back: nothing is raised inside the window
                inside = True
            time.sleep(1.0)  # never reached: delivered as the block ends
        assert inside
        assert worker.result(timeout=60) is False  # the initializer unblocked it, with SIGINT ignored
        assert not _sigint_blocked()
    finally:
        stop_pool(pool, cancel=True)
