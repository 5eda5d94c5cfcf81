"""A model's predictions on labelled frames and their errors (MAE, RMSE of energies and forces, overall and
per element): numbers that training (validation, test) and analysis (evaluation, plots) share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from qmlmm.data.batch import FrameTensors, collate
from qmlmm.elements import symbol
from qmlmm.models.ensemble import Ensemble
from qmlmm.models.hdnnp import energy_and_forces

__all__ = ["Collected", "ErrorStats", "collect_predictions", "compute_metrics"]


@dataclass
class Collected:
    """Predictions and references gathered over frames (all kJ/mol or kJ/mol/nm)."""

    e_pred: np.ndarray
    e_ref: np.ndarray
    fq_pred: np.ndarray
    fq_ref: np.ndarray
    fq_z: np.ndarray
    fm_pred: np.ndarray
    fm_ref: np.ndarray
    n_qm: np.ndarray
    e_std: np.ndarray | None = None

    def save(self, path: str | Path) -> Path:
        """Write the arrays to ``path`` (.npz, atomically)."""
        from qmlmm.fileio import atomic_path

        arrays = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Collected:
        with np.load(path) as z:
            return cls(**{k: np.array(z[k]) for k in z.files})

    @classmethod
    def concat(cls, parts: Sequence[Collected]) -> Collected:
        cat = np.concatenate
        std = None if any(p.e_std is None for p in parts) else cat([p.e_std for p in parts])
        return cls(
            cat([p.e_pred for p in parts]),
            cat([p.e_ref for p in parts]),
            cat([p.fq_pred for p in parts]),
            cat([p.fq_ref for p in parts]),
            cat([p.fq_z for p in parts]),
            cat([p.fm_pred for p in parts]),
            cat([p.fm_ref for p in parts]),
            cat([p.n_qm for p in parts]),
            std,
        )


@dataclass
class ErrorStats:
    mae: float
    rmse: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"mae": self.mae, "rmse": self.rmse, "n": self.n}


def _stats(d: np.ndarray) -> ErrorStats:
    d = np.asarray(d, dtype=np.float64).ravel()
    if d.size == 0:
        return ErrorStats(float("nan"), float("nan"), 0)
    return ErrorStats(float(np.mean(np.abs(d))), float(np.sqrt(np.mean(d * d))), int(d.size))


def compute_metrics(c: Collected, shift_energy: bool = False) -> dict[str, object]:
    """MAE/RMSE of energies (kJ/mol; also per atom), QM and MM forces (kJ/mol/nm, per component),
    QM forces per element. ``shift_energy`` removes the mean energy error first (for baselines,
    "after one constant shift")."""
    de = c.e_pred - c.e_ref
    if shift_energy and de.size:
        de = de - de.mean()
    out: dict[str, object] = {
        "energy": _stats(de).to_dict(),
        "energy_per_atom": _stats(de / np.maximum(c.n_qm, 1)).to_dict(),
        "qm_forces": _stats(c.fq_pred - c.fq_ref).to_dict(),
        "mm_forces": _stats(c.fm_pred - c.fm_ref).to_dict(),
        "qm_forces_per_element": {
            symbol(int(z)): _stats((c.fq_pred - c.fq_ref)[c.fq_z == z]).to_dict() for z in np.unique(c.fq_z)
        },
        "n_frames": len(de),
    }
    if c.e_std is not None and len(c.e_std):
        out["energy_spread_mean"] = float(np.mean(c.e_std))
        if len(de) > 2 and np.std(c.e_std) > 0:
            out["spread_error_correlation"] = float(np.corrcoef(c.e_std, np.abs(de))[0, 1])
    return out


def collect_predictions(
    model: torch.nn.Module, items: Sequence[FrameTensors], dtype: torch.dtype, device: str = "cpu", batch_size: int = 8
) -> Collected:
    """Predictions of a model (HDNNP or Ensemble) and the targets of ``items``."""
    parts = []
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        b = collate(chunk, dtype=dtype, device=device)
        std = None
        if isinstance(model, Ensemble):
            p = model.predict(b)
            e, fq, fm, std = p.energy, p.qm_forces, p.mm_forces, p.energy_std.double().cpu().numpy()
        else:
            e, fq, fm, _ = energy_and_forces(model, b)
        assert b.energy is not None and b.qm_forces is not None and b.mm_forces is not None
        parts.append(
            Collected(
                e.detach().double().cpu().numpy(),
                b.energy.double().cpu().numpy(),
                fq.detach().double().cpu().numpy(),
                b.qm_forces.double().cpu().numpy(),
                b.qm_z.cpu().numpy(),
                fm.detach().double().cpu().numpy(),
                b.mm_forces.double().cpu().numpy(),
                b.n_qm_per_frame.cpu().numpy(),
                std,
            )
        )
    return Collected.concat(parts)


def charge_errors(
    model: torch.nn.Module, items: Sequence[FrameTensors], dtype: torch.dtype, device: str = "cpu", batch_size: int = 8
) -> dict[str, float] | None:
    """MAE, RMSE (e) and count of the model's QM charges (ensemble mean) against the reference charges of
    ``items`` (the target's; target minus baseline for a delta model), or None when the model has no
    charges or no item has references."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    if getattr(members[0].cfg, "electrostatics", "none") == "none":
        return None
    with_q = [it for it in items if it.qm_q_ref is not None]
    if not with_q:
        return None
    err = []
    with torch.no_grad():
        for k in range(0, len(with_q), batch_size):
            b = collate(with_q[k : k + batch_size], dtype=dtype, device=device)
            q = torch.stack([m.charges(b) for m in members]).mean(0)  # type: ignore[operator]
            assert b.qm_q_ref is not None
            err.append((q - b.qm_q_ref).double().cpu().numpy())
    d = np.concatenate(err)
    return {"mae": float(np.mean(np.abs(d))), "rmse": float(np.sqrt(np.mean(d**2))), "n": int(d.size)}
