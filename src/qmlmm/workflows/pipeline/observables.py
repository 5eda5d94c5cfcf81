"""The analysis step: structure of the MD runs (solute-water RDFs, nearest distances, chain dihedrals)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.workflows.pipeline.config import PipelineConfig

__all__ = ["observables_step"]


def observables_step(cfg: PipelineConfig, out: Path, system: Path, runs: list[str]) -> dict[str, Any]:
    """RDFs of solute atoms to water sites, nearest distances and chain dihedral distributions of every MD run
    in ``out/md/<run>``; plots ``md_observables.png`` and ``dihedrals.png``."""
    from qmlmm.analysis.md_analysis import conjugated_chain_dihedrals, load_run
    from qmlmm.analysis.plots import dihedral_panels, md_observables_plot
    from qmlmm.analysis.report import Quad, rdf_pair_atoms, structure_observables
    from qmlmm.md.system import MDSystem

    msys = MDSystem.load(system)
    res: dict[str, Any] = {"rdf_peak": {}, "nearest_nm": {}, "dihedrals": {}}
    quads: list[Quad] = []
    off = 0
    if cfg.dihedral_solute is not None and cfg.dihedral_solute < len(cfg.solutes):
        off = int(msys.meta["solute_offsets"][cfg.dihedral_solute])
        quads = conjugated_chain_dihedrals(cfg.solutes[cfg.dihedral_solute], offset=off)
    # one label per dihedral: its solute-atom indices (RDKit order with hydrogens, as built)
    labels = ["-".join(str(int(i) - off) for i in q[:4]) + f" ({q[4]})" for q in quads]
    curves_by_run: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    angles: dict[str, np.ndarray] = {}
    pair_atoms = rdf_pair_atoms(cfg.rdf_pairs, msys.numbers, msys.is_qm)
    for name in runs:
        pos, boxes = load_run(out / "md" / name)
        if len(pos) == 0 or boxes is None:
            continue
        summary, curves, ang = structure_observables(pos, boxes, pair_atoms, quads, labels)
        if summary["rdf_peak"]:
            res["rdf_peak"][name] = summary["rdf_peak"]
            res["nearest_nm"][name] = summary["nearest_nm"]
        curves_by_run[name] = curves
        if ang is not None:
            angles[name] = ang
            res["dihedrals"][name] = summary["dihedrals"]
    md_observables_plot(curves_by_run, angles, quads, out / "md_observables.png")
    if angles:
        dihedral_panels(angles, labels, out / "dihedrals.png")
    return res
