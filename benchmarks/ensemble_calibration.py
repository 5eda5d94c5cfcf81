"""Does bagging (each member trained on its own bootstrap resample of the frames) make the ensemble's spread
rank the held-out errors better than members that differ only in their initial weights?

The active-learning benchmark found the spread of ensembles that differ only in their initial weights
unrelated to the true error on held-out frames (Spearman rho ~0, docs/results.md section 0a), so selecting
the most uncertain frames gained little over random picks. This script measures the spread-error rank
correlation, and the accuracy, of the two kinds of ensemble on the same frames.

System: methanol in TIP3P water, 8 independent DFTB3/MM runs of 20 frames 10 fs apart
(``_solvated.labelled_solute``), labelled with GFN2-xTB/MM (target) and DFTB3/MM (baseline); delta models
(ensemble of 4, 2x32, as in the active-learning benchmark, 150 epochs). Split by whole runs: 4 runs train,
1 validation, 3 (60 frames) held out. For each repeat r (split seed and seed r: other runs held out, other
training frames, other initial weights) and each training-set size N (frames drawn from the training runs,
the same for both kinds), one ensemble of each kind.

Per held-out frame: the energy spread (member std) against |energy error| and against |energy error - the
mean error over the held-out frames| (a delta model's constant offset says nothing about a frame), the largest
QM-atom force spread against the largest QM-atom force error, and the RMS over QM atoms of both. Spearman's rho
per model, mean and standard error over the repeats.

Run: ``.venv/bin/python benchmarks/ensemble_calibration.py [--repeats 4] [--sizes 10 20 40]``
Writes benchmarks/results/ensemble_calibration.{json,md}; models and data under ``--work``
(runs/bench/ensemble_calibration), reused by a second call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

# isort: off
import qmlmm  # noqa: F401  first: its OpenMP settings must be in the environment when torch loads

# isort: on
import numpy as np

from _results import machine, save_json, save_markdown
from _solvated import SolventSampling, labelled_solute

KINDS = ("init", "bootstrap")
SAMPLING = SolventSampling(runs=8, frames_per_run=20)
TRAIN = {
    "target": "xtb",
    "baseline": "dftb3",
    "ensemble": 4,
    "hidden": [32, 32],
    "epochs": 150,
    "patience": 40,
    "split": "runs",
    "valid_fraction": 0.125,
    "test_fraction": 0.375,
    "threads": 1,
}
RHOS = ("energy", "energy_centred", "qm_force_max", "qm_force_rms")


def config(kind: str, n: int, r: int) -> Any:
    from qmlmm.training import TrainConfig

    return TrainConfig(**{**TRAIN, "bootstrap": kind == "bootstrap", "max_train_frames": n, "seed": r})  # type: ignore[arg-type]


def held_out(labels: Path, model_path: Path) -> dict[str, Any]:
    """The model's held-out MAEs and its spread-error rank correlations on its own test runs."""
    from qmlmm.data import Dataset
    from qmlmm.data.training_set import SplitSettings, load_training_data
    from qmlmm.models import QMLMMModel

    model = QMLMMModel.load(model_path)
    tr = model.meta.training
    data = load_training_data(labels, "xtb", "dftb3", SplitSettings.of_training(tr))
    with Dataset(labels) as ds:
        assert len(data.items) == len(ds), "every frame is labelled: item k is frame k"
        frames = [ds.frame(int(i)) for i in data.test]
    return scores(model, frames)


def scores(model: Any, frames: list[Any]) -> dict[str, Any]:
    """MAEs and spread-error rank correlations of ``model`` on labelled ``frames``."""
    from scipy.stats import spearmanr

    preds = model.predict_frames(frames, force_spread=True)
    e_err = np.array([p.energy - fr.labels["xtb"].energy for p, fr in zip(preds, frames, strict=True)])
    e_spread = np.array([p.energy_std for p in preds])
    f_max, f_rms, s_max, s_rms, qm_mae, mm_mae = [], [], [], [], [], []
    for p, fr in zip(preds, frames, strict=True):
        ref = fr.labels["xtb"].forces
        err = np.linalg.norm(p.forces - ref, axis=1)
        assert p.forces_std is not None
        spr = np.linalg.norm(p.forces_std[fr.is_qm], axis=1)
        f_max.append(err[fr.is_qm].max())
        f_rms.append(np.sqrt(np.mean(err[fr.is_qm] ** 2)))
        s_max.append(spr.max())
        s_rms.append(np.sqrt(np.mean(spr**2)))
        qm_mae.append(np.abs(p.forces - ref)[fr.is_qm].mean())
        mm = ~fr.is_qm & (np.abs(ref).sum(axis=1) > 0)  # MM atoms in the embedding (forces outside are zero)
        mm_mae.append(np.abs(p.forces - ref)[mm].mean())
    pairs = {
        "energy": (e_spread, np.abs(e_err)),
        "energy_centred": (e_spread, np.abs(e_err - e_err.mean())),
        "qm_force_max": (np.array(s_max), np.array(f_max)),
        "qm_force_rms": (np.array(s_rms), np.array(f_rms)),
    }
    return {
        "n_test": len(frames),
        "energy_mae": float(np.abs(e_err).mean()),
        "energy_mae_centred": float(np.abs(e_err - e_err.mean()).mean()),
        "qm_forces_mae": float(np.mean(qm_mae)),
        "mm_forces_mae": float(np.mean(mm_mae)),
        "mean_energy_spread": float(e_spread.mean()),
        "mean_qm_force_spread_rms": float(np.mean(s_rms)),
        "rho": {k: float(spearmanr(a, b).statistic) for k, (a, b) in pairs.items()},
    }


