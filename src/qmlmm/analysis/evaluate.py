"""Evaluate a model on a labelled dataset: MAE/RMSE per quantity and element, baseline alone, plots."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.data.batch import frame_tensors
from qmlmm.data.training_set import SplitSettings, load_training_data
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import InputError
from qmlmm.models.evaluation import Collected, collect_predictions, compute_metrics
from qmlmm.models.model import QMLMMModel

log = logging.getLogger(__name__)

__all__ = ["EvaluationResult", "evaluate_model", "baseline_collected"]


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    json_path: Path
    plot_path: Path


def baseline_collected(data_path: str | Path, target: str, baseline: str, indices: np.ndarray) -> Collected:
    """The baseline level's energies and forces against the target's, for the frames ``indices``."""
    from qmlmm.data import Dataset

    parts = []
    with Dataset(data_path) as ds:
        emb = EmbeddingSettings.from_dict(ds.level_info(target).settings["embedding"])
        for i in indices:
            fr = ds.frame(int(i))
            ref = frame_tensors(fr, emb, target)
            base = frame_tensors(fr, emb, baseline)
            parts.append(
                Collected(
                    np.array([base.energy]),
                    np.array([ref.energy]),
                    base.qm_forces,  # type: ignore[arg-type]
                    ref.qm_forces,  # type: ignore[arg-type]
                    ref.qm_z,
                    base.mm_forces,  # type: ignore[arg-type]
                    ref.mm_forces,  # type: ignore[arg-type]
                    np.array([len(ref.qm_z)]),
                )
            )
    return Collected.concat(parts)


def evaluate_model(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path | None = None,
    split: str = "all",
    batch_size: int = 8,
) -> EvaluationResult:
    """Errors of a model on the frames of ``data_path`` labelled at the model's target (and baseline).

    Args:
        split: "all" frames, or "test"/"valid"/"train" as the model's training split them (same seed
            and block size; meaningful only on the dataset it was trained on).
    Writes ``evaluation.json`` and ``evaluation_parity.png`` into ``out_dir`` (default: next to the model).
    """
    model = QMLMMModel.load(model_path)
    meta = model.meta
    tr = meta.training
    data = load_training_data(data_path, meta.target, meta.baseline, SplitSettings.of_training(tr))
    if data.embedding.to_dict() != model.embedding.to_dict():
        raise InputError(
            f"the dataset's labels used embedding {data.embedding.to_dict()}, the model was trained "
            f"with {model.embedding.to_dict()}"
        )
    if split == "all":
        idx = np.arange(len(data.items))
    elif split in ("train", "valid", "test"):
        idx = {"train": data.train, "valid": data.valid, "test": data.test}[split]
    else:
        raise InputError(f"split must be all, train, valid or test; got {split!r}")
    items = data.subset(idx)
    c = collect_predictions(model.ensemble, items, model.dtype, str(model.device), batch_size)
    metrics: dict[str, Any] = {
        "model_file": str(model_path),
        "data": str(data_path),
        "split": split,
        "description": model.describe(),
        "model": compute_metrics(c),
    }
    if meta.delta:
        assert meta.baseline is not None
        frame_idx = np.array([it.index for it in items])
        bc = baseline_collected(data_path, meta.target, meta.baseline, frame_idx)
        metrics["baseline_alone"] = compute_metrics(bc, shift_energy=True)
        metrics["baseline_alone_note"] = "baseline level vs target after one constant energy shift"
    out = Path(out_dir) if out_dir else Path(model_path).parent
    out.mkdir(parents=True, exist_ok=True)
    jp = out / "evaluation.json"
    jp.write_text(json.dumps(metrics, indent=2))
    from qmlmm.analysis.plots import parity_plot

    pp = parity_plot(
        c,
        out / "evaluation_parity.png",
        title=f"{Path(model_path).name} on {Path(data_path).name} ({split}; "
        f"{'delta ' + meta.target + ' - ' + str(meta.baseline) if meta.delta else meta.target})",
    )
    return EvaluationResult(metrics, jp, pp)
