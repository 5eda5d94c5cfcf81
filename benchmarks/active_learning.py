"""Labels needed to reach a held-out error, active learning against random selection (``qmlmm active``).

System: methanol in TIP3P water (box built for the embedding cutoff), or with ``--solute retinoic-acid`` the
seed solute at reduced size (1.0 nm embedding, a smaller budget and grid on the command line). Reference:
GFN2-xTB/MM (a cheap stand-in for DFT: the label cost does not matter here, the number of labels does); delta baseline
DFTB3/3ob. Both arms start from the same first labels, are measured on the same held-out set (separate
sampler runs) and get the same budget; the active arm samples candidates by ML/MM MD with its ensemble
and labels the most uncertain, the random arm labels DFTB3/MM frames at random.

Reported: the held-out MAE curves of both arms, and for each quantity the labels each arm needed to reach
the random arm's final error (the first round at or below it) and their ratio. One seed per run of this
script: the curves are noisy at these sizes, so repeat with ``--seed`` for run-to-run scatter.

Run: ``.venv/bin/python benchmarks/active_learning.py [--budget 30] [--per-round 5] [--seed 0]``.
Writes benchmarks/results/active_learning_seed<N>[_k<per-round>].{json,md,png} (the png: active.png of the
run) and its calibration plot.

``--warm-start`` (after the plain run of the same seed and grid): the active arm again with warm starts
(each round's ensemble from the last round's), on the same system, held-out set and first labels (copied
from the plain run); writes ``..._warm.{json,md}``: held-out errors and training time per round, warm
against fresh. ``--summary``: labels each arm needed to reach the fixed targets ``TARGETS`` in every
seed's result, and their ratio (``active_learning_summary.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from _results import RESULTS, machine, save_json, save_markdown
from qmlmm.md.build import BuildSettings, SoluteSpec, build_system
from qmlmm.workflows.active import ActiveSettings, run_active

QUANTITIES = (
    ("energy_mae", "E", "kJ/mol"),
    ("qm_forces_mae", "QM F", "kJ/mol/nm"),
    ("mm_forces_mae", "MM F", "kJ/mol/nm"),
)


#: fixed held-out targets of the summary (methanol, GFN2-xTB - DFTB3 delta): energy MAE (kJ/mol) and QM-force
#: MAE (kJ/mol/nm), stated before the seeds 2 and 3 ran; both arms of seeds 0 and 1 reached them within 30 labels
TARGETS = {"energy_mae": 1.5, "qm_forces_mae": 60.0}
#: the seed solute at reduced size (1.0 nm embedding, budget and grid from the command line): its targets are
#: fractions of DFTB3's own held-out error (its error scale was not known before it ran), stated before it ran
TARGET_FRACTIONS = {"energy_mae": 0.3, "qm_forces_mae": 0.5}
SOLUTES = {"methanol": "CO", "retinoic-acid": "CC1=C(C(CCC1)(C)C)/C=C/C(=C/C=C/C(=C/C(=O)O)/C)/C"}


def targets_of(result: dict[str, Any]) -> dict[str, float]:
    """The held-out targets of one result: ``TARGETS`` for methanol, else ``TARGET_FRACTIONS`` of the
    baseline's own error."""
    if result.get("solute", "methanol") == "methanol":
        return dict(TARGETS)
    return {k: f * result["baseline_alone"][k.removesuffix("_mae")] for k, f in TARGET_FRACTIONS.items()}


def labels_to_reach(points: list[dict[str, Any]], key: str, target: float) -> int | None:
    """Labels of the first round whose held-out ``key`` is at or below ``target`` (None: never)."""
    for p in points:
        if p[key] <= target:
            return int(p["n_labels"])
    return None


