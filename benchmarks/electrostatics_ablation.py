"""Electrostatic-term ablation on a charged solute: learning curves and MD stability.

Acetate (charge -1) in TIP3P water, 1.4 nm embedding with a 0.2 nm switch, sampled in independent
DFTB3/MM runs; every frame labelled with GFN2-xTB (the target here: affordable on 2 cores, and like DFT
it polarises in the MM field) and DFTB3/3ob (the delta baseline). Models, each trained on growing
numbers of frames from the training runs and tested on held-out runs (split by whole runs):

- ``none``: the short-range HDNNP alone (MM charges only through the descriptor);
- ``free``: with the electrostatic term E += k_e sum_i q_i phi_i, charges learnt from energies and
  forces alone (``w_charges: 0``);
- ``anchored``: the same, charges also fitted to the labels' xtb charges (minus DFTB3's for delta),
  the default.

Reported: test MAE of energies, QM and MM forces, the charge error, the baseline's own error, and for
the largest direct models a 0.5 ps NVT ML/MM run from the system's start (does it stay whole?).
Every step is resumable (reuses what a previous run left in --work).

Run: `.venv/bin/python benchmarks/electrostatics_ablation.py [--work runs/electrostatics]`
Writes benchmarks/results/electrostatics_ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from _results import machine, save_json, save_markdown
from qmlmm.analysis.tables import learning_curve_table
from qmlmm.environment import EmbeddingSettings
from qmlmm.md.build import BuildSettings, SoluteSpec, build_system
from qmlmm.training import TrainConfig
from qmlmm.workflows.label import LevelRequest, label_dataset
from qmlmm.workflows.learning_curve import learning_curve
from qmlmm.workflows.sample import SampleSettings, sample

VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"electrostatics": "none"},
    "free": {"electrostatics": "charges", "w_charges": 0.0},
    "anchored": {"electrostatics": "charges", "w_charges": 1.0},
}


def train_config(**overrides: Any) -> TrainConfig:
    """This benchmark's training settings (one network per point, split by whole runs)."""
    settings: dict[str, Any] = {
        "target": "xtb",
        "baseline": "dftb3",
        "ensemble": 1,
        "hidden": [32, 32],
        "epochs": 150,
        "batch_size": 4,
        "lr": 1e-3,
        "lr_patience": 25,
        "patience": 60,
        "split": "runs",
        "valid_fraction": 0.125,
        "test_fraction": 0.25,
        "threads": 2,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def charge_mae(model_path: Path) -> float | None:
    """Test charge MAE (e) from a model's metrics file, None without charges."""
    m = json.loads(model_path.with_suffix(".metrics.json").read_text())
    q = (m.get("test") or {}).get("charges")
    return None if q is None else float(q["mae"])


def stability(system: Path, model_path: Path, out: Path, steps: int) -> dict[str, Any]:
    """NVT ML/MM run of ``steps`` 0.5 fs steps: steps done, why it stopped, largest solute extent (nm)."""
    from qmlmm.analysis.md_analysis import read_dcd
    from qmlmm.md.runner import MDSettings, run_md
    from qmlmm.md.system import MDSystem
    from qmlmm.models import QMLMMModel

    model = QMLMMModel.load(model_path)
    if not (out / "run.json").exists():
        ms = MDSettings(steps=steps, dt_fs=0.5, report_every=20, threads=1, temperature=300)
        run_md(system, model.engine(1), out, ms, model.embedding, progress=False)
    run = json.loads((out / "run.json").read_text())
    n_qm = int(MDSystem.load(system).is_qm.sum())
    xyz = read_dcd(out / "traj.dcd")[0][:, :n_qm]
    extent = np.linalg.norm(xyz[:, :, None] - xyz[:, None], axis=-1).max(axis=(1, 2))
    return {
        "steps_done": run.get("steps_done"),
        "stopped": run.get("stopped"),
        "max_extent_nm": float(extent.max()),
        "start_extent_nm": float(extent[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--frames-per-run", type=int, default=20)
    ap.add_argument("--sizes", default="10,20,40,80")
    ap.add_argument("--md-steps", type=int, default=1000)
    ap.add_argument("--work", default="runs/electrostatics")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (the rest untouched)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each training")
    args = ap.parse_args()
    variants = {k: VARIANTS[k] for k in args.variants.split(",")}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    emb = EmbeddingSettings(1.4, 0.2)
    if not (work / "system" / "meta.json").exists():
        build_system([SoluteSpec(smiles="CC(=O)[O-]")], work / "system", BuildSettings(cutoff=emb.cutoff))
    every = 20
    if not (work / "frames.h5").exists():
        s = SampleSettings(
            engine="dftb3:3ob",
            steps=args.frames_per_run * every,
            every=every,
            runs=args.runs,
            equil_steps=2500,
            qm_equil_steps=100,
            cutoff=emb.cutoff,
            switch_width=emb.switch_width,
            threads=1,
        )
        sample(work / "system", work / "frames.h5", s, workers=args.workers)
    t_sample = time.time() - t0
    req = [LevelRequest.from_spec("xtb:gfn2", "xtb"), LevelRequest.from_spec("dftb3:3ob", "dftb3")]
    rep = label_dataset(work / "frames.h5", work / "labels.h5", req, emb, workers=args.workers, threads=1)
    t_label = time.time() - t0 - t_sample
    sizes = [int(x) for x in args.sizes.split(",")]
    curves: dict[str, Any] = {}
    base = None
    for name, over in VARIANTS.items():
        out = work / f"lc_{name}"
        # scaled epochs above 100 frames: as the recorded results ran (learning_curve's default then)
        lc = learning_curve(work / "labels.h5", train_config(**over), sizes, out, scale_epochs=True, progress=False,
                            workers=args.workers)  # fmt: skip
        base = lc.get("baseline_alone")
        for mode, pts in lc["curves"].items():
            for p in pts:
                p["charge_mae"] = charge_mae(out / f"{mode}_{p['n_train']}.pt")
            curves[f"{mode}/{name}"] = pts
    t_train = time.time() - t0 - t_sample - t_label
    md_runs = {}
    for name in variants:
        n = max(p["n_train"] for p in curves[f"direct/{name}"])
        md_runs[name] = stability(
            work / "system", work / f"lc_{name}" / f"direct_{n}.pt", work / f"md_{name}", args.md_steps
        )
    t_md = time.time() - t0 - t_sample - t_label - t_train
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "solute": "acetate (CC(=O)[O-]), charge -1",
        "target": "xtb:gfn2",
        "baseline": "dftb3:3ob",
        "runs": args.runs,
        "frames_per_run": args.frames_per_run,
        "label_failures": {k: len(v) for k, v in rep.failed.items()},
        "curves": curves,
        "baseline_alone": base,
        "md_direct_largest": md_runs,
        "seconds": {"sample": t_sample, "label": t_label, "train": t_train, "md": t_md},
    }
    save_json("electrostatics_ablation", result)
    md = [
        f"# Electrostatic term on a charged solute: ablation ({result['date']})",
        "",
        f"`python benchmarks/electrostatics_ablation.py` on {result['machine']}. Acetate in water, "
        f"{args.runs} independent DFTB3/MM runs x {args.frames_per_run} frames (10 fs apart), labelled with "
        "GFN2-xTB (target) and DFTB3/3ob (delta baseline), 1.4 nm embedding, 0.2 nm switch. Split by whole "
        "runs (test: held-out runs, the same for every model). One 2x32 network per point. "
        "none: short-range HDNNP only; free: + electrostatic term, charges from energies and forces alone; "
        "anchored: + charges fitted to the labels' charges (default).",
        "",
    ]
    q_mae = {"q MAE (e)": lambda p: "-" if p["charge_mae"] is None else f"{p['charge_mae']:.3f}"}
    md += learning_curve_table(curves, base or None, q_mae, "DFTB3 alone (shifted)")
    md += [
        "",
        f"NVT ML/MM with the largest direct model of each variant ({args.md_steps} steps of 0.5 fs, 300 K):",
        "",
        "| variant | steps done | stopped | solute extent start / max (nm) |",
        "|---|---|---|---|",
    ]
    for name, r in md_runs.items():
        md.append(
            f"| {name} | {r['steps_done']} | {r['stopped'] or '-'} | "
            f"{r['start_extent_nm']:.3f} / {r['max_extent_nm']:.3f} |"
        )
    save_markdown("electrostatics_ablation", md)


if __name__ == "__main__":
    main()
