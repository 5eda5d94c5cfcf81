"""dE/dq of GFN2-xTB point-charge embedding, exact: xtb's own kernel with the shell charges recovered
from its point-charge gradient.

libxtb 6.5 couples each embedded charge q_J to the QM region's shell charges dq_s only (xtb's
``jpot_pcem_gfn2`` and ``pcem_grad_gfn2``):

    E_pc = sum_s sum_J dq_s q_J g_sJ,   g_sJ = (r_sJ^2 + 1 / x_sJ^2)^(-1/2),   x_sJ = (eta_s + eta_J) / 2,

with r_sJ the distance (Bohr) from the atom of shell s to charge J, eta_s = eta_A (1 + kappa_l(A))
the shell's hardness and eta_J the chemical hardness of the element passed with the charge (Hartree).
The SCC energy is stationary in the charges, so dE/dq_J = sum_s dq_s g_sJ: the damped potential of
the shell charges at J. The library returns atomic charges only, and for a neutral QM region the
damping does not cancel between atoms of different hardness (O and H): the potential of the atomic
charges by 1/r is 5-50 % off dE/dq even beyond 1 nm (measured; tests/test_engines.py).

The shell charges follow exactly from the point-charge gradient the library does return, which is
linear in them: dE/dR_J = sum_s dq_s q_J (R_A - R_J) (r_sJ^2 + 1 / x_sJ^2)^(-3/2). A least-squares
solve over the nearest charges gives dq_s; the fit must reproduce the gradient to ``RESIDUAL_TOL``
(it does to ~1e-14: the kernel is xtb's), else :class:`EngineError` is raised instead of a wrong dE/dq.

GFN2-xTB hardness parameters (Hartree) and shell layout for H-Ca, Br and I, from xtb's parameter set
(grimme-lab/xtb, src/xtb/gfn2.f90: chemicalHardness, shellHardness, angShell; Bannwarth, Ehlert,
Grimme, J. Chem. Theory Comput. 15, 1652 (2019)). Units: Bohr, e, Hartree.
"""

from __future__ import annotations

import numpy as np

from qmlmm.errors import EngineError

__all__ = ["GFN2_ELEMENTS", "gfn2_potential_at_charges"]

#: eta_A (Hartree) and (kappa_s, kappa_p, kappa_d) of GFN2-xTB; shells in xtb's order: H s; He-F, Na, K
#: s p; Ne, Mg-Ar, Ca, Br, I s p d
_GFN2: dict[int, tuple[float, tuple[float, ...]]] = {
    1: (0.405771, (0.0,)),
    2: (0.642029, (0.0, 0.0)),
    3: (0.245006, (0.0, 0.1972612)),
    4: (0.684789, (0.0, 0.9658467)),
    5: (0.513556, (0.0, 0.3994080)),
    6: (0.538015, (0.0, 0.1056358)),
    7: (0.461493, (0.0, 0.1164892)),
    8: (0.451896, (0.0, 0.1497020)),
    9: (0.531518, (0.0, 0.1677376)),
    10: (0.850000, (0.0, 0.1190576, -0.32)),
    11: (0.271056, (0.0, 0.1018894)),
    12: (0.344822, (0.0, 1.4, -0.05)),
    13: (0.364801, (0.0, -0.0603699, 0.2)),
    14: (0.720000, (0.0, -0.5580042, -0.23)),
    15: (0.297739, (0.0, -0.1558060, -0.35)),
    16: (0.339971, (0.0, -0.1085866, -0.25)),
    17: (0.248514, (0.0, 0.4989400, 0.5)),
    18: (0.502376, (0.0, -0.0461133, -0.01)),
    19: (0.247602, (0.0, 0.3483655)),
    20: (0.320378, (0.0, 1.5, -0.25)),
    35: (0.261253, (0.0, 0.5203002, 0.4)),
    53: (0.383124, (0.0, -0.0338735, 0.3)),
}

#: elements whose dE/dq this module gives exactly
GFN2_ELEMENTS = frozenset(_GFN2)

#: largest relative residual of the gradient fit that counts as xtb's kernel reproduced
RESIDUAL_TOL = 1e-8

#: charges (the nearest) whose gradient determines the shell charges (any full-rank subset is exact)
_N_FIT = 512


def _check_elements(numbers: np.ndarray, what: str) -> None:
    bad = sorted({int(z) for z in numbers} - GFN2_ELEMENTS)
    if bad:
        raise EngineError(
            f"exact dE/dq of GFN2-xTB embedding has parameters for elements {sorted(GFN2_ELEMENTS)}; the {what} "
            f"has {bad} (use a sharp embedding, switch_width 0, which needs no dE/dq)"
        )


