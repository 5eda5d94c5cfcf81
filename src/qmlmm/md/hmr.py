"""Hydrogen mass repartitioning (HMR) for longer MD steps.

The QM region's X-H bonds are flexible (the QM engine or model gives their forces; only the TIP3P water
is rigid), so the step is limited by the fastest X-H stretch: period 2 pi sqrt(mu / k), ~9 fs for C-H
and ~8 fs for O-H at 1 amu, which is why the default step is 0.5 fs. HMR moves mass from each heavy
atom to the hydrogens bonded to it, so every hydrogen weighs ``h_mass`` amu and every molecule its
original mass: the X-H reduced mass grows (C-H: 0.92 -> 2.3 amu at 3 amu, periods x 1.6) while the
potential, and so every equilibrium (configurational) average, stays exactly the same; only the
dynamics (diffusion, vibrational spectra) change. Rigid water is left alone (its hydrogens are
constrained by SETTLE). Bonds are taken from the system's topology.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmlmm.errors import InputError

#: the recommended hydrogen mass (amu) for ``qmlmm md --hmr``: the common choice for 4 fs steps with
#: constrained X-H bonds, here for 1-2 fs steps with flexible ones (benchmarks/nve_drift.py)
DEFAULT_H_MASS_AMU = 3.024
#: the hydrogen masses (amu) accepted, by MDSettings and by repartition_hydrogen_masses
H_MASS_RANGE_AMU = (1.0, 5.0)


@dataclass
class Repartitioned:
    """What :func:`repartition_hydrogen_masses` changed: hydrogens and heavy atoms reweighted."""

    hydrogens: int
    heavy_atoms: int


def _is_water(residue: Any) -> bool:
    return residue.name in ("HOH", "WAT", "SOL", "TIP3")


def repartition_hydrogen_masses(system: Any, topology: Any, h_mass_amu: float) -> Repartitioned:
    """Set every non-water hydrogen of ``system`` (openmm.System, changed in place) to ``h_mass_amu``,
    taking the added mass from the heavy atom it is bonded to (``topology``: openmm.app.Topology with
    bonds). Raises InputError for a mass outside [1, 5] amu, a hydrogen without exactly one bond to a
    heavy atom, or a heavy atom that would be left lighter than 1 amu. Particles of mass 0 (frozen)
    are skipped."""
    lo, hi = H_MASS_RANGE_AMU
    if not lo <= h_mass_amu <= hi:
        raise InputError(f"hydrogen mass for HMR must be in [{lo}, {hi}] amu, got {h_mass_amu}")
    import openmm.unit as u

    atoms = list(topology.atoms())
    partners: dict[int, list[int]] = {a.index: [] for a in atoms}
    for a, b in topology.bonds():
        partners[a.index].append(b.index)
        partners[b.index].append(a.index)
    mass = [system.getParticleMass(i).value_in_unit(u.dalton) for i in range(system.getNumParticles())]
    new = list(mass)
    hydrogens, heavy = 0, set()
    for a in atoms:
        if a.element is None or a.element.symbol != "H" or _is_water(a.residue) or mass[a.index] == 0:
            continue
        bonded = [j for j in partners[a.index] if atoms[j].element is not None and atoms[j].element.symbol != "H"]
        if len(bonded) != 1:
            raise InputError(
                f"HMR: hydrogen {a.index} ({a.residue.name}{a.residue.index}) has {len(bonded)} bonds to heavy "
                "atoms in the topology, need exactly 1"
            )
        j = bonded[0]
        if mass[j] == 0:
            raise InputError(
                f"HMR: hydrogen {a.index} is free to move but its heavy atom {j} ({atoms[j].element.symbol}) is "
                "frozen (mass 0): there is no mass to take; freeze the hydrogen with it or run without --hmr"
            )
        new[j] -= h_mass_amu - mass[a.index]
        new[a.index] = h_mass_amu
        hydrogens += 1
        heavy.add(j)
    for j in heavy:
        if new[j] < 1.0:
            raise InputError(
                f"HMR: atom {j} ({atoms[j].element.symbol}) would weigh {new[j]:.2f} amu with hydrogens of "
                f"{h_mass_amu} amu; use a smaller --hmr mass"
            )
    for i, m in enumerate(new):
        if m != mass[i]:
            system.setParticleMass(i, m * u.dalton)
    return Repartitioned(hydrogens, len(heavy))
