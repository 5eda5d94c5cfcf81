"""GFN2-xTB / GFN1-xTB QM/MM through the PyPI ``xtb`` wheel (libxtb 6.5).

Point charges enter with ``Calculator.set_external_charges``. libxtb damps each point charge's
Coulomb interaction with the chemical hardness of the element whose atomic number is passed with
it; qmlmm passes the MM atom's own element (O and H for TIP3P water), so a water's charges are
damped exactly as the same atoms would be inside xtb. This is not bare 1/r at short range (as
DFT and DFTB embedding are); at the 1.4 nm cutoff the difference is negligible.

The gradient on the point charges is not exposed by the Python API; the bundled library's
``xtb_getPCGradient`` returns it and is called here through ctypes.

dE/dq at the MM sites (for smooth embedding): for GFN2 exact, the damped potential of xtb's shell
charges with xtb's own kernel, the shell charges recovered from the point-charge gradient
(:mod:`qmlmm.engines.xtb_pcem`; it matches finite differences in the charges to ~1e-7). The
potential of the atomic charges by 1/r, used before, was 5-50 % off even beyond 1 nm, since for a
neutral QM region the damping does not cancel between atoms of different hardness. For GFN1 (no
parameters here) that 1/r potential is still used: 4-5 % off at 1.1 nm for a water, so GFN1/MM's
switching force carries that error.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from qmlmm.engines.base import Engine, EngineResult, QMMMInput
from qmlmm.errors import DependencyError, EngineError, InputError, SCFNotConvergedError
from qmlmm.units import BOHR_PER_NM, KJMOL_PER_HARTREE, KJMOLNM_PER_HARTREEBOHR

log = logging.getLogger(__name__)

_LIBS: dict[str, Any] = {}


@contextmanager
def _passive_runtime() -> Iterator[None]:
    """Without the GOMP_SPINCOUNT that qmlmm sets for torch (:mod:`qmlmm`), for the load of xtb's bundled
    libgomp, which reads it once: its threads then sleep at once, as before qmlmm set it. xtb runs on that
    runtime only where torch is not loaded (:func:`_omp_threads`); with torch it runs on torch's, spin and
    all (79 against 66 ms a 2-thread call, benchmarks/results/omp_spin.md). A GOMP_SPINCOUNT the user set
    (another value than qmlmm's) is kept."""
    from qmlmm import spin_count_is_qmlmms

    spin = os.environ.pop("GOMP_SPINCOUNT", None) if spin_count_is_qmlmms() else None
    try:
        yield
    finally:
        if spin is not None:
            os.environ["GOMP_SPINCOUNT"] = spin


def _xtb_libs() -> dict[str, Any]:
    """ctypes handles of the bundled libxtb (for xtb_getPCGradient) and libgomp (threads)."""
    if not _LIBS:
        with _passive_runtime():
            _LIBS.update(_load_xtb_libs())
    return _LIBS


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """``n`` OpenMP threads for the calls in the block, on every runtime libxtb's OpenMP calls can bind to,
    each restored afterwards. libxtb resolves its OpenMP symbols at its first call through the global
    scope first, so with torch loaded (its libgomp is global) xtb runs on torch's runtime, not on its own
    bundled libgomp: the thread count set on xtb's own runtime alone did nothing there (found 2026-12-06:
    xtb ran with torch's thread count, LD_DEBUG=bindings shows the binding)."""
    runtimes = [lib for lib in (_global_omp(), _xtb_libs()["gomp"]) if lib is not None]
    before = [int(lib.omp_get_max_threads()) for lib in runtimes]
    for lib in runtimes:
        lib.omp_set_num_threads(ctypes.c_int(n))
    try:
        yield
    finally:
        for lib, k in zip(runtimes, before, strict=True):
            lib.omp_set_num_threads(ctypes.c_int(k))


def _global_omp() -> Any:
    """The process's global-scope OpenMP runtime (torch's libgomp once torch is imported), or None."""
    glob_scope = ctypes.CDLL(None)
    return glob_scope if hasattr(glob_scope, "omp_set_num_threads") else None


def _load_xtb_libs() -> dict[str, Any]:
    try:
        import xtb
        import xtb.libxtb  # loads the bundled libraries libxtb needs (its OpenBLAS) first
    except ImportError as e:
        raise DependencyError("the xtb engine needs the PyPI package 'xtb' (pip install xtb)") from e
    libdir = os.path.join(os.path.dirname(xtb.__file__), "..", "xtb.libs")
    found = glob.glob(os.path.join(libdir, "libxtb-*.so*"))
    if not found:
        raise DependencyError(f"bundled libxtb not found in {libdir}; reinstall the xtb wheel")
    lib = ctypes.CDLL(found[0])
    lib.xtb_getPCGradient.argtypes = [ctypes.c_void_p] * 3
    lib.xtb_getPCGradient.restype = None
    gomp = glob.glob(os.path.join(libdir, "libgomp-*.so*"))
    return {"xtb": lib, "gomp": ctypes.CDLL(gomp[0]) if gomp else None}


def _ptr(cdata: Any) -> int:
    from xtb.libxtb import ffi

    return int(ffi.cast("uintptr_t", cdata))


#: the heaviest element GFN1/GFN2-xTB has parameters for (Rn)
MAX_XTB_Z = 86


class XTBEngine(Engine):
    """``xtb:gfn2`` or ``xtb:gfn1``."""

    family = "xtb"

    def __init__(self, spec: Any) -> None:
        _xtb_libs()  # first: importing xtb.interface loads xtb's OpenMP runtime (passive only through here)
        from xtb.interface import Param

        params = {"gfn2": Param.GFN2xTB, "gfn1": Param.GFN1xTB}
        if spec.method not in params:
            raise InputError(f"unknown xtb method {spec.method!r}; known: {', '.join(params)}")
        self.method = spec.method
        self._param = params[spec.method]
        opts = dict(spec.options)
        self.accuracy = float(opts.pop("acc", "1.0"))
        self.etemp = float(opts.pop("etemp", "300"))
        self.maxiter = int(opts.pop("maxiter", "250"))
        if opts:
            raise InputError(f"unknown xtb option(s) {sorted(opts)}; known: acc, etemp, maxiter")
        self.spec = spec.text
        self.threads = 1

    def set_threads(self, n: int) -> None:
        """Threads of xtb's calls (applied around each call: :func:`_omp_threads`)."""
        self.threads = max(1, int(n))

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"xtb-python": version("xtb"), "libxtb": "6.5.1"}

    def settings(self) -> dict[str, object]:
        return {
            "method": self.method,
            "accuracy": self.accuracy,
            "etemp": self.etemp,
            "point_charge_hardness": "element of the MM atom",
        }

    def _potential_at_charges(
        self, inp: QMMMInput, pos: np.ndarray, mm_pos: np.ndarray, gpc: np.ndarray, q: np.ndarray
    ) -> np.ndarray:
        """dE/dq at the MM sites (m,) kJ/mol/e from the converged calculation (positions in Bohr, ``gpc``
        the point-charge gradient in Hartree/Bohr, ``q`` the atomic charges): exact for GFN2
        (:mod:`qmlmm.engines.xtb_pcem`); for GFN1 the potential of the atomic charges by 1/r, which is
        a few percent off (module docstring)."""
        if self.method == "gfn2":
            from qmlmm.engines.xtb_pcem import gfn2_potential_at_charges

            phi = gfn2_potential_at_charges(inp.numbers, pos, inp.mm_numbers, mm_pos, inp.mm_charges, gpc, q)
            return phi * KJMOL_PER_HARTREE
        r = np.linalg.norm(mm_pos[:, None, :] - pos[None, :, :], axis=2)
        return np.asarray((q[None, :] / r).sum(1) * KJMOL_PER_HARTREE)

    def _compute(self, inp: QMMMInput) -> EngineResult:
        from xtb.interface import Calculator, XTBException
        from xtb.libxtb import VERBOSITY_MUTED

        # GFN1/GFN2-xTB are parametrised for H-Rn; libxtb crashes the process (SIGSEGV) beyond
        bad = sorted({int(z) for z in np.concatenate([inp.numbers, inp.mm_numbers]) if not 1 <= z <= MAX_XTB_Z})
        if bad:
            raise InputError(f"xtb ({self.method}) has parameters for elements 1-{MAX_XTB_Z} (H-Rn) only, got {bad}")
        pos = inp.qm_positions * BOHR_PER_NM
        calc = Calculator(self._param, inp.numbers, pos, charge=inp.charge, uhf=inp.mult - 1)
        calc.set_verbosity(VERBOSITY_MUTED)
        calc.set_accuracy(self.accuracy)
        calc.set_electronic_temperature(self.etemp)
        calc.set_max_iterations(self.maxiter)
        m = len(inp.mm_charges)
        mm_pos = inp.mm_positions * BOHR_PER_NM
        if m:
            calc.set_external_charges(
                np.ascontiguousarray(inp.mm_numbers, dtype=np.int32),
                np.ascontiguousarray(inp.mm_charges, dtype=np.float64),
                np.ascontiguousarray(mm_pos, dtype=np.float64),
            )
        try:
            with _omp_threads(self.threads):
                res = calc.singlepoint()
        except XTBException as e:
            msg = str(e)
            if "converge" in msg:
                raise SCFNotConvergedError(f"xtb {self.method}: {msg.strip()}") from e
            raise EngineError(f"xtb {self.method} failed: {msg.strip()}") from e
        energy = res.get_energy()
        grad = res.get_gradient()
        gpc = np.zeros((m, 3))
        if m:
            _xtb_libs()["xtb"].xtb_getPCGradient(_ptr(calc._env), _ptr(res._res), gpc.ctypes.data)
        q = res.get_charges()
        potential = self._potential_at_charges(inp, pos, mm_pos, gpc, q) if inp.need_potential and m else None
        return EngineResult(
            energy=float(energy) * KJMOL_PER_HARTREE,
            qm_forces=-grad * KJMOLNM_PER_HARTREEBOHR,
            mm_forces=-gpc * KJMOLNM_PER_HARTREEBOHR,
            mm_potential=potential,
            info={"qm_charges": q},
        )
