"""Frames as PyTorch batches for the descriptors and the model.

A :class:`FrameBatch` concatenates the QM atoms and the embedded MM atoms of several frames, each
atom tagged with its frame index (no padding). Positions are those of the embedding (QM region
whole, MM molecules at their nearest image), so everything downstream is non-periodic.
The charges are the raw MM charges; ``mm_mol`` lets the model apply the smooth switching of
:mod:`qmlmm.environment` itself (differentiably), so its forces include the switching term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qmlmm.batch import FrameBatch
from qmlmm.environment import Embedding, EmbeddingSettings, select_embedding
from qmlmm.system import Frame

__all__ = ["FrameBatch", "FrameTensors", "frame_tensors", "collate"]


@dataclass
class FrameTensors:
    """One frame's model inputs and (optional) targets, in qmlmm units (numpy, float64).

    Attributes:
        qm_z: (n,) atomic numbers.  qm_pos: (n, 3) nm.  mm_pos: (m, 3) nm.  mm_q: (m,) raw charges e.
        mm_mol: (m,) molecule index (local to the frame) of each MM atom.
        energy: target energy kJ/mol (NaN if absent).  qm_forces: (n, 3), mm_forces: (m, 3) kJ/mol/nm.
        index: frame index in its dataset.  qm_index, mm_index: atom indices in the frame.
        qm_charge: total charge of the QM region (e).
        qm_q_ref: (n,) reference QM atomic charges e of the target (for a delta target, target minus
        baseline), or None when the level records none.
    """

    qm_z: np.ndarray
    qm_pos: np.ndarray
    mm_pos: np.ndarray
    mm_q: np.ndarray
    mm_mol: np.ndarray
    energy: float = float("nan")
    qm_forces: np.ndarray | None = None
    mm_forces: np.ndarray | None = None
    index: int = -1
    qm_index: np.ndarray | None = None
    mm_index: np.ndarray | None = None
    qm_charge: int = 0
    qm_q_ref: np.ndarray | None = None


def frame_tensors(
    frame: Frame, settings: EmbeddingSettings, level: str | None = None, emb: Embedding | None = None, index: int = -1
) -> FrameTensors:
    """Model inputs of ``frame`` (its embedding under ``settings``) and the targets of ``level``."""
    emb = emb or select_embedding(frame, settings)
    _, mol = np.unique(frame.mol_ids[emb.mm_index], return_inverse=True)
    ft = FrameTensors(
        qm_z=frame.numbers[emb.qm_index],
        qm_pos=emb.qm_positions,
        mm_pos=emb.mm_positions,
        mm_q=frame.charges[emb.mm_index],
        mm_mol=mol.astype(np.int64),
        index=index,
        qm_index=emb.qm_index,
        mm_index=emb.mm_index,
        qm_charge=int(frame.qm_charge),
    )
    if level is not None and level in frame.labels:
        lab = frame.labels[level]
        ft.energy = float(lab.energy)
        ft.qm_forces = lab.forces[emb.qm_index]
        ft.mm_forces = lab.forces[emb.mm_index]
        if lab.charges is not None and np.all(np.isfinite(lab.charges[emb.qm_index])):
            ft.qm_q_ref = np.asarray(lab.charges[emb.qm_index], dtype=np.float64)
    return ft


def collate(
    items: Sequence[FrameTensors], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> FrameBatch:
    """Concatenate frames into a :class:`FrameBatch`."""
    qm_frame = np.concatenate([np.full(len(it.qm_z), k) for k, it in enumerate(items)])
    mm_frame = np.concatenate([np.full(len(it.mm_q), k) for k, it in enumerate(items)]) if items else np.zeros(0)
    mol_off = np.cumsum([0] + [int(it.mm_mol.max()) + 1 if len(it.mm_mol) else 0 for it in items])
    mm_mol = np.concatenate([it.mm_mol + mol_off[k] for k, it in enumerate(items)])
    t = {"dtype": dtype, "device": device}
    have_targets = all(np.isfinite(it.energy) and it.qm_forces is not None for it in items)
    b = FrameBatch(
        qm_z=torch.as_tensor(np.concatenate([it.qm_z for it in items]), device=device),
        qm_pos=torch.as_tensor(np.concatenate([it.qm_pos for it in items]), **t),  # type: ignore[arg-type]
        qm_frame=torch.as_tensor(qm_frame, device=device, dtype=torch.long),
        mm_pos=torch.as_tensor(np.concatenate([it.mm_pos for it in items]).reshape(-1, 3), **t),  # type: ignore[arg-type]
        mm_q=torch.as_tensor(np.concatenate([it.mm_q for it in items]), **t),  # type: ignore[arg-type]
        mm_frame=torch.as_tensor(mm_frame, device=device, dtype=torch.long),
        mm_mol=torch.as_tensor(mm_mol, device=device, dtype=torch.long),
        n_frames=len(items),
        qm_charge=torch.as_tensor([float(it.qm_charge) for it in items], dtype=torch.float64, device=device),
    )
    if have_targets:
        # float64 whatever the model dtype: a total energy of ~1e6 kJ/mol has a float32 spacing of 0.06-0.5 kJ/mol
        b.energy = torch.as_tensor(np.array([it.energy for it in items]), dtype=torch.float64, device=device)
        b.qm_forces = torch.as_tensor(np.concatenate([it.qm_forces for it in items]), **t)  # type: ignore[arg-type]
        b.mm_forces = torch.as_tensor(np.concatenate([it.mm_forces for it in items]).reshape(-1, 3), **t)  # type: ignore[arg-type]
    if any(it.qm_q_ref is not None for it in items):  # NaN for the frames without reference charges
        q = [it.qm_q_ref if it.qm_q_ref is not None else np.full(len(it.qm_z), np.nan) for it in items]
        b.qm_q_ref = torch.as_tensor(np.concatenate(q), **t)  # type: ignore[arg-type]
    return b
