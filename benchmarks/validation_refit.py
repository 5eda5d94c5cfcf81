"""One active-learning round from the validation's own MD: do the frames an uncertainty guard queued make
the models fit for MD?

The alanine-dipeptide validation's models came apart in 3 of 8 unguarded runs each (delta and direct;
benchmarks/results/validation_alanine_dipeptide_small.md). Their guarded runs queued the frames above the
guard's threshold to ``uncertain.h5`` (``RUN/validation/<mode>_guarded/run*/`` and, for the holding guard,
``RUN/guard_hold/<mode>_*/run*/``). Here, per mode (direct, delta):

1. the queued frames labelled at the reference and the baseline (``RUN/refit/<mode>/``, one dataset per run,
   resumable), by the pipeline's own refit labelling (``validation: {refit: true}`` does this round for the
   validation's guarded runs alone; this script adds the guard-hold runs' frames too);
2. the mode's ensemble retrained from random weights with the pipeline's settings on the pipeline's labels
   plus these frames, all of them training frames (``qmlmm train --add-train``): the validation and test
   frames are the original model's, so the test errors compare;
3. the validation's runs of the mode, unguarded (same starts, seeds, steps, HMR), with the new model
   (``RUN/refit/validation/<mode>/run<k>``, resumable);
4. stability (runs that stopped) and the observables against the reference's runs, beside the original
   model's numbers.

The queued frames come from ML/MM runs, never from the reference runs they are compared with.

Run: `.venv/bin/python benchmarks/validation_refit.py examples/alanine_dipeptide/config.yaml -o runs/ad_small`;
writes benchmarks/results/validation_refit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from _results import machine, save_json, save_markdown

MODES = ("direct", "delta")
_QUANTITIES = ("energy", "qm_forces", "mm_forces")


def queued_sources(run: Path, mode: str) -> list[Path]:
    """Every ``uncertain.h5`` the mode's guarded runs wrote (validation and guard-hold runs), sorted."""
    found = list((run / "validation" / f"{mode}_guarded").glob("run*/uncertain.h5"))
    found += list((run / "guard_hold").glob(f"{mode}_*/run*/uncertain.h5"))
    return sorted(found)


def labelled(cfg: Any, run: Path, mode: str) -> tuple[list[Path], int]:
    """(the mode's queued frames labelled at ``ref`` and ``base``, one dataset per run, and the number of
    frames queued), by the
    pipeline's refit round's own labelling (``qmlmm.workflows.pipeline.refit.label_queued``)."""
    from qmlmm.workflows.pipeline.refit import label_queued

    q = label_queued(cfg, queued_sources(run, mode), run / "refit" / mode)
    if not q.labels:
        raise SystemExit(f"{run}: the {mode} guarded runs queued no frame")
    return q.labels, q.n_queued


def arm_folder(run: Path, arm: str) -> Path:
    """Where an arm keeps its models and runs: ``RUN/refit`` (refit) or ``RUN/refit/control``."""
    return run / "refit" if arm == "refit" else run / "refit" / "control"


def trained(cfg: Any, run: Path, extra: dict[str, list[Path]] | None) -> dict[str, dict[str, Any]]:
    """Metrics of each mode's model, both trained side by side: with the queued frames ``extra`` (the refit
    arm), or, ``extra`` None, the control: the pipeline's frames and split alone, other random numbers
    (``seed`` + 1, ``split_seed`` kept), which says how much of a change one retraining brings by itself."""
    from qmlmm.training import TrainJob, train_jobs
    from qmlmm.workflows.pipeline.steps import _train_config

    models = arm_folder(run, "refit" if extra else "control") / "models"
    models.mkdir(parents=True, exist_ok=True)
    jobs = [
        TrainJob(
            str(run / "labels.h5"),
            _train_config(cfg, mode) if extra else _control_config(_train_config(cfg, mode)),
            str(models / f"{mode}.pt"),
            {"require": ("base",), **({"add_train": [str(p.resolve()) for p in extra[mode]]} if extra else {})},
        )
        for mode in MODES
    ]
    done = train_jobs(jobs, workers=min(cfg.workers, 2), progress=False)
    return {Path(p).stem: m for p, (m, _) in done.items()}


def _control_config(tc: Any) -> Any:
    """``tc`` with the next ``seed`` (initial weights, batches) and its split kept."""
    return replace(tc, seed=tc.seed + 1, split_seed=tc.split_settings.seed)


