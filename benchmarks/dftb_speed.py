"""DFTB speed: energy + all forces for retinoic acid (50 atoms) with its 1.4 nm TIP3P shell.

Compared in one run on the same frame: qmlmm `dftb3:3ob` (PyTorch, float64), GFN2-xTB with the
same point charges (`xtb:gfn2`), and SCINE Sparrow's DFTB3/3ob-3-1 in vacuum (it has no point
charges), plus qmlmm DFTB3 in vacuum; then the batched throughput of `dftb3:3ob` for 16 frames
(perturbed copies of the frame) against computing them one by one.

Frame: ../shared/data/retinoic_acid_in_water.extxyz if present (2628 embedded charges), else
retinoic acid from SMILES in a toy water box.

Run: `.venv/bin/python benchmarks/dftb_speed.py [--threads 2] [--repeat 10] [--device cpu]`
Writes benchmarks/results/dftb_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# isort: off
import qmlmm  # noqa: F401  first: its OpenMP settings must be in the environment when torch loads

# isort: on
import numpy as np
import torch

from _results import machine, save_json, save_markdown
from qmlmm.data import read_extxyz
from qmlmm.engines import make_engine
from qmlmm.engines.dftb import compiled_terms
from qmlmm.environment import EmbeddingSettings, select_embedding
from qmlmm.system import Frame
from qmlmm.testing import solute_from_smiles, solvated_frame

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "retinoic_acid_in_water.extxyz"
TORCH_ROW = "same, torch matrices and potential (the default before 2026-12-07)"
RETINOIC_ACID = "CC1=C(C(CCC1)(C)C)/C=C/C(=C/C=C/C(=C/C(=O)O)/C)/C"


def load_frame() -> tuple[Frame, str]:
    """The timing frame as an isolated cluster: retinoic acid and every water within 1.7 nm of it, at the
    periodic image the embedding picks. Its 4.4 nm box is 0.15 nm short of unique periodic images at a
    1.4 nm cutoff (2 r_c + D_qm + d_water = 4.55 nm), which qmlmm now refuses for labels and MD; for timings
    the cluster has the same 2628 embedded charges, and no box to check."""
    if SHARED.exists():
        fr, name = read_extxyz(SHARED)[0], SHARED.name
    else:
        z, p, q = solute_from_smiles(RETINOIC_ACID, seed=0)
        fr, name = solvated_frame((z, p), box=4.4, seed=0, qm_charge=q), "retinoic acid (RDKit) in a toy 4.4 nm box"
    return cluster_of(fr), f"{name} (as a cluster: QM region and waters within 1.7 nm)"


def cluster_of(fr: Frame, radius: float = 1.7) -> Frame:
    """``fr`` as an isolated cluster: its QM region and the molecules within ``radius`` nm, at the image the
    embedding picks (for timings on frames whose box is too small for unique images; see load_frame)."""
    from qmlmm.environment import EmbeddingSettings, select_embedding

    e = select_embedding(fr, EmbeddingSettings(radius, 0.0), check_images=False)
    idx = np.concatenate([e.qm_index, e.mm_index])
    cluster = Frame(
        numbers=fr.numbers[idx],
        positions=np.concatenate([e.qm_positions, e.mm_positions]),
        is_qm=fr.is_qm[idx],
        charges=fr.charges[idx],
        mol_ids=fr.mol_ids[idx],
        box=None,
        qm_charge=fr.qm_charge,
        qm_mult=fr.qm_mult,
    )
    return cluster


def timeit(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()  # warm-up (builds calculators, caches)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="dftb_speed", help="result file stem in benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fr, source = load_frame()
    emb = select_embedding(fr, EmbeddingSettings(1.4))
    z = fr.numbers[emb.qm_index]
    qm, mm, q, zmm = emb.qm_positions, emb.mm_positions, emb.mm_charges, fr.numbers[emb.mm_index]
    rows: dict[str, dict[str, float]] = {}

    dftb = make_engine(f"dftb3:3ob,device={args.device},reuse=no", threads=args.threads)
    # the MD-like rows start each SCC from the previous step's charges (guess=previous): their steps are a random
    # walk, along which an extrapolation (the engine's default since 2026-12-07) would only add noise; its gain
    # on real MD steps is measured by dftb_scc_iterations.py
    dftb_md = make_engine(f"dftb3:3ob,device={args.device},guess=previous", threads=args.threads)
    xtb = make_engine("xtb:gfn2", threads=args.threads)
    cases: dict[str, Callable[[], object]] = {
        "qmlmm dftb3:3ob + point charges": lambda: dftb.compute(z, qm, mm, q),
        "xtb:gfn2 + point charges": lambda: xtb.compute(z, qm, mm, q, mm_numbers=zmm),
        "qmlmm dftb3:3ob vacuum": lambda: dftb.compute(z, qm),
    }
    try:
        import scine_sparrow  # noqa: F401
        import scine_utilities as su

        from qmlmm.elements import symbol
        from qmlmm.units import BOHR_PER_NM

        calc = su.core.ModuleManager.get_instance().get("calculator", "DFTB3")
        calc.log = su.core.Log.silent()
        calc.settings["method_parameters"] = "3ob-3-1"
        calc.settings["self_consistence_criterion"] = 1e-8
        calc.structure = su.AtomCollection([getattr(su.ElementType, symbol(int(a))) for a in z], qm * BOHR_PER_NM)
        calc.set_required_properties([su.Property.Energy, su.Property.Gradients])
        cases["Sparrow DFTB3 vacuum"] = calc.calculate
    except ImportError:
        pass
    for name, fn in cases.items():
        med, best = timeit(fn, args.repeat)
        rows[name] = {"median_ms": med * 1e3, "min_ms": best * 1e3}
        print(f"{name:36s} {med * 1e3:9.1f} ms (min {best * 1e3:.1f})", flush=True)

    # MD-like: consecutive geometries 0.5 fs apart (~0.0005 nm moves), SCC started from the last charges
    rng_md = np.random.default_rng(1)
    steps = np.cumsum(rng_md.normal(scale=0.0005, size=(args.repeat + 1, *qm.shape)), axis=0)
    traj = [(qm + steps[k], mm) for k in range(args.repeat + 1)]
    # the same steps with each SCC mixer (newton: the default; anderson: the default before 2026-12-06), in
    # interleaved rounds so that load changes hit both alike
    # and with the torch forms of the matrices and potential (the default before 2026-12-07: compiled ones)
    dftb_anderson = make_engine(f"dftb3:3ob,device={args.device},mixer=anderson,guess=previous", threads=args.threads)
    dftb_torch = make_engine(f"dftb3:3ob,device={args.device},guess=previous", threads=args.threads)
    md_rows = {
        "qmlmm dftb3:3ob + charges, MD step (previous charges)": (dftb_md, True),
        "same, Anderson mixer (the default before 2026-12-06)": (dftb_anderson, True),
        TORCH_ROW: (dftb_torch, False),
    }
    times: dict[str, list[float]] = {name: [] for name in md_rows}
    for _ in range(3):
        for name, (eng, kernel) in md_rows.items():
            it = iter(traj)
            compiled_terms.USE_KERNEL = kernel
            med, best = timeit(lambda eng=eng, it=it: eng.compute(z, *next(it), q), args.repeat)  # type: ignore[misc]
            compiled_terms.USE_KERNEL = True
            times[name] += [med, best]
    for name, ts in times.items():
        med, best = statistics.median(ts[0::2]), min(ts[1::2])
        rows[name] = {"median_ms": med * 1e3, "min_ms": best * 1e3}
        print(f"{name}: {med * 1e3:.1f} ms (min {best * 1e3:.1f})", flush=True)

    # batched throughput: perturbed copies of the frame (same molecule, ragged-free)
    rng = np.random.default_rng(0)
    B = args.batch
    pos = np.stack([qm + rng.normal(scale=0.003, size=qm.shape) for _ in range(B)])
    mms = [mm + rng.normal(scale=0.003, size=mm.shape) for _ in range(B)]
    qs = [q] * B
    med_b, _ = timeit(lambda: dftb.compute_batch(z, pos, mms, qs), max(2, args.repeat // 4))  # type: ignore[attr-defined]
    med_1, _ = timeit(lambda: [dftb.compute(z, pos[k], mms[k], qs[k]) for k in range(B)], max(2, args.repeat // 4))
    rows[f"dftb3:3ob batch of {B}"] = {"frames_per_s": B / med_b, "median_ms": med_b * 1e3}
    rows[f"dftb3:3ob {B} one by one"] = {"frames_per_s": B / med_1, "median_ms": med_1 * 1e3}
    print(f"batched: {B / med_b:.1f} frames/s; one by one: {B / med_1:.1f} frames/s", flush=True)

    t_dftb = rows["qmlmm dftb3:3ob + point charges"]["median_ms"]
    t_xtb = rows["xtb:gfn2 + point charges"]["median_ms"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "frame": source,
        "n_qm": len(z),
        "n_charges": len(q),
        "machine": machine(),
        "threads": args.threads,
        "device": args.device,
        "rows": rows,
        "ratio_xtb_over_dftb3": t_xtb / t_dftb,
        "md_step_anderson_over_newton": rows["same, Anderson mixer (the default before 2026-12-06)"]["median_ms"]
        / rows["qmlmm dftb3:3ob + charges, MD step (previous charges)"]["median_ms"],
        "md_step_torch_over_compiled": rows[TORCH_ROW]["median_ms"]
        / rows["qmlmm dftb3:3ob + charges, MD step (previous charges)"]["median_ms"],
        "md_step_over_sparrow": rows["qmlmm dftb3:3ob + charges, MD step (previous charges)"]["median_ms"]
        / rows["Sparrow DFTB3 vacuum"]["median_ms"]
        if "Sparrow DFTB3 vacuum" in rows
        else None,
    }
    save_json(f"{args.out}", result)
    md = [
        f"# DFTB speed ({result['date']})",
        "",
        f"Frame: {source}: {len(z)} QM atoms, {len(q)} embedded point charges (1.4 nm). "
        f"Machine: {result['machine']}; {args.threads} threads; device {args.device}.",
        "",
        "| case | median ms | min ms | frames/s |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r.get('median_ms', float('nan')):.1f} | {r.get('min_ms', float('nan')):.1f} | "
            f"{r.get('frames_per_s', float('nan')):.1f} |"
        )
    md += [
        "",
        f"xtb:gfn2 / dftb3:3ob time ratio on the same frame: **{result['ratio_xtb_over_dftb3']:.2f}** "
        "(> 1: DFTB3 is faster). Both start their SCC from scratch here (`reuse=no`); the MD-step row "
        "starts from the previous step's charges, as `qmlmm md` and labelling of consecutive frames do.",
        f"MD step, Anderson / newton mixer (3 interleaved rounds, medians): "
        f"**{result['md_step_anderson_over_newton']:.2f}**.",
        f"MD step, torch / compiled matrices and potential (3 interleaved rounds, medians): "
        f"**{result['md_step_torch_over_compiled']:.2f}**.",
    ]
    if result["md_step_over_sparrow"] is not None:
        md.append(f"MD step / Sparrow's vacuum DFTB3 (target <= 2): **{result['md_step_over_sparrow']:.2f}**.")
    save_markdown(f"{args.out}", md)


if __name__ == "__main__":
    main()
