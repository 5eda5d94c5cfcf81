"""Training data from a qmlmm dataset: targets (direct or delta), block splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmlmm.data import Dataset
from qmlmm.data.batch import FrameTensors, frame_tensors
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["TrainingData", "load_training_data", "block_split"]


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
    cat = lambda xs: np.sort(np.concatenate(xs)) if xs else np.zeros(0, dtype=int)  # noqa: E731
    return cat(tr), cat(va), cat(te)


def load_training_data(
    path: str | Path,
    target: str,
    baseline: str | None = None,
    block_size: int = 10,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    require: tuple[str, ...] = (),
) -> TrainingData:
    """Frames labelled at ``target`` (and ``baseline``) with their delta or direct targets.

    Frames missing a needed label (target, baseline, or any level in ``require``) are skipped with
    a warning; ``require`` lets direct and delta runs use the very same frames and split. The
    embedding settings come from the target level; the baseline level must have used the same ones.
    """
    with Dataset(path) as ds:
        if target not in ds.levels():
            raise InputError(f"level {target!r} not in {path}; levels: {ds.levels()}")
        ti = ds.level_info(target)
        emb_d = ti.settings.get("embedding")
        if not emb_d:
            raise InputError(
                f"level {target!r} in {path} does not record its embedding settings "
                "(was it imported from extxyz? label it with qmlmm label)"
            )
        emb = EmbeddingSettings.from_dict(emb_d)
        bmethod = None
        if baseline is not None:
            if baseline not in ds.levels():
                raise InputError(f"baseline level {baseline!r} not in {path}; levels: {ds.levels()}")
            bi = ds.level_info(baseline)
            if bi.settings.get("embedding") != emb_d:
                raise InputError(
                    f"levels {target!r} and {baseline!r} used different embeddings "
                    f"({emb_d} vs {bi.settings.get('embedding')}); relabel one of them"
                )
            bmethod = bi.method
        st = ds.status(target) == 1
        for lvl in ((baseline,) if baseline else ()) + tuple(require):
            if lvl not in ds.levels():
                raise InputError(f"level {lvl!r} not in {path}; levels: {ds.levels()}")
            st &= ds.status(lvl) == 1
        idx = np.flatnonzero(st)
        if len(idx) < len(ds):
            log.warning("%d of %d frames lack the needed labels and are skipped", len(ds) - len(idx), len(ds))
        items = []
        elements: set[int] = set()
        for i in idx:
            fr = ds.frame(int(i))
            ft = frame_tensors(fr, emb, target, index=int(i))
            if baseline is not None:
                b = frame_tensors(fr, emb, baseline)
                ft.energy -= b.energy
                ft.qm_forces = ft.qm_forces - b.qm_forces  # type: ignore[operator]
                ft.mm_forces = ft.mm_forces - b.mm_forces  # type: ignore[operator]
            items.append(ft)
            elements.update(int(z) for z in ft.qm_z)
        method = ti.method
    tr, va, te = block_split(len(items), block_size, valid_fraction, test_fraction, seed)
    return TrainingData(
        items=items,
        embedding=emb,
        target=target,
        target_method=method,
        baseline=baseline,
        baseline_method=bmethod,
        train=tr,
        valid=va,
        test=te,
        elements=sorted(elements),
        source=str(path),
    )