def md_runs(cfg: Any, vs: Any, run: Path, arm: str) -> None:
    """The validation's unguarded runs of each mode with the arm's model, by the validation's own driver
    loop (resumed; finished or stopped runs skipped; runs of another model refused), run k of both modes
    before run k + 1."""
    from qmlmm.workflows.pipeline.validation import _run_all

    folder = arm_folder(run, arm)
    _run_all(cfg, vs, folder, run / "system", folder / "models", False, drivers=list(MODES))


def compared(cfg: Any, vs: Any, run: Path, arm: str) -> dict[str, Any]:
    """Per mode: runs stopped, and the comparison with the reference (start-weighted, common starts)."""
    from qmlmm.analysis.validation import compare_drivers, driver_statistics
    from qmlmm.workflows.pipeline.validation import _observables

    ref_vs = replace(vs, drivers=["reference"])
    ref_obs, ref_strata, _ = _observables(cfg, ref_vs, run, run / "system")
    new_vs = replace(vs, drivers=["reference", *MODES])
    obs, strata, stopped = _observables(cfg, new_vs, arm_folder(run, arm), run / "system")
    out: dict[str, Any] = {}
    for mode in MODES:
        r = obs[mode]
        out[mode] = {
            "runs_whole": len(r),
            "runs_stopped": stopped.get(mode, {}),
            "statistics": driver_statistics(r, vs.n_bins) if r else None,
            "against_reference": compare_drivers(
                ref_obs["reference"], r, vs.n_bins, ref_strata["reference"], strata[mode]
            )
            if len(r) >= 2 and len(ref_obs["reference"]) >= 2 and set(strata[mode]) & set(ref_strata["reference"])
            else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--size", default="small")
    ap.add_argument("-o", "--out", type=Path, required=True, help="the pipeline's folder (validation run)")
    ap.add_argument("--no-md", action="store_true", help="label and train only")
    ap.add_argument("--control", action="store_true", help="also the control arm: no added frames, seed + 1")
    a = ap.parse_args()
    from qmlmm.workflows.pipeline import load_pipeline_config
    from qmlmm.workflows.pipeline.validation import ValidationSettings

    cfg = load_pipeline_config(a.config, a.size)
    vs = ValidationSettings.from_dict(cfg.validation or {})
    extra: dict[str, list[Path]] = {}
    n_queued: dict[str, int] = {}
    for mode in MODES:
        extra[mode], n_queued[mode] = labelled(cfg, a.out, mode)
        print(f"{mode}: {n_queued[mode]} queued frames labelled", flush=True)
    arms = ["refit", "control"] if a.control else ["refit"]
    metrics = {arm: trained(cfg, a.out, extra if arm == "refit" else None) for arm in arms}
    before = {m: json.loads((a.out / "models" / f"{m}.metrics.json").read_text()) for m in MODES}
    if a.no_md:
        return
    for arm in arms:
        md_runs(cfg, vs, a.out, arm)
    after = {arm: compared(cfg, vs, a.out, arm) for arm in arms}
    old = json.loads((a.out / "validation" / "validation.json").read_text())
    write(a, cfg, vs, n_queued, before, metrics, after, old)


def _mae(m: dict[str, Any], part: str, key: str) -> float:
    return float(m[part][key]["mae"])


def write(
    a: argparse.Namespace,
    cfg: Any,
    vs: Any,
    n_queued: dict[str, int],
    before: dict[str, Any],
    metrics: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    old: dict[str, Any],
) -> None:
    """benchmarks/results/validation_refit.{json,md}: per mode the pipeline's model, the refit and (when
    run) the control, side by side."""
    from scipy.stats import fisher_exact

    res: dict[str, Any] = {"machine": machine(), "runs": vs.runs, "steps": vs.steps, "queued": n_queued, "models": {}}
    for mode in MODES:
        res["models"][f"{mode} pipeline"] = {
            "n_train": before[mode]["n_train"],
            "test_mae": {k: _mae(before[mode], "test", k) for k in _QUANTITIES},
            "runs_stopped": old.get("runs_stopped", {}).get(mode, {}),
            "against_reference": old.get("against_reference", {}).get(mode) or {},
        }
        for arm in metrics:
            res["models"][f"{mode} {arm}"] = {
                "n_train": metrics[arm][mode]["n_train"],
                "added_train": metrics[arm][mode]["split"].get("added_train", {}),
                "test_mae": {k: _mae(metrics[arm][mode], "test", k) for k in _QUANTITIES},
                "runs_stopped": after[arm][mode]["runs_stopped"],
                "against_reference": after[arm][mode]["against_reference"] or {},
            }
    stops = {
        arm: sum(len(res["models"][f"{m} {arm}"]["runs_stopped"]) for m in MODES) for arm in ["pipeline", *metrics]
    }
    n = vs.runs * len(MODES)

    def fisher(x: int, y: int) -> float:
        return float(fisher_exact([[x, n - x], [y, n - y]])[1])

    res["stopped_pooled"] = {arm: {"stopped": k, "runs": n} for arm, k in stops.items()}
    for arm in metrics:
        res["stopped_pooled"][arm]["fisher_p_vs_pipeline"] = fisher(stops["pipeline"], stops[arm])
    if "control" in stops:
        res["stopped_pooled"]["refit"]["fisher_p_vs_control"] = fisher(stops["control"], stops["refit"])
    save_json("validation_refit", res)
    lines = [
        "# One active-learning round from the validation's own MD (alanine dipeptide, small)",
        "",
        f"Machine: {res['machine']}. `python benchmarks/validation_refit.py {a.config} -o {a.out}"
        f"{' --control' if 'control' in metrics else ''}`.",
        "",
        f"- *pipeline*: the validation's models ({cfg.reference} - {cfg.baseline} delta, and direct).",
        f"- *refit*: retrained from random weights with the pipeline's settings on its frames plus the frames the "
        f"model's guarded runs queued (energy spread above the guard's threshold; {n_queued['direct']} direct, "
        f"{n_queued['delta']} delta), labelled at both levels, all of them training frames; the pipeline's "
        "seed, so the same initial weights as the pipeline's model.",
        "- *control*: retrained on the pipeline's frames and split alone with other random numbers (seed + 1):"
        " what one retraining changes by itself.",
        "",
        f"Then the validation's {vs.runs} unguarded runs of {vs.steps} steps per model (same starts and seeds). "
        "Test frames: the pipeline's (a held-out sampling run), for every model.",
        "",
        "| model | training frames | test energy MAE kJ/mol | QM-force MAE kJ/mol/nm | MM-force MAE kJ/mol/nm "
        "| runs stopped |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res["models"].items():
        maes = " | ".join(f"{r['test_mae'][k]:.2f}" for k in _QUANTITIES)
        lines.append(f"| {name} | {r['n_train']} | {maes} | {len(r['runs_stopped'])} of {vs.runs} |")
    lines += [
        "",
        "Runs stopped, both modes pooled (Fisher's exact test; the two modes' runs taken as independent):",
        "",
    ]
    for arm, d in res["stopped_pooled"].items():
        ps = [f"p = {d[k]:.3f} against the {k.split('_')[-1]}" for k in ("fisher_p_vs_pipeline", "fisher_p_vs_control")
              if k in d]  # fmt: skip
        lines.append(f"- {arm}: {d['stopped']} of {d['runs']}" + (f" ({'; '.join(ps)})" if ps else ""))
    lines += [
        "",
        "Against the reference (start-weighted means, common starts; differences model - reference, p from "
        "exchanging runs within starts):",
        "",
        "| model | runs compared | H-bonds diff (p) | C7eq diff | beta/PII diff | alpha_R diff | populations p "
        "| Ramachandran JS bits (p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["models"].items():
        lines.append(f"| {name} | " + " | ".join(_cmp_cells(r["against_reference"])) + " |")
    lines.append("")
    for name, r in res["models"].items():
        for k, why in r["runs_stopped"].items():
            lines.append(f"- {name}: {k} stopped at {why.splitlines()[0][:160]}")
    save_markdown("validation_refit", lines)
    print("\n".join(lines))


def _cmp_cells(c: dict[str, Any]) -> list[str]:
    """Cells of one comparison row ('-' where the model has no comparison)."""
    if not c:
        return ["-"] * 7

    def diff(*path: str) -> str:
        x: Any = c
        for p in path:
            x = x[p]
        return f"{x:+.2f}"

    return [
        str(c["runs_compared"]["other"]),
        f"{diff('hbonds_total', 'difference')} ({c['hbonds_total']['p']:.3f})",
        diff("populations", "C7eq", "difference"),
        diff("populations", "beta_PII", "difference"),
        diff("populations", "alpha_R", "difference"),
        f"{c['populations_p']:.3f}",
        f"{c['ramachandran_js_bits']:.2f} ({c['ramachandran_p']:.3f})",
    ]


if __name__ == "__main__":
    main()
