"""Several training runs at once, one process per run, one thread each.

On a CPU the training step of a small HDNNP is a long chain of small tensor operations; two OpenMP
threads on one step gain little (12 vs 15 ms per frame for methanol with 1500 MM atoms, 2 cores) and,
with the passive OpenMP wait policy the package sets for xtb's sake, sometimes lose a factor of two
to futex wake-ups. Running independent models (direct and delta, the points of a learning curve) in
separate single-threaded processes keeps every core busy instead. Results are the same as running
them one after the other (each run is seeded by its own configuration).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qmlmm.training.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["TrainJob", "finished", "labels_changed", "train_jobs"]


@dataclass
class TrainJob:
    """One training run: the dataset and how to read it, the configuration, the model path.

    ``data`` holds keyword arguments of :func:`qmlmm.training.load_training_data` other than
    ``path``, ``target``, ``baseline`` and the split settings, which come from ``cfg``
    (e.g. ``{"require": ("base",)}``).
    """

    path: str
    cfg: TrainConfig
    out: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def levels(self) -> tuple[str, ...]:
        """The label levels the job's training reads."""
        from qmlmm.data.training_set import levels_read

        return levels_read(self.cfg.target, self.cfg.baseline, self.data.get("require", ()))


def finished(job: TrainJob) -> dict[str, Any] | None:
    """The metrics of ``job`` if its model was already trained with the same configuration and added
    training files, else None."""
    import json

    from qmlmm.training.trainer import side_files

    mfile = side_files(Path(job.out))["metrics.json"]
    if not (Path(job.out).exists() and mfile.exists()):
        return None
    try:
        m: dict[str, Any] = json.loads(mfile.read_text())
    except (OSError, ValueError):
        return None
    from qmlmm.training.config import result_settings_of

    want = json.loads(json.dumps(job.cfg.result_settings()))
    split = m.get("split") or {}
    # frames added to training (load_training_data's add_train) are part of what was trained on
    if not _same_added(split.get("added_train") or {}, _added_frames(job)):
        return None
    if labels_changed(job, m):
        return None
    return m if result_settings_of(m.get("config") or {}) == want else None


def labels_changed(job: TrainJob, metrics: dict[str, Any] | None = None) -> bool:
    """Whether the job's dataset no longer holds the labels its model (``metrics``, default read from the
    model's metrics file) was trained on: frames labelled, relabelled or appended since change their digest
    (:func:`qmlmm.data.training_set.labels_digest`). A model trained before digests were recorded counts as
    unchanged (with a warning); an unreadable dataset or metrics file as changed."""
    import json

    from qmlmm.data import Dataset
    from qmlmm.data.training_set import DIGEST_VERSION, labels_digest
    from qmlmm.training.trainer import side_files

    try:
        m = metrics if metrics is not None else json.loads(side_files(Path(job.out))["metrics.json"].read_text())
    except (OSError, ValueError):
        return True
    recorded = (m.get("split") or {}).get("labels_digest")
    if recorded is None or not str(recorded).startswith(f"{DIGEST_VERSION}:"):
        log.warning("%s records no digest of its training labels this qmlmm can compare; reused as is", job.out)
        return False
    levels = job.levels
    try:
        with Dataset(job.path) as ds:
            if any(lvl not in ds.levels() for lvl in levels):
                return True
            now = labels_digest(ds, levels)
    except OSError:
        return True  # training will name the problem
    if now != recorded:
        log.info("%s: the labels in %s changed since it was trained; training again", job.out, job.path)
    return now != recorded


def _same_added(recorded: dict[str, int], now: dict[str, int]) -> bool:
    """Whether a model's recorded added training files {path: frames} are the job's ``now``: by file name
    where the names differ on both sides (a run folder moved or spelt otherwise keeps its models), else by path."""
    names, was = [Path(p).name for p in now], [Path(p).name for p in recorded]
    if len(set(names)) < len(names) or len(set(was)) < len(was):
        return recorded == now
    return dict(zip(was, recorded.values(), strict=True)) == dict(zip(names, now.values(), strict=True))


def _added_frames(job: TrainJob) -> dict[str, int]:
    """{file: frames with every label the job reads} of the job's ``add_train`` files, as the training's
    ``split.added_train`` records them (a file that gained labels since counts more frames)."""
    from qmlmm.data import Dataset

    levels = job.levels
    out = {}
    for p in job.data.get("add_train", ()):
        with Dataset(p) as ds:
            out[str(p)] = int(ds.labelled_at(levels).sum())
    return out


def _run(job: TrainJob, progress: bool, position: int | None) -> tuple[str, dict[str, Any], float]:
    import torch

    from qmlmm.data.training_set import load_training_data
    from qmlmm.training.trainer import train

    torch.set_num_threads(max(1, job.cfg.threads))
    c = job.cfg
    data = load_training_data(job.path, c.target, c.baseline, c.split_settings, **job.data)
    res = train(data, c, job.out, progress=progress, position=position)
    return job.out, res.metrics, res.seconds


def train_jobs(
    jobs: list[TrainJob], workers: int = 2, progress: bool = True, threads_per_job: int = 1
) -> dict[str, tuple[dict[str, Any], float]]:
    """Run ``jobs`` (``workers`` at a time, each with ``threads_per_job`` threads).

    Returns {model path: (metrics, training seconds)}. A job whose model exists, trained with the
    same configuration, is reused; an interrupted one resumes from its checkpoint. With
    ``workers <= 1`` or one job the runs happen in this process. A failing job raises after the
    others have finished.
    """
    results: dict[str, tuple[dict[str, Any], float]] = {}
    todo = []
    for j in jobs:
        m = finished(j)
        if m is not None:
            log.info("%s: trained before with the same settings, reused", j.out)
            results[j.out] = (m, float(m.get("train_seconds", 0.0)))
        else:
            todo.append(j)
    jobs = todo
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            out, m, s = _run(j, progress, None)
            results[out] = (m, s)
        return results
    jobs = [replace(j, cfg=replace(j.cfg, threads=threads_per_job)) for j in jobs]
    errors: list[BaseException] = []
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futs = {pool.submit(_run, j, progress, k % workers): j for k, j in enumerate(jobs)}
        for f in as_completed(futs):
            j = futs[f]
            try:
                out, m, s = f.result()
                results[out] = (m, s)
                log.info("trained %s in %.0f s", Path(out).name, s)
            except BaseException as e:
                log.error("training %s failed: %s", j.out, e)
                errors.append(e)
    if errors:
        raise errors[0]
    return results
