"""DFT labelling of a 50-atom QM region: density fitting with the 3-centre tensor kept in memory
(qmlmm's default, option ``dfmem``) against PySCF's direct J build (``dfmem=0``), which recomputes the
3-centre integrals in every SCF cycle for pure functionals (``pyscf.df.df_jk.get_j``).

Input: the first frame of ``runs/ra_tiny/labels.h5`` if present (retinoic acid + 0.9 nm embedding,
~1060 charges), else the retinoic-acid-in-water frame from ../shared/data. Same frame, same thread
count, one process, both variants from a fresh engine (minao guess), alternating.

Run: `.venv/bin/python benchmarks/dft_df_incore.py [--spec dft:pbe/sto-3g,grids=1,conv=1e-7] [--threads 1]`
Writes benchmarks/results/dft_df_incore.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _results import machine, save_json, save_markdown
from qmlmm.data import Dataset
from qmlmm.engines import label_frame, make_engine
from qmlmm.environment import EmbeddingSettings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="dft:pbe/sto-3g,grids=1,conv=1e-7")
    ap.add_argument("--data", default="runs/ra_tiny/labels.h5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cutoff", type=float, default=0.9)
    a = ap.parse_args()
    with Dataset(a.data) as ds:
        fr = ds.frame(0, levels=[])
    emb = EmbeddingSettings(a.cutoff, 0.15)
    rows: list[dict[str, Any]] = []
    energies = {}
    for name, extra in (("in memory (default)", ""), ("direct J (dfmem=0)", ",dfmem=0")):
        eng = make_engine(a.spec + extra, threads=a.threads)
        t0 = time.perf_counter()
        lab, res = label_frame(eng, fr, emb)
        wall = time.perf_counter() - t0
        energies[name] = lab.energy
        rows.append(
            {
                "variant": name,
                "wall_s": wall,
                "scf_s": res.info["time_scf_s"],
                "grad_qm_s": res.info["time_grad_qm_s"],
                "grad_mm_s": res.info["time_grad_mm_s"],
                "scf_cycles": res.info["scf_cycles"],
                "n_mm": res.info.get("n_mm"),
            }
        )
        print(rows[-1], flush=True)
    e = list(energies.values())
    out = {
        "spec": a.spec,
        "threads": a.threads,
        "qm_atoms": int(fr.is_qm.sum()),
        "machine": machine(with_torch=False),
        "rows": rows,
        "energy_difference_kjmol": abs(e[0] - e[1]),
        "speedup_wall": rows[1]["wall_s"] / rows[0]["wall_s"],
        "speedup_scf": rows[1]["scf_s"] / rows[0]["scf_s"],
    }
    save_json("dft_df_incore", out)
    md = [
        f"# DFT density fitting: 3-centre tensor in memory vs direct J ({a.spec}, {a.threads} thread(s))",
        "",
        f"{out['qm_atoms']} QM atoms, {rows[0]['n_mm']} point charges; one frame, minao guess.",
        "",
        "| variant | wall s | SCF s | QM grad s | MM grad s | cycles |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['variant']} | {r['wall_s']:.1f} | {r['scf_s']:.1f} | {r['grad_qm_s']:.1f} | {r['grad_mm_s']:.1f} | "
        f"{r['scf_cycles']} |"
        for r in rows
    ]
    md += [
        "",
        f"Speed-up: {out['speedup_wall']:.2f}x per frame, {out['speedup_scf']:.2f}x in the SCF; "
        f"energies differ by {out['energy_difference_kjmol']:.2e} kJ/mol.",
    ]
    save_markdown("dft_df_incore", md)


if __name__ == "__main__":
    main()
