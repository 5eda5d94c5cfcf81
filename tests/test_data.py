"""Dataset (HDF5) and extended-XYZ exchange: round trips, schema errors, level conflicts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from qmlmm.data import Dataset, load_frames, read_extxyz, write_dataset, write_extxyz
from qmlmm.data.h5 import STATUS_DONE, STATUS_FAILED
from qmlmm.errors import InputError, LevelConflictError, SchemaError
from qmlmm.system import Frame, Label
from qmlmm.testing import solvated_frame


def _frames(n: int = 3, labelled: bool = True) -> list[Frame]:
    out = []
    rng = np.random.default_rng(0)
    for k in range(n):
        # ragged: each frame has a different number of waters
        fr = solvated_frame("methanol", box=1.8 + 0.1 * k, seed=k)
        fr.info["time_ps"] = 0.5 * k
        fr.info["source"] = f"run{k % 2}"
        if labelled:
            fr.labels["dft"] = Label(-300000.0 + rng.normal(), rng.normal(size=(fr.n_atoms, 3)) * 100)
        out.append(fr)
    return out


def _assert_frames_equal(a: Frame, b: Frame, atol: float = 0.0, atol_forces: float = 0.0) -> None:
    assert np.array_equal(a.numbers, b.numbers)
    assert np.allclose(a.positions, b.positions, atol=atol, rtol=0)
    assert np.array_equal(a.is_qm, b.is_qm)
    assert np.allclose(np.where(a.is_qm, 0, a.charges), np.where(b.is_qm, 0, b.charges), atol=1e-12)
    assert np.array_equal(a.mol_ids, b.mol_ids)
    assert (a.box is None) == (b.box is None)
    if a.box is not None and b.box is not None:
        assert np.allclose(a.box, b.box, atol=atol)
    assert (a.qm_charge, a.qm_mult) == (b.qm_charge, b.qm_mult)
    assert set(a.labels) == set(b.labels)
    for k in a.labels:
        assert a.labels[k].energy == pytest.approx(b.labels[k].energy, abs=max(atol, 1e-9))
        assert np.allclose(a.labels[k].forces, b.labels[k].forces, atol=atol_forces, rtol=0)


def test_hdf5_roundtrip_exact(tmp_path: Path) -> None:
    frames = _frames()
    write_dataset(tmp_path / "d.h5", frames).close()
    with Dataset(tmp_path / "d.h5") as ds:
        assert len(ds) == 3
        back = ds.frames()
        assert ds.level_info("dft").n_done == 3
    for a, b in zip(frames, back, strict=True):
        _assert_frames_equal(a, b)
        assert b.info["time_ps"] == a.info["time_ps"] and b.info["source"] == a.info["source"]


def test_extxyz_hdf5_roundtrip_lossless(tmp_path: Path) -> None:
    frames = _frames()
    write_extxyz(tmp_path / "a.extxyz", frames)
    text1 = (tmp_path / "a.extxyz").read_text()
    # the file follows the exchange convention
    header = text1.splitlines()[1]
    for key in (
        "qm:I:1",
        "mm_charge:R:1",
        "mol_id:I:1",
        "forces_dft:R:3",
        "energy_dft=",
        "qm_charge=0",
        "qm_mult=1",
        "Lattice=",
        'pbc="T T T"',
    ):
        assert key in header
    # extxyz -> h5 -> extxyz is textually identical
    write_dataset(tmp_path / "a.h5", read_extxyz(tmp_path / "a.extxyz")).close()
    with Dataset(tmp_path / "a.h5") as ds:
        write_extxyz(tmp_path / "b.extxyz", iter(ds))
    assert (tmp_path / "b.extxyz").read_text() == text1
    # h5 -> extxyz -> h5 keeps every number to the text precision (ASE writes 8 decimals:
    # 1e-8 Angstrom = 1e-9 nm, 1e-8 eV/Angstrom = 1e-6 kJ/mol/nm; energies in full precision)
    for a, b in zip(frames, load_frames(tmp_path / "a.h5"), strict=True):
        _assert_frames_equal(a, b, atol=0.51e-9, atol_forces=0.51e-8 * 964.8533212331)


def test_ase_reads_our_file_with_units(tmp_path: Path) -> None:
    from ase.io import read

    frames = _frames(1)
    write_extxyz(tmp_path / "a.extxyz", frames)
    atoms = read(tmp_path / "a.extxyz", index=0)
    assert not isinstance(atoms, list)
    assert np.allclose(atoms.positions, frames[0].positions * 10.0, atol=1e-8)  # Angstrom
    assert atoms.info["energy_dft"] == pytest.approx(frames[0].labels["dft"].energy / 96.48533212331)  # eV


def test_interleaved_atom_order_preserved(tmp_path: Path) -> None:
    fr = _frames(1, labelled=False)[0]
    perm = np.random.default_rng(1).permutation(fr.n_atoms)
    shuffled = Frame(fr.numbers[perm], fr.positions[perm], fr.is_qm[perm], fr.charges[perm], fr.mol_ids[perm], fr.box)
    write_extxyz(tmp_path / "s.extxyz", [shuffled])
    write_dataset(tmp_path / "s.h5", read_extxyz(tmp_path / "s.extxyz")).close()
    _assert_frames_equal(shuffled, load_frames(tmp_path / "s.h5")[0], atol=0.51e-9)


def test_wrong_schema_errors(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1, 2, 3])
    with pytest.raises(SchemaError, match="not a qmlmm dataset"):
        Dataset(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(SchemaError, match="not an HDF5 file"):
        load_frames(tmp_path / "text.h5")
    with pytest.raises(SchemaError):
        Dataset(tmp_path / "text.h5")
    with h5py.File(tmp_path / "newer.h5", "w") as f:
        f.attrs["schema"] = "qmlmm-dataset"
        f.attrs["schema_version"] = 99
    with pytest.raises(SchemaError, match="newer"):
        Dataset(tmp_path / "newer.h5")


def test_extxyz_missing_fields_named(tmp_path: Path) -> None:
    from ase import Atoms
    from ase.io import write

    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.arrays["qm"] = np.array([1, 1, 1])
    write(tmp_path / "m.extxyz", atoms, format="extxyz")
    with pytest.raises(SchemaError, match="mm_charge"):
        read_extxyz(tmp_path / "m.extxyz")
    (tmp_path / "garbage.extxyz").write_text("3\nnot a header\nO 0 0\n")
    with pytest.raises(SchemaError):
        read_extxyz(tmp_path / "garbage.extxyz")


def test_frame_errors() -> None:
    fr = solvated_frame("water", box=2.0)
    with pytest.raises(InputError, match="unknown element"):
        Frame(np.array(["O", "Xx"]), np.zeros((2, 3)), np.ones(2), np.zeros(2), np.zeros(2))
    with pytest.raises(InputError, match="no QM atoms"):
        Frame(np.array(["O"]), np.zeros((1, 3)), np.zeros(1), np.zeros(1), np.zeros(1))
    bad = fr.copy()
    bad.qm_mult = 2
    with pytest.raises(InputError, match="impossible"):
        bad.validate()
    overlap = fr.copy()
    overlap.positions[3] = overlap.positions[0] + 0.01  # an MM atom on a QM atom
    with pytest.raises(InputError, match="overlap"):
        overlap.validate()
    mixed = fr.copy()
    mixed.mol_ids[3] = 0
    with pytest.raises(InputError, match="both QM and MM"):
        mixed.validate()


def test_level_conflict_and_failures(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "d.h5", _frames(labelled=False))
    ds.add_level("xtb", "xtb:gfn2", {"cutoff": 1.4}, {"xtb": "22.1"})
    ds.add_level("xtb", "xtb:gfn2", {"cutoff": 1.4}, {"xtb": "22.1"})  # same settings: fine
    with pytest.raises(LevelConflictError, match="--level"):
        ds.add_level("xtb", "xtb:gfn2", {"cutoff": 1.2}, {})
    with pytest.raises(LevelConflictError):
        ds.add_level("xtb", "xtb:gfn1", {"cutoff": 1.4}, {})
    ds.write_failure("xtb", 1, "SCFNotConvergedError: no luck")
    ds.write_label("xtb", 0, Label(-1.0, np.ones((ds.frame(0).n_atoms, 3))))
    assert list(ds.status("xtb")) == [STATUS_DONE, STATUS_FAILED, 0]
    assert ds.errors("xtb") == {1: "SCFNotConvergedError: no luck"}
    assert ds.label("xtb", 2) is None and np.isnan(ds.energies("xtb")[2])
    ds.add_level("xtb", "xtb:gfn1", {"cutoff": 1.4}, {}, overwrite=True)
    assert list(ds.status("xtb")) == [0, 0, 0]
    ds.close()
