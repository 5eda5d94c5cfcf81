"""Cost and accuracy of the cheap DFT settings the seed-study configs use for labels.

The ``tiny`` sizes label with PBE/STO-3G and the ``small`` sizes with PBE/6-31G; what a frame costs
on this machine decides how many frames a size can afford. Two knobs are measured against the
accurate setting of the same functional/basis: the XC grid level (``grids=``, PySCF's default 3)
and the auxiliary basis for density fitting (``aux=weigend``, the Weigend J-fitting set, instead of
PySCF's default, which for STO-3G and 6-31G is a large even-tempered set).

What matters for training labels is not the absolute energy but the error in energy *differences*
between frames and in forces, so each variant labels two frames: the retinoic-acid-in-water frame of
../shared/data and the same frame with the QM atoms displaced at random (0.005 nm rms), and reports
the error of E(B) - E(A) and the rms force error (QM and MM atoms) against the group's first,
accurate variant. One process, fresh engine per variant (minao guess), one thread.

Run: `.venv/bin/python benchmarks/dft_settings.py [--group tiny|small|all] [--threads 1]`
Writes benchmarks/results/dft_settings.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from _results import machine, save_json, save_markdown
from qmlmm.data import read_extxyz
from qmlmm.engines import label_frame, make_engine
from qmlmm.environment import EmbeddingSettings

sys.path.insert(0, str(Path(__file__).parent))
FRAME = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "retinoic_acid_in_water.extxyz"

# group -> (embedding cutoff nm, switch width nm, [variants]); the first variant is the accurate one
GROUPS: dict[str, tuple[float, float, list[str]]] = {
    "tiny": (
        0.9,
        0.15,
        [
            "dft:pbe/sto-3g,conv=1e-9",
            "dft:pbe/sto-3g,grids=1,conv=1e-7",  # the tiny reference before
            "dft:pbe/sto-3g,grids=0,aux=weigend,conv=1e-7",  # the tiny reference now
        ],
    ),
    "small": (
        1.4,
        0.2,
        [
            "dft:pbe/6-31g,conv=1e-9",
            "dft:pbe/6-31g,grids=1,conv=1e-8",
            "dft:pbe/6-31g,grids=1,aux=weigend,conv=1e-8",  # the small reference now
        ],
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", default="all", choices=[*GROUPS, "all"])
    ap.add_argument("--frame", default=str(FRAME))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from dftb_speed import cluster_of

    fr_a = cluster_of(read_extxyz(a.frame)[0])  # the 4.4 nm box is too small for unique images at 1.4 nm
    rng = np.random.default_rng(0)
    pos = fr_a.positions.copy()
    pos[fr_a.is_qm] += rng.normal(scale=0.005 / np.sqrt(3), size=(int(fr_a.is_qm.sum()), 3))
    fr_b = replace(fr_a, positions=pos)
    groups = list(GROUPS) if a.group == "all" else [a.group]
    rows = []
    for g in groups:
        cutoff, width, specs = GROUPS[g]
        emb = EmbeddingSettings(cutoff, width)
        ref: dict[str, Any] = {}
        for spec in specs:
            eng = make_engine(spec, threads=a.threads)
            walls: list[float] = []
            energies: list[float] = []
            forces: list[np.ndarray] = []
            info: dict[str, Any] = {}
            for fr in (fr_a, fr_b):
                t0 = time.perf_counter()
                lab, res = label_frame(eng, fr, emb)
                walls.append(time.perf_counter() - t0)
                energies.append(lab.energy)
                forces.append(lab.forces)
                info = info or res.info
            de = energies[1] - energies[0]
            f = np.concatenate(forces)
            if not ref:
                ref = {"de": de, "f": f}
            mask = np.any(ref["f"] != 0, axis=1)
            row = {
                "group": g,
                "spec": spec,
                "n_qm": int(fr_a.is_qm.sum()),
                "n_mm": info.get("n_mm"),
                "wall_s_frame_a": walls[0],  # minao guess
                "wall_s_frame_b": walls[1],  # previous density as guess (as consecutive frames in labelling)
                "scf_s": info["time_scf_s"],
                "grad_qm_s": info["time_grad_qm_s"],
                "grad_mm_s": info["time_grad_mm_s"],
                "scf_cycles": info["scf_cycles"],
                "de_error_kjmol": float(de - ref["de"]),
                "force_rms_error": float(np.sqrt(np.mean((f - ref["f"])[mask] ** 2))),
            }
            rows.append(row)
            print(row, flush=True)
    out = {"threads": a.threads, "machine": machine(with_torch=False), "rows": rows}
    suffix = "" if a.group == "all" else f"_{a.group}"
    save_json(f"dft_settings{suffix}", out)
    md = [
        f"# DFT label settings: cost and error (retinoic acid in water, {a.threads} thread(s))",
        "",
        "Two frames (B = A with the QM atoms displaced, 0.005 nm rms); errors against the group's first row.",
        "Wall times per frame: A from the minao guess, B from A's density.",
        "",
        "| group | spec | QM / MM atoms | wall A s | wall B s | SCF A s | QM grad A s | "
        "dE(B-A) error kJ/mol | force rms error kJ/mol/nm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['group']} | `{r['spec']}` | {r['n_qm']} / {r['n_mm']} | {r['wall_s_frame_a']:.1f} | "
        f"{r['wall_s_frame_b']:.1f} | {r['scf_s']:.1f} | {r['grad_qm_s']:.1f} | {r['de_error_kjmol']:.3f} | "
        f"{r['force_rms_error']:.3f} |"
        for r in rows
    ]
    save_markdown(f"dft_settings{suffix}", md)


if __name__ == "__main__":
    main()
