"""qmlmm's compiled CPU kernels: one C++ extension module, built on first use by torch's extension loader.

The sources are ``qmlmm/kernels/*.cpp``: the descriptor's terms, their pair lists and the exact potential
and field (``angular.cpp``, used through :mod:`qmlmm.descriptors.native`) and the embedding's
nearest-QM-atom search (``embedding.cpp``, used by :func:`qmlmm.environment.select_embedding`), DFTB's
geometry-dependent matrices and point-charge potential (``dftb.cpp``, used through
:mod:`qmlmm.engines.dftb.compiled_terms`). This module
only builds and loads them; each user keeps its own pure torch or numpy form as the fallback and the
reference in its tests.

The build (~30-60 s, once per source, compiler flags and torch version) goes to a folder named by their hash
under torch's extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so
checkouts and environments with the same sources share it and never rebuild each other's. torch's loader
waits, without a time limit, for a build's lock file to go: a build killed half-way (an out-of-memory kill, a
job's time limit) would leave one, and every later process would hang at its first call; so qmlmm waits for
a lock itself first and removes one unchanged for :data:`STALE_LOCK_SECONDS`, with a warning
(:func:`wait_for_build_lock`). Where the kernels cannot be built (no C++ compiler, no ninja), the fallbacks
run after one warning; with ``QMLMM_NATIVE=0`` in the environment (read once per process) they run without
trying.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["STALE_LOCK_SECONDS", "available", "build_directory", "module", "wait_for_build_lock"]

log = logging.getLogger(__name__)

_KERNELS = Path(__file__).with_name("kernels")
#: the descriptor's kernels (and the module's bindings), the embedding's nearest-QM-atom search, DFTB's matrices
_SOURCES = [_KERNELS / "angular.cpp", _KERNELS / "embedding.cpp", _KERNELS / "dftb.cpp"]
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]  # OpenMP: at::parallel_for runs on torch's own OpenMP runtime (no
# second one); no errno from sqrt, so that loops with it vectorise (the results are the same: IEEE sqrt)
#: a build lock older than this is from a killed build (a build takes ~30-60 s on 2 cores)
STALE_LOCK_SECONDS = 600.0


def build_directory() -> Path:
    """The kernels' build folder: torch's extension cache / qmlmm_angular_<hash of sources, flags, torch>."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for src in _SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS).encode())
    h.update(torch.__version__.encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    return Path(root) / f"qmlmm_angular_{h.hexdigest()[:12]}"


def wait_for_build_lock(folder: Path, stale_after: float = STALE_LOCK_SECONDS, poll: float = 1.0) -> None:
    """Wait while another process builds in ``folder`` (its ``lock`` file exists); a lock that has not
    changed for ``stale_after`` seconds is a killed build's: removed, with a warning. torch's loader itself
    would wait for such a lock forever."""
    import time

    lock = folder / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_after:
            log.warning("removing %s, a build lock %.0f s old (a killed build's); building again", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll)


@functools.cache
def module() -> Any | None:
    """The compiled module, or None (QMLMM_NATIVE=0, or the build failed: a warning, once per process)."""
    if os.environ.get("QMLMM_NATIVE", "1") == "0":
        log.info("QMLMM_NATIVE=0: the torch and numpy forms run, not the compiled kernels")
        return None
    try:
        from torch.utils.cpp_extension import load

        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        wait_for_build_lock(folder)
        if not any(folder.glob("*.so")):
            log.info("building qmlmm's compiled kernels in %s (once: ~30-60 s)", folder)
        return load(
            name="qmlmm_angular",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: the fallbacks are exact, only slower
        log.warning("qmlmm's compiled kernels could not be built (%s); the torch and numpy forms run", exc)
        return None


def available() -> bool:
    """Whether the compiled kernels can run (built now if needed)."""
    return module() is not None
