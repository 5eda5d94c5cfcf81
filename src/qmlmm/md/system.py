"""A built QM/MM system folder (see :mod:`qmlmm.md.build`) loaded for simulation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.errors import InputError, SchemaError
from qmlmm.system import Frame

__all__ = [
    "MDSystem",
    "concurrent_baseline_fits",
    "cpu_properties",
    "engine_threads_in_md",
    "openmm_seed",
    "usable_cores",
]


def cpu_properties(threads: int, deterministic: bool = True) -> dict[str, str]:
    """OpenMM CPU platform properties: ``threads``, and deterministic force summation. Without it two runs
    with the same seed differ after a minimisation even on one thread (measured: 0.01 nm after a 500-step
    minimisation of methanol in water); with it one thread is bitwise reproducible, two threads differ
    by ~5e-7 nm after 50 steps (and diverge later, as any chaotic trajectory). Costs ~7 % of an MM step."""
    props = {"Threads": str(int(threads))}
    if deterministic:
        props["DeterministicForces"] = "true"
    return props


def engine_threads_in_md(baseline_beside: bool) -> int:
    """Threads for a QM/ML engine called inside OpenMM's force computation: every core, since OpenMM's
    threads wait while the callback runs; half of them for a delta model whose baseline runs in a thread of
    its own beside the network (``baseline_beside``; the other half is the baseline's), at least 1.

    Measured on retinoic acid in water (10727 atoms, 2 cores, OpenMM 2 threads, 3 interleaved rounds of 100
    steps, benchmarks/results/md_profile_kernels*.md): the direct ML/MM step 37.5-41.5 ms with 1 engine
    thread, 34.9-38.3 with 2 (6 of 6 rounds faster), DFTB3/MM 43.5-49.0 against 39.4-49.2 (5 of 6 faster or
    equal), GFN2-xTB/MM the same (180-193 against 166-188); a delta model's step is slower with both parts on
    2 threads one after the other than with one thread each side by side (47-48 against 55-56 ms,
    md_profile_engine_threads.md). The rule before (the cores OpenMM's threads leave, so 1 here) dates from
    when torch's threads slept between operations (2 threads took 91.5 ms a step against 67.8)."""
    cores = usable_cores()
    return max(1, cores // 2) if baseline_beside else cores


def concurrent_baseline_fits(engine_threads: int) -> bool:
    """Whether a delta model's baseline can run in a thread of its own beside the network inside the force
    callback: the callback runs while OpenMM's threads wait, so it has every core; both parts need
    ``engine_threads`` each. The engine's threads are half the cores for such a model
    (:func:`engine_threads_in_md`, or --engine-threads), so the baseline gets the other half.

    Measured (retinoic acid in water, 10727 atoms, 2 cores, DFTB3 baseline, 4-member model, 3 interleaved
    rounds of 100 steps; benchmarks/results/md_profile.md): the delta step 91.4 -> 71.2 ms (medians),
    against 58.7 ms for DFTB3/MM."""
    return usable_cores() >= 2 * max(1, int(engine_threads))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def openmm_seed(seed: int) -> int:
    """The OpenMM random seed for qmlmm's ``seed``: never 0, which OpenMM reads as "pick a new random seed"
    (so seed 0, the default everywhere, gave a different trajectory every time); in 1..2^31 - 1."""
    return int(seed) % (2**31 - 2) + 1


@dataclass
class MDSystem:
    """OpenMM system + topology + positions + the QM/MM bookkeeping of a built folder.

    Attributes:
        numbers (N,), charges (N,) MM partial charges (0 on QM atoms), mol_ids (N,), is_qm (N,),
        masses (N,) Da, qm_charge, qm_mult, box (3, 3) nm, positions (N, 3) nm.
    """

    folder: Path
    system: Any
    topology: Any
    positions: np.ndarray
    box: np.ndarray
    numbers: np.ndarray
    charges: np.ndarray
    mol_ids: np.ndarray
    is_qm: np.ndarray
    masses: np.ndarray
    qm_charge: int
    qm_mult: int
    meta: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path) -> MDSystem:
        import openmm
        import openmm.app as app
        import openmm.unit as u

        folder = Path(folder)
        for name in ("system.xml", "system.pdb", "meta.json"):
            if not (folder / name).exists():
                raise SchemaError(f"{folder} is not a qmlmm system folder: {name} missing (make one with qmlmm build)")
        meta = json.loads((folder / "meta.json").read_text())
        system = openmm.XmlSerializer.deserialize((folder / "system.xml").read_text())
        pdb = app.PDBFile(str(folder / "system.pdb"))
        top = pdb.topology
        pos = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(u.nanometer))
        box_vecs = top.getPeriodicBoxVectors()
        if box_vecs is None:
            raise SchemaError(f"{folder}/system.pdb has no periodic box")
        box = np.asarray([[v.value_in_unit(u.nanometer) for v in (vec[0], vec[1], vec[2])] for vec in box_vecs])
        n = system.getNumParticles()
        if n != top.getNumAtoms():
            raise SchemaError(f"{folder}: system has {n} particles, PDB {top.getNumAtoms()} atoms")
        numbers = np.array([a.element.atomic_number for a in top.atoms()])
        mol_ids = np.array([a.residue.index for a in top.atoms()])
        nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
        charges = np.array([nb.getParticleParameters(i)[0].value_in_unit(u.elementary_charge) for i in range(n)])
        masses = np.array([system.getParticleMass(i).value_in_unit(u.dalton) for i in range(n)])
        is_qm = np.zeros(n, dtype=bool)
        is_qm[np.asarray(meta["qm_indices"], dtype=int)] = True
        if np.any(charges[is_qm] != 0):
            raise InputError(f"{folder}: QM atoms carry MM charges in the system; rebuild it with qmlmm build")
        return cls(
            folder,
            system,
            top,
            pos,
            box,
            numbers,
            charges,
            mol_ids,
            is_qm,
            masses,
            int(meta["qm_charge"]),
            int(meta.get("qm_mult", 1)),
            meta,
        )

    @property
    def qm_indices(self) -> np.ndarray:
        return np.flatnonzero(self.is_qm)

    def frame(
        self,
        positions: np.ndarray | None = None,
        box: np.ndarray | None = None,
        info: dict[str, float | int | str] | None = None,
    ) -> Frame:
        """A :class:`Frame` of this system at ``positions`` (N, 3) nm (default: the built ones)."""
        return Frame(
            numbers=self.numbers,
            positions=self.positions if positions is None else positions,
            is_qm=self.is_qm,
            charges=self.charges,
            mol_ids=self.mol_ids,
            box=self.box if box is None else box,
            qm_charge=self.qm_charge,
            qm_mult=self.qm_mult,
            info=dict(info or {}),
        )
