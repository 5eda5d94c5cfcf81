"""The qmlmm dataset: frames and their QM/MM labels in one HDF5 file (schema in docs/dataset.md).

Layout (all atoms of all frames concatenated; frame f owns rows atom_offset[f]:atom_offset[f+1]):

    /                      attrs: schema="qmlmm-dataset", schema_version, qmlmm_version, units
    /frames/atom_offset    (F+1,) int64
    /frames/numbers        (A,) int16          atomic numbers
    /frames/positions      (A, 3) float64      nm
    /frames/is_qm          (A,) int8           1 for QM atoms
    /frames/charges        (A,) float64        e (MM partial charges; 0 on QM atoms)
    /frames/mol_id         (A,) int64
    /frames/box            (F, 3, 3) float64   nm (rows = box vectors; zeros for no box)
    /frames/qm_charge      (F,) int32
    /frames/qm_mult        (F,) int32
    /frames/info/<key>     (F,) float64 or str  optional per-frame metadata
    /levels/<name>/        attrs: method, settings (JSON), versions (JSON), energy_unit, force_unit
        energy  (F,) float64     kJ/mol (NaN until labelled)
        forces  (A, 3) float64   kJ/mol/nm (zero on MM atoms outside the embedding)
        status  (F,) int8        0 missing, 1 done, 2 failed
        error   (F,) S512        reason of a failure
        time_s  (F,) float64     wall time of the calculation
        qm_charges (A,) float64  e, the engine's QM atomic charges (NaN on MM atoms and where the
                                 engine gives none; absent in files written before qmlmm 0.x)

Crash safety: a file is created whole in a temporary file and renamed. Label arrays are allocated
and filled at level creation (contiguous, uncompressed), so recording a result only overwrites raw
bytes; energy and forces are written before status, and the file is flushed after every result.
A kill can therefore lose only the frame being written, which keeps status 0 and is redone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from qmlmm import __version__
from qmlmm.errors import LevelConflictError, SchemaError
from qmlmm.system import Frame, Label

log = logging.getLogger(__name__)

SCHEMA = "qmlmm-dataset"
SCHEMA_VERSION = 1
UNITS = {"length": "nm", "energy": "kJ/mol", "force": "kJ/mol/nm", "charge": "e"}
STATUS_MISSING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
_ERR_LEN = 512

__all__ = ["STATUS_DONE", "STATUS_FAILED", "STATUS_MISSING", "Dataset", "LevelInfo", "write_dataset"]


@dataclass
class LevelInfo:
    """Metadata of one label level."""

    name: str
    method: str
    settings: dict[str, Any]
    versions: dict[str, str]
    n_done: int
    n_failed: int
    n_frames: int


def _atomic_create(path: Path, fill: Any) -> None:
    """Create an HDF5 file through a temporary file in the same folder, renamed when complete."""
    from qmlmm.fileio import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        fill(f)


def write_dataset(
    path: str | Path, frames: Sequence[Frame], overwrite: bool = False, level_methods: dict[str, str] | None = None
) -> Dataset:
    """Write ``frames`` (with any labels they carry) to a new dataset file at ``path``.

    Labels found in the frames become levels whose method is ``level_methods[name]`` (default
    "imported").

    Raises FileExistsError unless ``overwrite``. Returns the dataset opened for appending labels.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite")
    if not frames:
        raise SchemaError("no frames to write")

    def fill(f: h5py.File) -> None:
        f.attrs["schema"] = SCHEMA
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["qmlmm_version"] = __version__
        f.attrs["units"] = json.dumps(UNITS)
        _write_frames(f.create_group("frames"), frames)
        f.create_group("levels")

    _atomic_create(path, fill)
    ds = Dataset(path, mode="a")
    level_names = sorted({k for fr in frames for k in fr.labels})
    for name in level_names:
        ds.add_level(name, method=(level_methods or {}).get(name, "imported"), settings={}, versions={})
        for i, fr in enumerate(frames):
            if name in fr.labels:
                ds.write_label(name, i, fr.labels[name], flush=False)
    ds.flush()
    return ds


