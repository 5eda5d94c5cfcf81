"""A known smooth QM/MM-like target function, for testing that training recovers it.

E(R_qm, R_mm, q) = sum_{bonds ij} k (r_ij - r0_ij)^2 + sum_{i, J} c_{Z_i} q_J f_c(r_iJ) / r_iJ      (kJ/mol, nm)

(harmonic bonds of the QM molecule around its starting geometry plus a charge-potential coupling
that decays to zero at the embedding cutoff). Forces by autograd.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import cluster_frame
from qmlmm.data import write_dataset
from qmlmm.environment import EmbeddingSettings, select_embedding
from qmlmm.system import Frame, Label

COUPLING = {1: 20.0, 6: -15.0, 8: -40.0}


def target(
    z: np.ndarray, qm: np.ndarray, mm: np.ndarray, q: np.ndarray, r0: np.ndarray, rc: float
) -> tuple[float, np.ndarray, np.ndarray]:
    qt = torch.tensor(qm, requires_grad=True, dtype=torch.float64)
    mt = torch.tensor(mm, requires_grad=True, dtype=torch.float64)
    n = len(z)
    iu = torch.triu_indices(n, n, 1)
    r = torch.linalg.norm(qt[iu[0]] - qt[iu[1]], dim=-1)
    bonded = torch.as_tensor(r0) < 0.16
    e = (2000.0 * (r - torch.as_tensor(r0)) ** 2 * bonded).sum()
    d = torch.cdist(qt, mt)
    fc = 0.5 * (torch.cos(torch.pi * torch.clamp(d / rc, max=1.0)) + 1.0)
    c = torch.tensor([COUPLING[int(a)] for a in z], dtype=torch.float64)
    e = e + (c[:, None] * torch.as_tensor(q)[None, :] * fc / d).sum()
    gq, gm = torch.autograd.grad(e, [qt, mt])
    return float(e.detach()), -gq.numpy(), -gm.numpy()


def make_dataset(
    path: Path, n_frames: int = 60, cutoff: float = 0.8, seed: int = 0, baseline_fraction: float | None = None
) -> Path:
    """Frames of methanol with 6 waters, perturbed; labels 'ref' (the target) and optionally 'base'
    (a cruder version: ``baseline_fraction`` times the coupling, stiffer bonds) for delta tests."""
    rng = np.random.default_rng(seed)
    base = cluster_frame("methanol", n_waters=6, radius=0.38, seed=3)
    z = base.numbers[base.is_qm]
    n = len(z)
    iu = np.triu_indices(n, 1)
    r0 = np.linalg.norm(base.positions[:n][iu[0]] - base.positions[:n][iu[1]], axis=-1)
    settings = EmbeddingSettings(cutoff=cutoff, switch_width=0.0)  # sharp: the target's own cosine decays to 0
    frames = []
    for _ in range(n_frames):
        fr = base.copy()
        fr.positions = fr.positions + rng.normal(scale=0.008, size=fr.positions.shape)
        # move waters rigidly a bit more
        for m in range(1, 7):
            idx = fr.mol_ids == m
            fr.positions[idx] += rng.normal(scale=0.05, size=3)
        emb = select_embedding(fr, settings)
        for name, scale in (("ref", 1.0), ("base", baseline_fraction)):
            if scale is None:
                continue
            e, fq, fm = target(z, emb.qm_positions, emb.mm_positions, emb.mm_charges * scale, r0, cutoff)
            if name == "base":
                e, fq = e * 1.0, fq * 1.0
            forces = np.zeros((fr.n_atoms, 3))
            forces[emb.qm_index] = fq
            forces[emb.mm_index] = fm
            fr.labels[name] = Label(e, forces)
        frames.append(fr)
    ds = write_dataset(path, frames, overwrite=True, level_methods={"ref": "synthetic:ref", "base": "synthetic:base"})
    # record the embedding the labels used, as qmlmm label does
    import json

    for name in ds.levels():
        g = ds._f["levels"][name]
        g.attrs["settings"] = json.dumps({"engine": {}, "embedding": settings.to_dict()})
    ds.flush()
    ds.close()
    return path


def frame_of(path: Path, i: int) -> Frame:
    from qmlmm.data import Dataset

    with Dataset(path) as ds:
        return ds.frame(i)


#: fixed QM charges of the charged synthetic target, per element (acetate: 2 O, 2 C, 3 H; sum -1 e)
ACETATE_CHARGES = {8: -0.7, 6: 0.2, 1: 0.0}


def coulomb_target(
    z: np.ndarray, qm: np.ndarray, mm: np.ndarray, q: np.ndarray, r0: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Harmonic bonds around ``r0`` plus the Coulomb energy k_e sum_iJ Q_i q_J / r_iJ of the fixed QM
    charges Q (ACETATE_CHARGES) in the MM charges, undamped (kJ/mol; forces kJ/mol/nm by autograd)."""
    from qmlmm.units import COULOMB_KJMOL_NM

    qt = torch.tensor(qm, requires_grad=True, dtype=torch.float64)
    mt = torch.tensor(mm, requires_grad=True, dtype=torch.float64)
    iu = torch.triu_indices(len(z), len(z), 1)
    r = torch.linalg.norm(qt[iu[0]] - qt[iu[1]], dim=-1)
    bonded = torch.as_tensor(r0) < 0.16
    e = (2000.0 * (r - torch.as_tensor(r0)) ** 2 * bonded).sum()
    big_q = torch.tensor([ACETATE_CHARGES[int(a)] for a in z], dtype=torch.float64)
    d = torch.cdist(qt, mt)
    e = e + COULOMB_KJMOL_NM * (big_q[:, None] * torch.as_tensor(q)[None, :] / d).sum()
    gq, gm = torch.autograd.grad(e, [qt, mt])
    return float(e.detach()), -gq.numpy(), -gm.numpy()


