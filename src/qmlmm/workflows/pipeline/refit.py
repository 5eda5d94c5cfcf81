"""The validation's active-learning round (``validation: {refit: true}``).

The guarded validation runs queue the frames where the ensemble was unsure (energy spread above
``max_uncertainty``) to ``RUN/validation/<mode>_guarded/run<k>/uncertain.h5``. Here, per mode (delta,
direct) whose guarded driver ran:

1. those frames merged (``RUN/validation/refit/<mode>/queued.h5``) and labelled at the reference and the
   baseline (``labels.h5``, resumable; a frame that fails is left out and counted);
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

from qmlmm.errors import InputError
from qmlmm.workflows.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

__all__ = [
    "REFIT_MODES",
    "QueuedLabels",
    "label_queued",
    "queued_sources",
    "refit_drivers",
    "refit_folder",
    "refit_models",
]

#: the models a refit round retrains (each needs its ``<mode>_guarded`` driver's queued frames)
REFIT_MODES: tuple[str, ...] = ("delta", "direct")


def refit_drivers(drivers: list[str], refit: bool) -> list[str]:
    """The ``<mode>_refit`` drivers for validation ``drivers``: one per mode whose guarded driver is among
    them, when ``refit``; none otherwise."""
    if not refit:
        return []
    return [f"{m}_refit" for m in REFIT_MODES if f"{m}_guarded" in drivers]


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
        labels: the labelled dataset (None when nothing was queued).
        sources: frames queued per ``uncertain.h5``.
        n_queued: frames queued in all.
        n_labelled: frames labelled at both levels (the others failed and are left out).
    """

    labels: Path | None
    sources: dict[str, int]
    n_queued: int
    n_labelled: int


def _frames_in(path: Path) -> int:
    from qmlmm.data import Dataset

    with Dataset(path) as ds:
        return len(ds)


def label_queued(cfg: PipelineConfig, sources: list[Path], folder: Path, progress: bool = False) -> QueuedLabels:
    """The frames of ``sources`` merged into ``folder/queued.h5`` and labelled at the config's reference
    (level ``ref``) and baseline (``base``) into ``folder/labels.h5`` (resumed where it stopped).

    Raises InputError when ``folder`` holds a merge of other files or of other frame counts (the guarded runs
    went on since): its labels and the model trained on them would not match what the runs queued."""
    from qmlmm.data import Dataset, merge_datasets
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.label import LevelRequest, label_dataset
    from qmlmm.workflows.pipeline.summary import _write_json_atomic

    counts = {str(p): _frames_in(p) for p in sources}
    counts = {p: n for p, n in counts.items() if n}
    if not counts:
        return QueuedLabels(None, {}, 0, 0)
    folder.mkdir(parents=True, exist_ok=True)
    listed = folder / "queued_sources.json"
    if listed.exists() and json.loads(listed.read_text()) != counts:
        raise InputError(
            f"{folder} holds the frames the guarded runs had queued when it was made "
            f"({json.loads(listed.read_text())}); they hold {counts} now. Delete {folder}, its model in "
            f"{folder.parent / 'models'} and its runs to redo the refit round"
        )
    queued = merge_datasets([(p, None) for p in counts], folder / "queued.h5")
    _write_json_atomic(listed, counts)
    labels = folder / "labels.h5"
    label_dataset(
        queued,
        labels,
        [LevelRequest.from_spec(cfg.reference, "ref"), LevelRequest.from_spec(cfg.baseline, "base")],
        EmbeddingSettings(cfg.cutoff, cfg.switch_width),
        workers=0,
        threads=cfg.total_threads,
        progress=progress,
    )
    from qmlmm.data.h5 import STATUS_DONE

    with Dataset(labels) as ds:
        both = int(((ds.status("ref") == STATUS_DONE) & (ds.status("base") == STATUS_DONE)).sum())
    return QueuedLabels(labels, counts, sum(counts.values()), both)


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

    Returns per mode: ``queued`` (frames per source file), ``n_queued``, ``n_labelled``, ``model`` (path of
    the refit model, None when no queued frame could be added: ``why`` says so), and, with a model, ``n_train``
    and the test errors (``test_mae`` kJ/mol and kJ/mol/nm) of the refit and of the pipeline's model (``before``).
    Written to ``RUN/validation/refit/refit.json``.
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
        if q.labels is None or q.n_labelled == 0:
            rec[mode]["why"] = (
                "the guarded runs queued no frame" if q.labels is None else "no queued frame could be labelled"
            )
            log.warning("[validation refit] %s: %s; no refit model", mode, rec[mode]["why"])
            continue
        model = folder / "models" / f"{mode}.pt"
        model.parent.mkdir(parents=True, exist_ok=True)
        log.info("[validation refit] %s: %d queued frames labelled, training", mode, q.n_labelled)
        data = {"require": ("base",), "add_train": [str(q.labels)]}
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
