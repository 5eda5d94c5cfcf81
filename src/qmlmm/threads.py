"""Threads of the BLAS library under numpy (OpenBLAS in numpy's wheels), set for a block of code.

OpenBLAS's worker threads keep spinning for a while after a multithreaded call. In ML/MM MD the
embedding selection runs a few small numpy matrix products every step, right before the model's torch
threads start: the spinning OpenBLAS threads then take the cores from torch's and OpenMM's. Measured on
retinoic acid in water (2 cores, OpenMM 2 threads, benchmarks/results/md_profile.md): the model's call
inside MD took 112 ms a step with 2 torch threads, 44 ms with numpy's BLAS held to 1 thread around
qmlmm's own numpy work (the products are (5000, 3) x (3, 50): one thread is plenty). The QM/MM force
callback does that (:class:`qmlmm.md.qmforce.QMMMCallback`); engines that use numpy's BLAS heavily
(PySCF) keep all its threads, since the limit is lifted before the engine runs.

Without an OpenBLAS under numpy (MKL, Accelerate builds) :func:`numpy_blas_threads` does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["numpy_blas_threads"]

log = logging.getLogger(__name__)

#: (get, set) symbol pairs of OpenBLAS builds: numpy's scipy-openblas (64-bit ints), plain OpenBLAS
_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


def _bind(get: Any, set_: Any) -> tuple[Callable[[], int], Callable[[int], None]]:
    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
    return (lambda: int(get())), (lambda n: set_(int(n)))


@functools.cache
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """get/set of the OpenBLAS numpy has loaded (found in /proc/self/maps), or None."""
    import numpy  # noqa: F401 - loads numpy's BLAS

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                return _bind(getattr(lib, get_name), getattr(lib, set_name))
    log.debug("no OpenBLAS under numpy: numpy_blas_threads does nothing")
    return None


@contextmanager
def numpy_blas_threads(n: int) -> Iterator[None]:
    """Run the block with numpy's BLAS (OpenBLAS) at ``n`` threads, restoring the count after."""
    fns = _openblas()
    if fns is None:
        yield
        return
    get, set_ = fns
    before = get()
    if before == n:
        yield
        return
    set_(n)
    try:
        yield
    finally:
        set_(before)
