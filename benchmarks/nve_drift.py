"""Energy conservation of long NVE runs: DFTB3/MM, ML/MM direct and delta, MM alone; time step and HMR.

Acetate in TIP3P water (the electrostatics ablation's system, 4243 atoms, 1.4 nm embedding with a 0.2 nm
switch). Every run starts from the same MM-relaxed water and 300 K velocities (seed 0) and runs
velocity Verlet for ``--ps`` picoseconds at each step setting: 0.5 fs at natural masses (the default),
1 and 2 fs with hydrogen mass repartitioning (solute H at 3.024 amu, ``qmlmm md --hmr``). The MM-only row
is the floor every QM/MM run sits on: the same system with the solute frozen (zero mass, its fixed
build charges), so its drift is that of TIP3P/PME/SETTLE/LJ cutoff alone.

Reported per run: drift (slope of a linear fit of the total energy after the first 0.5 ps, kJ/mol/ps,
and per 1000 atoms), the same slope on each half of the run (halves that agree mean a steady drift, not
one event), std of the total energy over std of the kinetic energy, the mean temperature, ns/day.

Models: by default the electrostatics ablation's 80-frame models (direct: no electrostatic term, the
variant that runs MD; delta: anchored charges), made by `benchmarks/electrostatics_ablation.py`.

Run: `.venv/bin/python benchmarks/nve_drift.py [--ps 10] [--workers 2]`
Writes benchmarks/results/nve_drift.{json,md}; runs (resumable) in --work.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from _results import machine, save_json, save_markdown
from qmlmm.md.hmr import DEFAULT_H_MASS_AMU

SETTINGS = {"0.5fs": (0.5, None), "1fs_hmr": (1.0, DEFAULT_H_MASS_AMU), "2fs_hmr": (2.0, DEFAULT_H_MASS_AMU)}
SKIP_PS = 0.5


def run_one(
    system: str, driver: str, model: str | None, setting: str, ps: float, out: str, dftb: str = "dftb3:3ob"
) -> str:
    """One NVE run (resumable: a finished run is kept); returns its folder. ``dftb``: the dftb3 driver's engine."""
    import torch

    torch.set_num_threads(1)
    dt, hmr = SETTINGS[setting]
    steps = round(ps * 1000 / dt)
    folder = Path(out)
    if (folder / "run.json").exists():
        run = json.loads((folder / "run.json").read_text())
        if run.get("steps_done") == steps or run.get("stopped"):
            return out
    if driver == "mm":
        mm_only_nve(system, dt, steps, folder)
        return out
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.md.runner import MDSettings, run_md

    if model is None:
        from qmlmm.engines import make_engine

        eng, emb = make_engine(dftb, threads=1), EmbeddingSettings(1.4, 0.2)
    else:
        from qmlmm.models import QMLMMModel

        m = QMLMMModel.load(model)
        eng, emb = m.engine(1), m.embedding
    s = MDSettings(
        steps=steps, dt_fs=dt, nve=True, report_every=20, dcd_every=200, threads=1, hmr_amu=hmr, checkpoint_every=2000
    )
    restart = (folder / "checkpoint.chk").exists()
    run_md(system, eng, folder, s, emb, restart=restart, progress=False)
    return out


