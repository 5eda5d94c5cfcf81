"""Physical constants and unit conversions.

Internal units of qmlmm: nm, kJ/mol, kJ/mol/nm, elementary charge e, ps.
Engines speak atomic units (Bohr, Hartree) and exchange files speak ASE units (Angstrom, eV);
every conversion happens at such a boundary, through the constants below, whose names say
what they convert. Values are CODATA 2018.
"""

from __future__ import annotations

#: Bohr radius in nm.
NM_PER_BOHR: float = 0.0529177210903
#: nm -> Bohr factor.
BOHR_PER_NM: float = 1.0 / NM_PER_BOHR
#: Angstrom -> nm factor.
NM_PER_ANGSTROM: float = 0.1
ANGSTROM_PER_NM: float = 10.0
ANGSTROM_PER_BOHR: float = NM_PER_BOHR * ANGSTROM_PER_NM
BOHR_PER_ANGSTROM: float = 1.0 / ANGSTROM_PER_BOHR

#: One Hartree in kJ/mol (E_h * N_A).
KJMOL_PER_HARTREE: float = 2625.4996394799
HARTREE_PER_KJMOL: float = 1.0 / KJMOL_PER_HARTREE
#: One electronvolt in kJ/mol.
KJMOL_PER_EV: float = 96.48533212331
EV_PER_KJMOL: float = 1.0 / KJMOL_PER_EV
#: One kcal/mol in kJ/mol.
KJMOL_PER_KCALMOL: float = 4.184

#: Hartree/Bohr -> kJ/mol/nm.
KJMOLNM_PER_HARTREEBOHR: float = KJMOL_PER_HARTREE * BOHR_PER_NM
#: eV/Angstrom -> kJ/mol/nm.
KJMOLNM_PER_EVANGSTROM: float = KJMOL_PER_EV * ANGSTROM_PER_NM

#: Coulomb constant 1/(4 pi eps0) in kJ/mol nm / e^2 (so that E = K q1 q2 / r).
COULOMB_KJMOL_NM: float = KJMOL_PER_HARTREE * NM_PER_BOHR

#: Boltzmann constant in kJ/mol/K.
KB_KJMOL_PER_K: float = 0.00831446261815324


def hartree_to_kjmol(e_hartree: float) -> float:
    """Convert an energy from Hartree to kJ/mol."""
    return e_hartree * KJMOL_PER_HARTREE


def kjmol_to_hartree(e_kjmol: float) -> float:
    """Convert an energy from kJ/mol to Hartree."""
    return e_kjmol * HARTREE_PER_KJMOL
