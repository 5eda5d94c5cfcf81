"""The model call with the descriptor's compiled kernels against its torch form (issue 21: < 10 ms).

One ML/MM MD step's model call: energy + QM and MM forces and dE/dq of an ensemble of 4 default 2x64
networks with random weights (electrostatics "charges", float32; same cost as trained weights) on the
retinoic-acid timing frame with its 2628 embedded charges (1.4 nm cutoff, 0.2 nm switch), through the
model engine, as MD calls it. Three ways, timed in alternating blocks in this one process:

- ``train mode``: how a loaded model ran in MD before 2026-12-07 (QMLMMModel left its ensemble in training
  mode: members one by one, torch form of every term);
- ``eval, torch form``: members fused, every term and the pair lists in torch's operations (``native = False``);
- ``eval, kernels``: members fused, the QM angular, MM angular and MM radial terms, the exact potential
  and field of the long-range term and the QM-QM and QM-MM pair lists compiled (qmlmm.descriptors.native;
  the default now).

Also each compiled term's forward and backward alone, in both forms. Threads: 1 and 2 (the machine's 2
cores). Per setting: the median of each block's median, and the range of the blocks' minima.

Run: `.venv/bin/python benchmarks/model_kernels.py [--repeat 30] [--blocks 5] [--name model_kernels]`.
Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# isort: off
import qmlmm  # noqa: F401  first: its OpenMP settings must be in the environment when torch loads

# isort: on
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import machine, save_json, save_markdown
from dftb_speed import load_frame
from md_profile import random_models

MODES = ("train mode", "eval, torch form", "eval, kernels")


def blocks_ms(
    fns: dict[str, Callable[[], Any]],
    repeat: int,
    blocks: int,
    setups: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, dict[str, float]]:
    """Per function: the median of its blocks' median ms and the lowest and highest of its blocks' minima;
    the functions timed in alternating blocks of ``repeat`` calls (its ``setups`` entry, untimed, and one
    untimed call first in each)."""
    per: dict[str, list[list[float]]] = {k: [] for k in fns}
    for _ in range(blocks):
        for k, fn in fns.items():
            if setups and k in setups:
                setups[k]()
            fn()
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                ts.append(1e3 * (time.perf_counter() - t0))
            per[k].append(ts)
    return {
        k: {
            "median_ms": statistics.median(statistics.median(b) for b in v),
            "min_low_ms": min(min(b) for b in v),
            "min_high_ms": max(min(b) for b in v),
        }
        for k, v in per.items()
    }


def _cell(r: dict[str, float]) -> str:
    """'median (lowest-highest block minimum)' in ms."""
    return f"{r['median_ms']:.1f} ({r['min_low_ms']:.1f}-{r['min_high_ms']:.1f})"


def _with_kernel(module: Any) -> bool:
    """Whether a module is a descriptor term with a compiled kernel (qmlmm.descriptors.native)."""
    from qmlmm.descriptors.terms import LongRange, MMAngular, MMRadial, QMAngular

    return isinstance(module, MMAngular | MMRadial | QMAngular | LongRange)


def _set_mode(model: Any, mode: str) -> None:
    from qmlmm.descriptors.acsf import ACSF

    model.ensemble.train(mode == "train mode")
    for t in model.ensemble.modules():
        if _with_kernel(t) or isinstance(t, ACSF):  # the terms and the pair lists
            t.native = mode == "eval, kernels"


def model_calls(model: Any, fr: Any, emb: Any, repeat: int, blocks: int) -> dict[str, dict[str, float]]:
    """ms of the engine's call (as in MD) in each mode."""
    eng = model.engine(torch.get_num_threads())

    def call() -> Any:
        return eng.compute_frame(fr, emb)

    # each block sets its mode once (setting it on every call, over all modules, cost ~1 ms a call)
    def setter(mode: str) -> Callable[[], Any]:
        return lambda: _set_mode(model, mode)

    setups = {m: setter(m) for m in MODES}
    return blocks_ms(dict.fromkeys(MODES, call), repeat, blocks, setups)


