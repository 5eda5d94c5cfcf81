"""A small reader for the CHARMM/OpenMM DCD trajectories that ``qmlmm md`` writes."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from qmlmm.errors import SchemaError

__all__ = ["read_dcd"]


def _record(fh, expect: int | None = None) -> bytes:  # type: ignore[no-untyped-def]
    head = fh.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = struct.unpack("<i", head)
    data = fh.read(n)
    tail = fh.read(4)
    if len(data) < n or len(tail) < 4 or struct.unpack("<i", tail)[0] != n:
        raise EOFError
    if expect is not None and n != expect:
        raise SchemaError(f"DCD record of {n} bytes, expected {expect}")
    return data


def read_dcd(path: str | Path, stride: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (F, N, 3) in nm and orthorhombic box lengths (F, 3) in nm (or None) of a DCD file.

    A partially written last frame (a run killed while writing) is ignored.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            hdr = _record(fh, 84)
        except EOFError as e:
            raise SchemaError(f"{path} is not a DCD file") from e
        if hdr[:4] != b"CORD":
            raise SchemaError(f"{path} is not a DCD file (no CORD header)")
        icntrl = struct.unpack("<20i", hdr[4:])
        has_cell = icntrl[10] != 0
        _record(fh)  # title
        (natoms,) = struct.unpack("<i", _record(fh, 4))
        frames, boxes = [], []
        k = 0
        while True:
            try:
                box = None
                if has_cell:
                    a, _, b, _, _, c = struct.unpack("<6d", _record(fh, 48))
                    box = (a / 10.0, b / 10.0, c / 10.0)
                xyz = [np.frombuffer(_record(fh, 4 * natoms), dtype="<f4") for _ in range(3)]
            except EOFError:
                break
            if k % stride == 0:
                frames.append(np.stack(xyz, axis=1) / 10.0)
                if box is not None:
                    boxes.append(box)
            k += 1
    pos = np.asarray(frames, dtype=np.float64).reshape(-1, natoms, 3)
    return pos, (np.asarray(boxes) if boxes else None)