def make_charged_dataset(path: Path, n_frames: int = 48, n_waters: int = 10, seed: int = 0) -> Path:
    """Frames of acetate (charge -1) with ``n_waters`` TIP3P waters 0.35-0.6 nm from its centre, perturbed;
    one level 'ref' (:func:`coulomb_target`) with the fixed charges as its QM charges. Every water lies within
    the 0.9 nm sharp cutoff, so the target's 1/r coupling is the whole story."""
    from qmlmm.testing import TIP3P_CHARGES, solute_from_smiles, tip3p_water

    rng = np.random.default_rng(seed)
    z, p, charge = solute_from_smiles("CC(=O)[O-]")
    n = len(z)
    iu = np.triu_indices(n, 1)
    r0 = np.linalg.norm(p[iu[0]] - p[iu[1]], axis=-1)
    settings = EmbeddingSettings(cutoff=0.9, switch_width=0.0)
    frames = []
    for _ in range(n_frames):
        qm = p + rng.normal(scale=0.006, size=p.shape)
        dirs = rng.normal(size=(n_waters, 3))
        dirs /= np.linalg.norm(dirs, axis=1)[:, None]
        mm = np.concatenate([tip3p_water(rng) + d * rng.uniform(0.35, 0.6) for d in dirs])
        fr = Frame(
            numbers=np.concatenate([z, np.tile([8, 1, 1], n_waters)]),
            positions=np.concatenate([qm, mm]),
            is_qm=np.arange(n + 3 * n_waters) < n,
            charges=np.concatenate([np.zeros(n), np.tile(TIP3P_CHARGES, n_waters)]),
            mol_ids=np.concatenate([np.zeros(n, int), 1 + np.arange(3 * n_waters) // 3]),
            qm_charge=charge,
        )
        emb = select_embedding(fr, settings)
        e, fq, fm = coulomb_target(z, emb.qm_positions, emb.mm_positions, emb.mm_charges, r0)
        forces = np.zeros((fr.n_atoms, 3))
        forces[emb.qm_index], forces[emb.mm_index] = fq, fm
        qref = np.full(fr.n_atoms, np.nan)
        qref[:n] = [ACETATE_CHARGES[int(a)] for a in z]
        fr.labels["ref"] = Label(e, forces, qref)
        frames.append(fr)
    ds = write_dataset(path, frames, overwrite=True, level_methods={"ref": "synthetic:coulomb"})
    import json

    ds._f["levels"]["ref"].attrs["settings"] = json.dumps({"engine": {}, "embedding": settings.to_dict()})
    ds.flush()
    ds.close()
    return path
