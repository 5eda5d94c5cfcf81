"""GPU check: qmlmm DFTB3 and the HDNNP on CUDA against the CPU, and their GPU speed.

Run on a machine with CUDA: `python benchmarks/gpu_check.py [--frame FILE.extxyz] [--out DIR]`.
Compares energies and forces (float64) CPU vs CUDA for DFTB3/3ob QM/MM on the retinoic-acid frame
and for a randomly initialised HDNNP ensemble, then times DFTB3 single frames and batches and the
model (float32) on the GPU. Prints a table and writes gpu_check.{json,md} (default
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qmlmm.data import read_extxyz
from qmlmm.data.batch import collate, frame_tensors
from qmlmm.descriptors import DescriptorConfig
from qmlmm.engines import make_engine
from qmlmm.environment import EmbeddingSettings, select_embedding
from qmlmm.models import Ensemble, ModelConfig

sys.path.insert(0, str(Path(__file__).parent))

DEFAULT_FRAME = Path(__file__).resolve().parents[2] / "shared" / "data" / "retinoic_acid_in_water.extxyz"


def _time(fn, repeat: int = 5, sync: bool = True) -> float:  # type: ignore[no-untyped-def]
    fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frame", default=str(DEFAULT_FRAME))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    from dftb_speed import cluster_of

    fr = cluster_of(read_extxyz(args.frame)[0])  # the 4.4 nm box is too small for unique images at 1.4 nm
    emb = select_embedding(fr, EmbeddingSettings(1.4))
    z = fr.numbers[emb.qm_index]
    qm, mm, q = emb.qm_positions, emb.mm_positions, emb.mm_charges
    res: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "n_qm": len(z),
        "n_mm": len(q),
    }
    cpu = make_engine("dftb3:3ob,reuse=no,tol=1e-10")
    gpu = make_engine("dftb3:3ob,reuse=no,tol=1e-10,device=cuda")
    rc, rg = cpu.compute(z, qm, mm, q), gpu.compute(z, qm, mm, q)
    res["dftb_energy_diff_kjmol"] = abs(rc.energy - rg.energy)
    res["dftb_qm_force_maxdiff"] = float(np.abs(rc.qm_forces - rg.qm_forces).max())
    res["dftb_mm_force_maxdiff"] = float(np.abs(rc.mm_forces - rg.mm_forces).max())
    g2 = make_engine("dftb3:3ob,reuse=no,device=cuda")
    res["dftb_gpu_single_ms"] = 1e3 * _time(lambda: g2.compute(z, qm, mm, q))
    rng = np.random.default_rng(0)
    for B in (16, 64):
        pos = np.stack([qm + rng.normal(scale=0.003, size=qm.shape) for _ in range(B)])
        t = _time(lambda pos=pos, B=B: g2.compute_batch(z, pos, [mm] * B, [q] * B), repeat=2)  # type: ignore[attr-defined]
        res[f"dftb_gpu_batch{B}_frames_per_s"] = B / t
    # model: CPU vs CUDA in float64, then float32 speed
    cfg = ModelConfig(descriptor=DescriptorConfig(elements=sorted(set(int(a) for a in z))))
    torch.manual_seed(0)
    ens = Ensemble(cfg, 4).double()
    item = frame_tensors(fr, EmbeddingSettings(1.4))
    pc = ens.predict(collate([item], dtype=torch.float64))
    eg = ens.to("cuda")
    pg = eg.predict(collate([item], dtype=torch.float64, device="cuda"))
    res["model_energy_diff"] = float((pc.energy - pg.energy.cpu()).abs().max())
    res["model_qm_force_maxdiff"] = float((pc.qm_forces - pg.qm_forces.cpu()).abs().max())
    res["model_mm_force_maxdiff"] = float((pc.mm_forces - pg.mm_forces.cpu()).abs().max())
    e32 = Ensemble(cfg, 4).to("cuda")
    b32 = collate([item], dtype=torch.float32, device="cuda")
    res["model_gpu_float32_ms_per_frame"] = 1e3 * _time(lambda: e32.predict(b32), repeat=20)
    b16 = collate([item] * 16, dtype=torch.float32, device="cuda")
    res["model_gpu_float32_batch16_frames_per_s"] = 16 / _time(lambda: e32.predict(b16), repeat=5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    lines = ["# GPU check", "", "| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in res.items()]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
