"""The model's input type: several frames' QM atoms and embedded MM atoms as PyTorch tensors.

A core type, below the descriptors, models and training that compute with it and the data layer that
builds it from frames (:func:`qmlmm.data.batch.collate`). No padding: every atom carries the index of its
frame. Positions are those of the embedding (QM region whole, MM molecules at their nearest image), so
everything downstream is non-periodic.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

__all__ = ["FrameBatch"]


@dataclass
class FrameBatch:
    """Several frames concatenated (tensors on one device, positions with the model's dtype).

    Attributes:
        qm_z (Nq,), qm_pos (Nq, 3), qm_frame (Nq,), mm_pos (Nm, 3), mm_q (Nm,), mm_frame (Nm,),
        mm_mol (Nm,) molecule index unique across the batch, n_frames,
        energy (B,), qm_forces (Nq, 3), mm_forces (Nm, 3) targets when present,
        qm_charge (B,) total QM charge of each frame in e (zeros when not given),
        qm_q_ref (Nq,) reference QM atomic charges in e (NaN for frames without; None when no frame has).
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
    qm_q_ref: torch.Tensor | None = None
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
