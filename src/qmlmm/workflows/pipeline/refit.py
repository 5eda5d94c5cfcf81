"""The validation's active-learning round (``validation: {refit: true}``).

The guarded validation runs queue the frames where the ensemble was unsure (energy spread above
``max_uncertainty``) to ``RUN/validation/<mode>_guarded/run<k>/uncertain.h5``. Here, per mode (delta,
direct) whose guarded driver ran:

1. those frames labelled at the reference and the baseline (``RUN/validation/refit/<mode>/``, one dataset
   per run, named by a fingerprint of its frames; resumable; a frame that fails is left out and counted);
2. the mode's ensemble trained again from the pipeline's settings and seed on the pipeline's labels plus
   these frames, all of them training frames (``add_train``): the validation and test frames stay the
   pipeline's, so the test errors of the two models compare (``RUN/validation/refit/models/<mode>.pt``);
3. the validation's unguarded runs repeated with the new model as driver ``<mode>_refit`` (same starts,
   seeds, steps and masses as ``<mode>``; run by the validation step, analysed beside the others).

Measured on alanine dipeptide in water (``benchmarks/results/validation_refit.md``): with 63 (direct) and
50 (delta) such frames added, none of 16 unguarded runs stopped, against 6 of 16 for the pipeline's
models and 6 of 16 for a control retrained with another seed alone (Fisher p = 0.018).

The queued frames come from ML/MM runs, never from the reference runs the models are compared with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qmlmm.workflows.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

__all__ = [
    "REFIT_MODES",
    "QueuedLabels",
    "label_queued",
    "queued_sources",
    "refit_folder",
    "refit_models",
]

#: the models a refit round retrains (each needs its ``<mode>_guarded`` driver's queued frames)
REFIT_MODES: tuple[str, ...] = ("delta", "direct")


def refit_folder(out: Path) -> Path:
    """``RUN/validation/refit``: the round's queued frames, labels, models and record."""
    return Path(out) / "validation" / "refit"


def queued_sources(out: Path, mode: str, runs: int) -> list[Path]:
    """The ``uncertain.h5`` of the mode's guarded validation runs 0..``runs``-1 that queued a frame, in run
    order."""
    found = [Path(out) / "validation" / f"{mode}_guarded" / f"run{k}" / "uncertain.h5" for k in range(runs)]
    return [p for p in found if p.exists()]


@dataclass
class QueuedLabels:
    """One mode's queued frames and their labels.

    Attributes:
        labels: one labelled dataset per source file that queued a frame (empty when none did).
        sources: frames queued per source file (named ``<driver>/run<k>/uncertain.h5``).
        n_queued: frames queued in all.
        n_labelled: frames labelled at both levels (the others failed and are left out).
    """

    labels: list[Path]
    sources: dict[str, int]
    n_queued: int
    n_labelled: int


def _source_name(path: Path) -> str:
    """``<driver>/run<k>/uncertain.h5`` of a run's queue file."""
    return "/".join(path.parts[-3:])


def label_queued(cfg: PipelineConfig, sources: list[Path], folder: Path, progress: bool = False) -> QueuedLabels:
    """Every source's frames labelled at the config's reference (level ``ref``) and baseline (``base``), one
    dataset per source in ``folder``, named by the source's run and a fingerprint of its frames
    (``<driver>_run<k>-<fingerprint>.labels.h5``; resumed where it stopped).

    A source whose frames changed since (its run went on, or was run again) gets a new file and only its own
    frames are labelled again; the others are reused; nothing is overwritten."""
    from qmlmm.data import Dataset
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.label import LevelRequest, frames_fingerprint, label_dataset

    reqs = [LevelRequest.from_spec(cfg.reference, "ref"), LevelRequest.from_spec(cfg.baseline, "base")]
    labels, counts, labelled = [], {}, 0
    for src in sources:
        with Dataset(src) as ds:
            n, fp = len(ds), frames_fingerprint(ds)
        if n == 0:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"{src.parent.parent.name}_{src.parent.name}-{fp[:12]}.labels.h5"
        label_dataset(src, out, reqs, EmbeddingSettings(cfg.cutoff, cfg.switch_width), workers=0,
                      threads=cfg.total_threads, progress=progress)  # fmt: skip
        with Dataset(out) as ds:
            labelled += int(ds.labelled_at(("ref", "base")).sum())
        labels.append(out)
        counts[_source_name(src)] = n
    return QueuedLabels(labels, counts, sum(counts.values()), labelled)