def candidates(work: Path, system: Path, model_path: Path, seed: int) -> Path:
    """Candidate frames as ``qmlmm active`` samples them: ML/MM MD with the model itself (2 runs, at 300 and
    360 K, 400 steps of 0.5 fs, a frame every 20), labelled at both levels; reused when present."""
    from _solvated import EMB
    from qmlmm.workflows.label import LevelRequest, label_dataset
    from qmlmm.workflows.sample import SampleSettings, sample

    folder = work / "candidates" / model_path.stem
    folder.mkdir(parents=True, exist_ok=True)
    frames, labels = folder / "frames.h5", folder / "labels.h5"
    if not frames.exists():
        ss = SampleSettings(engine=f"model:{model_path}", steps=400, every=20, runs=2, equil_steps=1000,
                            cutoff=EMB.cutoff, switch_width=EMB.switch_width, seed=1000 + seed, threads=1,
                            temperatures=[300.0, 360.0], keep_partial=True)  # fmt: skip
        sample(system, frames, ss, workers=2, progress=False)
    req = [LevelRequest.from_spec("xtb:gfn2", "xtb"), LevelRequest.from_spec("dftb3:3ob", "dftb3")]
    label_dataset(frames, labels, req, EMB, workers=2, threads=1, progress=False)
    return labels


def on_candidates(labels: Path, model_path: Path) -> dict[str, Any]:
    """The model's errors and spread-error rank correlations on its own ML/MM MD candidates."""
    from qmlmm.data import Dataset
    from qmlmm.models import QMLMMModel

    model = QMLMMModel.load(model_path)
    with Dataset(labels) as ds:
        ok = ds.labelled_at(["xtb", "dftb3"])
        frames = [ds.frame(int(i)) for i in np.flatnonzero(ok)]
    return scores(model, frames)


