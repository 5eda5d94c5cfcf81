"""Datasets: HDF5 storage of frames and labels, extended-XYZ exchange."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qmlmm.data.extxyz import read_extxyz, write_extxyz
from qmlmm.data.h5 import Dataset, LevelInfo, write_dataset
from qmlmm.errors import InputError, SchemaError
from qmlmm.system import Frame

__all__ = ["Dataset", "is_hdf5", "load_frames", "merge_datasets", "read_extxyz", "write_dataset", "write_extxyz"]


def is_hdf5(path: str | Path) -> bool:
    """True if ``path`` starts with the HDF5 signature."""
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def load_frames(path: str | Path) -> list[Frame]:
    """Frames (with labels) from a qmlmm HDF5 dataset or an extended XYZ file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_hdf5(path):
        with Dataset(path) as ds:
            return ds.frames()
    if path.suffix.lower() in (".h5", ".hdf5"):
        raise SchemaError(f"{path} has an HDF5 suffix but is not an HDF5 file")
    return read_extxyz(path)


def merge_datasets(sources: Sequence[tuple[str | Path, Sequence[int] | None]], out: str | Path) -> Path:
    """Write one dataset ``out`` with the frames ``sources`` [(dataset, frame indices or None for all)],
    their levels and labels copied. Frame info ``run`` becomes ``1000 * k + run`` for source ``k`` (0 when a
    frame has none), so that runs of different sources stay apart; ``merged_from`` names the source file.
    A level that two sources hold must have the same method and settings in both (InputError naming the
    file otherwise: its labels would be merged under the first one's). An existing ``out`` is returned as it
    is (written once, atomically). Returns ``out``."""
    from qmlmm.fileio import atomic_path

    out = Path(out)
    if out.exists():
        return out
    frames: list[Frame] = []
    levels: dict[str, LevelInfo] = {}
    for k, (path, idx) in enumerate(sources):
        with Dataset(path) as ds:
            for name in ds.levels():
                got = ds.level_info(name)
                info = levels.setdefault(name, got)
                if (got.method, got.settings) != (info.method, info.settings):
                    raise InputError(
                        f"{path}: level {name!r} is {got.method} with settings {got.settings}, where an earlier "
                        f"source has {info.method} with {info.settings}; label them alike before merging"
                    )
            for i in range(len(ds)) if idx is None else idx:
                fr = ds.frame(int(i))
                fr.info = {**fr.info, "run": 1000 * k + int(fr.info.get("run", 0)), "merged_from": str(path)}
                frames.append(fr)
    labels = [fr.labels for fr in frames]
    for fr in frames:
        fr.labels = {}
    with atomic_path(out) as tmp:
        ds = write_dataset(tmp, frames, overwrite=True)
        try:
            for name, info in levels.items():
                ds.add_level(name, info.method, info.settings, info.versions)
                for i, lab in enumerate(labels):
                    if name in lab:
                        ds.write_label(name, i, lab[name], flush=False)
        finally:
            ds.close()
    return out