def refit_models(
    cfg: PipelineConfig, out: Path, modes: list[str], runs: int, progress: bool = False
) -> dict[str, dict[str, Any]]:
    """Label each mode's queued frames and train its refit model (reused when trained on the same frames).

    Args:
        cfg: the pipeline config (engines, embedding, training settings, seed).
        out: the pipeline's folder (``labels.h5``, ``models/``, ``validation/``).
        modes: the modes to refit (``delta``, ``direct``).
        runs: the validation's runs per driver (guarded runs 0..runs-1 are read).
        progress: progress bars.

    Returns per mode: ``sources`` (frames queued per source file), ``n_queued``, ``n_labelled``, ``model``
    (path of the refit model, None when no queued frame could be added: ``why`` says so), and, with a model,
    ``n_train`` and the test errors (``test_mae`` kJ/mol and kJ/mol/nm), ``before`` (the pipeline's model) and
    ``after`` (the refit). Written to ``RUN/validation/refit/refit.json``. A queue that changed since (a
    guarded run went on) gives a new training set and so a new model, whose refit runs then refuse the old
    ones by name (the validation's engine check).
    """
    from qmlmm.training import TrainJob, train_jobs
    from qmlmm.workflows.pipeline.steps import _train_config
    from qmlmm.workflows.pipeline.summary import _write_json_atomic

    folder = refit_folder(out)
    rec: dict[str, dict[str, Any]] = {}
    jobs = []
    for mode in modes:
        q = label_queued(cfg, queued_sources(out, mode, runs), folder / mode, progress)
        rec[mode] = {**{k: v for k, v in asdict(q).items() if k != "labels"}, "model": None}
        rec[mode]["label_files"] = [p.name for p in q.labels]  # the files trained on (older ones stay beside)
        if q.n_labelled == 0:
            why = "no queued frame could be labelled" if q.labels else "the guarded runs queued no frame"
            rec[mode]["why"] = why
            log.warning("[validation refit] %s: %s; no refit model", mode, rec[mode]["why"])
            continue
        model = folder / "models" / f"{mode}.pt"
        model.parent.mkdir(parents=True, exist_ok=True)
        log.info("[validation refit] %s: %d queued frames labelled, training", mode, q.n_labelled)
        # absolute paths, as the training records its added files (a rerun with the folder spelt otherwise or
        # moved still reuses the model: training.parallel compares the files by name)
        data = {"require": ("base",), "add_train": [str(p.resolve()) for p in q.labels]}
        jobs.append(TrainJob(str(Path(out) / "labels.h5"), _train_config(cfg, mode), str(model), data))
        rec[mode]["model"] = str(model)
    done = train_jobs(jobs, workers=min(cfg.workers, 2), progress=progress)
    for mode in modes:
        if rec[mode]["model"] is None:
            continue
        after = done[rec[mode]["model"]][0]
        before = json.loads((Path(out) / "models" / f"{mode}.metrics.json").read_text())
        rec[mode]["n_train"] = {"before": before["n_train"], "after": after["n_train"]}
        rec[mode]["test_mae"] = {
            "before": {k: before["test"][k]["mae"] for k in ("energy", "qm_forces", "mm_forces")},
            "after": {k: after["test"][k]["mae"] for k in ("energy", "qm_forces", "mm_forces")},
        }
    _write_json_atomic(folder / "refit.json", rec)
    return rec


def refit_record(out: Path) -> dict[str, dict[str, Any]] | None:
    """The refit round's record (``refit_models``' return), None before the round ran."""
    path = refit_folder(out) / "refit.json"
    return json.loads(path.read_text()) if path.exists() else None