def _write_frames(g: h5py.Group, frames: Sequence[Frame]) -> None:
    counts = np.array([fr.n_atoms for fr in frames])
    offset = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    kw: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    cat = np.concatenate
    g.create_dataset("atom_offset", data=offset)
    g.create_dataset("numbers", data=cat([fr.numbers for fr in frames]).astype(np.int16), **kw)
    g.create_dataset("positions", data=cat([fr.positions for fr in frames]), **kw)
    g.create_dataset("is_qm", data=cat([fr.is_qm for fr in frames]).astype(np.int8), **kw)
    g.create_dataset("charges", data=cat([fr.charges for fr in frames]), **kw)
    g.create_dataset("mol_id", data=cat([fr.mol_ids for fr in frames]), **kw)
    g.create_dataset("box", data=np.stack([np.zeros((3, 3)) if fr.box is None else fr.box for fr in frames]))
    g.create_dataset("qm_charge", data=np.array([fr.qm_charge for fr in frames], dtype=np.int32))
    g.create_dataset("qm_mult", data=np.array([fr.qm_mult for fr in frames], dtype=np.int32))
    keys = sorted({k for fr in frames for k in fr.info if not k.startswith("_")})
    if keys:
        gi = g.create_group("info")
        for k in keys:
            vals = [fr.info.get(k) for fr in frames]
            if all(isinstance(v, (int, float, np.integer, np.floating)) or v is None for v in vals):
                gi.create_dataset(k, data=np.array([np.nan if v is None else float(v) for v in vals]))
            else:
                gi.create_dataset(
                    k,
                    data=np.array(["" if v is None else str(v) for v in vals], dtype=object),
                    dtype=h5py.string_dtype(),
                )


