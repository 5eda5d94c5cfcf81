"""DFT QM/MM with PySCF: electrostatic embedding of bare point charges (``pyscf.qmmm``).

Energy = E_DFT of the QM region in the potential of the charges + QM nuclei-charge Coulomb
energy. Forces on QM atoms come from the QM/MM analytic gradient; forces on the charges from
``grad_hcore_mm`` (electrons) + ``grad_nuc_mm`` (nuclei), as in PySCF's
``examples/qmmm/30-force_on_mm_particles.py``.

Cheap wins taken: density fitting (on by default, option ``df=no`` turns it off), and the
previous call's density matrix as the initial guess when the same molecule (same atoms, charge,
multiplicity) comes again, which is the case for consecutive frames on one worker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from qmlmm.engines.base import Engine, EngineResult, QMMMInput
from qmlmm.errors import DependencyError, EngineError, InputError, SCFNotConvergedError
from qmlmm.units import BOHR_PER_NM, KJMOL_PER_HARTREE, KJMOLNM_PER_HARTREEBOHR

log = logging.getLogger(__name__)

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _flag(v: str) -> bool:
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise InputError(f"expected yes/no, got {v!r}")


class PySCFEngine(Engine):
    """``dft:<functional>/<basis>`` with PySCF (RKS for singlets, UKS otherwise)."""

    family = "dft"

    def __init__(self, spec: Any) -> None:
        try:
            import pyscf  # noqa: F401
        except ImportError as e:  # pragma: no cover - pyscf is a dependency
            raise DependencyError("the dft engine needs PySCF: pip install pyscf") from e
        if "/" not in spec.method:
            raise InputError(f"dft spec needs functional/basis, e.g. dft:b3lyp/def2-svp; got {spec.text!r}")
        self.xc, self.basis = spec.method.split("/", 1)
        opts = dict(spec.options)
        self.density_fit = _flag(opts.pop("df", "yes"))
        self.conv_tol = float(opts.pop("conv", "1e-9"))
        self.grids_level = int(opts.pop("grids", "3"))
        self.max_cycle = int(opts.pop("maxcycle", "100"))
        self.reuse_density = _flag(opts.pop("reuse", "yes"))
        self.soscf_fallback = _flag(opts.pop("soscf", "yes"))  # second-order SCF when DIIS does not converge
        self.auxbasis: str | None = opts.pop("aux", None)
        self.df_incore_mb = float(opts.pop("dfmem", "2000"))
        if opts:
            raise InputError(
                f"unknown dft option(s) {sorted(opts)}; known: df, conv, grids, maxcycle, reuse, aux, dfmem, soscf"
            )
        self.spec = spec.text
        self.threads = 1
        self._dm_cache: dict[tuple[Any, ...], np.ndarray] = {}
        self._check_functional()

    def _check_functional(self) -> None:
        from pyscf.dft import libxc

        try:
            libxc.parse_xc(self.xc)
        except (KeyError, ValueError) as e:
            raise InputError(f"unknown functional {self.xc!r} for PySCF/libxc") from e

    def set_threads(self, n: int) -> None:
        self.threads = max(1, int(n))

    def versions(self) -> dict[str, str]:
        import pyscf

        return {"pyscf": pyscf.__version__}

    def settings(self) -> dict[str, object]:
        out: dict[str, object] = {
            "xc": self.xc,
            "basis": self.basis,
            "density_fit": self.density_fit,
            "conv_tol": self.conv_tol,
            "grids_level": self.grids_level,
        }
        if self.auxbasis is not None:  # PySCF's default otherwise (labels made before this option match)
            out["auxbasis"] = self.auxbasis
        return out

    def _mol(self, numbers: np.ndarray, pos_bohr: np.ndarray, charge: int, mult: int) -> Any:
        from pyscf import gto

        try:
            return gto.M(
                atom=[(int(z), tuple(p)) for z, p in zip(numbers, pos_bohr, strict=True)],
                unit="Bohr",
                basis=self.basis,
                charge=charge,
                spin=mult - 1,
                verbose=0,
            )
        except (KeyError, RuntimeError, ValueError) as e:
            raise InputError(f"PySCF cannot build the molecule with basis {self.basis!r}: {e}") from e

    def _compute(self, inp: QMMMInput) -> EngineResult:
        from pyscf import dft, lib, qmmm

        lib.num_threads(self.threads)
        pos = inp.qm_positions * BOHR_PER_NM
        mm_pos = inp.mm_positions * BOHR_PER_NM
        mol = self._mol(inp.numbers, pos, inp.charge, inp.mult)
        mf = dft.RKS(mol) if inp.mult == 1 else dft.UKS(mol)
        mf.xc = self.xc
        mf.grids.level = self.grids_level
        mf.conv_tol = self.conv_tol
        mf.max_cycle = self.max_cycle
        if self.density_fit:
            mf = self._density_fit(mf, mol)
        has_mm = len(inp.mm_charges) > 0
        if has_mm:
            mf = qmmm.mm_charge(mf, mm_pos, inp.mm_charges, unit="Bohr")
        key = (tuple(inp.numbers.tolist()), inp.charge, inp.mult)
        dm0 = self._dm_cache.get(key) if self.reuse_density else None
        t0 = time.perf_counter()
        try:
            e_tot = mf.kernel(dm0=dm0)
        except Exception as e:
            raise EngineError(f"PySCF SCF failed: {e}") from e
        fallback = None
        if not mf.converged and self.soscf_fallback:
            # DIIS can oscillate (stretched bonds, near-degenerate frontier orbitals): second-order SCF
            # (PySCF's newton) from where DIIS stopped, to the same tolerance, before giving up
            try:
                mf = mf.newton()
                e_tot = mf.kernel(dm0=mf.make_rdm1())
            except Exception as e:
                raise EngineError(f"PySCF second-order SCF failed: {e}") from e
            fallback = "newton"
        t_scf = time.perf_counter() - t0
        if not mf.converged:
            self._dm_cache.pop(key, None)
            raise SCFNotConvergedError(
                f"PySCF {self.xc}/{self.basis} SCF not converged in {self.max_cycle} cycles "
                f"(conv_tol {self.conv_tol:g} Eh)" + (", nor by second-order SCF after them" if fallback else "")
            )
        dm = mf.make_rdm1()
        if self.reuse_density:
            self._dm_cache = {key: dm}
        t0 = time.perf_counter()
        g = mf.nuc_grad_method()
        g.verbose = 0
        grad_qm = g.kernel()
        t_grad = time.perf_counter() - t0
        t0 = time.perf_counter()
        dm_tot = dm if dm.ndim == 2 else dm[0] + dm[1]
        if has_mm:
            grad_mm = self._grad_mm_electrons(mol, dm_tot, mm_pos, inp.mm_charges) + g.grad_nuc_mm()
        else:
            grad_mm = np.zeros((0, 3))
        potential = None
        if inp.need_potential and has_mm:
            potential = self._potential_at(mol, dm_tot, mm_pos) * KJMOL_PER_HARTREE
        t_mm = time.perf_counter() - t0
        # meta-Lowdin populations (PySCF's mulliken_meta): atomic charges far less basis-dependent than
        # Mulliken's, for the model's electrostatic term to be anchored to (qmlmm.training)
        _, qm_charges = mf.mulliken_meta(mol, dm, verbose=0)
        return EngineResult(
            energy=float(e_tot) * KJMOL_PER_HARTREE,
            qm_forces=-np.asarray(grad_qm) * KJMOLNM_PER_HARTREEBOHR,
            mm_forces=-np.asarray(grad_mm) * KJMOLNM_PER_HARTREEBOHR,
            mm_potential=potential,
            info={
                "scf_cycles": int(getattr(mf, "cycles", -1)),
                "time_scf_s": t_scf,
                "time_grad_qm_s": t_grad,
                "time_grad_mm_s": t_mm,
                "guess": "previous" if dm0 is not None else "minao",
                "scf_fallback": fallback,
                "qm_charges": np.asarray(qm_charges, dtype=np.float64),
            },
        )

    def _density_fit(self, mf: Any, mol: Any) -> Any:
        """Density fitting; the 3-centre tensor (naux x nao(nao+1)/2) is built once and kept in memory
        when it fits in ``dfmem`` MB. Without that, PySCF's pure-functional J build recomputes the
        3-centre integrals in every SCF cycle (``df_jk.get_j``), 2-3x slower per frame here."""
        from pyscf.df import addons

        try:
            mf = mf.density_fit(auxbasis=self.auxbasis)
            naux = addons.make_auxmol(mol, mf.with_df.auxbasis).nao
        except (KeyError, RuntimeError, ValueError) as e:
            raise InputError(f"PySCF cannot build the auxiliary basis {self.auxbasis!r}: {e}") from e
        nao = mol.nao
        mb = naux * nao * (nao + 1) / 2 * 8 / 1e6
        if mb <= self.df_incore_mb:
            mf.with_df.max_memory = max(mf.with_df.max_memory, int(self.df_incore_mb * 1.5) + 500)
            mf.with_df.build()
        return mf

    @staticmethod
    def _grad_mm_electrons(
        mol: Any, dm: np.ndarray, points_bohr: np.ndarray, charges: np.ndarray, block: int = 200
    ) -> np.ndarray:
        """dE_el/dR_j (m, 3) Hartree/Bohr of the electron-charge attraction, from <nabla p|1/|r-R_j||q>.

        Same numbers as PySCF's ``grad_hcore_mm`` (which uses 3-centre integrals), 3-4x faster:
        moving charge j equals moving every basis function the other way, so
        dE/dR_j = -q_j sum_pq P_pq d/dR_j <p|1/|r-R_j||q> = -2 q_j sum_pq P_pq <nabla p|1/|r-R_j||q>.
        """
        out = np.empty_like(points_bohr)
        for i0 in range(0, len(points_bohr), block):
            ip = mol.intor("int1e_grids_ip", grids=points_bohr[i0 : i0 + block])  # (3, k, nao, nao)
            out[i0 : i0 + block] = -2.0 * np.einsum("xkpq,pq->kx", ip, dm) * charges[i0 : i0 + block, None]
        return out

    @staticmethod
    def _potential_at(mol: Any, dm: np.ndarray, points_bohr: np.ndarray, block: int = 200) -> np.ndarray:
        """Electrostatic potential (Hartree/e) of QM nuclei + electrons at ``points_bohr`` (m, 3)."""
        z = mol.atom_charges()
        rq = mol.atom_coords()
        d = np.linalg.norm(points_bohr[:, None, :] - rq[None, :, :], axis=2)
        v = (z[None, :] / d).sum(1)
        for i0 in range(0, len(points_bohr), block):
            ints = mol.intor("int1e_grids", hermi=1, grids=points_bohr[i0 : i0 + block])
            v[i0 : i0 + block] -= np.einsum("kpq,qp->k", ints, dm)
        return v
