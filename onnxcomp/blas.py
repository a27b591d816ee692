"""Bounding the threads of numpy's BLAS around many small linear-algebra calls.

Batched small solves (the sparsity refit, one system per output) and GPTQ's column loop (one
rank-1 update per column) call BLAS thousands of times on small operands. A multi-threaded
OpenBLAS wakes its threads for each call; on a busy machine they wait for cores and the calls
get many times slower. :func:`blas_threads` sets the thread count of the OpenBLAS that numpy loaded for
the duration of a block, through OpenBLAS's own ``openblas_set_num_threads_local`` (which
returns the previous setting), and restores it afterwards. Where numpy uses another BLAS, or the
symbol is missing, it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

__all__ = ["blas_threads"]


@functools.lru_cache(maxsize=1)
def _set_threads_local():
    """OpenBLAS's ``openblas_set_num_threads_local`` of the library numpy loaded, or None."""
    import numpy as np

    try:
        libs = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        if "openblas" not in str(libs.get("name", "")).lower():
            return None
    except Exception:  # noqa: BLE001 - an older numpy or an unexpected layout: no bound
        return None
    from importlib import resources

    try:
        folder = resources.files("numpy").parent / "numpy.libs"
        candidates = sorted(p for p in folder.iterdir() if "openblas" in p.name)
    except (OSError, TypeError):
        candidates = []
    for path in candidates:
        try:
            fn = ctypes.CDLL(str(path)).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    return None


@contextlib.contextmanager
def blas_threads(n: int = 1) -> Iterator[bool]:
    """Run the block with numpy's OpenBLAS on at most ``n`` threads; yields whether it could."""
    fn = _set_threads_local()
    if fn is None:
        yield False
        return
    previous = fn(int(n))
    try:
        yield True
    finally:
        fn(previous)