class Dataset:
    """An open qmlmm dataset file. Use as a context manager; ``mode`` is "r" or "a"."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset {self.path} does not exist")
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        try:
            # read-only without HDF5's file lock, so `qmlmm info` can read a dataset that `qmlmm label` is
            # writing (what it shows may be a few results old); writers keep the lock
            self._f = h5py.File(self.path, "r+") if mode == "a" else h5py.File(self.path, "r", locking=False)
        except OSError as e:
            raise SchemaError(f"{self.path} is not a readable HDF5 file: {e}") from e
        self._check_schema()
        g = self._f["frames"]
        self._offset = g["atom_offset"][()]
        self._cache: dict[str, np.ndarray] = {}

    # ---- context management ------------------------------------------------------------------
    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def flush(self) -> None:
        self._f.flush()

    def _check_schema(self) -> None:
        f = self._f
        schema = f.attrs.get("schema")
        if schema != SCHEMA:
            self.close()
            raise SchemaError(f"{self.path} is not a qmlmm dataset (schema attribute {schema!r}, expected {SCHEMA!r})")
        ver = int(f.attrs.get("schema_version", -1))
        if ver > SCHEMA_VERSION:
            self.close()
            raise SchemaError(f"{self.path} has schema version {ver}, newer than this qmlmm ({SCHEMA_VERSION})")
        missing = [
            k
            for k in (
                "atom_offset",
                "numbers",
                "positions",
                "is_qm",
                "charges",
                "mol_id",
                "box",
                "qm_charge",
                "qm_mult",
            )
            if k not in f.get("frames", {})
        ]
        if missing or "levels" not in f:
            self.close()
            raise SchemaError(f"{self.path} lacks required datasets: {missing or ['levels']}")
        g = f["frames"]
        off = g["atom_offset"][()]
        n_frames, n_atoms = len(off) - 1, len(g["numbers"])
        problems = []
        if n_frames < 0 or (len(off) and off[0] != 0) or np.any(np.diff(off) < 1) or (len(off) and off[-1] != n_atoms):
            problems.append(f"atom_offset must rise from 0 to the {n_atoms} atoms, one frame at least one atom")
        for k in ("positions", "is_qm", "charges", "mol_id"):
            if len(g[k]) != n_atoms:
                problems.append(f"{k} has {len(g[k])} rows for {n_atoms} atoms")
        for k in ("box", "qm_charge", "qm_mult"):
            if len(g[k]) != n_frames:
                problems.append(f"{k} has {len(g[k])} rows for {n_frames} frames")
        if problems:
            self.close()
            raise SchemaError(f"{self.path} is inconsistent: " + "; ".join(problems))

    # ---- frames ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._offset) - 1

    @property
    def n_atoms_total(self) -> int:
        return int(self._offset[-1])

    def atom_slice(self, i: int) -> slice:
        return slice(int(self._offset[i]), int(self._offset[i + 1]))

    def _arr(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._f["frames"][name][()]
        return self._cache[name]

    def frame(self, i: int, levels: Iterable[str] | None = None) -> Frame:
        """Frame ``i`` with labels of ``levels`` (default: all levels where it is done)."""
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} out of range (dataset has {len(self)})")
        s = self.atom_slice(i)
        box = self._arr("box")[i]
        info: dict[str, float | int | str] = {}
        if "info" in self._f["frames"]:
            for k, d in self._f["frames"]["info"].items():
                v = d[i]
                info[k] = v.decode() if isinstance(v, bytes) else (v if isinstance(v, str) else float(v))
        fr = Frame(
            numbers=self._arr("numbers")[s],
            positions=self._arr("positions")[s],
            is_qm=self._arr("is_qm")[s],
            charges=self._arr("charges")[s],
            mol_ids=self._arr("mol_id")[s],
            box=None if not np.any(box) else box,
            qm_charge=int(self._arr("qm_charge")[i]),
            qm_mult=int(self._arr("qm_mult")[i]),
            info=info,
        )
        for name in self.levels() if levels is None else levels:
            lab = self.label(name, i)
            if lab is not None:
                fr.labels[name] = lab
        return fr

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self.frame(i)

    def frames(self) -> list[Frame]:
        return list(self)

    # ---- levels ------------------------------------------------------------------------------
    def levels(self) -> list[str]:
        return sorted(self._f["levels"].keys())

    def level_info(self, name: str) -> LevelInfo:
        g = self._level(name)
        st = g["status"][()]
        return LevelInfo(
            name=name,
            method=str(g.attrs["method"]),
            settings=json.loads(g.attrs["settings"]),
            versions=json.loads(g.attrs["versions"]),
            n_done=int((st == STATUS_DONE).sum()),
            n_failed=int((st == STATUS_FAILED).sum()),
            n_frames=len(st),
        )

    def _level(self, name: str) -> h5py.Group:
        if name not in self._f["levels"]:
            raise KeyError(f"level {name!r} not in {self.path}; levels: {self.levels()}")
        return self._f["levels"][name]

    def add_level(
        self, name: str, method: str, settings: dict[str, Any], versions: dict[str, str], overwrite: bool = False
    ) -> None:
        """Create label arrays for level ``name``, or check an existing one has the same settings.

        Raises LevelConflictError when the level exists with another method or settings.
        """
        if not name or "/" in name:
            raise ValueError(f"bad level name {name!r}")
        levels = self._f["levels"]
        if name in levels:
            g = levels[name]
            old_method, old_settings = str(g.attrs["method"]), json.loads(g.attrs["settings"])
            new_settings = json.loads(json.dumps(settings))
            if overwrite:
                del levels[name]
            elif old_method != method or old_settings != new_settings:
                raise LevelConflictError(
                    f"level {name!r} in {self.path} was labelled with {old_method} {old_settings}; now asked "
                    f"for {method} {new_settings}. Label under another level name (--level) or overwrite it "
                    "(--overwrite)."
                )
            else:
                return
        n_f, n_a = len(self), self.n_atoms_total
        g = levels.create_group(name)
        g.attrs["method"] = method
        g.attrs["settings"] = json.dumps(settings, sort_keys=True)
        g.attrs["versions"] = json.dumps(versions, sort_keys=True)
        g.attrs["qmlmm_version"] = __version__
        g.attrs["energy_unit"] = UNITS["energy"]
        g.attrs["force_unit"] = UNITS["force"]
        # allocate and fill now: later writes then touch raw data only (crash safety)
        g.create_dataset("energy", data=np.full(n_f, np.nan))
        g.create_dataset("forces", data=np.zeros((n_a, 3)))
        g.create_dataset("status", data=np.zeros(n_f, dtype=np.int8))
        g.create_dataset("error", data=np.zeros(n_f, dtype=f"S{_ERR_LEN}"))
        g.create_dataset("time_s", data=np.full(n_f, np.nan))
        g.create_dataset("qm_charges", data=np.full(n_a, np.nan))
        self.flush()

    def status(self, name: str) -> np.ndarray:
        """(F,) int8 status of level ``name``: 0 missing, 1 done, 2 failed."""
        return self._level(name)["status"][()]

    def labelled_at(self, levels: Iterable[str]) -> np.ndarray:
        """(F,) bool: the frames labelled (done) at every one of ``levels``; a level the dataset lacks
        labels none."""
        ok = np.ones(len(self), dtype=bool)
        for name in levels:
            ok &= (self.status(name) == STATUS_DONE) if name in self.levels() else False
        return ok

    def errors(self, name: str) -> dict[int, str]:
        """Frame index -> failure reason for the failed frames of level ``name``."""
        g = self._level(name)
        st = g["status"][()]
        idx = np.flatnonzero(st == STATUS_FAILED)
        err = g["error"][()]
        return {int(i): err[i].decode(errors="replace") for i in idx}

    def label(self, name: str, i: int) -> Label | None:
        """Label of frame ``i`` at level ``name``, or None when not done."""
        g = self._level(name)
        if g["status"][i] != STATUS_DONE:
            return None
        s = self.atom_slice(i)
        q = g["qm_charges"][s] if "qm_charges" in g else None
        return Label(float(g["energy"][i]), g["forces"][s], None if q is None or not np.isfinite(q).any() else q)

    def energies(self, name: str) -> np.ndarray:
        """(F,) energies of level ``name`` in kJ/mol (NaN where not done)."""
        return self._per_frame_done(name, "energy")

    def label_seconds(self, name: str) -> np.ndarray:
        """(F,) wall seconds each label of level ``name`` took (NaN where not done or not recorded): a frame
        labelled again gets a new time."""
        return self._per_frame_done(name, "time_s")

    def _per_frame_done(self, name: str, field: str) -> np.ndarray:
        """(F,) per-frame ``field`` of level ``name``, NaN where the frame is not done."""
        g = self._level(name)
        v = g[field][()]
        v[g["status"][()] != STATUS_DONE] = np.nan
        return v

    def write_label(self, name: str, i: int, label: Label, time_s: float = float("nan"), flush: bool = True) -> None:
        """Record a result: energy and forces first, then status=done; flush."""
        g = self._level(name)
        s = self.atom_slice(i)
        f = np.asarray(label.forces, dtype=np.float64)
        if f.shape != (s.stop - s.start, 3):
            raise ValueError(f"forces of frame {i} have shape {f.shape}, expected {(s.stop - s.start, 3)}")
        g["energy"][i] = label.energy
        g["forces"][s] = f
        if label.charges is not None:
            q = np.asarray(label.charges, dtype=np.float64)
            if q.shape != (s.stop - s.start,):
                raise ValueError(f"charges of frame {i} have shape {q.shape}, expected {(s.stop - s.start,)}")
            if "qm_charges" not in g:  # a level made before charges were recorded
                g.create_dataset("qm_charges", data=np.full(self.n_atoms_total, np.nan))
            g["qm_charges"][s] = q
        g["time_s"][i] = time_s
        g["error"][i] = b""
        if flush:
            self.flush()
        g["status"][i] = STATUS_DONE
        if flush:
            self.flush()

    def write_failure(self, name: str, i: int, reason: str, flush: bool = True) -> None:
        """Record that frame ``i`` failed at level ``name`` with ``reason``."""
        g = self._level(name)
        g["error"][i] = reason.encode("utf-8", errors="replace")[:_ERR_LEN]
        g["status"][i] = STATUS_FAILED
        if flush:
            self.flush()
