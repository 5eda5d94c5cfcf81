"""How long OpenMP threads spin before sleeping, and what it costs or saves each engine and the model.

qmlmm sets ``OMP_WAIT_POLICY=PASSIVE`` on import: xtb's and tblite's OpenMP runtimes otherwise spin
between their small parallel regions and slow a call 30-80x (shared/notes/engines.md). Passive threads
sleep at once, so every parallel region of torch's (libgomp) has to wake them: the model call and the
training step with 2 threads run thousands of small operations, each a parallel region. libgomp's
``GOMP_SPINCOUNT`` (read when the runtime loads; it overrides the policy's spin count) lets threads spin
that many iterations first. This script times, in fresh processes for each spin count, with 2 threads
unless the row says 1: the model call (ensemble of 4 default networks with random weights, energy and
QM and MM forces, retinoic acid + 2628 charges, electrostatics "charges"), one training step (forward,
forces with create_graph, energy + force loss, backward; the same frame), our DFTB3/MM call (from the
previous call's charges: the same frame again, so its SCC starts converged, a best case that times the
threads, not the SCC; benchmarks/dftb_speed.py times real MD steps) and GFN2-xTB/MM on the same frame.

Run: `.venv/bin/python benchmarks/omp_spin.py [--spins 0,3000,10000,30000,qmlmm] [--rounds 2] [--calls 20]`
Writes benchmarks/results/omp_spin.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _results import machine, save_json, save_markdown

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
calls = int(sys.argv[2])
import qmlmm  # before torch: libgomp reads the spin count when torch loads it
import torch
from _results import call_seconds
from dftb_speed import load_frame
from md_profile import random_models
from qmlmm.engines import make_engine
from qmlmm.environment import EmbeddingSettings, select_embedding
from qmlmm.models.hdnnp import energy_and_forces

fr, _ = load_frame()
emb = select_embedding(fr, EmbeddingSettings(1.4, 0.2))
z = fr.numbers[emb.qm_index]
model = random_models([1, 6, 8], 4)["direct"]  # default architecture (electrostatics charges), seed 0


def best(f):
    ts = call_seconds(f, calls, warmup=3)
    return {"median_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * min(ts)}


def args_of():
    return (z, emb.qm_positions, emb.mm_positions, emb.mm_charges)


out = {}
for n in (1, 2):
    eng = model.engine(n)
    out[f"model call, {n} thread(s)"] = best(lambda: eng.compute(*args_of()))
torch.set_num_threads(2)
ens = model.ensemble.train()
from qmlmm.batch import FrameBatch
dt, zeros = torch.float32, lambda n: torch.zeros(n, dtype=torch.long)
nq, nm = len(z), len(emb.mm_charges)
fb = FrameBatch(
    qm_z=torch.as_tensor(z), qm_pos=torch.as_tensor(emb.qm_positions, dtype=dt), qm_frame=zeros(nq),
    mm_pos=torch.as_tensor(emb.mm_positions, dtype=dt).reshape(-1, 3), mm_frame=zeros(nm), mm_mol=zeros(nm),
    mm_q=torch.as_tensor(emb.mm_charges, dtype=dt), n_frames=1, qm_charge=torch.tensor([0.0], dtype=torch.float64),
    meta={"switched": True},
)


def step():
    e, fq, fm, _ = energy_and_forces(ens, fb, create_graph=True)
    loss = e.float().square().sum() + fq.square().sum() + fm.square().sum()
    loss.backward()


out["training step (ensemble of 4), 2 threads"] = best(step)
for spec in ("dftb3:3ob", "xtb:gfn2"):
    eng = make_engine(spec, threads=2)
    out[f"{spec}/MM call, 2 threads"] = best(lambda: eng.compute(*args_of()))
print(json.dumps(out))
"""


def timed(spin: str, calls: int) -> dict[str, Any]:
    """One fresh process with GOMP_SPINCOUNT ``spin`` for every runtime (0: passive, qmlmm's setting before
    2026-12-06), or ("qmlmm") none in the environment: qmlmm's default (xtb runs on torch's runtime, torch
    being loaded)."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    if spin != "qmlmm":
        env["GOMP_SPINCOUNT"] = spin
    cmd = [sys.executable, "-c", CHILD, str(HERE), str(calls)]
    res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spins", default="0,3000,10000,30000,qmlmm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    spins = args.spins.split(",")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in spins}
    for _ in range(args.rounds):
        for s in spins:
            runs[s].append(timed(s, args.calls))
            print(s, runs[s][-1], flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "rounds": args.rounds, "calls": args.calls,
              "runs": runs}  # fmt: skip
    save_json("omp_spin", result)
    cases = list(runs[spins[0]][0])
    md = [
        f"# OpenMP spin before sleep (GOMP_SPINCOUNT) and call times ({result['date']})",
        "",
        f"`python benchmarks/omp_spin.py` on {result['machine']}; OMP_WAIT_POLICY=PASSIVE (qmlmm's default) with "
        f"GOMP_SPINCOUNT as the column says for every OpenMP runtime (0: passive, qmlmm's setting before 2026-12-06; "
        "qmlmm: none set, so qmlmm's default; xtb runs on torch's runtime once torch is loaded). "
        f"{args.rounds} rounds x {args.calls} calls in fresh "
        "processes, settings interleaved; ms per call: median of the rounds' medians (smallest minimum). Retinoic "
        "acid + 2628 charges; model: ensemble of 4 default networks, random weights, electrostatics charges. "
        "DFTB3/MM: the same frame again, so its SCC starts from converged charges (a best case; dftb_speed.md "
        "times MD steps).",
        "",
        "| case | " + " | ".join(spins) + " |",
        "|---|" + "---|" * len(spins),
    ]
    for c in cases:
        cells = []
        for s in spins:
            meds = sorted(r[c]["median_ms"] for r in runs[s])
            cells.append(f"{meds[len(meds) // 2]:.1f} ({min(r[c]['min_ms'] for r in runs[s]):.1f})")
        md.append(f"| {c} | " + " | ".join(cells) + " |")
    save_markdown("omp_spin", md)  # prints the table too


if __name__ == "__main__":
    main()