def settings(args: argparse.Namespace, warm: bool = False) -> ActiveSettings:
    """The study of one run: the plain one, or (``warm``) its active arm with warm starts and no control."""
    return ActiveSettings(
        target="xtb:gfn2",
        baseline="dftb3:3ob",
        budget=args.budget,
        per_round=args.per_round,
        replicas=2,
        temperatures=[300.0, 360.0],
        steps=400,
        every=10,
        equil_steps=1000,
        heldout_runs=2,
        cutoff=args.cutoff,
        workers=0,
        seed=args.seed,
        train={"ensemble": 3, "hidden": [32, 32], "epochs": 150, "patience": 40},
        warm_start=warm,
        random_control=not warm,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/active_learning")
    ap.add_argument("--budget", type=int, default=30)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cutoff", type=float, default=1.0)
    ap.add_argument("--solute", choices=sorted(SOLUTES), default="methanol")
    ap.add_argument("--warm-start", action="store_true", help="the active arm again with warm starts")
    ap.add_argument("--summary", action="store_true", help="labels to reach TARGETS over every seed's result")
    args = ap.parse_args()
    if args.summary:
        return summary()
    tag = ("" if args.solute == "methanol" else f"{args.solute}_") + f"seed{args.seed}"
    tag += f"_k{args.per_round}" if args.per_round != 5 else ""
    work = Path(args.work) / tag
    if args.warm_start:
        return warm_start(work, tag, args)
    t0 = time.time()
    system = work / "system"
    if not (system / "meta.json").exists():
        build_system(
            [SoluteSpec(smiles=SOLUTES[args.solute])],
            system,
            BuildSettings(cutoff=args.cutoff, equilibrate_ps=5.0, threads=1),
        )
    s = settings(args)
    rec = run_active(system, work / "run", s, progress=False)
    arms = rec["arms"]
    reach: dict[str, Any] = {}
    for key, _, _ in QUANTITIES:
        target = arms["random"][-1][key]
        a, r = labels_to_reach(arms["active"], key, target), labels_to_reach(arms["random"], key, target)
        reach[key] = {"target": target, "active": a, "random": r, "ratio": (a / r) if a and r else None}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "seed": args.seed,
        "solute": args.solute,
        "settings": rec["settings"],
        "arms": arms,
        "baseline_alone": rec.get("baseline_alone"),
        "heldout_frames": rec["heldout_frames"],
        "labels_to_reach_random_final": reach,
        "seconds": time.time() - t0,
    }
    name = f"active_learning_{tag}"
    save_json(name, result)
    shutil.copy(work / "run" / "active.png", RESULTS / f"{name}.png")
    if (work / "run" / "active_calibration.png").exists():
        shutil.copy(work / "run" / "active_calibration.png", RESULTS / f"{name}_calibration.png")
    md = [
        f"# Active learning vs random selection ({result['date']})",
        "",
        f"`python benchmarks/active_learning.py --solute {args.solute} --seed {args.seed} --per-round "
        f"{args.per_round} --budget {args.budget}` on "
        f"{result['machine']}. {args.solute} in TIP3P water, {args.cutoff} nm embedding; reference GFN2-xTB/MM, "
        f"baseline DFTB3/3ob (delta model, ensemble of 3, 2x32); {args.per_round} labels a round up to "
        f"{args.budget}; held-out set: "
        f"{rec['heldout_frames']} frames from 2 separate DFTB3/MM runs. One seed: the curves scatter "
        "from seed to seed at these sizes.",
        "",
        "| arm | labels | E MAE (kJ/mol) | QM F MAE (kJ/mol/nm) | MM F MAE (kJ/mol/nm) | spread-error rho (E, QM F) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, pts in arms.items():
        for p in pts:
            rho = p.get("spread_error_spearman", {})
            md.append(
                f"| {arm} | {p['n_labels']} | {p['energy_mae']:.3f} | {p['qm_forces_mae']:.2f} | "
                f"{p['mm_forces_mae']:.3f} | {rho.get('energy', float('nan')):.2f}, "
                f"{rho.get('qm_forces', float('nan')):.2f} |"
            )
    b = rec.get("baseline_alone")
    if b:
        md.append(
            f"| DFTB3 alone (shifted) | - | {b['energy']:.3f} | {b['qm_forces']:.2f} | {b['mm_forces']:.3f} | - |"
        )
    md += ["", "Labels needed to reach the random arm's final held-out error:", ""]
    md += ["| quantity | target | active | random | active / random |", "|---|---|---|---|---|"]
    for key, label, unit in QUANTITIES:
        r = reach[key]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        md.append(f"| {label} | {r['target']:.3f} {unit} | {r['active'] or 'not reached'} | {r['random']} | {ratio} |")
    md += [
        "",
        f"Wall time of this invocation {result['seconds'] / 60:.0f} min (a resumed run counts only its own part).",
        "",
        f"![curves]({name}.png)",
    ]
    save_markdown(name, md)


def _train_seconds(run: Path, arm: str, n_rounds: int) -> list[float]:
    """Training wall time (s) of each round's ensemble of ``arm`` in the run folder ``run``."""
    out = []
    for r in range(n_rounds):
        m = json.loads((run / arm / f"round_{r:02d}" / "model.metrics.json").read_text())
        out.append(float(m["train_seconds"]))
    return out


def warm_start(work: Path, tag: str, args: argparse.Namespace) -> None:
    """The active arm of the finished plain run ``work/run`` again with warm starts (``work/run_warm``): same
    system, held-out set, first labels and first round (copied), so only the starts differ."""
    cold, warm = work / "run", work / "run_warm"
    if not (cold / "active.json").exists():
        raise SystemExit(f"run the plain study first (no {cold / 'active.json'})")
    t0 = time.time()
    for part in ("heldout", "initial", "active/round_00"):
        if not (warm / part).exists():
            shutil.copytree(cold / part, warm / part)
    rec = run_active(work / "system", warm, settings(args, warm=True), progress=False)
    fresh = json.loads((cold / "active.json").read_text())["arms"]["active"]
    warmed = rec["arms"]["active"]
    n = min(len(fresh), len(warmed))
    t_fresh, t_warm = _train_seconds(cold, "active", n), _train_seconds(warm, "active", n)
    keys = [k for k, _, _ in QUANTITIES]
    rows = [
        {"n_labels": a["n_labels"], "fresh": {k: a[k] for k in keys}, "warm": {k: b[k] for k in keys},
         "train_seconds_fresh": tf, "train_seconds_warm": tw}
        for a, b, tf, tw in zip(fresh[:n], warmed[:n], t_fresh, t_warm, strict=True)
    ]  # fmt: skip
    name = f"active_learning_{tag}_warm"
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "seed": args.seed, "rounds": rows,
              "seconds": time.time() - t0}  # fmt: skip
    save_json(name, result)
    md = [
        f"# Active learning: warm against fresh starts ({result['date']})",
        "",
        f"`python benchmarks/active_learning.py --seed {args.seed} --per-round {args.per_round} --warm-start` on "
        f"{result['machine']}. The active arm of `active_learning_{tag}` again, each round's ensemble trained from "
        "the last round's networks instead of random weights; same system, held-out set, first labels and first "
        "round. The frames each arm picks differ after round 0 (each picks with its own ensemble).",
        "",
        "| labels | E MAE fresh / warm | QM F MAE fresh / warm | MM F MAE fresh / warm | training s fresh / warm |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        f, w = r["fresh"], r["warm"]
        md.append(
            f"| {r['n_labels']} | {f['energy_mae']:.3f} / {w['energy_mae']:.3f} | {f['qm_forces_mae']:.1f} / "
            f"{w['qm_forces_mae']:.1f} | {f['mm_forces_mae']:.3f} / {w['mm_forces_mae']:.3f} | "
            f"{r['train_seconds_fresh']:.0f} / {r['train_seconds_warm']:.0f} |"
        )
    tf, tw = sum(t_fresh[1:]), sum(t_warm[1:])
    md += ["", f"Training after round 0: fresh {tf:.0f} s, warm {tw:.0f} s ({tw / tf:.2f}x)."]
    save_markdown(name, md)


def summary() -> None:
    """Labels each arm needed to reach ``TARGETS``, per seed result in benchmarks/results, and the ratio."""
    rows = []
    for path in sorted(RESULTS.glob("active_learning_*seed*.json")):
        if path.stem.endswith(("_warm", "_partial")):
            continue
        d = json.loads(path.read_text())
        row: dict[str, Any] = {"result": path.stem, "solute": d.get("solute", "methanol"), "seed": d["seed"],
                               "per_round": d["settings"]["per_round"], "targets": targets_of(d)}  # fmt: skip
        for key, target in row["targets"].items():
            a = labels_to_reach(d["arms"]["active"], key, target)
            r = labels_to_reach(d["arms"]["random"], key, target)
            row[key] = {"active": a, "random": r, "budget": d["settings"]["budget"]}
        rows.append(row)
    totals = {}
    for solute, key in sorted({(r["solute"], k) for r in rows for k in TARGETS}):
        both = [r[key] for r in rows if r["solute"] == solute and r[key]["active"] and r[key]["random"]]
        totals[f"{solute} {key}"] = {
            "seeds_both_reached": len(both),
            "seeds": sum(r["solute"] == solute for r in rows),
            "active_labels": sum(b["active"] for b in both),
            "random_labels": sum(b["random"] for b in both),
            "ratio": sum(b["active"] for b in both) / sum(b["random"] for b in both) if both else None,
        }
    result = {"date": time.strftime("%Y-%m-%d"), "targets": TARGETS, "target_fractions": TARGET_FRACTIONS,
              "seeds": rows, "totals": totals}  # fmt: skip
    save_json("active_learning_summary", result)

    def cell(x: dict[str, Any]) -> str:
        a = x["active"] or f">{x['budget']}"
        r = x["random"] or f">{x['budget']}"
        return f"{a} / {r}"

    md = [
        f"# Active learning: labels to a fixed held-out error ({result['date']})",
        "",
        f"Targets (GFN2-xTB - DFTB3/3ob delta): methanol energy MAE {TARGETS['energy_mae']} kJ/mol, QM-force MAE "
        f"{TARGETS['qm_forces_mae']} kJ/mol/nm; the seed solute {TARGET_FRACTIONS['energy_mae']} and "
        f"{TARGET_FRACTIONS['qm_forces_mae']} of DFTB3's own held-out MAEs. Labels: the first round at or below the "
        "target, active / random; `>N`: not reached within the budget N.",
        "",
        "| result | labels a round | targets E / QM F | E: active / random | QM F: active / random |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['result']} | {r['per_round']} | {r['targets']['energy_mae']:.2f} / {r['targets']['qm_forces_mae']:.1f} "
        f"| {cell(r['energy_mae'])} | {cell(r['qm_forces_mae'])} |"
        for r in rows
    ]
    md += ["", "Over the seeds where both arms reached the target (sum of labels, active / random):", ""]
    for key, t in totals.items():
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        md.append(f"- {key}: {t['seeds_both_reached']} of {t['seeds']} seeds, {t['active_labels']} / "
                  f"{t['random_labels']} = {ratio}")  # fmt: skip
    save_markdown("active_learning_summary", md)


if __name__ == "__main__":
    main()
