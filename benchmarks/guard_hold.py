"""Does a fallback that holds keep a slowly failing model's ML/MM MD whole? The alanine-dipeptide
validation's direct model stopped in 3 of 8 runs unguarded and in 2 of 8 with a per-step guard (15 kJ/mol,
fallback GFN2-xTB/MM); its energy spread passes ~10 kJ/mol 140-310 steps before a blow-up
(benchmarks/results/uncertainty_early_warning_direct.md).

Here the same model, runs and starts as the validation (run k from start k % 4, 1500 steps of 2 fs with
HMR), with ``max_uncertainty`` ``--threshold`` and ``fallback_hold`` ``--hold`` (after a step above the
threshold, that many more from the reference whatever their spread). Reported per run: steps done, why
it stopped, fallback force calls. The folders (``RUN/guard_hold/t<threshold>_h<hold>/run<k>``) resume.

Run: `.venv/bin/python benchmarks/guard_hold.py examples/alanine_dipeptide/config.yaml -o runs/ad_small
--driver direct --threshold 10 --hold 50`; writes benchmarks/results/guard_hold_<driver>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from _results import machine, save_json, save_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--size", default="small")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--driver", default="direct", choices=["delta", "direct"])
    ap.add_argument("--threshold", type=float, default=10.0, help="max_uncertainty, kJ/mol")
    ap.add_argument("--hold", type=int, default=50, help="fallback_hold, steps")
    ap.add_argument("--runs", type=int, default=None, help="default: the validation's")
    a = ap.parse_args()
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
    system = a.out / "system"
    msys = MDSystem.load(system)
    make, emb = _engine_maker(cfg, a.out / "models", a.driver, cfg.total_threads)
    folder = a.out / "guard_hold" / f"{a.driver}_t{a.threshold:g}_h{a.hold}"
    rows: dict[str, dict[str, Any]] = {}
    for k in range(a.runs or vs.runs):
        rdir = folder / f"run{k}"
        done = json.loads((rdir / "run.json").read_text()) if (rdir / "run.json").exists() else None
        if done is None or not (done["steps_done"] >= vs.steps or done.get("stopped")):
            s = replace(
                validation_md_settings(cfg, vs, a.driver, k),  # the validation run's steps and seed
                max_uncertainty=a.threshold,
                fallback="reference",
                reference=cfg.reference,
                fallback_hold=a.hold,
            )
            start = StartState(validation_start(cfg, vs, msys, vs.start_of(k)), None, f"validation start {k}")
            restart = (rdir / "checkpoint.chk").exists()
            run_md(system, make(), rdir, s, emb, restart=restart, progress=False, start=start)
            done = json.loads((rdir / "run.json").read_text())
        rows[f"run{k}"] = {
            "steps_done": done["steps_done"],
            "stopped": done.get("stopped"),
            "fallback_calls": done.get("fallback_steps_total", done.get("fallback_steps")),
        }
        print(k, rows[f"run{k}"], flush=True)
    name = f"guard_hold_{a.driver}"
    n_stop = sum(1 for r in rows.values() if r["stopped"])
    res = {"machine": machine(), "threshold": a.threshold, "hold": a.hold, "steps": vs.steps, "runs": rows}
    save_json(name, res)
    save_markdown(
        name,
        [
            f"# {a.driver} model with a holding guard: threshold {a.threshold:g} kJ/mol, hold {a.hold} steps",
            "",
            f"Machine: {res['machine']}. {len(rows)} runs of {vs.steps} steps (2 fs, HMR), the validation's starts "
            f"and seeds, fallback {cfg.reference}/MM. **{n_stop} of {len(rows)} stopped.**",
            "",
            "| run | steps done | fallback force calls | stopped |",
            "|---|---|---|---|",
            *(f"| {k} | {r['steps_done']} | {r['fallback_calls']} | {r['stopped'] or ''} |" for k, r in rows.items()),
        ],
    )


if __name__ == "__main__":
    main()
