"""Where independent evaluations run: in process, a local process pool, or a Dask cluster.

The sensitivity study and the fidelity fallback evaluate many candidate models against the same
cached feeds and reference outputs. A task is a plain function of bytes and arrays, so any
:class:`concurrent.futures.Executor` can run it; what differs between engines is how the arrays
every task shares travel (:func:`share`):

* a local process pool pickles them with each task (the workers are on this machine);
* Dask scatters them once to every worker (``broadcast``) and each task carries a reference, so a
  task ships only its own candidate model, or only the nodes it keeps float when the worker builds
  the candidate from the study's shared recipe (:meth:`onnxcomp.quant.sensitivity.QuantStudy.evaluate_variants`).

``--executor`` addresses (:func:`open_executor`):

=====================  ========================================================================
``process[:N]``        spawned local processes (N: default physical cores), Ctrl-C safe
``dask://HOST:PORT``   an existing Dask scheduler (``dask scheduler`` / ``dask worker HOST:PORT``
                       on each machine); the workers need the same onnxcomp, onnx and onnxruntime
``dask-local[:N]``     a Dask ``LocalCluster`` of N worker processes (one thread each) on this
                       machine: the same code path as a real cluster, for trying it out
=====================  ========================================================================

Dask comes from the optional ``distributed`` package (``pip install 'onnxcomp[dist]'``). Results
do not depend on the engine: each task is one onnxruntime session with one thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import signal
import threading
from collections.abc import Iterator
from typing import Any

from onnxcomp.errors import ConfigError

__all__ = ["DaskExecutor", "Inline", "open_executor", "share", "default_executor", "process_pool", "spawning",
           "stop_pool", "EXECUTOR_FORMS"]

EXECUTOR_FORMS = "process[:N], dask://HOST:PORT or dask-local[:N]"


class Inline(concurrent.futures.Executor):
    """Runs tasks in the calling thread (used for a single task, and as a fallback)."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            future.set_exception(exc)
        return future


def default_executor(tasks: int) -> concurrent.futures.Executor:
    """In the calling thread for one task, else a process pool of up to the physical cores."""
    if tasks <= 1:
        return Inline()
    from onnxcomp.measure.bench import physical_cores

    return process_pool(max(1, min(physical_cores(), tasks)))


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Spawned worker processes that ignore Ctrl-C: the parent alone handles it (:func:`stop_pool`)."""
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint
    )


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # drops a Ctrl-C held back while the worker started
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def spawning(executor: concurrent.futures.Executor) -> Iterator[None]:
    """Hold Ctrl-C back while a process pool starts its workers (on submit), so that they inherit that.

    A worker still importing its modules when Ctrl-C reaches the process group would otherwise
    print a traceback before its initializer runs. SIGINT is blocked, not ignored: the workers
    inherit the signal mask (their initializer then ignores it), while a Ctrl-C that reaches this
    process meanwhile stays pending and interrupts it when the mask is lifted (ignoring it here
    dropped it: the run went on to the end and exited 0).
    """
    if not isinstance(executor, concurrent.futures.ProcessPoolExecutor) or (
        threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    if not hasattr(signal, "pthread_sigmask"):  # no signal masks (Windows): ignore it meanwhile
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, handler)
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_pool(executor: concurrent.futures.Executor, *, cancel: bool) -> None:
    """Shut ``executor`` down; with ``cancel`` (an error or Ctrl-C) drop queued work and end the workers."""
    if not cancel:
        executor.shutdown(wait=True)
        return
    processes = list((getattr(executor, "_processes", None) or {}).values())  # shutdown forgets them
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


class DaskExecutor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` on a Dask ``distributed`` client.

    ``address=None`` starts a ``LocalCluster`` of ``workers`` processes (closed with the executor);
    otherwise the client connects to the scheduler at ``address`` and only the client is closed.
    :meth:`share` scatters an object to every worker once.
    """

    def __init__(self, address: str | None = None, *, workers: int = 2, timeout: float = 30.0) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ConfigError("a Dask executor needs the 'distributed' package: pip install 'onnxcomp[dist]'") from None
        self._cluster = None
        try:
            if address is None:
                self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                             dashboard_address=":0", silence_logs=logging.ERROR)
                self._client = Client(self._cluster, timeout=timeout)
            else:
                self._client = Client(address, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            if self._cluster is not None:
                self._cluster.close()
            where = address or "a local cluster"
            raise ConfigError(f"cannot reach the Dask scheduler at {where}: {exc}") from None
        self._inner = self._client.get_executor(pure=False)
        self._closed = False

    @property
    def workers(self) -> int:
        """Workers the scheduler knows now."""
        return len(self._client.scheduler_info().get("workers", {}))

    def submit(self, fn, /, *args, **kwargs):
        return self._inner.submit(fn, *args, **kwargs)

    def share(self, obj: Any) -> Any:
        """``obj`` sent once to every worker; the returned handle stands for it in task arguments."""
        return self._client.scatter([obj], broadcast=True, hash=False)[0]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._inner.shutdown(wait=wait and not cancel_futures)  # wait=False cancels what is left
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def share(executor: concurrent.futures.Executor | None, obj: Any) -> Any:
    """``obj`` as task arguments should carry it on ``executor`` (a handle on Dask, else itself)."""
    method = getattr(executor, "share", None)
    return method(obj) if callable(method) else obj


def _count(text: str, spec: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise ConfigError(f"--executor {spec!r}: the worker count must be an integer in [1, 1024]")
    return int(text)


def open_executor(spec: str | None) -> concurrent.futures.Executor | None:
    """The executor an ``--executor`` address names (None for None: the caller's default).

    Raises ConfigError for an unknown form, a bad count, a missing ``distributed`` package or an
    unreachable scheduler.
    """
    if spec is None:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "process":
        from onnxcomp.measure.bench import physical_cores

        return process_pool(_count(rest, spec) or physical_cores())
    if kind == "dask-local":
        return DaskExecutor(workers=_count(rest, spec) or 2)
    if kind == "dask" and rest.startswith("//") and len(rest) > 2:
        return DaskExecutor(f"tcp:{rest}")
    raise ConfigError(f"--executor {spec!r}: expected {EXECUTOR_FORMS}")
