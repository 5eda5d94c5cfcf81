"""ML/MM MD against reference QM/MM MD: the validation step of a pipeline config, written to
benchmarks/results/validation_<name>.{json,md,png}.

Runs (or resumes) ``qmlmm pipeline CONFIG --size SIZE -o RUN`` (every step, the validation runs last;
what is done is reused), then copies the validation result with the number of labels, the models' test
errors beside the baseline's and the machine into the results folder.

    python benchmarks/validation.py examples/alanine_dipeptide/config.yaml --size small \\
        -o runs/alanine_dipeptide_small --name alanine_dipeptide_small
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _results import RESULTS, machine, save_json, save_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--size", default="small")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--name", required=True, help="results are written as validation_NAME.*")
    ap.add_argument("--analyze-only", action="store_true", help="recompute the analysis of a finished folder")
    ap.add_argument(
        "--speed",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead: each driver for STEPS steps from the first start, one after another (run on a quiet "
        "machine), written as validation_NAME_speed.*",
    )
    a = ap.parse_args()
    if a.speed:
        speed(a)
        return

    from qmlmm.analysis.tables import validation_markdown
    from qmlmm.workflows.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(a.config, a.size)
    if cfg.validation is None:
        raise SystemExit(f"{a.config} --size {a.size} has no validation block")
    t0 = time.perf_counter()
    s = run_pipeline(cfg, a.out, progress=False, analyze_only=a.analyze_only)
    v = s["validation"]
    name = f"validation_{a.name}"
    errors = {
        mode: {k: s["evaluation"][mode]["model"][k]["mae"] for k in ("energy", "qm_forces", "mm_forces")}
        for mode in ("direct", "delta")
    }
    base = s["evaluation"]["delta"].get("baseline_alone") or {}
    errors["baseline alone"] = {k: base[k]["mae"] for k in ("energy", "qm_forces", "mm_forces") if k in base}
    res = {
        **v,
        "config": str(a.config),
        "size": a.size,
        "reference": cfg.reference,
        "baseline": cfg.baseline,
        "n_labelled_frames": s["n_frames"],
        "split": s["split"].get("delta"),
        "test_mae": errors,
        "machine": machine(),
        "seconds_this_invocation": time.perf_counter() - t0,
        "timings_all_s": s.get("timings_all_s"),
    }
    save_json(name, res)
    lines = [
        f"# {cfg.name} ({a.size}): ML/MM MD against reference {cfg.reference}/MM MD",
        "",
        f"`python benchmarks/validation.py {a.config} --size {a.size} -o {a.out} --name {a.name}` on "
        f"{res['machine']}. Baseline {cfg.baseline}; models trained on {s['n_frames']} labelled frames "
        "from baseline sampling runs (none from the reference runs below).",
        "",
        "Test-set MAE (E kJ/mol, QM F and MM F kJ/mol/nm), whole sampling runs held out:",
        "",
        "| model | E | QM F | MM F |",
        "|---|---|---|---|",
        *(
            f"| {m} | {e.get('energy', float('nan')):.2f} | {e.get('qm_forces', float('nan')):.1f} | "
            f"{e.get('mm_forces', float('nan')):.2f} |"
            for m, e in errors.items()
        ),
        "",
        validation_markdown(v).rstrip("\n"),
    ]
    save_markdown(name, lines)
    shutil.copyfile(a.out / "validation" / "validation.png", RESULTS / f"{name}.png")


def speed(a: argparse.Namespace) -> None:
    """ns/day of every validation driver on the same start (start 0, the built structure's water relaxed
    around it), STEPS steps each (the integration's wall time, set-up left out), back to back in one
    invocation; the ratio to the reference. Run folders under RUN/validation_speed/ (replaced each time)."""
    from qmlmm.md.runner import StartState, run_md
    from qmlmm.md.system import MDSystem
    from qmlmm.workflows.pipeline import load_pipeline_config
    from qmlmm.workflows.pipeline.validation import (
        ValidationSettings,
        _engine_maker,
        validation_md_settings,
        validation_start,
    )

    cfg = load_pipeline_config(a.config, a.size)
    vs = ValidationSettings.from_dict(cfg.validation or {})
    system, models = a.out / "system", a.out / "models"
    msys = MDSystem.load(system)
    start = StartState(validation_start(cfg, vs, msys, 0), None, "validation start 0")
    rows: dict[str, dict[str, Any]] = {}
    for driver in vs.drivers:
        make, emb = _engine_maker(cfg, models, driver, cfg.total_threads)
        rdir = a.out / "validation_speed" / driver
        shutil.rmtree(rdir, ignore_errors=True)
        # run 0's settings and seed, one report at the end
        s = replace(
            validation_md_settings(cfg, vs, driver, 0),
            steps=a.speed,
            report_every=a.speed,
            dcd_every=a.speed,
            checkpoint_every=100,
        )
        r = run_md(system, make(), rdir, s, emb, progress=False, start=start)
        rows[driver] = {"ns_per_day": r.ns_per_day, "seconds": r.seconds, "steps": r.steps_done, "stopped": r.stopped}
        print(f"{driver:16s} {r.ns_per_day:6.2f} ns/day ({r.seconds / max(r.steps_done, 1) * 1e3:.1f} ms a step)")
    ref = rows.get("reference", {}).get("ns_per_day") or float("nan")
    res = {"machine": machine(), "steps": a.speed, "dt_fs": vs.dt_fs, "hmr_amu": vs.hmr_amu, "drivers": rows}
    save_json(f"validation_{a.name}_speed", res)
    save_markdown(
        f"validation_{a.name}_speed",
        [
            f"# {cfg.name} ({a.size}): speed of each validation driver",
            "",
            f"`python benchmarks/validation.py {a.config} --size {a.size} -o {a.out} --name {a.name} --speed "
            f"{a.speed}` on {res['machine']}: {a.speed} steps of {vs.dt_fs} fs (HMR {vs.hmr_amu} amu) from the "
            "same start, one driver after another on a quiet machine.",
            "",
            "| driver | ns/day | ms a step | x reference |",
            "|---|---|---|---|",
            *(
                f"| {d} | {r['ns_per_day']:.2f} | {r['seconds'] / max(r['steps'], 1) * 1e3:.1f} | "
                f"{r['ns_per_day'] / ref:.2f} |"
                for d, r in rows.items()
            ),
        ],
    )


if __name__ == "__main__":
    main()
