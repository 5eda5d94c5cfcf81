"""Restraints and umbrella biases as OpenMM custom forces.

- distance: k/2 (r_ij - r0)^2
- reaction coordinate: k/2 (r_ij + d r_kl - r0)^2 with d = +1 or -1; for methyl transfer from
  S-adenosylmethionine to cytosine, xi = r(S-C) - r(C-N) (i=S, j=C, k=C, l=N, d=-1).

Text form (CLI ``--restraint``; atom indices 0-based in the system):
``dist:i,j,r0,k`` and ``rc:i,j,k,l,d,r0,kforce`` (r0 in nm, force constants in kJ/mol/nm^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qmlmm.errors import InputError

__all__ = [
    "DistanceRestraint",
    "RCRestraint",
    "Restraint",
    "parse_restraint",
    "add_restraints",
    "umbrella_windows",
    "rc_value",
]


@dataclass(frozen=True)
class DistanceRestraint:
    i: int
    j: int
    r0: float  # nm
    k: float  # kJ/mol/nm^2

    def text(self) -> str:
        return f"dist:{self.i},{self.j},{self.r0},{self.k}"


@dataclass(frozen=True)
class RCRestraint:
    i: int
    j: int
    k_: int
    l: int
    d: int  # +1 or -1
    r0: float  # nm
    k: float  # kJ/mol/nm^2

    def text(self) -> str:
        return f"rc:{self.i},{self.j},{self.k_},{self.l},{self.d},{self.r0},{self.k}"

    def with_r0(self, r0: float) -> RCRestraint:
        return RCRestraint(self.i, self.j, self.k_, self.l, self.d, r0, self.k)


Restraint = DistanceRestraint | RCRestraint


def parse_restraint(text: str) -> Restraint:
    """Parse ``dist:i,j,r0,k`` or ``rc:i,j,k,l,d,r0,kforce``."""
    kind, _, rest = text.partition(":")
    try:
        vals = [v.strip() for v in rest.split(",")]
        if kind == "dist" and len(vals) == 4:
            return DistanceRestraint(int(vals[0]), int(vals[1]), float(vals[2]), float(vals[3]))
        if kind == "rc" and len(vals) == 7:
            d = int(vals[4])
            if d not in (1, -1):
                raise InputError(f"restraint {text!r}: d must be +1 or -1")
            return RCRestraint(
                int(vals[0]), int(vals[1]), int(vals[2]), int(vals[3]), d, float(vals[5]), float(vals[6])
            )
    except ValueError as e:
        raise InputError(f"cannot read restraint {text!r}: {e}") from e
    raise InputError(f"restraint {text!r} must be dist:i,j,r0,k or rc:i,j,k,l,d,r0,kforce (nm, kJ/mol/nm^2)")


def add_restraints(system: Any, restraints: list[Restraint], n_atoms: int | None = None) -> list[int]:
    """Add the restraints to an OpenMM System (periodic distances); returns the force indices."""
    import openmm

    n = n_atoms if n_atoms is not None else system.getNumParticles()
    out = []
    for r in restraints:
        idx = [r.i, r.j] if isinstance(r, DistanceRestraint) else [r.i, r.j, r.k_, r.l]
        if any(not 0 <= a < n for a in idx):
            raise InputError(f"restraint {r.text()} names an atom outside 0..{n - 1}")
        if isinstance(r, DistanceRestraint):
            f = openmm.CustomBondForce("0.5*kr*(r-r0)^2")
            f.addPerBondParameter("r0")
            f.addPerBondParameter("kr")
            f.addBond(r.i, r.j, [r.r0, r.k])
        else:
            f = openmm.CustomCompoundBondForce(4, "0.5*kr*(distance(p1,p2) + dsign*distance(p3,p4) - r0)^2")
            for name in ("dsign", "r0", "kr"):
                f.addPerBondParameter(name)
            f.addBond([r.i, r.j, r.k_, r.l], [float(r.d), r.r0, r.k])
        f.setUsesPeriodicBoundaryConditions(True)
        f.setForceGroup(2)
        out.append(system.addForce(f))
    return out


def rc_value(positions: np.ndarray, r: Restraint, box: np.ndarray | None = None) -> float:
    """Value of the restraint's coordinate (nm) at positions (N, 3) nm."""
    from qmlmm.system import minimum_image

    def dist(a: int, b: int) -> float:
        return float(np.linalg.norm(minimum_image(positions[b] - positions[a], box)))

    if isinstance(r, DistanceRestraint):
        return dist(r.i, r.j)
    return dist(r.i, r.j) + r.d * dist(r.k_, r.l)


def umbrella_windows(spec: str) -> list[float]:
    """``start:stop:n`` -> n equally spaced window centres (nm)."""
    try:
        a, b, n = spec.split(":")
        return [float(x) for x in np.linspace(float(a), float(b), int(n))]
    except ValueError as e:
        raise InputError(f"umbrella windows must be start:stop:n (nm), got {spec!r}") from e
