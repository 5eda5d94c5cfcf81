"""Model speed: energy + forces of a trained HDNNP ensemble for retinoic acid with its 1.4 nm shell,
against DFTB3, GFN2-xTB and DFT on the same frame (ratios), and training throughput (frames/s).

The models (default architecture and descriptor, ensemble of 4, the default 1.4 nm embedding with its
0.2 nm switch; one per electrostatic setting: none, charges, charges+polarisability) are trained here for
a few epochs on frames of the same system labelled with DFTB3 (perturbed copies of the frame): enough to
be trained models of the right size; their accuracy is not the point (see learning_curves.py).

Run: `.venv/bin/python benchmarks/model_speed.py [--threads 2] [--no-dft] [--dft dft:b3lyp/def2-svp]`
Writes benchmarks/results/model_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# isort: off
import qmlmm  # noqa: F401  first: its OpenMP settings must be in the environment when torch loads

# isort: on
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import machine, median_seconds, save_json, save_markdown
from dftb_speed import load_frame
from qmlmm.data import write_dataset
from qmlmm.engines import label_frame, make_engine
from qmlmm.environment import EmbeddingSettings, select_embedding
from qmlmm.models import QMLMMModel
from qmlmm.models.hdnnp import ELECTROSTATICS
from qmlmm.training import SplitSettings, TrainConfig, load_training_data, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dft", default="dft:b3lyp/def2-svp")
    ap.add_argument("--no-dft", action="store_true")
    ap.add_argument("--train-frames", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fr, source = load_frame()
    settings = EmbeddingSettings()
    emb = select_embedding(fr, settings)
    z = fr.numbers[emb.qm_index]
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # a trained model: DFTB3 labels of perturbed copies of the frame
        dftb = make_engine("dftb3:3ob", threads=args.threads)
        rng = np.random.default_rng(0)
        frames = []
        for _ in range(args.train_frames):
            f = fr.copy()
            f.positions = f.positions + rng.normal(scale=0.005, size=f.positions.shape)
            f.labels["dftb3"], _ = label_frame(dftb, f, settings)
            frames.append(f)
        ds = write_dataset(Path(tmp) / "d.h5", frames)
        g = ds._f["levels"]["dftb3"]
        g.attrs["settings"] = json.dumps({"engine": {}, "embedding": settings.to_dict()})
        ds.close()
        data = load_training_data(Path(tmp) / "d.h5", "dftb3", split=SplitSettings(kind="blocks", block_size=2))
        models = {}
        for elec in ELECTROSTATICS:
            cfg = TrainConfig(target="dftb3", ensemble=4, epochs=3, batch_size=4, threads=args.threads,
                              electrostatics=elec)  # fmt: skip
            res = train(data, cfg, Path(tmp) / f"m_{elec}.pt", progress=False)
            rows[f"training, {elec} (ensemble of 4, frames/s per network)"] = {"frames_per_s": res.frames_per_second}
            models[elec] = QMLMMModel.load(Path(tmp) / f"m_{elec}.pt")
    for elec, m in models.items():  # one block of repeats each
        rows[f"model, {elec} (ensemble of 4, float32): energy + QM and MM forces"] = {
            "ms": 1e3 * median_seconds(_model_call(m.engine(args.threads), z, emb), args.repeat)
        }
    model = models["charges"]
    eng = model.engine(args.threads)
    t_model_emb = median_seconds(lambda: eng.compute_frame(fr, select_embedding(fr, settings)), args.repeat)
    t_emb = median_seconds(lambda: select_embedding(fr, settings), args.repeat)
    rows["embedding selection (numpy)"] = {"ms": t_emb * 1e3}
    rows["model, charges, incl. embedding selection"] = {"ms": t_model_emb * 1e3}
    t_dftb = median_seconds(
        lambda: make_engine("dftb3:3ob,reuse=no", threads=args.threads).compute(
            z, emb.qm_positions, emb.mm_positions, emb.mm_charges
        ),
        max(3, args.repeat // 4),
    )
    rows["dftb3:3ob QM/MM"] = {"ms": t_dftb * 1e3}
    xtb = make_engine("xtb:gfn2", threads=args.threads)
    t_xtb = median_seconds(
        lambda: xtb.compute(z, emb.qm_positions, emb.mm_positions, emb.mm_charges, mm_numbers=fr.numbers[emb.mm_index]),
        max(3, args.repeat // 4),
    )
    rows["xtb:gfn2 QM/MM"] = {"ms": t_xtb * 1e3}
    if not args.no_dft:
        dft = make_engine(args.dft, threads=args.threads)
        t0 = time.perf_counter()
        dft.compute(z, emb.qm_positions, emb.mm_positions, emb.mm_charges)
        rows[f"{args.dft} QM/MM (one call)"] = {"ms": (time.perf_counter() - t0) * 1e3}
    ref = rows["model, charges (ensemble of 4, float32): energy + QM and MM forces"]["ms"]
    for r in rows.values():
        if "ms" in r:
            r["ratio_to_model"] = r["ms"] / ref
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "frame": source,
        "n_qm": len(z),
        "n_mm": emb.n_mm,
        "machine": machine(),
        "threads": args.threads,
        "model": model.describe(),
        "rows": rows,
    }
    save_json("model_speed", out)
    md = [
        f"# Model speed ({out['date']})",
        "",
        f"Frame: {source}: {len(z)} QM atoms, {emb.n_mm} embedded charges. "
        f"Machine: {out['machine']}; {args.threads} threads. Model: {out['model']}.",
        "",
        "| case | ms per frame | x model time | frames/s |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r.get('ms', float('nan')):.1f} | {r.get('ratio_to_model', float('nan')):.1f} | "
            f"{r.get('frames_per_s', float('nan')):.1f} |"
        )
    md += ["", "Goal: below 10 ms per frame on 2 CPU cores and at least 1000x faster than DFT/MM."]
    save_markdown("model_speed", md)


def _model_call(eng: Any, z: np.ndarray, emb: Any) -> Callable[[], Any]:
    """One energy + forces call of engine ``eng`` on the embedded frame."""
    return lambda: eng.compute(z, emb.qm_positions, emb.mm_positions, emb.mm_charges)


if __name__ == "__main__":
    main()