def mean_se(values: list[float]) -> tuple[float, float]:
    v = np.array(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench/ensemble_calibration"))
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--candidates", action="store_true", help="also on each model's own ML/MM MD candidates")
    args = ap.parse_args()

    from qmlmm.training import TrainJob, train_jobs

    t0 = time.time()
    stages = labelled_solute(args.work, "CO", SAMPLING, workers=args.workers)
    labels = args.work / "labels.h5"
    jobs = {
        (kind, n, r): TrainJob(str(labels), config(kind, n, r), str(args.work / "models" / f"{kind}_n{n}_r{r}.pt"))
        for r in range(args.repeats)
        for n in args.sizes
        for kind in KINDS
    }
    t1 = time.time()
    done = train_jobs(list(jobs.values()), workers=args.workers, progress=False)
    train_s = time.time() - t1
    per_model = {f"{k}_n{n}_r{r}": held_out(labels, Path(j.out)) for (k, n, r), j in jobs.items()}
    for (k, n, r), j in jobs.items():
        per_model[f"{k}_n{n}_r{r}"]["train_seconds"] = done[j.out][1]
    t2 = time.time()
    if args.candidates:
        for (k, n, r), j in jobs.items():
            cand = candidates(args.work, args.work / "system", Path(j.out), r)
            per_model[f"{k}_n{n}_r{r}"]["candidates"] = on_candidates(cand, Path(j.out))
    cand_s = time.time() - t2
    table = []
    for n in args.sizes:
        for kind in KINDS:
            ms = [per_model[f"{kind}_n{n}_r{r}"] for r in range(args.repeats)]
            row: dict[str, Any] = {"n_train": n, "kind": kind}
            for key in ("energy_mae", "energy_mae_centred", "qm_forces_mae", "mm_forces_mae", "mean_energy_spread",
                        "mean_qm_force_spread_rms", "train_seconds"):  # fmt: skip
                row[key] = mean_se([m[key] for m in ms])
            for key in RHOS:
                row[f"rho_{key}"] = mean_se([m["rho"][key] for m in ms])
            table.append(row)
        # paired over the repeats (same held-out runs and training frames): bootstrap minus init
        diff: dict[str, Any] = {"n_train": n, "kind": "bootstrap - init (paired)"}
        pm = [(per_model[f"bootstrap_n{n}_r{r}"], per_model[f"init_n{n}_r{r}"]) for r in range(args.repeats)]
        for key in ("energy_mae", "energy_mae_centred", "qm_forces_mae", "mm_forces_mae", "mean_energy_spread",
                    "mean_qm_force_spread_rms", "train_seconds"):  # fmt: skip
            diff[key] = mean_se([b[key] - a[key] for b, a in pm])
        for key in RHOS:
            diff[f"rho_{key}"] = mean_se([b["rho"][key] - a["rho"][key] for b, a in pm])
        table.append(diff)
    cand_table = []
    if args.candidates:
        for n in args.sizes:
            for kind in KINDS:
                ms = [per_model[f"{kind}_n{n}_r{r}"] for r in range(args.repeats)]
                crow: dict[str, Any] = {"n_train": n, "kind": kind}
                for key in ("n_test", "energy_mae_centred", "qm_forces_mae", "mm_forces_mae", "mean_energy_spread",
                            "mean_qm_force_spread_rms"):  # fmt: skip
                    crow[key] = mean_se([m["candidates"][key] for m in ms])
                    crow[f"heldout_{key}"] = mean_se([m[key] for m in ms])
                for key in RHOS:
                    crow[f"rho_{key}"] = mean_se([m["candidates"]["rho"][key] for m in ms])
                cand_table.append(crow)
    result = {
        "machine": machine(),
        "repeats": args.repeats,
        "sizes": args.sizes,
        "sampling": SAMPLING.__dict__,
        "train": TRAIN,
        "stage_seconds": {**stages, "train": train_s, "candidates": cand_s, "total": time.time() - t0},
        "table": table,
        "candidates_table": cand_table,
        "per_model": per_model,
    }
    save_json("ensemble_calibration", result)
    save_markdown("ensemble_calibration", markdown(result))


def markdown(res: dict[str, Any]) -> list[str]:
    def f(v: tuple[float, float], p: int = 2) -> str:
        return f"{v[0]:.{p}f} ± {v[1]:.{p}f}"

    lines = [
        "# Ensemble calibration: bagging against initial weights alone (methanol in water, GFN2-xTB - DFTB3 delta)",
        "",
        f"{res['machine']}; {res['repeats']} repeats (other held-out runs, training frames, weights); mean ± "
        "standard error over the repeats. Held-out: 3 whole DFTB3/MM runs, 60 frames. rho: Spearman's rank "
        "correlation of spread and error over the held-out frames (E: |error|, E c: |error - mean error|; "
        "F max: largest QM-atom force; F rms: RMS over the QM atoms).",
        "",
        "| N | ensemble | E MAE | E MAE c | QM F MAE | MM F MAE | rho E | rho E c | rho F max | rho F rms | s/model |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["table"]:
        lines.append(
            f"| {row['n_train']} | {row['kind']} | {f(row['energy_mae'])} | {f(row['energy_mae_centred'])} | "
            f"{f(row['qm_forces_mae'], 1)} | {f(row['mm_forces_mae'])} | {f(row['rho_energy'])} | "
            f"{f(row['rho_energy_centred'])} | {f(row['rho_qm_force_max'])} | {f(row['rho_qm_force_rms'])} | "
            f"{row['train_seconds'][0]:.0f} |"
        )
    if res.get("candidates_table"):
        lines += [
            "",
            "## On each model's own ML/MM MD candidates (2 runs at 300 and 360 K, a frame every 10 fs)",
            "",
            "Held-out values beside (frames of the DFTB3/MM sampler). Candidates: the frames `qmlmm active` picks "
            "from.",
            "",
            "| N | ensemble | frames | E MAE c: cand / held-out | QM F MAE: cand / held-out | E spread: cand / "
            "held-out | rho E c | rho F max | rho F rms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in res["candidates_table"]:
            lines.append(
                f"| {c['n_train']} | {c['kind']} | {c['n_test'][0]:.0f} | {f(c['energy_mae_centred'])} / "
                f"{f(c['heldout_energy_mae_centred'])} | {f(c['qm_forces_mae'], 1)} / "
                f"{f(c['heldout_qm_forces_mae'], 1)} | "
                f"{f(c['mean_energy_spread'])} / {f(c['heldout_mean_energy_spread'])} | {f(c['rho_energy_centred'])} | "
                f"{f(c['rho_qm_force_max'])} | {f(c['rho_qm_force_rms'])} |"
            )
    st = res["stage_seconds"]
    lines += ["", f"Stages of this call (s; what an earlier call made is reused): build {st['build']:.0f}, "
              f"sample {st['sample']:.0f}, label {st['label']:.0f}, train {st['train']:.0f}, total {st['total']:.0f}; "
              "s/model: training time of the first call."]  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
