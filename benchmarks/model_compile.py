"""Does torch.compile make the model call faster on the CPU? (issue 21: model call < 10 ms)

The same call as model_speed.py (energy + QM and MM forces of an ensemble of 4 default 2x64 networks with
random weights, the retinoic-acid timing frame with its 2628 embedded charges, 1.4 nm cutoff and 0.2 nm
switch, float32, dE/dq as in MD), eager and through ``torch.compile(dynamic=True)`` (TorchInductor, C++
kernels), both in this process, on one thread, calls of the two interleaved in blocks. Also the dense core
of the descriptor's MM angular term alone (the largest single term in the profile: per QM pair and MM
neighbour, (P, K) = (742, 62) here), whose forward and backward have no data-dependent shapes and so
compile without graph breaks.

Run: `.venv/bin/python benchmarks/model_compile.py [--repeat 40]` (minutes: compilation).
Writes benchmarks/results/model_compile.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
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
from _results import machine, save_json, save_markdown
from dftb_speed import load_frame


def interleaved_ms(fns: dict[str, Callable[[], Any]], repeat: int, blocks: int = 4) -> dict[str, float]:
    """Median ms per call of each function, the functions timed in alternating blocks."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for k, fn in fns.items():
            for _ in range(max(1, repeat // blocks)):
                t0 = time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in ts.items()}


def compiled_seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of the first call (compilation included)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_rows(repeat: int) -> dict[str, Any]:
    from qmlmm.data.batch import collate, frame_tensors
    from qmlmm.descriptors.acsf import DescriptorConfig
    from qmlmm.environment import EmbeddingSettings, select_embedding
    from qmlmm.models.ensemble import Ensemble
    from qmlmm.models.hdnnp import HDNNP, ModelConfig, with_grad_inputs

    fr, source = load_frame()
    settings = EmbeddingSettings()
    emb = select_embedding(fr, settings)
    z = fr.numbers[emb.qm_index]
    torch.manual_seed(0)
    cfg = ModelConfig(descriptor=DescriptorConfig.from_dict({"elements": sorted({int(x) for x in z})}))
    ens = Ensemble(cfg, [HDNNP(cfg) for _ in range(4)]).eval()
    b = collate([frame_tensors(fr, settings, emb=emb)], dtype=torch.float32)

    def call(f: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        bb = with_grad_inputs(b, charges=True)
        with torch.enable_grad():
            e = f(bb).mean(0).sum()
            return torch.autograd.grad(e, [bb.qm_pos, bb.mm_pos, bb.mm_q])

    compiled = torch.compile(ens.member_energies, dynamic=True)
    first = compiled_seconds(lambda: call(compiled))
    ge, gc = call(ens.member_energies), call(compiled)
    diff = max(float((a - c).abs().max() / a.abs().max()) for a, c in zip(ge, gc, strict=True))
    ms = interleaved_ms({"eager": lambda: call(ens.member_energies), "compiled": lambda: call(compiled)}, repeat)
    return {"frame": source, "n_qm": len(z), "n_mm": emb.n_mm, "ms": ms, "first_call_s": first, "max_rel_diff": diff}


def mm_angular_core_rows(repeat: int) -> dict[str, Any]:
    """The MM angular term's dense part (qmlmm.descriptors.terms.MMAngular.forward after its gathers) on
    random inputs of the timing frame's shape."""
    from qmlmm.descriptors.acsf import DescriptorConfig
    from qmlmm.descriptors.cutoffs import cosine_cutoff
    from qmlmm.descriptors.terms import _power, _zeta_lambda

    c = DescriptorConfig.from_dict({"elements": [1, 6, 8]})
    zl = _zeta_lambda(c.angular_zetas)
    shifts, zetas = torch.tensor(c.mm_angular_shifts), torch.tensor([z for z, _ in zl])
    width, qc = c.mm_angular_width, c.qm_angular_cutoff

    def core(uk: torch.Tensor, rk: torch.Tensor, wk: torch.Tensor, uj: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
        cos_t = (uk[..., 0] * uj[:, 0, None] + uk[..., 1] * uj[:, 1, None] + uk[..., 2] * uj[:, 2, None]).clamp(-1, 1)
        base = {1.0: 1.0 + cos_t, -1.0: 1.0 - cos_t}
        ang = torch.stack([_power(base[lam], z) for z, lam in zl], dim=1)
        x = (0.5 * (ar[:, None] + rk))[..., None] - shifts
        rad = torch.exp(x * x * (-0.5 / width**2))[:, :, None, :] * wk[..., None]
        per_p = torch.bmm(ang, rad.reshape(len(ar), rk.shape[1], -1))
        scale = 2.0 ** (1.0 - zetas[None, :, None]) * cosine_cutoff(ar, qc)[:, None, None]
        return (per_p * scale).reshape(len(ar), -1)

    g = torch.Generator().manual_seed(0)
    p, k = 742, 62
    inp = [
        torch.nn.functional.normalize(torch.randn(p, k, 3, generator=g), dim=-1),
        0.2 + 0.4 * torch.rand(p, k, generator=g),
        torch.randn(p, k, 1, generator=g),
        torch.nn.functional.normalize(torch.randn(p, 3, generator=g), dim=-1),
        0.1 + 0.3 * torch.rand(p, generator=g),
    ]
    inp = [x.requires_grad_() for x in inp]

    def call(f: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(f(*inp).square().sum(), inp)

    compiled = torch.compile(core, dynamic=True)
    first = compiled_seconds(lambda: call(compiled))
    ms = interleaved_ms({"eager": lambda: call(core), "compiled": lambda: call(compiled)}, repeat)
    return {"shape": [p, k], "ms": ms, "first_call_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=40)
    a = ap.parse_args()
    torch.set_num_threads(1)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "threads": 1,
        "model": model_rows(a.repeat),
        "mm_angular_core": mm_angular_core_rows(a.repeat),
    }
    save_json("model_compile", res)
    m, c = res["model"], res["mm_angular_core"]
    save_markdown(
        "model_compile",
        [
            f"# torch.compile on the CPU ({res['date']})",
            "",
            f"Machine: {res['machine']}; 1 thread. `python benchmarks/model_compile.py`. Eager and compiled calls "
            "interleaved in blocks; medians.",
            "",
            "| call | eager ms | compiled ms | compiled / eager | first compiled call s |",
            "|---|---|---|---|---|",
            f"| model: ensemble of 4, energy + QM and MM forces + dE/dq ({m['n_qm']} QM atoms, {m['n_mm']} charges) "
            f"| {m['ms']['eager']:.1f} | {m['ms']['compiled']:.1f} | {m['ms']['compiled'] / m['ms']['eager']:.2f} "
            f"| {m['first_call_s']:.0f} |",
            f"| MM angular term's dense core, forward + backward, (P, K) = {tuple(c['shape'])} | "
            f"{c['ms']['eager']:.2f} | {c['ms']['compiled']:.2f} | {c['ms']['compiled'] / c['ms']['eager']:.2f} "
            f"| {c['first_call_s']:.0f} |",
            "",
            f"Compiled and eager model gradients agree to {m['max_rel_diff']:.1e} (largest difference over the "
            "largest gradient). The whole model compiles in pieces: neighbour lists, `nonzero` and the "
            "frame-size checks break the graph. First-call seconds depend on TorchInductor's on-disk cache "
            "(a cold cache took 138 s for the model in a trial the same day). Not used: slower for the model, no "
            "gain where the graph is whole.",
        ],
    )


if __name__ == "__main__":
    main()
