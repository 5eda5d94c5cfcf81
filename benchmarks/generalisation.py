"""Why do networks stop generalising after a few epochs on a charged solute? Measured, one factor at a time.

Issue 17 part 2. beta-Alanine zwitterion (+NH3-CH2-CH2-COO-) in TIP3P water, 1.4 nm embedding with a
0.2 nm switch, sampled in independent DFTB3/MM runs; every frame labelled with GFN2-xTB (the target: a
cheap stand-in for DFT that polarises in the MM field; its switching forces are exact) and DFTB3/3ob (the
delta baseline). Split by whole runs: test and validation runs are never seen in training.

Each variant changes one setting of a reference configuration and trains one network (two seeds where
asked) on the same training frames; recorded per variant: best validation epoch and how many epochs ran,
train / validation / test MAE of energy, QM forces and MM forces, and the test MAE's ratio to the
reference. The factors are the issue's list: network size against frames, weight decay, learning rate and
its schedule, force-loss weighting, the MM part of the descriptor and the electrostatic term.

Every step is resumable (reuses what a previous run left in --work).

Run: `.venv/bin/python benchmarks/generalisation.py [--work runs/generalisation] [--stage data|train]`
Writes benchmarks/results/generalisation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _results import machine, save_json, save_markdown
from _solvated import SolventSampling, labelled_solute
from qmlmm.training import TrainConfig
from qmlmm.training.parallel import TrainJob, train_jobs

SMILES = "[NH3+]CCC(=O)[O-]"


#: the reference: the trainer's defaults (delta, 2x64, Adam 1e-3, batch 8), one network, split by runs
REFERENCE: dict[str, Any] = {
    "target": "xtb",
    "baseline": "dftb3",
    "ensemble": 1,
    "epochs": 200,
    "patience": 40,
    "split": "runs",
    "valid_fraction": 0.125,
    "test_fraction": 0.25,
    "threads": 1,
}

#: one change each against REFERENCE (name: overrides)
VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {},
    "direct": {"baseline": None},
    "hidden 2x16": {"hidden": [16, 16]},
    "hidden 2x32": {"hidden": [32, 32]},
    "hidden 1x32": {"hidden": [32]},
    "weight decay 1e-4": {"weight_decay": 1e-4},
    "weight decay 1e-2": {"weight_decay": 1e-2},
    "lr 3e-4": {"lr": 3e-4},
    "batch 32": {"batch_size": 32},
    "w_qm_forces 0.1": {"w_qm_forces": 0.1},
    "w_energy 0.1": {"w_energy": 0.1},
    "no MM angular": {"descriptor": {"mm_angular_shifts": [0.35], "mm_angular_cutoff": 0.4}},
    "no electrostatic term": {"electrostatics": "none"},
}


def feature_shift(work: Path, n_train: int) -> list[dict[str, Any]]:
    """How far validation and test features lie outside the training frames' distribution, per descriptor
    term and element: the largest |z| (feature minus training mean, over training std, the scaling the
    networks see) and the fraction of |z| > 5, for the first ``n_train`` training frames of the split."""
    import torch

    from qmlmm.data.batch import collate
    from qmlmm.data.training_set import load_training_data
    from qmlmm.models.hdnnp import HDNNP
    from qmlmm.training.trainer import _model_config, _statistics, _training_frames

    cfg = TrainConfig(**{**REFERENCE, "max_train_frames": n_train})
    data = load_training_data(work / "labels.h5", cfg.target, cfg.baseline, cfg.split_settings, require=("dftb3",))
    _, tr, _ = _training_frames(data, cfg)
    mcfg = _model_config(cfg, data)
    st = _statistics(mcfg, tr, torch.float64)
    probe = HDNNP(mcfg).double()
    names = probe.acsf.feature_names()

    def term(name: str) -> str:
        if name.startswith("MM G2") or name.startswith("MM G4"):
            return name[:5]
        return "MM long range" if name.startswith("MM") else "QM " + name[:2]

    groups = sorted({term(n) for n in names})
    rows = []
    for part, items in (("train", tr), ("valid", data.subset(data.valid)), ("test", data.subset(data.test))):
        with torch.no_grad():
            b = collate(items, dtype=torch.float64)
            x = probe.features(b)
            sp = probe.acsf.species(b.qm_z)
        z = ((x - st.feat_mean[sp]) / st.feat_std[sp]).abs().numpy()
        for g in groups:
            cols = [i for i, n in enumerate(names) if term(n) == g]
            zg = z[:, cols]
            rows.append({"part": part, "term": g, "max_abs_z": float(zg.max()), "frac_gt5": float((zg > 5).mean())})
    return rows


def baseline_alone(work: Path) -> dict[str, float]:
    """Test-set MAE of DFTB3 alone against the target (after one constant energy shift)."""
    import numpy as np

    from qmlmm.analysis.evaluate import baseline_collected
    from qmlmm.data.training_set import load_training_data
    from qmlmm.models.evaluation import compute_metrics

    cfg = TrainConfig(**REFERENCE)
    data = load_training_data(work / "labels.h5", cfg.target, None, cfg.split_settings, require=("dftb3",))
    idx = np.array([data.items[int(i)].index for i in data.test])
    m = compute_metrics(baseline_collected(work / "labels.h5", "xtb", "dftb3", idx), shift_energy=True)
    return {q: float(m[q]["mae"]) for q in ("energy", "qm_forces", "mm_forces")}  # type: ignore[index]


def best_epoch(model_path: Path) -> dict[str, int]:
    """Best validation epoch and epochs run of the (single) network of a trained model."""
    hist = json.loads(model_path.with_suffix(".history.json").read_text())[0]
    best = min(hist, key=lambda h: h["valid_loss"])
    return {"best_epoch": int(best["epoch"]), "epochs_run": len(hist)}


def train_variants(work: Path, plan: list[tuple[str, int]], seeds: list[int], workers: int) -> list[dict[str, Any]]:
    """Every (variant, training-set size) of ``plan`` at every seed (resumable); one row each."""
    jobs: list[TrainJob] = []
    rows: list[dict[str, Any]] = []
    for name, n in plan:
        over = VARIANTS[name]
        for seed in seeds:
            cfg = TrainConfig(**{**REFERENCE, **over, "max_train_frames": n, "seed": seed})
            slug = name.replace(" ", "_").replace("/", "")
            out = work / "models" / f"{slug}_n{n}_s{seed}.pt"
            need = ("dftb3",)
            jobs.append(TrainJob(str(work / "labels.h5"), cfg, str(out), {"require": need}))
            rows.append({"variant": name, "n_train": n, "seed": seed, "path": out})
    done = train_jobs(jobs, workers=workers, progress=False)
    out_rows = []
    for r in rows:
        m, secs = done[str(r["path"])]
        row = {k: v for k, v in r.items() if k != "path"}
        row.update(best_epoch(Path(str(r["path"]))))
        row["seconds"] = secs
        for part in ("train", "valid", "test"):
            for q in ("energy", "qm_forces", "mm_forces"):
                row[f"{part}_{q}_mae"] = m[part][q]["mae"]
        out_rows.append(row)
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--frames-per-run", type=int, default=30)
    ap.add_argument("--every", type=int, default=20, help="MD steps (0.5 fs) between stored frames")
    ap.add_argument("--work", default="runs/generalisation")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stage", choices=("data", "all"), default="all")
    ap.add_argument("--sizes", default="100,300", help="training frames of every variant in --large-variants")
    ap.add_argument(
        "--large-variants",
        default="reference,direct,hidden 2x16,hidden 2x32,weight decay 1e-4,weight decay 1e-2",
        help="variants trained at every size; the others at the smallest only",
    )
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sampling = SolventSampling(args.runs, args.frames_per_run, args.every)
    secs = labelled_solute(work, SMILES, sampling, workers=args.workers)
    (work / "data_seconds.json").write_text(json.dumps(secs))
    if args.stage == "data":
        return
    t0 = time.time()
    sizes = [int(x) for x in args.sizes.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    shift = {str(n): feature_shift(work, n) for n in sizes}
    large = set(args.large_variants.split(","))
    plan = [(v, n) for n in sizes for v in VARIANTS if n == min(sizes) or v in large]
    rows = train_variants(work, plan, seeds, args.workers)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "solute": f"beta-alanine zwitterion ({SMILES})",
        "target": "xtb:gfn2",
        "baseline": "dftb3:3ob",
        "runs": args.runs,
        "frames_per_run": args.frames_per_run,
        "every_steps": args.every,
        "reference": REFERENCE,
        "variants": VARIANTS,
        "rows": rows,
        "feature_shift": shift,
        "baseline_alone_test_mae": baseline_alone(work),
        "seconds": {**secs, "train": time.time() - t0},
    }
    save_json("generalisation", result)
    save_markdown("generalisation", markdown(result))


def markdown(result: dict[str, Any]) -> list[str]:
    """The table of the result: one line per variant, size and seed."""
    md = [
        f"# Why training stops generalising: one factor at a time ({result['date']})",
        "",
        f"`python benchmarks/generalisation.py` on {result['machine']}. {result['solute']} in water, "
        f"{result['runs']} independent DFTB3/MM runs x {result['frames_per_run']} frames "
        f"({result['every_steps'] / 2:g} fs apart), labels GFN2-xTB (target) and DFTB3/3ob (baseline), 1.4 nm "
        "embedding, 0.2 nm switch. Split by whole runs (validation and test runs never seen in training). "
        "Reference: the trainer's defaults for a delta model (2x64, Adam lr 1e-3, batch 8, loss weights 1), "
        "one network; each other line changes one setting. MAE: E kJ/mol / QM F / MM F kJ/mol/nm.",
        "",
        "| variant | N | seed | best epoch / run | train MAE | valid MAE | test MAE | s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def tri(r: dict[str, Any], part: str) -> str:
        return " / ".join(f"{r[f'{part}_{q}_mae']:.3g}" for q in ("energy", "qm_forces", "mm_forces"))

    for r in result["rows"]:
        md.append(
            f"| {r['variant']} | {r['n_train']} | {r['seed']} | {r['best_epoch']} / {r['epochs_run']} | "
            f"{tri(r, 'train')} | {tri(r, 'valid')} | {tri(r, 'test')} | {r['seconds']:.0f} |"
        )
    b = result["baseline_alone_test_mae"]
    md.append(
        f"| DFTB3 alone (shifted) | - | - | - | - | - | "
        f"{b['energy']:.3g} / {b['qm_forces']:.3g} / {b['mm_forces']:.3g} | - |"
    )
    md += [
        "",
        "Features of validation and test frames against the training frames' distribution (the scaling the "
        "networks see): largest |z| and the fraction of |z| > 5, per descriptor term.",
        "",
        "| N train | term | train max / frac | valid max / frac | test max / frac |",
        "|---|---|---|---|---|",
    ]
    for n, rows in result["feature_shift"].items():
        by = {(r["part"], r["term"]): r for r in rows}
        for t in sorted({r["term"] for r in rows}):
            cells = [
                f"{by[(p, t)]['max_abs_z']:.3g} / {by[(p, t)]['frac_gt5']:.2%}" for p in ("train", "valid", "test")
            ]
            md.append(f"| {n} | {t} | " + " | ".join(cells) + " |")
    return md


if __name__ == "__main__":
    main()
