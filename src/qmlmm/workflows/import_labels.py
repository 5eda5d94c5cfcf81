"""``qmlmm import``: labelled frames computed elsewhere (ORCA, CP2K, another QM/MM code) into a dataset
that ``qmlmm train`` accepts.

The input is extended XYZ in the exchange convention (docs/dataset.md: per-atom ``qm``, ``mm_charge``,
``mol_id``; per level ``energy_<level>`` in eV and ``forces_<level>`` in eV/Angstrom on every atom). The
user declares the embedding the labels were computed with (cutoff and switching width): each level is
stored with it, so training uses the same embedding as the labels. Every frame is checked against that
declaration: forces on MM atoms outside the embedding must be zero (otherwise the charges were chosen by
another rule), and every embedded MM atom whose charge is felt (switching weight above ``min_weight``)
must carry a force (otherwise the MM forces are missing). A frame that breaks it is refused, named with
its level, atom and force.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmlmm.data import read_extxyz, write_dataset
from qmlmm.environment import EmbeddingSettings, select_embedding
from qmlmm.errors import InputError
from qmlmm.system import Frame

log = logging.getLogger(__name__)

__all__ = ["ImportReport", "check_labels_match_embedding", "import_labels"]

#: |F| (kJ/mol/nm) below which a force counts as zero (extxyz keeps ~15 digits of eV/Angstrom)
ZERO_FORCE = 1e-6


@dataclass
class ImportReport:
    """Frames and levels brought in."""

    n_frames: int
    levels: dict[str, str]
    path: Path


def check_labels_match_embedding(frame: Frame, emb: EmbeddingSettings, index: int, min_weight: float = 1e-3) -> None:
    """Raise InputError when a label of ``frame`` (number ``index`` in its file) has forces on MM atoms
    outside the declared embedding or lacks them on embedded atoms of weight above ``min_weight``."""
    e = select_embedding(frame, emb)
    inside = np.zeros(frame.n_atoms, dtype=bool)
    inside[e.mm_index] = True
    mm = ~frame.is_qm
    felt = np.zeros(frame.n_atoms, dtype=bool)
    felt[e.mm_index[e.mm_weights > min_weight]] = True
    felt &= np.abs(frame.charges) > 0
    for name, lab in frame.labels.items():
        f = np.linalg.norm(np.asarray(lab.forces), axis=1)
        out = np.flatnonzero(mm & ~inside & (f > ZERO_FORCE))
        if len(out):
            a = int(out[0])
            raise InputError(
                f"frame {index}, level {name!r}: MM atom {a} lies outside the declared embedding (cutoff "
                f"{emb.cutoff} nm, switch {emb.switch_width} nm) but has a force of {f[a]:.3g} kJ/mol/nm "
                f"({len(out)} such atoms): the labels were computed with another embedding; declare it with "
                "--cutoff/--switch-width"
            )
        missing = np.flatnonzero(felt & (f <= ZERO_FORCE))
        if len(missing):
            a = int(missing[0])
            raise InputError(
                f"frame {index}, level {name!r}: embedded MM atom {a} (charge {frame.charges[a]:+.3f} e) has no "
                f"force ({len(missing)} such atoms): the labels lack the forces on the MM charges, which "
                "training needs"
            )


def import_labels(
    src: str | Path,
    out: str | Path,
    embedding: EmbeddingSettings,
    methods: dict[str, str] | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Read labelled extended XYZ ``src``, check every frame's labels against ``embedding`` and write the
    dataset ``out`` whose levels record it (``methods``: level -> method text, e.g. ``{"dft":
    "orca:b3lyp/def2-svp"}``; default "imported"). Raises InputError naming the first bad frame."""
    frames = read_extxyz(src)
    names = sorted({k for fr in frames for k in fr.labels})
    if not names:
        raise InputError(f"{src} carries no labels (energy_<level> and forces_<level> per frame)")
    unknown = sorted(set(methods or {}) - set(names))
    if unknown:
        raise InputError(f"--method-of names level(s) {unknown} that {src} does not have; its levels: {names}")
    for i, fr in enumerate(frames):
        fr.validate()
        check_labels_match_embedding(fr, embedding, i)
    levels = {n: (methods or {}).get(n, "imported") for n in names}
    ds = write_dataset(out, frames, overwrite=overwrite, level_methods=levels)
    try:
        for n in names:
            g = ds._f["levels"][n]
            g.attrs["settings"] = json.dumps(
                {"engine": {"imported_from": str(src), "method": levels[n]}, "embedding": embedding.to_dict()},
                sort_keys=True,
            )
        ds.flush()
    finally:
        ds.close()
    log.info("imported %d frames with levels %s from %s", len(frames), names, src)
    return ImportReport(len(frames), levels, Path(out))
