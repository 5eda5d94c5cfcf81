"""Training data from a qmlmm dataset: targets (direct or delta) and splits by run, time or block."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.data import Dataset
from qmlmm.data.batch import FrameTensors, frame_tensors
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "SPLIT_KINDS",
    "Split",
    "SplitSettings",
    "TrainingData",
    "block_split",
    "choose_split",
    "load_training_data",
    "run_split",
    "time_split",
]


SPLIT_KINDS = ("runs", "time", "blocks")


@dataclass(frozen=True)
class SplitSettings:
    """How frames are split into train / validation / test.

    ``kind``:
      - ``runs`` (default): whole sampling runs (frame info ``run``) go to one split each; needs at
        least three runs (else it falls back to ``time``, with a warning);
      - ``time``: each run is cut in time order into train | gap | validation | gap | test, dropping
        ``gap_frames`` frames at each cut (None: the statistical inefficiency of the targets' energies
        within the runs, pymbar's timeseries, so the parts lie a correlation time apart);
      - ``blocks``: consecutive blocks of ``block_size`` frames shuffled into the splits (what qmlmm did
        before; frames 20 fs from training frames can be test frames, so test errors come out low).
    Fractions are of runs (``runs``) or of each run's frames (``time``, ``blocks``); ``seed`` shuffles runs
    and blocks.
    """

    kind: str = "runs"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    block_size: int = 10
    gap_frames: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise InputError(f"split must be one of {', '.join(SPLIT_KINDS)}, got {self.kind!r}")
        if self.gap_frames is not None and self.gap_frames < 0:
            raise InputError(f"split_gap_frames must be >= 0, got {self.gap_frames}")
        if self.block_size < 1:
            raise InputError(f"block_size must be >= 1, got {self.block_size}")

    @classmethod
    def of_training(cls, d: dict[str, object]) -> SplitSettings:
        """The split of a training configuration (a model file's ``meta.training``); files without
        ``split`` were split by blocks."""
        gap = d.get("split_gap_frames")
        return cls(
            kind=str(d.get("split", "blocks")),
            valid_fraction=float(d.get("valid_fraction", 0.1)),  # type: ignore[arg-type]
            test_fraction=float(d.get("test_fraction", 0.1)),  # type: ignore[arg-type]
            block_size=int(d.get("block_size", 10)),  # type: ignore[call-overload]
            gap_frames=None if gap is None else int(gap),  # type: ignore[call-overload]
            seed=int(d["split_seed"] if d.get("split_seed") is not None else d.get("seed", 0)),  # type: ignore[call-overload]
        )


@dataclass
class Split:
    """Frame indices (into the prepared items) of each part and how they were chosen.

    ``info``: ``kind`` used, ``runs`` per part (kind runs), ``gap_frames`` and ``gap_ps`` (kind time),
    ``fallback`` (why the requested kind was not used), JSON-serialisable.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    info: dict[str, object]


@dataclass
class TrainingData:
    """Prepared frames with targets, the split, and where the numbers came from."""

    items: list[FrameTensors]
    embedding: EmbeddingSettings
    target: str
    target_method: str
    baseline: str | None
    baseline_method: str | None
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    elements: list[int]
    source: str
    split_info: dict[str, object] | None = None

    def subset(self, idx: np.ndarray) -> list[FrameTensors]:
        return [self.items[int(i)] for i in idx]


def block_split(n: int, block: int, valid: float, test: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, valid, test) of n frames; consecutive blocks of ``block`` frames stay together.

    Frames of an MD trajectory are correlated, so whole blocks go to one split. The split depends
    only on (n, block, fractions, seed).
    """
    if n < 3:
        raise InputError(f"need at least 3 frames to split into train/validation/test, have {n}")
    block = max(1, min(block, n // 3))
    blocks = [np.arange(s, min(s + block, n)) for s in range(0, n, block)]
    order = np.random.default_rng(seed).permutation(len(blocks))
    n_test = max(1, round(test * len(blocks))) if test > 0 else 0
    n_valid = max(1, round(valid * len(blocks))) if valid > 0 else 0
    te = [blocks[k] for k in order[:n_test]]
    va = [blocks[k] for k in order[n_test : n_test + n_valid]]
    tr = [blocks[k] for k in order[n_test + n_valid :]]
    if not tr:
        raise InputError("no frames left for training; lower the validation/test fractions")
    return _cat(tr), _cat(va), _cat(te)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def run_split(runs: np.ndarray, valid: float, test: float, seed: int) -> Split | None:
    """Whole runs (``runs`` (n,) run label of every frame) to test / validation / train, shuffled with
    ``seed``; None when there are fewer runs than the three parts need."""
    labels = np.unique(runs)
    n_test = max(1, round(test * len(labels))) if test > 0 else 0
    n_valid = max(1, round(valid * len(labels))) if valid > 0 else 0
    if len(labels) < n_test + n_valid + 1:
        return None
    order = labels[np.random.default_rng(seed).permutation(len(labels))]
    parts = {"test": order[:n_test], "valid": order[n_test : n_test + n_valid], "train": order[n_test + n_valid :]}
    idx = {k: np.flatnonzero(np.isin(runs, v)) for k, v in parts.items()}
    info: dict[str, object] = {"kind": "runs", "runs": {k: sorted(v.tolist()) for k, v in parts.items()}}
    return Split(idx["train"], idx["valid"], idx["test"], info)


def statistical_gap(energies: np.ndarray, runs: np.ndarray, order: np.ndarray) -> int:
    """Frames between parts so that they are about one correlation time apart: the statistical
    inefficiency g of the energies within each run (pymbar's timeseries; frames in time order), the
    mean over runs rounded up, at least 1."""
    from pymbar import timeseries

    gs = []
    for r in np.unique(runs):
        e = energies[order[runs[order] == r]]
        if len(e) >= 6 and np.ptp(e) > 0:
            try:
                gs.append(float(timeseries.statistical_inefficiency(e)))
            except Exception:  # pymbar gives up on very short or constant series
                continue
    return max(1, int(np.ceil(np.mean(gs)))) if gs else 1


def time_split(runs: np.ndarray, times: np.ndarray, valid: float, test: float, gap: int) -> Split:
    """Each run cut in time order into train | gap | valid | gap | test (fractions of the frames that
    remain after the gaps, at least one frame for a nonzero fraction)."""
    tr, va, te = [], [], []
    for r in np.unique(runs):
        idx = np.flatnonzero(runs == r)
        idx = idx[np.argsort(times[idx], kind="stable")]
        m = len(idx) - 2 * gap
        n_te = max(1, round(test * m)) if test > 0 else 0
        n_va = max(1, round(valid * m)) if valid > 0 else 0
        n_tr = m - n_te - n_va
        if n_tr < 1:
            continue  # too short for three parts and two gaps: left out
        tr.append(idx[:n_tr])
        va.append(idx[n_tr + gap : n_tr + gap + n_va])
        te.append(idx[len(idx) - n_te :])
    if not tr:
        raise InputError(
            f"no run has enough frames for a time split with gaps of {gap} frames; use more frames per run, "
            "more runs (split: runs), or split_gap_frames"
        )
    return Split(_cat(tr), _cat(va), _cat(te), {"kind": "time", "gap_frames": gap})


def choose_split(s: SplitSettings, runs: np.ndarray | None, times: np.ndarray | None, energies: np.ndarray) -> Split:
    """The split of ``s`` for frames with run labels ``runs`` (n,) (None: unknown), times ``times`` (n,) ps
    (None: dataset order) and target energies (n,) kJ/mol (for the statistical gap)."""
    n = len(energies)
    if n < 3:
        raise InputError(f"need at least 3 frames to split into train/validation/test, have {n}")
    if s.kind == "blocks":
        tr, va, te = block_split(n, s.block_size, s.valid_fraction, s.test_fraction, s.seed)
        return Split(tr, va, te, {"kind": "blocks", "block_size": s.block_size})
    run_labels = np.zeros(n, dtype=np.int64) if runs is None else np.asarray(runs)
    fallback = None
    if s.kind == "runs":
        if runs is not None:
            sp = run_split(run_labels, s.valid_fraction, s.test_fraction, s.seed)
            if sp is not None:
                return sp
            fallback = f"{len(np.unique(run_labels))} sampling run(s): too few for whole runs per part"
        else:
            fallback = "the frames record no sampling run"
        log.warning("split by runs impossible (%s): splitting each run in time, with gaps", fallback)
    t = np.arange(n, dtype=np.float64) if times is None else np.asarray(times, dtype=np.float64)
    order = np.lexsort((t, run_labels))
    gap = s.gap_frames if s.gap_frames is not None else statistical_gap(np.asarray(energies), run_labels, order)
    sp = time_split(run_labels, t, s.valid_fraction, s.test_fraction, gap)
    spacing = np.diff(t[order])[np.diff(run_labels[order]) == 0]
    if times is not None and len(spacing):
        sp.info["gap_ps"] = float(gap * np.median(spacing))
    if fallback:
        sp.info["fallback"] = fallback
    return sp


def levels_read(target: str, baseline: str | None, require: Sequence[str] = ()) -> tuple[str, ...]:
    """The label levels a training set reads: the target, the baseline (if any) and the required ones."""
    return (target, *((baseline,) if baseline else ()), *require)


#: the prefix of :func:`labels_digest`'s values; another formula gets another one, so that a digest of an older
#: formula reads as unknown (a model then is reused, as one from before digests) instead of as changed labels
DIGEST_VERSION = "v2"


def labels_digest(ds: Dataset, levels: Iterable[str]) -> str:
    """``DIGEST_VERSION:`` and a 16-hex-digit digest of what a training set reads from ``ds`` at ``levels``:
    the number of frames, which frames are labelled at every level, each level's method, settings and program
    versions, and the energies and recorded wall times of the labelled frames. Frames appended or labelled
    since, a label written again (its new wall time, whatever its numbers), or a level relabelled with another
    method change it; the forces themselves are not read (they cover every atom of every frame)."""
    levels = tuple(levels)
    h = hashlib.sha256(str(len(ds)).encode())
    ok = ds.labelled_at(levels)
    h.update(np.flatnonzero(ok).astype(np.int64).tobytes())
    for lvl in levels:
        info = ds.level_info(lvl)
        h.update(json.dumps([lvl, info.method, info.settings, info.versions], sort_keys=True, default=str).encode())
        h.update(np.ascontiguousarray(ds.energies(lvl)[ok], dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(ds.label_seconds(lvl)[ok], dtype=np.float64).tobytes())
    return f"{DIGEST_VERSION}:{h.hexdigest()[:16]}"


def _checked_levels(
    ds: Dataset, path: str | Path, target: str, baseline: str | None, require: tuple[str, ...]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Level name -> (method, settings) of the levels a training set reads from ``ds``; InputError when
    one is missing, the target records no embedding, or the baseline used another embedding."""
    for lvl in (target, *((baseline,) if baseline else ()), *require):
        if lvl not in ds.levels():
            kind = "baseline level" if lvl == baseline else "level"
            raise InputError(f"{kind} {lvl!r} not in {path}; levels: {ds.levels()}")
    emb_d = ds.level_info(target).settings.get("embedding")
    if not emb_d:
        raise InputError(
            f"level {target!r} in {path} does not record its embedding settings "
            "(was it imported from extxyz? label it with qmlmm label)"
        )
    if baseline is not None and ds.level_info(baseline).settings.get("embedding") != emb_d:
        raise InputError(
            f"levels {target!r} and {baseline!r} used different embeddings "
            f"({emb_d} vs {ds.level_info(baseline).settings.get('embedding')}); relabel one of them"
        )
    return {lvl: (ds.level_info(lvl).method, ds.level_info(lvl).settings) for lvl in (target, baseline) if lvl}


def _prepared(
    ds: Dataset, emb: EmbeddingSettings, target: str, baseline: str | None, require: tuple[str, ...]
) -> tuple[list[FrameTensors], list[object], list[object]]:
    """The frames of ``ds`` with every needed label as training items (delta targets with a baseline),
    with their sampling-run labels and times (None where a frame records none)."""
    idx = np.flatnonzero(ds.labelled_at((target, *((baseline,) if baseline else ()), *require)))
    if len(idx) < len(ds):
        log.warning("%d of %d frames of %s lack the needed labels and are skipped", len(ds) - len(idx), len(ds),
                    ds.path)  # fmt: skip
    items: list[FrameTensors] = []
    runs: list[object] = []
    times: list[object] = []
    for i in idx:
        fr = ds.frame(int(i))
        ft = frame_tensors(fr, emb, target, index=int(i))
        if baseline is not None:
            b = frame_tensors(fr, emb, baseline)
            ft.energy -= b.energy
            ft.qm_forces = ft.qm_forces - b.qm_forces  # type: ignore[operator]
            ft.mm_forces = ft.mm_forces - b.mm_forces  # type: ignore[operator]
            # the delta model's charges correct the baseline's
            ft.qm_q_ref = None if ft.qm_q_ref is None or b.qm_q_ref is None else ft.qm_q_ref - b.qm_q_ref
        items.append(ft)
        runs.append(fr.info.get("run"))
        times.append(fr.info.get("time_ps"))
    return items, runs, times


def load_training_data(
    path: str | Path,
    target: str,
    baseline: str | None = None,
    split: SplitSettings | None = None,
    require: tuple[str, ...] = (),
    add_train: Sequence[str | Path] = (),
) -> TrainingData:
    """Frames labelled at ``target`` (and ``baseline``) with their delta or direct targets, split by
    ``split`` (default: by sampling runs, :class:`SplitSettings`).

    Frames missing a needed label (target, baseline, or any level in ``require``) are skipped with
    a warning; ``require`` lets direct and delta runs use the very same frames and split. The
    embedding settings come from the target level; the baseline level must have used the same ones.

    ``add_train``: further datasets whose frames all go to the training part (e.g. frames an uncertainty
    guard queued in ML/MM MD, labelled since). ``path`` alone decides the split, so the validation and
    test frames are those of a model trained on ``path`` alone and the two models' test errors compare.
    Their target and baseline levels must have the same method and settings (embedding included) as
    ``path``'s; ``split_info['added_train']`` lists each file and its frames.
    """
    split = split or SplitSettings()
    with Dataset(path) as ds:
        levels = _checked_levels(ds, path, target, baseline, require)
        emb = EmbeddingSettings.from_dict(levels[target][1]["embedding"])
        # before the frames are read: a label written meanwhile (the file may be labelled while it is read)
        # then trains the model again next time instead of counting as trained on
        digest = labels_digest(ds, levels_read(target, baseline, require))
        items, runs, times = _prepared(ds, emb, target, baseline, require)
        method = levels[target][0]
        bmethod = levels[baseline][0] if baseline else None
    run_arr = np.array(runs, dtype=np.float64) if runs and all(r is not None for r in runs) else None
    time_arr = np.array(times, dtype=np.float64) if times and all(t is not None for t in times) else None
    sp = choose_split(split, run_arr, time_arr, np.array([it.energy for it in items]))
    added: dict[str, int] = {}
    extra: list[np.ndarray] = []
    for more in add_train:
        with Dataset(more) as ds:
            got = _checked_levels(ds, more, target, baseline, require)
            if got != levels:
                raise InputError(
                    f"{more}: its levels {target!r}/{baseline!r} differ from {path}'s ({got} vs {levels}); "
                    "label the added frames with the same methods, settings and embedding"
                )
            new, _, _ = _prepared(ds, emb, target, baseline, require)
        extra.append(np.arange(len(items), len(items) + len(new)))
        items.extend(new)
        added[str(more)] = len(new)
    sp.info["labels_digest"] = digest
    if add_train:
        sp.info["added_train"] = added
    return TrainingData(
        items=items,
        embedding=emb,
        target=target,
        target_method=method,
        baseline=baseline,
        baseline_method=bmethod,
        train=np.concatenate([sp.train, *extra]).astype(np.int64),
        valid=sp.valid,
        test=sp.test,
        elements=sorted({int(z) for it in items for z in it.qm_z}),
        source=str(path),
        split_info=sp.info,
    )
