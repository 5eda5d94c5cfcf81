"""qmlmm: machine-learned QM/MM molecular dynamics of molecules in solution.

Importing qmlmm sets, unless already set, before torch, xtb or PySCF load:

- ``OMP_WAIT_POLICY=PASSIVE``: the bundled OpenMP runtimes of xtb and tblite otherwise spin between their
  small calls and slow them 30-80x;
- ``GOMP_SPINCOUNT`` (:data:`TORCH_SPIN_COUNT`): libgomp's threads spin that many iterations (~0.5 ms)
  before they sleep. Fully passive threads must be woken for each of the thousands of small parallel
  operations of a model call or training step: with 2 threads a training step took 2.3-2.8x as long, the
  model call 2.5-2.7x (two runs of benchmarks/omp_spin.py). xtb's bundled runtime is loaded with the variable removed
  (:mod:`qmlmm.engines.xtb`), but libxtb's OpenMP calls run on torch's runtime once torch is imported
  (global scope), so with 2 threads xtb spins too: 79 instead of 66 ms a call on retinoic acid; with 1
  thread, the xtb engine's default and MD's, there is nothing to spin. ``QMLMM_GOMP_SPINCOUNT``
  records the value qmlmm set, so that child processes, which inherit both, know it for qmlmm's.
"""

from __future__ import annotations

import os as _os
import sys as _sys

#: the GOMP_SPINCOUNT qmlmm sets when the environment has none (benchmarks/omp_spin.py)
TORCH_SPIN_COUNT = "30000"

_passive_before = _os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("KMP_BLOCKTIME", "0")
if "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = _os.environ["QMLMM_GOMP_SPINCOUNT"] = TORCH_SPIN_COUNT
    if "torch" in _sys.modules and _passive_before:
        import warnings as _warnings

        _warnings.warn(
            "torch was imported before qmlmm with OMP_WAIT_POLICY=PASSIVE, so its OpenMP threads sleep after "
            "every operation (2-thread model calls and training steps 2.3-2.8x slower); import qmlmm first, or "
            "set GOMP_SPINCOUNT=30000 in the environment",
            stacklevel=2,
        )


def spin_count_is_qmlmms() -> bool:
    """Whether the environment's GOMP_SPINCOUNT is the one qmlmm set (here or in a parent process), not the
    user's: then the xtb engine loads its runtime without it."""
    spin = _os.environ.get("GOMP_SPINCOUNT")
    return spin is not None and spin == _os.environ.get("QMLMM_GOMP_SPINCOUNT")


__version__ = "0.1.0"

__all__ = ["__version__", "TORCH_SPIN_COUNT", "spin_count_is_qmlmms"]
