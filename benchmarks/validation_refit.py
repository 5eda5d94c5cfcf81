"""One active-learning round from the validation's own MD: do the frames an uncertainty guard queued make
the models fit for MD?

The alanine-dipeptide validation's models came apart in 3 of 8 unguarded runs each (delta and direct;
benchmarks/results/validation_alanine_dipeptide_small.md). Their guarded runs queued the frames above the
guard's threshold to ``uncertain.h5`` (``RUN/validation/<mode>_guarded/run*/`` and, for the holding guard,
``RUN/guard_hold/<mode>_*/run*/``). Here, per mode (direct, delta):

1. the queued frames merged (``RUN/refit/<mode>/queued.h5``) and labelled at the reference and the baseline
   (``labels.h5``, resumable);
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


def labelled(cfg: Any, run: Path, mode: str) -> tuple[Path, int]:
    """(the mode's queued frames labelled at ``ref`` and ``base``, the number of frames queued)."""
    from qmlmm.data import Dataset, merge_datasets
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.label import LevelRequest, label_dataset

    folder = run / "refit" / mode
    folder.mkdir(parents=True, exist_ok=True)
    queued = merge_datasets([(p, None) for p in queued_sources(run, mode)], folder / "queued.h5")
    out = folder / "labels.h5"
    label_dataset(
        queued,
        out,
        [LevelRequest.from_spec(cfg.reference, "ref"), LevelRequest.from_spec(cfg.baseline, "base")],
        EmbeddingSettings(cfg.cutoff, cfg.switch_width),
        workers=0,
        threads=cfg.total_threads,
        progress=False,
    )
    with Dataset(queued) as ds:
        return out, len(ds)


def trained(cfg: Any, run: Path, extra: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Metrics of each mode's refit model (``RUN/refit/models/<mode>.pt``), both trained side by side."""
    from qmlmm.training import TrainJob, train_jobs
    from qmlmm.workflows.pipeline.steps import _train_config

    models = run / "refit" / "models"
    models.mkdir(parents=True, exist_ok=True)
    jobs = [
        TrainJob(
            str(run / "labels.h5"),
            _train_config(cfg, mode),
            str(models / f"{mode}.pt"),
            {"require": ("base",), "add_train": [str(extra[mode])]},
        )
        for mode in MODES
    ]
    done = train_jobs(jobs, workers=min(cfg.workers, 2), progress=False)
    return {Path(p).stem: m for p, (m, _) in done.items()}


def md_runs(cfg: Any, vs: Any, run: Path) -> None:
    """The validation's unguarded runs of each mode with its refit model (resumed; finished or stopped
    runs skipped), run k of both modes before run k + 1."""
    from qmlmm.md.runner import StartState, run_md
    from qmlmm.md.system import MDSystem
    from qmlmm.workflows.pipeline.validation import _engine_maker, validation_md_settings, validation_start

    msys = MDSystem.load(run / "system")
    makers = {m: _engine_maker(cfg, run / "refit" / "models", m, cfg.total_threads) for m in MODES}
    for k in range(vs.runs):
        for mode in MODES:
            rdir = run / "refit" / "validation" / mode / f"run{k}"
            if (rdir / "run.json").exists():
                rec = json.loads((rdir / "run.json").read_text())
                if rec["steps_done"] >= vs.steps or rec.get("stopped"):
                    continue
            make, emb = makers[mode]
            start = StartState(validation_start(cfg, vs, msys, vs.start_of(k)), None, f"validation start {k}")
            restart = (rdir / "checkpoint.chk").exists()
            run_md(run / "system", make(), rdir, validation_md_settings(cfg, vs, mode, k), emb, restart=restart,
                   progress=False, start=start)  # fmt: skip
            print(f"{mode} run {k}: {json.loads((rdir / 'run.json').read_text()).get('stopped') or 'whole'}",
                  flush=True)  # fmt: skip


def compared(cfg: Any, vs: Any, run: Path) -> dict[str, Any]:
    """Per mode: runs stopped, and the comparison with the reference (start-weighted, common starts)."""
    from qmlmm.analysis.validation import compare_drivers, driver_statistics
    from qmlmm.workflows.pipeline.validation import _observables

    ref_vs = replace(vs, drivers=["reference"])
    ref_obs, ref_strata, _ = _observables(cfg, ref_vs, run, run / "system")
    new_vs = replace(vs, drivers=["reference", *MODES])
    obs, strata, stopped = _observables(cfg, new_vs, run / "refit", run / "system")
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
            if len(r) >= 2 and set(strata[mode]) & set(ref_strata["reference"])
            else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--size", default="small")
    ap.add_argument("-o", "--out", type=Path, required=True, help="the pipeline's folder (validation run)")
    ap.add_argument("--no-md", action="store_true", help="label and train only")
    a = ap.parse_args()
    from qmlmm.workflows.pipeline import load_pipeline_config
    from qmlmm.workflows.pipeline.validation import ValidationSettings

    cfg = load_pipeline_config(a.config, a.size)
    vs = ValidationSettings.from_dict(cfg.validation or {})
    extra, n_queued = {}, {}
    for mode in MODES:
        extra[mode], n_queued[mode] = labelled(cfg, a.out, mode)
        print(f"{mode}: {n_queued[mode]} queued frames labelled", flush=True)
    metrics = trained(cfg, a.out, extra)
    before = {m: json.loads((a.out / "models" / f"{m}.metrics.json").read_text()) for m in MODES}
    if a.no_md:
        return
    md_runs(cfg, vs, a.out)
    after = compared(cfg, vs, a.out)
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
    metrics: dict[str, Any],
    after: dict[str, Any],
    old: dict[str, Any],
) -> None:
    """benchmarks/results/validation_refit.{json,md}."""
    rows, res = [], {"machine": machine(), "runs": vs.runs, "steps": vs.steps, "modes": {}}
    for mode in MODES:
        n_add = metrics[mode]["split"].get("added_train", {})
        old_stop = old.get("runs_stopped", {}).get(mode, {})
        cmp_old = old.get("against_reference", {}).get(mode) or {}
        cmp_new = after[mode]["against_reference"] or {}
        res["modes"][mode] = {
            "queued_frames": n_queued[mode],
            "added_train": n_add,
            "n_train": [before[mode]["n_train"], metrics[mode]["n_train"]],
            "test_mae_before": {k: _mae(before[mode], "test", k) for k in _QUANTITIES},
            "test_mae_after": {k: _mae(metrics[mode], "test", k) for k in _QUANTITIES},
            "runs_stopped_before": old_stop,
            "runs_stopped_after": after[mode]["runs_stopped"],
            "against_reference_before": cmp_old,
            "against_reference_after": cmp_new,
        }
        r = res["modes"][mode]
        rows.append(
            f"| {mode} | {r['n_train'][0]} -> {r['n_train'][1]} | "
            + " | ".join(f"{r['test_mae_before'][k]:.2f} -> {r['test_mae_after'][k]:.2f}" for k in _QUANTITIES)
            + f" | {len(old_stop)} -> {len(r['runs_stopped_after'])} of {vs.runs} |"
        )
    save_json("validation_refit", res)
    lines = [
        "# One active-learning round from the validation's own MD (alanine dipeptide, small)",
        "",
        f"Machine: {res['machine']}. `python benchmarks/validation_refit.py {a.config} -o {a.out}`. The frames "
        "each model's guarded runs queued (ensemble energy spread above the guard's threshold), labelled at "
        f"{cfg.reference}/MM and {cfg.baseline}/MM, added to its training frames; retrained from random weights "
        f"with the pipeline's settings; then the validation's {vs.runs} unguarded runs of {vs.steps} steps "
        "(same starts and seeds). Test frames: the original model's (a held-out sampling run).",
        "",
        "| model | training frames | test energy MAE kJ/mol | QM-force MAE kJ/mol/nm | MM-force MAE kJ/mol/nm "
        "| runs stopped |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Against the reference (start-weighted, common starts; before -> after):",
        "",
        "| model | H-bonds diff | C7eq diff | beta/PII diff | alpha_R diff | Ramachandran JS bits | populations p |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = res["modes"][mode]
        cells = _cmp_cells(r["against_reference_before"], r["against_reference_after"])
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    for mode in MODES:
        for when in ("before", "after"):
            for k, why in res["modes"][mode][f"runs_stopped_{when}"].items():
                lines.append(f"- {mode} {when}: {k} stopped at {why}")
    save_markdown("validation_refit", lines)
    print("\n".join(lines))


def _cmp_cells(b: dict[str, Any], a: dict[str, Any]) -> list[str]:
    """Cells of one comparison row, before -> after ('-' where a side has no comparison)."""

    def val(c: dict[str, Any], path: tuple[str, ...]) -> str:
        x: Any = c
        for p in path:
            if not isinstance(x, dict) or p not in x:
                return "-"
            x = x[p]
        return f"{x:+.2f}" if isinstance(x, float) else str(x)

    return [f"{val(b, p)} -> {val(a, p)}" for p in _CMP_PATHS]


#: where compare_drivers keeps each number of a row
_CMP_PATHS: list[tuple[str, ...]] = [
    ("hbonds_total", "difference"),
    ("populations", "C7eq", "difference"),
    ("populations", "beta_PII", "difference"),
    ("populations", "alpha_R", "difference"),
    ("ramachandran_js_bits",),
    ("populations_p",),
]


if __name__ == "__main__":
    main()
