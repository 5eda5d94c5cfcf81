"""Datasets: HDF5 storage of frames and labels, extended-XYZ exchange."""

from __future__ import annotations

from pathlib import Path

from qmlmm.data.extxyz import read_extxyz, write_extxyz
from qmlmm.data.h5 import Dataset, write_dataset
from qmlmm.errors import SchemaError
from qmlmm.system import Frame

__all__ = ["Dataset", "is_hdf5", "load_frames", "read_extxyz", "write_dataset", "write_extxyz"]


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
