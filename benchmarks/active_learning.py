"""Labels needed to reach a held-out error, active learning against random selection (``qmlmm active``).

System: methanol in TIP3P water (box built for the embedding cutoff). Reference: GFN2-xTB/MM (a cheap
stand-in for DFT: the label cost does not matter here, the number of labels does); delta baseline
DFTB3/3ob. Both arms start from the same first labels, are measured on the same held-out set (separate
sampler runs) and get the same budget; the active arm samples candidates by ML/MM MD with its ensemble
and labels the most uncertain, the random arm labels DFTB3/MM frames at random.

Reported: the held-out MAE curves of both arms, and for each quantity the labels each arm needed to reach
the random arm's final error (the first round at or below it) and their ratio. One seed per run of this
script: the curves are noisy at these sizes, so repeat with ``--seed`` for run-to-run scatter.

Run: ``.venv/bin/python benchmarks/active_learning.py [--budget 30] [--per-round 5] [--seed 0]``.
Writes benchmarks/results/active_learning_seed<N>.{json,md,png} (the png: active.png of the run) and
its calibration plot.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from _results import RESULTS, machine, save_json, save_markdown
from qmlmm.md.build import BuildSettings, SoluteSpec, build_system
from qmlmm.workflows.active import ActiveSettings, run_active

QUANTITIES = (
    ("energy_mae", "E", "kJ/mol"),
    ("qm_forces_mae", "QM F", "kJ/mol/nm"),
    ("mm_forces_mae", "MM F", "kJ/mol/nm"),
)


def labels_to_reach(points: list[dict[str, Any]], key: str, target: float) -> int | None:
    """Labels of the first round whose held-out ``key`` is at or below ``target`` (None: never)."""
    for p in points:
        if p[key] <= target:
            return int(p["n_labels"])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/active_learning")
    ap.add_argument("--budget", type=int, default=30)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cutoff", type=float, default=1.0)
    args = ap.parse_args()
    work = Path(args.work) / f"seed{args.seed}"
    t0 = time.time()
    system = work / "system"
    if not (system / "meta.json").exists():
        build_system(
            [SoluteSpec(smiles="CO")], system, BuildSettings(cutoff=args.cutoff, equilibrate_ps=5.0, threads=1)
        )
    s = ActiveSettings(
        target="xtb:gfn2",
        baseline="dftb3:3ob",
        budget=args.budget,
        per_round=args.per_round,
        replicas=2,
        temperatures=[300.0, 360.0],
        steps=400,
        every=10,
        equil_steps=1000,
        heldout_runs=2,
        cutoff=args.cutoff,
        workers=0,
        seed=args.seed,
        train={"ensemble": 3, "hidden": [32, 32], "epochs": 150, "patience": 40},
    )
    rec = run_active(system, work / "run", s, progress=False)
    arms = rec["arms"]
    reach: dict[str, Any] = {}
    for key, _, _ in QUANTITIES:
        target = arms["random"][-1][key]
        a, r = labels_to_reach(arms["active"], key, target), labels_to_reach(arms["random"], key, target)
        reach[key] = {"target": target, "active": a, "random": r, "ratio": (a / r) if a and r else None}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "seed": args.seed,
        "settings": rec["settings"],
        "arms": arms,
        "baseline_alone": rec.get("baseline_alone"),
        "heldout_frames": rec["heldout_frames"],
        "labels_to_reach_random_final": reach,
        "seconds": time.time() - t0,
    }
    name = f"active_learning_seed{args.seed}"
    save_json(name, result)
    shutil.copy(work / "run" / "active.png", RESULTS / f"{name}.png")
    if (work / "run" / "active_calibration.png").exists():
        shutil.copy(work / "run" / "active_calibration.png", RESULTS / f"{name}_calibration.png")
    md = [
        f"# Active learning vs random selection ({result['date']})",
        "",
        f"`python benchmarks/active_learning.py --seed {args.seed}` on {result['machine']}. Methanol in TIP3P "
        f"water, {args.cutoff} nm embedding; reference GFN2-xTB/MM, baseline DFTB3/3ob (delta model, ensemble "
        f"of 3, 2x32); {args.per_round} labels a round up to {args.budget}; held-out set: "
        f"{rec['heldout_frames']} frames from 2 separate DFTB3/MM runs. One seed: the curves scatter "
        "from seed to seed at these sizes.",
        "",
        "| arm | labels | E MAE (kJ/mol) | QM F MAE (kJ/mol/nm) | MM F MAE (kJ/mol/nm) | spread-error rho (E, QM F) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, pts in arms.items():
        for p in pts:
            rho = p.get("spread_error_spearman", {})
            md.append(
                f"| {arm} | {p['n_labels']} | {p['energy_mae']:.3f} | {p['qm_forces_mae']:.2f} | "
                f"{p['mm_forces_mae']:.3f} | {rho.get('energy', float('nan')):.2f}, "
                f"{rho.get('qm_forces', float('nan')):.2f} |"
            )
    b = rec.get("baseline_alone")
    if b:
        md.append(
            f"| DFTB3 alone (shifted) | - | {b['energy']:.3f} | {b['qm_forces']:.2f} | {b['mm_forces']:.3f} | - |"
        )
    md += ["", "Labels needed to reach the random arm's final held-out error:", ""]
    md += ["| quantity | target | active | random | active / random |", "|---|---|---|---|---|"]
    for key, label, unit in QUANTITIES:
        r = reach[key]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        md.append(f"| {label} | {r['target']:.3f} {unit} | {r['active'] or 'not reached'} | {r['random']} | {ratio} |")
    md += ["", f"Wall time {result['seconds'] / 60:.0f} min.", "", f"![curves]({name}.png)"]
    save_markdown(name, md)


if __name__ == "__main__":
    main()
