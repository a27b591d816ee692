"""Defects a newcomer's run found (third session): each test reproduces one of them.

- Ctrl-C that reaches the process while a process pool starts its workers was dropped (the run
  went on to the end and exited 0).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal

import pytest

from onnxcomp.executors import spawning


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs POSIX signal masks")
@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="Ctrl-C is ignored in this process (started in the background)")
def test_ctrl_c_while_workers_start_is_not_dropped():
    """A SIGINT inside ``spawning`` interrupts this process when the window closes, and the worker
    started inside the window inherits SIGINT blocked (it cannot print an import traceback)."""
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        with pytest.raises(KeyboardInterrupt):
            with spawning(pool):
                future = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, [])
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.SIGINT in future.result(timeout=120)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
