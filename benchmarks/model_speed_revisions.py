"""Model speed across code revisions: does a change make the model call slower?

The same call (energy + QM and MM forces of an ensemble of 4 default 2x64 networks with random weights, on
the retinoic-acid timing frame with its 2628 embedded charges, 1.4 nm cutoff and 0.2 nm switch) timed with
the package of each revision, in fresh processes pinned to one core, revisions interleaved round by round
so that drifts of the machine hit them alike. Each revision is checked out as a git worktree under
--tmp; the current working tree is the revision "HEAD+" (uncommitted changes included).

Run: `.venv/bin/python benchmarks/model_speed_revisions.py --rev 27c188f [--rounds 3] [--calls 30]`
Writes benchmarks/results/model_speed_revisions.{json,md}.
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

ROOT = Path(__file__).resolve().parents[1]

#: the timed call, run by each revision's package (only APIs that all compared revisions have)
CHILD = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from dftb_speed import load_frame
from qmlmm.descriptors.acsf import DescriptorConfig
from qmlmm.environment import EmbeddingSettings, select_embedding
from qmlmm.models.ensemble import Ensemble
from qmlmm.models.hdnnp import HDNNP, ModelConfig
from qmlmm.models.model import ModelMeta, QMLMMModel
fr, _ = load_frame()
emb = select_embedding(fr, EmbeddingSettings(1.4, 0.2))
z = fr.numbers[emb.qm_index]
torch.manual_seed(0)
desc = DescriptorConfig.from_dict({"elements": [1, 6, 8], "long_range_cutoff": 1.4})
cfg = ModelConfig(descriptor=desc, hidden=[64, 64], cutoff=1.4, switch_width=0.2, electrostatics=sys.argv[2])
eng = QMLMMModel(Ensemble(cfg, [HDNNP(cfg) for _ in range(4)]), ModelMeta(target="x")).engine(1)
call = lambda: eng.compute(z, emb.qm_positions, emb.mm_positions, emb.mm_charges)
for _ in range(3):
    call()
ts = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter(); call(); ts.append(time.perf_counter() - t0)
print(json.dumps({"median_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * min(ts)}))
"""


def worktree(rev: str, tmp: Path) -> Path:
    """A checkout of ``rev`` under ``tmp`` (made once, reused)."""
    path = tmp / f"qmlmm_{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(path), rev], check=True,
                       capture_output=True)  # fmt: skip
    return path


def timed(tree: Path, elec: str, calls: int) -> dict[str, float]:
    """One fresh process with ``tree``'s package, pinned to CPU 0: median and min ms of ``calls`` calls."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = ["taskset", "-c", "0", sys.executable, "-c", CHILD, str(tree / "benchmarks"), elec, str(calls)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", action="append", required=True, help="a revision to compare with HEAD+ (repeatable)")
    ap.add_argument("--electrostatics", default="none,charges")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--tmp", default="/tmp")
    args = ap.parse_args()
    trees = {rev: worktree(rev, Path(args.tmp)) for rev in args.rev}
    trees["HEAD+"] = ROOT
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for _ in range(args.rounds):
        for elec in args.electrostatics.split(","):
            for rev, tree in trees.items():
                runs.setdefault(elec, {}).setdefault(rev, []).append(timed(tree, elec, args.calls))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "head": head.stdout.strip(),
        "rounds": args.rounds,
        "calls": args.calls,
        "runs": runs,
    }
    save_json("model_speed_revisions", result)
    md = [
        f"# Model speed across revisions ({result['date']})",
        "",
        f"`python benchmarks/model_speed_revisions.py` on {result['machine']}; HEAD+ is {result['head']} with the "
        "working tree's changes. Ensemble of 4 default 2x64 networks (random weights), energy + QM and MM forces, "
        "retinoic acid + 2628 charges, 1.4 nm / 0.2 nm switch, float32, 1 thread pinned to one core; "
        f"{args.rounds} rounds x {args.calls} calls, revisions interleaved. ms per call: median of each round's "
        "median (range of the rounds' minima).",
        "",
        "| electrostatics | " + " | ".join(trees) + " |",
        "|---|" + "---|" * len(trees),
    ]
    for elec, by_rev in runs.items():
        cells = []
        for rev in trees:
            med = sorted(r["median_ms"] for r in by_rev[rev])[len(by_rev[rev]) // 2]
            mins = [r["min_ms"] for r in by_rev[rev]]
            cells.append(f"{med:.1f} ({min(mins):.1f}-{max(mins):.1f})")
        md.append(f"| {elec} | " + " | ".join(cells) + " |")
    save_markdown("model_speed_revisions", md)  # prints the table too


if __name__ == "__main__":
    main()