def mm_only_nve(system: str, dt: float, steps: int, folder: Path) -> None:
    """NVE of the MM system with the solute frozen (zero mass: HMR does not apply) and carrying its fixed
    build charges."""
    import openmm
    import openmm.unit as u

    from qmlmm.md.runner import freeze_qm_and_relax_water, frozen_solute_simulation
    from qmlmm.md.system import MDSystem, openmm_seed

    msys = MDSystem.load(system)
    pos = freeze_qm_and_relax_water(msys, steps=500, threads=1)
    sim = frozen_solute_simulation(msys, openmm.VerletIntegrator(dt * u.femtoseconds), threads=1, nve=True)
    sim.context.setPositions(pos * u.nanometer)
    sim.context.setVelocitiesToTemperature(300 * u.kelvin, openmm_seed(0))
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["step,time_ps,potential_kjmol,kinetic_kjmol,total_kjmol"]
    t0 = time.perf_counter()
    every = 20
    for k in range(steps // every):
        sim.step(every)
        st = sim.context.getState(getEnergy=True)
        pe = st.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        ke = st.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
        n = (k + 1) * every
        rows.append(f"{n},{n * dt / 1000},{pe},{ke},{pe + ke}")
    sec = time.perf_counter() - t0
    (folder / "log.csv").write_text("\n".join(rows) + "\n")
    ns_day = steps * dt * 1e-6 / sec * 86400
    (folder / "run.json").write_text(json.dumps({"steps_done": steps, "ns_per_day": ns_day, "stopped": None}))


def analyse(folder: Path, n_atoms: int, dof: int) -> dict[str, Any]:
    """Drift and fluctuation numbers of one NVE log (``dof``: degrees of freedom of the moving atoms)."""
    run = json.loads((folder / "run.json").read_text())
    d = np.genfromtxt(folder / "log.csv", delimiter=",", names=True)
    t, e, ke = d["time_ps"], d["total_kjmol"], d["kinetic_kjmol"]
    m = t >= SKIP_PS
    if m.sum() < 10:  # stopped before there is anything to fit: reported as such
        ps = float(t[-1]) if len(t) else 0.0
        return {"steps_done": run.get("steps_done"), "stopped": run.get("stopped"), "ps": ps,
                "drift_kjmol_per_ps": None, "ns_per_day": run.get("ns_per_day")}  # fmt: skip
    slope = float(np.polyfit(t[m], e[m], 1)[0])
    tm, em = t[m], e[m]
    h = len(tm) // 2
    halves = [float(np.polyfit(tm[:h], em[:h], 1)[0]), float(np.polyfit(tm[h:], em[h:], 1)[0])]
    return {
        "steps_done": run.get("steps_done"),
        "stopped": run.get("stopped"),
        "ps": float(t[-1]),
        "drift_kjmol_per_ps": slope,
        "drift_per_1000_atoms": slope / n_atoms * 1000,
        "drift_halves": halves,
        "std_total_over_std_kinetic": float(np.std(em) / np.std(ke[m])),
        "mean_kinetic_kjmol": float(np.mean(ke[m])),
        "temperature_K": float(2 * np.mean(ke[m]) / (dof * 0.0083144626)),
        "ns_per_day": run.get("ns_per_day"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="runs/electrostatics/system")
    ap.add_argument("--direct", default="runs/electrostatics/lc_none/direct_80.pt")
    ap.add_argument("--delta", default="runs/electrostatics/lc_anchored/delta_80.pt")
    ap.add_argument("--ps", type=float, default=10.0)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--drivers", default="mm,dftb3,direct,delta")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="runs/nve_drift")
    ap.add_argument("--name", default="nve_drift", help="results file name (benchmarks/results/NAME.{json,md})")
    ap.add_argument("--label", default="acetate in TIP3P water", help="what the system is, for the table")
    ap.add_argument("--dftb", default="dftb3:3ob", help="engine spec of the dftb3 driver (e.g. dftb3:3ob,tol=1e-5)")
    args = ap.parse_args()
    models = {"mm": None, "dftb3": None, "direct": args.direct, "delta": args.delta}
    jobs = [
        (d, s) for s in args.settings.split(",") for d in args.drivers.split(",")
    ]  # cheap settings and drivers interleaved so two workers share the load
    work = Path(args.work)
    t0 = time.time()
    with ProcessPoolExecutor(args.workers) as ex:
        futs = {
            (d, s): ex.submit(run_one, args.system, d, models[d], s, args.ps, str(work / f"{d}_{s}"), args.dftb)
            for d, s in jobs
        }
        errors = {}
        for k, f in futs.items():
            try:
                f.result()
            except Exception as e:  # recorded, the other runs go on
                errors[f"{k[0]}/{k[1]}"] = f"{type(e).__name__}: {e}"
    from qmlmm.md.system import MDSystem

    msys = MDSystem.load(args.system)
    n_atoms = len(msys.numbers)
    n_con = msys.system.getNumConstraints()  # rigid water; NVE removes the centre-of-mass motion remover
    dof = {"mm": 3 * (n_atoms - int(msys.is_qm.sum())) - n_con, "qmmm": 3 * n_atoms - n_con}
    rows = {}
    for d, s in jobs:
        folder = work / f"{d}_{s}"
        if (folder / "run.json").exists() and (folder / "log.csv").exists():
            f = dof["mm" if d == "mm" else "qmmm"]
            rows[f"{d}/{s}"] = {"driver": d, "setting": s, **analyse(folder, n_atoms, f)}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "system": f"{args.label} ({args.system}), {n_atoms} atoms ({int(msys.is_qm.sum())} QM)",
        "models": {"direct": args.direct, "delta": args.delta},
        "ps_per_run": args.ps,
        "skip_ps": SKIP_PS,
        "runs": rows,
        "errors": errors,
        "seconds": time.time() - t0,
    }
    save_json(args.name, result)
    md = [
        f"# NVE energy conservation ({result['date']})",
        "",
        f"`python benchmarks/nve_drift.py --ps {args.ps:g} --system {args.system} --settings {args.settings} "
        f"--drivers {args.drivers} --dftb {args.dftb}` on {result['machine']}. {result['system']}; "
        "velocity Verlet from the same MM-relaxed start and 300 K velocities; drift = slope of the total "
        f"energy after {SKIP_PS} ps. HMR: solute H at 3.024 amu. mm: the solute frozen with its fixed charges "
        "(the MM floor). Target (issue 21): |drift| < 1 kJ/mol/ps per 1000 atoms. "
        f"ns/day: {args.workers} run(s) at a time sharing the cores, not a speed measurement (md_profile.md is).",
        "",
        "| driver | step | ps | drift (kJ/mol/ps) | per 1000 atoms | halves | std(E)/std(KE) | T (K) | ns/day "
        "| stopped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if r["drift_kjmol_per_ps"] is None:
            md.append(
                f"| {r['driver']} | {r['setting']} | {r['ps']:.2f} | - | - | - | - | - | - | {str(r['stopped'])[:90]} |"
            )
            continue
        md.append(
            f"| {r['driver']} | {r['setting']} | {r['ps']:.1f} | {r['drift_kjmol_per_ps']:.2f} | "
            f"{r['drift_per_1000_atoms']:.3f} | {r['drift_halves'][0]:.2f} / {r['drift_halves'][1]:.2f} | "
            f"{r['std_total_over_std_kinetic']:.4f} | {r['temperature_K']:.0f} | {r['ns_per_day']:.2f} | "
            f"{r['stopped'] or '-'} |"
        )
    for name, why in errors.items():
        md.append(f"\nFAILED {name}: {why}")
    save_markdown(args.name, md)


if __name__ == "__main__":
    main()
