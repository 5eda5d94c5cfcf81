"""``qmlmm learning-curve``: test errors against training-set size, direct and delta learning.

For each size N the model is trained on N frames drawn from the training split (the same test split
for every run: frames lacking the baseline label are left out of both modes), and its errors on the
test split are recorded; the baseline's own errors (after one constant energy shift) are the
reference line delta learning has to beat.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.analysis.evaluate import baseline_collected
from qmlmm.data.training_set import load_training_data
from qmlmm.errors import InputError
from qmlmm.models.evaluation import compute_metrics
from qmlmm.training.config import TrainConfig
from qmlmm.training.parallel import TrainJob, train_jobs

log = logging.getLogger(__name__)

__all__ = ["learning_curve"]


def _point(m: dict[str, Any], n: int, extra: dict[str, Any]) -> dict[str, Any]:
    t = m["test"]
    return {
        "n_train": n,
        "energy_mae": t["energy"]["mae"],
        "energy_rmse": t["energy"]["rmse"],
        "qm_forces_mae": t["qm_forces"]["mae"],
        "qm_forces_rmse": t["qm_forces"]["rmse"],
        "mm_forces_mae": t["mm_forces"]["mae"],
        "mm_forces_rmse": t["mm_forces"]["rmse"],
        "n_parameters": m["n_parameters_per_network"],
        **extra,
    }


def point_epochs(epochs: int, n_train: int, scale_epochs: bool) -> int:
    """Epochs of a learning-curve point with ``n_train`` frames: ``epochs``, or with ``scale_epochs``
    epochs * 100 / n_train above 100 frames (about the steps of 100 frames), at least 50, at most ``epochs``."""
    if not scale_epochs:
        return epochs
    return min(epochs, max(50, int(epochs * min(1.0, 100.0 / n_train))))


def learning_curve(
    data_path: str | Path,
    cfg: TrainConfig,
    sizes: list[int],
    out_dir: str | Path,
    modes: tuple[str, ...] = ("direct", "delta"),
    progress: bool = True,
    hidden_by_mode: dict[str, list[int]] | None = None,
    scale_epochs: bool = False,
    workers: int = 1,
    strict: bool = False,
) -> dict[str, Any]:
    """Train direct and/or delta models on growing subsets; write learning_curve.{json,png} in out_dir.

    ``hidden_by_mode`` may give each mode its own network size (e.g. a smaller one for delta).
    ``scale_epochs`` keeps the number of optimiser steps roughly constant above 100 training frames
    (epochs * 100 / N, at least 50), so large subsets do not take proportionally longer; off by default,
    since it flattens the curve: beta-alanine in water at 400 frames, delta, test MAE E / QM F / MM F
    2.32 / 67.8 / 0.54 at the scaled 50 epochs against 1.78 / 33.5 / 0.37 at the full 200
    (benchmarks/learning_curves.py).
    ``workers`` > 1 trains that many models at once, one single-threaded process each.
    Each run resumes from its checkpoint (or is reused when its model file exists).
    ``strict``: a size above the training frames is an error (the CLI); otherwise it is skipped with a
    warning (the pipeline, where labels that failed can leave fewer frames than configured).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.baseline is None:
        modes = tuple(m for m in modes if m == "direct")
    need = (cfg.baseline,) if cfg.baseline else ()
    curves: dict[str, list[dict[str, Any]]] = {}
    split_test = None
    jobs: list[TrainJob] = []
    planned: dict[str, list[tuple[int, str]]] = {}
    for mode in modes:
        base = cfg.baseline if mode == "delta" else None
        data = load_training_data(data_path, cfg.target, base, cfg.split_settings, require=need)
        split_test = data.test
        planned[mode] = []
        too_big = [n for n in sizes if n > len(data.train)]
        if (strict and too_big) or not sizes or min(sizes) < 1:
            raise InputError(
                f"learning-curve sizes {sorted(sizes)}: each must lie in 1..{len(data.train)}, the training frames "
                f"of the {data.split_info.get('kind') if data.split_info else ''} split of {data_path}"
            )
        for n in sizes:
            if n > len(data.train):
                log.warning("size %d exceeds the %d training frames; skipped", n, len(data.train))
                continue
            c = replace(
                cfg,
                baseline=base,
                max_train_frames=n,
                epochs=point_epochs(cfg.epochs, n, scale_epochs),
                hidden=(hidden_by_mode or {}).get(mode, cfg.hidden),
            )
            path = str(out / f"{mode}_{n}.pt")
            planned[mode].append((n, path))
            jobs.append(TrainJob(str(data_path), c, path, {"require": need}))
    # largest runs first, so that the pool is not left waiting on one long run at the end
    jobs.sort(key=lambda j: -(j.cfg.max_train_frames or 0) * j.cfg.epochs)
    done = train_jobs(jobs, workers=workers, progress=progress)
    for mode, plan in planned.items():
        pts = []
        for n, path in plan:
            m, secs = done[path]
            pts.append(_point(m, n, {"train_seconds": secs}))
            log.info(
                "%s N=%d: test energy MAE %.3f kJ/mol, QM forces %.2f, MM forces %.3f kJ/mol/nm",
                mode,
                n,
                pts[-1]["energy_mae"],
                pts[-1]["qm_forces_mae"],
                pts[-1]["mm_forces_mae"],
            )
        curves[mode] = pts
    result: dict[str, Any] = {
        "data": str(data_path),
        "target": cfg.target,
        "baseline": cfg.baseline,
        "config": cfg.to_dict(),
        "curves": curves,
    }
    base_line = None
    if cfg.baseline and split_test is not None:
        data = load_training_data(data_path, cfg.target, None, cfg.split_settings, require=need)
        idx = np.array([data.items[int(i)].index for i in data.test])
        bm = compute_metrics(baseline_collected(data_path, cfg.target, cfg.baseline, idx), shift_energy=True)
        base_line = {
            "energy_mae": bm["energy"]["mae"],  # type: ignore[index]
            "qm_forces_mae": bm["qm_forces"]["mae"],  # type: ignore[index]
            "mm_forces_mae": bm["mm_forces"]["mae"],  # type: ignore[index]
        }
        result["baseline_alone"] = bm
    (out / "learning_curve.json").write_text(json.dumps(result, indent=2))
    from qmlmm.analysis.plots import learning_curve_plot

    learning_curve_plot(
        curves,  # type: ignore[arg-type]
        out / "learning_curve.png",
        baseline=base_line,
        title=f"test errors vs training frames: {cfg.target}"
        + (f", delta over {cfg.baseline}" if cfg.baseline else ""),
    )
    return result