def _shells(numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(atom index (S,), hardness (S,) Hartree) of the GFN2 shells of the atoms ``numbers`` (n,), shells
    of one atom with equal hardness merged (their charges enter the kernel only as a sum, and the fit
    could not tell them apart: He's s and p)."""
    atom, eta = [], []
    for a, z in enumerate(numbers):
        eta_a, kappas = _GFN2[int(z)]
        for k in dict.fromkeys(kappas):
            atom.append(a)
            eta.append(eta_a * (1.0 + k))
    return np.asarray(atom, dtype=np.int64), np.asarray(eta)


def gfn2_potential_at_charges(
    qm_numbers: np.ndarray,
    qm_pos_bohr: np.ndarray,
    mm_numbers: np.ndarray,
    mm_pos_bohr: np.ndarray,
    mm_charges: np.ndarray,
    pc_gradient: np.ndarray,
    atomic_charges: np.ndarray,
) -> np.ndarray:
    """dE/dq_J (m,) in Hartree/e of a converged GFN2-xTB calculation with point charges.

    Args:
        qm_numbers (n,), qm_pos_bohr (n, 3): the QM atoms; mm_numbers (m,), mm_pos_bohr (m, 3),
            mm_charges (m,) e: the embedded charges as passed to libxtb (the element sets the hardness);
        pc_gradient (m, 3): libxtb's gradient on the charges (Hartree/Bohr, ``xtb_getPCGradient``);
        atomic_charges (n,) e: libxtb's atomic charges, the sums of each atom's shell charges (rows of
            the fit too, so that it is determined with few charges).
    Raises EngineError for elements without parameters here, when the charges are too few to fix the
    shell charges, or when the gradient is not reproduced by xtb's kernel (a libxtb whose embedding
    differs from 6.5's).
    """
    _check_elements(qm_numbers, "QM region")
    _check_elements(mm_numbers, "MM environment")
    sh_atom, sh_eta = _shells(np.asarray(qm_numbers))
    mm_el, mm_kind = np.unique(np.asarray(mm_numbers), return_inverse=True)
    eta_el = np.array([_GFN2[int(z)][0] for z in mm_el])
    c2 = (1.0 / (0.5 * (sh_eta[None, :] + eta_el[:, None])) ** 2)[mm_kind]  # (m, S) 1/x^2 of each pair
    dv = mm_pos_bohr[:, None, :] - qm_pos_bohr[None, :, :]  # (m, n, 3) R_J - R_A
    r2 = np.einsum("mnk,mnk->mn", dv, dv)
    r2c2 = r2[:, sh_atom] + c2  # (m, S) r^2 + 1/x^2
    fit = np.flatnonzero(mm_charges != 0.0)
    if len(fit) > _N_FIT:  # the nearest charges: the best-conditioned rows
        fit = fit[np.argpartition(r2[fit].min(1), _N_FIT - 1)[:_N_FIT]]
    d = -dv[fit][:, sh_atom, :]  # (f, S, 3) R_A - R_J
    a = (mm_charges[fit, None, None] * d * r2c2[fit, :, None] ** -1.5).transpose(0, 2, 1).reshape(-1, len(sh_atom))
    b = pc_gradient[fit].reshape(-1)
    w = float(np.abs(a).max()) if a.size else 1.0  # the atom sums weighted like the gradient rows
    sums = (sh_atom[None, :] == np.arange(len(qm_numbers))[:, None]).astype(float)  # (n, S)
    a_all, b_all = np.vstack([a, w * sums]), np.concatenate([b, w * np.asarray(atomic_charges, dtype=float)])
    dq, _, rank, _ = np.linalg.lstsq(a_all, b_all, rcond=None)
    if rank < len(sh_atom):
        raise EngineError(
            f"{len(fit)} nonzero embedded charges do not determine the {len(sh_atom)} GFN2 shell charges of the "
            "QM region, so dE/dq cannot be computed exactly; use a sharp embedding (switch_width 0)"
        )
    resid, scale = float(np.linalg.norm(a_all @ dq - b_all)), float(np.linalg.norm(b_all))
    if scale > 0.0 and resid > RESIDUAL_TOL * scale:
        raise EngineError(
            "xtb's point-charge gradient is not reproduced by the GFN2 embedding kernel (relative residual "
            f"{resid / scale:.1e}): this libxtb embeds charges differently from 6.5, so dE/dq cannot be "
            "computed exactly; use a sharp embedding (switch_width 0)"
        )
    return np.asarray((1.0 / np.sqrt(r2c2)) @ dq)
