"""The largest delta model of accuracy.py trained longer: is the QM-force target reachable with this data?

Same data, split, seed, network (2x32) and test set as the 400-frame delta point of
benchmarks/accuracy.py, but with --epochs (default 200) instead of the learning curve's
fixed step budget (50 epochs at 400 frames). Run after accuracy.py (it reuses runs/accuracy).
Writes benchmarks/results/accuracy_long.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _results import save_json, save_markdown
from accuracy import train_config
from qmlmm.training import TrainJob, train_jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/accuracy")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=200)
    args = ap.parse_args()
    work = Path(args.work)
    # the learning curve's settings (same split and seed), the delta network, more epochs
    cfg = train_config(hidden=[32, 32], epochs=args.epochs, threads=1, max_train_frames=args.frames)
    out = work / "long" / f"delta_{args.frames}_e{args.epochs}.pt"
    job = TrainJob(str(work / "labels.h5"), cfg, str(out), {"require": ("dftb3",)})
    m, secs = train_jobs([job], workers=1, progress=False)[str(out)]
    lc = json.loads((work / "learning_curve" / "learning_curve.json").read_text())
    base = lc["baseline_alone"]
    short = next(p for p in lc["curves"]["delta"] if p["n_train"] == args.frames)
    t = m["test"]
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "n_train": args.frames,
        "epochs_max": args.epochs,
        "epochs_run": None,
        "train_seconds": secs,
        "test": {k: t[k]["mae"] for k in ("energy", "qm_forces", "mm_forces")},
        "learning_curve_point": {k: short[f"{k}_mae"] for k in ("energy", "qm_forces", "mm_forces")},
        "baseline_alone": {k: base[k]["mae"] for k in ("energy", "qm_forces", "mm_forces")},
    }
    hist = json.loads((out.parent / f"{out.stem}.history.json").read_text())
    res["epochs_run"] = len(hist[0])
    save_json("accuracy_long", res)
    rows = [
        f"# Delta model on {args.frames} frames, trained longer ({res['date']})",
        "",
        "Same data, split, network (2x32) and test set as the 400-frame delta point of accuracy.md.",
        "",
        "| model | epochs | E MAE (kJ/mol) | QM F MAE (kJ/mol/nm) | MM F MAE (kJ/mol/nm) |",
        "|---|---|---|---|---|",
        f"| learning-curve point | 50 | {short['energy_mae']:.3f} | {short['qm_forces_mae']:.2f} | "
        f"{short['mm_forces_mae']:.3f} |",
        f"| longer training | {res['epochs_run']} | {t['energy']['mae']:.3f} | {t['qm_forces']['mae']:.2f} | "
        f"{t['mm_forces']['mae']:.3f} |",
        f"| DFTB3 alone (shifted) | - | {base['energy']['mae']:.3f} | {base['qm_forces']['mae']:.2f} | "
        f"{base['mm_forces']['mae']:.3f} |",
    ]
    save_markdown("accuracy_long", rows)


if __name__ == "__main__":
    main()
