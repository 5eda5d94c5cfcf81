"""Label frames with QM/MM engines, in parallel on Dask, resumable, never losing work.

One process writes the dataset: the one that calls :func:`label_dataset`. Workers (a Dask
``LocalCluster`` by default, or any running scheduler given by address, e.g. one started by
dask-jobqueue on SLURM) compute frames and send results back; each result is written and
flushed as it arrives (see :mod:`qmlmm.data.h5` for why a kill cannot corrupt the file). A rerun
skips frames already done (and, unless asked to retry, those that failed), so it labels only
what is missing. At most ``2 * workers`` frames are in flight, which bounds what a crash loses.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.data import Dataset, is_hdf5, read_extxyz, write_dataset
from qmlmm.data.h5 import STATUS_DONE, STATUS_FAILED, STATUS_MISSING
from qmlmm.engines import make_engine, parse_spec
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import InputError, QMLMMError, SchemaError
from qmlmm.system import Frame

log = logging.getLogger(__name__)

__all__ = ["LabelReport", "LevelRequest", "frames_fingerprint", "label_dataset", "prepare_output"]


@dataclass(frozen=True)
class LevelRequest:
    """One engine spec to label with, stored under level name ``level``."""

    spec: str
    level: str

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.level):
            raise InputError(
                f"level name {self.level!r} must be letters, digits and _ . + - only (it names an HDF5 group)"
            )

    @classmethod
    def from_spec(cls, spec: str, level: str | None = None) -> LevelRequest:
        return cls(parse_spec(spec).text, level or parse_spec(spec).family)


@dataclass
class LabelReport:
    """What a labelling run did, per level."""

    computed: dict[str, int] = field(default_factory=dict)
    failed: dict[str, dict[int, str]] = field(default_factory=dict)
    skipped_done: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    seconds_per_frame: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.failed.values())


# ---------------------------------------------------------------------------------------------
# worker side
_ENGINE_CACHE: dict[tuple[str, int], Any] = {}


def _label_one(spec: str, threads: int, frame: Frame, settings: dict[str, float]) -> dict[str, Any]:
    """Runs on a worker: label one frame; never raises (failures come back as data)."""
    from qmlmm.engines import label_frame

    t0 = time.perf_counter()
    try:
        key = (spec, threads)
        if key not in _ENGINE_CACHE:  # keep engines (and their density caches) per worker process
            _ENGINE_CACHE[key] = make_engine(spec, threads=threads)
        label, _ = label_frame(_ENGINE_CACHE[key], frame, EmbeddingSettings.from_dict(settings))
        if not np.isfinite(label.energy) or not np.all(np.isfinite(label.forces)):
            raise QMLMMError("engine returned non-finite energy or forces")
        return {
            "ok": True,
            "energy": label.energy,
            "forces": label.forces,
            "charges": label.charges,
            "time": time.perf_counter() - t0,
        }
    except QMLMMError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "time": time.perf_counter() - t0}
    except Exception as e:
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"ok": False, "error": f"unexpected {tb}", "time": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# main side
def frames_fingerprint(ds: Dataset) -> str:
    """SHA-256 of the frames' atoms, positions, charges and boxes (identifies a frame set)."""
    h = hashlib.sha256()
    g = ds._f["frames"]
    for k in ("atom_offset", "numbers", "positions", "is_qm", "charges", "mol_id", "box", "qm_charge", "qm_mult"):
        h.update(np.ascontiguousarray(g[k][()]).tobytes())
    return h.hexdigest()


def prepare_output(src: str | Path, out: str | Path) -> Path:
    """Make ``out`` a dataset holding the frames of ``src`` (extended XYZ or HDF5).

    If ``out`` exists it must hold the same frames (then labelling resumes); if ``src`` is
    ``out``, it is labelled in place.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    src_is_h5 = is_hdf5(src)
    if out.exists():
        if src.resolve() == out.resolve():
            if not src_is_h5:
                raise InputError("output must be an HDF5 dataset, not the extended XYZ input itself")
            Dataset(out).close()
            return out
        with Dataset(out) as ds_out:
            fp_out = frames_fingerprint(ds_out)
        if src_is_h5:
            with Dataset(src) as ds_in:
                fp_in = frames_fingerprint(ds_in)
        else:
            tmp = out.with_name(out.name + ".check.tmp")
            write_dataset(tmp, read_extxyz(src), overwrite=True).close()
            with Dataset(tmp) as ds_tmp:
                fp_in = frames_fingerprint(ds_tmp)
            tmp.unlink()
        if fp_in != fp_out:
            raise SchemaError(f"{out} exists but holds other frames than {src}; choose another output")
        log.info("resuming labelling in %s", out)
        return out
    if src_is_h5:
        Dataset(src).close()  # schema check
        tmp = out.with_name(out.name + ".copy.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(out)
    else:
        write_dataset(out, read_extxyz(src)).close()
    return out


#: seconds to wait for a Dask scheduler given by address before saying it cannot be reached
SCHEDULER_TIMEOUT_S = 20


def _dask_client(workers: int, threads: int, scheduler: str | None) -> Any:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as e:  # pragma: no cover
        raise QMLMMError("parallel labelling needs dask[distributed]") from e
    if scheduler:
        log.info("connecting to Dask scheduler at %s", scheduler)
        try:
            return Client(scheduler, timeout=f"{SCHEDULER_TIMEOUT_S}s")
        except (OSError, TimeoutError, ValueError) as e:
            raise QMLMMError(f"cannot reach the Dask scheduler at {scheduler!r} ({SCHEDULER_TIMEOUT_S} s): {e}") from e
    import dask

    env = {
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
    }
    dask.config.set({"distributed.nanny.pre-spawn-environ": env})
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.ERROR,
    )
    return Client(cluster)


def _run_tasks(
    tasks: list[tuple[str, int]],
    load: Callable[[int], Frame],
    requests: dict[str, LevelRequest],
    settings: dict[str, float],
    workers: int,
    threads: int,
    scheduler: str | None,
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield (level, frame index, result) as results arrive."""
    if workers == 0 and not scheduler:
        for level, i in tasks:
            yield level, i, _label_one(requests[level].spec, threads, load(i), settings)
        return
    from dask.distributed import as_completed

    client = _dask_client(workers, threads, scheduler)
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or workers or 1)
        max_in_flight = 2 * n_workers
        todo = iter(tasks)
        futures: dict[Any, tuple[str, int]] = {}

        def submit_next() -> bool:
            nxt = next(todo, None)
            if nxt is None:
                return False
            level, i = nxt
            fut = client.submit(_label_one, requests[level].spec, threads, load(i), settings, pure=False)
            futures[fut] = (level, i)
            return True

        for _ in range(max_in_flight):
            if not submit_next():
                break
        ac = as_completed(list(futures))
        for fut in ac:
            level, i = futures.pop(fut)
            try:
                res = fut.result()
            except Exception as e:
                res = {"ok": False, "error": f"worker error: {type(e).__name__}: {e}", "time": float("nan")}
            yield level, i, res
            if submit_next():
                ac.add(list(futures)[-1])
    finally:
        client.close()
        if not scheduler and client.cluster is not None:
            client.cluster.close()


