"""Extended XYZ exchange in ASE conventions (Angstrom, eV, eV/Angstrom).

Per-atom fields: ``qm`` (1 for QM atoms, else 0), ``mm_charge`` (e), ``mol_id``,
``forces_<level>`` (eV/Angstrom; zero on MM atoms outside the embedding).
Per-frame fields: ``qm_charge``, ``qm_mult``, ``Lattice`` + ``pbc``, ``energy_<level>`` (eV),
and any other scalar metadata. Conversion to qmlmm units happens here and only here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qmlmm.errors import InputError, SchemaError
from qmlmm.system import Frame, Label
from qmlmm.units import (
    ANGSTROM_PER_NM,
    EV_PER_KJMOL,
    KJMOL_PER_EV,
    KJMOLNM_PER_EVANGSTROM,
    NM_PER_ANGSTROM,
)

log = logging.getLogger(__name__)

__all__ = ["atoms_to_frame", "frame_to_atoms", "iter_extxyz", "read_extxyz", "write_extxyz"]

_REQUIRED_ARRAYS = ("qm", "mm_charge", "mol_id")


def atoms_to_frame(atoms: object, where: str = "") -> Frame:
    """Convert an ``ase.Atoms`` in the exchange convention to a :class:`Frame` (qmlmm units)."""
    from ase import Atoms

    assert isinstance(atoms, Atoms)
    missing = [k for k in _REQUIRED_ARRAYS if k not in atoms.arrays]
    if missing:
        raise SchemaError(
            f"{where}: missing per-atom field(s) {missing}; extended XYZ for qmlmm needs "
            "qm (1/0), mm_charge (e) and mol_id per atom"
        )
    info = dict(atoms.info)
    for key in ("qm_charge", "qm_mult"):
        if key not in info:
            default = 0 if key == "qm_charge" else 1
            log.warning("%s: no %s given, assuming %d", where, key, default)
            info[key] = default
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and not pbc.all():
        raise InputError(f"{where}: partial periodicity pbc={pbc.tolist()} is not supported")
    box = np.asarray(atoms.cell[:]) * NM_PER_ANGSTROM if pbc.all() else None
    qm = np.asarray(atoms.arrays["qm"]).astype(int)
    if not np.isin(qm, (0, 1)).all():
        raise SchemaError(f"{where}: per-atom field qm must be 0 or 1")
    fr = Frame(
        numbers=atoms.numbers,
        positions=atoms.positions * NM_PER_ANGSTROM,
        is_qm=qm.astype(bool),
        charges=np.asarray(atoms.arrays["mm_charge"], dtype=float),
        mol_ids=atoms.arrays["mol_id"],
        box=box,
        qm_charge=int(info.pop("qm_charge")),
        qm_mult=int(info.pop("qm_mult")),
    )
    for key in list(info):
        if key.startswith("energy_"):
            level = key[len("energy_") :]
            fkey = f"forces_{level}"
            if fkey not in atoms.arrays:
                raise SchemaError(f"{where}: {key} given without per-atom {fkey}")
            fr.labels[level] = Label(
                float(info.pop(key)) * KJMOL_PER_EV,
                np.asarray(atoms.arrays[fkey], dtype=float) * KJMOLNM_PER_EVANGSTROM,
            )
    for key, val in info.items():
        if isinstance(val, (int, float, str, np.integer, np.floating)) and not isinstance(val, bool):
            fr.info[key] = val.item() if isinstance(val, np.generic) else val
    return fr


def iter_extxyz(path: str | Path) -> Iterator[Frame]:
    """Frames of an extended XYZ file, one at a time."""
    from ase.io import iread

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        for k, atoms in enumerate(iread(str(path), index=":", format="extxyz")):
            yield atoms_to_frame(atoms, where=f"{path} frame {k}")
    except (ValueError, IndexError, KeyError, OSError) as e:
        if isinstance(e, (SchemaError, InputError)):
            raise
        raise SchemaError(f"{path} is not a readable extended XYZ file: {e}") from e


def read_extxyz(path: str | Path) -> list[Frame]:
    """All frames of an extended XYZ file."""
    frames = list(iter_extxyz(path))
    if not frames:
        raise SchemaError(f"{path} holds no frames")
    return frames


def frame_to_atoms(frame: Frame, levels: Sequence[str] | None = None) -> object:
    """An ``ase.Atoms`` in the exchange convention (Angstrom, eV) for ``frame``."""
    from ase import Atoms

    atoms = Atoms(numbers=frame.numbers, positions=frame.positions * ANGSTROM_PER_NM)
    if frame.box is not None:
        atoms.cell = frame.box * ANGSTROM_PER_NM
        atoms.pbc = True
    atoms.arrays["qm"] = frame.is_qm.astype(np.int64)
    atoms.arrays["mm_charge"] = np.where(frame.is_qm, 0.0, frame.charges)
    atoms.arrays["mol_id"] = frame.mol_ids.astype(np.int64)
    atoms.info["qm_charge"] = int(frame.qm_charge)
    atoms.info["qm_mult"] = int(frame.qm_mult)
    for key in sorted(frame.info):  # canonical order: files written twice are identical
        atoms.info[key] = frame.info[key]
    for name in sorted(frame.labels) if levels is None else levels:
        if name in frame.labels:
            lab = frame.labels[name]
            atoms.info[f"energy_{name}"] = float(lab.energy) * EV_PER_KJMOL
            atoms.arrays[f"forces_{name}"] = np.asarray(lab.forces) / KJMOLNM_PER_EVANGSTROM
    return atoms


def write_extxyz(
    path: str | Path, frames: Sequence[Frame] | Iterator[Frame], levels: Sequence[str] | None = None
) -> int:
    """Write frames (with their labels) to ``path`` atomically; returns the number written."""
    from ase.io import write

    from qmlmm.fileio import atomic_path

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for fr in frames:
            write(fh, frame_to_atoms(fr, levels), format="extxyz", write_results=False)  # type: ignore[arg-type]
            n += 1
    return n
