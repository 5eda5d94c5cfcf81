"""The frame: one configuration of a QM solute in an MM environment, with optional labels.

A :class:`Frame` keeps every atom in the order of its source (file or simulation), with a mask
``is_qm`` saying which atoms form the QM region. MM atoms carry partial charges and molecule ids;
the embedded environment (which MM atoms the QM region sees) is chosen by
:mod:`qmlmm.environment`, not stored in the frame.

Units: positions and box in nm, charges in e, energies in kJ/mol, forces in kJ/mol/nm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qmlmm.elements import check_charge_multiplicity, symbol, to_numbers
from qmlmm.errors import InputError

__all__ = ["OVERLAP_NM", "Frame", "Label", "is_orthorhombic", "minimum_image"]

#: Two atoms closer than this (nm) are reported as overlapping.
OVERLAP_NM: float = 0.05


@dataclass
class Label:
    """Energy (kJ/mol) and forces (N, 3) in kJ/mol/nm on every atom of a frame.

    Forces on MM atoms outside the embedding are zero. ``charges``: (N,) the engine's QM atomic charges
    in e (DFTB Mulliken, xtb's, DFT meta-Lowdin), NaN on MM atoms; None when the level has none.
    """

    energy: float
    forces: np.ndarray
    charges: np.ndarray | None = None

    def copy(self) -> Label:
        return Label(self.energy, self.forces.copy(), None if self.charges is None else self.charges.copy())


@dataclass
class Frame:
    """One configuration.

    Attributes:
        numbers: (N,) atomic numbers.
        positions: (N, 3) positions in nm.
        is_qm: (N,) bool, True for atoms of the QM region.
        charges: (N,) MM partial charges in e (ignored on QM atoms).
        mol_ids: (N,) molecule index of every atom; MM molecules are embedded whole.
        box: (3, 3) periodic box vectors in nm (rows), or None for an isolated system.
        qm_charge: total charge of the QM region (e).
        qm_mult: spin multiplicity of the QM region.
        labels: level name -> :class:`Label`.
        info: free-form metadata (scalars only), e.g. ``{"time_ps": 1.5, "source": "run0"}``.
    """

    numbers: np.ndarray
    positions: np.ndarray
    is_qm: np.ndarray
    charges: np.ndarray
    mol_ids: np.ndarray
    box: np.ndarray | None = None
    qm_charge: int = 0
    qm_mult: int = 1
    labels: dict[str, Label] = field(default_factory=dict)
    info: dict[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nums = np.asarray(self.numbers)
        if nums.dtype.kind in "iu":  # fast path: validate atomic numbers vectorised
            if nums.size and (nums.min() < 1 or nums.max() > 118):
                bad = nums[(nums < 1) | (nums > 118)][0]
                raise InputError(f"unknown element: atomic number {int(bad)}")
            self.numbers = nums.astype(np.int64).reshape(-1)
        else:
            self.numbers = to_numbers(nums.tolist())
        n = len(self.numbers)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(n, 3)
        self.is_qm = np.asarray(self.is_qm, dtype=bool).reshape(n)
        self.charges = np.asarray(self.charges, dtype=np.float64).reshape(n)
        self.mol_ids = np.asarray(self.mol_ids, dtype=np.int64).reshape(n)
        if self.box is not None:
            box = np.asarray(self.box, dtype=np.float64)
            if box.shape == (3,):
                box = np.diag(box)
            if box.shape != (3, 3):
                raise InputError(f"box must be 3 lengths or a 3x3 matrix, got shape {box.shape}")
            if abs(np.linalg.det(box)) < 1e-9:
                raise InputError("box is degenerate (zero volume)")
            self.box = box
        self.qm_charge = int(self.qm_charge)
        self.qm_mult = int(self.qm_mult)
        if not np.all(np.isfinite(self.positions)):
            raise InputError("positions contain NaN or infinity")
        if not np.all(np.isfinite(self.charges)):
            bad = np.flatnonzero(~np.isfinite(self.charges))
            raise InputError(f"MM charges contain NaN or infinity (atoms {bad[:5].tolist()})")
        if not self.is_qm.any():
            raise InputError("frame has no QM atoms (per-atom field 'qm' is 0 everywhere)")

    # ---- views -------------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def qm_indices(self) -> np.ndarray:
        """(n,) indices of QM atoms."""
        return np.flatnonzero(self.is_qm)

    @property
    def mm_indices(self) -> np.ndarray:
        """(m,) indices of MM atoms."""
        return np.flatnonzero(~self.is_qm)

    @property
    def qm_numbers(self) -> np.ndarray:
        return self.numbers[self.is_qm]

    @property
    def qm_formula(self) -> str:
        """Hill formula of the QM region, e.g. 'C20H28O2'."""
        zs, counts = np.unique(self.qm_numbers, return_counts=True)
        syms = {symbol(int(z)): int(c) for z, c in zip(zs, counts, strict=True)}
        order = [s for s in ("C", "H") if s in syms] + sorted(s for s in syms if s not in ("C", "H"))
        return "".join(f"{s}{syms[s] if syms[s] > 1 else ''}" for s in order)

    def copy(self) -> Frame:
        return Frame(
            self.numbers.copy(),
            self.positions.copy(),
            self.is_qm.copy(),
            self.charges.copy(),
            self.mol_ids.copy(),
            None if self.box is None else self.box.copy(),
            self.qm_charge,
            self.qm_mult,
            {k: v.copy() for k, v in self.labels.items()},
            dict(self.info),
        )

    # ---- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise InputError for impossible charge/multiplicity, mixed QM/MM molecules, overlaps."""
        check_charge_multiplicity(self.qm_numbers, self.qm_charge, self.qm_mult)
        qm_mols = set(np.unique(self.mol_ids[self.is_qm]).tolist())
        mm_mols = set(np.unique(self.mol_ids[~self.is_qm]).tolist())
        mixed = qm_mols & mm_mols
        if mixed:
            raise InputError(
                f"molecule id(s) {sorted(mixed)[:5]} contain both QM and MM atoms; the QM/MM boundary "
                "must not cut a molecule (no link atoms)"
            )
        self.check_overlaps()

    def check_overlaps(self, threshold: float = OVERLAP_NM) -> None:
        """Raise InputError if a QM atom is closer than ``threshold`` nm to any other atom."""
        qm = self.qm_indices
        pos = self.positions
        for a in qm:
            d = minimum_image(pos - pos[a], self.box)
            r = np.sqrt((d * d).sum(1))
            r[a] = np.inf
            b = int(np.argmin(r))
            if r[b] < threshold:
                raise InputError(
                    f"atoms overlap: atom {a} ({symbol(int(self.numbers[a]))}) and atom {b} "
                    f"({symbol(int(self.numbers[b]))}) are {r[b]:.4f} nm apart (< {threshold} nm)"
                )


def is_orthorhombic(box: np.ndarray) -> bool:
    """Whether box rows (3, 3) are a diagonal matrix (every angle 90 degrees)."""
    return not np.any(box - np.diag(np.diagonal(box)))


def minimum_image(d: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """Minimum-image displacement vectors, shape (..., 3) in nm, for box rows ``box`` (3, 3).

    Exact for orthorhombic boxes; for triclinic boxes in reduced form (as OpenMM uses) it is
    exact whenever the displacement is shorter than half the shortest box height.
    """
    if box is None:
        return d
    if is_orthorhombic(box):  # per-axis, no matrix products
        lengths = np.diagonal(box)
        return d - lengths * np.round(d / lengths)
    frac = d @ np.linalg.inv(box)
    frac -= np.round(frac)
    return frac @ box