def term_calls(model: Any, fr: Any, emb: Any, repeat: int, blocks: int) -> dict[str, dict[str, float]]:
    """ms of each compiled term's forward + backward (gradient of its features' sum in QM and MM positions and
    MM charges), torch form and kernel, on the frame's neighbour lists (built once)."""
    from qmlmm.data.batch import collate, frame_tensors
    from qmlmm.descriptors.acsf import ACSF

    model.ensemble.eval()
    desc = next(m for m in model.ensemble.modules() if isinstance(m, ACSF))
    b = collate([frame_tensors(fr, model.embedding, emb=emb)], dtype=model.dtype)
    b = dataclasses.replace(
        b,
        qm_pos=b.qm_pos.clone().requires_grad_(),
        mm_pos=b.mm_pos.clone().requires_grad_(),
        mm_q=b.mm_q.clone().requires_grad_(),
    )
    nb = desc.neighbours(b)
    fns: dict[str, Callable[[], Any]] = {}
    for term in desc.terms:
        if not _with_kernel(term):
            continue
        for native in (False, True):

            def f(term: Any = term, native: bool = native) -> Any:
                term.native = native
                out = term(nb)
                wrt = [b.qm_pos, b.mm_pos, b.mm_q]
                return torch.autograd.grad(out.sum(), wrt, retain_graph=True, allow_unused=True)

            fns[f"{term.name}, {'kernel' if native else 'torch form'}"] = f
    return blocks_ms(fns, repeat, blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--name", default="model_kernels")
    args = ap.parse_args()
    from qmlmm.descriptors.native import native_available
    from qmlmm.environment import EmbeddingSettings, select_embedding

    assert native_available(), "the compiled kernels did not build here"
    fr, source = load_frame()
    emb = select_embedding(fr, EmbeddingSettings())
    model = random_models(sorted({int(z) for z in fr.numbers[emb.qm_index]}), 4)["direct"]
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "frame": source,
        "n_qm": len(emb.qm_index),
        "n_mm": emb.n_mm,
        "machine": machine(),
        "model": model.describe(),
        "repeat": args.repeat,
        "blocks": args.blocks,
        "calls": {},
        "terms": {},
    }
    for threads in (2, 1):
        torch.set_num_threads(threads)
        out["calls"][threads] = model_calls(model, fr, emb, args.repeat, args.blocks)
        out["terms"][threads] = term_calls(model, fr, emb, args.repeat, args.blocks)
    save_json(args.name, out)
    md = [
        f"# Model call: compiled descriptor kernels against the torch form ({out['date']})",
        "",
        f"`python benchmarks/model_kernels.py` on {out['machine']}. Frame: {source}: {out['n_qm']} QM atoms, "
        f"{out['n_mm']} embedded charges. Model: {out['model']} (random weights). Energy + QM and MM forces + dE/dq "
        f"through the model engine, as in MD. {args.blocks} alternating blocks of {args.repeat} calls: median of "
        "the blocks' medians (range of the blocks' minima), ms.",
        "",
        "| threads | " + " | ".join(MODES) + " | kernels / eval torch form | kernels / train mode |",
        "|---|" + "---|" * (len(MODES) + 2),
    ]
    for threads, rows in out["calls"].items():
        cells = [_cell(rows[m]) for m in MODES]
        k = rows["eval, kernels"]["median_ms"]
        md.append(
            f"| {threads} | "
            + " | ".join(cells)
            + f" | {k / rows['eval, torch form']['median_ms']:.2f} | {k / rows['train mode']['median_ms']:.2f} |"
        )
    md += [
        "",
        "Each compiled term alone, forward + backward (gradient in QM and MM positions and MM charges), ms:",
        "",
        "| threads | term | torch form | kernel | ratio |",
        "|---|---|---|---|---|",
    ]
    for threads, rows in out["terms"].items():
        for name in dict.fromkeys(k.split(",")[0] for k in rows):
            t, n = rows[f"{name}, torch form"]["median_ms"], rows[f"{name}, kernel"]["median_ms"]
            md.append(f"| {threads} | {name} | {t:.2f} | {n:.2f} | {n / t:.2f} |")
    md += ["", "Goal (issue 21): the model call below 10 ms on 2 CPU threads."]
    save_markdown(args.name, md)


if __name__ == "__main__":
    main()
