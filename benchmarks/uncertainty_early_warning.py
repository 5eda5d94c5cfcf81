"""Which ensemble spread warns of an ML/MM MD blow-up earliest: the energy spread (what ``qmlmm md
--max-uncertainty`` watches) or the QM-force spread?

For every run of a validation driver (``RUN/validation/<driver>/run<k>``), the model's ensemble is
evaluated on the saved frames (every ``every`` steps). A run that stopped early (NaN, a molecule coming
apart) is a positive; a run that finished is a negative. Per spread measure the threshold is set to the
largest value any finished run reached (no false alarm on these runs); reported per stopped run: the
first frame above it, and how many steps before the stop that is (0: the spread never got there).

Run: `.venv/bin/python benchmarks/uncertainty_early_warning.py runs/ad_small --driver direct`
Writes benchmarks/results/uncertainty_early_warning_<driver>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from _results import machine, save_json, save_markdown


def spreads(run_dir: Path, model: Any, msys: Any) -> dict[str, list[float]]:
    """Per saved frame of the run: the members' energy spread (kJ/mol) and the largest QM-atom force
    spread (kJ/mol/nm, the norm of the per-component standard deviations)."""
    from qmlmm.analysis.md_analysis import load_run

    pos, boxes = load_run(run_dir)
    if boxes is None:
        raise SystemExit(f"{run_dir}/traj.dcd has no unit cell")
    frames = [msys.frame(p, np.diag(b)) for p, b in zip(pos, boxes, strict=True)]
    preds = model.predict_frames(frames, batch_size=4, force_spread=True, use_labels=False)
    qm = np.asarray(msys.is_qm)
    return {
        "energy_std": [p.energy_std for p in preds],
        "qm_force_std_max": [float(np.linalg.norm(p.forces_std[qm], axis=1).max()) for p in preds],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("run", type=Path, help="a pipeline run folder with validation runs")
    ap.add_argument("--driver", default="direct", help="an unguarded model driver: delta or direct")
    a = ap.parse_args()
    from qmlmm.md.system import MDSystem
    from qmlmm.models import QMLMMModel

    msys = MDSystem.load(a.run / "system")
    model = QMLMMModel.load(a.run / "models" / f"{a.driver}.pt")
    runs: dict[str, Any] = {}
    for rdir in sorted((a.run / "validation" / a.driver).glob("run*")):
        rec = json.loads((rdir / "run.json").read_text())
        every = int(rec["settings"]["dcd_every"])
        runs[rdir.name] = {"stopped_at": rec["steps_done"] if rec.get("stopped") else None, "every": every}
        runs[rdir.name].update(spreads(rdir, model, msys))
        print(rdir.name, runs[rdir.name]["stopped_at"], flush=True)
    table: list[dict[str, Any]] = []
    for key in ("energy_std", "qm_force_std_max"):
        whole = [max(r[key]) for r in runs.values() if r["stopped_at"] is None]
        thr = max(whole) if whole else float("nan")
        for name, r in runs.items():
            if r["stopped_at"] is None:
                continue
            above = [i for i, v in enumerate(r[key]) if v > thr]
            step = (above[0] + 1) * r["every"] if above else None  # frame i is step (i + 1) * every
            lead = r["stopped_at"] - step if step is not None else 0
            table.append({"measure": key, "threshold": thr, "run": name, "first_step_above": step, "steps_ahead": lead})
    res = {"machine": machine(), "run": str(a.run), "driver": a.driver, "runs": runs, "warnings": table}
    save_json(f"uncertainty_early_warning_{a.driver}", res)
    lines = [
        f"# Early warning of ML/MM MD blow-ups: {a.driver} model, `{a.run}`",
        "",
        f"Machine: {res['machine']}. Threshold per measure: the largest value any finished run reached "
        "(no false alarm on these runs). Frames every "
        f"{next(iter(runs.values()))['every'] if runs else '?'} steps.",
        "",
        "| measure | threshold | run | stopped at step | first frame above (step) | steps ahead |",
        "|---|---|---|---|---|---|",
        *(
            f"| {t['measure']} | {t['threshold']:.2f} | {t['run']} | {runs[t['run']]['stopped_at']} | "
            f"{t['first_step_above']} | {t['steps_ahead']} |"
            for t in table
        ),
    ]
    save_markdown(f"uncertainty_early_warning_{a.driver}", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
