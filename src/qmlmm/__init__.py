"""qmlmm: machine-learned QM/MM molecular dynamics of molecules in solution.

Importing qmlmm sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set) before torch, xtb or PySCF
load: their bundled OpenMP runtimes otherwise spin between small calls and slow them 30-80x.
"""

from __future__ import annotations

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("KMP_BLOCKTIME", "0")

__version__ = "0.1.0"

__all__ = ["__version__"]
