"""Labelling speed: seconds per frame of QM/MM energy + all forces, and where the time goes.

System: aspirin (21 atoms, RDKit/MMFF geometry) in a 3.4 nm box of TIP3P waters, 1.4 nm
molecule-based embedding (about 1900 point charges). Frames are consecutive snapshots: each is
the previous one with every atom displaced by ~0.003 nm (as in an MD trajectory written every
few steps), so reusing the previous density is meaningful.

Measured:
1. per method, the full labelling workflow (`label_dataset`, Dask LocalCluster) with 1 worker x
   2 threads and 2 workers x 1 thread: wall seconds per frame (throughput);
2. per method, where one frame's time goes (SCF, QM gradient, MM gradient) from the engine;
3. the cheap wins for DFT: density fitting on/off, previous-frame density guess on/off.

Run: `.venv/bin/python benchmarks/label_speed.py [--frames 4] [--quick]`
Writes benchmarks/results/label_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import machine, save_json, save_markdown
from qmlmm.data import write_extxyz
from qmlmm.engines import label_frame, make_engine
from qmlmm.environment import EmbeddingSettings, select_embedding
from qmlmm.system import Frame
from qmlmm.testing import solute_from_smiles, solvated_frame
from qmlmm.workflows.label import LevelRequest, label_dataset

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def make_frames(n: int, seed: int = 0) -> list[Frame]:
    z, p, q = solute_from_smiles(ASPIRIN, seed=0)
    base = solvated_frame((z, p), box=3.4, seed=seed, qm_charge=q)
    rng = np.random.default_rng(seed)
    frames, cur = [], base
    for _ in range(n):
        frames.append(cur)
        nxt = cur.copy()
        nxt.positions = nxt.positions + rng.normal(scale=0.003 / np.sqrt(3), size=nxt.positions.shape)
        cur = nxt
    return frames


def engine_breakdown(spec: str, frames: list[Frame], threads: int) -> dict[str, float]:
    eng = make_engine(spec, threads=threads)
    rows = []
    for fr in frames:
        t0 = time.perf_counter()
        _, res = label_frame(eng, fr, EmbeddingSettings(1.4))
        info = dict(res.info)
        info["wall_s"] = time.perf_counter() - t0
        rows.append(info)
    keys = ["wall_s", "time_scf_s", "time_grad_qm_s", "time_grad_mm_s", "scf_cycles"]
    out: dict[str, float] = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r]  # type: ignore[arg-type]
        if vals:
            out[f"first_{k}"] = vals[0]
            out[f"rest_{k}"] = float(np.mean(vals[1:])) if len(vals) > 1 else float("nan")
    return out


def workflow_speed(spec: str, frames: list[Frame], workers: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f.extxyz"
        write_extxyz(src, frames)
        t0 = time.perf_counter()
        rep = label_dataset(
            src,
            Path(tmp) / "o.h5",
            [LevelRequest.from_spec(spec)],
            EmbeddingSettings(1.4),
            workers=workers,
            threads=threads,
            progress=False,
        )
        wall = time.perf_counter() - t0
        assert rep.ok, rep.failed
    return wall / len(frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="xtb and PBE/def2-SVP only, 2 frames")
    args = ap.parse_args()
    n = 2 if args.quick else args.frames
    frames = make_frames(n)
    emb = select_embedding(frames[0], EmbeddingSettings(1.4))
    specs = ["xtb:gfn2", "dft:pbe/def2-svp"] + ([] if args.quick else ["dft:b3lyp/def2-svp"])
    result: dict[str, object] = {
        "system": f"aspirin (21 QM atoms) + {emb.n_mm} embedded TIP3P charges (1.4 nm), {n} consecutive frames",
        "machine": machine(with_torch=False),
        "date": time.strftime("%Y-%m-%d"),
        "workflow": {},
        "breakdown": {},
        "cheap_wins": {},
    }
    for spec in specs:
        for workers, threads in ((1, 2), (2, 1)):
            spf = workflow_speed(spec, frames, workers, threads)
            result["workflow"][f"{spec} | {workers}x{threads}"] = spf  # type: ignore[index]
            print(f"{spec:22s} workers={workers} threads={threads}: {spf:8.2f} s/frame", flush=True)
        result["breakdown"][spec] = engine_breakdown(spec, frames, threads=2)  # type: ignore[index]
        print(f"  breakdown: {result['breakdown'][spec]}", flush=True)  # type: ignore[index]
    if not args.quick:
        # density fitting off (one frame, no reuse) vs on
        for spec in ("dft:b3lyp/def2-svp,reuse=no", "dft:b3lyp/def2-svp,df=no,reuse=no"):
            b = engine_breakdown(spec, frames[:1], threads=2)
            result["cheap_wins"][spec] = b["first_wall_s"]  # type: ignore[index]
            print(f"  {spec}: {b['first_wall_s']:.1f} s", flush=True)
    save_json("label_speed", result)
    save_markdown("label_speed", to_markdown(result).rstrip("\n").splitlines())


def to_markdown(r: dict) -> str:
    lines = [
        f"# Labelling speed ({r['date']})",
        "",
        f"System: {r['system']}. Machine: {r['machine']}.",
        "",
        "## Workflow throughput (label_dataset on a Dask LocalCluster, wall s per frame)",
        "",
        "| method | workers x threads | s/frame |",
        "|---|---|---|",
    ]
    for k, v in r["workflow"].items():
        spec, wt = k.split(" | ")
        lines.append(f"| {spec} | {wt} | {v:.2f} |")
    lines += [
        "",
        "## Where one frame's time goes (1 process, 2 threads; s)",
        "",
        "| method | frame | total | SCF | QM gradient | MM gradient | SCF cycles |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec, b in r["breakdown"].items():
        for which, label in (("first", "first (fresh guess)"), ("rest", "next (previous density)")):

            def get(key: str, b: dict = b, which: str = which) -> float:
                return float(b.get(f"{which}_{key}", float("nan")))

            tot = get("wall_s")
            if np.isnan(tot):
                continue
            lines.append(
                f"| {spec} | {label} | {tot:.2f} | {get('time_scf_s'):.2f} | {get('time_grad_qm_s'):.2f} | "
                f"{get('time_grad_mm_s'):.2f} | {get('scf_cycles'):.0f} |"
            )
    if r["cheap_wins"]:
        lines += ["", "## Density fitting (one frame, fresh guess, 2 threads)", "", "| spec | s |", "|---|---|"]
        for k, v in r["cheap_wins"].items():
            lines.append(f"| {k} | {v:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
