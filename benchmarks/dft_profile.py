"""Where the time of one DFT QM/MM label goes: SCF (XC integration), QM gradient (DF-J and XC parts),
MM forces. cProfile around ``label_frame`` of one stored frame.

Run: `.venv/bin/python benchmarks/dft_profile.py --data runs/sam_small/frames.h5`
(default spec: the SAM + cytosine `small` reference, PBE/6-31G, grid 1, Weigend J-fit; one thread).
Run it on an otherwise idle machine: the times are wall-clock.
Writes benchmarks/results/dft_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from typing import Any

from _results import machine, save_json, save_markdown
from qmlmm.data import Dataset
from qmlmm.engines import label_frame, make_engine
from qmlmm.environment import EmbeddingSettings

# part of the label -> (file suffix, function name) whose cumulative time it is
PARTS: dict[str, tuple[str, str]] = {
    "SCF: XC integration (nr_rks)": ("pyscf/dft/numint.py", "nr_rks"),
    "QM gradient: DF-J (3-centre derivative integrals)": ("pyscf/df/grad/rhf.py", "get_j"),
    "QM gradient: XC (get_vxc)": ("pyscf/grad/rks.py", "get_vxc"),
    "MM forces: electronic part (field integrals)": ("qmlmm/engines/pyscf_dft.py", "_grad_mm_electrons"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/sam_small/frames.h5", help="a qmlmm dataset (frames)")
    ap.add_argument("--frame", type=int, default=0)
    ap.add_argument("--spec", default="dft:pbe/6-31g,grids=1,aux=weigend,conv=1e-8")
    ap.add_argument("--cutoff", type=float, default=1.4)
    ap.add_argument("--switch", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="dft_profile")
    a = ap.parse_args()
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")  # the dataset may be open in a running pipeline
    with Dataset(a.data) as ds:
        fr = ds.frame(a.frame, levels=[])
    eng = make_engine(a.spec, threads=a.threads)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    _, res = label_frame(eng, fr, EmbeddingSettings(a.cutoff, a.switch))
    prof.disable()
    wall = time.perf_counter() - t0
    stats: Any = pstats.Stats(prof).stats  # type: ignore[attr-defined]  # {(file, line, func): (cc, nc, tt, ct, callers)}
    parts = {}
    for name, (suffix, func) in PARTS.items():
        parts[name] = sum(v[3] for k, v in stats.items() if k[0].endswith(suffix) and k[2] == func)
    out = {
        "spec": a.spec,
        "data": a.data,
        "frame": a.frame,
        "qm_atoms": int(fr.is_qm.sum()),
        "n_mm": res.info.get("n_mm"),
        "threads": a.threads,
        "machine": machine(with_torch=False),
        "wall_s": wall,
        "scf_s": res.info["time_scf_s"],
        "scf_cycles": res.info["scf_cycles"],
        "grad_qm_s": res.info["time_grad_qm_s"],
        "grad_mm_s": res.info["time_grad_mm_s"],
        "parts_s": parts,
    }
    save_json(a.out, out)
    md = [
        f"# One DFT QM/MM label, profiled ({a.spec}, {a.threads} thread(s))",
        "",
        f"{a.data} frame {a.frame}: {out['qm_atoms']} QM atoms, {out['n_mm']} MM charges; {out['machine']}; "
        f"{out['scf_cycles']} SCF cycles from a MINAO guess (labelling reuses the previous frame's density).",
        "",
        "| part | s | % of the label |",
        "|---|---|---|",
        f"| whole label | {wall:.1f} | 100 |",
        f"| SCF | {out['scf_s']:.1f} | {100 * out['scf_s'] / wall:.0f} |",
        f"| QM gradient | {out['grad_qm_s']:.1f} | {100 * out['grad_qm_s'] / wall:.0f} |",
        f"| MM forces (+ potential) | {out['grad_mm_s']:.1f} | {100 * out['grad_mm_s'] / wall:.0f} |",
    ]
    md += [f"| {name} | {t:.1f} | {100 * t / wall:.0f} |" for name, t in parts.items()]
    save_markdown(a.out, md)


if __name__ == "__main__":
    main()
