"""``qmlmm predict``: a model's energies, forces and ensemble spreads for frames, in exchange formats."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qmlmm.data import is_hdf5, load_frames, write_dataset, write_extxyz
from qmlmm.models.model import QMLMMModel
from qmlmm.system import Label

log = logging.getLogger(__name__)

__all__ = ["predict_file"]


def predict_file(
    model_path: str | Path,
    src: str | Path,
    out: str | Path,
    batch_size: int = 8,
    force_spread: bool = True,
    threads: int = 1,
    device: str = "cpu",
) -> int:
    """Predict for every frame of ``src`` (extxyz or HDF5) and write ``out``.

    ``out`` ending in .h5/.hdf5 becomes a dataset, anything else extended XYZ. Predictions are
    stored under level ``model`` (total energy and forces: baseline + network for delta models,
    the baseline computed here) and their ensemble spread under ``model_std``; labels the frames
    already had are kept. Returns the number of frames.
    """
    import torch

    torch.set_num_threads(max(1, threads))
    model = QMLMMModel.load(model_path, device=device)
    frames = load_frames(src)
    base = model.baseline_engine(threads) if model.meta.delta else None
    preds = model.predict_frames(
        frames, batch_size=batch_size, force_spread=force_spread, baseline=base, use_labels=False
    )
    for fr, p in zip(frames, preds, strict=True):
        fr.labels["model"] = Label(p.energy, p.forces)
        fstd = p.forces_std if p.forces_std is not None else np.zeros_like(p.forces)
        fr.labels["model_std"] = Label(p.energy_std, fstd)
    out = Path(out)
    if out.suffix.lower() in (".h5", ".hdf5"):
        write_dataset(
            out,
            frames,
            overwrite=True,
            level_methods={
                "model": f"model {Path(model_path).name}",
                "model_std": f"ensemble spread of {Path(model_path).name}",
            },
        ).close()
    else:
        write_extxyz(out, frames)
    log.info("predicted %d frames of %s%s", len(frames), src, " (HDF5)" if is_hdf5(src) else "")
    return len(frames)
