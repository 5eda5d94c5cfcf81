"""``qmlmm analyze``: observables of one MD run folder (energies, drift, RDF, chain dihedrals)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.analysis.md_analysis import conjugated_chain_dihedrals, dihedrals, load_run, rdf
from qmlmm.md.runner import energy_drift

__all__ = ["analyze_run"]


def analyze_run(run: str | Path, system: str | Path | None = None, smiles: str | None = None) -> dict[str, Any]:
    """Summary of ``run``: mean/std temperature and energies, total-energy drift, and (with the system
    folder) the solute N/O - water O RDF and, with ``smiles``, the conjugated-chain dihedrals.
    Writes analysis.json and analysis.png into the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    log = np.genfromtxt(run / "log.csv", delimiter=",", names=True)
    res: dict[str, Any] = {
        "n_rows": int(np.size(log["step"])),
        "last_step": int(np.atleast_1d(log["step"])[-1]),
        "temperature_mean_K": float(np.mean(log["temperature_K"])),
        "temperature_std_K": float(np.std(log["temperature_K"])),
        "potential_mean_kjmol": float(np.mean(log["potential_kjmol"])),
        "total_drift_kjmol_per_ps": energy_drift(run / "log.csv"),
        "uncertainty_max_kjmol": float(np.nanmax(log["uncertainty_kjmol"]))
        if np.isfinite(log["uncertainty_kjmol"]).any()
        else None,
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(log["time_ps"], log["total_kjmol"] - log["total_kjmol"][0], label="total")
    axes[0].plot(log["time_ps"], log["potential_kjmol"] - log["potential_kjmol"][0], label="potential", alpha=0.6)
    axes[0].set_xlabel("time (ps)")
    axes[0].set_ylabel("energy - initial (kJ/mol)")
    axes[0].legend()
    if system is not None:
        from qmlmm.md.system import MDSystem

        msys = MDSystem.load(system)
        pos, boxes = load_run(run)
        if len(pos) and boxes is not None:
            solute = [int(i) for i in msys.qm_indices if msys.numbers[i] in (7, 8)]
            water_o = np.flatnonzero((~msys.is_qm) & (msys.numbers == 8))
            if solute:
                r, g = rdf(pos, boxes, solute, water_o, r_max=0.8, n_bins=60)  # type: ignore[arg-type]
                axes[1].plot(r, g)
                axes[1].set_xlabel("r (nm)")
                axes[1].set_ylabel("g(r) solute N/O - water O")
                res["rdf_first_peak_nm"] = float(r[int(np.argmax(g))])
                res["rdf"] = {"r_nm": r.tolist(), "g": g.tolist()}
            if smiles:
                quads = conjugated_chain_dihedrals(smiles)
                ang = dihedrals(pos, [q[:4] for q in quads], boxes)
                axes[2].hist(np.abs(ang).ravel(), bins=36, range=(0, 180))
                axes[2].set_xlabel("|chain dihedral| (deg)")
                res["dihedrals_deg"] = {
                    f"{q[0]}-{q[1]}-{q[2]}-{q[3]} ({q[4]})": ang[:, k].tolist() for k, q in enumerate(quads)
                }
    fig.tight_layout()
    fig.savefig(run / "analysis.png", dpi=110)
    plt.close(fig)
    (run / "analysis.json").write_text(json.dumps(res, indent=2))
    return res
