"""Where an ML/MM MD step's time goes, on retinoic acid in water, beside MM alone and the QM/MM engines.

Two views, one run, same machine state:

1. The model call on the built frame (50 QM atoms and the ~2600 charges of its 1.4 nm shell), ensemble
   of 4 (--direct and --delta, e.g. the ra_small pipeline's trained members; their members are repeated
   up to --members: the architecture, not the weights, sets the time),
   split into embedding selection, batch assembly, descriptor (shared by the members), the members'
   networks and the autograd backward pass for QM and MM forces; plus torch's profiler's top operators.
2. MD steps (Langevin, 0.5 fs, after a short MM-only water relaxation) with each driver: ms per step
   split by the run's own timers (run.json ``ms_per_step``: OpenMM state to numpy, embedding, engine,
   forces back to the atoms, and the rest: OpenMM's MM forces and integration), and the MM-only step
   (the same system, solute frozen) that the speed issue measures the others against.

Run: `.venv/bin/python benchmarks/md_profile.py [--system runs/ra_small/system] [--random] [--steps 60] [--threads 2]
[--rounds 3]`
Writes benchmarks/results/md_profile.{json,md} (or NAME.{json,md} with --name NAME).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# isort: off
import qmlmm  # noqa: F401  first: its OpenMP settings must be in the environment when torch loads

# isort: on
import torch

from _results import machine, median_seconds, save_json, save_markdown
from qmlmm import environment
from qmlmm.data.batch import collate, frame_tensors
from qmlmm.environment import select_embedding
from qmlmm.md.system import MDSystem
from qmlmm.models import QMLMMModel
from qmlmm.models.ensemble import Ensemble
from qmlmm.models.hdnnp import with_grad_inputs


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    return 1000 * median_seconds(fn, repeat)


def ensemble_of(model: QMLMMModel, k: int) -> QMLMMModel:
    """The model with ``k`` members (its own, repeated): same architecture, same cost per member."""
    members = [copy.deepcopy(model.ensemble.members[i % model.ensemble.size]) for i in range(k)]
    return QMLMMModel(Ensemble(model.ensemble.cfg, members), model.meta)  # type: ignore[arg-type]


def random_models(elements: list[int], k: int) -> dict[str, QMLMMModel]:
    """Direct and delta (DFTB3 baseline) ensembles of ``k`` default HDNNPs with random weights (seed 0)."""
    from qmlmm.descriptors.acsf import DescriptorConfig
    from qmlmm.models.hdnnp import HDNNP, ModelConfig
    from qmlmm.models.model import ModelMeta

    torch.manual_seed(0)
    cfg = ModelConfig(descriptor=DescriptorConfig.from_dict({"elements": elements}))
    metas = {
        "direct": ModelMeta(target="xtb", target_method="xtb:gfn2"),
        "delta": ModelMeta(target="xtb", target_method="xtb:gfn2", baseline="dftb3", baseline_method="dftb3:3ob"),
    }
    return {n: QMLMMModel(Ensemble(cfg, [HDNNP(cfg) for _ in range(k)]), m) for n, m in metas.items()}


def model_breakdown(model: QMLMMModel, msys: MDSystem, repeat: int) -> dict[str, Any]:
    """ms of each part of one energy + QM and MM forces call on the built frame."""
    fr = msys.frame()
    fr.validate()
    settings = model.embedding
    emb = select_embedding(fr, settings)
    ft = frame_tensors(fr, settings, emb=emb)
    b = collate([ft], dtype=model.dtype)
    ens = model.ensemble.eval()
    m0 = ens.members[0]
    engine = model.engine(torch.get_num_threads())  # built once: the timed call is the MD step's call

    def descriptor() -> None:
        bb = with_grad_inputs(b)
        with torch.enable_grad():
            m0.inputs(bb)  # type: ignore[operator]

    def forward() -> None:
        bb = with_grad_inputs(b)
        with torch.enable_grad():
            ens.member_energies(bb)

    t = {
        "embedding_selection": median_ms(lambda: select_embedding(fr, settings), repeat),
        "batch_assembly": median_ms(lambda: collate([frame_tensors(fr, settings, emb=emb)], dtype=model.dtype), repeat),
        "descriptor": median_ms(descriptor, repeat),
        "descriptor_and_networks": median_ms(forward, repeat),
        "forward_and_backward": median_ms(lambda: ens.predict(b), repeat),
        "engine_call": median_ms(lambda: engine.compute_frame(fr, emb), repeat),
    }
    threads = torch.get_num_threads()
    engine.set_threads(1)  # one thread, as the engine had inside MD on 2 cores before engine_threads_in_md
    t["engine_call_1_thread"] = median_ms(lambda: engine.compute_frame(fr, emb), repeat)
    engine.set_threads(threads)
    t["networks"] = t["descriptor_and_networks"] - t["descriptor"]
    t["autograd_backward"] = t["forward_and_backward"] - t["descriptor_and_networks"]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            ens.predict(b)
    top = [
        {"op": e.key, "self_ms_per_call": e.self_cpu_time_total / 1000 / 5, "calls_per_call": e.count // 5}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    ]
    return {"n_qm": len(ft.qm_z), "n_mm": len(ft.mm_q), "ms": t, "top_ops": top}


def md_steps(
    system: Path,
    driver: str,
    engine: Any,
    emb: Any,
    steps: int,
    threads: int,
    work: Path,
    concurrent: bool | None = None,
    engine_threads: int | None = None,
) -> dict[str, Any]:
    from qmlmm.md.runner import MDSettings, run_md

    s = MDSettings(
        steps=steps,
        dt_fs=0.5,
        report_every=20,
        threads=threads,
        thermalize_steps=100,
        concurrent_baseline=concurrent,
        engine_threads=engine_threads,
    )
    out = work / driver
    run_md(system, engine, out, s, emb, progress=False)
    run = json.loads((out / "run.json").read_text())
    return {
        "ms_per_step": run["ms_per_step"],
        "ns_per_day": run["ns_per_day"],
        "stopped": run["stopped"],
        "engine_threads": run["engine_threads"],
        "concurrent_baseline": run.get("concurrent_baseline"),
    }


def mm_only_ms_per_step(msys: MDSystem, steps: int, threads: int) -> float:
    """ms per 0.5 fs Langevin step of the MM system with the solute frozen (zero mass, fixed charges)."""
    import openmm
    import openmm.unit as u

    from qmlmm.md.runner import frozen_solute_simulation

    integ = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, 0.5 * u.femtoseconds)
    sim = frozen_solute_simulation(msys, integ, threads)
    sim.minimizeEnergy(maxIterations=200)
    sim.context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    sim.step(20)
    t0 = time.perf_counter()
    for _ in range(steps // 20):  # reporting every 20 steps, as the QM/MM runs
        sim.step(20)
        sim.context.getState(getEnergy=True)
    return 1000 * (time.perf_counter() - t0) / (steps // 20 * 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="runs/ra_small/system")
    ap.add_argument("--direct", default="runs/ra_small/models/direct.pt")
    ap.add_argument("--delta", default="runs/ra_small/models/delta.pt")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--drivers",
        default="direct,delta,delta_serial,dftb3,xtb",
        help="comma-separated; DRIVER@N runs the engine with N threads beside OpenMM's (default: the runner's "
        "choice); DRIVER_numpy_embedding with numpy's form of the embedding's nearest-QM-atom search",
    )
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the MD runs (medians reported)")
    ap.add_argument("--name", default="md_profile", help="results file name (benchmarks/results/NAME.{json,md})")
    ap.add_argument("--no-breakdown", action="store_true", help="MD steps only, without the model call's parts")
    ap.add_argument(
        "--random",
        action="store_true",
        help="models of the default architecture with random weights (no trained models needed): same timing",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    system = Path(args.system)
    msys = MDSystem.load(system)
    if args.random:
        models = random_models(sorted({int(z) for z in msys.numbers[msys.is_qm]}), args.members)
        args.direct, args.delta = "random-weight direct", "delta models of the default architecture"
    else:
        models = {
            k: ensemble_of(QMLMMModel.load(p), args.members)
            for k, p in (("direct", args.direct), ("delta", args.delta))
        }
    breakdown = {} if args.no_breakdown else {k: model_breakdown(m, msys, args.repeat) for k, m in models.items()}
    mm_each: list[float] = []  # the MM-only step in each round, beside that round's drivers
    rounds: list[dict[str, Any]] = []
    from qmlmm.engines import Engine, make_engine

    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):  # drivers interleaved round by round: the machine's drift hits them alike
            runs: dict[str, Any] = {}
            mm_each.append(mm_only_ms_per_step(msys, max(args.steps, 100), args.threads))
            for d in args.drivers.split(","):
                emb = models["direct"].embedding
                base, _, et = d.partition("@")  # DRIVER@N: the engine with N threads beside OpenMM's
                # DRIVER_numpy_embedding: that driver with numpy's form of the embedding's nearest-atom search
                base, numpy_embedding = base.removesuffix("_numpy_embedding"), base.endswith("_numpy_embedding")
                name = "delta" if base == "delta_serial" else base
                eng: Engine = (
                    models[name].engine(args.threads)
                    if name in models
                    else make_engine({"dftb3": "dftb3:3ob", "xtb": "xtb:gfn2"}[base], threads=args.threads)
                )
                conc = False if base == "delta_serial" else None
                work = Path(tmp) / str(k)
                environment.USE_SELECTION_KERNEL = not numpy_embedding
                runs[d] = md_steps(system, d, eng, emb, args.steps, args.threads, work, conc, int(et) if et else None)
                environment.USE_SELECTION_KERNEL = True
            rounds.append(runs)
    runs = {d: median_run([r[d] for r in rounds]) for d in rounds[0]}
    mm_ms = statistics.median(mm_each)
    x_mm = {d: [r[d]["ms_per_step"]["total"] / m for r, m in zip(rounds, mm_each, strict=True)] for d in rounds[0]}
    ratios = {
        f"{a}/{b}": [r[a]["ms_per_step"]["total"] / r[b]["ms_per_step"]["total"] for r in rounds]
        for a, b in (("delta", "dftb3"), ("delta_serial", "dftb3"), ("delta", "delta_serial"))
        if a in rounds[0] and b in rounds[0]
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "system": f"{system}: {len(msys.numbers)} atoms, {int(msys.is_qm.sum())} QM",
        "threads": args.threads,
        "members": args.members,
        "model_breakdown_ms": breakdown,
        "mm_only_ms_per_step": mm_ms,
        "mm_only_ms_per_step_each_round": mm_each,
        "x_mm_only_each_round": x_mm,
        "md_rounds": args.rounds,
        "md_ms_per_step": runs,
        "md_ms_per_step_each_round": rounds,
        "md_ratios_each_round": ratios,
    }
    save_json(args.name, result)
    md = [
        f"# Where an ML/MM step's time goes ({result['date']})",
        "",
        f"`python benchmarks/md_profile.py` on {result['machine']}, {args.threads} threads. {result['system']}; "
        f"models: {args.direct} and {args.delta}, {args.members} members.",
    ]
    if breakdown:
        md += breakdown_lines(breakdown)
    parts = ("state_transfer", "embedding", "engine", "forces_to_frame", "openmm_and_rest")
    md += [
        "",
        f"MD, ms per 0.5 fs step, median of {args.rounds} interleaved round(s) of {args.steps} Langevin steps "
        f"(MM-only with the solute frozen, measured in each round: {mm_ms:.1f} ms, rounds "
        f"{', '.join(f'{m:.1f}' for m in mm_each)}; x MM-only: the median of each round's ratio to that round's "
        "MM-only step; delta: baseline beside the network, delta_serial: after it):",
        "",
        "| driver | engine threads | total | " + " | ".join(parts) + " | x MM-only | ns/day |",
        "|---|---|---|" + "---|" * len(parts) + "---|---|",
    ]
    for d, r in runs.items():
        p = r["ms_per_step"]
        md.append(
            f"| {d} | {r['engine_threads']} | {p['total']:.1f} | "
            + " | ".join(f"{p[k]:.1f}" for k in parts)
            + f" | {statistics.median(x_mm[d]):.2f} | {r['ns_per_day']:.3f} |"
        )
    each = "; ".join(f"{d} " + ", ".join(f"{v:.2f}" for v in x) for d, x in x_mm.items())
    md += ["", f"x MM-only, each round: {each}"]
    if ratios:
        md += ["", "Step-time ratios, each round:", ""]
        md += [f"- {k}: " + ", ".join(f"{v:.2f}" for v in vals) for k, vals in ratios.items()]
    save_markdown(args.name, md)


def breakdown_lines(breakdown: dict[str, Any]) -> list[str]:
    """The markdown of the model-call breakdown and the direct model's top operators."""
    md = [
        "",
        f"Model call on the built frame ({breakdown['direct']['n_qm']} QM atoms, {breakdown['direct']['n_mm']} "
        "embedded charges), median ms:",
        "",
        "| part | direct | delta (network only) |",
        "|---|---|---|",
    ]
    for k in breakdown["direct"]["ms"]:
        md.append(f"| {k} | {breakdown['direct']['ms'][k]:.2f} | {breakdown['delta']['ms'][k]:.2f} |")
    md += ["", "Top operators of the direct model's forward + backward (torch profiler, self CPU ms per call):", ""]
    md += ["| op | ms | calls |", "|---|---|---|"]
    for o in breakdown["direct"]["top_ops"]:
        md.append(f"| {o['op']} | {o['self_ms_per_call']:.2f} | {o['calls_per_call']} |")
    return md


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One driver's rounds as one row: the median of each timed part and of ns/day."""
    out = dict(runs[0])
    out["ms_per_step"] = {k: statistics.median(r["ms_per_step"][k] for r in runs) for k in runs[0]["ms_per_step"]}
    out["ns_per_day"] = statistics.median(r["ns_per_day"] for r in runs)
    return out


if __name__ == "__main__":
    main()