def label_dataset(
    src: str | Path,
    out: str | Path,
    requests: Sequence[LevelRequest],
    embedding: EmbeddingSettings | None = None,
    workers: int = 1,
    threads: int = 1,
    scheduler: str | None = None,
    retry_failed: bool = False,
    overwrite: bool = False,
    frames: Sequence[int] | None = None,
    progress: bool = True,
) -> LabelReport:
    """Label the frames of ``src`` with every request, writing to the dataset ``out``.

    Args:
        src: extended XYZ file or qmlmm HDF5 dataset with the frames.
        out: the HDF5 dataset to write (created from ``src``, or resumed if it exists).
        requests: engine specs and level names.
        embedding: cutoff and switching of the embedded MM charges.
        workers: Dask worker processes on a LocalCluster; 0 runs in this process.
        threads: threads per engine call.
        scheduler: address of a running Dask scheduler (overrides ``workers``).
        retry_failed: also redo frames that failed before.
        overwrite: replace levels that exist with other settings.
        frames: only these frame indices (default all).
        progress: show a progress bar.
    """
    embedding = embedding or EmbeddingSettings()
    if workers < 0 or threads < 1:
        raise InputError("workers must be >= 0 and threads >= 1")
    names = [r.level for r in requests]
    if len(set(names)) != len(names):
        raise InputError(f"two methods would write the same level: {names}; name them with --level")
    out = prepare_output(src, out)
    report = LabelReport()
    t_start = time.perf_counter()
    with Dataset(out, mode="a") as ds:
        settings = embedding.to_dict()
        by_level = {r.level: r for r in requests}
        tasks: list[tuple[str, int]] = []
        sel = np.arange(len(ds)) if frames is None else np.asarray(frames, dtype=int)
        for r in requests:
            eng = make_engine(r.spec, threads=threads)
            ds.add_level(
                r.level,
                method=r.spec,
                settings={"engine": eng.settings(), "embedding": settings},
                versions=eng.versions(),
                overwrite=overwrite,
            )
            st = ds.status(r.level)[sel]
            want = (st == STATUS_MISSING) | ((st == STATUS_FAILED) if retry_failed else False)
            tasks += [(r.level, int(i)) for i in sel[want]]
            report.skipped_done[r.level] = int((st == STATUS_DONE).sum())
            report.computed[r.level] = 0
            # frames that failed before and are not retried stay failures of this run's result
            report.failed[r.level] = (
                {}
                if retry_failed
                else {i: msg for i, msg in ds.errors(r.level).items() if frames is None or i in set(sel.tolist())}
            )
            if report.failed[r.level]:
                log.warning(
                    "level %s: %d frame(s) failed before and are skipped (use --retry-failed)",
                    r.level,
                    len(report.failed[r.level]),
                )
        if not tasks:
            log.info("nothing to label: every requested frame is done")
        times: dict[str, list[float]] = {r.level: [] for r in requests}
        bar = _progress(len(tasks), progress)
        try:
            results = _run_tasks(
                tasks, lambda i: ds.frame(i, levels=()), by_level, settings, workers, threads, scheduler
            )
            for level, i, res in results:
                if res["ok"]:
                    from qmlmm.system import Label

                    lab = Label(res["energy"], res["forces"], res.get("charges"))
                    ds.write_label(level, i, lab, time_s=res["time"])
                    report.computed[level] += 1
                    times[level].append(res["time"])
                else:
                    ds.write_failure(level, i, res["error"])
                    report.failed[level][i] = res["error"]
                    log.warning("frame %d, level %s failed: %s", i, level, res["error"])
                bar.update(1)
                bar.set_postfix_str(f"failed={sum(len(v) for v in report.failed.values())}")
        finally:
            bar.close()
    report.seconds = time.perf_counter() - t_start
    report.seconds_per_frame = {k: float(np.mean(v)) for k, v in times.items() if v}
    return report


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="labelling", unit="frame", disable=not enabled or total == 0, dynamic_ncols=True)
