"""Frames as PyTorch batches for the descriptors and the model.

A :class:`FrameBatch` concatenates the QM atoms and the embedded MM atoms of several frames, each
atom tagged with its frame index (no padding). Positions are those of the embedding (QM region
whole, MM molecules at their nearest image), so everything downstream is non-periodic.
The charges are the raw MM charges; ``mm_mol`` lets the model apply the smooth switching of
:mod:`qmlmm.environment` itself (differentiably), so its forces include the switching term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

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
    return ft


@dataclass
class FrameBatch:
    """Several frames concatenated (tensors on one device, positions with the model's dtype).

    Attributes:
        qm_z (Nq,), qm_pos (Nq, 3), qm_frame (Nq,), mm_pos (Nm, 3), mm_q (Nm,), mm_frame (Nm,),
        mm_mol (Nm,) molecule index unique across the batch, n_frames,
        energy (B,), qm_forces (Nq, 3), mm_forces (Nm, 3) targets when present,
        qm_charge (B,) total QM charge of each frame in e (zeros when not given).
    """

    qm_z: torch.Tensor
    qm_pos: torch.Tensor
    qm_frame: torch.Tensor
    mm_pos: torch.Tensor
    mm_q: torch.Tensor
    mm_frame: torch.Tensor
    mm_mol: torch.Tensor
    n_frames: int
    energy: torch.Tensor | None = None
    qm_forces: torch.Tensor | None = None
    mm_forces: torch.Tensor | None = None
    qm_charge: torch.Tensor | None = None
    meta: dict[str, object] = field(default_factory=dict)

    def total_charges(self) -> torch.Tensor:
        """(B,) total QM charge per frame in e, in the positions' dtype (zeros when not given)."""
        if self.qm_charge is None:
            return torch.zeros(self.n_frames, dtype=self.qm_pos.dtype, device=self.qm_pos.device)
        return self.qm_charge.to(self.qm_pos.dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FrameBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if dtype is not None and v.is_floating_point() and f.name != "energy":
                    v = v.to(dtype)  # target energies stay float64 (totals ~1e6 kJ/mol)
            out[f.name] = v
        return FrameBatch(**out)

    @property
    def n_qm_per_frame(self) -> torch.Tensor:
        return torch.bincount(self.qm_frame, minlength=self.n_frames)


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
    return b
