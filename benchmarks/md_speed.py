"""MD speed and energy conservation on retinoic acid in water, for every way qmlmm can drive the QM region.

One run: the system is built (retinoic acid, TIP3P, ~1.3 nm padding), direct and delta HDNNPs are
trained briefly on a handful of DFTB3-sampled frames labelled with GFN2-xTB (a stand-in reference,
used for timing only: the architecture, not the accuracy, sets the speed), and then each of
ML/MM direct, ML/MM delta (DFTB3 + network), DFTB3/MM, GFN2-xTB/MM and a few steps of DFT/MM runs
Langevin MD (0.5 fs) for steps/s and ns/day, and NVE for the total-energy drift.

Run: `.venv/bin/python benchmarks/md_speed.py [--steps 200] [--nve-steps 400] [--dft-steps 2]`
Writes benchmarks/results/md_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# isort: off
import qmlmm  # noqa: F401  first: its OpenMP settings must be in the environment when torch loads

# isort: on
import torch

from _results import RESULTS, machine, save_json, save_markdown
from qmlmm.engines import make_engine
from qmlmm.environment import EmbeddingSettings
from qmlmm.md.build import BuildSettings, SoluteSpec, build_system
from qmlmm.md.runner import MDSettings, run_md
from qmlmm.models import QMLMMModel
from qmlmm.training import SplitSettings, TrainConfig, load_training_data, train
from qmlmm.workflows.label import LevelRequest, label_dataset
from qmlmm.workflows.sample import SampleSettings, sample

RA = "CC1=C(C(CCC1)(C)C)/C=C/C(=C/C=C/C(=C/C(=O)O)/C)/C"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nve-steps", type=int, default=400)
    ap.add_argument("--dft-steps", type=int, default=2, help="0: use the DFT/MM call timed by model_speed.py")
    ap.add_argument("--dft", default="dft:b3lyp/def2-svp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/md_speed")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    emb = EmbeddingSettings(1.4, 0.2)
    if not (work / "system" / "meta.json").exists():
        build_system([SoluteSpec(smiles=RA)], work / "system", BuildSettings(padding=1.3))
    if not (work / "frames.h5").exists():
        sample(
            work / "system",
            work / "frames.h5",
            SampleSettings(engine="dftb3:3ob", steps=120, every=10, runs=1, equil_steps=2000, threads=args.threads),
            workers=0,
        )
    label_dataset(
        work / "frames.h5",
        work / "labels.h5",
        [LevelRequest.from_spec("xtb:gfn2", "ref"), LevelRequest.from_spec("dftb3:3ob", "base")],
        emb,
        workers=0,
        threads=args.threads,
        progress=False,
    )
    models = {}
    for mode, base, hidden in (("direct", None, [64, 64]), ("delta", "base", [32, 32])):
        path = work / f"{mode}.pt"
        if not path.exists():
            cfg = TrainConfig(
                target="ref",
                baseline=base,
                ensemble=4,
                epochs=5,
                hidden=hidden,
                batch_size=4,
                block_size=2,
                threads=args.threads,
            )
            train(
                load_training_data(work / "labels.h5", "ref", base, SplitSettings(kind="blocks", block_size=2)),
                cfg,
                path,
                progress=False,
            )
        models[mode] = QMLMMModel.load(path)
    engines = {
        "ML/MM direct": (lambda: models["direct"].engine(args.threads), models["direct"].embedding),
        "ML/MM delta (DFTB3 + NN)": (lambda: models["delta"].engine(args.threads), models["delta"].embedding),
        "DFTB3/MM": (lambda: make_engine("dftb3:3ob", threads=args.threads), emb),
        "GFN2-xTB/MM": (lambda: make_engine("xtb:gfn2", threads=args.threads), emb),
    }
    if args.dft_steps > 0:
        engines[f"DFT/MM ({args.dft})"] = (lambda: make_engine(args.dft, threads=args.threads), emb)
    rows: dict[str, dict[str, float | None]] = {}
    for name, (mk, e_set) in engines.items():
        is_dft = name.startswith("DFT/")
        steps = args.dft_steps if is_dft else args.steps
        tag = name.split(" ")[0].replace("/", "_") + ("_delta" if "delta" in name else "")
        s = MDSettings(steps=steps, report_every=min(10, steps), dcd_every=max(steps, 1), threads=args.threads)
        t0 = time.perf_counter()
        res = run_md(work / "system", mk(), work / f"lang_{tag}", s, e_set, progress=False)
        info = json.loads((work / f"lang_{tag}" / "run.json").read_text())
        row: dict[str, float | None] = {
            "steps_per_s": res.steps_done / res.seconds if res.seconds else None,
            "ns_per_day": res.ns_per_day,
            "qmmm_ms_per_call": 1e3 * (info["qmmm_seconds_per_call"] or float("nan")),
            "wall_s": time.perf_counter() - t0,
        }
        if not is_dft:
            sn = MDSettings(
                steps=args.nve_steps, nve=True, report_every=10, dcd_every=args.nve_steps, threads=args.threads
            )
            rn = run_md(work / "system", mk(), work / f"nve_{tag}", sn, e_set, progress=False)
            row["nve_drift_kjmol_per_ps"] = rn.drift_kjmol_per_ps
        rows[name] = row
        print(
            f"{name:32s} {row['ns_per_day']:.4f} ns/day  {row['qmmm_ms_per_call']:.1f} ms/call  "
            f"drift {row.get('nve_drift_kjmol_per_ps')}",
            flush=True,
        )
    dft_name = f"DFT/MM ({args.dft})"
    if args.dft_steps == 0:
        # no DFT MD here: one DFT/MM call on the same system was timed by model_speed.py; an MD step
        # costs at least that (the MM part and the integrator are negligible next to it)
        ms = json.loads((RESULTS / "model_speed.json").read_text())
        key = next(k for k in ms["rows"] if k.startswith(args.dft) and "one call" in k)
        t_call = ms["rows"][key]["ms"] / 1e3
        dft_name = f"DFT/MM ({args.dft}), from one call timed by model_speed.py"
        rows[dft_name] = {"ns_per_day": 0.5e-6 * 86400 / t_call, "qmmm_ms_per_call": t_call * 1e3}
    for r in rows.values():
        r["speedup_vs_dft"] = (
            r["ns_per_day"] / rows[dft_name]["ns_per_day"]  # type: ignore[operator]
            if rows[dft_name]["ns_per_day"]
            else None
        )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "threads": args.threads,
        "embedding": emb.to_dict(),
        "rows": rows,
        "note": "models trained briefly on GFN2-xTB labels: timing and conservation only",
    }
    save_json("md_speed", out)
    md = [
        f"# MD speed and NVE drift ({out['date']})",
        "",
        f"Retinoic acid in TIP3P water (built with qmlmm build, padding 1.3 nm), 1.4 nm embedding with a "
        f"0.2 nm switching shell, 0.5 fs steps, OpenMM CPU platform; {out['machine']}, {args.threads} threads. "
        f"Langevin runs of {args.steps} steps "
        + (f"({args.dft_steps} for DFT/MM)" if args.dft_steps else "(DFT/MM: from one call timed by model_speed.py)")
        + f"; NVE runs of {args.nve_steps} steps. "
        "The models were trained briefly on GFN2-xTB labels (timing and conservation only).",
        "",
        "| driver | ns/day | ms per QM/ML call | x DFT/MM | NVE drift (kJ/mol/ps) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        d = r.get("nve_drift_kjmol_per_ps")
        md.append(
            f"| {name} | {r['ns_per_day']:.4f} | {r['qmmm_ms_per_call']:.1f} | "
            f"{(r['speedup_vs_dft'] or float('nan')):.0f} | {'-' if d is None else f'{d:.2f}'} |"
        )
    save_markdown("md_speed", md)


if __name__ == "__main__":
    main()
