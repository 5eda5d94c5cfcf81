"""Observables of MD run folders: energies and drift, solute-water RDFs, chain dihedrals.

:func:`structure_observables` is the one place that turns a trajectory into RDF peaks and
per-dihedral statistics; the pipeline's analysis (all runs of a study) and ``qmlmm analyze RUN``
(one MD run folder, :func:`analyze_run`) both call it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.analysis.md_analysis import conjugated_chain_dihedrals, dihedral_stats, dihedrals, load_run, rdf
from qmlmm.errors import InputError
from qmlmm.md.runner import energy_drift
from qmlmm.system import minimum_image

__all__ = [
    "analyze_run",
    "nearest_distances",
    "rdf_pair_atoms",
    "single_bond_angles",
    "structure_observables",
    "DEFAULT_RDF_PAIRS",
    "Quad",
]

#: solute element - water site pairs analysed by default
DEFAULT_RDF_PAIRS: list[list[str]] = [["O", "OW"], ["N", "OW"]]
#: a dihedral: four system atom indices and its bond kind ("single" or "double")
Quad = tuple[int, int, int, int, str]


def rdf_pair_atoms(
    pairs: list[list[str]], numbers: np.ndarray, is_qm: np.ndarray
) -> dict[str, tuple[list[int], list[int]]]:
    """Atom index sets for RDF pairs [solute element, "OW"|"HW"], keyed "O-OW" etc.; pairs without
    solute atoms of that element are left out. Raises InputError for an unknown element or water site."""
    from qmlmm.elements import atomic_number

    out: dict[str, tuple[list[int], list[int]]] = {}
    sites = {"OW": 8, "HW": 1}
    for pair in pairs:
        if len(pair) != 2 or pair[1] not in sites:
            raise InputError(f"rdf_pairs entry {pair!r}: expected [solute element, 'OW' or 'HW']")
        z = atomic_number(pair[0])
        a = [int(i) for i in np.flatnonzero(is_qm & (numbers == z))]
        if a:
            out[f"{pair[0]}-{pair[1]}"] = (a, [int(i) for i in np.flatnonzero(~is_qm & (numbers == sites[pair[1]]))])
    return out


def nearest_distances(
    positions: np.ndarray, boxes: np.ndarray | None, a_idx: list[int] | np.ndarray, b_idx: list[int] | np.ndarray
) -> np.ndarray:
    """Per frame, the shortest distance (nm) between any atom of ``a_idx`` and any of ``b_idx``
    (minimum image in the orthorhombic ``boxes``); e.g. the nearest water H to a solute O, ~0.18 nm
    when the solute accepts a hydrogen bond. positions (T, N, 3) or (N, 3) nm, boxes (T, 3), (3,) nm
    or None. Returns (T,) nm (NaN for an empty set)."""
    pos = np.asarray(positions, dtype=float)
    if pos.ndim == 2:
        pos = pos[None]
    a, b = np.asarray(a_idx, dtype=int), np.asarray(b_idx, dtype=int)
    out = np.full(len(pos), np.nan)
    if not len(a) or not len(b):
        return out
    bx = None if boxes is None else np.broadcast_to(np.asarray(boxes, dtype=float), (len(pos), 3))
    for t, p in enumerate(pos):
        r = minimum_image(p[b][None] - p[a][:, None], None if bx is None else np.diag(bx[t]))
        out[t] = np.sqrt((r * r).sum(-1).min())
    return out


def single_bond_angles(angles: np.ndarray, quads: list[Quad]) -> np.ndarray:
    """|angle| (deg), flattened, of the dihedrals about single bonds (all of them if none is single);
    ``angles`` (T, n_quads) deg as :func:`dihedrals` returns them."""
    single = [k for k, q in enumerate(quads) if q[4] == "single"]
    return np.abs(angles[:, single]).ravel() if single else np.abs(angles).ravel()


def structure_observables(
    positions: np.ndarray,
    boxes: np.ndarray,
    pair_atoms: dict[str, tuple[list[int], list[int]]],
    quads: list[Quad],
    labels: list[str] | None = None,
    r_max: float = 0.8,
    n_bins: int = 60,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
    """RDFs and dihedral statistics of one trajectory.

    positions (T, N, 3) nm, boxes (T, 3) nm; ``pair_atoms`` from :func:`rdf_pair_atoms`; ``quads``
    the dihedrals (system indices + kind), ``labels`` their names (default the indices).
    Returns (summary, {pair: (r nm, g)}, angles (T, n_quads) deg or None). The summary holds
    ``rdf_peak`` {pair: {r_nm, g}}, ``nearest_nm`` {pair: mean over frames of the shortest
    solute-site distance (:func:`nearest_distances`)} and, with quads, ``dihedrals``: mean |angle| and s-trans fraction
    over the single-bond dihedrals (all if none) and per dihedral the circular mean, SD and trans
    fraction.
    """
    summary: dict[str, Any] = {"rdf_peak": {}, "nearest_nm": {}}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for pair, (a_idx, b_idx) in pair_atoms.items():
        r, g = rdf(positions, boxes, a_idx, b_idx, r_max=r_max, n_bins=n_bins)
        curves[pair] = (r, g)
        k = int(np.argmax(g))
        summary["rdf_peak"][pair] = {"r_nm": float(r[k]), "g": float(g[k])}
        summary["nearest_nm"][pair] = float(np.mean(nearest_distances(positions, boxes, a_idx, b_idx)))
    if not quads:
        return summary, curves, None
    labels = labels or ["-".join(str(int(i)) for i in q[:4]) + f" ({q[4]})" for q in quads]
    ang = dihedrals(positions, [q[:4] for q in quads], boxes)
    vals = single_bond_angles(ang, quads)
    st = dihedral_stats(ang)
    summary["dihedrals"] = {
        "n_dihedrals": len(quads),
        "n_frames": len(ang),
        "mean_abs_single_deg": float(vals.mean()),
        "frac_s_trans": float((vals > 90).mean()),
        "per_dihedral": [
            {"atoms": lab, "mean_deg": float(m), "std_deg": float(sd), "frac_trans": float(ft)}
            for lab, m, sd, ft in zip(labels, st["mean_deg"], st["std_deg"], st["frac_trans"], strict=True)
        ],
    }
    return summary, curves, ang


def analyze_run(
    run: str | Path,
    system: str | Path | None = None,
    smiles: str | None = None,
    rdf_pairs: list[list[str]] | None = None,
) -> dict[str, Any]:
    """Summary of the MD run folder ``run``: mean/std temperature and energies, total-energy drift, and
    (with its system folder) solute-water RDFs (``rdf_pairs``, default O-OW and N-OW) and, with the
    first solute's ``smiles``, its conjugated-chain dihedrals. Writes analysis.json and analysis.png
    into the run folder and returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    if not (run / "log.csv").exists():
        raise InputError(f"{run} is not an MD run folder (no log.csv; make one with qmlmm md)")
    log = np.genfromtxt(run / "log.csv", delimiter=",", names=True)
    unc = np.atleast_1d(log["uncertainty_kjmol"])
    res: dict[str, Any] = {
        "n_rows": int(np.size(log["step"])),
        "last_step": int(np.atleast_1d(log["step"])[-1]),
        "temperature_mean_K": float(np.mean(log["temperature_K"])),
        "temperature_std_K": float(np.std(log["temperature_K"])),
        "potential_mean_kjmol": float(np.mean(log["potential_kjmol"])),
        "total_drift_kjmol_per_ps": energy_drift(run / "log.csv"),
        "uncertainty_max_kjmol": float(np.nanmax(unc)) if np.isfinite(unc).any() else None,
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t = np.atleast_1d(log["time_ps"])
    for key, lab in (("total_kjmol", "total"), ("potential_kjmol", "potential")):
        e = np.atleast_1d(log[key])
        axes[0].plot(t, e - e[0], label=lab)
    axes[0].set_xlabel("time (ps)")
    axes[0].set_ylabel("energy - initial (kJ/mol)")
    axes[0].legend()
    if system is not None:
        from qmlmm.md.system import MDSystem

        msys = MDSystem.load(system)
        pos, boxes = load_run(run)
        if len(pos) and pos.shape[1] != len(msys.numbers):
            raise InputError(
                f"{run}'s trajectory has {pos.shape[1]} atoms, the system {system} {len(msys.numbers)}: "
                "give the system folder the run was made from"
            )
        if len(pos) and boxes is not None:
            pairs = rdf_pair_atoms(rdf_pairs or DEFAULT_RDF_PAIRS, msys.numbers, msys.is_qm)
            quads = conjugated_chain_dihedrals(smiles) if smiles else []
            summary, curves, ang = structure_observables(pos, boxes, pairs, quads)
            res.update(summary)
            res["rdf"] = {p: {"r_nm": r.tolist(), "g": g.tolist()} for p, (r, g) in curves.items()}
            for p, (r, g) in curves.items():
                axes[1].plot(r, g, label=p)
            axes[1].set_xlabel("r (nm)")
            axes[1].set_ylabel("g(r) solute - water")
            if curves:
                axes[1].legend()
            if ang is not None:
                axes[2].hist(np.abs(ang).ravel(), bins=36, range=(0, 180))
                axes[2].set_xlabel("|chain dihedral| (deg)")
    fig.tight_layout()
    fig.savefig(run / "analysis.png", dpi=110)
    plt.close(fig)
    (run / "analysis.json").write_text(json.dumps(res, indent=2))
    return res
