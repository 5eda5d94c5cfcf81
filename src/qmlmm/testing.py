"""Test and benchmark fixtures: small solutes in TIP3P water (no MD needed; not used by the pipeline).

Waters sit on a jittered lattice with random orientations; any water with an atom closer than
``min_dist`` to the solute is removed. Geometries are not equilibrated: use them to exercise
code, not for physics.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from qmlmm.system import Frame

__all__ = ["SOLUTES", "TIP3P_CHARGES", "solute", "solute_from_smiles", "solvated_frame", "tip3p_water"]

#: TIP3P charges (O, H, H) in e.
TIP3P_CHARGES = np.array([-0.834, 0.417, 0.417])

#: Small solutes: atomic numbers and positions in Angstrom (approximate equilibrium geometries).
SOLUTES: dict[str, tuple[list[int], list[list[float]]]] = {
    "water": ([8, 1, 1], [[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]]),
    "methanol": (
        [6, 8, 1, 1, 1, 1],
        [
            [-0.0465, 0.6640, 0.0],
            [-0.0465, -0.7560, 0.0],
            [-1.0865, 0.9800, 0.0],
            [0.4377, 1.0797, 0.8872],
            [0.4377, 1.0797, -0.8872],
            [0.8695, -1.0585, 0.0],
        ],
    ),
    "formaldehyde": (
        [6, 8, 1, 1],
        [[0.0, 0.0, -0.529], [0.0, 0.0, 0.676], [0.0, 0.9418, -1.1165], [0.0, -0.9418, -1.1165]],
    ),
    "ammonia": (
        [7, 1, 1, 1],
        [[0.0, 0.0, 0.1162], [0.0, 0.9377, -0.2711], [0.8121, -0.4689, -0.2711], [-0.8121, -0.4689, -0.2711]],
    ),
    "methylamine": (
        [6, 7, 1, 1, 1, 1, 1],
        [
            [0.0512, 0.7045, 0.0],
            [0.0512, -0.7581, 0.0],
            [-0.9902, 1.0629, 0.0],
            [0.5519, 1.0990, 0.8848],
            [0.5519, 1.0990, -0.8848],
            [-0.4459, -1.0931, 0.8168],
            [-0.4459, -1.0931, -0.8168],
        ],
    ),
    "methanethiol": (
        [6, 16, 1, 1, 1, 1],
        [
            [-0.0474, 1.1499, 0.0],
            [-0.0474, -0.6701, 0.0],
            [-1.0904, 1.4668, 0.0],
            [0.4408, 1.5462, 0.8913],
            [0.4408, 1.5462, -0.8913],
            [1.2866, -0.8712, 0.0],
        ],
    ),
}


def tip3p_water(rng: np.random.Generator) -> np.ndarray:
    """Positions (3, 3) in nm of one randomly oriented TIP3P water centred at its oxygen."""
    r, theta = 0.09572, np.deg2rad(104.52)
    local = np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0], [r * np.cos(theta), r * np.sin(theta), 0.0]])
    return np.asarray(Rotation.random(random_state=rng).apply(local))


def solute(name: str, rotate_seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """(numbers (n,), positions (n, 3) nm) of a named solute, centred, optionally rotated randomly.

    The default random rotation avoids bonds exactly parallel to a coordinate axis, for which
    libxtb 6.5.1's analytic gradient is wrong (see docs/engines.md).
    """
    if name not in SOLUTES:
        raise KeyError(f"unknown toy solute {name!r}; known: {sorted(SOLUTES)}")
    z, pos = SOLUTES[name]
    p = np.asarray(pos) * 0.1
    p -= p.mean(0)
    if rotate_seed is not None:
        p = Rotation.random(random_state=np.random.default_rng(rotate_seed)).apply(p)
    return np.asarray(z), p


def solute_from_smiles(smiles: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(numbers (n,), positions (n, 3) nm centred, formal charge) of a molecule from SMILES.

    3D structure by RDKit (ETKDG embedding, MMFF94 optimisation when parameters exist).
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:  # type: ignore[attr-defined]
        raise ValueError(f"RDKit could not embed {smiles!r} in 3D")
    if AllChem.MMFFHasAllMoleculeParams(mol):  # type: ignore[attr-defined]
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)  # type: ignore[attr-defined]
    pos = mol.GetConformer().GetPositions() * 0.1
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    return z, pos - pos.mean(0), int(Chem.GetFormalCharge(mol))


def solvated_frame(
    name: str | tuple[np.ndarray, np.ndarray] = "water",
    box: float = 2.0,
    spacing: float = 0.31,
    min_dist: float = 0.25,
    seed: int = 0,
    center: tuple[float, float, float] | None = None,
    periodic: bool = True,
    qm_charge: int = 0,
) -> Frame:
    """A solute at ``center`` (default box centre) in a cubic box of TIP3P waters.

    Args:
        name: solute name (see SOLUTES), or (numbers, positions in nm) of any solute.
        box: cubic box edge in nm.
        spacing: lattice spacing of waters in nm (0.31 nm gives about liquid density).
        min_dist: waters with any atom closer than this (nm) to a solute atom are left out.
        seed: random seed for orientations and jitter.
        center: solute centre in nm; put it near a face to test periodic wrapping.
        periodic: give the frame a box (else isolated cluster).
    """
    rng = np.random.default_rng(seed)
    if isinstance(name, str):
        z_s, p_s = solute(name, rotate_seed=seed)
    else:
        z_s, p_s = np.asarray(name[0]), np.asarray(name[1]) - np.asarray(name[1]).mean(0)
    c = np.full(3, box / 2) if center is None else np.asarray(center, dtype=float)
    p_s = p_s + c
    n = max(1, round(box / spacing))
    grid = (np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * (box / n)
    nums, pos, charges, mol = list(z_s), list(p_s), [0.0] * len(z_s), [0] * len(z_s)
    mid = 1
    boxm = np.eye(3) * box
    for g in grid:
        w = tip3p_water(rng) + g + rng.normal(scale=0.02, size=3)
        d = w[:, None, :] - p_s[None, :, :]
        if periodic:
            d -= box * np.round(d / box)
        if np.sqrt((d * d).sum(-1)).min() < min_dist:
            continue
        nums += [8, 1, 1]
        pos += list(w % box if periodic else w)
        charges += TIP3P_CHARGES.tolist()
        mol += [mid] * 3
        mid += 1
    is_qm = np.zeros(len(nums), dtype=bool)
    is_qm[: len(z_s)] = True
    p_all = np.asarray(pos)
    if periodic:
        p_all[: len(z_s)] %= box  # the QM region may be split across the box edge: that is the point
    return Frame(
        numbers=np.asarray(nums),
        positions=p_all,
        is_qm=is_qm,
        charges=np.asarray(charges),
        mol_ids=np.asarray(mol),
        box=boxm if periodic else None,
        qm_charge=qm_charge,
        qm_mult=1,
    )
