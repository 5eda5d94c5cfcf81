"""qmlmm: machine-learned QM/MM molecular dynamics of molecules in solution.

Importing qmlmm sets, unless already set, before torch, xtb or PySCF load:

- ``OMP_WAIT_POLICY=PASSIVE``: the bundled OpenMP runtimes of xtb and tblite otherwise spin between their
  small calls and slow them 30-80x;
- ``GOMP_SPINCOUNT`` (:data:`TORCH_SPIN_COUNT`): libgomp's threads spin that many iterations (~0.5 ms)
  before they sleep. Fully passive threads must be woken for each of the thousands of small parallel
  operations of a model call or training step: with 2 threads a training step took 2.4x as long, the model
  call and our DFTB3 1.5-2x (benchmarks/results/omp_spin.md). xtb's runtime is loaded with the variable
  removed (:func:`qmlmm.engines.xtb`), so it stays fully passive, as measured before.
"""

from __future__ import annotations

import os as _os
import sys as _sys

#: the GOMP_SPINCOUNT qmlmm sets when the environment has none (benchmarks/omp_spin.py)
TORCH_SPIN_COUNT = "30000"

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("KMP_BLOCKTIME", "0")
#: whether GOMP_SPINCOUNT is qmlmm's (then the xtb engine loads its runtime without it) or the user's
SPIN_COUNT_SET_HERE = "GOMP_SPINCOUNT" not in _os.environ
_os.environ.setdefault("GOMP_SPINCOUNT", TORCH_SPIN_COUNT)
if "torch" in _sys.modules and SPIN_COUNT_SET_HERE:
    import warnings as _warnings

    _warnings.warn(
        "torch was imported before qmlmm, so its OpenMP threads keep the spin count they read at import (with "
        "OMP_WAIT_POLICY=PASSIVE: none, and 2-thread model calls and training steps run 2-2.5x slower); import "
        "qmlmm first, or set GOMP_SPINCOUNT=30000 in the environment",
        stacklevel=2,
    )

__version__ = "0.1.0"

__all__ = ["__version__", "TORCH_SPIN_COUNT", "SPIN_COUNT_SET_HERE"]
