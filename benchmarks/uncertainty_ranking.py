"""Does the ensemble's spread rank the held-out errors of an active-learning round's model, and would a
feature-space novelty rank them better?

For every round's model of finished `benchmarks/active_learning.py` runs (both arms), on that run's held-out
frames (independent sampler runs): Spearman's rank correlation between each frame's true error (|energy
error|, and the largest QM-atom force error) and

- the ensemble's spread (energy std, the largest QM-atom force spread: the round's calibration.json), and
- feature novelty: the distance, in the model's scaled features, from each QM atom to the nearest atom of
  its element in the round's training frames, as the largest (``novelty_max``) or the mean
  (``novelty_mean``) over the frame's QM atoms.

A pick rule can only beat random picks where its score ranks errors (rho well above 0). Rounds with fewer
than 9 training frames are left out of the means.

Run: `.venv/bin/python benchmarks/uncertainty_ranking.py runs/active_learning/seed2_k3 runs/active_learning/seed3_k3`
Writes benchmarks/results/uncertainty_ranking.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# isort: off
import qmlmm  # noqa: F401  first: its OpenMP settings must be in the environment when torch loads

# isort: on
import numpy as np
import torch

from _results import machine, save_json, save_markdown


def scaled_features(model: Any, frames: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per frame: element index (Nq,) and the first member's scaled features (Nq, F) of its QM atoms."""
    from qmlmm.data.batch import collate, frame_tensors

    m0 = model.ensemble.members[0]
    out = []
    for fr in frames:
        b = collate([frame_tensors(fr, model.embedding)], dtype=model.dtype)
        with torch.no_grad():
            sp = m0.acsf.species(b.qm_z)
            x = (m0.features(b) - m0.feat_mean[sp]) / m0.feat_std[sp]
        out.append((sp.numpy(), x.double().numpy()))
    return out


def novelty(
    train: list[tuple[np.ndarray, np.ndarray]], test: list[tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per test frame: the largest and the mean over its QM atoms of the distance to the nearest training atom
    of the same element (scaled feature units)."""
    by_el: dict[int, list[np.ndarray]] = {}
    for sp, x in train:
        for e in np.unique(sp):
            by_el.setdefault(int(e), []).append(x[sp == e])
    ref = {e: np.concatenate(v) for e, v in by_el.items()}
    dmax, dmean = [], []
    for sp, x in test:
        d = np.array([np.sqrt(((ref[int(e)] - xi) ** 2).sum(1)).min() for e, xi in zip(sp, x, strict=True)])
        dmax.append(d.max())
        dmean.append(d.mean())
    return {"novelty_max": np.array(dmax), "novelty_mean": np.array(dmean)}


def rank_correlations(run: Path, target: str) -> list[dict[str, Any]]:
    from scipy.stats import spearmanr

    from qmlmm.data import Dataset
    from qmlmm.models import QMLMMModel

    with Dataset(run / "heldout" / "labels.h5") as ds:
        held = [fr for fr in ds.frames() if target in fr.labels]
    rows = []
    for arm in ("active", "random"):
        for rd in sorted((run / arm).glob("round_*")):
            if not (rd / "calibration.json").exists():
                continue
            cal = json.loads((rd / "calibration.json").read_text())
            model = QMLMMModel.load(rd / "model.pt")
            with Dataset(rd / "train.h5") as ds:
                train = list(ds.frames())
            scores = {
                "energy_spread": np.array(cal["energy"]["spread"]),
                "force_spread": np.array(cal["qm_forces"]["spread"]),
                **novelty(scaled_features(model, train), scaled_features(model, held)),
            }
            errors = {"energy": np.array(cal["energy"]["error"]), "qm_forces": np.array(cal["qm_forces"]["error"])}
            rho = {
                f"{s}~{e}": float(spearmanr(v, err).statistic) for s, v in scores.items() for e, err in errors.items()
            }
            rows.append(
                {
                    "run": str(run),
                    "arm": arm,
                    "round": rd.name,
                    "n_train": len(train),
                    "n_heldout": len(held),
                    "rho": rho,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="folders of finished active_learning.py runs (holding run/)")
    ap.add_argument("--target", default="xtb")
    ap.add_argument("--min-train", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [r for d in args.runs for r in rank_correlations(Path(d) / "run", args.target)]
    keys = list(rows[0]["rho"])
    means = {}
    for arm in ("active", "random"):
        for d in args.runs:
            sel = [
                r
                for r in rows
                if r["arm"] == arm and r["run"] == str(Path(d) / "run") and r["n_train"] >= args.min_train
            ]
            if sel:
                means[f"{Path(d).name} {arm}"] = {k: float(np.mean([r["rho"][k] for r in sel])) for k in keys}
    save_json("uncertainty_ranking", {"machine": machine(), "runs": args.runs, "rows": rows, "means": means})
    md = [
        "# Does a score rank the held-out errors? (Spearman rho, mean over rounds)",
        "",
        f"`python benchmarks/uncertainty_ranking.py {' '.join(args.runs)}` on {machine()}. Rounds with at least "
        f"{args.min_train} training frames; score~error.",
        "",
        "| run, arm | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    md += [f"| {name} | " + " | ".join(f"{v[k]:.2f}" for k in keys) + " |" for name, v in means.items()]
    n = rows[0]["n_heldout"]
    md += ["", f"{n} held-out frames: one round's rho of two unrelated scores scatters by ~{1 / np.sqrt(n - 1):.2f}."]
    save_markdown("uncertainty_ranking", md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
